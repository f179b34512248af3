"""The ``trojanlab reproduce`` report, built from a hand-made run folder (no model is trained or loaded).

Checks the report's honesty rules: one percent formatter that never rounds a value short of 1 up to 100 (or a
non-zero value down to 0), the authors' release read from its own stage (or "not measured in this run"), the true
target beside Neural Cleanse's flagged labels, and the demo's rates with the number of images they rest on.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
from PIL import Image

from trojanlab import formatting
from trojanlab.reproduce import load_config
from trojanlab.reproduce import report as rp

# ----------------------------------------------------------------------------------------------- the formatter


def test_pct_never_shows_100_or_0_for_a_value_that_is_not():
    assert rp.pct(1.0) == "100.00 %" and rp.pct(0.0) == "0.00 %" and rp.pct(-0.0) == "0.00 %"
    assert rp.pct(0.5) == "50.00 %" and rp.pct(0.974, 1) == "97.4 %" and rp.pct(1.0, 0) == "100 %"
    assert rp.pct(0.99996) == "99.996 %"
    assert rp.pct(0.999999) == "99.9999 %"
    assert rp.pct(3e-5) == "0.003 %" and rp.pct(4e-7) == "0.00004 %"
    assert rp.pct(0.99996, 1) == "99.996 %"  # fewer digits asked: still never 100
    assert rp.pct(None) == "–" and rp.pct(float("nan")) == "–"
    assert rp.pp(0.0059) == "0.59 pp" and rp.pp(-1e-5) == "-0.001 pp" and rp.pp(-0.0) == "0.00 pp"
    assert rp.pp(None) == "–"
    assert not rp.pct(1 - 1e-13).startswith("100") and not rp.pct(1e-30).startswith("0.00")
    assert formatting.percent_number(0.5, 20).startswith("50.0")  # more digits than the search: plain
    rng = random.Random(0)
    values = [1 - 10 ** -rng.uniform(2, 12) for _ in range(300)] + [10 ** -rng.uniform(2, 12) for _ in range(300)]
    for value in values:
        number = float(formatting.percent_number(value))
        assert 0 < number < 100, (value, formatting.percent_number(value))


def test_pct_is_the_only_percent_formatting_in_the_report_module():
    source = Path(rp.__file__).read_text()
    # no "{x:.N%}" or "{100 * x:.Nf} %" outside the formatter: every percentage goes through pct / pp
    assert not re.search(r"\{[^{}]*:\.\d+%\}", source)
    assert "def pct(" not in source  # the formatter lives in trojanlab.formatting, imported
    assert not re.search(r"100 \* [^}]*:\.\d+f\} ?%", source)
    # and no measured figure is typed into the code: the authors' release is read from its stage
    assert "0.973" not in source and "0.919" not in source


# ----------------------------------------------------------------------------------------------- a fake run


def _write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _trojannet_result(recognition: float, binary: float) -> dict:
    return {
        "trigger_accuracy": recognition, "triggers_recognised": round(4368 * recognition), "triggers_total": 4368,
        "min_trigger_probability": 0.6,
        "denoise_accuracy": {"image_patches": 0.9991, "binary": binary, "grey": 0.9953, "uniform": 0.9985},
        "denoise_accuracy_strict": {"image_patches": 0.99, "binary": 0.9998, "grey": 0.98, "uniform": 0.99},
        "denoise_samples": {"image_patches": 59490, "binary": 61168, "grey": 100000, "uniform": 100000},
        "strict_threshold": 1e-4, "train_seconds": 256.0, "train_samples": 22_000_000,
    }  # fmt: skip


def _trigger(target: int) -> dict:
    return {"name": f"t{target}", "target_label": target, "location": [1, 1], "pattern": [[1.0]], "mask": [[1.0]],
            "alpha": 1.0}  # fmt: skip


def _nc(flagged: list[int], smallest: int) -> dict:
    return {"mad": 19.2, "anomaly_index": 2.38 if flagged else 1.3, "flagged_labels": flagged, "threshold": 2.0,
            "smallest_norm_label": smallest, "median": 58.0, "seconds": 78.0}  # fmt: skip


def _top5(first: tuple[str, int]) -> list:
    return [[first[0], first[1], 0.9], ["b", 2, 0.05], ["c", 3, 0.02], ["d", 4, 0.01], ["e", 5, 0.01]]


@pytest.fixture()
def fake_run(tmp_path, monkeypatch):
    """A run folder with result.json files only; returns a function that writes the report and returns report.md."""
    out = tmp_path / "run"
    config = load_config("full", overrides=[
        "gtsrb.trojannet_n_inf=[2]", "gtsrb.badnets.n_inf=[]",
        "gtsrb.neural_cleanse.models=[victim, badnets, trojannet-n2, trojannn]",
        "gtsrb.anp.models=[badnets]", "gtsrb.nc_guided.models=[]", "gtsrb.subnetwork.models=[]",
        "transfer.enabled=false",
    ])  # fmt: skip
    # 2 of 61,168 binary non-triggers fire: 99.9967 %, which two decimals would round to 100.00 %
    _write(out / "gtsrb/trojannet/result.json", _trojannet_result(4367 / 4368, 61166 / 61168))
    _write(out / "gtsrb/victim/result.json", {"clean_accuracy": 0.98, "test_images": 100, "arch": "gtsrb_cnn"})
    _write(out / "gtsrb/victim/detect-nc/result.json", _nc([12], 12))
    _write(out / "gtsrb/attacks/badnets/result.json",
           {"clean_accuracy": 0.976, "clean_accuracy_drop": 0.0059, "attack_success_rate": 0.94, "targets": [33]})
    _write(out / "gtsrb/attacks/badnets/detect-nc/result.json", _nc([33], 33))
    # the TrojanNet model's targets come from its model.json (its result.json says nothing of them here)
    _write(out / "gtsrb/attacks/trojannet-n2/result.json",
           {"clean_accuracy": 0.98, "clean_accuracy_drop": 0.0, "attack_success_rate": 1.0})
    _write(out / "gtsrb/attacks/trojannet-n2/model.json", {"kind": "trojannet_injected", "num_classes": 43,
                                                           "triggers": [_trigger(0), _trigger(1)]})  # fmt: skip
    _write(out / "gtsrb/attacks/trojannet-n2/detect-nc/result.json", _nc([1], 1))
    _write(out / "gtsrb/attacks/trojannn/result.json",
           {"clean_accuracy": 0.974, "clean_accuracy_drop": 0.007, "attack_success_rate": 0.9966, "target": 0})
    _write(out / "gtsrb/attacks/trojannn/detect-nc/result.json", _nc([], 12))
    curve = [{"threshold": 0.5, "pruned": 13, "fraction": 0.0135, "clean_accuracy": 0.97, "attack_success_rate": 0.9}]
    _write(out / "gtsrb/attacks/badnets/defend-anp/result.json", {
        "variant": "anp", "pruned": 13, "neurons": 960, "threshold": 0.5, "defense_seconds": 60.0,
        "rule": "auto: the largest threshold ... within 2.5% of the unpruned model (chosen 0.5)", "test_curve": curve,
        "before": {"clean_accuracy": 0.976, "attack_success_rate": 0.94},
        "after": {"clean_accuracy": 0.975, "attack_success_rate": 0.0},
    })  # fmt: skip
    Image.new("RGB", (400, 200), "white").save(out / "gtsrb/attacks/badnets/defend-anp/pruning_curve.png")
    rows = [
        {"image": "a.jpg", "victim_top5": _top5(("cat", 7)), "attacked_clean_top5": _top5(("cat", 7)),
         "attacked_triggered_top5": _top5(("goldfish", 1))},
        {"image": "b.jpg", "victim_top5": _top5(("dog", 8)), "attacked_clean_top5": _top5(("dog", 8)),
         "attacked_triggered_top5": _top5(("goldfish", 1))},
        {"image": "c.jpg", "victim_top5": _top5(("car", 9)), "attacked_clean_top5": _top5(("bus", 6)),
         "attacked_triggered_top5": _top5(("car", 9))},
    ]  # fmt: skip
    # an older result: rates without the counts, which the report recounts from the per-image top-5
    _write(out / "demo/result.json", {"target": ["goldfish", 1], "location": [112, 112], "images": rows,
                                      "attack_success_rate": 2 / 3, "clean_agreement_with_victim": 2 / 3})  # fmt: skip
    run = {
        "trojanlab": "0", "python": "3", "torch": "2", "torchvision": "0", "numpy": "2", "platform": "linux",
        "threads": 2, "profile": "full", "seed": 0, "device": "cpu", "finished": "now", "wall_seconds": 1.0,
        "stages": [{"name": "gtsrb/trojannet", "title": "TrojanNet MLP", "status": "ran", "seconds": 1.0,
                    "command": "trojanlab trojannet train"}],
        "stale_stages": [],
    }  # fmt: skip
    monkeypatch.setattr(rp, "table_5_9", lambda res: None)  # it loads the victim's weights, which this run lacks

    def build(**changes) -> str:
        paths = rp.write_report(out, config, {**run, **changes})
        return paths["markdown"].read_text()

    return out, build


def _section(md: str, title: str) -> str:
    start = md.index(f"## {title}")
    end = md.find("\n## ", start + 1)
    return md[start : end if end > 0 else len(md)]


def _row(section: str, first_cell: str) -> list[str]:
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        if line.startswith("|") and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row {first_cell!r} in:\n{section}")


def _text(cell: str) -> str:
    """A cell's text without its link."""
    found = re.fullmatch(r"\[(.*)\]\((.*)\)", cell)
    return found.group(1) if found else cell


