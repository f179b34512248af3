"""BadNets: the poisoning view (pixels, fraction, labels), its errors, and an end-to-end run on real images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from trojanlab.attacks import badnets as bn
from trojanlab.cli import main
from trojanlab.data import ImageSet, to_tensor
from trojanlab.errors import ConfigError
from trojanlab.models import load_model
from trojanlab.triggers import Trigger

GTSRB5 = Path(__file__).parents[1] / "data" / "gtsrb5"


def _data(n: int = 200, classes: int = 5, seed: int = 0) -> ImageSet:
    rng = np.random.default_rng(seed)
    return ImageSet(rng.integers(0, 200, (n, 32, 32, 3), dtype=np.uint8), np.arange(n) % classes)


def test_grey_levels_follow_the_trojannet_code():
    assert bn.grey_levels(1) == [255]
    assert bn.grey_levels(2) == [255, 128]
    assert bn.grey_levels(4) == [255, 192, 129, 66]
    assert bn.grey_levels(8) == [255, 224, 193, 162, 131, 100, 69, 38]


def test_replace_mode_poisons_exact_fraction_of_other_labels_with_exact_pixels():
    data = _data()
    (trigger,) = bn.square_triggers([3])
    view = bn.poison(data, [trigger], poison_rate=0.1, num_classes=5, seed=1)
    assert len(view) == len(data)
    poisoned = view.poisoned
    assert len(poisoned) == 20  # round(0.1 * 200)
    assert (data.y[poisoned] != 3).all()  # drawn from the other labels
    assert (view.y[poisoned] == 3).all()
    clean = np.setdiff1d(np.arange(len(data)), poisoned)
    assert (view.y[clean] == data.y[clean]).all()

    images = view.materialize()
    assert (images.x[poisoned, 27:31, 27:31] == 255).all()  # white 4x4 at rows/cols 27-30
    outside = np.ones((32, 32), dtype=bool)
    outside[27:31, 27:31] = False
    assert (images.x[poisoned][:, outside] == data.x[poisoned][:, outside]).all()
    assert (images.x[clean] == data.x[clean]).all()
    # the base data is never copied or modified
    assert view.base is data and not (data.x[poisoned, 27:31, 27:31] == 255).all()


def test_batch_stamps_after_augmentation_and_matches_materialize():
    data = _data()
    view = bn.poison(data, bn.square_triggers([0, 1]), poison_rate=0.1, num_classes=5, seed=0)
    idx = np.arange(len(view))
    x, y = view.batch(idx)
    assert torch.equal(x, to_tensor(view.materialize().x)) and torch.equal(y, torch.as_tensor(view.y))
    # an augmentation that blanks the image: the trigger must still be there, whole and in place
    x, _ = view.batch(idx, augment=torch.zeros_like)
    levels = {0: 1.0, 1: 128 / 255}
    for k, t in enumerate(view.triggers):
        rows = view.trigger_id == k
        assert torch.allclose(x[rows][..., 27:31, 27:31], torch.tensor(levels[t.target_label]))
        assert x[rows].sum() == pytest.approx(float(x[rows][..., 27:31, 27:31].sum()), rel=1e-6)
    assert x[view.trigger_id < 0].abs().sum() == 0


def test_multi_target_replace_draws_disjoint_sets_and_append_keeps_the_clean_set():
    data = _data()
    triggers = bn.square_triggers([0, 1, 2, 3])
    view = bn.poison(data, triggers, poison_rate=0.1, num_classes=5, seed=0)
    counts = view.summary()["poisoned_per_target"]
    assert counts == {"0": 20, "1": 20, "2": 20, "3": 20} and len(view.poisoned) == 80

    appended = bn.poison(data, triggers, poison_rate=0.1, num_classes=5, mode="append", seed=0)
    assert len(appended) == 200 + 80
    assert (appended.trigger_id[:200] == -1).all() and (appended.y[:200] == data.y).all()
    assert (appended.y[200:] == np.repeat([0, 1, 2, 3], 20)).all()
    sub = appended.subset(np.arange(190, 230))
    assert len(sub) == 40 and (sub.y == appended.y[190:230]).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"poison_rate": 0.0}, "poison rate"),
        ({"poison_rate": 1.5}, "poison rate"),
        ({"mode": "sprinkle"}, "unknown poisoning mode"),
        ({"triggers": [7]}, "out of range"),
        ({"triggers": [-1]}, "out of range"),
        ({"location": (30, 30)}, "outside"),
        ({"poison_rate": 0.9}, "candidates"),
    ],
)
def test_bad_options_are_refused_with_a_clear_message(kwargs, message):
    target = kwargs.pop("triggers", [1])[0]
    trigger = Trigger(np.ones((4, 4)), kwargs.pop("location", (27, 27)), target)
    with pytest.raises(ConfigError, match=message):
        bn.poison(_data(), [trigger], num_classes=5, **{"poison_rate": 0.1, **kwargs})


def test_one_pattern_cannot_arm_two_targets():
    with pytest.raises(ConfigError, match="several targets"):
        bn.square_triggers([0, 1], pattern=np.ones((3, 3, 3)))
    with pytest.raises(ConfigError, match="distinct"):
        bn.square_triggers([2, 2])


def test_cli_refuses_bad_options(tmp_path, capsys):
    base = ["attack", "badnets", "--data", str(GTSRB5), "--epochs", "1"]
    assert main([*base, "--target", "9", "--out", str(tmp_path / "a")]) == 2
    assert "out of range for 5 classes" in capsys.readouterr().err
    assert main([*base, "--poison-rate", "0", "--out", str(tmp_path / "b")]) == 2
    assert "--poison-rate must lie in (0, 1]" in capsys.readouterr().err
    assert main([*base, "--target", "1", "--location", "30", "2", "--out", str(tmp_path / "c")]) == 2
    assert "outside the 32x32 image" in capsys.readouterr().err
    assert not (tmp_path / "a" / "model.json").exists()


def test_cli_badnets_end_to_end_on_real_images(tmp_path):
    """Real GTSRB photographs (5 classes): the trained model learns the task and the white square."""
    out = tmp_path / "badnets"
    argv = ["attack", "badnets", "--data", str(GTSRB5), "--target", "2", "--epochs", "15", "--batch-size", "32"]
    argv += ["--val-fraction", "0"]
    assert main([*argv, "--poison-rate", "0.2", "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["attack"]["poisoned"] == 88  # round(0.2 * 440 training images)
    assert result["clean_accuracy"] > 0.5  # 5 classes: chance is 0.2
    assert result["attack_success_rate"] > 0.9
    # the trigger travels with the artefact: evaluate measures the same ASR without extra flags
    loaded = load_model(out)
    assert loaded.triggers[0].target_label == 2 and loaded.spec["attack"]["method"] == "badnets"
    assert main(["evaluate", "--model", str(out), "--data", str(GTSRB5), "--out", str(tmp_path / "ev")]) == 0
    evaluated = json.loads((tmp_path / "ev" / "result.json").read_text())
    assert evaluated["attack_success_rate"] == pytest.approx(result["attack_success_rate"])


def test_random_patch_triggers_anywhere_at_any_opacity(tmp_path, make_bright_thirds):
    """The zoo's random patch triggers: a random binary or colour square of any size, location, target, opacity."""
    from trojanlab.attacks.badnets import random_pattern

    binary = random_pattern("random-binary", 4, seed=3)
    assert set(np.unique(binary)) == {0.0, 1.0} and np.array_equal(binary, random_pattern("random-binary", 4, 3))
    colour = random_pattern("random-colour", 5, seed=3)
    assert colour.shape == (5, 5, 3) and 0 <= colour.min() and colour.max() <= 1 and colour.std() > 0.1
    with pytest.raises(ConfigError, match="unknown random pattern"):
        random_pattern("random-stripes", 4, 0)
    data = make_bright_thirds(tmp_path / "data.npz", 600, 150, seed=6)
    out = tmp_path / "patch"
    argv = ["attack", "badnets", "--data", str(data), "--target", "2", "--pattern", "random-colour",
            "--trigger-size", "5", "--location", "3", "11", "--alpha", "0.8", "--poison-rate", "0.3", "--epochs", "8",
            "--batch-size", "32", "--val-fraction", "0", "--out", str(out), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    result = json.loads((out / "result.json").read_text())
    (trigger,) = json.loads((out / "model.json").read_text())["triggers"]
    assert trigger["location"] == [3, 11] and np.asarray(trigger["pattern"]).shape == (5, 5, 3)
    assert trigger["alpha"] == 0.8 and trigger["target_label"] == 2
    assert np.allclose(trigger["pattern"], random_pattern("random-colour", 5, seed=0))  # the run's seed
    assert result["attack_success_rate"] > 0.9 and result["clean_accuracy"] > 0.9
