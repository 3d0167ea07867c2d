"""The docs cannot drift from the code: docs/scripts.md is every script's own ``--help``, the
README links only to files that exist and stays a ten-minute read.

``make readme`` (``UPDATE_README=1 python -m pytest tests/test_readme.py``) rewrites
docs/scripts.md from the current help texts and, after ``make demo``, the README's demo table
from the demo's metrics.json files; without it, a difference fails the test.
"""
import os
import re
import shutil
import sys

from tests.conftest import ROOT, call_script
from triplet.fileio import write_text

SCRIPTS = ["prepare_data", "train", "evaluate", "plot_embeddings", "report", "export_onnx", "search", "serve",
           "benchmark_train", "benchmark_onnx", "benchmark_search", "gpu_check"]
REFERENCE = ROOT / "docs" / "scripts.md"
HEADER = ("# Script reference\n\nEvery option of every script, with its default, from `--help` "
          "(`make readme` rewrites this file; a test checks it):\n\n")


def reference(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")  # argparse wraps to the terminal: fix it
    blocks = []
    for name in SCRIPTS:
        monkeypatch.setattr(sys, "argv", [f"{name}.py"])  # argparse's prog, as when run from a shell
        status, text = call_script(name, "--help")
        assert status == 0, text
        blocks.append(f"## `scripts/{name}.py`\n\n```text\n{text.rstrip()}\n```\n")
    return HEADER + "\n".join(blocks)


def test_every_script_is_in_the_reference():
    assert sorted(SCRIPTS) == sorted(p.stem for p in (ROOT / "scripts").glob("*.py"))


def test_script_reference_matches_help(monkeypatch):
    expected = reference(monkeypatch)
    if os.environ.get("UPDATE_README"):
        write_text(REFERENCE, expected)
    else:
        assert REFERENCE.read_text() == expected, "docs/scripts.md is out of date: run `make readme`"


DEMO_START, DEMO_END = "<!-- demo-table -->\n", "<!-- /demo-table -->"
DEMO_RUN = ROOT / "results" / "demo-resnet18"


def test_readme_demo_table_comes_from_the_demo_run():
    from triplet.reporting.demo import TABLE_ROWS, demo_table, read_demo_metrics

    readme = (ROOT / "README.md").read_text()
    start, end = readme.index(DEMO_START) + len(DEMO_START), readme.index(DEMO_END)
    if os.environ.get("UPDATE_README") and (DEMO_RUN / "metrics_untrained.json").exists():
        table = demo_table(*read_demo_metrics(DEMO_RUN)) + "\n"
        write_text(ROOT / "README.md", readme[:start] + table + readme[end:])
        for figure in ("curves.png", "retrieval.png"):  # the README's figures come from the same run
            if (DEMO_RUN / figure).exists():
                shutil.copyfile(DEMO_RUN / figure, ROOT / "results" / "readme" / figure)
        readme = (ROOT / "README.md").read_text()
        start, end = readme.index(DEMO_START) + len(DEMO_START), readme.index(DEMO_END)
    rows = [line for line in readme[start:end].splitlines() if line.startswith("|")]
    assert rows[0].startswith("| Metric | Untrained (epoch 0) | Trained (epoch ") and rows[1] == "|---|---|---|---|"
    cells = [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[2:]]
    assert [row[0] for row in cells] == [label for _, label, _ in TABLE_ROWS]
    for label, before, after, delta in cells:  # the change column is what the two columns say
        assert abs(float(delta.split()[0]) - (float(after) - float(before))) <= 0.11, label


def test_readme_is_short_and_its_links_exist():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    for target in re.findall(r"\]\(([^)#]+)\)", readme):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), target
    for doc in (ROOT / "docs").glob("*.md"):
        for target in re.findall(r"\]\(([^)#]+)\)", doc.read_text()):
            if not target.startswith("http") and "/" not in target.split("#")[0].strip("."):
                assert (doc.parent / target).exists(), f"{doc.name}: {target}"
