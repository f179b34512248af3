"""The zoo's table per family, from a finished ``trojanlab zoo build`` folder, with a sample of members re-measured
by ``trojanlab evaluate``.

    python benchmarks/zoo_table.py --zoo ZOO [--sample 8]

Copies the manifest (``zoo.json``, ``zoo.csv``; not the weights) to ``benchmarks/results/zoo/`` and writes
``table.md`` there: per family the members, how many reached the ASR floor, clean accuracy and ASR (mean and range),
and the re-measured sample beside the manifest's figures.
"""

from __future__ import annotations

import argparse
import random
import shutil
from pathlib import Path

from trojanlab.evaluation.run import evaluate
from trojanlab.io import read_json, write_json

RESULTS = Path(__file__).parent / "results" / "zoo"


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", required=True, type=Path)
    parser.add_argument("--sample", type=int, default=8, help="members re-measured by evaluate")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    manifest = read_json(args.zoo / "zoo.json")
    run = read_json(args.zoo / "result.json")
    if manifest is None or run is None:
        raise SystemExit(f"{args.zoo}: not a finished zoo (zoo.json and result.json are needed)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(args.zoo / "zoo.json", RESULTS / "zoo.json")
    shutil.copyfile(args.zoo / "zoo.csv", RESULTS / "zoo.csv")
    members = [m for m in manifest["members"] if m["status"] != "error"]
    picked = random.Random(args.seed).sample(members, min(args.sample, len(members)))
    checks = []
    for m in picked:
        measured = evaluate(args.zoo / m["path"], data=manifest["config"]["data"])
        checks.append({"id": m["id"], "manifest_ca": m["clean_accuracy"], "evaluate_ca": measured["clean_accuracy"],
                       "manifest_asr": m["attack_success_rate"],
                       "evaluate_asr": measured.get("attack_success_rate")})  # fmt: skip
    write_json(RESULTS / "evaluate_sample.json", checks)
    prov = run.get("provenance", {})
    commits: dict[str, list[str]] = {}  # the code each member was built by (a zoo grows over calls)
    for m in members:
        record = read_json(args.zoo / m["path"] / "result.json") or {}
        commits.setdefault(str((record.get("provenance") or {}).get("commit"))[:7], []).append(m["id"])
    built_by = "; ".join(f"`{c}`: {len(ids)}" for c, ids in commits.items())
    lines = [
        (
            f"`{prov.get('command') or 'trojanlab zoo build'}`, last call on commit `{prov.get('commit')}`: "
            f"{manifest['members_built']} of {manifest['members_total']} members, executor {manifest.get('executor')} "
            f"({manifest.get('workers')} workers), wall time {manifest.get('wall_seconds_total', 0) / 3600:.2f} h over "
            f"{manifest.get('calls')} call(s) of the command. ASR floor {100 * manifest['config']['asr_floor']:.0f} %. "
            f"Not one run: the calls ran on different commits; members per commit (each member's own record): {built_by}."
        ),
        "",
        "| family | members | backdoored | failed | clean acc. mean (min-max) | ASR mean (min-max) |",
        "|---|---:|---:|---:|---|---|",
    ]
    for family, s in manifest["summary"].items():
        ca, asr = s.get("clean_accuracy"), s.get("attack_success_rate")
        ca_text = f"{pct(ca['mean'])} ({pct(ca['min'])}-{pct(ca['max'])})" if ca else "-"
        asr_text = f"{pct(asr['mean'])} ({pct(asr['min'])}-{pct(asr['max'])})" if asr else "-"
        lines.append(f"| {family} | {s['members']} | {s.get('backdoored', '-')} | {s.get('failed', '-')} | {ca_text} | "
                     f"{asr_text} |")  # fmt: skip
    lines += ["", "Re-measured by `trojanlab evaluate` (test split):", "",
              "| member | CA manifest | CA evaluate | ASR manifest | ASR evaluate |", "|---|---:|---:|---:|---:|"]  # fmt: skip
    for c in checks:
        lines.append(f"| {c['id']} | {pct(c['manifest_ca'])} | {pct(c['evaluate_ca'])} | {pct(c['manifest_asr'])} | "
                     f"{pct(c['evaluate_asr'])} |")  # fmt: skip
    (RESULTS / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
