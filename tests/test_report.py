"""report.py and triplet.reporting.report / triplet.reporting.study: REPORT.md beside the study's published numbers."""
import dataclasses
import importlib.util
import json
import shlex
import shutil

import pytest

from tests.conftest import ROOT, run_script
from triplet.reporting import report, study
from triplet.cli import options_with_role, parse


@pytest.fixture
def results(tiny_run, tmp_path):
    """A results folder: the tiny run as exp1-resnet18, and a fake untrained baseline-resnet18."""
    results = tmp_path / "results"
    shutil.copytree(tiny_run, results / "exp1-resnet18", ignore=shutil.ignore_patterns("*.pt", "*.png"))
    metrics = json.loads((results / "exp1-resnet18" / "metrics.json").read_text())
    baseline = results / "baseline-resnet18"
    baseline.mkdir()
    metrics.update(checkpoint="none", epoch=0, precision_at_1=0.5, map_at_r=0.25)
    (baseline / "metrics.json").write_text(json.dumps(metrics))
    (baseline / "config.json").write_text(json.dumps({"options": {"backbone": "resnet18", "weights": "imagenet",
                                                                  "data_dir": "data"}}))
    return results


def pose_as_cub_exp1(results):
    """Make the tiny run look like `make exp1` on the real CUB (options and dataset), its baseline too."""
    run = results / "exp1-resnet18"
    config = json.loads((run / "config.json").read_text())
    config["options"].update(study.PROTOCOL, **study.EXPERIMENTS["exp1"], backbone="resnet18")
    config["dataset"] = {"name": "CUB-200-2011", "kind": "cub", "source": "data/CUB_200_2011"}
    (run / "config.json").write_text(json.dumps(config))
    for path in (run / "metrics.json", results / "baseline-resnet18" / "metrics.json"):
        metrics = json.loads(path.read_text()) | {"dataset": "CUB-200-2011", "dataset_kind": "cub"}
        path.write_text(json.dumps(metrics))


def read_rows(text):
    return [line for line in text.splitlines() if line.startswith("| ") and "[" in line]


def test_report_compares_with_the_study(results):
    pose_as_cub_exp1(results)
    (results / "exp1-resnet18" / "curves.png").write_bytes(b"png")
    (results / "onnx_benchmark.md").write_text("# ONNX benchmark\n\n| model | ms |\n|---|---|\n| fp32 | 1.0 |\n")
    result = run_script("report", "--results", results)
    text = (results / "REPORT.md").read_text()
    assert "wrote" in result.stdout and "(2 runs)" in result.stdout
    for published in ("33.74", "79.60", "0.5020", "0.6735", "0.0359", "33.83", "32.55"):
        assert published in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "[" in line]
    assert "[exp1-resnet18]" in rows[0] and "**best**" in rows[0]
    assert "[baseline-resnet18]" in rows[1] and "0 (untrained)" in rows[1] and "**best**" not in rows[1]
    assert "](exp1-resnet18/curves.png)" in text and "tsne.png)" not in text  # only figures that exist
    assert "python scripts/train.py " in text and "--checkpoint none --backbone resnet18" in text
    assert "triplet accuracy" in text and "indicative" in text
    assert "## ONNX inference benchmark" in text and "### ONNX benchmark" in text
    assert "Untrained trunk" in text  # the baseline column beside exp1-resnet18


def test_a_synthetic_run_named_like_a_study_experiment_gets_no_study_columns(results):
    text, _ = report.build_report(results)
    assert "33.74" not in text and "Δ (run − study)" not in text and "| Study |" not in text
    assert "but not comparable with it" in text and "synthetic" in text
    assert all(row.rstrip(" |").endswith("—") for row in read_rows(text))


def test_options_that_differ_from_the_experiment_drop_the_study_columns(results):
    pose_as_cub_exp1(results)
    config_path = results / "exp1-resnet18" / "config.json"
    config = json.loads(config_path.read_text())
    config["options"]["epochs"] = 2  # `make exp1 EPOCHS=2`: a smoke test, not experiment 1
    config_path.write_text(json.dumps(config))
    text, _ = report.build_report(results)
    assert "33.74" not in text and "but not comparable with it" in text


