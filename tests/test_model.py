"""The seeded build: the untrained baseline is exactly the model train.py starts from."""
import copy
import json

import pytest
import torch

import triplet.model
from tests.conftest import call_script, run_script
from triplet.model import build_seeded_model


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_seeded_builds_give_identical_weights():
    torch.manual_seed(123)
    torch.rand(7)  # whatever ran before must not matter
    first = build_seeded_model(5, "resnet18", 16).state_dict()
    second = build_seeded_model(5, "resnet18", 16).state_dict()
    other = build_seeded_model(6, "resnet18", 16).state_dict()
    assert same_weights(first, second)
    assert not torch.equal(first["head.weight"], other["head.weight"])
    assert not torch.equal(first["trunk.conv1.weight"], other["trunk.conv1.weight"])


def test_seeded_build_leaves_the_callers_random_state_alone():
    torch.manual_seed(1)
    expected = torch.rand(5)
    torch.manual_seed(1)
    build_seeded_model(0, "resnet18", 8)
    assert torch.equal(torch.rand(5), expected)


@pytest.fixture
def built_models(monkeypatch):
    """Every model build_model returns, as a copy of its weights at that moment."""
    built, original = [], triplet.model.build_model

    def recording_build(*args, **kwargs):
        model = original(*args, **kwargs)
        built.append(copy.deepcopy(model.state_dict()))
        return model

    monkeypatch.setattr(triplet.model, "build_model", recording_build)
    return built


def test_untrained_baseline_is_the_training_start(synthetic_root, tmp_path, built_models):
    run_dir = tmp_path / "run"
    status, out = call_script("train", "--data-dir", synthetic_root, "--resize", 48, "--weights", "none",
                              "--image-size", 32, "--embedding-dim", 16, "--epochs", 1, "--batch-size", 16,
                              "--seed", 3, "--workers", 0, "--no-progress", "--out", run_dir)
    assert status == 0, out
    status, out = call_script("evaluate", "--run", run_dir, "--checkpoint", "none", "--workers", 0)
    assert status == 0, out
    training_start, baseline = built_models
    assert same_weights(training_start, baseline)
    assert same_weights(baseline, build_seeded_model(3, "resnet18", 16).state_dict())
    trained = torch.load(run_dir / "checkpoint_last.pt", weights_only=True)["model"]
    assert not torch.equal(trained["head.weight"], baseline["head.weight"])  # training did move it
    assert json.loads((run_dir / "metrics_untrained.json").read_text())["epoch"] == 0


def test_baseline_folder_reproduces_across_processes(synthetic_root, tmp_path):
    """Two fresh processes (two clones) building the untrained baseline get the same numbers."""
    results = []
    for name in ("first", "second"):
        run_script("evaluate", "--run", tmp_path / name, "--checkpoint", "none", "--weights", "none",
                   "--data-dir", synthetic_root, "--resize", 48, "--image-size", 32, "--workers", 0)
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        results.append({k: v for k, v in metrics.items() if k != "checkpoint"})
    assert results[0] == results[1]
    assert results[0]["precision_at_1"] > 0


def test_the_input_size_check_passes_trunks_it_cannot_try_and_catches_small_inputs():
    """RegNet reads tensor values while it is built, which the meta device cannot give: the check
    refused every regnet_* at any size ("too small ... Cannot copy out of meta tensor")."""
    from triplet.errors import UserError
    from triplet.model import check_input_size

    check_input_size("regnet_y_400mf", 224)
    check_input_size("resnet18", 32)
    with pytest.raises(UserError, match="--image-size 32: too small for alexnet"):
        check_input_size("alexnet", 32)
