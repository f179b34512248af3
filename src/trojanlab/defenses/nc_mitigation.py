"""Neural Cleanse mitigation (Wang et al. 2019, section VI): repair a model with its reversed triggers.

* **Unlearning**: fine-tune on the defender's clean data where a share of the images carries a reversed trigger
  but keeps its *true* label, so the model learns to ignore the trigger. Paper: 10 % of the training data, 20 %
  of it stamped (the BackdoorBench port uses 5 % / 20 %). We stamp only images whose label is not the trigger's
  target (a stamped image of the target class teaches nothing) and train through the shared loop (``fit``:
  Adam, best epoch on a held-out part of the same data). Where the reversed trigger is a patch, its region can be
  unlearnt as well, filled per image with the pattern that pulls hardest towards the label
  (:func:`region_adversarial_loss`): Neural Cleanse reverses the smallest part of a patch that flips the model.
* **Pruning**: rank the inputs of the classification head (the "second-to-last layer" neurons) by how much more
  the reversed trigger excites them than clean images do, and zero them in that order. The paper stops when the
  model no longer responds to the reversed trigger; we sweep a grid of pruned fractions on the defender's data in
  one pass each and take the smallest fraction whose reversed-trigger success rate is at most ``target_asr``,
  among those that keep the defender's clean accuracy within ``ca_tolerance`` (no test data, no true trigger).
  Pruning zeroes the head's weight columns, so the repaired model is an ordinary artefact of the same architecture.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..attacks.badnets import PoisonedImageSet
from ..data import ImageSet, to_tensor
from ..errors import ConfigError
from ..hooks import classifier_layer, layer_inputs
from ..training import Loss, TrainConfig, TrainResult, fit
from ..triggers import Trigger, stamp


def stamped_non_target(data: ImageSet, trigger: Trigger) -> torch.Tensor:
    """The images of ``data`` whose label is not the trigger's target, stamped, as floats in [0, 1]."""
    return stamp(to_tensor(data.x[data.y != trigger.target_label]), trigger)


def unlearning_set(data: ImageSet, triggers: Sequence[Trigger], stamp_fraction: float, seed: int) -> PoisonedImageSet:
    """``data`` with ``stamp_fraction`` of it stamped with the triggers (in turn), true labels kept."""
    if not triggers:
        raise ConfigError("unlearning needs at least one reversed trigger")
    if not 0 < stamp_fraction < 1:
        raise ConfigError(f"the stamped share must lie in (0, 1), got {stamp_fraction}")
    rng = np.random.default_rng(seed)
    trigger_id = np.full(len(data), -1, dtype=np.int64)
    pick = rng.permutation(len(data))[: round(stamp_fraction * len(data))]
    choice = np.arange(len(pick)) % len(triggers)
    targets = np.array([t.target_label for t in triggers])
    keep = data.y[pick] != targets[choice]
    trigger_id[pick[keep]] = choice[keep]
    return PoisonedImageSet(data, np.arange(len(data)), trigger_id, list(triggers), relabel=False)


def trigger_region(trigger: Trigger, dilate: int = 1, max_area: float = 0.1) -> np.ndarray | None:
    """The region of a reversed full-image ``trigger``: its mask's core (at least half its largest value), grown by
    ``dilate`` pixels, as an ``h x w`` 0/1 mask; ``None`` when it covers more than ``max_area`` of the image (a
    diffuse trigger is no patch) or the mask is empty."""
    mask = np.asarray(trigger.mask, dtype=np.float32)
    if mask.max() <= 0:
        return None
    core = torch.from_numpy((mask >= 0.5 * mask.max()).astype(np.float32))[None, None]
    region = torch.nn.functional.max_pool2d(core, 2 * dilate + 1, stride=1, padding=dilate)[0, 0].numpy()
    return None if region.mean() > max_area else region


