"""Adversarial Neuron Pruning: neurons of any model, exact hooks, pruning on the original weights, the rules."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trojanlab.cli import main
from trojanlab.data import ImageSet, to_tensor
from trojanlab.defenses import anp
from trojanlab.errors import ConfigError
from trojanlab.models import Classifier, build_network
from trojanlab.models.gtsrb_cnn import GTSRBCNN
from trojanlab.models.trojannet import TrojanNetInjected, TrojanNetMLP
from trojanlab.training import read_checkpoint

from ..conftest import GTSRB5


def _gtsrb_cnn(classes: int = 4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Classifier(GTSRBCNN(classes), [0.5] * 3, [0.25] * 3).eval()


def _resnet(classes: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return Classifier(build_network("resnet18", classes, (3, 32, 32)), [0.5] * 3, [0.25] * 3).eval()


def _injected(classes: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return TrojanNetInjected(_gtsrb_cnn(classes), TrojanNetMLP(), classes, [1], (1, 1), (3, 32, 32)).eval()


def _images(n: int = 32, classes: int = 4, seed: int = 0) -> ImageSet:
    rng = np.random.default_rng(seed)
    return ImageSet(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, classes, n))


def test_neurons_of_a_plain_a_batchnorm_and_an_injected_model():
    x = to_tensor(_images(2).x)
    plain = anp.find_neurons(_gtsrb_cnn(), x, num_classes=4)
    # six convolutions and FC-512; the classifier layer (FC-4) is excluded unless asked for
    assert [(layer.kind, layer.size) for layer in plain] == [("conv", c) for c in (32, 32, 64, 64, 128, 128)] + [
        ("linear", 512)
    ]
    with_head = anp.find_neurons(_gtsrb_cnn(), x, num_classes=4, include_classifier=True)
    assert with_head[-1].size == 4 and sum(layer.size for layer in with_head) == 964
    # resnet18: every BN channel is a neuron and no convolution (they all feed a BN); fc excluded
    resnet = anp.find_neurons(_resnet(), x, num_classes=4)
    assert {layer.kind for layer in resnet} == {"bn"}
    assert sum(layer.size for layer in resnet) == sum(
        m.num_features for m in _resnet().modules() if isinstance(m, nn.BatchNorm2d)
    )
    # TrojanNet-injected: the victim's 960 + TrojanNet's 4 x 8 BN channels (its Linear -> ReLU -> BN units are the
    # BN's) + its 4,369-unit output layer
    injected = anp.find_neurons(_injected(), x, num_classes=4)
    kinds = [(layer.name.split(".")[0], layer.kind, layer.size) for layer in injected]
    assert kinds.count(("trojannet", "bn", 8)) == 4
    assert ("trojannet", "linear", 4369) in kinds
    assert sum(layer.size for layer in injected if layer.name.startswith("victim")) == 960


@pytest.mark.parametrize("make", [_gtsrb_cnn, _resnet, _injected], ids=["no-bn", "resnet18", "trojannet"])
def test_mask_one_without_noise_leaves_outputs_bit_identical(make):
    model = make()
    x = to_tensor(_images(6).x)
    with torch.no_grad():
        expected, doubled = model(x), model(torch.cat([x, x]))  # (a batch size may change the kernels' rounding)
    noise = anp.NeuronPerturbation(anp.find_neurons(model, x, num_classes=4))
    with noise.attached(), torch.no_grad():
        for mode in ("clean", "perturbed"):
            with noise.using(mode):
                assert torch.equal(model(x), expected)
        with noise.using("both"):
            assert torch.equal(model(torch.cat([x, x])), doubled)
        # and the hooks really act: a perturbation changes the output; the "both" halves match the two modes
        noise.delta.data.uniform_(-0.3, 0.3)
        noise.xi.data.uniform_(-0.3, 0.3)
        noise.mask.data.uniform_(0.5, 1.0)
        with noise.using("clean"):
            clean = model(x)
        with noise.using("perturbed"):
            perturbed = model(x)
        with noise.using("both"):
            both = model(torch.cat([x, x]))
    assert not torch.allclose(perturbed, expected)
    assert torch.allclose(both[:6], clean, atol=1e-5) and torch.allclose(both[6:], perturbed, atol=1e-5)
    with torch.no_grad():
        assert torch.equal(model(x), expected)  # detached: no hook is left behind


def _layer_output(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    store = {}
    handle = layer.register_forward_hook(lambda _m, _i, out: store.__setitem__("out", out.clone()))
    with torch.no_grad():
        model(x)
    handle.remove()
    return store["out"]


@pytest.mark.parametrize("prune_bias", [False, True])
def test_a_pruned_neuron_is_silent(prune_bias):
    x = to_tensor(_images(8).x)
    for model in (_gtsrb_cnn(), _resnet()):
        layers = anp.find_neurons(model, x, num_classes=4)
        picks = [(layer, layer.start + 3) for layer in (layers[0], layers[len(layers) // 2], layers[-1])]
        pruned = anp.prune_neurons(model, layers, [index for _, index in picks], prune_bias=prune_bias)
        modules = dict(pruned.named_modules())
        for layer, index in picks:
            out = _layer_output(pruned, modules[layer.name], x)
            channel = out[:, 3] if out.dim() > 1 else out
            bias = modules[layer.name].bias[3]
            # no signal left: the same value for every input and position - its bias, or exactly zero
            assert torch.all(channel == (0.0 if prune_bias else bias)), layer.name
            other = out[:, 4]
            assert other.std() > 0  # its neighbour still carries a signal


def test_pruning_uses_the_original_weights_and_leaves_the_model_untouched():
    model = _gtsrb_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = _images(64)
    result = anp.optimize_masks(model, data, anp.ANPConfig(iterations=6, batch_size=16), 4, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())  # gradient switches restored
    assert result.masks.min() >= 0 and result.masks.max() <= 1 and not torch.all(result.masks == 1)
    index = result.order()[:40]
    pruned = anp.prune_neurons(model, result.layers, index)
    changed = {k for k, v in pruned.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {f"{layer}.weight" for layer in anp.pruned_per_layer(result.layers, index)}
    for name, value in pruned.state_dict().items():  # every other weight is the original one, bit for bit
        rows = value.reshape(value.shape[0], -1) if value.dim() else value
        if name in changed:
            ref = before[name].reshape(value.shape[0], -1)
            zero = (rows == 0).all(1)
            assert torch.equal(rows[~zero], ref[~zero])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_rules_and_the_automatic_rule_reads_only_clean_held_out_images():
    masks = torch.tensor([0.9, 0.0, 0.5, 0.05, 1.0, 0.2])
    assert anp.select_by_rule(masks, "threshold", 0.2).tolist() == [1, 3, 5]
    assert anp.select_by_rule(masks, "fraction", 0.5).tolist() == [1, 3, 5]
    assert anp.select_by_rule(masks, "count", 2).tolist() == [1, 3]
    with pytest.raises(ConfigError, match="unknown pruning rule"):
        anp.select_by_rule(masks, "best-asr", 0)
    model = _gtsrb_cnn()
    x = to_tensor(_images(2).x)
    layers = anp.find_neurons(model, x, num_classes=4)
    total = sum(layer.size for layer in layers)
    masks = torch.linspace(0, 1, total)[torch.randperm(total, generator=torch.Generator().manual_seed(0))]
    holdout = _images(20, seed=5)
    seen = []
    handle = model.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
    for jitter in (0, 3):
        seen.clear()
        threshold, curve = anp.auto_threshold(model, layers, masks, holdout, tolerance=0.0, jitter=jitter, seed=4)
        x = to_tensor(holdout.x)
        expected = anp.jitter_images(x, jitter, torch.Generator().manual_seed(4)) if jitter else x
        # every image the rule looked at is a held-out clean image or its jittered copy (the pruned deep copies
        # carry the recording hook)
        assert seen and all(torch.equal(batch, expected) for batch in seen)
        assert threshold in anp.THRESHOLD_GRID or threshold == -1.0
        assert [c["threshold"] for c in curve] == list(anp.THRESHOLD_GRID[: len(curve)])
        assert all(c["pruned"] <= d["pruned"] for c, d in itertools.pairwise(curve))
    handle.remove()


def test_jittered_copies_keep_shape_and_range_and_follow_the_seed():
    # six smooth images (one low-frequency wave each), as natural images are at the scale of a few pixels
    grid = torch.arange(32.0)
    waves = [torch.sin(2 * torch.pi * (i % 3 + 1) * (grid[:, None] * (i // 3) + grid[None, :]) / 64) for i in range(6)]
    x = (0.5 + 0.4 * torch.stack(waves))[:, None].expand(6, 3, 32, 32).contiguous()
    a = anp.jitter_images(x, 4, torch.Generator().manual_seed(0))
    b = anp.jitter_images(x, 4, torch.Generator().manual_seed(0))
    c = anp.jitter_images(x, 4, torch.Generator().manual_seed(1))
    assert a.shape == (24, *x.shape[1:]) and torch.equal(a, b) and not torch.equal(a, c)
    assert 0 <= float(a.min()) and float(a.max()) <= 1
    # each copy is a mild change of its image: closer to it than to the other images
    dist = torch.cdist(a.flatten(1), x.flatten(1))
    assert torch.equal(dist.argmin(1), torch.arange(6).repeat(4))
    with pytest.raises(ConfigError, match="copies"):
        anp.jitter_images(x, 0, torch.Generator())


def test_the_automatic_rule_reads_the_measure_it_is_given():
    torch.manual_seed(0)
    model = _gtsrb_cnn()
    holdout = _images(24, seed=3)
    layers = anp.find_neurons(model, to_tensor(holdout.x[:2]), num_classes=4)
    total = sum(layer.size for layer in layers)
    masks = torch.linspace(0, 1, total)[torch.randperm(total, generator=torch.Generator().manual_seed(1))]
    probs = F.softmax(model(to_tensor(holdout.x)), 1)
    base = {
        "top1": float((probs.argmax(1) == torch.as_tensor(holdout.y)).float().mean()),
        "probability": float(probs[torch.arange(len(holdout)), torch.as_tensor(holdout.y)].mean()),
    }
    key = {"top1": "holdout_accuracy", "probability": "holdout_probability"}
    for measure in anp.AUTO_MEASURES:
        tolerance = 0.005
        threshold, curve = anp.auto_threshold(
            model, layers, masks, holdout, tolerance=tolerance, measure=measure, jitter=0
        )
        drops = [base[measure] - c[key[measure]] for c in curve]
        # the rule keeps every threshold up to the first that breaks the tolerance in *its* measure, and stops there
        kept = [c["threshold"] for c, d in zip(curve, drops) if d <= tolerance + 1e-12]
        assert kept == [c["threshold"] for c in curve[: len(kept)]]
        assert threshold == (kept[-1] if kept else -1.0)
        assert len(curve) == len(anp.THRESHOLD_GRID) or drops[-1] > tolerance
        assert all(0 <= c["holdout_probability"] <= 1 and 0 <= c["holdout_accuracy"] <= 1 for c in curve)
    with pytest.raises(ConfigError, match="unknown held-out measure"):
        anp.auto_threshold(model, layers, masks, holdout, measure="f1")


def test_an_interrupted_optimisation_resumes_to_the_same_masks(tmp_path):
    data = _images(48)
    cfg = anp.ANPConfig(iterations=12, batch_size=8)
    whole = anp.optimize_masks(_gtsrb_cnn(), data, cfg, 4, progress=False)

    class Crash(nn.Module):
        def __init__(self, inner: nn.Module, after: int) -> None:
            super().__init__()
            self.inner, self.after, self.calls = inner, after, 0

        def forward(self, x):
            self.calls += 1
            if self.calls == self.after:
                raise KeyboardInterrupt
            return self.inner(x)

    crashing = Crash(_gtsrb_cnn(), after=2 * 9 + 2)  # two forwards per iteration: dies in iteration 10
    with pytest.raises(KeyboardInterrupt):
        anp.optimize_masks(crashing, data, cfg, 4, checkpoint_dir=tmp_path, progress=False, log_every=4)
    assert read_checkpoint(tmp_path / "anp_state.safetensors")[1]["iteration"] == 8
    resumed = anp.optimize_masks(crashing, data, cfg, 4, checkpoint_dir=tmp_path, progress=False, log_every=4)
    assert torch.equal(resumed.masks, whole.masks)
    # another seed does not reuse the state
    other = anp.optimize_masks(
        crashing, data, anp.ANPConfig(iterations=12, batch_size=8, seed=1), 4, checkpoint_dir=tmp_path, progress=False
    )
    assert not torch.equal(other.masks, whole.masks)


def test_any_architecture_gets_masks_through_the_same_code():
    data = _images(32)
    cfg = anp.ANPConfig(iterations=3, batch_size=8)
    for model in (_resnet(), _injected()):
        result = anp.optimize_masks(model, data, cfg, 4, progress=False)
        assert len(result.masks) == sum(layer.size for layer in result.layers)
        assert not torch.all(result.masks == 1)  # gradients reached the masks (through the merge for TrojanNet)
    with pytest.raises(ConfigError, match="alpha"):
        anp.ANPConfig(alpha=1.5)
    with pytest.raises(ConfigError, match="at least one clean image"):
        anp.optimize_masks(_gtsrb_cnn(), data.subset(np.zeros(0, np.int64)), cfg, 4, progress=False)


# ----------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def backdoored(tmp_path_factory):
    """A GTSRB CNN trained on the real 5-class photographs with a white 4x4 square at rows/cols 27-30 -> label 2."""
    out = tmp_path_factory.mktemp("badnets")
    argv = ["attack", "badnets", "--data", str(GTSRB5), "--target", "2", "--epochs", "15", "--batch-size", "32"]
    assert main([*argv, "--val-fraction", "0", "--poison-rate", "0.2", "--out", str(out)]) == 0
    return out


def _silenced_units(original: nn.Module, pruned: nn.Module, layers) -> dict[str, int]:
    """Per layer, how many neurons have all-zero weights in ``pruned`` but not in ``original``, read off the weights
    themselves (whatever the run reports); every other neuron's weights must be the original ones."""
    before, after = dict(original.named_modules()), dict(pruned.named_modules())
    counts = {}
    for layer in layers:
        w0 = before[layer.name].weight.detach().reshape(layer.size, -1)
        w1 = after[layer.name].weight.detach().reshape(layer.size, -1)
        zeroed = (w1 == 0).all(1) & ~(w0 == 0).all(1)
        assert torch.equal(w1[~zeroed], w0[~zeroed]), layer.name
        if zeroed.any():
            counts[layer.name] = int(zeroed.sum())
    return counts


