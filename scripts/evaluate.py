"""Evaluate a trained run on the test split: the study's triplet metrics and retrieval metrics.

    python scripts/evaluate.py --run results/exp1-resnet18
    python scripts/evaluate.py --run results/exp1-resnet18 --checkpoint none   # the untrained trunk
    python scripts/evaluate.py --run results/baseline-resnet18 --checkpoint none --backbone resnet18 --weights imagenet

Embeds every test image once, saves RUN_DIR/test_embeddings.npz and writes RUN_DIR/metrics.json
(loss, triplet_accuracy, cos_sim_ap, cos_sim_an on fixed seeded test triplets; precision_at_1/5/10,
recall_at_1/2/4/8, map_at_r, r_precision, nmi over all test images, in %). Retrieval is
leave-one-out (each test image queries all the others) or, for a manifest with query/gallery
rows, query-gallery (each query is ranked against the gallery only); metrics.json names the
protocol and the dataset.
"""
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from triplet import runs
from triplet.backbones import DEFAULT_BACKBONE, check_backbone
from triplet.cli import check, run
from triplet.data.prepare import (DataOptions, prepared_dir, query_mask, read_manifest, read_prepare_info,
                                  run_data_options)
from triplet.data.provenance import check_run_splits
from triplet.errors import UserError
from triplet.fileio import atomic_path, write_json


@dataclass
class Options(DataOptions):
    run: str = field(default="", metadata={"required": True, "help": "run folder (RUN_DIR) to evaluate and write into"})
    checkpoint: str = field(default="best", metadata={
        "help": "best, last, none (the untrained model the run started from, rebuilt from its seed: what training "
                "added), or a checkpoint path"})
    data_dir: str = field(default="", metadata={"help": "data folder (default: the one the run was trained on)"})
    batch_size: int = field(default=128, metadata={"help": "images per embedding batch"})
    workers: int = field(default=-1, metadata={"help": "DataLoader workers (-1: on a GPU, the cores less one, at most 16; on a CPU, 1 where the "
                                                          "compute threads leave a core free, else 0: images load between batches)"})
    device: str = field(default="auto", metadata={"choices": ["auto", "cpu", "cuda", "mps"], "help": "where to embed"})
    precision: str = field(default="auto", metadata={"choices": ["auto", "fp32", "bf16", "fp16"], "help": "autocast precision (auto: as train.py decides)"})
    seed: int = field(default=0, metadata={
        "help": "seed of the fixed test triplets; --checkpoint none on a folder without config.json: also the "
                "model's initialisation (as train.py --seed)"})
    backbone: str = field(default=DEFAULT_BACKBONE, metadata={"help": "--checkpoint none on a folder without config.json: trunk"})
    weights: str = field(default="imagenet", metadata={"help": "--checkpoint none on a folder without config.json: trunk weights"})
    embedding_dim: int = field(default=128, metadata={"help": "--checkpoint none on a folder without config.json: embedding size"})
    image_size: int = field(default=224, metadata={"help": "--checkpoint none on a folder without config.json: input size"})

    def __post_init__(self):
        check(self.run, "--run is required: the run folder to evaluate")
        check_backbone(self.backbone)
        check(self.batch_size >= 1, "--batch-size must be >= 1")
        check(self.seed >= 0, f"--seed {self.seed}: must be >= 0")
        check(self.split_seed >= 0, f"--split-seed {self.split_seed}: must be >= 0")
        check(self.workers >= -1, f"--workers {self.workers}: must be -1 (automatic), 0 or more")


def load_model(opts, run_dir):
    """Return (model, run options, info) for the requested checkpoint."""
    from triplet.checkpoint import checkpoint_options, model_from_checkpoint
    from triplet.model import build_seeded_model, check_input_size

    config_path = run_dir / "config.json"
    if opts.checkpoint == "none":
        if config_path.exists():
            options = runs.read_config(config_path)["options"]
        else:
            run_dir.mkdir(parents=True, exist_ok=True)
            options = dataclasses.asdict(opts) | {"data_dir": opts.data_dir or "data", "margin": 1.0}
        runs.require_options(options, ("backbone", "embedding_dim", "weights", "image_size"), config_path)
        check_input_size(options["backbone"], options["image_size"])
        # exactly the model train.py started from: same seed, same build
        model = build_seeded_model(options.get("seed", 0), options["backbone"], options["embedding_dim"],
                                   options["weights"], options["image_size"])
        return model.eval(), options, {"checkpoint": "none", "epoch": 0, "init_seed": options.get("seed", 0)}
    path = run_dir / f"checkpoint_{opts.checkpoint}.pt" if opts.checkpoint in ("best", "last") else Path(opts.checkpoint)
    model, checkpoint = model_from_checkpoint(path)
    options = runs.require_options(checkpoint_options(checkpoint, path), ("backbone", "embedding_dim", "image_size"), path)
    return model, options, {"checkpoint": str(path), "epoch": checkpoint["epoch"] + 1}


