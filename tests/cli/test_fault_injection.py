"""Fault injection through the command line: every bad input is answered with exit 2 and one line naming the
problem, before any work, and loses no file already written.

Each row stands for a class of mistakes (a folder holding another run, a model that does not fit the data, an
option that does nothing or makes no sense, a device that is not there, a file that is not what it claims to be).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from trojanlab.cli import main

GTSRB5 = Path(__file__).parents[1] / "data" / "gtsrb5"
from .fault_cases import CASES, TINY, build_inputs


@pytest.fixture(scope="module")
def paths(tmp_path_factory, make_bright_thirds):
    return build_inputs(tmp_path_factory.mktemp("faults"), make_bright_thirds)


def _snapshot(folder: str | None) -> dict[str, str]:
    if folder is None:
        return {}
    root = Path(folder)
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


@pytest.mark.parametrize(("case", "argv", "pattern", "kept"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line_and_exit_2_before_any_work(paths, capsys, case, argv, pattern, kept):
    before = _snapshot(paths[kept] if kept else None)
    capsys.readouterr()
    assert main([part.format(**paths) for part in argv.split()]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("trojanlab: error: "), err
    assert "Traceback" not in err and "weights_only=False" not in err
    assert re.search(pattern, err), err
    assert _snapshot(paths[kept] if kept else None) == before
    assert not Path(paths["NEW"]).exists()  # nothing written for a run refused before its work


def test_the_same_command_resumes_and_restart_or_force_start_over(paths, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--data", paths["D"], *TINY, "--out", str(out)]
    assert main(argv) == 0
    weights = (out / "model.safetensors").read_bytes()
    first = json.loads((out / "result.json").read_text())
    assert main(argv) == 0  # resumed from its finished checkpoint: no epoch trained again, the same weights
    again = json.loads((out / "result.json").read_text())
    assert (out / "model.safetensors").read_bytes() == weights
    assert again["resumed_from_epoch"] == 1 and again["train_seconds"] == pytest.approx(first["train_seconds"])
    other = ["train", "--data", paths["E"], *TINY, "--out", str(out)]
    assert main(other) == 2
    assert main([*other, "--restart"]) == 0
    assert json.loads((out / "result.json").read_text())["resumed_from_epoch"] == 0
    assert (out / "model.safetensors").read_bytes() != weights
    inject = ["attack", "trojannet", "--victim", paths["V"], "--trojannet", paths["TN"], "--data", paths["D"]]
    assert main([*inject, "--out", str(out), "--restart"]) == 2  # another command's run needs --force
    assert main([*inject, "--out", str(out), "--force", "--targets", "0"]) == 0
    manifest = json.loads((out / "trojanlab-run.json").read_text())
    assert manifest["command"] == "attack trojannet" and manifest["status"] == "done"
    assert not (out / "checkpoint").exists()  # the training run's files went with it


def test_a_run_stopped_by_bad_input_after_it_began_leaves_the_folder_free(paths, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    # a manifest of a run that produced nothing (say, stopped by a bad file read late)
    (out / "trojanlab-run.json").write_text(json.dumps({"command": "train", "fingerprint": "0" * 16}))
    assert main(["train", "--data", paths["D"], *TINY, "--out", str(out)]) == 0


def test_evaluate_matches_an_image_folders_classes_by_name(paths, tmp_path, capsys):
    from trojanlab.evaluation import predict
    from trojanlab.models import load_model

    subset = tmp_path / "two-classes"
    for name in ("yield", "stop"):  # the model's labels 4 and 3; sorted here as stop=0, yield=1
        shutil.copytree(GTSRB5 / name, subset / name)
    capsys.readouterr()
    assert main(["evaluate", "--model", paths["NAMED"], "--data", str(subset), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    from trojanlab.data import load_image_folder

    test = load_image_folder(subset, 32, 0.2, 0).test
    loaded = load_model(paths["NAMED"])
    labels = [loaded.spec["classes"].index(["stop", "yield"][k]) for k in test.y]
    expected = float((predict(loaded.module, test.x) == torch.as_tensor(labels).numpy()).mean())
    assert result["test_images"] == len(test) and result["clean_accuracy"] == pytest.approx(expected)
