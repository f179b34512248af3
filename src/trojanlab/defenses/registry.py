"""The defense family's registry: a defense joins with one line here (its configs, its ``apply``, a help line)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..config.defenses import (
    ANPConfig,
    AutoConfig,
    DefenderConfig,
    FinePruningConfig,
    IBAUConfig,
    NCGuidedConfig,
    NCPruneConfig,
    NCUnlearnConfig,
    PruneRule,
    SubnetworkConfig,
    WarpUnlearnConfig,
)
from .auto import auto_defense
from .base import DefenseContext, DefenseOutcome
from .ibau import ibau_defense
from .pruning import anp_defense, fine_pruning_defense, nc_guided_defense
from .repair import nc_prune_defense, nc_unlearn_defense, subnetwork_defense
from .warp_unlearning import warp_unlearn_defense


@dataclass(frozen=True)
class Defense:
    """``apply(context, *configs)`` with one instance of each class of ``configs``; ``output`` is the run folder's
    sub-folder the repaired model goes to; ``defender`` the default clean-data settings."""

    configs: tuple[type, ...]
    apply: Callable[..., DefenseOutcome]
    help: str
    output: str = "pruned"
    defender: DefenderConfig = field(default_factory=DefenderConfig)


UNLEARNING_DEFENDER = DefenderConfig(clean_fraction=0.05, holdout=0.2)
"""The clean-data default of the unlearning defenses (I-BAU's: 5 % of the training split, a fifth held out)."""

DEFENSES: dict[str, Defense] = {
    "anp": Defense((ANPConfig, PruneRule), anp_defense,
                   "Adversarial Neuron Pruning (Wu & Wang 2021) on any model"),
    "nc-guided": Defense((NCGuidedConfig, PruneRule), nc_guided_defense,
                         "ANP's neurons ranked by how much Neural Cleanse's reversed triggers excite them"),
    "fine-pruning": Defense((FinePruningConfig, PruneRule), fine_pruning_defense,
                            "Fine-Pruning (Liu et al. 2018): prune the last convolution's dormant channels, fine-tune"),
    "subnetwork": Defense((SubnetworkConfig,), subnetwork_defense,
                          "the thesis's sub-network ANP: remove the part of a TrojanNet-injected model that is the "
                          "backdoor"),
    "nc-unlearn": Defense((NCUnlearnConfig,), nc_unlearn_defense,
                          "Neural Cleanse's unlearning with its reversed triggers", output="repaired",
                          defender=DefenderConfig(clean_fraction=0.1)),
    "nc-prune": Defense((NCPruneConfig,), nc_prune_defense,
                        "Neural Cleanse's pruning of the classifier inputs its reversed triggers excite",
                        output="repaired", defender=DefenderConfig(clean_fraction=0.1)),
    "ibau": Defense((IBAUConfig,), ibau_defense,
                    "I-BAU (Zeng et al. 2022): adversarial unlearning of the universal perturbation the model is "
                    "most fooled by, along the implicit hypergradient", output="repaired",
                    defender=UNLEARNING_DEFENDER),
    "warp-unlearn": Defense((WarpUnlearnConfig,), warp_unlearn_defense,
                            "unlearn random smooth warps (WaNet's kind) at the true labels", output="repaired",
                            defender=UNLEARNING_DEFENDER),
    "auto": Defense((AutoConfig,), auto_defense,
                    "scan the model, then cut a merged branch or unlearn the reversed trigger and run I-BAU, each step "
                    "kept only within the held-out tolerance", output="repaired",
                    defender=UNLEARNING_DEFENDER),
}  # fmt: skip

__all__ = ["DEFENSES", "Defense", "DefenseContext", "DefenseOutcome"]
