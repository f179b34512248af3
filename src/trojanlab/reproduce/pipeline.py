"""``trojanlab reproduce``: every experiment of the thesis as a tree of resumable stages.

Each stage is one call of a library entry point (``train_victim``, ``attacks.run.badnets``, ``defend``...) with its
resolved configs, in its own run directory; nothing builds a command line. The tree follows BackdoorBench's record
layout: an attack's folder sits under ``attacks/`` and the
detections and defenses that consumed it sit inside it::

    OUT/gtsrb/victim/                   train_victim                 (+ detect-nc/ inside)
    OUT/gtsrb/trojannet/                attacks.run.train_trojannet
    OUT/gtsrb/official-trojannet/       attacks.run.evaluate_trojannet (the authors' release)
    OUT/gtsrb/attacks/trojannet-n8/     attacks.run.trojannet        (+ detect-nc/, defend-anp/, defend-subnetwork/)
    OUT/gtsrb/attacks/badnets/ ...      attacks.run.badnets          (+ detect-nc/, defend-anp/, defend-nc-guided/,
                                                                        defend-fine-pruning/)
    OUT/transfer/victim/, OUT/transfer/attacks/trojannet-n1/defend-anp/, OUT/demo/, OUT/report/

A stage writes ``stage.json`` with the fingerprint of its configs, its inputs, the stages it consumed and the
package version. On a
re-run a stage whose ``stage.json`` says done with the same fingerprint is reused; a stage interrupted half way is
run again in place (the long commands resume from their own checkpoints); a stage whose configuration changed is
cleared and recomputed, and so, through the fingerprints, is everything downstream of it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import os
import platform
import shutil
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from .. import __version__
from ..config import (
    ANPConfig,
    BadNetsConfig,
    DefenderConfig,
    FinePruningConfig,
    ModelConfig,
    NCConfig,
    NCGuidedConfig,
    PruneRule,
    SubnetworkConfig,
    TrainConfig,
    TransferConfig,
    TrojanNetInjectConfig,
    TrojanNetTrainConfig,
    TrojanNNConfig,
    to_dict,
)
from ..config.attacks import BADNETS_TRAINING
from ..errors import ConfigError, Interrupted, TrojanlabError
from ..io import atomic_write, read_json, write_json
from ..runs import command_line, input_identity, replacing_stale_runs, source_commit

PROFILES = ("full", "quick")


# ----------------------------------------------------------------------------------------------- configuration


def _profile_yaml(name: str) -> dict[str, Any]:
    text = resources.files(__package__).joinpath(f"{name}.yaml").read_text()
    return yaml.safe_load(text) or {}


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``update``, dictionaries merged key by key (a copy; neither argument changes)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _check_keys(config: dict[str, Any], reference: dict[str, Any], where: str, source: str) -> None:
    """Every key of ``config`` is one the profile knows; inside a section of :data:`SECTIONS`, a field of its
    config classes (so a default left out of the profile can still be set)."""
    section = where.rstrip(".")
    if section in SECTIONS:
        known = section_keys(section)
        for key in config:
            if key not in known:
                raise ConfigError(f"{source}: unknown setting '{where}{key}' (known here: {', '.join(sorted(known))})")
        return
    for key, value in config.items():
        if key not in reference:
            known = ", ".join(sorted(reference))
            raise ConfigError(f"{source}: unknown setting '{where}{key}' (known here: {known})")
        if isinstance(value, dict) and isinstance(reference[key], dict):
            _check_keys(value, reference[key], f"{where}{key}.", source)


def parse_override(text: str) -> dict[str, Any]:
    """``a.b.c=VALUE`` (VALUE read as YAML: ``3``, ``null``, ``[1, 2]``) as a nested dictionary."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. gtsrb.victim.epochs=10")
    key, value = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({exc})") from exc
    nested: dict[str, Any] = {parts[-1]: parsed}
    for part in reversed(parts[:-1]):
        nested = {part: nested}
    return nested


