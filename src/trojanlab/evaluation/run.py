"""``evaluate``: a model artefact's clean accuracy on a data set and the success rate of the triggers it carries."""

from __future__ import annotations

import os
from typing import Any

from ..io import write_json
from ..runs import check_fits, load_artifact, model_data, output_folder
from .metrics import evaluate_model


def evaluate(model: str | os.PathLike, *, data: str | os.PathLike = "gtsrb", out: str | os.PathLike | None = None,
             device: str = "cpu") -> dict[str, Any]:  # fmt: skip
    """Clean accuracy on ``data``'s test split (the model's own split for image folders) and, per trigger, ASR."""
    folder = output_folder(out) if out is not None else None
    loaded = load_artifact(model, device=device)
    splits = model_data(data, loaded.spec, 0)
    check_fits(loaded, splits, model)
    result = evaluate_model(loaded.module, splits.test, loaded.triggers, device=device)
    result.update(model=str(model), data=splits.name)
    if folder is not None:
        write_json(folder / "result.json", result)
    return result
