"""Transfer learning on a pretrained ImageNet backbone: a new head on cached features, then optionally the last blocks.

The thesis (ch. 6) trains a 5-class classifier on an ImageNet InceptionV3 with 80 training and 20 validation images
per class. With the backbone frozen, its features never change, so they are computed once (one forward pass per
image) and the head is trained on them: a run takes seconds after the forward passes, instead of re-running the
backbone every epoch. ``fine_tune_blocks`` then unfreezes the last blocks and trains them with the head on the images
(BatchNorm statistics kept: a few hundred images would otherwise overwrite ImageNet's).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config.training import TransferConfig
from ..data import ImageSet
from ..errors import ConfigError
from ..hooks import layer_inputs, trainable_only
from ..training import split_validation
from .artifacts import Classifier
from .backbones import pretrained_backbone, replace_head


@dataclass
class TransferResult:
    model: Classifier
    head: str
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    val_accuracy: float | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)


def _blocks(net: nn.Module) -> list[nn.Module]:
    """The network's top-level units in order, containers (ModuleList / Sequential) opened one level."""
    units = []
    for child in net.children():
        if isinstance(child, (nn.ModuleList, nn.Sequential)):
            units.extend(child.children())
        else:
            units.append(child)
    return [u for u in units if any(True for _ in u.parameters())]


def train_head(
    head: nn.Linear,
    f_train: torch.Tensor,
    y_train: torch.Tensor,
    f_val: torch.Tensor | None,
    y_val: torch.Tensor | None,
    cfg: TransferConfig,
) -> tuple[list[dict[str, float]], int, float | None]:
    """Adam on the cached features; the epoch with the best validation accuracy (then loss) is kept."""
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.Adam(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    history, best, best_key, stale = [], copy.deepcopy(head.state_dict()), None, 0
    best_epoch = 0
    for epoch in range(1, cfg.epochs + 1):
        order = torch.randperm(len(y_train), generator=gen)
        total = 0.0
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            loss = F.cross_entropy(head(f_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        row = {"epoch": epoch, "train_loss": total / len(order)}
        if f_val is not None and len(f_val):
            with torch.no_grad():
                logits = head(f_val)
                row["val_loss"] = float(F.cross_entropy(logits, y_val))
                row["val_accuracy"] = float((logits.argmax(1) == y_val).float().mean())
            key = (row["val_accuracy"], -row["val_loss"])
        else:
            key = (0.0, -row["train_loss"])
        history.append(row)
        if best_key is None or key > best_key:
            best_key, best, best_epoch, stale = key, copy.deepcopy(head.state_dict()), epoch, 0
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    head.load_state_dict(best)
    val_acc = history[best_epoch - 1].get("val_accuracy") if history else None
    return history, best_epoch, val_acc


def fine_tune(
    model: Classifier, blocks: Sequence[nn.Module], head: nn.Linear, train: ImageSet, cfg: TransferConfig
) -> list[dict[str, float]]:
    """Train the last ``blocks`` and the head on the images (the rest frozen, BatchNorm statistics kept)."""
    params = [p for b in [*blocks, head] for p in b.parameters()]
    opt = torch.optim.Adam(params, lr=cfg.fine_tune_lr)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    history = []
    with trainable_only(model, params):
        for epoch in range(1, cfg.fine_tune_epochs + 1):
            model.eval()  # BN in eval mode: statistics of ImageNet kept, dropout off
            order = torch.randperm(len(train), generator=gen).numpy()
            total = 0.0
            for i in range(0, len(order), cfg.batch_size):
                x, y = train.batch(order[i : i + cfg.batch_size])
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(y)
            history.append({"fine_tune_epoch": epoch, "train_loss": total / len(order)})
    return history


def transfer_learn(
    arch: str,
    train: ImageSet,
    num_classes: int,
    config: TransferConfig | None = None,
    weights: str | None = None,
) -> TransferResult:
    """A ``num_classes`` classifier on the pretrained ``arch``: new head on cached features (+ optional fine-tune)."""
    cfg = config or TransferConfig()
    torch.manual_seed(cfg.seed)
    began = time.perf_counter()
    net, info = pretrained_backbone(arch, weights)
    head = replace_head(net, num_classes)
    model = Classifier(net, info["mean"], info["std"]).eval()
    from .backbones import INPUT_SIZES

    expected = (INPUT_SIZES[arch],) * 2 if arch in INPUT_SIZES else tuple(train.x.shape[1:3])
    if tuple(train.x.shape[1:3]) != expected:
        raise ConfigError(
            f"{arch} takes {expected[0]}x{expected[1]} images; the data are {train.x.shape[1]}x{train.x.shape[2]} "
            f"(load them with --image-size {expected[0]})"
        )
    fit_set, val_set = split_validation(train, cfg.val_fraction, cfg.seed)
    f_train = layer_inputs(model, head, fit_set.x, cfg.batch_size)
    f_val = layer_inputs(model, head, val_set.x, cfg.batch_size) if val_set is not None else None
    features_done = time.perf_counter()
    y_train = torch.as_tensor(fit_set.y)
    y_val = torch.as_tensor(val_set.y) if val_set is not None else None
    history, best_epoch, val_acc = train_head(head, f_train, y_train, f_val, y_val, cfg)
    seconds = {"features": features_done - began, "head": time.perf_counter() - features_done}
    name = next(n for n, m in model.named_modules() if m is head)
    if cfg.fine_tune_blocks:
        tuning = time.perf_counter()
        blocks = [b for b in _blocks(net) if b is not head][-cfg.fine_tune_blocks :]
        history += fine_tune(model, blocks, head, fit_set, cfg)
        seconds["fine_tune"] = time.perf_counter() - tuning
        if val_set is not None:
            with torch.no_grad():
                f_val = layer_inputs(model, head, val_set.x, cfg.batch_size)
                val_acc = float((head(f_val).argmax(1) == y_val).float().mean())
    return TransferResult(model.eval(), name, history, best_epoch, val_acc, seconds, asdict(cfg))
