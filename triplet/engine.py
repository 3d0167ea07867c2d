"""The training step, embedding and evaluation: device, precision and loaders chosen once here.

On CUDA and on CPUs with native bf16 (AVX-512 bf16 or AMX), bf16 autocast with channels_last
is the default (``--precision auto``; reported at 2.7x the fp32 training throughput on a 2-core
AVX-512-bf16 EPYC). On CPUs without it (AVX2 only), bf16 is emulated and 2.6-9x *slower*
than fp32, so auto keeps fp32 there.
"""
import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from triplet import distributed as dist
from triplet.data.datasets import fixed_triplets
from triplet.errors import UserError
from triplet.runtime import autocast
from triplet.losses import triplet_loss
from triplet.metrics import retrieval_metrics, triplet_metrics


def _seed_worker(worker_id):
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(dataset, device, workers, batch_size=None, batch_sampler=None, shuffle=False,
                sampler=None, seed=0, drop_last=False, pin_memory=True):
    generator = torch.Generator().manual_seed(seed)
    batching = ({"batch_sampler": batch_sampler} if batch_sampler is not None else
                {"batch_size": batch_size, "shuffle": shuffle and sampler is None, "sampler": sampler,
                 "drop_last": drop_last})
    return DataLoader(dataset, **batching, num_workers=workers, pin_memory=pin_memory and device.type == "cuda",
                      prefetch_factor=4 if workers > 0 else None, worker_init_fn=_seed_worker,
                      generator=generator)


def to_device(images, device):
    return images.to(device, non_blocking=True, memory_format=torch.channels_last)


class NonFiniteLoss(UserError):
    pass


def train_one_epoch(model, loader, optimizer, device, precision, margin, miner=None, epoch=0,
                    progress=True):
    """One pass; returns mean loss and mean active (non-zero-loss) triplets per step.

    Offline triplets run one forward over the concatenated anchor/positive/negative batch rather
    than three: BatchNorm then normalises all three with the same batch statistics (as in the
    PK-batch path, where anchors, positives and negatives share one batch) and its running
    statistics are updated once per step, not three times. That is the reason; speed is not:
    on the 2-core AVX2 CPU three forwards of 32 were 4 % faster than one of 96 (8.30 against
    8.67 s per ResNet18 step, channels_last, steps interleaved), and a GPU prefers one batch.
    """
    from tqdm import tqdm

    model.train()
    total_loss, total_active, steps = 0.0, 0, 0
    bar = tqdm(loader, desc=f"epoch {epoch + 1}", leave=False, disable=not (progress and dist.is_main()),
               dynamic_ncols=True)
    for step, batch in enumerate(bar):
        if miner is None:
            anchors, positives, negatives, _ = batch
            images = to_device(torch.cat([anchors, positives, negatives]), device)
            n = len(anchors)
            a = torch.arange(n, device=device)
            p, neg = a + n, a + 2 * n
        else:
            images, labels = batch
            images = to_device(images, device)
        with autocast(device, precision):
            embeddings = model(images).float()
        if miner is not None:
            a, p, neg = miner(embeddings.detach(), labels.to(device))
        loss, active = triplet_loss(embeddings, a, p, neg, margin)
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"the loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}; "
                                f"lower --lr. checkpoint_last.pt still holds the last good epoch")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += loss.item()
        total_active += active
        steps += 1
        bar.set_postfix(loss=f"{total_loss / steps:.4f}", active=active)
    totals = dist.all_reduce_sum([total_loss, float(total_active), float(steps)])
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
