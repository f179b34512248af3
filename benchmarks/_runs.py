"""Shared by the benchmark scripts: run a trojanlab command once, reuse its result.json afterwards."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from trojanlab.cli import main as trojanlab


def run_once(argv: list[str], out: Path) -> dict:
    """``trojanlab ARGV --out OUT`` unless ``OUT/result.json`` exists (a finished step is reused); its result."""
    result = Path(out) / "result.json"
    if not result.is_file():
        argv = [*argv, "--out", str(out)]
        print("$ trojanlab " + " ".join(argv), flush=True)
        if trojanlab(argv) != 0:
            sys.exit(f"trojanlab {' '.join(argv)} failed")
    return json.loads(result.read_text())
