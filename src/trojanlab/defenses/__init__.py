"""Backdoor removal: Neural Cleanse's unlearning and pruning, Adversarial Neuron Pruning and its sub-network variant."""

from .anp import ANPConfig, find_neurons, optimize_masks, prune_neurons
from .nc_mitigation import prune_by_activation_gap, unlearn, unlearning_set

__all__ = ["ANPConfig", "find_neurons", "optimize_masks", "prune_by_activation_gap", "prune_neurons", "unlearn", "unlearning_set"]
