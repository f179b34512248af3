"""Adversarial Neuron Pruning (Wu & Wang, NeurIPS 2021) for any ``nn.Module``.

A backdoored network collapses under small adversarial perturbations of a few neurons; ANP learns a mask per
neuron that keeps the clean loss low while those neurons are perturbed, and prunes the neurons whose masks fall.

**Neurons.** The official code replaces every BatchNorm layer by a noisy copy, so a network without BN has no
neuron at all (BackdoorBench reports "NA" for it). Here a neuron is found on the model as it is, through forward
hooks, never by rewriting it:

* a channel of an affine BatchNorm layer (official semantics: weight = gamma, bias = beta);
* otherwise an output channel of a ``Conv1d/2d/3d`` or an output unit of a ``Linear`` (weight = its filter, bias
  = its bias; the maintainers' suggestion for BN-free models, methods.md 6.6). A convolution or linear layer whose
  output goes straight into a BatchNorm is left to the BN (a per-channel scale before BN is one neuron, not two);
* the classifier's last layer (the last ``Linear`` with one output per class) is excluded unless asked for.

The hook rewrites a layer's output ``z = w*x + b`` as ``z + (w*x) (s - 1) + b (t - 1)`` with ``s = m`` (clean
path) or ``m + delta`` and ``t = 1 + xi`` (perturbed path); with ``m = 1`` and no noise the output is
bit-identical to the unhooked model. The mask never scales the bias (as the official ``NoisyBatchNorm``).

**Optimisation** (official ``mask_train``): per mini-batch, delta and xi are drawn from U(-eps, eps), moved by
``eps / steps`` times the sign of the clean-loss gradient ``steps`` times (no projection, as the official code),
then the masks take one SGD step (lr 0.2, momentum 0.9) on ``alpha L(m) + (1 - alpha) L(m + delta, 1 + xi)`` and
are clamped to [0, 1]. Departures, each measured or argued in the README: the network stays in ``eval`` mode by
default (a defender's few hundred images would otherwise rewrite BatchNorm running statistics and dropout would add
noise of its own; ``train_mode=True`` restores the official behaviour), so the clean and perturbed forwards run as
one batch of twice the size; network weights never receive gradients (the official code computes and discards
them); images are drawn with replacement and shifted by up to 2 pixels (the official random crop; no flips, which
change the meaning of traffic signs).

**Pruning** is applied to the *original* weights (never to the ones the optimisation ran on): a pruned BN channel
gets gamma 0, a pruned conv/linear neuron a zero filter; the bias is kept by default (the official semantics: the
neuron then outputs a constant and carries no signal; the mask optimisation assumed exactly that) or zeroed with
``prune_bias=True`` (the neuron outputs 0). Rules: every neuron with mask <= a threshold, the lowest fraction, the
lowest count, or ``auto``: the largest threshold of the official grid (0, 0.05, ..., 0.95) whose pruned model keeps
its accuracy on jittered copies of the defender's held-out clean images within a tolerance of the unpruned one. No rule reads
triggered data; BackdoorBench's choice by minimum test ASR is not offered.
"""

from __future__ import annotations

import copy
import functools
import json
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn

from ..config.defenses import AUTO_MEASURES, PRUNE_RULES, ANPConfig
from ..data import ImageSet, to_tensor
from ..errors import ConfigError, Interrupted
from ..hooks import classifier_layer, trainable_only
from ..interrupts import graceful_interrupts, stop_requested
from ..io import atomic_write, tensor_digest
from ..training import load_state, random_shift, save_state

THRESHOLD_GRID = tuple(round(0.05 * i, 2) for i in range(20))  # the official 0, 0.05, ..., 0.95

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_ELEMENTWISE = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Hardswish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Identity,
)


# ----------------------------------------------------------------------------------------------- neurons


@dataclass
class NeuronLayer:
    """One layer's neurons: ``kind`` is ``bn``, ``conv`` or ``linear``; they occupy ``[start, start + size)`` of the
    flat mask vector."""

    name: str
    kind: str
    size: int
    start: int
    module: nn.Module = field(repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "neurons": self.size, "start": self.start}


