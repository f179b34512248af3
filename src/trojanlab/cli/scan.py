"""``trojanlab scan``: is this model backdoored? Every detector, one calibrated probability, the evidence."""

from __future__ import annotations

import argparse

from ..config.detection import ScanConfig
from .options import add_config, add_folder_options, add_model_source_options, config_from, folder_flags, model_source


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("scan", help="is this model backdoored? every detector, one calibrated probability")
    add_model_source_options(p)
    p.add_argument("--examples", help="the auditor's clean images: a folder with a sub-folder per class, an .npz, "
                   "or a data name (gtsrb); Neural Cleanse needs them")  # fmt: skip
    p.add_argument("--out", help="folder for scan.json, scan.html and the detectors' plots")
    p.add_argument("--result", help="write just the probability to this file (TrojAI's interface)")
    p.add_argument("--calibration", help="a calibration JSON (default: the one shipped with trojanlab)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default: cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice (default: 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_folder_options(p)
    add_config(p, ScanConfig, "scan")
    p.set_defaults(func=run_scan)


def run_scan(args: argparse.Namespace) -> None:
    from ..detection.run import scan

    cfg = config_from(args, ScanConfig, "scan", seed=args.seed)
    report = scan(model_source(args), cfg, examples=args.examples, out=args.out, result=args.result,
                  calibration=args.calibration, device=args.device, seed=args.seed, progress=not args.quiet,
                  **folder_flags(args))  # fmt: skip
    d = report.details
    seconds = ", ".join(f"{k} {v:.0f} s" for k, v in d["detector_seconds"].items())
    if d["probability"] is None:
        print(f"no calibration, so no probability; features: {d['features']} ({seconds})")
    else:
        verdict = "backdoored" if d["verdict"] else "clean"
        print(f"probability backdoored {d['probability']:.3f}: {verdict} at {d['threshold']:g}; suspected labels "
              f"{d['suspected_labels']} ({seconds})")  # fmt: skip
    if args.out:
        print(f"scan: {args.out}/scan.json, {args.out}/scan.html")
