"""Training throughput: the suite's data path and step versus a straightforward implementation.

    python scripts/benchmark_train.py                                   # ResNet18 and ResNet34 at 224
    python scripts/benchmark_train.py --backbones resnet18 --rounds 1 --profile
    python scripts/benchmark_train.py --device cuda --also-bf16 --also-compile  # 100 steps after 10 on CUDA

On the same synthetic CUB-size images (500x375 JPEGs, written to --workdir), the same model and
the same batch, it times --steps training steps after --warmup steps of

* the reference (``triplet.bench.reference.reference_train``): the study's pipeline as a newcomer would write it,
  PIL decoding of the original JPEGs on every access, torchvision v1 transforms, three forwards,
  fp32, ``nn.TripletMarginLoss``, Adam, a default DataLoader with 2 workers, the C library's malloc;
* the suite (``triplet.bench.speed.training_speed``): the prepared copy (short side --resize),
  ``TrainTransform`` (uint8, normalised on the device), ``TripletBatchSampler``,
  ``engine.make_loader`` with ``runtime.loader_workers`` and persistent workers, and
  ``engine.train_one_epoch`` with ``--precision auto`` and channels_last, as ``scripts/train.py``
  runs them, with tcmalloc preloaded where the machine has it, as ``make`` starts train.py;

the suite's data path alone with one worker (``triplet.bench.speed.data_path_speed``: images/s
per worker, what sizes the workers a GPU needs), and the suite's evaluation embedding (``triplet.bench.speed.embedding_speed`` of the prepared test
images, repeated to --steps x --batch-size images). Each measurement runs in a fresh process, so the peak memory
reported for it is its own (Linux VmHWM of the main process; CUDA: max_memory_allocated too).
After the warm-up steps, the batches the workers loaded ahead are drained before the clock
starts, so no path is timed on a full queue. The two training paths alternate for --rounds rounds. On a shared machine whose speed drifts
between runs (the 2-core development machine's matmul peak measured 89 to 184 GFLOP/s), each
round's ratio compares the paths under like conditions: their range is reported beside the
overall rates and ratio.
Achieved FLOP/s, from torchvision's GMACs (training = 3 images x 3 forwards per triplet), are
given as a share of a large matmul's FLOP/s measured in the same run, in the row's precision
(bf16 is measured only where the hardware has it: CUDA, AVX-512-bf16/AMX; else fp32's peak).

Writes --out (JSON) and a Markdown table beside it (same name, .md).
"""
import math
import shlex
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from triplet.backbones import STUDY_BACKBONES, check_backbone
from triplet.bench.tables import RATIO_KEYS, peak_mb, training_table
from triplet.cli import check, run
from triplet.data.layout import ROOT
from triplet.data.prepare import read_manifest, synthetic_set
from triplet.data.synthetic import MAX_CLASSES
from triplet.machine import allocator_environment, find_tcmalloc


@dataclass
class Options:
    backbones: list[str] = field(default_factory=lambda: list(STUDY_BACKBONES), metadata={
        "nargs": "+", "help": "trunks to benchmark: torchvision model names (default: the study's)"})
    image_size: int = field(default=224, metadata={"help": "training crop and evaluation input size"})
    batch_size: int = field(default=32, metadata={"help": "triplets per training step (3x as many images)"})
    steps: int = field(default=-1, metadata={"help": "timed training steps per path and round (-1: 100 on CUDA, 5 elsewhere)"})
    warmup: int = field(default=-1, metadata={
        "help": "untimed steps first (allocator, kernel choice, workers; -1: 10 on CUDA, 1 elsewhere)"})
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
    also_fp32: bool = field(default=False, metadata={
        "help": "also time the suite in fp32, as a labelled extra row (when auto is bf16 or fp16): the like-for-like "
                "comparison with the fp32 reference, and what a CPU without native bf16 trains in"})
    allocator: str = field(default="auto", metadata={"choices": ["auto", "none"], "help":
        "the suite's memory allocator. auto: tcmalloc preloaded where the machine has it, as make starts train.py "
        "and evaluate.py; none: the C library's malloc. The reference always runs with the C library's malloc"})
    also_glibc: bool = field(default=False, metadata={
        "help": "also time the suite with the C library's malloc, as a labelled extra row (when the suite's is "
                "tcmalloc): what the allocator adds"})
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
        check(self.steps >= 1 or self.steps == -1, f"--steps {self.steps}: must be >= 1 (or -1: automatic)")
        check(self.rounds >= 1, f"--rounds {self.rounds}: must be >= 1")
        check(self.warmup >= -1, f"--warmup {self.warmup}: must be >= 0 (or -1: automatic)")
        check(self.warmup != 0 or not self.also_compile, "--also-compile: needs --warmup >= 1 (the first step compiles)")
        check(self.batch_size >= 2, f"--batch-size {self.batch_size}: must be >= 2")
        check(self.eval_batch_size >= 1, f"--eval-batch-size {self.eval_batch_size}: must be >= 1")
        check(self.image_size >= 16, f"--image-size {self.image_size}: must be >= 16")
        check(self.out.endswith(".json"), f"--out {self.out}: must end in .json")
        check(self.per_class >= 4, f"--per-class {self.per_class}: must be >= 4 (two train images a class)")
        check(2 <= self.classes <= MAX_CLASSES, f"--classes {self.classes}: must be 2-{MAX_CLASSES}")


