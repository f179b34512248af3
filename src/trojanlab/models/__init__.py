"""Victim models, the artefact format (``model.safetensors`` + ``model.json``) and the architecture registry."""

from .artifacts import (
    SPEC_FORMAT,
    Classifier,
    LoadedModel,
    build_classifier,
    build_from_spec,
    classifier_spec,
    load_model,
    register_architecture,
    save_model,
)
from .gtsrb_cnn import GTSRBCNN

__all__ = [
    "GTSRBCNN",
    "SPEC_FORMAT",
    "Classifier",
    "LoadedModel",
    "build_classifier",
    "build_from_spec",
    "classifier_spec",
    "load_model",
    "register_architecture",
    "save_model",
]
