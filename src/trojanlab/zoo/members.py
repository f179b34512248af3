"""Building one zoo member: its settings in, its files (as bytes) and its record out.

:func:`build_member` runs in the driver's process (sequential) or in a Ray worker, on any machine: it works in a
folder of its own (resuming the training checkpoints found there), calls the library's entry point of the member's
family -- :func:`~trojanlab.victims.train_victim` for a clean one, ``ATTACKS``' poisoning attacks trained from
scratch, :func:`~trojanlab.attacks.run.trojannn` / :func:`~trojanlab.attacks.run.trojannet` on the clean base
member whose files it is given -- and returns the artefact's files, so that no shared file system is needed.

A member is deterministic for its seed *and* torch's thread count: float sums run in another order on another
number of threads, so a member built by a 1-thread Ray worker is not bit-identical to one built by a 2-thread
process (the record names the threads).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

MODEL_FOLDER = "model"
"""The member's artefact, under its work folder and under ``ZOO/members/<id>/``."""

SKIPPED = ("checkpoint",)
"""Entries of the artefact folder that stay behind: training checkpoints are a finished member's dead weight."""


def read_files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` but the checkpoints, by its POSIX path relative to ``folder``."""
    return {
        path.relative_to(folder).as_posix(): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.relative_to(folder).parts[0] not in SKIPPED and not path.name.startswith(".")
    }


def _write_files(folder: Path, files: dict[str, bytes]) -> None:
    for name, content in files.items():
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)


def _configs(member: dict[str, Any]):
    from ..config.training import ModelConfig, TrainConfig

    model = ModelConfig(**member["model"])
    train = TrainConfig(**member["train"], seed=member["seed"])
    return model, train


def _attack(member: dict[str, Any], data: str, out: Path, base: Path | None, progress: bool):
    from ..attacks import run as attacks
    from ..config.attacks import BadNetsConfig, BlendedConfig, TrojanNetInjectConfig, TrojanNNConfig, WaNetConfig
    from ..data import BUNDLED_TROJANNET

    family, seed, settings = member["family"], member["seed"], dict(member["attack"])
    common = {"data": data, "out": out, "seed": seed, "progress": progress}
    if family == "trojannet":
        cfg = TrojanNetInjectConfig(targets=settings["targets"], location=tuple(settings["location"]), seed=seed)
        return attacks.trojannet(base, BUNDLED_TROJANNET, cfg, data=data, out=out, seed=seed)
    if family == "trojannn":
        settings["location"] = tuple(settings["location"])
        return attacks.trojannn(base, TrojanNNConfig(**settings, seed=seed), **common)
    model, train = _configs(member)
    if family in ("badnets", "patch"):
        if "location" in settings:
            settings["location"] = tuple(settings["location"])
        return attacks.badnets(BadNetsConfig(**settings, seed=seed), train, model, **common)
    if family == "blended":
        return attacks.blended(BlendedConfig(**settings, seed=seed), train, model, **common)
    if family == "wanet":
        return attacks.wanet(WaNetConfig(**settings, seed=seed), train, model, **common)
    raise AssertionError(family)


def build_member(
    member: dict[str, Any],
    data: str,
    *,
    work: str | None = None,
    base_files: dict[str, bytes] | None = None,
    threads: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Build ``member`` (see :mod:`trojanlab.zoo.sampler`) on ``data`` in the folder ``work`` (a temporary one when
    ``None``; a folder kept between calls resumes its checkpoints). ``base_files``: the artefact files of the clean
    member a Trojan Attack or TrojanNet member is planted in. Returns ``{"files": {...}, "report": {...},
    "seconds": s, "threads": n}``."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    temporary = work is None
    folder = Path(tempfile.mkdtemp(prefix="trojanlab-member-") if temporary else work)
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        base = None
        if member.get("base"):
            if not base_files:
                raise ValueError(f"member {member['id']} is planted in {member['base']}: its files are needed")
            base = folder / "base"
            if base.exists():
                shutil.rmtree(base)
            _write_files(base, base_files)
        out = folder / MODEL_FOLDER
        if member["role"] == "clean":
            from ..victims import train_victim

            model, train = _configs(member)
            report = train_victim(model, train, data=data, out=out, seed=member["seed"], progress=progress)
        else:
            report = _attack(member, data, out, base, progress)
        return {
            "files": read_files(out),
            "report": report.to_json(),
            "seconds": time.perf_counter() - start,
            "threads": torch.get_num_threads(),
        }
    finally:
        if temporary:
            shutil.rmtree(folder, ignore_errors=True)