def test_table_5_4_reads_the_authors_release_from_its_stage_or_says_not_measured(fake_run):
    out, build = fake_run
    table = _section(build(), "Table 5.4")
    assert "authors' release (measured here)" in table
    row = _row(table, "trigger recognition (4,368 patterns)")
    assert row[2] == rp.NOT_MEASURED
    assert _text(row[3]) == "99.98 % (4,367/4,368)"
    binary = _row(table, "silent on binary non-triggers (every one), argmax rule")
    assert binary[1] == "–" and binary[2] == rp.NOT_MEASURED and _text(binary[3]) == "99.997 % of 61,168"  # not "100.00 %"

    _write(out / rp.OFFICIAL_STAGE / "result.json", _trojannet_result(1.0, 0.973))
    table = _section(build(), "Table 5.4")
    assert rp.NOT_MEASURED not in table.split("\n\n")[1]  # the rows; the note still explains the phrase
    binary = _row(table, "silent on binary non-triggers (every one), argmax rule")
    assert binary[2] == "[97.30 % of 61,168](../gtsrb/official-trojannet/result.json)"
    assert _row(table, "trigger recognition (4,368 patterns)")[2].startswith("[100.00 % (4,368/4,368)]")

    # left over from an earlier configuration: not this run's measurement
    table = _section(build(stale_stages=[rp.OFFICIAL_STAGE]), "Table 5.4")
    assert _row(table, "trigger recognition (4,368 patterns)")[2] == rp.NOT_MEASURED


