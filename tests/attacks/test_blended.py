"""Blended (Chen et al. 2017): whole-image triggers at a low opacity, poisoned and trained like BadNets."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from trojanlab.attacks.blended import blend_triggers
from trojanlab.cli import main
from trojanlab.errors import ConfigError
from trojanlab.triggers import Trigger, stamp


def test_a_blended_trigger_moves_every_pixel_a_little_toward_its_pattern():
    images = np.full((4, 32, 32, 3), 100, np.uint8)
    first, second = blend_triggers([0, 2], (3, 32, 32), alpha=0.2, seed=5)
    moved = stamp(images, first).astype(int) - images
    assert (moved != 0).mean() > 0.9  # no patch: nearly the whole image carries the trigger
    assert np.abs(moved).max() <= 32  # at most 0.2 of the way to black (100) or white (155), rounded
    assert not np.array_equal(stamp(images, first), stamp(images, second))  # one pattern per target
    again = blend_triggers([0], (3, 32, 32), alpha=0.2, seed=5)[0]
    assert np.array_equal(stamp(images, again), stamp(images, first))  # the seed decides the noise
    stronger = stamp(images, blend_triggers([0], (3, 32, 32), alpha=0.4, seed=5)[0]).astype(int) - images
    assert np.abs(stronger).mean() > 1.8 * np.abs(moved).mean()  # opacity scales the change
    # the trigger travels with a model as JSON
    assert np.array_equal(stamp(images, Trigger.from_json(json.loads(json.dumps(first.to_json())))),
                          stamp(images, first))  # fmt: skip


def test_a_natural_image_pattern_is_resized_to_the_data(tmp_path):
    ramp = np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (48, 1))  # dark left, bright right
    Image.fromarray(np.stack([ramp] * 3, axis=-1)).save(tmp_path / "kitty.png")
    (trigger,) = blend_triggers([3], (3, 32, 32), alpha=1.0, pattern=str(tmp_path / "kitty.png"))
    assert trigger.pattern.shape == (32, 32, 3) and trigger.location == (0, 0)
    assert trigger.pattern[:, :4].mean() < 0.15 and trigger.pattern[:, -4:].mean() > 0.85
    (grey,) = blend_triggers([3], (1, 16, 16), alpha=0.5, pattern=str(tmp_path / "kitty.png"))
    assert grey.pattern.shape == (16, 16, 1)
    with pytest.raises(ConfigError, match="cannot arm several targets"):
        blend_triggers([0, 1], (3, 32, 32), pattern=str(tmp_path / "kitty.png"))
    with pytest.raises(ConfigError, match="not found"):
        blend_triggers([0], (3, 32, 32), pattern=str(tmp_path / "missing.png"))


def test_blended_through_the_command_line_plants_a_backdoor_evaluate_measures(tmp_path, make_bright_thirds, capsys):
    data = make_bright_thirds(tmp_path / "data.npz", 600, 150, seed=4)
    out = tmp_path / "blended"
    argv = ["attack", "blended", "--data", str(data), "--target", "1", "--poison-rate", "0.2", "--epochs", "8",
            "--batch-size", "32", "--val-fraction", "0", "--out", str(out), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["method"] == "blended" and result["targets"] == [1]
    assert result["attack"]["poisoned"] == 120 and result["alpha"] == 0.2
    assert result["clean_accuracy"] > 0.9 and result["attack_success_rate"] > 0.9
    capsys.readouterr()
    assert main(["evaluate", "--model", str(out), "--data", str(data), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["attack_success_rate"] == pytest.approx(result["attack_success_rate"])
    assert main([*argv[:-3], "--out", str(tmp_path / "two"), "--target", "0", "2", "--pattern", "x.png"]) == 2
    assert "one image cannot arm several targets" in capsys.readouterr().err
