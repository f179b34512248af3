"""WaNet (Nguyen & Tran, ICLR 2021): the trigger is a smooth, fixed warping of the whole image.

A random ``k`` x ``k`` field of offsets (uniform in [-1, 1], scaled to mean absolute value 1) is upsampled to the
image and moves every pixel by ``strength / H`` of the field (:class:`~trojanlab.triggers.WarpTrigger`); the
warped image looks like the original. The official code's defaults are ``k = 4``, ``s = 0.5``, poison rate 0.1 and
cross ratio 2.

The *noise mode* is what keeps WaNet from being a patch-like shortcut: ``cross_ratio * poison_rate`` of the
training images are warped with the same field plus fresh random offsets of up to ``1 / H`` per pixel, and keep
their true labels. The network then has to learn the exact field, not "any warping". The official code poisons
each batch anew; here, as for BadNets, a fixed set of images is warped and relabelled and another fixed set is
noise-warped. The noise itself is drawn anew every time a batch is read, from the seeded torch generator.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..data import ImageSet
from ..errors import ConfigError
from ..triggers import WarpTrigger
from .badnets import PoisonedImageSet, poison


def warp_field(grid_size: int, seed: int) -> np.ndarray:
    """A ``(k, k, 2)`` field uniform in [-1, 1] scaled to mean absolute value 1, the same for the same ``seed``."""
    if grid_size < 2:
        raise ConfigError(f"the warping grid needs at least 2 x 2 control points, got {grid_size}")
    field = np.random.default_rng(seed).uniform(-1, 1, (grid_size, grid_size, 2)).astype(np.float32)
    return field / np.abs(field).mean()


def warp_triggers(
    targets: Sequence[int], grid_size: int = 4, strength: float = 0.5, rescale: float = 1.0, seed: int = 0
) -> list[WarpTrigger]:
    """One warping trigger per target, the field of target ``i`` drawn from seed ``seed + i``."""
    targets = [int(t) for t in targets]
    if len(set(targets)) != len(targets):
        raise ConfigError(f"target labels must be distinct, got {targets}")
    return [
        WarpTrigger(
            warp_field(grid_size, seed + i),
            strength,
            target,
            rescale=rescale,
            name=f"wanet-{target}",
            extra={"family": "wanet", "grid_size": grid_size},
        )
        for i, target in enumerate(targets)
    ]


def noise_mode(trigger: WarpTrigger) -> WarpTrigger:
    """``trigger`` with the paper's per-image noise (up to ``1 / H``) whose images keep their labels."""
    return WarpTrigger(trigger.flow, trigger.strength, trigger.target_label, rescale=trigger.rescale, noise=1.0,
                       relabels=False, name=f"{trigger.name}-noise", extra=trigger.extra)  # fmt: skip


def poison_warped(
    data: ImageSet,
    triggers: Sequence[WarpTrigger],
    poison_rate: float = 0.1,
    cross_ratio: float = 2.0,
    num_classes: int | None = None,
    seed: int = 0,
) -> PoisonedImageSet:
    """BadNets' in-place poisoning with the warping triggers, then ``cross_ratio * poison_rate`` of the data (per
    trigger, of any label, among the images not poisoned) noise-warped at their true labels."""
    poisoned = poison(data, triggers, poison_rate, num_classes, mode="replace", seed=seed)
    if cross_ratio < 0:
        raise ConfigError(f"cross ratio must be >= 0, got {cross_ratio}")
    count = round(cross_ratio * round(poison_rate * len(data)))  # cross_ratio times as many as poisoned
    if count == 0:
        return poisoned
    trigger_id = poisoned.trigger_id.copy()
    rng = np.random.default_rng(seed + 1)
    noisy = [noise_mode(t) for t in triggers]
    for k in range(len(noisy)):
        free = np.flatnonzero(trigger_id < 0)
        if len(free) < count:
            raise ConfigError(
                f"{count} noise-mode images per target but only {len(free)} images left unpoisoned; lower the "
                "cross ratio or the poison rate"
            )
        trigger_id[np.sort(rng.choice(free, count, replace=False))] = len(triggers) + k
    return PoisonedImageSet(data, poisoned.source, trigger_id, [*triggers, *noisy])
