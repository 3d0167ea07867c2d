"""Check the suite on a CUDA machine in under 10 minutes (--budget), offline, on a synthetic CUB-size set.

    python scripts/gpu_check.py                          # `make gpu-check`: one or more CUDA GPUs
    python scripts/gpu_check.py --device cpu --classes 4 --per-class 6 --synthetic-size 64 --resize 40 \
        --image-size 32 --batch-size 8 --skip compile    # its CPU-runnable parts (the test suite runs this)

Writes the set it trains on (--workdir), then runs, each as its own command with its own timeout:
train 1 epoch then --resume to 2; evaluate; export to ONNX on the CPU from that checkpoint (CUDA
hidden); one epoch each in fp32, bf16 and fp16 (then --resume of the fp16 run, its loss scale
restored); with two or more GPUs, torchrun over NCCL; the host synchronisations of the training
loop, with offline triplets and with batch-hard mining (torch.cuda.set_sync_debug_mode); then
one epoch each with batch-hard PK mining, with --gpu-cache, with --deterministic, started with
tcmalloc as make starts train.py, and with --compile (epoch seconds and GPU utilisation for each).
Every step is reported pass/fail with its message in --out (JSON) and a Markdown table beside it;
the exit status is 1 when any step failed.
"""
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from triplet.cli import check, run

STEPS = ["train", "resume", "evaluate", "export-cpu", "fp32", "bf16", "fp16", "fp16-resume", "ddp-nccl", "host-syncs",
         "batch-hard", "gpu-cache", "deterministic", "tcmalloc", "compile"]


@dataclass
class Options:
    device: str = field(default="cuda", metadata={
        "choices": ["cuda", "cpu"], "help": "cuda: the check; cpu: its CPU-runnable parts (fp16 and NCCL skipped)"})
    out: str = field(default="results/gpu_check.json", metadata={"help": "JSON result; the .md table goes beside it"})
    workdir: str = field(default="results/gpu_check", metadata={"help": "folder for the synthetic set and the runs"})
    classes: int = field(default=200, metadata={"help": "synthetic classes (CUB: 200)"})
    per_class: int = field(default=60, metadata={"help": "synthetic images per class, half train (CUB: ~59)"})
    synthetic_size: int = field(default=500, metadata={"help": "width of the synthetic JPEGs (CUB: 500x375)"})
    resize: int = field(default=256, metadata={"help": "short side of the prepared copy"})
    image_size: int = field(default=224, metadata={"help": "training crop and evaluation size"})
    batch_size: int = field(default=64, metadata={"help": "triplets (or PK images) per step"})
    timeout: int = field(default=240, metadata={"help": "seconds each step may take before it counts as failed"})
    budget: int = field(default=600, metadata={
        "help": "seconds for the whole check, writing the synthetic set included: each step's timeout is cut to "
                "what is left, and steps that find nothing left are reported as skipped"})
    skip: list[str] = field(default_factory=list, metadata={
        "nargs": "*", "choices": STEPS, "help": "steps to leave out (reported as skipped)"})

    def __post_init__(self):
        check(self.timeout >= 1, f"--timeout {self.timeout}: must be >= 1")
        check(self.budget >= 1, f"--budget {self.budget}: must be >= 1")
        check(self.out.endswith(".json"), f"--out {self.out}: must end in .json")
        check(self.per_class >= 4, f"--per-class {self.per_class}: must be >= 4 (two train images a class)")
        check(self.batch_size % 4 == 0, f"--batch-size {self.batch_size}: must be a multiple of 4 (PK batches of K=4)")


def main(opts):
    started = time.monotonic()
    import torch

    from triplet import runtime
    from triplet.bench.gpu_check import cuda_gpu_id, markdown, plan_steps, run_steps
    from triplet.bench.timing import write_results
    from triplet.data.prepare import synthetic_set
    from triplet.errors import UserError

    device = runtime.resolve_device(opts.device)
    precision, reason = runtime.choose_precision("auto", device)
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    name = runtime.device_name(device)
    print(f"{name}: {gpus} CUDA device(s); auto precision {precision} ({reason})")
    work = Path(opts.workdir)
    try:
        data_dir, _ = synthetic_set(work, opts.classes, opts.per_class, opts.synthetic_size, opts.resize)
    except UserError as e:
        raise UserError(f"--workdir {work}: could not prepare the synthetic set: {e}") from e
    cuda = device.type == "cuda"
    rows = run_steps(plan_steps(opts, data_dir, work, gpus, precision), opts.timeout, opts.budget, cuda, started,
                     gpu=cuda_gpu_id() if cuda else "0")
    counts = {status: sum(r["status"] == status for r in rows) for status in ("pass", "fail", "skipped")}
    report = {"command": shlex.join(["python", *sys.argv]),
              "machine": {"device_name": name, "gpus": gpus, "torch": torch.__version__, "precision": precision,
                          "precision_reason": reason},
              "settings": {"images": opts.classes * opts.per_class, "synthetic_size": opts.synthetic_size,
                           "image_size": opts.image_size, "batch_size": opts.batch_size, "timeout": opts.timeout,
                           "budget": opts.budget},
              "passed": counts["pass"], "failed": counts["fail"], "skipped": counts["skipped"], "steps": rows}
    write_results(opts.out, report, markdown(report))
    return 1 if counts["fail"] else 0


if __name__ == "__main__":
    run(main, Options, __doc__)
