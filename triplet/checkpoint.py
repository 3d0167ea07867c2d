"""Checkpoints: one dict of plain types, written atomically, loaded with weights_only=True.

Keys: model, optimizer, epoch (last completed, 0-based), best_metric, model_args, config,
history (the rows of history.csv, so the CSV is always rebuilt consistent with the weights) and,
for fp16 runs, scaler (the GradScaler's state). No generator state: everything random in an epoch
is drawn from (seed, epoch), so a resumed run repeats the uninterrupted one without it.
"""
from pathlib import Path

import torch

from triplet.errors import UserError
from triplet.fileio import atomic_path
from triplet.model import EmbeddingNet

REQUIRED_KEYS = ("model", "epoch", "model_args")


def save_checkpoint(path, checkpoint):
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)


def load_checkpoint(path):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path}: not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})") from e
    if not isinstance(checkpoint, dict) or any(k not in checkpoint for k in REQUIRED_KEYS):
        raise UserError(f"{path}: not a triplet checkpoint (needs the keys {', '.join(REQUIRED_KEYS)})")
    return checkpoint


def load_model_state(model, state, source):
    """Load weights, turning a backbone or embedding-size mismatch into a clear error."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"{source}: weights do not fit this model (another backbone or embedding "
                        f"size?): {str(e).splitlines()[0]}") from e


def model_from_checkpoint(path):
    """Rebuild the EmbeddingNet a checkpoint was trained as; return (model, checkpoint)."""
    checkpoint = load_checkpoint(path)
    model = EmbeddingNet(**checkpoint["model_args"])
    load_model_state(model, checkpoint["model"], path)
    return model.eval(), checkpoint


def prepare_training(model, device, lr, weight_decay=0.0, checkpoint=None, source="checkpoint", scaler=None):
    """Put ``model`` on its device and memory format, then build Adam and load the saved states.

    The order matters: ``Optimizer.load_state_dict`` moves the saved state to its parameters'
    device and dtype *when it loads*, so a model moved afterwards (to CUDA, say) would leave
    Adam's moments behind and its first step would mix devices (torchvision's reference and
    nanoGPT use this order too). Returns the optimizer.
    """
    model.to(device, memory_format=torch.channels_last)
    if checkpoint is not None:
        load_model_state(model, checkpoint["model"], source)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        if scaler is not None and checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
    return optimizer


def check_world_size(checkpoint, world_size, source):
    """Refuse to resume with another number of processes: the global batch (processes x
    --batch-size) and each rank's share of every epoch would change, so the run could no longer
    match an uninterrupted one."""
    saved = checkpoint.get("config", {}).get("environment", {}).get("world_size", 1)
    if saved != world_size:
        raise UserError(f"{source}: trained by {saved} process(es), resumed with {world_size}; the global batch "
                        f"is processes x --batch-size, so resume with torchrun --nproc_per_node {saved}"
                        f"{'' if saved > 1 else ' (or without torchrun)'}, or start a new --out")
