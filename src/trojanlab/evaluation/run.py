"""``evaluate``: a model artefact's clean accuracy on a data set and the success rate of the triggers it carries."""

from __future__ import annotations

import os
from typing import Any

from ..runs import check_device, check_fits, load_artifact, model_data, prepare_run
from .metrics import evaluate_model


def evaluate(
    model: str | os.PathLike,
    *,
    data: str | os.PathLike = "gtsrb",
    out: str | os.PathLike | None = None,
    device: str = "cpu",
    restart: bool = False,
    force: bool = False,
) -> dict[str, Any]:
    """Clean accuracy on ``data``'s test split (the model's own split for image folders) and, per trigger, ASR.
    The data's classes are matched to the model's by name where both have names (see
    :func:`trojanlab.runs.check_fits`). With ``out``, the result is also written to ``out/result.json``."""
    device = check_device(device)
    run = None
    if out is not None:
        run = prepare_run(out, "evaluate", {}, 0, restart=restart, force=force, model=model, data=data)
    loaded = load_artifact(model, device=device)
    splits = check_fits(loaded, model_data(data, loaded.spec, 0), model)
    result = evaluate_model(loaded.module, splits.test, loaded.triggers, device=device)
    result.update(model=str(model), data=splits.name)
    if run is not None:
        from ..io import write_json

        run.start()
        write_json(run.path / "result.json", result)
        run.done()
    return result
