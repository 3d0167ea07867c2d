"""DDP with torchrun: two CPU processes (gloo) train one run folder together."""
import csv
import os
import socket
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT
from triplet.checkpoint import load_checkpoint


def torchrun(*args):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "scripts" / "train.py"), *map(str, args)]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("mining", ["none", "hard"])
def test_two_process_gloo_training_writes_one_complete_run(synthetic_root, tmp_path, mining):
    out = tmp_path / f"ddp-{mining}"
    args = ["--data-dir", synthetic_root, "--resize", 48, "--weights", "none", "--image-size", 32, "--epochs", 3,
            "--batch-size", 8, "--mining", mining, "--samples-per-class", 2, "--lr", 0.001, "--workers", 0,
            "--no-progress", "--device", "cpu", "--out", out]
    result = torchrun(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ["config.json", "history.csv", "checkpoint_last.pt", "checkpoint_best.pt"]:
        assert (out / name).is_file()
    assert not list(out.glob(".*tmp*"))
    assert result.stdout.count("epoch 3/3") == 1  # only rank 0 prints
    with open(out / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["0", "1", "2", "3"]
    if mining == "none":  # batch-hard from a random init is too noisy over 3 tiny epochs to assert on
        losses = [float(r["train_loss"]) for r in rows[1:]]
        assert losses[-1] < losses[0], losses
    checkpoint = load_checkpoint(out / "checkpoint_last.pt")
    assert checkpoint["epoch"] == 2 and checkpoint["config"]["environment"]["world_size"] == 2
    assert not any(k.startswith("module.") for k in checkpoint["model"])
    # --resume under torchrun: a finished run is recognised by every rank.
    again = torchrun(*args, "--resume")
    assert again.returncode == 0 and "nothing to do" in again.stdout


def test_an_interrupted_two_process_run_resumes_to_the_uninterrupted_result(synthetic_root, tmp_path):
    """Each rank draws its own share of every epoch from (seed, epoch, rank) alone, so 1 epoch and
    a --resume to 2 under torchrun end where 2 epochs straight do: same history, same weights."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"

    def args(out, epochs):
        return ["--data-dir", synthetic_root, "--resize", 48, "--weights", "none", "--image-size", 32,
                "--epochs", epochs, "--batch-size", 8, "--workers", 0, "--no-progress", "--device", "cpu",
                "--out", out]

    for result in (torchrun(*args(straight, 2)), torchrun(*args(resumed, 1)), torchrun(*args(resumed, 2), "--resume")):
        assert result.returncode == 0, result.stdout + result.stderr
    assert "resuming" in result.stdout

    def history(run_dir):
        with open(run_dir / "history.csv") as f:
            return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]

    assert len(history(straight)) == 3 and history(resumed) == history(straight)
    weights = [load_checkpoint(run_dir / "checkpoint_last.pt")["model"] for run_dir in (straight, resumed)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_ddp_errors_reach_every_rank(synthetic_root, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "config.json").write_text("{}")
    result = torchrun("--data-dir", synthetic_root, "--resize", 48, "--weights", "none", "--image-size", 32,
                      "--epochs", 1, "--workers", 0, "--device", "cpu", "--out", out)
    assert result.returncode != 0 and "already holds a run" in result.stderr


def _broadcast_buffers_as_rank(rank, world, port, out):
    import torch.distributed as td

    from triplet import distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    td.init_process_group("gloo", rank=rank, world_size=world)
    try:
        norm = torch.nn.BatchNorm1d(3)  # each rank's statistics of its own last batch
        norm.running_mean.fill_(rank + 1.0)
        norm.num_batches_tracked.fill_(10 + rank)
        dist.broadcast_buffers(norm)
        torch.save({k: v.clone() for k, v in norm.state_dict().items()}, f"{out}/{rank}.pt")
    finally:
        td.destroy_process_group()


def test_every_rank_validates_with_rank_0s_batchnorm_statistics(tmp_path):
    """DDP broadcasts buffers only at the start of a training forward; train.py's validation (in
    eval mode, on the unwrapped model) now first takes rank 0's running statistics."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_broadcast_buffers_as_rank, args=(2, port, str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        state = torch.load(tmp_path / f"{rank}.pt")
        assert torch.equal(state["running_mean"], torch.ones(3)) and int(state["num_batches_tracked"]) == 10
