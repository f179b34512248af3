"""MM-BD (Wang, Xiang, Miller & Kesidis, IEEE S&P 2024): data-free backdoor detection by the maximum margin statistic.

A backdoor teaches the model a shortcut to its target: some input makes the target's logit exceed every other by far
more than any natural feature can for another label. MM-BD needs no clean image and assumes no trigger type (patch,
blend, warp): for every label ``k`` it estimates the **maximum achievable margin**

    r_k = max over x in [0, 1]^d of  z_k(x) - max_{j != k} z_j(x)

by gradient ascent from random images, fits a Gamma null distribution to the statistics of all labels but the
largest, and reports the p-value of the largest under the null of the maximum of K draws,
``p = 1 - F(r_max)^K``. A p-value below the threshold (0.05) flags the model, with ``argmax r_k`` as the target.

Following the official code (``univ_bd.py``): 30 uniform random starts per label, 300 steps of SGD at 0.01 on the
pixels (its optimiser is rebuilt every step, so its momentum never acts: plain gradient ascent), a label stops once
its loss changes by less than 1e-5 relative, the statistic is the largest margin over the starts, and the Gamma fit
has a location (``scipy.stats.gamma.fit``). Our departures: every label and start in one batch (a converged label
leaves the batch); the pixels are projected onto [0, 1] after each step (the official code clamps only in the
forward pass, so a pixel pushed outside stops receiving gradient and stays there); each start's best margin over
the steps is kept (the official code keeps the last step's, which ascent makes nearly the same); the profile
``fast`` (8 starts, 100 steps of Adam at 0.05) for a scan within the budget of one CPU minute on a GTSRB model.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..config.detection import MMBDConfig
from ..errors import ArtifactError, ConfigError


def margins(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row: the logit of ``labels`` minus the largest other logit."""
    own = logits.gather(1, labels[:, None])[:, 0]
    others = logits.masked_fill(F.one_hot(labels, logits.shape[1]).bool(), float("-inf"))
    return own - others.max(1).values


@dataclass
class MarginSearch:
    """The maximum achievable margin of every scanned label and the input that reached it."""

    labels: list[int]
    statistics: list[float]  # per label, the largest margin over its starts
    inputs: torch.Tensor  # per label, the start that reached it (N, C, H, W) in [0, 1]
    steps: list[int]  # per label, the steps it ran before converging
    images: int  # images forwarded and back-propagated, all labels together
    seconds: float

    def by_label(self) -> dict[int, float]:
        return dict(zip(self.labels, self.statistics))


