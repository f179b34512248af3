"""``trojanlab zoo build``: every member of a zoo built, one after another or as Ray tasks, into one folder.

The folder holds ``members/<id>/model/`` (each member's artefact: weights, spec with its triggers, ``result.json``),
``members/<id>/member.json`` (its settings and figures; written last, so a member without it is not finished) and
the manifest, ``zoo.json`` and ``zoo.csv``, rewritten atomically after every member. A second call with the same
config keeps the finished members and builds the rest (an interrupted member resumes its training checkpoint
from ``work/<id>/`` when the members run on this machine).

With Ray every member is a task of one CPU and one torch thread that returns the member's files; the driver writes
them, so the workers need no shared file system (``--address`` joins a cluster whose nodes have trojanlab
installed). Trojan Attack and TrojanNet members are planted into a clean member: they are submitted when their base
is finished, with its files.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..config.base import to_dict
from ..data import load_dataset
from ..errors import ConfigError
from ..io import atomic_write, file_digest, read_json, write_json
from ..models.artifacts import WEIGHTS_FILE
from ..reports import Report
from ..runs import finish, prepare_run, provenance
from .config import ZooConfig
from .members import MODEL_FOLDER, build_member, read_files
from .sampler import sample

EXECUTORS = ("auto", "sequential", "ray")
MANIFEST = "zoo.json"
TABLE = "zoo.csv"
RECORD = "member.json"
COLUMNS = ("id", "status", "family", "arch", "normalize", "epochs", "optimizer", "augment", "seed", "target",
           "trigger", "poison_rate", "clean_accuracy", "attack_success_rate", "seconds", "threads", "base", "path", "error")  # fmt: skip


def ray_available() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_executor(executor: str, address: str | None) -> str:
    """``auto`` is Ray when it is installed, else sequential; asking for Ray without it is a :class:`ConfigError`."""
    if executor not in EXECUTORS:
        raise ConfigError(f"--executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    if executor == "auto":
        executor = "ray" if ray_available() else "sequential"
    if executor == "ray" and not ray_available():
        raise ConfigError("--executor ray: Ray is not installed (pip install 'trojanlab[ray]'), or use sequential")
    if address and executor != "ray":
        raise ConfigError("--address joins a Ray cluster: it needs --executor ray")
    return executor


def _trigger_text(member: dict[str, Any]) -> str:
    """A short description of a member's trigger for the CSV (the full trigger is in its spec)."""
    attack = member.get("attack") or {}
    family = member.get("family")
    if family == "badnets":
        return "white 4x4 square, bottom right"
    if family == "patch":
        size, (row, col) = attack["trigger_size"], attack["location"]
        return f"{attack['pattern']} {size}x{size} at ({row},{col}) alpha {attack['alpha']}"
    if family == "blended":
        return f"noise blend alpha {attack['alpha']}"
    if family == "wanet":
        return f"warp k 4 s {attack['strength']}"
    if family == "trojannn":
        size, (row, col) = attack["trigger_size"], attack["location"]
        return f"optimised {size}x{size} at ({row},{col})"
    if family == "trojannet":
        row, col = attack["location"]
        return f"TrojanNet 4x4 pattern {attack['targets'][0]} at ({row},{col})"
    return ""


