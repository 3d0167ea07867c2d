"""The device layer on machines this CPU stands in for: CUDA GPUs, several GPUs, bf16 CPUs.

Each capability is mocked both ways, so the decisions a GPU or a bf16 server would take are
checked here, on any CPU.
"""
import os

import pytest
import torch
import torch.distributed as td

from triplet import distributed as dist
from triplet import engine, runtime
from triplet.checkpoint import check_world_size, make_optimizer, prepare_training
from triplet.errors import UserError
from triplet.mining import packaged_triplets

CPU = torch.device("cpu")
CUDA = torch.device("cuda", 0)


@pytest.fixture
def capabilities(monkeypatch):
    """Set what torch.cpu.get_capabilities() reports, and oneDNN's bf16 answer (as it gives on such a CPU:
    the real one says False on an AVX2-only machine, or under ONEDNN_MAX_CPU_ISA=AVX2)."""
    def set_capabilities(**flags):
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"architecture": "x86_64", **flags})
        native = runtime.cpu_bf16_decision(flags)[0]  # what the flags alone say
        monkeypatch.setattr(runtime, "onednn_has_bf16", lambda: native)
    return set_capabilities


@pytest.mark.parametrize("flags, native", [
    ({"avx512_bf16": True}, True), ({"amx_bf16": True, "avx512_bf16": True}, True), ({"bf16": True}, True),
    ({"avx2": True}, False), ({"avx512_f": True, "avx512_bf16": False}, False), ({}, False)])
def test_cpu_bf16_decision_from_capabilities(flags, native):
    decided, reason = runtime.cpu_bf16_decision(flags)
    assert decided is native
    assert ("native bf16" in reason) if native else ("emulated" in reason)
    assert runtime.cpu_bf16_decision(flags, onednn_bf16=False)[0] is False


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_on_a_cpu_follows_native_bf16(capabilities, native):
    capabilities(avx2=True, avx512_bf16=native)
    precision, reason = runtime.choose_precision("auto", CPU)
    assert precision == ("bf16" if native else "fp32")
    assert ("avx512_bf16" in reason) if native else ("no native bf16" in reason)
    assert runtime.resolve_precision("auto", CPU) == precision and runtime.cpu_has_bf16() is native
    assert runtime.choose_precision("fp32", CPU) == ("fp32", "--precision fp32")


@pytest.fixture
def gpu(monkeypatch):
    """A CUDA machine: ``gpu(count, native_bf16)``; nothing runs on it, only decisions are taken."""
    def make(count=1, native_bf16=True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
        monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                            lambda including_emulation=True: native_bf16 or including_emulation)
    return make


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp16")])
def test_auto_precision_on_cuda_takes_bf16_only_where_native(gpu, native, expected):
    gpu(native_bf16=native)  # a T4 or V100 "supports" bf16 only by emulation
    precision, reason = runtime.choose_precision("auto", CUDA)
    assert precision == expected and "Fake GPU" in reason
    assert isinstance(runtime.grad_scaler(CUDA, precision), torch.amp.GradScaler) is (expected == "fp16")


@pytest.mark.parametrize("native", [True, False])
def test_bf16_asked_for_by_name_says_where_it_is_only_emulated(gpu, capabilities, native):
    gpu(native_bf16=native)
    capabilities(avx2=True, avx512_bf16=native)
    for device, faster in ((CUDA, "fp16"), (CPU, "fp32")):
        precision, reason = runtime.choose_precision("bf16", device)
        assert precision == "bf16" and reason.startswith("--precision bf16")
        assert (f"emulated on this {'GPU' if device == CUDA else 'CPU'}, slower than --precision {faster}" in reason) \
            is not native


def test_a_cuda_run_records_tf32_and_the_autotuner(gpu):
    gpu()
    recorded = runtime.environment(CUDA, "fp32")["cuda"]
    assert recorded["tf32_convolutions"] is torch.backends.cudnn.allow_tf32
    assert set(recorded) == {"tf32_convolutions", "tf32_matmul", "cudnn_benchmark", "deterministic_algorithms"}
    assert "cuda" not in runtime.environment(CPU, "fp32")


@pytest.mark.parametrize("device, precision", [(CPU, "fp16"), (torch.device("mps"), "bf16")])
def test_precisions_a_device_cannot_run_are_refused(device, precision):
    with pytest.raises(UserError, match=f"--precision {precision}"):
        runtime.choose_precision(precision, device)


