"""The machine a process runs on, without torch: its usable cores and its processor's name.

Torch-free so that data preparation, plots and the search benchmark can ask too.
"""
import os
import platform


def usable_cores():
    """Cores this process may run on (its affinity mask where the OS has one, e.g. under taskset)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_name():
    """The processor's marketing name ("AMD EPYC"): platform.processor() is empty on Linux."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()
