"""The ``trojanlab`` command line: one module per command group, each turning its options into configs and calling
the library. Every command writes ``result.json`` into its ``--out`` folder."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .. import __version__
from ..errors import Interrupted, TrojanlabError
from . import attack, defend, demo, detect, evaluate, reproduce, scan, train, trojannet, zoo

COMMANDS = (train, trojannet, attack, detect, scan, defend, evaluate, demo, reproduce, zoo)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trojanlab", description="Attack, scan and purify image classifiers against "
                                "backdoors.")  # fmt: skip
    p.add_argument("--version", action="version", version=f"trojanlab {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except Interrupted as exc:  # Ctrl-C, answered at a step boundary with a checkpoint
        print(f"trojanlab: {exc}", file=sys.stderr)
        return 130
    except TrojanlabError as exc:
        print(f"trojanlab: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside a checkpointed loop (or pressed twice)
        print(
            "trojanlab: interrupted; files already written are complete (each is written atomically)", file=sys.stderr
        )
        return 130
    return int(code or 0)
