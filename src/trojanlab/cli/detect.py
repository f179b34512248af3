"""``trojanlab detect nc|mmbd|structure|mntd``: scan a model for backdoors (detection only; ``trojanlab defend nc-unlearn|nc-prune``
repair with the scan's reversed triggers)."""

from __future__ import annotations

import argparse

from ..config.detection import MMBDConfig, MNTDScoreConfig, NCConfig, StructureConfig
from .options import add_config, add_model_source_options, add_run_options, config_from, folder_flags, model_source


def add_parser(subparsers) -> None:
    sub = subparsers.add_parser("detect", help="scan a model for backdoors").add_subparsers(
        dest="method", required=True
    )
    d = sub.add_parser("nc", help="Neural Cleanse: reversed triggers for every label at once, MAD outlier test")
    d.add_argument("--model", required=True, help="any model artefact (classifier or TrojanNet-injected)")
    add_run_options(d)
    add_config(d, NCConfig, "nc")
    d.set_defaults(func=run_nc)
    d = sub.add_parser("mmbd", help="MM-BD: the maximum achievable margin of every label, no data needed")
    add_model_source_options(d)
    add_run_options(d, data=None)
    add_config(d, MMBDConfig, "mmbd")
    d.set_defaults(func=run_mmbd)
    d = sub.add_parser("structure", help="the graph: a branch reading a small input window merged into the output")
    add_model_source_options(d)
    add_run_options(d, data=None, device=False)
    add_config(d, StructureConfig, "structure")
    d.set_defaults(func=run_structure)
    d = sub.add_parser(
        "mntd", help="MNTD: a meta-classifier fitted on the zoo reads the model's answers to tuned queries"
    )
    add_model_source_options(d)
    add_run_options(d, data=None)
    add_config(d, MNTDScoreConfig, "mntd")
    d.set_defaults(func=run_mntd)


def run_nc(args: argparse.Namespace) -> None:
    from ..detection.run import neural_cleanse

    cfg = config_from(args, NCConfig, "nc", seed=args.seed)
    report = neural_cleanse(args.model, cfg, data=args.data, out=args.out, device=args.device, seed=args.seed,
                            progress=not args.quiet, **folder_flags(args))  # fmt: skip
    d = report.details
    norms = sorted(((int(k), v) for k, v in d["l1_norms"].items()), key=lambda item: item[1])
    print(f"scanned {len(norms)} labels in {report.seconds:.0f} s ({d['samples']:,} images); smallest L1 norms: "
          + ", ".join(f"{label}: {norm:.1f}" for label, norm in norms[:5]))  # fmt: skip
    if report.anomaly_index is not None:
        print(f"anomaly index {report.anomaly_index:.3f} (median {d['median']:.1f}, MAD {d['mad']:.1f}); "
              f"flagged: {report.flagged_labels or 'none'}")  # fmt: skip
    print(f"result: {args.out}/result.json")


def run_mmbd(args: argparse.Namespace) -> None:
    from ..detection.run import mmbd

    cfg = config_from(args, MMBDConfig, "mmbd", seed=args.seed)
    report = mmbd(model_source(args), cfg, out=args.out, device=args.device, seed=args.seed, progress=not args.quiet,
                  **folder_flags(args))  # fmt: skip
    d = report.details
    top = sorted(((int(k), v) for k, v in d["max_margins"].items()), key=lambda item: -item[1])
    print(f"scanned {len(top)} labels in {report.seconds:.0f} s ({d['images']:,} images, no data); largest margins: "
          + ", ".join(f"{label}: {value:.1f}" for label, value in top[:5]))  # fmt: skip
    verdict = f"flagged label {d['suspected_label']}" if report.infected else "nothing flagged"
    print(f"p-value {d['p_value']:.3g} against {d['threshold']:g}: {verdict}")
    print(f"result: {args.out}/result.json")


def run_structure(args: argparse.Namespace) -> None:
    from ..detection.run import structure

    cfg = config_from(args, StructureConfig, "structure")
    report = structure(model_source(args), cfg, out=args.out, seed=args.seed, **folder_flags(args))
    d = report.details
    print(f"{d['operations']} operations read ({d['source']}); "
          + (d["evidence"] if report.infected else "no branch reads a small window of the input on its own"))  # fmt: skip
    print(f"result: {args.out}/result.json")


def run_mntd(args: argparse.Namespace) -> None:
    from ..detection.run import mntd

    cfg = config_from(args, MNTDScoreConfig, "mntd")
    report = mntd(model_source(args), cfg, out=args.out, device=args.device, seed=args.seed, progress=not args.quiet,
                  **folder_flags(args))  # fmt: skip
    d = report.details
    print(f"meta-classifier score {d['score']:.3f} ({d['queries']} queries): "
          + ("flagged (above 0)" if report.infected else "not flagged (0 or below)"))  # fmt: skip
    print(f"result: {args.out}/result.json")
