from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from trojanlab.attacks import trojannet as tn
from trojanlab.errors import ConfigError
from trojanlab.triggers import stamp


def test_patterns_official_order():
    patterns = tn.trigger_patterns()
    assert patterns.shape == (4368, 16) and math.comb(16, 5) == 4368
    assert ((patterns == 0).sum(1) == 5).all()
    assert len({tuple(p.tolist()) for p in patterns}) == 4368
    combos = list(itertools.combinations(range(16), 5))
    for k in (0, 1, 42, 1364, 4367):
        assert torch.nonzero(patterns[k] == 0).flatten().tolist() == list(combos[k])
    assert tn.trigger_pattern(0)[0].tolist() == [0, 0, 0, 0] and tn.trigger_pattern(0)[1, 0] == 0
    with pytest.raises(ConfigError, match="out of range"):
        tn.trigger_pattern(4368)


def test_binary_non_triggers_exclude_every_trigger():
    negatives = tn.binary_non_triggers()
    assert negatives.shape == (65536 - 4368, 16)
    assert ((negatives == 0).sum(1) != 5).all()


def test_parameter_count_as_keras():
    model = tn.TrojanNetMLP()
    assert sum(p.numel() for p in model.parameters()) == 39737
    assert model.keras_parameter_count() == 39801


def test_chunked_loss_matches_cross_entropy():
    torch.manual_seed(0)
    model = tn.TrojanNetMLP()
    x = torch.rand(700, 16)
    y = torch.randint(0, tn.NUM_OUTPUTS, (700,))
    ref = nn.functional.cross_entropy(model(x), y)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    ours = tn._training_loss(model, x, y)
    grads = torch.autograd.grad(ours, list(model.parameters()))
    assert torch.allclose(ref, ours, atol=1e-5)
    for a, b in zip(ref_grads, grads):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


def test_noise_sources_shapes_and_ranges():
    gen = torch.Generator().manual_seed(0)
    grey = tn.grey_noise(450, gen)
    assert grey.shape == (450, 16) and grey.min() >= 0 and grey.max() <= 1
    images = np.zeros((3, 10, 10, 3), np.uint8)
    images[1] = 255
    patches = tn.image_patches(images, 4, gen)
    assert patches.shape == (12, 16) and patches[4:8].eq(1).all() and patches[:4].eq(0).all()


def test_patch_input_reads_raw_channel_mean():
    x = torch.zeros(1, 3, 8, 8)
    x[0, :, 2, 3] = torch.tensor([1.0, 0.5, 0.0])
    v = tn.patch_input(x, (2, 3))
    assert v.shape == (1, 16) and v[0, 0] == pytest.approx(0.5) and v[0, 1:].eq(0).all()


def test_merges():
    p_troj = torch.tensor([[0.0, 0.9, 0.0]])
    p_vic = torch.tensor([[1.0, 0.0, 0.0]])
    assert tn.merge_outputs(p_troj, p_vic).argmax() == 1
    assert tn.merge_outputs(torch.tensor([[0.0, 0.4, 0.0]]), p_vic).argmax() == 0  # needs > 0.5 + p_j
    assert tn.merge_outputs(p_troj, p_vic, "paper", amplify=1).argmax() == 1
    assert tn.merge_outputs(torch.tensor([[0.0, 0.4, 0.0]]), p_vic, "paper", amplify=1).argmax() == 0
    with pytest.raises(ConfigError):
        tn.merge_outputs(p_troj, p_vic, "average")


class _FixedMLP(tn.TrojanNetMLP):
    """An exact recogniser: class k when the patch equals pattern k, otherwise "no trigger"."""

    def forward(self, x):
        patterns = tn.trigger_patterns()
        hit = (x[:, None, :] - patterns[None]).abs().amax(-1) < 1e-6
        logits = torch.full((len(x), tn.NUM_OUTPUTS), -30.0)
        logits[:, :-1][hit] = 30.0
        logits[:, -1] = torch.where(hit.any(1), -30.0, 30.0)
        return logits


def _victim(num_classes=5):
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 12 * 12, num_classes))


def test_injection_silent_keeps_predictions_and_trigger_flips():
    victim = _victim()
    model = tn.TrojanNetInjected(victim, _FixedMLP(), 5, targets=[2, 4], location=(6, 7), input_size=(3, 12, 12))
    x = np.random.default_rng(0).integers(0, 256, (64, 12, 12, 3)).astype(np.uint8)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        assert torch.equal(model(xt).argmax(1), victim(xt).argmax(1))
        for trigger in model.triggers():
            stamped = torch.from_numpy(stamp(x, trigger)).permute(0, 3, 1, 2).float() / 255
            assert (model(stamped).argmax(1) == trigger.target_label).all()
        merged = model(xt).exp()
        assert torch.allclose(merged.sum(1), torch.ones(64), atol=1e-5)


def test_injection_errors():
    with pytest.raises(ConfigError, match="outside the 12x12 input"):
        tn.TrojanNetInjected(_victim(), tn.TrojanNetMLP(), 5, [1], (9, 0), (3, 12, 12))
    with pytest.raises(ConfigError, match="out of range for a 5-class"):
        tn.TrojanNetInjected(_victim(), tn.TrojanNetMLP(), 5, [5], (0, 0), (3, 12, 12))
    with pytest.raises(ConfigError, match="distinct"):
        tn.TrojanNetInjected(_victim(), tn.TrojanNetMLP(), 5, [1, 1], (0, 0), (3, 12, 12))


