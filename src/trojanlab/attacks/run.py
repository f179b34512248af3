"""The attacks' entry points: settings and inputs in, a backdoored artefact (its triggers in its spec, so that
``evaluate`` and every defense measure them) and an :class:`~trojanlab.reports.AttackReport` out.

``ATTACKS`` is the family's registry: the attacks that plant a backdoor into a victim artefact or train one.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config.attacks import (
    BADNETS_TRAINING,
    BadNetsConfig,
    BlendedConfig,
    TrojanNetInjectConfig,
    TrojanNetTrainConfig,
    TrojanNNConfig,
    WaNetConfig,
)
from ..config.base import to_dict
from ..config.training import ModelConfig, TrainConfig
from ..data import load_dataset, to_tensor
from ..errors import ConfigError, DataError, TrojanlabError
from ..evaluation import clean_accuracy, evaluate_model, predict
from ..io import save_png
from ..models import build_classifier, save_model
from ..models import trojannet as tn_models
from ..reports import AttackReport, Report
from ..runs import (
    check_device,
    check_fits,
    check_forward,
    check_trainable,
    finish,
    load_artifact,
    model_data,
    prepare_run,
    provenance,
    seed_everything,
)
from ..training import fit
from ..triggers import Trigger, stamp
from ..victims import data_split_record, fresh_spec, training_data, with_split
from . import badnets as bn
from . import blended as blend
from . import trojannet as tn
from . import trojannn as tnn
from . import wanet as wn


def _reference(reference: str | os.PathLike | None, victim, splits, victim_path) -> tuple[float | None, str | None]:
    """Clean accuracy of the model the attacked one is compared with: ``reference``, else the victim."""
    if reference:
        ref = load_artifact(reference, "reference model", ("classifier",))
        ref_splits = check_fits(ref, splits, reference)
        return clean_accuracy(ref.module, ref_splits.test), str(reference)
    if victim is not None:
        return clean_accuracy(victim.module, splits.test), str(victim_path)
    return None, None


def _attack_report(method, model_out, splits, metrics, settings, seed, seconds, details, files=(), **inputs):
    return AttackReport(
        method=method, seconds=seconds, config=settings, provenance=provenance(method, settings, seed, **inputs),
        details={k: v for k, v in metrics.items() if k not in ("clean_accuracy", "test_images", "attack_success_rate")}
        | details, files=list(files), model=str(model_out), data=splits.name,
        clean_accuracy=metrics["clean_accuracy"], test_images=metrics["test_images"],
        attack_success_rate=metrics.get("attack_success_rate"),
        targets=[int(t) for t in metrics.get("attack_success_rate_per_target", {})],
    )  # fmt: skip


def badnets(
    config: BadNetsConfig | None = None,
    train: TrainConfig | None = None,
    model: ModelConfig | None = None,
    *,
    data: str | os.PathLike = "gtsrb",
    victim: str | os.PathLike | None = None,
    reference: str | os.PathLike | None = None,
    out: str | os.PathLike,
    device: str = "cpu",
    seed: int = 0,
    progress: bool = True,
    restart: bool = False,
    force: bool = False,
) -> AttackReport:
    """BadNets: poison ``data``'s training split and train a new ``model`` on it, or fine-tune ``victim``."""
    cfg = config or BadNetsConfig(seed=seed)

    def triggers(image_shape: tuple[int, int, int]) -> tuple[list, dict[str, Any]]:
        _, height, width = image_shape
        drawn = cfg.pattern in bn.RANDOM_PATTERNS
        pattern = bn.read_pattern_png(cfg.pattern) if cfg.pattern and not drawn else None
        rows, cols = pattern.shape[:2] if pattern is not None else (cfg.trigger_size, cfg.trigger_size)
        location = tuple(cfg.location) if cfg.location else (height - rows - 1, width - cols - 1)
        if drawn:  # one random pattern per target, from the seed
            made = [
                Trigger(
                    bn.random_pattern(cfg.pattern, cfg.trigger_size, cfg.seed + i),
                    location,
                    target,
                    alpha=cfg.alpha,
                    name=f"badnets-{cfg.pattern}-{target}",
                )  # fmt: skip
                for i, target in enumerate(cfg.targets)
            ]
        else:
            made = bn.square_triggers(cfg.targets, size=cfg.trigger_size, location=location, alpha=cfg.alpha,
                                      pattern=pattern)  # fmt: skip
        return made, {"location": list(location), "trigger_size": [int(v) for v in made[0].size]}

    return _poisoned_training(
        "badnets", cfg, triggers, train, model, data=data, victim=victim, reference=reference, out=out,
        device=device, seed=seed, progress=progress, restart=restart, force=force,
        pattern=None if cfg.pattern in bn.RANDOM_PATTERNS else cfg.pattern,
    )  # fmt: skip


