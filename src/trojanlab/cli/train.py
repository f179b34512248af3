"""``trojanlab train``: a clean victim, from scratch or (``--pretrained``) on an ImageNet backbone."""

from __future__ import annotations

import argparse

from ..config.training import ModelConfig, TrainConfig, TransferConfig
from ..errors import ConfigError
from .options import add_config, add_run_options, config_from, folder_flags, unused_options
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
    transfer = config_from(args, TransferConfig, "transfer", seed=args.seed)
    train = config_from(args, TrainConfig, "train", seed=args.seed)
    unused = unused_options(args, TrainConfig if args.pretrained else TransferConfig,
                            "train" if args.pretrained else "transfer")  # fmt: skip
    if unused:
        raise ConfigError(f"{', '.join(unused)} {'do' if len(unused) > 1 else 'does'} nothing "
                          f"{'with' if args.pretrained else 'without'} --pretrained")  # fmt: skip
    if args.pretrained:
        report = train_transfer(model, transfer, data=args.data, out=args.out, device=args.device, seed=args.seed,
                                progress=progress, **folder_flags(args))  # fmt: skip
    else:
        report = train_victim(model, train, data=args.data, out=args.out, device=args.device, seed=args.seed,
                              progress=progress, **folder_flags(args))  # fmt: skip
    print_json(report)