# ---- orchestration ------------------------------------------------------------------------------

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


def combine(rows):
    """One path's rounds as one row: all its timed triplets over all its timed seconds, each
    round's rate, and the largest memory peaks."""
    seconds = sum(r["seconds"] for r in rows)
    rates = [r["triplets_per_s"] for r in rows]
    triplets = sum(rate * r["seconds"] for rate, r in zip(rates, rows))
    row = {**rows[0], "seconds": round(seconds, 3), "triplets_per_s": round(triplets / seconds, 3),
           "images_per_s": round(3 * triplets / seconds, 3),
           "step_s": round(statistics.mean(r["step_s"] for r in rows), 3), "rounds": rates}
    for key in rows[0]:
        if "peak" in key and key.endswith("_mb"):
            row[key] = max(r[key] for r in rows)
    return row


def benchmark_backbone(opts, machine, backbone, train, test):
    from triplet.bench.reference import reference_train
    from triplet.bench.speed import embedding_speed, profile_training_step, training_speed
    from triplet.bench.timing import forward_gflop, in_fresh_process, train_gflop_per_triplet

    device, peaks = machine["device"], machine["matmul_peak_gflops"]
    suite_paths, labels, originals = train
    common = dict(device=device, backbone=backbone, labels=labels, image_size=opts.image_size,
                  batch_size=opts.batch_size, warmup=opts.warmup, steps=opts.steps)
    per_triplet = train_gflop_per_triplet(backbone, opts.image_size)
    # Every path starts with its allocator: the C library's for the reference, the suite's as make starts it.
    plain, suite_env = allocator_environment(None), allocator_environment(machine["allocator_library"])
    auto = {"paths": suite_paths, "precision": machine["auto_precision"], "env": suite_env}
    runs = [("reference", reference_train, {"paths": [str(p) for p in originals], "env": plain}),
            ("suite", training_speed, auto)]
    if opts.also_bf16 and machine["auto_precision"] != "bf16":
        runs.append(("suite_bf16_forced", training_speed, {**auto, "precision": "bf16"}))
    if opts.also_fp32 and machine["auto_precision"] != "fp32":
        runs.append(("suite_fp32_forced", training_speed, {**auto, "precision": "fp32"}))
    if opts.also_glibc and machine["allocator_library"]:
        runs.append(("suite_glibc", training_speed, {**auto, "env": plain}))
    if opts.also_compile:
        runs.append(("suite_compiled", training_speed, {**auto, "compiled": True}))
    rounds = {name: [] for name, _, _ in runs}
    for round_number in range(1, opts.rounds + 1):
        for name, function, extra in runs:  # alternating: a drift of the machine hits every path alike
            row = in_fresh_process(function, **common, **extra)
            rounds[name].append(row)
            print(f"{backbone} {name:<17} {row['triplets_per_s']:8.2f} triplets/s  {row['step_s']:7.2f} s/step  "
                  f"round {round_number}/{opts.rounds}, {row['precision']}, {row['workers']} workers, "
                  f"{row['allocator']}, peak {peak_mb(row):.0f} MiB")
    result = {name: add_flops(combine(rows), per_triplet, "triplets_per_s", peaks) for name, rows in rounds.items()}
    for name, key in RATIO_KEYS.items():
        if name in rounds:  # and the range of each round's ratio to the reference of the same round
            ratios = [s["triplets_per_s"] / r["triplets_per_s"] for s, r in zip(rounds[name], rounds["reference"])]
            result[key] = round(result[name]["triplets_per_s"] / result["reference"]["triplets_per_s"], 3)
            result[f"{key}_rounds"] = [round(ratio, 3) for ratio in ratios]
    embed_paths, embed_labels = repeated(*test, opts.steps * opts.batch_size)
    row = in_fresh_process(embedding_speed, device=device, backbone=backbone, paths=embed_paths, labels=embed_labels,
                           image_size=opts.image_size, batch_size=opts.eval_batch_size,
                           precision=machine["auto_precision"], env=suite_env)
    result["embedding"] = add_flops(row, forward_gflop(backbone, opts.image_size), "images_per_s", peaks)
    print(f"{backbone} embedding         {row['images_per_s']:8.2f} images/s    ({row['images']} images, "
          f"{row['precision']})")
    if opts.profile:
        result["profile"] = profile = in_fresh_process(
            profile_training_step, device=device, backbone=backbone, image_size=opts.image_size,
            batch_size=opts.batch_size, precision=machine["auto_precision"], env=suite_env)
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