def member_record(
    member: dict[str, Any], report: dict[str, Any], seconds: float, floor: float, threads: int | None = None
) -> dict[str, Any]:
    """A finished member's manifest row: its settings, figures and status (``clean``, ``backdoored``, or ``failed``
    when its ASR stays below ``floor``)."""
    asr = report.get("attack_success_rate")
    status = "clean" if member["role"] == "clean" else ("backdoored" if asr is not None and asr >= floor else "failed")
    attack = member.get("attack") or {}
    target = attack.get("target", (attack.get("targets") or [None])[0])
    return {
        "id": member["id"], "status": status, "family": member["family"] or "clean", "arch": member["model"]["arch"],
        "normalize": member["model"]["normalize"], "epochs": member["train"]["epochs"],
        "optimizer": member["train"]["optimizer"], "augment": member["train"]["augment"], "seed": member["seed"],
        "target": target, "trigger": _trigger_text(member), "poison_rate": attack.get("poison_rate"),
        "clean_accuracy": report.get("clean_accuracy"), "attack_success_rate": asr, "seconds": round(seconds, 1),
        "base": member.get("base"), "path": f"members/{member['id']}/{MODEL_FOLDER}", "error": None,
        "threads": threads, "base_weights": report.get("base_weights"), "member": member,
    }  # fmt: skip


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per family: members, how many reached the ASR floor, clean accuracy and ASR mean / min / max."""
    table: dict[str, Any] = {}
    for family in dict.fromkeys(r["family"] for r in records):
        rows = [r for r in records if r["family"] == family and r["status"] != "error"]
        entry: dict[str, Any] = {"members": len(rows), "errors": sum(r["family"] == family and r["status"] == "error"
                                                                  for r in records)}  # fmt: skip
        if family != "clean":
            entry["backdoored"] = sum(r["status"] == "backdoored" for r in rows)
            entry["failed"] = sum(r["status"] == "failed" for r in rows)
        for key in ("clean_accuracy", "attack_success_rate"):
            values = [r[key] for r in rows if r[key] is not None]
            if values:
                entry[key] = {"mean": float(np.mean(values)), "min": float(min(values)), "max": float(max(values))}
        table[family] = entry
    return table


class ZooFolder:
    """The zoo's folder: members' files and records, the manifest."""

    def __init__(self, path: Path, cfg: ZooConfig, members: list[dict[str, Any]]) -> None:
        self.path, self.cfg, self.members = path, cfg, members
        self.records: dict[str, dict[str, Any]] = {}

    def member_folder(self, member_id: str) -> Path:
        return self.path / "members" / member_id

    def work_folder(self, member_id: str) -> Path:
        return self.path / "work" / member_id

    def finished(self) -> dict[str, dict[str, Any]]:
        """Records of the members already built with the settings sampled now (others are rebuilt)."""
        done: dict[str, dict[str, Any]] = {}
        for member in self.members:  # bases come first
            record = read_json(self.member_folder(member["id"]) / RECORD)
            if not isinstance(record, dict) or record.get("member") != member or record.get("status") == "error":
                continue
            base = member.get("base")
            if base and (base not in done or record.get("base_weights") != self.weights_digest(base)):
                continue  # planted in a base that was rebuilt since: planted again
            done[member["id"]] = record
        self.records.update(done)
        return done

    def work_for(self, member: dict[str, Any]) -> str:
        """The member's work folder, emptied first when it was left by a member of other settings (a changed config
        or sampler): its checkpoints belong to another run."""
        folder = self.work_folder(member["id"])
        marker = folder / RECORD
        if folder.exists() and marker.exists() and read_json(marker) != member:
            shutil.rmtree(folder)
        write_json(marker, member)
        return str(folder)

    def weights_digest(self, member_id: str) -> str | None:
        weights = self.member_folder(member_id) / MODEL_FOLDER / WEIGHTS_FILE
        return file_digest(weights) if weights.is_file() else None

    def model_files(self, member_id: str) -> dict[str, bytes]:
        return read_files(self.member_folder(member_id) / MODEL_FOLDER)

    def write_member(self, member: dict[str, Any], files: dict[str, bytes], record: dict[str, Any]) -> None:
        """The member's files, then its record (which marks it finished), each atomically."""
        folder = self.member_folder(member["id"])
        if folder.exists():  # an earlier call stopped while writing it, or built it with other settings
            shutil.rmtree(folder)
        for name, content in files.items():
            atomic_write(folder / MODEL_FOLDER / name, lambda tmp, data=content: tmp.write_bytes(data))
        write_json(folder / RECORD, record)
        shutil.rmtree(self.work_folder(member["id"]), ignore_errors=True)
        self.records[member["id"]] = record

    def record_error(self, member: dict[str, Any], error: str) -> None:
        record = {**{c: None for c in COLUMNS}, "id": member["id"], "status": "error",
                  "family": member["family"] or "clean", "base": member.get("base"), "error": error, "member": member}  # fmt: skip
        self.records[member["id"]] = record

    def write_manifest(self, extra: dict[str, Any]) -> None:
        rows = [self.records[m["id"]] for m in self.members if m["id"] in self.records]
        write_json(self.path / MANIFEST, {
            "zoo": 1, "config": to_dict(self.cfg), "members_total": len(self.members), "members_built": sum(
                r["status"] != "error" for r in rows), "summary": summarise(rows), **extra,
            "members": [{k: v for k, v in r.items() if k != "member"} | {"settings": r["member"]} for r in rows],
        })  # fmt: skip
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write(self.path / TABLE, lambda tmp: tmp.write_text(buffer.getvalue()))


