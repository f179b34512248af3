"""``trojanlab zoo build``: a population of clean and backdoored models from one YAML config."""

from __future__ import annotations

import argparse
import sys

from .options import add_folder_options, folder_flags


def add_parser(subparsers) -> None:
    sub = subparsers.add_parser("zoo", help="build a zoo of clean and backdoored models").add_subparsers(
        dest="zoo_command", required=True
    )
    b = sub.add_parser("build", help="build every member of a zoo (resumable: finished members are kept)")
    b.add_argument("--config", required=True, help="zoo YAML (keys of trojanlab.zoo.ZooConfig; see zoo.yaml)")
    b.add_argument("--out", required=True, help="zoo folder: members/<id>/, zoo.json, zoo.csv")
    b.add_argument("--executor", default="auto", choices=("auto", "sequential", "ray"),
                   help="ray: one task per member (1 CPU, 1 torch thread); sequential: one after another in this "
                   "process (default auto: ray when installed)")  # fmt: skip
    b.add_argument("--address", default=None, help="join this Ray cluster (default: start Ray on this machine)")
    b.add_argument("--workers", type=int, default=None, help="Ray workers on this machine (default: its CPU count)")
    b.add_argument("--members", nargs="+", default=None, metavar="ID",
                   help="build only these members (and the clean members they are planted into); a later call "
                   "without it completes the zoo")  # fmt: skip
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    add_folder_options(b)
    b.set_defaults(func=run_build)


def run_build(args: argparse.Namespace) -> int:
    from ..zoo import ZooConfig, build_zoo

    cfg = ZooConfig.from_yaml(args.config)
    report = build_zoo(cfg, out=args.out, executor=args.executor, address=args.address, workers=args.workers,
                       progress=not args.quiet, only=args.members, **folder_flags(args))  # fmt: skip
    details = report.details
    print(f"zoo: {details['members_total']} members ({details['reused']} kept, {details['built']} built, "
          f"{len(details['errors'])} errors) in {report.seconds:.0f} s; manifest {details['zoo']}/zoo.json")  # fmt: skip
    for member, error in details["errors"].items():
        print(f"  {member}: {error}")
    if details["errors"]:
        print("zoo: the same command builds the failed members again, keeping the others", file=sys.stderr)
        return 1
    return 0
