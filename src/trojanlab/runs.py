"""The mechanics every method's run repeats, written once: seeding, loading a model and the data it was trained
on, checking that they fit, the defender's clean split, provenance, and writing the report.

The entry points (:func:`trojanlab.victims.train_victim`, :mod:`trojanlab.attacks.run`,
:mod:`trojanlab.detection.run`, :func:`trojanlab.defenses.defend`) call these; a method's own module holds only
its algorithm.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import sys
import time
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .config.defenses import DefenderConfig
from .data import DataSplits, ImageSet, load_dataset
from .errors import ConfigError, DataError, RunFolderError, TrojanlabError
from .interrupts import checkpoint_interval
from .io import TMP_SUFFIX, file_digest, folder_digest, read_json, write_json
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


def _check_writable(path: Path) -> Path:
    """``path`` if it is a writable folder or could be created as one (nothing is created)."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {path}: exists and is not a folder")
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"--out {path}: {existing} is a file, so the folder cannot be created")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "the folder is not writable" if existing == path else f"cannot create it: {existing} is not writable"
        raise ConfigError(f"--out {path}: {what}")
    return path


# ------------------------------------------------------------------------------------------------ run folders

MANIFEST = "trojanlab-run.json"
"""The file in a run folder that says which run wrote it: its command, fingerprint and what the fingerprint reads."""

COMPANIONS = frozenset({MANIFEST, "stage.json", "stage.log"})
"""Files that may sit in a run folder beside the run's own: the manifest and the ``reproduce`` stage's records."""

_REPLACE_STALE: ContextVar[bool] = ContextVar("replace_stale", default=False)


@contextmanager
def replacing_stale_runs():
    """Within this block a folder holding another run is started over instead of refused: for ``reproduce``,
    which owns its stage folders and decides on reuse by its own stage fingerprints."""
    token = _REPLACE_STALE.set(True)
    try:
        yield
    finally:
        _REPLACE_STALE.reset(token)


@functools.lru_cache(maxsize=64)
def _cached_digest(path: str, size: int, mtime: int, is_dir: bool) -> str:
    return folder_digest(path) if is_dir else file_digest(path)


def input_identity(value: Any) -> Any:
    """What a run's input *is*, for its fingerprint: a file's or folder's content hash (a trojanlab artefact: its
    spec and weights), an embedded data set's file hash; other values (names, numbers) as they are. Paths do not
    enter: the same data moved elsewhere is the same input."""
    from .data import EMBEDDED_GTSRB, EMBEDDED_GTSRB5

    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, (list, tuple)):
        return [input_identity(v) for v in value]
    text = str(value)
    path, name = Path(text), None
    if text == "gtsrb" or (text == "gtsrb5" and not path.exists()):  # as load_dataset reads them
        path, name = {"gtsrb": EMBEDDED_GTSRB, "gtsrb5": EMBEDDED_GTSRB5}[text], text
    try:
        return _path_identity(path, name, text)
    except OSError as exc:
        raise ConfigError(f"{text}: cannot read this input ({exc.strerror or exc})") from None


def _path_identity(path: Path, name: str | None, text: str) -> Any:
    if not path.exists():
        return text
    manifest = read_json(path / MANIFEST) if path.is_dir() else None
    if isinstance(manifest, dict) and manifest.get("fingerprint"):  # another run's folder: what produced it
        return {"run": manifest.get("command"), "fingerprint": manifest["fingerprint"]}
    if path.is_dir() and (path / "model.json").is_file():
        parts = [path / "model.json", path / "model.safetensors"]
        digests = [_digest_of(p) for p in parts if p.exists()]
        return {"artefact_sha256": hashlib.sha256("".join(digests).encode()).hexdigest()}
    record = {"sha256": _digest_of(path)}
    if name:
        record["embedded"] = name
    return record


