"""``trojanlab reproduce``: configuration, stage fingerprints, resume after a failure, and the report.

The end-to-end runs use a tiny configuration (a 43 x 10-image GTSRB subset, one epoch, a few TrojanNet steps) so
that the whole chain -- victim, TrojanNet, attack, Neural Cleanse, ANP, report -- runs in about a minute.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trojanlab.cli import main
from trojanlab.errors import ConfigError
from trojanlab.reproduce import StageFailed, build_stages, load_config, parse_override, run_pipeline
from trojanlab.reproduce.pipeline import fingerprint

TINY = [
    "gtsrb.subset={train_per_class: 10, test_per_class: 4}",
    "gtsrb.victim.epochs=1",
    "gtsrb.trojannet={steps: 4, finetune_steps: 0}",
    "gtsrb.trojannet_n_inf=[1]",
    "gtsrb.badnets.n_inf=[]",
    "gtsrb.badnets.epochs=1",
    "gtsrb.trojannn.epochs=1",
    "gtsrb.official_trojannet=false",
    "gtsrb.neural_cleanse={models: [trojannet-n1], steps: 2}",
    "gtsrb.defender={clean_fraction: 0.2, curve_images: 40}",
    "gtsrb.anp={models: [trojannet-n1], iterations: 3, batch_size: 8}",
    "gtsrb.nc_guided={models: [trojannet-n1], guide_labels: [0]}",
    "gtsrb.fine_pruning={models: [trojannet-n1], fine_tune_epochs: 1}",
    "gtsrb.subnetwork={models: [trojannet-n1], cycles: 1, epochs: 1, monitor_images: 20}",
    "transfer.enabled=false",
    "demo.enabled=false",
]


def tiny_config(*extra: str) -> dict:
    return load_config("full", overrides=[*TINY, *extra])


def stage_states(out: Path) -> dict[str, str]:
    run = json.loads((out / "run.json").read_text())
    return {s["name"]: s["status"] for s in run["stages"]}


# ----------------------------------------------------------------------------------------------- configuration


def test_overrides_are_read_as_yaml_and_nested():
    assert parse_override("gtsrb.victim.epochs=3") == {"gtsrb": {"victim": {"epochs": 3}}}
    assert parse_override("gtsrb.anp.models=[badnets]") == {"gtsrb": {"anp": {"models": ["badnets"]}}}
    assert parse_override("gtsrb.subset=null") == {"gtsrb": {"subset": None}}
    config = load_config("full", overrides=["gtsrb.victim.epochs=3", "seed=7"])
    assert config["gtsrb"]["victim"] == {"epochs": 3, "patience": 3}
    assert config["seed"] == 7
    with pytest.raises(ConfigError, match="gtsrb.victim.epoch'"):
        load_config("full", overrides=["gtsrb.victim.epoch=3"])
    # a section takes any field of its config classes, also one the profile leaves at its default
    assert load_config("full", overrides=["gtsrb.anp.eps=0.3"])["gtsrb"]["anp"]["eps"] == 0.3
    with pytest.raises(ConfigError, match="known here: .*iterations"):
        load_config("full", overrides=["gtsrb.anp.epss=0.3"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("gtsrb.victim.epochs")


def test_quick_profile_and_config_file_layer_over_the_full_one(tmp_path):
    full, quick = load_config("full"), load_config("quick")
    assert full["gtsrb"]["subset"] is None and quick["gtsrb"]["subset"]["train_per_class"] > 0
    assert quick["gtsrb"]["victim"]["epochs"] == full["gtsrb"]["victim"]["epochs"]  # untouched keys survive the merge
    user = tmp_path / "mine.yaml"
    user.write_text("gtsrb:\n  anp:\n    iterations: 7\n")
    config = load_config("quick", user, ["gtsrb.anp.batch_size=5"])
    assert config["gtsrb"]["anp"]["iterations"] == 7 and config["gtsrb"]["anp"]["batch_size"] == 5
    assert config["gtsrb"]["anp"]["models"] == quick["gtsrb"]["anp"]["models"]
    user.write_text("gtsrb: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config("full", user)
    with pytest.raises(ConfigError, match="no such configuration file"):
        load_config("full", tmp_path / "missing.yaml")


def _prints(config: dict, out: Path) -> dict[str, str]:
    prints: dict[str, str] = {}
    for stage in build_stages(config, out):
        assert all(d in prints for d in stage.deps), f"{stage.name} comes before what it consumes"
        prints[stage.name] = fingerprint(stage, [prints[d] for d in stage.deps])
    return prints


def test_a_changed_setting_invalidates_its_stage_and_everything_downstream(tmp_path):
    base = _prints(load_config("full"), tmp_path)
    assert {"gtsrb/victim", "gtsrb/trojannet", "gtsrb/attacks/trojannet-n8", "gtsrb/attacks/badnets-n8",
            "gtsrb/attacks/trojannn/detect-nc", "gtsrb/attacks/trojannet-n1/defend-subnetwork",
            "transfer/attacks/trojannet-n5/defend-anp", "gtsrb/attacks/badnets/defend-nc-guided", "demo"} <= set(base)  # fmt: skip
    changed = _prints(load_config("full", overrides=["gtsrb.victim.epochs=9"]), tmp_path)
    differs = {name for name in base if base[name] != changed[name]}
    assert "gtsrb/victim" in differs and "gtsrb/attacks/trojannet-n1/defend-anp" in differs
    assert "gtsrb/trojannet" not in differs and not any(n.startswith(("transfer/", "demo")) for n in differs)
    anp_only = _prints(load_config("full", overrides=["gtsrb.anp.iterations=11"]), tmp_path)
    assert {n for n in base if base[n] != anp_only[n]} == {
        f"gtsrb/attacks/{m}/defend-anp" for m in ("trojannet-n1", "trojannet-n8", "badnets", "trojannn")
    }
    with pytest.raises(ConfigError, match="unknown model 'nope'"):
        build_stages(load_config("full", overrides=["gtsrb.anp.models=[nope]"]), tmp_path)
    # the guided pruning reads its model's Neural Cleanse scan: a new scan re-runs it, and it needs one
    scan = _prints(load_config("full", overrides=["gtsrb.neural_cleanse.steps=61"]), tmp_path)
    assert base["gtsrb/attacks/badnets/defend-nc-guided"] != scan["gtsrb/attacks/badnets/defend-nc-guided"]
    with pytest.raises(ConfigError, match="needs its Neural Cleanse scan"):
        build_stages(load_config("full", overrides=["gtsrb.neural_cleanse.models=[victim]"]), tmp_path)


# ----------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A tiny run that first fails at the attack (trigger outside the image), then is resumed with a fixed setting."""
    out = tmp_path_factory.mktemp("reproduce") / "run"
    with pytest.raises(StageFailed, match="gtsrb/attacks/trojannet-n1"):
        run_pipeline(tiny_config("gtsrb.location=[40, 40]"), out, progress=False)
    failed = {"states": stage_states(out), "mtimes": {}}
    for name in ("gtsrb/victim", "gtsrb/trojannet"):
        failed["mtimes"][name] = (out / name / "result.json").stat().st_mtime_ns
    run = run_pipeline(tiny_config(), out, progress=False)
    return out, failed, run


