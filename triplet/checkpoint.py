"""Checkpoints: one dict of plain types, written atomically, loaded with weights_only=True.

Keys: model, optimizer, epoch (last completed, 0-based), best_metric, model_args, config,
history (the rows of history.csv, so the CSV is always rebuilt consistent with the weights) and,
for fp16 runs, scaler (the GradScaler's state). No generator state: everything random in an epoch
is drawn from (seed, epoch), so a resumed run repeats the uninterrupted one without it.
"""
import pickle
import re
from pathlib import Path

import torch

from triplet.errors import UserError, first_line
from triplet.fileio import atomic_path, disk_full_error

REQUIRED_KEYS = ("model", "epoch", "model_args")
RESUME_KEYS = ("optimizer", "best_metric")
# torch.save reports a failed write (a full disk, mostly) as a RuntimeError from its zip writer.
TORCH_WRITE_FAILURES = ("unexpected pos", "PytorchStreamWriter failed", "file write failed")


def save_checkpoint(path, checkpoint):
    """Write atomically: a failed write (disk full) leaves the previous checkpoint as it was."""
    try:
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)
    except RuntimeError as e:
        if any(failure in str(e) for failure in TORCH_WRITE_FAILURES):
            raise disk_full_error(path, f"torch.save: {first_line(e)}") from e
        raise


def torch_load(path, label, if_damaged=""):
    """``torch.load(weights_only=True)``; a refused or damaged file is one line naming ``label``
    (``if_damaged``: what to do about a damaged one, appended to its message).

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
        raise UserError(f"{label}: not a readable checkpoint (UnpicklingError: {first_line(reason)}){if_damaged}") from e
    except Exception as e:
        raise UserError(f"{label}: not a readable checkpoint ({type(e).__name__}: {first_line(e)}){if_damaged}") from e


def load_checkpoint(path, required=REQUIRED_KEYS):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    checkpoint = torch_load(path, str(path), if_damaged="; it may be cut short (a full disk, an interrupted copy): "
                                                        "copy it again, or train again with --force (or another --out)")
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
                        f"size?): {first_line(e)}") from e


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


def make_optimizer(model, device, lr, weight_decay=0.0, fused=None):
    """Adam as every training path builds it: fused on CUDA (``fused`` None: by device), as nanoGPT
    does. One kernel updates every parameter, and fp16's GradScaler hands it its inf check as a
    device tensor; a foreach Adam makes the scaler read that check on the host, a wait every step."""
    fused = device.type == "cuda" if fused is None else fused
    return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay, fused=fused or None)


def _keep_own_implementation(optimizer, fused):
    """``Optimizer.load_state_dict`` takes every hyper-parameter from the checkpoint, ``fused``
    included, so a run resumed on another device, or from a checkpoint of before fused Adam, would
    step with the saved implementation while GradScaler follows the built one (a foreach step
    handed the scaler's inf check fails). Keep this process's choice, with Adam's step counters
    where that implementation keeps them: float32 on the parameter's device when fused, else on
    the CPU."""
    for group in optimizer.param_groups:
        group["fused"] = fused or None
        for parameter in group["params"]:
            step = optimizer.state.get(parameter, {}).get("step")
            if torch.is_tensor(step):
                optimizer.state[parameter]["step"] = step.to(device=parameter.device if fused else "cpu", dtype=torch.float32)


def prepare_training(model, device, lr, weight_decay=0.0, checkpoint=None, source="checkpoint", scaler=None,
                     fused=None):
    """Put ``model`` on its device and memory format, then build Adam and load the saved states.

    The order matters: ``Optimizer.load_state_dict`` moves the saved state to its parameters'
    device and dtype *when it loads*, so a model moved afterwards (to CUDA, say) would leave
    Adam's moments behind and its first step would mix devices (torchvision's reference and
    nanoGPT use this order too). ``fused``: ``make_optimizer``'s. Returns the optimizer.
    """
    model.to(device, memory_format=torch.channels_last)
    if checkpoint is not None:
        load_model_state(model, checkpoint["model"], source)
    optimizer = make_optimizer(model, device, lr, weight_decay, fused)
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        _keep_own_implementation(optimizer, bool(optimizer.defaults["fused"]))
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
