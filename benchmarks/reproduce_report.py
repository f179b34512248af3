"""Run (or reuse) the ``reproduce`` pipeline (``trojanlab.reproduce.run_pipeline``, as ``trojanlab reproduce``) and
keep its report with every result.json it cites, for the README.

    python benchmarks/reproduce_report.py                 # the full profile, runs/reproduce
    python benchmarks/reproduce_report.py --quick         # the quick profile, runs/reproduce-quick

Copies ``OUT/report/`` and, keeping the run's folder layout, every stage's ``result.json`` and ``stage.json`` into
``benchmarks/results/reproduce[-quick]/``, so the links of the committed ``report.md`` resolve. Prints the profile's
wall time (the sum of its stages' times when stages were reused) beside the issue's goal.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from trojanlab.errors import TrojanlabError
from trojanlab.reproduce import load_config, run_pipeline

RESULTS = Path(__file__).parent / "results"
GOAL_SECONDS = {"full": 45 * 60, "quick": 5 * 60}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--copy-only", action="store_true",
                        help="copy the finished run in --out as it is (its run.json, the record of the call that "
                        "made it), without calling the pipeline again")  # fmt: skip
    args = parser.parse_args()
    profile = "quick" if args.quick else "full"
    out = Path(args.out or ("runs/reproduce-quick" if args.quick else "runs/reproduce"))
    if args.copy_only:
        run = json.loads((out / "run.json").read_text())
        if run.get("status") != "done" or run.get("profile") != profile:
            raise SystemExit(f"{out}/run.json: not a finished {profile} run")
    else:
        try:
            run = run_pipeline(load_config(profile), out)  # also written to OUT/run.json
        except TrojanlabError as exc:
            raise SystemExit(f"reproduce ({profile} profile, {out}) failed: {exc}") from exc
    dest = RESULTS / ("reproduce" if profile == "full" else "reproduce-quick")
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(out / "report", dest / "report")
    for name in ("config.yaml", "run.json"):
        shutil.copyfile(out / name, dest / name)
    for stage in run["stages"]:
        for name in ("result.json", "stage.json"):
            src = out / stage["name"] / name
            if src.is_file():
                (dest / stage["name"]).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dest / stage["name"] / name)
    stage_seconds = sum(s["seconds"] for s in run["stages"])
    reused = sum(1 for s in run["stages"] if s["status"] == "reused")
    print(
        f"{profile} profile: {len(run['stages'])} stages, {stage_seconds:.0f} s of stage time "
        f"({stage_seconds / 60:.1f} min; this call {run['wall_seconds']:.0f} s, {reused} stages reused) on "
        f"{run['threads']} threads; goal <= {GOAL_SECONDS[profile] / 60:.0f} min -> "
        f"{'met' if stage_seconds <= GOAL_SECONDS[profile] else 'NOT met'}; report copied to {dest}"
    )


if __name__ == "__main__":
    main()
