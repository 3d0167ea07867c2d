"""scripts/gpu_check.py: its CPU-runnable parts end to end, and a failing step not hiding the rest."""
import importlib.util
import json
import os
import sys
import time

import pytest

from tests.conftest import ROOT, run_script
from triplet.bench import gpu_check
from triplet.bench.gpu_check import GpuUtilisation, Step, markdown, plan_steps, run_step, run_steps
from triplet.cli import parse
from triplet.machine import find_tcmalloc


def test_gpu_check_cpu_parts_pass_and_report_every_step(tmp_path):
    out = tmp_path / "gpu_check.json"
    result = run_script("gpu_check", "--device", "cpu", "--classes", 4, "--per-class", 6, "--synthetic-size", 64,
                        "--resize", 40, "--image-size", 32, "--batch-size", 8, "--skip", "compile", "--budget", 450,
                        "--workdir", tmp_path / "work", "--out", out, check=False, timeout=500)
    report = json.loads(out.read_text())
    rows = {r["step"]: r for r in report["steps"]}
    assert result.returncode == 0, [(r["step"], r["message"]) for r in report["steps"] if r["status"] == "fail"]
    for name in ("train", "resume", "evaluate", "export-cpu", "fp32", "bf16", "gpu-cache", "batch-hard", "deterministic"):
        assert rows[name]["status"] == "pass", rows[name]
    for name in ("train", "fp32", "gpu-cache", "batch-hard", "deterministic"):
        assert rows[name]["epoch_s"] > 0
    for name in ("fp16", "fp16-resume", "compile", "host-syncs", "ddp-nccl"):
        assert rows[name]["status"] == "skipped", rows[name]
    assert "2 CUDA devices" in rows["ddp-nccl"]["message"] and rows["compile"]["message"] == "--skip compile"
    # started with tcmalloc as make starts train.py, where this machine has it; else skipped, saying why
    tcmalloc = find_tcmalloc()
    assert rows["tcmalloc"]["status"] == ("pass" if tcmalloc else "skipped"), rows["tcmalloc"]
    if tcmalloc:
        config = json.loads((tmp_path / "work" / "runs" / "tcmalloc" / "config.json").read_text())
        assert config["environment"]["allocator"] == f"{tcmalloc} (LD_PRELOAD)"
    else:
        assert "apt install libtcmalloc-minimal4" in rows["tcmalloc"]["message"]
    passed, skipped = (10, 5) if tcmalloc else (9, 6)
    assert report["failed"] == 0 and report["passed"] == passed
    table = out.with_suffix(".md").read_text()
    assert "| resume |" in table and f"**{passed} passed, 0 failed, {skipped} skipped**" in table


