"""Run folders (what a folder holds decides whether it is reused, refused or started over) and the model-data fit."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from trojanlab.data import DataSplits, ImageSet
from trojanlab.errors import RunFolderError, TrojanlabError
from trojanlab.io import FILE_MODE, write_json
from trojanlab.models import LoadedModel
from trojanlab.runs import MANIFEST, check_fits, input_identity, prepare_run, replacing_stale_runs


def _prepare(out, command="train", epochs=2, data="a.npz", **flags):
    return prepare_run(out, command, {"TrainConfig": {"epochs": epochs}}, 0, data=data, **flags)


@pytest.fixture()
def data_files(tmp_path):
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    a.write_bytes(b"images of a")
    b.write_bytes(b"images of b")
    return a, b


def _finished(out, data, command="train", epochs=2):
    run = _prepare(out, command, epochs, data)
    run.start()
    write_json(out / "result.json", {"done": True})
    run.done()
    return run


def test_a_new_folder_is_written_only_when_the_work_starts(tmp_path, data_files):
    out = tmp_path / "deep" / "run"
    run = _prepare(out, data=data_files[0])
    assert not out.exists() and not run.resuming
    run.start()
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["command"] == "train" and manifest["status"] == "running"
    assert manifest["identity"]["config"] == {"TrainConfig": {"epochs": 2}}
    run.done()
    assert json.loads((out / MANIFEST).read_text())["status"] == "done"


def test_the_same_run_resumes_and_any_difference_is_refused_by_name(tmp_path, data_files):
    a, b = data_files
    out = tmp_path / "run"
    _finished(out, a)
    again = _prepare(out, data=a)
    assert again.resuming and not again.replace
    with pytest.raises(RunFolderError, match=r"TrainConfig\.epochs: 2 there, 3 now.*--restart"):
        _prepare(out, epochs=3, data=a)
    with pytest.raises(RunFolderError, match=r"inputs\.data: other content \(.*a\.npz there, .*b\.npz now\)"):
        _prepare(out, data=b)
    with pytest.raises(RunFolderError, match=r"holds a `trojanlab train` run, not `attack badnets`.*--force"):
        _prepare(out, "attack badnets", data=a)
    with pytest.raises(RunFolderError):  # --restart starts over this command's run, not another command's
        _prepare(out, "attack badnets", data=a, restart=True)
    # refusals write nothing
    assert json.loads((out / "result.json").read_text()) == {"done": True}


def test_restart_clears_the_earlier_run_but_keeps_files_it_did_not_write(tmp_path, data_files):
    a, b = data_files
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / ".git").mkdir()  # hidden: never ours, never removed
    with pytest.raises(RunFolderError, match=r"files no trojanlab run recorded \(notes\.txt\).*--force"):
        _prepare(out, data=a)
    run = _prepare(out, data=a, force=True)
    assert run.foreign == ["notes.txt"]
    run.start()
    (out / "checkpoint").mkdir()
    (out / "checkpoint" / "train.safetensors").write_bytes(b"state")
    write_json(out / "result.json", {})
    run.done()
    # the run's work, even where it wrote over names it found, is not silently replaced by another run
    with pytest.raises(RunFolderError, match="--restart"):
        _prepare(out, data=b)
    restarted = _prepare(out, epochs=5, data=a, restart=True)
    restarted.start()
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST, "notes.txt", ".git"])
    assert (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / MANIFEST).read_text())["foreign"] == ["notes.txt"]


def test_the_same_settings_with_restart_start_over_too(tmp_path, data_files):
    out = tmp_path / "run"
    _finished(out, data_files[0])
    run = _prepare(out, data=data_files[0], restart=True)
    assert run.replace and not run.resuming
    run.start()
    assert not (out / "result.json").exists()


def test_leftover_temporary_files_of_a_killed_write_are_removed_on_resume(tmp_path, data_files):
    out = tmp_path / "run"
    run = _prepare(out, data=data_files[0])
    run.start()
    (out / ".result.json.abc123.tmp").write_text("half")
    again = _prepare(out, data=data_files[0])
    assert again.resuming
    again.start()
    assert not list(out.glob(".*.tmp"))
    assert json.loads((out / MANIFEST).read_text())["sessions"] == 2


def test_an_output_path_that_cannot_be_a_folder_is_refused_before_anything_is_written(tmp_path, data_files):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(TrojanlabError, match="exists and is not a folder"):
        _prepare(blocker, data=data_files[0])
    with pytest.raises(TrojanlabError, match="is a file, so the folder cannot be created"):
        _prepare(blocker / "sub" / "run", data=data_files[0])
    assert blocker.read_text() == "x"


def test_reproduce_stages_start_another_configuration_over(tmp_path, data_files):
    out = tmp_path / "stage"
    _finished(out, data_files[0])
    (out / "stage.json").write_text("{}")  # the pipeline's record beside the run's files
    with replacing_stale_runs():
        run = _prepare(out, epochs=9, data=data_files[0])
    assert run.replace
    run.start()
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST, "stage.json"])


def test_embedded_names_are_read_as_the_data_loader_reads_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gtsrb").mkdir()  # a folder named like the embedded set (say, a run's --out) is not the data
    (tmp_path / "gtsrb" / "x.txt").write_text("x")
    assert input_identity("gtsrb")["embedded"] == "gtsrb"
    assert input_identity(["gtsrb", None]) == [input_identity("gtsrb"), None]


def test_inputs_are_identified_by_content_not_path(tmp_path, data_files):
    a, b = data_files
    copy = tmp_path / "elsewhere.npz"
    copy.write_bytes(a.read_bytes())
    assert input_identity(a) == input_identity(copy) != input_identity(b)
    assert input_identity("gtsrb")["embedded"] == "gtsrb"
    assert input_identity(None) is None and input_identity("not-a-path") == "not-a-path"
    # a trojanlab run folder is identified by what produced it (its fingerprint), whatever its timings
    out = tmp_path / "victim"
    run = _finished(out, a)
    assert input_identity(out) == {"run": "train", "fingerprint": run.fingerprint}


def test_written_files_are_readable_as_the_umask_allows(tmp_path):
    mask = os.umask(0o022)
    os.umask(mask)
    path = write_json(tmp_path / "result.json", {})
    assert path.stat().st_mode & 0o777 == FILE_MODE == 0o666 & ~mask


def _loaded(classes, size=8):
    spec = {"classes": classes, "num_classes": len(classes), "input_size": [3, size, size]}
    return LoadedModel(module=None, spec=spec, path=None)


def _splits(classes, labels, size=8):
    x = np.zeros((len(labels), size, size, 3), np.uint8)
    images = ImageSet(x, np.asarray(labels, np.int64))
    return DataSplits("folder", images, images, classes)


def test_classes_are_matched_by_name_not_position():
    model = _loaded(["stop", "yield", "no_entry", "roundabout"])
    # an image folder with two of the model's classes, sorted its own way: each image keeps its class
    data = check_fits(model, _splits(["roundabout", "stop"], [0, 1, 1]), "m")
    assert data.classes == ["stop", "yield", "no_entry", "roundabout"]
    assert data.test.y.tolist() == [3, 0, 0] and data.train.y.tolist() == [3, 0, 0]
    with pytest.raises(TrojanlabError, match=r"classes the model does not know \(banana\)"):
        check_fits(model, _splits(["banana", "stop"], [0, 1]), "m")
    # numbered classes (an .npz without names) can only be checked by count
    with pytest.raises(TrojanlabError, match="a 4-class model, but folder has 5 classes"):
        check_fits(_loaded([str(i) for i in range(4)]), _splits([str(i) for i in range(5)], [0, 4]), "m")
    with pytest.raises(TrojanlabError, match=r"expects \(3, 8, 8\)"):
        check_fits(model, _splits(["stop"], [0], size=16), "m")
