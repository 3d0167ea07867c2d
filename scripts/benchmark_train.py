"""Training throughput: the suite's data path and step versus a straightforward implementation.

    python scripts/benchmark_train.py                                   # ResNet18 and ResNet34 at 224
    python scripts/benchmark_train.py --backbones resnet18 --rounds 1 --profile
    python scripts/benchmark_train.py --device cuda --steps 100 --warmup 10 --also-bf16 --also-compile

On the same synthetic CUB-size images (500x375 JPEGs, written to --workdir), the same model and
the same batch, it times --steps training steps after --warmup steps of

* the reference (``reference_train``, below): the study's pipeline as a newcomer would write it,
  PIL decoding of the original JPEGs on every access, torchvision v1 transforms, three forwards,
  fp32, ``nn.TripletMarginLoss``, Adam, a default DataLoader with 2 workers;
* the suite (``triplet.bench.speed.training_speed``): the prepared copy (short side --resize),
  ``TrainTransform``, ``TripletCUBDataset``, ``engine.make_loader`` with ``runtime.default_workers``
  and ``engine.train_one_epoch`` with ``--precision auto`` and channels_last, as
  ``scripts/train.py`` runs them;

and the suite's evaluation embedding (``triplet.bench.speed.embedding_speed`` of the prepared test
images, repeated to --steps x --batch-size images). Each measurement runs in a fresh process, so the peak memory
reported for it is its own (Linux VmHWM of the main process; CUDA: max_memory_allocated too).
The two training paths alternate for --rounds rounds. On a shared machine whose speed drifts
between runs (the 2-core development machine's matmul peak measured 89 to 184 GFLOP/s), each
round's ratio compares the paths under like conditions: their range is reported beside the
overall rates and ratio.
Achieved FLOP/s, from torchvision's GMACs (training = 3 images x 3 forwards per triplet), are
given as a share of a large matmul's FLOP/s measured in the same run, in the row's precision
(bf16 is measured only where the hardware has it: CUDA, AVX-512-bf16/AMX; else fp32's peak).

Writes --out (JSON) and a Markdown table beside it (same name, .md).
"""
import math
import random
import shlex
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from triplet.bench.timing import (
    GMACS_224,
    forward_gflop,
    in_fresh_process,
    memory_report,
    timed_batches,
    train_gflop_per_triplet,
    write_results,
)
from triplet.cli import check, run
from triplet.data.layout import ROOT
from triplet.data.datasets import check_triplet_ready
from triplet.backbones import STUDY_BACKBONES, check_backbone
from triplet.model import build_model
from triplet.data.prepare import DataOptions, prepare, prepared_dir, read_manifest
from triplet.bench.speed import embedding_speed, probe_machine, profile_training_step, step_speed, training_speed
from triplet.data.synthetic import make_synthetic_cub


