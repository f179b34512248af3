"""The detectors' entry points: a model and clean data in, a :class:`~trojanlab.reports.DetectionReport` and the
scan's files (reversed triggers, masks, plots) out. ``DETECTORS`` is the family's registry."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..config.base import to_dict
from ..config.detection import MMBDConfig, MNTDScoreConfig, NCConfig, ScanConfig, StructureConfig
from ..errors import TrojanlabError
from ..io import atomic_write, save_png, write_json
from ..models.external import ModelSource, load_any
from ..reports import DetectionReport
from ..runs import (
    check_device,
    check_fits,
    finish,
    load_artifact,
    model_data,
    prepare_run,
    provenance,
    seed_everything,
)
from ..triggers import Trigger
from . import mmbd as mm
from . import neural_cleanse as nc
from . import structure as st
from .calibration import Calibration, load_calibrations
from .mntd import MetaClassifier
from .scan import scan_model

REVERSED_FILE = "reversed_triggers.safetensors"
MARGIN_INPUTS_FILE = "max_margin_inputs.png"


def neural_cleanse(
    model: str | os.PathLike,
    config: NCConfig | None = None,
    *,
    data: str | os.PathLike = "gtsrb",
    out: str | os.PathLike,
    device: str = "cpu",
    seed: int = 0,
    progress: bool = True,
    restart: bool = False,
    force: bool = False,
) -> DetectionReport:
    """Neural Cleanse on the artefact ``model`` with clean images of ``data`` (the scan split of ``config``): the
    reversed trigger of every label (batched), the MAD outlier test, and the files a repair reads
    (``reversed_triggers.safetensors``, ``result.json``)."""
    cfg = config or NCConfig(seed=seed)
    device = check_device(device)
    seed_everything(seed)
    run = prepare_run(out, "detect nc", {"NCConfig": to_dict(cfg)}, seed, restart=restart, force=force, model=model,
                      data=data)  # fmt: skip
    out = run.path
    loaded = load_artifact(model, device=device)
    splits = model_data(data, loaded.spec, seed)
    splits = check_fits(loaded, splits, model)
    scan_set = splits.test if cfg.split == "test" else splits.train
    if scan_set is None:
        raise TrojanlabError(f"{data}: has no {cfg.split} split to scan with")
    if cfg.labels is not None:
        bad = [label for label in cfg.labels if not 0 <= label < loaded.num_classes]
        if bad:
            raise TrojanlabError(f"--labels {bad} are out of range for a {loaded.num_classes}-class model")
    if cfg.images is not None and cfg.images < len(scan_set):
        pick = np.random.default_rng(seed).choice(len(scan_set), cfg.images, replace=False)
        scan_set = scan_set.subset(np.sort(pick))
    run.start()
    scan = nc.reverse_engineer(
        loaded.module, scan_set, loaded.num_classes, cfg.labels, cfg, device=device,
        checkpoint_dir=out / "checkpoint", progress=progress,
    )  # fmt: skip
    nc.save_scan_images(scan, out)
    nc.save_reversed(scan, out / REVERSED_FILE)
    files = ["masks/mask_LLL.png", "triggers/trigger_LLL.png", REVERSED_FILE]
    details: dict[str, Any] = {"scan_images": len(scan_set)}
    infected, flagged, index = None, [], None
    if len(scan.labels) >= 3:
        outliers = nc.mad_outlier_test(scan.norms(), cfg.threshold)
        nc.plot_norms(scan.norms(), outliers, out / "norms.png")
        files.append("norms.png")
        index, flagged = outliers["anomaly_index"], outliers["flagged_labels"]
        infected = bool(flagged)
        details.update({k: v for k, v in outliers.items() if k not in ("anomaly_index", "flagged_labels")})
    else:
        details["note"] = "the MAD test needs at least 3 scanned labels"
    details.update(
        l1_norms={str(label): norm for label, norm in scan.norms().items()},
        per_label=scan.per_label(),
        samples=scan.samples,
        official_schedule_samples_max=cfg.official_budget(len(scan.labels)),
        device=device,
    )
    report = DetectionReport(
        method="neural-cleanse", seconds=scan.seconds, config=to_dict(cfg),
        provenance=provenance("neural-cleanse", to_dict(cfg), seed, model=str(model), data=str(data)),
        details=details, files=files, model=str(model), data=splits.name, infected=infected,
        flagged_labels=[int(v) for v in flagged], anomaly_index=index,
    )  # fmt: skip
    return finish(run, report)


def read_flagged_labels(scan_folder: str | os.PathLike) -> list[int]:
    """The labels a Neural Cleanse scan (its ``result.json``) flagged."""
    path = Path(scan_folder) / "result.json"
    try:
        return [int(v) for v in json.loads(path.read_text())["flagged_labels"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TrojanlabError(f"{scan_folder}: cannot read the flagged labels of a Neural Cleanse scan ({exc})") from exc


def read_reversed_triggers(scan_folder: str | os.PathLike, labels: list[int] | None = None) -> list[Trigger]:
    """The reversed triggers of ``labels`` (default: every scanned label) in a scan's run folder."""
    return nc.load_reversed(Path(scan_folder) / REVERSED_FILE, labels)


