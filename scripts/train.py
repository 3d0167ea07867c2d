"""Train a triplet-loss embedding (ResNet18/34 or any torchvision trunk) on a prepared split.

    python scripts/train.py --backbone resnet18 --epochs 20 --lr 0.001 --batch-size 32 --out results/exp1-resnet18
    python scripts/train.py --mining hard --batch-size 64 --samples-per-class 4 --out results/exp7-resnet18
    python scripts/train.py --out results/exp1-resnet18 --resume          # continue an interrupted run
    torchrun --nproc_per_node 4 scripts/train.py ...                      # DDP, one process per GPU

Writes RUN_DIR/config.json, history.csv (one row per epoch), checkpoint_last.pt (every epoch)
and checkpoint_best.pt (best validation Precision@1).
"""
import dataclasses
import math
import shlex
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from triplet import runs
from triplet.backbones import DEFAULT_BACKBONE, HELP as BACKBONE_HELP, check_backbone
from triplet.cli import check, plural, run
from triplet.data.prepare import DataOptions, prepared_dir, read_manifest, read_prepare_info
from triplet.data.provenance import check_run_splits, training_digests
from triplet.deploy.preprocess import resize_size_for
from triplet.errors import UserError
from triplet.machine import allocator_tip


@dataclass
class Options(DataOptions):
    backbone: str = field(default=DEFAULT_BACKBONE, metadata={"help": BACKBONE_HELP})
    weights: str = field(default="imagenet", metadata={
        "help": "trunk initialisation: imagenet (torchvision's default weights for the backbone; IMAGENET1K_V1 "
                "for ResNet18/34), none (random), or a state-dict path"})
    embedding_dim: int = field(default=128, metadata={"help": "size of the L2-normalised embedding"})
    epochs: int = field(default=20, metadata={"role": "extendable", "help": "number of epochs"})
    lr: float = field(default=0.001, metadata={"help": "Adam learning rate"})
    batch_size: int = field(default=32, metadata={
        "help": "triplets per step (--mining none) or images per PK batch (P x K, online mining)"})
    weight_decay: float = field(default=0.0, metadata={"help": "Adam weight decay"})
    scheduler: str = field(default="none", metadata={"choices": ["none", "cosine"], "help": "learning-rate schedule over the epochs"})
    margin: float = field(default=1.0, metadata={"help": "triplet margin (on L2-normalised embeddings)"})
    mining: str = field(default="none", metadata={
        "choices": ["none", "semihard", "hard"],
        "help": "none: the study's offline random triplets; semihard / hard (batch-hard): online mining in PK batches"})
    samples_per_class: int = field(default=4, metadata={"help": "K of the PK batches (online mining)"})
    image_size: int = field(default=224, metadata={"help": "input size; evaluation resizes to size*256/224 and centre-crops"})
    crop_scale: float = field(default=0.08, metadata={
        "help": "smallest training crop, as a fraction of the image's area (RandomResizedCrop; torchvision's "
                "default 0.08). Raise it (0.3-0.5) when the object is small or must stay whole"})
    workers: int = field(default=-1, metadata={"role": "runtime",
        "help": "DataLoader workers per process (-1: on a GPU, the cores this machine gives each process, less one, at most 16; "
                "on a CPU, 1 where the compute threads leave a core free, else 0: batches load between steps. "
                "From 8 cores up a CPU run keeps one core for its worker; OMP_NUM_THREADS, when set, decides instead)"})
    eval_batch_size: int = field(default=128, metadata={"role": "runtime", "help": "images per batch when embedding for validation"})
    device: str = field(default="auto", metadata={"role": "runtime", "choices": ["auto", "cpu", "cuda", "mps"], "help": "auto: cuda, then mps, then cpu"})
    precision: str = field(default="auto", metadata={"role": "runtime",
        "choices": ["auto", "fp32", "bf16", "fp16"],
        "help": "auto: bf16 autocast where the hardware has native bf16 (recent CUDA GPUs, AVX-512-bf16/AMX/Arm-BF16 "
                "CPUs), fp16 with loss scaling on older CUDA GPUs, else fp32; the choice and why go to config.json"})
    compile: bool = field(default=False, metadata={"role": "runtime", "help": "torch.compile the model (pays on GPUs; slower on small CPUs)"})
    seed: int = field(default=0, metadata={"help": "seed of initialisation, triplets, batches and augmentation"})
    deterministic: bool = field(default=False, metadata={"help": "torch.use_deterministic_algorithms (CUDA users; CPU runs are already reproducible)"})
    out: str = field(default="results/run", metadata={"role": "runtime", "help": "run folder (RUN_DIR)"})
    resume: bool = field(default=False, metadata={"role": "runtime", "help": "continue from RUN_DIR/checkpoint_last.pt (starts fresh when there is none)"})
    force: bool = field(default=False, metadata={"role": "runtime", "help":
        "replace the run RUN_DIR holds: once the new run is about to write, its files move to RUN_DIR/replaced-<time>/"})
    gpu_cache: bool = field(default=False, metadata={"role": "runtime",
        "help": "decode the training images once, keep them (uint8) on the device and augment whole batches there "
                "(training then needs no loader workers; validation keeps them)"})
    progress: bool = field(default=True, metadata={"role": "runtime", "help": "hide the per-epoch progress bar (for logs and CI)"})

    def __post_init__(self):
        check_backbone(self.backbone)
        check(self.lr > 0, f"--lr {self.lr}: must be > 0")
        check(self.epochs >= 1, f"--epochs {self.epochs}: must be >= 1")
        check(self.batch_size >= 2, f"--batch-size {self.batch_size}: must be >= 2")
        check(self.embedding_dim >= 1, f"--embedding-dim {self.embedding_dim}: must be >= 1")
        check(self.margin > 0, f"--margin {self.margin}: must be > 0")
        check(self.image_size >= 16, f"--image-size {self.image_size}: must be >= 16")
        check(self.workers >= -1, f"--workers {self.workers}: must be -1 (automatic), 0 or more")
        check(0 < self.crop_scale <= 1, f"--crop-scale {self.crop_scale}: must be in (0, 1]")
        check(math.isfinite(self.weight_decay) and self.weight_decay >= 0,
              f"--weight-decay {self.weight_decay}: must be >= 0")
        check(self.eval_batch_size >= 1, f"--eval-batch-size {self.eval_batch_size}: must be >= 1")
        check(self.seed >= 0, f"--seed {self.seed}: must be >= 0")
        check(self.split_seed >= 0, f"--split-seed {self.split_seed}: must be >= 0")
        check(self.mining == "none" or self.samples_per_class >= 2,
              f"--samples-per-class {self.samples_per_class}: must be >= 2 (each anchor needs a positive in its batch)")
        check(self.mining == "none" or self.batch_size % self.samples_per_class == 0,
              f"--batch-size {self.batch_size} must be a multiple of --samples-per-class {self.samples_per_class}")
        check(not (self.resume and self.force), "--resume and --force contradict each other; pick one")


