"""Backdoor removal over a zoo: every chosen defense on backdoored members of every family and on clean members.

    python benchmarks/removal_zoo.py --zoo ZOO --out RUN --methods ibau [anp ...] [--per-family 6] [--clean 6]
                                     [--workers 2]

Each (member, method) is one ``trojanlab defend`` run with the method's defaults (the defender's clean images are
its registry default share of the training split, seeded) into ``RUN/members/<id>/<method>/`` (a finished run is
reused, so the benchmark resumes). The table, per family and method: clean-accuracy drop and attack success rate
after (mean and worst), the share of backdoored members left at ASR <= 2 %, BackdoorBench's defense effectiveness
rating (DER = (max(0, ASR drop) - max(0, CA drop) + 1) / 2, mean), the drop the method predicted from the
defender's held-out images beside the measured one where it reports one, and seconds per model. Clean members show
what a defense costs a model that had no backdoor. Results: ``benchmarks/results/removal_zoo.{json,md}``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from _runs import run_once
from trojanlab.defenses import DEFENSES, defend
from trojanlab.io import read_json, write_json
from trojanlab.runs import source_commit

RESULTS = Path(__file__).parent / "results"
REMOVED = 0.02
"""ASR at or below which a backdoor counts as removed (the removal issue's goal)."""


def defend_member(job: tuple) -> dict:
    folder, method, model, data, seed = job
    return run_once(folder, defend, method, model, data=data, seed=seed, progress=False)


def der(before: dict, after: dict) -> float | None:
    """BackdoorBench's defense effectiveness rating (1: ASR removed at no accuracy cost, 0.5: nothing changed)."""
    if "attack_success_rate" not in before:
        return None
    asr_drop = before["attack_success_rate"] - after["attack_success_rate"]
    ca_drop = before["clean_accuracy"] - after["clean_accuracy"]
    return (max(0.0, asr_drop) - max(0.0, ca_drop) + 1) / 2


def pick_members(manifest: dict, per_family: int, clean: int) -> list[dict]:
    """The first ``per_family`` backdoored members of each family and the first ``clean`` clean ones, zoo order."""
    taken: Counter = Counter()
    out = []
    for m in manifest["members"]:
        kind = "clean" if m["status"] == "clean" else m["family"] if m["status"] == "backdoored" else None
        limit = clean if kind == "clean" else per_family
        if kind is not None and taken[kind] < limit:
            taken[kind] += 1
            out.append(m)
    return out


def fmt(values: list[float], scale: float = 100.0) -> str:
    if not values:
        return "-"
    v = np.array(values) * scale
    return f"{v.mean():.1f} ({v.max():.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", required=True, type=Path, help="a zoo folder (zoo.json)")
    parser.add_argument("--out", required=True, type=Path, help="run folder (resumable)")
    parser.add_argument("--methods", nargs="+", default=["ibau"], choices=list(DEFENSES), help="defenses to run")
    parser.add_argument("--per-family", type=int, default=6, help="backdoored members per family")
    parser.add_argument("--clean", type=int, default=6, help="clean members")
    parser.add_argument("--workers", type=int, default=1, help="runs at once, one process and torch thread each")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    began = time.perf_counter()
    manifest = read_json(args.zoo / "zoo.json")
    if manifest is None:
        raise SystemExit(f"{args.zoo}: no zoo.json")
    members = pick_members(manifest, args.per_family, args.clean)
    data = manifest["config"]["data"]
    jobs = [(args.out / "members" / m["id"] / method, method, str(args.zoo / m["path"]), data, args.seed)
            for m in members for method in args.methods]  # fmt: skip
    mapper = map
    if args.workers > 1:
        pool = ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=torch.set_num_threads, initargs=(1,))  # fmt: skip
        mapper = pool.map
    rows = []
    for i, ((folder, method, _, _, _), result) in enumerate(zip(jobs, mapper(defend_member, jobs))):
        m = members[i // len(args.methods)]
        before, after = result["before"], result["after"]
        row = {"id": m["id"], "family": m["family"] if m["status"] == "backdoored" else "clean", "method": method,
               "ca_before": before["clean_accuracy"], "ca_after": after["clean_accuracy"],
               "ca_drop": before["clean_accuracy"] - after["clean_accuracy"],
               "asr_before": before.get("attack_success_rate"), "asr_after": after.get("attack_success_rate"),
               "der": der(before, after), "predicted_ca_drop": result.get("predicted_clean_accuracy_drop"),
               "seconds": result["seconds"], "commit": (result.get("provenance") or {}).get("commit")}  # fmt: skip
        rows.append(row)
        asr = "" if row["asr_after"] is None else f", ASR {100 * row['asr_before']:.1f} -> {100 * row['asr_after']:.1f}"
        print(f"[{i + 1}/{len(jobs)}] {m['id']} {method}: CA drop {100 * row['ca_drop']:.1f}{asr}, "
              f"{row['seconds']:.0f} s", flush=True)  # fmt: skip
    commits = Counter((r["commit"] or "unknown")[:7] for r in rows)
    record = {"commit": source_commit(), "zoo": str(args.zoo), "methods": args.methods, "seed": args.seed,
              "run_commits": dict(commits), "wall_seconds": round(time.perf_counter() - began, 1), "rows": rows}  # fmt: skip
    write_json(args.out / "removal_zoo.json", record)
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / "removal_zoo.json", record)
    families = sorted({r["family"] for r in rows}, key=lambda f: (f == "clean", f))
    lines = [(f"`python benchmarks/removal_zoo.py --zoo {args.zoo} --methods {' '.join(args.methods)} --per-family "
             f"{args.per_family} --clean {args.clean}` on commit `{record['commit'][:7]}` (the runs made on "
             f"{', '.join(f'`{c}` ({n})' for c, n in commits.items())}), {record['wall_seconds']:.0f} s. "
             f"Mean (worst) in %; removed: ASR <= {100 * REMOVED:.0f} %; predicted: the drop the method read on "
             f"the defender's held-out images."), "",
             ("| method | family | members | CA drop | predicted CA drop | ASR before | ASR after | removed | DER | "
             "seconds |"), "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for method in args.methods:
        for family in families:
            group = [r for r in rows if r["method"] == method and r["family"] == family]
            if not group:
                continue
            ca = [r["ca_drop"] for r in group]
            predicted = [r["predicted_ca_drop"] for r in group if r["predicted_ca_drop"] is not None]
            asr_b = [r["asr_before"] for r in group if r["asr_before"] is not None]
            asr_a = [r["asr_after"] for r in group if r["asr_after"] is not None]
            removed = f"{sum(a <= REMOVED for a in asr_a)}/{len(asr_a)}" if asr_a and family != "clean" else "-"
            ders = [r["der"] for r in group if r["der"] is not None and family != "clean"]
            attacked = family != "clean"
            lines.append(f"| {method} | {family} | {len(group)} | {fmt(ca)} | {fmt(predicted)} | "
                         f"{fmt(asr_b) if attacked else '-'} | {fmt(asr_a) if attacked else '-'} | {removed} | "
                         f"{f'{np.mean(ders):.3f}' if ders else '-'} | "
                         f"{np.mean([r['seconds'] for r in group]):.0f} |")  # fmt: skip
    (RESULTS / "removal_zoo.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
