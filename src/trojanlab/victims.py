"""Training clean victims: from scratch (:func:`train_victim`) or a new head on a pretrained backbone
(:func:`train_transfer`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .config.base import to_dict
from .config.training import ModelConfig, TrainConfig, TransferConfig
from .data import EMBEDDED_GTSRB5, DataSplits, load_dataset
from .errors import DataError
from .evaluation import clean_accuracy
from .models import build_classifier, classifier_spec, save_model
from .models.backbones import INPUT_SIZES
from .reports import TrainReport
from .runs import check_device, check_forward, check_trainable, finish, prepare_run, provenance, seed_everything
from .training import fit, split_validation


def training_data(data: str | os.PathLike, model: ModelConfig, seed: int, pretrained: bool = False) -> DataSplits:
    """``data`` at the model's input size, split as ``model.split`` says (image folders); it must have a training
    split."""
    fractions = model.fractions()
    image_size = model.image_size
    if image_size is None and pretrained:
        image_size = INPUT_SIZES.get(model.arch, 224)
    splits = load_dataset(data, image_size=image_size, seed=seed, test_fraction=fractions[0] if fractions else None)
    if splits.train is None:
        raise DataError(f"{data}: has no training split (x_train/y_train) to train on")
    return splits


def data_split_record(data: str | os.PathLike, model: ModelConfig, seed: int) -> dict[str, Any]:
    """The image-folder split a model was trained with, recorded in its spec for every later command."""
    folder = Path(str(data))
    if str(data) == "gtsrb5" and not folder.exists():
        folder = EMBEDDED_GTSRB5
    if not folder.is_dir():
        return {}
    fractions = model.fractions()
    return {"data_split": {"test_fraction": 0.2 if fractions is None else fractions[0], "seed": seed}}


def fresh_spec(model: ModelConfig, data: DataSplits) -> dict[str, Any]:
    """The spec of an untrained ``model.arch`` classifier for ``data`` (normalised by the training split's stats)."""
    x = data.train.x.astype(np.float32) / 255.0
    mean = x.mean((0, 1, 2)).tolist() if model.normalize == "dataset" else [0.0] * x.shape[-1]
    std = x.std((0, 1, 2)).tolist() if model.normalize == "dataset" else [1.0] * x.shape[-1]
    return classifier_spec(model.arch, data.classes, data.image_shape, mean, std)


def with_split(train: TrainConfig, model: ModelConfig) -> TrainConfig:
    """``train`` with its validation share taken from ``model.split`` when one is given."""
    fractions = model.fractions()
    if fractions is None:
        return train
    return TrainConfig(**{**to_dict(train), "val_fraction": fractions[1]})


def train_victim(
    model: ModelConfig | None = None,
    train: TrainConfig | None = None,
    *,
    data: str | os.PathLike = "gtsrb",
    out: str | os.PathLike,
    device: str = "cpu",
    seed: int = 0,
    progress: bool = True,
    restart: bool = False,
    force: bool = False,
) -> TrainReport:
    """A clean classifier trained from scratch on ``data``; the artefact and ``result.json`` go to ``out``.
    ``restart``/``force``: see :func:`trojanlab.runs.prepare_run`."""
    model = model or ModelConfig()
    train = with_split(train or TrainConfig(seed=seed), model)
    device = check_device(device)
    seed_everything(seed)
    settings = {"ModelConfig": to_dict(model), "TrainConfig": to_dict(train)}
    run = prepare_run(out, "train", settings, seed, restart=restart, force=force, data=data)
    out = run.path
    splits = training_data(data, model, seed)
    check_trainable(splits, train)
    spec = fresh_spec(model, splits)
    spec.update(data_split_record(data, model, seed))
    net = build_classifier(spec)
    check_forward(net, spec)
    run.start()
    log = fit(net, splits.train, train, checkpoint_dir=out / "checkpoint", device=device, progress=progress,
              checkpoint_key=run.fingerprint)  # fmt: skip
    net.cpu()
    prov = provenance("train", settings, seed, data=str(data))
    spec["provenance"] = {**prov, "history": log.history}
    save_model(net, out, spec)
    report = TrainReport(
        method="train", seconds=log.seconds, config=settings, provenance=prov, model=str(out), data=splits.name, clean_accuracy=clean_accuracy(net, splits.test),
        test_images=len(splits.test),
        details={"arch": model.arch, "epochs_run": log.epochs_run, "best_epoch": log.best_epoch,
                 "best_val_accuracy": log.best_val_accuracy, "train_seconds": log.seconds,
                 "resumed_from_epoch": log.resumed_from_epoch, "session_seconds": log.session_seconds},
    )  # fmt: skip
    return finish(run, report)


def train_transfer(
    model: ModelConfig | None = None,
    transfer: TransferConfig | None = None,
    *,
    data: str | os.PathLike = "gtsrb5",
    out: str | os.PathLike,
    device: str = "cpu",
    seed: int = 0,
    progress: bool = True,
    restart: bool = False,
    force: bool = False,
) -> TrainReport:
    """A new head on the ImageNet-pretrained ``model.arch`` (cached features), optionally its last blocks too."""
    from .models.transfer import transfer_learn

    model = model or ModelConfig(arch="efficientnet_lite0")
    transfer = transfer or TransferConfig(seed=seed)
    fractions = model.fractions()
    if fractions is not None:
        transfer = TransferConfig(**{**to_dict(transfer), "val_fraction": fractions[1]})
    device = check_device(device)
    seed_everything(seed)
    settings = {"ModelConfig": to_dict(model), "TransferConfig": to_dict(transfer)}
    run = prepare_run(out, "train --pretrained", settings, seed, restart=restart, force=force, data=data,
                      weights=transfer.weights)  # fmt: skip
    out = run.path
    if transfer.weights is not None:  # read now: a bad file is named before any work
        from .models.backbones import read_state_dict

        read_state_dict(transfer.weights)
    splits = training_data(data, model, seed, pretrained=True)
    check_trainable(splits, transfer)
    run.start()
    res = transfer_learn(model.arch, splits.train, splits.num_classes, transfer, weights=transfer.weights)
    net = res.model
    spec = classifier_spec(model.arch, splits.classes, splits.image_shape, net.mean.flatten().tolist(),
                           net.std.flatten().tolist())  # fmt: skip
    spec.update(data_split_record(data, model, seed))
    prov = provenance("train-transfer", settings, seed, data=str(data))
    spec["provenance"] = {**prov, "history": res.history}
    save_model(net, out, spec)
    fit_set, val_set = split_validation(splits.train, transfer.val_fraction, transfer.seed)  # transfer_learn's split
    parts = {"train": fit_set, "validation": val_set, "test": splits.test}
    per_class = {
        part: {name: int((images.y == k).sum()) for k, name in enumerate(splits.classes)}
        for part, images in parts.items()
        if images is not None
    }
    report = TrainReport(
        method="train-transfer", seconds=sum(res.seconds.values()), config=settings,
        provenance=prov, model=str(out), data=splits.name,
        clean_accuracy=clean_accuracy(net, splits.test), test_images=len(splits.test),
        details={"train_images": len(splits.train), "images_per_class": per_class, "arch": model.arch,
                 "pretrained": transfer.weights or f"{model.arch} ImageNet weights bundled with its package",
                 "head": res.head, "best_epoch": res.best_epoch, "best_val_accuracy": res.val_accuracy,
                 "train_seconds": sum(res.seconds.values()), "seconds_per_phase": res.seconds},
    )  # fmt: skip
    return finish(run, report)


def bundled_victim(
    source: str | os.PathLike,
    *,
    data: str | os.PathLike = "gtsrb",
    out: str | os.PathLike,
    seed: int = 0,
    restart: bool = False,
    force: bool = False,
) -> TrainReport:
    """A victim trained earlier (e.g. the one shipped with the package, trained by ``trojanlab train``), copied
    into ``out`` and evaluated on ``data``: what a short run starts from instead of training one."""
    from .io import read_json
    from .runs import check_fits, load_artifact, model_data

    run = prepare_run(out, "bundled victim", {}, seed, restart=restart, force=force, source=source, data=data)
    out = run.path
    loaded = load_artifact(source, "victim", ("classifier",))
    splits = model_data(data, loaded.spec, seed)
    splits = check_fits(loaded, splits, source)
    run.start()
    spec = dict(loaded.spec)
    trained = read_json(Path(source) / "result.json") or {}
    spec["provenance"] = {**spec.get("provenance", {}), "copied_from": str(source)}
    save_model(loaded.module, out, spec)
    report = TrainReport(
        method="bundled", seconds=0.0, provenance=provenance("bundled", {}, seed, source=str(source), data=str(data)),
        model=str(out), data=splits.name, clean_accuracy=clean_accuracy(loaded.module, splits.test),
        test_images=len(splits.test),
        details={"arch": spec.get("arch"), "source": str(source), "trained_by": trained.get("provenance", {}),
                 "train_seconds": trained.get("seconds"), "source_clean_accuracy": trained.get("clean_accuracy")},
    )  # fmt: skip
    return finish(run, report)
