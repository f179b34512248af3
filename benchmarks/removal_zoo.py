"""Backdoor removal over a zoo: every chosen defense on backdoored members of every family and on clean members.

    python benchmarks/removal_zoo.py --zoo ZOO --out RUN --methods ibau [anp ...] [--per-family 6] [--clean 6]
                                     [--members ID ...] [--set METHOD.FIELD=VALUE ...] [--workers 2] [--threads 1]

Each (member, method) is one ``trojanlab defend`` run with the method's defaults (the defender's clean images are
its registry default share of the training split, seeded) into ``RUN/members/<id>/<method>/`` (a finished run is
reused, so the benchmark resumes; ``nc-unlearn`` reads a ``detect nc`` run made first in ``<id>/nc-scan``);
``--set anp.iterations=500`` changes one setting of one method (the table's command line says so; its runs go to
``<method>[iterations=500]``). A
defense that refuses (its held-out measure cannot be made to read the member's recorded clean accuracy) is recorded
as refused, with its message. The table, per family and method: clean-accuracy drop and attack success rate after
(mean and worst), the drop the held-out measure predicted beside the measured one, how many kept the promise (drop
<= tolerance + 1 point, or refused), how many read jittered copies, the share of backdoored members left at ASR <=
2 %, the test-ASR oracle of a pruning curve (BackdoorBench's choice of threshold), BackdoorBench's defense
effectiveness rating (DER = (max(0, ASR drop) - max(0, CA drop) + 1) / 2, mean) and seconds per model; then one line
per member with ANP's premise check. Clean members show what a defense costs a model that had no backdoor. Results:
``benchmarks/results/removal_zoo.{json,md}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import shutil
import time
import typing
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from _runs import run_once
from trojanlab.config import ANPConfig, AutoConfig, NCConfig, PruneRule
from trojanlab.data import to_tensor
from trojanlab.defenses import DEFENSES, defend
from trojanlab.defenses.anp import collapse_check, find_neurons
from trojanlab.detection.run import neural_cleanse
from trojanlab.errors import ConfigError, DataError
from trojanlab.io import read_json, write_json
from trojanlab.runs import check_fits, defender_split, load_artifact, model_data, source_commit

RESULTS = Path(__file__).parent / "results"
REMOVED = 0.02
"""ASR at or below which a backdoor counts as removed (the removal issue's goal)."""
TOLERANCE = PruneRule().tolerance
"""The clean-data rules' default tolerance (the pruning rule's; ``defend auto``'s is the same): the promise a measured
drop is held to, + 1 point."""
assert AutoConfig().tolerance == TOLERANCE


def defend_member(job: tuple) -> dict:
    """One (member, method) run, or its earlier result; a defense that refused (no held-out measure tracks the
    model's stated clean accuracy, say) is recorded as refused, with its message. ``nc-unlearn`` reads a
    ``trojanlab detect nc`` run on the same member, made first (and reused) in ``../nc-scan``."""
    folder, method, model, data, seed, settings = job
    refused = folder / "refused.json"
    if refused.is_file():
        return read_json(refused)
    if method == "nc-unlearn":
        scan = folder.parent / "nc-scan"
        run_once(scan, neural_cleanse, model, NCConfig(seed=seed), data=data, seed=seed, progress=False)
        settings = {**settings, "reversed_triggers": str(scan)}
    configs = method_configs(method, settings, seed)
    if (folder / "result.json").is_file():
        return read_json(folder / "result.json")
    try:
        defend(method, model, *configs, data=data, seed=seed, progress=False, out=folder)
    except DataError as exc:
        record = {"refused": str(exc)}
        write_json(refused, record)
        shutil.rmtree(folder / "repaired", ignore_errors=True)
        return record
    return read_json(folder / "result.json")


def method_configs(method: str, settings: dict[str, Any], seed: int) -> tuple:
    """``method``'s configs with ``settings`` (field: value) set in the config class that has each field; the others
    at their defaults (``seed`` the run's)."""
    configs = []
    for cls in DEFENSES[method].configs:
        fields = {f.name for f in dataclasses.fields(cls)}
        mine = {k: v for k, v in settings.items() if k in fields}
        configs.append(cls(**({"seed": seed} if "seed" in fields else {}), **mine))
    return tuple(configs)


def parse_settings(given: list[str], methods: list[str]) -> dict[str, dict[str, Any]]:
    """``--set METHOD.FIELD=VALUE ...`` as {method: {field: value}} (values read as YAML scalars), each field
    checked against the method's configs."""
    settings: dict[str, dict[str, Any]] = {}
    for item in given:
        key, sep, value = item.partition("=")
        method, dot, name = key.partition(".")
        if not sep or not dot or method not in methods:
            raise SystemExit(f"--set {item}: expected METHOD.FIELD=VALUE with METHOD one of --methods")
        hints = {f.name: typing.get_type_hints(cls)[f.name] for cls in DEFENSES[method].configs
                 for f in dataclasses.fields(cls)}  # fmt: skip
        known = sorted(set(hints) - {"seed", "reversed_triggers"})  # nc-unlearn's scan is the benchmark's own
        if name not in known:
            raise SystemExit(f"--set {item}: {method} has no setting {name!r} (known: {', '.join(known)})")
        read = yaml.safe_load(value)
        if hints[name] in (int, float, int | None, float | None) and isinstance(read, str):
            try:  # YAML reads 1e-3 as a string
                read = float(read)
            except ValueError:
                raise SystemExit(f"--set {item}: {name} takes a number") from None
        settings.setdefault(method, {})[name] = read
    for method, chosen in settings.items():
        placeholder = {"reversed_triggers": "SCAN"} if method == "nc-unlearn" else {}  # set per member
        try:
            method_configs(method, {**chosen, **placeholder}, 0)
        except (ConfigError, TypeError) as exc:
            raise SystemExit(f"--set {method}: {exc}") from None
    return settings


def run_folder(out: Path, member: str, method: str, settings: dict[str, Any]) -> Path:
    """Where one (member, method) run goes: ``OUT/members/<id>/<method>``, the settings ``--set`` changed in its
    name (``anp[batch_size=64,iterations=500]``), so that a run with other settings is never reused for it."""
    tag = ",".join(f"{k}={v}" for k, v in sorted(settings.items()))
    return out / "members" / member / (f"{method}[{tag}]" if tag else method)


def premise_of(folder: Path, model: str, data: str, seed: int) -> dict:
    """ANP's premise check on a member, whatever methods run (cheap: one perturbation, one forward): the unmasked
    model under one ANP perturbation of every neuron on the held-out images of ANP's defender split; cached in
    ``folder/premise.json``."""
    cached = folder / "premise.json"
    if cached.is_file():
        return read_json(cached)
    loaded = load_artifact(model)
    splits = check_fits(loaded, model_data(data, loaded.spec, seed), model)
    _, fit, holdout = defender_split(splits, DEFENSES["anp"].defender, loaded.spec, seed)
    layers = find_neurons(loaded.module, to_tensor(fit.x[:2]), loaded.num_classes)
    record = collapse_check(loaded.module, layers, holdout, ANPConfig().eps, seed)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(cached, record)
    return record


def der(before: dict, after: dict) -> float | None:
    """BackdoorBench's defense effectiveness rating (1: ASR removed at no accuracy cost, 0.5: nothing changed)."""
    if "attack_success_rate" not in before:
        return None
    asr_drop = before["attack_success_rate"] - after["attack_success_rate"]
    ca_drop = before["clean_accuracy"] - after["clean_accuracy"]
    return (max(0.0, asr_drop) - max(0.0, ca_drop) + 1) / 2


def pick_members(manifest: dict, per_family: int, clean: int) -> list[dict]:
    """The first ``per_family`` backdoored members of each family and the first ``clean`` clean ones, zoo order."""
    taken: Counter = Counter()
    out = []
    for m in manifest["members"]:
        kind = "clean" if m["status"] == "clean" else m["family"] if m["status"] == "backdoored" else None
        limit = clean if kind == "clean" else per_family
        if kind is not None and taken[kind] < limit:
            taken[kind] += 1
            out.append(m)
    return out


def sample_limits(given: list[str], methods: list[str]) -> dict[str, tuple[int, int]]:
    """``--sample`` as {method: (per family, clean)}."""
    limits = {}
    for item in given:
        method, _, counts = item.partition("=")
        per_family, _, clean = counts.partition("/")
        if method not in methods or not per_family.isdigit() or not clean.isdigit():
            raise SystemExit(f"--sample {item}: expected METHOD=N/M with METHOD one of --methods")
        limits[method] = (int(per_family), int(clean))
    return limits


def within(member: dict, method: str, members: list[dict], limits: dict[str, tuple[int, int]]) -> bool:
    """Whether ``member`` is among the first of its family (or of the clean members) that ``method`` runs on."""
    if method not in limits:
        return True
    rank = [m["id"] for m in members if kind_of(m) == kind_of(member)].index(member["id"])
    per_family, clean = limits[method]
    return rank < (clean if kind_of(member) == "clean" else per_family)


def kind_of(member: dict) -> str:
    return "clean" if member["status"] == "clean" else member["family"]


def fmt(values: list[float], scale: float = 100.0) -> str:
    if not values:
        return "-"
    v = np.array(values) * scale
    return f"{v.mean():.1f} ({v.max():.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", required=True, type=Path, help="a zoo folder (zoo.json)")
    parser.add_argument("--out", required=True, type=Path, help="run folder (resumable)")
    parser.add_argument("--methods", nargs="+", default=["ibau"], choices=list(DEFENSES), help="defenses to run")
    parser.add_argument("--per-family", type=int, default=6, help="backdoored members per family")
    parser.add_argument("--clean", type=int, default=6, help="clean members")
    parser.add_argument(
        "--sample",
        nargs="*",
        default=[],
        metavar="METHOD=N/M",
        help="run METHOD on only the first N backdoored members of each family and M clean ones",
    )
    parser.add_argument("--members", nargs="+", help="these members (--per-family and --clean are then ignored)")
    parser.add_argument("--set", nargs="*", default=[], metavar="METHOD.FIELD=VALUE", dest="settings",
                        help="one setting of one method (say anp.iterations=500); the rest at their defaults")  # fmt: skip
    parser.add_argument("--workers", type=int, default=1, help="runs at once, one process each")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (--workers 1 --threads 2: one "
                        "run on both of this machine's cores: 2 CPU cores per model)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="removal_zoo", help="the results' file name in benchmarks/results")
    args = parser.parse_args()
    began = time.perf_counter()
    manifest = read_json(args.zoo / "zoo.json")
    if manifest is None:
        raise SystemExit(f"{args.zoo}: no zoo.json")
    members = pick_members(manifest, args.per_family, args.clean)
    if args.members:
        known = {m["id"]: m for m in manifest["members"]}
        unknown = [i for i in args.members if known.get(i, {}).get("status") not in ("clean", "backdoored")]
        if unknown:
            raise SystemExit(f"--members: {', '.join(unknown)} not clean or backdoored members of {args.zoo}")
        if len(set(args.members)) != len(args.members):
            raise SystemExit("--members: a member is named twice")
        members = [known[i] for i in args.members]
    limits = sample_limits(args.sample, args.methods)
    settings = parse_settings(args.settings, args.methods)
    data = manifest["config"]["data"]
    pairs = [(m, method) for m in members for method in args.methods if within(m, method, members, limits)]
    jobs = []
    for m, method in pairs:
        changed = settings.get(method, {})
        jobs.append((run_folder(args.out, m["id"], method, changed), method, str(args.zoo / m["path"]), data,
                     args.seed, changed))  # fmt: skip
    mapper = map
    torch.set_num_threads(args.threads)  # the same threads per run, whatever the workers
    if args.workers > 1:
        pool = ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=torch.set_num_threads, initargs=(args.threads,))  # fmt: skip
        mapper = pool.map
    rows = []
    for i, result in enumerate(mapper(defend_member, jobs)):
        m, method = pairs[i]
        rows.append(row_of(m, method, result))
        print(f"[{i + 1}/{len(jobs)}] {m['id']} {method}: {said(rows[-1])}", flush=True)
    premises = {m["id"]: premise_of(args.out / "members" / m["id"], str(args.zoo / m["path"]), data, args.seed)
                for m in {m["id"]: m for m, _ in pairs}.values()}  # fmt: skip
    commits = Counter((r["commit"] or "unknown")[:7] for r in rows if not r["refused"])
    record = {"commit": source_commit(), "zoo": str(args.zoo), "methods": args.methods, "settings": settings,
              "seed": args.seed,
              "workers": args.workers, "threads": args.threads,
              "run_commits": dict(commits), "wall_seconds": round(time.perf_counter() - began, 1), "rows": rows,
              "premises": premises}  # fmt: skip
    write_json(args.out / "removal_zoo.json", record)
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / f"{args.name}.json", record)
    chosen = f"--members {' '.join(args.members)}" if args.members else (f"--per-family {args.per_family} --clean "
                                                                         f"{args.clean}")  # fmt: skip
    command = (f"python benchmarks/removal_zoo.py --zoo {args.zoo} --methods {' '.join(args.methods)} {chosen}"
               f"{' --sample ' + ' '.join(args.sample) if args.sample else ''}"
               f"{' --set ' + ' '.join(args.settings) if args.settings else ''} --workers {args.workers} --threads "
               f"{args.threads}")  # fmt: skip
    text = table(record, command)
    (RESULTS / f"{args.name}.md").write_text(text)
    print(text)


