from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from trojanlab.errors import ArtifactError, ConfigError
from trojanlab.models import GTSRBCNN, build_classifier, classifier_spec, load_model, save_model
from trojanlab.models import trojannet as tn
from trojanlab.models.registry import build_network


def test_gtsrb_cnn_matches_the_official_model():
    net = GTSRBCNN(43)
    assert sum(p.numel() for p in net.parameters()) == 571_723
    convs = [m.out_channels for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert convs == [32, 32, 64, 64, 128, 128]
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 43)


def test_torchvision_by_name_and_unknown_name():
    net = build_network("resnet18", 7, (3, 32, 32))
    assert net.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 7)
    with pytest.raises(ConfigError, match="unknown architecture 'resnet19'"):
        build_network("resnet19", 7, (3, 32, 32))


def test_round_trip_is_exact(tmp_path):
    spec = classifier_spec("gtsrb_cnn", [str(i) for i in range(43)], (3, 32, 32), [0.3, 0.3, 0.3], [0.2, 0.2, 0.2])
    model = build_classifier(spec).eval()
    save_model(model, tmp_path / "m", {**spec, "provenance": {"note": "test"}})
    loaded = load_model(tmp_path / "m")
    x = torch.rand(4, 3, 32, 32)
    assert torch.equal(model(x), loaded.module(x))
    written = json.loads((tmp_path / "m" / "model.json").read_text())
    assert written["normalization"]["mean"] == [0.3, 0.3, 0.3] and written["provenance"]["note"] == "test"
    assert "trojanlab_version" in written["provenance"]


def test_user_module_round_trip(tmp_path):
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
    spec = classifier_spec("my_net", list("abcd"), (3, 8, 8), [0, 0, 0], [1, 1, 1])
    save_model(build_classifier(spec, net), tmp_path / "u", spec)
    fresh = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
    loaded = load_model(tmp_path / "u", net=fresh)
    assert torch.equal(loaded.module.net[1].weight, net[1].weight)


def test_injected_model_round_trip_carries_triggers(tmp_path):
    spec = classifier_spec("gtsrb_cnn", [str(i) for i in range(43)], (3, 32, 32), [0, 0, 0], [1, 1, 1])
    victim = build_classifier(spec).eval()
    model = tn.TrojanNetInjected(victim, tn.TrojanNetMLP().eval(), 43, [3, 9], (27, 27), (3, 32, 32), merge="paper")
    save_model(model, tmp_path / "a", tn.injected_spec(spec, model))
    loaded = load_model(tmp_path / "a")
    assert [t.target_label for t in loaded.triggers] == [3, 9]
    assert loaded.triggers[1].pattern.tolist() == tn.trigger_pattern(9).tolist()
    x = torch.rand(3, 3, 32, 32)
    assert torch.allclose(model(x), loaded.module(x))
    assert loaded.module.merge == "paper" and loaded.module.location == (27, 27)


def test_bad_artifacts(tmp_path):
    with pytest.raises(ArtifactError, match="model folder not found"):
        load_model(tmp_path / "none")
    (tmp_path / "x").mkdir()
    with pytest.raises(ArtifactError, match="model.json: missing"):
        load_model(tmp_path / "x")
    (tmp_path / "x" / "model.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_model(tmp_path / "x")
    spec = classifier_spec("gtsrb_cnn", [str(i) for i in range(43)], (3, 32, 32), [0, 0, 0], [1, 1, 1])
    save_model(build_classifier(spec), tmp_path / "y", spec)
    (tmp_path / "y" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match="not a readable safetensors"):
        load_model(tmp_path / "y")
    save_model(build_classifier(spec), tmp_path / "z", spec)
    wrong = json.loads((tmp_path / "z" / "model.json").read_text())
    wrong["num_classes"] = 10
    (tmp_path / "z" / "model.json").write_text(json.dumps(wrong))
    with pytest.raises(ArtifactError, match="do not fit the architecture"):
        load_model(tmp_path / "z")
