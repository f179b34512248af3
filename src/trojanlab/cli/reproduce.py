"""``trojanlab reproduce``: every experiment of the thesis as resumable stages, and a report (md + html)."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    r = subparsers.add_parser("reproduce", help="run every thesis experiment as resumable stages and write a report")
    r.add_argument("--quick", action="store_true", help="small data and schedules: a first look in a few minutes")
    r.add_argument("--out", default=None, help="run directory (default runs/reproduce or runs/reproduce-quick)")
    r.add_argument("--config", default=None, help="YAML file of settings over the profile's defaults")
    r.add_argument("--set", action="append", metavar="KEY=VALUE", help="one setting, e.g. gtsrb.victim.epochs=10")
    r.add_argument("--device", default=None, help="cpu or cuda (default: the configuration's, cpu)")
    r.add_argument("--seed", type=int, default=None, help="seed of every stage (default: the configuration's, 0)")
    r.add_argument("--print-config", action="store_true", help="print the resolved configuration and stop")
    r.add_argument("--report-only", action="store_true", help="rebuild the report from finished stages only")
    r.add_argument("--executor", default="sequential", choices=("sequential", "ray"),
                   help="ray: stages whose inputs are finished run side by side as Ray tasks (1 CPU, 1 torch thread "
                   "each); default sequential: one after another with every thread")  # fmt: skip
    r.add_argument("--workers", type=int, default=None, help="Ray workers (default: the CPU count)")
    r.add_argument("--quiet", action="store_true", help="no overall progress bar")
    r.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    import yaml

    from ..errors import ConfigError
    from ..reproduce import load_config, run_pipeline

    overrides = list(args.set or [])
    if args.device is not None:
        overrides.append(f"device={args.device}")
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    config = load_config("quick" if args.quick else "full", args.config, overrides)
    if args.print_config:
        print(yaml.safe_dump(config, sort_keys=False), end="")
        return
    out = args.out or ("runs/reproduce-quick" if args.quick else "runs/reproduce")
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {args.workers}")
    run = run_pipeline(config, out, progress=not args.quiet, only_report=args.report_only, executor=args.executor,
                       workers=args.workers)  # fmt: skip
    ran = sum(1 for s in run["stages"] if s["status"] == "ran")
    print(f"reproduce: {len(run['stages'])} stages ({ran} run, {len(run['stages']) - ran} reused) in "
          f"{run['wall_seconds']:.0f} s; report: {run['report']['markdown']} and {run['report']['html']}")  # fmt: skip
