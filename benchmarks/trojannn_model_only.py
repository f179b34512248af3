"""Trojan Attack from the model alone (no training image read) on the bundled GTSRB victim, against the paper's
recipe (grey start images, their labels, one unit), in one run.

    python benchmarks/trojannn_model_only.py --out /work/runs/tnn-model-only [--targets 0 7] [--recipes NAME...]

Writes ``benchmarks/results/NAME.{json,md}`` (``--name``, default
``trojannn_model_only_first_block``): per recipe and target, clean accuracy, its drop, ASR
(measured again by ``trojanlab evaluate`` on the test split), the chosen units' mean activation on clean and
triggered test images, seconds. The issue's goal: ASR >= 90 % with a clean-accuracy drop <= 3 points.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from trojanlab.attacks.run import trojannn
from trojanlab.config.attacks import TrojanNNConfig
from trojanlab.data import BUNDLED_VICTIM
from trojanlab.evaluation.run import evaluate
from trojanlab.io import write_json
from trojanlab.runs import source_commit

RESULTS = Path(__file__).parent / "results"
RECIPES = {
    # the paper's model-only pipeline as it is written: grey starts, hard labels, one unit, the official optimiser,
    # retraining the layers after the classifier's input
    "paper (grey, labels, 1 unit)": {"layer": "classifier-input", "reverse_start": "grey", "noise_images": 0,
                                     "clean_loss": "labels", "neurons": 1, "trigger_background": "grey",
                                     "optimizer": "sgd", "lr": 1e-2, "epochs": 10, "trojan_weight": 1.0,
                                     "augment": False},
    "trojanlab default (1/f prior, distilled, 2 units, from the first block)": {},
    "default from the classifier's input": {"layer": "classifier-input"},
    "default from the classifier's input, trigger maximises the weakest unit": {"layer": "classifier-input",
                                                                                 "trigger_objective": "min"},
}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--targets", nargs="+", type=int, default=[0, 7])
    parser.add_argument(
        "--recipes",
        nargs="+",
        choices=list(RECIPES),
        default=list(RECIPES)[:2],
        help="recipes to run (default: the paper's and trojanlab's)",
    )
    parser.add_argument(
        "--name", default="trojannn_model_only_first_block", help="results file name under benchmarks/results"
    )
    args = parser.parse_args()
    rows = []
    began = time.perf_counter()
    for name in args.recipes:
        settings = RECIPES[name]
        for i, target in enumerate(args.targets):
            cfg = TrojanNNConfig(target=target, retrain_data="reverse", seed=i, **settings)
            folder = args.out / f"{list(RECIPES).index(name)}-target{target}"
            t0 = time.perf_counter()
            report = trojannn(BUNDLED_VICTIM, cfg, data="gtsrb", out=folder, seed=i, progress=False)
            seconds = time.perf_counter() - t0
            measured = evaluate(folder, data="gtsrb")
            units = report.details["selected_unit_activation"]
            rows.append({
                "recipe": name, "target": target, "seed": i, "clean_accuracy": measured["clean_accuracy"],
                "clean_accuracy_drop": report.details["victim_clean_accuracy"] - measured["clean_accuracy"],
                "attack_success_rate": measured["attack_success_rate"], "units": report.details["attack"]["neurons"],
                "unit_clean": units["clean_test_images"], "unit_triggered": units["triggered_test_images"],
                "seconds": round(seconds, 1),
            })  # fmt: skip
            print(rows[-1], flush=True)
    record = {
        "commit": source_commit(),
        "wall_seconds": round(time.perf_counter() - began, 1),
        "command": "python benchmarks/trojannn_model_only.py " + shlex.join(sys.argv[1:]),
        "recipes": {name: RECIPES[name] for name in args.recipes},
        "rows": rows,
    }
    write_json(RESULTS / f"{args.name}.json", record)
    lines = [
        (
            f"Trojan Attack with `--retrain-data reverse` on the bundled GTSRB victim, no training image read; ASR and "
            f"clean accuracy by `trojanlab evaluate` on the test split (commit `{record['commit']}`, "
            f"{record['wall_seconds']:.0f} s in all; `{record['command']}`). Goal: ASR >= 90 %, "
            "clean-accuracy drop <= 3 points."
        ),
        "",
        "| recipe | target | clean acc. | CA drop | ASR | units: mean activation clean -> triggered | seconds |",
        "|---|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        moved = ", ".join(f"{a:.2f} -> {b:.2f}" for a, b in zip(r["unit_clean"], r["unit_triggered"]))
        lines.append(f"| {r['recipe']} | {r['target']} | {100 * r['clean_accuracy']:.2f} % | "
                     f"{100 * r['clean_accuracy_drop']:.2f} pp | {100 * r['attack_success_rate']:.1f} % | {moved} | "
                     f"{r['seconds']:.0f} |")  # fmt: skip
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
