"""Backdoor removal: Neural Cleanse's unlearning and pruning, Adversarial Neuron Pruning and its sub-network variant."""

from .anp import ANPConfig, find_neurons, optimize_masks, prune_neurons
from .anp_subnetwork import SubnetworkConfig, remove_part, subnetwork_scores
from .nc_mitigation import prune_by_activation_gap, unlearn, unlearning_set

__all__ = [
    "ANPConfig",
    "SubnetworkConfig",
    "find_neurons",
    "optimize_masks",
    "prune_by_activation_gap",
    "prune_neurons",
    "remove_part",
    "subnetwork_scores",
    "unlearn",
    "unlearning_set",
]
