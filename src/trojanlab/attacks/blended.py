"""Blended (Chen et al. 2017): the trigger is the whole image, blended with a pattern at a low opacity.

A poisoned image is ``(1 - alpha) * image + alpha * pattern`` over every pixel, the pattern being uniform random
noise (drawn from the seed, one pattern per target) or a natural image resized to the data's size. The paper
poisons with alpha 0.2 (BackdoorBench's default); at 0.1 the blend is hard to see. Poisoning and training are
BadNets' (:mod:`trojanlab.attacks.badnets`): the blended trigger is a full-image :class:`~trojanlab.triggers.Trigger`
at location (0, 0) with opacity ``alpha``, so it travels with the model like any other trigger and ``evaluate``
measures it without extra flags.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import ConfigError
from ..triggers import Trigger
from .badnets import read_pattern_png


def noise_pattern(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """A uniform random ``(H, W, C)`` image in [0, 1], the same for the same ``seed``."""
    height, width, channels = shape
    return np.random.default_rng(seed).random((height, width, channels), dtype=np.float32)


def image_pattern(path: str, shape: tuple[int, int, int]) -> np.ndarray:
    """The image file at ``path`` as an ``(H, W, C)`` pattern in [0, 1], resized to the data's size."""
    from PIL import Image

    height, width, channels = shape
    rgb = read_pattern_png(path)  # (h, w, 3) in [0, 1], a clear error for a missing or unreadable file
    image = Image.fromarray(np.rint(rgb * 255).astype(np.uint8)).resize((width, height), Image.BILINEAR)
    if channels == 1:
        image = image.convert("L")
    pattern = np.asarray(image, dtype=np.float32) / 255.0
    return pattern.reshape(height, width, channels)


def blend_triggers(
    targets: Sequence[int], image_shape: tuple[int, int, int], alpha: float = 0.2, pattern: str = "noise", seed: int = 0
) -> list[Trigger]:
    """One full-image blended trigger per target for ``(C, H, W)`` images: noise of seed ``seed + i`` for target
    ``i``, or the image file ``pattern`` (one target)."""
    targets = [int(t) for t in targets]
    if len(set(targets)) != len(targets):
        raise ConfigError(f"target labels must be distinct, got {targets}")
    if pattern != "noise" and len(targets) > 1:
        raise ConfigError("one blend image cannot arm several targets; use the noise pattern")
    channels, height, width = image_shape
    shape = (height, width, channels)
    triggers = []
    for i, target in enumerate(targets):
        picture = noise_pattern(shape, seed + i) if pattern == "noise" else image_pattern(pattern, shape)
        triggers.append(Trigger(picture, (0, 0), target, alpha=alpha, name=f"blended-{target}",
                                extra={"family": "blended", "pattern": pattern}))  # fmt: skip
    return triggers
