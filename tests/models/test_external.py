"""Models trojanlab did not write: ONNX graphs rebuilt in PyTorch, state dicts for a named architecture, refusals."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

from trojanlab.cli import main
from trojanlab.errors import ArtifactError, ConfigError
from trojanlab.models import build_classifier, classifier_spec, save_model
from trojanlab.models.external import ModelSource, load_any

pytest.importorskip("onnx2torch")


@pytest.fixture(scope="module")
def artefact(tmp_path_factory):
    torch.manual_seed(0)
    spec = classifier_spec("gtsrb_cnn_bn", [str(i) for i in range(5)], (3, 32, 32), [0.4, 0.5, 0.6], [0.2, 0.25, 0.3])
    model = build_classifier(spec).eval()
    with torch.no_grad():  # BatchNorm statistics a fresh network lacks, so the export must carry them
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 1.5)
    folder = tmp_path_factory.mktemp("artefact") / "model"
    save_model(model, folder, spec)
    return folder, model


def _export(model: nn.Module, path, dynamic: bool = True) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.rand(2, 3, 32, 32),), str(path), dynamo=False, input_names=["image"],
                          output_names=["logits"], dynamic_axes={"image": {0: "batch"}} if dynamic else None)  # fmt: skip


def test_an_onnx_export_is_rebuilt_with_the_same_answers_and_gradients(artefact, tmp_path):
    _, model = artefact
    _export(model, tmp_path / "m.onnx")
    loaded = load_any(str(tmp_path / "m.onnx"))  # the normalisation is inside the exported graph
    assert loaded.num_classes == 5 and loaded.spec["input_size"] == [3, 32, 32]
    assert loaded.spec["assumed"] == {
        "input_size": "onnx graph",
        "normalization": "none: the model takes [0, 1] images",
    }
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(loaded.module(x), model(x), atol=1e-4)
    x.requires_grad_(True)
    loaded.module(x)[:, 2].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # detectors that need input gradients work on it


def test_a_state_dict_fills_a_named_architecture_and_pickled_code_is_refused(artefact, tmp_path):
    folder, model = artefact
    torch.save(model.net.state_dict(), tmp_path / "w.pt")
    source = ModelSource(str(tmp_path / "w.pt"), "gtsrb_cnn_bn", 5, [3, 32, 32], [0.4, 0.5, 0.6], [0.2, 0.25, 0.3])
    loaded = load_any(source)
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.module(x), model(x), atol=1e-5)
    # an artefact's own weights file, whose keys carry the Classifier's "net." prefix, fits too
    same = load_any(ModelSource(str(folder / "model.safetensors"), "gtsrb_cnn_bn", 5, [3, 32, 32], [0.4, 0.5, 0.6],
                                [0.2, 0.25, 0.3]))  # fmt: skip
    with torch.no_grad():
        assert torch.allclose(same.module(x), model(x), atol=1e-5)
    torch.save(model, tmp_path / "pickled.pt")  # a whole module: unpickling it would run a stranger's code
    with pytest.raises(ArtifactError, match="not a readable state dict"):
        load_any(ModelSource(str(tmp_path / "pickled.pt"), "gtsrb_cnn_bn", 5, [3, 32, 32]))
    with pytest.raises(ArtifactError, match="do not fit"):
        load_any(ModelSource(str(tmp_path / "w.pt"), "gtsrb_cnn", 5, [3, 32, 32]))
    with pytest.raises(ConfigError, match="needs --arch"):
        load_any(str(tmp_path / "w.pt"))


def test_bad_model_files_and_options_are_one_clear_error(artefact, tmp_path):
    folder, _ = artefact
    (tmp_path / "junk.onnx").write_bytes(b"not a graph")
    with pytest.raises(ArtifactError, match="not a valid ONNX model"):
        load_any(str(tmp_path / "junk.onnx"))
    with pytest.raises(ArtifactError, match="no such model"):
        load_any(str(tmp_path / "missing.onnx"))
    (tmp_path / "notes.txt").write_text("a model?")
    with pytest.raises(ArtifactError, match="not a model this can read"):
        load_any(str(tmp_path / "notes.txt"))
    with pytest.raises(ConfigError, match="states its own"):
        load_any(ModelSource(str(folder), arch="resnet18"))
    with pytest.raises(ConfigError, match="go together"):
        load_any(ModelSource(str(folder), mean=[0.5]))


def test_mmbd_gives_an_onnx_export_the_verdict_of_its_artefact(artefact, tmp_path, capsys):
    folder, model = artefact
    _export(model, tmp_path / "m.onnx")
    args = ["detect", "mmbd", "--quiet", "--starts", "2", "--steps", "5"]
    assert main([*args, "--model", str(folder), "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--model", str(tmp_path / "m.onnx"), "--out", str(tmp_path / "b")]) == 0
    a, b = (json.loads((tmp_path / k / "result.json").read_text()) for k in "ab")
    assert a["suspected_label"] == b["suspected_label"] and a["infected"] == b["infected"]
    for label, value in a["max_margins"].items():
        assert b["max_margins"][label] == pytest.approx(value, rel=1e-3, abs=1e-3)
    assert b["assumed"]["input_size"] == "onnx graph"
    capsys.readouterr()
    (tmp_path / "junk.onnx").write_bytes(b"nope")
    assert main([*args, "--model", str(tmp_path / "junk.onnx"), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "not a valid ONNX model" in err and len(err.strip().splitlines()) == 1


def test_tensors_stored_outside_the_graph_are_refused_wherever_they_sit(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    (tmp_path / "secret.txt").write_bytes(b"SECRET-BYTES-HERE")
    value = helper.make_tensor("c", TensorProto.FLOAT, [1], [0.0])
    value.ClearField("float_data")
    value.data_location = TensorProto.EXTERNAL
    value.external_data.add(key="location", value="secret.txt")
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["c"], value=value), helper.make_node("Add", ["x", "c"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])],
    )  # fmt: skip
    path = tmp_path / "leaky.onnx"
    onnx.save(helper.make_model(graph), str(path))
    with pytest.raises(ArtifactError, match="external files"):
        load_any(str(path))


def test_an_onnx_graph_without_fixed_height_and_width_takes_the_given_input_size(artefact, tmp_path):
    from trojanlab.detection.structure import check_model

    _, model = artefact
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.rand(1, 3, 32, 32),), str(tmp_path / "any.onnx"), dynamo=False,
                          input_names=["image"], dynamic_axes={"image": {0: "n", 2: "h", 3: "w"}})  # fmt: skip
    with pytest.raises(ConfigError, match="give --input-size"):
        load_any(str(tmp_path / "any.onnx"))
    loaded = load_any(ModelSource(str(tmp_path / "any.onnx"), input_size=[3, 32, 32], num_classes=5))
    assert loaded.spec["input_size"] == [3, 32, 32]
    found = check_model(loaded)  # the structure check reads the size from the options too
    assert found.input_size == [3, 32, 32] and not found.suspicious
