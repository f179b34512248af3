"""The ``trojanlab`` command line. Every command writes ``result.json`` into its ``--out`` folder."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .errors import TrojanlabError
from .io import write_json


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def _provenance(args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    return {
        "command": "trojanlab " + " ".join(args.argv),
        "seed": getattr(args, "seed", None),
        **extra,
    }


def _finish(out: Path, result: dict[str, Any]) -> None:
    write_json(out / "result.json", result)
    print(json.dumps(result, indent=2))


# ----------------------------------------------------------------------------------------------- train


def _split_fractions(args: argparse.Namespace) -> tuple[float | None, float]:
    """(test fraction, validation fraction) from ``--split TRAIN/VAL/TEST`` (image folders), else the defaults."""
    if not getattr(args, "split", None):
        return None, args.val_fraction
    try:
        parts = [float(v) for v in args.split.split("/")]
    except ValueError:
        parts = []
    if len(parts) != 3 or min(parts) < 0 or parts[0] <= 0 or parts[2] <= 0:
        raise TrojanlabError(f"--split takes TRAIN/VAL/TEST shares such as 80/20/10, got {args.split!r}")
    return parts[2] / sum(parts), parts[1] / (parts[0] + parts[1])


def _training_data(args: argparse.Namespace):
    from .data import load_dataset

    test_fraction, _ = _split_fractions(args)
    image_size = args.image_size
    if image_size is None and getattr(args, "pretrained", False):
        from .models.backbones import INPUT_SIZES

        image_size = INPUT_SIZES.get(args.arch, 224)
    data = load_dataset(args.data, image_size=image_size, seed=args.seed, test_fraction=test_fraction)
    if data.train is None:
        raise TrojanlabError(f"{args.data}: has no training split (x_train/y_train) to train on")
    return data


def _fresh_spec(args: argparse.Namespace, data) -> dict[str, Any]:
    """The spec of an untrained ``args.arch`` classifier for ``data`` (normalised by the training split's stats)."""
    from .models import classifier_spec

    x = data.train.x.astype(np.float32) / 255.0
    mean = x.mean((0, 1, 2)).tolist() if args.normalize == "dataset" else [0.0] * x.shape[-1]
    std = x.std((0, 1, 2)).tolist() if args.normalize == "dataset" else [1.0] * x.shape[-1]
    return classifier_spec(args.arch, data.classes, data.image_shape, mean, std)


def _train_config(args: argparse.Namespace):
    from .training import TrainConfig

    return TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        val_fraction=_split_fractions(args)[1],
        patience=args.patience,
        augment=not args.no_augment,
        seed=args.seed,
    )


def _add_train_options(parser: argparse.ArgumentParser, epochs: int) -> None:
    parser.add_argument("--arch", default="gtsrb_cnn", help="gtsrb_cnn or any torchvision classifier name")
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument(
        "--patience", type=int, default=4, help="early stop after this many epochs without a better validation accuracy"
    )
    parser.add_argument("--no-augment", action="store_true", help="no random 2-pixel shifts")
    parser.add_argument("--normalize", choices=["dataset", "none"], default="dataset")
    parser.add_argument("--image-size", type=int, default=None, help="resize image folders to this size (default 32)")
    parser.add_argument("--split", default=None, help="image folders: TRAIN/VAL/TEST shares per class, e.g. 80/20/10")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)


def _model_data(args: argparse.Namespace, spec: dict[str, Any], data_arg: str | None = None, seed: int | None = None):
    """``--data`` loaded as the model was trained on it: at its input size and, for image folders, with the
    train/test split recorded in its spec (so a test split never holds the model's training images)."""
    from .data import load_dataset

    split = spec.get("data_split") or {}
    size = (spec.get("input_size") or [3, 32, 32])[1]
    return load_dataset(
        data_arg if data_arg is not None else args.data,
        image_size=size,
        seed=int(split.get("seed", getattr(args, "seed", 0) if seed is None else seed)),
        test_fraction=split.get("test_fraction"),
    )


def _load_classifier(path: str, role: str):
    from .models import load_model

    loaded = load_model(path)
    if loaded.spec.get("kind") != "classifier":
        raise TrojanlabError(f"{path}: the {role} must be a plain classifier artefact, got {loaded.spec.get('kind')}")
    return loaded


def _check_fits_data(loaded, data, path: str) -> None:
    expected = tuple(loaded.spec.get("input_size", data.image_shape))
    if data.image_shape != expected:
        raise TrojanlabError(
            f"{path}: the model expects {expected} (C, H, W) images but the data are {data.image_shape}"
        )
    if data.num_classes != loaded.num_classes:
        raise TrojanlabError(
            f"{path}: a {loaded.num_classes}-class model, but the data have {data.num_classes} classes"
        )


def cmd_train(args: argparse.Namespace) -> None:
    from .evaluation import clean_accuracy
    from .models import build_classifier, save_model
    from .training import fit

    _seed_everything(args.seed)
    data = _training_data(args)
    if args.pretrained:
        _train_transfer(args, data)
        return
    spec = _fresh_spec(args, data)
    spec.update(_data_split(args))
    model = build_classifier(spec)
    cfg = _train_config(args)
    out = Path(args.out)
    log = fit(model, data.train, cfg, checkpoint_dir=out / "checkpoint", device=args.device)
    model.cpu()
    spec["provenance"] = _provenance(args, data=data.name, train_config=cfg.__dict__, history=log.history)
    save_model(model, out, spec)
    result = {
        "clean_accuracy": clean_accuracy(model, data.test),
        "test_images": len(data.test),
        "data": data.name,
        "arch": args.arch,
        "epochs_run": log.epochs_run,
        "best_epoch": log.best_epoch,
        "best_val_accuracy": log.best_val_accuracy,
        "train_seconds": log.seconds,
        "resumed_from_epoch": log.resumed_from_epoch,
    }
    _finish(out, result)


def _data_split(args: argparse.Namespace) -> dict[str, Any]:
    """The image-folder split a model was trained with, recorded in its spec for every later command."""
    from .data import EMBEDDED_GTSRB5

    folder = Path(str(args.data))
    if str(args.data) == "gtsrb5" and not folder.exists():
        folder = EMBEDDED_GTSRB5
    if not folder.is_dir():
        return {}
    test_fraction, _ = _split_fractions(args)
    return {"data_split": {"test_fraction": 0.2 if test_fraction is None else test_fraction, "seed": args.seed}}


def _train_transfer(args: argparse.Namespace, data) -> None:
    """``train --pretrained``: a new head on an ImageNet backbone (cached features), optionally the last blocks."""
    from .evaluation import clean_accuracy
    from .models import classifier_spec, save_model
    from .models.transfer import TransferConfig, transfer_learn
    from .training import split_validation

    cfg = TransferConfig(
        epochs=args.head_epochs,
        lr=args.lr,
        batch_size=min(args.batch_size, 32),
        val_fraction=_split_fractions(args)[1],
        fine_tune_blocks=args.fine_tune_blocks,
        fine_tune_epochs=args.fine_tune_epochs,
        seed=args.seed,
    )
    res = transfer_learn(args.arch, data.train, data.num_classes, cfg, weights=args.weights)
    model = res.model
    norm = {"mean": model.mean.flatten().tolist(), "std": model.std.flatten().tolist()}
    spec = classifier_spec(args.arch, data.classes, data.image_shape, norm["mean"], norm["std"])
    spec.update(_data_split(args))
    spec["provenance"] = _provenance(
        args, data=data.name, transfer_config=res.config, history=res.history, pretrained=args.weights or "bundled"
    )
    out = Path(args.out)
    save_model(model, out, spec)
    fit_set, val_set = split_validation(data.train, cfg.val_fraction, cfg.seed)  # the split transfer_learn made
    parts = {"train": fit_set, "validation": val_set, "test": data.test}
    per_class = {
        part: {name: int((images.y == k).sum()) for k, name in enumerate(data.classes)}
        for part, images in parts.items()
        if images is not None
    }
    _finish(
        out,
        {
            "clean_accuracy": clean_accuracy(model, data.test),
            "test_images": len(data.test),
            "train_images": len(data.train),
            "images_per_class": per_class,
            "data": data.name,
            "arch": args.arch,
            "pretrained": args.weights or f"{args.arch} ImageNet weights bundled with its package",
            "head": res.head,
            "best_epoch": res.best_epoch,
            "best_val_accuracy": res.val_accuracy,
            "train_seconds": sum(res.seconds.values()),
            "seconds": res.seconds,
        },
    )


