"""Benchmark plumbing: fresh processes per measurement, step timing, peaks, FLOP accounting.

Each measurement runs in its own process (``in_fresh_process``), so one path's memory peak,
allocator caches and thread pools never leak into the next. On Linux the process is forked:
it starts in milliseconds rather than re-importing torch, and it is safe as long as the
parent itself never runs a torch operation or touches CUDA (the benchmark's parent only
writes images and orchestrates; even the device is resolved in a child). Elsewhere, and for a
measurement that starts with an environment of its own (a preloaded allocator): spawn.
"""
import contextlib
import multiprocessing
import os
import sys
import time
import traceback
from pathlib import Path

import torch

from triplet.errors import UserError
from triplet.machine import allocator_name
from triplet.fileio import write_json, write_text

# Forward GMACs (multiply-adds) per 224x224 image, as torchvision documents them.
def gmacs_224(backbone):
    """Multiply-adds (G) of one forward at 224 px, as torchvision's weights record them ("_ops",
    which torchvision counts in multiply-adds): known for every backbone with published weights."""
    from torchvision.models import get_model_weights

    return float(get_model_weights(backbone).DEFAULT.meta["_ops"])


def write_results(out, report, markdown):
    """A benchmark's results as JSON and, beside it, its Markdown table (both atomic)."""
    out = Path(out)
    write_json(out, report)
    write_text(out.with_suffix(".md"), markdown)
    print(f"wrote {out} and {out.with_suffix('.md')}")


def forward_gflop(backbone, image_size):
    """FLOPs (2 per MAC) of one forward pass of one image, scaled by the pixel count."""
    return 2 * gmacs_224(backbone) * (image_size / 224) ** 2


def train_gflop_per_triplet(backbone, image_size):
    """Three images, each a forward and a backward (about twice the forward): 9 forwards."""
    return 3 * 3 * forward_gflop(backbone, image_size)


def _child(connection, start_method, function, kwargs):
    # DataLoader workers start as in a plain run: the platform's default method.
    multiprocessing.set_start_method(start_method, force=True)
    try:
        connection.send(("ok", function(**kwargs)))
    except UserError as e:  # the parent re-raises both
        connection.send(("user error", str(e)))
    except BaseException:
        connection.send(("crash", traceback.format_exc()))
    finally:
        connection.close()


@contextlib.contextmanager
def environment(changes):
    """os.environ with ``changes`` (None removes a variable) inside the block, as it was after."""
    saved = {name: os.environ.get(name) for name in changes}
    def apply(values):
        for name, value in values.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    apply(changes)
    try:
        yield
    finally:
        apply(saved)


def in_fresh_process(function, env=None, **kwargs):
    """Return ``function(**kwargs)`` computed in a new process; its result must pickle.

    ``env``: environment changes the process starts with (None removes a variable), such as
    LD_PRELOAD. The process is spawned, never forked: a fork keeps the allocator its parent
    started with, its torch thread count, and any lock another thread held at that instant
    (tqdm takes its lock even for a disabled bar), which would hang the measurement for ever.
    """
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(send, multiprocessing.get_start_method(), function, kwargs), name=function.__name__)
    with environment(env or {}):
        process.start()
    send.close()
    try:
        outcome, value = receive.recv()
    except EOFError as e:
        process.join()
        raise UserError(f"the {function.__name__} measurement died (exit code {process.exitcode}); "
                        f"out of memory? try a smaller --batch-size or --image-size") from e
    except BaseException:  # Ctrl-C: don't leave the measurement running
        process.terminate()
        process.join()
        raise
    process.join()
    if outcome == "user error":
        raise UserError(value)
    if outcome == "crash":
        raise RuntimeError(f"{function.__name__} failed in its process:\n{value}")
    return value


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def prefetched(loader):
    """Batches a DataLoader's workers load ahead (workers x prefetch_factor); 0 for anything else."""
    return getattr(loader, "num_workers", 0) * (getattr(loader, "prefetch_factor", None) or 0)


