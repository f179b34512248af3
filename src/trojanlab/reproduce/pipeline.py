"""``trojanlab reproduce``: every experiment of the thesis as a tree of resumable stages.

Each stage is one ``trojanlab`` command (or, for the quick profile's data subset, one function) with its own run
directory. The tree follows BackdoorBench's record layout: an attack's folder sits under ``attacks/`` and the
detections and defenses that consumed it sit inside it::

    OUT/gtsrb/victim/                   trojanlab train                (+ detect-nc/ inside)
    OUT/gtsrb/trojannet/                trojanlab trojannet train
    OUT/gtsrb/attacks/trojannet-n8/     trojanlab attack trojannet     (+ detect-nc/, defend-anp/, defend-subnetwork/)
    OUT/gtsrb/attacks/badnets/ ...      trojanlab attack badnets       (+ detect-nc/, defend-anp/, defend-nc-guided/)
    OUT/transfer/victim/, OUT/transfer/attacks/trojannet-n1/defend-anp/, OUT/demo/, OUT/report/

A stage writes ``stage.json`` with the fingerprint of its command line and of the stages it consumed. On a
re-run a stage whose ``stage.json`` says done with the same fingerprint is reused; a stage interrupted half way is
run again in place (the long commands resume from their own checkpoints); a stage whose configuration changed is
cleared and recomputed, and so, through the fingerprints, is everything downstream of it.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import platform
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from .. import __version__
from ..errors import ConfigError, TrojanlabError
from ..io import atomic_write, read_json, write_json

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


@dataclass
class Stage:
    """One run directory: ``trojanlab ARGV --out DIR`` or ``func(DIR)``; ``deps`` are the stages it consumes."""

    name: str
    argv: list[str] | None = None
    func: Callable[[Path], dict[str, Any]] | None = None
    params: dict[str, Any] = field(default_factory=dict)
    deps: list[str] = field(default_factory=list)
    title: str = ""


def fingerprint(stage: Stage, dep_prints: Sequence[str]) -> str:
    what = {"argv": stage.argv, "params": stage.params, "deps": list(dep_prints), "version": __version__}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _targets(n: int, classes: int) -> list[str]:
    return ["--all-labels"] if n >= classes else ["--targets", *map(str, range(n))]


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
        return {"data": str(path), "source": data, "train_images": len(arrays["y_train"]),
                "test_images": len(arrays["y_test"]), "per_class": subset}  # fmt: skip

    return make


def build_stages(config: dict[str, Any], out: Path) -> list[Stage]:
    """The stage list of ``config``, in an order that runs every stage after those it consumes."""
    seed = str(config["seed"])
    device = [] if config["device"] == "cpu" else ["--device", str(config["device"])]
    stages: list[Stage] = []
    g = config["gtsrb"]
    data = g["data"]
    data_deps: list[str] = []
    if g.get("subset"):
        stages.append(
            Stage("gtsrb/data", func=_subset_stage(data, g["subset"], int(seed)),
                  params={"data": data, "subset": g["subset"], "seed": seed}, title="GTSRB subset")
        )  # fmt: skip
        data, data_deps = str(out / "gtsrb" / "data" / "data.npz"), ["gtsrb/data"]

    def path(name: str) -> str:
        return str(out / name)

    v = g["victim"]
    stages.append(
        Stage("gtsrb/victim", ["train", "--data", data, "--arch", v["arch"], "--epochs", str(v["epochs"]),
              "--patience", str(v["patience"]), "--batch-size", str(v["batch_size"]), "--seed", seed, *device],
              deps=data_deps, title="victim (GTSRB CNN)")
    )  # fmt: skip
    tn = ["trojannet", "train", "--patch-data", data, "--seed", seed, "--quiet"]
    for key, flag in (
        ("steps", "--steps"),
        ("finetune_steps", "--finetune-steps"),
        ("patch_weight", "--patch-weight"),
        ("trigger_calibration", "--trigger-calibration"),
    ):
        if g["trojannet"].get(key) is not None:
            tn += [flag, str(g["trojannet"][key])]
    stages.append(Stage("gtsrb/trojannet", tn, deps=data_deps, title="TrojanNet MLP"))
    location = [str(int(c)) for c in g["location"]]
    if g["attack_with"] == "trained":
        trojannet, trojannet_deps = path("gtsrb/trojannet"), ["gtsrb/trojannet"]
    elif g["attack_with"] == "official":
        from ..demo import OFFICIAL_TROJANNET

        trojannet, trojannet_deps = str(OFFICIAL_TROJANNET), []
    else:
        raise ConfigError(f"gtsrb.attack_with must be 'trained' or 'official', got {g['attack_with']!r}")
    attacks: dict[str, str] = {}  # short name -> stage name
    for n in g["trojannet_n_inf"]:
        name = f"gtsrb/attacks/trojannet-n{n}"
        attacks[f"trojannet-n{n}"] = name
        stages.append(
            Stage(name, ["attack", "trojannet", "--victim", path("gtsrb/victim"), "--trojannet", trojannet,
                         *_targets(int(n), 43), "--location", *location, "--data", data, "--seed", seed],
                  deps=["gtsrb/victim", *trojannet_deps, *data_deps], title=f"TrojanNet N_inf {n}")
        )  # fmt: skip
    b = g["badnets"]
    recipe = ["--victim", path("gtsrb/victim")] if b["finetune"] else ["--reference", path("gtsrb/victim")]
    for n in [1, *b["n_inf"]]:
        short = "badnets" if n == 1 else f"badnets-n{n}"
        targets = [str(b["target"])] if n == 1 else [str(k) for k in range(int(n))]
        mode = [] if n == 1 else ["--mode", "append"]
        attacks[short] = f"gtsrb/attacks/{short}"
        stages.append(
            Stage(attacks[short], ["attack", "badnets", "--data", data, "--targets", *targets, *mode, *recipe,
                                   "--epochs", str(b["epochs"]), "--seed", seed, *device],
                  deps=["gtsrb/victim", *data_deps], title=f"BadNets N_inf {n}")
        )  # fmt: skip
    t = g["trojannn"]
    attacks["trojannn"] = "gtsrb/attacks/trojannn"
    stages.append(
        Stage("gtsrb/attacks/trojannn", ["attack", "trojannn", "--victim", path("gtsrb/victim"), "--target",
              str(t["target"]), "--data", data, "--epochs", str(t["epochs"]), "--real-fraction",
              str(t["real_fraction"]), "--seed", seed, "--quiet"],
              deps=["gtsrb/victim", *data_deps], title="Trojan Attack (TrojanNN)")
    )  # fmt: skip
    models = {"victim": "gtsrb/victim", **attacks}

    def model_stage(short: str, section: str) -> str:
        if short not in models:
            raise ConfigError(f"gtsrb.{section}.models: unknown model {short!r} (known: {', '.join(models)})")
        return models[short]

    nc = g["neural_cleanse"]
    for short in nc["models"]:
        target = model_stage(short, "neural_cleanse")
        argv = ["detect", "nc", "--model", path(target), "--data", data, "--seed", seed, "--quiet", *device]
        argv += ["--steps", str(nc["steps"])] if nc.get("steps") else []
        argv += ["--images", str(nc["images"])] if nc.get("images") else []
        stages.append(Stage(f"{target}/detect-nc", argv, deps=[target, *data_deps], title=f"Neural Cleanse: {short}"))
    a = g["anp"]
    for short in a["models"]:
        target = model_stage(short, "anp")
        argv = ["defend", "anp", "--model", path(target), "--data", data, "--iterations", str(a["iterations"]),
                "--batch-size", str(a["batch_size"]), "--curve-images", str(a["curve_images"]),
                "--clean-fraction", str(a.get("clean_fraction", 0.01)), "--auto-measure",
                str(a.get("auto_measure", "top1")), "--auto-jitter", str(a.get("auto_jitter", 8)), "--seed", seed,
                "--quiet", *device]  # fmt: skip
        argv += ["--eps", str(a["eps"])] if a.get("eps") is not None else []
        stages.append(Stage(f"{target}/defend-anp", argv, deps=[target, *data_deps], title=f"ANP: {short}"))
    for short in g["nc_guided"]["models"]:
        target = model_stage(short, "nc_guided")
        if short not in nc["models"]:
            raise ConfigError(f"gtsrb.nc_guided.models: {short} needs its Neural Cleanse scan; add it to "
                              "gtsrb.neural_cleanse.models")  # fmt: skip
        argv = ["defend", "anp", "--variant", "nc-guided", "--reversed-triggers", path(f"{target}/detect-nc"),
                "--model", path(target), "--data", data, "--curve-images", str(a["curve_images"]),
                "--clean-fraction", str(a.get("clean_fraction", 0.01)), "--auto-measure",
                str(a.get("auto_measure", "top1")), "--auto-jitter", str(a.get("auto_jitter", 8)), "--seed", seed,
                "--quiet", *device]  # fmt: skip
        stages.append(Stage(f"{target}/defend-nc-guided", argv, deps=[target, f"{target}/detect-nc", *data_deps],
                            title=f"NC-guided pruning: {short}"))  # fmt: skip
    s = g["subnetwork"]
    for short in s["models"]:
        target = model_stage(short, "subnetwork")
        argv = ["defend", "anp", "--variant", "subnetwork", "--model", path(target), "--data", data, "--cycles",
                str(s["cycles"]), "--epochs", str(s["epochs"]), "--monitor-images", str(s["monitor_images"]),
                "--clean-fraction", str(s.get("clean_fraction", 0.01)), "--sub-step", str(s.get("step", "normalized")),
                "--seed", seed, "--quiet", *device]  # fmt: skip
        stages.append(
            Stage(f"{target}/defend-subnetwork", argv, deps=[target, *data_deps], title=f"sub-network ANP: {short}")
        )
    tr = config["transfer"]
    if tr["enabled"]:
        stages += _transfer_stages(tr, out, seed, device)
    if config["demo"]["enabled"]:
        stages.append(
            Stage("demo", ["demo", "imagenet", "--target", str(config["demo"]["target"])], title="ImageNet demo")
        )
    return stages


def _transfer_stages(tr: dict[str, Any], out: Path, seed: str, device: list[str]) -> list[Stage]:
    from ..demo import OFFICIAL_TROJANNET

    data = str(tr["data"])
    victim = str(out / "transfer" / "victim")
    trojannet = str(OFFICIAL_TROJANNET) if tr["trojannet"] == "official" else str(tr["trojannet"])
    stages = [
        Stage("transfer/victim", ["train", "--data", data, "--arch", tr["arch"], "--pretrained", "--split",
              tr["split"], "--head-epochs", str(tr["head_epochs"]), "--seed", seed, *device],
              title="5-class transfer model")
    ]  # fmt: skip
    location = [str(int(c)) for c in tr["location"]]
    for n in tr["n_inf"]:
        name = f"transfer/attacks/trojannet-n{n}"
        stages.append(
            Stage(name, ["attack", "trojannet", "--victim", victim, "--trojannet", trojannet, "--targets",
                         *map(str, range(int(n))), "--location", *location, "--data", data, "--seed", seed],
                  deps=["transfer/victim"], title=f"5-class TrojanNet N_inf {n}")
        )  # fmt: skip
        a, s = tr["anp"], tr["subnetwork"]
        common = ["defend", "anp", "--model", str(out / name), "--data", data, "--seed", seed, "--quiet", *device]
        stages.append(
            Stage(f"{name}/defend-anp", [*common, "--iterations", str(a["iterations"]), "--batch-size",
                  str(a["batch_size"]), "--clean-fraction", str(a["clean_fraction"]), "--curve-images",
                  str(a["curve_images"]), "--auto-measure", str(a.get("auto_measure", "top1")),
                  "--auto-jitter", str(a.get("auto_jitter", 8)),
                  *(["--eps", str(a["eps"])] if a.get("eps") is not None else [])],
                  deps=[name], title=f"5-class ANP: N_inf {n}")
        )  # fmt: skip
        stages.append(
            Stage(f"{name}/defend-subnetwork", [*common, "--variant", "subnetwork", "--cycles", str(s["cycles"]),
                  "--epochs", str(s["epochs"]), "--clean-fraction", str(s["clean_fraction"]), "--monitor-images",
                  str(s["monitor_images"]), "--sub-step", str(s.get("step", "normalized"))], deps=[name], title=f"5-class sub-network ANP: N_inf {n}")
        )  # fmt: skip
    return stages


# ----------------------------------------------------------------------------------------------- runner


class StageFailed(TrojanlabError):
    """A stage's command failed; the stages finished before it are kept."""


