"""The held-out measure: checked against the model's stated clean accuracy, jittered where the images are fitted,
refused where nothing tracks it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from trojanlab.data import ImageSet
from trojanlab.defenses.heldout import Jitter, held_out_measure, recorded_clean_accuracy
from trojanlab.errors import DataError


class Brightness(nn.Module):
    """Class 1 when the image is brighter than 0.5: right on every generated image, wrong on jittered ones whose
    brightness moved past the boundary."""

    def forward(self, x):
        mean = x.mean((1, 2, 3))
        return torch.stack([0.5 - mean, mean - 0.5], 1) * 50


def _images(n=200, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    level = np.where(y == 1, 0.62, 0.38) + rng.normal(0, 0.03, n)
    x = np.clip(level[:, None, None, None] + rng.normal(0, 0.02, (n, 8, 8, 3)), 0, 1)
    x = np.round(x * 255).astype(np.uint8)
    return ImageSet(x, y.astype(np.int64))


def test_fitted_images_are_jittered_until_the_model_scores_its_stated_accuracy():
    images = _images()
    model = Brightness()
    measure = held_out_measure(model, images, 0.8, "stated", seed=1)
    assert measure.plain == 1.0 and measure.checked
    assert measure.strength > 0
    assert measure.base == pytest.approx(0.8, abs=0.02)
    assert measure.score(model) == measure.base  # the images are drawn once: the same score every time
    assert len(measure.y) == 8 * len(images)  # eight jittered copies of each image
    # a model that lost accuracy scores lower on the jittered images: the predicted drop is positive
    worse = nn.Sequential(Brightness())
    worse.register_forward_pre_hook(lambda _m, inputs: (inputs[0] * 0.8,))  # everything darker: class 1 suffers
    assert measure.predicted_drop(worse) > 0.05


def test_images_that_read_the_stated_accuracy_are_used_as_they_are():
    images = _images()
    measure = held_out_measure(Brightness(), images, 1.0, "stated")
    assert measure.checked and measure.strength == 0 and measure.base == 1.0
    wrong = _images(200, seed=2)
    wrong.y[:4] = 1 - wrong.y[:4]  # 98 %: below the stated 99 % by less than two standard errors
    below = held_out_measure(Brightness(), wrong, 0.99, "stated")
    assert below.checked and below.strength == 0 and below.base == 0.98
    slightly_above = held_out_measure(Brightness(), images, 0.99, "stated")  # fitted, however little: jittered
    assert slightly_above.strength > 0 and slightly_above.base == pytest.approx(0.99, abs=0.01)
    unchecked = held_out_measure(Brightness(), images, None)
    assert not unchecked.checked and unchecked.strength == 0 and "unchecked" in unchecked.describe()


def test_no_measure_that_tracks_the_stated_accuracy_is_refused():
    images = _images()
    wrong = _images(200, seed=2)
    wrong.y[:60] = 1 - wrong.y[:60]  # 30 % mislabelled: the model scores ~70 % on them
    with pytest.raises(DataError, match="do not measure it"):
        held_out_measure(Brightness(), wrong, 0.95, "stated")
    # an accuracy no jitter brings the score down to: refused too
    with pytest.raises(DataError, match="no measure here tracks"):
        held_out_measure(Brightness(), images, 0.02, "stated")


def test_jitter_strength_scales_one_draw():
    x = torch.rand(4, 3, 8, 8)
    jitter = Jitter(x, copies=2, seed=0)
    assert torch.equal(jitter.apply(0), x.repeat(2, 1, 1, 1))
    weak, strong = (jitter.apply(s) - jitter.x for s in (0.5, 2.0))
    assert 0 < weak.abs().mean() < strong.abs().mean()
    assert torch.equal(Jitter(x, 2, seed=0).apply(1.0), jitter.apply(1.0))


def test_recorded_clean_accuracy_is_read_beside_the_artefact(tmp_path):
    model = tmp_path / "run" / "model"
    model.mkdir(parents=True)
    assert recorded_clean_accuracy(model) is None
    (tmp_path / "run" / "result.json").write_text(json.dumps({"clean_accuracy": 0.93}))
    assert recorded_clean_accuracy(model) == 0.93
    (model / "result.json").write_text(json.dumps({"after": {"clean_accuracy": 0.9}, "clean_accuracy": 0.5}))
    assert recorded_clean_accuracy(model) == 0.9  # a repaired artefact: the accuracy after its repair
    (model / "result.json").write_text("not json")
    assert recorded_clean_accuracy(model) == 0.93
