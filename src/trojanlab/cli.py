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


def cmd_train(args: argparse.Namespace) -> None:
    from .data import load_dataset
    from .evaluation import clean_accuracy
    from .models import build_classifier, classifier_spec, save_model
    from .training import TrainConfig, fit

    _seed_everything(args.seed)
    data = load_dataset(args.data, image_size=args.image_size, seed=args.seed)
    if data.train is None:
        raise TrojanlabError(f"{args.data}: has no training split (x_train/y_train) to train on")
    x = data.train.x.astype(np.float32) / 255.0
    mean = x.mean((0, 1, 2)).tolist() if args.normalize == "dataset" else [0.0] * x.shape[-1]
    std = x.std((0, 1, 2)).tolist() if args.normalize == "dataset" else [1.0] * x.shape[-1]
    del x
    spec = classifier_spec(args.arch, data.classes, data.image_shape, mean, std)
    model = build_classifier(spec)
    cfg = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        val_fraction=args.val_fraction,
        patience=args.patience,
        augment=not args.no_augment,
        seed=args.seed,
    )
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


# ----------------------------------------------------------------------------------------------- trojannet


def cmd_trojannet_train(args: argparse.Namespace) -> None:
    from tqdm.auto import tqdm

    from .attacks import trojannet as tn
    from .data import load_dataset
    from .models import save_model

    _seed_everything(args.seed)
    data = load_dataset(args.patch_data)
    patches_from = data.train if data.train is not None else data.test
    names = ("steps", "lr", "negatives", "finetune_steps")
    overrides = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
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
    from .data import load_dataset
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
    data = load_dataset(args.data)
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


# ----------------------------------------------------------------------------------------------- evaluate


def cmd_evaluate(args: argparse.Namespace) -> None:
    from .data import load_dataset
    from .evaluation import evaluate_model
    from .models import load_model

    loaded = load_model(args.model)
    data = load_dataset(args.data, image_size=loaded.spec.get("input_size", [3, 32])[1])
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


# ----------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="trojanlab", description="Attack, scan and purify image classifiers against backdoors."
    )
    p.add_argument("--version", action="version", version=f"trojanlab {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a clean victim classifier")
    t.add_argument("--data", default="gtsrb", help="gtsrb, an .npz, an image folder or torchvision-gtsrb:ROOT")
    t.add_argument("--arch", default="gtsrb_cnn", help="gtsrb_cnn or any torchvision classifier name")
    t.add_argument("--out", required=True)
    t.add_argument("--epochs", type=int, default=20)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--val-fraction", type=float, default=0.1)
    t.add_argument(
        "--patience", type=int, default=4, help="early stop after this many epochs without a better validation accuracy"
    )
    t.add_argument("--no-augment", action="store_true", help="no random 2-pixel shifts")
    t.add_argument("--normalize", choices=["dataset", "none"], default="dataset")
    t.add_argument("--image-size", type=int, default=None, help="resize image folders to this size (default 32)")
    t.add_argument("--device", default="cpu")
    t.add_argument("--seed", type=int, default=0)
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
