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


def resolve_device(name="auto"):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", dist.local_rank())
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible; use --device auto or cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: MPS is not available; use --device auto or cpu")
    return torch.device("cuda", dist.local_rank()) if name == "cuda" else torch.device(name)


def cpu_has_bf16():
    """AVX-512 bf16 (or AMX): where bf16 autocast is faster than fp32 on a CPU."""
    try:
        return bool(torch._C._cpu._is_avx512_bf16_supported() or torch._C._cpu._is_amx_tile_supported())
    except AttributeError:
        return False


def resolve_precision(precision, device):
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and cpu_has_bf16() else "fp32"


def autocast(device, precision):
    enabled = precision == "bf16" and device.type in ("cuda", "cpu")
    return torch.autocast(device.type if enabled else "cpu", dtype=torch.bfloat16, enabled=enabled)


def usable_cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_workers(device):
    """CPU: one worker decodes while the main process computes; more only steal its cores."""
    cores = usable_cores()
    if device.type == "cuda":
        return max(1, min(8, cores // max(1, dist.world_size()) - 1))
    return 1 if cores > 1 else 0


def compile_model(model, device):
    """torch.compile; on a CPU with one compile thread (measured: parallel compile workers make it
    2x slower on a 2-core CPU). There compiled fp32 training was within the noise of eager
    (8.96 against 8.85 and 8.73 against 9.28 s per ResNet18 step at 224), so it stays optional.
    """
    if device.type == "cpu":
        os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    return torch.compile(model)


def git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_name():
    """The processor's marketing name ("AMD EPYC"): platform.processor() is empty on Linux."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def environment(device, precision, world_size=1):
    import torchvision

    return {"torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
            "python": platform.python_version(), "git_commit": git_commit(), "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
            "precision": precision, "world_size": world_size}
