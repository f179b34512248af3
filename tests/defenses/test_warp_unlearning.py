"""Unlearning warps: random smooth fields, one per image, at true labels remove a warping backdoor."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from trojanlab.config import DefenderConfig, WarpUnlearnConfig
from trojanlab.data import load_dataset, to_tensor
from trojanlab.defenses import defend
from trojanlab.defenses.warp_unlearning import random_warps, unlearn_warps, warp_loss
from trojanlab.errors import ConfigError
from trojanlab.evaluation import attack_success_rate, clean_accuracy
from trojanlab.models import load_model
from trojanlab.training import TrainConfig, fit


def test_random_warps_move_each_image_its_own_way_within_the_strength():
    ramp = torch.linspace(0, 1, 32).expand(32, 32)  # brightness grows left to right: a move shows as a change
    x = ramp.expand(4, 3, 32, 32).clone()
    warped = random_warps(x, strength=4.0, grid_size=4, generator=torch.Generator().manual_seed(0))
    assert warped.shape == x.shape and warped.min() >= 0 and warped.max() <= 1
    moved = (warped - x).abs()
    assert (moved.flatten(1).amax(1) > 1e-3).all()  # every image moved (by a strength drawn in [0, 4])
    assert not torch.allclose(warped[0], warped[1], atol=1e-3)  # each by its own field
    # a pixel moves by at most strength x (largest control offset) / H in grid units: here a few pixels, so a ramp
    # of slope 1/31 per pixel changes by well under half its range
    assert moved.max() < 0.5
    again = random_warps(x, strength=4.0, grid_size=4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(warped, again)  # the same draws for the same generator
    still = random_warps(x, strength=1e-6, grid_size=4, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(still, x, atol=1e-4)


def test_unlearning_warps_removes_a_warping_backdoor_that_fine_tuning_leaves(warp_backdoor):
    model, npz = warp_backdoor
    loaded = load_model(model)
    splits = load_dataset(npz)
    (trigger,) = loaded.triggers
    assert attack_success_rate(loaded.module, splits.test, trigger) > 0.8
    defender = splits.train.subset(np.arange(200))  # a third of the training split
    # a gentle schedule: on this easy rule 1e-3 lets plain fine-tuning forget the warp too (measured)
    cfg = TrainConfig(epochs=2, batch_size=32, lr=3e-4, val_fraction=0.0, seed=0)
    plain, unwarped = copy.deepcopy(loaded.module), copy.deepcopy(loaded.module)
    fit(plain, defender, cfg, progress=False)
    unlearn_warps(unwarped, defender, cfg, progress=False)
    assert attack_success_rate(plain, splits.test, trigger) > 0.5  # 0.95 measured
    assert attack_success_rate(unwarped, splits.test, trigger) < 0.2  # 0.0 measured
    assert clean_accuracy(unwarped, splits.test) > 0.9


def test_the_warp_unlearn_defense_reports_what_it_cost_on_the_held_out_images(warp_backdoor, tmp_path):
    model, npz = warp_backdoor
    cfg = WarpUnlearnConfig(epochs=2, lr=3e-4, grid_sizes=[4, 8])  # a list, as the command line gives it
    assert cfg.grid_sizes == (4, 8)
    report = defend("warp-unlearn", model, cfg, data=npz, defender=DefenderConfig(clean_fraction=0.4, holdout=0.2),
                    out=tmp_path / "run", progress=False)  # fmt: skip
    assert report.before["attack_success_rate"] > 0.8 and report.after["attack_success_rate"] < 0.2
    assert report.after["clean_accuracy"] > 0.9
    written = json.loads((tmp_path / "run" / "result.json").read_text())
    # the rule's prediction read on held-out images the model never fitted: within a few images of the test drop
    measured = report.before["clean_accuracy"] - report.after["clean_accuracy"]
    assert abs(written["predicted_clean_accuracy_drop"] - measured) < 0.05
    # 0.4 of the 600 training images, about a fifth of them held out (stratified by class)
    assert written["epochs"] == 2 and 185 <= written["unlearning_images"] <= 195
    assert (tmp_path / "run" / "repaired" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    ("setting", "named"),
    [({"strength": 0.0}, "strength"), ({"epochs": 0}, "epochs"), ({"share": 1.5}, "share"),
     ({"grid_sizes": ()}, "grid_sizes"), ({"grid_sizes": (4, 1)}, "grid_sizes"), ({"lr": -1.0}, "lr")],
)  # fmt: skip
def test_bad_warp_unlearn_settings_are_refused(setting, named):
    with pytest.raises(ConfigError, match=named):
        WarpUnlearnConfig(**setting)


def test_bad_warp_settings_are_refused():
    with pytest.raises(ConfigError, match="share"):
        warp_loss(share=0.0)
    with pytest.raises(ConfigError, match="grid sizes"):
        warp_loss(grid_sizes=(1,))
    with pytest.raises(ConfigError, match="strength"):
        random_warps(to_tensor(np.zeros((1, 8, 8, 3), np.uint8)), 0.0, 4)
