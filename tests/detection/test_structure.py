"""The structure check: a branch that reads a small input window and merges into the output, in a traced module
or an ONNX file, and none in plain classifiers."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torchvision
from torch import nn

from trojanlab.cli import main
from trojanlab.detection import structure as st
from trojanlab.models import LoadedModel, build_classifier, classifier_spec, save_model
from trojanlab.models import trojannet as tn

pytest.importorskip("onnx")


def _victim(arch: str = "gtsrb_cnn", classes: int = 6) -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    spec = classifier_spec(arch, [str(i) for i in range(classes)], (3, 32, 32), [0.5] * 3, [0.25] * 3)
    return build_classifier(spec).eval(), spec


def _injected(location=(20, 9)) -> tuple[nn.Module, dict]:
    victim, spec = _victim()
    model = tn.TrojanNetInjected(victim, tn.TrojanNetMLP(), 6, [4], location, (3, 32, 32)).eval()
    return model, tn.injected_spec(spec, model)


def test_an_injected_trojannet_is_a_weighted_branch_on_its_4x4_window():
    model, spec = _injected(location=(20, 9))
    found = st.check_model(LoadedModel(model, spec, None))
    assert found.suspicious and len(found.branches) == 1
    branch = found.branches[0]
    assert branch.window == (20, 24, 9, 13) and branch.size == (4, 4)
    mlp = sum(p.numel() for p in model.trojannet.parameters())  # the exporter may fold a BatchNorm's affine
    routing = model.select.numel()  # the constant that moves TrojanNet's 4,369 outputs onto the labels
    assert 0.95 * mlp + routing <= branch.parameters <= mlp + routing + 100  # its weights, and not the victim's


@pytest.mark.parametrize("arch", ["gtsrb_cnn", "gtsrb_cnn_bn", "resnet18"])
def test_plain_classifiers_have_no_branch_skip_connections_included(arch):
    if arch == "resnet18":
        net = torchvision.models.resnet18(num_classes=6).eval()
        model, spec = net, classifier_spec("resnet18", [str(i) for i in range(6)], (3, 32, 32), [0] * 3, [1] * 3)
    else:
        model, spec = _victim(arch)
    found = st.check_model(LoadedModel(model, spec, None))
    assert not found.suspicious and found.branches == [] and found.operations > 10


def test_a_crop_merged_without_weights_is_reported_but_not_suspicious():
    class CropSkip(nn.Module):  # a classifier that adds a corner's mean to every logit: odd, but no hidden network
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))

        def forward(self, x):
            return self.body(x) + x[:, :, :3, :3].mean((1, 2, 3))[:, None]

    spec = classifier_spec("x", [str(i) for i in range(5)], (3, 32, 32), [0] * 3, [1] * 3)
    found = st.check_model(LoadedModel(CropSkip().eval(), spec, None))
    assert [b.window for b in found.branches] == [(0, 3, 0, 3)] and not found.suspicious


def test_the_cli_reads_an_onnx_export_of_an_injected_model_as_its_artefact(tmp_path, capsys):
    model, spec = _injected(location=(2, 25))
    save_model(model, tmp_path / "art", spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.rand(1, 3, 32, 32),), str(tmp_path / "m.onnx"), dynamo=False)
    for name, target in (("a", tmp_path / "art"), ("b", tmp_path / "m.onnx")):
        assert main(["detect", "structure", "--model", str(target), "--out", str(tmp_path / name)]) == 0
    a, b = (json.loads((tmp_path / k / "result.json").read_text()) for k in "ab")
    assert a["infected"] and b["infected"]
    assert a["branches"][0]["window"] == b["branches"][0]["window"] == [2, 6, 25, 29]
    assert "rows 2-5, columns 25-28" in capsys.readouterr().out
    from trojanlab.models.external import load_any

    x = torch.rand(3, 3, 32, 32)
    x[0, :, 2:6, 25:29] = 1.0
    with torch.no_grad():  # the rebuilt graph answers as the module does, merge and all
        assert torch.allclose(load_any(str(tmp_path / "m.onnx")).module(x), model(x), atol=1e-5)
    victim, vspec = _victim()
    save_model(victim, tmp_path / "clean", vspec)
    assert main(["detect", "structure", "--model", str(tmp_path / "clean"), "--out", str(tmp_path / "c")]) == 0
    assert json.loads((tmp_path / "c" / "result.json").read_text())["infected"] is False
    assert main(["detect", "structure", "--model", str(tmp_path / "art"), "--out", str(tmp_path / "d"),
                 "--small-fraction", "1.5"]) == 2  # fmt: skip
