"""BadNets (Gu et al. 2017): poison part of the training set with a trigger relabelled to the target, then train.

The GTSRB configuration everyone compares against is the Neural Cleanse demo model (methods sheet section 3.1):
a 4x4 opaque white square at rows/cols 27-30 of the 32x32 image, target 33, 10 epochs. The multi-label variant
of the TrojanNet paper (App. A) gives label ``i`` of ``N`` its own square of grey level ``255 - i * (255 // N)``
at the same spot (N = 1 is the white square).

Poisoning is a view over the clean data: :class:`PoisonedImageSet` stores which clean image each sample comes
from and which trigger (if any) it carries, and stamps the trigger when a batch is read, *after* augmentation, so
the trigger stays where it was placed. Two ways to choose the poisoned samples:

* ``replace`` (default, BackdoorBench style): ``poison_rate`` of the training set, drawn from images whose label
  is not that trigger's target, is stamped and relabelled in place; the clean set shrinks accordingly.
* ``append`` (the TrojanNet code's ``GTSRB.py``): the same number of poisoned copies per target is added on top of
  the complete clean set.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data import ImageSet, to_tensor
from ..errors import ConfigError
from ..triggers import Trigger, stamp

POISON_MODES = ("replace", "append")
RANDOM_PATTERNS = ("random-binary", "random-colour")
"""``--pattern`` keywords: a square of random black/white pixels, or of random colours, drawn from the seed (one
pattern per target), so that no defense can count on a plain white square."""


def random_pattern(kind: str, size: int, seed: int) -> np.ndarray:
    """A ``size`` x ``size`` trigger pattern of ``kind`` (:data:`RANDOM_PATTERNS`) in [0, 1], the same for the same
    ``seed``; a binary one always has both black and white pixels."""
    rng = np.random.default_rng(seed)
    if kind == "random-binary":
        pattern = rng.integers(0, 2, (size, size)).astype(np.float32)
        if size > 1 and pattern.min() == pattern.max():
            pattern[0, 0] = 1.0 - pattern[0, 0]
        return pattern
    if kind == "random-colour":
        return rng.random((size, size, 3), dtype=np.float32)
    raise ConfigError(f"unknown random pattern {kind!r} (known: {', '.join(RANDOM_PATTERNS)})")


def grey_levels(n: int) -> list[int]:
    """The TrojanNet code's grey level per infected label: ``255 - i * (255 // n)`` for ``i < n``."""
    if n < 1:
        raise ConfigError(f"need at least one target label, got {n}")
    return [255 - i * (255 // n) for i in range(n)]


def square_triggers(
    targets: Sequence[int],
    size: int = 4,
    location: tuple[int, int] = (27, 27),
    alpha: float = 1.0,
    pattern: np.ndarray | None = None,
) -> list[Trigger]:
    """One square trigger per target: grey levels from :func:`grey_levels` or one shared ``pattern``.

    A shared pattern (e.g. a PNG) can arm only one target: two targets with the same trigger cannot both win.
    """
    targets = [int(t) for t in targets]
    if len(set(targets)) != len(targets):
        raise ConfigError(f"target labels must be distinct, got {targets}")
    if pattern is not None:
        if len(targets) > 1:
            raise ConfigError(
                "one trigger pattern cannot arm several targets; leave the pattern at its grey-level default"
            )
        return [Trigger(pattern, location, targets[0], alpha=alpha, name="badnets")]
    if size < 1:
        raise ConfigError(f"trigger size must be at least 1 pixel, got {size}")
    return [
        Trigger(np.full((size, size), level / 255.0, np.float32), location, t, alpha=alpha, name=f"badnets-grey{level}")
        for t, level in zip(targets, grey_levels(len(targets)))
    ]


@dataclass
class PoisonedImageSet:
    """A poisoned view of ``base``: sample ``i`` is ``base`` image ``source[i]``, stamped with trigger
    ``trigger_id[i]`` and relabelled to its target when ``trigger_id[i] >= 0`` (with ``relabel=False`` the true
    label stays: the unlearning set of Neural Cleanse). Reads like an :class:`ImageSet` through ``batch``, ``y``,
    ``subset`` and ``len``; ``materialize`` gives the stamped uint8 images."""

    base: ImageSet
    source: np.ndarray
    trigger_id: np.ndarray
    triggers: list[Trigger]
    relabel: bool = True

    def __len__(self) -> int:
        return len(self.source)

    @property
    def y(self) -> np.ndarray:
        if not self.relabel:
            return self.base.y[self.source]
        # a trigger with relabels=False (WaNet's noise mode) keeps its samples' true labels
        targets = np.array([t.target_label if getattr(t, "relabels", True) else -1 for t in self.triggers] + [-1])
        moved = targets[self.trigger_id]
        return np.where((self.trigger_id >= 0) & (moved >= 0), moved, self.base.y[self.source]).astype(np.int64)

    @property
    def poisoned(self) -> np.ndarray:
        """Positions (in this view) of the poisoned samples (relabelled to a target)."""
        relabelling = np.array([getattr(t, "relabels", True) for t in self.triggers] + [False])
        return np.flatnonzero(relabelling[self.trigger_id])

    def subset(self, index: np.ndarray | Sequence[int]) -> PoisonedImageSet:
        index = np.asarray(index)
        return PoisonedImageSet(self.base, self.source[index], self.trigger_id[index], self.triggers, self.relabel)

    def batch(
        self, index: np.ndarray, augment: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        index = np.asarray(index)
        x = to_tensor(self.base.x[self.source[index]])
        if augment is not None:
            x = augment(x)
        ids = torch.as_tensor(self.trigger_id[index])
        for k in torch.unique(ids[ids >= 0]).tolist():
            rows = ids == k
            x[rows] = stamp(x[rows], self.triggers[k])
        return x, torch.as_tensor(self.y[index])

    def materialize(self) -> ImageSet:
        """The poisoned samples as raw uint8 images (for inspection; training never copies the data)."""
        x = self.base.x[self.source].copy()
        for k, trigger in enumerate(self.triggers):
            rows = self.trigger_id == k
            if rows.any():
                x[rows] = stamp(x[rows], trigger)
        return ImageSet(x, self.y)

    def summary(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        kept = 0
        for k, t in enumerate(self.triggers):
            n = int((self.trigger_id == k).sum())
            if getattr(t, "relabels", True):
                counts[str(t.target_label)] = counts.get(str(t.target_label), 0) + n
            else:
                kept += n
        extra = {"noise_mode_samples": kept} if kept else {}
        return {"samples": len(self), "poisoned": len(self.poisoned), "poisoned_per_target": counts, **extra}


def poison(
    data: ImageSet,
    triggers: Sequence[Trigger],
    poison_rate: float = 0.1,
    num_classes: int | None = None,
    mode: str = "replace",
    seed: int = 0,
) -> PoisonedImageSet:
    """Choose ``round(poison_rate * len(data))`` samples per trigger and return the poisoned view (see module doc).

    Raises :class:`ConfigError` for a rate outside (0, 1], a target outside ``[0, num_classes)``, a trigger outside
    the image, an unknown mode, or too few candidate images (``replace`` draws disjoint sets per trigger).
    """
    if not triggers:
        raise ConfigError("poisoning needs at least one trigger")
    if not 0 < poison_rate <= 1:
        raise ConfigError(f"poison rate must lie in (0, 1], got {poison_rate}")
    if mode not in POISON_MODES:
        raise ConfigError(f"unknown poisoning mode {mode!r} (expected one of {', '.join(POISON_MODES)})")
    n = len(data)
    if n == 0:
        raise ConfigError("cannot poison an empty data set")
    num_classes = int(data.y.max()) + 1 if num_classes is None else num_classes
    height, width = data.x.shape[1:3]
    for t in triggers:
        if not 0 <= t.target_label < num_classes:
            raise ConfigError(f"target label {t.target_label} is out of range for {num_classes} classes")
        t.check_fits(height, width)
    count = round(poison_rate * n)
    if count < 1:
        raise ConfigError(f"poison rate {poison_rate} of {n} images poisons no image")
    rng = np.random.default_rng(seed)
    free = np.ones(n, dtype=bool)
    chosen = []
    for t in triggers:
        candidates = np.flatnonzero((data.y != t.target_label) & free)
        if len(candidates) < count:
            raise ConfigError(
                f"{count} images to poison for target {t.target_label} but only {len(candidates)} candidates "
                f"(images of other labels{' not poisoned for an earlier target' if mode == 'replace' else ''}); "
                "lower the poison rate"
            )
        pick = np.sort(rng.choice(candidates, count, replace=False))
        chosen.append(pick)
        if mode == "replace":
            free[pick] = False
    if mode == "replace":
        trigger_id = np.full(n, -1, dtype=np.int64)
        for k, pick in enumerate(chosen):
            trigger_id[pick] = k
        return PoisonedImageSet(data, np.arange(n), trigger_id, list(triggers))
    source = np.concatenate([np.arange(n), *chosen])
    trigger_id = np.concatenate([np.full(n, -1, dtype=np.int64)] + [np.full(count, k) for k in range(len(chosen))])
    return PoisonedImageSet(data, source, trigger_id, list(triggers))


def read_pattern_png(path: str | Path) -> np.ndarray:
    """A trigger pattern from an image file: (h, w, 3) floats in [0, 1]."""
    from PIL import Image, UnidentifiedImageError

    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{file}: trigger image not found")
    try:
        with Image.open(file) as image:
            return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as exc:
        raise ConfigError(f"{file}: not a readable image ({exc})") from exc
