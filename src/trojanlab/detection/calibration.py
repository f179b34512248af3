"""One calibrated number from the detectors' statistics: a logistic regression fitted on a population of models
(the zoo), its leave-one-family-out check, and the scores the TrojAI leaderboards use.

The detectors' statistics (MM-BD's margin p-value, Neural Cleanse's anomaly index, the structure check's branch,
...) are features; :func:`fit_logistic` fits an L2-regularised logistic regression on standardised features by
Newton's method (a few dozen models: exact, deterministic, no solver to tune). :func:`leave_one_family_out` scores
every model with a fit that never saw its attack family (clean models are spread over the folds), the honest
figure for a family a scanner was not tuned on; :func:`fit_calibration` chooses the penalty by that figure on its
own training models (so nested inside :func:`out_of_family` it stays honest). :func:`scores` gives ROC-AUC, the
false-positive rate at a true-positive rate, TrojAI's cross-entropy and the Brier score.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError

EPS = 1e-12
"""Probabilities are clipped to [EPS, 1 - EPS] for the cross-entropy, as TrojAI's scoring does."""


@dataclass
class Calibration:
    """A fitted logistic regression over named features, ``p = sigmoid(b + w . (x - mean) / std)``, and rules: a
    rule feature that fires (> 0) raises the probability to ``1 - (1 - p)(1 - q)`` with its stated ``q`` (not
    fitted: evidence whose meaning does not come from the population, like the structure check's branch, which a fit
    without TrojanNet models could never learn)."""

    features: list[str]
    weights: list[float]
    bias: float
    mean: list[float]
    std: list[float]
    l2: float = 1.0
    population: dict[str, Any] = field(default_factory=dict)  # what it was fitted on: models, families, command
    rules: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        bad = {k: q for k, q in self.rules.items() if not 0 <= q < 1}
        if bad:
            raise ConfigError(f"a rule's probability must be in [0, 1), got {bad}")

    @property
    def needs(self) -> list[str]:
        """Every feature the calibration reads: the fitted ones, then the rules'."""
        return [*self.features, *(r for r in self.rules if r not in self.features)]

    def probability(self, values: Mapping[str, float]) -> float:
        missing = [name for name in self.needs if name not in values]
        if missing:
            raise ConfigError(f"the calibration needs the features {missing}")
        x = np.array([float(values[name]) for name in self.features])
        if not np.isfinite(x).all():
            raise ConfigError(f"features must be finite, got {dict(zip(self.features, x.tolist()))}")
        fitted = float(_sigmoid(self.bias + ((x - self.mean) / self.std) @ np.array(self.weights)))
        return with_rules(fitted, values, self.rules)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Calibration:
        try:
            calibration = cls(**{k: data[k] for k in ("features", "weights", "bias", "mean", "std")},
                              l2=float(data.get("l2", 1.0)), population=dict(data.get("population", {})),
                              rules={str(k): float(v) for k, v in dict(data.get("rules", {})).items()})  # fmt: skip
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"not a calibration ({exc})") from exc
        sizes = {len(calibration.features), len(calibration.weights), len(calibration.mean), len(calibration.std)}
        if len(sizes) != 1:
            raise ConfigError("a calibration's features, weights, mean and std must have one length")
        return calibration

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        """The first calibration of the file (see :func:`load_calibrations`)."""
        return load_calibrations(path)[0]