def row_of(member: dict, method: str, result: dict) -> dict:
    """A table row of one run: figures before and after, the held-out measure's prediction and how it was read,
    the test-ASR oracle of a pruning curve, ANP's premise check."""
    family = member["family"] if member["status"] == "backdoored" else "clean"
    row = {"id": member["id"], "family": family, "method": method, "refused": result.get("refused")}
    if row["refused"]:
        return {**row, "commit": None}
    before, after, details = result["before"], result["after"], result  # a report's details sit at its top level
    measure = details.get("heldout_measure") or {}
    row.update(ca_before=before["clean_accuracy"], ca_after=after["clean_accuracy"],
               ca_drop=before["clean_accuracy"] - after["clean_accuracy"],
               asr_before=before.get("attack_success_rate"), asr_after=after.get("attack_success_rate"),
               der=der(before, after),
               predicted_ca_drop=after.get("predicted_clean_accuracy_drop", details.get("predicted_clean_accuracy_drop")),
               measure=("unchecked" if measure.get("reference") is None else
                        "jittered" if measure.get("strength", 0) > 0 else "as they are"),
               measure_strength=measure.get("strength"), stated_accuracy=measure.get("reference"),
               oracle=oracle(before, details.get("test_curve")), premise=details.get("premise"),
               changed=result.get("changed"), seconds=result["seconds"],
               commit=(result.get("provenance") or {}).get("commit"))  # fmt: skip
    return row


