"""``make gpu-check``: everything the CPU tests cannot see, checked in minutes on a CUDA machine.

Each step is one of the suite's own commands, run as a user would (a subprocess with its own
timeout), and reported pass/fail with its message, so one failure never hides the rest. Steps
that need more than the machine has are reported as skipped, with the reason.
"""
import csv
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from triplet.bench.commands import STOP_GRACE_S, run_command
from triplet.machine import allocator_environment, find_tcmalloc

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


@dataclass
class Step:
    name: str
    what: str
    command: list
    env: dict = field(default_factory=dict)  # changes to this process's environment; None removes a variable
    run_dir: str = ""  # a training step: its epoch seconds come from this run's history.csv
    expect: str = ""  # text the output must contain
    skip: str = ""  # why the step cannot run on this machine ("" = it can)
    needs: str = ""  # a step that must have passed first (fp16-resume resumes what fp16 wrote)


def cuda_gpu_id():
    """nvidia-smi's id (GPU-<uuid>) of the GPU the steps run on, CUDA's device 0. nvidia-smi numbers
    GPUs in PCI order and ignores CUDA_VISIBLE_DEVICES, so its "-i 0" may be another GPU."""
    import torch

    uuid = str(torch.cuda.get_device_properties(0).uuid)
    return uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"


class GpuUtilisation:
    """Mean utilisation of the steps' GPU while a step runs, sampled from nvidia-smi twice a second.
    ``gpu``: nvidia-smi's id for it (``cuda_gpu_id()``)."""

    def __init__(self, enabled, gpu="0"):
        self.enabled, self.gpu = enabled and shutil.which("nvidia-smi") is not None, gpu
        self.samples, self._stop = [], threading.Event()

    def _poll(self):
        while not self._stop.wait(0.5):
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                      "-i", self.gpu], capture_output=True, text=True, timeout=5)
                self.samples.append(float(out.stdout.strip().splitlines()[0]))
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                pass

    def __enter__(self):
        if self.enabled:
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self._stop.set()
            self._thread.join()

    def mean(self):
        return round(sum(self.samples) / len(self.samples), 1) if self.samples else None


def last_epoch_seconds(run_dir):
    """The last epoch's seconds (training and validation) from a run's history.csv, or None."""
    try:
        with open(Path(run_dir) / "history.csv") as f:
            rows = list(csv.DictReader(f))
        return float(rows[-1]["seconds"]) if rows else None
    except (OSError, KeyError, ValueError):
        return None


def _is_border(line):
    return len(line) >= 10 and set(line) <= set("=-*")


def _last_line(text):
    """The last line that says something. A failed torchrun ends with its own traceback and a
    report boxed in ===== lines (the last line the border itself); the workers' output comes before
    both, so there the last "error:" line (the suite's one-line errors) is taken, else the last
    line before torchrun's traceback."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    box = next((i for i, line in enumerate(lines) if set(line) == {"="} and len(line) >= 10), None)
    if box is not None:
        before = [line for line in lines[:box] if not _is_border(line)]
        errors = [line for line in before if "error: " in line]
        tracebacks = [i for i, line in enumerate(before) if line.startswith("Traceback (most recent call last)")]
        said = errors[-1:] or (before[:tracebacks[-1]] if tracebacks else before)
        if said:
            return said[-1][:300]
    said = [line for line in lines if not _is_border(line)]
    return said[-1][:300] if said else ""


def run_step(step, timeout, cuda, log=print, gpu="0"):
    """Run one step; return its result row. Never raises for the step's own failure.
    ``gpu``: nvidia-smi's id of the GPU whose utilisation is sampled."""
    row = {"step": step.name, "what": step.what, "status": "skipped", "seconds": None, "epoch_s": None,
           "gpu_util_percent": None, "message": step.skip}
    if step.skip:
        log(f"{step.name:<12} skipped: {step.skip}")
        return row
    start = time.perf_counter()
    with GpuUtilisation(cuda, gpu) as utilisation:
        code, out, err = run_command([str(part) for part in step.command], timeout, _environment(step.env))
        ok = code == 0
        if code is None:
            message = f"timed out after {timeout} s"
        elif ok:
            message = _last_line(out) or "exit code 0"
            if step.expect and step.expect not in out + err:
                ok, message = False, f"the output lacks {step.expect!r}: {message}"
        else:  # errors go to stderr; a check that reports on stdout is read there when stderr is silent
            message = _last_line(err) or _last_line(out) or f"exit code {code}"
    row.update(status="pass" if ok else "fail", seconds=round(time.perf_counter() - start, 1), message=message,
               gpu_util_percent=utilisation.mean(),
               epoch_s=last_epoch_seconds(step.run_dir) if step.run_dir and ok else None)
    log(f"{step.name:<12} {row['status']:<4} {row['seconds']:7.1f} s  {message}")
    return row


def _environment(changes):
    """This process's environment with ``changes`` applied (None removes a variable)."""
    env = {**os.environ, **changes}
    return {name: value for name, value in env.items() if value is not None}


def run_steps(steps, timeout, budget, cuda, started, log=print, clock=time.monotonic, gpu="0"):
    """Run the steps in order within ``budget`` seconds counted from ``started`` (a ``clock()``
    value): each step's timeout is cut to the time left less what stopping a timed-out step may
    take (STOP_GRACE_S + 5), and a step that finds less than a second is reported as skipped, so
    no hang can take the check past its budget. A step whose ``needs`` did not pass is skipped."""
    rows = []
    for step in steps:
        # a step that times out may take STOP_GRACE_S more to stop (torchrun's workers): kept in the budget
        left = budget - (clock() - started) - STOP_GRACE_S - 5
        status = {row["step"]: row["status"] for row in rows}
        if step.skip:
            pass
        elif step.needs and status.get(step.needs) != "pass":
            step = Step(step.name, step.what, step.command, skip=f"not run: needs {step.needs}, which did not pass")
        elif left < 1:
            step = Step(step.name, step.what, step.command,
                        skip=f"not run: the check's --budget of {budget} s was spent")
        rows.append(run_step(step, max(1, int(min(timeout, left))), cuda, log, gpu))
    return rows


