"""The training step, embedding and evaluation over the loaders built here.

Every training step is embed -> mine -> loss: offline triplets arrive as one batch of
[anchors, positives, negatives] mined by ``packaged_triplets``, PK batches by an online miner.
One forward over the whole batch, not three: BatchNorm then normalises anchors, positives and
negatives with the same batch statistics (as in PK batches) and updates its running statistics
once per step.
Images travel from the workers as uint8 and become normalised channels_last floats on the
device (``to_device``), a quarter of the bytes a float32 batch would pin and copy.
"""
import random
from functools import lru_cache

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from triplet import distributed as dist
from triplet.data.datasets import fixed_triplets
from triplet.deploy.preprocess import IMAGENET_MEAN, IMAGENET_STD
from triplet.errors import UserError
from triplet.losses import triplet_loss
from triplet.metrics import retrieval_metrics, triplet_metrics
from triplet.runtime import autocast, host_to_device

# Steps between the host's looks at the running loss: in between it only queues work.
SYNC_EVERY = 50
PREFETCH_FACTOR = 4  # batches each loader worker keeps ready


def _seed_worker(worker_id):
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(dataset, device, workers, batch_size=None, batch_sampler=None, seed=0, pin_memory=True,
                persistent=False):
    """A DataLoader as every script uses it; ``persistent`` keeps the workers between epochs
    (training: its sampler plans each epoch in the main process)."""
    generator = torch.Generator().manual_seed(seed)
    batching = {"batch_sampler": batch_sampler} if batch_sampler is not None else {"batch_size": batch_size}
    return DataLoader(dataset, **batching, num_workers=workers, pin_memory=pin_memory and device.type == "cuda",
                      prefetch_factor=PREFETCH_FACTOR if workers > 0 else None, persistent_workers=persistent and workers > 0,
                      worker_init_fn=_seed_worker, generator=generator)


@lru_cache(maxsize=None)
def _normalisation(device):
    """ImageNet mean and std as device tensors, made once: a list turned into a CUDA tensor on
    every step would be a host-to-device copy that waits for the queue."""
    shape = (1, 3, 1, 1)
    return (torch.tensor(IMAGENET_MEAN, device=device).view(shape),
            torch.tensor(IMAGENET_STD, device=device).view(shape))


def to_device(images, device):
    """A batch on ``device`` in channels_last; uint8 (training) is normalised there, as
    transforms v2's ToDtype(scale=True) + Normalize would (the same operations, bit for bit)."""
    images = host_to_device(images, device).contiguous(memory_format=torch.channels_last)
    if images.dtype != torch.uint8:
        return images
    mean, std = _normalisation(device)
    return images.to(torch.float32).mul_(1.0 / 255).sub_(mean).div_(std)


class NonFiniteLoss(UserError):
    pass


def _read_at_sync_point(losses, active, first_step, epoch):
    """The losses since the last look and the running active-triplet count, in one host read;
    raise naming the first non-finite loss. Returns (sum of those losses, active count)."""
    values = torch.stack([*losses, active.to(losses[0].dtype)]).cpu()
    values, active_count = values[:-1], float(values[-1])
    bad = torch.nonzero(~torch.isfinite(values)).flatten()
    if len(bad):
        step = first_step + int(bad[0])
        raise NonFiniteLoss(f"the loss became {values[bad[0]].item()} at epoch {epoch + 1}, step {step + 1}; "
                            f"lower --lr")
    return float(values.sum()), active_count


def train_one_epoch(model, loader, optimizer, device, precision, margin, miner, epoch=0, progress=True,
                    scaler=None, prepare=to_device, sync_every=SYNC_EVERY):
    """One pass; returns mean loss and mean active (non-zero-loss) triplets per step.

    ``prepare(images, device)`` turns a loader batch into the model's input (``to_device``, or
    the ``--gpu-cache`` augmenter). The host waits for the device only every ``sync_every`` steps
    and at the end, where it checks the losses since the last look: a non-finite loss stops the
    run naming its epoch and step. ``scaler``: fp16's GradScaler (None: no scaling).
    """
    from tqdm import tqdm

    model.train()
    pending, first_pending = [], 0
    total_loss, total_active, steps = 0.0, 0.0, 0
    active_sum = torch.zeros((), dtype=torch.int64, device=device)  # stays on the device between sync points
    bar = tqdm(loader, desc=f"epoch {epoch + 1}", leave=False, disable=not (progress and dist.is_main()),
               dynamic_ncols=True)
    for step, (images, labels) in enumerate(bar):
        images = prepare(images, device)
        with autocast(device, precision):
            embeddings = model(images).float()
        a, p, n = miner(embeddings.detach(), host_to_device(labels, device))
        loss, active = triplet_loss(embeddings, a, p, n, margin)
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        pending.append(loss.detach())
        active_sum += active
        steps += 1
        if len(pending) == sync_every:
            losses, total_active = _read_at_sync_point(pending, active_sum, first_pending, epoch)
            total_loss += losses
            pending, first_pending = [], step + 1
            bar.set_postfix(loss=f"{total_loss / steps:.4f}")
    if pending:  # the last read also brings the active count, so an epoch waits ceil(steps / sync_every) times
        losses, total_active = _read_at_sync_point(pending, active_sum, first_pending, epoch)
        total_loss += losses
    totals = dist.all_reduce_sum([total_loss, total_active, float(steps)])
    return {"train_loss": totals[0] / max(totals[2], 1), "active_triplets": totals[1] / max(totals[2], 1)}


@torch.inference_mode()
def embed(model, loader, device, precision):
    """Embed every image of ``loader`` once; returns float32 embeddings and labels as NumPy."""
    model.eval()
    outputs, labels = [], []
    for images, batch_labels in loader:
        with autocast(device, precision):
            outputs.append(model(to_device(images, device)).float().cpu())
        labels.append(torch.as_tensor(batch_labels))
    return torch.cat(outputs).numpy(), torch.cat(labels).numpy()


def evaluate_embeddings(embeddings, labels, margin=1.0, seed=0, with_nmi=True, is_query=None):
    """The study's triplet metrics on fixed triplets plus retrieval metrics, from one embedding pass.

    ``is_query``: the query-gallery protocol's query rows (``retrieval_metrics``); triplets are
    drawn from all rows either way."""
    a, p, n = fixed_triplets(labels, seed)
    result = triplet_metrics(embeddings[a], embeddings[p], embeddings[n], margin)
    result.update(retrieval_metrics(embeddings, labels, with_nmi=with_nmi, is_query=is_query))
    return result


def embed_dataset(model, dataset, device, precision, batch_size=128, workers=0):
    """Embed a dataset once, each DDP rank a strided shard, gathered back in dataset order."""
    indices = list(range(dist.rank(), len(dataset), dist.world_size()))
    loader = make_loader(Subset(dataset, indices), device, workers, batch_size=batch_size)
    embeddings, labels = embed(model, loader, device, precision)
    parts = dist.all_gather_object((indices, embeddings, labels))
    order = np.argsort(np.concatenate([p[0] for p in parts]), kind="stable")
    return np.concatenate([p[1] for p in parts])[order], np.concatenate([p[2] for p in parts])[order]