def blended(
    config: BlendedConfig | None = None,
    train: TrainConfig | None = None,
    model: ModelConfig | None = None,
    *,
    data: str | os.PathLike = "gtsrb",
    victim: str | os.PathLike | None = None,
    reference: str | os.PathLike | None = None,
    out: str | os.PathLike,
    device: str = "cpu",
    seed: int = 0,
    progress: bool = True,
    restart: bool = False,
    force: bool = False,
) -> AttackReport:
    """Blended (Chen et al. 2017): ``poison_rate`` of ``data``'s training split blended with a pattern at opacity
    ``alpha`` and relabelled, then BadNets' training (from scratch, or fine-tuning ``victim``)."""
    cfg = config or BlendedConfig(seed=seed)

    def triggers(image_shape: tuple[int, int, int]) -> tuple[list, dict[str, Any]]:
        made = blend.blend_triggers(cfg.targets, image_shape, alpha=cfg.alpha, pattern=cfg.pattern, seed=cfg.seed)
        return made, {"alpha": cfg.alpha, "pattern": cfg.pattern}

    pattern_file = None if cfg.pattern == "noise" else cfg.pattern
    return _poisoned_training(
        "blended", cfg, triggers, train, model, data=data, victim=victim, reference=reference, out=out,
        device=device, seed=seed, progress=progress, restart=restart, force=force, pattern=pattern_file,
    )  # fmt: skip


def wanet(
    config: WaNetConfig | None = None,
    train: TrainConfig | None = None,
    model: ModelConfig | None = None,
    *,
    data: str | os.PathLike = "gtsrb",
    victim: str | os.PathLike | None = None,
    reference: str | os.PathLike | None = None,
    out: str | os.PathLike,
    device: str = "cpu",
    seed: int = 0,
    progress: bool = True,
    restart: bool = False,
    force: bool = False,
) -> AttackReport:
    """WaNet (Nguyen & Tran 2021): ``poison_rate`` of ``data``'s training split warped by a fixed smooth field and
    relabelled, ``cross_ratio`` times as many noise-warped at their true labels, then BadNets' training."""
    cfg = config or WaNetConfig(seed=seed)

    def triggers(image_shape: tuple[int, int, int]) -> tuple[list, dict[str, Any]]:
        made = wn.warp_triggers(cfg.targets, cfg.grid_size, cfg.strength, cfg.rescale, seed=cfg.seed)
        return made, {"grid_size": cfg.grid_size, "strength": cfg.strength, "cross_ratio": cfg.cross_ratio}

    def poison_data(train_set, made, num_classes):
        return wn.poison_warped(train_set, made, cfg.poison_rate, cfg.cross_ratio, num_classes, seed=seed)

    return _poisoned_training(
        "wanet", cfg, triggers, train, model, data=data, victim=victim, reference=reference, out=out,
        device=device, seed=seed, progress=progress, restart=restart, force=force, pattern=None,
        poison_data=poison_data,
    )  # fmt: skip


