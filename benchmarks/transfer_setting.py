"""The thesis's chapter-6 setting on real data, end to end: 5-class transfer learning, TrojanNet, ANP, and the
ImageNet demo.

    python benchmarks/transfer_setting.py --data tests/data/gtsrb5 --out runs/transfer

Steps (each a trojanlab command; finished steps are reused):
1. ``trojanlab train --arch efficientnet_lite0 --pretrained --split 80/20/10`` (ImageNet EfficientNet-Lite0 from PyPI,
   224x224, new head on cached features) - the thesis's InceptionV3 transfer model;
2. ``trojanlab attack trojannet --location 10 10`` with N_inf 1 (label 0) and 5 (all labels), the authors' TrojanNet;
3. ``trojanlab defend anp --variant subnetwork`` and ``--variant anp`` on both (ANP with a CPU-sized budget, given
   by --anp-iterations / --anp-batch: the network is 300x the GTSRB CNN's cost per image);
4. ``trojanlab demo imagenet`` (the figure is copied to benchmarks/results/imagenet_demo.png).
Writes ``benchmarks/results/transfer_setting.{md,json}``.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from _runs import run_once
from trojanlab.demo import OFFICIAL_TROJANNET
from trojanlab.io import atomic_write, write_json

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
        ["train", "--data", data, "--arch", "efficientnet_lite0", "--pretrained", "--split", "80/20/10"],
        out / "victim",
    )
    print(f"transfer: test accuracy {pct(victim['clean_accuracy'])} % in {victim['train_seconds']:.0f} s", flush=True)
    rows = []
    for name, targets in (("N_inf 1", ["0"]), ("N_inf 5", ["0", "1", "2", "3", "4"])):
        tag = name.replace(" ", "").lower()
        attacked_dir = out / f"attack-{tag}"
        attack = run_once(
            ["attack", "trojannet", "--victim", str(out / "victim"), "--trojannet", str(OFFICIAL_TROJANNET),
             "--targets", *targets, "--location", "10", "10", "--data", data],
            attacked_dir,
        )  # fmt: skip
        rows.append({"model": f"TrojanNet {name}", "step": "attack", "ca": attack["clean_accuracy"],
                     "asr": attack["attack_success_rate"], "ca_drop": attack["clean_accuracy_drop"]})  # fmt: skip
        common = ["defend", "anp", "--model", str(attacked_dir), "--data", data, "--quiet", "--clean-fraction", "0.5"]
        sub = run_once(
            [*common, "--variant", "subnetwork", "--cycles", str(args.cycles), "--epochs", str(args.epochs)],
            out / f"attack-{tag}-subnetwork",
        )
        anp = run_once(
            [*common, "--iterations", str(args.anp_iterations), "--batch-size", str(args.anp_batch),
             "--curve-images", "50"],
            out / f"attack-{tag}-anp",
        )  # fmt: skip
        for label, res in (("sub-network ANP", sub), ("ANP", anp)):
            rows.append(
                {
                    "model": f"TrojanNet {name}",
                    "step": label,
                    "ca": res["after"]["clean_accuracy"],
                    "asr": res["after"]["attack_success_rate"],
                    "ca_drop": res["after"]["clean_accuracy_drop"],
                    "seconds": res["defense_seconds"],
                    "detail": res.get("mask_values") if label != "ANP" else f"{res['pruned']} / {res['neurons']}",
                }
            )
    demo = run_once(["demo", "imagenet"], out / "demo")
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