def _digest_of(path: Path) -> str:
    stat = path.stat()
    if path.is_dir():  # a folder's digest is keyed on its newest file
        stat_mtime = max((p.stat().st_mtime_ns for p in path.rglob("*")), default=stat.st_mtime_ns)
        return _cached_digest(str(path.resolve()), 0, stat_mtime, True)
    return _cached_digest(str(path.resolve()), stat.st_size, stat.st_mtime_ns, False)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, inner in value.items():
            flat.update(_flatten(inner, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:18] + "..." + text[-18:]


def describe_difference(
    old: dict[str, Any], new: dict[str, Any], old_paths: dict[str, Any] | None = None,
    new_paths: dict[str, Any] | None = None, limit: int = 4,
) -> str:  # fmt: skip
    """``key: old there, new now`` for each setting or input that differs between two runs' identities; an input
    whose content differs is named by its paths (``old_paths``/``new_paths``: input name -> path as given)."""
    a, b = _flatten(old), _flatten(new)
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k, "<absent>") != b.get(k, "<absent>")]
    parts: list[str] = []
    seen_inputs: set[str] = set()
    for key in keys:
        name = key.split(".")[1] if key.startswith("inputs.") and key.count(".") >= 1 else None
        if name is not None and (old_paths or new_paths):
            if name in seen_inputs:
                continue
            seen_inputs.add(name)
            there, now = (old_paths or {}).get(name), (new_paths or {}).get(name)
            parts.append(f"inputs.{name}: other content ({there} there, {now} now)" if there != now
                         else f"inputs.{name}: {now} has changed since")  # fmt: skip
        else:
            parts.append(f"{key}: {_short(a.get(key, '<absent>'))} there, {_short(b.get(key, '<absent>'))} now")
    if len(parts) > limit:
        parts = [*parts[:limit], f"and {len(parts) - limit} more"]
    return "; ".join(parts)


@dataclass
class RunFolder:
    """A command's ``--out`` once checked: :func:`prepare_run` looks (writes nothing), :meth:`start` claims it
    just before the work begins, :func:`finish` marks it done."""

    path: Path
    command: str
    identity: dict[str, Any]
    fingerprint: str
    inputs: dict[str, Any]  # each input as given (paths), recorded beside the identity
    resuming: bool  # the folder holds a run with this fingerprint: its checkpoints are reused
    replace: bool  # the folder's earlier run (or checkpoints) are discarded at start
    foreign: list[str] = field(default_factory=list)  # entries no trojanlab run wrote, kept (--force)
    started: bool = False

    def start(self) -> Path:
        """Create the folder (or clear the earlier run in it) and record this run's manifest."""
        if self.started:
            return self.path
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"--out {self.path}: cannot create the folder ({exc.strerror})") from None
        if self.replace:
            for entry in self.path.iterdir():
                if entry.name in self.foreign or entry.name in ("stage.json", "stage.log"):
                    continue
                if entry.name.startswith(".") and not entry.name.endswith(TMP_SUFFIX):
                    continue  # a stranger's hidden files (.git, .venv) are never ours to remove
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        else:  # a run killed during an atomic write leaves its temporary file behind
            for entry in self.path.rglob(".*" + TMP_SUFFIX):
                entry.unlink(missing_ok=True)
        old = read_json(self.path / MANIFEST) or {}
        write_json(self.path / MANIFEST, {
            "trojanlab_run": 1, "command": self.command, "fingerprint": self.fingerprint, "status": "running",
            "started": old.get("started") if self.resuming else _now(), "sessions": (old.get("sessions", 0)
            if self.resuming else 0) + 1, "foreign": self.foreign, "identity": self.identity,
            "inputs": self.inputs,
        })  # fmt: skip
        self.started = True
        return self.path

    def done(self) -> None:
        manifest = read_json(self.path / MANIFEST) or {}
        manifest.update(status="done", finished=_now())
        write_json(self.path / MANIFEST, manifest)


def _now() -> str:
    from datetime import UTC, datetime

    return datetime.now(UTC).isoformat(timespec="seconds")


def _holds_work(path: Path) -> bool:
    """Whether a run folder holds any file of a run's work (beyond its manifest, the stage records, hidden files
    and empty folders)."""
    for entry in path.iterdir():  # files a run took over with --force count too: it may have written over them
        if entry.name in COMPANIONS or entry.name.startswith("."):
            continue
        if entry.is_dir() and not entry.is_symlink() and not any(p.is_file() for p in entry.rglob("*")):
            continue
        return True
    return False


