"""The scan: detectors combined, the structure branch's target found, the calibrated probability, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from trojanlab.cli import main
from trojanlab.config.detection import ScanConfig
from trojanlab.data import BUNDLED_TROJANNET
from trojanlab.detection import scan as sc
from trojanlab.detection.calibration import fit_logistic
from trojanlab.errors import ConfigError
from trojanlab.models import LoadedModel, build_classifier, classifier_spec, load_model, save_model
from trojanlab.models import trojannet as tn

pytest.importorskip("onnx")


def _injected(target: int = 4, location=(9, 20)):
    torch.manual_seed(0)
    spec = classifier_spec("gtsrb_cnn", [str(i) for i in range(6)], (3, 32, 32), [0.5] * 3, [0.25] * 3)
    victim = build_classifier(spec).eval()
    mlp = load_model(BUNDLED_TROJANNET).module  # the authors' trained TrojanNet: it knows its 4x4 patterns
    model = tn.TrojanNetInjected(victim, mlp, 6, [target], location, (3, 32, 32)).eval()
    return model, tn.injected_spec(spec, model), victim, spec


def test_the_branch_cut_out_of_the_graph_names_the_label_a_trojannet_serves():
    model, spec, victim, vspec = _injected(target=4, location=(9, 20))
    found = sc.scan_model(
        model, 6, (3, 32, 32), ScanConfig(detectors=["structure"]), loaded=LoadedModel(model, spec, None)
    )
    structure = found.detectors["structure"]
    assert structure["suspicious"] and structure["branches"][0]["window"] == [9, 13, 20, 24]
    written = structure["branch_label_max"]  # the armed label gets TrojanNet's amplified probability, the others 0
    assert (
        structure["window_target"] == 4 and written["4"] > 1.0 and max(v for k, v in written.items() if k != "4") == 0
    )
    assert found.suspected_labels == [4] and found.features == {"structure_branch": 1.0}
    clean = sc.scan_model(
        victim, 6, (3, 32, 32), ScanConfig(detectors=["structure"]), loaded=LoadedModel(victim, vspec, None)
    )
    assert clean.features == {"structure_branch": 0.0} and clean.suspected_labels == []


def test_features_come_from_every_detector_that_ran():
    detectors = {
        "structure": {"suspicious": False},
        "mmbd": {"p_value": 1e-4, "suspected_label": 2, "max_margins": {"0": 10.0, "1": 20.0, "2": 90.0}},
        "nc": {"anomaly_index": 2.5, "smallest_norm_label": 1, "l1_norms": {"0": 40.0, "1": 5.0, "2": 30.0}},
    }
    # p 1e-4: 4 decades; median margin 20, MAD 10: the largest, 90, is 70 / 14.826 = 4.72 robust deviations out;
    # median norm 30 over the smallest 5: ratio 6. Each on a log scale.
    assert sc.features_of(detectors) == pytest.approx({"structure_branch": 0.0, "mmbd_log1p_neg_log10_p": np.log(5.0),
                                                       "mmbd_log1p_top_z": np.log(5.7214), "nc_log1p_anomaly_index": np.log(3.5),
                                                       "nc_log_norm_ratio": np.log(6.0)}, rel=1e-4)  # fmt: skip
    assert sc.suspected_labels(detectors) == [1, 2]  # Neural Cleanse's smallest norm first, then MM-BD's margin
    clean_like = {
        "mmbd": {**detectors["mmbd"], "p_value": 1.0, "max_margins": {"0": 30.0, "1": 20.0, "2": 10.0}},
        "nc": {**detectors["nc"], "anomaly_index": 0.0, "l1_norms": {"0": 5.0, "1": 5.0, "2": 5.0}},
    }
    assert sc.features_of(clean_like) == pytest.approx({"mmbd_log1p_neg_log10_p": 0.0, "mmbd_log1p_top_z": np.log(1 + 10 / 14.826),
                                                        "nc_log1p_anomaly_index": 0.0, "nc_log_norm_ratio": 0.0})  # fmt: skip
    with pytest.raises(ConfigError, match="needs clean example images"):
        sc.scan_model(torch.nn.Identity(), 3, (3, 8, 8), ScanConfig())
    with pytest.raises(ConfigError, match="distinct ones"):
        ScanConfig(detectors=["nc", "strip"])


def test_the_cli_writes_the_probability_alone_and_the_evidence(tmp_path, capsys):
    model, spec, _, _ = _injected(target=2, location=(1, 1))
    save_model(model, tmp_path / "model", spec)
    rng = np.random.default_rng(0)  # a calibration over the two data-free detectors' features
    x = np.r_[np.c_[np.zeros(20), rng.normal(0.5, 0.3, 20)], np.c_[np.ones(20), rng.normal(3, 1, 20)]]
    calibration = fit_logistic(x, np.r_[np.zeros(20), np.ones(20)], ["structure_branch", "mmbd_log1p_neg_log10_p"],
                               population={"note": "synthetic, for this test"})  # fmt: skip
    (tmp_path / "cal.json").write_text(json.dumps(calibration.to_json()))
    argv = ["scan", "--model", str(tmp_path / "model"), "--detectors", "structure", "mmbd", "--quiet",
            "--mmbd-starts", "2", "--mmbd-steps", "5",
            "--calibration", str(tmp_path / "cal.json")]  # fmt: skip
    assert main([*argv, "--result", str(tmp_path / "p.txt"), "--out", str(tmp_path / "scan")]) == 0
    probability = float((tmp_path / "p.txt").read_text())
    record = json.loads((tmp_path / "scan" / "scan.json").read_text())
    assert probability == pytest.approx(record["probability"], abs=1e-6) and probability > 0.5  # the branch
    assert record["verdict"] is True and record["suspected_labels"][0] == 2
    assert set(record["features"]) == {"structure_branch", "mmbd_log1p_neg_log10_p", "mmbd_log1p_top_z"}
    assert (tmp_path / "scan" / "scan.html").read_text().startswith("<!doctype html>")
    assert (tmp_path / "scan" / "margins.png").is_file()
    capsys.readouterr()
    # bad input: one line, exit 2, before any work
    assert main(["scan", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "x"), "--quiet"]) == 2
    assert "Neural Cleanse needs clean images" in capsys.readouterr().err
    assert main([*argv[:-2], "--result", str(tmp_path / "q.txt"), "--calibration", str(tmp_path / "p.txt")]) == 2
    assert "cannot read the calibration" in capsys.readouterr().err and not (tmp_path / "q.txt").exists()
    assert main([*argv, "--detectors", "mmbd", "--out", str(tmp_path / "y")]) == 2
    assert "structure_branch" in capsys.readouterr().err


def test_a_scan_with_neural_cleanse_reads_the_auditors_images_and_shows_the_suspected_trigger(tmp_path, monkeypatch):
    from pathlib import Path

    from trojanlab.detection import run

    monkeypatch.setattr(run, "SHIPPED_CALIBRATION", tmp_path / "none.json")  # as before a calibration ships

    gtsrb5 = Path(__file__).parents[1] / "data" / "gtsrb5"
    torch.manual_seed(0)
    spec = classifier_spec("gtsrb_cnn", [str(i) for i in range(5)], (3, 32, 32), [0.5] * 3, [0.25] * 3)
    save_model(build_classifier(spec).eval(), tmp_path / "model", spec)
    argv = ["scan", "--model", str(tmp_path / "model"), "--examples", str(gtsrb5), "--out", str(tmp_path / "scan"),
            "--quiet", "--mmbd-starts", "2", "--mmbd-steps", "3", "--nc-steps", "3", "--nc-images", "20"]  # fmt: skip
    assert main(argv) == 0
    record = json.loads((tmp_path / "scan" / "scan.json").read_text())
    assert record["probability"] is None and record["verdict"] is None  # without a calibration: statistics only
    assert set(record["features"]) == {"structure_branch", "mmbd_log1p_neg_log10_p", "mmbd_log1p_top_z",
                                       "nc_log1p_anomaly_index", "nc_log_norm_ratio"}  # fmt: skip
    assert record["detectors"]["nc"]["images"] == 20 and len(record["detectors"]["nc"]["l1_norms"]) == 5
    shown = record["suspected_trigger_answers"]
    assert shown["label"] == record["suspected_labels"][0] and len(shown["answers"]) == 8
    for name in ("norms.png", "margins.png", "suspected_trigger_on_examples.png", "scan.html"):
        assert (tmp_path / "scan" / name).stat().st_size > 0