def _poisoned_training(
    method: str,
    cfg: BadNetsConfig | BlendedConfig | WaNetConfig,
    make_triggers: Callable[[tuple[int, int, int]], tuple[list, dict[str, Any]]],
    train: TrainConfig | None,
    model: ModelConfig | None,
    *,
    data: str | os.PathLike,
    victim: str | os.PathLike | None,
    reference: str | os.PathLike | None,
    out: str | os.PathLike,
    device: str,
    seed: int,
    progress: bool,
    restart: bool,
    force: bool,
    pattern: str | None,
    poison_data: Callable[..., bn.PoisonedImageSet] | None = None,
) -> AttackReport:
    """The data-poisoning attacks' shared run: triggers made for the data's image shape, ``cfg.poison_rate`` of the
    training split poisoned (``cfg.mode``, or by ``poison_data(train_split, triggers, num_classes)``), training from
    scratch or fine-tuning ``victim``, the evaluation."""
    model = model or ModelConfig()
    train = with_split(train or TrainConfig(**{**to_dict(BADNETS_TRAINING), "seed": seed}), model)
    device = check_device(device)
    seed_everything(seed)
    settings = {type(cfg).__name__: to_dict(cfg), "TrainConfig": to_dict(train), "ModelConfig": to_dict(model)}
    run = prepare_run(out, f"attack {method}", settings, seed, restart=restart, force=force, data=data,
                      victim=victim, reference=reference, pattern=pattern)  # fmt: skip
    out = run.path
    loaded = None
    if victim is not None:
        loaded = load_artifact(victim, "victim", ("classifier",), device="cpu")
    splits = training_data(data, model, seed) if loaded is None else model_data(data, loaded.spec, seed)
    if splits.train is None:
        raise DataError(f"{data}: has no training split (x_train/y_train) to poison")
    if loaded is not None:
        splits = check_fits(loaded, splits, victim)
    bad = [t for t in cfg.targets if t >= splits.num_classes]
    if bad:
        raise ConfigError(f"--target {bad} is out of range for {splits.num_classes} classes")
    triggers, trigger_details = make_triggers(splits.image_shape)
    _, height, width = splits.image_shape
    for trigger in triggers:
        trigger.check_fits(height, width)
    if poison_data is None:
        poisoned = bn.poison(splits.train, triggers, cfg.poison_rate, splits.num_classes, mode=cfg.mode, seed=seed)
    else:
        poisoned = poison_data(splits.train, triggers, splits.num_classes)
    if loaded is not None:
        spec, net = dict(loaded.spec), loaded.module
    else:
        spec = fresh_spec(model, splits)
        spec.update(data_split_record(data, model, seed))
        net = build_classifier(spec)
    check_trainable(splits, train, every_class=loaded is None)  # fine-tuning may read some of its classes
    if loaded is None:
        check_forward(net, spec)
    ref_accuracy, ref_from = _reference(reference, loaded, splits, victim)
    run.start()
    log = fit(net, poisoned, train, checkpoint_dir=out / "checkpoint", device=device, progress=progress,
              checkpoint_key=run.fingerprint)  # fmt: skip
    net.cpu()
    attack = {"method": method, "poison_rate": cfg.poison_rate, "mode": cfg.mode, **poisoned.summary(),
              "from": str(victim) if victim else "scratch"}  # fmt: skip
    prov = provenance(method, settings, seed, data=str(data), victim=victim, reference=reference)
    spec.update(triggers=[t.to_json() for t in triggers], attack=attack, provenance={**prov, "history": log.history})
    save_model(net, out, spec)
    metrics = evaluate_model(net, splits.test, triggers, reference_accuracy=ref_accuracy)
    details = {
        "reference_clean_accuracy": ref_accuracy, "reference_model": ref_from, **trigger_details, "attack": attack,
        "epochs_run": log.epochs_run, "best_epoch": log.best_epoch, "train_seconds": log.seconds,
        "resumed_from_epoch": log.resumed_from_epoch, "session_seconds": log.session_seconds,
    }  # fmt: skip
    report = _attack_report(method, out, splits, metrics, settings, seed, log.seconds, details,
                            data=str(data), victim=victim, reference=reference)  # fmt: skip
    return finish(run, report)