def test_a_failed_stage_keeps_the_finished_ones_and_the_rerun_resumes(finished_run):
    out, failed, run = finished_run
    assert failed["states"]["gtsrb/victim"] == "ran" and failed["states"]["gtsrb/attacks/trojannet-n1"] == "failed"
    assert json.loads((out / "gtsrb/attacks/trojannet-n1/stage.json").read_text())["status"] != "failed"
    states = {s["name"]: s["status"] for s in run["stages"]}
    assert states["gtsrb/data"] == states["gtsrb/victim"] == states["gtsrb/trojannet"] == "reused"
    assert states["gtsrb/attacks/trojannet-n1"] == "ran" and run["status"] == "done"
    for name, mtime in failed["mtimes"].items():  # not recomputed: the files are the first run's
        assert (out / name / "result.json").stat().st_mtime_ns == mtime
    attack = json.loads((out / "gtsrb/attacks/trojannet-n1/result.json").read_text())
    from trojanlab.evaluation.run import evaluate

    data = out / "gtsrb" / "data" / "data.npz"
    assert attack["attack_success_rate"] == pytest.approx(evaluate(out / "gtsrb/attacks/trojannet-n1", data=data)[
        "attack_success_rate"])  # fmt: skip


def test_rerun_reuses_everything_and_a_changed_setting_recomputes_only_its_stages(finished_run):
    out, _, _ = finished_run
    again = run_pipeline(tiny_config(), out, progress=False)
    assert {s["status"] for s in again["stages"]} == {"reused"}
    changed = run_pipeline(tiny_config("gtsrb.anp.iterations=2"), out, progress=False)
    ran = {s["name"] for s in changed["stages"] if s["status"] == "ran"}
    assert ran == {"gtsrb/attacks/trojannet-n1/defend-anp"}
    assert changed["stale_stages"] == []
    fewer = run_pipeline(tiny_config("gtsrb.anp.iterations=2", "gtsrb.subnetwork.models=[]"), out, progress=False)
    assert {s["status"] for s in fewer["stages"]} == {"reused"}
    assert fewer["stale_stages"] == ["gtsrb/attacks/trojannet-n1/defend-subnetwork"]
    assert "gtsrb/attacks/trojannet-n1/defend-subnetwork" in (out / "report/report.md").read_text()
    result = json.loads((out / "gtsrb/attacks/trojannet-n1/defend-anp/result.json").read_text())
    assert result["config"]["ANPConfig"]["iterations"] == 2
    guided = json.loads((out / "gtsrb/attacks/trojannet-n1/defend-nc-guided/result.json").read_text())
    assert guided["method"] == "nc-guided" and guided["guide"]["labels"] == [0]
    pruned = json.loads((out / "gtsrb/attacks/trojannet-n1/defend-fine-pruning/result.json").read_text())
    assert pruned["method"] == "fine-pruning" and pruned["layer"] and "fine_tune" in pruned


