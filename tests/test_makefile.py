"""The Makefile encodes the study's experiment table; check it with dry runs (`make -n`)."""
import re
import shutil
import subprocess

import pytest

from tests.conftest import ROOT

# The study (../shared/seed): epochs, learning rate, batch size of experiments 1-6.
STUDY = {"exp1": (20, 0.001, 32), "exp2": (20, 0.002, 32), "exp3": (20, 0.001, 64), "exp4": (20, 0.002, 64),
         "exp5": (60, 0.001, 32), "exp6": (60, 0.001, 64)}

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def dry_run(*args, tmp_path):
    result = subprocess.run(["make", "-n", *args, f"DATA_DIR={tmp_path}/data", f"RESULTS={tmp_path}/results"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def option(command, name):
    values = re.findall(rf"--{name} (\S+)", command)
    return values[-1]  # argparse keeps the last occurrence


@pytest.mark.parametrize("experiment", sorted(STUDY))
@pytest.mark.parametrize("backbone", ["resnet18", "resnet34"])
def test_experiment_targets_match_the_study(experiment, backbone, tmp_path):
    output = dry_run(experiment, f"BACKBONE={backbone}", tmp_path=tmp_path)
    train = next(line for line in output.splitlines() if "scripts/train.py" in line)
    epochs, lr, batch = STUDY[experiment]
    assert int(option(train, "epochs")) == epochs
    assert float(option(train, "lr")) == lr
    assert int(option(train, "batch-size")) == batch
    assert option(train, "backbone") == backbone
    assert "--mining" not in train  # the study: offline random triplets (the default)
    assert option(train, "out") == f"{tmp_path}/results/{experiment}-{backbone}"
    assert "--resume" in train  # an interrupted run continues
    chain = [line for line in output.splitlines() if "scripts/" in line]
    assert [re.search(r"scripts/(\w+)\.py", line).group(1) for line in chain] == \
        ["prepare_data", "train", "evaluate", "plot_embeddings"]
    assert not any(line.startswith("rm ") for line in output.splitlines())


def test_overrides_reach_the_commands(tmp_path):
    output = dry_run("exp2", "EPOCHS=3", "DEVICE=cpu", "IMAGE_SIZE=64", "WORKERS=0", "WEIGHTS=none", "SPLIT=classes",
                     tmp_path=tmp_path)
    train = next(line for line in output.splitlines() if "scripts/train.py" in line)
    assert option(train, "epochs") == "3" and option(train, "device") == "cpu"
    assert option(train, "image-size") == "64" and option(train, "workers") == "0"
    assert option(train, "weights") == "none" and option(train, "split") == "classes"
    assert option(train, "backbone") == "resnet18"
    # an override that changes the numbers changes the folder: the canonical run stays untouched
    assert option(train, "out") == f"{tmp_path}/results/exp2-resnet18-e3-s64-wnone-classes"


def finished_run(tmp_path, name):
    """The default prepared copy and a run folder ``name`` whose metrics and plots exist, as make sees them."""
    prepared = tmp_path / "data" / "prepared" / "official-r256-val0.1-seed0"
    prepared.mkdir(parents=True, exist_ok=True)
    (prepared / "prepare.json").write_text("{}")
    run = tmp_path / "results" / name
    run.mkdir(parents=True)
    for target in ("metrics.json", "tsne.png"):
        (run / target).write_text("done")
    return run


def test_a_quick_try_does_not_stand_in_for_the_real_run(tmp_path):
    finished_run(tmp_path, "exp1-resnet18-e2")
    assert "scripts/" not in dry_run("exp1", "EPOCHS=2", tmp_path=tmp_path)
    assert "train.py" in dry_run("exp1", tmp_path=tmp_path)


def test_a_finished_run_is_not_retrained(tmp_path):
    run = finished_run(tmp_path, "exp1-resnet18")
    assert "scripts/" not in dry_run("exp1", tmp_path=tmp_path)
    (run / "tsne.png").unlink()  # only the plots are missing: no retraining, only plotting
    output = dry_run("exp1", tmp_path=tmp_path)
    assert "plot_embeddings" in output and "train.py" not in output
    (run / "tsne.png").touch()
    (run / "metrics.json").unlink()  # under .SECONDARY it was never remade while tsne.png stood
    assert "evaluate.py" in dry_run("exp1", tmp_path=tmp_path)


@pytest.mark.parametrize("variable, says", [("NPROC=0", "NPROC=0: must be a whole number"),
                                            ("NPROC=abc", "NPROC=abc: must be a whole number"),
                                            ("DATA_DIR=my data", "holds a space"), ("RESULTS=my results", "holds a space")])
def test_a_bad_variable_is_one_line_before_anything_runs(variable, says):
    """NPROC=0 ended in torchrun's traceback; a space in DATA_DIR reached prepare_data as two arguments."""
    result = subprocess.run(["make", "-n", "exp1", variable], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and says in result.stderr and result.stderr.count("\n") == 1, result.stderr


def test_exp7_uses_online_mining_and_torchrun_with_nproc(tmp_path):
    train = next(line for line in dry_run("exp7", "NPROC=4", tmp_path=tmp_path).splitlines() if "train.py" in line)
    assert option(train, "mining") in ("semihard", "hard") and "--nproc_per_node 4" in train


def test_help_lists_every_target():
    result = subprocess.run(["make", "help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "RESULTS=results" in result.stdout
    for target in ["setup", "test", "data", "exp1", "exp7", "all", "baseline", "report", "export", "bench",
                   "bench-train", "gpu-check", "demo", "demo-study", "readme", "custom"]:
        assert re.search(rf"^\s+{re.escape(target)}\s", result.stdout, re.M), target


def test_serve_target_serves_what_the_demo_exports(tmp_path):
    demo = dry_run("demo", tmp_path=tmp_path)
    serve = next(line for line in dry_run("serve", tmp_path=tmp_path).splitlines() if "scripts/serve.py" in line)
    search = next(line for line in demo.splitlines() if "scripts/search.py" in line)
    assert option(serve, "model") == option(search, "model") == "exports/demo-resnet18.onnx"
    assert option(serve, "gallery") == option(search, "gallery") and option(serve, "index") == "exact"
    custom = dry_run("serve", "SERVE_MODEL=m.onnx", "SERVE_GALLERY=photos", "PORT=9001", "INDEX=faiss", tmp_path=tmp_path)
    assert "--model m.onnx --gallery photos --port 9001 --index faiss" in custom


def test_demo_baseline_is_the_runs_own_start_and_the_table_comes_from_the_run(tmp_path):
    lines = dry_run("demo", "DEMO_SEED=2", tmp_path=tmp_path).replace("\\\n", " ").splitlines()
    train = next(line for line in lines if "scripts/train.py" in line)
    run_dir = f"{tmp_path}/results/demo-resnet18"
    assert option(train, "seed") == "2" and option(train, "out") == run_dir
    assert option(train, "weights") == "none" and option(train, "mining") == "semihard"
    untrained = next(line for line in lines if f"scripts/evaluate.py --run {run_dir} --checkpoint none" in line)
    assert option(untrained, "precision") == option(train, "precision") == "auto"  # only training differs
    fp32 = dry_run("demo", "DEMO_PRECISION=fp32", tmp_path=tmp_path).replace("\\\n", " ").splitlines()
    assert {option(line, "precision") for line in fp32 if "scripts/train.py" in line or "scripts/evaluate.py" in line} == {"fp32"}
    assert f"scripts/report.py --demo-table {run_dir}" in " ".join(lines)
    prepare = next(line for line in lines if "--synthetic" in line)
    assert int(option(prepare, "per-class")) * 0.5 * float(option(train, "val-fraction")) >= 15  # val per class


def test_demo_study_runs_the_studys_recipe_on_the_demo_set(tmp_path):
    demo, study = (next(line for line in dry_run(target, tmp_path=tmp_path).replace("\\\n", " ").splitlines()
                        if "scripts/train.py" in line) for target in ("demo", "demo-study"))
    for same in ("data-dir", "resize", "val-fraction", "image-size", "weights", "epochs", "seed"):
        assert option(study, same) == option(demo, same), same
    assert option(study, "mining") == "none" and float(option(study, "margin")) == 1.0
    assert (float(option(study, "lr")), int(option(study, "batch-size"))) == STUDY["exp1"][1:]


@pytest.mark.parametrize("images, source", [("my_photos/", "--image-folder"), ("shop.csv", "--manifest")])
def test_custom_runs_the_whole_chain_on_your_own_images(images, source, tmp_path):
    output = dry_run("custom", f"IMAGES={images}", "BACKBONE=resnet50", "EPOCHS=3", tmp_path=tmp_path)
    name = images.strip("/").removesuffix(".csv")
    chain = [line for line in output.splitlines() if "scripts/" in line and not line.startswith("echo")]
    assert [re.search(r"scripts/(\w+)\.py", line).group(1) for line in chain] == \
        ["prepare_data", "train", "evaluate", "plot_embeddings", "report", "export_onnx"]
    assert option(chain[0], source.lstrip("-")) == images and option(chain[0], "data-dir") == f"{tmp_path}/data/{name}"
    assert option(chain[1], "data-dir") == f"{tmp_path}/data/{name}" and option(chain[1], "backbone") == "resnet50"
    assert option(chain[1], "epochs") == "3" and "--resume" in chain[1]
    # EPOCHS=3 is another run (its cosine schedule spans 3 epochs): its own folder, as exp targets do
    assert option(chain[1], "out") == f"{tmp_path}/results/{name}-resnet50-e3"
    assert option(chain[5], "out") == f"exports/{name}-resnet50-e3.onnx" and "--int8" in chain[5]
    assert "scripts/search.py --model exports/" in output


@pytest.mark.parametrize("images", ["photos.CSV", "data/photos.Csv"])
def test_custom_reads_a_csv_whatever_the_case_of_its_suffix(images, tmp_path):
    """photos.CSV (a spreadsheet's export) went to prepare_data as --image-folder."""
    output = dry_run("custom", f"IMAGES={images}", tmp_path=tmp_path)
    prepare = next(line for line in output.splitlines() if "scripts/prepare_data.py" in line)
    assert option(prepare, "manifest") == images and "--image-folder" not in prepare
    assert option(prepare, "data-dir") == f"{tmp_path}/data/photos" and "--gallery DIR" in output



def test_training_and_evaluation_start_with_the_allocator_the_machine_has(tmp_path):
    commands = [line for line in dry_run("exp1", "ALLOCATOR=LD_PRELOAD=libtcmalloc_minimal.so.4", tmp_path=tmp_path)
                .splitlines() if "scripts/" in line]
    started = {re.search(r"scripts/(\w+)\.py", line)[1]: line.startswith("LD_PRELOAD=libtcmalloc_minimal.so.4 ")
               for line in commands}
    assert started == {"prepare_data": False, "train": True, "evaluate": True, "plot_embeddings": False}
    torchrun = next(line for line in dry_run("exp7", "NPROC=2", "ALLOCATOR=LD_PRELOAD=x", tmp_path=tmp_path)
                    .splitlines() if "train.py" in line)
    assert torchrun.startswith("LD_PRELOAD=x ") and "torchrun" in torchrun  # torchrun's processes inherit it
    named = dry_run("exp1", "ALLOCATOR=libjemalloc.so.2", tmp_path=tmp_path)  # a library alone is preloaded
    assert next(line for line in named.splitlines() if "train.py" in line).startswith("LD_PRELOAD=libjemalloc.so.2 ")
    plain = dry_run("exp1", "ALLOCATOR=", tmp_path=tmp_path)  # ALLOCATOR= : the C library's malloc
    assert "LD_PRELOAD" not in plain and "train.py" in plain
    assert "--allocator none" in dry_run("bench-train", "ALLOCATOR=", tmp_path=tmp_path)  # the benchmark's suite too
    assert "--allocator" not in dry_run("bench-train", "ALLOCATOR=LD_PRELOAD=x", tmp_path=tmp_path)


def test_custom_refuses_a_path_with_a_space_it_would_split(tmp_path):
    """make's functions split words: "my photos" became two arguments and prepare_data failed on
    "unrecognized arguments: photos photos"."""
    result = subprocess.run(["make", "-n", "custom", f"IMAGES={tmp_path}/my photos"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and "holds a space" in result.stderr and "ln -s" in result.stderr
