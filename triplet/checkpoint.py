"""Checkpoints: one dict of plain types, written atomically, loaded with weights_only=True.

Keys: model, optimizer, epoch (last completed, 0-based), best_metric, model_args, config,
history (the rows of history.csv, so the CSV is always rebuilt consistent with the weights) and
rng (torch's CPU generator state).
"""
import pickle
import re
from pathlib import Path

import torch

from triplet.errors import UserError
from triplet.fileio import atomic_path, disk_full_error

REQUIRED_KEYS = ("model", "epoch", "model_args")
RESUME_KEYS = ("optimizer", "best_metric")
# torch.save reports a failed write (a full disk, mostly) as a RuntimeError from its zip writer.
TORCH_WRITE_FAILURES = ("unexpected pos", "PytorchStreamWriter failed", "file write failed")


def _first_line(error):
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def save_checkpoint(path, checkpoint):
    """Write atomically: a failed write (disk full) leaves the previous checkpoint as it was."""
    try:
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)
    except RuntimeError as e:
        if any(failure in str(e) for failure in TORCH_WRITE_FAILURES):
            raise disk_full_error(path, f"torch.save: {_first_line(e)}") from e
        raise


def torch_load(path, label):
    """``torch.load(weights_only=True)``; a refused or damaged file is one line naming ``label``.

    A file holding arbitrary Python objects is refused, never loaded: running its pickle could
    run any code, so the advice is to save a plain state dict, not to lower the guard.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's text recommends weights_only=False; only its "WeightsUnpickler error" part is said here.
        reason = str(e).split("WeightsUnpickler error:", 1)[-1]
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", reason)
        if unsafe:
            raise UserError(f"{label}: refused: the file holds Python objects besides tensors ({unsafe.group(1)}), "
                            f"and loading them could run arbitrary code; save a plain state dict instead "
                            f"(torch.save(model.state_dict(), PATH))") from e
        raise UserError(f"{label}: not a readable checkpoint (UnpicklingError: {_first_line(reason)})") from e
    except Exception as e:
        raise UserError(f"{label}: not a readable checkpoint ({type(e).__name__}: {_first_line(e)})") from e


def load_checkpoint(path, required=REQUIRED_KEYS):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    checkpoint = torch_load(path, str(path))
    if not isinstance(checkpoint, dict) or any(k not in checkpoint for k in required):
        raise UserError(f"{path}: not a triplet checkpoint (needs the keys {', '.join(required)})")
    return checkpoint


def checkpoint_options(checkpoint, path):
    """The training options a checkpoint records; a checkpoint without them is named."""
    config = checkpoint.get("config")
    options = config.get("options") if isinstance(config, dict) else None
    if not isinstance(options, dict):
        raise UserError(f"{path}: holds no training config (config.options); it was not written by "
                        f"scripts/train.py, so its data and input size are unknown")
    return options


def load_model_state(model, state, source):
    """Load weights, turning a backbone or embedding-size mismatch into a clear error."""
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise UserError(f"{source}: weights do not fit this model (another backbone or embedding "
                        f"size?): {_first_line(e)}") from e


def model_from_checkpoint(path):
    """Rebuild the EmbeddingNet a checkpoint was trained as; return (model, checkpoint)."""
    from triplet.model import EmbeddingNet  # here: model.py imports torch_load from this module

    checkpoint = load_checkpoint(path)
    if not isinstance(checkpoint["model_args"], dict):
        raise UserError(f"{path}: model_args is not a dict; not a triplet checkpoint")
    try:
        model = EmbeddingNet(**checkpoint["model_args"])
    except TypeError as e:
        raise UserError(f"{path}: model_args {checkpoint['model_args']!r} do not describe an EmbeddingNet") from e
    load_model_state(model, checkpoint["model"], path)
    return model.eval(), checkpoint
