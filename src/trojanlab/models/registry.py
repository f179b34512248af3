"""The architecture registry: an untrained network from a name, as a ``classifier`` spec's ``arch`` names it.

Built in: ``gtsrb_cnn`` (:class:`~trojanlab.models.gtsrb_cnn.GTSRBCNN`), ``gtsrb_cnn_bn`` (the same with a
BatchNorm after every convolution and FC 512), ``efficientnet_lite0`` (the
``efficientnet-lite-pytorch`` port) and any torchvision classifier by its name (``resnet18``, ``vgg16``,
``inception_v3``, ...). :func:`register_architecture` adds a name. Nothing here loads weights: pretrained backbones
are :mod:`trojanlab.models.backbones`, saved artefacts :mod:`trojanlab.models.artifacts`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from ..errors import ConfigError
from .gtsrb_cnn import GTSRBCNN

Factory = Callable[[int, tuple[int, int, int]], nn.Module]


def _lite_package():
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise ConfigError(
            "efficientnet_lite0 needs the efficientnet-lite-pytorch package (pip install efficientnet-lite-pytorch)"
        ) from exc
    return EfficientNet


def efficientnet_lite0(num_classes: int, input_size: tuple[int, int, int] = (3, 224, 224)) -> nn.Module:
    """The EfficientNet-Lite0 architecture (untrained) with ``num_classes`` outputs (head ``_fc``)."""
    # (its set_swish() would swap the Lite models' ReLU6 for swish: never called)
    return _lite_package().from_name(
        "efficientnet-lite0", num_classes=num_classes, in_channels=input_size[0], image_size=input_size[1]
    )


_ARCHITECTURES: dict[str, Factory] = {
    "gtsrb_cnn": lambda n, shape: GTSRBCNN(n, in_channels=shape[0], image_size=shape[1]),
    "gtsrb_cnn_bn": lambda n, shape: GTSRBCNN(n, in_channels=shape[0], image_size=shape[1], batch_norm=True),
    "efficientnet_lite0": efficientnet_lite0,
}


def register_architecture(name: str, factory: Factory) -> None:
    """Make ``name`` buildable from a spec: ``factory(num_classes, (C, H, W))`` returns an untrained network."""
    _ARCHITECTURES[name] = factory


def _torchvision_network(arch: str, num_classes: int) -> nn.Module:
    import torchvision

    names = set(torchvision.models.list_models(module=torchvision.models))
    if arch not in names:
        known = ", ".join(sorted(_ARCHITECTURES) + ["resnet18", "vgg16", "inception_v3", "..."])
        raise ConfigError(f"unknown architecture '{arch}' (known: {known}; any torchvision classifier name)")
    kwargs: dict[str, Any] = {"weights": None, "num_classes": num_classes}
    if arch in ("inception_v3", "googlenet"):
        kwargs.update(aux_logits=False, init_weights=False)
    return torchvision.models.get_model(arch, **kwargs)


def build_network(arch: str, num_classes: int, input_size: Sequence[int]) -> nn.Module:
    """An untrained network by name: ``gtsrb_cnn``, a registered name or any torchvision classifier."""
    if num_classes < 2:
        raise ConfigError(f"a classifier needs at least 2 classes, got {num_classes}")
    shape = tuple(int(v) for v in input_size)
    if arch in _ARCHITECTURES:
        return _ARCHITECTURES[arch](num_classes, shape)  # type: ignore[arg-type]
    return _torchvision_network(arch, num_classes)