def test_report_tables_link_to_existing_results_and_embed_the_figures(finished_run):
    out, _, _ = finished_run
    report = out / "report"
    md = (report / "report.md").read_text()
    for title in ("Table 5.4", "Tables 5.5 / 5.7", "Tables 5.6 / 5.8", "Table 5.9", "Table 5.10", "ANP on GTSRB"):
        assert title in md
    trojannet = json.loads((out / "gtsrb/trojannet/result.json").read_text())
    assert f"{100 * trojannet['trigger_accuracy']:.2f} %" in md  # our figure, read from the stage's result
    links = re.findall(r"\]\(([^)]+)\)", md)
    assert any(link.endswith("result.json") for link in links)
    for link in links:
        assert (report / link).is_file(), f"report.md links to a missing file: {link}"
    page = (report / "report.html").read_text()
    assert "http://" not in page and "https://" not in page and "<link" not in page  # self-contained
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) >= 4  # trigger examples, NC norms, ANP curve and histogram, sub-network curves
    widths = [Image.open(io.BytesIO(base64.b64decode(data))).size[0] for data in images]
    assert min(widths) > 0 and sum(w > 300 for w in widths) >= 4  # the plots, besides small reversed triggers
    for link in re.findall(r'href="([^"]+)"', page):
        assert (report / link).is_file()