def test_runs_are_grouped_by_dataset_with_their_own_best(results, tmp_path):
    pose_as_cub_exp1(results)
    mine = results / "mine-resnet50"
    shutil.copytree(results / "exp1-resnet18", mine)
    metrics = json.loads((mine / "metrics.json").read_text())
    metrics.update(dataset="my_photos", dataset_kind="folder", num_classes=7, precision_at_1=99.0, backbone="resnet50",
                   protocol="query-gallery", num_queries=12, num_gallery=30)
    (mine / "metrics.json").write_text(json.dumps(metrics))
    text, count = report.build_report(results)
    assert count == 3
    cub, folder = text.index("### CUB-200-2011"), text.index("### my_photos (folder)")
    assert cub < folder
    mine_row = next(row for row in read_rows(text) if "[mine-resnet50]" in row)
    cells = [c.strip() for c in mine_row.strip("|").split("|")]
    assert cells[0] == "1 **best**" and cells[2:6] == ["my_photos (folder)", "7", str(metrics["image_size"]), "resnet50"]
    assert "(12 queries)" in mine_row and "query-gallery: 12 queries against 30 gallery images" in text
    exp1_row = next(row for row in read_rows(text) if "[exp1-resnet18]" in row)
    assert "**best**" in exp1_row  # the best of its own dataset


def test_metrics_older_than_the_last_checkpoint_are_flagged_stale(results):
    import os
    run = results / "exp1-resnet18"
    (run / "checkpoint_last.pt").write_bytes(b"newer")
    stamp = (run / "metrics.json").stat().st_mtime_ns
    os.utime(run / "checkpoint_last.pt", ns=(stamp + 10**9, stamp + 10**9))
    text, _ = report.build_report(results)
    assert "[exp1-resnet18](#exp1-resnet18) ⚠ stale" in text and "**Stale:** metrics.json is older" in text
    os.utime(run / "metrics.json", ns=(stamp + 2 * 10**9, stamp + 2 * 10**9))  # evaluated again
    assert "stale" not in report.build_report(results)[0].lower()


def test_baseline_on_other_test_images_is_not_compared(results):
    metrics_path = results / "baseline-resnet18" / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    metrics["num_images"] = 5794  # CUB's test split, unlike the synthetic run beside it
    metrics_path.write_text(json.dumps(metrics))
    text, count = report.build_report(results)
    assert count == 2 and "Untrained trunk" not in text and "[baseline-resnet18]" in text


def test_runs_outside_the_study_show_a_dash(results):
    pose_as_cub_exp1(results)
    shutil.move(results / "exp1-resnet18", results / "exp5-resnet34")  # the study ran exp5 on ResNet18 only
    text, _ = report.build_report(results)
    row = next(line for line in text.splitlines() if line.startswith("| 1 ") and "exp5-resnet34" in line)
    assert row.rstrip(" |").endswith("—")
    assert "Δ (run − study)" not in text


