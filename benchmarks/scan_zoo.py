"""`trojanlab scan` over a zoo (or any folder of models with a zoo manifest): each detector alone and combined, in
sample and leave-one-family-out, with the TrojAI scores; and the calibration the package ships, fitted on the zoo.

    python benchmarks/scan_zoo.py --zoo ZOO --out RUN [--workers 2] [--mntd] [--ship] [--detectors structure mmbd nc]

Every clean and backdoored member (failed attacks are left out: their backdoor is not there) is scanned once by the
library's ``scan`` entry point into ``RUN/members/<id>/`` (a finished scan is reused, so the run resumes), with 5
clean test-split images per label as the auditor's examples (``RUN/examples-*.npz``, seeded). Then, per feature set
(each detector alone, and all together), a logistic regression gives probabilities two ways: fitted on every member
(in sample) and leave-one-family-out (each family scored by a fit that never saw it); the table reports ROC-AUC, the
false-positive rate at 95 % TPR, TrojAI's cross-entropy, the Brier score, the detection rate per family and on
clean members at probability 0.5, the right target named among detected models, and seconds per model. The
features are computed from each detector's stored record by the current code (``scan.features_of``), so a new
feature needs no rescan; the members' scan commits are recorded. The
detectors' own rules (Neural Cleanse's anomaly index > 2, MM-BD's p < 0.05) are reported beside them.

``--mntd`` fits MNTD's meta-classifier on the members too, cross-fitted: each member's ``mntd_score`` comes from a
meta-classifier fitted without its leave-one-family-out fold. ``--ship`` writes the calibrations fitted on every
member (all detectors, then the subsets a scan may be left with: no MNTD, no Neural Cleanse) to
``src/trojanlab/detection/calibration.json`` and the meta-classifier fitted on every member to
``src/trojanlab/detection/mntd.safetensors``, with the population they were fitted on. ``--workers 2`` scans two
members at once, each in its own process with one torch thread. Results: ``benchmarks/results/scan_zoo.{json,md}``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from _runs import run_once
from trojanlab.config.base import to_dict
from trojanlab.config.detection import SCAN_DETECTORS, MNTDConfig, ScanConfig
from trojanlab.data import load_dataset
from trojanlab.detection import calibration as cal
from trojanlab.detection import mntd
from trojanlab.detection.run import SHIPPED_CALIBRATION, SHIPPED_MNTD, scan
from trojanlab.detection.scan import RULES, features_of, suspected_labels
from trojanlab.io import read_json, write_json
from trojanlab.models.external import load_any
from trojanlab.runs import source_commit

RESULTS = Path(__file__).parent / "results"
FEATURE_SETS = {
    "structure": [],  # a rule, not fitted: RULES
    "mmbd": ["mmbd_log1p_neg_log10_p", "mmbd_log1p_top_z"],
    "nc": ["nc_log1p_anomaly_index", "nc_log_norm_ratio"],
    "mntd": ["mntd_score"],
}
SHIPPED_SETS = (
    ("structure", "mmbd", "nc", "mntd"),
    ("structure", "mmbd", "nc"),
    ("structure", "mmbd", "mntd"),
    ("structure", "mmbd"),
)
"""The calibrations shipped, fullest first: a scan takes the first whose detectors it ran (MNTD is skipped on a
model unlike the zoo's, Neural Cleanse without clean examples)."""


def examples(zoo_data: str, out: Path, per_label: int, seed: int) -> Path:
    """``per_label`` test-split images of every label, as an ``.npz`` the scan reads."""
    path = out / f"examples-{per_label}-per-label-seed{seed}.npz"
    if not path.is_file():
        test = load_dataset(zoo_data).test
        rng = np.random.default_rng(seed)
        pick = np.sort(np.concatenate([rng.choice(np.flatnonzero(test.y == k), per_label, replace=False)
                                       for k in range(int(test.y.max()) + 1)]))  # fmt: skip
        out.mkdir(parents=True, exist_ok=True)
        np.savez(path, x_test=test.x[pick], y_test=test.y[pick])
    return path


def scan_member(job: tuple) -> dict:
    """One member's scan (statistics alone, no calibration), reused when already in its folder."""
    folder, model, cfg, example_file, seed = job
    return run_once(folder, scan, model, cfg, examples=example_file, seed=seed, progress=False, calibration=False)


def mntd_fold(job: tuple) -> tuple[dict[int, float], float]:
    """One MNTD fit on the members ``train`` and its scores of the members ``test``; saved to ``save`` if given."""
    paths, y, train, test, mcfg, population, save = job
    loaded = [load_any(p) for p in paths]
    shape = tuple(int(v) for v in loaded[0].spec["input_size"])
    meta = mntd.fit([loaded[i].module for i in train], [int(y[i]) for i in train], loaded[0].num_classes, shape,
                    mcfg, population=population)  # fmt: skip
    if save is not None:
        meta.save(save)
    return {int(i): meta.score(loaded[i].module) for i in test}, meta.seconds


def cross_fitted_mntd(args: argparse.Namespace, members: list[dict], rows: list[dict], manifest: dict, mapper) -> dict:
    """MNTD's score of every member from a meta-classifier fitted without its leave-one-family-out fold (the
    ``mntd_score`` feature each row gets: a stacked feature, so the calibration never reads a score the
    meta-classifier was fitted on); then the meta-classifier fitted on every member (``RUN/mntd.safetensors``)."""
    began = time.perf_counter()
    paths = [str(args.zoo / m["path"]) for m in members]
    y = np.array([r["backdoored"] for r in rows])
    fold, names = cal.family_folds(y, [r["family"] for r in rows])
    mcfg = MNTDConfig(seed=args.seed)
    population = {"zoo": str(args.zoo), "zoo_config": manifest["config"], "models": len(rows),
                  "clean": int((y == 0).sum()), "fitted_by": "python benchmarks/scan_zoo.py --mntd",
                  "commit": source_commit(), "config": to_dict(mcfg)}  # fmt: skip
    jobs = [(paths, y, np.flatnonzero(fold != k), np.flatnonzero(fold == k), mcfg, {}, None) for k in range(len(names))]
    jobs.append((paths, y, np.arange(len(y)), [], mcfg, population, args.out / "mntd.safetensors"))
    fit_seconds = []
    for name, (scores, seconds) in zip([*names, "none"], mapper(mntd_fold, jobs)):
        for i, score in scores.items():
            rows[i]["features"]["mntd_score"] = score
        fit_seconds.append(seconds)
        print(f"mntd without {name}: fitted in {seconds:.0f} s", flush=True)
    if args.ship:
        shutil.copyfile(args.out / "mntd.safetensors", SHIPPED_MNTD)
    return {"config": to_dict(mcfg), "seconds": round(time.perf_counter() - began, 1),
            "fit_seconds": {"mean": float(np.mean(fit_seconds)), "max": float(np.max(fit_seconds))}}  # fmt: skip


def pct(v: float | None) -> str:
    return "-" if v is None or np.isnan(v) else f"{100 * v:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", required=True, type=Path, help="a zoo folder (zoo.json)")
    parser.add_argument("--out", required=True, type=Path, help="run folder (resumable)")
    parser.add_argument(
        "--detectors",
        nargs="+",
        default=[d for d in SCAN_DETECTORS if d != "mntd"],
        help="detectors each member's scan runs (MNTD is fitted here instead: --mntd)",
    )
    parser.add_argument("--per-label", type=int, default=5, help="clean example images per label")
    parser.add_argument("--l2", type=float, nargs="+", default=list(cal.L2_GRID),
                        help="the logistic regression's L2 penalties to choose from (by leave-one-family-out "
                             "cross-entropy on the fit's own models; one value: fixed)")  # fmt: skip
    parser.add_argument("--ship", action="store_true", help="write the combined calibration into the package")
    parser.add_argument("--workers", type=int, default=1, help="scans at once, one process and torch thread each")
    parser.add_argument("--mntd", action="store_true", help="fit MNTD's meta-classifier (cross-fitted scores)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    began = time.perf_counter()
    manifest = read_json(args.zoo / "zoo.json")
    if manifest is None:
        raise SystemExit(f"{args.zoo}: no zoo.json")
    members = [m for m in manifest["members"] if m["status"] in ("clean", "backdoored")]
    left_out = [m["id"] for m in manifest["members"] if m["status"] not in ("clean", "backdoored")]
    cfg = ScanConfig(detectors=args.detectors, seed=args.seed)
    example_file = examples(manifest["config"]["data"], args.out, args.per_label, args.seed)
    jobs = [(args.out / "members" / m["id"], str(args.zoo / m["path"]), cfg,
             str(example_file) if "nc" in cfg.detectors else None, args.seed) for m in members]  # fmt: skip
    mapper = map
    if args.workers > 1:  # one torch thread per worker process: two 1-thread scans beat one 2-thread scan on 2 cores
        pool = ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=torch.set_num_threads, initargs=(1,))  # fmt: skip
        mapper = pool.map
    results = mapper(scan_member, jobs)
    rows = []
    for i, (m, result) in enumerate(zip(members, results)):
        print(f"[{i + 1}/{len(members)}] {m['id']}: {sum(result['detector_seconds'].values()):.0f} s", flush=True)
        if result["config"] != to_dict(cfg):
            raise SystemExit(f"{args.out}/members/{m['id']}: scanned with other settings; use another --out")
        rows.append({"id": m["id"], "family": m["family"], "backdoored": int(m["status"] == "backdoored"),
                     "target": m["target"], "features": features_of(result["detectors"]),
                     "suspected": suspected_labels(result["detectors"]), "seconds": sum(result["detector_seconds"].values()),
                     "detectors": result["detectors"],
                     "scan_commit": (result.get("provenance") or {}).get("commit")})  # fmt: skip
    mntd_record = None
    if args.mntd:
        mntd_record = cross_fitted_mntd(args, members, rows, manifest, mapper)
    y = np.array([r["backdoored"] for r in rows])
    families = [r["family"] for r in rows]
    ran = [*cfg.detectors, *(["mntd"] if args.mntd else [])]
    sets = {k: v for k, v in FEATURE_SETS.items() if k in ran}
    sets["combined"] = [f for k in ran for f in FEATURE_SETS[k]]
    table = {}
    for name, features in sets.items():
        rules = RULES if name in ("structure", "combined") and "structure" in ran else {}
        values = [r["features"] for r in rows]
        fitted = cal.fit_calibration(values, y, families, features, rules, args.l2)
        inside = np.array([fitted.probability(v) for v in values])
        chosen = []  # nested: each fold's penalty chosen on that fold's training models alone

        def fold_fit(v, t, f, features=features, rules=rules, chosen=chosen):
            chosen.append(cal.fit_calibration(v, t, f, features, rules, args.l2))
            return chosen[-1]

        lofo = cal.out_of_family(values, y, families, fold_fit)
        entry = {"features": features, "rules": rules, "l2": fitted.l2, "l2_per_fold": [c.l2 for c in chosen],
                 "in_sample": cal.scores(y, inside), "lofo": cal.scores(y, lofo)}  # fmt: skip
        flagged = lofo >= 0.5
        entry["lofo_detection_per_family"] = {f: float(flagged[[g == f for g in families]].mean())
                                              for f in sorted(set(families))}  # fmt: skip
        detected = [r for r, hit in zip(rows, flagged) if hit and r["backdoored"]]
        entry["target_accuracy_lofo_detected"] = (
            float(np.mean([bool(r["suspected"]) and r["suspected"][0] == r["target"] for r in detected]))
            if detected else None)  # fmt: skip
        for detector, key in (("nc", "smallest_norm_label"), ("mmbd", "suspected_label")):
            if detector in cfg.detectors and detected:  # each detector's own label, for the order of suspected labels
                entry[f"target_accuracy_lofo_detected_{detector}"] = float(np.mean(
                    [r["detectors"][detector][key] == r["target"] for r in detected]))  # fmt: skip
        table[name] = entry
    own_rules = {}
    if "nc" in cfg.detectors:
        own_rules["nc: anomaly index > 2"] = np.array([r["detectors"]["nc"]["anomaly_index"] > 2 for r in rows])
    if "mmbd" in cfg.detectors:
        own_rules["mmbd: p < 0.05"] = np.array([r["detectors"]["mmbd"]["p_value"] < 0.05 for r in rows])
    if "structure" in cfg.detectors:
        own_rules["structure: a weighted branch"] = np.array([r["features"]["structure_branch"] > 0 for r in rows])
    rule_table = {name: {"detection_rate": float(flags[y == 1].mean()), "false_positive_rate": float(flags[y == 0].mean()),
                         "per_family": {f: float(flags[[g == f for g in families]].mean()) for f in sorted(set(families))}}
                  for name, flags in own_rules.items()}  # fmt: skip
    seconds = np.array([r["seconds"] for r in rows])
    population = {"zoo": str(args.zoo), "zoo_config": manifest["config"], "models": len(rows),
                  "clean": int((y == 0).sum()), "backdoored_per_family": {f: families.count(f) for f in
                                                                          sorted(set(families)) if f != "clean"},
                  "fitted_by": "python benchmarks/scan_zoo.py", "commit": source_commit(), "scan": to_dict(cfg)}  # fmt: skip
    shipped = []
    for detectors in SHIPPED_SETS:
        if set(detectors) <= set(ran):
            features = [f for d in detectors for f in FEATURE_SETS[d]]
            rules = RULES if "structure" in detectors else {}
            fitted = cal.fit_calibration([r["features"] for r in rows], y, families, features, rules, args.l2,
                                         population)  # fmt: skip
            shipped.append(fitted.to_json())
    write_json(args.out / "calibration.json", {"calibrations": shipped})
    if args.ship:
        write_json(SHIPPED_CALIBRATION, {"calibrations": shipped})
    scan_commits = {c[:7] if c else "unknown": n for c, n in Counter(r["scan_commit"] for r in rows).items()}
    record = {"commit": source_commit(), "zoo": str(args.zoo), "members": len(rows), "left_out": left_out,
              "scan_commits": scan_commits,
              "scan_config": to_dict(cfg), "mntd": mntd_record, "l2": args.l2, "wall_seconds": round(time.perf_counter() - began, 1),
              "seconds_per_model": {"mean": float(seconds.mean()), "max": float(seconds.max())},
              "feature_sets": table, "rules": rule_table, "rows": rows, "shipped": bool(args.ship)}  # fmt: skip
    write_json(args.out / "scan_zoo.json", record)
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / "scan_zoo.json", {k: v for k, v in record.items() if k != "rows"} | {
        "rows": [{k: v for k, v in r.items() if k != "detectors"} for r in rows]})  # fmt: skip
    head = (f"`python benchmarks/scan_zoo.py --zoo {args.zoo}` (L2 penalty chosen from {args.l2} by leave-one-family-out "
            f"cross-entropy on each fit's own models, nested in the LOFO figures) on commit `{record['commit']}`: {len(rows)} models "
            f"({int((y == 0).sum())} clean), {record['wall_seconds']:.0f} s; the members' scans made on "
            f"{', '.join(f'`{c}` ({n})' for c, n in scan_commits.items())}, their features computed from each "
            f"detector's record by this commit; scan seconds per model mean "
            f"{seconds.mean():.0f}, max {seconds.max():.0f}. Probabilities at 0.5; LOFO: leave one family out.")  # fmt: skip
    columns = ("| features | ROC-AUC in / LOFO | FPR@95%TPR LOFO | FPR@90%TPR LOFO | cross-entropy in / LOFO "
               "| Brier LOFO | detected LOFO | clean flagged LOFO | right target (LOFO detected) |")  # fmt: skip
    lines = [head, "", columns, "|---|---|---:|---:|---|---:|---:|---:|---:|"]
    for name, e in table.items():
        i, o = e["in_sample"], e["lofo"]
        lines.append(f"| {name} | {i['roc_auc']:.3f} / {o['roc_auc']:.3f} | {pct(o['fpr_at_95_tpr'])} % | "
                     f"{pct(o['fpr_at_90_tpr'])} % | {i['cross_entropy']:.3f} / {o['cross_entropy']:.3f} | {o['brier']:.3f} | "
                     f"{pct(o['detection_rate'])} % | {pct(o['false_positive_rate'])} % | "
                     f"{pct(e['target_accuracy_lofo_detected'])} % |")  # fmt: skip
    fams = sorted(set(families))
    lines += ["", "Detection rate per family (LOFO, probability >= 0.5; `clean`: false positives):", "",
              "| features | " + " | ".join(fams) + " |", "|---|" + "---:|" * len(fams)]  # fmt: skip
    for name, e in table.items():
        lines.append(f"| {name} | " + " | ".join(pct(e["lofo_detection_per_family"][f]) for f in fams) + " |")
    for name, r in rule_table.items():
        lines.append(f"| {name} (its own rule) | " + " | ".join(pct(r["per_family"][f]) for f in fams) + " |")
    note = (
        "Right target among the LOFO-detected backdoored models, by each detector's own label (the scan names "
        "the structure branch's, then Neural Cleanse's, then MM-BD's):"
    )
    lines += ["", note, "",
              "| features | scan's first label | Neural Cleanse's smallest norm | MM-BD's largest margin |",
              "|---|---:|---:|---:|"]  # fmt: skip
    for name, e in table.items():
        lines.append(f"| {name} | {pct(e['target_accuracy_lofo_detected'])} % | "
                     f"{pct(e.get('target_accuracy_lofo_detected_nc'))} % | "
                     f"{pct(e.get('target_accuracy_lofo_detected_mmbd'))} % |")  # fmt: skip
    (RESULTS / "scan_zoo.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
