"""Members per hour on this machine: Ray's workers of one torch thread each against one process with every thread,
on the same members, in one run.

    python benchmarks/zoo_throughput.py --out /work/runs/zoo-throughput [--config benchmarks/zoo/throughput.yaml]

Writes ``benchmarks/results/zoo_throughput.{json,md}``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from trojanlab.config.base import to_dict
from trojanlab.io import read_json, write_json
from trojanlab.runs import source_commit
from trojanlab.zoo import ZooConfig, build_zoo

HERE = Path(__file__).parent
RESULTS = HERE / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--config", type=Path, default=HERE / "zoo" / "throughput.yaml")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    args = parser.parse_args()
    cfg = ZooConfig.from_yaml(args.config)
    rows = []
    for executor in ("sequential", "ray"):
        t0 = time.perf_counter()
        report = build_zoo(cfg, out=args.out / executor, executor=executor, workers=args.workers, progress=False)
        wall = time.perf_counter() - t0
        members = read_json(args.out / executor / "zoo.json")["members"]
        seconds = [m["seconds"] for m in members]
        rows.append({
            "executor": executor, "workers": args.workers if executor == "ray" else 1,
            "threads_per_member": members[0]["threads"], "members": len(members), "built": report.details["built"],
            "wall_seconds": round(wall, 1), "members_per_hour": round(len(members) * 3600 / wall, 2),
            "member_seconds": {"min": min(seconds), "median": statistics.median(seconds), "max": max(seconds)},
            "clean_accuracy": [m["clean_accuracy"] for m in members],
        })  # fmt: skip
        print(rows[-1], flush=True)
    record = {"commit": source_commit(), "config": str(args.config), "zoo_config": to_dict(cfg), "cpus": os.cpu_count(),
              "torch_threads": torch.get_num_threads(), "rows": rows}  # fmt: skip
    write_json(RESULTS / "zoo_throughput.json", record)
    lines = [
        (f"Members per hour on this machine ({record['cpus']} CPUs), the same {rows[0]['members']} GTSRB members "
        f"({args.config.name}) built both ways in one run on commit `{record['commit']}` "
        "(`python benchmarks/zoo_throughput.py`)."),
        "",
        "| executor | workers x threads | wall (s) | members/hour | member seconds min / median / max |",
        "|---|---|---:|---:|---|",
    ]
    for r in rows:
        s = r["member_seconds"]
        lines.append(f"| {r['executor']} | {r['workers']} x {r['threads_per_member']} | {r['wall_seconds']:.0f} | "
                     f"{r['members_per_hour']:.1f} | {s['min']:.0f} / {s['median']:.0f} / {s['max']:.0f} |")  # fmt: skip
    (RESULTS / "zoo_throughput.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