def run_identity(command: str, config: dict[str, Any], seed: int, **inputs: Any) -> dict[str, Any]:
    """Everything that determines a run's result: the command, its resolved settings, the identity of each input,
    the seed and the package version."""
    return {
        "command": command,
        "trojanlab_version": __version__,
        "seed": seed,
        "config": json.loads(json.dumps(config, default=str)),
        "inputs": {k: input_identity(v) for k, v in inputs.items()},
    }


def fingerprint(identity: dict[str, Any]) -> str:
    """The short hash of a :func:`run_identity` that a run folder is known by."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def prepare_run(
    out: str | os.PathLike,
    command: str,
    config: dict[str, Any],
    seed: int,
    *,
    restart: bool = False,
    force: bool = False,
    **inputs: Any,
) -> RunFolder:
    """Check ``out`` before any work: writable, and either new, empty, or holding a run of the same fingerprint
    (whose checkpoints are then reused). A run of this command with other settings or inputs is refused (naming
    what differs) unless ``restart``; another command's run or files no trojanlab run wrote, unless ``force``.
    Nothing is written until :meth:`RunFolder.start`."""
    path = _check_writable(Path(out))
    checkpoint_interval()  # a bad TROJANLAB_CHECKPOINT_MINUTES is named now, not after the folder is cleared
    identity = run_identity(command, config, seed, **inputs)
    fp = fingerprint(identity)
    given = {k: (None if v is None else str(v)) for k, v in inputs.items()}
    run = RunFolder(path, command, identity, fp, given, resuming=False, replace=False)
    if not path.is_dir():
        return run
    entries = sorted(p.name for p in path.iterdir() if not p.name.startswith("."))  # hidden: temporary files, .DS_Store
    manifest = read_json(path / MANIFEST) if (path / MANIFEST).exists() else None
    if (path / MANIFEST).exists() and not isinstance(manifest, dict):
        manifest = {}
    replace_stale = _REPLACE_STALE.get()
    if manifest is None:
        strangers = [name for name in entries if name not in COMPANIONS]
        if strangers and not force and not replace_stale:
            shown = ", ".join(strangers[:4]) + (", ..." if len(strangers) > 4 else "")
            raise RunFolderError(
                f"--out {path}: holds files no trojanlab run recorded ({shown}); choose a new or empty folder, "
                "or --force to write beside them"
            )
        run.foreign = [] if replace_stale else strangers
        run.replace = replace_stale and bool(strangers)
        return run
    run.foreign = list(manifest.get("foreign") or [])
    same_command = manifest.get("command") == command
    if manifest.get("fingerprint") != fp and not _holds_work(path):
        run.replace = True  # an earlier run stopped by a bad input before it produced anything: nothing to lose
        return run
    if manifest.get("fingerprint") == fp and not restart:
        run.resuming = True
        return run
    if not same_command and not (force or replace_stale):
        raise RunFolderError(
            f"--out {path}: holds a `trojanlab {manifest.get('command')}` run, not `{command}`; choose another "
            "folder, or --force to replace it"
        )
    if same_command and manifest.get("fingerprint") != fp and not (restart or force or replace_stale):
        diff = describe_difference(manifest.get("identity") or {}, identity, manifest.get("inputs") or {}, given)
        raise RunFolderError(
            f"--out {path}: holds a `trojanlab {command}` run with other settings or inputs ({diff}); choose another "
            "folder, or --restart to start over"
        )
    run.replace = True
    return run


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


def check_fits(loaded: LoadedModel, data: DataSplits, path: str | os.PathLike) -> DataSplits:
    """``data`` as the model sees it, after checking the model takes its images and knows its classes.

    Where both sides name their classes, they are matched by name, not position: an image folder holding some of
    the model's classes (in any order) gets the model's label numbers; a class the model lacks is an error. Where a
    side only numbers them (an ``.npz`` without names), the counts must agree."""
    expected = tuple(loaded.spec.get("input_size", data.image_shape))
    if data.image_shape != expected:
        raise TrojanlabError(
            f"{path}: the model expects {expected} (C, H, W) images but the data are {data.image_shape}"
        )
    data = align_classes(loaded.spec.get("classes"), data, path)
    if data.num_classes != loaded.num_classes:
        raise TrojanlabError(
            f"{path}: a {loaded.num_classes}-class model, but {data.name} has {data.num_classes} classes"
        )
    return data


def align_classes(names: list[str] | None, data: DataSplits, path: str | os.PathLike) -> DataSplits:
    """``data`` relabelled to the model's class ``names`` by name (when both sides have names and they differ);
    a class the model lacks is an error. Unchanged when either side only numbers its classes."""
    if not (_named(names) and _named(data.classes)):
        return data
    names = [str(n) for n in names]
    if names == list(data.classes):
        return data
    unknown = [c for c in data.classes if c not in names]
    if unknown:
        raise TrojanlabError(
            f"{path}: {data.name} has classes the model does not know ({', '.join(unknown[:3])}"
            f"{', ...' if len(unknown) > 3 else ''}); the model's are {', '.join(names[:4])}, ... "
            f"({len(names)} in all)"
        )
    lut = np.asarray([names.index(c) for c in data.classes], dtype=np.int64)

    def relabel(images: ImageSet | None) -> ImageSet | None:
        return None if images is None else ImageSet(images.x, lut[images.y])

    return DataSplits(data.name, relabel(data.train), relabel(data.test), names)


def check_forward(net: torch.nn.Module, spec: dict[str, Any]) -> None:
    """One forward pass of a blank image before any training: an architecture that cannot take the data's image
    size (say ``--image-size 2``) fails here with a clear line, not after an epoch with a traceback."""
    channels, height, width = spec.get("input_size", (3, 32, 32))
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            logits = net(torch.zeros(1, channels, height, width))
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[0][:160]
        raise ConfigError(
            f"{spec.get('arch', 'the model')} cannot take {height}x{width} images ({reason}); use a larger --image-size"
        ) from None
    finally:
        net.train(was_training)
    if logits.shape[-1] != len(spec.get("classes") or []) and spec.get("classes"):
        raise ConfigError(f"{spec.get('arch')}: {logits.shape[-1]} outputs for {len(spec['classes'])} classes")


def check_trainable(data: DataSplits, train: Any, every_class: bool = True) -> None:
    """``data`` has enough images for the training and validation split ``train`` asks for, and (``every_class``,
    for a model trained from scratch) a training image of every class."""
    images = data.train
    if images is None or len(images) == 0:
        raise DataError(f"{data.name}: no training images")
    val = split_validation(images, train.val_fraction, train.seed)[1] if train.val_fraction else None
    if train.val_fraction and (val is None or len(val) == 0 or len(val) >= len(images)):
        counts = np.bincount(images.y, minlength=data.num_classes)
        raise DataError(
            f"{data.name}: {len(images)} training images ({int(counts.min())} in the smallest class) cannot be split "
            f"into training and a {train.val_fraction:.0%} validation part; give more images per class, or no "
            "validation share"
        )
    missing = [data.classes[k] for k in range(data.num_classes) if not (images.y == k).any()]
    if missing and every_class:
        raise DataError(
            f"{data.name}: no training image of class {', '.join(map(str, missing[:3]))}"
            f"{', ...' if len(missing) > 3 else ''} (each class needs images in the training split)"
        )


def defender_split(
    data: DataSplits, defender: DefenderConfig, spec: dict[str, Any], seed: int
) -> tuple[ImageSet, ImageSet, ImageSet]:
    """The defender's clean images, and their split into the part a defense fits on and the held-out part its
    automatic rule reads: every image of ``clean_data`` (the defender's own; its training split if it has one),
    else ``clean_fraction`` of the data's training split (stratified; images the model may have trained on)."""
    if defender.clean_data:
        own = align_classes(spec.get("classes"), model_data(defender.clean_data, spec, seed), defender.clean_data)
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


def finish(out: Path | RunFolder, report: Report) -> Report:
    """Write ``report`` as ``out/result.json`` (atomically), mark the run folder done, and return the report."""
    if isinstance(out, RunFolder):
        out.start()
        write_json(out.path / "result.json", report.to_json())
        out.done()
    else:
        write_json(Path(out) / "result.json", report.to_json())
    return report
