"""The calibration: logistic regression on detector statistics, leave-one-family-out, the leaderboard scores."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from trojanlab.detection import calibration as cal
from trojanlab.errors import ConfigError


def test_scores_on_hand_computed_cases():
    assert cal.roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75  # 3 of the 4 (backdoored, clean) pairs in order
    assert cal.roc_auc([0, 1], [0.5, 0.5]) == 0.5  # a tie counts half
    y, p = [1, 1, 1, 1, 0, 0, 0], [0.9, 0.8, 0.7, 0.2, 0.75, 0.3, 0.1]
    assert cal.fpr_at_tpr(y, p, 0.75) == pytest.approx(1 / 3)  # threshold 0.7 flags the clean 0.75
    assert cal.fpr_at_tpr(y, p, 1.0) == pytest.approx(2 / 3)  # threshold 0.2 flags 0.75 and 0.3
    assert cal.cross_entropy([1, 0], [0.5, 0.5]) == pytest.approx(math.log(2))
    assert cal.cross_entropy([1, 0], [1.0, 0.0]) < 1e-9 and cal.cross_entropy([1], [0.0]) == pytest.approx(27.631, 1e-3)
    assert cal.brier([1, 0], [0.8, 0.3]) == pytest.approx(0.065)
    s = cal.scores([1, 1, 0, 0], [0.9, 0.4, 0.6, 0.1])
    assert s["detection_rate"] == 0.5 and s["false_positive_rate"] == 0.5 and s["roc_auc"] == 0.75


def _population(seed: int = 0):
    """Clean models and three attack families: ``a`` and ``b`` raise feature 0, ``c`` raises feature 1 only."""
    rng = np.random.default_rng(seed)
    rows, labels, families = [], [], []
    for family, shift in (("clean", (0, 0)), ("a", (3, 0)), ("b", (3, 0)), ("c", (0, 3))):
        n = 18 if family == "clean" else 6
        rows.append(rng.normal(size=(n, 2)) + shift)
        labels += [0 if family == "clean" else 1] * n
        families += [family] * n
    return np.vstack(rows), np.array(labels), families


def test_the_fit_separates_what_its_features_separate_and_a_useless_feature_gives_the_base_rate():
    x, y, _ = _population()
    fitted = cal.fit_logistic(x, y, ["f0", "f1"], l2=0.1)
    p = np.array([fitted.probability({"f0": a, "f1": b}) for a, b in x])
    assert cal.roc_auc(y, p) > 0.95 and fitted.weights[0] > 0 and fitted.weights[1] > 0
    noise = np.random.default_rng(1).normal(size=(40, 1))
    flat = cal.fit_logistic(noise, np.array([0, 1] * 20), ["noise"], l2=1000.0)
    assert flat.probability({"noise": 2.0}) == pytest.approx(0.5, abs=0.02)


def test_leave_one_family_out_scores_a_family_with_a_fit_that_never_saw_it():
    x, y, families = _population()
    p = cal.leave_one_family_out(x, y, families, ["f0", "f1"], l2=0.1)
    c = np.array([f == "c" for f in families])
    clean = y == 0
    # without family c the fit learns only feature 0, so c's models (feature 1 raised) look clean
    assert cal.roc_auc(np.r_[np.zeros(clean.sum()), np.ones(c.sum())], np.r_[p[clean], p[c]]) < 0.75
    ab = np.array([f in ("a", "b") for f in families])  # a and b teach each other: still found
    assert cal.roc_auc(np.r_[np.zeros(clean.sum()), np.ones(ab.sum())], np.r_[p[clean], p[ab]]) > 0.9
    # a clean model is one labelled clean, whatever family name its row carries
    renamed = ["badnets-clean-twin" if label == 0 else f for f, label in zip(families, y)]
    assert np.allclose(cal.leave_one_family_out(x, y, renamed, ["f0", "f1"], l2=0.1), p)
    with pytest.raises(ConfigError, match="no clean model is left"):
        one_clean = np.r_[np.flatnonzero(y == 0)[:1], np.flatnonzero(y == 1)]
        cal.leave_one_family_out(x[one_clean], y[one_clean], [families[i] for i in one_clean], ["f0", "f1"])
    with pytest.raises(ConfigError, match="two attack families"):
        cal.leave_one_family_out(x[:24], y[:24], families[:24], ["f0", "f1"])


def test_a_calibration_round_trips_and_refuses_bad_input(tmp_path):
    x, y, _ = _population()
    fitted = cal.fit_logistic(x, y, ["f0", "f1"], population={"models": len(y)})
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(fitted.to_json()))
    again = cal.Calibration.load(path)
    assert again.probability({"f0": 1.0, "f1": -1.0}) == fitted.probability({"f0": 1.0, "f1": -1.0})
    assert again.population == {"models": 36}  # 18 clean + 3 x 6 backdoored
    with pytest.raises(ConfigError, match="needs the features"):
        again.probability({"f0": 1.0})
    with pytest.raises(ConfigError, match="finite"):
        cal.fit_logistic(np.array([[np.nan], [1.0]]), np.array([0, 1]), ["f"])
    with pytest.raises(ConfigError, match="both clean and backdoored"):
        cal.fit_logistic(np.ones((3, 1)), np.ones(3), ["f"])
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ConfigError, match="not a calibration"):
        cal.Calibration.load(tmp_path / "bad.json")


def test_a_rule_raises_the_fitted_probability_by_its_stated_odds_and_survives_the_file(tmp_path):
    y = np.array([0, 1] * 6)
    x = np.c_[np.where(y == 1, 1.0, -1.0) + np.linspace(-0.5, 0.5, 12)]
    fitted = cal.fit_logistic(x, y, ["stat"], rules={"branch": 0.99})
    quiet = fitted.probability({"stat": -1.0, "branch": 0.0})
    fired = fitted.probability({"stat": -1.0, "branch": 1.0})
    assert quiet < 0.5 and fired == pytest.approx(1 - (1 - quiet) * 0.01)  # a clean-looking model with a branch
    assert fitted.needs == ["stat", "branch"]
    with pytest.raises(ConfigError, match="branch"):
        fitted.probability({"stat": 0.0})
    (tmp_path / "c.json").write_text(json.dumps({"calibrations": [fitted.to_json()]}))
    again = cal.load_calibrations(tmp_path / "c.json")[0]
    assert again.rules == {"branch": 0.99} and again.probability({"stat": -1.0, "branch": 1.0}) == pytest.approx(fired)
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        cal.fit_logistic(x, y, ["stat"], rules={"branch": 1.0})
    only_rule = cal.fit_logistic(np.zeros((12, 0)), y, [], rules={"branch": 0.99})  # the structure check alone
    assert only_rule.probability({"branch": 0.0}) == pytest.approx(0.5)  # the base rate


def test_the_penalty_is_chosen_by_how_well_it_predicts_an_unseen_family():
    rng = np.random.default_rng(1)
    families = ["clean"] * 24 + [f for f in "abcd" for _ in range(6)]
    y = np.array([0] * 24 + [1] * 24)
    # a feature every family raises far above the clean models: a weak penalty lets the fit be confident
    strong = [{"f": float(v)} for v in np.r_[rng.normal(0, 1, 24), rng.normal(8, 1, 24)]]
    fitted = cal.fit_calibration(strong, y, families, ["f"], grid=(0.01, 1.0, 100.0))
    assert fitted.l2 == 0.01
    by_l2 = fitted.population["l2_chosen_by"]["leave_one_family_out_cross_entropy"]
    assert set(by_l2) == {0.01, 1.0, 100.0} and by_l2[0.01] < by_l2[1.0] < by_l2[100.0]
    # noise: any slope the fit learns misleads on the held-out family, so the strongest penalty wins
    noise = [{"f": float(v)} for v in rng.normal(0, 1, 48)]
    assert cal.fit_calibration(noise, y, families, ["f"], grid=(0.01, 1.0, 1000.0)).l2 == 1000.0
    # two attack families leave no inner folds to choose by: the grid's 1.0, nothing recorded
    two = cal.fit_calibration(strong[:36], y[:36], families[:36], ["f"], grid=(0.01, 1.0, 100.0))
    assert two.l2 == 1.0 and "l2_chosen_by" not in two.population


def test_out_of_family_scores_each_family_with_a_fit_that_never_saw_it_and_applies_its_rules():
    families = ["clean"] * 12 + ["a"] * 4 + ["b"] * 4 + ["branch"] * 4
    y = np.array([0] * 12 + [1] * 12)
    rows = [{"f": 0.0, "g": 0.0}] * 12 + [{"f": 5.0, "g": 0.0}] * 8 + [{"f": 0.0, "g": 1.0}] * 4
    seen = []

    def fit(train_rows, train_y, train_families):
        seen.append(sorted(set(train_families)))
        return cal.fit_logistic(cal._matrix(train_rows, ["f"]), train_y, ["f"], 1.0, rules={"g": 0.99})

    p = cal.out_of_family(rows, y, families, fit)
    assert seen == [["b", "branch", "clean"], ["a", "branch", "clean"], ["a", "b", "clean"]]
    assert (p[12:20] > 0.5).all() and (p[:12] < 0.5).all()
    # without the branch family, f says nothing about these models: the rule alone carries them
    assert (p[20:] > 0.99).all()
