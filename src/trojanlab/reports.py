"""What every method returns: a small report that serialises to JSON (``result.json`` in its run folder).

Each report names the method, its inputs, its resolved settings, its seconds and provenance; ``details`` holds what
is particular to the method (a pruning curve, a scan's per-label norms...). :meth:`Report.to_json` lays ``details``
out beside the shared keys, so a ``result.json`` reads flat.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Report:
    method: str
    seconds: float
    config: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "details"}
        clash = set(out) & set(self.details)
        if clash:
            raise ValueError(f"report details repeat shared keys {sorted(clash)}")
        return {**out, **self.details}


@dataclass
class TrainReport(Report):
    """A model trained (a clean victim)."""

    model: str = ""
    data: str = ""
    clean_accuracy: float = 0.0
    test_images: int = 0


@dataclass
class AttackReport(Report):
    """A backdoored model written, with its clean accuracy and the success rate of the triggers it carries."""

    model: str = ""
    data: str = ""
    clean_accuracy: float = 0.0
    test_images: int = 0
    attack_success_rate: float | None = None
    targets: list[int] = field(default_factory=list)


@dataclass
class DetectionReport(Report):
    """A scan's verdict: whether the model looks backdoored, the suspected labels and the statistic behind it."""

    model: str = ""
    data: str = ""
    infected: bool | None = None
    flagged_labels: list[int] = field(default_factory=list)
    anomaly_index: float | None = None


@dataclass
class DefenseReport(Report):
    """A repaired model written: clean accuracy and ASR before and after on the test split, and what was changed."""

    model: str = ""
    data: str = ""
    before: dict[str, Any] = field(default_factory=dict)
    after: dict[str, Any] = field(default_factory=dict)
    changed: str = ""
    defender_images: int = 0
    fit_images: int = 0
    holdout_images: int = 0
    output: str = ""