@dataclass
class Options:
    backbones: list[str] = field(default_factory=lambda: list(STUDY_BACKBONES), metadata={
        "nargs": "+", "help": "trunks to benchmark: torchvision model names (default: the study's)"})
    image_size: int = field(default=224, metadata={"help": "training crop and evaluation input size"})
    batch_size: int = field(default=32, metadata={"help": "triplets per training step (3x as many images)"})
    steps: int = field(default=5, metadata={"help": "timed training steps per path and round; 100 or more on a GPU"})
    warmup: int = field(default=1, metadata={"help": "untimed steps first (allocator, kernel choice, workers)"})
    rounds: int = field(default=3, metadata={
        "help": "times the reference and the suite alternate, each in a fresh process, so that a drift of a "
                "shared machine's speed hits both; each round's ratio is reported beside the overall one"})
    profile: bool = field(default=False, metadata={
        "help": "also profile one suite step (torch.profiler) and report where its time goes: convolutions, "
                "batch norm, the rest, and the convolutions' achieved GFLOP/s"})
    eval_batch_size: int = field(default=128, metadata={"help": "images per batch when embedding"})
    device: str = field(default="auto", metadata={"choices": ["auto", "cpu", "cuda", "mps"], "help": "auto: cuda, then mps, then cpu"})
    also_bf16: bool = field(default=False, metadata={
        "help": "also time the suite with bf16 autocast forced, as a labelled extra row (when auto is fp32)"})
    also_compile: bool = field(default=False, metadata={
        "help": "also time the suite with --compile (torch.compile), as a labelled extra row; the warm-up compiles"})
    out: str = field(default="results/train_benchmark.json", metadata={"help": "JSON result; the .md table goes beside it"})
    workdir: str = field(default="", metadata={
        "help": "folder for the synthetic images and their prepared copy, kept and reused (default: a temporary folder)"})
    classes: int = field(default=20, metadata={"help": "synthetic classes"})
    per_class: int = field(default=10, metadata={"help": "synthetic images per class (half train, half test)"})
    synthetic_size: int = field(default=500, metadata={"help": "width of the synthetic JPEGs; 500 gives CUB's 500x375"})
    resize: int = field(default=256, metadata={"help": "short side of the suite's prepared copy"})

    def __post_init__(self):
        for backbone in self.backbones:
            check_backbone(backbone, "--backbones")
        check(self.steps >= 1, f"--steps {self.steps}: must be >= 1")
        check(self.rounds >= 1, f"--rounds {self.rounds}: must be >= 1")
        check(self.warmup >= 0, f"--warmup {self.warmup}: must be >= 0")
        check(self.warmup >= 1 or not self.also_compile, "--also-compile: needs --warmup >= 1 (the first step compiles)")
        check(self.batch_size >= 2, f"--batch-size {self.batch_size}: must be >= 2")
        check(self.eval_batch_size >= 1, f"--eval-batch-size {self.eval_batch_size}: must be >= 1")
        check(self.image_size >= 16, f"--image-size {self.image_size}: must be >= 16")
        check(self.out.endswith(".json"), f"--out {self.out}: must end in .json")
        check(self.per_class >= 4, f"--per-class {self.per_class}: must be >= 4 (two train images a class)")


# ---- the reference: deliberately plain, and not slowed down in any way ------------------------

class PlainTripletDataset(Dataset):
    """Anchor i, a random other image of its class and a random image of another class."""

    def __init__(self, paths, labels, transform):
        self.paths, self.labels, self.transform = paths, labels, transform
        self.by_class = {}
        for i, label in enumerate(labels):
            self.by_class.setdefault(label, []).append(i)

    def __len__(self):
        return len(self.paths)

    def load(self, i):
        return self.transform(Image.open(self.paths[i]).convert("RGB"))

    def __getitem__(self, i):
        label = self.labels[i]
        positive = random.choice([j for j in self.by_class[label] if j != i])
        negative = random.choice(self.by_class[random.choice([c for c in self.by_class if c != label])])
        return self.load(i), self.load(positive), self.load(negative)


def reference_train(device, backbone, paths, labels, image_size, batch_size, warmup, steps):
    """The straightforward implementation a newcomer would write, timed as it is.

    It is an honest baseline, not a slowed-down one: the usual PIL + transforms v1 pipeline on
    the original JPEGs, two loader workers, the same model, optimiser and margin as the suite.
    """
    device = torch.device(device)
    torch.manual_seed(0)
    transform = T.Compose([
        T.RandomResizedCrop(image_size),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])
    loader = DataLoader(PlainTripletDataset(paths, labels, transform), batch_size=batch_size,
                        shuffle=True, num_workers=2)
    model = build_model(backbone).to(device)
    criterion = nn.TripletMarginLoss(margin=1.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.001)
    model.train()
    seconds, running_loss = [], 0.0
    for anchor, positive, negative in timed_batches(loader, warmup, steps, device, seconds):
        anchor, positive, negative = anchor.to(device), positive.to(device), negative.to(device)
        loss = criterion(model(anchor), model(positive), model(negative))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        running_loss += loss.item()
    return {"data": "original JPEGs, PIL + transforms v1", "precision": "fp32", "memory_format": "contiguous",
            "workers": 2, **step_speed(seconds[0], steps, batch_size), **memory_report(device)}


# ---- orchestration ------------------------------------------------------------------------------

