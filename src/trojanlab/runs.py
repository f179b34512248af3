"""The mechanics every method's run repeats, written once: seeding, loading a model and the data it was trained
on, checking that they fit, the defender's clean split, provenance, and writing the report.

The entry points (:func:`trojanlab.victims.train_victim`, :mod:`trojanlab.attacks.run`,
:mod:`trojanlab.detection.run`, :func:`trojanlab.defenses.defend`) call these; a method's own module holds only
its algorithm.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .config.defenses import DefenderConfig
from .data import DataSplits, ImageSet, load_dataset
from .errors import ConfigError, DataError, TrojanlabError
from .io import write_json
from .models import LoadedModel, load_model
from .reports import Report
from .training import split_validation


def seed_everything(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"the seed must be a non-negative integer, got {seed!r}")
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def check_device(device: str | torch.device) -> str:
    """``device`` if torch can use it here, else a :class:`ConfigError` naming what is available."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"--device {device!r}: not a device name (cpu, cuda, cuda:N, mps)") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA device on this machine; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {device}: no MPS device on this machine; use --device cpu")
    return str(dev)


def output_folder(out: str | os.PathLike) -> Path:
    """``out`` created if needed, or a :class:`ConfigError` before any work when it cannot hold results."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {path}: exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out {path}: cannot create the folder ({exc.strerror})") from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {path}: the folder is not writable")
    return path


def load_artifact(path: str | os.PathLike, role: str = "model", kinds: tuple[str, ...] = (), device="cpu"):
    """The artefact at ``path``; with ``kinds``, a :class:`TrojanlabError` unless its kind is one of them."""
    loaded = load_model(path, device=device)
    kind = loaded.spec.get("kind")
    if kinds and kind not in kinds:
        raise TrojanlabError(f"{path}: the {role} must be a {' or '.join(kinds)} artefact, got {kind}")
    return loaded


def model_data(data: str | os.PathLike, spec: dict[str, Any], seed: int = 0) -> DataSplits:
    """``data`` loaded as the model was trained on it: at its input size and, for image folders, with the
    train/test split recorded in its spec (so a test split never holds the model's training images)."""
    split = spec.get("data_split") or {}
    size = (spec.get("input_size") or [3, 32, 32])[1]
    return load_dataset(
        data, image_size=size, seed=int(split.get("seed", seed)), test_fraction=split.get("test_fraction")
    )


def _named(classes: list[str] | None) -> bool:
    """Whether ``classes`` are real names (an ``.npz`` without names numbers its classes ``0..N-1``)."""
    return bool(classes) and any(name != str(i) for i, name in enumerate(classes))


def check_fits(loaded: LoadedModel, data: DataSplits, path: str | os.PathLike) -> None:
    """The model takes the data's images and has the data's classes (by count, and by name where both name them)."""
    expected = tuple(loaded.spec.get("input_size", data.image_shape))
    if data.image_shape != expected:
        raise TrojanlabError(
            f"{path}: the model expects {expected} (C, H, W) images but the data are {data.image_shape}"
        )
    if data.num_classes != loaded.num_classes:
        raise TrojanlabError(
            f"{path}: a {loaded.num_classes}-class model, but {data.name} has {data.num_classes} classes"
        )
    names = loaded.spec.get("classes")
    if _named(names) and _named(data.classes) and list(names) != list(data.classes):
        differ = [f"{i}: {a} vs {b}" for i, (a, b) in enumerate(zip(names, data.classes)) if a != b]
        raise TrojanlabError(
            f"{path}: the model's classes are not {data.name}'s (label {', '.join(differ[:3])}"
            f"{', ...' if len(differ) > 3 else ''})"
        )


def defender_split(
    data: DataSplits, defender: DefenderConfig, spec: dict[str, Any], seed: int
) -> tuple[ImageSet, ImageSet, ImageSet]:
    """The defender's clean images, and their split into the part a defense fits on and the held-out part its
    automatic rule reads: every image of ``clean_data`` (the defender's own; its training split if it has one),
    else ``clean_fraction`` of the data's training split (stratified; images the model may have trained on)."""
    if defender.clean_data:
        own = model_data(defender.clean_data, spec, seed)
        clean = own.train if own.train is not None else own.test
        if int(clean.y.max()) >= data.num_classes:
            raise DataError(f"{defender.clean_data}: label {int(clean.y.max())} is out of range for the model")
        fit, holdout = split_validation(clean, defender.holdout, seed + 1)
        if holdout is None or len(fit) == 0 or len(holdout) == 0:
            raise DataError(f"{defender.clean_data}: too few images to split into fit and held-out parts")
        return clean, fit, holdout
    if data.train is None:
        raise DataError(f"{data.name}: the defense needs a training split to draw the defender's clean data from")
    _, clean = split_validation(data.train, defender.clean_fraction, seed)
    if not (np.bincount(clean.y) >= 2).any():  # split_validation holds out only from classes with >= 2 images
        raise DataError(
            f"--clean-fraction {defender.clean_fraction} of {data.name}'s training split gives {len(clean)} images, "
            "one per class: nothing could be held out for the pruning rule; raise --clean-fraction"
        )
    fit, holdout = split_validation(clean, defender.holdout, seed + 1)
    if holdout is None or len(fit) == 0 or len(holdout) == 0:
        raise DataError(f"--clean-fraction {defender.clean_fraction} gives too few images to split ({len(clean)})")
    return clean, fit, holdout


def command_line() -> str | None:
    """The ``trojanlab ...`` command this process runs, when it is the command line (else ``None``)."""
    argv = sys.argv
    if argv and Path(argv[0]).name in ("trojanlab", "__main__.py"):
        return "trojanlab " + " ".join(argv[1:])
    return None


@functools.lru_cache(maxsize=1)
def source_commit() -> str | None:
    """The git commit of the trojanlab source running (``+dirty`` when it has uncommitted changes), or ``None``
    outside a git checkout (an installed wheel). Read once per process: the code a process runs is the code it
    loaded, whatever is committed while it runs."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def provenance(method: str, config: dict[str, Any], seed: int, **inputs: Any) -> dict[str, Any]:
    """What produced a result: the method, its resolved settings, its inputs and seed, the package version and the
    source commit."""
    return {
        "method": method,
        "command": command_line(),
        "trojanlab_version": __version__,
        "commit": source_commit(),
        "seed": seed,
        "inputs": {k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in inputs.items()},
        "config": config,
    }


@contextmanager
def timed():
    """``with timed() as clock: ...``; ``clock()`` is the seconds since entry (frozen at exit)."""
    start = time.perf_counter()
    end: list[float] = []

    def clock() -> float:
        return (end[0] if end else time.perf_counter()) - start

    try:
        yield clock
    finally:
        end.append(time.perf_counter())


def finish(out: Path, report: Report) -> Report:
    """Write ``report`` as ``out/result.json`` (atomically) and return it."""
    write_json(out / "result.json", report.to_json())
    return report
