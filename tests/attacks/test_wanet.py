"""WaNet: the warping trigger moves pixels (not paints them), travels with the model, and the noise mode keeps
labels; the attack plants a backdoor ``evaluate`` measures."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from trojanlab.attacks.wanet import noise_mode, poison_warped, warp_field, warp_triggers
from trojanlab.cli import main
from trojanlab.data import ImageSet
from trojanlab.errors import ArtifactError, ConfigError
from trojanlab.models.artifacts import SPEC_FILE, load_model
from trojanlab.triggers import WarpTrigger, stamp, trigger_from_json


def test_a_constant_field_shifts_a_ramp_by_the_distance_the_strength_asks_for():
    width = 33  # grid units per pixel: 2 / (width - 1) = 1/16
    ramp = torch.linspace(0, 1, width).repeat(1, width, 1)  # (1, 33, 33): value = column / 32
    flow = np.zeros((4, 4, 2), np.float32)
    flow[..., 0] = 1.0  # every pixel reads from further right
    trigger = WarpTrigger(flow, strength=8.0, target_label=0)  # 8 / 33 grid units = 3.88 pixels
    moved = stamp(ramp, trigger)
    shift = 8.0 / 33 * 16  # pixels
    inner = moved[0, :, 2:20]  # away from the right border, where sampling clamps
    expected = (torch.arange(2, 20) + shift) / 32
    assert torch.allclose(inner, expected.expand_as(inner), atol=1e-5)
    still = WarpTrigger(flow, strength=1e-6, target_label=0)
    assert torch.allclose(stamp(ramp, still), ramp, atol=1e-5)


def test_a_warp_moves_many_pixels_slightly_and_travels_as_json():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    first, second = warp_triggers([2, 5], seed=3)
    warped = stamp(images, first).astype(int)
    changed = np.abs(warped - images)
    assert (changed > 0).mean() > 0.5  # no patch: the whole image moves
    assert not np.array_equal(warped, stamp(images, second))  # one field per target
    again = trigger_from_json(json.loads(json.dumps(first.to_json())))
    assert isinstance(again, WarpTrigger) and np.array_equal(stamp(images, again), warped)
    floats = stamp(torch.as_tensor(images).permute(0, 3, 1, 2).float() / 255, first)
    assert np.abs(np.rint(floats.permute(0, 2, 3, 1).numpy() * 255) - warped).max() <= 1  # uint8 and floats agree
    assert np.abs(warp_field(4, 9)).mean() == pytest.approx(1.0)  # the official scaling


def test_noise_mode_draws_fresh_jitter_and_keeps_labels():
    (trigger,) = warp_triggers([1], seed=0)
    noisy = noise_mode(trigger)
    image = torch.rand(2, 3, 32, 32)
    assert not torch.equal(stamp(image, noisy), stamp(image, noisy))  # fresh noise each time
    again = trigger_from_json(json.loads(json.dumps(noisy.to_json())))
    assert again.noise == 1.0 and again.relabels is False and trigger_from_json(trigger.to_json()).relabels
    data = ImageSet(np.zeros((200, 32, 32, 3), np.uint8), np.arange(200) % 4)
    view = poison_warped(data, [trigger], poison_rate=0.1, cross_ratio=2.0, num_classes=4, seed=0)
    summary = view.summary()
    assert summary["poisoned_per_target"] == {"1": 20} and summary["noise_mode_samples"] == 40
    relabelled = view.trigger_id == 0
    kept = view.trigger_id == 1
    assert (view.y[relabelled] == 1).all() and (data.y[relabelled] != 1).all()
    assert np.array_equal(view.y[kept], data.y[kept]) and not (relabelled & kept).any()
    with pytest.raises(ConfigError, match="unpoisoned"):
        poison_warped(data, [trigger], poison_rate=0.3, cross_ratio=3.0, num_classes=4)


def test_wanet_through_the_command_line_plants_a_backdoor_evaluate_measures(tmp_path, make_bright_thirds, capsys):
    data = make_bright_thirds(tmp_path / "data.npz", 600, 150, seed=4)
    out = tmp_path / "wanet"
    argv = ["attack", "wanet", "--data", str(data), "--target", "2", "--strength", "4", "--epochs", "10",
            "--batch-size", "32", "--val-fraction", "0", "--out", str(out), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["method"] == "wanet" and result["targets"] == [2]
    assert result["attack"]["poisoned"] == 60 and result["attack"]["noise_mode_samples"] == 120
    assert result["clean_accuracy"] > 0.9 and result["attack_success_rate"] > 0.8
    (trigger,) = load_model(out).triggers
    assert isinstance(trigger, WarpTrigger) and trigger.strength == 4 and trigger.noise == 0
    capsys.readouterr()
    assert main(["evaluate", "--model", str(out), "--data", str(data), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["attack_success_rate"] == pytest.approx(result["attack_success_rate"])
    assert main([*argv[:-3], "--out", str(tmp_path / "bad"), "--grid-size", "1"]) == 2
    assert "--grid-size must be at least 2" in capsys.readouterr().err


def test_a_malformed_warp_trigger_in_a_spec_is_named(tmp_path, small_backdoor):
    import shutil

    model, _ = small_backdoor
    copy = tmp_path / "copy"
    shutil.copytree(model, copy)
    spec_file = copy / SPEC_FILE
    spec = json.loads(spec_file.read_text())
    spec["triggers"] = [{"type": "warp", "target_label": 0, "flow": [[1, 2]], "strength": 0.5}]
    spec_file.write_text(json.dumps(spec))
    with pytest.raises(ArtifactError, match="trigger 0 is malformed"):
        load_model(copy)
    spec["triggers"] = [{"type": "spiral", "target_label": 0}]
    spec_file.write_text(json.dumps(spec))
    with pytest.raises(ArtifactError, match="unknown trigger type 'spiral'"):
        load_model(copy)