def make_data(opts, workdir):
    """The synthetic set (its original JPEGs) and the suite's prepared copy; reused when present."""
    data_dir = Path(workdir) / f"synthetic-{opts.classes}x{opts.per_class}-{opts.synthetic_size}px"
    if not (data_dir / ROOT).exists():
        print(f"writing {opts.classes * opts.per_class} synthetic {opts.synthetic_size}-px JPEGs to {data_dir}")
        make_synthetic_cub(data_dir, opts.classes, opts.per_class, opts.synthetic_size, seed=0)
    options = DataOptions(data_dir=str(data_dir), resize=opts.resize)
    prepare(options, log=lambda *a: None)
    return data_dir / ROOT, prepared_dir(options)


def repeated(paths, labels, count):
    """The lists repeated until they hold at least ``count`` items (one epoch covers every step)."""
    times = math.ceil(count / len(paths))
    return paths * times, labels * times


def peak_share(gflops, precision, peaks):
    """GFLOP/s as a share of the matmul peak in ``precision`` (fp32's where that was not measured)."""
    share_of = precision if precision in peaks else "fp32"
    return round(gflops / peaks[share_of], 4), share_of


def add_flops(row, gflop_per_item, rate_key, peaks):
    """Achieved GFLOP/s and its share of the matmul peak in the row's precision."""
    gflops = row[rate_key] * gflop_per_item
    share, share_of = peak_share(gflops, row["precision"], peaks)
    row.update(gflops=round(gflops, 1), share_of_peak=share, share_of=share_of)
    return row


RATIO_KEYS = {"suite": "ratio", "suite_bf16_forced": "ratio_bf16_forced", "suite_compiled": "ratio_compiled"}
LABELS = {"suite_bf16_forced": "suite, bf16 forced", "suite_compiled": "suite, --compile"}


def combine(rows):
    """One path's rounds as one row: all its timed triplets over all its timed seconds, each
    round's rate, and the largest memory peaks."""
    seconds = sum(r["seconds"] for r in rows)
    rates = [r["triplets_per_s"] for r in rows]
    triplets = sum(rate * r["seconds"] for rate, r in zip(rates, rows))
    row = {**rows[0], "seconds": round(seconds, 3), "triplets_per_s": round(triplets / seconds, 3),
           "step_s": round(statistics.mean(r["step_s"] for r in rows), 3), "rounds": rates}
    for key in rows[0]:
        if "peak" in key and key.endswith("_mb"):
            row[key] = max(r[key] for r in rows)
    return row