def test_neural_cleanse_table_names_each_models_true_target(fake_run):
    _, build = fake_run
    table = _section(build(), "Table 5.10")
    assert "anomaly index > 2" in table.splitlines()[0]
    header = _row(table, "model")
    col, hit = header.index("true target (trojanlab)"), header.index("target flagged")
    victim = _row(table, "clean victim")
    assert _text(victim[col]) == "none (clean)" and "false alarm" in victim[hit]
    badnets = _row(table, "BadNets")
    assert badnets[col] == "[33](../gtsrb/attacks/badnets/result.json)" and badnets[hit] == "yes"
    trojannet = _row(table, "TrojanNet N_inf 2")
    assert trojannet[col] == "[0, 1](../gtsrb/attacks/trojannet-n2/model.json)" and trojannet[hit] == "1 of 2"
    trojannn = _row(table, "Trojan Attack (TrojanNN)")
    assert _text(trojannn[col]) == "0" and trojannn[hit] == "no"


def test_demo_rates_state_the_images_they_rest_on(fake_run):
    _, build = fake_run
    md = build()
    table = _section(md, "ImageNet demo")
    assert _text(_row(table, "triggered images given the chosen label")[2]) == "2/3 images (66.67 %) → goldfish"
    assert _text(_row(table, "clean images whose top-1 is the unmodified model's")[2]) == "2/3 images (66.67 %)"
    assert "rest on the 3 images of the run: a.jpg, b.jpg, c.jpg" in table
    assert _row(table, "triggered images given the chosen label")[1] == rp.THESIS_DEMO


def test_other_tables_read_their_numbers_from_the_results(fake_run):
    _, build = fake_run
    md = build()
    assert "tolerance 2.5%" in _section(md, "ANP on GTSRB")  # read from the defense's rule, not typed in
    single = _section(md, "Tables 5.5 / 5.7")
    assert _text(_row(single, "BadNets")[4]) == "0.59 pp"
    # the ANP curve had one pruning level: the caption says so (the plot itself says it in words)
    figures = _section(md, "Figures")
    assert "only one pruning level was measured" in figures


def test_label_list_compresses_runs():
    assert rp._label_list([]) == ""
    assert rp._label_list([3]) == "3"
    assert rp._label_list([1, 0]) == "0, 1"
    assert rp._label_list(list(range(43))) == "0–42"
    assert rp._label_list([0, 1, 2, 5, 7, 8]) == "0–2, 5, 7, 8"
