"""Naming the target: the scan's candidate labels examined again, for a patch and for a warp.

The scan's detectors rank all labels on a budget that fits a 43-class model into two minutes: Neural Cleanse runs 30
schedule steps, MM-BD 5 x 50 ascent steps. Their first labels are often not the planted target -- on the zoo's
backdoored models the combined scan detects, Neural Cleanse's smallest norm is the target for 67 %, MM-BD's largest
margin for 60 % (``benchmarks/results/scan_zoo.md``) -- but the target is nearly always among the first few of
either. So a few candidates (Neural Cleanse's ``nc_candidates`` smallest norms, MM-BD's ``mmbd_candidates`` largest
margins) are examined again, longer, two ways:

* **Neural Cleanse for the candidates alone**, ``refine_steps`` steps on the scan's images: the trigger of a patch
  or blend, reversed to convergence (the zoo's wanet-000: its target ranked 6th by the scan's norms, first of seven
  candidates reversed again: L1 18.5 against 23.7-35.6);
* **a targeted universal warp**: one smooth field (WaNet's parametrisation, :func:`~trojanlab.triggers.warp_grid`,
  control offsets bounded by ``warp_bound`` through a tanh), shared by all images and optimised to send them to the
  candidate, read as the share of images of other labels it takes there. A warping trigger paints no pixel, so
  Neural Cleanse's norm says little about it; a warp of the planted kind finds the target at once (wanet-000: 94 %
  of images to its target, at most 2 % to any other candidate).

A candidate that the warp takes to at least ``warp_success`` of the images comes first (the highest share first),
then the others by their norm reversed again. The check only orders labels: the scan's probability does not read it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config.detection import NCConfig, TargetConfig
from ..data import ImageSet, to_tensor
from ..triggers import warp_grid
from . import neural_cleanse as nc


@dataclass
class TargetCheck:
    """The candidates examined, their norms reversed again and their warp success, and the order they give."""

    candidates: list[int]
    refined_norms: dict[int, float]
    warp_success: dict[int, float]
    ranked: list[int]
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {"candidates": self.candidates, "ranked": self.ranked, "seconds": round(self.seconds, 2),
                "refined_l1_norms": {str(k): v for k, v in self.refined_norms.items()},
                "warp_success": {str(k): v for k, v in self.warp_success.items()}}  # fmt: skip


def candidates(norms: dict[int, float], margins: dict[int, float] | None, cfg: TargetConfig) -> list[int]:
    """Neural Cleanse's ``nc_candidates`` smallest norms, then MM-BD's ``mmbd_candidates`` largest margins (each
    label once)."""
    out = sorted(norms, key=norms.get)[: cfg.nc_candidates]
    if margins:
        out += sorted(margins, key=margins.get, reverse=True)[: cfg.mmbd_candidates]
    return list(dict.fromkeys(int(k) for k in out))


def universal_warp_success(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, targets: Sequence[int], cfg: TargetConfig
) -> dict[int, float]:
    """For each of ``targets``, batched: the share of ``images`` (``N, C, H, W`` in [0, 1]) of other labels that one
    smooth warp, shared by all of them and optimised for ``cfg.warp_steps`` Adam steps towards the target, takes
    there. The model is read in eval mode and its weights are not touched."""
    n, _, height, width = images.shape
    k = len(targets)
    generator = torch.Generator().manual_seed(cfg.seed)
    theta = (0.1 * torch.randn(k, 2, cfg.warp_grid, cfg.warp_grid, generator=generator)).to(images.device)
    theta.requires_grad_(True)
    goal = torch.as_tensor(list(targets), device=images.device).repeat_interleave(n)
    other = torch.cat([labels != t for t in targets])
    stacked = images.repeat(k, 1, 1, 1)
    optimiser = torch.optim.Adam([theta], lr=0.1)
    was_training = model.training
    model.eval()

    def warped() -> torch.Tensor:
        grid = warp_grid(cfg.warp_bound * torch.tanh(theta), 1.0, height, width).to(images.device)
        return F.grid_sample(stacked, grid.repeat_interleave(n, 0), mode="bilinear", padding_mode="border",
                             align_corners=True)  # fmt: skip

    try:
        for _ in range(cfg.warp_steps):
            loss = F.cross_entropy(model(warped())[other], goal[other])
            (grad,) = torch.autograd.grad(loss, theta)
            theta.grad = grad
            optimiser.step()
        with torch.no_grad():
            hits = ((model(warped()).argmax(1) == goal) & other).view(k, n).sum(1)
    finally:
        model.train(was_training)
    counted = other.view(k, n).sum(1).clamp_min(1)
    return {int(t): float(h / c) for t, h, c in zip(targets, hits, counted)}


def check_target(
    model: nn.Module,
    data: ImageSet,
    num_classes: int,
    norms: dict[int, float],
    margins: dict[int, float] | None,
    cfg: TargetConfig | None = None,
    nc_config: NCConfig | None = None,
    device: str | torch.device = "cpu",
) -> TargetCheck:
    """The check of the module docstring on ``model`` with the clean ``data`` (Neural Cleanse's images), from the
    scan's Neural Cleanse ``norms`` and MM-BD ``margins`` per label; ``nc_config``: the scan's Neural Cleanse, run
    again at ``cfg.refine_steps``."""
    cfg = cfg or TargetConfig()
    began = time.perf_counter()
    labels = candidates(norms, margins, cfg)
    refine = replace(nc_config or NCConfig(seed=cfg.seed), steps=cfg.refine_steps)
    again = nc.reverse_engineer(model, data, num_classes, labels, refine, device, progress=False)
    refined = dict(zip(labels, again.l1_norms))
    pick = np.arange(len(data))
    if len(data) > cfg.warp_images:
        pick = np.sort(np.random.default_rng(cfg.seed).choice(len(data), cfg.warp_images, replace=False))
    x = to_tensor(data.x[pick]).to(device)
    y = torch.as_tensor(data.y[pick]).long().to(device)
    warps = universal_warp_success(model, x, y, labels, cfg)
    return TargetCheck(labels, refined, warps, rank(refined, warps, cfg.warp_success), time.perf_counter() - began)


def rank(refined: dict[int, float], warps: dict[int, float], warp_success: float) -> list[int]:
    """The candidates in order: those a warp takes at least ``warp_success`` of the images to (the largest share
    first), then the others by their norm reversed again (the smallest first)."""
    warped = sorted((k for k in refined if warps[k] >= warp_success), key=lambda k: -warps[k])
    return warped + sorted((k for k in refined if k not in warped), key=refined.get)
