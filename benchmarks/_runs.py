"""Shared by the benchmark scripts: run a library entry point once, reuse its result.json afterwards."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trojanlab.errors import TrojanlabError


def run_once(out: Path, step: Callable[..., Any], *args: Any, **kwargs: Any) -> dict:
    """``step(*args, out=out, **kwargs)`` unless ``out/result.json`` exists (a finished step is reused); its result
    (as written to ``result.json``, so that a fresh and a reused step read the same)."""
    result = Path(out) / "result.json"
    if not result.is_file():
        shown = [*map(brief, args), *(f"{k}={brief(v)}" for k, v in kwargs.items()), f"out={brief(out)}"]
        call = f"{step.__module__}.{step.__name__}({', '.join(shown)})"
        print(f"$ {call}", flush=True)
        try:
            step(*args, out=out, **kwargs)
        except TrojanlabError as exc:
            sys.exit(f"{call} failed: {exc}")
    return json.loads(result.read_text())


def brief(value: Any) -> str:
    """``value``'s repr; a config dataclass shows only the fields that differ from their defaults."""
    if not dataclasses.is_dataclass(value) or isinstance(value, type):
        return repr(str(value) if isinstance(value, Path) else value)
    changed = []
    for f in dataclasses.fields(value):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if getattr(value, f.name) != default:
            changed.append(f"{f.name}={getattr(value, f.name)!r}")
    return f"{type(value).__name__}({', '.join(changed)})"


def defense_seconds(result: dict) -> float:
    """Seconds a defense took to decide, without the report-only test curve: the sub-network variant records them
    as ``defense_seconds``; a pruning defense as its ranking's (``mask_seconds``) plus its rule's
    (``selection_seconds``), which results written by the old command line also summed as ``defense_seconds``."""
    if "defense_seconds" in result:
        return result["defense_seconds"]
    return result["mask_seconds"] + result["selection_seconds"]


def finished_run(run_dir: Path) -> dict:
    """The ``run.json`` of a finished ``trojanlab reproduce`` run folder, or exit naming why not."""
    run = json.loads((Path(run_dir) / "run.json").read_text())
    if run.get("status") != "done":
        sys.exit(f"{run_dir}: the run did not finish (status {run.get('status')})")
    return run
