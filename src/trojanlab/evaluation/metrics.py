"""Metrics (methods sheet section 1.1).

* clean accuracy: top-1 accuracy on the clean test split, all classes;
* attack success rate: the fraction of triggered test images *whose true label is not the target* that the
  model classifies as the target (the convention of the official ANP code and BackdoorBench);
* clean-accuracy drop: CA(victim) - CA(attacked model), in percentage points when reported.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ..data import ImageSet, to_tensor
from ..triggers import Trigger, stamp


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray, batch_size: int = 512, device: str | torch.device = "cpu") -> np.ndarray:
    """Top-1 predictions for raw uint8 images ``(N, H, W, C)``."""
    model.eval()
    out = [model(to_tensor(x[i : i + batch_size]).to(device)).argmax(1).cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.int64)


def clean_accuracy(model: nn.Module, data: ImageSet, batch_size: int = 512, device: str = "cpu") -> float:
    return float((predict(model, data.x, batch_size, device) == data.y).mean())


def attack_success_rate(
    model: nn.Module, data: ImageSet, trigger: Trigger, batch_size: int = 512, device: str = "cpu"
) -> float:
    """ASR of ``trigger`` over the test images whose true label is not its target."""
    keep = data.y != trigger.target_label
    if not keep.any():
        return float("nan")
    pred = predict(model, stamp(data.x[keep], trigger), batch_size, device)
    return float((pred == trigger.target_label).mean())


def evaluate_model(
    model: nn.Module,
    data: ImageSet,
    triggers: Sequence[Trigger] = (),
    batch_size: int = 512,
    device: str = "cpu",
    reference_accuracy: float | None = None,
    clean_predictions: np.ndarray | None = None,
) -> dict:
    """Clean accuracy and, per trigger, ASR; the summary ASR is the mean, with the minimum beside it.

    ``clean_predictions`` are the model's predictions on ``data.x`` when the caller already has them.
    """
    if clean_predictions is None:
        clean_predictions = predict(model, data.x, batch_size, device)
    result: dict = {"clean_accuracy": float((clean_predictions == data.y).mean()), "test_images": len(data)}
    if reference_accuracy is not None:
        result["clean_accuracy_drop"] = reference_accuracy - result["clean_accuracy"]
    if triggers:
        per_target = {str(t.target_label): attack_success_rate(model, data, t, batch_size, device) for t in triggers}
        values = list(per_target.values())
        result["attack_success_rate"] = float(np.mean(values))
        result["attack_success_rate_min"] = float(np.min(values))
        result["attack_success_rate_per_target"] = per_target
    return result
