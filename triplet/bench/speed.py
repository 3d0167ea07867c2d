"""The suite's own speed, measured the way ``scripts/train.py`` and ``scripts/evaluate.py`` run.

Each function builds its model and data path from scratch and is meant to run in a fresh
process (``triplet.bench.timing.in_fresh_process``), so its memory peak is its own. The
straightforward reference these are compared with lives in ``scripts/benchmark_train.py``.
"""
import sys
import time
import warnings

import torch

from triplet import engine, runtime
from triplet.bench.timing import matmul_peak_gflops, memory_report, synchronize, timed_batches, train_gflop_per_triplet
from triplet.checkpoint import make_optimizer
from triplet.data.datasets import ImageDataset
from triplet.data.samplers import TripletBatchSampler
from triplet.mining import get_miner, packaged_triplets
from triplet.model import build_model

from triplet.data.transforms import EvalTransform, TrainTransform


def probe_machine(device):
    """The device, the suite's automatic precision, and the matmul peak in each precision used."""
    device = runtime.resolve_device(device)
    precision, reason = runtime.choose_precision("auto", device)
    dtypes = {"fp32": torch.float32}
    if runtime.native_bf16(device):
        dtypes["bf16"] = torch.bfloat16  # elsewhere bf16 is emulated: its matmul is no peak
    if device.type == "cuda":
        dtypes["fp16"] = torch.float16
    peaks = {name: round(matmul_peak_gflops(device, dtype), 1) for name, dtype in dtypes.items()}
    return {"device": str(device), "name": runtime.device_name(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "auto_precision": precision, "precision_reason": reason, "cpu_has_bf16": runtime.cpu_has_bf16(),
            "matmul_peak_gflops": peaks}


def step_speed(seconds, steps, batch_size):
    return {"seconds": round(seconds, 3), "step_s": round(seconds / steps, 3),
            "triplets_per_s": round(steps * batch_size / seconds, 3),
            "images_per_s": round(3 * steps * batch_size / seconds, 2)}


def _suite_model(device, backbone, image_size):
    """A seeded model for ``image_size`` (ViTs are built for one) on ``device`` in channels_last,
    with cuDNN autotuning as scripts/train.py."""
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return build_model(backbone, image_size=image_size).to(device, memory_format=torch.channels_last)


def training_speed(device, backbone, paths, labels, image_size, batch_size, warmup, steps, precision,
                   compiled=False):
    """Triplets/s of the suite's data path and training step with its defaults."""
    device = torch.device(device)
    workers = runtime.loader_workers(device)
    model = _suite_model(device, backbone, image_size)
    loader = engine.make_loader(ImageDataset(paths, labels, TrainTransform(image_size)), device, workers,
                                batch_sampler=TripletBatchSampler(labels, batch_size), persistent=True)
    optimizer = make_optimizer(model, device, 0.001)
    seconds = []
    engine.train_one_epoch(runtime.compile_model(model, device) if compiled else model,
                           timed_batches(loader, warmup, steps, device, seconds), optimizer, device,
                           precision, margin=1.0, miner=packaged_triplets, progress=False,
                           scaler=runtime.grad_scaler(device, precision))
    return {"data": "prepared copy, torchvision.io + transforms v2", "precision": precision,
            "memory_format": "channels_last, compiled" if compiled else "channels_last", "workers": workers,
            "threads": torch.get_num_threads(),
            **step_speed(seconds[0], steps, batch_size), **memory_report(device)}


def data_path_speed(paths, labels, image_size, batch_size, batches):
    """Images/s of the suite's training data path alone (decode, augment, collate uint8) with one
    worker: what each worker adds, to size the workers a GPU needs."""
    loader = engine.make_loader(ImageDataset(paths, labels, TrainTransform(image_size)), torch.device("cpu"), 1,
                                batch_sampler=TripletBatchSampler(labels, batch_size), persistent=True)
    seconds = []
    for _ in timed_batches(loader, 1, batches, torch.device("cpu"), seconds):
        pass
    images = 3 * batch_size * batches
    return {"workers": 1, "images": images, "seconds": round(seconds[0], 3),
            "images_per_s_per_worker": round(images / seconds[0], 1)}


def embedding_speed(device, backbone, paths, labels, image_size, batch_size, precision):
    """Images/s of evaluation embedding (``engine.embed``), after a warm-up batch."""
    device = torch.device(device)
    workers = runtime.loader_workers(device)
    model = _suite_model(device, backbone, image_size).eval()
    with torch.inference_mode(), runtime.autocast(device, precision):  # warm-up: kernels, caches
        model(engine.to_device(torch.zeros(min(batch_size, len(paths)), 3, image_size, image_size), device))
    loader = engine.make_loader(ImageDataset(paths, labels, EvalTransform(image_size)), device, workers,
                                batch_size=batch_size)
    synchronize(device)
    start = time.perf_counter()
    engine.embed(model, loader, device, precision)  # returns NumPy: the device is done
    seconds = time.perf_counter() - start
    return {"images": len(paths), "seconds": round(seconds, 3), "images_per_s": round(len(paths) / seconds, 2),
            "precision": precision, "workers": workers, "threads": torch.get_num_threads(), **memory_report(device)}


def profile_training_step(device, backbone, image_size, batch_size, precision):
    """Where the suite's training step spends its time, by operator, on random images.

    Only the model's step is profiled (the loader is in the timed rows): one warm-up step, then
    one under torch.profiler. The aten operators' self time (device time on CUDA) is grouped into
    convolutions (forward and backward), batch norm, and the rest of the step's wall time.
    """
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(device)
    runtime.set_cpu_threads(device)  # the threads the timed rows ran with
    model = _suite_model(device, backbone, image_size)
    optimizer = make_optimizer(model, device, 0.001)
    images = torch.randint(0, 256, (3 * batch_size, 3, image_size, image_size), dtype=torch.uint8)
    batch = [(images, torch.zeros(3 * batch_size, dtype=torch.long))]
    engine.train_one_epoch(model, batch, optimizer, device, precision, 1.0, packaged_triplets, progress=False)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    with profile(activities=activities) as profiler:
        start = time.perf_counter()
        engine.train_one_epoch(model, batch, optimizer, device, precision, 1.0, packaged_triplets, progress=False)
        synchronize(device)
        seconds = time.perf_counter() - start
    attribute = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    ops = sorted(((event.key, getattr(event, attribute) / 1e6) for event in profiler.key_averages()
                  if event.key.startswith("aten::")), key=lambda op: -op[1])
    conv = sum(t for name, t in ops if "conv" in name)
    batch_norm = sum(t for name, t in ops if "batch_norm" in name)
    return {"precision": precision, "step_s": round(seconds, 3),
            "shares": {"convolution": round(conv / seconds, 3), "batch_norm": round(batch_norm / seconds, 3),
                       "other": round(max(0.0, 1 - (conv + batch_norm) / seconds), 3)},
            "conv_gflops": round(train_gflop_per_triplet(backbone, image_size) * batch_size / max(conv, 1e-9), 1),
            "top_ops_s": [[name, round(t, 3)] for name, t in ops[:8]]}


def count_host_syncs(steps=20, sync_every=10, image_size=64, batch_size=16, precision="auto", mining="none"):
    """Host synchronisations in ``steps`` steps of ResNet18 on CUDA, counted by
    torch.cuda.set_sync_debug_mode after a warm-up epoch, in the precision auto picks there (fp16's
    GradScaler included on a GPU without native bf16); the loop should only wait at its sync points
    (``steps / sync_every`` of them, the epoch's end included). ``mining``: "none" (offline
    triplets) or "hard" (batch-hard on PK batches of 4 images a class). Prints where the waits
    were; returns (whether it kept to the sync points, a line with the count)."""
    device = torch.device("cuda", 0)
    precision = runtime.resolve_precision(precision, device)
    model = build_model("resnet18", weights="none").to(device, memory_format=torch.channels_last)
    optimizer = make_optimizer(model, device, 1e-4)
    scaler = runtime.grad_scaler(device, precision)
    images = torch.randint(0, 256, (3 * batch_size, 3, image_size, image_size), dtype=torch.uint8).pin_memory()
    labels = torch.arange(3 * batch_size) // 4  # PK batches for the miner; offline triplets ignore labels
    batches = [(images, labels.pin_memory())] * steps
    miner = get_miner(mining)

    def epoch():
        engine.train_one_epoch(model, batches, optimizer, device, precision, 1.0, miner, progress=False,
                               scaler=scaler, sync_every=sync_every)

    epoch()
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        epoch()
    torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    expected = -(-steps // sync_every)
    ok = len(syncs) <= expected
    for w in syncs[:5]:  # where they were
        print(f"  {w.filename}:{w.lineno}: {w.message}", file=sys.stdout if ok else sys.stderr)
    return ok, f"{len(syncs)} host synchronisations in {steps} {precision} steps with --mining {mining} (expected {expected})"


def check_host_syncs(steps=20, sync_every=10):
    """``make gpu-check``'s host-syncs step: offline triplets and batch-hard mining, each expected to
    wait only at its sync points; one summary line last (the report's message is a step's last
    line), exit status 1 if either waited more."""
    results = [count_host_syncs(steps, sync_every, mining=mining) for mining in ("none", "hard")]
    ok = all(passed for passed, _ in results)
    print("; ".join(line for _, line in results) + f", a wait every {sync_every} steps", file=sys.stdout if ok else sys.stderr)
    sys.exit(0 if ok else 1)