def mmbd(
    model: str | os.PathLike | ModelSource,
    config: MMBDConfig | None = None,
    *,
    out: str | os.PathLike,
    device: str = "cpu",
    seed: int = 0,
    progress: bool = True,
    restart: bool = False,
    force: bool = False,
) -> DetectionReport:
    """MM-BD on ``model`` (an artefact folder, an ONNX file, or a :class:`ModelSource`), without data: the maximum achievable margin of every label (batched), the
    Gamma null test, ``margins.png`` and the inputs that reached the largest margins (``max_margin_inputs.png``)."""
    cfg = config or MMBDConfig(seed=seed)
    device = check_device(device)
    seed_everything(seed)
    source = _source(model)
    run = prepare_run(out, "detect mmbd", {"MMBDConfig": to_dict(cfg), "ModelSource": to_dict(source)}, seed,
                      restart=restart, force=force, model=source.path)  # fmt: skip
    out = run.path
    loaded = load_any(source, device=device)
    if cfg.labels is not None:
        bad = [label for label in cfg.labels if not 0 <= label < loaded.num_classes]
        if bad:
            raise TrojanlabError(f"--labels {bad} are out of range for a {loaded.num_classes}-class model")
    if len(cfg.labels or range(loaded.num_classes)) < 3:
        raise TrojanlabError(f"MM-BD's null fit needs at least 3 labels; the model has {loaded.num_classes}")
    shape = tuple(int(v) for v in loaded.spec["input_size"])
    run.start()
    search = mm.max_margins(loaded.module, loaded.num_classes, shape, cfg, device=device, progress=progress)
    statistics = search.by_label()
    test = mm.gamma_test(statistics)
    infected = test.p_value < cfg.threshold
    mm.plot_margins(statistics, test, cfg.threshold, out / "margins.png")
    order = sorted(range(len(search.labels)), key=lambda i: -search.statistics[i])[:8]
    save_png(out / MARGIN_INPUTS_FILE, np.concatenate([search.inputs[i].permute(1, 2, 0).numpy() for i in order], 1))
    details: dict[str, Any] = {
        **test.to_json(), "threshold": cfg.threshold, "max_margins": {str(k): v for k, v in statistics.items()},
        "steps_per_label": dict(zip(map(str, search.labels), search.steps)), "images": search.images,
        "margin_inputs_labels": [search.labels[i] for i in order], "input_size": list(shape), "device": device,
        "assumed": loaded.spec.get("assumed"), "normalization": loaded.spec.get("normalization"),
    }  # fmt: skip
    report = DetectionReport(
        method="mm-bd", seconds=round(search.seconds, 2), config=to_dict(cfg),
        provenance=provenance("mm-bd", to_dict(cfg), seed, model=source.path), details=details,
        files=["margins.png", MARGIN_INPUTS_FILE], model=source.path, data="none (data-free)", infected=infected,
        flagged_labels=[test.suspected_label] if infected else [], anomaly_index=None,
    )  # fmt: skip
    return finish(run, report)


