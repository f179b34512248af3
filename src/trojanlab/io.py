"""Atomic file writes: a crash or a bad input never leaves a half-written result behind."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as indented JSON, atomically."""
    text = json.dumps(data, indent=2, sort_keys=False, default=_to_builtin) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def read_json(path: str | os.PathLike) -> Any | None:
    """The JSON in ``path``, or ``None`` when it is missing or unreadable (e.g. a run stopped before writing it)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _to_builtin(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def tensor_digest(tensors: Iterable[Any]) -> str:
    """sha256 of the tensors' bytes: a checkpoint is reused only for the same model weights and images."""
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def save_png(path: str | os.PathLike, image: Any) -> Path:
    """An (h, w[, C]) float image in [0, 1] as an 8-bit PNG, written atomically."""
    import numpy as np
    from PIL import Image

    pixels = np.clip(np.rint(np.asarray(image) * 255), 0, 255).astype(np.uint8)
    return atomic_write(path, lambda tmp: Image.fromarray(pixels.squeeze()).save(tmp, format="PNG"))
