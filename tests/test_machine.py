"""The machine a process runs on: the cores it may use, and processes that a busy process (threads of
torch, tqdm, a server) can start safely."""
import os
import threading

import pytest

from triplet.bench.timing import in_fresh_process
from triplet.data.prepare import DataOptions, prepare
from triplet.data.synthetic import make_synthetic_cub
from triplet.machine import process_pool

HELD_BY_ANOTHER_THREAD = threading.Lock()


def _lock_is_free():
    return HELD_BY_ANOTHER_THREAD.acquire(timeout=1)


def _in_a_pool(function):
    with process_pool(1) as pool:
        return pool.submit(function).result(timeout=120)


@pytest.mark.parametrize("run_elsewhere", [_in_a_pool, in_fresh_process], ids=["process_pool", "in_fresh_process"])
def test_new_processes_do_not_inherit_a_lock_another_thread_holds(run_elsewhere):
    # a fork() copies the lock as held, by a thread the child does not have: it would never be freed
    holding, stop = threading.Event(), threading.Event()

    def hold():
        with HELD_BY_ANOTHER_THREAD:
            holding.set()
            stop.wait()

    holder = threading.Thread(target=hold)
    holder.start()
    holding.wait()
    try:
        assert run_elsewhere(_lock_is_free)
    finally:
        stop.set()
        holder.join()


def test_drawing_and_preparing_in_processes_never_fork_this_one(tmp_path, monkeypatch):
    def no_fork():
        raise AssertionError("a worker was forked from the test process")

    monkeypatch.setattr(os, "fork", no_fork)
    make_synthetic_cub(tmp_path, classes=3, per_class=4, image_size=24, processes=2)
    prepared = prepare(DataOptions(data_dir=str(tmp_path), resize=20), workers=2, log=lambda *a: None)
    assert len(list((prepared / "images").rglob("*.jpg"))) == 12


def test_a_containers_cpu_quota_caps_the_usable_cores(tmp_path, monkeypatch):
    """A pod limited to 2.5 CPUs on a big node: its affinity mask shows every core, its cgroup the quota."""
    from triplet import machine

    root, proc = tmp_path / "cgroup", tmp_path / "cgroup.txt"
    group = root / "kubepods" / "pod1"
    group.mkdir(parents=True)
    proc.write_text("0::/kubepods/pod1\n")
    assert machine.cpu_quota(root, proc) is None  # no cpu.max anywhere: no quota
    (group / "cpu.max").write_text("max 100000\n")
    (root / "kubepods" / "cpu.max").write_text("250000 100000\n")  # a parent's limit counts too
    assert machine.cpu_quota(root, proc) == 3
    (group / "cpu.max").write_text("100000 100000\n")
    assert machine.cpu_quota(root, proc) == 1
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert machine.cpu_quota(v1, tmp_path / "absent") is None
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("400000\n")
    assert machine.cpu_quota(v1, tmp_path / "absent") == 4

    monkeypatch.setattr(machine, "cpu_quota", lambda: 1)
    assert machine.usable_cores() == 1
    monkeypatch.setattr(machine, "cpu_quota", lambda: None)
    assert machine.usable_cores() == len(os.sched_getaffinity(0))
