"""Where and how a run computes: device, precision, autocast, DataLoader workers, compile, machine info.

Everything here is decided once per process and recorded in config.json, so a run says what it ran on.
"""
import os
import platform
import subprocess
from pathlib import Path

import torch

from triplet import distributed as dist
from triplet.errors import UserError
from triplet.machine import allocator_name, cpu_name, usable_cores


def resolve_device(name="auto"):
    """The device this process computes on; under torchrun, CUDA device LOCAL_RANK.

    Resolved before the process group exists, because the DDP backend follows from it.
    """
    requested = name
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    elif name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible; use --device auto or cpu")
    elif name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: MPS is not available; use --device auto or cpu")
    if name == "mps" and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise UserError(f"--device {requested}: torchrun's processes would exchange MPS tensors through gloo, which "
                        f"carries only CPU and CUDA ones; train in one process (python scripts/train.py) on MPS")
    if name != "cuda":
        return torch.device(name)
    processes, gpus = dist.local_world_size(), torch.cuda.device_count()
    if processes > gpus:
        raise UserError(f"torchrun starts {processes} processes on this machine but {gpus} CUDA device(s) are "
                        f"visible; use --nproc_per_node {gpus} (one process per GPU), or --device cpu")
    return torch.device("cuda", dist.local_rank())


def host_to_device(tensor, device):
    """A host tensor on ``device``, copied asynchronously only on CUDA: there the caching host
    allocator keeps a pinned source alive until its copy is done, and a pageable one is staged
    synchronously. On MPS an asynchronous copy can read its source after Python has freed it and
    train on wrong values (pytorch/pytorch#189690), so the copy waits there."""
    return tensor.to(device, non_blocking=device.type == "cuda")


def cpu_bf16_decision(capabilities, onednn_bf16=True):
    """(native, reason): whether this CPU computes bf16 natively, from ``torch.cpu.get_capabilities()``.

    x86: AVX-512-bf16 or AMX-bf16; Arm: the BF16 extension (Graviton3, Neoverse V1/N2). Without
    them oneDNN emulates bf16 through fp32 conversions, slower than fp32 itself.
    """
    features = [name for name in ("amx_bf16", "avx512_bf16", "bf16", "sve_bf16") if capabilities.get(name)]
    if features and not onednn_bf16:
        return False, f"the CPU has {'+'.join(features)} but oneDNN reports no bf16 support"
    if features:
        return True, f"the CPU has native bf16 ({'+'.join(features)})"
    return False, "the CPU has no native bf16 (no AVX-512-bf16, AMX or Arm BF16): bf16 would be emulated"


def onednn_has_bf16():
    """oneDNN's own answer: False where ONEDNN_MAX_CPU_ISA caps it below the CPU's bf16 kernels."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def cpu_bf16_reason():
    """(native, reason) for this CPU, through the APIs the pinned torch has."""
    return cpu_bf16_decision(torch.cpu.get_capabilities(), onednn_has_bf16())


def cpu_has_bf16():
    """Native bf16 on this CPU: where bf16 autocast is faster than fp32."""
    return cpu_bf16_reason()[0]


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def choose_precision(precision, device):
    """(precision, reason) for ``--precision``: auto takes bf16 only where the hardware computes it
    natively, fp16 (with a GradScaler) on CUDA GPUs without it, else fp32.

    The reason is recorded in config.json, so a run says why it ran in the precision it did.
    """
    if device.type == "mps" and precision not in ("auto", "fp32"):
        raise UserError(f"--precision {precision}: autocast on MPS is not supported here; use fp32")
    if device.type == "cpu" and precision == "fp16":
        raise UserError("--precision fp16: CPUs have no fast fp16 training; use bf16 (native on AVX-512-bf16/AMX "
                        "CPUs) or fp32")
    if precision != "auto":
        return precision, f"--precision {precision}{_emulation_note(precision, device)}"
    if device.type == "cuda":
        if native_bf16(device):
            return "bf16", f"{torch.cuda.get_device_name(device)} computes bf16 natively"
        return "fp16", f"{torch.cuda.get_device_name(device)} has no native bf16: fp16 autocast with a GradScaler"
    if device.type == "cpu":
        native, reason = cpu_bf16_reason()
        return ("bf16" if native else "fp32"), reason
    return "fp32", f"{device.type}: fp32"


def native_bf16(device):
    """Whether ``device`` computes bf16 natively (Ampere and newer GPUs; AVX-512-bf16, AMX or Arm
    BF16 CPUs); elsewhere autocast accepts bf16 but emulates it."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu" and cpu_has_bf16()


def _emulation_note(precision, device):
    """Where bf16 was asked for by name on hardware that only emulates it, the run says so: autocast
    accepts it there (a V100 or T4, an AVX2 CPU) and runs slower than fp16 or fp32 would."""
    if precision != "bf16" or device.type not in ("cuda", "cpu") or native_bf16(device):
        return ""
    return (" (emulated on this GPU, slower than --precision fp16)" if device.type == "cuda" else
            " (emulated on this CPU, slower than --precision fp32)")


def resolve_precision(precision, device):
    return choose_precision(precision, device)[0]


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device, precision):
    enabled = precision in AUTOCAST_DTYPES and device.type in ("cuda", "cpu")
    return torch.autocast(device.type if enabled else "cpu", dtype=AUTOCAST_DTYPES.get(precision, torch.bfloat16),
                          enabled=enabled)


