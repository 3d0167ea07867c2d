"""scripts/gpu_check.py: its CPU-runnable parts end to end, and a failing step not hiding the rest."""
import json
import sys
import time

from tests.conftest import run_script
from triplet.bench.gpu_check import Step, markdown, run_step, run_steps
from triplet.machine import find_tcmalloc


def test_gpu_check_cpu_parts_pass_and_report_every_step(tmp_path):
    out = tmp_path / "gpu_check.json"
    result = run_script("gpu_check", "--device", "cpu", "--classes", 4, "--per-class", 6, "--synthetic-size", 64,
                        "--resize", 40, "--image-size", 32, "--batch-size", 8, "--skip", "compile", "--budget", 850,
                        "--workdir", tmp_path / "work", "--out", out, check=False, timeout=900)
    report = json.loads(out.read_text())
    rows = {r["step"]: r for r in report["steps"]}
    assert result.returncode == 0, [(r["step"], r["message"]) for r in report["steps"] if r["status"] == "fail"]
    for name in ("train", "resume", "evaluate", "export-cpu", "fp32", "bf16", "gpu-cache", "batch-hard"):
        assert rows[name]["status"] == "pass", rows[name]
    for name in ("train", "fp32", "gpu-cache", "batch-hard"):
        assert rows[name]["epoch_s"] > 0
    for name in ("fp16", "compile", "host-syncs", "ddp-nccl"):
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
    passed, skipped = (9, 4) if tcmalloc else (8, 5)
    assert report["failed"] == 0 and report["passed"] == passed
    table = out.with_suffix(".md").read_text()
    assert "| resume |" in table and f"**{passed} passed, 0 failed, {skipped} skipped**" in table


def test_a_failing_or_hanging_step_is_reported_and_the_next_still_runs(tmp_path):
    python = sys.executable
    steps = [Step("boom", "fails", [python, "-c", "import sys; print('x: error: bad thing', file=sys.stderr); sys.exit(2)"]),
             Step("hang", "hangs", [python, "-c", "import time; time.sleep(60)"]),
             Step("fine", "works", [python, "-c", "print('all good')"], expect="good"),
             Step("quiet", "passes without the expected text", [python, "-c", "print('hm')"], expect="good")]
    rows = [run_step(step, timeout=3, cuda=False, log=lambda *a: None) for step in steps]
    assert [r["status"] for r in rows] == ["fail", "fail", "pass", "fail"]
    assert rows[0]["message"] == "x: error: bad thing" and rows[1]["message"] == "timed out after 3 s"
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
    # 30 s of the 34-s budget were spent before the steps (writing the set): the first step gets 4 s, not 240;
    # the clock reads 30 s before each step, then the time the first one took
    readings = iter([30.0, 34.5, 34.6, 34.7])
    started = time.monotonic()
    rows = run_steps(steps, timeout=240, budget=34, cuda=False, started=0.0, log=lambda *a: None,
                     clock=lambda: next(readings))
    assert time.monotonic() - started < 20
    assert [r["status"] for r in rows] == ["fail", "skipped", "skipped", "skipped"]
    assert rows[0]["message"] == "timed out after 4 s"
    assert rows[1]["message"] == rows[2]["message"] == "not run: the check's --budget of 34 s was spent"
    assert rows[3]["message"] == "needs 2 CUDA devices, 0 visible"  # its own reason is kept


def test_a_step_starts_with_its_environment_changes(monkeypatch):
    monkeypatch.setenv("TRIPLET_CHECK_GONE", "1")
    show = [sys.executable, "-c",
            "import os; print(os.environ.get('TRIPLET_CHECK_GONE'), os.environ.get('TRIPLET_CHECK_SET'))"]
    changes = {"TRIPLET_CHECK_GONE": None, "TRIPLET_CHECK_SET": "x"}
    row = run_step(Step("env", "sees its environment", show, env=changes), timeout=30, cuda=False, log=lambda *a: None)
    assert row["status"] == "pass" and row["message"] == "None x"  # None removes a variable, a string sets it
