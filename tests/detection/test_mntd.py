"""MNTD: label-free answer features, query tuning on a small population, the scan's use of the meta-classifier."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from trojanlab.config.detection import MNTDConfig, ScanConfig
from trojanlab.detection import mntd
from trojanlab.detection import scan as sc
from trojanlab.detection.calibration import fit_logistic, load_calibrations
from trojanlab.errors import ConfigError
from trojanlab.io import write_json

SHAPE = (3, 8, 8)
CLASSES = 5


class Toy(nn.Module):
    """A linear classifier; backdoored: a 2x2 window brighter than 0.7 adds a large logit to ``target`` (smoothly,
    as a trained network's would grow)."""

    def __init__(self, seed: int, backdoored: bool) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.linear = nn.Linear(int(np.prod(SHAPE)), CLASSES)
        with torch.no_grad():
            self.linear.weight.copy_(torch.randn(CLASSES, int(np.prod(SHAPE)), generator=g) * 0.05)
            self.linear.bias.zero_()
        self.backdoored = backdoored
        self.target = int(torch.randint(CLASSES, (1,), generator=g))
        self.row, self.col = 5, 5  # one trigger window for all: a few dozen models cannot teach every place

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x.flatten(1))
        if self.backdoored:
            window = x[:, :, self.row : self.row + 2, self.col : self.col + 2].mean((1, 2, 3))
            out = out + 10 * torch.sigmoid(20 * (window - 0.7))[:, None] * nn.functional.one_hot(
                torch.tensor(self.target), CLASSES
            )
        return out


def _population(seeds: range) -> tuple[list[nn.Module], list[int]]:
    models = [Toy(s, backdoored=s % 2 == 1) for s in seeds]
    return models, [int(m.backdoored) for m in models]


def test_answer_features_do_not_depend_on_the_labels_names():
    logits = torch.randn(6, CLASSES, generator=torch.Generator().manual_seed(0))
    renamed = logits[:, torch.tensor([3, 0, 4, 1, 2])]
    assert torch.allclose(mntd.answer_features(logits, 3), mntd.answer_features(renamed, 3))
    gathered = torch.full((6, CLASSES), -10.0)
    gathered[:, 2] = 10.0  # every query answered by one label: it takes the whole mean probability
    features = mntd.answer_features(gathered, 3)
    assert features[0] == pytest.approx(1.0, abs=1e-6) and features[1] == pytest.approx(0.0, abs=1e-6)


def test_query_tuning_tells_unseen_backdoored_models_from_clean_ones(tmp_path):
    models, labels = _population(range(24))
    meta = mntd.fit(models, labels, CLASSES, SHAPE, MNTDConfig(queries=4, steps=150, seed=0))
    held_out, truth = _population(range(100, 112))  # new weights and targets
    scores = np.array([meta.score(m) for m in held_out])
    assert (scores[np.array(truth) == 1] > 0).all() and (scores[np.array(truth) == 0] < 0).all()
    again = mntd.MetaClassifier.load(meta.save(tmp_path / "meta.safetensors"))
    assert again.score(held_out[0]) == pytest.approx(scores[0], abs=1e-5) and again.image_shape == SHAPE


def test_a_meta_classifier_says_why_it_cannot_read_a_model_of_another_task(tmp_path):
    meta = mntd.fit(*_population(range(6)), CLASSES, SHAPE, MNTDConfig(queries=2, steps=2))
    assert meta.applicable(CLASSES, SHAPE) is None
    assert "5-class 3x8x8" in meta.applicable(10, SHAPE) and "input 3x16x16" in meta.applicable(CLASSES, (3, 16, 16))
    with pytest.raises(ConfigError, match="both clean"):
        mntd.fit(*_population(range(0, 6, 2)), CLASSES, SHAPE, MNTDConfig(steps=1))
    (tmp_path / "bad.safetensors").write_bytes(b"not a file of tensors")
    with pytest.raises(ConfigError, match="not an MNTD meta-classifier"):
        mntd.MetaClassifier.load(tmp_path / "bad.safetensors")


def test_the_scan_takes_the_first_calibration_whose_features_it_gave(tmp_path):
    models, labels = _population(range(8))
    meta = mntd.fit(models, labels, CLASSES, SHAPE, MNTDConfig(queries=2, steps=20))
    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 10)
    with_mntd = fit_logistic(np.c_[y + rng.normal(0, 0.3, 20)], y, ["mntd_score"])
    structure_only = fit_logistic(np.c_[y * 1.0], y, ["structure_branch"])
    write_json(tmp_path / "cal.json", {"calibrations": [with_mntd.to_json(), structure_only.to_json()]})
    calibrations = load_calibrations(tmp_path / "cal.json")
    cfg = ScanConfig(detectors=["mntd"])
    found = sc.scan_model(models[1], CLASSES, SHAPE, cfg, calibration=calibrations, meta=meta)
    assert set(found.features) == {"mntd_score"} and found.calibration["features"] == ["mntd_score"]
    assert found.probability == pytest.approx(with_mntd.probability(found.features))
    skipped = sc.scan_model(models[1], 10, SHAPE, cfg, meta=meta)  # a 10-class model: not the population's task
    assert "5-class" in skipped.detectors["mntd"]["skipped"] and skipped.features == {}
    with pytest.raises(ConfigError, match="no calibration reads only"):
        sc.scan_model(models[1], 10, SHAPE, cfg, calibration=calibrations, meta=meta)
    missing = sc.scan_model(models[1], CLASSES, SHAPE, cfg, meta=None)
    assert "none ships" in missing.detectors["mntd"]["skipped"]


def test_the_cli_scores_an_artefact_and_refuses_a_model_of_another_task(tmp_path, capsys, monkeypatch):
    from trojanlab.cli import main
    from trojanlab.detection import run
    from trojanlab.models import build_classifier, classifier_spec, save_model

    torch.manual_seed(0)
    for classes in (6, 4):
        spec = classifier_spec("gtsrb_cnn", [str(i) for i in range(classes)], (3, 32, 32), [0.5] * 3, [0.25] * 3)
        save_model(build_classifier(spec), tmp_path / f"model{classes}", spec)
    spec = classifier_spec("gtsrb_cnn", list("abcdef"), (3, 32, 32), [0.5] * 3, [0.25] * 3)
    population = [build_classifier(spec) for _ in range(4)]
    meta = mntd.fit(population, [0, 1, 0, 1], 6, (3, 32, 32), MNTDConfig(queries=2, steps=3))
    meta_file = meta.save(tmp_path / "meta.safetensors")
    argv = ["detect", "mntd", "--quiet", "--meta-file", str(meta_file)]
    assert main([*argv, "--model", str(tmp_path / "model6"), "--out", str(tmp_path / "ok")]) == 0
    result = json.loads((tmp_path / "ok" / "result.json").read_text())
    assert result["infected"] == (result["score"] > 0) and result["queries"] == 2
    capsys.readouterr()
    assert main([*argv, "--model", str(tmp_path / "model4"), "--out", str(tmp_path / "other")]) == 2
    assert "6-class 3x32x32" in capsys.readouterr().err
    assert not (tmp_path / "other").exists() or not any((tmp_path / "other").iterdir())
    monkeypatch.setattr(run, "SHIPPED_MNTD", tmp_path / "none.safetensors")
    assert main(["detect", "mntd", "--model", str(tmp_path / "model6"), "--out", str(tmp_path / "no")]) == 2
    assert "no MNTD meta-classifier ships" in capsys.readouterr().err