Outcome = tuple[dict[str, Any], dict[str, Any] | None, str | None]  # member, result of build_member, error


def _sequential(zoo: ZooFolder, pending: list[dict[str, Any]], data: str, threads: int | None) -> Iterator[Outcome]:
    for member in pending:
        base = member.get("base")
        if base and zoo.records.get(base, {}).get("status") != "clean":
            yield member, None, f"its base member {base} was not built"
            continue
        try:
            result = build_member(member, data, work=zoo.work_for(member),
                                  base_files=zoo.model_files(base) if base else None, threads=threads)  # fmt: skip
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # noqa: BLE001 -- one member's failure is recorded; the others are still built
            yield member, None, f"{type(exc).__name__}: {exc}"
            continue
        yield member, result, None


def _ray(
    zoo: ZooFolder, pending: list[dict[str, Any]], data: str, address: str | None, workers: int | None, local: bool
) -> Iterator[Outcome]:
    if not pending:
        return
    import ray

    owned = not ray.is_initialized()  # a caller's own Ray session is used, and left running
    if owned and address:
        ray.init(address=address, log_to_driver=False)
    elif owned:
        ray.init(num_cpus=workers or os.cpu_count() or 1, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)  # fmt: skip
    task = ray.remote(num_cpus=1, max_retries=0)(build_member)
    try:
        waiting = list(pending)
        running: dict[Any, dict[str, Any]] = {}
        while waiting or running:
            for member in list(waiting):
                base = member.get("base")
                if base and base in running_ids(running):
                    continue
                if base and zoo.records.get(base, {}).get("status") != "clean":
                    waiting.remove(member)
                    yield member, None, f"its base member {base} was not built"
                    continue
                waiting.remove(member)
                work = zoo.work_for(member) if local else None
                ref = task.remote(
                    member, data, work=work, base_files=zoo.model_files(base) if base else None, threads=1
                )
                running[ref] = member
            if not running:
                continue
            ready, _ = ray.wait(list(running), num_returns=1)
            member = running.pop(ready[0])
            try:
                yield member, ray.get(ready[0]), None
            except ray.exceptions.RayError as exc:  # the task raised, or its worker died (memory, a crash)
                cause = exc.cause if getattr(exc, "cause", None) is not None else exc
                yield member, None, f"{type(cause).__name__}: {str(cause).splitlines()[-1] if str(cause) else ''}"
    finally:
        if owned:
            ray.shutdown()


def running_ids(running: dict[Any, dict[str, Any]]) -> set[str]:
    return {m["id"] for m in running.values()}


COUNTS = ("clean", "backdoored")
"""How far a zoo goes. They are not part of its folder's identity: member ``i`` of either role is drawn from its own
seed, so raising ``backdoored`` adds members and keeps every member already built (``sample``'s prefix property);
raising ``clean`` also draws the bases of the Trojan Attack and TrojanNet members anew (they are planted again)."""


def select_members(members: list[dict[str, Any]], only: list[str]) -> list[dict[str, Any]]:
    """The members named in ``only`` and the bases they are planted into, in the sampler's order; an unknown name
    is a :class:`ConfigError`."""
    known = {m["id"]: m for m in members}
    unknown = [name for name in only if name not in known]
    if unknown:
        raise ConfigError(f"--members: no member {', '.join(unknown)} in this zoo (it has {members[0]['id']} .. "
                          f"{members[-1]['id']}, {len(members)} in all)")  # fmt: skip
    wanted = set(only) | {known[name]["base"] for name in only if known[name].get("base")}
    return [m for m in members if m["id"] in wanted]


def sampling_settings(cfg: ZooConfig) -> dict[str, Any]:
    """The settings that decide what each member is (the zoo folder's identity): all but :data:`COUNTS`."""
    return {k: v for k, v in to_dict(cfg).items() if k not in COUNTS}


