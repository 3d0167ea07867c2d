"""The study's published test numbers, kept as data so every report compares against the source.

Source: Khashayar Zardoui and Paolo Junior Angeloni, "Metric Learning: Triplet-Loss",
Dept. of Computer Science & Software Engineering, Concordia University, Montreal. Section V
"Evaluation results" (Tables I-XVI) and Section VI "Extended training with ResNet18"
(Tables XVII-XX). Values are transcribed digit for digit; do not round or "fix" them.

The study trained ImageNet-pretrained ResNet18 (about 11.4 M parameters) and ResNet34 (about
21.5 M) with ``nn.TripletMarginLoss`` and Adam on CUB-200-2011, with these hyper-parameters:

    exp1: 20 epochs, lr 0.001, batch 32        exp4: 20 epochs, lr 0.002, batch 64
    exp2: 20 epochs, lr 0.002, batch 32        exp5: 60 epochs, lr 0.001, batch 32 (ResNet18 only)
    exp3: 20 epochs, lr 0.001, batch 64        exp6: 60 epochs, lr 0.001, batch 64 (ResNet18 only)

What the columns mean: ``loss`` is the mean test triplet loss; ``triplet_accuracy`` is the
study's "Top-1 Accuracy (%)", the share of test triplets whose positive is nearer the anchor than
the negative; ``cos_sim_ap`` / ``cos_sim_an`` are mean anchor-positive / anchor-negative cosine
similarities; ``precision_at_k`` (%) were computed with the study's own retrieval protocol, which
it does not fully specify, so comparisons with ours are indicative.
"""
import re

SOURCE = ('K. Zardoui and P. J. Angeloni, "Metric Learning: Triplet-Loss", Concordia University '
          '(Tables I-XX)')

EXPERIMENTS = {
    "exp1": {"epochs": 20, "lr": 0.001, "batch_size": 32},
    "exp2": {"epochs": 20, "lr": 0.002, "batch_size": 32},
    "exp3": {"epochs": 20, "lr": 0.001, "batch_size": 64},
    "exp4": {"epochs": 20, "lr": 0.002, "batch_size": 64},
    "exp5": {"epochs": 60, "lr": 0.001, "batch_size": 32},
    "exp6": {"epochs": 60, "lr": 0.001, "batch_size": 64},
}

METRICS = ("loss", "triplet_accuracy", "cos_sim_ap", "cos_sim_an",
           "precision_at_1", "precision_at_5", "precision_at_10")


def _row(loss, accuracy, cos_ap, cos_an, p1, p5, p10, tables):
    return dict(zip(METRICS + ("tables",), (loss, accuracy, cos_ap, cos_an, p1, p5, p10, tables)))


# (experiment, backbone) -> published test metrics, and the tables they come from.
STUDY = {
    ("exp1", "resnet18"): _row(0.5020, 79.60, 0.6735, 0.0359, 33.74, 33.83, 32.55, "I, II"),
    ("exp2", "resnet18"): _row(0.5932, 75.04, 0.6542, 0.1330, 25.93, 31.28, 31.60, "III, IV"),
    ("exp3", "resnet18"): _row(0.3277, 89.11, 0.7762, -0.0004, 39.92, 44.03, 42.51, "V, VI"),
    ("exp4", "resnet18"): _row(0.5633, 76.53, 0.6284, 0.0632, 31.69, 28.48, 27.04, "VII, VIII"),
    ("exp1", "resnet34"): _row(0.5902, 75.85, 0.6200, 0.0994, 31.69, 30.12, 30.37, "IX, X"),
    ("exp2", "resnet34"): _row(0.5829, 75.63, 0.6727, 0.1282, 26.34, 29.14, 29.42, "XI, XII"),
    ("exp3", "resnet34"): _row(0.4440, 83.28, 0.7201, 0.0272, 34.98, 30.86, 29.55, "XIII, XIV"),
    ("exp4", "resnet34"): _row(0.6131, 73.66, 0.6504, 0.1431, 25.51, 28.31, 27.08, "XV, XVI"),
    ("exp5", "resnet18"): _row(0.4344, 83.53, 0.7268, 0.0781, 33.74, 35.97, 34.86, "XVII, XVIII"),
    ("exp6", "resnet18"): _row(0.3081, 89.61, 0.7707, 0.0127, 46.91, 44.69, 42.84, "XIX, XX"),
}

_RUN_NAME = re.compile(r"^(exp[1-6])-(resnet18|resnet34)$")


# How every study experiment was run, besides its epochs, lr and batch size (Makefile exp1-6).
PROTOCOL = {"mining": "none", "split": "official", "image_size": 224, "weights": "imagenet", "margin": 1.0}


def matching_experiment(run_name, options, dataset_kind):
    """The study's (experiment, backbone) a run can be compared with: its folder is named after
    one, it ran on the real CUB, and its options are that experiment's; None otherwise (a 2-epoch
    synthetic run named ``exp1-resnet18`` is not the study's experiment 1)."""
    key = study_key(run_name)
    if key is None or dataset_kind != "cub":
        return None
    expected = {**PROTOCOL, **EXPERIMENTS[key[0]], "backbone": key[1]}
    return key if all(options.get(k) == v for k, v in expected.items()) else None


def study_key(run_name):
    """``("exp1", "resnet18")`` for a run folder named ``exp1-resnet18``; None for any other name
    or for a pair the study did not run (exp5/exp6 exist only for ResNet18)."""
    match = _RUN_NAME.match(run_name)
    key = match.groups() if match else None
    return key if key in STUDY else None
