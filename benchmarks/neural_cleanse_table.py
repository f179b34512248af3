"""Re-measure thesis Table 5.10 (Neural Cleanse on GTSRB) and the false-positive rate on clean victims.

    python benchmarks/neural_cleanse_table.py --tables runs/tables --clean runs/nc-clean --out runs/nc

Scans, with ``trojanlab.detection.run.neural_cleanse`` (all 43 labels, default fast profile), the four models of
the table: the clean victim, BadNets (target 33), TrojanNN (target 0, real retraining data) and TrojanNet (N_inf 1,
target 0). They are the artefacts of ``benchmarks/trojannet_tables.py``, run first when ``--tables`` lacks them
(about 75 minutes). Then repairs BadNets and TrojanNN with the reversed triggers of the labels their scans flagged
(``trojanlab.defenses.defend("nc-unlearn" | "nc-prune", ...)``), scans every clean victim under ``--clean``
(``trojanlab.victims.train_victim`` folders; trained here with ``--train-clean N`` seeds when missing) and counts
how many are flagged. With ``--long [NAME ...]``, the models are scanned again with a budget 10x larger (32-image
mini-batches, 4 per step, up to 300 steps, early-stop patience 25) to check that the fast verdicts hold. Finished
scans are reused. Writes ``benchmarks/results/neural_cleanse_table.{md,json}`` and ``anomaly_index.png`` (the
thesis's Figure 5.11).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from _runs import run_once

from trojanlab.config import ModelConfig, NCConfig, NCPruneConfig, NCUnlearnConfig, TrainConfig
from trojanlab.defenses import defend
from trojanlab.detection.run import neural_cleanse
from trojanlab.io import atomic_write, write_json
from trojanlab.victims import train_victim

RESULTS = Path(__file__).parent / "results"
DATA = "gtsrb"
MODELS = {  # row name -> (artefact under --tables, true target or None)
    "clean": ("victim", None),
    "BadNet": ("badnets-t33", 33),
    "Trojan Attack": ("trojannn-real", 0),
    "TrojanNet": ("attack-n1", 0),
}
# thesis Table 5.10 (MAD, anomaly index, flagged) and the TrojanNet paper's Figure 5 (anomaly index)
THESIS = {
    "clean": (16.881288, 1.153, []),
    "BadNet": (14.657393, 3.171, [33]),
    "Trojan Attack": (21.535488, 2.073, [25]),
    "TrojanNet": (16.936526, 1.558, []),
}
PAPER = {"clean": 1.9, "BadNet": 3.5, "Trojan Attack": 2.2, "TrojanNet": 1.8}
LONG = {"batch_size": 32, "batches_per_step": 4, "steps": 300, "early_stop_patience": 25}  # the 10x budget
MITIGATIONS = {"unlearn": ("nc-unlearn", NCUnlearnConfig), "prune": ("nc-prune", NCPruneConfig)}


def scan(model: Path, out: Path, settings: dict | None = None) -> dict:
    """Neural Cleanse on ``DATA`` (the fast profile, or ``settings`` over it) unless ``out/result.json`` exists; returns
    the result."""
    return run_once(out, neural_cleanse, model, NCConfig(**(settings or {})), data=DATA, progress=False)


def mitigate(model: Path, scan_dir: Path, method: str) -> dict:
    """Neural Cleanse's repair ``method`` (unlearn or prune) with the reversed triggers of the labels the finished
    scan in ``scan_dir`` flagged, in ``SCAN_DIR-METHOD``; its figures as :func:`mitigation` reads them."""
    defense, config = MITIGATIONS[method]
    out = scan_dir.with_name(f"{scan_dir.name}-{method}")
    result = run_once(out, defend, defense, model, config(reversed_triggers=str(scan_dir)), data=DATA, progress=False)
    return mitigation(result)


def mitigation(result: dict) -> dict:
    """A repair's labels, CA and ASR (of the planted trigger and, per label, of the reversed one) before and after,
    and its detail (``pruning``, ``epochs_run`` or ``note``), from the result of ``defend("nc-unlearn" |
    "nc-prune", ...)`` or from that of the old ``trojanlab detect nc --mitigate`` (its ``mitigation`` key)."""
    if "mitigation" in result:
        return result["mitigation"]
    reversed_asr = result.get("reversed_trigger_asr", {"before": {}, "after": {}})
    view = {k: result[k] for k in ("labels", "pruning", "epochs_run", "note") if k in result}
    view["before"] = {**result["before"], "reversed_trigger_asr": reversed_asr["before"]}
    view["after"] = {**result["after"], "reversed_trigger_asr": reversed_asr["after"]}
    return view


def flags(result: dict) -> str:
    return ", ".join(map(str, result["flagged_labels"])) or "none"


def plot_indices(rows: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    width = 0.27
    xs = range(len(names))
    ax.bar(
        [x - width for x in xs], [rows[n]["anomaly_index"] for n in names], width, label="trojanlab", color="#2e86c1"
    )
    ax.bar(xs, [THESIS[n][1] for n in names], width, label="thesis Table 5.10", color="#a9cce3")
    ax.bar([x + width for x in xs], [PAPER[n] for n in names], width, label="TrojanNet paper Fig. 5", color="#d5d8dc")
    ax.axhline(2.0, color="#c0392b", ls="--", lw=1, label="threshold 2")
    ax.set_xticks(list(xs), names)
    ax.set_ylabel("anomaly index")
    ax.set_title("Neural Cleanse on GTSRB (thesis Figure 5.11)", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=130))
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tables", default="runs/tables", help="the artefacts of benchmarks/trojannet_tables.py")
    p.add_argument("--clean", default="runs/nc-clean", help="folder of extra clean victims (victim-s*/)")
    p.add_argument(
        "--long-clean", nargs="*", default=[], help="clean victims (folder names under --clean) to scan long too"
    )
    p.add_argument("--train-clean", type=int, default=0, help="train this many clean victims (seeds 1..N) if missing")
    p.add_argument("--out", default="runs/nc")
    p.add_argument(
        "--long",
        nargs="*",
        choices=list(MODELS),
        default=None,
        help="also scan these models (all four if none named) with a 10x budget",
    )
    args = p.parse_args()
    tables, out, clean_dir = Path(args.tables), Path(args.out), Path(args.clean)
    if any(not (tables / folder / "model.json").is_file() for folder, _ in MODELS.values()):
        cmd = [sys.executable, str(Path(__file__).with_name("trojannet_tables.py")), "--out", str(tables)]
        print("$ " + " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    for seed in range(1, args.train_clean + 1):
        train = TrainConfig(epochs=8, seed=seed)
        run_once(clean_dir / f"victim-s{seed}", train_victim, ModelConfig(), train, data=DATA, seed=seed)

    rows = {name: scan(tables / folder, out / folder) for name, (folder, _) in MODELS.items()}
    long_names = [] if args.long is None else (args.long or list(MODELS))
    long_rows = {name: scan(tables / MODELS[name][0], out / f"{MODELS[name][0]}-long", LONG) for name in long_names}
    victims = [tables / "victim"] + sorted(d for d in clean_dir.glob("victim-s*") if (d / "model.json").is_file())
    clean_scans = {
        str(v): scan(v, out / f"clean-{v.name}" if v.parent == clean_dir else out / "victim") for v in victims
    }

    lines = [
        "### Table 5.10 — Neural Cleanse on GTSRB (all 43 labels)",
        "",
        "| model | true target | MAD | anomaly index | flagged | thesis MAD / index / flagged | paper index | seconds | images |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, (_, target) in MODELS.items():
        r = rows[name]
        mad, index, flagged = THESIS[name]
        thesis = f"{mad:.3f} / {index:.3f} / {', '.join(map(str, flagged)) or 'none'}"
        lines.append(
            f"| {name} | {target if target is not None else '–'} | {r['mad']:.3f} | **{r['anomaly_index']:.3f}** | "
            f"{flags(r)} | {thesis} | {PAPER[name]} | {r['seconds']:.0f} | {r['samples']:,} |"
        )
    if long_rows:
        budget = " ".join(f"--{key.replace('_', '-')} {value}" for key, value in LONG.items())  # as command-line flags
        lines += ["", f"Same models, 10x budget (`{budget}`):", ""]
        lines += ["| model | anomaly index | flagged | seconds | images | same verdict |", "|---|---|---|---|---|---|"]
        for name, r in long_rows.items():
            same = bool(r["flagged_labels"]) == bool(rows[name]["flagged_labels"])
            lines.append(
                f"| {name} | {r['anomaly_index']:.3f} | {flags(r)} | {r['seconds']:.0f} | {r['samples']:,} | "
                f"{'yes' if same else 'no'} |"
            )
    mitigated = {
        (name, method): mitigate(tables / MODELS[name][0], out / MODELS[name][0], method)
        for name in ("BadNet", "Trojan Attack")
        for method in ("unlearn", "prune")
    }
    lines += [
        "",
        (
            "Mitigation with the reversed triggers of the flagged labels (defender: 10 % of the training split; test "
            "split for the figures; ASR of the planted trigger over test images of other labels):"
        ),
        "",
        "| model | method | labels repaired | CA before | CA after | ASR before | ASR after | reversed-trigger ASR before → after | detail |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (name, method), m in mitigated.items():
        b, a = m["before"], m["after"]
        rev = ", ".join(
            f"{100 * b['reversed_trigger_asr'][k]:.1f} → {100 * a['reversed_trigger_asr'][k]:.1f} %"
            for k in b["reversed_trigger_asr"]
        )
        detail = (
            f"{m['pruning']['pruned_count']} of {m['pruning']['units']} head inputs pruned"
            if "pruning" in m
            else f"{m.get('epochs_run', 0)} epochs"
            if m["labels"]
            else m.get("note", "")
        )
        lines.append(
            f"| {name} | {method} | {', '.join(map(str, m['labels'])) or 'none'} | {100 * b['clean_accuracy']:.2f} % | "
            f"{100 * a['clean_accuracy']:.2f} % | {100 * b['attack_success_rate']:.2f} % | "
            f"{100 * a['attack_success_rate']:.2f} % | {rev or '–'} | {detail} |"
        )
    flagged_clean = [v for v, r in clean_scans.items() if r["flagged_labels"]]
    lines += [
        "",
        f"False positives: {len(flagged_clean)} of {len(clean_scans)} clean victims flagged.",
        "",
        "| clean victim | clean accuracy | anomaly index | flagged |",
        "|---|---|---|---|",
    ]
    long_clean = {
        str(clean_dir / name): scan(clean_dir / name, out / f"clean-{name}-long", LONG) for name in args.long_clean
    }
    for v, r in clean_scans.items():
        trained = json.loads((Path(v) / "result.json").read_text())
        long = long_clean.get(v)
        extra = f" (10x budget: index {long['anomaly_index']:.3f}, flagged {flags(long)})" if long else ""
        lines.append(
            f"| `{v}` | {100 * trained['clean_accuracy']:.2f} % | {r['anomaly_index']:.3f} | {flags(r)}{extra} |"
        )
    lines += [
        "",
        "Command: `python benchmarks/neural_cleanse_table.py"
        + (" --long " + " ".join(f"'{n}'" for n in long_names) if long_names else "")
        + (" --long-clean " + " ".join(args.long_clean) if args.long_clean else "")
        + "`; each scan is "
        "`trojanlab detect nc --model DIR --data gtsrb` (fast profile, seed 0); its result.json, masks, triggers and "
        f"norm plot are under `{out}/`.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    atomic_write(RESULTS / "neural_cleanse_table.md", lambda tmp: tmp.write_text(text))
    summary = {
        "rows": {
            n: {k: r[k] for k in ("mad", "median", "anomaly_index", "flagged_labels", "seconds", "samples")}
            for n, r in rows.items()
        },
        "long": {
            n: {k: r[k] for k in ("anomaly_index", "flagged_labels", "seconds", "samples")}
            for n, r in long_rows.items()
        },
        "clean_victims_long": {
            v: {"anomaly_index": r["anomaly_index"], "flagged_labels": r["flagged_labels"]}
            for v, r in long_clean.items()
        },
        "clean_victims": {
            v: {"anomaly_index": r["anomaly_index"], "flagged_labels": r["flagged_labels"]}
            for v, r in clean_scans.items()
        },
        "mitigation": {
            f"{n} / {meth}": {k: m[k] for k in ("labels", "before", "after")} for (n, meth), m in mitigated.items()
        },
        "thesis": THESIS,
        "paper": PAPER,
    }
    write_json(RESULTS / "neural_cleanse_table.json", summary)
    plot_indices(rows, RESULTS / "anomaly_index.png")


if __name__ == "__main__":
    main()
