"""The bad-input cases of ``tests/cli/fault_cases.py`` run through the command line, as measured: each case's
command, exit code and the one line it printed, in ``benchmarks/results/fault_table.{md,json}`` (paths shown as the
placeholders of the cases: ``{V}`` a trained victim's run folder, ``{D}``/``{E}`` two tiny data sets, ...).

    python benchmarks/fault_table.py
"""

from __future__ import annotations

import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the cases live with the tests that assert them

from tests.cli.fault_cases import CASES, build_inputs
from tests.conftest import bright_thirds

from trojanlab.cli import main
from trojanlab.io import atomic_write, write_json
from trojanlab.runs import source_commit

RESULTS = Path(__file__).parent / "results"


def main_table() -> None:
    began = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            paths = build_inputs(Path(tmp), bright_thirds)
        for case, argv, _pattern, _kept in CASES:
            err = io.StringIO()
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
                code = main([part.format(**paths) for part in argv.split()])
            message = err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else ""
            for key, value in sorted(paths.items(), key=lambda kv: -len(kv[1])):
                message = message.replace(value, "{" + key + "}")
            rows.append({"case": case, "command": "trojanlab " + argv, "exit_code": code, "message": message})
    record = {"commit": source_commit(), "seconds": time.perf_counter() - began, "cases": rows}
    RESULTS.mkdir(exist_ok=True)
    write_json(RESULTS / "fault_table.json", record)
    lines = [(f"Measured by `python benchmarks/fault_table.py` on commit {record['commit']} "
             f"({record['seconds']:.0f} s)."), "", "| case | command | exit | message |", "|---|---|---|---|"]  # fmt: skip
    for row in rows:
        cells = [row["case"], f"`{row['command']}`", str(row["exit_code"]), row["message"].replace("|", "\\|")]
        lines.append("| " + " | ".join(cells) + " |")
    atomic_write(RESULTS / "fault_table.md", lambda tmp: tmp.write_text("\n".join(lines) + "\n"))
    print("\n".join(lines))


if __name__ == "__main__":
    main_table()
