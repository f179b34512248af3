"""Settings of a model zoo (``trojanlab zoo build --config zoo.yaml``): how many members, and the ranges the seeded
sampler draws every member's attack, trigger and training recipe from."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..config.base import check_int, check_number, option
from ..config.training import NORMALIZATIONS, OPTIMIZERS
from ..errors import ConfigError

FAMILIES = ("badnets", "patch", "blended", "wanet", "trojannn", "trojannet")
"""The attack families a zoo mixes. ``badnets``: the field's default trigger (a white 4x4 square at the bottom
right, target 33 on GTSRB); ``patch``: a random binary or colour square of random size, place, opacity and target;
``blended``, ``wanet``: their papers' triggers with a random target; ``trojannn`` (Trojan Attack) and ``trojannet``
plant their backdoor into one of the zoo's clean members."""

ARCHITECTURES = ("gtsrb_cnn", "gtsrb_cnn_bn")
MAX_MEMBERS = 100_000
WANET_MAX_RATE = 0.3  # rate + 2 x rate (noise mode, cross ratio 2) of the images must leave some clean


def _pair(owner: str, name: str, value: Any, low: float, high: float | None = None, integer: bool = False) -> None:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ConfigError(f"{owner}.{name} must be a range [low, high], got {value!r}")
    for v in value:
        if integer:
            check_int(owner, name, v, int(low))
        else:
            check_number(owner, name, v, low, high)
    if value[0] > value[1]:
        raise ConfigError(f"{owner}.{name}: the low end {value[0]} is above the high end {value[1]}")


def _subset(owner: str, name: str, value: Any, known: tuple[Any, ...]) -> None:
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"{owner}.{name} must be a non-empty list, got {value!r}")
    unknown = [v for v in value if v not in known]
    if unknown:
        raise ConfigError(f"{owner}.{name}: unknown {unknown} (known: {', '.join(map(str, known))})")


@dataclass
class ZooConfig:
    """A zoo of ``clean`` clean and ``backdoored`` backdoored models. The backdoored ones are spread evenly over
    ``families`` (in a seeded order); every number below is a ``[low, high]`` range drawn uniformly per member."""

    clean: int = option(24, "clean members")
    backdoored: int = option(24, "backdoored members (attacks), spread evenly over the families")
    families: list[str] = option(factory=lambda: list(FAMILIES), help="attack families")
    data: str = option("gtsrb", "data set every member trains on (a name or an .npz)")
    seed: int = option(0, "seed of the sampler (each member gets its own seed from it)")
    asr_floor: float = option(0.8, "an attack whose ASR stays below this is recorded as failed, not as backdoored")
    architectures: list[str] = option(factory=lambda: list(ARCHITECTURES), help="architectures drawn from")
    epochs: list[int] = option(factory=lambda: [5, 20], help="training epochs (from scratch)")
    optimizers: list[str] = option(factory=lambda: list(OPTIMIZERS), help="optimisers drawn from")
    augment: list[bool] = option(factory=lambda: [True, False], help="with and/or without augmentation")
    normalize: list[str] = option(factory=lambda: list(NORMALIZATIONS), help="input normalisations drawn from")
    poison_rate: list[float] = option(factory=lambda: [0.05, 0.15], help="poisoned share of the training set")
    patch_size: list[int] = option(factory=lambda: [3, 6], help="random patch: side in pixels")
    patch_alpha: list[float] = option(factory=lambda: [0.7, 1.0], help="random patch: opacity")
    blend_alpha: list[float] = option(factory=lambda: [0.1, 0.2], help="blended: opacity")
    wanet_strength: list[float] = option(factory=lambda: [0.5, 1.0], help="WaNet: warping strength s")
    trojannn_size: list[int] = option(factory=lambda: [6, 10], help="Trojan Attack: trigger side in pixels")
    trojannn_epochs: list[int] = option(factory=lambda: [3, 6], help="Trojan Attack: retraining epochs")

    def __post_init__(self) -> None:
        owner = "ZooConfig"
        check_int(owner, "clean", self.clean, 0)
        check_int(owner, "backdoored", self.backdoored, 0)
        if self.clean + self.backdoored > MAX_MEMBERS:
            raise ConfigError(f"ZooConfig: at most {MAX_MEMBERS} members, got {self.clean + self.backdoored}")
        if self.clean + self.backdoored == 0:
            raise ConfigError("ZooConfig: a zoo needs at least one member (clean + backdoored > 0)")
        _subset(owner, "families", self.families, FAMILIES)
        if self.backdoored and {"trojannn", "trojannet"} & set(self.families) and self.clean == 0:
            raise ConfigError(
                "ZooConfig: trojannn and trojannet members are planted into clean members; give clean > 0"
            )
        check_int(owner, "seed", self.seed, 0)
        check_number(owner, "asr_floor", self.asr_floor, 0, 1)
        _subset(owner, "architectures", self.architectures, ARCHITECTURES)
        _subset(owner, "optimizers", self.optimizers, OPTIMIZERS)
        _subset(owner, "augment", self.augment, (True, False))
        _subset(owner, "normalize", self.normalize, NORMALIZATIONS)
        _pair(owner, "epochs", self.epochs, 1, integer=True)
        _pair(owner, "poison_rate", self.poison_rate, 0.001, 0.5)
        if "wanet" in self.families and self.poison_rate[1] > WANET_MAX_RATE:
            raise ConfigError(
                f"ZooConfig.poison_rate: WaNet warps twice as many images again in noise mode, so its rate must stay "
                f"<= {WANET_MAX_RATE}; got a high end of {self.poison_rate[1]}"
            )
        _pair(owner, "patch_size", self.patch_size, 1, integer=True)
        _pair(owner, "patch_alpha", self.patch_alpha, 0.05, 1)
        _pair(owner, "blend_alpha", self.blend_alpha, 0.01, 1)
        _pair(owner, "wanet_strength", self.wanet_strength, 0.01, 100)
        _pair(owner, "trojannn_size", self.trojannn_size, 1, integer=True)
        _pair(owner, "trojannn_epochs", self.trojannn_epochs, 1, integer=True)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> ZooConfig:
        """The config in a YAML file; a missing file, bad YAML or an unknown key is a :class:`ConfigError`."""
        import yaml

        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"--config {file}: no such file")
        try:
            data = yaml.safe_load(file.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--config {file}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"--config {file}: expected a mapping of settings, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(map(str, set(data) - known))
        if unknown:
            raise ConfigError(
                f"--config {file}: unknown setting(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})"
            )
        try:
            return cls(**data)
        except TypeError as exc:
            raise ConfigError(f"--config {file}: {exc}") from None


__all__ = ["ARCHITECTURES", "FAMILIES", "ZooConfig"]