def plan_steps(opts, data_dir, work, gpus, auto_precision="bf16"):
    """The checks, in order; ``gpus``: CUDA devices visible (0 on a CPU run); ``auto_precision``:
    what --precision auto picks here (fp16 on a GPU without native bf16, whose bf16 step is skipped)."""
    python, cuda = sys.executable, opts.device == "cuda"
    runs = Path(work) / "runs"
    common = ["--data-dir", data_dir, "--resize", opts.resize, "--image-size", opts.image_size,
              "--batch-size", opts.batch_size, "--weights", "none", "--device", opts.device, "--no-progress"]

    def train(name, what, *extra, epochs=1, out=None, **kwargs):
        out = out or runs / name
        command = [python, SCRIPTS / "train.py", *common, "--epochs", epochs, "--out", out, *extra]
        return Step(name, what, command, run_dir=str(out), **kwargs)

    main_run = runs / "main"
    steps = [
        train("train", "train 1 epoch (auto precision)", "--force", out=main_run),
        train("resume", "--resume the same run to epoch 2", "--resume", epochs=2, out=main_run, expect="resuming"),
        Step("evaluate", "evaluate the resumed run", [python, SCRIPTS / "evaluate.py", "--run", main_run,
                                                      "--device", opts.device], expect="wrote"),
        Step("export-cpu", "export to ONNX on the CPU from that checkpoint, CUDA hidden",
             [python, SCRIPTS / "export_onnx.py", "--run", main_run, "--out", Path(work) / "main.onnx",
              "--verify-images", 32], env={"CUDA_VISIBLE_DEVICES": ""}),
    ]
    no_fp16 = "" if cuda else "CPUs have no fp16 training"
    for precision in ("fp32", "bf16", "fp16"):
        skip = no_fp16 if precision == "fp16" else ""
        if precision == "bf16" and cuda and auto_precision != "bf16":
            skip = "this GPU has no native bf16 (--precision auto picks fp16 here)"
        steps.append(train(precision, f"1 epoch in {precision}", "--precision", precision, "--force", skip=skip))
    steps.append(train("fp16-resume", "--resume the fp16 run to epoch 2 (its GradScaler's state)", "--precision", "fp16",
                       "--resume", epochs=2, out=runs / "fp16", expect="loss scale", skip=no_fp16, needs="fp16"))
    # The most GPU-specific checks first, the slowest (compile) last: a spent --budget skips the end
    torchrun = [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", 2, SCRIPTS / "train.py"]
    steps.append(Step("ddp-nccl", "torchrun, 2 processes on 2 GPUs (NCCL)",
                      [*torchrun, *common, "--epochs", 1, "--out", runs / "ddp", "--force"], run_dir=str(runs / "ddp"),
                      skip="" if gpus >= 2 else f"needs 2 CUDA devices, {gpus} visible"))
    steps.append(Step("host-syncs", "the training loop waits for the GPU only at its sync points (auto precision; offline "
                      "triplets and batch-hard mining)",
                      [python, "-c", "from triplet.bench.speed import check_host_syncs; check_host_syncs()"],
                      expect="host synchronisations", skip="" if cuda else "torch.cuda.set_sync_debug_mode is CUDA-only"))
    tcmalloc = find_tcmalloc()
    steps += [
        train("batch-hard", "1 epoch of batch-hard mining in PK batches", "--mining", "hard",
              "--samples-per-class", 4, "--force"),
        train("gpu-cache", "1 epoch with --gpu-cache (batched augmentation on the device)", "--gpu-cache", "--force"),
        train("deterministic", "1 epoch with --deterministic (torch.use_deterministic_algorithms)", "--deterministic",
              "--force"),
        train("tcmalloc", "1 epoch started with tcmalloc preloaded, as make starts train.py", "--force",
              env=allocator_environment(tcmalloc),
              skip="" if tcmalloc else "no tcmalloc here (apt install libtcmalloc-minimal4)"),
        train("compile", "1 epoch with --compile", "--compile", "--force"),
    ]
    return [step if step.name not in opts.skip or step.skip else
            Step(step.name, step.what, step.command, skip=f"--skip {step.name}") for step in steps]


def markdown(report):
    m = report["machine"]
    lines = ["# GPU check", "", f"`{report['command']}`", "",
             f"{m['device_name']} ({m['gpus']} CUDA device(s) visible), torch {m['torch']}; auto precision: "
             f"{m['precision']} ({m['precision_reason']}). Synthetic set: {report['settings']['images']} images at "
             f"{report['settings']['synthetic_size']} px, {report['settings']['image_size']}-px crops. "
             f"Epoch seconds: training and validation of the step's last epoch (history.csv). GPU util: the mean "
             f"over the whole command, start-up and validation included, so below what an epoch alone reaches.", "",
             f"**{report['passed']} passed, {report['failed']} failed, {report['skipped']} skipped**", "",
             "| Step | What | Status | Seconds | Epoch s | GPU util % | Message |", "|---|---|---|---:|---:|---:|---|"]
    for r in report["steps"]:
        cells = [r["step"], r["what"], r["status"], r["seconds"], r["epoch_s"], r["gpu_util_percent"],
                 r["message"].replace("|", "\\|")]
        lines.append("| " + " | ".join("" if c is None else str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"