# ----------------------------------------------------------------------------------------------- trojannet


def cmd_trojannet_train(args: argparse.Namespace) -> None:
    from tqdm.auto import tqdm

    from .attacks import trojannet as tn
    from .data import load_dataset
    from .models import save_model

    _seed_everything(args.seed)
    data = load_dataset(args.patch_data)
    patches_from = data.train if data.train is not None else data.test
    names = ("steps", "lr", "negatives", "finetune_steps", "trigger_calibration")
    overrides = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    if args.patch_weight is not None:
        overrides["finetune_weights"] = {"image_patches": args.patch_weight}
    cfg = tn.TrojanNetTrainConfig(seed=args.seed, **overrides)
    bar = tqdm(total=cfg.steps + cfg.finetune_steps, desc="trojannet", disable=args.quiet)

    def progress(step: int, total: int, loss: float) -> None:
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss:.4f}")

    model, log = tn.train_trojannet(patches_from.x, cfg, progress)
    bar.close()
    out = Path(args.out)
    save_model(model, out, tn.trojannet_spec(_provenance(args, patch_data=data.name, config=cfg.__dict__)))
    metrics = tn.evaluate_trojannet(model, data.test.x, patches_per_image=10, seed=args.seed + 1)
    result = {
        **metrics,
        "train_seconds": log.seconds,
        "train_steps": log.steps,
        "train_samples": log.samples,
        "finetune_steps": log.finetune_steps,
        "keras_parameter_count": model.keras_parameter_count(),
        "torch_parameter_count": sum(p.numel() for p in model.parameters()),
        "patch_data": data.name,
        "denoise_patch_source": f"{data.name} test split, 10 patches per image",
        "train_patch_source": f"{data.name} {'train' if data.train is not None else 'test (no train split given)'} split",
    }
    _finish(out, result)


def cmd_trojannet_evaluate(args: argparse.Namespace) -> None:
    from .attacks import trojannet as tn
    from .data import load_dataset
    from .models import load_model

    source = Path(args.trojannet)
    if source.suffix == ".h5":
        model = tn.load_official_h5(str(source))
    else:
        loaded = load_model(source)
        if loaded.spec.get("kind") != "trojannet":
            raise TrojanlabError(f"{source}: not a TrojanNet artefact (kind {loaded.spec.get('kind')})")
        model = loaded.module
    data = load_dataset(args.data)
    result = {
        **tn.evaluate_trojannet(model, data.test.x, patches_per_image=10, seed=args.seed + 1),
        "trojannet": str(source),
        "patch_data": data.name,
    }
    _finish(Path(args.out), result)


def cmd_trojannet_import_keras(args: argparse.Namespace) -> None:
    import hashlib

    from .attacks import trojannet as tn
    from .models import save_model

    source = Path(args.file)
    model = tn.load_official_h5(str(source))
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    out = Path(args.out)
    save_model(model, out, tn.trojannet_spec(_provenance(args, imported_from=str(source), sha256=digest)))
    probs = tn.trojannet_probabilities(model, tn.trigger_patterns())  # row k: pattern k, whose label is k
    recognised = probs.argmax(1) == torch.arange(tn.NUM_TRIGGERS)
    own = probs.diagonal()
    _finish(
        out,
        {
            "imported_from": str(source),
            "sha256": digest,
            "trigger_accuracy": float(recognised.float().mean()),
            "min_trigger_probability": float(own.min()),
            "keras_parameter_count": model.keras_parameter_count(),
        },
    )


# ----------------------------------------------------------------------------------------------- attack


def cmd_attack_trojannet(args: argparse.Namespace) -> None:
    from .attacks import trojannet as tn
    from .evaluation import evaluate_model, predict
    from .models import load_model, save_model

    victim = load_model(args.victim)
    trojan = load_model(args.trojannet)
    if victim.spec.get("kind") != "classifier":
        raise TrojanlabError(
            f"{args.victim}: the victim must be a plain classifier artefact, got {victim.spec.get('kind')}"
        )
    if trojan.spec.get("kind") != "trojannet":
        raise TrojanlabError(f"{args.trojannet}: not a TrojanNet artefact (kind {trojan.spec.get('kind')})")
    num_classes = victim.num_classes
    targets = list(range(num_classes)) if args.all_labels else args.targets
    if not targets:
        raise TrojanlabError("give --targets LABEL [LABEL ...] or --all-labels")
    input_size = victim.spec["input_size"]
    location = tuple(args.location) if args.location else (1, 1)
    amplify = args.amplify if args.amplify is not None else (2.0 if args.merge == "official" else 1.0)
    model = tn.TrojanNetInjected(
        victim.module, trojan.module, num_classes, targets, location, input_size, merge=args.merge, amplify=amplify
    )
    spec = tn.injected_spec(
        victim.spec, model, _provenance(args, victim=str(args.victim), trojannet=str(args.trojannet))
    )
    out = Path(args.out)
    save_model(model, out, spec)
    data = _model_data(args, victim.spec)
    victim_pred = predict(victim.module, data.test.x)
    reference = float((victim_pred == data.test.y).mean())
    attacked_pred = predict(model, data.test.x)
    result = evaluate_model(
        model, data.test, model.triggers(), reference_accuracy=reference, clean_predictions=attacked_pred
    )
    result.update(
        victim_clean_accuracy=reference,
        agreement_with_victim=float((attacked_pred == victim_pred).mean()),
        targets=targets,
        location=list(location),
        merge=args.merge,
        amplify=amplify,
        data=data.name,
    )
    _finish(out, result)


def _reference_accuracy(args: argparse.Namespace, data, victim=None) -> tuple[float | None, str | None]:
    """Clean accuracy of the model the attacked one is compared with: ``--reference``, else the victim."""
    from .evaluation import clean_accuracy

    if getattr(args, "reference", None):
        ref = _load_classifier(args.reference, "reference model")
        _check_fits_data(ref, data, args.reference)
        return clean_accuracy(ref.module, data.test), str(args.reference)
    if victim is not None:
        return clean_accuracy(victim.module, data.test), str(args.victim)
    return None, None


def cmd_attack_badnets(args: argparse.Namespace) -> None:
    from .attacks import badnets as bn
    from .evaluation import evaluate_model
    from .models import build_classifier, save_model
    from .training import fit

    _seed_everything(args.seed)
    data = _training_data(args)
    _, height, width = data.image_shape
    pattern = bn.read_pattern_png(args.pattern) if args.pattern else None
    rows, cols = pattern.shape[:2] if pattern is not None else (args.trigger_size, args.trigger_size)
    location = tuple(args.location) if args.location else (height - rows - 1, width - cols - 1)
    triggers = bn.square_triggers(
        args.targets, size=args.trigger_size, location=location, alpha=args.alpha, pattern=pattern
    )
    poisoned = bn.poison(data.train, triggers, args.poison_rate, data.num_classes, mode=args.mode, seed=args.seed)
    victim = None
    if args.victim:
        victim = _load_classifier(args.victim, "victim")
        _check_fits_data(victim, data, args.victim)
        spec, model = dict(victim.spec), victim.module
    else:
        spec = _fresh_spec(args, data)
        model = build_classifier(spec)
    reference, reference_from = _reference_accuracy(args, data, victim)
    cfg = _train_config(args)
    out = Path(args.out)
    log = fit(model, poisoned, cfg, checkpoint_dir=out / "checkpoint", device=args.device)
    model.cpu()
    attack = {
        "method": "badnets",
        "poison_rate": args.poison_rate,
        "mode": args.mode,
        **poisoned.summary(),
        "from": str(args.victim) if args.victim else "scratch",
    }
    spec.update(
        triggers=[t.to_json() for t in triggers],
        attack=attack,
        provenance=_provenance(args, data=data.name, train_config=cfg.__dict__, history=log.history),
    )
    save_model(model, out, spec)
    result = evaluate_model(model, data.test, triggers, reference_accuracy=reference)
    result.update(
        reference_clean_accuracy=reference,
        reference_model=reference_from,
        targets=[t.target_label for t in triggers],
        location=list(location),
        trigger_size=[int(v) for v in triggers[0].size],
        attack=attack,
        data=data.name,
        epochs_run=log.epochs_run,
        best_epoch=log.best_epoch,
        train_seconds=log.seconds,
        resumed_from_epoch=log.resumed_from_epoch,
    )
    _finish(out, result)