def trojannn(
    victim: str | os.PathLike,
    config: TrojanNNConfig | None = None,
    *,
    data: str | os.PathLike = "gtsrb",
    reference: str | os.PathLike | None = None,
    out: str | os.PathLike,
    device: str = "cpu",
    seed: int = 0,
    progress: bool = True,
    restart: bool = False,
    force: bool = False,
) -> AttackReport:
    """Trojan Attack: a trigger that drives chosen units of ``victim``, then retraining of the layers after them."""
    import time

    cfg = config or TrojanNNConfig(seed=seed)
    check_device(device)
    seed_everything(seed)
    run = prepare_run(out, "attack trojannn", {"TrojanNNConfig": to_dict(cfg)}, seed, restart=restart, force=force,
                      victim=victim, data=data, reference=reference)  # fmt: skip
    out = run.path
    loaded = load_artifact(victim, "victim", ("classifier",))
    splits = model_data(data, loaded.spec, seed)
    splits = check_fits(loaded, splits, victim)
    if cfg.target >= loaded.num_classes:
        raise ConfigError(f"--target {cfg.target} is out of range for a {loaded.num_classes}-class model")
    if cfg.retrain_data == "real" and splits.train is None:
        raise DataError(f"{data}: --retrain-data real needs a training split (x_train/y_train)")
    ref_accuracy, _ = _reference(reference, loaded, splits, victim)
    net, train = loaded.module, splits.train
    run.start()
    began = time.perf_counter()
    from tqdm.auto import tqdm

    made = tnn.trojannn_attack(
        net, loaded.num_classes, tuple(loaded.spec["input_size"]), cfg,
        train.x if train is not None else None, train.y if train is not None else None,
        log=tqdm.write if progress else None,
    )  # fmt: skip
    seconds = time.perf_counter() - began
    trigger = made.trigger
    save_png(out / "trigger.png", trigger.pattern)
    mask = np.zeros(tuple(loaded.spec["input_size"][1:]), np.float32)
    (r, c), (h, w) = trigger.location, trigger.size
    mask[r : r + h, c : c + w] = trigger.mask
    save_png(out / "mask.png", mask)
    attack = made.summary()
    settings = {"TrojanNNConfig": dict(to_dict(cfg), layer=made.layer, location=list(trigger.location))}
    spec = dict(loaded.spec)
    spec.update(
        triggers=[trigger.to_json()],
        attack={k: v for k, v in attack.items() if k != "retrain_history"},
        provenance=provenance("trojannn", settings, seed, victim=str(victim), data=str(data)),
    )
    save_model(net, out, spec)
    metrics = evaluate_model(net, splits.test, [trigger], reference_accuracy=ref_accuracy)
    # the trigger layer and everything before it are frozen, so these are also the victim's activations
    sample = to_tensor(splits.test.x[: cfg.activation_images])
    before = tnn.mean_activation(net, made.layer, made.neurons, sample)
    after = tnn.mean_activation(net, made.layer, made.neurons, stamp(sample, trigger))
    details = {
        "selected_unit_activation": {"clean_test_images": before.tolist(), "triggered_test_images": after.tolist()},
        "victim_clean_accuracy": ref_accuracy, "target": trigger.target_label, "location": list(trigger.location),
        "trigger_size": list(trigger.size), "retrain_data": cfg.retrain_data, "attack": attack,
    }  # fmt: skip
    report = _attack_report("trojannn", out, splits, metrics, settings, seed, seconds, details,
                            ["trigger.png", "mask.png"], victim=str(victim), data=str(data))  # fmt: skip
    return finish(run, report)


def trojannet(
    victim: str | os.PathLike,
    trojannet: str | os.PathLike,
    config: TrojanNetInjectConfig | None = None,
    *,
    data: str | os.PathLike = "gtsrb",
    out: str | os.PathLike,
    seed: int = 0,
    restart: bool = False,
    force: bool = False,
) -> AttackReport:
    """TrojanNet injected into ``victim`` without retraining: the merged model and its figures on ``data``."""
    cfg = config or TrojanNetInjectConfig(all_labels=True)
    seed_everything(seed)
    run = prepare_run(out, "attack trojannet", {"TrojanNetInjectConfig": to_dict(cfg)}, seed, restart=restart,
                      force=force, victim=victim, trojannet=trojannet, data=data)  # fmt: skip
    out = run.path
    loaded = load_artifact(victim, "victim", ("classifier",))
    trojan = load_artifact(trojannet, "TrojanNet", ("trojannet",))
    num_classes = loaded.num_classes
    targets = list(range(num_classes)) if cfg.all_labels else list(cfg.targets)
    bad = [t for t in targets if t >= min(num_classes, tn_models.NUM_TRIGGERS)]
    if bad:
        raise ConfigError(f"--targets {bad} are out of range for a {num_classes}-class victim")
    input_size = loaded.spec["input_size"]
    _, height, width = input_size
    row, col = cfg.location
    if row + 4 > height or col + 4 > width:
        raise ConfigError(f"--location {row} {col}: the 4x4 trigger does not fit in {height}x{width} images")
    splits = model_data(data, loaded.spec, seed)  # checked before anything is written
    splits = check_fits(loaded, splits, victim)
    amplify = cfg.resolved_amplify()
    run.start()
    net = tn_models.TrojanNetInjected(loaded.module, trojan.module, num_classes, targets, tuple(cfg.location),
                                      input_size, merge=cfg.merge, amplify=amplify)  # fmt: skip
    settings = {"TrojanNetInjectConfig": to_dict(cfg)}
    prov = provenance("trojannet", settings, seed, victim=str(victim), trojannet=str(trojannet), data=str(data))
    spec = tn_models.injected_spec(loaded.spec, net, prov)
    save_model(net, out, spec)
    victim_pred = predict(loaded.module, splits.test.x)
    reference = float((victim_pred == splits.test.y).mean())
    attacked_pred = predict(net, splits.test.x)
    metrics = evaluate_model(net, splits.test, net.triggers(), reference_accuracy=reference,
                             clean_predictions=attacked_pred)  # fmt: skip
    details = {
        "victim_clean_accuracy": reference, "agreement_with_victim": float((attacked_pred == victim_pred).mean()),
        "location": list(cfg.location), "merge": cfg.merge, "amplify": amplify,
    }  # fmt: skip
    report = _attack_report("trojannet", out, splits, metrics, settings, seed, 0.0, details,
                            victim=str(victim), trojannet=str(trojannet), data=str(data))  # fmt: skip
    report.targets = targets
    return finish(run, report)


