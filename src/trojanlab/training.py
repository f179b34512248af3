"""One training loop for every classifier trojanlab trains (victims now, retraining attacks and repairs later).

Adam with the Keras time decay of the official GTSRB model (``lr_t = lr / (1 + decay * t)``), a stratified
validation split for early stopping (the best validation epoch is kept), a progress bar, a fixed seed, and a
checkpoint after each epoch so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .data import ImageSet
from .errors import ConfigError
from .io import atomic_write, write_json
from .config.training import TrainConfig


def split_validation(data: ImageSet, fraction: float, seed: int) -> tuple[ImageSet, ImageSet | None]:
    """A stratified hold-out of ``fraction`` of every class (at least one image per class with > 1 image)."""
    if fraction == 0:
        return data, None
    rng = np.random.default_rng(seed)
    val = []
    for label in np.unique(data.y):
        idx = np.flatnonzero(data.y == label)
        if len(idx) > 1:
            val.append(rng.choice(idx, max(1, round(len(idx) * fraction)), replace=False))
    val_idx = np.sort(np.concatenate(val))
    train_mask = np.ones(len(data), dtype=bool)
    train_mask[val_idx] = False
    return data.subset(np.flatnonzero(train_mask)), data.subset(val_idx)


def random_shift(x: torch.Tensor, generator: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random translation by up to ``max_shift`` pixels with edge replication, one shift per image."""
    n, c, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
    return padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]


@torch.no_grad()
def accuracy(model: nn.Module, data: ImageSet, batch_size: int = 512, device: str | torch.device = "cpu") -> float:
    """Top-1 accuracy over ``data`` read through its ``batch`` method (so poisoned views count as they train)."""
    model.eval()
    correct = 0
    for i in range(0, len(data), batch_size):
        x, y = data.batch(np.arange(i, min(i + batch_size, len(data))))
        correct += int((model(x.to(device)).argmax(1).cpu() == y).sum())
    return correct / max(len(data), 1)


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = opt.state_dict()
    tensors = {
        f"{idx}.{key}": torch.as_tensor(value).clone()
        for idx, entries in state["state"].items()
        for key, value in entries.items()
    }
    return tensors, {"param_groups": state["param_groups"]}


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_state(ckpt: Path, stem: str, tensors: dict[str, torch.Tensor], opt: torch.optim.Optimizer, meta: dict) -> None:
    """A resumable optimisation state: ``{stem}.safetensors`` (``tensors`` and the optimiser's, prefixed ``opt.``)
    and ``{stem}.json`` (``meta`` and the optimiser's bookkeeping), each written atomically."""
    opt_tensors, opt_meta = optimizer_tensors(opt)
    tensors = {
        **{name: value.detach().cpu().contiguous() for name, value in tensors.items()},
        **{f"opt.{name}": value.detach().cpu().contiguous() for name, value in opt_tensors.items()},
    }
    atomic_write(ckpt / f"{stem}.safetensors", lambda tmp: save_file(tensors, str(tmp)))
    write_json(ckpt / f"{stem}.json", {**meta, "optimizer": opt_meta})


def load_state(
    ckpt: Path, stem: str, fingerprint: dict, opt: torch.optim.Optimizer
) -> tuple[dict[str, torch.Tensor], dict] | None:
    """The state :func:`save_state` wrote under ``stem`` if its ``fingerprint`` matches, with ``opt`` restored;
    ``None`` when there is none or it belongs to another run. An unreadable state raises (the caller warns)."""
    meta_path = ckpt / f"{stem}.json"
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("fingerprint") != json.loads(json.dumps(fingerprint)):
        return None
    tensors = load_file(str(ckpt / f"{stem}.safetensors"))
    load_optimizer(opt, {n[4:]: v for n, v in tensors.items() if n.startswith("opt.")}, meta["optimizer"])
    return {n: v for n, v in tensors.items() if not n.startswith("opt.")}, meta


@dataclass
class TrainResult:
    epochs_run: int
    best_epoch: int
    best_val_accuracy: float | None
    history: list[dict]
    seconds: float
    resumed_from_epoch: int = 0