def load_calibrations(path: str | Path) -> list[Calibration]:
    """The calibrations in ``path``: one calibration's JSON, or ``{"calibrations": [...]}`` (the fullest first; a
    scan takes the first whose features it gave)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read the calibration ({exc})") from exc
    items = data.get("calibrations") if isinstance(data, dict) and "calibrations" in data else [data]
    if not isinstance(items, list) or not items or not all(isinstance(c, dict) for c in items):
        raise ConfigError(f"{path}: cannot read the calibration (not a calibration's JSON)")
    return [Calibration.from_json(c) for c in items]


def with_rules(p: float, values: Mapping[str, float], rules: Mapping[str, float]) -> float:
    """``p`` raised by every rule of ``rules`` whose feature fires in ``values`` (noisy-OR: ``1 - (1 - p)(1 - q)``)."""
    for name, q in rules.items():
        if float(values[name]) > 0:
            p = 1.0 - (1.0 - p) * (1.0 - q)
    return p


def _sigmoid(z: np.ndarray | float) -> np.ndarray | float:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -500, 500)))


def fit_logistic(
    x: np.ndarray,
    y: np.ndarray,
    features: Sequence[str],
    l2: float = 1.0,
    population: dict | None = None,
    rules: Mapping[str, float] | None = None,
) -> Calibration:
    """Logistic regression of ``y`` (1: backdoored) on the columns of ``x``, standardised, with penalty
    ``l2 / 2 * |w|^2`` (the bias is not penalised), by Newton's method."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 2 or len(x) != len(y) or x.shape[1] != len(features):
        raise ConfigError(f"features {x.shape} do not match labels {y.shape} and names {list(features)}")
    if not np.isfinite(x).all():
        raise ConfigError("features must be finite (a detector that failed leaves a NaN)")
    if len(set(y.tolist())) != 2:
        raise ConfigError("the calibration needs both clean and backdoored models")
    mean, std = x.mean(0), x.std(0)
    std = np.where(std > 0, std, 1.0)
    z = np.hstack([np.ones((len(x), 1)), (x - mean) / std])
    beta = np.zeros(z.shape[1])
    penalty = np.full(z.shape[1], l2)
    penalty[0] = 0.0
    for _ in range(100):
        p = _sigmoid(z @ beta)
        grad = z.T @ (p - y) + penalty * beta
        hess = (z * (p * (1 - p))[:, None]).T @ z + np.diag(penalty) + 1e-9 * np.eye(len(beta))
        step = np.linalg.solve(hess, grad)
        beta -= step
        if np.abs(step).max() < 1e-10:
            break
    return Calibration(list(features), beta[1:].tolist(), float(beta[0]), mean.tolist(), std.tolist(), float(l2),
                       dict(population or {}), dict(rules or {}))  # fmt: skip


def family_folds(y: Sequence[int], families: Sequence[str | None]) -> tuple[np.ndarray, list[str]]:
    """Leave-one-family-out folds: fold ``k`` holds the backdoored models of the ``k``-th attack family (sorted) and
    every ``len(families)``-th clean model (label 0, whatever its family says), dealt round-robin."""
    y = np.asarray(y)
    fams = ["clean" if label == 0 else str(f) for f, label in zip(families, y)]  # the label decides, not the name
    attack_families = sorted({f for f, label in zip(fams, y) if label == 1})
    if len(attack_families) < 2:
        raise ConfigError("leave-one-family-out needs at least two attack families")
    fold = np.empty(len(y), dtype=np.int64)
    clean_rows = [i for i, f in enumerate(fams) if f == "clean"]
    for k, i in enumerate(clean_rows):
        fold[i] = k % len(attack_families)
    for i, f in enumerate(fams):
        if f != "clean":
            fold[i] = attack_families.index(f)
    return fold, attack_families


def leave_one_family_out(
    x: np.ndarray, y: np.ndarray, families: Sequence[str | None], features: Sequence[str], l2: float = 1.0
) -> np.ndarray:
    """Out-of-fold probabilities: each backdoored model is scored by a fit without its family's models; clean models
    (label 0, whatever their family says) are dealt round-robin into as many folds as there are families, so each is
    scored by a fit that did not see it."""
    x = np.asarray(x, np.float64)
    rows = [dict(zip(features, row)) for row in x]
    return out_of_family(rows, y, families, lambda r, t, f: fit_logistic(_matrix(r, features), t, features, l2))


Fit = Callable[[list[Mapping[str, float]], np.ndarray, list[str]], Calibration]
"""A fit: the training models' feature values, their labels and families, to a calibration."""


def out_of_family(
    rows: Sequence[Mapping[str, float]], y: Sequence[int], families: Sequence[str | None], fit: Fit
) -> np.ndarray:
    """Each model's probability from ``fit`` on the models outside its leave-one-family-out fold (rules included:
    the calibration ``fit`` returns applies its own)."""
    y = np.asarray(y)
    fold, attack_families = family_folds(y, families)
    fams = list(families)
    out = np.empty(len(y))
    for k in range(len(attack_families)):
        test = fold == k
        if len(set(y[~test].tolist())) != 2:
            raise ConfigError(f"leave-one-family-out: without {attack_families[k]} no clean model is left to fit on")
        train = np.flatnonzero(~test)
        fitted = fit([rows[i] for i in train], y[train], [fams[i] for i in train])
        out[test] = [fitted.probability(rows[i]) for i in np.flatnonzero(test)]
    return out


