"""scripts/benchmark_train.py end to end at a tiny size, plus its timing and FLOP helpers."""
import importlib.util
import json

import pytest
import torch

from tests.conftest import ROOT, run_script
from triplet.bench.timing import forward_gflop, timed_batches, train_gflop_per_triplet
from triplet.cli import parse
from triplet.errors import UserError


def test_benchmark_train_tiny(tmp_path):
    out = tmp_path / "results" / "bench.json"
    result = run_script("benchmark_train", "--image-size", 32, "--batch-size", 4, "--steps", 2, "--warmup", 1,
                        "--rounds", 2, "--profile", "--also-fp32", "--also-bf16",
                        "--backbones", "resnet18", "--classes", 4, "--per-class", 4, "--synthetic-size", 64,
                        "--resize", 40, "--eval-batch-size", 4, "--workdir", tmp_path / "work", "--out", out,
                        timeout=500, env={"OMP_NUM_THREADS": "1"})  # 2 threads crawl on a busy CPU
    report = json.loads(out.read_text())
    assert report["machine"]["matmul_peak_gflops"]["fp32"] > 0
    r = report["backbones"]["resnet18"]
    for path in ("reference", "suite"):
        assert r[path]["triplets_per_s"] > 0
        assert r[path]["peak_rss_mb"] > 0
        assert r[path]["share_of_peak"] > 0
    assert r["reference"]["precision"] == "fp32" and r["reference"]["workers"] == 2
    # OMP_NUM_THREADS=1 leaves the suite's worker a core of its own where there is a second one
    from triplet.machine import usable_cores
    assert r["suite"]["threads"] == r["reference"]["threads"] == 1
    assert r["suite"]["workers"] == (1 if usable_cores() > 1 else 0)
    # the reference with the C library's malloc, the suite with the allocator make starts train.py with
    from triplet.machine import find_tcmalloc
    library = find_tcmalloc()
    assert r["reference"]["allocator"] == "the C library's malloc"
    assert r["suite"]["allocator"] == (f"{library} (LD_PRELOAD)" if library else "the C library's malloc")
    suite, reference = r["suite"], r["reference"]
    assert r["ratio"] == pytest.approx(suite["triplets_per_s"] / reference["triplets_per_s"], rel=0.01)
    assert r["ratio_rounds"] == pytest.approx([s / ref for s, ref in zip(suite["rounds"], reference["rounds"])],
                                              rel=0.01)
    assert len(r["ratio_rounds"]) == 2  # all timed triplets (2 rounds x 2 steps x 4) over all timed seconds:
    assert suite["triplets_per_s"] == pytest.approx(2 * 2 * 4 / suite["seconds"], rel=0.01)
    shares = r["profile"]["shares"]
    assert shares["convolution"] > 0 and shares["batch_norm"] > 0 and sum(shares.values()) == pytest.approx(1, abs=0.01)
    assert r["profile"]["conv_gflops"] > 0 and any("conv" in name for name, _ in r["profile"]["top_ops_s"])
    assert r["embedding"]["images_per_s"] > 0 and r["embedding"]["images"] >= 2 * 4
    assert report["data_path"]["images_per_s_per_worker"] > 0 and report["data_path"]["images"] == 2 * 3 * 4
    assert suite["images_per_s"] == pytest.approx(3 * suite["triplets_per_s"], rel=0.01)
    assert report["machine"]["precision_reason"]
    # whichever precision auto picked, the other one is a labelled extra row with its own ratio
    forced = {"fp32": "suite_fp32_forced", "bf16": "suite_bf16_forced"}
    auto = report["machine"]["auto_precision"]
    extra = forced["bf16" if auto == "fp32" else "fp32"]
    assert [name for name in forced.values() if name in r] == [extra]
    assert r[extra]["precision"] != auto and len(r[extra]["rounds"]) == 2
    key = extra.replace("suite", "ratio")
    assert r[key] == pytest.approx(r[extra]["triplets_per_s"] / reference["triplets_per_s"], rel=0.01)
    table = out.with_suffix(".md").read_text()
    assert "| resnet18 | reference |" in table and "| resnet18 | suite |" in table
    assert f"| resnet18 | suite, {r[extra]['precision']} forced |" in table
    assert "Where one suite step's time goes" in table and "images/s per worker" in table
    assert f"{r['ratio']:.2f}x" in result.stdout
    assert (tmp_path / "work" / "synthetic-4x4-64px" / "CUB_200_2011").is_dir()  # --workdir is kept


