"""``trojanlab attack {badnets, blended, wanet, trojannn, trojannet}``: plant a backdoor."""

from __future__ import annotations

import argparse

from ..config.attacks import (
    BADNETS_TRAINING,
    BadNetsConfig,
    BlendedConfig,
    TrojanNetInjectConfig,
    TrojanNNConfig,
    WaNetConfig,
)
from ..config.training import ModelConfig, TrainConfig
from .options import add_config, add_run_options, config_from, folder_flags
from .show import print_json

POISONING = {
    "badnets": ("poison the training data with a square trigger and train (Gu et al. 2017)", BadNetsConfig),
    "blended": (("poison the training data by blending whole images with a pattern at a low opacity (Chen et al. "
                 "2017), then train"), BlendedConfig),
    "wanet": (("poison the training data with a smooth warping field, noise mode included (Nguyen & Tran 2021), "
               "then train"), WaNetConfig),
}  # fmt: skip
"""The data-poisoning attacks: poison the training split, then train from scratch or fine-tune ``--victim`` (their
entry points are ``trojanlab.attacks.run.ATTACKS[name]``, options from their config class and BadNets' training)."""


def add_parser(subparsers) -> None:
    sub = subparsers.add_parser("attack", help="plant a backdoor").add_subparsers(dest="method", required=True)
    a = sub.add_parser("trojannet", help="inject a trained TrojanNet into a victim (no retraining)")
    a.add_argument("--victim", required=True, help="the clean classifier artefact")
    a.add_argument("--trojannet", required=True, help="a TrojanNet artefact (trojanlab trojannet train/import-keras)")
    add_run_options(a, device=False)
    add_config(a, TrojanNetInjectConfig, "inject")
    a.set_defaults(func=run_trojannet)

    for name, (text, cls) in POISONING.items():
        p = sub.add_parser(name, help=text)
        p.add_argument(
            "--victim", default=None, help="fine-tune this clean classifier instead of training from scratch"
        )
        p.add_argument("--reference", default=None, help="clean model for clean_accuracy_drop (default: the victim)")
        add_run_options(p)
        add_config(p, cls, name)
        add_config(p, ModelConfig, "model")
        add_config(p, TrainConfig, "train", defaults=BADNETS_TRAINING)
        p.set_defaults(func=run_poisoning, attack=name)

    n = sub.add_parser("trojannn", help="Trojan Attack (Liu et al. 2018): neuron-driven trigger + partial retraining")
    n.add_argument("--victim", required=True, help="the clean classifier to trojan")
    n.add_argument("--reference", default=None, help="clean model for clean_accuracy_drop (default: the victim)")
    add_run_options(n)
    add_config(n, TrojanNNConfig, "trojannn")
    n.set_defaults(func=run_trojannn)


def run_trojannet(args: argparse.Namespace) -> None:
    from ..attacks.run import trojannet

    cfg = config_from(args, TrojanNetInjectConfig, "inject", seed=args.seed)
    print_json(
        trojannet(args.victim, args.trojannet, cfg, data=args.data, out=args.out, seed=args.seed, **folder_flags(args))
    )


def run_poisoning(args: argparse.Namespace) -> None:
    from ..attacks.run import ATTACKS

    cls, entry = ATTACKS[args.attack]
    cfg = config_from(args, cls, args.attack, seed=args.seed)
    model = config_from(args, ModelConfig, "model")
    train = config_from(args, TrainConfig, "train", seed=args.seed)
    report = entry(cfg, train, model, data=args.data, victim=args.victim, reference=args.reference, out=args.out,
                   device=args.device, seed=args.seed, progress=not args.quiet, **folder_flags(args))  # fmt: skip
    print_json(report)


def run_trojannn(args: argparse.Namespace) -> None:
    from ..attacks.run import trojannn

    cfg = config_from(args, TrojanNNConfig, "trojannn", seed=args.seed)
    report = trojannn(args.victim, cfg, data=args.data, reference=args.reference, out=args.out, device=args.device,
                      seed=args.seed, progress=not args.quiet, **folder_flags(args))  # fmt: skip
    print_json(report)
