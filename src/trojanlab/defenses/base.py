"""What a defense receives and returns. The runner (:func:`trojanlab.defenses.defend`) loads the model and the
data, draws the defender's clean images and evaluates before and after; a defense's ``apply`` only changes the
model."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..data import DataSplits, ImageSet
from ..models import LoadedModel
from ..triggers import Trigger
from .heldout import HeldOutMeasure, held_out_measure


@dataclass
class DefenseContext:
    """The model under repair and the data a defense may read.

    ``clean`` are the defender's clean images, split into ``fit`` (what a defense learns from) and ``holdout``
    (what its automatic rule reads). ``measure`` is how the rules read the held-out images (checked against the
    model's stated clean accuracy by the runner; unchecked, the images as they are, when none is given).
    ``data.test`` and ``triggers`` (the model's own triggers, when the artefact carries them) are for report-only
    curves: no decision may read them.
    """

    loaded: LoadedModel
    data: DataSplits
    clean: ImageSet
    fit: ImageSet
    holdout: ImageSet
    out: Path
    device: str = "cpu"
    seed: int = 0
    progress: bool = True
    measure: HeldOutMeasure | None = None

    def __post_init__(self) -> None:
        if self.measure is None:
            self.measure = held_out_measure(self.loaded.module, self.holdout, None, device=self.device)

    def held_out(self, model: nn.Module) -> float:
        """``model``'s accuracy by the held-out measure (what every clean-data rule reads)."""
        return self.measure.score(model, self.device)

    @property
    def model(self) -> nn.Module:
        return self.loaded.module

    @property
    def num_classes(self) -> int:
        return self.loaded.num_classes

    @property
    def triggers(self) -> list[Trigger]:
        return self.loaded.triggers


@dataclass
class DefenseOutcome:
    """The repaired model, one line saying what changed, the method's figures (``details``) and the files it wrote
    into the run folder; ``spec`` replaces the artefact's spec when the repair changes the model's kind."""

    model: nn.Module
    changed: str
    details: dict[str, Any] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    spec: dict[str, Any] | None = None