def benchmark_backbone(opts, machine, backbone, train, test):
    device, peaks = machine["device"], machine["matmul_peak_gflops"]
    suite_paths, labels, originals = train
    common = dict(device=device, backbone=backbone, labels=labels, image_size=opts.image_size,
                  batch_size=opts.batch_size, warmup=opts.warmup, steps=opts.steps)
    per_triplet = train_gflop_per_triplet(backbone, opts.image_size)
    runs = [("reference", reference_train, {"paths": [str(p) for p in originals]}),
            ("suite", training_speed, {"paths": suite_paths, "precision": machine["auto_precision"]})]
    if opts.also_bf16 and machine["auto_precision"] != "bf16":
        runs.append(("suite_bf16_forced", training_speed, {"paths": suite_paths, "precision": "bf16"}))
    if opts.also_compile:
        runs.append(("suite_compiled", training_speed,
                     {"paths": suite_paths, "precision": machine["auto_precision"], "compiled": True}))
    rounds = {name: [] for name, _, _ in runs}
    for round_number in range(1, opts.rounds + 1):
        for name, function, extra in runs:  # alternating: a drift of the machine hits every path alike
            row = in_fresh_process(function, **common, **extra)
            rounds[name].append(row)
            print(f"{backbone} {name:<17} {row['triplets_per_s']:8.2f} triplets/s  {row['step_s']:7.2f} s/step  "
                  f"round {round_number}/{opts.rounds}, {row['precision']}, {row['workers']} workers, "
                  f"peak {_peak_mb(row):.0f} MiB")
    result = {name: add_flops(combine(rows), per_triplet, "triplets_per_s", peaks) for name, rows in rounds.items()}
    for name, key in RATIO_KEYS.items():
        if name in rounds:  # and the range of each round's ratio to the reference of the same round
            ratios = [s["triplets_per_s"] / r["triplets_per_s"] for s, r in zip(rounds[name], rounds["reference"])]
            result[key] = round(result[name]["triplets_per_s"] / result["reference"]["triplets_per_s"], 3)
            result[f"{key}_rounds"] = [round(ratio, 3) for ratio in ratios]
    embed_paths, embed_labels = repeated(*test, opts.steps * opts.batch_size)
    row = in_fresh_process(embedding_speed, device=device, backbone=backbone, paths=embed_paths, labels=embed_labels,
                           image_size=opts.image_size, batch_size=opts.eval_batch_size,
                           precision=machine["auto_precision"])
    result["embedding"] = add_flops(row, forward_gflop(backbone, opts.image_size), "images_per_s", peaks)
    print(f"{backbone} embedding         {row['images_per_s']:8.2f} images/s    ({row['images']} images, "
          f"{row['precision']})")
    if opts.profile:
        result["profile"] = profile = in_fresh_process(
            profile_training_step, device=device, backbone=backbone, image_size=opts.image_size,
            batch_size=opts.batch_size, precision=machine["auto_precision"])
        profile["conv_share_of_peak"], profile["share_of"] = peak_share(profile["conv_gflops"], profile["precision"],
                                                                        peaks)
        shares = ", ".join(f"{k} {100 * v:.0f}%" for k, v in profile["shares"].items())
        print(f"{backbone} profile of one suite step ({profile['step_s']:.2f} s): {shares}; convolutions at "
              f"{profile['conv_gflops']:.0f} GFLOP/s")
    for name, key in RATIO_KEYS.items():
        if name in rounds:
            print(f"{backbone}: {name} {result[name]['triplets_per_s']:.2f} triplets/s, reference "
                  f"{result['reference']['triplets_per_s']:.2f} triplets/s: {result[key]:.2f}x "
                  f"(rounds: {', '.join(f'{r:.2f}x' for r in result[key + '_rounds'])})")
    return result


def _peak_mb(row):
    """The memory that limits the batch: CUDA's allocator peak on a GPU, else the process's RSS."""
    return row.get("peak_cuda_mb", row["peak_rss_mb"])


def _range(values, suffix=""):
    """The rounds' lowest and highest value, "2.61–2.90" (one value when they agree)."""
    low, high = f"{min(values):.2f}{suffix}", f"{max(values):.2f}{suffix}"
    return low if low == high else f"{low}–{high}"


