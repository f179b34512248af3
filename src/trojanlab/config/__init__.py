"""Every setting of every method, with its default stated once: plain dataclasses that import nothing heavy.

The library's entry points take these configs, the command line builds its options from their fields
(:mod:`trojanlab.cli.options`) and the ``reproduce`` profiles are checked against them, so a default written here is
the default everywhere. A field's ``metadata`` carries its ``--help`` text and, where the flag is not the field's
name, the flag.
"""

from .attacks import (
    BadNetsConfig,
    BlendedConfig,
    TrojanNetInjectConfig,
    TrojanNetTrainConfig,
    TrojanNNConfig,
    WaNetConfig,
)
from .base import option, to_dict
from .defenses import (
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
from .detection import MMBDConfig, MNTDConfig, MNTDScoreConfig, NCConfig, ScanConfig, StructureConfig
from .training import ModelConfig, TrainConfig, TransferConfig

__all__ = [
    "ANPConfig",
    "AutoConfig",
    "BadNetsConfig",
    "BlendedConfig",
    "DefenderConfig",
    "FinePruningConfig",
    "IBAUConfig",
    "MMBDConfig",
    "MNTDConfig",
    "MNTDScoreConfig",
    "ModelConfig",
    "NCConfig",
    "NCGuidedConfig",
    "NCPruneConfig",
    "NCUnlearnConfig",
    "PruneRule",
    "ScanConfig",
    "StructureConfig",
    "SubnetworkConfig",
    "WarpUnlearnConfig",
    "TrainConfig",
    "TransferConfig",
    "TrojanNNConfig",
    "TrojanNetInjectConfig",
    "TrojanNetTrainConfig",
    "WaNetConfig",
    "option",
    "to_dict",
]