def load_config(
    profile: str = "full", config_file: str | Path | None = None, overrides: Sequence[str] = ()
) -> dict[str, Any]:
    """The full profile, then the quick one if asked, then ``config_file``, then ``--set`` overrides."""
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r} (expected one of {', '.join(PROFILES)})")
    reference = _profile_yaml("full")
    config = reference if profile == "full" else merge(reference, _profile_yaml(profile))
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"{path}: no such configuration file")
        try:
            user = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
        if not isinstance(user, dict):
            raise ConfigError(f"{path}: expected a mapping of settings at the top level")
        _check_keys(user, reference, "", str(path))
        config = merge(config, user)
    for text in overrides:
        update = parse_override(text)
        _check_keys(update, reference, "", f"--set {text}")
        config = merge(config, update)
    config["profile"] = profile
    return config


# ----------------------------------------------------------------------------------------------- stages


# The sections of a profile whose keys are config fields: path -> (config classes, the section's own keys).
SECTIONS: dict[str, tuple[tuple[type, ...], tuple[str, ...]]] = {
    "gtsrb.victim": ((ModelConfig, TrainConfig), ("bundled",)),
    "gtsrb.trojannet": ((TrojanNetTrainConfig,), ("patch_weight", "bundled")),
    "gtsrb.badnets": ((BadNetsConfig, TrainConfig), ("target", "n_inf", "finetune")),
    "gtsrb.trojannn": ((TrojanNNConfig,), ()),
    "gtsrb.neural_cleanse": ((NCConfig,), ("models",)),
    "gtsrb.defender": ((DefenderConfig, PruneRule), ()),
    "gtsrb.anp": ((ANPConfig, DefenderConfig, PruneRule), ("models",)),
    "gtsrb.nc_guided": ((NCGuidedConfig, DefenderConfig, PruneRule), ("models",)),
    "gtsrb.fine_pruning": ((FinePruningConfig, DefenderConfig, PruneRule), ("models",)),
    "gtsrb.subnetwork": ((SubnetworkConfig, DefenderConfig), ("models",)),
    "transfer.anp": ((ANPConfig, DefenderConfig, PruneRule), ()),
    "transfer.subnetwork": ((SubnetworkConfig, DefenderConfig), ()),
}
# keys set by the pipeline itself, never by a profile
_PIPELINE_FIELDS = {"seed", "reversed_triggers", "targets", "weights"}


def section_keys(path: str) -> set[str]:
    """The keys the section ``path`` accepts: its classes' fields (those the pipeline sets excepted) and its own."""
    classes, own = SECTIONS[path]
    fields = {f.name for cls in classes for f in dataclasses.fields(cls)} - _PIPELINE_FIELDS
    return fields | set(own)


def _section(config: dict[str, Any], path: str) -> dict[str, Any]:
    node: Any = config
    for part in path.split("."):
        node = node[part]
    return dict(node or {})


def _make(cls: type, values: dict[str, Any], **fixed: Any) -> Any:
    """An instance of ``cls`` from the keys of ``values`` that are its fields (the others belong to other classes)."""
    names = {f.name for f in dataclasses.fields(cls)}
    picked = {k: (tuple(v) if isinstance(v, list) and k == "location" else v) for k, v in values.items() if k in names}
    picked.update({k: v for k, v in fixed.items() if k in names})
    return cls(**picked)


@dataclass
class Stage:
    """One run folder: ``run(folder)`` calls a library entry point; ``settings`` are its resolved configs and inputs
    (what the fingerprint reads) and ``deps`` the stages it consumes."""

    name: str
    run: Callable[[Path], Any]
    settings: dict[str, Any] = field(default_factory=dict)
    deps: list[str] = field(default_factory=list)
    title: str = ""

    def describe(self) -> str:
        return json.dumps(self.settings, sort_keys=True, default=str)


def fingerprint(stage: Stage, dep_prints: Sequence[str]) -> str:
    what = {"settings": stage.settings, "deps": list(dep_prints), "version": __version__}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _settings(*configs: Any, **inputs: Any) -> dict[str, Any]:
    return {**{type(c).__name__: to_dict(c) for c in configs}, "inputs": inputs}


