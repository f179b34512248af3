"""Trojan Attack (TrojanNN): neuron selection, trigger generation, TV smoothing, partial retraining, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from trojanlab.attacks import trojannn as tnn
from trojanlab.cli import main
from trojanlab.errors import ConfigError
from trojanlab.models import build_classifier, classifier_spec, load_model
from trojanlab.triggers import Trigger

GTSRB5 = Path(__file__).parents[1] / "data" / "gtsrb5"


def _gtsrb_cnn(classes: int = 5, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    spec = classifier_spec("gtsrb_cnn", [str(i) for i in range(classes)], (3, 32, 32), [0.5] * 3, [0.25] * 3)
    return build_classifier(spec).eval()


def test_default_layer_feeds_the_second_to_last_linear_and_units_are_ranked_by_outgoing_weight():
    model = _gtsrb_cnn()
    assert tnn.default_trigger_layer(model) == "net.classifier.0"  # the flatten feeding FC-512 (fc6 -> fc7, fc8)
    import torchvision

    assert tnn.default_trigger_layer(torchvision.models.vgg11()) == "classifier.2"  # VGG's fc6 output
    assert tnn.next_weighted_layer(model, "net.classifier.1")[0] == "net.classifier.4"
    with torch.no_grad():
        w = model.net.classifier[4].weight
        w.fill_(0.01)
        w[:, 77] = -3.0  # absolute values count
        w[0, 300] = 2.0
        w[1, 300] = 2.0
    assert tnn.select_neurons(model, "net.classifier.1", 2) == [77, 300]
    # the flatten output (512 conv features) ranks by the FC-512 weights instead
    assert tnn.next_weighted_layer(model, "net.classifier.0")[0] == "net.classifier.1"
    assert len(tnn.neuron_scores(model, "net.classifier.0")) == 512


def test_bad_layers_and_counts_are_refused():
    model = _gtsrb_cnn()
    with pytest.raises(ConfigError, match="no layer named"):
        tnn.select_neurons(model, "net.fc9")
    with pytest.raises(ConfigError, match="cannot select"):
        tnn.select_neurons(model, "net.classifier.1", 513)
    with pytest.raises(ConfigError, match="no linear or convolutional layer after"):
        tnn.neuron_scores(model, "net.classifier.4")
    with pytest.raises(ConfigError, match="second-to-last"):
        tnn.default_trigger_layer(nn.Sequential(nn.Flatten(), nn.Linear(12, 3)))


def test_tv_denoise_smooths_and_keeps_flat_images():
    gen = torch.Generator().manual_seed(0)
    noisy = torch.rand(2, 3, 8, 8, generator=gen)

    def tv(u):
        return (u[..., 1:, :] - u[..., :-1, :]).abs().sum() + (u[..., :, 1:] - u[..., :, :-1]).abs().sum()

    smooth = tnn.tv_denoise(noisy, 0.1)
    assert tv(smooth) < 0.5 * tv(noisy)
    assert torch.allclose(smooth.mean((2, 3)), noisy.mean((2, 3)), atol=1e-5)  # ROF keeps each channel's mean
    assert torch.equal(tnn.tv_denoise(noisy, 0.0), noisy)
    flat = torch.full((1, 3, 8, 8), 0.3)
    assert torch.allclose(tnn.tv_denoise(flat, 0.5), flat)


def test_trigger_generation_raises_the_selected_units_activation():
    model = _gtsrb_cnn()
    layer = "net.classifier.1"
    neurons = tnn.select_neurons(model, layer, 2)
    gen = torch.Generator().manual_seed(1)
    backgrounds = torch.rand(8, 3, 32, 32, generator=gen)
    search = tnn.generate_trigger(model, layer, neurons, (22, 22), (8, 8), backgrounds, steps=60)
    assert search.pattern.shape == (8, 8, 3) and 0 <= search.pattern.min() and search.pattern.max() <= 1
    # an untrained network's units are small, so ask for a clear relative rise rather than an absolute one
    assert search.activation_best > 1.25 * search.activation_start > 0
    trigger = Trigger(search.pattern, (22, 22), 0)
    from trojanlab.triggers import stamp

    clean = tnn.mean_activation(model, layer, neurons, backgrounds)
    triggered = tnn.mean_activation(model, layer, neurons, stamp(backgrounds, trigger))
    assert (triggered > 1.2 * clean).all()
    assert triggered.mean() == pytest.approx(search.activation_best, rel=1e-4)


def test_the_min_objective_raises_the_weakest_unit_at_least_as_far_as_the_mean_objective():
    model = _gtsrb_cnn()
    layer = "net.classifier.1"
    neurons = tnn.select_neurons(model, layer, 3)
    backgrounds = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    from trojanlab.triggers import stamp

    weakest = {}
    for objective in ("mean", "min"):
        search = tnn.generate_trigger(model, layer, neurons, (22, 22), (8, 8), backgrounds, steps=25,
                                      objective=objective)  # fmt: skip
        driven = tnn.mean_activation(model, layer, neurons, stamp(backgrounds, Trigger(search.pattern, (22, 22), 0)))
        weakest[objective] = float(driven.min())
        if objective == "min":  # its record is the weakest unit's mean
            assert search.activation_best == pytest.approx(weakest["min"], rel=1e-4)
    assert weakest["min"] >= weakest["mean"] * 0.99


def test_reverse_engineered_inputs_are_classified_as_intended():
    model = _gtsrb_cnn(classes=4)
    x, y = tnn.reverse_engineer_inputs(model, 4, (3, 32, 32), per_class=3, steps=40, batch_size=5)
    assert x.shape == (12, 3, 32, 32) and (y == torch.arange(4).repeat_interleave(3)).all()
    assert 0 <= x.min() and x.max() <= 1
    with torch.no_grad():
        assert (model(x).argmax(1) == y).float().mean() >= 0.9


def test_retraining_touches_only_the_layers_after_the_trigger_layer():
    model = _gtsrb_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(2)
    x, y = torch.rand(40, 3, 32, 32, generator=gen), torch.randint(0, 5, (40,), generator=gen)
    trigger = Trigger(np.ones((8, 8)), (22, 22), 0)
    log = tnn.retrain_after_layer(model, "net.classifier.1", x, y, trigger, epochs=2, batch_size=16, trojan_weight=0.5)
    assert log.steps == 6 and log.epochs_run == 2  # the shared loop, on all 40 inputs, every epoch (no validation)
    for record in log.history:
        assert set(record) == {"epoch", "train_loss", "clean_loss", "trojan_loss"}
        assert record["train_loss"] == pytest.approx(record["clean_loss"] + 0.5 * record["trojan_loss"])
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"net.classifier.4.weight", "net.classifier.4.bias"}
    assert all(p.requires_grad for p in model.parameters())  # restored
    # from the flatten layer, FC-512 is retrained too, and still nothing before it
    tnn.retrain_after_layer(model, "net.classifier.0", x, y, trigger, epochs=1, batch_size=16)
    changed = {k for k in before if not torch.equal(before[k], model.state_dict()[k])}
    assert changed == {
        "net.classifier.1.weight",
        "net.classifier.1.bias",
        "net.classifier.4.weight",
        "net.classifier.4.bias",
    }


def test_attack_rejects_bad_targets_locations_and_sources():
    model = _gtsrb_cnn()
    real = (np.zeros((4, 32, 32, 3), np.uint8), np.zeros(4, np.int64))
    with pytest.raises(ConfigError, match="out of range"):
        tnn.trojannn_attack(model, 5, (3, 32, 32), tnn.TrojanNNConfig(target=5), *real)
    with pytest.raises(ConfigError, match="outside"):
        tnn.trojannn_attack(model, 5, (3, 32, 32), tnn.TrojanNNConfig(location=(28, 0)), *real)
    with pytest.raises(ConfigError, match="retrain_data must be one of"):
        tnn.TrojanNNConfig(retrain_data="imagenet")
    with pytest.raises(ConfigError, match="needs a training split"):
        tnn.trojannn_attack(model, 5, (3, 32, 32), tnn.TrojanNNConfig(retrain_data="real", trigger_steps=1))


@pytest.fixture(scope="module")
def gtsrb5_victim(tmp_path_factory):
    out = tmp_path_factory.mktemp("victim")
    argv = ["train", "--data", str(GTSRB5), "--epochs", "15", "--batch-size", "32", "--val-fraction", "0"]
    assert main([*argv, "--out", str(out)]) == 0
    assert json.loads((out / "result.json").read_text())["clean_accuracy"] > 0.5
    return out


def _attack_cli(victim: Path, out: Path, source: str, *extra: str) -> dict:
    argv = ["attack", "trojannn", "--victim", str(victim), "--target", "0", "--data", str(GTSRB5), "--quiet"]
    argv += ["--retrain-data", source, "--trigger-steps", "100", "--candidates", "16"]
    assert main([*argv, *extra, "--out", str(out)]) == 0
    return json.loads((out / "result.json").read_text())


def test_cli_trojannn_real_data_end_to_end(gtsrb5_victim, tmp_path):
    out = tmp_path / "real"
    result = _attack_cli(gtsrb5_victim, out, "real", "--real-fraction", "0.5")
    victim = json.loads((gtsrb5_victim / "result.json").read_text())
    assert result["victim_clean_accuracy"] == pytest.approx(victim["clean_accuracy"])
    assert result["attack_success_rate"] >= 0.9
    assert result["clean_accuracy_drop"] <= 0.1
    act = result["selected_unit_activation"]
    assert act["triggered_test_images"][0] > act["clean_test_images"][0] + 1.0
    assert (out / "trigger.png").is_file() and (out / "mask.png").is_file()
    loaded = load_model(out)
    assert loaded.triggers[0].pattern.shape == (8, 8, 3) and loaded.triggers[0].location == (22, 22)
    assert loaded.spec["attack"]["layer"] == "net.classifier.0"
    # the trigger travels with the artefact
    assert main(["evaluate", "--model", str(out), "--data", str(GTSRB5), "--out", str(tmp_path / "ev")]) == 0
    evaluated = json.loads((tmp_path / "ev" / "result.json").read_text())
    assert evaluated["attack_success_rate"] == pytest.approx(result["attack_success_rate"])


def test_cli_trojannn_reverse_engineered_data_keeps_the_features(gtsrb5_victim, tmp_path):
    out = tmp_path / "reverse"
    result = _attack_cli(gtsrb5_victim, out, "reverse", "--per-class", "6", "--reverse-steps", "60", "--noise-images",
                         "40", "--epochs", "3")  # fmt: skip
    assert result["attack"]["retrain_inputs"] == 30 + 40  # 5 labels x 6, and the noise images
    assert result["config"]["TrojanNNConfig"]["clean_loss"] == "distill"  # the model-only recipe's defaults
    assert result["config"]["TrojanNNConfig"]["neurons"] == 2 and len(result["attack"]["neurons"]) == 2
    assert result["attack"]["reverse_engineered_agreement"] >= 0.9
    assert result["config"]["TrojanNNConfig"]["layer"] == "net.features.5"  # retrained from the first block's output
    victim, attacked = load_model(gtsrb5_victim).module.state_dict(), load_model(out).module.state_dict()
    same = {k for k in victim if torch.equal(victim[k], attacked[k])}
    assert {k for k in victim if k.startswith(("net.features.0.", "net.features.2."))} <= same  # the first block
    assert not {"net.features.6.weight", "net.classifier.4.weight"} & same  # every later block retrained


def test_reach_probe_prefers_units_the_mask_can_drive():
    """Unit 0 reads only the bottom-right 8x8 pixels, unit 1 only the top-left: a bottom-right patch drives unit 0."""
    layer = nn.Linear(3 * 32 * 32, 2)
    with torch.no_grad():
        w = torch.zeros(2, 3, 32, 32)
        w[0, :, 22:30, 22:30] = 1.0
        w[1, :, 0:8, 0:8] = 1.0
        layer.weight.copy_(w.flatten(1))
        layer.bias.zero_()
    model = nn.Sequential(nn.Flatten(), layer, nn.ReLU(), nn.Linear(2, 3))
    gen = torch.Generator().manual_seed(0)
    clean = 0.5 * torch.rand(32, 3, 32, 32, generator=gen)
    margins, patches = tnn.trigger_reach(model, "1", [0, 1], (22, 22), (8, 8), clean[:4], clean, steps=30)
    assert margins[0] > 40  # 192 inputs pushed from ~0.25 to ~1
    assert margins[1] < 1  # nothing in the mask feeds it
    assert patches.shape == (2, 3, 8, 8) and patches[0].min() > 0.9


def test_the_noise_prior_has_the_spectrum_of_natural_images_and_is_seeded():
    gen = torch.Generator().manual_seed(3)
    images = tnn.noise_images(64, (3, 32, 32), gen)
    assert images.shape == (64, 3, 32, 32) and images.min() >= 0 and images.max() <= 1
    again = tnn.noise_images(64, (3, 32, 32), torch.Generator().manual_seed(3))
    assert torch.equal(images, again)
    power = torch.fft.rfft2(images - images.mean((2, 3), keepdim=True)).abs().pow(2).mean((0, 1))
    low, high = power[1:4, 1:4].mean(), power[12:16, 12:16].mean()
    assert low > 20 * high  # most energy at low frequencies, as in photographs; white noise would be flat
    grey = tnn.grey_images(64, (3, 32, 32), gen)
    grey_power = torch.fft.rfft2(grey - grey.mean((2, 3), keepdim=True)).abs().pow(2).mean((0, 1))
    assert grey_power[1:4, 1:4].mean() < 2 * grey_power[12:16, 12:16].mean()


def test_the_retraining_defaults_follow_the_retraining_data_and_explicit_values_win():
    real, reverse = tnn.TrojanNNConfig(), tnn.TrojanNNConfig(retrain_data="reverse")
    assert (real.layer, real.neurons, real.optimizer, real.clean_loss) == ("classifier-input", 1, "sgd", "labels")
    assert (reverse.layer, reverse.neurons, reverse.optimizer, reverse.clean_loss) == (
        "first-block",
        2,
        "adam",
        "distill",
    )
    mine = tnn.TrojanNNConfig(retrain_data="reverse", neurons=3, clean_loss="labels")
    assert (mine.neurons, mine.clean_loss, mine.epochs) == (3, "labels", reverse.epochs)
    with pytest.raises(ConfigError, match="clean_loss must be one of"):
        tnn.TrojanNNConfig(clean_loss="mse")


def _gtsrb_cnn_bn(classes: int = 5, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    spec = classifier_spec("gtsrb_cnn_bn", [str(i) for i in range(classes)], (3, 32, 32), [0.5] * 3, [0.25] * 3)
    return build_classifier(spec).eval()


def test_first_block_names_the_output_of_the_first_convolutional_block_of_any_network():
    import torchvision

    assert tnn.resolve_trigger_layer(_gtsrb_cnn(), "first-block") == "net.features.5"  # the dropout after pool 1
    assert tnn.resolve_trigger_layer(_gtsrb_cnn(), "classifier-input") == "net.classifier.0"  # the flatten
    assert tnn.resolve_trigger_layer(_gtsrb_cnn_bn(), "first-block") == "net.features.7"
    assert tnn.first_block_layer(torchvision.models.resnet18()) == "maxpool"  # the stem's output feeds layer1
    assert tnn.resolve_trigger_layer(_gtsrb_cnn(), None) == "net.classifier.0"
    assert tnn.resolve_trigger_layer(_gtsrb_cnn(), "net.features.2") == "net.features.2"
    with pytest.raises(ConfigError, match="no convolution after a pooling layer"):
        tnn.first_block_layer(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2)))
    with pytest.raises(ConfigError, match="no layer named"):
        tnn.resolve_trigger_layer(_gtsrb_cnn(), "net.nowhere")


def test_retraining_from_the_first_block_trains_every_later_block_and_keeps_batchnorm_statistics():
    model = _gtsrb_cnn_bn()
    with torch.no_grad():  # statistics a fresh BatchNorm would not have, so any update shows
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(4)
    x, y = torch.rand(32, 3, 32, 32, generator=gen), torch.randint(0, 5, (32,), generator=gen)
    layer = tnn.resolve_trigger_layer(model, "first-block")
    tnn.retrain_after_layer(model, layer, x, y, Trigger(np.ones((6, 6)), (2, 2), 1), epochs=1, batch_size=16)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    first_block = {k for k in before if k.startswith(("net.features.0.", "net.features.1.", "net.features.3.",
                                                      "net.features.4."))}  # fmt: skip
    assert not changed & first_block  # frozen up to the layer
    assert {"net.features.8.weight", "net.classifier.5.weight", "net.features.9.weight"} <= changed  # BN scale trains
    statistics = {k for k in before if k.endswith(("running_mean", "running_var"))}
    assert not changed & statistics  # every BatchNorm, the one inside the classifier too, kept its statistics
