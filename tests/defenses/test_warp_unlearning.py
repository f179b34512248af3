"""Unlearning warps: random smooth fields, one per image, at true labels remove a warping backdoor."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from trojanlab.data import load_dataset, to_tensor
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


def test_unlearning_warps_removes_a_warping_backdoor_that_fine_tuning_leaves(tmp_path, make_bright_thirds):
    from trojanlab.attacks.run import wanet
    from trojanlab.config import TrainConfig as VictimTraining
    from trojanlab.config import WaNetConfig

    npz = make_bright_thirds(tmp_path / "data.npz", 600, 150, seed=4)
    wanet(WaNetConfig(targets=[2], strength=4.0), VictimTraining(epochs=10, batch_size=32, val_fraction=0.0),
          data=npz, out=tmp_path / "wanet", progress=False)  # fmt: skip
    loaded = load_model(tmp_path / "wanet")
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


def test_bad_warp_settings_are_refused():
    with pytest.raises(ConfigError, match="share"):
        warp_loss(share=0.0)
    with pytest.raises(ConfigError, match="grid sizes"):
        warp_loss(grid_sizes=(1,))
    with pytest.raises(ConfigError, match="strength"):
        random_warps(to_tensor(np.zeros((1, 8, 8, 3), np.uint8)), 0.0, 4)
