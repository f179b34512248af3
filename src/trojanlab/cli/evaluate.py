"""``trojanlab evaluate``: clean accuracy, and the ASR of the triggers a model carries."""

from __future__ import annotations

import argparse
import json

from .options import add_folder_options, folder_flags


def add_parser(subparsers) -> None:
    e = subparsers.add_parser("evaluate", help="clean accuracy, and ASR of the triggers the model carries")
    e.add_argument("--model", required=True)
    e.add_argument("--data", default="gtsrb")
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    e.add_argument("--out", default=None, help="also write result.json here")
    e.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default: cpu)")
    add_folder_options(e)
    e.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from ..evaluation.run import evaluate

    result = evaluate(args.model, data=args.data, out=args.out, device=args.device, **folder_flags(args))
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"clean_accuracy       {result['clean_accuracy']:.4f}  ({result['test_images']} images)")
    if "attack_success_rate" in result:
        print(f"attack_success_rate  {result['attack_success_rate']:.4f}  (min {result['attack_success_rate_min']:.4f}"
              f" over {len(result['attack_success_rate_per_target'])} targets)")  # fmt: skip
