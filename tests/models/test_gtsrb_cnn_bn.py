"""``gtsrb_cnn_bn``: the GTSRB CNN with a BatchNorm after every convolution and FC 512 (the zoo's second victim
architecture, so that ANP's BatchNorm path is measured as well as its plain-unit path)."""

from __future__ import annotations

import json

import torch
from torch import nn

from trojanlab.cli import main
from trojanlab.defenses import anp
from trojanlab.models import build_network, load_model


def test_the_bn_variant_normalises_every_layer_and_anp_perturbs_its_bn_channels():
    plain, bn = build_network("gtsrb_cnn", 43, (3, 32, 32)), build_network("gtsrb_cnn_bn", 43, (3, 32, 32))
    norms = [m for m in bn.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
    assert [m.num_features for m in norms] == [32, 32, 64, 64, 128, 128, 512]
    extra = sum(p.numel() for p in bn.parameters()) - sum(p.numel() for p in plain.parameters())
    assert extra == 2 * (32 + 32 + 64 + 64 + 128 + 128 + 512)  # gamma and beta per channel, nothing else changes
    bn.eval()
    assert bn(torch.rand(2, 3, 32, 32)).shape == (2, 43)
    # ANP's neurons here are the BatchNorm channels: the convolutions and FC 512 feeding them are left to the BN
    layers = anp.find_neurons(bn, torch.rand(2, 3, 32, 32), num_classes=43)
    assert [layer.kind for layer in layers] == ["bn"] * 7
    assert sum(layer.size for layer in layers) == 960  # the plain CNN's 960 units, as BN channels


def test_a_bn_victim_trains_and_round_trips_through_the_command_line(tmp_path, make_bright_thirds):
    data = make_bright_thirds(tmp_path / "data.npz", 300, 90, seed=2)
    out = tmp_path / "victim"
    argv = ["train", "--data", str(data), "--arch", "gtsrb_cnn_bn", "--epochs", "3", "--batch-size", "32", "--out",
            str(out), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["arch"] == "gtsrb_cnn_bn" and result["clean_accuracy"] > 0.9
    loaded = load_model(out)
    assert any(isinstance(m, nn.BatchNorm2d) for m in loaded.module.modules())
    assert not loaded.module.training  # loaded for evaluation: running statistics, not batch statistics
