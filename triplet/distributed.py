"""torchrun-style DDP: the process group comes from RANK / WORLD_SIZE / LOCAL_RANK.

Without torchrun every helper here degrades to the single-process answer, so the training code
calls them unconditionally.
"""
import os

import torch
import torch.distributed as td


def is_distributed():
    return td.is_available() and td.is_initialized()


def rank():
    return td.get_rank() if is_distributed() else 0


def world_size():
    return td.get_world_size() if is_distributed() else 1


def local_rank():
    return int(os.environ.get("LOCAL_RANK", 0))


def local_world_size():
    """Processes on this machine (torchrun's LOCAL_WORLD_SIZE): they share its GPUs and cores."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def is_main():
    return rank() == 0


def backend_for(device):
    """NCCL for CUDA devices, gloo for everything else (a CPU run on a GPU machine included)."""
    return "nccl" if device.type == "cuda" else "gloo"


def init_distributed(device):
    """Join the process group when launched by torchrun, with the backend of the resolved device."""
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1 or is_distributed():
        return False
    backend = backend_for(device)
    if backend == "nccl":
        torch.cuda.set_device(device)
    # NCCL bound to this process's GPU: its barriers then need no guess of the device (and say so)
    td.init_process_group(backend, device_id=device if backend == "nccl" else None)
    return True


def cleanup():
    if is_distributed():
        td.destroy_process_group()


def barrier():
    if is_distributed():
        td.barrier()


def broadcast_buffers(module):
    """Rank 0's buffers (BatchNorm's running statistics) on every rank. DDP sends them only at the
    start of a training forward, so after an epoch's last step each rank holds the statistics of
    its own last batch: validation would embed each rank's shard with a slightly different model
    from the one rank 0 saves."""
    if not is_distributed():
        return
    for buffer in module.buffers():
        td.broadcast(buffer, src=0)


def all_reduce_sum(values):
    """Sum a list of floats over ranks."""
    if not is_distributed():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64)
    if td.get_backend() == "nccl":
        tensor = tensor.cuda()
    td.all_reduce(tensor)
    return tensor.cpu().tolist()


def all_gather_object(obj):
    if not is_distributed():
        return [obj]
    gathered = [None] * world_size()
    td.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj):
    """Rank 0's value on every rank (used for decisions only rank 0 can make, such as errors)."""
    if not is_distributed():
        return obj
    holder = [obj]
    td.broadcast_object_list(holder, src=0)
    return holder[0]