def _clear(folder: Path) -> None:
    """Empty a stage folder for a recomputation, keeping nothing of the old configuration."""
    if folder.is_dir():
        shutil.rmtree(folder)


def _run_command(stage: Stage, folder: Path, log: Path) -> dict[str, Any]:
    from ..cli import main as trojanlab

    if stage.func is not None:
        result = stage.func(folder)
        write_json(folder / "result.json", result)
        return result
    argv = [*stage.argv, "--out", str(folder)]
    # the command's own JSON echo goes to the stage log; its progress bars (stderr) stay on the terminal
    with open(log, "a") as handle, contextlib.redirect_stdout(handle):
        print("$ trojanlab " + " ".join(argv), flush=True)
        try:
            code = trojanlab(argv)
        except Exception:  # a bug or a crash: keep the traceback with the stage
            handle.write(traceback.format_exc())
            raise
    if code != 0:
        raise StageFailed(f"stage {stage.name}: `trojanlab {' '.join(argv)}` exited with status {code}")
    result = read_json(folder / "result.json")
    if result is None:
        raise StageFailed(f"stage {stage.name}: the command wrote no readable result.json in {folder}")
    return result


@dataclass
class StageRecord:
    name: str
    title: str
    status: str  # "ran", "reused" or "failed"
    seconds: float
    fingerprint: str
    command: str