def region_adversarial_loss(
    region: np.ndarray,
    share: float = 0.2,
    steps: int = 5,
    step_size: float = 0.25,
    seed: int = 0,
    target: int | None = None,
) -> Loss:
    """A loss for :func:`~trojanlab.training.fit`: ``share`` of each batch has ``region`` filled with the pattern
    that most raises, for that image, the log-probability of ``target`` (``None``: its own loss) -- ``steps`` of
    signed gradient ascent from a uniform random start, the model in eval mode --, then cross-entropy at the true
    labels on the whole batch: adversarial training restricted to the region.

    Neural Cleanse reverses the *smallest* trigger that flips the model: a subset of a patch's pixels, in the
    colours that flip it most easily. Unlearning that subset can leave the rest of the patch working (the zoo's
    badnets-001, a white 4 x 4 square: ASR 93 -> 0.1-6 % over three seeds, and 40-80 % with the region filled with
    each corner of the colour cube and binary noise). Where the trigger is is known, what it shows is not: the
    pattern in the region that pulls an image hardest towards the suspected label is unlearnt instead, found anew
    for every image and step (badnets-001: ASR 0.0 % over four seeds, test accuracy 0.6-1.5 points lower)."""
    if not 0 < share <= 1:
        raise ConfigError(f"the adversarial share of a batch must lie in (0, 1], got {share}")
    if steps < 1 or step_size <= 0:
        raise ConfigError(f"a region attack needs steps >= 1 and a step size > 0, got {steps}, {step_size}")
    generator = torch.Generator().manual_seed(seed)

    def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, index: np.ndarray) -> torch.Tensor:
        n = max(1, round(share * len(x)))  # the batch is shuffled: its first n images are a random share
        attacked = region_attack(model, x[:n], y[:n], region, target, steps, step_size, generator)
        return F.cross_entropy(model(torch.cat([attacked, x[n:]])), y)

    return loss