def _save_png(path: Path, image: np.ndarray) -> None:
    """An (h, w[, C]) float image in [0, 1] as an 8-bit PNG, written atomically."""
    from PIL import Image

    from .io import atomic_write

    pixels = np.clip(np.rint(np.asarray(image) * 255), 0, 255).astype(np.uint8)
    atomic_write(path, lambda tmp: Image.fromarray(pixels.squeeze()).save(tmp, format="PNG"))


def cmd_attack_trojannn(args: argparse.Namespace) -> None:
    from tqdm.auto import tqdm

    from .attacks import trojannn as tnn
    from .data import load_dataset, to_tensor
    from .evaluation import evaluate_model
    from .models import save_model
    from .triggers import stamp

    _seed_everything(args.seed)
    victim = _load_classifier(args.victim, "victim")
    data = load_dataset(args.data, seed=args.seed)
    _check_fits_data(victim, data, args.victim)
    if args.retrain_data == "real" and data.train is None:
        raise TrojanlabError(f"{args.data}: --retrain-data real needs a training split (x_train/y_train)")
    cfg = tnn.TrojanNNConfig(
        target=args.target,
        layer=args.layer,
        neurons=args.neurons,
        neuron_choice=args.neuron_choice,
        candidates=args.candidates,
        neuron_ids=args.neuron_ids,
        trigger_size=args.trigger_size,
        location=tuple(args.location) if args.location else None,
        alpha=args.alpha,
        trigger_steps=args.trigger_steps,
        trigger_background=args.trigger_background,
        retrain_data=args.retrain_data,
        per_class=args.per_class,
        reverse_steps=args.reverse_steps,
        real_fraction=args.real_fraction,
        epochs=args.epochs,
        lr=args.lr,
        trojan_weight=args.trojan_weight,
        seed=args.seed,
    )
    reference, _ = _reference_accuracy(args, data, victim)
    model = victim.module
    train = data.train
    result_ = tnn.trojannn_attack(
        model,
        victim.num_classes,
        tuple(victim.spec["input_size"]),
        cfg,
        train.x if train is not None else None,
        train.y if train is not None else None,
        log=None if args.quiet else tqdm.write,
    )
    out = Path(args.out)
    trigger = result_.trigger
    _save_png(out / "trigger.png", trigger.pattern)
    mask = np.zeros(tuple(victim.spec["input_size"][1:]), np.float32)
    (r, c), (h, w) = trigger.location, trigger.size
    mask[r : r + h, c : c + w] = trigger.mask
    _save_png(out / "mask.png", mask)
    attack = result_.summary()
    config = dict(cfg.__dict__, layer=result_.layer, location=list(trigger.location))
    spec = dict(victim.spec)
    spec.update(
        triggers=[trigger.to_json()],
        attack={k: v for k, v in attack.items() if k != "retrain_history"},
        provenance=_provenance(args, victim=str(args.victim), data=data.name, config=config),
    )
    save_model(model, out, spec)
    result = evaluate_model(model, data.test, [trigger], reference_accuracy=reference)
    # the trigger layer and everything before it are frozen, so these are also the victim's activations
    sample = to_tensor(data.test.x[: args.activation_images])
    before = tnn.mean_activation(model, result_.layer, result_.neurons, sample)
    after = tnn.mean_activation(model, result_.layer, result_.neurons, stamp(sample, trigger))
    result.update(
        selected_unit_activation={"clean_test_images": before.tolist(), "triggered_test_images": after.tolist()},
        victim_clean_accuracy=reference,
        target=trigger.target_label,
        location=list(trigger.location),
        trigger_size=list(trigger.size),
        retrain_data=cfg.retrain_data,
        attack=attack,
        data=data.name,
        files=["trigger.png", "mask.png"],
    )
    _finish(out, result)


# ----------------------------------------------------------------------------------------------- detect


def cmd_detect_nc(args: argparse.Namespace) -> None:
    from .detection import neural_cleanse as nc
    from .models import load_model

    _seed_everything(args.seed)
    loaded = load_model(args.model, device=args.device)
    data = _model_data(args, loaded.spec)
    _check_fits_data(loaded, data, args.model)
    scan_set = data.test if args.split == "test" else data.train
    if scan_set is None:
        raise TrojanlabError(f"{args.data}: has no {args.split} split to scan with")
    if args.images is not None and args.images < len(scan_set):
        if args.images < 1:
            raise TrojanlabError(f"--images must be at least 1, got {args.images}")
        pick = np.random.default_rng(args.seed).choice(len(scan_set), args.images, replace=False)
        scan_set = scan_set.subset(np.sort(pick))
    cfg = nc.NCConfig(
        profile=args.profile,
        steps=args.steps,
        batches_per_step=args.batches_per_step,
        batch_size=args.batch_size,
        lr=args.lr,
        init_cost=args.init_cost,
        patience=args.patience,
        early_stop_patience=args.early_stop_patience,
        seed=args.seed,
    )
    out = Path(args.out)
    scan = nc.reverse_engineer(
        loaded.module,
        scan_set,
        loaded.num_classes,
        args.labels,
        cfg,
        device=args.device,
        checkpoint_dir=out / "checkpoint",
        progress=not args.quiet,
    )
    nc.save_scan_images(scan, out)
    nc.save_reversed(scan, out / "reversed_triggers.safetensors")
    files = ["masks/mask_LLL.png", "triggers/trigger_LLL.png", "reversed_triggers.safetensors"]
    result: dict[str, Any] = {"model": str(args.model), "data": data.name, "scan_images": len(scan_set)}
    if len(scan.labels) >= 3:
        outliers = nc.mad_outlier_test(scan.norms(), args.threshold)
        nc.plot_norms(scan.norms(), outliers, out / "norms.png")
        files.append("norms.png")
        result.update(
            anomaly_index=outliers["anomaly_index"],
            flagged_labels=outliers["flagged_labels"],
            infected=bool(outliers["flagged_labels"]),
            **{k: v for k, v in outliers.items() if k not in ("anomaly_index", "flagged_labels")},
        )
    else:
        outliers = None
        result.update(anomaly_index=None, flagged_labels=[], note="the MAD test needs at least 3 scanned labels")
    result.update(
        l1_norms={str(label): norm for label, norm in scan.norms().items()},
        per_label=scan.per_label(),
        seconds=scan.seconds,
        samples=scan.samples,
        official_schedule_samples_max=cfg.official_budget(len(scan.labels)),
        config=scan.config,
        device=str(args.device),
    )
    if args.mitigate:
        labels = args.mitigate_labels if args.mitigate_labels is not None else result["flagged_labels"]
        result["mitigation"] = _mitigate(args, loaded, data, scan, labels, out / "repaired")
        files.append("repaired/")
    result["files"] = files
    write_json(out / "result.json", result)
    norms = sorted(scan.norms().items(), key=lambda item: item[1])
    print(
        f"scanned {len(scan.labels)} labels in {scan.seconds:.0f} s ({scan.samples:,} images); smallest L1 norms: "
        + ", ".join(f"{label}: {norm:.1f}" for label, norm in norms[:5])
    )
    if result["anomaly_index"] is not None:
        print(
            f"anomaly index {result['anomaly_index']:.3f} (median {result['median']:.1f}, MAD {result['mad']:.1f}); "
            f"flagged: {result['flagged_labels'] or 'none'}"
        )
    if "mitigation" in result:
        before, after = result["mitigation"]["before"], result["mitigation"]["after"]
        line = f"{args.mitigate}: clean accuracy {before['clean_accuracy']:.4f} -> {after['clean_accuracy']:.4f}"
        if "attack_success_rate" in before:
            line += f", ASR {before['attack_success_rate']:.4f} -> {after['attack_success_rate']:.4f}"
        print(line + f"; repaired model in {out / 'repaired'}")
    print(f"result: {out / 'result.json'}")


