"""Backdoor removal. :func:`defend` runs any defense of :data:`DEFENSES` (ANP, its NC-guided and sub-network
variants, Fine-Pruning, Neural Cleanse's unlearning and pruning); the algorithms live in their own modules."""

from .registry import DEFENSES, Defense, DefenseContext, DefenseOutcome
from .run import defend

__all__ = ["DEFENSES", "Defense", "DefenseContext", "DefenseOutcome", "defend"]
