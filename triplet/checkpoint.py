"""Checkpoints: one dict of plain types, written atomically, loaded with weights_only=True.

Keys: model, optimizer, epoch (last completed, 0-based), best_metric, model_args, config,
history (the rows of history.csv, so the CSV is always rebuilt consistent with the weights) and
rng (torch's CPU generator state).
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
