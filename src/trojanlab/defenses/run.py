"""``defend``: the one runner of every defense. It loads the model and the data it was trained on, checks they
fit, draws the defender's clean images, checks the held-out measure against the model's stated clean accuracy
(:mod:`~trojanlab.defenses.heldout`; refusing before any work when none tracks it), evaluates before, lets the defense change the model, evaluates after, and
writes the repaired artefact and ``result.json`` (atomically) into the run folder."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from ..config.base import to_dict
from ..config.defenses import DefenderConfig
from ..errors import ConfigError
from ..evaluation import evaluate_model
from ..models import save_model
from ..reports import DefenseReport
from ..runs import (
    check_device,
    check_fits,
    defender_split,
    finish,
    load_artifact,
    model_data,
    prepare_run,
    provenance,
    seed_everything,
    timed,
)
from .base import DefenseContext
from .heldout import held_out_measure, recorded_clean_accuracy
from .registry import DEFENSES


def resolve_configs(method: str, configs: tuple[Any, ...], seed: int) -> tuple[Any, ...]:
    """One config per class the defense takes, in its order: the given ones, the defaults for the rest (a seed field
    left at its default takes the run's ``seed``)."""
    if method not in DEFENSES:
        raise ConfigError(f"unknown defense {method!r} (known: {', '.join(DEFENSES)})")
    wanted = DEFENSES[method].configs
    given = {type(c): c for c in configs}
    unknown = [type(c).__name__ for c in configs if type(c) not in wanted]
    if unknown:
        raise ConfigError(f"{method} takes {', '.join(c.__name__ for c in wanted)}, not {', '.join(unknown)}")
    resolved = []
    for cls in wanted:
        config = given.get(cls)
        if config is None:
            names = {f.name for f in dataclasses.fields(cls)}
            required = [f.name for f in dataclasses.fields(cls) if f.metadata.get("required")]
            config = cls(seed=seed) if "seed" in names and not required else cls()
        resolved.append(config)
    return tuple(resolved)


def defend(
    method: str,
    model: str | os.PathLike,
    *configs: Any,
    data: str | os.PathLike = "gtsrb",
    defender: DefenderConfig | None = None,
    out: str | os.PathLike,
    device: str = "cpu",
    seed: int = 0,
    progress: bool = True,
    restart: bool = False,
    force: bool = False,
) -> DefenseReport:
    """Run the defense ``method`` (a key of :data:`~trojanlab.defenses.registry.DEFENSES`) on the artefact
    ``model``; ``configs`` are its settings (defaults for those left out). The repaired model is written to
    ``out/pruned`` (or ``out/repaired``) and the report to ``out/result.json``."""
    configs = resolve_configs(method, configs, seed)
    entry = DEFENSES[method]
    defender = defender or entry.defender
    device = check_device(device)
    seed_everything(seed)
    settings = {type(c).__name__: to_dict(c) for c in configs}
    settings["DefenderConfig"] = to_dict(defender)
    scans = {
        f.name: getattr(c, f.name)
        for c in configs
        for f in dataclasses.fields(c)
        if f.name in ("reversed_triggers", "masks_from")
    }  # run folders the configs name: what produced them enters the fingerprint
    run = prepare_run(out, f"defend {method}", settings, seed, restart=restart, force=force, model=model, data=data,
                      defender_data=defender.clean_data, **scans)  # fmt: skip
    out = run.path
    for name, folder in scans.items():  # the run folders a config names hold what it reads (checked before work)
        needed = {
            "reversed_triggers": "reversed_triggers.safetensors",
            "masks_from": "checkpoint/anp_state.safetensors",
        }
        if folder is not None and not (Path(folder) / needed[name]).is_file():
            kind = "`trojanlab detect nc`" if name == "reversed_triggers" else "`trojanlab defend anp`"
            raise ConfigError(f"--{name.replace('_', '-')} {folder}: no {needed[name]} there (a {kind} run folder)")
    loaded = load_artifact(model, device=device)
    splits = model_data(data, loaded.spec, seed)
    splits = check_fits(loaded, splits, model)
    clean, fit, holdout = defender_split(splits, defender, loaded.spec, seed)
    reference, source = defender.clean_accuracy, "--clean-accuracy"
    if reference is None:
        reference, source = recorded_clean_accuracy(model), "recorded beside the artefact"
    measure = held_out_measure(loaded.module, holdout, reference, source if reference is not None else None,
                               seed=seed, device=device)  # fmt: skip
    ctx = DefenseContext(loaded, splits, clean, fit, holdout, out, device, seed, progress, measure)
    run.start()
    before = evaluate_model(loaded.module, splits.test, loaded.triggers, device=device)
    with timed() as clock:
        outcome = entry.apply(ctx, *configs)
    after = evaluate_model(outcome.model, splits.test, loaded.triggers, device=device)
    after["clean_accuracy_drop"] = before["clean_accuracy"] - after["clean_accuracy"]
    after["predicted_clean_accuracy_drop"] = measure.predicted_drop(outcome.model, device)
    spec = dict(outcome.spec if outcome.spec is not None else loaded.spec)
    prov = provenance(method, settings, seed, model=str(model), data=str(data))
    spec["provenance"] = {
        **spec.get("provenance", {}),
        "defense": prov,
    }
    save_model(outcome.model, out / entry.output, spec)
    report = DefenseReport(
        method=method, seconds=clock(), config=settings,
        provenance=prov,
        details={**outcome.details, "heldout_measure": measure.record, "device": device}, files=[f"{entry.output}/", *outcome.files],
        model=str(model), data=splits.name, before=before, after=after, changed=outcome.changed,
        defender_images=len(clean), fit_images=len(fit), holdout_images=len(holdout), output=entry.output,
    )  # fmt: skip
    return finish(run, report)
