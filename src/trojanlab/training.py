"""One training loop for every classifier trojanlab trains: victims, retraining attacks (Trojan Attack) and repairs
(Neural Cleanse unlearning).

By default: cross-entropy, Adam with the Keras time decay of the official GTSRB model
(``lr_t = lr / (1 + decay * t)``), a stratified validation split for early stopping (the best validation epoch is
kept), a progress bar, a fixed seed, and a checkpoint after each epoch so an interrupted run resumes where it stopped.
A caller that trains part of a model, with another loss or another optimiser, passes them to :func:`fit` instead
of writing its own epoch loop, so shuffling, seeding, logging and checkpoints stay the same everywhere.
"""

from __future__ import annotations

import functools
import json
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .config.training import TrainConfig
from .data import ImageSet
from .errors import ConfigError, Interrupted
from .hooks import trainable_only
from .interrupts import Periodic, graceful_interrupts, stop_requested
from .io import atomic_write


def validation_index(data: ImageSet, fraction: float, seed: int) -> np.ndarray:
    """Positions in ``data`` of the stratified hold-out of :func:`split_validation` (sorted; empty for 0)."""
    if fraction == 0:
        return np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng(seed)
    val = []
    for label in np.unique(data.y):
        idx = np.flatnonzero(data.y == label)
        if len(idx) > 1:
            val.append(rng.choice(idx, max(1, round(len(idx) * fraction)), replace=False))
    return np.sort(np.concatenate(val)) if val else np.zeros(0, dtype=np.int64)


def split_validation(data: ImageSet, fraction: float, seed: int) -> tuple[ImageSet, ImageSet | None]:
    """A stratified hold-out of ``fraction`` of every class (at least one image per class with > 1 image)."""
    if fraction == 0:
        return data, None
    val_idx = validation_index(data, fraction, seed)
    train_mask = np.ones(len(data), dtype=bool)
    train_mask[val_idx] = False
    return data.subset(np.flatnonzero(train_mask)), data.subset(val_idx)


@dataclass
class TensorSet:
    """Samples that are already float tensors (``x``, e.g. ``(N, C, H, W)`` images in [0, 1] made by optimisation)
    and integer labels ``y``, read by :func:`fit` like an :class:`ImageSet` (``batch``, ``y``, ``subset``, ``len``)."""

    x: torch.Tensor
    y: np.ndarray

    def __post_init__(self) -> None:
        self.y = np.asarray(self.y.cpu() if isinstance(self.y, torch.Tensor) else self.y, dtype=np.int64)
        if len(self.x) != len(self.y):
            raise ConfigError(f"{len(self.x)} samples but {len(self.y)} labels")

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, index: np.ndarray | Sequence[int]) -> TensorSet:
        index = np.asarray(index)
        return TensorSet(self.x[torch.as_tensor(index, dtype=torch.long)], self.y[index])

    def batch(
        self, index: np.ndarray, augment: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.x[torch.as_tensor(np.asarray(index), dtype=torch.long)]
        return (augment(x) if augment is not None else x), torch.as_tensor(self.y[index])


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


CHECKPOINT_META = "trojanlab_checkpoint"


def write_checkpoint(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """``tensors`` and the JSON ``meta`` in ONE safetensors file, written atomically: a run killed at any moment
    leaves the previous checkpoint or this one, never weights of one step with the bookkeeping of another."""
    flat = {name: value.detach().cpu().contiguous().clone() for name, value in tensors.items()}
    text = json.dumps(meta, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v))
    atomic_write(path, lambda tmp: save_file(flat, str(tmp), metadata={CHECKPOINT_META: text}))


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict] | None:
    """What :func:`write_checkpoint` wrote, or ``None`` when there is no file (an unreadable one raises)."""
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads((handle.metadata() or {})[CHECKPOINT_META])
    return load_file(str(path)), meta


def save_state(ckpt: Path, stem: str, tensors: dict[str, torch.Tensor], opt: torch.optim.Optimizer, meta: dict) -> None:
    """A resumable optimisation state in ``{stem}.safetensors``: ``tensors``, the optimiser's (prefixed ``opt.``),
    ``meta`` and the optimiser's bookkeeping, in one atomic write."""
    opt_tensors, opt_meta = optimizer_tensors(opt)
    tensors = {**tensors, **{f"opt.{name}": value for name, value in opt_tensors.items()}}
    write_checkpoint(ckpt / f"{stem}.safetensors", tensors, {**meta, "optimizer": opt_meta})