def _neurons_of(model_dir) -> tuple[nn.Module, list]:
    from trojanlab.models import load_model

    module = load_model(model_dir).module
    return module, anp.find_neurons(module, to_tensor(_images(2).x), num_classes=5)


def test_cli_defends_and_writes_an_artefact_evaluate_reads(backdoored, tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from trojanlab.models import load_model

    out = tmp_path / "anp"
    argv = ["defend", "anp", "--model", str(backdoored), "--data", str(GTSRB5), "--out", str(out), "--quiet"]
    assert main([*argv, "--clean-fraction", "0.3", "--iterations", "60", "--batch-size", "32"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["before"]["attack_success_rate"] > 0.9
    assert result["neurons"] == 960 and result["rule"].startswith("auto")
    assert result["holdout_curve"][0]["threshold"] == 0.0
    for name in ("mask_histogram.png", "pruning_curve.png", "masks.safetensors", "mask_values.json"):
        assert (out / name).is_file()
    # the artefact is pruned as reported: the silenced units counted in its weights are the reported ones
    original, layers = _neurons_of(backdoored)
    assert _silenced_units(original, load_model(out / "pruned").module, layers) == result["pruned_per_layer"]
    assert result["pruned"] == sum(result["pruned_per_layer"].values())
    capsys.readouterr()
    assert main(["evaluate", "--model", str(out / "pruned"), "--data", str(GTSRB5), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["clean_accuracy"] == pytest.approx(result["after"]["clean_accuracy"])
    assert evaluated["attack_success_rate"] == pytest.approx(result["after"]["attack_success_rate"])
    # a fixed count prunes exactly that many of the lowest masks, reusing the finished optimisation rather than
    # running it again (--masks-from): masks planted in the first run's state (the last 25 units of FC-512 lowest,
    # which the learnt masks do not single out) decide what the second run prunes. The first folder itself refuses
    # the other rule without --restart.
    learnt = load_file(str(out / "masks.safetensors"))["masks"]
    assert set(torch.argsort(learnt, stable=True)[:25].tolist()) != set(range(935, 960))
    rule = ["--clean-fraction", "0.3", "--iterations", "60", "--batch-size", "32", "--prune", "count"]
    capsys.readouterr()
    assert main([*argv, *rule, "--prune-value", "25"]) == 2
    assert "--restart" in capsys.readouterr().err
    state = out / "checkpoint" / "anp_state.safetensors"
    with safe_open(str(state), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(state))
    planted = torch.ones_like(tensors["mask"])
    planted[-25:] = 0.0
    save_file({**tensors, "mask": planted}, str(state), metadata=metadata)
    first, second = str(out), str(tmp_path / "anp-count")
    argv[argv.index(first)] = second
    assert main([*argv, *rule, "--prune-value", "25", "--curve-images", "0", "--masks-from", first]) == 0
    out = Path(second)
    # masks learnt on other settings are refused, not silently learnt again
    assert main([*argv[:-2], str(tmp_path / "x"), "--quiet", *rule, "--prune-value", "25", "--eps", "0.3",
                 "--masks-from", first]) == 2  # fmt: skip
    assert "holds no ANP masks learnt on this model" in capsys.readouterr().err
    again = json.loads((out / "result.json").read_text())
    fc = layers[-1]
    assert (fc.kind, fc.size, fc.start) == ("linear", 512, 448)
    assert again["pruned"] == 25 and again["pruned_per_layer"] == {fc.name: 25}
    pruned = load_model(out / "pruned").module
    assert _silenced_units(original, pruned, layers) == {fc.name: 25}
    assert (pruned.state_dict()[f"{fc.name}.weight"][-25:] == 0).all()  # those very units
    assert torch.equal(load_file(str(out / "masks.safetensors"))["masks"], planted)


def test_cli_takes_the_defenders_own_clean_data(backdoored, tmp_path, capsys):
    from trojanlab.data import load_image_folder

    own = load_image_folder(GTSRB5, 32, test_fraction=0).test.subset(np.arange(0, 550, 11))  # 50 images, 10 a class
    path = tmp_path / "own.npz"
    np.savez(path, x_test=own.x, y_test=own.y)
    out = tmp_path / "anp"
    argv = ["defend", "anp", "--model", str(backdoored), "--data", str(GTSRB5), "--out", str(out), "--quiet"]
    no_curve = ["--curve-images", "0"]
    assert main([*argv, "--clean-data", str(path), "--iterations", "4", "--batch-size", "8", *no_curve]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["defender_images"] == 50 and result["fit_images"] + result["holdout_images"] == 50
    bad = tmp_path / "bad.npz"
    np.savez(bad, x_test=own.x, y_test=own.y + 5)
    assert main([*argv, "--clean-data", str(bad), "--restart"]) == 2
    assert "out of range for the model" in capsys.readouterr().err


def test_cli_refuses_bad_input(backdoored, tmp_path, capsys):
    argv = ["defend", "anp", "--data", str(GTSRB5), "--out", str(tmp_path / "x"), "--quiet"]
    assert main([*argv, "--model", str(tmp_path / "missing")]) == 2
    assert "model folder not found" in capsys.readouterr().err
    assert main([*argv, "--model", str(backdoored), "--prune", "count"]) == 2
    assert "--prune count needs --prune-value" in capsys.readouterr().err
    assert main([*argv, "--model", str(backdoored)]) == 2  # 1 % of 400 images: one per class
    assert "nothing could be held out" in capsys.readouterr().err
    sub = ["--epochs", "1", "--cycles", "1", "--clean-fraction", "0.3"]
    assert main(["defend", "subnetwork", *argv[2:], "--model", str(backdoored), *sub]) == 2
    assert "TrojanNet" in capsys.readouterr().err
    assert not (tmp_path / "x" / "result.json").exists()


# ----------------------------------------------------------------------------------------------- nc-guided variant


def _white_square_detector() -> nn.Module:
    """Conv 1x1 with four channels: channel 0 fires only on near-white pixels (sum of RGB > 2.7), the others on any."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0] * 3, [0.5, 0, 0], [0, 0.5, 0], [0, 0, 0.5]]).view(4, 3, 1, 1))
        net[0].bias.copy_(torch.tensor([-2.7, 0.0, 0.0, 0.0]))
    return net.eval()


def test_guided_scores_rank_first_the_unit_the_trigger_switches_on():
    from trojanlab.defenses import guided
    from trojanlab.triggers import Trigger

    model = _white_square_detector()
    rng = np.random.default_rng(0)
    clean = ImageSet(rng.integers(0, 200, (12, 32, 32, 3), dtype=np.uint8), np.arange(12) % 4)  # never near white
    x = to_tensor(clean.x)
    layers = anp.find_neurons(model, x[:2], num_classes=4)
    assert [(layer.kind, layer.size) for layer in layers] == [("conv", 4)]
    white = Trigger(np.ones((4, 4)), (28, 28), 3)
    scores = guided.trigger_scores(model, layers, clean, [white])
    assert int(scores.argmax()) == 0 and float(scores[0]) > 10 * float(scores[1:].abs().max())
    assert guided.mean_activations(model, layers, x)[0] == 0  # silent on clean images, excited by the square
    # worked by hand: scores 5.0 > 2.0 > 0.1 > -1.0 rank 1st..4th of 4 -> masks 1/8, 3/8, 5/8, 7/8
    masks = guided.rank_masks(torch.tensor([0.1, 5.0, -1.0, 2.0]))
    assert masks.tolist() == [0.625, 0.125, 0.875, 0.375]
    assert anp.select_by_rule(masks, "threshold", 0.5).tolist() == [1, 3]
    assert guided.rank_masks(torch.tensor([3.0, 3.0, 3.0, 3.0])).tolist() == [0.125, 0.375, 0.625, 0.875]  # ties
    # the grid is 0 %, 1 %, ..., 30 %, and a grid fraction prunes exactly that share of the ranking, the neurons
    # with the highest scores: of 100 neurons, i % are i neurons, the i highest-scoring ones (by brute force)
    assert guided.GUIDED_GRID == tuple(i / 100 for i in range(31))
    scores = torch.randn(100, generator=torch.Generator().manual_seed(0))
    hundred = guided.rank_masks(scores)
    by_score = sorted(range(100), key=lambda j: -float(scores[j]))
    for i, fraction in enumerate(guided.GUIDED_GRID):
        assert sorted(anp.select_by_rule(hundred, "threshold", fraction).tolist()) == sorted(by_score[:i])
    # of 960 neurons (the GTSRB CNN's), a share rounds to the nearest neuron: 1 % is 9.6 -> 10, 7 % is 67.2 -> 67,
    # 25 % is 240, 30 % is 288
    many = guided.rank_masks(torch.randn(960, generator=torch.Generator().manual_seed(0)))
    counts = {f: len(anp.select_by_rule(many, "threshold", f)) for f in (0.0, 0.01, 0.07, 0.25, 0.3)}
    assert counts == {0.0: 0, 0.01: 10, 0.07: 67, 0.25: 240, 0.3: 288}
    with pytest.raises(ConfigError, match="at least one reversed trigger"):
        guided.trigger_scores(model, layers, clean, [])


def _reversed_scan(folder, labels, flagged, image=32):
    """A `detect nc` folder whose reversed trigger of every label is the 4x4 white square at rows/cols 27-30."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    masks = torch.zeros(len(labels), image, image)
    masks[:, 27:31, 27:31] = 1
    save_file(
        {"masks": masks, "patterns": torch.ones(len(labels), 3, image, image)},
        str(folder / "reversed_triggers.safetensors"),
        metadata={"labels": json.dumps(labels), "l1_norms": json.dumps([16.0] * len(labels))},
    )
    (folder / "result.json").write_text(json.dumps({"flagged_labels": flagged}))
    return folder


def test_nc_guided_prunes_what_the_reversed_trigger_excites(backdoored, tmp_path, capsys):
    """Through the library's ``defend`` (the command line is the same call: its errors are checked through it)."""
    from trojanlab.config import DefenderConfig, NCGuidedConfig, PruneRule
    from trojanlab.defenses import defend, guided
    from trojanlab.errors import TrojanlabError
    from trojanlab.models import load_model

    scan = _reversed_scan(tmp_path / "nc", list(range(5)), [2])
    out = tmp_path / "guided"
    defender, rule = DefenderConfig(clean_fraction=0.3), PruneRule(curve_images=100)

    def guided_run(scan_folder, labels=None, out=out):
        config = NCGuidedConfig(reversed_triggers=str(scan_folder), guide_labels=labels)
        return defend("nc-guided", backdoored, config, rule, data=GTSRB5, defender=defender, out=out, progress=False)

    report = guided_run(scan)
    result = json.loads((out / "result.json").read_text())
    assert result == json.loads(json.dumps(report.to_json()))
    assert result["method"] == "nc-guided" and result["guide"]["labels"] == [2]
    assert result["neurons"] == 960 and result["rule"].startswith("auto: the largest fraction")
    # the threshold reads as the fraction of the 960 neurons pruned, and the artefact is pruned as reported: the
    # silenced units counted in its weights are the reported ones
    assert result["threshold"] in guided.GUIDED_GRID and abs(result["pruned"] - result["threshold"] * 960) <= 0.5
    original, layers = _neurons_of(backdoored)
    assert _silenced_units(original, load_model(out / "pruned").module, layers) == result["pruned_per_layer"]
    assert result["pruned"] == sum(result["pruned_per_layer"].values())
    assert "premise" not in result and "masks.safetensors" not in result["files"]
    # the ranking follows the trigger: pruning its first 20 % removes this small model's backdoor (92 % -> 0 % on
    # the 100-image curve when written)
    fifth = next(c for c in result["test_curve"] if c["threshold"] == 0.2)
    assert result["before"]["attack_success_rate"] > 0.9 and fifth["attack_success_rate"] < 0.05
    capsys.readouterr()
    assert main(["evaluate", "--model", str(out / "pruned"), "--data", str(GTSRB5), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["clean_accuracy"] == pytest.approx(result["after"]["clean_accuracy"])
    # what a defender can get wrong is named
    argv = ["defend", "nc-guided", "--model", str(backdoored), "--data", str(GTSRB5), "--out", str(out), "--quiet"]
    assert main([*argv, "--clean-fraction", "0.3"]) == 2
    assert "needs --reversed-triggers" in capsys.readouterr().err
    # nothing flagged: the model comes back unchanged, and says why
    silent = _reversed_scan(tmp_path / "nc-silent", list(range(5)), [])
    guided_run(silent, out=tmp_path / "guided-silent")
    unchanged = json.loads((tmp_path / "guided-silent" / "result.json").read_text())
    assert unchanged["pruned"] == 0 and "flagged no label" in unchanged["rule"]
    assert unchanged["after"]["attack_success_rate"] == unchanged["before"]["attack_success_rate"]
    with pytest.raises(TrojanlabError, match="out of range"):
        guided_run(scan, [7], out=tmp_path / "guided-7")
    partial = _reversed_scan(tmp_path / "nc-partial", [0, 1], [1])
    with pytest.raises(TrojanlabError, match="were not scanned"):
        guided_run(partial, [3], out=tmp_path / "guided-3")