L2_GRID = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
"""The penalties :func:`fit_calibration` chooses from."""


def fit_calibration(
    rows: Sequence[Mapping[str, float]],
    y: Sequence[int],
    families: Sequence[str | None],
    features: Sequence[str],
    rules: Mapping[str, float] | None = None,
    grid: Sequence[float] = L2_GRID,
    population: dict | None = None,
) -> Calibration:
    """The logistic regression with the penalty of ``grid`` whose leave-one-family-out cross-entropy on these
    models is lowest (rules applied): the penalty that best predicts a family the fit has not seen, chosen from the
    training models alone -- scored by :func:`out_of_family` with this function as the fit, the figure is nested and
    honest. With fewer than three attack families (no inner folds to choose by), the middle of the grid, 1.0 if there.
    The population records the grid's cross-entropies."""
    features, y = list(features), np.asarray(y)
    attack_families = {str(f) for f, label in zip(families, y) if label == 1}
    chosen, by_l2 = (1.0 if 1.0 in grid else float(grid[len(grid) // 2])), {}
    if len(attack_families) >= 3:
        for l2 in grid:
            inner = out_of_family(rows, y, families, lambda r, t, f, l2=l2: fit_logistic(
                _matrix(r, features), t, features, l2, rules=rules))  # fmt: skip
            by_l2[float(l2)] = cross_entropy(y, inner)
        chosen = min(by_l2, key=by_l2.get)
    record = (
        {**(population or {}), "l2_chosen_by": {"leave_one_family_out_cross_entropy": by_l2}} if by_l2 else population
    )
    return fit_logistic(_matrix(rows, features), y, features, chosen, population=record, rules=rules)


def _matrix(rows: Sequence[Mapping[str, float]], features: Sequence[str]) -> np.ndarray:
    return np.array([[float(r[f]) for f in features] for r in rows], np.float64).reshape(len(rows), len(features))


def roc_auc(y: Sequence[int], p: Sequence[float]) -> float:
    """The probability that a random backdoored model scores above a random clean one (ties count half)."""
    y, p = np.asarray(y), np.asarray(p, np.float64)
    pos, neg = p[y == 1], p[y == 0]
    if not len(pos) or not len(neg):
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def fpr_at_tpr(y: Sequence[int], p: Sequence[float], tpr: float = 0.95) -> float:
    """The share of clean models flagged by the highest threshold that flags at least ``tpr`` of backdoored ones."""
    y, p = np.asarray(y), np.asarray(p, np.float64)
    pos, neg = np.sort(p[y == 1])[::-1], p[y == 0]
    if not len(pos) or not len(neg):
        return float("nan")
    threshold = pos[max(0, math.ceil(tpr * len(pos)) - 1)]
    return float((neg >= threshold).mean())


def cross_entropy(y: Sequence[int], p: Sequence[float]) -> float:
    """TrojAI's score: the mean binary cross-entropy of the probabilities (natural log, clipped to [EPS, 1 - EPS])."""
    y, p = np.asarray(y, np.float64), np.clip(np.asarray(p, np.float64), EPS, 1 - EPS)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


def brier(y: Sequence[int], p: Sequence[float]) -> float:
    y, p = np.asarray(y, np.float64), np.asarray(p, np.float64)
    return float(((p - y) ** 2).mean())


def scores(y: Sequence[int], p: Sequence[float], threshold: float = 0.5) -> dict[str, float]:
    """ROC-AUC, FPR at 95 % and 90 % TPR, cross-entropy, Brier, and at ``threshold``: detection rate and false-positive rate."""
    y, p = np.asarray(y), np.asarray(p, np.float64)
    flagged = p >= threshold
    return {
        "roc_auc": roc_auc(y, p), "fpr_at_95_tpr": fpr_at_tpr(y, p, 0.95),
        "fpr_at_90_tpr": fpr_at_tpr(y, p, 0.90), "cross_entropy": cross_entropy(y, p),
        "brier": brier(y, p), "detection_rate": float(flagged[y == 1].mean()) if (y == 1).any() else float("nan"),
        "false_positive_rate": float(flagged[y == 0].mean()) if (y == 0).any() else float("nan"),
    }  # fmt: skip