@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_loss_scaling_gives_the_unscaled_update_and_fp16_autocasts_to_half():
    torch.manual_seed(0)
    models = [torch.nn.Linear(4, 3) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    batch = [(torch.randn(6, 4), torch.zeros(6))]
    for model, scaler in zip(models, (None, torch.amp.GradScaler("cpu", init_scale=2.0**10))):
        engine.train_one_epoch(model, batch, torch.optim.SGD(model.parameters(), lr=0.1), CPU, "fp32", 1.0,
                               packaged_triplets, progress=False, scaler=scaler, prepare=lambda x, d: x)
    torch.testing.assert_close(models[1].weight, models[0].weight)
    assert runtime.autocast(CUDA, "fp16").fast_dtype == torch.float16
    assert runtime.autocast(CPU, "bf16").fast_dtype == torch.bfloat16


def test_ddp_backend_follows_the_device_not_whether_cuda_exists(gpu, monkeypatch):
    gpu(count=1)
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(td, "init_process_group", lambda backend, device_id: calls.append(("init", backend, device_id)))
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    assert dist.init_distributed(CPU)  # torchrun ... --device cpu on a GPU machine
    assert calls == [("init", "gloo", None)]
    calls.clear()
    dist.init_distributed(CUDA)
    assert calls == [("set_device", CUDA), ("init", "nccl", CUDA)]


def test_torchrun_on_mps_is_one_clear_error(monkeypatch):
    """gloo carries only CPU and CUDA tensors: DDP's first broadcast of MPS parameters would fail."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert runtime.resolve_device("auto") == torch.device("mps")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("auto", "mps"):
        with pytest.raises(UserError, match=f"--device {name}: torchrun's processes would exchange MPS tensors"):
            runtime.resolve_device(name)
    assert runtime.resolve_device("cpu") == CPU


def test_more_local_processes_than_gpus_is_one_clear_error(gpu, monkeypatch):
    gpu(count=2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    for name in ("cuda", "auto"):
        with pytest.raises(UserError, match="starts 4 processes on this machine but 2 CUDA device"):
            runtime.resolve_device(name)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert runtime.resolve_device("cuda") == torch.device("cuda", 1)
    assert runtime.resolve_device("cpu") == CPU


def test_workers_per_process_come_from_the_processes_on_this_machine(monkeypatch):
    monkeypatch.setattr(runtime, "usable_cores", lambda: 16)
    monkeypatch.setenv("WORLD_SIZE", "16")  # two machines of 8 GPUs: each process has 2 cores here
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert runtime.default_workers(CUDA) == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert runtime.default_workers(CUDA) == 7 and runtime.default_workers(torch.device("mps")) == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert runtime.default_workers(CUDA) == 15
    monkeypatch.setattr(runtime, "usable_cores", lambda: 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # one core each: decoding shares the main process's
    assert runtime.default_workers(CUDA) == 1 and runtime.default_workers(CPU, threads=1) == 0


def test_a_gpu_on_a_many_core_node_gets_at_most_16_workers(monkeypatch):
    """A 224-thread node would otherwise start 223 workers per GPU, each with 4 batches in flight."""
    monkeypatch.setattr(runtime, "usable_cores", lambda: 224)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert runtime.default_workers(CUDA) == runtime.CUDA_MAX_WORKERS == 16
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # 28 cores per GPU: still 16
    assert runtime.default_workers(CUDA) == 16 and runtime.loader_workers(CUDA, 40) == 40  # --workers 40 as asked
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")  # 14 cores per process: 13
    assert runtime.default_workers(CUDA) == 13


def test_a_cpu_run_gives_a_worker_only_a_core_its_threads_leave_free(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(runtime, "usable_cores", lambda: 2)
    assert runtime.default_workers(CPU, threads=2) == 0  # 2 cores, both computing: load between steps
    assert runtime.default_workers(CPU, threads=1) == 1  # OMP_NUM_THREADS=1 leaves a core idle
    monkeypatch.setattr(runtime, "usable_cores", lambda: 64)
    assert runtime.default_workers(CPU, threads=32) == 1  # 32 cores with SMT: a sibling is free
    assert runtime.default_workers(CPU, threads=64) == 0
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun: 16 CPUs each
    assert runtime.default_workers(CPU, threads=16) == 0 and runtime.default_workers(CPU, threads=8) == 1


@pytest.fixture
def cpu_threads(monkeypatch):
    """torch's intra-op threads, restored after the test; no OMP_NUM_THREADS unless the test sets one."""
    threads = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    yield
    torch.set_num_threads(threads)


def test_a_cpu_of_eight_cores_or_more_keeps_one_for_the_loader_worker(monkeypatch, cpu_threads):
    for cores, threads, expected in [(2, 2, 2), (4, 4, 4), (8, 8, 7), (12, 12, 11), (12, 6, 6), (4, 16, 4)]:
        monkeypatch.setattr(runtime, "usable_cores", lambda cores=cores: cores)
        torch.set_num_threads(threads)
        assert runtime.set_cpu_threads(CPU) == expected == torch.get_num_threads(), (cores, threads)
        assert runtime.default_workers(CPU) == (1 if cores > expected else 0)
    torch.set_num_threads(8)
    monkeypatch.setattr(runtime, "usable_cores", lambda: 8)
    assert runtime.set_cpu_threads(CPU, workers=0) == 8  # --workers 0: every core computes
    # loader_workers (train.py, evaluate.py) sets the threads first, so the worker finds its core
    assert runtime.loader_workers(CPU) == 1 and torch.get_num_threads() == 7
    torch.set_num_threads(8)
    assert runtime.loader_workers(CPU, 3) == 3 and torch.get_num_threads() == 7  # --workers 3 as asked
    torch.set_num_threads(8)
    monkeypatch.setattr(runtime, "usable_cores", lambda: 16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # a launcher that leaves OMP_NUM_THREADS unset: 4 each, not 8
    assert runtime.set_cpu_threads(CPU) == 4 and runtime.default_workers(CPU) == 0
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    torch.set_num_threads(8)
    monkeypatch.setattr(runtime, "usable_cores", lambda: 8)
    assert runtime.set_cpu_threads(CUDA) == 8  # a GPU run's threads are not the loader's concern
    monkeypatch.setenv("OMP_NUM_THREADS", "8")  # the user's choice (torchrun sets 1) stands
    assert runtime.set_cpu_threads(CPU) == 8 and runtime.default_workers(CPU) == 0


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter")
def test_resumed_optimizer_state_lives_with_its_parameters():
    """The model reaches its device before Adam exists, so Adam's moments follow it there: the
    "meta" device stands in for CUDA (a model moved after the load leaves them on the CPU)."""
    def net():
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    model = net()
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    optimizer.step()
    checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    resumed = net()
    optimizer = prepare_training(resumed, torch.device("meta"), 1e-3, 0.0, checkpoint, "checkpoint_last.pt")
    for parameter in resumed.parameters():
        state = optimizer.state[parameter]
        assert {"exp_avg", "exp_avg_sq"} <= set(state)
        for key in ("exp_avg", "exp_avg_sq"):
            assert (state[key].device, state[key].dtype) == (parameter.device, parameter.dtype)
    assert resumed[0].weight.device.type == "meta"
    assert resumed[0].weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("saved_fused, resumed_fused", [(False, True), (True, False)])
def test_a_resume_keeps_the_adam_implementation_this_process_chose(saved_fused, resumed_fused):
    """Adam is fused on CUDA only; load_state_dict would take the checkpoint's choice, and a fused
    Adam given a foreach step fails at GradScaler's first step (a CUDA fp16 run resumed from a
    checkpoint of before fused Adam, or one moved to another device). The CPU, where fused Adam
    exists too, stands in for both."""
    def net():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(144, 2))

    def steps(model, optimizer, count=2):
        scaler = torch.amp.GradScaler("cpu")
        for _ in range(count):
            optimizer.zero_grad()
            scaler.scale(model(torch.randn(2, 3, 8, 8)).square().sum()).backward()
            scaler.step(optimizer)
            scaler.update()

    model = net()
    optimizer = make_optimizer(model, CPU, 1e-3, fused=saved_fused)
    steps(model, optimizer)
    checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    resumed = net()
    optimizer = prepare_training(resumed, CPU, 1e-3, 0.0, checkpoint, "checkpoint_last.pt", fused=resumed_fused)
    steps(resumed, optimizer)
    assert all(bool(group["fused"]) == resumed_fused for group in optimizer.param_groups)
    assert all(state["step"].device == CPU and state["step"].dtype == torch.float32 and int(state["step"]) == 4
               for state in optimizer.state.values())
    assert make_optimizer(model, CUDA, 1e-3).defaults["fused"] and not make_optimizer(model, CPU, 1e-3).defaults["fused"]


def test_a_resume_restores_the_fp16_loss_scale():
    """An fp16 run's GradScaler state travels in the checkpoint; a resume that started again from
    the initial scale (65536) would spend its first steps skipping updates to find it again. The
    CPU's GradScaler stands in for CUDA's."""
    model = torch.nn.Linear(4, 2)
    optimizer = make_optimizer(model, CPU, 1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    for _ in range(3):  # finite gradients: the scale doubles after every step
        optimizer.zero_grad()
        scaler.scale(model(torch.randn(2, 4)).square().sum()).backward()
        scaler.step(optimizer)
        scaler.update()
    checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict()}
    resumed = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    prepare_training(torch.nn.Linear(4, 2), CPU, 1e-3, 0.0, checkpoint, "checkpoint_last.pt", resumed)
    assert scaler.get_scale() == 2.0**13 and resumed.get_scale() == 2.0**13
    assert resumed.state_dict() == scaler.state_dict()


def test_a_resume_with_another_number_of_processes_is_refused():
    checkpoint = {"config": {"environment": {"world_size": 2}}}
    check_world_size(checkpoint, 2, "run/checkpoint_last.pt")
    with pytest.raises(UserError, match=r"trained by 2 process\(es\), resumed with 1; .*--nproc_per_node 2"):
        check_world_size(checkpoint, 1, "run/checkpoint_last.pt")
    with pytest.raises(UserError, match="without torchrun"):
        check_world_size({"config": {"environment": {"world_size": 1}}}, 4, "run/checkpoint_last.pt")


# ---- the allocator a CPU run starts with (triplet.machine) --------------------------------------

@pytest.fixture
def linux(monkeypatch):
    """Linux with tcmalloc installed or not: ``linux(tcmalloc=...)``; nothing preloaded yet."""
    from triplet import machine

    def set_up(tcmalloc):
        monkeypatch.setattr(machine.sys, "platform", "linux")
        monkeypatch.setattr(machine.ctypes.util, "find_library",
                            lambda name: "libtcmalloc_minimal.so.4" if tcmalloc and name == "tcmalloc_minimal" else None)
        monkeypatch.delenv("LD_PRELOAD", raising=False)
        return machine
    return set_up


def test_tcmalloc_is_found_and_named_when_preloaded(linux, monkeypatch):
    machine = linux(tcmalloc=True)
    assert machine.find_tcmalloc() == "libtcmalloc_minimal.so.4"
    assert machine.allocator_name() == "the C library's malloc"
    assert "start train.py with LD_PRELOAD=libtcmalloc_minimal.so.4" in machine.allocator_tip()
    monkeypatch.setenv("LD_PRELOAD", "/opt/lib/libfoo.so:/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")
    assert machine.allocator_name() == "libtcmalloc_minimal.so.4 (LD_PRELOAD)"
    assert machine.allocator_tip() is None  # already preloaded: nothing to say
    assert runtime.environment(CPU, "fp32")["allocator"] == "libtcmalloc_minimal.so.4 (LD_PRELOAD)"


def test_without_tcmalloc_the_tip_says_how_to_install_it(linux, monkeypatch):
    machine = linux(tcmalloc=False)
    assert machine.find_tcmalloc() is None and "apt install libtcmalloc-minimal4" in machine.allocator_tip()
    assert machine.allocator_environment(None) == {"LD_PRELOAD": None, "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": None}
    monkeypatch.setattr(machine.sys, "platform", "darwin")  # macOS, Windows: their own allocators, no tip
    assert machine.find_tcmalloc() is None and machine.allocator_tip() is None


def test_the_makefile_asks_for_the_preload_environment():
    import subprocess
    import sys

    from tests.conftest import ROOT
    from triplet.machine import find_tcmalloc

    out = subprocess.run([sys.executable, "-m", "triplet.machine", "--allocator"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.strip()
    library = find_tcmalloc()
    assert out == (f"LD_PRELOAD={library} TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD={2**40}" if library else "")


def test_compiled_kernels_under_a_capped_cpu_capability_are_cached_apart(monkeypatch):
    """torch 2.14's inductor cache key leaves ATEN_CPU_CAPABILITY out: kernels built under one value
    were loaded under the other and trained with wrong values."""
    monkeypatch.setattr(torch, "compile", lambda model: model)
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TORCHINDUCTOR_COMPILE_THREADS", "ATEN_CPU_CAPABILITY"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)  # unset for the test, restored after it
    runtime.compile_model(torch.nn.Identity(), CPU)
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ  # inductor's own default folder
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    runtime.compile_model(torch.nn.Identity(), CPU)
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    default = default_cache_dir()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == default + "_avx2"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default)  # as inductor leaves it after compiling once
    runtime.compile_model(torch.nn.Identity(), CPU)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == default + "_avx2"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/the/users/own")
    runtime.compile_model(torch.nn.Identity(), CPU)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/the/users/own"
