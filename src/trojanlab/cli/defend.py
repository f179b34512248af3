"""``trojanlab defend METHOD``: one sub-command per entry of the defense registry, its options built from the
method's config classes and the defender's clean-data settings."""

from __future__ import annotations

import argparse

from ..config.defenses import DefenderConfig
from .options import add_config, add_run_options, config_from, folder_flags
from .show import before_after


def add_parser(subparsers) -> None:
    from ..defenses.registry import DEFENSES

    sub = subparsers.add_parser("defend", help="remove a backdoor").add_subparsers(dest="method", required=True)
    for name, entry in DEFENSES.items():
        p = sub.add_parser(name, help=entry.help)
        p.add_argument("--model", required=True, help="any model artefact (classifier or TrojanNet-injected)")
        add_run_options(p)
        add_config(p, DefenderConfig, "defender", defaults=entry.defender)
        for cls in entry.configs:
            add_config(p, cls, cls.__name__)
        p.set_defaults(func=run, defense=name)


def run(args: argparse.Namespace) -> None:
    from ..defenses import DEFENSES, defend

    entry = DEFENSES[args.defense]
    configs = [config_from(args, cls, cls.__name__, seed=args.seed) for cls in entry.configs]
    defender = config_from(args, DefenderConfig, "defender")
    report = defend(args.defense, args.model, *configs, data=args.data, defender=defender, out=args.out,
                    device=args.device, seed=args.seed, progress=not args.quiet, **folder_flags(args))  # fmt: skip
    print(f"{args.defense}: {before_after(report)}; {report.changed}")
    print(f"repaired model: {args.out}/{report.output}; result: {args.out}/result.json")