def batches_to_time(warmup, steps):
    """Batches a timed loader must hold: the warm-up, the most the default workers keep ready (a
    many-core GPU machine's CUDA_MAX_WORKERS, each PREFETCH_FACTOR ahead) and the timed steps."""
    from triplet.engine import PREFETCH_FACTOR
    from triplet.runtime import CUDA_MAX_WORKERS

    return warmup + CUDA_MAX_WORKERS * PREFETCH_FACTOR + steps


def timed_batches(loader, warmup, steps, device, seconds):
    """Yield ``warmup + steps`` batches; append to ``seconds`` the time the last ``steps`` took.

    After the warm-up, the batches the workers loaded ahead are drained (taken, not yielded), so
    the timed steps wait for data as they would in the middle of an epoch instead of starting on
    a full queue. The clock starts when the consumer asks for the first timed batch and stops
    when it asks for one more after the last, so it covers whole steps, waiting for data included;
    on CUDA the memory peak is reset there too, so it is the timed steps' own.
    The loader must hold ``warmup + prefetched(loader) + steps`` batches.
    """
    needed = warmup + prefetched(loader) + steps
    if len(loader) < needed:  # checked here: running out inside the generator is only "generator raised StopIteration"
        raise ValueError(f"timing needs {needed} batches ({warmup} warm-up, {prefetched(loader)} prefetched by the "
                         f"workers, {steps} timed), the loader holds {len(loader)}")
    batches = iter(loader)
    for i in range(warmup + steps):
        if i == warmup:
            for _ in range(prefetched(loader)):
                next(batches)
            synchronize(device)
            if device.type == "cuda":  # the timed steps' own peak, not the warm-up's autotuning workspaces
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
        yield next(batches)
    synchronize(device)
    seconds.append(time.perf_counter() - start)


def peak_rss_mb():
    """This process's resident-set high-water mark, in MiB.

    Linux: VmHWM of this process's own address space. ``ru_maxrss`` is not used there because
    it carries over the parent's peak across exec. It counts the libraries every torch process
    maps (a few hundred MiB) but not DataLoader workers, which are processes of their own.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def worker_peak_rss_mb():
    """The largest finished child's (DataLoader worker's) RSS high-water mark, in MiB.

    A forked worker counts the pages it shares with the main process, so this overstates what
    it adds; None where the platform cannot tell.
    """
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def memory_report(device):
    """The process's memory peaks, and the allocator that served them (it moves the RSS peak)."""
    report = {"peak_rss_mb": round(peak_rss_mb(), 1), "allocator": allocator_name()}
    workers = worker_peak_rss_mb()
    if workers:
        report["worker_peak_rss_mb"] = round(workers, 1)
    if device.type == "cuda":
        report["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return report


def matmul_peak_gflops(device, dtype, max_size=None, repeats=5):
    """Best-of-``repeats`` FLOP/s of a large square matmul: the machine's practical peak.

    The size doubles from 256 until one product takes 0.1 s or reaches ``max_size`` (2048 on a
    CPU, 8192 on a GPU), so a dtype the hardware only emulates cannot take minutes.

    On CUDA the fp32 matmul may use TF32 exactly when cuDNN's fp32 convolutions do (their
    default), so the fp32 peak is the one the fp32 training path can reach.
    """
    if device.type == "cuda" and dtype == torch.float32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32
    max_size = max_size or (8192 if device.type == "cuda" else 2048)
    n, elapsed = 128, 0.0
    while elapsed < 0.1 and n < max_size:
        n *= 2
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        a @ b  # the first call of a size pays for its set-up
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        elapsed = time.perf_counter() - start
    calls = max(1, int(0.2 / max(elapsed, 1e-6)))  # about 0.2 s per timing
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            a @ b
        synchronize(device)
        best = min(best, (time.perf_counter() - start) / calls)
    return 2 * n**3 / best / 1e9
