"""Fine-Pruning (Liu, Dolan-Gavitt & Garg, RAID 2018): a backdoor hides in neurons that clean inputs leave dormant.

The channels of the last convolution are ranked by their mean activation on the defender's clean images, the
least active pruned first; how many is decided by the shared pruning rule (:func:`~trojanlab.defenses.pruning.
prune_ranked`: the paper prunes "until the accuracy on the validation set drops by a threshold", which is that
rule's automatic mode on the defender's held-out images), and the pruned model is then fine-tuned on the
defender's images with the pruned channels held at zero.

Choices where the paper leaves room: a channel's activation is the mean over images and positions of the
convolution's output after ReLU (the paper's networks put a ReLU after every convolution; taking it here keeps
the ranking the same when one is applied by a functional call the hooks cannot see); pruning zeroes the
channel's filter (with ``--prune-bias``, its bias too) instead of rebuilding a narrower layer, which computes the
same function; the grid is 0-95 % of the channels in steps of 5 %.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..config.training import TrainConfig
from ..data import ImageSet, to_tensor
from ..errors import ConfigError
from ..training import TrainResult, fit
from .anp import NeuronLayer, find_neurons

PRUNING_GRID = tuple(round(0.05 * i, 2) for i in range(20))  # fractions of the channels pruned: 0, 5 %, ..., 95 %


@dataclass
class ChannelRanking:
    """The pruned layer (as one :class:`NeuronLayer` starting at 0), its channels' mean activations and the
    rank-valued masks the shared rule reads: the least active channel ``0.5/C``, the most active ``1 - 0.5/C``, so
    that a grid value is the fraction of channels pruned."""

    layer: str
    layers: list[NeuronLayer]
    activations: torch.Tensor
    masks: torch.Tensor
    seconds: float


def last_convolution(model: nn.Module, example: torch.Tensor, name: str | None = None) -> NeuronLayer:
    """The convolution a forward pass of ``example`` reaches last (or the one called ``name``), as a neuron layer."""
    convs = find_neurons(model, example, kinds=("conv",))
    if name is not None:
        chosen = [layer for layer in convs if layer.name == name]
        if not chosen:
            raise ConfigError(
                f"--layer {name!r} is not a convolution the model uses (it has {[c.name for c in convs]})"
            )
        conv = chosen[0]
    else:
        conv = convs[-1]
    return NeuronLayer(conv.name, "conv", conv.size, 0, conv.module)


@torch.no_grad()
def mean_activations(
    model: nn.Module, layer: NeuronLayer, images: ImageSet, device: str | torch.device = "cpu", batch: int = 256
) -> torch.Tensor:
    """Mean over ``images`` and positions of ReLU of ``layer``'s output, one value per channel."""
    total = torch.zeros(layer.size, dtype=torch.float64)
    seen = 0

    def hook(_module, _inputs, out):
        nonlocal total, seen
        act = torch.relu(out.detach()).double()
        total += act.transpose(0, 1).reshape(layer.size, -1).mean(1).cpu() * len(out)
        seen += len(out)

    was_training = model.training
    model.eval()
    handle = layer.module.register_forward_hook(hook)
    try:
        for i in range(0, len(images), batch):
            model(to_tensor(images.x[i : i + batch]).to(device))
    finally:
        handle.remove()
        model.train(was_training)
    return (total / max(seen, 1)).float()


def rank_masks(activations: torch.Tensor) -> torch.Tensor:
    """Rank-valued masks, the least active channel lowest (ties by index): a grid value prunes that share."""
    n = len(activations)
    order = torch.argsort(activations, stable=True)
    masks = torch.empty(n, dtype=torch.float32)
    masks[order] = (torch.arange(n, dtype=torch.float32) + 0.5) / n
    return masks


def rank_channels(
    model: nn.Module, images: ImageSet, layer: str | None = None, device: str | torch.device = "cpu"
) -> ChannelRanking:
    """The channels of the last convolution (or ``layer``), ranked by mean activation on the clean ``images``."""
    began = time.perf_counter()
    conv = last_convolution(model, to_tensor(images.x[:2]).to(device), layer)
    activations = mean_activations(model, conv, images, device)
    return ChannelRanking(conv.name, [conv], activations, rank_masks(activations), time.perf_counter() - began)


def fine_tune(
    model: nn.Module,
    images: ImageSet,
    epochs: int,
    lr: float,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> TrainResult:
    """Fine-tune ``model`` in place on the clean ``images`` (the one training loop; a tenth held out for the best
    epoch), every filter pruned before (all-zero) kept at zero: its gradient is masked, so Adam never moves it."""
    handles = []
    for module in model.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            dead = module.weight.detach().flatten(1).abs().sum(1) == 0
            if dead.any():
                keep = (~dead).to(module.weight.dtype).view(-1, *([1] * (module.weight.dim() - 1)))
                handles.append(module.weight.register_hook(lambda grad, keep=keep: grad * keep.to(grad.device)))
    try:
        # a tenth held out to keep the best epoch, when some class has two images to hold one out from
        val = 0.1 if (np.bincount(images.y) >= 2).any() else 0.0
        cfg = TrainConfig(epochs=epochs, lr=lr, val_fraction=val, patience=epochs, seed=seed)
        return fit(model, images, cfg, device=device, progress=progress)
    finally:
        for handle in handles:
            handle.remove()
