"""The README's script reference is each script's own ``--help``, so the two cannot drift apart.

``make readme`` (``UPDATE_README=1 python -m pytest tests/test_readme.py``) rewrites the
reference from the current help texts; without it, a difference fails the test.
"""
import os
import sys

from tests.conftest import ROOT, call_script
from triplet.fileio import write_text

SCRIPTS = ["prepare_data", "train", "evaluate", "plot_embeddings", "report", "export_onnx", "search", "serve",
           "benchmark_train", "benchmark_onnx", "benchmark_search"]
START = "Every option of every script, with its default, from `--help`:\n\n"
END = "\n## Tests\n"


def reference(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")  # argparse wraps to the terminal: fix it
    blocks = []
    for name in SCRIPTS:
        monkeypatch.setattr(sys, "argv", [f"{name}.py"])  # argparse's prog, as when run from a shell
        status, text = call_script(name, "--help")
        assert status == 0, text
        blocks.append(f"<details><summary><code>scripts/{name}.py</code></summary>\n\n"
                      f"```text\n{text.rstrip()}\n```\n\n</details>\n")
    return "\n".join(blocks)


def test_every_script_is_in_the_reference():
    assert sorted(SCRIPTS) == sorted(p.stem for p in (ROOT / "scripts").glob("*.py"))


def test_readme_reference_matches_help(monkeypatch):
    readme = (ROOT / "README.md").read_text()
    start, end = readme.index(START) + len(START), readme.index(END)
    expected = reference(monkeypatch)
    if os.environ.get("UPDATE_README"):
        write_text(ROOT / "README.md", readme[:start] + expected + readme[end:])
    else:
        assert readme[start:end] == expected, "the README's script reference is out of date: run `make readme`"
