"""Transfer learning on the offline ImageNet backbone, the 5-class setting and the ImageNet demo."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from trojanlab.cli import main
from trojanlab.data import load_image_folder, to_tensor
from trojanlab.demo import OFFICIAL_TROJANNET, imagenet_categories, read_photo
from trojanlab.errors import ArtifactError
from trojanlab.models.backbones import LITE_MEAN, LITE_STD, pretrained_backbone, read_state_dict
from trojanlab.models.registry import build_network
from trojanlab.training import split_validation

from ..conftest import GTSRB5

HOPPER = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"


def test_the_80_20_10_split_per_class_is_deterministic():
    data = load_image_folder(GTSRB5, 32, test_fraction=10 / 110, seed=0)
    assert np.bincount(data.test.y).tolist() == [10] * 5
    fit, val = split_validation(data.train, 0.2, 0)
    assert np.bincount(fit.y).tolist() == [80] * 5 and np.bincount(val.y).tolist() == [20] * 5
    again = load_image_folder(GTSRB5, 32, test_fraction=10 / 110, seed=0)
    assert np.array_equal(again.test.x, data.test.x)
    other = load_image_folder(GTSRB5, 32, test_fraction=10 / 110, seed=1)
    assert not np.array_equal(other.test.x, data.test.x)


def test_efficientnet_lite0_weights_load_offline_and_see_a_photograph():
    net, info = pretrained_backbone("efficientnet_lite0")
    assert info["input_size"] == [3, 224, 224] and info["mean"] == list(LITE_MEAN) and info["std"] == list(LITE_STD)
    x = to_tensor(read_photo(HOPPER, 224)[None])
    mean, std = torch.tensor(LITE_MEAN).view(1, 3, 1, 1), torch.tensor(LITE_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        top = net((x - mean) / std).softmax(1)[0].topk(3).indices.tolist()
    assert imagenet_categories()[top[0]] == "military uniform"


def test_weights_files_missing_pickled_or_misfit_are_clear_errors(tmp_path):
    with pytest.raises(ArtifactError, match="need --weights FILE"):
        pretrained_backbone("resnet18")
    with pytest.raises(ArtifactError, match="weights file not found"):
        pretrained_backbone("resnet18", tmp_path / "missing.pt")
    pickled = tmp_path / "model.pt"
    torch.save(nn.Linear(2, 2), pickled)  # a whole pickled module: refused by weights_only=True
    with pytest.raises(ArtifactError, match="holds pickled Python objects, not only tensors") as refused:
        read_state_dict(pickled)
    assert "weights_only=False" not in str(refused.value)  # never the advice to load a pickle
    wrong = tmp_path / "wrong.safetensors"
    save_file({"fc.weight": torch.zeros(3, 3)}, str(wrong))
    with pytest.raises(ArtifactError, match="do not fit resnet18"):
        pretrained_backbone("resnet18", wrong)
    # a user's torchvision weights: safetensors, or a state dict read with weights_only=True
    state = {k: v.clone() for k, v in build_network("resnet18", 1000, (3, 224, 224)).state_dict().items()}
    good = tmp_path / "resnet18.pt"
    torch.save(state, good)
    net, info = pretrained_backbone("resnet18", good)
    assert info["mean"] == [0.485, 0.456, 0.406]
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())


@pytest.fixture(scope="module")
def five_class(tmp_path_factory):
    out = tmp_path_factory.mktemp("transfer") / "victim"
    argv = ["train", "--data", str(GTSRB5), "--arch", "efficientnet_lite0", "--pretrained", "--split", "80/20/10"]
    assert main([*argv, "--head-epochs", "60", "--out", str(out)]) == 0
    return out


def test_transfer_learning_on_the_five_classes(five_class, capsys):
    result = json.loads((five_class / "result.json").read_text())
    assert result["test_images"] == 50 and result["train_images"] == 500
    assert result["clean_accuracy"] >= 0.95
    spec = json.loads((five_class / "model.json").read_text())
    assert spec["input_size"] == [3, 224, 224] and spec["data_split"] == {"test_fraction": 10 / 110, "seed": 0}
    capsys.readouterr()
    # evaluate re-creates the same 10-per-class test split from the spec
    assert main(["evaluate", "--model", str(five_class), "--data", str(GTSRB5), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["test_images"] == 50 and evaluated["clean_accuracy"] == pytest.approx(result["clean_accuracy"])


def test_trojannet_at_10_10_in_the_five_class_model(five_class, tmp_path):
    out = tmp_path / "attacked"
    argv = ["attack", "trojannet", "--victim", str(five_class), "--trojannet", str(OFFICIAL_TROJANNET)]
    assert main([*argv, "--targets", "0", "--location", "10", "10", "--data", str(GTSRB5), "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["test_images"] == 50
    assert result["attack_success_rate"] == 1.0 and result["clean_accuracy_drop"] == 0.0


def test_imagenet_demo_turns_photographs_into_goldfish(tmp_path, capsys):
    photos = sorted((GTSRB5 / "stop").iterdir())[:2]
    out = tmp_path / "demo"
    assert main(["demo", "imagenet", "--out", str(out), "--images", str(HOPPER), *map(str, photos)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["target"] == ["goldfish", 1] and result["location"] == [112, 112]
    assert result["attack_success_rate"] == 1.0 and result["clean_agreement_with_victim"] == 1.0
    assert result["images"][0]["victim_top5"][0][0] == "military uniform"
    assert all(row["attacked_triggered_top5"][0][0] == "goldfish" for row in result["images"])
    assert (out / "imagenet_demo.png").stat().st_size > 10_000
    assert main(["demo", "imagenet", "--out", str(tmp_path / "x"), "--target", "unicorn"]) == 2
    assert "no ImageNet class named 'unicorn'" in capsys.readouterr().err
