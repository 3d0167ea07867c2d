"""Package boundaries: deployment and reporting run without torch, and every --help is torch-free.

Both are checked in a fresh interpreter in which ``import torch`` fails, as on a service that
installed only ``pip install ".[inference]"``.
"""
import subprocess
import sys

import pytest

from tests.conftest import ROOT

BLOCK_TORCH = """
import importlib.abc, sys
class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision"):
            raise ImportError(f"{name} is blocked: this code must not need torch")
sys.meta_path.insert(0, NoTorch())
"""


def run_without_torch(code, *argv):
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH + code, *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_deploy_and_reporting_import_without_torch():
    modules = ["triplet.deploy.preprocess", "triplet.deploy.neighbours", "triplet.deploy.inference",
               "triplet.deploy.index", "triplet.deploy.gallery", "triplet.deploy.grid", "triplet.deploy.server",
               "triplet.bench.cpu", "triplet.bench.search",
               "triplet.reporting.study", "triplet.reporting.plots", "triplet.reporting.report", "triplet.runs",
               "triplet.errors", "triplet.cli", "triplet.fileio", "triplet.machine"]
    result = run_without_torch("import importlib, sys\nfor m in sys.argv[1:]: importlib.import_module(m)", *modules)
    assert result.returncode == 0, result.stderr


def test_the_blocker_really_blocks_torch():
    result = run_without_torch("import triplet.engine")
    assert result.returncode != 0 and "blocked" in result.stderr


@pytest.mark.parametrize("script", sorted(p.stem for p in (ROOT / "scripts").glob("*.py")))
def test_help_does_not_import_torch(script):
    code = ("import runpy, sys\nsys.argv = [sys.argv[1], '--help']\n"
            "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\nexcept SystemExit as e:\n    sys.exit(e.code)")
    result = run_without_torch(code, str(ROOT / "scripts" / f"{script}.py"))
    assert result.returncode == 0 and "usage:" in result.stdout, result.stderr[-2000:]


def test_pyproject_declares_every_pinned_requirement_and_inference_needs_no_torch():
    import re
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    name = lambda spec: re.split(r"[<>=!~\[ ;]", spec, maxsplit=1)[0].lower()  # noqa: E731
    declared = {name(s) for s in project["dependencies"]}
    for extra in project["optional-dependencies"].values():
        declared |= {name(s) for s in extra}
    pinned = {name(line) for line in (ROOT / "requirements.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")}
    assert pinned <= declared, pinned - declared
    inference = {name(s) for s in project["dependencies"] + project["optional-dependencies"]["inference"]}
    assert inference.isdisjoint({"torch", "torchvision", "onnx", "matplotlib", "scikit-learn"})
    assert "onnxruntime" in inference


@pytest.mark.parametrize("script, required", [("search", ["--model MODEL", "--gallery GALLERY", "--query QUERY"]),
                                              ("evaluate", ["--run RUN"]), ("plot_embeddings", ["--run RUN"])])
def test_required_options_are_shown_as_required(script, required):
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / f"{script}.py"), "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120, env={"COLUMNS": "200", "PATH": ""})
    usage = " ".join(result.stdout.split("\n\n")[0].split())  # argparse wraps long usage lines
    for option in required:
        assert f" {option}" in usage and f"[{option}" not in usage, option
    missing = subprocess.run([sys.executable, str(ROOT / "scripts" / f"{script}.py")], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "the following arguments are required" in missing.stderr