def test_bad_options_are_one_line_errors():
    spec = importlib.util.spec_from_file_location("benchmark_train", ROOT / "scripts" / "benchmark_train.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with pytest.raises(UserError, match="--out"):
        parse(script.Options, ["--out", "results/bench.txt"])
    with pytest.raises(UserError, match="--rounds 0"):
        parse(script.Options, ["--rounds", "0"])
    with pytest.raises(UserError, match="--also-compile: needs --warmup >= 1"):
        parse(script.Options, ["--also-compile", "--warmup", "0"])
    assert parse(script.Options, [])[0].backbones == ["resnet18", "resnet34"]
    assert (parse(script.Options, [])[0].steps, parse(script.Options, [])[0].warmup) == (-1, -1)  # by device
    assert script.steps_and_warmup(-1, -1, cuda=True) == (100, 10)
    assert script.steps_and_warmup(-1, -1, cuda=False) == (5, 1)
    assert script.steps_and_warmup(7, 0, cuda=True) == (7, 0)


def test_timed_batches_times_only_the_steps_after_warmup():
    seconds, seen = [], []
    for batch in timed_batches(range(10), warmup=2, steps=3, device=torch.device("cpu"), seconds=seconds):
        seen.append(batch)
    assert seen == [0, 1, 2, 3, 4]
    assert len(seconds) == 1 and seconds[0] >= 0


def test_on_cuda_the_memory_peak_is_the_timed_steps_own(monkeypatch):
    """Reset where the clock starts: the warm-up's cuDNN autotuning workspaces are not the steps' peak."""
    events = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append("sync"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: events.append("reset"))
    for batch in timed_batches(range(10), warmup=2, steps=3, device=torch.device("cuda", 0), seconds=[]):
        events.append(batch)
    assert events == [0, 1, "sync", "reset", 2, 3, 4, "sync"]


class Loader:
    """Stands in for a DataLoader whose 2 workers hold 3 batches each ahead."""
    num_workers, prefetch_factor = 2, 3

    def __init__(self, batches=100):
        self.batches = batches

    def __len__(self):
        return self.batches

    def __iter__(self):
        return iter(range(self.batches))


def test_timed_batches_drain_the_prefetched_batches_before_the_clock_starts():
    seconds, seen = [], []
    for batch in timed_batches(Loader(), warmup=2, steps=3, device=torch.device("cpu"), seconds=seconds):
        seen.append(batch)
    assert seen == [0, 1, 8, 9, 10]  # batches 2-7 were ready before the clock: taken, not timed
    assert len(seconds) == 1


def test_timed_batches_say_how_many_batches_they_need():
    """A loader too short for the warm-up, the drained prefetch and the steps (a 16-core GPU
    machine drains 15 workers x 4 batches) used to end in "generator raised StopIteration"."""
    with pytest.raises(ValueError, match="timing needs 11 batches .2 warm-up, 6 prefetched by the workers, 3 timed., "
                                         "the loader holds 10"):
        list(timed_batches(Loader(10), warmup=2, steps=3, device=torch.device("cpu"), seconds=[]))
    assert len(list(timed_batches(Loader(11), warmup=2, steps=3, device=torch.device("cpu"), seconds=[]))) == 5


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 16 workers on this small machine
def test_the_timed_data_holds_what_the_default_workers_of_a_many_core_gpu_machine_drain(monkeypatch):
    """The suite's own loader, as training_speed builds it on a 224-thread CUDA node: its prefetch,
    drained after the warm-up, must still leave the timed steps (the data used to be sized for 8
    workers, and a 16-core H200 machine's 15 would have run out)."""
    from triplet import engine, runtime
    from triplet.bench.timing import batches_to_time, prefetched

    monkeypatch.setattr(runtime, "usable_cores", lambda: 224)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    cuda = torch.device("cuda")
    loader = engine.make_loader(list(range(10)), cuda, runtime.default_workers(cuda), batch_size=1, persistent=True)
    assert prefetched(loader) == 16 * 4
    assert batches_to_time(10, 100) == 10 + prefetched(loader) + 100


def test_flops_scale_with_pixels_and_count_nine_forwards_per_triplet():
    # torchvision's published multiply-adds at 224 px: resnet18 1.814 G, resnet34 3.664 G, resnet50 4.089 G
    assert forward_gflop("resnet18", 224) == pytest.approx(2 * 1.814)
    assert forward_gflop("resnet34", 112) == pytest.approx(2 * 3.664 / 4)
    assert forward_gflop("resnet50", 224) == pytest.approx(2 * 4.089)  # any backbone with published weights
    assert train_gflop_per_triplet("resnet18", 224) == pytest.approx(9 * 2 * 1.814)


def allocator_seen():
    """What a measurement process reports as its allocator, and its LD_PRELOAD."""
    import os

    from triplet.machine import allocator_name
    return allocator_name(), os.environ.get("LD_PRELOAD")


def test_a_measurement_starts_with_the_allocator_it_is_given(monkeypatch):
    import os

    from triplet.bench.timing import in_fresh_process
    from triplet.machine import allocator_environment

    monkeypatch.delenv("LD_PRELOAD", raising=False)
    assert in_fresh_process(allocator_seen, env=allocator_environment(None)) == ("the C library's malloc", None)
    # libc stands in for tcmalloc (a library every Linux has): the process is started with it preloaded
    assert in_fresh_process(allocator_seen, env={"LD_PRELOAD": "libc.so.6"})[1] == "libc.so.6"
    assert "LD_PRELOAD" not in os.environ  # the parent's environment is as it was


def test_the_suite_model_is_built_for_the_benchmark_image_size():
    """ViTs are tied to one input size: the benchmark's model must be built for --image-size, as
    train.py builds it, or a ViT cannot be benchmarked below 224 px."""
    from triplet.bench.speed import _suite_model

    model = _suite_model(torch.device("cpu"), "vit_b_16", 32)
    assert model.trunk.image_size == 32
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 128)