def _migrate_counted_identity(out: Path, cfg: ZooConfig) -> None:
    """A zoo folder written when the counts were part of its identity gets the identity of today's rule, so a
    larger zoo of the same sampling settings grows it instead of being refused. Nothing else is touched."""
    from ..runs import MANIFEST as RUN_RECORD
    from ..runs import fingerprint, run_identity

    record = read_json(out / RUN_RECORD)
    if not isinstance(record, dict) or record.get("command") != "zoo build":
        return
    identity = record.get("identity") or {}
    stored = (identity.get("config") or {}).get("ZooConfig")
    if not isinstance(stored, dict) or not set(COUNTS) & set(stored):
        return
    if {k: v for k, v in stored.items() if k not in COUNTS} != json.loads(json.dumps(sampling_settings(cfg))):
        return  # other sampling settings: prepare_run refuses it as before
    fresh = run_identity("zoo build", {"ZooConfig": sampling_settings(cfg)}, cfg.seed, data=cfg.data)
    if {k: v for k, v in identity.items() if k != "config"} != {k: v for k, v in fresh.items() if k != "config"}:
        return
    record["identity"] = fresh
    record["fingerprint"] = fingerprint(fresh)
    write_json(out / RUN_RECORD, record)


def build_zoo(
    cfg: ZooConfig,
    *,
    out: str | os.PathLike,
    executor: str = "auto",
    address: str | None = None,
    workers: int | None = None,
    progress: bool = True,
    restart: bool = False,
    force: bool = False,
    on_member: Callable[[dict[str, Any]], None] | None = None,
    only: list[str] | None = None,
) -> Report:
    """Build the zoo ``cfg`` describes into ``out`` (see the module docstring); finished members are kept. ``only``
    names the members to build now (with the clean members they are planted into); the others are left for a later
    call, which completes the same zoo."""
    executor = resolve_executor(executor, address)
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ConfigError(f"--workers must be a positive integer, got {workers!r}")
    _migrate_counted_identity(Path(out), cfg)
    splits = load_dataset(cfg.data)
    _, height, width = splits.image_shape
    members = sample(cfg, splits.num_classes, height, width)
    wanted = members if only is None else select_members(members, only)
    run = prepare_run(out, "zoo build", {"ZooConfig": sampling_settings(cfg)}, cfg.seed, restart=restart,
                      force=force, data=cfg.data)  # fmt: skip
    run.start()
    earlier = (read_json(run.path / MANIFEST) or {}) if run.resuming else {}
    zoo = ZooFolder(run.path, cfg, members)
    done = zoo.finished()
    pending = [m for m in wanted if m["id"] not in done]
    start = time.perf_counter()
    built = 0
    before = float(earlier.get("wall_seconds_total") or 0.0)
    calls = int(earlier.get("calls") or 0) + 1
    extra: dict[str, Any] = {"executor": executor, "workers": workers, "address": address, "calls": calls,
                             "wall_seconds_total": before}  # fmt: skip
    from tqdm.auto import tqdm

    outcomes = (_ray(zoo, pending, str(cfg.data), address, workers, local=address is None) if executor == "ray"
                else _sequential(zoo, pending, str(cfg.data), threads=None))  # fmt: skip
    with tqdm(total=len(wanted), initial=len(wanted) - len(pending), desc="zoo members", unit="member", disable=not progress) as bar:
        for member, result, error in outcomes:
            if error is not None:
                zoo.record_error(member, error)
            else:
                if member.get("base"):
                    result["report"]["base_weights"] = zoo.weights_digest(member["base"])
                record = member_record(
                    member, result["report"], result["seconds"], cfg.asr_floor, result.get("threads")
                )
                zoo.write_member(member, result["files"], record)
                built += 1
            seconds = time.perf_counter() - start
            extra.update(session_seconds=round(seconds, 1), built_this_session=built,
                         wall_seconds_total=round(before + seconds, 1),
                         members_per_hour=round(built * 3600 / seconds, 2) if built else None)  # fmt: skip
            zoo.write_manifest(extra)
            if on_member is not None:
                on_member(zoo.records[member["id"]])
            bar.update(1)
    zoo.write_manifest(extra)
    rows = [zoo.records[m["id"]] for m in members if m["id"] in zoo.records]
    errors = {r["id"]: r["error"] for r in rows if r["status"] == "error"}
    if not errors and only is None:  # every member is in members/: the work folders hold nothing more
        shutil.rmtree(zoo.path / "work", ignore_errors=True)
    settings = {"ZooConfig": to_dict(cfg)}
    report = Report(
        method="zoo-build", seconds=round(time.perf_counter() - start, 1), config=settings,
        provenance=provenance("zoo-build", settings, cfg.seed, data=str(cfg.data)),
        details={"zoo": str(run.path), "members_total": len(members), "reused": len(done), "built": built,
                 "errors": errors, "summary": summarise(rows), **extra},
        files=[MANIFEST, TABLE, "members/<id>/model", f"members/<id>/{RECORD}"],
    )  # fmt: skip
    return finish(run, report)
