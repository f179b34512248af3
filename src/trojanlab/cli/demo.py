"""``trojanlab demo imagenet``: TrojanNet in a pretrained ImageNet model, clean vs triggered top-5."""

from __future__ import annotations

import argparse

from .options import add_folder_options, folder_flags


def add_parser(subparsers) -> None:
    sub = subparsers.add_parser("demo", help="demonstrations").add_subparsers(dest="what", required=True)
    g = sub.add_parser("imagenet", help="TrojanNet in a pretrained ImageNet model: clean vs triggered top-5 "
                       "(thesis Fig. 5.3)")  # fmt: skip
    g.add_argument("--out", required=True)
    add_folder_options(g)
    g.add_argument("--images", nargs="*", default=None, help="photographs (default: bundled offline samples)")
    g.add_argument("--target", default="goldfish", help="ImageNet label (name or index) the trigger selects")
    g.add_argument("--trojannet", default=None, help="TrojanNet artefact (default: the authors' release, bundled)")
    g.add_argument("--arch", default="efficientnet_lite0", help="backbone (others need --weights)")
    g.add_argument("--weights", default=None)
    g.add_argument("--location", type=int, nargs=2, default=None,
                   help="trigger row, col (default (150,150)/299 scaled)")  # fmt: skip
    g.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from ..demo import imagenet_demo

    result = imagenet_demo(out=args.out, images=args.images, target=args.target, trojannet=args.trojannet,
                           arch=args.arch, weights=args.weights, location=args.location,
                           **folder_flags(args))  # fmt: skip
    for row in result["images"]:
        print(
            f"{row['image']:24s} clean: {row['victim_top5'][0][0]} ({row['victim_top5'][0][2]:.2f})  ->  "
            f"triggered: {row['attacked_triggered_top5'][0][0]} ({row['attacked_triggered_top5'][0][2]:.2f})"
        )
    print(f"attack success {result['attack_success_rate']:.0%}, clean agreement with the unmodified model "
          f"{result['clean_agreement_with_victim']:.0%}; figure: {args.out}/imagenet_demo.png")  # fmt: skip