def region_attack(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    region: np.ndarray,
    target: int | None = None,
    steps: int = 5,
    step_size: float = 0.25,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``images`` (``N, C, H, W`` in [0, 1]) with ``region`` filled, for each image, with the pattern that most raises
    the log-probability of ``target`` (``None``: the loss at ``labels``): ``steps`` of signed gradient ascent from a
    uniform random start, the model in eval mode (BatchNorm statistics are not moved by the search)."""
    if steps < 1 or step_size <= 0:
        raise ConfigError(f"a region attack needs steps >= 1 and a step size > 0, got {steps}, {step_size}")
    mask = torch.as_tensor(region, dtype=images.dtype, device=images.device)[None, None]
    images = images.detach()
    pattern = torch.rand(images.shape, generator=generator).to(images.device, images.dtype).requires_grad_(True)
    was_training = model.training
    model.eval()
    try:
        for _ in range(steps):
            logits = model((1 - mask) * images + mask * pattern)
            ascent = F.cross_entropy(logits, labels) if target is None else logits.log_softmax(1)[:, target].sum()
            (grad,) = torch.autograd.grad(ascent, pattern)
            pattern = (pattern + step_size * grad.sign()).clamp(0, 1).detach().requires_grad_(True)
    finally:
        model.train(was_training)
    return (1 - mask) * images + mask * pattern.detach()


def region_attack_success(
    model: nn.Module, data: ImageSet, region: np.ndarray, target: int, steps: int = 5, seed: int = 0,
    device: str | torch.device = "cpu", batch: int = 256,
) -> float:  # fmt: skip
    """The share of ``data``'s images of other labels than ``target`` that :func:`region_attack` towards ``target``
    sends there: how much of a backdoor the region still holds."""
    keep = data.y != target
    x, y = to_tensor(data.x[keep]), torch.as_tensor(data.y[keep]).long()
    generator = torch.Generator().manual_seed(seed)
    hits, was_training = 0, model.training
    model.eval()
    for i in range(0, len(x), batch):
        attacked = region_attack(model, x[i : i + batch].to(device), y[i : i + batch].to(device), region, target,
                                 steps, generator=generator)  # fmt: skip
        with torch.no_grad():
            hits += int((model(attacked).argmax(1) == target).sum())
    model.train(was_training)
    return hits / max(1, len(x))


def unlearn(
    model: nn.Module,
    clean: ImageSet,
    triggers: Sequence[Trigger],
    stamp_fraction: float = 0.2,
    config: TrainConfig | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    region: np.ndarray | None = None,
    region_share: float = 0.2,
    region_target: int | None = None,
) -> TrainResult:
    """Fine-tune ``model`` in place on ``clean`` with ``stamp_fraction`` of it carrying the reversed triggers; with
    ``region``, ``region_share`` of each batch also carries the pattern in it that pulls hardest towards
    ``region_target`` (:func:`region_adversarial_loss`)."""
    cfg = config or TrainConfig(epochs=5, lr=1e-3, patience=2)
    view = unlearning_set(clean, triggers, stamp_fraction, cfg.seed)
    loss = (
        region_adversarial_loss(region, region_share, seed=cfg.seed, target=region_target)
        if region is not None
        else None
    )
    return fit(model, view, cfg, device=device, progress=progress, loss=loss)


# ----------------------------------------------------------------------------------------------- pruning


def _keep_mask(head: nn.Linear, units: torch.Tensor) -> torch.Tensor:
    keep = torch.ones(head.in_features)
    keep[units] = 0
    return keep


@contextmanager
def pruned_inputs(head: nn.Linear, units: torch.Tensor):
    """Within the block, the head sees ``units`` of its input as zero (a forward pre-hook; weights untouched)."""
    keep = _keep_mask(head, units)

    def hook(_module, args):
        return (args[0] * keep.to(args[0].device, args[0].dtype),) + tuple(args[1:])

    handle = head.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def _head_is_output(model: nn.Module, head: nn.Linear, x: torch.Tensor, inputs: torch.Tensor) -> bool:
    """Whether the model's output is the head's output (a plain classifier): then pruned models can be evaluated
    from the head inputs alone, for every pruned fraction at once, without running the network again."""
    return torch.allclose(model(x), head(inputs), atol=1e-4, rtol=1e-4)


@torch.no_grad()
def _predictions(model, head, x: torch.Tensor, inputs: torch.Tensor, units: torch.Tensor, direct: bool):
    if direct:
        return head(inputs * _keep_mask(head, units)).argmax(1)
    with pruned_inputs(head, units):
        model.eval()
        return torch.cat([model(x[i : i + 512]).argmax(1) for i in range(0, len(x), 512)])


@dataclass
class PruneReport:
    layer: str
    units: int
    pruned: list[int]
    order: list[int]
    curve: list[dict[str, float]]
    rule: str
    reached_target: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "units": self.units,
            "pruned_count": len(self.pruned),
            "pruned_fraction": len(self.pruned) / self.units,
            "pruned_units": self.pruned,
            "reached_target": self.reached_target,
            "rule": self.rule,
            "curve": self.curve,
        }


def prune_by_activation_gap(
    model: nn.Module,
    num_classes: int,
    clean: ImageSet,
    triggers: Sequence[Trigger],
    max_fraction: float = 0.3,
    grid: int = 31,
    target_asr: float = 0.0,
    ca_tolerance: float = 0.05,
) -> PruneReport:
    """Zero, in place, the head inputs the reversed ``triggers`` excite most (see the module docstring).

    ``grid`` fractions from 0 to ``max_fraction`` are measured on ``clean`` (the defender's data): clean accuracy
    and the reversed triggers' success rate on its non-target images. Chosen: the smallest fraction with success
    rate <= ``target_asr`` and clean accuracy >= the unpruned one - ``ca_tolerance``; if none reaches the target,
    the admissible fraction with the lowest success rate.
    """
    if not triggers:
        raise ConfigError("pruning needs at least one reversed trigger")
    if not 0 < max_fraction <= 1 or grid < 2:
        raise ConfigError("pruning needs 0 < max_fraction <= 1 and a grid of at least 2 fractions")
    name, head = classifier_layer(model, num_classes)
    x_clean = to_tensor(clean.x)
    y_clean = torch.as_tensor(clean.y)
    stamped = [stamped_non_target(clean, t) for t in triggers]
    inputs_clean = layer_inputs(model, head, x_clean)
    inputs_stamped = [layer_inputs(model, head, x) for x in stamped]
    # the activation gap: mean on each reversed trigger's images minus mean on clean ones, largest over triggers
    base = inputs_clean.mean(0)
    gap = torch.stack([inputs.mean(0) - base for inputs in inputs_stamped]).max(0).values
    order = torch.argsort(gap, descending=True)
    direct = _head_is_output(model, head, x_clean[:16], inputs_clean[:16])
    counts = sorted({round(f * head.in_features) for f in np.linspace(0, max_fraction, grid)})
    curve = []
    for count in counts:
        units = order[:count]
        ca = float((_predictions(model, head, x_clean, inputs_clean, units, direct) == y_clean).float().mean())
        asr = max(
            float((_predictions(model, head, x, inputs, units, direct) == t.target_label).float().mean())
            for x, inputs, t in zip(stamped, inputs_stamped, triggers)
        )
        curve.append({"pruned": count, "fraction": count / head.in_features, "clean_accuracy": ca, "reversed_asr": asr})
    floor = curve[0]["clean_accuracy"] - ca_tolerance
    admissible = [c for c in curve if c["clean_accuracy"] >= floor]
    reached = [c for c in admissible if c["reversed_asr"] <= target_asr]
    chosen = reached[0] if reached else min(admissible, key=lambda c: (c["reversed_asr"], c["pruned"]))
    pruned = order[: chosen["pruned"]]
    with torch.no_grad():
        head.weight[:, pruned] = 0
    rule = (
        f"smallest pruned fraction (grid of {len(counts)} up to {max_fraction:.0%}) with reversed-trigger success "
        f"<= {target_asr:.0%} on the defender's data, keeping its clean accuracy within {ca_tolerance:.0%}"
    )
    return PruneReport(name, head.in_features, sorted(pruned.tolist()), order.tolist(), curve, rule, bool(reached))