def grad_scaler(device, precision):
    """fp16 needs its loss scaled so small gradients do not underflow; bf16 and fp32 do not."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


# From this many logical CPUs per process up, a CPU run keeps one of them for its loader worker
# instead of loading between steps. Loading in line costs a step its decoding, D (96 images:
# 0.13-0.16 s); a core kept back costs C/(n-1) - C/n of the step's compute C (5.3 core-seconds for
# ResNet18 in bf16 on AVX-512-bf16 cores, about 10 for ResNet34; docs/speed.md). They break even
# near n(n-1) = C/D: about 6-7 cores for ResNet18 and 8-9 for ResNet34 there, fewer on faster
# (AMX) cores.
RESERVE_CORE_FROM = 8

# The most workers a CUDA process gets by default. 16 workers at the 628 images/s each measured
# here (docs/gpu.md) are the 10,000 images/s an H100-class GPU needs; more would mostly add
# processes, /dev/shm segments and open descriptors (a 224-thread node would otherwise start 223
# per GPU, each with 4 batches in flight). --workers sets more where cores are slower.
CUDA_MAX_WORKERS = 16


def _cores_each():
    """The logical CPUs this process may count as its own: the machine's usable ones shared among
    its processes (LOCAL_WORLD_SIZE, not the global world size: other machines have their own)."""
    return usable_cores() // dist.local_world_size()


def set_cpu_threads(device, workers=-1):
    """Torch's intra-op threads for a CPU run: at most the logical CPUs this process may count as
    its own (a launcher that starts several processes without OMP_NUM_THREADS would oversubscribe
    them), and from RESERVE_CORE_FROM up one fewer, for the DataLoader worker (``workers``: the
    ``--workers`` option; 0 keeps every core computing). OMP_NUM_THREADS, when set, is the user's
    (or torchrun's) choice and is kept. Returns the threads now in use."""
    cores_each = max(1, _cores_each())
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        threads = min(torch.get_num_threads(), cores_each)
        if threads == cores_each >= RESERVE_CORE_FROM and workers != 0:
            threads -= 1
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
    return torch.get_num_threads()


def default_workers(device, threads=None):
    """DataLoader workers per process.

    CUDA: every core but one each process keeps for itself, at most CUDA_MAX_WORKERS, since
    decoding JPEGs on the CPU is what feeds a GPU (docs/gpu.md has the arithmetic). MPS: one,
    where the process has two cores.

    CPU: one worker where the intra-op threads (``threads``, torch's by default) leave a logical CPU
    free for it (SMT siblings, a smaller OMP_NUM_THREADS, or the core ``set_cpu_threads`` keeps);
    otherwise none, and the main process loads each batch between steps. A worker that shares a
    core with an intra-op thread slows that thread, and every parallel region waits for its
    slowest thread: on 2 cores one worker cost a ResNet18 step 0.23 s for its 0.13 s of decoding,
    loading between steps 0.12 s (docs/speed.md).
    """
    cores_each = _cores_each()
    if device.type == "cuda":
        return max(1, min(cores_each - 1, CUDA_MAX_WORKERS))
    if device.type != "cpu":
        return 1 if cores_each > 1 else 0
    threads = torch.get_num_threads() if threads is None else threads
    return 1 if cores_each > threads else 0


def loader_workers(device, workers=-1):
    """The DataLoader workers for ``--workers`` (-1: ``default_workers``), after ``set_cpu_threads``
    has made room for them: the two decisions in the order the second depends on the first."""
    set_cpu_threads(device, workers)
    return default_workers(device) if workers < 0 else workers


def compile_model(model, device):
    """torch.compile; on a CPU with one compile thread, because parallel compile workers compete
    with the compiling process for a small CPU's cores (docs/speed.md has the measurements).

    Under ATEN_CPU_CAPABILITY (docs/speed.md's AVX2-capped runs) inductor gets a cache folder of
    its own: torch 2.14's cache key leaves the variable out, so kernels built under one setting
    were loaded under the other and trained with wrong values (a loss of 0.88-1.0 for 0.989).
    A folder the user chose is kept; inductor writes its default into the variable on first use.
    """
    if device.type == "cpu":
        os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
        capability = os.environ.get("ATEN_CPU_CAPABILITY")
        if capability:
            from torch._inductor.runtime.cache_dir_utils import default_cache_dir
            default = default_cache_dir()
            if os.environ.get("TORCHINDUCTOR_CACHE_DIR", default) == default:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = f"{default}_{capability}"
    return torch.compile(model)


def git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def device_name(device):
    """The GPU's name on CUDA, else the processor's: what a timing or a run ran on."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def environment(device, precision, world_size=1, precision_reason=None):
    import torchvision

    return {"torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
            "python": platform.python_version(), "git_commit": git_commit(), "device": str(device),
            "device_name": device_name(device), "allocator": allocator_name(), "threads": torch.get_num_threads(),
            "precision": precision, "precision_reason": precision_reason, "world_size": world_size,
            **({"cuda": cuda_numerics()} if device.type == "cuda" else {})}


def cuda_numerics():
    """What sets a CUDA run's numbers beside its precision: PyTorch computes fp32 convolutions in
    TF32 by default on Ampere and newer (matmuls stay fp32), and cuDNN's autotuner picks its
    algorithms per run unless --deterministic."""
    return {"tf32_convolutions": torch.backends.cudnn.allow_tf32, "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled()}
