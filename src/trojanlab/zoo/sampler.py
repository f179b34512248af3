"""The seeded sampler: a :class:`~trojanlab.zoo.config.ZooConfig` in, the list of members to build out.

A member is a JSON-ready dict: ``id``, ``role`` (``clean`` or ``backdoored``), ``family``, ``seed``, the model
(``arch``, ``normalize``), the training recipe (``train``: epochs, optimiser, learning rate, augmentation) and, for
an attack, its settings (``attack``) and, for Trojan Attack and TrojanNet, the clean member it is planted in
(``base``). The same config always gives the same members, and a member's settings do not depend on how many
members come after it of another role.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..config.attacks import FIRST_BLOCK
from ..errors import ConfigError
from .config import ZooConfig

LEARNING_RATES = {"adam": 1e-3, "sgd": 1e-2}
"""The learning rate each optimiser trains with (SGD needs a larger one)."""

BADNETS_DEFAULT_TARGET = 33
"""The target of the field's default BadNets model on GTSRB (Neural Cleanse's demo)."""


TROJANNN_SETTINGS = {"layer": FIRST_BLOCK, "optimizer": "adam", "lr": 1e-3, "clean_loss": "distill"}
"""Trojan Attack on models of any recipe: retraining from the first block's output (the classifier alone could not
learn the trigger on the zoo's BatchNorm / SGD / shift-trained members, see
:func:`~trojanlab.attacks.trojannn.first_block_layer`), with Adam and the victim's outputs distilled."""


def _uniform(rng: np.random.Generator, bounds: list[float]) -> float:
    return round(float(rng.uniform(bounds[0], bounds[1])), 4)


def _integer(rng: np.random.Generator, bounds: list[int]) -> int:
    return int(rng.integers(bounds[0], bounds[1] + 1))


def _pick(rng: np.random.Generator, options: list[Any]) -> Any:
    return options[int(rng.integers(len(options)))]


def _recipe(rng: np.random.Generator, cfg: ZooConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    optimizer = _pick(rng, cfg.optimizers)
    train = {"epochs": _integer(rng, cfg.epochs), "optimizer": optimizer, "lr": LEARNING_RATES[optimizer],
             "augment": bool(_pick(rng, cfg.augment))}  # fmt: skip
    model = {"arch": _pick(rng, cfg.architectures), "normalize": _pick(rng, cfg.normalize)}
    return model, train


def _location(rng: np.random.Generator, size: int, height: int, width: int) -> list[int]:
    return [int(rng.integers(0, height - size + 1)), int(rng.integers(0, width - size + 1))]


def _attack(
    rng: np.random.Generator, cfg: ZooConfig, family: str, num_classes: int, height: int, width: int
) -> dict[str, Any]:
    target = int(rng.integers(num_classes))
    rate = _uniform(rng, cfg.poison_rate)
    if family == "badnets":
        return {"targets": [min(BADNETS_DEFAULT_TARGET, num_classes - 1)], "poison_rate": rate}
    if family == "patch":
        size = min(_integer(rng, cfg.patch_size), height, width)
        return {"targets": [target], "poison_rate": rate, "pattern": _pick(rng, ["random-binary", "random-colour"]),
                "trigger_size": size, "location": _location(rng, size, height, width),
                "alpha": _uniform(rng, cfg.patch_alpha)}  # fmt: skip
    if family == "blended":
        return {"targets": [target], "poison_rate": rate, "alpha": _uniform(rng, cfg.blend_alpha)}
    if family == "wanet":
        return {"targets": [target], "poison_rate": rate, "strength": _uniform(rng, cfg.wanet_strength)}
    if family == "trojannn":
        size = min(_integer(rng, cfg.trojannn_size), height, width)
        return {"target": target, "trigger_size": size, "location": _location(rng, size, height, width),
                "epochs": _integer(rng, cfg.trojannn_epochs), "retrain_data": "real", **TROJANNN_SETTINGS}  # fmt: skip
    if family == "trojannet":
        return {"targets": [target], "location": _location(rng, 4, height, width)}
    raise AssertionError(family)  # ZooConfig checked the families


def sample(cfg: ZooConfig, num_classes: int, height: int, width: int) -> list[dict[str, Any]]:
    """Every member of the zoo ``cfg`` describes, for ``num_classes``-class ``height`` x ``width`` images: the clean
    ones first (``clean-000``...), then the backdoored ones (``<family>-000``...)."""
    if "trojannet" in cfg.families and cfg.backdoored and (height < 4 or width < 4):
        raise ConfigError(f"TrojanNet's trigger is 4x4 pixels: it does not fit {height}x{width} images")
    root = np.random.SeedSequence(cfg.seed)
    clean_seq, attack_seq, order_seq = root.spawn(3)
    members: list[dict[str, Any]] = []
    for i, seq in enumerate(clean_seq.spawn(cfg.clean)):
        rng = np.random.default_rng(seq)
        model, train = _recipe(rng, cfg)
        members.append({"id": f"clean-{i:03d}", "role": "clean", "family": None,
                        "seed": int(rng.integers(2**31 - 1)), "model": model, "train": train})  # fmt: skip
    order = np.random.default_rng(order_seq).permutation(len(cfg.families))
    families = [cfg.families[int(order[i % len(order)])] for i in range(cfg.backdoored)]
    counts: dict[str, int] = {}
    for family, seq in zip(families, attack_seq.spawn(cfg.backdoored)):
        rng = np.random.default_rng(seq)
        index = counts[family] = counts.get(family, -1) + 1
        model, train = _recipe(rng, cfg)
        member = {"id": f"{family}-{index:03d}", "role": "backdoored", "family": family,
                  "seed": int(rng.integers(2**31 - 1)), "model": model, "train": train,
                  "attack": _attack(rng, cfg, family, num_classes, height, width)}  # fmt: skip
        if family in ("trojannn", "trojannet"):  # planted into a clean member: its recipe is the base's
            base = members[int(rng.integers(cfg.clean))]
            member.update(base=base["id"], model=base["model"], train=base["train"])
        members.append(member)
    return members