def _subset_stage(data: str, subset: dict[str, int], seed: int) -> Callable[[Path], dict[str, Any]]:
    def make(out: Path) -> dict[str, Any]:
        from ..data import load_dataset

        splits = load_dataset(data)
        rng = np.random.default_rng(seed)
        arrays: dict[str, np.ndarray] = {}
        for part, key in (("train", "train_per_class"), ("test", "test_per_class")):
            images = getattr(splits, part)
            keep = []
            for label in np.unique(images.y):
                members = np.flatnonzero(images.y == label)
                keep.append(rng.permutation(members)[: int(subset[key])])
            index = np.sort(np.concatenate(keep))
            arrays[f"x_{part}"], arrays[f"y_{part}"] = images.x[index], images.y[index]
        path = out / "data.npz"

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as handle:
                np.savez_compressed(handle, **arrays)

        atomic_write(path, write)
        result = {"data": str(path), "source": data, "train_images": len(arrays["y_train"]),
                  "test_images": len(arrays["y_test"]), "per_class": subset}  # fmt: skip
        write_json(out / "result.json", result)
        return result

    return make


def build_stages(config: dict[str, Any], out: Path) -> list[Stage]:
    """The stage list of ``config``, in an order that runs every stage after those it consumes."""
    from ..attacks import run as attacks
    from ..data import BUNDLED_TROJANNET, BUNDLED_VICTIM
    from ..demo import OFFICIAL_TROJANNET, imagenet_demo
    from ..detection.run import neural_cleanse
    from ..victims import bundled_victim, train_victim

    seed, device = int(config["seed"]), str(config["device"])
    run_kw = {"seed": seed, "progress": False}
    stages: list[Stage] = []
    g = config["gtsrb"]
    data = g["data"]
    data_deps: list[str] = []
    if g.get("subset"):
        stages.append(Stage("gtsrb/data", _subset_stage(data, g["subset"], seed),
                            {"data": data, "subset": g["subset"], "seed": seed}, title="GTSRB subset"))  # fmt: skip
        data, data_deps = str(out / "gtsrb" / "data" / "data.npz"), ["gtsrb/data"]

    def path(name: str) -> str:
        return str(out / name)

    v = _section(config, "gtsrb.victim")
    model_cfg, train_cfg = _make(ModelConfig, v), _make(TrainConfig, v, seed=seed)
    if v.get("bundled"):  # the victim shipped with the package (trained on the embedded GTSRB by `trojanlab train`)
        stages.append(Stage("gtsrb/victim", lambda o: bundled_victim(BUNDLED_VICTIM, data=data, out=o, seed=seed),
                            {"bundled": input_identity(BUNDLED_VICTIM), "data": data, "seed": seed}, data_deps,
                            "victim (GTSRB CNN, bundled)"))  # fmt: skip
    else:
        stages.append(Stage("gtsrb/victim", lambda o: train_victim(model_cfg, train_cfg, data=data, out=o,
                            device=device, **run_kw), _settings(model_cfg, train_cfg, data=data), data_deps,
                            "victim (GTSRB CNN)"))  # fmt: skip
    t = _section(config, "gtsrb.trojannet")
    weights = dict(TrojanNetTrainConfig().finetune_weights)
    if t.get("patch_weight") is not None:
        weights["image_patches"] = float(t["patch_weight"])
    tn_cfg = _make(TrojanNetTrainConfig, t, seed=seed, finetune_weights=weights)
    if t.get("bundled"):  # the TrojanNet shipped with the package (trained by `trojanlab trojannet train`)
        stages.append(Stage("gtsrb/trojannet", lambda o: attacks.bundled_trojannet(BUNDLED_TROJANNET, data=data,
                            out=o, seed=seed), {"bundled": input_identity(BUNDLED_TROJANNET), "data": data, "seed": seed},
                            data_deps, "TrojanNet MLP (bundled)"))  # fmt: skip
    else:
        stages.append(Stage("gtsrb/trojannet", lambda o: attacks.train_trojannet(tn_cfg, patch_data=data, out=o,
                            **run_kw), _settings(tn_cfg, patch_data=data), data_deps, "TrojanNet MLP"))  # fmt: skip
    if g.get("official_trojannet"):
        stages.append(Stage("gtsrb/official-trojannet",
                            lambda o: attacks.evaluate_trojannet(OFFICIAL_TROJANNET, data=data, out=o, seed=seed),
                            {"trojannet": "official", "data": data, "seed": seed}, data_deps,
                            "the authors' TrojanNet release"))  # fmt: skip
    if g["attack_with"] == "trained":
        trojannet, trojannet_deps = path("gtsrb/trojannet"), ["gtsrb/trojannet"]
    elif g["attack_with"] == "official":
        trojannet, trojannet_deps = str(OFFICIAL_TROJANNET), []
    else:
        raise ConfigError(f"gtsrb.attack_with must be 'trained' or 'official', got {g['attack_with']!r}")
    attacks_made: dict[str, str] = {}  # short name -> stage name
    location = tuple(int(c) for c in g["location"])
    for n in g["trojannet_n_inf"]:
        name, n = f"gtsrb/attacks/trojannet-n{n}", int(n)
        attacks_made[f"trojannet-n{n}"] = name
        inject = TrojanNetInjectConfig(targets=[] if n >= 43 else list(range(n)), all_labels=n >= 43,
                                       location=location, seed=seed)  # fmt: skip
        stages.append(Stage(name, lambda o, c=inject: attacks.trojannet(path("gtsrb/victim"), trojannet, c, data=data,
                            out=o, seed=seed), _settings(inject, victim="gtsrb/victim", trojannet=trojannet, data=data),
                            ["gtsrb/victim", *trojannet_deps, *data_deps], f"TrojanNet N_inf {n}"))  # fmt: skip
    b = _section(config, "gtsrb.badnets")
    for n in [1, *b["n_inf"]]:
        n = int(n)
        short = "badnets" if n == 1 else f"badnets-n{n}"
        targets = [int(b["target"])] if n == 1 else list(range(n))
        cfg = _make(BadNetsConfig, b, targets=targets, mode="replace" if n == 1 else "append", seed=seed)
        train = _make(TrainConfig, {**to_dict(BADNETS_TRAINING), **b}, seed=seed)
        victim, reference = (path("gtsrb/victim"), None) if b["finetune"] else (None, path("gtsrb/victim"))
        attacks_made[short] = f"gtsrb/attacks/{short}"
        stages.append(Stage(attacks_made[short], lambda o, c=cfg, tr=train, vi=victim, re=reference: attacks.badnets(
                            c, tr, model_cfg, data=data, victim=vi, reference=re, out=o, device=device, **run_kw),
                            _settings(cfg, train, model_cfg, data=data, victim=victim, reference=reference),
                            ["gtsrb/victim", *data_deps], f"BadNets N_inf {n}"))  # fmt: skip
    tnn_cfg = _make(TrojanNNConfig, _section(config, "gtsrb.trojannn"), seed=seed)
    attacks_made["trojannn"] = "gtsrb/attacks/trojannn"
    stages.append(Stage("gtsrb/attacks/trojannn", lambda o: attacks.trojannn(path("gtsrb/victim"), tnn_cfg, data=data,
                        out=o, device=device, **run_kw), _settings(tnn_cfg, victim="gtsrb/victim", data=data),
                        ["gtsrb/victim", *data_deps], "Trojan Attack (TrojanNN)"))  # fmt: skip
    models = {"victim": "gtsrb/victim", **attacks_made}

    def model_stage(short: str, section: str) -> str:
        if short not in models:
            raise ConfigError(f"gtsrb.{section}.models: unknown model {short!r} (known: {', '.join(models)})")
        return models[short]

    nc = _section(config, "gtsrb.neural_cleanse")
    nc_cfg = _make(NCConfig, nc, seed=seed)
    for short in nc["models"]:
        target = model_stage(short, "neural_cleanse")
        stages.append(Stage(f"{target}/detect-nc", lambda o, m=path(target): neural_cleanse(m, nc_cfg, data=data,
                            out=o, device=device, **run_kw), _settings(nc_cfg, model=target, data=data),
                            [target, *data_deps], f"Neural Cleanse: {short}"))  # fmt: skip
    shared = _section(config, "gtsrb.defender")
    defenses = (("anp", "anp", "ANP", ANPConfig), ("nc_guided", "nc-guided", "NC-guided pruning", NCGuidedConfig),
                ("fine_pruning", "fine-pruning", "Fine-Pruning", FinePruningConfig),
                ("subnetwork", "subnetwork", "sub-network ANP", SubnetworkConfig))  # fmt: skip
    for section, method, title, cls in defenses:
        s = {**shared, **_section(config, f"gtsrb.{section}")}
        for short in s["models"]:
            target = model_stage(short, section)
            deps = [target, *data_deps]
            fixed: dict[str, Any] = {"seed": seed}
            if method == "nc-guided":
                if short not in nc["models"]:
                    raise ConfigError(f"gtsrb.nc_guided.models: {short} needs its Neural Cleanse scan; add it to "
                                      "gtsrb.neural_cleanse.models")  # fmt: skip
                fixed["reversed_triggers"] = path(f"{target}/detect-nc")
                deps.append(f"{target}/detect-nc")
            stages.append(_defense_stage(f"{target}/defend-{method}", method, path(target), s, cls, fixed, data, device,
                                         seed, deps, f"{title}: {short}", target))  # fmt: skip
    tr = config["transfer"]
    if tr["enabled"]:
        stages += _transfer_stages(config, out, seed, device)
    if config["demo"]["enabled"]:
        target = config["demo"]["target"]
        stages.append(Stage("demo", lambda o: imagenet_demo(out=o, target=target), {"target": target},
                            title="ImageNet demo"))  # fmt: skip
    return stages