def make_train_loader(opts, paths, labels, device, workers):
    """Offline triplets or PK batches, planned per epoch by a sampler; returns the loader, the
    sampler and the step that turns a batch into model input on the device."""
    from triplet import distributed as dist
    from triplet import engine
    from triplet.data.datasets import ImageDataset
    from triplet.data.gpu_cache import GpuCache, KeyDataset
    from triplet.data.samplers import PKSampler, TripletBatchSampler
    from triplet.data.transforms import TrainTransform

    shard = {"seed": opts.seed, "rank": dist.rank(), "world_size": dist.world_size()}
    sampler = (TripletBatchSampler(labels, opts.batch_size, **shard) if opts.mining == "none" else
               PKSampler(labels, opts.batch_size // opts.samples_per_class, opts.samples_per_class, **shard))
    if opts.gpu_cache:
        dataset, prepare = KeyDataset(labels), GpuCache(paths, opts.image_size, device, opts.crop_scale,
                                                         opts.progress and dist.is_main())
    else:
        dataset, prepare = ImageDataset(paths, labels, TrainTransform(opts.image_size, opts.crop_scale)), engine.to_device
    loader = engine.make_loader(dataset, device, workers, batch_sampler=sampler, seed=opts.seed,
                                pin_memory=not opts.gpu_cache, persistent=True)
    return loader, sampler, prepare


def history_row(epoch, stats, val, lr, seconds):
    """A history.csv row as a plain dict (checkpoints hold plain types); NaN where not measured."""
    nan = float("nan")
    return dataclasses.asdict(runs.HistoryRow(
        epoch=epoch, train_loss=round(stats.get("train_loss", nan), 6),
        active_triplets=round(stats.get("active_triplets", nan), 2), val_loss=round(val.get("loss", nan), 6),
        val_triplet_accuracy=round(val.get("triplet_accuracy", nan), 4),
        val_precision_at_1=round(val.get("precision_at_1", nan), 4), lr=lr, seconds=round(seconds, 1)))


def format_row(row, epochs, improved):
    return (f"epoch {row['epoch']}/{epochs}  train_loss {row['train_loss']:.4f}  val_loss {row['val_loss']:.4f}  "
            f"val_acc {row['val_triplet_accuracy']:.2f}%  val_P@1 {row['val_precision_at_1']:.2f}%  "
            f"active {row['active_triplets']:.1f}  {row['seconds']:.1f}s{'  *best*' if improved else ''}")


def main(opts):
    # torch and everything over it are imported here, not at the top, so that --help is instant
    import torch

    from triplet import distributed as dist
    from triplet import engine, runtime
    from triplet.checkpoint import (REQUIRED_KEYS, RESUME_KEYS, check_world_size, load_checkpoint,
                                    prepare_training, save_checkpoint)
    from triplet.data.datasets import ImageDataset, check_triplet_ready
    from triplet.data.transforms import EvalTransform
    from triplet.mining import get_miner
    from triplet.model import build_seeded_model, check_input_size
    from triplet.seeding import seed_everything

    device = runtime.resolve_device(opts.device)  # first: the DDP backend follows the device
    dist.init_distributed(device)
    precision, precision_reason = runtime.choose_precision(opts.precision, device)
    workers = runtime.loader_workers(device, opts.workers)  # sets the CPU threads config.json records
    seed_everything(opts.seed, deterministic=opts.deterministic)
    if device.type == "cuda" and not opts.deterministic:
        torch.backends.cudnn.benchmark = True
    log = print if dist.is_main() else (lambda *a, **k: None)
    run_dir = Path(opts.out)
    config = runs.make_config(opts, device, precision, dist.world_size(), precision_reason)
    decision, lock = None, None
    if dist.is_main():  # only rank 0 locks and touches the folder; every rank then follows its decision
        try:
            lock = runs.lock_run_dir(run_dir)  # held until this process ends
            decision = ("ok", runs.claim_run_dir(run_dir, config, opts.resume, opts.force, runs.option_defaults(opts)))
        except UserError as e:
            decision = ("error", str(e))
    decision = dist.broadcast_object(decision)
    if decision[0] == "error":
        raise UserError(decision[1])
    resume_from = decision[1]

    prepared = prepared_dir(opts)
    if resume_from:  # before anything is built: --gpu-cache would decode the whole training split first
        check_run_splits(run_dir, prepared, "resuming it")
    train_paths, train_labels = read_manifest(prepared, "train")
    val_paths, val_labels = read_manifest(prepared, "val")
    check_triplet_ready(train_labels, f"training split of {prepared}")
    train_loader, sampler, prepare = make_train_loader(opts, train_paths, train_labels, device,
                                                       0 if opts.gpu_cache else workers)
    if len(train_loader) == 0:
        raise UserError(f"--batch-size {opts.batch_size}: larger than the {len(train_paths)} training "
                             f"images of {prepared} allow for one step")
    val_set = ImageDataset(val_paths, val_labels, EvalTransform(opts.image_size))
    miner = get_miner(opts.mining, opts.margin)

    check_input_size(opts.backbone, opts.image_size)
    model = build_seeded_model(opts.seed, opts.backbone, opts.embedding_dim, opts.weights, opts.image_size)
    model_args = {"backbone": opts.backbone, "embedding_dim": opts.embedding_dim, "image_size": opts.image_size}
    checkpoint = load_checkpoint(resume_from, REQUIRED_KEYS + RESUME_KEYS) if resume_from else None
    scaler = runtime.grad_scaler(device, precision)
    optimizer = prepare_training(model, device, opts.lr, opts.weight_decay, checkpoint, resume_from, scaler)
    start_epoch, best_metric, history = 0, float("-inf"), []
    if checkpoint:
        start_epoch, best_metric = checkpoint["epoch"] + 1, checkpoint["best_metric"]
        history = [row for row in checkpoint.get("history", []) if row["epoch"] <= start_epoch]
    if start_epoch >= opts.epochs:
        if dist.is_main():  # the checkpoint's history is the run's: a damaged or deleted history.csv comes back
            runs.write_history(run_dir, history)
        log(f"{run_dir}: already trained for {plural(start_epoch, 'epoch')}; nothing to do")
        return
    if checkpoint:
        check_world_size(checkpoint, dist.world_size(), resume_from)
        restored = scaler is not None and checkpoint.get("scaler")
        scale = f"; fp16 loss scale {scaler.get_scale():g} restored" if restored else ""
        log(f"resuming {run_dir} after epoch {start_epoch} of {opts.epochs}{scale}")
    net = model
    if dist.is_distributed():
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if opts.compile:
        net = runtime.compile_model(net, device)
    config["dataset"] = {**read_prepare_info(prepared)["dataset"], "splits": training_digests(prepared)}
    if dist.is_main():  # the first write: everything above was checked, so --force replaces only now
        if opts.force:
            runs.set_aside_old_run(run_dir, log)
        runs.write_config(run_dir, config)
    small = sum(n < opts.samples_per_class for n in Counter(train_labels).values()) if opts.mining != "none" else 0
    if small:
        log(f"note: {plural(small, 'class', 'classes')} of {len(set(train_labels))} {'has' if small == 1 else 'have'} "
            f"fewer training images than --samples-per-class {opts.samples_per_class}: their PK groups repeat "
            f"images (differently augmented)")
    if opts.image_size > opts.resize:
        log(f"note: --image-size {opts.image_size} crops come from images prepared at short side {opts.resize} "
            f"(--resize): they are upscaled, so the model sees no more detail than {opts.resize} px holds; "
            f"prepare with --resize {max(256, resize_size_for(opts.image_size))} for full detail")
    tip = allocator_tip() if device.type == "cpu" else None
    if tip:
        log(tip)
    log(f"training {opts.backbone} on {device} ({precision}: {precision_reason}), {len(train_paths)} train / {len(val_paths)} val "
        f"images, {len(train_loader)} steps per epoch, mining={opts.mining}, workers={workers}"
        + (" (batches load between steps)" if workers == 0 and not opts.gpu_cache else "")
        + (f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""))

    def validate():
        if not val_paths:
            return {}
        dist.broadcast_buffers(model)  # every rank embeds its shard with the model rank 0 saves
        embeddings, labels = engine.embed_dataset(model, val_set, device, precision, opts.eval_batch_size, workers)
        return engine.evaluate_embeddings(embeddings, labels, opts.margin, opts.seed, with_nmi=False) if dist.is_main() else {}

    if start_epoch == 0 and val_paths:  # epoch 0: the untrained model, so the curves show what training added
        val = validate()
        history = [history_row(0, {}, val, opts.lr, 0.0)]
        log(format_row(history[0], opts.epochs, False))

    for epoch in range(start_epoch, opts.epochs):
        # Everything random in an epoch is a function of (seed, epoch): a resumed run repeats it.
        torch.manual_seed(opts.seed * 1000 + epoch)
        sampler.set_epoch(epoch)
        lr = opts.lr * 0.5 * (1 + math.cos(math.pi * epoch / opts.epochs)) if opts.scheduler == "cosine" else opts.lr
        for group in optimizer.param_groups:
            group["lr"] = lr
        start = time.perf_counter()
        try:
            stats = engine.train_one_epoch(net, train_loader, optimizer, device, precision, opts.margin, miner,
                                           epoch, opts.progress, scaler, prepare)
        except engine.NonFiniteLoss as e:  # a resume with another --lr is refused, so: a fresh run
            kept = (f"checkpoint_last.pt keeps epoch {epoch}, the last good one"
                    if epoch > 0 else "no epoch finished, so no checkpoint was written")
            raise engine.NonFiniteLoss(f"{e} and train again with --force (or another --out); {kept}") from e
        val = validate()
        row = history_row(epoch + 1, stats, val, lr, time.perf_counter() - start)
        history.append(row)
        if dist.is_main():
            metric = row["val_precision_at_1"] if val_paths else -row["train_loss"]
            improved = metric > best_metric
            best_metric = max(best_metric, metric)
            checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                          "best_metric": best_metric, "model_args": model_args, "config": config,
                          "history": history, **({"scaler": scaler.state_dict()} if scaler else {})}
            if improved:
                save_checkpoint(run_dir / "checkpoint_best.pt", checkpoint)
            save_checkpoint(run_dir / "checkpoint_last.pt", checkpoint)
            runs.write_history(run_dir, history)
            log(format_row(row, opts.epochs, improved))
        dist.barrier()
    log(f"done: {run_dir}/checkpoint_best.pt; next: python scripts/evaluate.py --run {shlex.quote(str(run_dir))}")


def resume_command(opts, processes=1):
    """The line that resumes this run, ready to paste: every option that differs from its default
    (the run refuses a resume with other options), then --resume."""
    defaults, args = Options(), []
    for f in dataclasses.fields(opts):
        value = getattr(opts, f.name)
        if f.name in ("out", "resume", "force") or value == getattr(defaults, f.name):
            continue
        flag = f.name.replace("_", "-")
        args += [f"--{flag}" if value is True else f"--no-{flag}"] if isinstance(value, bool) else [f"--{flag}", str(value)]
    launcher = ["python"] if processes == 1 else ["torchrun", "--nproc_per_node", str(processes)]
    return shlex.join([*launcher, "scripts/train.py", *args, "--out", str(opts.out), "--resume"])


def interrupted_main(opts):
    from triplet import distributed as dist
    from triplet.fileio import DiskFull

    try:
        main(opts)
    except DiskFull as e:  # the run folder holds a run now: "run the command again" would be refused
        if not (Path(opts.out) / "config.json").exists():
            raise
        command = resume_command(opts, dist.world_size())
        raise DiskFull(str(e).replace("run the command again", f"resume with: {command}")) from e
    except KeyboardInterrupt:
        if dist.is_main():
            print(f"\ninterrupted; {opts.out}/checkpoint_last.pt holds the last completed epoch. Resume with:\n"
                  f"  {resume_command(opts, dist.world_size())}")
        raise
    finally:
        dist.cleanup()


if __name__ == "__main__":
    run(interrupted_main, Options, __doc__)