def load_state(
    ckpt: Path, stem: str, fingerprint: dict, opt: torch.optim.Optimizer
) -> tuple[dict[str, torch.Tensor], dict] | None:
    """The state :func:`save_state` wrote under ``stem`` if its ``fingerprint`` matches, with ``opt`` restored;
    ``None`` when there is none or it belongs to another run. An unreadable state raises (the caller warns)."""
    saved = read_checkpoint(ckpt / f"{stem}.safetensors")
    if saved is None:
        return None
    tensors, meta = saved
    if meta.get("fingerprint") != json.loads(json.dumps(fingerprint)):
        return None
    load_optimizer(opt, {n[4:]: v for n, v in tensors.items() if n.startswith("opt.")}, meta["optimizer"])
    return {n: v for n, v in tensors.items() if not n.startswith("opt.")}, meta


@dataclass
class TrainResult:
    epochs_run: int
    best_epoch: int
    best_val_accuracy: float | None
    history: list[dict]
    seconds: float  # training time of the whole run, earlier interrupted sessions included
    resumed_from_epoch: int = 0  # epochs completed before this call (a mid-epoch resume counts the epoch begun)
    steps: int = 0  # optimiser steps of all epochs in ``history`` (resumed ones included)
    session_seconds: float = 0.0  # training time of this call alone


Loss = Callable[[nn.Module, torch.Tensor, torch.Tensor, np.ndarray], "torch.Tensor | dict[str, torch.Tensor]"]
"""``loss(model, x, y, index)``: the loss of one batch (``x``, ``y`` on the device; ``index``: the batch's positions
in the set given to :func:`fit`, for per-sample data). Returns the scalar to minimise, or a dict with it under
``"loss"`` and further scalars to log: each key gets its sample-weighted epoch mean in the history record."""

OptimizerFactory = Callable[
    [list[nn.Parameter], TrainConfig, int], tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]
]
"""``optimizer(params, config, steps_per_epoch)`` -> (optimiser, scheduler stepped after every optimiser step)."""


def cross_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, index: np.ndarray) -> torch.Tensor:
    """The default loss of :func:`fit`."""
    return F.cross_entropy(model(x), y)


def weighted_cross_entropy(weights: np.ndarray | torch.Tensor) -> Loss:
    """Cross-entropy with one weight per sample of the set given to :func:`fit` (batch mean of weight x loss, so
    weights of 1 give the default loss)."""
    table = torch.as_tensor(np.asarray(weights), dtype=torch.float32)

    def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, index: np.ndarray) -> torch.Tensor:
        per_sample = F.cross_entropy(model(x), y, reduction="none")
        return (per_sample * table[torch.as_tensor(index)].to(per_sample.device)).mean()

    return loss


def keras_adam(params: list[nn.Parameter], cfg: TrainConfig, steps_per_epoch: int):
    """The default optimiser: ``cfg.optimizer`` -- Adam, or SGD with momentum 0.9 -- at ``cfg.lr`` with the Keras
    time decay ``lr / (1 + cfg.lr_decay * step)``."""
    if cfg.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=5e-4)
    else:
        opt = torch.optim.Adam(params, lr=cfg.lr)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1.0 + cfg.lr_decay * step))


def constant_lr(
    make: Callable[[list[nn.Parameter], float], torch.optim.Optimizer], warmup_epochs: int = 0
) -> OptimizerFactory:
    """An optimiser factory for :func:`fit`: ``make(params, cfg.lr)`` (e.g. ``lambda p, lr: torch.optim.SGD(p, lr,
    momentum=0.9)``) at a constant rate, reached linearly over the first ``warmup_epochs`` epochs (``cfg.lr_decay``
    is not used)."""

    def factory(params: list[nn.Parameter], cfg: TrainConfig, steps_per_epoch: int):
        opt = make(params, cfg.lr)
        ramp = max(1, warmup_epochs * steps_per_epoch)
        factor = (lambda step: min(1.0, (step + 1) / ramp)) if warmup_epochs else (lambda step: 1.0)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)

    return factory