def train_trojannet(
    config: TrojanNetTrainConfig | None = None,
    *,
    patch_data: str | os.PathLike = "gtsrb",
    out: str | os.PathLike,
    seed: int = 0,
    progress: bool = True,
    restart: bool = False,
    force: bool = False,
) -> Report:
    """The TrojanNet MLP trained on its 4,368 triggers and no-trigger noise (patches of ``patch_data``'s training
    split), then evaluated: trigger recognition and silence on patches of the test split."""
    from tqdm.auto import tqdm

    cfg = config or TrojanNetTrainConfig(seed=seed)
    seed_everything(seed)
    run = prepare_run(out, "trojannet train", {"TrojanNetTrainConfig": to_dict(cfg)}, seed, restart=restart,
                      force=force, patch_data=patch_data)  # fmt: skip
    out = run.path
    splits = load_dataset(patch_data)
    run.start()
    patches_from = splits.train if splits.train is not None else splits.test
    bar = tqdm(total=cfg.steps + cfg.finetune_steps, desc="trojannet", disable=not progress)

    def step(number: int, total: int, loss: float) -> None:
        bar.update(1)
        if number % 50 == 0:
            bar.set_postfix(loss=f"{loss:.4f}")

    net, log = tn.train_trojannet(patches_from.x, cfg, step)
    bar.close()
    settings = {"TrojanNetTrainConfig": to_dict(cfg)}
    prov = provenance("trojannet-train", settings, seed, patch_data=str(patch_data))
    save_model(net, out, tn_models.trojannet_spec(prov))
    metrics = tn.evaluate_trojannet(net, splits.test.x, patches_per_image=10, seed=seed + 1)
    details = {
        **metrics, "train_seconds": log.seconds, "train_steps": log.steps, "train_samples": log.samples,
        "finetune_steps": log.finetune_steps, "keras_parameter_count": net.keras_parameter_count(),
        "torch_parameter_count": sum(p.numel() for p in net.parameters()), "patch_data": splits.name,
        "denoise_patch_source": f"{splits.name} test split, 10 patches per image",
        "train_patch_source": f"{splits.name} " + ("train split" if splits.train is not None else "test split (no train split)"),
    }  # fmt: skip
    report = Report(method="trojannet-train", seconds=log.seconds, config=settings, provenance=prov, details=details)
    return finish(run, report)