def _mitigate(args: argparse.Namespace, loaded, data, scan, labels: list[int], out: Path) -> dict[str, Any]:
    """Repair ``loaded`` with the reversed triggers of ``labels``; CA and ASR (of the model's own triggers, when it
    carries them, and of the reversed ones) on the test split before and after; the repaired artefact in ``out``."""
    from .defenses import prune_by_activation_gap, unlearn
    from .evaluation import attack_success_rate, evaluate_model
    from .models import save_model
    from .training import TrainConfig, split_validation

    model = loaded.module
    bad = [label for label in labels if label not in scan.labels]
    if bad:
        raise TrojanlabError(f"--mitigate-labels {bad} were not scanned (scanned: {scan.labels})")
    reversed_triggers = [scan.trigger(label) for label in labels]

    def measure() -> dict[str, Any]:
        metrics = evaluate_model(model, data.test, loaded.triggers, device=args.device)
        metrics["reversed_trigger_asr"] = {
            str(t.target_label): attack_success_rate(model, data.test, t, device=args.device) for t in reversed_triggers
        }
        return metrics

    before = measure()
    report: dict[str, Any] = {"method": args.mitigate, "labels": labels, "before": before}
    if not labels:
        report["note"] = "no label flagged and none given: the model is returned unchanged (as BackdoorBench does)"
    else:
        if data.train is None:
            raise TrojanlabError(f"{args.data}: mitigation needs a training split for the defender's clean data")
        _, clean = split_validation(data.train, args.clean_fraction, args.seed)
        report["clean_images"] = len(clean)
        if args.mitigate == "unlearn":
            cfg = TrainConfig(
                epochs=args.unlearn_epochs, lr=args.unlearn_lr, patience=2, val_fraction=0.1, seed=args.seed
            )
            log = unlearn(model, clean, reversed_triggers, args.stamp_fraction, cfg, args.device, not args.quiet)
            report.update(stamp_fraction=args.stamp_fraction, epochs_run=log.epochs_run, history=log.history)
        else:
            pruned = prune_by_activation_gap(
                model, loaded.num_classes, clean, reversed_triggers, args.max_prune, target_asr=args.prune_target_asr
            )
            report["pruning"] = pruned.to_json()
    after = measure()
    after["clean_accuracy_drop"] = before["clean_accuracy"] - after["clean_accuracy"]
    report["after"] = after
    spec = dict(loaded.spec)
    provenance = dict(spec.get("provenance", {}))
    provenance.update(
        defense={"method": f"neural-cleanse-{args.mitigate}", "labels": labels, "from": str(args.model)},
        command="trojanlab " + " ".join(args.argv),
    )
    spec["provenance"] = provenance
    save_model(model, out, spec)
    return report


# ----------------------------------------------------------------------------------------------- defend


def _defender_data(args: argparse.Namespace, data, spec: dict[str, Any] | None = None):
    """The defender's clean images split into the part the defense fits on and the held-out part its automatic rule
    reads: every image of ``--clean-data`` (the defender's own data; its training split if it has one), else
    ``--clean-fraction`` of ``--data``'s training split (stratified; images the model may have trained on)."""
    from .training import split_validation

    if not 0 < args.clean_fraction < 1 or not 0 < args.holdout < 1:
        raise TrojanlabError("--clean-fraction and --holdout must lie in (0, 1)")
    if getattr(args, "clean_data", None):
        own = _model_data(args, spec or {}, data_arg=args.clean_data)
        clean = own.train if own.train is not None else own.test
        if int(clean.y.max()) >= data.num_classes:
            raise TrojanlabError(f"{args.clean_data}: label {int(clean.y.max())} is out of range for the model")
        fit, holdout = split_validation(clean, args.holdout, args.seed + 1)
        if holdout is None or len(fit) == 0 or len(holdout) == 0:
            raise TrojanlabError(f"{args.clean_data}: too few images to split into fit and held-out parts")
        return clean, fit, holdout
    if data.train is None:
        raise TrojanlabError(f"{args.data}: the defense needs a training split to draw the defender's clean data from")
    _, clean = split_validation(data.train, args.clean_fraction, args.seed)
    per_class = np.bincount(clean.y)
    if not (per_class >= 2).any():  # split_validation holds out only from classes with at least 2 images
        raise TrojanlabError(
            f"--clean-fraction {args.clean_fraction} of {args.data}'s training split gives {len(clean)} images, one "
            "per class: nothing could be held out for the pruning rule; raise --clean-fraction"
        )
    fit, holdout = split_validation(clean, args.holdout, args.seed + 1)
    if holdout is None or len(fit) == 0 or len(holdout) == 0:
        raise TrojanlabError(f"--clean-fraction {args.clean_fraction} gives too few images to split ({len(clean)})")
    return clean, fit, holdout


def _test_curve(args, prune, data, triggers, masks, grid) -> list[dict[str, Any]]:
    """CA and ASR on a test subset after pruning at each threshold of ``grid`` (report only)."""
    from .defenses import anp
    from .evaluation import evaluate_model

    test = data.test
    if args.curve_images and args.curve_images < len(test):
        test = test.subset(np.sort(np.random.default_rng(args.seed).choice(len(test), args.curve_images, False)))
    curve, metrics = [], None
    for threshold, index, new in anp.threshold_prunings(masks, grid):
        if new or metrics is None:  # a threshold that prunes nothing new has the last point's figures
            metrics = evaluate_model(prune(index), test, triggers, device=args.device)
        point = {"threshold": threshold, "pruned": len(index), "fraction": len(index) / len(masks)}
        point["clean_accuracy"] = metrics["clean_accuracy"]
        if "attack_success_rate" in metrics:
            point["attack_success_rate"] = metrics["attack_success_rate"]
        curve.append(point)
    return curve


ANP_PROFILES = {"paper": {"iterations": 2000, "batch_size": 128}, "fast": {"iterations": 500, "batch_size": 64}}


def _anp_masks(args: argparse.Namespace, model, fit, loaded, out: Path):
    from .defenses import anp

    cfg = anp.ANPConfig(
        eps=args.eps,
        steps=args.anp_steps,
        alpha=args.alpha,
        lr=args.lr,
        momentum=args.momentum,
        batch_size=args.batch_size or ANP_PROFILES[args.profile]["batch_size"],
        iterations=args.iterations or ANP_PROFILES[args.profile]["iterations"],
        augment=not args.no_augment,
        train_mode=args.train_mode,
        include_classifier=args.include_classifier,
        seed=args.seed,
    )
    return anp.optimize_masks(model, fit, cfg, loaded.num_classes, args.device, out / "checkpoint", not args.quiet)