def markdown(report):
    m, s = report["machine"], report["settings"]
    peaks = ", ".join(f"{k} {v:,.0f} GFLOP/s" for k, v in m["matmul_peak_gflops"].items())
    memory = ("torch.cuda.max_memory_allocated" if m["device"].startswith("cuda")
              else "the training process's RSS high-water mark, DataLoader workers not included")
    lines = [
        "# Training throughput: the suite versus a straightforward implementation", "",
        f"`{report['command']}`", "",
        f"{m['device']} ({m['name']}, {m['threads']} threads), torch {m['torch']}; measured matmul peak: {peaks}. "
        f"Synthetic {s['synthetic_size']}-px JPEGs ({s['images']} images), {s['image_size']}-px crops, "
        f"{s['batch_size']} triplets per step. {s['rounds']} rounds, each path in a fresh process per round and "
        f"the paths alternating, each timing {s['steps']} steps after {s['warmup']} warm-up "
        f"step{'' if s['warmup'] == 1 else 's'}: triplets/s is "
        f"all timed triplets over all timed seconds (the rounds' range in brackets), the ratio that of these "
        f"rates (the range of each round's ratio in brackets). "
        f"Peak memory: {memory}. The reference is the plain implementation in scripts/benchmark_train.py.", "",
        "| Backbone | Path | Data | Precision | Workers | Triplets/s | vs reference | s/step | Peak memory (MiB) "
        "| Share of matmul peak |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for backbone, result in report["backbones"].items():
        for name in ("reference", *RATIO_KEYS):
            if name in result:
                r = result[name]
                label = LABELS.get(name, name)
                key = RATIO_KEYS.get(name)
                ratio = f"**{result[key]:.2f}x** ({_range(result[key + '_rounds'], 'x')})" if key else "1.00x"
                lines.append(f"| {backbone} | {label} | {r['data']} | {r['precision']}, {r['memory_format']} | "
                             f"{r['workers']} | {r['triplets_per_s']:.2f} ({_range(r['rounds'])}) | "
                             f"{ratio} | {r['step_s']:.2f} | {_peak_mb(r):,.0f} | "
                             f"{100 * r['share_of_peak']:.1f}% of {r['share_of']} |")
    lines += ["", "| Backbone | Embedding images/s | Precision | Peak memory (MiB) | Share of matmul peak |",
              "|---|---:|---|---:|---:|"]
    for backbone, result in report["backbones"].items():
        e = result["embedding"]
        lines.append(f"| {backbone} | {e['images_per_s']:.1f} | {e['precision']} | {_peak_mb(e):,.0f} | "
                     f"{100 * e['share_of_peak']:.1f}% of {e['share_of']} |")
    profiled = {b: r["profile"] for b, r in report["backbones"].items() if "profile" in r}
    if profiled:
        time_of = "GPU time" if m["device"].startswith("cuda") else "CPU time"
        lines += ["", f"Where one suite step's time goes (`--profile`: torch.profiler, aten operators' self {time_of} "
                  "as a share of the step's wall time; random images, loader excluded):", "",
                  "| Backbone | Step (s) | Convolutions | Batch norm | Other | Convolutions' GFLOP/s "
                  "| Share of matmul peak |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for backbone, p in profiled.items():
            sh = p["shares"]
            lines.append(f"| {backbone} | {p['step_s']:.2f} | {100 * sh['convolution']:.0f}% | "
                         f"{100 * sh['batch_norm']:.0f}% | {100 * sh['other']:.0f}% | {p['conv_gflops']:,.0f} | "
                         f"{100 * p['conv_share_of_peak']:.0f}% of {p['share_of']} |")
    return "\n".join(lines) + "\n"


def main(opts):
    machine = in_fresh_process(probe_machine, device=opts.device)  # first: a bad --device fails fast
    print(f"{machine['device']} ({machine['name']}, {machine['threads']} threads): matmul peak "
          + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in machine["matmul_peak_gflops"].items())
          + f"; suite precision {machine['auto_precision']}")
    with tempfile.TemporaryDirectory(prefix="triplet-bench-") as tmp:
        root, prepared = make_data(opts, opts.workdir or tmp)
        train_paths, train_labels = read_manifest(prepared, "train")
        check_triplet_ready(train_labels, f"training split of {prepared}")
        suite_paths, labels = repeated(train_paths, train_labels, (opts.warmup + opts.steps) * opts.batch_size)
        originals = [root / "images" / Path(p).relative_to(prepared / "images") for p in suite_paths]
        test = read_manifest(prepared, "test")
        backbones = {b: benchmark_backbone(opts, machine, b, (suite_paths, labels, originals), test)
                     for b in opts.backbones}
    report = {
        "command": shlex.join(["python", *sys.argv]),
        "settings": {"image_size": opts.image_size, "batch_size": opts.batch_size, "steps": opts.steps,
                     "rounds": opts.rounds,
                     "warmup": opts.warmup, "eval_batch_size": opts.eval_batch_size,
                     "synthetic_size": opts.synthetic_size, "images": opts.classes * opts.per_class,
                     "resize": opts.resize, "gmacs_224": {b: GMACS_224[b] for b in opts.backbones}},
        "machine": machine,
        "memory": "peak_rss_mb: VmHWM of the measuring process (Linux), DataLoader workers excluded; "
                  "worker_peak_rss_mb: the largest worker's, pages shared with the main process included; "
                  "peak_cuda_mb: torch.cuda.max_memory_allocated",
        "backbones": backbones,
    }
    write_results(opts.out, report, markdown(report))


if __name__ == "__main__":
    run(main, Options, __doc__)
