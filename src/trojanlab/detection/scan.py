"""The scan: every detector on one model, their statistics as features, and one calibrated probability.

:func:`scan_model` runs, in order of cost, the structure check (the graph only), MM-BD (no data) and Neural Cleanse
(the auditor's clean images, when given). Each detector's statistics become named features
(:func:`features_of`); a :class:`~trojanlab.detection.calibration.Calibration` fitted on a population of models
(``benchmarks/scan_zoo.py`` on the zoo) turns them into the probability that the model is backdoored. Where the
structure check finds a branch, :func:`~trojanlab.detection.structure.branch_labels` reads the label it serves
from the branch itself, cut out of the graph and run on window contents. (Optimising a patch in the window through
the whole model finds nothing for TrojanNet: its 4,369-way softmax gives the armed pattern a probability of zero,
and no gradient, until the pattern is exact -- measured: the right label on 0 of 4 images after 150 steps.) After
Neural Cleanse, the target check (:mod:`~trojanlab.detection.target`) examines a few candidate labels again, longer,
to name the target first; it orders the suspected labels and gives no feature.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config.detection import ScanConfig
from ..data import ImageSet
from ..errors import ConfigError
from . import mmbd as mm
from . import neural_cleanse as nc
from . import structure as st
from . import target as tg
from .calibration import Calibration
from .mntd import MetaClassifier

FEATURES = (
    "structure_branch",
    "mmbd_log1p_neg_log10_p",
    "mmbd_log1p_top_z",
    "nc_log1p_anomaly_index",
    "nc_log_norm_ratio",
    "mntd_score",
)
"""Every feature a scan can give (a calibration uses those of the detectors it was fitted with). The detectors'
statistics are heavy-tailed (a blended backdoor's Neural Cleanse norm ratio is ~75 where clean models sit at ~1.5,
its MM-BD p-value 1e-19), so they enter on a log scale: raw, a few extreme models set the logistic regression's
slope and the models near the boundary, the ones that matter, are misjudged (measured on the zoo's 57 models, the
same four statistics raw: leave-one-family-out ROC-AUC 0.889 and 25 % of clean models flagged; on a log scale 0.96
and none; ``benchmarks/results/scan_zoo.md``). The raw statistics stay in each detector's record."""
RULES = {"structure_branch": 0.99}
"""Evidence a calibration applies as a rule, not fitted (see :class:`~trojanlab.detection.calibration.Calibration`):
a branch with its own weights that reads only a small window of the input and is merged into the output is how
TrojanNet enters a model and not how a classifier is built (none of the zoo's clean members, nor the CNNs and ResNet
of the tests, has one), so the probability it stands for is stated, 0.99, rather than learnt from the few TrojanNet
models a population holds -- a leave-one-family-out fit without them could not learn it at all."""
MAX_NEG_LOG10_P = 50.0
"""MM-BD's p-value enters as -log10(p), capped: beyond 1e-50 nothing is more certain, and the standardised fit
would be dragged by a few extreme models."""


@dataclass
class ScanResult:
    """Each detector's output, the features, the probability (when calibrated) and the suspected labels."""

    detectors: dict[str, dict[str, Any]] = field(default_factory=dict)
    features: dict[str, float] = field(default_factory=dict)
    probability: float | None = None
    suspected_labels: list[int] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    calibration: dict[str, Any] | None = None
    nc: nc.NCResult | None = None
    mmbd: mm.MarginSearch | None = None
    mmbd_test: mm.MMBDTest | None = None

    def to_json(self) -> dict[str, Any]:
        return {"probability": self.probability, "suspected_labels": self.suspected_labels, "features": self.features,
                "detectors": self.detectors, "detector_seconds": self.seconds, "calibration": self.calibration}  # fmt: skip