def test_empty_results_folder_is_a_one_line_error(tmp_path):
    result = run_script("report", "--results", tmp_path, check=False)
    assert result.returncode == 2 and "no evaluated runs" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_train_command_rebuilds_the_run_options(tiny_run):
    spec = importlib.util.spec_from_file_location("train_script", ROOT / "scripts" / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    options = json.loads((tiny_run / "config.json").read_text())["options"]
    runtime = options_with_role(train.Options, "runtime")
    assert {"device", "workers", "progress", "out"} <= runtime and "lr" not in runtime
    command = report.train_command(tiny_run, options, runtime)
    assert "--device" not in command and "--workers" not in command
    parsed, _ = parse(train.Options, shlex.split(command)[2:])
    rebuilt = dataclasses.asdict(parsed)
    for key, value in options.items():
        if key not in runtime:
            assert rebuilt[key] == value, key


def test_study_values_match_the_paper():
    assert len(study.STUDY) == 10
    assert study.STUDY[("exp6", "resnet18")]["precision_at_1"] == 46.91
    assert study.STUDY[("exp4", "resnet34")]["loss"] == 0.6131
    assert study.STUDY[("exp3", "resnet18")]["cos_sim_an"] == -0.0004
    assert study.STUDY[("exp2", "resnet34")]["precision_at_10"] == 29.42
    assert study.STUDY[("exp5", "resnet18")]["triplet_accuracy"] == 83.53
    assert study.study_key("exp1-resnet18") == ("exp1", "resnet18")
    assert study.study_key("exp5-resnet34") is None and study.study_key("exp7-resnet18") is None
    assert study.study_key("baseline-resnet18") is None
    assert {k[0] for k in study.STUDY} == set(study.EXPERIMENTS)


def test_counts_read_as_english():
    from triplet.cli import plural

    assert plural(1, "run") == "1 run" and plural(2, "run") == "2 runs" and plural(0, "epoch") == "0 epochs"
    assert plural(1, "class", "classes") == "1 class" and plural(3, "class", "classes") == "3 classes"


def test_nan_or_infinite_precision_is_missing_never_best(results):
    # "a-" sorts first: an unguarded sort leaves a NaN key where it is, so it would rank best
    for name, value, kind in (("a-nan-resnet18", "NaN", None), ("inf-resnet18", "Infinity", "folder")):
        shutil.copytree(results / "exp1-resnet18", results / name)
        path = results / name / "metrics.json"
        metrics = json.loads(path.read_text()) | ({"dataset": "mine", "dataset_kind": kind} if kind else {})
        path.write_text(json.dumps(metrics).replace(f'"precision_at_1": {metrics["precision_at_1"]}',
                                                    f'"precision_at_1": {value}'))
    warnings = []
    text, count = report.build_report(results, log=warnings.append)
    assert count == 4
    rows = {row.split("[")[1].split("]")[0]: row for row in read_rows(text)}
    assert rows["exp1-resnet18"].startswith("| 1 **best** |")
    assert rows["a-nan-resnet18"].startswith("| 3 |")  # after the baseline, and not best
    assert rows["inf-resnet18"].startswith("| 1 |")  # alone on its dataset, yet not best
    nan_row = rows["a-nan-resnet18"]
    assert [c.strip() for c in nan_row.strip("|").split("|")][11] == "—" and "| nan |" not in text and "| inf |" not in text
    assert len(warnings) == 2 and all("precision_at_1 is" in w and "not a real number" in w for w in warnings)


def test_runs_with_a_null_or_nan_precision_rank_last_without_a_traceback(tmp_path):
    """find_runs (the report, and export_onnx.py's choice of the best run) sorted on the raw value:
    null raised TypeError, and NaN could rank first."""
    from triplet.runs import find_runs

    for name, value in (("a-nan", "NaN"), ("b-null", "null"), ("c-real", "40.0"), ("d-inf", "-Infinity")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(f'{{"precision_at_1": {value}}}')
    ranked = [run_dir.name for run_dir, _ in find_runs(tmp_path, log=lambda *a: None)]
    assert ranked[0] == "c-real" and sorted(ranked) == ["a-nan", "b-null", "c-real", "d-inf"]
    text, count = report.build_report(tmp_path, log=lambda *a: None)  # sorted again there: null raised TypeError
    assert count == 4 and "c-real" in text


def test_run_folders_not_yet_evaluated_are_named_not_silently_left_out(results):
    """A run trained but not evaluated (or still training) has config.json and no metrics.json; the
    report cannot rank it, and says which folders it left out and how to evaluate them."""
    for name in ("exp2-resnet18", "exp3-resnet34"):
        (results / name).mkdir()
        (results / name / "config.json").write_text("{}")
    (results / "readme").mkdir()  # not a run folder: no config.json, not named
    notes = []
    text, count = report.build_report(results, log=notes.append)
    assert count == 2 and "exp2-resnet18" not in text
    assert notes == [f"note: 2 run folder(s) left out, not evaluated yet (no metrics.json): exp2-resnet18, "
                     f"exp3-resnet34; python scripts/evaluate.py --run {results / 'exp2-resnet18'}"]