def structure(
    model: str | os.PathLike | ModelSource,
    config: StructureConfig | None = None,
    *,
    out: str | os.PathLike,
    device: str = "cpu",
    seed: int = 0,
    progress: bool = True,
    restart: bool = False,
    force: bool = False,
) -> DetectionReport:
    """The structure check of ``model`` (an artefact folder, an ONNX file, or a :class:`ModelSource`): branches that
    read a small window of the input and merge with the rest (evidence of a TrojanNet-style injection)."""
    cfg = config or StructureConfig()
    source = _source(model)
    run = prepare_run(out, "detect structure", {"StructureConfig": to_dict(cfg), "ModelSource": to_dict(source)},
                      seed, restart=restart, force=force, model=source.path)  # fmt: skip
    loaded = load_any(source, device="cpu")
    run.start()
    began = time.perf_counter()
    found = st.check_model(loaded, cfg.small_fraction)
    branch = next((b for b in found.branches if b.parameters > 0), None)
    report = DetectionReport(
        method="structure", seconds=round(time.perf_counter() - began, 2), config=to_dict(cfg),
        provenance=provenance("structure", to_dict(cfg), seed, model=source.path), details=found.to_json(),
        files=[], model=source.path, data="none (the graph only)", infected=found.suspicious,
        flagged_labels=[], anomaly_index=None,
    )  # fmt: skip
    if branch is not None:
        report.details["evidence"] = (f"a branch with {branch.parameters:,} weights reads only rows {branch.window[0]}-"
                                      f"{branch.window[1] - 1}, columns {branch.window[2]}-{branch.window[3] - 1} of the "
                                      f"input and is merged by {branch.merge_op}")  # fmt: skip
    return finish(run, report)


def mntd(
    model: str | os.PathLike | ModelSource,
    config: MNTDScoreConfig | None = None,
    *,
    out: str | os.PathLike,
    device: str = "cpu",
    seed: int = 0,
    progress: bool = True,
    restart: bool = False,
    force: bool = False,
) -> DetectionReport:
    """MNTD on ``model``: the meta-classifier (``config.meta_file``, default the shipped one, fitted on the zoo)
    reads the model's answers to its tuned queries; a score above 0 flags the model. Refused, before any work, on a
    model of another task than the meta-classifier's population."""
    cfg = config or MNTDScoreConfig()
    device = check_device(device)
    source = _source(model)
    meta = _meta_classifier(cfg.meta_file)
    if meta is None:
        raise TrojanlabError("no MNTD meta-classifier ships with this install: give --meta-file (benchmarks/"
                             "scan_zoo.py --mntd fits one on a zoo)")  # fmt: skip
    run = prepare_run(out, "detect mntd", {"MNTDScoreConfig": to_dict(cfg), "ModelSource": to_dict(source)}, seed,
                      restart=restart, force=force, model=source.path)  # fmt: skip
    loaded = load_any(source, device=device)
    why = meta.applicable(loaded.num_classes, tuple(int(v) for v in loaded.spec["input_size"]))
    if why:
        raise TrojanlabError(f"MNTD cannot read {source.path}: {why}")
    run.start()
    began = time.perf_counter()
    score = meta.score(loaded.module)
    report = DetectionReport(
        method="mntd", seconds=round(time.perf_counter() - began, 2), config=to_dict(cfg),
        provenance=provenance("mntd", to_dict(cfg), seed, model=source.path),
        details={"score": score, "threshold": 0.0, "queries": int(meta.queries.shape[0]),
                 "population": meta.population, "assumed": loaded.spec.get("assumed")},
        files=[], model=source.path, data="none (the meta-classifier's queries)", infected=score > 0,
        flagged_labels=[], anomaly_index=None,
    )  # fmt: skip
    return finish(run, report)


SHIPPED_CALIBRATION = Path(__file__).with_name("calibration.json")
"""The calibrations that ship with the package (fitted on the zoo by ``benchmarks/scan_zoo.py``), when present."""
SHIPPED_MNTD = Path(__file__).with_name("mntd.safetensors")
"""MNTD's meta-classifier that ships with the package (fitted on the zoo by ``benchmarks/scan_zoo.py``)."""


def default_calibrations() -> list[Calibration]:
    return load_calibrations(SHIPPED_CALIBRATION) if SHIPPED_CALIBRATION.is_file() else []