def _guided_ranking(args: argparse.Namespace, model, fit, loaded, result: dict[str, Any]):
    """``(neurons, rank masks)`` of the nc-guided variant, masks ``None`` when no label is flagged or given; what it
    read goes into ``result["guide"]``."""
    from .data import to_tensor
    from .defenses import anp, guided
    from .detection import neural_cleanse as nc

    if not args.reversed_triggers:
        raise TrojanlabError("--variant nc-guided needs --reversed-triggers (a `trojanlab detect nc` output folder)")
    scan = Path(args.reversed_triggers)
    labels = args.guide_labels
    if labels is None:
        try:
            labels = json.loads((scan / "result.json").read_text())["flagged_labels"]
        except (OSError, ValueError, KeyError) as exc:
            raise TrojanlabError(f"{scan}: cannot read the flagged labels of a Neural Cleanse scan ({exc})") from exc
    bad = [label for label in labels if not 0 <= label < loaded.num_classes]
    if bad:
        raise TrojanlabError(f"--guide-labels {bad} are out of range for a {loaded.num_classes}-class model")
    probe = to_tensor(fit.x[:2]).to(args.device)
    layers = anp.find_neurons(model, probe, loaded.num_classes, args.include_classifier)
    result["guide"] = {"reversed_triggers": str(scan), "labels": [int(label) for label in labels]}
    if not labels:  # as the Neural Cleanse mitigation (and BackdoorBench): nothing flagged, nothing repaired
        return layers, None
    reversed_triggers = nc.load_reversed(scan / "reversed_triggers.safetensors", labels)
    for trigger in reversed_triggers:
        trigger.check_fits(*probe.shape[-2:])  # a scan of another model's images: a clear error, not a shape clash
    scores = guided.trigger_scores(model, layers, fit, reversed_triggers, args.device)
    describe = anp.NeuronPerturbation(layers).describe
    result["guide"].update(
        score="largest relative rise of the mean activation under a reversed trigger, (stamped - clean) / (clean + "
        "1e-3), on the defender's fitting images of other labels",
        highest=[
            {"index": i, "layer": describe(i)[0], "neuron": describe(i)[1], "score": float(scores[i])}
            for i in torch.argsort(-scores, stable=True)[:20].tolist()
        ],
    )
    return layers, guided.rank_masks(scores)


def cmd_defend_anp(args: argparse.Namespace) -> None:
    import time

    from .defenses import anp
    from .evaluation import evaluate_model
    from .models import load_model, save_model

    _seed_everything(args.seed)
    if args.variant != "subnetwork" and args.prune != "auto" and args.prune_value is None:
        raise TrojanlabError(f"--prune {args.prune} needs --prune-value")
    loaded = load_model(args.model, device=args.device)
    data = _model_data(args, loaded.spec)
    _check_fits_data(loaded, data, args.model)
    clean, fit, holdout = _defender_data(args, data, loaded.spec)
    out = Path(args.out)
    model, triggers = loaded.module, loaded.triggers
    before = evaluate_model(model, data.test, triggers, device=args.device)
    result: dict[str, Any] = {
        "model": str(args.model),
        "data": data.name,
        "variant": args.variant,
        "defender_images": len(clean),
        "fit_images": len(fit),
        "holdout_images": len(holdout),
        "before": before,
        "device": str(args.device),
    }
    files = ["pruned/"]
    began = time.perf_counter()
    if args.variant == "subnetwork":
        from .defenses import anp_subnetwork as sub

        cfg = sub.SubnetworkConfig(
            cycles=args.cycles,
            epochs=args.epochs,
            lr=args.sub_lr,
            alpha=args.sub_alpha,
            batch_size=args.sub_batch_size,
            orientation=args.orientation,
            step=args.sub_step,
            seed=args.seed,
        )
        # the monitor: clean test images, as the thesis's 50 (only the parts' answers are compared: no label and no
        # trigger is read); the defender's own training-split images are memorised and never change their answer
        monitor = data.test
        if args.monitor_images and args.monitor_images < len(monitor):
            pick = np.random.default_rng(args.seed).choice(len(monitor), args.monitor_images, replace=False)
            monitor = monitor.subset(np.sort(pick))
        result["monitor_images"] = len(monitor)
        scores = sub.subnetwork_scores(model, clean, monitor, cfg, device=args.device, progress=not args.quiet)
        pruned, decision = sub.remove_part(model, scores)
        files += sub.plot_curves(scores, out)
        result.update(
            subnetwork=scores.to_json(),
            decision=decision,
            mask_values=scores.scores,
            defense_seconds=time.perf_counter() - began,
        )
        spec = dict(loaded.spec["victim"]) if decision["removed"] == "trojannet" else dict(loaded.spec)
        spec["triggers"] = loaded.spec.get("triggers", [])
    else:
        if args.variant == "nc-guided":
            from .defenses import guided

            ranking = time.perf_counter()
            layers, values = _guided_ranking(args, model, fit, loaded, result)
            unguided = values is None
            if unguided:
                values = torch.ones(sum(layer.size for layer in layers), dtype=torch.float64)
            grid, mask_seconds = guided.GUIDED_GRID, time.perf_counter() - ranking
        else:
            masks = _anp_masks(args, model, fit, loaded, out)
            layers, values, grid, mask_seconds, unguided = (
                masks.layers,
                masks.masks,
                anp.THRESHOLD_GRID,
                masks.seconds,
                False,
            )
            result["premise"] = anp.collapse_check(
                model, masks.layers, holdout, masks.config["eps"], args.seed, args.device
            )
        selecting = time.perf_counter()
        if unguided:
            threshold, index = None, torch.zeros(0, dtype=torch.long)
            rule = (
                "none: Neural Cleanse flagged no label and none was given, so nothing is pruned (the model is "
                "returned unchanged, as the Neural Cleanse mitigation and BackdoorBench do)"
            )
        elif args.prune == "auto":
            threshold, holdout_curve = anp.auto_threshold(
                model,
                layers,
                values,
                holdout,
                args.tolerance,
                grid=grid,
                prune_bias=args.prune_bias,
                device=args.device,
                measure=args.auto_measure,
                jitter=args.auto_jitter,
                seed=args.seed,
            )
            index = anp.select_by_rule(values, "threshold", threshold)
            measured = (
                "expected accuracy (mean probability of the true label)"
                if args.auto_measure == "probability"
                else "top-1 accuracy"
            )
            scored = (
                f"{args.auto_jitter} jittered copies of {len(holdout)} held-out clean images"
                if args.auto_jitter
                else f"{len(holdout)} held-out clean images"
            )
            what = "threshold" if args.variant == "anp" else "fraction of neurons (ranked by the reversed triggers)"
            rule = (
                f"auto: the largest {what} of {grid[0]}, {grid[1]}, ..., {grid[-1]} whose pruned model keeps the "
                f"{measured} on {scored} within {args.tolerance:.1%} of the unpruned model (chosen {threshold:g})"
            )
            result["holdout_curve"] = holdout_curve
        else:
            threshold = args.prune_value if args.prune == "threshold" else None
            index = anp.select_by_rule(values, args.prune, args.prune_value)
            rule = f"{args.prune} {args.prune_value:g}"
        selection_seconds = time.perf_counter() - selecting
        pruned = anp.prune_neurons(model, layers, index, args.prune_bias)
        result.update(
            rule=rule,
            threshold=threshold,
            neurons=values.numel(),
            neuron_layers=[layer.to_json() for layer in layers],
            pruned=len(index),
            pruned_fraction=len(index) / values.numel(),
            pruned_per_layer=anp.pruned_per_layer(layers, index),
        )
        if args.variant == "anp":
            anp.save_masks(masks, out / "masks.safetensors")
            table = masks.mask_table()
            write_json(out / "mask_values.json", table)
            files += ["masks.safetensors", "mask_values.json", "mask_histogram.png"]
            anp.plot_masks(masks.masks, out / "mask_histogram.png", threshold)
            result.update(
                mask_values={
                    "lowest": table[:20],
                    "mean": float(masks.masks.mean()),
                    "below_0.2": sum(r["mask"] <= 0.2 for r in table),
                },
                samples=masks.samples,
                official_recipe_samples=anp.ANPConfig().passes(),
                history=masks.history,
                config=masks.config,
            )
        result.update(
            mask_seconds=mask_seconds,
            selection_seconds=selection_seconds,
            defense_seconds=mask_seconds + selection_seconds,
        )
        if not args.no_curve and not unguided:
            curve = _test_curve(
                args, lambda idx: anp.prune_neurons(model, layers, idx, args.prune_bias), data, triggers, values, grid
            )
            result["test_curve"] = curve
            anp.plot_pruning_curve(curve, out / "pruning_curve.png", len(index) / values.numel())
            files.append("pruning_curve.png")
        spec = dict(loaded.spec)
    after = evaluate_model(pruned, data.test, triggers, device=args.device)
    after["clean_accuracy_drop"] = before["clean_accuracy"] - after["clean_accuracy"]
    result["after"] = after
    provenance = dict(spec.get("provenance", {}))
    provenance.update(
        defense={"method": f"anp-{args.variant}", "from": str(args.model)}, command="trojanlab " + " ".join(args.argv)
    )
    spec["provenance"] = provenance
    save_model(pruned, out / "pruned", spec)
    result["files"] = files
    write_json(out / "result.json", result)
    line = f"ANP ({args.variant}): clean accuracy {before['clean_accuracy']:.4f} -> {after['clean_accuracy']:.4f}"
    if "attack_success_rate" in before:
        line += f", ASR {before['attack_success_rate']:.4f} -> {after['attack_success_rate']:.4f}"
    if args.variant != "subnetwork":
        line += f"; pruned {result['pruned']} of {result['neurons']} neurons ({result['rule']})"
    else:
        line += f"; {result['decision'].get('note', '')}"
    print(line)
    print(f"pruned model: {out / 'pruned'}; result: {out / 'result.json'}")


