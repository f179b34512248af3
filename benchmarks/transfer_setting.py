"""The thesis's chapter-6 setting on real data, end to end: 5-class transfer learning, TrojanNet, ANP, and the
ImageNet demo.

    python benchmarks/transfer_setting.py --data tests/data/gtsrb5 --out runs/transfer

Steps (each a library call; finished steps are reused):
1. ``trojanlab.victims.train_transfer`` with ``ModelConfig(arch="efficientnet_lite0", split="80/20/10")`` (ImageNet
   EfficientNet-Lite0 from PyPI, 224x224, new head on cached features) - the thesis's InceptionV3 transfer model;
2. ``trojanlab.attacks.run.trojannet`` at location (10, 10) with N_inf 1 (label 0) and 5 (all labels), the authors'
   TrojanNet;
3. ``trojanlab.defenses.defend("subnetwork", ...)`` and ``defend("anp", ...)`` on both, the defender holding half of
   the training split (ANP with a CPU-sized budget, given by --anp-iterations / --anp-batch: the network is 300x the
   GTSRB CNN's cost per image);
4. ``trojanlab.demo.imagenet_demo`` (the figure is copied to benchmarks/results/imagenet_demo.png).
Writes ``benchmarks/results/transfer_setting.{md,json}``.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from _runs import defense_seconds, run_once

from trojanlab.attacks.run import trojannet
from trojanlab.config import (
    ANPConfig,
    DefenderConfig,
    ModelConfig,
    PruneRule,
    SubnetworkConfig,
    TransferConfig,
    TrojanNetInjectConfig,
)
from trojanlab.defenses import defend
from trojanlab.demo import OFFICIAL_TROJANNET, imagenet_demo
from trojanlab.io import atomic_write, write_json
from trojanlab.victims import train_transfer

RESULTS = Path(__file__).parent / "results"


def pct(v) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="tests/data/gtsrb5")
    parser.add_argument("--out", default="runs/transfer")
    parser.add_argument("--anp-iterations", type=int, default=100)
    parser.add_argument("--anp-batch", type=int, default=16)
    parser.add_argument("--cycles", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    out, data = Path(args.out), args.data
    victim = run_once(
        out / "victim", train_transfer, ModelConfig(arch="efficientnet_lite0", split="80/20/10"), TransferConfig(),
        data=data,
    )  # fmt: skip
    print(f"transfer: test accuracy {pct(victim['clean_accuracy'])} % in {victim['train_seconds']:.0f} s", flush=True)
    defender = DefenderConfig(clean_fraction=0.5)
    rows = []
    for name, targets in (("N_inf 1", [0]), ("N_inf 5", [0, 1, 2, 3, 4])):
        tag = name.replace(" ", "").lower()
        attacked_dir = out / f"attack-{tag}"
        inject = TrojanNetInjectConfig(targets=targets, location=(10, 10))
        attack = run_once(attacked_dir, trojannet, out / "victim", OFFICIAL_TROJANNET, inject, data=data)
        rows.append({"model": f"TrojanNet {name}", "step": "attack", "ca": attack["clean_accuracy"],
                     "asr": attack["attack_success_rate"], "ca_drop": attack["clean_accuracy_drop"]})  # fmt: skip
        sub = run_once(
            out / f"attack-{tag}-subnetwork", defend, "subnetwork", attacked_dir,
            SubnetworkConfig(cycles=args.cycles, epochs=args.epochs), data=data, defender=defender, progress=False,
        )  # fmt: skip
        anp = run_once(
            out / f"attack-{tag}-anp", defend, "anp", attacked_dir,
            ANPConfig(iterations=args.anp_iterations, batch_size=args.anp_batch), PruneRule(curve_images=50),
            data=data, defender=defender, progress=False,
        )  # fmt: skip
        for label, res in (("sub-network ANP", sub), ("ANP", anp)):
            rows.append(
                {
                    "model": f"TrojanNet {name}",
                    "step": label,
                    "ca": res["after"]["clean_accuracy"],
                    "asr": res["after"]["attack_success_rate"],
                    "ca_drop": res["after"]["clean_accuracy_drop"],
                    "seconds": defense_seconds(res),
                    "detail": res.get("mask_values") if label != "ANP" else f"{res['pruned']} / {res['neurons']}",
                }
            )
    demo = run_once(out / "demo", imagenet_demo)
    RESULTS.mkdir(exist_ok=True)
    shutil.copyfile(out / "demo" / "imagenet_demo.png", RESULTS / "imagenet_demo.png")
    lines = [
        (
            f"5-class transfer (EfficientNet-Lite0, 224x224, 80/20/10 per class): test accuracy "
            f"{pct(victim['clean_accuracy'])} % ({victim['test_images']} images), {victim['train_seconds']:.0f} s"
        ),
        "",
        "| model | step | CA (%) | ASR (%) | CA drop (points) | seconds | detail |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        detail = r.get("detail")
        if isinstance(detail, dict):
            detail = ", ".join(f"{k} {v:.3f}" for k, v in detail.items())
        lines.append(
            f"| {r['model']} | {r['step']} | {pct(r['ca'])} | {pct(r['asr'])} | {100 * r['ca_drop']:.1f} | "
            f"{r.get('seconds', 0):.0f} | {detail or ''} |"
        )
    lines += [
        "",
        (
            f"ImageNet demo: attack success {pct(demo['attack_success_rate'])} %, clean agreement with the unmodified "
            f"model {pct(demo['clean_agreement_with_victim'])} % on {len(demo['images'])} images "
            "(benchmarks/results/imagenet_demo.png)"
        ),
    ]
    table = "\n".join(lines) + "\n"
    print(table)
    atomic_write(RESULTS / "transfer_setting.md", lambda tmp: tmp.write_text(table))
    write_json(RESULTS / "transfer_setting.json", {"victim": victim, "rows": rows, "demo": demo})


if __name__ == "__main__":
    main()
