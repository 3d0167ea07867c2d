"""The machine a process runs on, without torch: its usable cores, its processor's name, and the
memory allocator that training should run with.

Torch-free so that data preparation, plots, the search benchmark and the Makefile can ask too:
``python -m triplet.machine --allocator`` prints the environment that preloads tcmalloc, if the
machine has it.
"""
import ctypes.util
import math
import multiprocessing
import os
import platform
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path


def usable_cores():
    """Cores this process may run on: its affinity mask where the OS has one (taskset, Slurm), and
    no more than a container's CPU quota allows (a pod limited to 8 CPUs on a 128-core node sees
    all 128 in its mask, and threads or loader workers for 128 would be throttled to 8)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cpu_quota()
    return min(cores, quota) if quota else cores


def _quota_cores(quota, period):
    return max(1, math.ceil(quota / period)) if quota > 0 and period > 0 else None


def cpu_quota(cgroup_root="/sys/fs/cgroup", proc_cgroup="/proc/self/cgroup"):
    """The CPUs this process's cgroup quota allows, rounded up (None where there is none, as on most
    hosts and outside Linux): cgroup v2's cpu.max in its own group and every group above it (the
    smallest wins), else cgroup v1's cpu.cfs_quota_us."""
    root, quotas = Path(cgroup_root), []
    try:
        own = next((line.split(":", 2)[2].strip() for line in Path(proc_cgroup).read_text().splitlines()
                    if line.startswith("0::")), "/")
    except (OSError, IndexError):
        own = "/"
    group = root / own.lstrip("/")
    for folder in [group, *group.parents]:
        try:
            quota, period = (folder / "cpu.max").read_text().split()[:2]
            if quota != "max":
                quotas.append(_quota_cores(int(quota), int(period)))
        except (OSError, ValueError):
            pass
        if folder == root:
            break
    try:
        v1 = root / "cpu"
        quotas.append(_quota_cores(int((v1 / "cpu.cfs_quota_us").read_text()), int((v1 / "cpu.cfs_period_us").read_text())))
    except (OSError, ValueError):
        pass
    quotas = [q for q in quotas if q]
    return min(quotas) if quotas else None


def process_pool(workers):
    """A ProcessPoolExecutor whose workers are never fork()s of this process.

    A fork copies only the calling thread, so a lock that another thread (torch's OpenMP pool,
    tqdm's monitor, a server) held at that instant stays held in the child for ever, and the pool
    waits for it with no error: CI's test run stopped for good in such a pool of two, after 400
    tests had trained in the same process. forkserver forks each worker from a clean
    single-threaded server (Python 3.14's default on Linux); spawn where there is no forkserver.
    """
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(start_method_without_fork()))


def start_method_without_fork():
    """forkserver where the platform has it (Linux, macOS), else spawn: see process_pool."""
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


def cpu_name():
    """The processor's marketing name ("AMD EPYC"): platform.processor() is empty on Linux."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


# A 1 GiB batch is no news: without this, tcmalloc reports every such allocation on stderr.
TCMALLOC_QUIET = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(2**40)}


def find_tcmalloc():
    """The tcmalloc library to LD_PRELOAD ("libtcmalloc_minimal.so.4"), or None where there is none.

    glibc's malloc gives every block above 32 MiB (most of a CPU step's activations) an mmap of
    its own and unmaps it on free, so a CPU training step faults its whole working set in again,
    page by page, every step. tcmalloc keeps freed blocks for reuse: a quarter less time per CPU
    epoch for 5-17 % more peak memory (docs/speed.md). Debian/Ubuntu: apt install libtcmalloc-minimal4.
    """
    if not sys.platform.startswith("linux"):
        return None
    for name in ("tcmalloc_minimal", "tcmalloc"):
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


def preloaded_allocator():
    """The malloc replacement this process was started with (from LD_PRELOAD), or None."""
    preloads = os.environ.get("LD_PRELOAD", "").replace(":", " ").split()
    return next((Path(p).name for p in preloads if "malloc" in Path(p).name), None)


def allocator_name():
    """What allocates this process's memory, for config.json and the benchmark tables."""
    preloaded = preloaded_allocator()
    return f"{preloaded} (LD_PRELOAD)" if preloaded else "the C library's malloc"


def allocator_tip():
    """One line for a CPU run started without a caching allocator (None where none applies)."""
    if preloaded_allocator() or not sys.platform.startswith("linux"):
        return None
    library = find_tcmalloc()
    start = (f"start train.py with LD_PRELOAD={library}" if library else "install tcmalloc (apt install "
             "libtcmalloc-minimal4) and start train.py with LD_PRELOAD=libtcmalloc_minimal.so.4")
    return (f"note: glibc's malloc faults each CPU step's memory in again; {start} to train faster, "
            f"as make does (docs/speed.md)")


def allocator_environment(library):
    """Environment changes that start a process with ``library`` preloaded, or with none (None),
    where None removes a variable (``bench.timing.environment``, ``bench.gpu_check.Step.env``)."""
    if library is None:
        return {"LD_PRELOAD": None, **{k: None for k in TCMALLOC_QUIET}}
    return {"LD_PRELOAD": library, **TCMALLOC_QUIET}


if __name__ == "__main__":  # the Makefile's question: "LD_PRELOAD=... TCMALLOC_...=...", or nothing
    if sys.argv[1:] != ["--allocator"]:
        sys.exit("usage: python -m triplet.machine --allocator")
    library = find_tcmalloc()
    print(" ".join(f"{k}={v}" for k, v in allocator_environment(library).items()) if library else "")
