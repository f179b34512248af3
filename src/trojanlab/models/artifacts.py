"""Model artefacts: weights in ``model.safetensors``, everything needed to rebuild the model in ``model.json``.

Nothing is ever unpickled: a model under audit comes from a stranger, so the spec names an architecture from
a fixed registry (:mod:`trojanlab.models.registry`: our GTSRB CNN, EfficientNet-Lite0, torchvision classifiers;
and the TrojanNet pieces of :mod:`trojanlab.models.trojannet`) and only tensors are loaded.
A user's own ``nn.Module`` is saved the same way and loaded back into an instance the user passes in.

``model.json`` keys: ``format``, ``kind`` (``classifier``, ``trojannet`` or ``trojannet_injected``), ``arch``,
``num_classes``, ``classes``, ``input_size`` ([C, H, W]), ``normalization`` ({mean, std} applied to inputs in
[0, 1]), ``provenance`` (command, data, seed, version, time) and, for an attacked model, ``triggers`` (the
triggers that travel with it, so ``trojanlab evaluate`` measures ASR without extra flags).
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import ArtifactError
from ..io import atomic_write, write_json
from ..triggers import AnyTrigger, trigger_from_json
from .registry import build_network
from .trojannet import injected_from_spec, mlp_from_spec

SPEC_FORMAT = "trojanlab-model/1"
WEIGHTS_FILE = "model.safetensors"
SPEC_FILE = "model.json"


class Classifier(nn.Module):
    """A network plus its input normalisation: takes raw images as floats in [0, 1], returns logits."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def classifier_spec(
    arch: str,
    classes: Sequence[str],
    input_size: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    provenance: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "format": SPEC_FORMAT,
        "kind": "classifier",
        "arch": arch,
        "num_classes": len(classes),
        "classes": list(classes),
        "input_size": [int(v) for v in input_size],
        "normalization": {"mean": [float(v) for v in mean], "std": [float(v) for v in std]},
        "provenance": provenance or {},
    }


def build_classifier(spec: dict[str, Any], net: nn.Module | None = None) -> Classifier:
    """An untrained :class:`Classifier` from a ``classifier`` spec (or around the user's ``net``)."""
    try:
        norm = spec["normalization"]
        net = net if net is not None else build_network(spec["arch"], int(spec["num_classes"]), spec["input_size"])
        return Classifier(net, norm["mean"], norm["std"])
    except KeyError as exc:
        raise ArtifactError(f"model spec lacks the key {exc}") from exc


def build_from_spec(spec: dict[str, Any], net: nn.Module | None = None) -> nn.Module:
    """Rebuild any artefact's module (untrained) from its spec."""
    kind = spec.get("kind")
    if kind == "classifier":
        return build_classifier(spec, net)
    if kind == "trojannet":
        return mlp_from_spec(spec)
    if kind == "trojannet_injected":
        if "victim" not in spec:
            raise ArtifactError("TrojanNet spec lacks the key 'victim'")
        return injected_from_spec(spec, build_from_spec(spec["victim"], net))
    raise ArtifactError(f"unknown model kind {kind!r} in spec (expected classifier, trojannet, trojannet_injected)")


@dataclass
class LoadedModel:
    module: nn.Module
    spec: dict[str, Any]
    path: Path

    @property
    def triggers(self) -> list[AnyTrigger]:
        return [trigger_from_json(t) for t in self.spec.get("triggers", [])]

    @property
    def num_classes(self) -> int:
        return int(self.spec["num_classes"])


def _provenance_defaults(provenance: dict[str, Any]) -> dict[str, Any]:
    from .. import __version__

    out = {
        "trojanlab_version": __version__,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    out.update(provenance)
    return out


def save_model(model: nn.Module, out_dir: str | Path, spec: dict[str, Any]) -> Path:
    """Write ``model.safetensors`` and ``model.json`` into ``out_dir`` (atomically; tensors only)."""
    out = Path(out_dir)
    spec = dict(spec)
    spec.setdefault("format", SPEC_FORMAT)
    spec["provenance"] = _provenance_defaults(spec.get("provenance", {}))
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    atomic_write(out / WEIGHTS_FILE, lambda tmp: save_file(state, str(tmp), metadata={"format": SPEC_FORMAT}))
    write_json(out / SPEC_FILE, spec)
    return out


def read_spec(path: str | Path) -> dict[str, Any]:
    folder = Path(path)
    spec_path = folder / SPEC_FILE
    if not folder.is_dir():
        raise ArtifactError(f"{folder}: model folder not found")
    if not spec_path.is_file():
        raise ArtifactError(f"{spec_path}: missing (a model artefact is {WEIGHTS_FILE} + {SPEC_FILE})")
    try:
        spec = json.loads(spec_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{spec_path}: not valid JSON ({exc})") from exc
    if not isinstance(spec, dict) or spec.get("format") != SPEC_FORMAT:
        raise ArtifactError(f"{spec_path}: not a trojanlab model spec (format {SPEC_FORMAT!r} expected)")
    return spec


def load_model(path: str | Path, net: nn.Module | None = None, device: str | torch.device = "cpu") -> LoadedModel:
    """Load an artefact folder; ``net`` is the user's own module when the spec's architecture is not buildable."""
    folder = Path(path)
    spec = read_spec(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise ArtifactError(f"{weights}: missing (a model artefact is {WEIGHTS_FILE} + {SPEC_FILE})")
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(f"{weights}: not a readable safetensors file ({exc})") from exc
    module = build_from_spec(spec, net)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ArtifactError(f"{weights}: weights do not fit the architecture in {SPEC_FILE}: {exc}") from exc
    _check_triggers(spec, folder / SPEC_FILE)
    module.to(device).eval()
    return LoadedModel(module, spec, folder)


def _check_triggers(spec: dict[str, Any], where: Path) -> None:
    """The triggers a spec carries are well formed, aim at one of its labels and lie inside its images: a trigger
    aimed at label 999 of a 43-class model would otherwise score an ASR of 0 and look like a failed attack."""
    triggers = spec.get("triggers", [])
    if not isinstance(triggers, list):
        raise ArtifactError(f"{where}: 'triggers' must be a list")
    if not triggers:
        return
    try:
        num_classes = int(spec["num_classes"])
        _, height, width = (int(v) for v in spec.get("input_size", (3, 32, 32)))
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{where}: num_classes or input_size missing or malformed ({exc})") from exc
    for i, data in enumerate(triggers):
        try:
            trigger = trigger_from_json(data)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:  # ConfigError is a ValueError
            raise ArtifactError(f"{where}: trigger {i} is malformed ({exc})") from exc
        if not 0 <= trigger.target_label < num_classes:
            raise ArtifactError(
                f"{where}: trigger {i} targets label {trigger.target_label}, outside the model's {num_classes} classes"
            )
        try:
            trigger.check_fits(height, width)
        except ValueError as exc:
            raise ArtifactError(f"{where}: trigger {i}: {exc}") from exc
