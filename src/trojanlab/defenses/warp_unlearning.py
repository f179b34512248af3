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

from ..config.defenses import WarpUnlearnConfig
from ..data import ImageSet
from ..errors import ConfigError
from ..training import Loss, TrainConfig, TrainResult, fit
from ..triggers import warp_grid
from .base import DefenseContext, DefenseOutcome


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


def warp_loss(
    share: float = WarpUnlearnConfig.share,
    strength: float = WarpUnlearnConfig.strength,
    grid_sizes: Sequence[int] = WarpUnlearnConfig.grid_sizes,
    seed: int = 0,
) -> Loss:
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
    share: float = WarpUnlearnConfig.share,
    strength: float = WarpUnlearnConfig.strength,
    grid_sizes: Sequence[int] = WarpUnlearnConfig.grid_sizes,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> TrainResult:
    """Fine-tune ``model`` in place on ``clean``, ``share`` of each batch randomly warped at its true label."""
    return fit(model, clean, config, device=device, progress=progress,
               loss=warp_loss(share, strength, grid_sizes, config.seed))  # fmt: skip


def warp_unlearn_defense(ctx: DefenseContext, cfg: WarpUnlearnConfig) -> DefenseOutcome:
    """Warp unlearning with the defender's ``fit`` images, all epochs run; the held-out images measure what it cost
    (the predicted CA drop)."""
    held_before = ctx.held_out(ctx.model)
    train = TrainConfig(epochs=cfg.epochs, lr=cfg.lr, val_fraction=0.0, seed=cfg.seed)
    result = unlearn_warps(ctx.model, ctx.fit, train, cfg.share, cfg.strength, cfg.grid_sizes, ctx.device,
                           ctx.progress)  # fmt: skip
    held_after = ctx.held_out(ctx.model)
    details = {"unlearning_images": len(ctx.fit), "epochs": len(result.history),
               "holdout_accuracy": {"before": held_before, "after": held_after},
               "predicted_clean_accuracy_drop": held_before - held_after}  # fmt: skip
    changed = (
        f"{cfg.epochs} epochs of fine-tuning on {len(ctx.fit)} clean images, {cfg.share:.0%} of each batch "
        f"randomly warped (grids {', '.join(map(str, cfg.grid_sizes))}, strength up to {cfg.strength:g})"
    )
    return DefenseOutcome(ctx.model, changed, details)
