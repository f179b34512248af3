"""I-BAU: the implicit hypergradient against calculus, and the backdoor of a small model unlearnt by `defend ibau`."""

from __future__ import annotations

import json

import pytest
import torch

from trojanlab.config import DefenderConfig, IBAUConfig
from trojanlab.defenses import defend, ibau
from trojanlab.errors import ConfigError


def test_the_implicit_hypergradient_is_the_derivative_through_the_inner_optimum():
    # inner: delta* = argmin_d 1/2 |d - A theta|^2 (inner map: a gradient step d - eta (d - A theta)), so
    # delta* = A theta; outer: L = |delta*|^2 + c . theta, whose derivative is 2 A^T A theta + c
    torch.manual_seed(0)
    a = torch.randn(4, 3)
    theta = torch.randn(3, requires_grad=True)
    c = torch.randn(3)
    delta = (a @ theta).detach()  # the inner optimum

    def inner_map(d):
        return d - 0.5 * (d - a @ theta)

    def outer(d):
        return d.pow(2).sum() + c @ theta

    (got,) = ibau.implicit_hypergradient(delta, [theta], inner_map, outer, steps=60)
    expected = 2 * a.T @ a @ theta.detach() + c
    assert torch.allclose(got, expected, atol=1e-5)
    # no fixed-point iterations: only the direct derivative c is left
    (direct,) = ibau.implicit_hypergradient(delta, [theta], inner_map, outer, steps=0)
    assert torch.allclose(direct, c, atol=1e-6)
    # k fixed-point iterations sum the first k terms of v = sum_j (dPhi/dd^T)^j dL/dd, here (0.5^j) 2 delta, and the
    # answer is c + (dPhi/dtheta)^T v = c + 0.5 A^T v: one iteration is v = dL/dd itself, two add half of it
    for steps, terms in ((1, 1.0), (2, 1.5), (3, 1.75)):
        stats = {}
        (partial,) = ibau.implicit_hypergradient(delta, [theta], inner_map, outer, steps=steps, stats=stats)
        assert torch.allclose(partial, c + 0.5 * a.T @ (2 * delta * terms), atol=1e-5)
        assert stats == {"steps": steps, "diverged": False}

    # a map that expands (dPhi/dd = 3 I): the second iterate moves 3x further than the first, so the iteration stops
    # after one step and keeps v = dL/dd -- the answer c + (dPhi/dtheta)^T v with dPhi/dtheta = -2 A
    def expanding(d):
        return d + 2 * (d - a @ theta)

    stats = {}
    (stopped,) = ibau.implicit_hypergradient(delta, [theta], expanding, outer, steps=5, stats=stats)
    assert stats == {"steps": 1, "diverged": True}
    assert torch.allclose(stopped, c - 2 * a.T @ (2 * delta), atol=1e-5)
    # a parameter neither map reads gets zeros
    unused = torch.zeros(2, requires_grad=True)
    assert ibau.implicit_hypergradient(delta, [theta, unused], inner_map, outer, steps=5)[1].abs().sum() == 0


def test_defend_ibau_removes_a_badnets_backdoor_and_keeps_the_clean_accuracy(small_backdoor, tmp_path):
    from trojanlab.evaluation.run import evaluate

    model, data = small_backdoor
    out = tmp_path / "ibau"
    report = defend("ibau", model, IBAUConfig(batch_size=20), data=data,
                    defender=DefenderConfig(clean_fraction=0.5, holdout=0.2),
                    out=out, progress=False)  # fmt: skip
    assert report.before["attack_success_rate"] > 0.8
    assert report.after["attack_success_rate"] < 0.2
    assert report.after["clean_accuracy"] >= report.before["clean_accuracy"] - 0.05
    written = json.loads((out / "result.json").read_text())
    rounds = written["ibau"]["rounds"]
    assert len(rounds) == 5 and written["unlearning_images"] == written["ibau"]["images"]
    # the first round's universal perturbation fools most clean images (the backdoor is a shortcut); the weight
    # steps leave it fooling far fewer
    assert rounds[0]["fooling_rate"] > 0.5 and rounds[0]["fooling_rate_after_round"] < rounds[0]["fooling_rate"] / 2
    assert rounds[0]["pushed_to"] == 1  # the backdoor's target
    assert written["after"]["clean_accuracy"] == pytest.approx(evaluate(out / "repaired", data=data)["clean_accuracy"])
    assert "predicted_clean_accuracy_drop" in written


def test_bad_settings_are_refused_before_any_work():
    with pytest.raises(ConfigError, match="rounds"):
        IBAUConfig(rounds=0)
    with pytest.raises(ConfigError, match="perturbed_fraction"):
        IBAUConfig(perturbed_fraction=1.5)
