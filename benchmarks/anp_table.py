"""Adversarial Neuron Pruning against every attack of the thesis on GTSRB, and what it costs.

    python benchmarks/anp_table.py --tables runs/tables --out runs/anp [--profile fast|paper]

Runs ``trojanlab.defenses.defend("anp", ...)`` (1 % of the training split as the defender's data, half of it held
out for the automatic pruning rule, which reads clean images only) on the artefacts of
``benchmarks/trojannet_tables.py``: TrojanNet N_inf 1 and 8, BadNets (target 33) and TrojanNN (target 0, real
retraining data); then the thesis's sub-network variant (``defend("subnetwork", ...)``) on the two TrojanNet models.
Finished runs are reused. Prints, per run, CA and ASR before and after, the neurons pruned and the defense's seconds
beside the official recipe's image count (2,000 iterations x 128 images x 3 passes) and the time that count would
take at the throughput we measured. Writes ``benchmarks/results/anp_table.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from _runs import defense_seconds, run_once

from trojanlab.config import ANPConfig, DefenderConfig, SubnetworkConfig
from trojanlab.defenses import defend
from trojanlab.io import atomic_write, write_json

RESULTS = Path(__file__).parent / "results"
DATA = "gtsrb"
MODELS = {  # row name -> artefact under --tables
    "TrojanNet N_inf 1": "attack-n1",
    "TrojanNet N_inf 8": "attack-n8",
    "BadNets (target 33)": "badnets-t33",
    "TrojanNN (target 0)": "trojannn-real",
}
SUBNETWORK = ("TrojanNet N_inf 1", "TrojanNet N_inf 8")
# ANP's schedules: the official recipe (2,000 iterations of 128 images) and the cheaper one the paper also reports
PROFILES = {"paper": ANPConfig(), "fast": ANPConfig(iterations=500, batch_size=64)}
METHODS = {"ANP": "anp", "sub-network": "subnetwork"}  # variant -> defense (its pruning rule: the default, auto)


def run_defense(variant: str, model: Path, out: Path, config, defender: DefenderConfig | None) -> dict:
    """The defense on ``DATA`` unless ``out/result.json`` exists (the defender's data: ``defender``, else the method's
    default share of the training split); returns the result."""
    return run_once(out, defend, METHODS[variant], model, config, data=DATA, defender=defender, progress=False)


def victim_train_config(victim: Path) -> dict:
    """The victim's training settings (its validation share and seed) as its spec records them."""
    provenance = json.loads((victim / "model.json").read_text())["provenance"]
    if "train_config" in provenance:  # a victim trained by the old command line
        return provenance["train_config"]
    return provenance["config"]["TrainConfig"]


def unseen_images(victim: Path, path: Path, count: int = 248) -> str:
    """``count`` images (stratified) of the victim's early-stopping split: GTSRB training images it never trained on
    (its spec records the split's fraction and seed)."""
    if not path.is_file():
        import numpy as np

        from trojanlab.data.datasets import load_gtsrb
        from trojanlab.training import split_validation

        cfg = victim_train_config(victim)
        _, val = split_validation(load_gtsrb().train, cfg["val_fraction"], cfg["seed"])
        _, pick = split_validation(val, count / len(val), 0)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, x_train=pick.x, y_train=pick.y, x_test=pick.x[:1], y_test=pick.y[:1])
    return str(path)


def pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tables", default="runs/tables", help="artefacts of benchmarks/trojannet_tables.py")
    parser.add_argument("--out", default="runs/anp")
    parser.add_argument("--profile", choices=["fast", "paper"], default="fast")
    parser.add_argument("--only", nargs="*", default=None, help="row names to run (default: all)")
    parser.add_argument("--variants", nargs="+", choices=["ANP", "sub-network"], default=["ANP", "sub-network"])
    parser.add_argument(
        "--paper", nargs="*", default=[], help="row names also run with the paper profile (2,000 x 128 images)"
    )
    parser.add_argument(
        "--unseen",
        nargs="*",
        default=[],
        help="row names also run with defender images the victim never trained on (its early-stopping split)",
    )
    args = parser.parse_args()
    tables, out = Path(args.tables), Path(args.out)
    missing = [name for name in MODELS.values() if not (tables / name / "model.json").is_file()]
    if missing:
        sys.exit(f"{tables} lacks {missing}: run python benchmarks/trojannet_tables.py --out {tables} first")
    official = ANPConfig().passes()
    rows = []
    for name, folder in MODELS.items():
        if args.only and name not in args.only:
            continue
        anp = PROFILES[args.profile]
        runs = [("ANP", f"{folder}-{args.profile}", anp, None)]
        if name in args.paper and args.profile != "paper":
            runs.append(("ANP", f"{folder}-paper", PROFILES["paper"], None))
        if name in args.unseen:
            unseen = DefenderConfig(clean_data=unseen_images(tables / "victim", out / "victim-unseen-248.npz"))
            runs.append(("ANP", f"{folder}-{args.profile}-unseen", anp, unseen))
        if name in SUBNETWORK:
            runs.append(("sub-network", f"{folder}-subnetwork", SubnetworkConfig(), None))
        for variant, run_name, config, defender in runs:
            if variant not in args.variants:
                continue
            result = run_defense(variant, tables / folder, out / run_name, config, defender)
            before, after = result["before"], result["after"]
            row = {
                "model": name,
                "variant": variant if variant != "ANP" else f"ANP ({run_name.split('-', 2)[2]})",
                "ca_before": before["clean_accuracy"],
                "ca_after": after["clean_accuracy"],
                "ca_drop": after["clean_accuracy_drop"],
                "asr_before": before.get("attack_success_rate"),
                "asr_after": after.get("attack_success_rate"),
                "seconds": defense_seconds(result),
                "result": str(out / run_name / "result.json"),
            }
            if variant.startswith("ANP"):
                rate = result["samples"] / result["mask_seconds"]
                row.update(
                    pruned=f"{result['pruned']} / {result['neurons']}",
                    threshold=result["threshold"],
                    samples=result["samples"],
                    official_samples=official,
                    official_seconds_at_our_rate=official / rate,
                )
            else:
                row.update(pruned=result["decision"].get("removed", "–"), scores=result["mask_values"])
            rows.append(row)
            print(
                f"{name:22s} {variant:11s} CA {pct(row['ca_before'])} -> {pct(row['ca_after'])} %  "
                f"ASR {pct(row['asr_before'])} -> {pct(row['asr_after'])} %  pruned {row['pruned']}  "
                f"{row['seconds']:.0f} s"
                + (
                    f" ({row['samples']:,} images; official recipe {official:,} images = "
                    f"{row['official_seconds_at_our_rate']:.0f} s at our rate)"
                    if variant == "ANP"
                    else f"  scores {row['scores']}"
                ),
                flush=True,
            )
    lines = [
        "| model | defense | CA before → after (%) | ASR before → after (%) | pruned | defense seconds (CPU) |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['variant']} | {pct(row['ca_before'])} → {pct(row['ca_after'])} | "
            f"{pct(row['asr_before'])} → {pct(row['asr_after'])} | {row['pruned']} | {row['seconds']:.0f} |"
        )
    table = "\n".join(lines) + "\n"
    print(table)
    RESULTS.mkdir(exist_ok=True)
    atomic_write(RESULTS / "anp_table.md", lambda tmp: tmp.write_text(table))
    write_json(RESULTS / "anp_table.json", {"profile": args.profile, "official_recipe_samples": official, "rows": rows})


if __name__ == "__main__":
    main()
