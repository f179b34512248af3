"""Victim models, the artefact format (``model.safetensors`` + ``model.json``) and the architecture registry.

Every module a saved artefact can hold is defined in this package: :mod:`.gtsrb_cnn`, the networks of
:mod:`.registry` (torchvision, EfficientNet-Lite0, user-registered), :class:`Classifier` (:mod:`.artifacts`) and the
TrojanNet pieces (:mod:`.trojannet`). Nothing here imports from the attacks, detection or defenses.
"""

from .artifacts import (
    SPEC_FORMAT,
    Classifier,
    LoadedModel,
    build_classifier,
    build_from_spec,
    classifier_spec,
    load_model,
    save_model,
)
from .gtsrb_cnn import GTSRBCNN
from .registry import build_network, register_architecture
from .trojannet import TrojanNetInjected, TrojanNetMLP, injected_spec, load_official_h5, trojannet_spec

__all__ = [
    "GTSRBCNN",
    "SPEC_FORMAT",
    "Classifier",
    "LoadedModel",
    "TrojanNetInjected",
    "TrojanNetMLP",
    "build_classifier",
    "build_from_spec",
    "build_network",
    "classifier_spec",
    "injected_spec",
    "load_model",
    "load_official_h5",
    "register_architecture",
    "save_model",
    "trojannet_spec",
]
