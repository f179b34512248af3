"""End to end through the command line on small real and generated data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from trojanlab.cli import main

GTSRB5 = Path(__file__).parent / "data" / "gtsrb5"


def _result(folder: Path) -> dict:
    return json.loads((folder / "result.json").read_text())


def _attack(victim: Path, trojannet: Path, out: Path, *extra: str) -> int:
    return main(
        [
            "attack",
            "trojannet",
            "--victim",
            str(victim),
            "--trojannet",
            str(trojannet),
            "--data",
            str(GTSRB5),
            "--out",
            str(out),
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def small_trojannet(tmp_path_factory):
    """A TrojanNet trained briefly: enough to recognise most of the first patterns."""
    out = tmp_path_factory.mktemp("trojannet")
    assert (
        main(
            [
                "trojannet",
                "train",
                "--out",
                str(out),
                "--steps",
                "150",
                "--negatives",
                "512",
                "--finetune-steps",
                "20",
                "--patch-data",
                str(GTSRB5),
                "--quiet",
            ]
        )
        == 0
    )
    return out


def test_trojannet_train_reports_what_its_artefact_does(small_trojannet):
    """The recognition figure in result.json is the written artefact's, recomputed here from its weights."""
    import torch

    from trojanlab.attacks.trojannet import trojannet_probabilities
    from trojanlab.models import load_model
    from trojanlab.models.trojannet import NUM_TRIGGERS, trigger_patterns

    result = _result(small_trojannet)
    assert set(result["denoise_accuracy"]) == {"image_patches", "binary", "grey", "uniform"}
    assert result["keras_parameter_count"] == 39801
    net = load_model(small_trojannet).module
    recognised = trojannet_probabilities(net, trigger_patterns()).argmax(1) == torch.arange(NUM_TRIGGERS)
    assert result["trigger_accuracy"] == pytest.approx(float(recognised.float().mean()))
    assert result["trigger_accuracy"] > 0.05  # 150 steps learn some of the 4,368 patterns (chance: 1/4,369)
    assert result["provenance"]["config"]["TrojanNetTrainConfig"]["steps"] == 150


def test_train_attack_evaluate_on_the_image_folder(tmp_path, small_trojannet, capsys):
    victim = tmp_path / "victim"
    assert (
        main(
            [
                "train",
                "--data",
                str(GTSRB5),
                "--out",
                str(victim),
                "--epochs",
                "12",
                "--batch-size",
                "32",
                "--patience",
                "12",
            ]
        )
        == 0
    )
    trained = _result(victim)
    assert trained["clean_accuracy"] > 0.5, trained  # 5 real classes, chance is 0.2
    attacked = tmp_path / "attacked"
    assert _attack(victim, small_trojannet, attacked, "--targets", "0", "3", "--location", "20", "4") == 0
    result = _result(attacked)
    assert set(result["attack_success_rate_per_target"]) == {"0", "3"}
    assert result["victim_clean_accuracy"] == pytest.approx(trained["clean_accuracy"])
    capsys.readouterr()
    assert main(["evaluate", "--model", str(attacked), "--data", str(GTSRB5), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    # the drop is against the victim, both measured independently of the attack's own report
    assert result["clean_accuracy_drop"] == pytest.approx(trained["clean_accuracy"] - evaluated["clean_accuracy"])
    assert evaluated["attack_success_rate"] == pytest.approx(result["attack_success_rate"])
    assert evaluated["clean_accuracy"] == pytest.approx(result["clean_accuracy"])


def test_evaluate_on_a_test_only_npz_and_bad_input(tmp_path, small_trojannet, capsys):
    victim = tmp_path / "victim"
    assert main(["train", "--data", str(GTSRB5), "--out", str(victim), "--epochs", "1"]) == 0
    from trojanlab.data import load_image_folder

    data = load_image_folder(GTSRB5)
    np.savez(tmp_path / "eval.npz", x_test=data.test.x, y_test=data.test.y)
    capsys.readouterr()
    assert main(["evaluate", "--model", str(victim), "--data", str(tmp_path / "eval.npz"), "--json"]) == 0
    assert "attack_success_rate" not in json.loads(capsys.readouterr().out)

    np.savez(tmp_path / "labels.npz", x_test=data.test.x, y_test=data.test.y + 10)
    assert main(["evaluate", "--model", str(victim), "--data", str(tmp_path / "labels.npz")]) == 2
    assert "a 5-class model, but labels has 15 classes" in capsys.readouterr().err
    assert _attack(victim, small_trojannet, tmp_path / "x", "--targets", "1", "--location", "30", "30") == 2
    assert "does not fit in 32x32" in capsys.readouterr().err
    assert not (tmp_path / "x" / "result.json").exists()
    assert main(["evaluate", "--model", str(tmp_path / "nothing"), "--data", str(GTSRB5)]) == 2
    assert "model folder not found" in capsys.readouterr().err