def test_cli_refuses_a_foreign_folder_and_reports_a_bad_setting(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["reproduce", "--quick", "--out", str(tmp_path), *[arg for s in TINY for arg in ("--set", s)]]) == 2
    assert "notes.txt" in capsys.readouterr().err
    assert main(["reproduce", "--quick", "--set", "gtsrb.victim.epoch=1", "--print-config"]) == 2
    assert "unknown setting" in capsys.readouterr().err
    assert main(["reproduce", "--quick", "--seed", "3", "--print-config"]) == 0
    assert "seed: 3" in capsys.readouterr().out


CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


@pytest.mark.skipif(CHROMIUM is None, reason="no headless Chromium installed (apt-get install chromium)")
def test_html_report_renders_in_a_headless_browser(finished_run, tmp_path):
    out, _, _ = finished_run
    page = (out / "report" / "report.html").resolve()
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync",
             "--disable-background-networking", "--disable-component-update", f"--user-data-dir={tmp_path / 'profile'}"]  # fmt: skip
    shot = tmp_path / "report.png"
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1280,2400", page.as_uri()],
                   check=True, capture_output=True, timeout=120)  # fmt: skip
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.shape == (2400, 1280)
    # a rendered page, not a blank one: text and figures in most 200-pixel bands of its first 2,400 rows
    inked = [(band < 200).mean() for band in pixels.reshape(12, 200, 1280)]
    assert sum(0.002 < share < 0.8 for share in inked) >= 8, inked
    dom = subprocess.run([*flags, "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
                         check=True, capture_output=True, text=True, timeout=120).stdout  # fmt: skip
    assert dom.count("<table") >= 6
    loaded = re.search(r'data-images-loaded="(\d+)"', dom)
    total = re.search(r'data-images-total="(\d+)"', dom)
    assert loaded and total and int(total.group(1)) >= 4
    assert loaded.group(1) == total.group(1)  # every embedded image decoded in the browser


def test_the_quick_profile_starts_from_the_bundled_victim_and_trojannet(gtsrb):
    from trojanlab.data import BUNDLED_TROJANNET, BUNDLED_VICTIM, GTSRB_CLASS_NAMES
    from trojanlab.evaluation import clean_accuracy
    from trojanlab.models import load_model

    stages = {s.name: s for s in build_stages(load_config("quick"), Path("unused"))}
    assert "bundled" in stages["gtsrb/victim"].title and "bundled" in stages["gtsrb/trojannet"].title
    victim = load_model(BUNDLED_VICTIM)
    assert victim.spec["classes"] == GTSRB_CLASS_NAMES and victim.spec["input_size"] == [3, 32, 32]
    sample = gtsrb.test.subset(np.arange(0, len(gtsrb.test), 10))  # 595 test images the victim never trained on
    assert clean_accuracy(victim.module, sample) > 0.95
    assert load_model(BUNDLED_TROJANNET).spec["kind"] == "trojannet"


def test_ray_runs_independent_stages_as_tasks_and_a_sequential_rerun_reuses_them(tmp_path):
    pytest.importorskip("ray")
    out = tmp_path / "run"
    config = tiny_config("gtsrb.subnetwork.models=[]", "gtsrb.fine_pruning.models=[]")
    run = run_pipeline(config, out, progress=False, executor="ray", workers=2)
    assert run["status"] == "done" and run["executor"] == "ray"
    assert {s["status"] for s in run["stages"]} == {"ran"}
    assert [s["name"] for s in run["stages"]] == [s.name for s in build_stages(config, out)]  # in stage order
    for stage in run["stages"]:
        assert json.loads((out / stage["name"] / "stage.json").read_text())["status"] == "done"
    again = run_pipeline(config, out, progress=False)  # the fingerprints do not depend on the executor
    assert {s["status"] for s in again["stages"]} == {"reused"}
    with pytest.raises(ConfigError, match="--executor must be one of"):
        run_pipeline(config, tmp_path / "other", progress=False, executor="dask")
