"""Unlearning warps: fine-tune on the defender's images, a share of each batch moved by a fresh random smooth warp and
kept at its true label.

A warping trigger (WaNet, Nguyen & Tran 2021: one fixed smooth field, every pixel moved a little) paints no pixel:
Neural Cleanse's patch reversal and the region attack have nothing to unlearn, and the zoo's WaNet members scan
below ``defend auto``'s threshold. What a defender can draw is warps of the same kind -- control grids of a few
sizes, offsets uniform in [-1, 1] scaled to a mean absolute value of 1, upsampled (bicubic) to the image, each image
its own field and strength -- at their true labels: the network learns that a smooth warp is no evidence of a label,
the planted one among them. Measured on the zoo's wanet-003 (a 4 x 4 grid at strength 2.5, ASR 99.9 %), 5-10
epochs on the defender's 5 % of the training split, half of each batch warped: ASR 0.0-0.9 % at 0.0-0.9 points of
test accuracy, where plain fine-tuning as long left 37-57 %.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data import ImageSet
from ..errors import ConfigError
from ..training import Loss, TrainConfig, TrainResult, fit
from ..triggers import warp_grid


def random_warps(
    x: torch.Tensor, strength: float, grid_size: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``x`` (``N, C, H, W`` in [0, 1]) warped, each image by its own random smooth field on a ``grid_size`` control
    grid at a strength uniform in [0, ``strength``] (WaNet's parametrisation: pixels move by ``s * flow / H`` in
    grid units, borders replicated)."""
    if grid_size < 2 or strength <= 0:
        raise ConfigError(
            f"random warps need a grid of at least 2 points and a strength > 0, got {grid_size}, {strength}"
        )
    n, _, height, width = x.shape
    field = torch.rand(n, 2, grid_size, grid_size, generator=generator) * 2 - 1
    field = field / field.abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
    strengths = torch.rand(n, 1, 1, 1, generator=generator) * strength
    grid = warp_grid(field, strengths, height, width).to(x.device, x.dtype)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)


def warp_loss(share: float = 0.5, strength: float = 6.0, grid_sizes: Sequence[int] = (2, 4, 8), seed: int = 0) -> Loss:
    """A loss for :func:`~trojanlab.training.fit`: ``share`` of each batch warped by :func:`random_warps` (its grid
    size drawn from ``grid_sizes`` per batch), then cross-entropy at the true labels on the whole batch."""
    if not 0 < share <= 1:
        raise ConfigError(f"the warped share of a batch must lie in (0, 1], got {share}")
    if not grid_sizes or min(grid_sizes) < 2:
        raise ConfigError(f"warp grid sizes must be at least 2, got {list(grid_sizes)}")
    generator = torch.Generator().manual_seed(seed)

    def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, index: np.ndarray) -> torch.Tensor:
        n = max(1, round(share * len(x)))  # the batch is shuffled: its first n images are a random share
        k = int(grid_sizes[int(torch.randint(len(grid_sizes), (1,), generator=generator))])
        warped = random_warps(x[:n], strength, k, generator)
        return F.cross_entropy(model(torch.cat([warped, x[n:]])), y)

    return loss


def unlearn_warps(
    model: nn.Module,
    clean: ImageSet,
    config: TrainConfig,
    share: float = 0.5,
    strength: float = 6.0,
    grid_sizes: Sequence[int] = (2, 4, 8),
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> TrainResult:
    """Fine-tune ``model`` in place on ``clean``, ``share`` of each batch randomly warped at its true label."""
    return fit(model, clean, config, device=device, progress=progress,
               loss=warp_loss(share, strength, grid_sizes, config.seed))  # fmt: skip