def test_a_failing_or_hanging_step_is_reported_and_the_next_still_runs(tmp_path):
    python = sys.executable
    steps = [Step("boom", "fails", [python, "-c", "import sys; print('x: error: bad thing', file=sys.stderr); sys.exit(2)"]),
             Step("hang", "hangs", [python, "-c", "import time; time.sleep(60)"]),
             Step("fine", "works", [python, "-c", "print('all good')"], expect="good"),
             Step("quiet", "passes without the expected text", [python, "-c", "print('hm')"], expect="good")]
    rows = [run_step(step, timeout=6, cuda=False, log=lambda *a: None) for step in steps]
    assert [r["status"] for r in rows] == ["fail", "fail", "pass", "fail"]
    assert rows[0]["message"] == "x: error: bad thing" and rows[1]["message"] == "timed out after 6 s"
    assert rows[2]["message"] == "all good" and "lacks 'good'" in rows[3]["message"]
    report = {"command": "c", "machine": {"device_name": "d", "gpus": 0, "torch": "t", "precision": "fp32",
                                          "precision_reason": "r"},
              "settings": {"images": 1, "synthetic_size": 1, "image_size": 1}, "passed": 1, "failed": 3, "skipped": 0,
              "steps": rows}
    table = [line for line in markdown(report).splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(rows) and table[2].startswith("| boom | fails | fail |")  # header, rule, rows


def test_the_budget_cuts_each_timeout_to_the_time_left_and_skips_what_finds_none():
    python = sys.executable
    hang = [python, "-c", "import time; time.sleep(60)"]
    steps = [Step("first", "hangs", hang), Step("second", "hangs", hang), Step("third", "works", [python, "-c", "1"]),
             Step("fourth", "already skipped", hang, skip="needs 2 CUDA devices, 0 visible")]
    # 30 s of the 84-s budget were spent before the steps (writing the set), and 50 s are kept for stopping a
    # step that times out: the first step gets 4 s, not 240; the clock reads 30 s, then the time that step took
    readings = iter([30.0, 34.5, 34.6, 34.7])
    started = time.monotonic()
    rows = run_steps(steps, timeout=240, budget=84, cuda=False, started=0.0, log=lambda *a: None,
                     clock=lambda: next(readings))
    assert time.monotonic() - started < 20
    assert [r["status"] for r in rows] == ["fail", "skipped", "skipped", "skipped"]
    assert rows[0]["message"] == "timed out after 4 s"
    assert rows[1]["message"] == rows[2]["message"] == "not run: the check's --budget of 84 s was spent"
    assert rows[3]["message"] == "needs 2 CUDA devices, 0 visible"  # its own reason is kept


def test_a_step_starts_with_its_environment_changes(monkeypatch):
    monkeypatch.setenv("TRIPLET_CHECK_GONE", "1")
    show = [sys.executable, "-c",
            "import os; print(os.environ.get('TRIPLET_CHECK_GONE'), os.environ.get('TRIPLET_CHECK_SET'))"]
    changes = {"TRIPLET_CHECK_GONE": None, "TRIPLET_CHECK_SET": "x"}
    row = run_step(Step("env", "sees its environment", show, env=changes), timeout=30, cuda=False, log=lambda *a: None)
    assert row["status"] == "pass" and row["message"] == "None x"  # None removes a variable, a string sets it


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is gone, only not yet reaped by its parent
        return f.read().split(") ")[-1][0] != "Z"


LAUNCHER = """
import signal, subprocess, sys, time
# as torchrun starts its workers: each in a session of its own, so a process-group kill misses them
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
open(sys.argv[1], "w").write(str(child.pid))
def stop(*_):  # torchrun's answer to SIGTERM: stop the workers, then exit
    child.terminate(); child.wait(); sys.exit(143)
signal.signal(signal.SIGTERM, stop)
print("workers started", flush=True)
time.sleep(600)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_timed_out_launcher_stops_the_workers_it_started_in_their_own_sessions(tmp_path):
    """subprocess.run's timeout killed torchrun alone; its ranks, in sessions of their own, kept
    the GPUs. The launcher now gets SIGTERM, which torchrun passes on to its workers."""
    pid_file = tmp_path / "worker.pid"
    started = time.monotonic()
    row = run_step(Step("ddp", "hangs in a collective", [sys.executable, "-c", LAUNCHER, pid_file]), timeout=6,
                   cuda=False, log=lambda *a: None)
    assert row["status"] == "fail" and row["message"] == "timed out after 6 s"
    worker = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while alive(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(worker) and time.monotonic() - started < 30


def test_a_step_runs_only_after_the_step_it_needs_passed():
    python = sys.executable
    steps = [Step("fp16", "fails", [python, "-c", "import sys; sys.exit(1)"]),
             Step("fp16-resume", "resumes it", [python, "-c", "print('resuming')"], needs="fp16"),
             Step("fp32", "passes", [python, "-c", "print('ok')"]),
             Step("again", "needs fp32", [python, "-c", "print('ok')"], needs="fp32")]
    rows = run_steps(steps, timeout=30, budget=600, cuda=False, started=time.monotonic(), log=lambda *a: None)
    assert [r["status"] for r in rows] == ["fail", "skipped", "pass", "pass"]
    assert rows[1]["message"] == "not run: needs fp16, which did not pass"


TORCHRUN_FAILURE = """
train.py: error: --data-dir /x: no CUB_200_2011 there; run scripts/prepare_data.py first
E1129 17:00:00.000000 123 torch/distributed/elastic/multiprocessing/api.py:900] failed (exitcode: 2)
Traceback (most recent call last):
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
scripts/train.py FAILED
------------------------------------------------------------
Failures:
  <NO_OTHER_FAILURES>
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  error_file: <N/A>
  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html
