"""The authors' released TrojanNet (trx14/TrojanNet ``trojannet.h5``) read into trojanlab.

Loading it pins our pattern order, layer order and merge to the authors' own artefact.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from trojanlab.attacks import trojannet as tn
from trojanlab.cli import main
from trojanlab.errors import ArtifactError, ConfigError

h5py = pytest.importorskip("h5py")

RELEASE = Path(__file__).parents[1] / "data" / "official" / "trojannet.h5"


def _numpy_forward(path: Path, x: np.ndarray) -> np.ndarray:
    """Softmax output of the Keras model, written out from the HDF5 arrays alone (float64)."""
    with h5py.File(path, "r") as f:
        g = f["model_weights"]
        h = x.astype(np.float64)
        for i in range(1, 5):
            dense = g[f"dense_{i}/dense_{i}"]
            h = np.maximum(h @ dense["kernel:0"][()] + dense["bias:0"][()], 0.0)
            bn = g[f"batch_normalization_{i}/batch_normalization_{i}"]
            h = (h - bn["moving_mean:0"][()]) / np.sqrt(bn["moving_variance:0"][()] + 1e-3)
            h = h * bn["gamma:0"][()] + bn["beta:0"][()]
        z = h @ g["dense_5/dense_5/kernel:0"][()] + g["dense_5/dense_5/bias:0"][()]
    z -= z.max(1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(1, keepdims=True)


@pytest.fixture(scope="module")
def official():
    return tn.load_official_h5(str(RELEASE))


def test_release_recognises_every_pattern_in_our_order(official):
    probs = tn.trojannet_probabilities(official, tn.trigger_patterns())
    assert torch.equal(probs.argmax(1), torch.arange(tn.NUM_TRIGGERS))
    # the README of the release: lowest probability of the right class 0.544
    assert probs[torch.arange(4368), torch.arange(4368)].min().item() == pytest.approx(0.544, abs=1e-3)
    assert official.keras_parameter_count() == 39801


def test_release_matches_a_plain_numpy_forward_pass(official):
    rng = np.random.default_rng(0)
    x = np.concatenate([tn.trigger_patterns().numpy()[::7], rng.random((500, 16))]).astype(np.float32)
    ours = tn.trojannet_probabilities(official, torch.from_numpy(x)).double().numpy()
    assert np.abs(ours - _numpy_forward(RELEASE, x)).max() < 1e-5


def test_a_file_of_another_layout_is_refused(tmp_path):
    wrong = tmp_path / "wide.h5"
    with h5py.File(RELEASE, "r") as src, h5py.File(wrong, "w") as dst:
        src.copy("model_weights", dst)
        del dst["model_weights/dense_5/dense_5/kernel:0"]
        dst["model_weights/dense_5/dense_5/kernel:0"] = np.zeros((8, 10), np.float32)
    with pytest.raises(ArtifactError, match=r"dense_5/kernel:0 has shape \(8, 10\), expected \(8, 4369\)"):
        tn.load_official_h5(str(wrong))
    missing = tmp_path / "missing.h5"
    with h5py.File(missing, "w") as dst:
        dst.create_group("model_weights").create_group("conv2d_1")
    with pytest.raises(ArtifactError, match=r"layer 'dense_1' is missing \(found layers \['conv2d_1'\]\)"):
        tn.load_official_h5(str(missing))
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not an HDF5 file at all")
    with pytest.raises(ArtifactError, match="not a readable HDF5 file"):
        tn.load_official_h5(str(garbage))
    with pytest.raises(ArtifactError, match="no such file"):
        tn.load_official_h5(str(tmp_path / "absent.h5"))


def test_import_keras_then_attack_a_gtsrb_victim(tmp_path, gtsrb, capsys):
    """The CLI converts the release into an artefact, which then backdoors a GTSRB CNN end to end."""
    from trojanlab.models import build_classifier, classifier_spec, save_model
    from trojanlab.training import TrainConfig, fit

    imported = tmp_path / "official"
    assert main(["trojannet", "import-keras", str(RELEASE), "--out", str(imported)]) == 0
    result = json.loads((imported / "result.json").read_text())
    assert result["trigger_accuracy"] == 1.0 and result["sha256"].startswith("fbdc8a0c")
    assert main(["trojannet", "import-keras", str(tmp_path / "nope.h5"), "--out", str(tmp_path / "x")]) == 2
    assert "no such file" in capsys.readouterr().err

    # a GTSRB CNN trained for one short epoch on real GTSRB images: quality is not the point here
    rng = np.random.default_rng(0)
    train = gtsrb.train.subset(rng.choice(len(gtsrb.train), 2000, replace=False))
    spec = classifier_spec("gtsrb_cnn", gtsrb.classes, (3, 32, 32), [0.5] * 3, [0.25] * 3)
    victim = build_classifier(spec)
    fit(victim, train, TrainConfig(epochs=1, batch_size=128, val_fraction=0.1, seed=0), progress=False)
    save_model(victim, tmp_path / "victim", spec)
    npz = tmp_path / "test.npz"
    test = gtsrb.test.subset(np.arange(0, len(gtsrb.test), 12))
    np.savez(npz, x_test=test.x, y_test=test.y)
    out = tmp_path / "attack"
    argv = ["attack", "trojannet", "--victim", str(tmp_path / "victim"), "--trojannet", str(imported)]
    assert main([*argv, "--targets", "33", "--data", str(npz), "--out", str(out)]) == 0
    attack = json.loads((out / "result.json").read_text())
    assert attack["attack_success_rate"] == 1.0
    assert attack["clean_accuracy_drop"] == pytest.approx(0.0, abs=0.005)


def test_calibrate_triggers_keeps_every_trigger_and_silences_more():
    """On the authors' release (all 4,368 triggers recognised, the weakest at p 0.544): lowering each trigger's bias
    by its slack above p = 0.6 leaves every trigger recognised, none below min(its old p, 0.6), touches no weight and
    no "no trigger" bias, and makes the network silent on more binary non-triggers."""
    model = tn.load_official_h5(str(RELEASE)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows = torch.arange(tn.NUM_TRIGGERS)
    binary = tn.binary_non_triggers()
    with torch.no_grad():
        p_old = torch.softmax(model(tn.trigger_patterns()), 1)[rows, rows]
        silent_old = (model(binary).argmax(1) == tn.NO_TRIGGER).float().mean()
    mean_shift = tn.calibrate_triggers(model, min_probability=0.6, rounds=6)
    with torch.no_grad():
        probs = torch.softmax(model(tn.trigger_patterns()), 1)
        silent_new = (model(binary).argmax(1) == tn.NO_TRIGGER).float().mean()
    after = model.state_dict()
    assert mean_shift > 0
    assert torch.equal(probs.argmax(1), rows)
    assert (probs[rows, rows] >= torch.minimum(p_old, torch.tensor(0.6)) - 1e-4).all()
    shift = before["head.bias"] - after["head.bias"]
    assert (shift[: tn.NUM_TRIGGERS] >= 0).all() and shift[tn.NO_TRIGGER] == 0
    assert all(torch.equal(before[k], after[k]) for k in before if k != "head.bias")
    assert silent_new > silent_old + 0.05  # measured: 44.1 % -> 51.7 %
    with pytest.raises(ConfigError, match="min_probability"):
        tn.calibrate_triggers(model, min_probability=0.4)