def _meta_classifier(path: str | None) -> MetaClassifier | None:
    """MNTD's meta-classifier: ``path``, else the shipped one, else None."""
    if path is not None:
        if not Path(path).is_file():
            raise TrojanlabError(f"{path}: no such meta-classifier file")
        return MetaClassifier.load(path)
    return MetaClassifier.load(SHIPPED_MNTD) if SHIPPED_MNTD.is_file() else None


def examples_of(examples: str | os.PathLike, spec: dict[str, Any], seed: int = 0):
    """The auditor's clean images: every image of ``examples`` (a folder with a sub-folder per class, an ``.npz``
    or a data name), both splits, checked against the model."""
    from ..data import DataSplits, ImageSet

    splits = model_data(examples, spec, seed)
    parts = [s for s in (splits.train, splits.test) if s is not None]
    every = ImageSet(np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts]))
    return DataSplits(splits.name, None, every, splits.classes)


def scan(
    model: str | os.PathLike | ModelSource,
    config: ScanConfig | None = None,
    *,
    examples: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    result: str | os.PathLike | None = None,
    calibration: str | os.PathLike | Calibration | bool | None = None,
    device: str = "cpu",
    seed: int = 0,
    progress: bool = True,
    restart: bool = False,
    force: bool = False,
) -> DetectionReport:
    """Every detector of ``config`` on ``model``, combined by ``calibration`` (default: the shipped one; ``False``:
    none, the statistics alone) into the probability that it is backdoored. ``out``: ``scan.json``, ``scan.html`` and the detectors' plots; ``result``: a
    file holding just the probability (TrojAI's containers' interface)."""
    cfg = config or ScanConfig(seed=seed)
    source = _source(model)
    device = check_device(device)
    if calibration is False:  # the statistics alone (what a calibration is fitted on)
        fitted: list[Calibration] = []
    elif calibration is None or calibration is True:
        fitted = default_calibrations()
    else:
        fitted = [calibration] if isinstance(calibration, Calibration) else load_calibrations(calibration)
    if result is not None and not fitted:
        raise TrojanlabError("--result needs a probability, and no calibration ships yet: give --calibration FILE "
                             "(benchmarks/scan_zoo.py fits one on a zoo)")  # fmt: skip
    usable = [c for c in fitted if all(_detector_gives(f, cfg.detectors) for f in c.needs)]
    if fitted and not usable:
        raise TrojanlabError(f"the calibration reads {fitted[-1].needs}, which --detectors "
                             f"{' '.join(cfg.detectors)} do not give")  # fmt: skip
    meta = _meta_classifier(cfg.mntd_file) if "mntd" in cfg.detectors else None
    if out is None and result is None:
        raise TrojanlabError("give --out (the scan's files) or --result (the probability alone), or both")
    if result is not None and (Path(result).is_dir() or not Path(result).resolve().parent.is_dir()):
        raise TrojanlabError(f"--result {result}: must be a file in an existing folder")
    seed_everything(seed)
    run = None
    if out is not None:
        run = prepare_run(out, "scan", {"ScanConfig": to_dict(cfg), "ModelSource": to_dict(source)}, seed,
                          restart=restart, force=force, model=source.path, examples=examples)  # fmt: skip
    loaded = load_any(source, device=device)
    if "mmbd" in cfg.detectors and loaded.num_classes < 3:
        raise TrojanlabError(f"MM-BD's null fit needs at least 3 labels; the model has {loaded.num_classes}")
    data = None
    if "nc" in cfg.detectors:
        if examples is None:
            raise TrojanlabError("Neural Cleanse needs clean images: give --examples DIR, or --detectors without nc")
        data = examples_of(examples, loaded.spec, seed)
        data = check_fits(loaded, data, source.path)
    shape = tuple(int(v) for v in loaded.spec["input_size"])
    if run is not None:
        run.start()
    began = time.perf_counter()
    found = scan_model(loaded.module, loaded.num_classes, shape, cfg, examples=data.test if data else None,
                       calibration=usable, meta=meta, loaded=loaded, device=device, progress=progress)  # fmt: skip
    verdict = None if found.probability is None else found.probability >= cfg.threshold
    details: dict[str, Any] = {**found.to_json(), "threshold": cfg.threshold, "verdict": verdict,
                               "assumed": loaded.spec.get("assumed"), "input_size": list(shape),
                               "normalization": loaded.spec.get("normalization")}  # fmt: skip
    files: list[str] = []
    if run is not None:
        files = _scan_files(run.path, found, details, data.test if data else None, loaded)
    if result is not None:
        atomic_write(result, lambda tmp: tmp.write_text(f"{found.probability:.6f}\n"))
    report = DetectionReport(
        method="scan", seconds=round(time.perf_counter() - began, 2), config=to_dict(cfg),
        provenance=provenance("scan", to_dict(cfg), seed, model=source.path, examples=str(examples)),
        details=details, files=files, model=source.path, data=str(examples), infected=verdict,
        flagged_labels=found.suspected_labels if verdict else [], anomaly_index=None,
    )  # fmt: skip
    return finish(run, report) if run is not None else report