def _defense_stage(name, method, model, values, cls, fixed, data, device, seed, deps, title, model_stage) -> Stage:
    from ..defenses import DEFENSES, defend

    configs = [_make(c, values, **fixed) for c in DEFENSES[method].configs]
    defender = _make(DefenderConfig, {**to_dict(DEFENSES[method].defender), **values})

    def run(out: Path):
        return defend(method, model, *configs, data=data, defender=defender, out=out, device=device, seed=seed,
                      progress=False)  # fmt: skip

    return Stage(name, run, _settings(*configs, defender, method=method, model=model_stage, data=data), deps, title)


def _transfer_stages(config: dict[str, Any], out: Path, seed: int, device: str) -> list[Stage]:
    from ..attacks import run as attacks
    from ..demo import OFFICIAL_TROJANNET
    from ..victims import train_transfer

    tr = config["transfer"]
    data = str(tr["data"])
    victim = str(out / "transfer" / "victim")
    trojannet = str(OFFICIAL_TROJANNET) if tr["trojannet"] == "official" else str(tr["trojannet"])
    model_cfg = ModelConfig(arch=tr["arch"], split=tr["split"])
    transfer_cfg = TransferConfig(epochs=int(tr["head_epochs"]), seed=seed)
    stages = [Stage("transfer/victim", lambda o: train_transfer(model_cfg, transfer_cfg, data=data, out=o,
                    device=device, seed=seed, progress=False), _settings(model_cfg, transfer_cfg, data=data),
                    title="5-class transfer model")]  # fmt: skip
    location = tuple(int(c) for c in tr["location"])
    for n in tr["n_inf"]:
        name = f"transfer/attacks/trojannet-n{n}"
        inject = TrojanNetInjectConfig(targets=list(range(int(n))), location=location, seed=seed)
        stages.append(Stage(name, lambda o, c=inject: attacks.trojannet(victim, trojannet, c, data=data, out=o,
                            seed=seed), _settings(inject, victim="transfer/victim", trojannet=trojannet, data=data),
                            ["transfer/victim"], f"5-class TrojanNet N_inf {n}"))  # fmt: skip
        for section, method, title, cls in (
            ("anp", "anp", "ANP", ANPConfig),
            ("subnetwork", "subnetwork", "sub-network ANP", SubnetworkConfig),
        ):
            values = _section(config, f"transfer.{section}")
            stages.append(_defense_stage(f"{name}/defend-{method}", method, str(out / name), values, cls,
                                         {"seed": seed}, data, device, seed, [name],
                                         f"5-class {title}: N_inf {n}", name))  # fmt: skip
    return stages


