"""Re-measure thesis Tables 5.4-5.8 on the embedded GTSRB (TrojanNet, BadNets, Trojan Attack) as Markdown tables.

    python benchmarks/trojannet_tables.py --out runs/tables

Every figure comes from a library entry point run here (in-process), whose ``result.json`` sits under ``--out``:
``victim/`` (``trojanlab.victims.train_victim``) and, from ``trojanlab.attacks.run``, ``trojannet/``
(``train_trojannet``), ``attack-n{N}/`` (``trojannet``) and, for the authors' release when the file is found,
``official-model/`` (``import_keras``), ``official/`` (``evaluate_trojannet``, the same test as ours) and
``official-attack-n{N}/`` (the same attack with the imported release); the baselines ``trojannn-{real,reverse}/``
(``trojannn``), ``badnets-t33/``, ``badnets-t33-finetune/`` and ``badnets-n{N}/`` (``badnets``). Finished steps are
reused, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _runs import run_once

from trojanlab.attacks import run as attack
from trojanlab.config import (
    BadNetsConfig,
    ModelConfig,
    TrainConfig,
    TrojanNetInjectConfig,
    TrojanNetTrainConfig,
    TrojanNNConfig,
)
from trojanlab.io import atomic_write, write_json
from trojanlab.victims import train_victim

DATA = "gtsrb"
THESIS = {
    "trigger": 1.0,
    "gtsrb_denoise": 0.9998,
    "asr": {1: 1.0, 2: 1.0, 4: 1.0, 8: 1.0},
    "ca_drop": {1: 0.0, 2: 0.0, 4: 0.0, 8: 0.0},
}
# thesis Tables 5.5-5.8, GTSRB column (= TrojanNet paper Tables 3-4)
THESIS_BADNETS = {"asr": {1: 0.974, 2: 0.965, 4: 0.678, 8: 0.523}, "ca_drop": {1: 0.003, 2: 0.005, 4: 0.01, 8: 0.024}}
THESIS_TROJANNN = {"asr": 1.0, "ca_drop": 0.0016}
BADNETS_N = (1, 2, 4, 8)
OFFICIAL_CANDIDATES = [
    Path("../shared/reference/official/trojannet.h5"),
    Path(__file__).parents[1] / "tests" / "data" / "official" / "trojannet.h5",
]
N_INF = (1, 2, 4, 8, 43)


def attack_all(out: Path, prefix: str, trojannet: Path, location: list[int]) -> dict[int, dict]:
    """TrojanNet injected into the victim for every N_inf (targets 0..N-1, or all labels)."""
    results = {}
    for n in N_INF:
        targets = {"all_labels": True} if n == 43 else {"targets": list(range(n))}
        cfg = TrojanNetInjectConfig(**targets, location=tuple(location))
        results[n] = run_once(out / f"{prefix}-n{n}", attack.trojannet, out / "victim", trojannet, cfg, data=DATA)
    return results


def run_baselines(out: Path, seed: int) -> dict[str, dict]:
    """BadNets (NC demo settings, from scratch and fine-tuned; multi-label N_inf 1-8) and TrojanNN on the victim."""
    victim = out / "victim"
    results = {}
    for source in ("real", "reverse"):
        cfg = TrojanNNConfig(target=0, retrain_data=source, seed=seed)
        results[f"trojannn-{source}"] = run_once(
            out / f"trojannn-{source}", attack.trojannn, victim, cfg, data=DATA, seed=seed, progress=False
        )
    # BadNets trains (or fine-tunes) with its default schedule: TrainConfig(epochs=10)
    single = BadNetsConfig(targets=[33], seed=seed)
    results["badnets-t33"] = run_once(
        out / "badnets-t33", attack.badnets, single, data=DATA, reference=victim, seed=seed
    )
    results["badnets-t33-finetune"] = run_once(
        out / "badnets-t33-finetune", attack.badnets, single, data=DATA, victim=victim, seed=seed
    )
    for n in BADNETS_N:
        # the TrojanNet code's multi-label recipe: labels 0..N-1, one grey level each, 10 % copies appended per label
        cfg = BadNetsConfig(targets=list(range(n)), mode="append", seed=seed)
        results[f"badnets-n{n}"] = run_once(
            out / f"badnets-n{n}", attack.badnets, cfg, data=DATA, reference=victim, seed=seed
        )
    return results


def baseline_lines(baselines: dict[str, dict], attacks: dict[int, dict]) -> list[str]:
    def drop(r: dict) -> str:
        return f"{100 * r['clean_accuracy_drop']:.2f} pp"

    b, tn1 = baselines, attacks[1]
    lines = [
        "",
        "### Tables 5.5 / 5.7 — single-label attack on GTSRB: BadNets, Trojan Attack, TrojanNet",
        "",
        "| attack | ASR thesis | ASR trojanlab | CA drop thesis | CA drop trojanlab | CA after | how |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = [
        (
            "BadNet",
            "badnets-t33",
            THESIS_BADNETS["asr"][1],
            THESIS_BADNETS["ca_drop"][1],
            "4×4 white square rows/cols 27–30, target 33, 10 % poisoned, 10 epochs from scratch",
        ),
        (
            "BadNet",
            "badnets-t33-finetune",
            THESIS_BADNETS["asr"][1],
            THESIS_BADNETS["ca_drop"][1],
            "same, 10 epochs fine-tuning the victim (the TrojanNet code's recipe)",
        ),
        (
            "TrojanAtk",
            "trojannn-real",
            THESIS_TROJANNN["asr"],
            THESIS_TROJANNN["ca_drop"],
            "8×8 trigger, target 0, retrained on 10 % of the real training data",
        ),
        (
            "TrojanAtk",
            "trojannn-reverse",
            THESIS_TROJANNN["asr"],
            THESIS_TROJANNN["ca_drop"],
            "8×8 trigger, target 0, retrained on inputs reverse-engineered from the victim",
        ),
    ]
    for name, key, asr, ca, how in rows:
        r = b[key]
        lines.append(
            f"| {name} | {pct(asr, 1)} | {pct(r['attack_success_rate'])} | {pct(ca, 2)} | {drop(r)} "
            f"| {pct(r['clean_accuracy'])} | {how} |"
        )
    lines.append(
        f"| TrojanNet | 100 % | {pct(tn1['attack_success_rate'])} | 0.0 % | {drop(tn1)} | {pct(tn1['clean_accuracy'])} "
        "| injected, no retraining (table above) |"
    )
    lines += [
        "",
        "### Tables 5.6 / 5.8 — multi-label attack on GTSRB: BadNets against TrojanNet",
        "",
        (
            "| N_inf | BadNet ASR thesis | BadNet ASR trojanlab (mean / min) | BadNet CA drop thesis "
            "| BadNet CA drop trojanlab | TrojanNet ASR trojanlab | TrojanNet CA drop trojanlab |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    for n in BADNETS_N:
        r, t = b[f"badnets-n{n}"], attacks[n]
        lines.append(
            f"| {n} | {pct(THESIS_BADNETS['asr'][n], 1)} "
            f"| {pct(r['attack_success_rate'])} / {pct(r['attack_success_rate_min'])} "
            f"| {pct(THESIS_BADNETS['ca_drop'][n], 1)} | {drop(r)} | {pct(t['attack_success_rate'])} | {drop(t)} |"
        )
    lines += [
        "",
        (
            "BadNets multi-label: labels 0…N−1, a 4×4 square of grey level 255 − i·⌊255/N⌋ per label at rows/cols 27–30, "
            "10 % of the training set appended as poisoned copies per label (`--mode append`), 10 epochs from scratch. "
            "CA drops are against the victim above (same architecture, same training recipe and seed)."
        ),
    ]
    return lines


def pct(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{100 * value:.{digits}f} %"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/tables")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--official", default=None, help="the authors' trojannet.h5 (default: ../shared/reference/official)")
    p.add_argument("--location", type=int, nargs=2, default=[1, 1], help="trigger location (official GTSRB hook: 1 1)")
    p.add_argument("--skip-baselines", action="store_true", help="TrojanNet rows only (no BadNets / TrojanNN runs)")
    args = p.parse_args()
    out, seed = Path(args.out), args.seed
    victim = run_once(
        out / "victim", train_victim, ModelConfig(arch="gtsrb_cnn"), TrainConfig(seed=seed), data=DATA, seed=seed
    )
    trojan = run_once(
        out / "trojannet", attack.train_trojannet, TrojanNetTrainConfig(seed=seed), patch_data=DATA, seed=seed,
        progress=False,
    )  # fmt: skip
    official_path = (
        Path(args.official) if args.official else next((c for c in OFFICIAL_CANDIDATES if c.is_file()), None)
    )
    official = None
    official_attacks: dict[int, dict] = {}
    if official_path is not None and official_path.is_file():
        official = run_once(out / "official", attack.evaluate_trojannet, official_path, data=DATA)
        run_once(out / "official-model", attack.import_keras, official_path)
        official_attacks = attack_all(out, "official-attack", out / "official-model", args.location)
    attacks = attack_all(out, "attack", out / "trojannet", args.location)
    baselines = {} if args.skip_baselines else run_baselines(out, seed)

    den, strict = trojan["denoise_accuracy"], trojan["denoise_accuracy_strict"]
    off_den = official["denoise_accuracy"] if official else {}
    off_strict = official["denoise_accuracy_strict"] if official else {}
    lines = [
        "### Table 5.4 — trigger recognition and denoising (TrojanNet alone)",
        "",
        "| figure | thesis / paper | trojanlab | official release, same test |",
        "|---|---|---|---|",
        (
            f"| trigger recognition (4,368 patterns) | 100 % | {pct(trojan['trigger_accuracy'])} ({trojan['triggers_recognised']}/4368) "
            f"| {pct(official['trigger_accuracy']) if official else '–'} |"
        ),
        (
            f"| lowest probability of the right trigger | – | {trojan['min_trigger_probability']:.3f} "
            f"| {official['min_trigger_probability']:.3f} |"
            if official
            else f"| lowest probability of the right trigger | – | {trojan['min_trigger_probability']:.3f} | – |"
        ),
    ]
    names = {
        "image_patches": "GTSRB test patches (10 per image)",
        "binary": "binary non-triggers (all 61,168)",
        "grey": "official grey noise",
        "uniform": "uniform noise",
    }
    for kind, label in names.items():
        paper = "99.98 %" if kind == "image_patches" else "–"
        lines.append(f"| silent on {label}, argmax rule | {paper} | {pct(den.get(kind))} | {pct(off_den.get(kind))} |")
        lines.append(
            f"| silent on {label}, all < 1e-4 rule | {paper if kind == 'image_patches' else '–'} "
            f"| {pct(strict.get(kind))} | {pct(off_strict.get(kind))} |"
        )
    lines += [
        (
            f"| training time (2 CPU threads) | official schedule ≈ 480 M samples | {trojan['train_seconds']:.0f} s, "
            f"{trojan['train_samples'] / 1e6:.1f} M samples | – |"
        ),
        "",
        f"Victim: GTSRB CNN, clean accuracy {pct(victim['clean_accuracy'])} on the {victim['test_images']} GTSRB test images.",
        "",
        "### Tables 5.5–5.8 — TrojanNet attack on GTSRB (ASR over triggered test images of other classes)",
        "",
        (
            "| N_inf | ASR thesis | ASR trojanlab (mean / min over targets) | ASR official release (mean / min) "
            "| CA drop thesis | CA drop trojanlab | CA drop official release | CA after (trojanlab) |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for n, r in attacks.items():
        o = official_attacks.get(n)
        o_asr = f"{pct(o['attack_success_rate'])} / {pct(o['attack_success_rate_min'])}" if o else "–"
        o_drop = f"{100 * o['clean_accuracy_drop']:.2f} pp" if o else "–"
        lines.append(
            f"| {n}{' (all labels)' if n == 43 else ''} | {pct(THESIS['asr'].get(n), 0) if n in THESIS['asr'] else '–'} "
            f"| {pct(r['attack_success_rate'])} / {pct(r['attack_success_rate_min'])} "
            f"| {o_asr} "
            f"| {pct(THESIS['ca_drop'].get(n), 1) if n in THESIS['ca_drop'] else '–'} "
            f"| {100 * r['clean_accuracy_drop']:.2f} pp | {o_drop} "
            f"| {pct(r['clean_accuracy'])} |"
        )
    if baselines:
        lines += baseline_lines(baselines, attacks)
    lines += [
        "",
        (
            f"Made by `python benchmarks/trojannet_tables.py --out {args.out}` (seed {args.seed}, trigger at "
            f"row {args.location[0]}, col {args.location[1]}; merge: official, amplify 2)."
        ),
    ]
    text = "\n".join(lines) + "\n"
    atomic_write(out / "tables.md", lambda tmp: tmp.write_text(text))
    write_json(
        out / "tables.json",
        {
            "victim": victim,
            "trojannet": trojan,
            "official": official,
            "attacks": {str(k): v for k, v in attacks.items()},
            "official_attacks": {str(k): v for k, v in official_attacks.items()},
            "baselines": baselines,
        },
    )
    print(text)


if __name__ == "__main__":
    main()
