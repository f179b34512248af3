"""Naming the target: the label `trojanlab scan` names first on each backdoored member of a zoo, beside the label each
detector names alone and the order the scan gave before the target check -- all read from the same scans.

    python benchmarks/scan_targets.py --zoo ZOO --out RUN [--members ID ...] [--workers 2] [--name scan_targets]

Each backdoored member (failed attacks left out) is scanned once by the library's ``scan`` entry point, as
``benchmarks/scan_zoo.py`` scans it (5 clean test-split images per label, ``RUN/members/<id>/``, reused when
finished, so the run resumes). Per member: the planted target, the scan's first suspected label, the target check's
first label (:mod:`trojanlab.detection.target`), Neural Cleanse's smallest norm, MM-BD's largest margin, and the
scan's order without the target check (the structure branch's label, then Neural Cleanse's, then MM-BD's: the rule
before it); per family and overall, the share named right by each. Every backdoored member counts, detected or not
(``scan_zoo.py`` reports the share among the models its calibration detects). Results:
``benchmarks/results/NAME.{json,md}``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from scan_zoo import RESULTS, examples, scan_member
from trojanlab.config.base import to_dict
from trojanlab.config.detection import ScanConfig
from trojanlab.detection.scan import suspected_labels
from trojanlab.io import read_json, write_json
from trojanlab.runs import source_commit

RULES = {
    "scan": "the scan's first label",
    "target_check": "the target check's first",
    "without_check": "the scan's first without the check",
    "nc": "Neural Cleanse's smallest norm",
    "mmbd": "MM-BD's largest margin",
}


def named(detectors: dict) -> dict[str, int | None]:
    """The label each rule names first, from one scan's detector records."""
    without = suspected_labels({k: v for k, v in detectors.items() if k != "target"})
    first = suspected_labels(detectors)
    return {"scan": first[0] if first else None,
            "target_check": detectors["target"]["ranked"][0] if detectors.get("target") else None,
            "without_check": without[0] if without else None,
            "nc": detectors["nc"]["smallest_norm_label"] if "nc" in detectors else None,
            "mmbd": detectors["mmbd"]["suspected_label"] if "mmbd" in detectors else None}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", required=True, type=Path, help="a zoo folder (zoo.json)")
    parser.add_argument("--out", required=True, type=Path, help="run folder (resumable)")
    parser.add_argument("--members", nargs="+", default=None, metavar="ID", help="only these members")
    parser.add_argument("--per-label", type=int, default=5, help="clean example images per label")
    parser.add_argument("--workers", type=int, default=1, help="scans at once, one process and torch thread each")
    parser.add_argument("--name", default="scan_targets", help="the results' file name in benchmarks/results")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    began = time.perf_counter()
    commit = source_commit()
    manifest = read_json(args.zoo / "zoo.json")
    if manifest is None:
        raise SystemExit(f"{args.zoo}: no zoo.json")
    members = [m for m in manifest["members"] if m["status"] == "backdoored"]
    if args.members:
        unknown = set(args.members) - {m["id"] for m in members}
        if unknown:
            raise SystemExit(f"--members: no backdoored member {', '.join(sorted(unknown))} in {args.zoo}")
        members = [m for m in members if m["id"] in args.members]
    cfg = ScanConfig(seed=args.seed)
    example_file = str(examples(manifest["config"]["data"], args.out, args.per_label, args.seed))
    jobs = [(args.out / "members" / m["id"], str(args.zoo / m["path"]), cfg, example_file, args.seed)
            for m in members]  # fmt: skip
    mapper = map
    if args.workers > 1:  # one torch thread per worker process: two 1-thread scans beat one 2-thread scan on 2 cores
        pool = ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=torch.set_num_threads, initargs=(1,))  # fmt: skip
        mapper = pool.map
    rows = []
    for i, (m, result) in enumerate(zip(members, mapper(scan_member, jobs))):
        if result["config"] != to_dict(cfg):
            raise SystemExit(f"{args.out}/members/{m['id']}: scanned with other settings; use another --out")
        seconds = result["detector_seconds"]
        rows.append({"id": m["id"], "family": m["family"], "target": m["target"], "named": named(result["detectors"]),
                     "candidates": result["detectors"].get("target", {}).get("candidates"),
                     "warp_success": result["detectors"].get("target", {}).get("warp_success"),
                     "seconds": sum(seconds.values()), "target_check_seconds": seconds.get("target"),
                     "scan_commit": (result.get("provenance") or {}).get("commit")})  # fmt: skip
        print(f"[{i + 1}/{len(members)}] {m['id']}: target {m['target']}, named {rows[-1]['named']}", flush=True)
    families = sorted({r["family"] for r in rows})

    def share(rule: str, rows_: list[dict]) -> float:
        return float(np.mean([r["named"][rule] == r["target"] for r in rows_]))

    table = {rule: {"all": share(rule, rows), **{f: share(rule, [r for r in rows if r["family"] == f])
                                                  for f in families}} for rule in RULES}  # fmt: skip
    seconds = np.array([r["seconds"] for r in rows])
    check_seconds = np.array([r["target_check_seconds"] or 0.0 for r in rows])
    record = {"commit": commit, "zoo": str(args.zoo), "members": [r["id"] for r in rows], "scan_config": to_dict(cfg),
              "workers": args.workers, "wall_seconds": round(time.perf_counter() - began, 1),
              "seconds_per_model": {"mean": float(seconds.mean()), "max": float(seconds.max())},
              "target_check_seconds": {"mean": float(check_seconds.mean()), "max": float(check_seconds.max())},
              "right_target": table, "rows": rows}  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / f"{args.name}.json", record)
    command = "python benchmarks/scan_targets.py --zoo ZOO" + (f" --members {' '.join(args.members)}"
                                                                 if args.members else "")  # fmt: skip
    head = (f"`{command} --workers {args.workers}` on commit `{commit}`: {len(rows)} backdoored members, "
            f"{record['wall_seconds']:.0f} s; scan seconds per model ({args.workers} worker(s), 1 torch thread each) "
            f"mean {seconds.mean():.0f}, max {seconds.max():.0f}, of which the target check mean "
            f"{check_seconds.mean():.0f}. Right target named first, every backdoored member counted:")  # fmt: skip
    lines = [head, "",
             "| rule | all | " + " | ".join(families) + " |", "|---|---:|" + "---:|" * len(families)]  # fmt: skip
    for rule, label in RULES.items():
        e = table[rule]
        lines.append(f"| {label} | {100 * e['all']:.1f} % ({sum(r['named'][rule] == r['target'] for r in rows)}/"
                     f"{len(rows)}) | " + " | ".join(f"{100 * e[f]:.0f} %" for f in families) + " |")  # fmt: skip
    columns = (
        "| member | target | scan | target check | without the check | Neural Cleanse | MM-BD | largest warp success |"
    )
    lines += ["", columns, "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        n = r["named"]
        warp = max((r["warp_success"] or {"-": 0.0}).items(), key=lambda kv: kv[1])
        lines.append(f"| {r['id']} | {r['target']} | {n['scan']} | {n['target_check']} | {n['without_check']} | "
                     f"{n['nc']} | {n['mmbd']} | {100 * warp[1]:.0f} % (label {warp[0]}) |")  # fmt: skip
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
