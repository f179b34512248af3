"""Backdoor removal: Neural Cleanse's unlearning and pruning."""

from .nc_mitigation import prune_by_activation_gap, unlearn, unlearning_set

__all__ = ["prune_by_activation_gap", "unlearn", "unlearning_set"]
