"""Shared fixtures: a tiny synthetic CUB (built once per session) and script runners."""
import contextlib
import importlib.util
import io
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from triplet.cli import run
from triplet.data.prepare import DataOptions, prepare
from triplet.data.synthetic import make_synthetic_cub
from triplet.machine import start_method_without_fork

ROOT = Path(__file__).resolve().parents[1]

# The tests' servers listen on 127.0.0.1: a runner's http_proxy must not carry those requests away.
for _name in ("NO_PROXY", "no_proxy"):
    os.environ[_name] = ",".join(filter(None, [os.environ.get(_name), "127.0.0.1", "localhost"]))
# DataLoader workers of in-process runs start from a clean server, not as fork()s of this process, whose
# threads (torch's, tqdm's monitor, servers) may hold a lock at that instant: CI once hung on such a fork.
multiprocessing.set_start_method(start_method_without_fork(), force=True)


def run_script(name, *args, check=True, timeout=300, env=None):
    """Run scripts/<name>.py in a subprocess, as a user would; return the CompletedProcess."""
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / f"{name}.py"), *map(str, args)],
                            capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                            env={**os.environ, **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"{name} {args} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def call_script(name, *args):
    """Run scripts/<name>.py in this process (importing torch once is most of a script's start-up).

    Returns (exit status, what it printed to stdout and stderr).
    """
    spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    handler, threads = signal.getsignal(signal.SIGTERM), torch.get_num_threads()
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_info:
            run(module.main, module.Options, module.__doc__, argv=[str(a) for a in args])
    finally:  # cli.run installs a SIGTERM handler and the benchmark sets torch's threads: undo both
        signal.signal(signal.SIGTERM, handler)
        torch.set_num_threads(threads)
    return exit_info.value.code or 0, out.getvalue() + err.getvalue()


@pytest.fixture(scope="session", autouse=True)
def cache_home(tmp_path_factory):
    """The gallery caches of the tests' search runs go to a temporary folder, not the user's ~/.cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
        yield


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A 12-class synthetic CUB at 64 px, prepared at short side 48; never modified by tests."""
    data_dir = tmp_path_factory.mktemp("cub")
    make_synthetic_cub(data_dir, classes=12, per_class=12, image_size=64, seed=0)
    prepare(DataOptions(data_dir=str(data_dir), resize=48), workers=1, log=lambda *a: None)
    return data_dir


@pytest.fixture
def data_copy(synthetic_root, tmp_path):
    """A private copy of the synthetic set that a test may damage."""
    target = tmp_path / "data"
    shutil.copytree(synthetic_root / "CUB_200_2011", target / "CUB_200_2011")
    return target


@pytest.fixture(scope="session")
def tiny_run(synthetic_root, tmp_path_factory):
    """A finished, evaluated run: 2 epochs of ResNet18 at 32 px (random init) on the synthetic set."""
    run_dir = tmp_path_factory.mktemp("runs") / "tiny-resnet18"
    run_script("train", "--data-dir", synthetic_root, "--resize", 48, "--weights", "none", "--image-size", 32,
               "--epochs", 2, "--batch-size", 16, "--workers", 0, "--no-progress", "--out", run_dir)
    run_script("evaluate", "--run", run_dir, "--workers", 0)
    return run_dir


@pytest.fixture(scope="session")
def model_path(tiny_run, tmp_path_factory):
    """The tiny run exported to ONNX (fp32, with its metadata), as scripts/export_onnx.py writes it."""
    from triplet.checkpoint import model_from_checkpoint
    from triplet.deploy.export import export_model, run_metadata
    from triplet.fileio import read_json

    model, checkpoint = model_from_checkpoint(tiny_run / "checkpoint_best.pt")
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    export_model(model, path, run_metadata(tiny_run, checkpoint["config"]["options"],
                                           read_json(tiny_run / "metrics.json")))
    return path


@pytest.fixture(scope="session")
def test_images(tiny_run):
    """The tiny run's test images (paths inside the prepared synthetic set)."""
    from triplet.data.prepare import prepared_dir, read_manifest, run_data_options
    from triplet.fileio import read_json

    options = read_json(tiny_run / "config.json")["options"]
    return read_manifest(prepared_dir(run_data_options(options)), "test")[0]


def copy_gallery(images, folder):
    """Copy images into ``folder/<class>/<name>``, as a user's photo folder would be laid out."""
    for path in images:
        target = Path(folder) / os.path.basename(os.path.dirname(path)) / os.path.basename(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    return Path(folder)