def _channel_shape(kind: str, out: torch.Tensor) -> tuple[int, ...]:
    """How a per-channel vector broadcasts over ``out``: dim 1 for BN and conv, the last dim for linear."""
    if kind == "linear":
        return (1,) * (out.dim() - 1) + (-1,)
    return (1, -1) + (1,) * (out.dim() - 2)


def _bias(layer: NeuronLayer) -> torch.Tensor | None:
    return layer.module.bias


def find_neurons(
    model: nn.Module,
    example: torch.Tensor,
    num_classes: int | None = None,
    include_classifier: bool = False,
    kinds: Sequence[str] = ("bn", "conv", "linear"),
) -> list[NeuronLayer]:
    """The neuron layers of ``model``, in the order a forward pass of ``example`` (raw images) reaches them.

    One forward pass tells which convolution or linear layer feeds a BatchNorm (its output, possibly through an
    element-wise activation module such as ReLU, is the BN's input: the TrojanNet MLP's Linear -> ReLU -> BN) and
    which layers are used at all; layers the forward never calls are not neurons.
    """
    fed_bn: set[str] = set()
    called: list[str] = []
    produced: dict[int, str] = {}
    handles = []
    names = {id(m): n for n, m in model.named_modules()}

    def after(module, _inputs, out):
        name = names[id(module)]
        if name not in called:
            called.append(name)
        if isinstance(out, torch.Tensor):
            produced[id(out)] = name

    def before_bn(_module, inputs):
        source = produced.get(id(inputs[0]))
        if source is not None:
            fed_bn.add(source)

    def passes_on(_module, inputs, out):  # an element-wise activation keeps the channel it was given
        source = produced.get(id(inputs[0]))
        if source is not None and isinstance(out, torch.Tensor):
            produced[id(out)] = source

    for module in model.modules():
        if isinstance(module, _BN + _CONV + (nn.Linear,)):
            handles.append(module.register_forward_hook(after))
        elif isinstance(module, _ELEMENTWISE):
            handles.append(module.register_forward_hook(passes_on))
        if isinstance(module, _BN):
            handles.append(module.register_forward_pre_hook(before_bn))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    excluded = None
    if num_classes is not None and not include_classifier:
        try:
            excluded = classifier_layer(model, num_classes)[0]
        except ConfigError:
            excluded = None
    modules = dict(model.named_modules())
    layers: list[NeuronLayer] = []
    start = 0
    for name in called:
        module = modules[name]
        if isinstance(module, _BN):
            if not module.affine:
                continue
            kind, size = "bn", module.num_features
        elif isinstance(module, _CONV):
            kind, size = "conv", module.out_channels
        else:
            kind, size = "linear", module.out_features
        if kind not in kinds or name == excluded or (kind != "bn" and name in fed_bn and "bn" in kinds):
            continue
        layers.append(NeuronLayer(name, kind, size, start, module))
        start += size
    if not layers:
        raise ConfigError(
            "the model has no BatchNorm, convolution or linear neurons to perturb (besides the classifier layer)"
        )
    return layers


