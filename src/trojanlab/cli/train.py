"""``trojanlab train``: a clean victim, from scratch or (``--pretrained``) on an ImageNet backbone."""

from __future__ import annotations

import argparse

from ..config.training import ModelConfig, TrainConfig, TransferConfig
from .options import add_config, add_run_options, config_from
from .show import print_json


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a clean victim classifier")
    add_run_options(p)
    add_config(p, ModelConfig, "model")
    add_config(p, TrainConfig, "train")
    p.add_argument("--pretrained", action="store_true",
                   help="transfer learning: a new head on the ImageNet-pretrained --arch (efficientnet_lite0 bundled "
                   "offline); the --head-* and --fine-tune-* options apply")  # fmt: skip
    add_config(p, TransferConfig, "transfer")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from ..victims import train_transfer, train_victim

    model = config_from(args, ModelConfig, "model")
    progress = not args.quiet
    if args.pretrained:
        transfer = config_from(args, TransferConfig, "transfer", seed=args.seed)
        report = train_transfer(model, transfer, data=args.data, out=args.out, device=args.device, seed=args.seed,
                                progress=progress)  # fmt: skip
    else:
        train = config_from(args, TrainConfig, "train", seed=args.seed)
        report = train_victim(model, train, data=args.data, out=args.out, device=args.device, seed=args.seed,
                              progress=progress)  # fmt: skip
    print_json(report)
