"""Processes that a busy process (threads of torch, tqdm, a server) can start safely."""
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
