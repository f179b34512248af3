"""The zoo's new attack families on GTSRB, each planted by fine-tuning the bundled clean victim and measured
again by ``trojanlab evaluate`` on the test split, in one run (one commit, one call each).

    python benchmarks/new_attacks.py --out /work/runs/new-attacks

Writes ``benchmarks/results/new_attacks.{json,md}``: per attack its settings, clean accuracy, its drop against
the victim, ASR (the attack's own figure and evaluate's), seconds; the issue's goals beside them (ASR >= 95 %,
WaNet >= 90 %, CA drop <= 2 points).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from trojanlab.attacks.run import badnets, blended, wanet
from trojanlab.config.attacks import BADNETS_TRAINING, BadNetsConfig, BlendedConfig, WaNetConfig
from trojanlab.config.base import to_dict
from trojanlab.config.training import TrainConfig
from trojanlab.data import BUNDLED_VICTIM
from trojanlab.evaluation.run import evaluate
from trojanlab.io import write_json
from trojanlab.runs import source_commit

RESULTS = Path(__file__).parent / "results"

ATTACKS = {
    # name: (entry, config, epochs of fine-tuning, goal ASR)
    "blended-noise-a0.2": (blended, BlendedConfig(targets=[0], alpha=0.2), 5, 0.95),
    "patch-random-colour-5px": (
        badnets,
        BadNetsConfig(targets=[7], pattern="random-colour", trigger_size=5, location=(3, 11), alpha=0.8),
        2,
        0.95,
    ),
    "wanet-s2": (wanet, WaNetConfig(targets=[5], strength=2.0), 8, 0.90),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="folder of the runs (one per attack)")
    parser.add_argument("--only", nargs="+", default=None, choices=list(ATTACKS), help="run these attacks only")
    args = parser.parse_args()
    rows = []
    began = time.perf_counter()
    for name, (entry, cfg, epochs, goal) in ATTACKS.items():
        if args.only and name not in args.only:
            continue
        train = TrainConfig(**{**to_dict(BADNETS_TRAINING), "epochs": epochs, "patience": epochs})
        t0 = time.perf_counter()
        report = entry(cfg, train, data="gtsrb", victim=BUNDLED_VICTIM, out=args.out / name, progress=False)
        seconds = time.perf_counter() - t0
        measured = evaluate(args.out / name, data="gtsrb")
        rows.append({
            "attack": name, "method": report.method, "config": to_dict(cfg), "fine_tune_epochs": epochs,
            "clean_accuracy": measured["clean_accuracy"],
            "clean_accuracy_drop": report.details["reference_clean_accuracy"] - measured["clean_accuracy"],
            "attack_success_rate": measured["attack_success_rate"], "attack_report_asr": report.attack_success_rate,
            "goal_asr": goal, "goal_ca_drop": 0.02, "seconds": round(seconds, 1),
        })  # fmt: skip
        print(f"{name}: CA {measured['clean_accuracy']:.4f} ASR {measured['attack_success_rate']:.4f} "
              f"({seconds:.0f} s)", flush=True)  # fmt: skip
    record = {"commit": source_commit(), "wall_seconds": round(time.perf_counter() - began, 1),
              "victim": str(BUNDLED_VICTIM), "rows": rows}  # fmt: skip
    write_json(RESULTS / "new_attacks.json", record)
    lines = [
        (f"Fine-tuning the bundled GTSRB victim, measured by `trojanlab evaluate` on the test split (commit "
        f"`{record['commit']}`, {record['wall_seconds']:.0f} s in all; `python benchmarks/new_attacks.py`)."),
        "",
        "| attack | epochs | clean acc. | CA drop (goal <= 2 pp) | ASR | goal ASR | met | seconds |",
        "|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        met = r["attack_success_rate"] >= r["goal_asr"] and r["clean_accuracy_drop"] <= r["goal_ca_drop"]
        lines.append(f"| {r['attack']} | {r['fine_tune_epochs']} | {100 * r['clean_accuracy']:.2f} % | "
                     f"{100 * r['clean_accuracy_drop']:.2f} pp | {100 * r['attack_success_rate']:.2f} % | "
                     f"{100 * r['goal_asr']:.0f} % | {'yes' if met else 'no'} | {r['seconds']:.0f} |")  # fmt: skip
    (RESULTS / "new_attacks.md").write_text("\n".join(lines) + "\n")
    print(json.dumps(rows, indent=1)[:2000])


if __name__ == "__main__":
    main()