class NeuronPerturbation:
    """Masks and multiplicative noise on every neuron of ``layers``, attached to the model by forward hooks.

    ``mode``: ``off`` (hooks do nothing), ``clean`` (mask only), ``perturbed`` (mask + delta, bias x (1 + xi)) or
    ``both`` (the first half of the batch clean, the second half perturbed: one forward for the two ANP terms,
    valid when no layer mixes samples, i.e. in eval mode).
    """

    def __init__(self, layers: Sequence[NeuronLayer], device: str | torch.device = "cpu") -> None:
        self.layers = list(layers)
        total = sum(layer.size for layer in self.layers)
        self.mask = torch.ones(total, device=device, requires_grad=True)
        self.delta = torch.zeros(total, device=device, requires_grad=True)
        self.xi = torch.zeros(total, device=device, requires_grad=True)
        self.mode = "off"
        self._handles: list = []

    @property
    def size(self) -> int:
        return self.mask.numel()

    def _hook(self, layer: NeuronLayer, _module, _inputs, out: torch.Tensor) -> torch.Tensor:
        if self.mode == "off":
            return out
        sl = slice(layer.start, layer.start + layer.size)
        m, d, xi = self.mask[sl], self.delta[sl], self.xi[sl]
        shape = _channel_shape(layer.kind, out)
        bias = _bias(layer)
        wx = out if bias is None else out - bias.view(shape)
        if self.mode == "clean":
            return out + wx * (m - 1).view(shape)
        if self.mode == "perturbed":
            result = out + wx * (m + d - 1).view(shape)
            return result if bias is None else result + (bias * xi).view(shape)
        if self.mode == "both":
            half = out.shape[0] // 2
            scale = torch.cat([(m - 1).expand(half, -1), (m + d - 1).expand(out.shape[0] - half, -1)])
            bshape = (out.shape[0],) + _channel_shape(layer.kind, out)[1:]
            result = out + wx * scale.view(bshape)
            if bias is not None:
                noise = torch.cat([torch.zeros_like(xi).expand(half, -1), (bias * xi).expand(out.shape[0] - half, -1)])
                result = result + noise.view(bshape)
            return result
        raise ConfigError(f"unknown perturbation mode {self.mode!r}")

    def attach(self) -> None:
        for layer in self.layers:
            self._handles.append(layer.module.register_forward_hook(functools.partial(self._hook, layer)))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @contextmanager
    def attached(self) -> Iterator[NeuronPerturbation]:
        self.attach()
        try:
            yield self
        finally:
            self.detach()

    @contextmanager
    def using(self, mode: str) -> Iterator[None]:
        previous, self.mode = self.mode, mode
        try:
            yield
        finally:
            self.mode = previous

    def describe(self, index: int) -> tuple[str, int]:
        """(layer name, neuron index in the layer) of flat neuron ``index``."""
        for layer in self.layers:
            if layer.start <= index < layer.start + layer.size:
                return layer.name, index - layer.start
        raise IndexError(index)


# ----------------------------------------------------------------------------------------------- optimisation


@dataclass
class ANPResult:
    layers: list[NeuronLayer]
    masks: torch.Tensor
    history: list[dict[str, float]]
    seconds: float
    samples: int
    config: dict[str, Any]

    def mask_table(self) -> list[dict[str, Any]]:
        """One row per neuron (flat index, layer, neuron, mask), ascending by mask (the pruning order)."""
        rows = []
        for layer in self.layers:
            for k in range(layer.size):
                rows.append({"index": layer.start + k, "layer": layer.name, "neuron": k})
        values = self.masks.tolist()
        for row in rows:
            row["mask"] = values[row["index"]]
        return sorted(rows, key=lambda row: (row["mask"], row["index"]))

    def order(self) -> torch.Tensor:
        """Flat neuron indices from the lowest mask to the highest (ties by index: deterministic)."""
        return torch.tensor([row["index"] for row in self.mask_table()], dtype=torch.long)


