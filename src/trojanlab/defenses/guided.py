"""Neuron pruning guided by reversed triggers: ANP's neurons, ranked by how much a Neural Cleanse trigger excites them.

ANP ranks neurons by how a perturbation of their weights hurts the clean loss. A backdoor whose units the
perturbation cannot reach (the GTSRB BadNets model: under ANP's noise its answers scatter over many labels instead
of collapsing onto the target) keeps its units' masks high, and ANP prunes victim units first. Neural Cleanse's
own mitigation (Wang et al. 2019, section VI-B) ranks neurons by how much more its *reversed* trigger excites them
than clean images do, a ranking a defender can compute: the reversed trigger comes from a scan of the model, not
from the attacker.

Here the neurons are ANP's (:func:`~trojanlab.defenses.anp.find_neurons`: BatchNorm channels, otherwise conv
channels and linear units, every layer but the classifier), not only the head's inputs as in
:func:`~trojanlab.defenses.nc_mitigation.prune_by_activation_gap`. A neuron's score is the relative rise of its mean
activation (after ReLU; the spatial mean for a channel) on the defender's images of other labels when the reversed
trigger is blended in, ``(stamped - clean) / (clean + 1e-3)``, the largest over the triggers given: a unit almost
silent on clean images that the trigger switches on ranks first, whatever its scale. The ranking becomes
rank-valued masks (the most excited neuron ``0.5/N``, the least ``1 - 0.5/N``) so that ANP's pruning, automatic rule and
curves apply unchanged, with a threshold that reads as the fraction of neurons pruned.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..data import ImageSet, to_tensor
from ..errors import ConfigError
from ..triggers import Trigger, stamp
from .anp import NeuronLayer

GUIDED_GRID = tuple(round(0.01 * i, 2) for i in range(31))  # fractions of the neurons pruned: 0, 1 %, ..., 30 %


@torch.no_grad()
def mean_activations(
    model: nn.Module, layers: Sequence[NeuronLayer], x: torch.Tensor, batch: int = 256
) -> torch.Tensor:
    """Mean post-ReLU output of every neuron of ``layers`` over the images ``x`` (flat, in the layers' order)."""
    sums = [torch.zeros(layer.size) for layer in layers]

    def record(k: int):
        def hook(_module, _inputs, out):
            a = out.detach().relu()
            sums[k] += (a.sum(dim=(0, *range(2, a.dim()))) if a.dim() > 2 else a.sum(0)).cpu()

        return hook

    handles = [layer.module.register_forward_hook(record(k)) for k, layer in enumerate(layers)]
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(x), batch):
            model(x[i : i + batch])
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return torch.cat(sums) / max(len(x), 1)


def trigger_scores(
    model: nn.Module,
    layers: Sequence[NeuronLayer],
    clean: ImageSet,
    triggers: Sequence[Trigger],
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Per neuron, the largest relative rise of its mean activation that one of ``triggers`` causes on the clean
    images of other labels than the trigger's target (see the module docstring)."""
    if not triggers:
        raise ConfigError("guided pruning needs at least one reversed trigger")
    scores = []
    for trigger in triggers:
        keep = clean.y != trigger.target_label
        if not keep.any():
            raise ConfigError(f"every defender image has label {trigger.target_label}: no image to stamp")
        x = to_tensor(clean.x[keep]).to(device)
        base = mean_activations(model, layers, x)
        excited = mean_activations(model, layers, stamp(x, trigger))
        scores.append((excited - base) / (base + 1e-3))
    return torch.stack(scores).amax(0)


def rank_masks(scores: torch.Tensor) -> torch.Tensor:
    """Masks in (0, 1) from scores: the ``k``-th highest score gets ``(k - 1/2) / N`` (ties by index).

    Pruning every neuron with mask <= ``t`` then prunes the ``t * N`` highest-scoring neurons, rounded half up.
    """
    n = scores.numel()
    order = torch.argsort(-scores, stable=True)
    masks = torch.empty(n, dtype=torch.float64)
    masks[order] = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return masks