def max_margins(
    model: nn.Module,
    num_classes: int,
    image_shape: Sequence[int],
    config: MMBDConfig | None = None,
    *,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> MarginSearch:
    """Gradient ascent on the margin of every label in ``config.labels`` (default: all) from ``config.starts``
    random images each, all in one batch (see the module docstring)."""
    cfg = config or MMBDConfig()
    labels = list(range(num_classes)) if cfg.labels is None else list(cfg.labels)
    bad = [label for label in labels if not 0 <= label < num_classes]
    if bad:
        raise ConfigError(f"labels {bad} are out of range for a {num_classes}-class model")
    model = model.to(device).eval()
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    starts = cfg.starts
    # each label's starts from its own generator: a label's statistic does not depend on which others are scanned
    x = torch.cat([torch.rand(starts, *image_shape, generator=torch.Generator().manual_seed(cfg.seed * 100_003 + k))
                   for k in labels]).to(device)  # fmt: skip
    y = torch.as_tensor(labels).repeat_interleave(starts).to(device)
    best = torch.full((len(x),), float("-inf"), device=device)
    best_x = x.clone()
    active = torch.ones(len(labels), dtype=torch.bool)
    last_loss = torch.full((len(labels),), float("nan"))
    steps_run = torch.zeros(len(labels), dtype=torch.long)
    adam = _AdamState(x) if cfg.optimizer == "adam" else None
    images, began = 0, time.perf_counter()
    try:
        for step in tqdm(range(cfg.steps), desc="mm-bd", disable=not progress, unit="step"):
            rows = active.repeat_interleave(starts).nonzero()[:, 0].to(device)
            if len(rows) == 0:
                break
            grads, values = [], []
            for chunk in rows.split(cfg.batch_size):
                xc = x[chunk].clone().requires_grad_(True)
                m = margins(model(xc), y[chunk])
                (g,) = torch.autograd.grad(m.sum(), xc)
                grads.append(g)
                values.append(m.detach())
            grad, value = torch.cat(grads), torch.cat(values)
            images += len(rows)
            better = value > best[rows]
            best[rows] = torch.where(better, value, best[rows])
            best_x[rows[better]] = x[rows[better]]
            if adam is None:
                x[rows] = (x[rows] + cfg.lr * grad).clamp_(0, 1)
            else:
                x[rows] = (x[rows] + adam.step(rows, grad, cfg.lr)).clamp_(0, 1)
            loss = -value.view(-1, starts).sum(1).cpu()  # per active label, the official convergence test
            ids = active.nonzero()[:, 0]
            previous = last_loss[ids]
            still = (previous - loss).abs() / previous.abs().clamp_min(1e-12) < cfg.tolerance  # NaN: first step
            steps_run[ids] = step + 1
            active[ids[still]] = False
            last_loss[ids] = loss
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
    per_label = best.view(len(labels), starts)
    top = per_label.argmax(1)
    inputs = best_x.view(len(labels), starts, *image_shape)[torch.arange(len(labels)), top.cpu()]
    return MarginSearch(labels, per_label.max(1).values.tolist(), inputs.detach().cpu(), steps_run.tolist(), images,
                        time.perf_counter() - began)  # fmt: skip


class _AdamState:
    """Adam's moments for each row of a batch that shrinks as labels converge (rows keep their own state)."""

    def __init__(self, x: torch.Tensor, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.m, self.v = torch.zeros_like(x), torch.zeros_like(x)
        self.t = torch.zeros(len(x), device=x.device)
        self.betas, self.eps = betas, eps

    def step(self, rows: torch.Tensor, grad: torch.Tensor, lr: float) -> torch.Tensor:
        b1, b2 = self.betas
        self.t[rows] += 1
        self.m[rows] = b1 * self.m[rows] + (1 - b1) * grad
        self.v[rows] = b2 * self.v[rows] + (1 - b2) * grad * grad
        t = self.t[rows].view(-1, *([1] * (grad.dim() - 1)))
        m_hat, v_hat = self.m[rows] / (1 - b1**t), self.v[rows] / (1 - b2**t)
        return lr * m_hat / (v_hat.sqrt() + self.eps)  # ascent: added to the pixels


@dataclass
class MMBDTest:
    """The order-statistic test on the maximum margins."""

    p_value: float
    suspected_label: int
    statistic: float
    gamma: dict[str, float] = field(default_factory=dict)  # the null fit: shape, loc, scale

    def to_json(self) -> dict[str, Any]:
        return {"p_value": self.p_value, "suspected_label": self.suspected_label, "statistic": self.statistic,
                "gamma": self.gamma}  # fmt: skip


def gamma_test(statistics: dict[int, float]) -> MMBDTest:
    """The official test: a Gamma (shape, location, scale) fitted to every statistic but the largest, and the
    p-value of the largest as the maximum of K draws from it, ``1 - F(r_max)^K``."""
    from scipy import stats

    if len(statistics) < 3:
        raise ConfigError(f"MM-BD's null fit needs at least 3 labels, got {len(statistics)}")
    labels = list(statistics)
    values = np.array([statistics[k] for k in labels], dtype=np.float64)
    if not np.isfinite(values).all():
        bad = [k for k, v in zip(labels, values) if not np.isfinite(v)]
        raise ArtifactError(f"the model's margins are not finite for labels {bad[:5]} (NaN or infinite logits)")
    top = int(np.argmax(values))
    null = np.delete(values, top)
    if np.ptp(null) == 0:  # a degenerate null: the largest is an outlier exactly when it exceeds it
        p = 1.0 if values[top] <= null[0] else 0.0
        return MMBDTest(
            p, labels[top], float(values[top]), {"shape": float("nan"), "loc": float(null[0]), "scale": 0.0}
        )
    with np.errstate(all="ignore"):
        shape, loc, scale = stats.gamma.fit(null)
    # 1 - F^K computed from the survival function, so a far outlier keeps a p-value above 0 (not 1 - 1.0)
    survival = float(stats.gamma.sf(values[top], a=shape, loc=loc, scale=scale))
    p = -math.expm1(len(values) * math.log1p(-survival)) if survival < 1 else 1.0
    return MMBDTest(float(min(max(p, 0.0), 1.0)), labels[top], float(values[top]),
                    {"shape": float(shape), "loc": float(loc), "scale": float(scale)})  # fmt: skip


def plot_margins(statistics: dict[int, float], test: MMBDTest, threshold: float, path: str | Path) -> Path:
    """Bar plot of the maximum margin per label, the suspected label in red when the test flags it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(statistics)
    flagged = test.p_value < threshold
    fig, ax = plt.subplots(figsize=(max(6.0, 0.22 * len(labels) + 2), 3.4))
    colours = ["#c0392b" if flagged and k == test.suspected_label else "#5d6d7e" for k in labels]
    ax.bar(range(len(labels)), [statistics[k] for k in labels], color=colours)
    ax.set_xticks(range(len(labels)), [str(k) for k in labels], fontsize=7)
    ax.set_xlabel("label")
    ax.set_ylabel("maximum achievable margin")
    verdict = f"flagged label {test.suspected_label}" if flagged else "nothing flagged"
    ax.set_title(f"MM-BD: largest {test.statistic:.1f} (label {test.suspected_label}), p = {test.p_value:.2g} "
                 f"against {threshold:g}: {verdict}", fontsize=9)  # fmt: skip
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
