"""Fine-Pruning: dormant channels of the last convolution ranked first, pruned by the shared rule, fine-tuned with
the pruned filters held at zero."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from trojanlab.config import DefenderConfig, FinePruningConfig, PruneRule
from trojanlab.data import ImageSet, to_tensor
from trojanlab.defenses import defend, fine_pruning


class TwoConvs(nn.Module):
    """conv(3->4) -> ReLU -> conv(4->4) -> ReLU -> mean -> linear: the second conv is the last one."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Conv2d(3, 4, 3, padding=1)
        self.last = nn.Conv2d(4, 4, 1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.relu(self.last(torch.relu(self.first(x))))
        return self.head(h.mean((2, 3)))


def _images(n: int, seed: int = 0) -> ImageSet:
    rng = np.random.default_rng(seed)
    return ImageSet(rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8), rng.integers(0, 3, n).astype(np.int64))


def test_channels_are_ranked_by_their_mean_activation_on_clean_images():
    torch.manual_seed(0)
    net = TwoConvs()
    with torch.no_grad():  # last conv channel k passes the first conv's channels scaled by (k+1), except channel 2
        net.first.weight.fill_(0.1)
        net.first.bias.zero_()
        net.last.weight.zero_()
        net.last.bias.zero_()
        for k, scale in enumerate([3.0, 1.0, 0.0, 2.0]):
            net.last.weight[k, :, 0, 0] = scale
        net.last.bias[2] = -5.0  # dormant on every clean image
    images = _images(20)
    ranked = fine_pruning.rank_channels(net, images)
    assert ranked.layer == "last"
    x = to_tensor(images.x)
    expected = torch.relu(net.last(torch.relu(net.first(x)))).mean((0, 2, 3))  # computed directly, not by the hook
    assert torch.allclose(ranked.activations, expected, atol=1e-5)
    # pruning order: the dormant channel 2, then 1 (x1), 3 (x2), 0 (x3)
    assert torch.argsort(ranked.masks).tolist() == [2, 1, 3, 0]
    assert ranked.masks.min() > 0 and ranked.masks.max() < 1


def test_a_named_layer_that_is_not_a_convolution_is_refused():
    from trojanlab.errors import ConfigError

    with pytest.raises(ConfigError, match="head"):
        fine_pruning.rank_channels(TwoConvs(), _images(4), layer="head")


def test_fine_tuning_keeps_pruned_filters_at_zero_and_moves_the_others():
    torch.manual_seed(0)
    net = TwoConvs()
    with torch.no_grad():
        net.last.weight[1].zero_()
    before = net.last.weight.detach().clone()
    fine_pruning.fine_tune(net, _images(60), epochs=2, lr=1e-2, progress=False)
    after = net.last.weight.detach()
    assert torch.count_nonzero(after[1]) == 0
    assert not torch.allclose(after[0], before[0])
    # the hooks are gone: a later gradient reaches the formerly pruned filter (its ReLU opened by a positive bias)
    with torch.no_grad():
        net.last.bias[1] = 1.0
    net.zero_grad()
    net(to_tensor(_images(2).x)).sum().backward()
    assert net.last.weight.grad[1].abs().sum() > 0


def test_defend_fine_pruning_on_a_backdoored_model(small_backdoor, tmp_path):
    """The library entry point end to end: the report's figures match the written artefact's."""
    from trojanlab.evaluation.run import evaluate

    model, data = small_backdoor
    out = tmp_path / "fp"
    report = defend("fine-pruning", model, FinePruningConfig(fine_tune_epochs=2), PruneRule(curve_images=30),
                    data=data, defender=DefenderConfig(clean_fraction=0.2), out=out, progress=False)  # fmt: skip
    written = json.loads((out / "result.json").read_text())
    assert written["method"] == "fine-pruning" and written["layer"]
    assert written["pruned"] == report.details["pruned"] and 0 <= written["pruned"] <= written["neurons"]
    assert len(written["mean_activation"]) == written["neurons"]
    assert written["after"]["clean_accuracy"] == pytest.approx(evaluate(out / "pruned", data=data)["clean_accuracy"])
    assert report.before["attack_success_rate"] > 0.8
    assert (out / "pruning_curve.png").is_file() and written["test_curve"][0]["pruned"] == 0
