"""`trojanlab scan` on zoo members and on their ONNX exports, in one run: the same verdict from either file, and the
seconds a whole scan takes (the issue's budget: 2 minutes per 43-class GTSRB model on 2 CPU cores).

    python benchmarks/scan_onnx.py --zoo ZOO --out RUN [--members clean-000 trojannet-000 wanet-000] [--threads 2]

Each member's artefact is exported with ``torch.onnx.export`` (the TorchScript exporter, a dynamic batch axis) into
``RUN/<id>.onnx``; both files are scanned by the library's ``scan`` entry point with the shipped calibration and
the same clean examples as ``benchmarks/scan_zoo.py`` (5 test-split images per label). Run it alone: the seconds
are the budget's figure. Results: ``benchmarks/results/scan_onnx.{json,md}``.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch

from _runs import run_once
from scan_zoo import examples
from trojanlab.config.detection import ScanConfig
from trojanlab.detection.run import SHIPPED_CALIBRATION, scan
from trojanlab.io import read_json, write_json
from trojanlab.models import load_model
from trojanlab.runs import source_commit

RESULTS = Path(__file__).parent / "results"


def export(artefact: Path, path: Path) -> Path:
    """The artefact's module as ONNX (what an auditor may be handed instead)."""
    if not path.is_file():
        loaded = load_model(artefact)
        shape = tuple(int(v) for v in loaded.spec["input_size"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(loaded.module.eval(), (torch.rand(2, *shape),), str(path), dynamo=False,
                              input_names=["image"], output_names=["logits"],
                              dynamic_axes={"image": {0: "batch"}})  # fmt: skip
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--members", nargs="+", default=["clean-000", "trojannet-000", "wanet-000"])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the budget is for 2 cores)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not SHIPPED_CALIBRATION.is_file():
        raise SystemExit("no calibration ships yet: run benchmarks/scan_zoo.py --ship first")
    torch.set_num_threads(args.threads)
    manifest = read_json(args.zoo / "zoo.json")
    if manifest is None:
        raise SystemExit(f"{args.zoo}: no zoo.json")
    by_id = {m["id"]: m for m in manifest["members"]}
    unknown = [m for m in args.members if m not in by_id]
    if unknown:
        raise SystemExit(f"{args.zoo}: no members {unknown}")
    example_file = examples(manifest["config"]["data"], args.out, 5, args.seed)
    cfg = ScanConfig(seed=args.seed)
    rows, began = [], time.perf_counter()
    for member in args.members:
        m = by_id[member]
        artefact = args.zoo / m["path"]
        files = {"artefact": artefact, "onnx": export(artefact, args.out / f"{member}.onnx")}
        row = {"id": member, "family": m["family"], "status": m["status"], "target": m["target"]}
        for kind, path in files.items():
            t0 = time.perf_counter()
            result = run_once(args.out / f"{member}-{kind}", scan, str(path), cfg, examples=str(example_file),
                              seed=args.seed, progress=False)  # fmt: skip
            row[kind] = {"probability": result["probability"], "verdict": result["verdict"],
                         "suspected_labels": result["suspected_labels"], "features": result["features"],
                         "detector_seconds": result["detector_seconds"],
                         "seconds": round(sum(result["detector_seconds"].values()), 1),
                         "call_seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
        row["same_verdict"] = row["artefact"]["verdict"] == row["onnx"]["verdict"]
        rows.append(row)
        print(row, flush=True)
    record = {"commit": source_commit(), "threads": args.threads, "scan_config": cfg.__dict__,
              "wall_seconds": round(time.perf_counter() - began, 1), "rows": rows}  # fmt: skip
    write_json(RESULTS / "scan_onnx.json", record)
    lines = [(f"`python benchmarks/scan_onnx.py --zoo {args.zoo}` on commit `{record['commit']}`, torch threads "
              f"{args.threads}, {record['wall_seconds']:.0f} s in all; the shipped calibration; seconds: the "
              "detectors' own (call: the whole `scan` call, loading and files included)."), "",
             "| member | family | file | probability | verdict | suspected labels | seconds (call) |",
             "|---|---|---|---:|---|---|---:|"]  # fmt: skip
    for r in rows:
        for kind in ("artefact", "onnx"):
            k = r[kind]
            lines.append(f"| {r['id']} | {r['family'] or 'clean'} | {kind} | {k['probability']:.3f} | "
                         f"{'backdoored' if k['verdict'] else 'clean'} | {k['suspected_labels']} | "
                         f"{k['seconds']:.0f} ({k['call_seconds']:.0f}) |")  # fmt: skip
    same = sum(r["same_verdict"] for r in rows)
    lines += ["", f"Same verdict from the artefact and its ONNX export: {same} of {len(rows)} members."]
    (RESULTS / "scan_onnx.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
