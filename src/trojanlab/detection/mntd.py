"""MNTD (Xu, Wang, Li, Borisov, Gunter & Li, IEEE S&P 2021): a meta-classifier that reads a model's answers to a
few tuned query images, trained on a population of clean and backdoored models.

A backdoored model carries a shortcut that sends many different inputs to one label; a clean one answers each input
on its own. MNTD's "query tuning" learns, jointly with a linear meta-classifier, query images whose answers tell the
two apart across the population (here: the zoo). A scan then costs one forward pass of the queries.

Our departure from the paper: the meta-classifier reads **label-free features** of the answers, not the raw output
vectors. A backdoor's target is any of the labels, and a population of a few dozen models cannot teach a
per-label rule, so the features are invariant to renaming the labels: the largest shares of the queries' mean
probability (how strongly one label gathers the queries), sorted, and each query's top probability. The paper's
jumbo shadow models are replaced by the zoo; leave-one-family-out fits (``benchmarks/scan_zoo.py``) show how it
generalises to a family it never saw. A meta-classifier only applies to models of the task it was fitted on (number
of labels and input shape); :func:`applicable` says so.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..config.detection import MNTDConfig
from ..errors import ConfigError
from ..io import atomic_write


def answer_features(logits: torch.Tensor, top: int) -> torch.Tensor:
    """Label-free features of one model's logits on the queries ``(Q, C)``: the ``top`` largest labels' shares of
    the mean probability, largest first, then each query's top probability (``top + Q`` values)."""
    probs = logits.softmax(1)
    gathered = probs.mean(0).sort(descending=True).values[:top]
    return torch.cat([gathered, probs.max(1).values])


@dataclass
class MetaClassifier:
    """Tuned queries in [0, 1] and the linear meta-classifier over :func:`answer_features`; ``score`` > 0 leans
    backdoored."""

    queries: torch.Tensor  # (Q, C, H, W)
    weight: torch.Tensor  # (top + Q,)
    bias: float
    num_classes: int
    top: int
    population: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.queries.shape[1:])

    def applicable(self, num_classes: int, image_shape: Sequence[int]) -> str | None:
        """Why the meta-classifier cannot read a model of this shape, or None when it can."""
        if num_classes != self.num_classes or tuple(image_shape) != self.image_shape:
            shape = "x".join(map(str, self.image_shape))
            return (f"the meta-classifier was fitted on {self.num_classes}-class {shape} models; this model has "
                    f"{num_classes} classes, input {'x'.join(map(str, image_shape))}")  # fmt: skip
        return None

    def score(self, model: nn.Module) -> float:
        """The meta-classifier's logit for ``model`` (one forward pass of the queries)."""
        device = next(iter(model.parameters()), self.queries).device
        with torch.no_grad():
            features = answer_features(model.eval()(self.queries.to(device)).float().cpu(), self.top)
        return float(features @ self.weight + self.bias)

    def save(self, path: str | Path) -> Path:
        meta = {"bias": repr(self.bias), "num_classes": str(self.num_classes), "top": str(self.top),
                "population": json.dumps(self.population), "seconds": repr(self.seconds)}  # fmt: skip
        tensors = {"queries": self.queries.contiguous(), "weight": self.weight.contiguous()}
        return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))

    @classmethod
    def load(cls, path: str | Path) -> MetaClassifier:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            tensors = load_file(str(path))
            return cls(tensors["queries"], tensors["weight"], float(meta["bias"]), int(meta["num_classes"]),
                       int(meta["top"]), json.loads(meta.get("population", "{}")), float(meta.get("seconds", 0)))  # fmt: skip
        except (OSError, KeyError, ValueError, SafetensorError) as exc:
            raise ConfigError(f"{path}: not an MNTD meta-classifier ({exc})") from exc


def fit(
    models: Sequence[nn.Module],
    labels: Sequence[int],
    num_classes: int,
    image_shape: Sequence[int],
    config: MNTDConfig | None = None,
    *,
    population: dict[str, Any] | None = None,
    progress: bool = False,
) -> MetaClassifier:
    """Query tuning: the queries and the meta-classifier trained together to tell ``models`` labelled 1
    (backdoored) from those labelled 0, by Adam on the binary cross-entropy over ``config.batch_models`` models
    drawn each step, half clean and half backdoored (a step costs one pass of the queries through each). The models
    are frozen and put in eval mode."""
    cfg = config or MNTDConfig()
    y = torch.as_tensor(list(labels), dtype=torch.float32)
    if len(models) != len(y) or set(y.tolist()) != {0.0, 1.0}:
        raise ConfigError("MNTD needs one label per model, and both clean (0) and backdoored (1) models")
    if cfg.top > num_classes:
        raise ConfigError(f"MNTD reads the {cfg.top} largest label shares; the models have {num_classes} labels")
    generator = torch.Generator().manual_seed(cfg.seed)
    theta = torch.randn(cfg.queries, *image_shape, generator=generator).mul_(0.5).requires_grad_(True)
    weight = torch.zeros(cfg.top + cfg.queries, requires_grad=True)
    bias = torch.zeros((), requires_grad=True)
    optimiser = torch.optim.Adam([{"params": [theta], "lr": cfg.query_lr}, {"params": [weight, bias], "lr": cfg.lr}])
    sides = [torch.nonzero(y == 0)[:, 0], torch.nonzero(y == 1)[:, 0]]  # each step: as many clean as backdoored
    half = max(1, cfg.batch_models // 2)
    for m in models:
        m.eval().requires_grad_(False)
    began = time.perf_counter()
    for _ in tqdm(range(cfg.steps), desc="mntd", disable=not progress, unit="step"):
        batch = torch.cat([side[torch.randperm(len(side), generator=generator)[:half]] for side in sides])
        queries = theta.sigmoid()
        feats = torch.stack([answer_features(models[int(i)](queries), cfg.top) for i in batch])
        logits = feats @ weight + bias
        loss = F.binary_cross_entropy_with_logits(logits, y[batch])
        loss = loss + cfg.l2 * weight.square().sum()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return MetaClassifier(theta.detach().sigmoid(), weight.detach(), float(bias.detach()), num_classes, cfg.top,
                          dict(population or {}), round(time.perf_counter() - began, 2))  # fmt: skip