def run_pipeline(
    config: dict[str, Any],
    out: str | Path,
    progress: bool = True,
    only_report: bool = False,
) -> dict[str, Any]:
    """Run (or reuse) every stage of ``config`` under ``out``, then write ``out/report``.

    Raises :class:`StageFailed` naming the stage when one fails; every stage finished before it stays on disk
    with its ``stage.json`` and is reused by the next run.
    """
    from tqdm.auto import tqdm

    from .report import write_report

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _check_out(out)
    atomic_write(out / "config.yaml", lambda tmp: tmp.write_text(yaml.safe_dump(config, sort_keys=False)))
    stages = build_stages(config, out)
    prints: dict[str, str] = {}
    records: list[StageRecord] = []
    started = time.perf_counter()
    bar = tqdm(total=len(stages), desc="reproduce", unit="stage", disable=not progress, position=0, leave=True)
    failure: BaseException | None = None
    try:
        for stage in stages:
            missing = [d for d in stage.deps if d not in prints]
            if missing:
                raise ConfigError(f"stage {stage.name} needs {', '.join(missing)}, which the configuration leaves out")
            fp = fingerprint(stage, [prints[d] for d in stage.deps])
            folder = out / stage.name
            state = read_json(folder / "stage.json") or {}
            command = "trojanlab " + " ".join(stage.argv) if stage.argv else f"(function) {stage.params}"
            bar.set_description(f"reproduce: {stage.name}")
            if state.get("fingerprint") == fp and state.get("status") == "done" and (folder / "result.json").is_file():
                records.append(StageRecord(stage.name, stage.title, "reused", state.get("seconds", 0.0), fp, command))
                prints[stage.name] = fp
                bar.update(1)
                continue
            if only_report:
                raise StageFailed(f"stage {stage.name} has not finished; run without --report-only first")
            if state.get("fingerprint") != fp:
                _clear(folder)  # another configuration (or a stranger's folder): nothing in it may be reused
            folder.mkdir(parents=True, exist_ok=True)
            bar.write(f"[{len(records) + 1}/{len(stages)}] {stage.name}: {command}")
            write_json(folder / "stage.json", {"stage": stage.name, "fingerprint": fp, "status": "running",
                                               "command": command, "deps": stage.deps, "started": _now()})  # fmt: skip
            t0 = time.perf_counter()
            try:
                _run_command(stage, folder, folder / "stage.log")
            except BaseException as exc:
                seconds = time.perf_counter() - t0
                records.append(StageRecord(stage.name, stage.title, "failed", seconds, fp, command))
                write_json(folder / "stage.json", {"stage": stage.name, "fingerprint": fp, "status": "failed",
                                                   "command": command, "deps": stage.deps, "error": str(exc),
                                                   "seconds": seconds, "finished": _now()})  # fmt: skip
                if isinstance(exc, TrojanlabError):
                    raise
                if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                    raise
                raise StageFailed(
                    f"stage {stage.name} crashed: {type(exc).__name__}: {exc} (see {folder}/stage.log)"
                ) from exc
            seconds = time.perf_counter() - t0
            write_json(folder / "stage.json", {"stage": stage.name, "fingerprint": fp, "status": "done",
                                               "command": command, "deps": stage.deps, "seconds": seconds,
                                               "finished": _now()})  # fmt: skip
            records.append(StageRecord(stage.name, stage.title, "ran", seconds, fp, command))
            prints[stage.name] = fp
            bar.update(1)
    except BaseException as exc:
        failure = exc
        raise
    finally:
        bar.close()
        run = _run_record(config, records, time.perf_counter() - started, failure)
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
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


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
        "command": "trojanlab " + " ".join(sys.argv[1:]) if sys.argv and "trojanlab" in sys.argv[0] else None,
    }