def steps_and_warmup(steps, warmup, cuda):
    """-1 resolved by device: a CUDA step of milliseconds needs 100 timed steps after 10 warm-up
    (kernel choice, allocator, workers) to be measured at all; a CPU step of seconds needs 5 after 1."""
    return (100 if cuda else 5) if steps == -1 else steps, (10 if cuda else 1) if warmup == -1 else warmup


def main(opts):
    # torch and everything over it are imported here, not at the top, so that --help is instant
    from triplet.bench.speed import data_path_speed, probe_machine
    from triplet.bench.timing import batches_to_time, gmacs_224, in_fresh_process, write_results
    from triplet.data.datasets import check_triplet_ready

    machine = in_fresh_process(probe_machine, device=opts.device)  # first: a bad --device fails fast
    machine["allocator_library"] = find_tcmalloc() if opts.allocator == "auto" else None
    cuda = machine["device"].startswith("cuda")
    opts.steps, opts.warmup = steps_and_warmup(opts.steps, opts.warmup, cuda)
    print(f"{machine['device']} ({machine['name']}, {machine['threads']} threads): matmul peak "
          + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in machine["matmul_peak_gflops"].items())
          + f"; suite precision {machine['auto_precision']}, allocator {machine['allocator_library'] or 'malloc'}")
    with tempfile.TemporaryDirectory(prefix="triplet-bench-") as tmp:
        data_dir, prepared = synthetic_set(opts.workdir or tmp, opts.classes, opts.per_class, opts.synthetic_size,
                                           opts.resize)
        root = data_dir / ROOT
        train_paths, train_labels = read_manifest(prepared, "train")
        check_triplet_ready(train_labels, f"training split of {prepared}")
        # a list of paths repeated, so its length costs nothing
        suite_paths, labels = repeated(train_paths, train_labels, batches_to_time(opts.warmup, opts.steps) * opts.batch_size)
        originals = [root / "images" / Path(p).relative_to(prepared / "images") for p in suite_paths]
        test = read_manifest(prepared, "test")
        data_path = in_fresh_process(data_path_speed, paths=suite_paths, labels=labels, image_size=opts.image_size,
                                     batch_size=opts.batch_size, batches=opts.steps)
        print(f"data path: {data_path['images_per_s_per_worker']:.0f} images/s per worker")
        backbones = {b: benchmark_backbone(opts, machine, b, (suite_paths, labels, originals), test)
                     for b in opts.backbones}
    report = {
        "command": shlex.join(["python", *sys.argv]),
        "settings": {"image_size": opts.image_size, "batch_size": opts.batch_size, "steps": opts.steps,
                     "rounds": opts.rounds,
                     "warmup": opts.warmup, "eval_batch_size": opts.eval_batch_size,
                     "synthetic_size": opts.synthetic_size, "images": opts.classes * opts.per_class,
                     "resize": opts.resize, "gmacs_224": {b: gmacs_224(b) for b in opts.backbones}},
        "machine": machine,
        "memory": "peak_rss_mb: VmHWM of the measuring process (Linux), DataLoader workers excluded; "
                  "worker_peak_rss_mb: the largest worker's, pages shared with the main process included; "
                  "peak_cuda_mb: torch.cuda.max_memory_allocated",
        "data_path": data_path,
        "backbones": backbones,
    }
    write_results(opts.out, report, training_table(report))


if __name__ == "__main__":
    run(main, Options, __doc__)