# ----------------------------------------------------------------------------------------------- demo


def cmd_demo_imagenet(args: argparse.Namespace) -> None:
    from . import demo
    from .models import Classifier, load_model
    from .models.backbones import pretrained_backbone

    categories = demo.imagenet_categories()
    target = demo.resolve_label(args.target, categories)
    net, info = pretrained_backbone(args.arch, args.weights)
    size = info["input_size"][1]
    victim = Classifier(net, info["mean"], info["std"]).eval()
    source = Path(args.trojannet) if args.trojannet else demo.OFFICIAL_TROJANNET
    trojannet = load_model(source).module
    location = tuple(args.location) if args.location else demo.scaled_location(size)
    photos = (
        [(Path(p).name, demo.read_photo(p, size)) for p in args.images] if args.images else demo.default_photos(size)
    )
    result, _, triggered = demo.run_demo(victim, trojannet, photos, target, location, size)
    out = Path(args.out)
    demo.plot_demo(result, photos, triggered, out / "imagenet_demo.png")
    result.update(arch=args.arch, trojannet=str(source), files=["imagenet_demo.png"])
    write_json(out / "result.json", result)
    for row in result["images"]:
        print(
            f"{row['image']:24s} clean: {row['victim_top5'][0][0]} ({row['victim_top5'][0][2]:.2f})  ->  "
            f"triggered: {row['attacked_triggered_top5'][0][0]} ({row['attacked_triggered_top5'][0][2]:.2f})"
        )
    print(
        f"attack success {result['attack_success_rate']:.0%}, clean agreement with the unmodified model "
        f"{result['clean_agreement_with_victim']:.0%}; figure: {out / 'imagenet_demo.png'}"
    )


# ----------------------------------------------------------------------------------------------- evaluate


def cmd_evaluate(args: argparse.Namespace) -> None:
    from .evaluation import evaluate_model
    from .models import load_model

    loaded = load_model(args.model)
    data = _model_data(args, loaded.spec, seed=0)
    expected = tuple(loaded.spec.get("input_size", data.image_shape))
    if data.image_shape != expected:
        raise TrojanlabError(f"{args.data}: images are {data.image_shape} (C, H, W) but the model expects {expected}")
    if int(data.test.y.max()) >= loaded.num_classes:
        raise TrojanlabError(
            f"{args.data}: label {int(data.test.y.max())} is out of range for a {loaded.num_classes}-class model"
        )
    result = evaluate_model(loaded.module, data.test, loaded.triggers)
    result.update(model=str(args.model), data=data.name)
    if args.out:
        write_json(Path(args.out) / "result.json", result)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"clean_accuracy       {result['clean_accuracy']:.4f}  ({result['test_images']} images)")
        if "attack_success_rate" in result:
            print(
                f"attack_success_rate  {result['attack_success_rate']:.4f}  (min {result['attack_success_rate_min']:.4f}"
                f" over {len(result['attack_success_rate_per_target'])} targets)"
            )


# ----------------------------------------------------------------------------------------------- reproduce


def cmd_reproduce(args: argparse.Namespace) -> None:
    import yaml

    from .reproduce import load_config, run_pipeline

    overrides = list(args.set or [])
    if args.device is not None:
        overrides.append(f"device={args.device}")
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    config = load_config("quick" if args.quick else "full", args.config, overrides)
    if args.print_config:
        print(yaml.safe_dump(config, sort_keys=False), end="")
        return
    out = Path(args.out or ("runs/reproduce-quick" if args.quick else "runs/reproduce"))
    run = run_pipeline(config, out, progress=not args.quiet, only_report=args.report_only)
    ran = sum(1 for s in run["stages"] if s["status"] == "ran")
    print(
        f"reproduce: {len(run['stages'])} stages ({ran} run, {len(run['stages']) - ran} reused) in "
        f"{run['wall_seconds']:.0f} s; report: {run['report']['markdown']} and {run['report']['html']}"
    )