def fit(
    model: nn.Module,
    train: ImageSet,
    config: TrainConfig | None = None,
    checkpoint_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    on_epoch: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Train ``model`` (inputs in [0, 1], outputs logits) with cross-entropy; keep the best validation epoch.

    ``train`` is an :class:`ImageSet` or any view read the same way (``batch``, ``y``, ``subset``, ``len``), such as
    a poisoned set from ``trojanlab.attacks.badnets.poison``; the validation split is drawn from it as it is.
    With ``checkpoint_dir``, the state after every epoch is written there and a later call resumes from it.
    """
    cfg = config or TrainConfig()
    fit_set, val_set = split_validation(train, cfg.val_fraction, cfg.seed)
    model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1.0 + cfg.lr_decay * step))
    history: list[dict] = []
    best_acc, best_epoch, best_state = -1.0, 0, None
    start_epoch = 0
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt is not None and (ckpt / "state.json").is_file():
        meta = json.loads((ckpt / "state.json").read_text())
        if meta.get("config") == asdict(cfg):
            model.load_state_dict(load_file(str(ckpt / "model.safetensors")))
            load_optimizer(opt, load_file(str(ckpt / "optimizer.safetensors")), meta["optimizer"])
            sched.load_state_dict(meta["scheduler"])
            history, start_epoch = meta["history"], meta["epoch"]
            best_acc, best_epoch = meta["best_val_accuracy"], meta["best_epoch"]
            best_state = load_file(str(ckpt / "best.safetensors")) if (ckpt / "best.safetensors").is_file() else None
    began = time.perf_counter()
    stale = start_epoch - best_epoch if best_epoch else 0
    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        if val_set is not None and stale >= cfg.patience:
            break
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        torch.manual_seed(cfg.seed * 100_003 + epoch)  # dropout
        order = torch.randperm(len(fit_set), generator=gen).numpy()
        augment = functools.partial(random_shift, generator=gen) if cfg.augment else None
        model.train()
        total, seen = 0.0, 0
        bar = tqdm(
            range(0, len(order), cfg.batch_size), desc=f"epoch {epoch}/{cfg.epochs}", disable=not progress, leave=False
        )
        for i in bar:
            idx = order[i : i + cfg.batch_size]
            x, y = fit_set.batch(idx, augment)
            loss = F.cross_entropy(model(x.to(device)), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
            bar.set_postfix(loss=f"{total / seen:.4f}")
        record = {"epoch": epoch, "train_loss": total / seen}
        if val_set is not None:
            record["val_accuracy"] = accuracy(model, val_set, device=device)
            if record["val_accuracy"] > best_acc:
                best_acc, best_epoch, stale = record["val_accuracy"], epoch, 0
                best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            else:
                stale += 1
        history.append(record)
        if progress:
            tqdm.write(json.dumps(record))
        if ckpt is not None:
            _write_checkpoint(ckpt, model, opt, sched, cfg, epoch, history, best_acc, best_epoch, best_state)
        if on_epoch is not None:
            on_epoch(record)
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return TrainResult(
        epochs_run=len(history),
        best_epoch=best_epoch if val_set is not None else len(history),
        best_val_accuracy=best_acc if val_set is not None else None,
        history=history,
        seconds=time.perf_counter() - began,
        resumed_from_epoch=start_epoch,
    )


def _write_checkpoint(ckpt, model, opt, sched, cfg, epoch, history, best_acc, best_epoch, best_state) -> None:
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    atomic_write(ckpt / "model.safetensors", lambda tmp: save_file(state, str(tmp)))
    tensors, opt_meta = optimizer_tensors(opt)
    atomic_write(ckpt / "optimizer.safetensors", lambda tmp: save_file(tensors, str(tmp)))
    if best_state is not None:
        best = {k: v.contiguous() for k, v in best_state.items()}
        atomic_write(ckpt / "best.safetensors", lambda tmp: save_file(best, str(tmp)))
    write_json(
        ckpt / "state.json",
        {
            "epoch": epoch,
            "config": asdict(cfg),
            "history": history,
            "best_val_accuracy": best_acc,
            "best_epoch": best_epoch,
            "optimizer": opt_meta,
            "scheduler": sched.state_dict(),
        },
    )
