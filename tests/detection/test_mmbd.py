"""MM-BD: the margin, the batched ascent, the Gamma order-statistic test, the data-free CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from trojanlab.cli import main
from trojanlab.config.detection import MMBDConfig
from trojanlab.detection import mmbd as mm
from trojanlab.errors import ArtifactError, ConfigError
from trojanlab.models import classifier_spec, save_model
from trojanlab.models.registry import build_network


def test_the_margin_is_the_own_logit_above_the_largest_other():
    logits = torch.tensor([[3.0, 1.0, 2.5], [0.0, 4.0, -1.0], [1.0, 1.0, 0.0]])
    got = mm.margins(logits, torch.tensor([0, 2, 1]))
    assert got.tolist() == [0.5, -5.0, 0.0]


def _linear(classes: int = 10, planted: int | None = 3, seed: int = 0) -> nn.Module:
    """A linear classifier on 3x6x6 images; ``planted`` gets a large weight on one pixel (a one-pixel shortcut)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(108, classes))
    with torch.no_grad():
        model[1].weight.normal_(0, 0.05)
        model[1].bias.zero_()
        if planted is not None:
            model[1].weight[planted, 0] = 25.0
    return model.eval()


def test_the_ascent_finds_the_shortcut_and_the_test_flags_its_label_only():
    cfg = MMBDConfig(profile="official", starts=4, steps=100)
    backdoored = mm.max_margins(_linear(planted=3), 10, (3, 6, 6), cfg)
    stats = backdoored.by_label()
    assert max(stats, key=stats.get) == 3
    # at least what the known input reaches (the planted pixel on, the rest as the ascent leaves it)
    assert stats[3] > 20
    assert backdoored.inputs.shape == (10, 3, 6, 6) and backdoored.inputs[3, 0, 0, 0] == pytest.approx(1.0)
    test = mm.gamma_test(stats)
    assert test.suspected_label == 3 and test.p_value < 0.05
    clean = mm.gamma_test(mm.max_margins(_linear(planted=None), 10, (3, 6, 6), cfg).by_label())
    assert clean.p_value > 0.05


def test_labels_batch_and_converge_like_one_at_a_time():
    model = _linear(planted=3)
    cfg = MMBDConfig(profile="official", starts=3, steps=50)
    together = mm.max_margins(model, 10, (3, 6, 6), cfg).by_label()
    # a label's starts are its own random images whichever labels share the batch
    subset = mm.max_margins(model, 10, (3, 6, 6), MMBDConfig(profile="official", starts=3, steps=50,
                                                                labels=[7, 5, 6]))  # fmt: skip
    for label, value in subset.by_label().items():
        assert value == pytest.approx(together[label], rel=1e-5)
    adam = mm.max_margins(model, 10, (3, 6, 6), MMBDConfig(starts=3, steps=50))
    assert max(adam.by_label(), key=adam.by_label().get) == 3


def test_the_gamma_test_on_hand_made_statistics():
    rng = np.random.default_rng(0)
    null = dict(enumerate(rng.gamma(4.0, 10.0, size=20).tolist()))
    assert mm.gamma_test(null).p_value > 0.05
    outlier = {**null, 20: 400.0}
    test = mm.gamma_test(outlier)
    assert test.suspected_label == 20 and test.p_value < 1e-3 and test.statistic == 400.0
    assert mm.gamma_test({0: 1.0, 1: 1.0, 2: 5.0}).p_value == 0.0  # a flat null: the largest is out of it
    far = mm.gamma_test({**null, 20: 600.0})  # F(600) rounds to 1.0: 1 - F^K would be 0, the survival function is not
    assert 0 < far.p_value < 1e-30
    with pytest.raises(ArtifactError, match="not finite"):
        mm.gamma_test({**null, 20: float("nan")})
    with pytest.raises(ConfigError, match="at least 3"):
        mm.gamma_test({0: 1.0, 1: 2.0})


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="profile"):
        MMBDConfig(profile="slow")
    with pytest.raises(ConfigError, match="at least 3"):
        MMBDConfig(labels=[0, 1])
    with pytest.raises(ConfigError, match="threshold"):
        MMBDConfig(threshold=0)
    with pytest.raises(ConfigError, match="out of range"):
        mm.max_margins(_linear(), 10, (3, 6, 6), MMBDConfig(labels=[0, 1, 12]))


def test_the_cli_scans_an_artefact_without_data_and_refuses_bad_input(tmp_path, capsys):
    torch.manual_seed(0)
    spec = classifier_spec("gtsrb_cnn", [str(i) for i in range(4)], (3, 32, 32), [0.5] * 3, [0.25] * 3)
    model = tmp_path / "model"
    from trojanlab.models import build_classifier

    save_model(build_classifier(spec), model, spec)
    out = tmp_path / "scan"
    argv = ["detect", "mmbd", "--model", str(model), "--quiet", "--starts", "2", "--steps", "3"]
    assert main([*argv, "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert set(result["max_margins"]) == {"0", "1", "2", "3"} and 0 <= result["p_value"] <= 1
    assert result["infected"] == (result["p_value"] < 0.05) and result["images"] == 4 * 2 * 3
    assert (out / "margins.png").stat().st_size > 0 and (out / "max_margin_inputs.png").stat().st_size > 0
    capsys.readouterr()
    assert main([*argv, "--out", str(tmp_path / "x"), "--labels", "0", "1", "9"]) == 2
    assert "out of range" in capsys.readouterr().err
    assert main([*argv, "--out", str(tmp_path / "y"), "--model", str(tmp_path / "missing")]) == 2
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())


def test_a_torchvision_network_gets_gradients_through_every_label():
    net = build_network("resnet18", 5, (3, 32, 32)).eval()
    search = mm.max_margins(net, 5, (3, 32, 32), MMBDConfig(starts=2, steps=2))
    assert len(search.statistics) == 5 and all(np.isfinite(search.statistics)) and search.images == 5 * 2 * 2