============================================================
"""


def test_a_failed_torchrun_is_reported_by_the_text_before_its_boxed_report():
    assert gpu_check._last_line(TORCHRUN_FAILURE) == ("train.py: error: --data-dir /x: no CUB_200_2011 there; run "
                                                      "scripts/prepare_data.py first")
    crash = TORCHRUN_FAILURE.replace("train.py: error: --data-dir /x: no CUB_200_2011 there; run scripts/prepare_data.py first",
                                     "Traceback (most recent call last):\n  File x\nRuntimeError: NCCL error: unhandled")
    assert gpu_check._last_line(crash) == "RuntimeError: NCCL error: unhandled"  # the worker's, not torchrun's
    assert gpu_check._last_line("one\ntwo\n") == "two"
    assert gpu_check._last_line("=" * 20 + "\nbanner\n" + "=" * 20 + "\n") == "banner"  # nothing before the box
    assert gpu_check._last_line("") == ""


def test_a_failing_step_that_reports_on_stdout_is_read_there():
    """count_host_syncs (host-syncs) printed its count on stdout and failed: the row said "exit code 1"."""
    quiet_fail = [sys.executable, "-c", "import sys; print('3 host synchronisations (expected 2)'); sys.exit(1)"]
    row = run_step(Step("syncs", "counts", quiet_fail), timeout=30, cuda=False, log=lambda *a: None)
    assert row["status"] == "fail" and row["message"] == "3 host synchronisations (expected 2)"


def test_gpu_utilisation_samples_the_steps_gpu_by_its_id(tmp_path, monkeypatch):
    """nvidia-smi numbers GPUs in PCI order and ignores CUDA_VISIBLE_DEVICES: "-i 0" could be
    another GPU, so the sampler asks for the steps' GPU by its UUID (a fake nvidia-smi here)."""
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\ncase \"$*\" in *'-i GPU-abc'*) echo 57 ;; *) echo 3 ;; esac\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with GpuUtilisation(True, "GPU-abc") as utilisation:
        deadline = time.monotonic() + 10
        while len(utilisation.samples) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
    assert utilisation.samples and utilisation.mean() == 57.0
    assert GpuUtilisation(False).mean() is None  # a CPU run samples nothing


def gpu_check_options(*argv):
    spec = importlib.util.spec_from_file_location("gpu_check_script", ROOT / "scripts" / "gpu_check.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return parse(script.Options, list(argv))[0]


@pytest.mark.parametrize("gpus, auto", [(1, "bf16"), (2, "fp16")])
def test_the_cuda_plan_runs_fp16_and_its_resume_and_torchrun_where_there_are_two_gpus(tmp_path, gpus, auto):
    """The plan a CUDA machine gets (the CPU test runs the CPU plan): fp16 and its --resume run,
    bf16 only where the GPU computes it natively, NCCL over torchrun with two GPUs."""
    steps = {s.name: s for s in plan_steps(gpu_check_options("--device", "cuda"), tmp_path / "data", tmp_path, gpus, auto)}
    assert not steps["fp16"].skip and not steps["fp16-resume"].skip and not steps["host-syncs"].skip
    resume = [str(part) for part in steps["fp16-resume"].command]
    assert "--resume" in resume and resume[resume.index("--out") + 1] == str(tmp_path / "runs" / "fp16")
    assert ("native bf16" in steps["bf16"].skip) == (auto == "fp16")
    ddp = [str(part) for part in steps["ddp-nccl"].command]
    assert bool(steps["ddp-nccl"].skip) == (gpus < 2)
    assert ddp[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    assert ddp[ddp.index("--device") + 1] == "cuda"
    assert steps["fp16-resume"].expect == "loss scale"  # train.py says the GradScaler's state came back
    assert "--deterministic" in [str(part) for part in steps["deterministic"].command]
    order = list(steps)
    assert order.index("ddp-nccl") < order.index("batch-hard") and order[-1] == "compile"  # compile, the slowest, last
