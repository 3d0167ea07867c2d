"""triplet.reporting.demo and report.py --demo-table: the README's demo table and REPORT's paragraph."""
import json
import shutil

import pytest

from tests.conftest import call_script
from triplet.errors import UserError
from triplet.reporting import demo, report

UNTRAINED = {"checkpoint": "none", "epoch": 0, "precision_at_1": 30.0, "precision_at_5": 25.0, "map_at_r": 10.0,
             "r_precision": 20.0, "triplet_accuracy": 60.0, "cos_sim_ap": 0.9, "cos_sim_an": 0.85,
             "num_classes": 10, "num_images": 750}
TRAINED = {**UNTRAINED, "checkpoint": "run/checkpoint_best.pt", "epoch": 40, "precision_at_1": 62.5,
           "precision_at_5": 58.25, "map_at_r": 25.0, "r_precision": 40.0, "triplet_accuracy": 88.0,
           "cos_sim_ap": 0.7, "cos_sim_an": 0.2}


def write_run(folder, trained=TRAINED, untrained=UNTRAINED):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps(trained))
    (folder / "metrics_untrained.json").write_text(json.dumps(untrained))
    return folder


def cells(line):
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_table_structure_and_hand_computed_changes():
    lines = demo.demo_table(TRAINED, UNTRAINED).splitlines()
    assert cells(lines[0]) == ["Metric", "Untrained (epoch 0)", "Trained (epoch 40)", "Change"]
    assert set(lines[1].replace("|", "")) == {"-"}
    rows = {cells(line)[0]: cells(line)[1:] for line in lines[2:]}
    assert list(rows) == [label for _, label, _ in demo.TABLE_ROWS]
    assert all(line.startswith("| ") and line.endswith(" |") and len(cells(line)) == 4
               for line in [lines[0], *lines[2:]])
    assert rows["Test Precision@1, %"] == ["30.0", "62.5", "+32.5"]
    assert rows["Test MAP@R, %"] == ["10.0", "25.0", "+15.0 (×2.5)"]
    assert rows["Cosine similarity anchor-negative"] == ["0.850", "0.200", "-0.650"]
    assert rows["Gap (anchor-positive − anchor-negative)"] == ["0.050", "0.500", "+0.450"]


def test_paragraph_says_what_it_shows_and_what_not():
    text = demo.demo_paragraph(TRAINED, UNTRAINED)
    for expected in ("from 30.0% to 62.5% (+32.5 points)", "×2.5", "from 0.050 to 0.500", "10 classes",
                     "nothing about accuracy on CUB", "one seed"):
        assert expected in text
    assert "\n" not in text  # one paragraph


def test_demo_table_script_prints_markdown(tmp_path):
    run_dir = write_run(tmp_path / "demo-resnet18")
    status, out = call_script("report", "--demo-table", run_dir)
    assert status == 0, out
    assert out.strip() == demo.demo_table(TRAINED, UNTRAINED)
    assert not (tmp_path / "REPORT.md").exists()


@pytest.mark.parametrize("damage, expected", [
    (lambda d: (d / "metrics_untrained.json").unlink(), "--checkpoint none"),
    (lambda d: (d / "metrics.json").write_text("[1, 2]"), "not a metrics object"),
    (lambda d: (d / "metrics.json").write_text("{"), "not valid JSON"),
    (lambda d: (d / "metrics_untrained.json").write_text(json.dumps({**UNTRAINED, "map_at_r": "n/a"})), "map_at_r"),
    (lambda d: (d / "metrics_untrained.json").write_text(json.dumps(TRAINED)), "not an untrained evaluation"),
])
def test_broken_run_folders_are_one_line_errors(tmp_path, damage, expected):
    run_dir = write_run(tmp_path / "demo-resnet18")
    damage(run_dir)
    with pytest.raises(UserError, match=expected):
        demo.read_demo_metrics(run_dir)
    status, out = call_script("report", "--demo-table", run_dir)
    assert status != 0 and expected in out and "Traceback" not in out


def test_report_has_the_paragraph_for_demo_runs_only(tiny_run, tmp_path):
    results = tmp_path / "results"
    for name in ("demo-resnet18", "exp1-resnet18"):
        shutil.copytree(tiny_run, results / name, ignore=shutil.ignore_patterns("*.pt", "*.png", "*.npz"))
        write_run(results / name, json.loads((tiny_run / "metrics.json").read_text()), UNTRAINED)
    text, count = report.build_report(results)
    assert count == 2 and text.count("**What this shows.**") == 1
    demo_section = text[text.index("## demo-resnet18"):text.index("## exp1-resnet18")]
    assert "**What it does not show.**" in demo_section


def test_seeds_table_gives_hand_computed_mean_spread_and_range(tmp_path):
    second = {**TRAINED, "precision_at_1": 72.5, "map_at_r": 30.0}
    lines = demo.seeds_table([(TRAINED, UNTRAINED), (second, {**UNTRAINED, "map_at_r": 12.0})]).splitlines()
    assert "2 seeds" in lines[0] and len(lines) == 2 + len(demo.TABLE_ROWS)
    rows = {cells(line)[0]: cells(line)[1:] for line in lines[2:]}
    # P@1 trained 62.5 and 72.5: mean 67.5, sample sd 7.07; changes +32.5 and +42.5
    assert rows["Test Precision@1, %"] == ["30.0 ± 0.0 (30.0 to 30.0)", "67.5 ± 7.1 (62.5 to 72.5)",
                                           "37.5 ± 7.1 (32.5 to 42.5)"]
    assert rows["Test MAP@R, %"][2].endswith("ratio 2.50 ± 0.00 (2.50 to 2.50)")  # 25/10 and 30/12
    runs = [write_run(tmp_path / "s0"), write_run(tmp_path / "s1", second)]
    status, out = call_script("report", "--demo-table", *runs)
    assert status == 0 and "2 seeds" in out, out
    for run_dir in runs:  # two folders trained with the same seed: not called "seeds"
        (run_dir / "config.json").write_text(json.dumps({"options": {"seed": 0}}))
    status, out = call_script("report", "--demo-table", *runs)
    assert status == 0 and "2 runs, seeds 0, 0:" in out and "2 seeds" not in out, out


def test_paragraph_claims_learning_only_when_the_numbers_show_it():
    assert "pulled same-class images together" in demo.demo_paragraph(TRAINED, UNTRAINED)
    worse = {**TRAINED, "precision_at_1": 29.0}
    text = demo.demo_paragraph(worse, UNTRAINED)
    assert "does not show the learning" in text and "pulled same-class" not in text
    narrower = {**TRAINED, "cos_sim_ap": 0.3, "cos_sim_an": 0.29}
    assert "does not show the learning" in demo.demo_paragraph(narrower, UNTRAINED)