def _source(model: str | os.PathLike | ModelSource) -> ModelSource:
    return model if isinstance(model, ModelSource) else ModelSource(str(model))


def _detector_gives(feature: str, detectors: list[str]) -> bool:
    """Whether a feature (named ``<detector>_...``) comes from one of ``detectors``."""
    return feature.split("_", 1)[0] in detectors


def _scan_files(out: Path, found, details: dict[str, Any], examples, loaded) -> list[str]:
    """scan.json, the detectors' plots, the suspected label's reversed trigger on clean images, scan.html."""
    import html

    import torch

    files = ["scan.json"]
    if found.mmbd is not None:
        mm.plot_margins(
            found.mmbd.by_label(), found.mmbd_test, details["detectors"]["mmbd"]["threshold"], out / "margins.png"
        )
        files.append("margins.png")
    answers: list[str] = []
    if found.nc is not None:
        outliers = nc.mad_outlier_test(found.nc.norms(), details["detectors"]["nc"]["threshold"])
        nc.plot_norms(found.nc.norms(), outliers, out / "norms.png")
        files.append("norms.png")
        label = details["suspected_labels"][0] if details["suspected_labels"] else details["detectors"]["nc"][
            "smallest_norm_label"]  # fmt: skip
        trigger = found.nc.trigger(label)
        x = torch.as_tensor(examples.x[:8]).permute(0, 3, 1, 2).float() / 255
        from ..triggers import stamp

        stamped = stamp(x, trigger)
        with torch.no_grad():
            answers = [str(int(v)) for v in loaded.module(stamped).argmax(1)]
        save_png(
            out / "suspected_trigger_on_examples.png", np.concatenate(list(stamped.permute(0, 2, 3, 1).numpy()), 1)
        )
        files.append("suspected_trigger_on_examples.png")
        details["suspected_trigger_answers"] = {"label": int(label), "answers": [int(a) for a in answers]}
    write_json(out / "scan.json", details)
    probability = details["probability"]
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.4g}</td></tr>" for k, v in details["features"].items())
    images = "".join(f'<p><img src="{f}" alt="{f}"></p>' for f in files if f.endswith(".png"))
    verdict = ("no calibration: no probability" if probability is None else
               f"probability backdoored {probability:.3f} ({'backdoored' if details['verdict'] else 'clean'} at "
               f"{details['threshold']:g})")  # fmt: skip
    page = (f"<!doctype html><meta charset=utf-8><title>trojanlab scan</title><h1>{html.escape(verdict)}</h1>"
            f"<p>suspected labels: {details['suspected_labels']}; assumed: {html.escape(str(details['assumed']))}</p>"
            f"<table><tr><th>feature</th><th>value</th></tr>{rows}</table>"
            + (f"<p>the model's answers on the stamped images: {' '.join(answers)}</p>" if answers else "")
            + images)  # fmt: skip
    atomic_write(out / "scan.html", lambda tmp: tmp.write_text(page))
    return [*files, "scan.html"]


DETECTORS: dict[str, tuple[type, Callable[..., DetectionReport]]] = {
    "nc": (NCConfig, neural_cleanse),
    "mmbd": (MMBDConfig, mmbd),
    "structure": (StructureConfig, structure),
    "mntd": (MNTDScoreConfig, mntd),
}
