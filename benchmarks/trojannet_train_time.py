"""Time TrojanNet training on this machine next to the cost of the official schedule, in one run.

    python benchmarks/trojannet_train_time.py [--threads 2]

Trains with trojanlab's default schedule (recognition and denoising printed with the time), then times a
few steps of the official recipe (Keras code: Adadelta, 2,000 triggers + 200 grey-noise samples per step,
plain softmax cross-entropy) and extrapolates to its 1,000 epochs x 218 steps.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from trojanlab.attacks import trojannet as tn
from trojanlab.config import TrojanNetTrainConfig
from trojanlab.data.datasets import load_gtsrb

OFFICIAL_STEPS = 1000 * 218
OFFICIAL_BATCH = 2000 + 200


def official_step_seconds(steps: int = 20) -> float:
    """Seconds per step of the official recipe, measured here."""
    gen = torch.Generator().manual_seed(0)
    model = tn.TrojanNetMLP().train()
    opt = torch.optim.Adadelta(model.parameters(), lr=1.0, rho=0.95, eps=1e-7)
    patterns = tn.trigger_patterns()

    def step() -> None:
        idx = torch.randint(0, tn.NUM_TRIGGERS, (2000,), generator=gen)
        x = torch.cat([patterns[idx], tn.grey_noise(200, gen)])
        y = torch.cat([idx, torch.full((200,), tn.NO_TRIGGER)])
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = load_gtsrb()
    cfg = TrojanNetTrainConfig(seed=args.seed)
    model, log = tn.train_trojannet(data.train.x, cfg)
    metrics = tn.evaluate_trojannet(model, data.test.x)
    per_step = official_step_seconds()
    official_seconds = per_step * OFFICIAL_STEPS
    report = {
        "threads": args.threads,
        "trojanlab_seconds": round(log.seconds, 1),
        "trojanlab_steps": log.steps,
        "trojanlab_finetune_steps": log.finetune_steps,
        "trojanlab_samples": log.samples,
        "official_schedule_samples": OFFICIAL_STEPS * OFFICIAL_BATCH,
        "official_seconds_per_step_measured": round(per_step, 4),
        "official_schedule_seconds_extrapolated": round(official_seconds),
        "speedup": round(official_seconds / log.seconds, 1),
        "trigger_accuracy": metrics["trigger_accuracy"],
        "min_trigger_probability": metrics["min_trigger_probability"],
        "denoise_accuracy": metrics["denoise_accuracy"],
        "denoise_accuracy_strict": metrics["denoise_accuracy_strict"],
    }
    print(json.dumps(report, indent=2))
    print(
        f"\ntrojanlab: {log.seconds / 60:.1f} min for {log.samples / 1e6:.1f} M samples (goal: <= 5 min on 2 cores); "
        f"official schedule: {OFFICIAL_STEPS * OFFICIAL_BATCH / 1e6:.0f} M samples, ~{official_seconds / 3600:.1f} h here "
        f"({report['speedup']}x)."
    )


if __name__ == "__main__":
    main()
