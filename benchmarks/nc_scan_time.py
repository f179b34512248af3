"""Time a full 43-label Neural Cleanse scan of the GTSRB CNN on this machine, beside the official schedule's cost.

    python benchmarks/nc_scan_time.py [--model runs/tables/badnets-t33] [--long runs/nc/badnets-t33-long] [--threads 2]

Runs ``trojanlab.detection.reverse_engineer`` (default fast profile, all labels in one batch) on the GTSRB test split
and prints the wall time, the images forwarded and back-propagated, the verdict and, for comparison, the official
schedule's budget (1,000 steps x 31 mini-batches x 32 images per label, one label after another) with the time it
would take at the throughput measured here. With ``--long``, the verdict is compared with that of a long scan's
``result.json`` (``benchmarks/neural_cleanse_table.py --long`` writes them). The report is also written to
``benchmarks/results/nc_scan_time.txt``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from trojanlab.data import load_dataset
from trojanlab.detection import NCConfig, mad_outlier_test, reverse_engineer
from trojanlab.io import atomic_write
from trojanlab.models import load_model

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="runs/tables/badnets-t33")
    p.add_argument("--long", default=None, help="a long scan's folder (or result.json) to compare the verdict with")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    data = load_dataset("gtsrb")
    cfg = NCConfig()
    began = time.perf_counter()
    scan = reverse_engineer(loaded.module, data.test, loaded.num_classes, config=cfg, progress=False)
    seconds = time.perf_counter() - began
    outliers = mad_outlier_test(scan.norms())
    rate = scan.samples / seconds
    official = cfg.official_budget(loaded.num_classes)
    lines = [
        (
            f"model {args.model}, {loaded.num_classes} labels, GTSRB test split ({len(data.test)} images), "
            f"{args.threads} threads, torch {torch.__version__}"
        ),
        (
            f"trojanlab fast profile: {seconds:.0f} s wall, {scan.samples:,} images forward+backward ({rate:.0f} images/s), "
            f"steps per label {min(scan.steps_run)}-{max(scan.steps_run)}"
        ),
        (
            f"verdict: anomaly index {outliers['anomaly_index']:.3f}, flagged {outliers['flagged_labels'] or 'none'}, "
            f"smallest norm label {outliers['smallest_norm_label']} (L1 {min(scan.l1_norms):.1f}, median {outliers['median']:.1f})"
        ),
        (
            f"official schedule: up to {official:,} images ({official / scan.samples:.0f}x ours), "
            f"{official / rate / 3600:.1f} h at the throughput measured here; its README: about 10 min on a GPU"
        ),
    ]
    if args.long:
        path = Path(args.long)
        long = json.loads((path / "result.json" if path.is_dir() else path).read_text())
        same = set(long["flagged_labels"]) == set(outliers["flagged_labels"])
        lines.append(
            f"long scan ({path}): anomaly index {long['anomaly_index']:.3f}, flagged {long['flagged_labels'] or 'none'}, "
            f"{long['samples']:,} images, {long['seconds']:.0f} s -> same flagged labels: {'yes' if same else 'NO'}"
        )
    text = "\n".join(lines) + "\n"
    print(text, end="")
    RESULTS.mkdir(exist_ok=True)
    atomic_write(RESULTS / "nc_scan_time.txt", lambda tmp: tmp.write_text(text))


if __name__ == "__main__":
    main()
