"""How commands print their reports."""

from __future__ import annotations

import json

from ..reports import Report


def print_json(report: Report) -> None:
    print(json.dumps(report.to_json(), indent=2, default=str))


def before_after(report) -> str:
    """``clean accuracy A -> B, ASR C -> D`` of a defense report."""
    before, after = report.before, report.after
    line = f"clean accuracy {before['clean_accuracy']:.4f} -> {after['clean_accuracy']:.4f}"
    if "attack_success_rate" in before:
        line += f", ASR {before['attack_success_rate']:.4f} -> {after['attack_success_rate']:.4f}"
    return line