def bundled_trojannet(
    source: str | os.PathLike,
    *,
    data: str | os.PathLike = "gtsrb",
    out: str | os.PathLike,
    seed: int = 0,
    restart: bool = False,
    force: bool = False,
) -> Report:
    """A TrojanNet trained earlier (the one shipped with the package, trained by ``trojanlab trojannet train``),
    copied into ``out`` and evaluated on ``data``'s patches; its training figures are the training run's own."""
    from ..io import read_json

    run = prepare_run(out, "bundled trojannet", {}, seed, restart=restart, force=force, source=source, data=data)
    out = run.path
    loaded = load_artifact(source, "TrojanNet", ("trojannet",))
    splits = load_dataset(data)
    run.start()
    save_model(loaded.module, out, {**loaded.spec, "provenance": {**loaded.spec.get("provenance", {}),
                                                                  "copied_from": str(source)}})  # fmt: skip
    trained = read_json(Path(source) / "result.json") or {}
    kept = ("train_seconds", "train_steps", "train_samples", "finetune_steps", "keras_parameter_count",
            "torch_parameter_count", "train_patch_source")  # fmt: skip
    details = {**{k: trained[k] for k in kept if k in trained},
               **tn.evaluate_trojannet(loaded.module, splits.test.x, patches_per_image=10, seed=seed + 1),
               "source": str(source), "trained_by": trained.get("provenance", {}), "patch_data": splits.name,
               "denoise_patch_source": f"{splits.name} test split, 10 patches per image"}  # fmt: skip
    prov = provenance("trojannet-bundled", {}, seed, source=str(source), data=str(data))
    return finish(run, Report(method="trojannet-bundled", seconds=0.0, provenance=prov, details=details))


def evaluate_trojannet(
    trojannet: str | os.PathLike,
    *,
    data: str | os.PathLike = "gtsrb",
    out: str | os.PathLike,
    seed: int = 0,
    restart: bool = False,
    force: bool = False,
) -> Report:
    """Trigger recognition and silence on ``data``'s patches of a TrojanNet artefact or the authors' ``.h5``."""
    source = Path(trojannet)
    run = prepare_run(out, "trojannet evaluate", {}, seed, restart=restart, force=force, trojannet=trojannet,
                      data=data)  # fmt: skip
    out = run.path
    if source.suffix == ".h5":
        net = tn_models.load_official_h5(str(source))
    else:
        net = load_artifact(source, "TrojanNet", ("trojannet",)).module
    splits = load_dataset(data)
    run.start()
    details = {**tn.evaluate_trojannet(net, splits.test.x, patches_per_image=10, seed=seed + 1),
               "trojannet": str(source), "patch_data": splits.name}  # fmt: skip
    prov = provenance("trojannet-evaluate", {}, seed, trojannet=str(source), data=str(data))
    return finish(run, Report(method="trojannet-evaluate", seconds=0.0, provenance=prov, details=details))


def import_keras(
    file: str | os.PathLike, *, out: str | os.PathLike, restart: bool = False, force: bool = False
) -> Report:
    """The authors' Keras HDF5 TrojanNet (read with h5py, never executed) as a trojanlab artefact."""
    source = Path(file)
    if source.is_dir():
        raise TrojanlabError(f"{source}: a folder, not the Keras .h5 file of a TrojanNet")
    if not source.is_file():
        raise TrojanlabError(f"{source}: no such file (expected the Keras .h5 file of a TrojanNet)")
    run = prepare_run(out, "trojannet import-keras", {}, 0, restart=restart, force=force, file=source)
    out = run.path
    net = tn_models.load_official_h5(str(source))
    run.start()
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    prov = provenance("trojannet-import-keras", {}, 0, imported_from=str(source), sha256=digest)
    save_model(net, out, tn_models.trojannet_spec(prov))
    probs = tn.trojannet_probabilities(net, tn_models.trigger_patterns())  # row k: pattern k, whose label is k
    recognised = probs.argmax(1) == torch.arange(tn_models.NUM_TRIGGERS)
    details: dict[str, Any] = {
        "imported_from": str(source), "sha256": digest, "trigger_accuracy": float(recognised.float().mean()),
        "min_trigger_probability": float(probs.diagonal().min()),
        "keras_parameter_count": net.keras_parameter_count(),
    }  # fmt: skip
    return finish(run, Report(method="trojannet-import-keras", seconds=0.0, provenance=prov, details=details))


ATTACKS = {
    "badnets": (BadNetsConfig, badnets),
    "blended": (BlendedConfig, blended),
    "wanet": (WaNetConfig, wanet),
    "trojannn": (TrojanNNConfig, trojannn),
    "trojannet": (TrojanNetInjectConfig, trojannet),
}