def optimize_masks(
    model: nn.Module,
    clean: ImageSet,
    config: ANPConfig | None = None,
    num_classes: int | None = None,
    device: str | torch.device = "cpu",
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
    log_every: int = 50,
) -> ANPResult:
    """Learn one mask per neuron of ``model`` on the defender's ``clean`` images (the model is left untouched).

    With ``checkpoint_dir``, the masks and optimiser state are saved every ``log_every`` iterations and a later call
    with the same configuration, weights and images resumes from them (or returns at once when finished).
    """
    from tqdm.auto import tqdm

    cfg = config or ANPConfig()
    if len(clean) == 0:
        raise ConfigError("ANP needs at least one clean image")
    model.to(device)
    x_all = to_tensor(clean.x).to(device)
    y_all = torch.as_tensor(clean.y).to(device)
    layers = find_neurons(model, x_all[:2], num_classes, cfg.include_classifier)
    noise = NeuronPerturbation(layers, device)
    opt = torch.optim.SGD([noise.mask], lr=cfg.lr, momentum=cfg.momentum)
    gen = torch.Generator().manual_seed(cfg.seed)
    fingerprint = {
        "config": {k: v for k, v in asdict(cfg).items() if k != "masks_from"},
        "model_sha256": tensor_digest(model.state_dict().values()),
        "data_sha256": tensor_digest([torch.as_tensor(clean.x), torch.as_tensor(clean.y)]),
        "neurons": [layer.to_json() for layer in layers],
    }
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    start, history, seconds0 = 0, [], 0.0
    if cfg.masks_from is not None:  # an earlier run's masks, only if learnt on this very model, data and settings
        source = Path(cfg.masks_from) / "checkpoint"
        try:
            saved = load_state(source, "anp_state", fingerprint, opt)
        except (OSError, KeyError, ValueError, RuntimeError, SafetensorError) as exc:
            raise ConfigError(f"--masks-from {cfg.masks_from}: unreadable ANP state ({exc})") from None
        if saved is None:
            raise ConfigError(
                f"--masks-from {cfg.masks_from}: holds no ANP masks learnt on this model, defender data and ANP "
                "settings"
            )
        tensors, meta = saved
        with torch.no_grad():
            noise.mask.copy_(tensors["mask"])
        gen.set_state(tensors["generator"])
        start, history, seconds0 = int(meta["iteration"]), meta["history"], float(meta["seconds"])
    elif ckpt is not None:
        try:
            saved = load_state(ckpt, "anp_state", fingerprint, opt)
            if saved is not None:
                tensors, meta = saved
                with torch.no_grad():
                    noise.mask.copy_(tensors["mask"])
                gen.set_state(tensors["generator"])
                start, history, seconds0 = int(meta["iteration"]), meta["history"], float(meta["seconds"])
        except (OSError, KeyError, ValueError, RuntimeError, SafetensorError) as exc:
            warnings.warn(f"{ckpt}: ignoring an unreadable ANP checkpoint ({exc})", stacklevel=2)
            start, history, seconds0 = 0, [], 0.0
    augment = functools.partial(random_shift, generator=gen) if cfg.augment else None
    was_training = model.training
    model.train(cfg.train_mode)
    began = time.perf_counter()
    bar = tqdm(total=cfg.iterations, initial=start, desc="ANP masks", unit="it", disable=not progress, leave=False)
    running = {"natural": 0.0, "robust": 0.0, "n": 0}
    try:
        with graceful_interrupts(), noise.attached(), trainable_only(model):
            for it in range(start, cfg.iterations):
                idx = torch.randint(len(clean), (cfg.batch_size,), generator=gen)
                x, y = x_all[idx.to(device)], y_all[idx.to(device)]
                if augment is not None:
                    x = augment(x.cpu()).to(device)
                if cfg.eps > 0:
                    with torch.no_grad():  # a fresh random start on the CPU generator: same draws on any device
                        noise.delta.copy_(torch.empty(noise.size).uniform_(-cfg.eps, cfg.eps, generator=gen))
                        noise.xi.copy_(torch.empty(noise.size).uniform_(-cfg.eps, cfg.eps, generator=gen))
                    for _ in range(cfg.steps):
                        with noise.using("perturbed"):
                            loss = F.cross_entropy(model(x), y)
                        g_delta, g_xi = torch.autograd.grad(loss, [noise.delta, noise.xi])
                        with torch.no_grad():
                            noise.delta.add_(g_delta.sign(), alpha=cfg.eps / cfg.steps)
                            noise.xi.add_(g_xi.sign(), alpha=cfg.eps / cfg.steps)
                opt.zero_grad(set_to_none=True)
                if cfg.alpha == 0 or cfg.eps == 0:
                    with noise.using("perturbed" if cfg.eps > 0 else "clean"):
                        loss_rob = loss_nat = F.cross_entropy(model(x), y)
                    total = loss_nat
                elif cfg.train_mode:
                    with noise.using("clean"):
                        loss_nat = F.cross_entropy(model(x), y)
                    with noise.using("perturbed"):
                        loss_rob = F.cross_entropy(model(x), y)
                    total = cfg.alpha * loss_nat + (1 - cfg.alpha) * loss_rob
                else:
                    with noise.using("both"):
                        logits = model(torch.cat([x, x]))
                    loss_nat = F.cross_entropy(logits[: len(x)], y)
                    loss_rob = F.cross_entropy(logits[len(x) :], y)
                    total = cfg.alpha * loss_nat + (1 - cfg.alpha) * loss_rob
                total.backward()
                opt.step()
                with torch.no_grad():
                    noise.mask.clamp_(0, 1)
                running["natural"] += float(loss_nat.detach())
                running["robust"] += float(loss_rob.detach())
                running["n"] += 1
                bar.update(1)
                done = it + 1
                if done % log_every == 0 or done == cfg.iterations:
                    n = max(running["n"], 1)
                    history.append(
                        {
                            "iteration": done,
                            "natural_loss": running["natural"] / n,
                            "robust_loss": running["robust"] / n,
                            "mean_mask": float(noise.mask.detach().mean()),
                            "below_0.2": int((noise.mask <= 0.2).sum()),
                        }
                    )
                    running = {"natural": 0.0, "robust": 0.0, "n": 0}
                    bar.set_postfix(rob=f"{history[-1]['robust_loss']:.3f}", low=history[-1]["below_0.2"])
                    if ckpt is not None:
                        _write_checkpoint(
                            ckpt, fingerprint, done, history, seconds0 + time.perf_counter() - began, noise, gen, opt
                        )
                if stop_requested() and done < cfg.iterations and (ckpt is None or done % log_every == 0):
                    kept = (
                        f"checkpoint written to {ckpt}: run the same command again to resume"
                        if ckpt
                        else ("this run keeps no checkpoint")
                    )
                    raise Interrupted(f"interrupted at ANP iteration {done}/{cfg.iterations}; {kept}")
    finally:
        bar.close()
        model.train(was_training)
        noise.mode = "off"
    seconds = seconds0 + time.perf_counter() - began
    return ANPResult(layers, noise.mask.detach().cpu().clone(), history, seconds, cfg.passes(), asdict(cfg))