def features_of(detectors: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The named features of the detectors that ran (see :data:`FEATURES`)."""
    out: dict[str, float] = {}
    if "structure" in detectors:
        out["structure_branch"] = 1.0 if detectors["structure"]["suspicious"] else 0.0
    if "mmbd" in detectors:
        d = detectors["mmbd"]
        out["mmbd_log1p_neg_log10_p"] = math.log1p(min(MAX_NEG_LOG10_P, -math.log10(max(d["p_value"], 1e-300))))
        margins = np.array(list(d["max_margins"].values()), np.float64)
        median = np.median(margins)
        spread = 1.4826 * np.median(np.abs(margins - median))  # the largest margin's robust z-score
        top_z = (margins.max() - median) / max(spread, 1e-6 * max(abs(median), 1.0))
        out["mmbd_log1p_top_z"] = float(np.log1p(max(top_z, 0.0)))
    if "nc" in detectors:
        d = detectors["nc"]
        out["nc_log1p_anomaly_index"] = math.log1p(max(float(d["anomaly_index"]), 0.0))
        norms = np.array(list(d["l1_norms"].values()), np.float64)
        out["nc_log_norm_ratio"] = float(np.log(np.median(norms) / max(norms.min(), 1e-12)))
    if "score" in detectors.get("mntd", {}):
        out["mntd_score"] = float(detectors["mntd"]["score"])
    return out


def pick_calibration(calibrations: Sequence[Calibration], features: dict[str, float]) -> Calibration | None:
    """The first of ``calibrations`` whose features the scan gave (a shipped file lists the fullest first)."""
    return next((c for c in calibrations if all(f in features for f in c.needs)), None)


def scan_model(
    model: nn.Module,
    num_classes: int,
    image_shape: Sequence[int],
    config: ScanConfig | None = None,
    *,
    examples: ImageSet | None = None,
    calibration: Calibration | Sequence[Calibration] | None = None,
    meta: MetaClassifier | None = None,
    loaded: Any = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> ScanResult:
    """Every detector of ``config.detectors`` on ``model`` (``loaded``: its :class:`LoadedModel`, for the structure
    check's graph), the features, and the probability from ``calibration`` (of several, the first whose features
    the scan gave). ``meta``: MNTD's meta-classifier; where it is missing or was fitted on models of another shape,
    MNTD is skipped and the reason recorded."""
    cfg = config or ScanConfig()
    if "nc" in cfg.detectors and examples is None:
        raise ConfigError("Neural Cleanse needs clean example images (--examples), or leave nc out of --detectors")
    result = ScanResult()
    shape = tuple(int(v) for v in image_shape)
    if "structure" in cfg.detectors:
        began = time.perf_counter()
        report = st.check_model(loaded, cfg.small_fraction)
        found = report.to_json()
        branch = next((b for b in report.branches if b.parameters > 0), None)
        if branch is not None:
            written = st.branch_labels(report, branch, num_classes, seed=cfg.seed)
            if written is not None:
                found["window_target"] = max(written, key=written.get)
                found["branch_label_max"] = {str(k): v for k, v in written.items()}
        result.detectors["structure"] = found
        result.seconds["structure"] = round(time.perf_counter() - began, 2)
    if "mmbd" in cfg.detectors:
        mcfg = cfg.mmbd()
        search = mm.max_margins(model, num_classes, shape, mcfg, device=device, progress=progress)
        test = mm.gamma_test(search.by_label())
        result.mmbd, result.mmbd_test = search, test
        result.detectors["mmbd"] = {**test.to_json(), "threshold": mcfg.threshold,
                                    "max_margins": {str(k): v for k, v in search.by_label().items()}}  # fmt: skip
        result.seconds["mmbd"] = round(search.seconds, 2)
    if "nc" in cfg.detectors:
        ncfg = cfg.nc()
        data = examples
        if cfg.nc_images is not None and cfg.nc_images < len(data):
            pick = np.random.default_rng(cfg.seed).choice(len(data), cfg.nc_images, replace=False)
            data = data.subset(np.sort(pick))
        scan = nc.reverse_engineer(model, data, num_classes, None, ncfg, device=device, progress=progress)
        outliers = nc.mad_outlier_test(scan.norms(), ncfg.threshold)
        result.nc = scan
        result.detectors["nc"] = {"anomaly_index": outliers["anomaly_index"], "flagged_labels": outliers["flagged_labels"],
                                  "smallest_norm_label": min(scan.norms(), key=scan.norms().get), "threshold": ncfg.threshold,
                                  "l1_norms": {str(k): v for k, v in scan.norms().items()}, "images": len(data)}  # fmt: skip
        result.seconds["nc"] = round(scan.seconds, 2)
        tcfg = cfg.target()
        margins = result.mmbd.by_label() if result.mmbd is not None else None
        if tg.candidates(scan.norms(), margins, tcfg):
            check = tg.check_target(model, data, num_classes, scan.norms(), margins, tcfg, ncfg, device)
            result.detectors["target"] = check.to_json()
            result.seconds["target"] = round(check.seconds, 2)
    if "mntd" in cfg.detectors:
        began = time.perf_counter()
        why = "no meta-classifier was given, and none ships" if meta is None else meta.applicable(num_classes, shape)
        result.detectors["mntd"] = {"skipped": why} if why else {"score": meta.score(model), "threshold": 0.0}
        result.seconds["mntd"] = round(time.perf_counter() - began, 2)
    result.features = features_of(result.detectors)
    calibrations = [calibration] if isinstance(calibration, Calibration) else list(calibration or [])
    chosen = pick_calibration(calibrations, result.features)
    if calibrations and chosen is None:
        raise ConfigError(f"no calibration reads only the features this scan gave ({sorted(result.features)})")
    if chosen is not None:
        result.probability = chosen.probability(result.features)
        result.calibration = {"features": chosen.features, "rules": chosen.rules, "population": chosen.population}
    result.suspected_labels = suspected_labels(result.detectors)
    return result


def suspected_labels(detectors: dict[str, dict[str, Any]]) -> list[int]:
    """The labels the evidence points at, strongest first: the structure branch's target, the target check's first
    label (:mod:`~trojanlab.detection.target`), Neural Cleanse's smallest norm, MM-BD's largest margin (each once).
    Neural Cleanse's label comes before MM-BD's because a small reversed trigger that turns the auditor's own images
    is direct evidence, where a large margin reached somewhere in the input space is also how some clean labels look
    (GTSRB's label 12 has the largest margin in 8 of 24 clean zoo models); on the zoo's backdoored models the combined
    scan detects, Neural Cleanse's own label is the right target for 65.5 %, MM-BD's for 58.6 %, and this order
    without the target check (the structure branch's first) for 86.2 % (``benchmarks/results/scan_zoo.md``)."""
    out: list[int] = []
    if "window_target" in detectors.get("structure", {}):
        out.append(int(detectors["structure"]["window_target"]))
    if detectors.get("target", {}).get("ranked"):
        out.append(int(detectors["target"]["ranked"][0]))
    if "nc" in detectors:
        out.append(int(detectors["nc"]["smallest_norm_label"]))
    if "mmbd" in detectors:
        out.append(int(detectors["mmbd"]["suspected_label"]))
    return list(dict.fromkeys(out))