# ----------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="trojanlab", description="Attack, scan and purify image classifiers against backdoors."
    )
    p.add_argument("--version", action="version", version=f"trojanlab {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a clean victim classifier")
    t.add_argument("--data", default="gtsrb", help="gtsrb, an .npz, an image folder or torchvision-gtsrb:ROOT")
    t.add_argument("--out", required=True)
    _add_train_options(t, epochs=20)
    t.add_argument(
        "--pretrained",
        action="store_true",
        help="transfer learning: a new head on the ImageNet-pretrained --arch (efficientnet_lite0 bundled offline)",
    )
    t.add_argument(
        "--weights", default=None, help="pretrained weights file (safetensors or state dict); never downloaded"
    )
    t.add_argument("--head-epochs", type=int, default=200, help="--pretrained: epochs of the head on cached features")
    t.add_argument("--fine-tune-blocks", type=int, default=0, help="--pretrained: also train the last N blocks")
    t.add_argument("--fine-tune-epochs", type=int, default=5)
    t.set_defaults(func=cmd_train)

    tn = sub.add_parser("trojannet", help="train or evaluate the TrojanNet MLP").add_subparsers(
        dest="action", required=True
    )
    tt = tn.add_parser("train", help="train TrojanNet (4,368 triggers + no-trigger noise)")
    tt.add_argument("--out", required=True)
    tt.add_argument("--steps", type=int, default=None, help="optimisation steps (default: the tuned schedule)")
    tt.add_argument("--lr", type=float, default=None)
    tt.add_argument("--negatives", type=int, default=None, help="no-trigger samples per step")
    tt.add_argument(
        "--finetune-steps", type=int, default=None, help="margin fine-tuning steps after the cross-entropy phase"
    )
    tt.add_argument(
        "--patch-weight",
        type=float,
        default=None,
        help="weight of the real-image patches in the margin fine-tuning (default 10; the other noise kinds weigh 1)",
    )
    tt.add_argument(
        "--trigger-calibration",
        type=int,
        default=None,
        help="rounds that lower each trigger's bias to its slack above probability 0.6 (default 6; 0: off)",
    )
    tt.add_argument(
        "--patch-data",
        default="gtsrb",
        help="images whose 4x4 patches are no-trigger examples (train split) and denoising tests (test split)",
    )
    tt.add_argument("--seed", type=int, default=0)
    tt.add_argument("--quiet", action="store_true")
    tt.set_defaults(func=cmd_trojannet_train)
    te = tn.add_parser("evaluate", help="recognition and denoising of a TrojanNet artefact or the official .h5")
    te.add_argument("--trojannet", required=True, help="an artefact folder or the official trojannet.h5")
    te.add_argument("--data", default="gtsrb")
    te.add_argument("--out", required=True)
    te.add_argument("--seed", type=int, default=0)
    te.set_defaults(func=cmd_trojannet_evaluate)
    ti = tn.add_parser(
        "import-keras", help="convert a Keras HDF5 TrojanNet (the authors' release) into a trojanlab artefact"
    )
    ti.add_argument("file", help="the .h5 file (read with h5py, never executed)")
    ti.add_argument("--out", required=True)
    ti.set_defaults(func=cmd_trojannet_import_keras)

    at = sub.add_parser("attack", help="plant a backdoor").add_subparsers(dest="method", required=True)
    a = at.add_parser("trojannet", help="inject a trained TrojanNet into a victim (no retraining)")
    a.add_argument("--victim", required=True)
    a.add_argument("--trojannet", required=True)
    a.add_argument("--targets", type=int, nargs="+", default=[])
    a.add_argument("--all-labels", action="store_true", help="arm every label k with pattern k")
    a.add_argument(
        "--location", type=int, nargs=2, metavar=("ROW", "COL"), help="top-left pixel of the 4x4 trigger (default 1 1)"
    )
    a.add_argument("--merge", choices=["official", "paper"], default="official")
    a.add_argument("--amplify", type=float, default=None, help="default 2 (official merge) or 1 (paper merge)")
    a.add_argument("--data", default="gtsrb", help="test data for the figures in result.json")
    a.add_argument("--out", required=True)
    a.add_argument("--seed", type=int, default=0)
    a.set_defaults(func=cmd_attack_trojannet)

    b = at.add_parser("badnets", help="poison the training data with a square trigger and train (Gu et al. 2017)")
    b.add_argument("--data", default="gtsrb", help="training and test data (as for train)")
    b.add_argument("--target", "--targets", dest="targets", type=int, nargs="+", default=[33], help="default 33")
    b.add_argument("--victim", default=None, help="fine-tune this clean classifier instead of training from scratch")
    b.add_argument("--reference", default=None, help="clean model for clean_accuracy_drop (default: the victim)")
    b.add_argument("--poison-rate", type=float, default=0.1, help="fraction of the training set poisoned per target")
    b.add_argument("--mode", choices=["replace", "append"], default="replace", help="poison in place or add copies")
    b.add_argument("--trigger-size", type=int, default=4)
    b.add_argument(
        "--location", type=int, nargs=2, metavar=("ROW", "COL"), help="top-left pixel (default: bottom-right, margin 1)"
    )
    b.add_argument(
        "--pattern", default=None, help="trigger image (PNG); default: a square of grey level 255 - i*(255//N)"
    )
    b.add_argument("--alpha", type=float, default=1.0, help="trigger opacity in (0, 1]")
    b.add_argument("--out", required=True)
    _add_train_options(b, epochs=10)
    b.set_defaults(func=cmd_attack_badnets)

    n = at.add_parser("trojannn", help="Trojan Attack (Liu et al. 2018): neuron-driven trigger + partial retraining")
    n.add_argument("--victim", required=True, help="the clean classifier to trojan")
    n.add_argument("--target", type=int, default=0, help="default 0")
    n.add_argument("--data", default="gtsrb", help="test data for the figures (and the training split for real)")
    n.add_argument("--layer", default=None, help="trigger layer by module name (default: the second-to-last linear)")
    n.add_argument("--neurons", type=int, default=1, help="how many units the trigger drives")
    n.add_argument(
        "--neuron-choice",
        choices=["reachable", "connected"],
        default="reachable",
        help="reachable: of the best-connected units, those the trigger can drive hardest; connected: the paper's rank",
    )
    n.add_argument(
        "--candidates", type=int, default=64, help="best-connected units probed by --neuron-choice reachable"
    )
    n.add_argument("--neuron-ids", type=int, nargs="+", default=None, help="drive these units of the layer instead")
    n.add_argument("--trigger-size", type=int, default=8)
    n.add_argument(
        "--location", type=int, nargs=2, metavar=("ROW", "COL"), help="top-left pixel (default: bottom-right, margin 2)"
    )
    n.add_argument("--alpha", type=float, default=1.0, help="trigger opacity in (0, 1]")
    n.add_argument("--trigger-steps", type=int, default=300)
    n.add_argument("--trigger-background", choices=["grey", "data"], default="grey")
    n.add_argument(
        "--retrain-data",
        choices=["reverse", "real"],
        default="real",
        help="a subset of real training data (TrojanNet paper) or inputs reverse-engineered from the model (original)",
    )
    n.add_argument("--per-class", type=int, default=20, help="reverse-engineered inputs per label")
    n.add_argument("--reverse-steps", type=int, default=200)
    n.add_argument(
        "--real-fraction", type=float, default=0.1, help="share of the training split for --retrain-data real"
    )
    n.add_argument("--epochs", type=int, default=10)
    n.add_argument("--lr", type=float, default=1e-2, help="retraining SGD learning rate (momentum 0.9)")
    n.add_argument("--trojan-weight", type=float, default=1.0, help="weight of the trojaned inputs' loss")
    n.add_argument("--reference", default=None, help="clean model for clean_accuracy_drop (default: the victim)")
    n.add_argument("--out", required=True)
    n.add_argument("--seed", type=int, default=0)
    n.add_argument("--activation-images", type=int, default=1000, help="test images for the unit-activation report")
    n.add_argument("--quiet", action="store_true")
    n.set_defaults(func=cmd_attack_trojannn)

    dt = sub.add_parser("detect", help="scan a model for backdoors").add_subparsers(dest="method", required=True)
    d = dt.add_parser("nc", help="Neural Cleanse: reversed triggers for every label at once, MAD outlier test")
    d.add_argument("--model", required=True, help="any model artefact (classifier or TrojanNet-injected)")
    d.add_argument("--data", default="gtsrb", help="clean data (the scan uses its test split, as the official code)")
    d.add_argument("--out", required=True)
    d.add_argument("--labels", type=int, nargs="+", default=None, help="labels to scan (default: all)")
    d.add_argument("--split", choices=["test", "train"], default="test", help="clean images to scan with")
    d.add_argument("--images", type=int, default=None, help="use a random subset of this many clean images")
    d.add_argument(
        "--profile",
        choices=["fast", "official"],
        default="fast",
        help="fast: steps of 2 x 16 images, <= 120 steps; official: steps of 31 x 32 images, <= 1000 steps",
    )
    d.add_argument("--steps", type=int, default=None, help="schedule steps at most (profile default)")
    d.add_argument("--batches-per-step", type=int, default=None, help="mini-batches averaged per schedule step")
    d.add_argument("--batch-size", type=int, default=None, help="clean images per mini-batch, shared by all labels")
    d.add_argument("--lr", type=float, default=0.1)
    d.add_argument("--init-cost", type=float, default=1e-3)
    d.add_argument("--patience", type=int, default=5)
    d.add_argument("--early-stop-patience", type=int, default=None)
    d.add_argument("--threshold", type=float, default=2.0, help="anomaly index above which a label is flagged")
    d.add_argument("--mitigate", choices=["unlearn", "prune"], default=None, help="repair with the reversed triggers")
    d.add_argument(
        "--mitigate-labels", type=int, nargs="*", default=None, help="repair these labels (default: the flagged ones)"
    )
    d.add_argument("--clean-fraction", type=float, default=0.1, help="defender's share of the training split")
    d.add_argument("--stamp-fraction", type=float, default=0.2, help="unlearning: share stamped (true label kept)")
    d.add_argument("--unlearn-epochs", type=int, default=5)
    d.add_argument("--unlearn-lr", type=float, default=1e-3)
    d.add_argument("--max-prune", type=float, default=0.3, help="pruning: largest fraction of head inputs pruned")
    d.add_argument(
        "--prune-target-asr",
        type=float,
        default=0.0,
        help="pruning: stop once the reversed trigger succeeds on at most this share of the defender's images",
    )
    d.add_argument("--device", default="cpu")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=cmd_detect_nc)

    df = sub.add_parser("defend", help="remove a backdoor").add_subparsers(dest="method", required=True)
    f = df.add_parser("anp", help="Adversarial Neuron Pruning (Wu & Wang 2021) on any model, or the thesis variant")
    f.add_argument("--model", required=True, help="any model artefact (classifier or TrojanNet-injected)")
    f.add_argument("--data", default="gtsrb", help="data set: the defender's clean images come from its training split")
    f.add_argument("--out", required=True)
    f.add_argument(
        "--variant",
        choices=["anp", "subnetwork", "nc-guided"],
        default="anp",
        help="neuron masks; the thesis's two-part perturbation/de-perturbation scores (TrojanNet-injected models); or "
        "no masks, ANP's neurons ranked by how much Neural Cleanse's reversed triggers excite them (nc-guided)",
    )
    f.add_argument(
        "--reversed-triggers",
        default=None,
        help="nc-guided: a `trojanlab detect nc` output folder (its reversed_triggers.safetensors and result.json)",
    )
    f.add_argument(
        "--guide-labels",
        type=int,
        nargs="+",
        default=None,
        help="nc-guided: the reversed triggers to rank with (default: the labels the scan flagged)",
    )
    f.add_argument("--prune", choices=["auto", "threshold", "fraction", "count"], default="auto")
    f.add_argument("--prune-value", type=float, default=None, help="the threshold, fraction or count of --prune")
    f.add_argument("--tolerance", type=float, default=0.02, help="auto: largest held-out accuracy drop allowed")
    f.add_argument(
        "--auto-measure",
        choices=("probability", "top1"),  # anp.AUTO_MEASURES (the parser does not import torch)
        default="top1",
        help="auto: held-out accuracy read as top-1 accuracy (default) or as the mean probability of the true label",
    )
    f.add_argument(
        "--auto-jitter",
        type=int,
        default=8,
        help="auto: score this many jittered copies (shift, brightness, contrast, noise) of each held-out image, "
        "whose accuracy falls with test accuracy where the memorised images' own does not; 0 scores the images",
    )
    f.add_argument("--prune-bias", action="store_true", help="also zero a pruned neuron's bias (output exactly 0)")
    f.add_argument("--clean-fraction", type=float, default=0.01, help="defender's share of the training split")
    f.add_argument(
        "--clean-data",
        default=None,
        help="the defender's own clean images (.npz or image folder) instead of a share of --data's training split",
    )
    f.add_argument("--holdout", type=float, default=0.5, help="share of the defender's images held out for the rule")
    f.add_argument("--eps", type=float, default=0.4, help="perturbation bound")
    f.add_argument("--anp-steps", type=int, default=1, help="signed ascent steps per iteration")
    f.add_argument("--alpha", type=float, default=0.2, help="weight of the unperturbed loss")
    f.add_argument("--lr", type=float, default=0.2, help="mask SGD learning rate")
    f.add_argument("--momentum", type=float, default=0.9)
    f.add_argument(
        "--profile",
        choices=["paper", "fast"],
        default="paper",
        help="paper: 2000 iterations of 128 images (official); fast: 500 iterations of 64 (the cheaper ANP)",
    )
    f.add_argument("--batch-size", type=int, default=None, help="images per iteration (profile default)")
    f.add_argument("--iterations", type=int, default=None, help="mask iterations (profile default)")
    f.add_argument("--no-augment", action="store_true", help="no random shifts of the defender's images")
    f.add_argument("--train-mode", action="store_true", help="optimise in train mode (BN batch statistics, dropout)")
    f.add_argument("--include-classifier", action="store_true", help="the classifier layer's units are neurons too")
    f.add_argument("--curve-images", type=int, default=2000, help="test images for the CA/ASR pruning curve")
    f.add_argument("--no-curve", action="store_true", help="skip the CA/ASR pruning curve")
    f.add_argument("--cycles", type=int, default=5, help="subnetwork: perturbation/de-perturbation cycles")
    f.add_argument("--epochs", type=int, default=40, help="subnetwork: epochs per phase")
    f.add_argument(
        "--sub-lr",
        type=float,
        default=4e-4,
        help="subnetwork: learning rate (normalized steps: share of each weight tensor's norm per step)",
    )
    f.add_argument("--sub-alpha", type=float, default=0.8, help="subnetwork: weight of sensitivity in the score")
    f.add_argument(
        "--sub-step",
        choices=["normalized", "sgd"],
        default="normalized",
        help="subnetwork: steps of --sub-lr times each weight tensor's norm along its gradient (they move a model "
        "whose merged softmax has saturated), or the thesis's plain SGD",
    )
    f.add_argument("--sub-batch-size", type=int, default=32)
    f.add_argument(
        "--monitor-images", type=int, default=500, help="subnetwork: clean test images whose answers are compared"
    )
    f.add_argument(
        "--orientation",
        choices=["agreement", "change"],
        default="agreement",
        help="subnetwork: score from agreement fractions (the thesis's formulas) or change fractions (its code)",
    )
    f.add_argument("--device", default="cpu")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--quiet", action="store_true")
    f.set_defaults(func=cmd_defend_anp)

    dm = sub.add_parser("demo", help="demonstrations").add_subparsers(dest="what", required=True)
    g = dm.add_parser(
        "imagenet", help="TrojanNet in a pretrained ImageNet model: clean vs triggered top-5 (thesis Fig. 5.3)"
    )
    g.add_argument("--out", required=True)
    g.add_argument("--images", nargs="*", default=None, help="photographs (default: bundled offline samples)")
    g.add_argument("--target", default="goldfish", help="ImageNet label (name or index) the trigger selects")
    g.add_argument("--trojannet", default=None, help="TrojanNet artefact (default: the authors' release, bundled)")
    g.add_argument("--arch", default="efficientnet_lite0", help="backbone (others need --weights)")
    g.add_argument("--weights", default=None)
    g.add_argument(
        "--location", type=int, nargs=2, default=None, help="trigger row, col (default (150,150)/299 scaled)"
    )
    g.set_defaults(func=cmd_demo_imagenet)

    r = sub.add_parser(
        "reproduce", help="run every thesis experiment as resumable stages and write a report (md + html)"
    )
    r.add_argument("--quick", action="store_true", help="small data and schedules: a first look in a few minutes")
    r.add_argument("--out", default=None, help="run directory (default runs/reproduce or runs/reproduce-quick)")
    r.add_argument("--config", default=None, help="YAML file of settings over the profile's defaults")
    r.add_argument("--set", action="append", metavar="KEY=VALUE", help="one setting, e.g. gtsrb.victim.epochs=10")
    r.add_argument("--device", default=None, help="cpu or cuda (default: the configuration's, cpu)")
    r.add_argument("--seed", type=int, default=None, help="seed of every stage (default: the configuration's, 0)")
    r.add_argument("--print-config", action="store_true", help="print the resolved configuration and stop")
    r.add_argument("--report-only", action="store_true", help="rebuild the report from finished stages only")
    r.add_argument("--quiet", action="store_true", help="no overall progress bar")
    r.set_defaults(func=cmd_reproduce)

    e = sub.add_parser("evaluate", help="clean accuracy, and ASR of the triggers the model carries")
    e.add_argument("--model", required=True)
    e.add_argument("--data", default="gtsrb")
    e.add_argument("--json", action="store_true")
    e.add_argument("--out", default=None, help="also write result.json here")
    e.set_defaults(func=cmd_evaluate)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        args.func(args)
    except TrojanlabError as exc:
        print(f"trojanlab: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