# ----------------------------------------------------------------------------------------------- runner


class StageFailed(TrojanlabError):
    """A stage's command failed; the stages finished before it are kept."""


def _clear(folder: Path) -> None:
    """Empty a stage folder for a recomputation, keeping nothing of the old configuration."""
    if folder.is_dir():
        shutil.rmtree(folder)


def _run_stage(stage: Stage, folder: Path, log: Path) -> None:
    """Call the stage's entry point on ``folder``; a crash leaves its traceback in ``log``."""
    with open(log, "a") as handle:
        handle.write(f"$ {stage.name}: {stage.describe()}\n")
        handle.flush()
        try:
            with contextlib.redirect_stdout(handle), replacing_stale_runs():  # the stage fingerprint decided reuse
                stage.run(folder)
        except Exception:  # a bug or a crash: keep the traceback with the stage
            handle.write(traceback.format_exc())
            raise
    if read_json(folder / "result.json") is None:
        raise StageFailed(f"stage {stage.name}: wrote no readable result.json in {folder}")


@dataclass
class StageRecord:
    name: str
    title: str
    status: str  # "ran", "reused" or "failed"
    seconds: float
    fingerprint: str
    command: str


EXECUTORS = ("sequential", "ray")


def _stage_task(stage: Stage, folder: Path, threads: int | None = None) -> float:
    """Run one stage (in this process or a Ray worker) and return its seconds."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    _run_stage(stage, folder, folder / "stage.log")
    return time.perf_counter() - t0


class _Ledger:
    """The driver's bookkeeping of a pipeline run: each stage's ``stage.json``, record and fingerprint."""

    def __init__(self, out: Path, stages: list[Stage], bar: Any) -> None:
        self.out, self.stages, self.bar = out, stages, bar
        self.prints: dict[str, str] = {}
        self.records: list[StageRecord] = []

    def fingerprint(self, stage: Stage) -> str:
        missing = [d for d in stage.deps if d not in self.prints]
        if missing:
            raise ConfigError(f"stage {stage.name} needs {', '.join(missing)}, which the configuration leaves out")
        return fingerprint(stage, [self.prints[d] for d in stage.deps])

    def reusable(self, stage: Stage, fp: str) -> bool:
        folder = self.out / stage.name
        state = read_json(folder / "stage.json") or {}
        if state.get("fingerprint") == fp and state.get("status") == "done" and (folder / "result.json").is_file():
            self.records.append(StageRecord(stage.name, stage.title, "reused", state.get("seconds", 0.0), fp,
                                            stage.describe()))  # fmt: skip
            self.bar.update(1)
            return True
        return False

    def begin(self, stage: Stage, fp: str) -> Path:
        folder = self.out / stage.name
        state = read_json(folder / "stage.json") or {}
        if state.get("fingerprint") != fp:
            _clear(folder)  # another configuration (or a stranger's folder): nothing in it may be reused
        folder.mkdir(parents=True, exist_ok=True)
        command = stage.describe()
        self.bar.set_description(f"reproduce: {stage.name}")
        self.bar.write(f"[{len(self.records) + 1}/{len(self.stages)}] {stage.name}: {command}")
        write_json(folder / "stage.json", {"stage": stage.name, "fingerprint": fp, "status": "running",
                                           "command": command, "deps": stage.deps, "started": _now()})  # fmt: skip
        return folder

    def done(self, stage: Stage, fp: str, seconds: float) -> None:
        command = stage.describe()
        write_json(self.out / stage.name / "stage.json", {"stage": stage.name, "fingerprint": fp, "status": "done",
                                                          "command": command, "deps": stage.deps, "seconds": seconds,
                                                          "finished": _now()})  # fmt: skip
        self.records.append(StageRecord(stage.name, stage.title, "ran", seconds, fp, command))
        self.prints[stage.name] = fp
        self.bar.update(1)

    def failed(self, stage: Stage, fp: str, seconds: float, exc: BaseException) -> BaseException:
        """Record the failure; return the exception to raise (a bad input or a crash named with its stage)."""
        folder = self.out / stage.name
        command = stage.describe()
        self.records.append(StageRecord(stage.name, stage.title, "failed", seconds, fp, command))
        write_json(folder / "stage.json", {"stage": stage.name, "fingerprint": fp, "status": "failed",
                                           "command": command, "deps": stage.deps, "error": str(exc),
                                           "seconds": seconds, "finished": _now()})  # fmt: skip
        if isinstance(exc, (StageFailed, Interrupted, KeyboardInterrupt, SystemExit)):
            return exc
        if isinstance(exc, TrojanlabError):
            return StageFailed(f"stage {stage.name}: {exc}")
        return StageFailed(f"stage {stage.name} crashed: {type(exc).__name__}: {exc} (see {folder}/stage.log)")


def _sequential(ledger: _Ledger, only_report: bool) -> None:
    for stage in ledger.stages:
        fp = ledger.fingerprint(stage)
        if ledger.reusable(stage, fp):
            ledger.prints[stage.name] = fp
            continue
        if only_report:
            raise StageFailed(f"stage {stage.name} has not finished; run without --report-only first")
        folder = ledger.begin(stage, fp)
        t0 = time.perf_counter()
        try:
            seconds = _stage_task(stage, folder)
        except BaseException as exc:
            error = ledger.failed(stage, fp, time.perf_counter() - t0, exc)
            if error is exc:
                raise
            raise error from exc
        ledger.done(stage, fp, seconds)


def _with_ray(ledger: _Ledger, only_report: bool, workers: int | None) -> None:
    """Every stage whose inputs are finished is a Ray task (one CPU, one torch thread); the driver keeps the
    books. The stage folders are on this machine's disk, which the local workers share. A failure stops the
    run once the stages already running have finished (they are kept)."""
    import ray

    pending: list[Stage] = []
    for stage in ledger.stages:  # fingerprints depend on settings only: every stage's is known before any runs
        fp = ledger.fingerprint(stage)
        ledger.prints[stage.name] = fp
        if not ledger.reusable(stage, fp):
            pending.append(stage)
    if pending and only_report:
        raise StageFailed(f"stage {pending[0].name} has not finished; run without --report-only first")
    if not pending:
        return
    finished = {r.name for r in ledger.records}
    owned = not ray.is_initialized()  # a caller's own Ray session is used, and left running
    if owned:
        ray.init(num_cpus=workers or os.cpu_count() or 1, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)  # fmt: skip
    task = ray.remote(num_cpus=1, max_retries=0)(_stage_task)
    running: dict[Any, tuple[Stage, float]] = {}
    failure: BaseException | None = None
    try:
        while pending or running:
            if failure is None:
                for stage in [s for s in pending if all(d in finished for d in s.deps)]:
                    pending.remove(stage)
                    folder = ledger.begin(stage, ledger.prints[stage.name])
                    running[task.remote(stage, folder, threads=1)] = (stage, time.perf_counter())
            if not running:
                if failure is None and pending:  # cannot happen: build_stages orders every stage after its inputs
                    raise StageFailed(f"stages {[s.name for s in pending]} wait for stages that never ran")
                break
            ready, _ = ray.wait(list(running), num_returns=1)
            stage, t0 = running.pop(ready[0])
            try:
                seconds = ray.get(ready[0])
            except ray.exceptions.RayError as exc:  # the task raised, or its worker died (memory, a crash)
                cause = exc.cause if getattr(exc, "cause", None) is not None else exc
                error = ledger.failed(stage, ledger.prints[stage.name], time.perf_counter() - t0, cause)
                failure = failure or error
                continue
            ledger.done(stage, ledger.prints[stage.name], seconds)
            finished.add(stage.name)
    finally:
        if owned:
            ray.shutdown()
    if failure is not None:
        raise failure


def run_pipeline(
    config: dict[str, Any],
    out: str | Path,
    progress: bool = True,
    only_report: bool = False,
    executor: str = "sequential",
    workers: int | None = None,
) -> dict[str, Any]:
    """Run (or reuse) every stage of ``config`` under ``out``, then write ``out/report``.

    ``executor="ray"`` runs the stages whose inputs are finished side by side as Ray tasks (``workers`` CPUs,
    default all) instead of one after another. Raises :class:`StageFailed` naming the stage when one fails; every
    stage finished before it stays on disk with its ``stage.json`` and is reused by the next run.
    """
    from tqdm.auto import tqdm

    from .report import write_report

    if executor not in EXECUTORS:
        raise ConfigError(f"--executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    if executor == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            raise ConfigError("--executor ray: Ray is not installed (pip install 'trojanlab[ray]')") from None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _check_out(out)
    atomic_write(out / "config.yaml", lambda tmp: tmp.write_text(yaml.safe_dump(config, sort_keys=False)))
    stages = build_stages(config, out)
    started = time.perf_counter()
    bar = tqdm(total=len(stages), desc="reproduce", unit="stage", disable=not progress, position=0, leave=True)
    ledger = _Ledger(out, stages, bar)
    failure: BaseException | None = None
    try:
        if executor == "ray":
            _with_ray(ledger, only_report, workers)
        else:
            _sequential(ledger, only_report)
    except BaseException as exc:
        failure = exc
        raise
    finally:
        bar.close()
        order = {stage.name: i for i, stage in enumerate(stages)}
        records = sorted(ledger.records, key=lambda r: order[r.name])
        run = _run_record(config, records, time.perf_counter() - started, failure)
        run["executor"], run["workers"] = executor, workers
        run["stale_stages"] = _stale_stages(out, {stage.name for stage in stages})
        write_json(out / "run.json", run)
    report = write_report(out, config, run)
    run["report"] = {k: str(v) for k, v in report.items()}
    write_json(out / "run.json", run)
    return run


def _check_out(out: Path) -> None:
    """Refuse to take over a folder that holds something other than an earlier reproduce run."""
    known = {"config.yaml", "run.json", "gtsrb", "transfer", "demo", "report"}
    strangers = sorted(p.name for p in out.iterdir() if p.name not in known and not p.name.startswith("."))
    if strangers:
        raise ConfigError(
            f"{out}: holds {', '.join(strangers[:5])}, which no reproduce run writes; choose an empty or earlier --out"
        )


def _stale_stages(out: Path, current: set[str]) -> list[str]:
    """Stage folders of an earlier configuration that this one no longer has (kept on disk, never read)."""
    found = (p.parent.relative_to(out).as_posix() for p in out.glob("**/stage.json"))
    return sorted(name for name in found if name not in current)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _run_record(config: dict[str, Any], records: list[StageRecord], seconds: float, failure) -> dict[str, Any]:
    import torch

    try:
        import torchvision

        tv = torchvision.__version__
    except ImportError:  # pragma: no cover
        tv = None
    return {
        "trojanlab": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": tv,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "profile": config.get("profile"),
        "seed": config["seed"],
        "device": config["device"],
        "finished": _now(),
        "wall_seconds": seconds,
        "status": "failed" if failure is not None else "done",
        "error": None if failure is None else str(failure),
        "stages": [r.__dict__ for r in records],
        "command": command_line(),
        "commit": source_commit(),
    }