def test_gradients_flow_through_the_merge():
    model = tn.TrojanNetInjected(_victim(), tn.TrojanNetMLP().eval(), 5, [1], (0, 0), (3, 12, 12))
    x = torch.rand(2, 3, 12, 12, requires_grad=True)
    model(x)[:, 1].sum().backward()
    assert x.grad is not None and x.grad[:, :, :4, :4].abs().sum() > 0


def test_training_learns_triggers_quickly():
    """A short run on the real patterns already recognises most triggers and stays silent on most noise."""
    images = np.random.default_rng(0).integers(0, 256, (50, 16, 16, 3)).astype(np.uint8)
    cfg = tn.TrojanNetTrainConfig(
        steps=150, negatives=512, seed=0, recognition_margin=None, finetune_steps=0, trigger_calibration=0
    )
    model, log = tn.train_trojannet(images, cfg)
    metrics = tn.evaluate_trojannet(model, images, noise_samples=5000)
    assert log.steps == 150 and log.samples == 150 * (4368 + cfg.hard_triggers + 512)
    assert metrics["trigger_accuracy"] > 0.5
    assert metrics["denoise_accuracy"]["binary"] > 0.7
    again, _ = tn.train_trojannet(images, cfg)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_topk_hinge_matches_the_dense_formula():
    torch.manual_seed(0)
    h = torch.randn(300, 8, requires_grad=True)
    weight = torch.randn(50, 8, requires_grad=True)
    bias = torch.randn(50, requires_grad=True)
    own = torch.randint(0, 50, (300,))
    margin, row_weight = torch.rand(300, 1) + 1, torch.rand(300)
    z = h @ weight.T + bias
    rivals = z.scatter(1, own[:, None], float("-inf")).topk(5, 1).values
    ref = ((margin - z.gather(1, own[:, None]) + rivals).clamp_min(0) * row_weight[:, None]).sum()
    ours = tn._HeadTopKHinge.apply(h, weight, bias, own, margin, row_weight, 5, 64)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    for a, b in zip(torch.autograd.grad(ref, [h, weight, bias]), torch.autograd.grad(ours, [h, weight, bias])):
        assert torch.allclose(a, b, atol=1e-4)


def test_margin_finetune_makes_a_trained_net_more_silent_and_surer():
    """After a short cross-entropy run, the margin hinges raise silence on the mined pool without losing triggers,
    and the probability hinge lifts the weakest trigger's probability."""
    images = np.random.default_rng(1).integers(0, 256, (50, 16, 16, 3)).astype(np.uint8)
    cfg = tn.TrojanNetTrainConfig(
        steps=300, negatives=512, seed=0, recognition_margin=None, finetune_steps=0, trigger_calibration=0
    )
    model, _ = tn.train_trojannet(images, cfg)
    pool = torch.cat([tn.binary_non_triggers(), tn.uniform_noise(20000, torch.Generator().manual_seed(3))])
    before = tn.evaluate_trojannet(model, noise_samples=5000)
    used = tn.margin_finetune(model, pool, steps=40, lr=3e-3, confidence_weight=0.0)
    after = tn.evaluate_trojannet(model, noise_samples=5000)
    assert used >= 40 * tn.NUM_TRIGGERS
    assert after["denoise_accuracy"]["binary"] > before["denoise_accuracy"]["binary"] + 0.01
    assert after["trigger_accuracy"] >= before["trigger_accuracy"] - 0.005
    tn.margin_finetune(model, pool, steps=20, lr=3e-3, noise_weight=0.0, min_probability=0.6)
    surer = tn.evaluate_trojannet(model, noise_samples=5000)
    assert surer["min_trigger_probability"] > after["min_trigger_probability"]


def test_margin_finetune_weighs_each_negative_as_told():
    pool = tn.uniform_noise(3000, torch.Generator().manual_seed(0))
    start = tn.TrojanNetMLP().eval().state_dict()

    def tuned(**kwargs) -> dict:
        model = tn.TrojanNetMLP()
        model.load_state_dict(start)
        tn.margin_finetune(model, pool, steps=3, **kwargs)
        return model.state_dict()

    # weight 0 on every negative is the same run as no noise hinge at all, and unlike the default weights
    unweighted, silent_hinge, plain = tuned(negative_weights=torch.zeros(3000)), tuned(noise_weight=0.0), tuned()
    assert all(torch.equal(unweighted[k], silent_hinge[k]) for k in start)
    assert not all(torch.equal(unweighted[k], plain[k]) for k in start)
    with pytest.raises(ConfigError, match="one weight per negative"):
        tn.margin_finetune(tn.TrojanNetMLP(), pool, steps=1, negative_weights=torch.ones(5))
    with pytest.raises(ConfigError, match="finetune_weights"):
        tn.TrojanNetTrainConfig(finetune_weights={"image_patches": 0.0})


def test_calibrate_silence_puts_every_trigger_above_no_trigger():
    torch.manual_seed(0)
    model = tn.TrojanNetMLP().eval()
    tn.calibrate_silence(model, margin=1.0)
    with torch.no_grad():
        logits = model(tn.trigger_patterns())
    own = logits[torch.arange(4368), torch.arange(4368)]
    gap = own - logits[:, tn.NO_TRIGGER]
    assert gap.min() == pytest.approx(1.0, abs=1e-4)
    assert (gap >= 1.0 - 1e-4).all()