def oracle(before: dict, curve: list[dict] | None) -> dict | None:
    """BackdoorBench's choice on a pruning curve (test images): the lowest ASR whose CA drop is within the tolerance
    -- an oracle no defender has, to show how far the clean-data rule is from it."""
    if not curve or "attack_success_rate" not in before:
        return None
    allowed = [p for p in curve if before["clean_accuracy"] - p["clean_accuracy"] <= TOLERANCE]
    if not allowed:
        return None
    best = min(allowed, key=lambda p: (p["attack_success_rate"], -p["clean_accuracy"]))
    return {"asr_after": best["attack_success_rate"], "ca_drop": before["clean_accuracy"] - best["clean_accuracy"],
            "pruned": best["pruned"]}  # fmt: skip


def said(row: dict) -> str:
    if row["refused"]:
        return f"refused: {row['refused']}"
    asr = "" if row["asr_after"] is None else f", ASR {100 * row['asr_before']:.1f} -> {100 * row['asr_after']:.1f}"
    predicted = row["predicted_ca_drop"]
    return (f"CA drop {100 * row['ca_drop']:.1f} (predicted {100 * predicted:.1f}, {row['measure']}){asr}, "
            f"{row['seconds']:.0f} s")  # fmt: skip


def table(record: dict, command: str) -> str:
    rows, methods = record["rows"], record["methods"]
    commits = record["run_commits"]
    families = sorted({r["family"] for r in rows}, key=lambda f: (f == "clean", f))
    lines = [(f"`{command}` on commit `{(record['commit'] or 'unknown')[:9]}` (the runs made on "
              f"{', '.join(f'`{c}` ({n})' for c, n in commits.items())}), {record['wall_seconds']:.0f} s. "
              f"Mean (worst) in %. removed: ASR <= {100 * REMOVED:.0f} %. predicted: the drop read on the defender's "
              f"held-out measure (checked against the member's recorded clean accuracy; jittered: the held-out images "
              f"were fitted, so jittered copies read it). kept: test CA drop <= the {100 * TOLERANCE:.0f}-point "
              f"tolerance + 1, or refused with a message. oracle: the pruning curve's lowest test ASR within the "
              f"tolerance (BackdoorBench's choice)."), "",
             ("| method | family | members | CA drop | predicted | kept | jittered | ASR before | ASR after | removed | "
              "oracle ASR | DER | seconds |"), "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for method in methods:
        for family in families:
            group = [r for r in rows if r["method"] == method and r["family"] == family]
            if not group:
                continue
            ran = [r for r in group if not r["refused"]]
            attacked = family != "clean"
            ca = [r["ca_drop"] for r in ran]
            predicted = [r["predicted_ca_drop"] for r in ran if r["predicted_ca_drop"] is not None]
            kept = sum(1 for r in group if r["refused"] or r["ca_drop"] <= TOLERANCE + 0.01 + 1e-9)
            jittered = sum(r["measure"] == "jittered" for r in ran)
            asr_b = [r["asr_before"] for r in ran if r["asr_before"] is not None]
            asr_a = [r["asr_after"] for r in ran if r["asr_after"] is not None]
            removed = f"{sum(a <= REMOVED for a in asr_a)}/{len(asr_a)}" if asr_a and attacked else "-"
            oracles = [r["oracle"]["asr_after"] for r in ran if r.get("oracle")]
            ders = [r["der"] for r in ran if r["der"] is not None and attacked]
            refused = len(group) - len(ran)
            lines.append(f"| {method} | {family} | {len(group)}{f' ({refused} refused)' if refused else ''} | "
                         f"{fmt(ca)} | {fmt(predicted)} | {kept}/{len(group)} | {jittered}/{len(ran)} | "
                         f"{fmt(asr_b) if attacked else '-'} | {fmt(asr_a) if attacked else '-'} | {removed} | "
                         f"{fmt(oracles) if attacked else '-'} | {f'{np.mean(ders):.3f}' if ders else '-'} | "
                         f"{np.mean([r['seconds'] for r in ran]):.0f} |" if ran else
                         f"| {method} | {family} | {len(group)} (all refused) | - | - | {kept}/{len(group)} | - | - | - | "
                         "- | - | - | - |")  # fmt: skip
    lines += ["", ("Per member: each method's test CA drop / the drop its held-out measure predicted, and ASR after "
                   "(%); ANP's premise check (accuracy under one ANP perturbation of every neuron, and the share of "
                   "predictions on the most predicted label: a backdoored model collapses onto its target)."), "",
              "| member | family | " + " | ".join(methods) + " | ANP premise |",
              "|---|---|" + "---|" * len(methods) + "---|"]  # fmt: skip
    for member in dict.fromkeys(r["id"] for r in rows):
        mine = {r["method"]: r for r in rows if r["id"] == member}
        cells = []
        for method in methods:
            r = mine.get(method)
            if r is None:
                cells.append("")
            elif r["refused"]:
                cells.append("refused")
            else:
                asr = "" if r["asr_after"] is None else f", ASR {100 * r['asr_after']:.1f}"
                cells.append(f"{100 * r['ca_drop']:.1f} / {100 * (r['predicted_ca_drop'] or 0):.1f}{asr}")
        premise = record.get("premises", {}).get(member) or (mine.get("anp") or {}).get("premise")
        shown = (f"{100 * premise['accuracy_under_perturbation']:.0f} % right, {100 * premise['most_predicted'][0][1]:.0f} % "
                 f"on label {premise['most_predicted'][0][0]}" if premise else "-")  # fmt: skip
        family = next(iter(mine.values()))["family"]
        lines.append(f"| {member} | {family} | " + " | ".join(cells) + f" | {shown} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
