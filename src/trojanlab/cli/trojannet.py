"""``trojanlab trojannet {train, evaluate, import-keras}``: the TrojanNet MLP itself."""

from __future__ import annotations

import argparse

from ..config.attacks import TrojanNetTrainConfig
from .options import add_config, add_folder_options, config_from, folder_flags
from .show import print_json


def add_parser(subparsers) -> None:
    group = subparsers.add_parser("trojannet", help="train or evaluate the TrojanNet MLP")
    sub = group.add_subparsers(dest="action", required=True)
    t = sub.add_parser("train", help="train TrojanNet (4,368 triggers + no-trigger noise)")
    t.add_argument("--out", required=True)
    add_folder_options(t)
    add_config(t, TrojanNetTrainConfig, "trojannet")
    weight = TrojanNetTrainConfig().finetune_weights.get("image_patches", 1.0)
    t.add_argument("--patch-weight", type=float, default=weight,
                   help=f"weight of the real-image patches in the margin fine-tuning; the other no-trigger kinds "
                   f"weigh 1 (default: {weight:g})")  # fmt: skip
    t.add_argument("--patch-data", default="gtsrb",
                   help="images whose 4x4 patches are no-trigger examples (train split) and denoising tests (test "
                   "split) (default: gtsrb)")  # fmt: skip
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=run_train)
    e = sub.add_parser("evaluate", help="recognition and denoising of a TrojanNet artefact or the official .h5")
    e.add_argument("--trojannet", required=True, help="an artefact folder or the official trojannet.h5")
    e.add_argument("--data", default="gtsrb")
    e.add_argument("--out", required=True)
    add_folder_options(e)
    e.add_argument("--seed", type=int, default=0)
    e.set_defaults(func=run_evaluate)
    i = sub.add_parser("import-keras", help="convert a Keras HDF5 TrojanNet (the authors' release) into an artefact")
    i.add_argument("file", help="the .h5 file (read with h5py, never executed)")
    i.add_argument("--out", required=True)
    add_folder_options(i)
    i.set_defaults(func=run_import)


def run_train(args: argparse.Namespace) -> None:
    from ..attacks.run import train_trojannet

    weights = dict(TrojanNetTrainConfig().finetune_weights, image_patches=args.patch_weight)
    cfg = config_from(args, TrojanNetTrainConfig, "trojannet", seed=args.seed, finetune_weights=weights)
    print_json(
        train_trojannet(
            cfg, patch_data=args.patch_data, out=args.out, seed=args.seed, progress=not args.quiet, **folder_flags(args)
        )
    )


def run_evaluate(args: argparse.Namespace) -> None:
    from ..attacks.run import evaluate_trojannet

    print_json(evaluate_trojannet(args.trojannet, data=args.data, out=args.out, seed=args.seed, **folder_flags(args)))


def run_import(args: argparse.Namespace) -> None:
    from ..attacks.run import import_keras

    print_json(import_keras(args.file, out=args.out, **folder_flags(args)))