def fit(
    model: nn.Module,
    train: ImageSet,
    config: TrainConfig | None = None,
    checkpoint_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    on_epoch: Callable[[dict], None] | None = None,
    *,
    params: Iterable[nn.Parameter] | None = None,
    train_modules: Iterable[nn.Module] | None = None,
    loss: Loss | None = None,
    optimizer: OptimizerFactory | None = None,
    clip_norm: float | None = None,
    checkpoint_key: str | None = None,
) -> TrainResult:
    """Train ``model`` (inputs in [0, 1], outputs logits); keep the best validation epoch.

    ``train`` is an :class:`ImageSet` or any view read the same way (``batch``, ``y``, ``subset``, ``len``), such as
    a poisoned set from ``trojanlab.attacks.badnets.poison`` or a :class:`TensorSet`; the validation split is drawn
    from it as it is (``config.val_fraction=0``: none, no early stopping, all ``config.epochs`` run, the last kept).
    With ``checkpoint_dir``, the state is written there after every epoch, every few minutes inside one
    (:func:`trojanlab.interrupts.checkpoint_interval`) and when Ctrl-C asks to stop (then
    :class:`~trojanlab.errors.Interrupted` is raised); a later call resumes from it, bit for bit as if never stopped.
    The checkpoint is matched on ``config`` only: the run folder's fingerprint (:func:`trojanlab.runs.prepare_run`)
    guarantees the rest, so give a run with another loss or parameters its own directory.

    Partial or custom training, all keyword-only (the defaults are the victim training above):

    * ``params``: the parameters to optimise; all others are frozen during the call (``requires_grad`` restored
      after). Default: all of ``model.parameters()``, their flags untouched.
    * ``train_modules``: the modules in train mode during the epochs, the rest in eval mode (frozen BatchNorm
      statistics, no dropout there); ``()``: the whole model in eval mode. Default: the whole model in train mode.
    * ``loss``: a :data:`Loss`; default :func:`cross_entropy` (:func:`weighted_cross_entropy` for per-sample weights).
    * ``optimizer``: an :data:`OptimizerFactory`; default :func:`keras_adam` (:func:`constant_lr` for SGD etc.).
    * ``clip_norm``: clip the gradient norm of ``params`` to this before each step.
    * ``checkpoint_key``: what else the checkpoint must have been written for (a run's fingerprint): a checkpoint
      of another key is not resumed.
    """
    cfg = config or TrainConfig()
    val_idx = validation_index(train, cfg.val_fraction, cfg.seed)
    fit_idx = np.setdiff1d(np.arange(len(train)), val_idx) if len(val_idx) else np.arange(len(train))
    fit_set, val_set = (train.subset(fit_idx), train.subset(val_idx)) if len(val_idx) else (train, None)
    model.to(device)
    trained = list(params) if params is not None else list(model.parameters())
    modes = list(train_modules) if train_modules is not None else None
    loss_fn = loss or cross_entropy
    steps_per_epoch = -(-len(fit_set) // cfg.batch_size)
    opt, sched = (optimizer or keras_adam)(trained, cfg, steps_per_epoch)
    history: list[dict] = []
    best_acc, best_epoch, best_state, stale = -1.0, 0, None, 0
    start_epoch, prior_seconds, resume = 0, 0.0, None
    ckpt = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir is not None else None
    try:
        saved = read_checkpoint(ckpt) if ckpt is not None else None
    except (SafetensorError, OSError, ValueError, KeyError) as exc:  # not ours to repair: start afresh
        warnings.warn(f"{ckpt}: ignoring an unreadable training checkpoint ({exc})", stacklevel=2)
        saved = None
    if saved is not None and saved[1].get("config") == asdict(cfg) and saved[1].get("key") == checkpoint_key:
        tensors, meta = saved
        model.load_state_dict({n[6:]: v for n, v in tensors.items() if n.startswith("model.")})
        load_optimizer(opt, {n[4:]: v for n, v in tensors.items() if n.startswith("opt.")}, meta["optimizer"])
        sched.load_state_dict(meta["scheduler"])
        history, start_epoch = meta["history"], meta["epoch"]
        best_acc, best_epoch, stale = meta["best_val_accuracy"], meta["best_epoch"], meta["stale"]
        best = {n[5:]: v for n, v in tensors.items() if n.startswith("best.")}
        best_state = best or None
        prior_seconds = float(meta["seconds"])
        if meta.get("position") is not None:  # stopped inside epoch ``start_epoch + 1``
            resume = (meta["position"], meta["totals"], meta["seen"], tensors["rng.generator"], tensors["rng.torch"],
                      tensors.get("rng.cuda"))  # fmt: skip
    began = time.perf_counter()
    train_seconds = prior_seconds  # up to the end of the last epoch run (what the checkpoint records)
    periodic = Periodic()

    def save(epoch_done: int, position: int | None = None, totals=None, seen=0, gen=None, seconds=None) -> None:
        state = {f"model.{k}": v for k, v in model.state_dict().items()}
        opt_tensors, opt_meta = optimizer_tensors(opt)
        state.update({f"opt.{k}": v for k, v in opt_tensors.items()})
        state.update({f"best.{k}": v for k, v in (best_state or {}).items()})
        if position is not None:
            state.update({"rng.generator": gen.get_state(), "rng.torch": torch.get_rng_state()})
            if torch.device(device).type == "cuda":  # dropout on the GPU draws from its own generator
                state["rng.cuda"] = torch.cuda.get_rng_state(device)
        meta = {"epoch": epoch_done, "position": position, "totals": totals, "seen": seen,
                "config": asdict(cfg), "key": checkpoint_key, "history": history, "best_val_accuracy": best_acc, "best_epoch": best_epoch,
                "stale": stale, "optimizer": opt_meta, "scheduler": sched.state_dict(),
                "seconds": seconds if seconds is not None else prior_seconds + time.perf_counter() - began}  # fmt: skip
        write_checkpoint(ckpt, state, meta)

    with graceful_interrupts(), trainable_only(model, trained) if params is not None else nullcontext():
        for epoch in range(start_epoch + 1, cfg.epochs + 1):
            if val_set is not None and stale >= cfg.patience:
                break
            gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
            torch.manual_seed(cfg.seed * 100_003 + epoch)  # dropout
            order = torch.randperm(len(fit_set), generator=gen).numpy()
            first, totals, seen = 0, {}, 0
            if resume is not None:  # the random streams exactly where the interrupted epoch left them
                first, totals, seen, gen_state, torch_state, cuda_state = resume
                gen.set_state(gen_state.to(torch.uint8))
                torch.set_rng_state(torch_state.to(torch.uint8))
                if cuda_state is not None and torch.device(device).type == "cuda":
                    torch.cuda.set_rng_state(cuda_state.to(torch.uint8), device)
                resume = None
            augment = functools.partial(random_shift, generator=gen) if cfg.augment else None
            if modes is None:
                model.train()
            else:
                model.eval()
                for module in modes:
                    module.train()
            bar = tqdm(
                range(first, len(order), cfg.batch_size),
                desc=f"epoch {epoch}/{cfg.epochs}",
                disable=not progress,
                leave=False,
            )
            for i in bar:
                idx = order[i : i + cfg.batch_size]
                x, y = fit_set.batch(idx, augment)
                out = loss_fn(model, x.to(device), y.to(device), fit_idx[idx])
                terms = out if isinstance(out, dict) else {"loss": out}
                opt.zero_grad(set_to_none=True)
                terms["loss"].backward()
                if clip_norm:
                    torch.nn.utils.clip_grad_norm_(trained, clip_norm)
                opt.step()
                sched.step()
                for key, value in terms.items():
                    totals[key] = totals.get(key, 0.0) + float(value.detach()) * len(idx)
                seen += len(idx)
                bar.set_postfix(loss=f"{totals['loss'] / seen:.4f}")
                position = i + cfg.batch_size
                if position < len(order) and (stop_requested() or (ckpt is not None and periodic.due())):
                    if ckpt is not None:
                        save(epoch - 1, position, totals, seen, gen)
                    if stop_requested():
                        bar.close()
                        raise _interrupted(ckpt, epoch, position // cfg.batch_size, steps_per_epoch)
            record = {"epoch": epoch, "train_loss": totals.pop("loss") / seen}
            record.update({key: total / seen for key, total in totals.items()})
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
            train_seconds = prior_seconds + time.perf_counter() - began
            if ckpt is not None:
                save(epoch, seconds=train_seconds)
            if on_epoch is not None:
                on_epoch(record)
            if stop_requested() and epoch < cfg.epochs:
                raise _interrupted(ckpt, epoch, steps_per_epoch, steps_per_epoch)
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    session = time.perf_counter() - began
    return TrainResult(
        epochs_run=len(history),
        best_epoch=best_epoch if val_set is not None else len(history),
        best_val_accuracy=best_acc if val_set is not None else None,
        history=history,
        seconds=train_seconds,
        resumed_from_epoch=start_epoch,
        steps=len(history) * steps_per_epoch,
        session_seconds=session,
    )


CHECKPOINT_FILE = "train.safetensors"


def _interrupted(ckpt: Path | None, epoch: int, batch: int, batches: int) -> Interrupted:
    where = f"epoch {epoch}, batch {batch}/{batches}"
    if ckpt is None:
        return Interrupted(f"interrupted at {where}; this training keeps no checkpoint")
    return Interrupted(f"interrupted at {where}; checkpoint written to {ckpt.parent}: run the same command again "
                       "to resume")  # fmt: skip