# Options that describe a new baseline folder (--checkpoint none, no config.json); a run already
# made is evaluated on the data and model it was made with.
BASELINE_OPTIONS = ("split", "val_fraction", "split_seed", "resize", "crop_bbox", "backbone", "weights", "embedding_dim",
                    "image_size")


def check_options_fit_the_run(opts, run_dir, options):
    """Refuse what would be silently ignored or mixed: a baseline option set against the run's own
    value, or a --checkpoint file of another run (its metrics would be written into this one)."""
    defaults = Options(run=opts.run)
    for name in BASELINE_OPTIONS:
        mine = getattr(opts, name)
        if mine != getattr(defaults, name) and options.get(name) != mine:
            raise UserError(f"--{name.replace('_', '-')} {mine}: {run_dir} was made with {options.get(name)!r}, and a "
                            f"run is evaluated on its own data and model; that option applies to a new baseline folder "
                            f"(--checkpoint none without config.json)")
    config_path = run_dir / "config.json"
    if opts.checkpoint in ("best", "last", "none") or not config_path.exists():
        return
    config = runs.read_config(config_path)
    # an option only one side knows was added to the suite between the two writes, not changed
    changed = [k for k in runs.recipe_differences(config["options"], options, config.get("option_roles", {}))
               if k != "data_dir" and k in config["options"] and k in options]
    if changed:
        detail = runs.describe_differences(config["options"], options, changed)
        raise UserError(f"--checkpoint {opts.checkpoint}: made by another run than {run_dir} ({detail}); its metrics "
                        f"would be written into this run: evaluate it with --run set to its own folder")


def main(opts):
    # torch and everything over it are imported here, not at the top, so that --help is instant
    import torch

    from triplet import engine, runtime
    from triplet.data.datasets import ImageDataset
    from triplet.data.transforms import EvalTransform

    run_dir = Path(opts.run)
    if opts.checkpoint != "none":
        runs.require_run_dir(run_dir, needs=None)
    model, options, info = load_model(opts, run_dir)
    check_options_fit_the_run(opts, run_dir, options)
    data = run_data_options(options, opts.data_dir)
    device = runtime.resolve_device(opts.device)
    precision = runtime.resolve_precision(opts.precision, device)
    workers = runtime.loader_workers(device, opts.workers)
    if not (run_dir / "config.json").exists():  # a new baseline folder: record how it was made
        runs.write_config(run_dir, {"options": options, "environment": runtime.environment(device, precision)})
    prepared = prepared_dir(data)
    if opts.checkpoint != "none":
        check_run_splits(run_dir, prepared, "evaluating it")
    paths, labels = read_manifest(prepared, "test")
    source, is_query = read_prepare_info(prepared), query_mask(prepared, paths)
    dataset = ImageDataset(paths, labels, EvalTransform(options["image_size"]))
    model.to(device, memory_format=torch.channels_last)
    print(f"embedding {len(paths)} test images of {prepared} on {device} ({precision}); protocol {source['protocol']}")
    embeddings, labels = engine.embed_dataset(model, dataset, device, precision, opts.batch_size, workers)
    untrained_beside_trained = opts.checkpoint == "none" and (run_dir / "checkpoint_best.pt").exists()
    suffix = "_untrained" if untrained_beside_trained else ""
    with atomic_path(run_dir / f"test_embeddings{suffix}.npz") as tmp:
        np.savez(tmp, embeddings=embeddings, labels=labels, paths=np.array(paths))
    if is_query is not None:
        unanswerable = int(np.isin(labels[is_query], labels[~is_query], invert=True).sum())
        if unanswerable:
            print(f"note: {unanswerable} of {int(is_query.sum())} queries have no image of their class in the gallery: "
                  f"Precision@k and Recall@k count them as misses, MAP@R and R-Precision leave them out")
    metrics = engine.evaluate_embeddings(embeddings, labels, options.get("margin", 1.0), opts.seed, is_query=is_query)
    result = {**{k: round(v, 4) for k, v in metrics.items()}, **info, "backbone": options["backbone"],
              "embedding_dim": options["embedding_dim"], "image_size": options["image_size"],
              "split": data.split, "num_images": int(len(labels)), "num_classes": int(len(set(labels.tolist()))),
              "seed": opts.seed, "precision": precision, "dataset": source["dataset"]["name"],
              "dataset_kind": source["dataset"]["kind"], "protocol": source["protocol"]}
    if is_query is not None:
        result |= {"num_queries": int(is_query.sum()), "num_gallery": int((~is_query).sum())}
    write_json(run_dir / f"metrics{suffix}.json", result)
    width = max(len(k) for k in metrics)
    for key, value in metrics.items():
        print(f"  {key:<{width}}  {value:8.4f}")
    print(f"wrote {run_dir / f'metrics{suffix}.json'}")


if __name__ == "__main__":
    run(main, Options, __doc__)