def _write_checkpoint(ckpt: Path, fingerprint, iteration, history, seconds, noise, gen, opt) -> None:
    tensors = {"mask": noise.mask, "generator": gen.get_state()}
    meta = {"fingerprint": fingerprint, "iteration": iteration, "history": history, "seconds": seconds}
    save_state(ckpt, "anp_state", tensors, opt, meta)


@torch.no_grad()
def _predict_all(model: nn.Module, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([model(x[i : i + batch]).argmax(1) for i in range(0, len(x), batch)])


def collapse_check(
    model: nn.Module,
    layers: Sequence[NeuronLayer],
    clean: ImageSet,
    eps: float = 0.4,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """ANP's premise, measured: how the unmasked model behaves under one ANP perturbation of every neuron.

    The perturbation is the one the optimisation uses (random start in [-eps, eps], one signed ascent step of the
    clean loss on ``clean``). A backdoored model "collapses" when most of its perturbed predictions go to one label
    (the paper's Figure 1: often the target); when they scatter instead, ANP's masks have nothing to single out.
    """
    x = to_tensor(clean.x).to(device)
    y = torch.as_tensor(clean.y).to(device)
    noise = NeuronPerturbation(layers, device)
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        with graceful_interrupts(), noise.attached(), trainable_only(model):
            with torch.no_grad():
                noise.delta.copy_(torch.empty(noise.size).uniform_(-eps, eps, generator=gen))
                noise.xi.copy_(torch.empty(noise.size).uniform_(-eps, eps, generator=gen))
            with noise.using("perturbed"):
                loss = F.cross_entropy(model(x), y)
            g_delta, g_xi = torch.autograd.grad(loss, [noise.delta, noise.xi])
            with torch.no_grad():
                noise.delta.add_(g_delta.sign(), alpha=eps)
                noise.xi.add_(g_xi.sign(), alpha=eps)
            with noise.using("perturbed"):
                predicted = _predict_all(model, x)
    finally:
        model.train(was_training)
    counts = torch.bincount(predicted.cpu(), minlength=int(predicted.max()) + 1)
    top = torch.argsort(counts, descending=True)[:3]
    return {
        "eps": eps,
        "images": len(x),
        "accuracy_under_perturbation": float((predicted == y).float().mean()),
        "most_predicted": [[int(label), float(counts[label]) / len(x)] for label in top],
    }


# ----------------------------------------------------------------------------------------------- pruning


def prune_neurons(
    model: nn.Module, layers: Sequence[NeuronLayer], indices: Sequence[int] | torch.Tensor, prune_bias: bool = False
) -> nn.Module:
    """A copy of ``model`` with the flat neurons ``indices`` pruned in its weights (``model`` is not modified).

    ``layers`` must come from :func:`find_neurons` on ``model`` (their names are looked up in the copy).
    """
    pruned = copy.deepcopy(model)
    modules = dict(pruned.named_modules())
    index = torch.as_tensor(list(indices) if not isinstance(indices, torch.Tensor) else indices, dtype=torch.long)
    with torch.no_grad():
        for layer in layers:
            inside = index[(index >= layer.start) & (index < layer.start + layer.size)] - layer.start
            if len(inside) == 0:
                continue
            module = modules[layer.name]
            module.weight[inside] = 0
            if prune_bias and module.bias is not None:
                module.bias[inside] = 0
    return pruned


def pruned_per_layer(layers: Sequence[NeuronLayer], indices: Sequence[int] | torch.Tensor) -> dict[str, int]:
    index = torch.as_tensor(list(indices) if not isinstance(indices, torch.Tensor) else indices, dtype=torch.long)
    counts = {}
    for layer in layers:
        n = int(((index >= layer.start) & (index < layer.start + layer.size)).sum())
        if n:
            counts[layer.name] = n
    return counts


def select_by_rule(masks: torch.Tensor, rule: str, value: float) -> torch.Tensor:
    """Flat indices pruned by ``threshold`` (mask <= value), ``fraction`` (lowest share) or ``count`` (lowest n)."""
    order = torch.argsort(masks, stable=True)
    if rule == "threshold":
        return torch.nonzero(masks <= value).flatten()
    if rule == "fraction":
        if not 0 <= value <= 1:
            raise ConfigError(f"the pruned fraction must lie in [0, 1], got {value}")
        return order[: round(value * len(masks))]
    if rule == "count":
        if value < 0 or value != int(value):
            raise ConfigError(f"the pruned count must be a non-negative integer, got {value}")
        return order[: min(int(value), len(masks))]
    raise ConfigError(f"unknown pruning rule {rule!r}; choose one of {PRUNE_RULES}")


def threshold_prunings(masks: torch.Tensor, grid: Sequence[float]) -> Iterator[tuple[float, torch.Tensor, bool]]:
    """``(threshold, pruned indices, new)`` for each threshold of the increasing ``grid``; ``new`` is False when the
    threshold prunes the same neurons as the one before (or none, for the first): a caller can reuse what it
    measured last instead of measuring the same model again."""
    count = 0
    for threshold in grid:
        index = select_by_rule(masks, "threshold", threshold)
        yield threshold, index, len(index) != count  # thresholds only add neurons: the same count is the same set
        count = len(index)


@torch.no_grad()
def _held_out_scores(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> dict[str, float]:
    """Top-1 accuracy and expected accuracy (mean softmax probability of the true label) on ``x``."""
    model.eval()
    probs = torch.cat([F.softmax(model(x[i : i + batch]), 1) for i in range(0, len(x), batch)])
    return {
        "top1": float((probs.argmax(1) == y).float().mean()),
        "probability": float(probs[torch.arange(len(y)), y].mean()),
    }


def jitter_images(x: torch.Tensor, copies: int, generator: torch.Generator) -> torch.Tensor:
    """``copies`` label-preserving jittered versions of the raw images ``x`` (``(N, C, H, W)`` in [0, 1]), copy by copy.

    Each image of each copy is shifted by up to a tenth of its side (edge pixels replicated; 3 pixels at 32 x 32),
    its brightness moved by up to +-0.2, its contrast scaled by 0.8-1.2 and Gaussian noise of std 0.03 added. The
    automatic pruning rule scores these instead of the images themselves: a defender's images usually come from the
    model's training split, which it has memorised, so their own accuracy barely moves while test accuracy falls.
    """
    if copies < 1:
        raise ConfigError(f"jitter_images needs copies >= 1, got {copies}")
    n, _, h, w = x.shape
    shift = max(1, round(0.1 * min(h, w)))
    out = []
    for _ in range(copies):
        moved = random_shift(x, generator, shift)
        brightness = (torch.rand(n, 1, 1, 1, generator=generator) - 0.5) * 0.4
        contrast = 1 + (torch.rand(n, 1, 1, 1, generator=generator) - 0.5) * 0.4
        noise = torch.randn(moved.shape, generator=generator) * 0.03
        out.append(((moved - 0.5) * contrast + 0.5 + brightness + noise).clamp_(0, 1))
    return torch.cat(out)


def auto_threshold(
    model: nn.Module,
    layers: Sequence[NeuronLayer],
    masks: torch.Tensor,
    holdout: ImageSet,
    tolerance: float = 0.02,
    grid: Sequence[float] = THRESHOLD_GRID,
    prune_bias: bool = False,
    device: str | torch.device = "cpu",
    measure: str = "top1",
    jitter: int = 8,
    seed: int = 0,
    scored: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[float, list[dict[str, float]]]:
    """The largest threshold of ``grid`` whose pruned model keeps the accuracy on ``holdout`` (clean images the
    masks were not fitted on) within ``tolerance`` of the unpruned model's; the curve measured along the way.

    ``jitter`` copies of every held-out image (:func:`jitter_images`, drawn once from ``seed``) are what is scored;
    ``jitter=0`` scores the images as they are. ``measure`` is how accuracy is read: ``top1`` (default) counts
    argmax hits, ``probability`` is the expected accuracy, the mean softmax probability of the true label. On
    images a model has fitted (a defender's usually come from the training split, and GTSRB's come in tracks of
    near-identical frames) top-1 accuracy stays at 100 % until the pruned model is badly damaged; on jittered
    copies it falls about as fast as test accuracy does (measured in the README), and the expected accuracy of
    unjittered images falls too, but several times more slowly.

    ``scored`` (images and labels) replaces both: the checked held-out measure's images
    (:mod:`~trojanlab.defenses.heldout`), already jittered to the strength where the model scores its stated clean
    accuracy.

    Only clean images are read: a defender has no triggered data. Thresholds are tried in increasing order and the
    search stops at the first one that breaks the tolerance (a larger threshold prunes a superset).
    """
    if len(holdout) == 0:
        raise ConfigError("the automatic pruning rule needs held-out clean images")
    if measure not in AUTO_MEASURES:
        raise ConfigError(f"unknown held-out measure {measure!r}; choose one of {AUTO_MEASURES}")
    if jitter < 0:
        raise ConfigError(f"the automatic rule's jitter must be >= 0 copies, got {jitter}")
    x = to_tensor(holdout.x)
    y = torch.as_tensor(holdout.y)
    if scored is not None:
        x, y = scored
    elif jitter:
        x, y = jitter_images(x, jitter, torch.Generator().manual_seed(seed)), y.repeat(jitter)
    x, y = x.to(device), y.to(device)
    unpruned = _held_out_scores(model, x, y)
    base = unpruned[measure]
    chosen, curve, scores = None, [], unpruned
    for threshold, index, new in threshold_prunings(masks, grid):
        if new:
            scores = _held_out_scores(prune_neurons(model, layers, index, prune_bias), x, y)
        curve.append(
            {
                "threshold": float(threshold),
                "pruned": len(index),
                "holdout_accuracy": scores["top1"],
                "holdout_probability": scores["probability"],
            }
        )
        if base - scores[measure] > tolerance + 1e-12:
            break
        chosen = float(threshold)
    if chosen is None:  # even threshold grid[0] breaks the tolerance: prune nothing
        chosen = -1.0
    return chosen, curve


# ----------------------------------------------------------------------------------------------- plots


def plot_masks(masks: torch.Tensor, path: str | Path, threshold: float | None = None) -> Path:
    """Histogram of the ANP mask values (log count axis) with the pruning threshold; no masks: a note in words."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = masks.detach().flatten().cpu().numpy()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    if values.size == 0:
        ax.axis("off")
        ax.text(0.5, 0.5, "ANP masks: no neuron was masked, so there is no histogram to draw.", ha="center",
                va="center", wrap=True)  # fmt: skip
    else:
        counts, _, _ = ax.hist(values, bins=50, range=(0, 1), color="#4472c4")
        ax.set_yscale("log")
        ax.set_ylim(0.8, max(float(counts.max()), 1.0) * 1.5)  # a log axis from below one neuron up
        ax.set_xlim(0, 1)
        if threshold is not None and threshold >= 0:
            pruned = int((values <= threshold).sum())
            ax.axvline(threshold, color="#c00000", linestyle="--",
                       label=f"pruning threshold {threshold:.2f} ({pruned:,} pruned)")  # fmt: skip
            ax.legend(fontsize=8)
        ax.set_xlabel("ANP mask value (0 = neuron removed, 1 = kept)")
        ax.set_ylabel("neurons (log scale)")
        ax.set_title(f"ANP masks of {values.size:,} neurons")
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return path


def plot_pruning_curve(curve: Sequence[dict[str, float]], path: str | Path, chosen: float | None = None) -> Path:
    """Clean accuracy and ASR (test split) against the fraction of neurons pruned.

    A curve of a single pruning level (or none) is no curve: the figure then states the measured values in words
    rather than drawing a line on a degenerate axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..reproduce.report import pct

    series = [("clean_accuracy", "clean accuracy", "o-", "#4472c4"), ("attack_success_rate", "ASR", "s-", "#c00000"),
              ("holdout_accuracy", "held-out accuracy", ".--", "#70ad47")]  # fmt: skip
    frac = [float(c["fraction"]) for c in curve]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if len(set(frac)) < 2:
        ax.axis("off")
        if not curve:
            text = "No pruning level was measured: there is no curve to draw."
        else:
            first = (f"Only one pruning level was measured ({pct(frac[0])} of the neurons pruned),"
                     if len(curve) == 1 else
                     f"All {len(curve)} points measured prune the same {pct(frac[0])} of the neurons,")  # fmt: skip
            lines = [first, "so there is no curve to draw. At that level:"]
            for key, label, _, _ in series:
                values = [c[key] for c in curve if c.get(key) is not None]
                if values:
                    lines.append(f"{label}: {pct(values[0])}")
            if chosen is not None:
                lines.append(f"chosen: {pct(chosen)} of the neurons pruned")
            text = "\n".join(lines)
        ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=10)
    else:
        for key, label, style, colour in series:
            if any(c.get(key) is not None for c in curve):
                ax.plot(frac, [c.get(key, np.nan) for c in curve], style, label=label, color=colour)
        if chosen is not None:
            ax.axvline(chosen, color="grey", linestyle=":", label=f"chosen ({pct(chosen, 1)} pruned)")
        shown = frac + ([chosen] if chosen is not None else [])
        lo, hi = min(shown), max(shown)
        pad = 0.03 * (hi - lo)
        ax.set_xlim(lo - pad, hi + pad)
        ax.set_xlabel("fraction of neurons pruned (in the defense's order)")
        ax.set_ylabel("rate on the test images")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return path


def save_masks(result: ANPResult, path: str | Path) -> Path:
    meta = {"layers": json.dumps([layer.to_json() for layer in result.layers])}
    return atomic_write(path, lambda tmp: save_file({"masks": result.masks.contiguous()}, str(tmp), metadata=meta))
