"""The model zoo: a seeded sampler, a YAML config checked before any work, members built one after another or as
Ray tasks into one resumable folder with a manifest."""

from __future__ import annotations

import csv
import json
import os
from collections import Counter

import pytest

from trojanlab.cli import main
from trojanlab.errors import ConfigError
from trojanlab.models.artifacts import load_model
from trojanlab.zoo import FAMILIES, ZooConfig, build_zoo, sample
from trojanlab.zoo.build import member_record, summarise


def test_the_sampler_is_seeded_spreads_families_and_varies_triggers_and_recipes():
    cfg = ZooConfig(clean=10, backdoored=24, seed=7)
    members = sample(cfg, num_classes=43, height=32, width=32)
    assert members == sample(cfg, 43, 32, 32)  # the same config, the same members
    assert sample(ZooConfig(clean=10, backdoored=24, seed=8), 43, 32, 32) != members
    assert len({m["id"] for m in members}) == 34
    families = Counter(m["family"] for m in members if m["role"] == "backdoored")
    assert families == dict.fromkeys(FAMILIES, 4)  # 24 attacks over 6 families, evenly
    clean_ids = {m["id"] for m in members if m["role"] == "clean"}
    for m in members:
        attack = m.get("attack", {})
        if "location" in attack:  # every trigger lies inside the image
            size = attack.get("trigger_size", 4)
            assert 0 <= attack["location"][0] <= 32 - size and 0 <= attack["location"][1] <= 32 - size
        if m["family"] in ("trojannn", "trojannet"):
            assert m["base"] in clean_ids
        assert cfg.epochs[0] <= m["train"]["epochs"] <= cfg.epochs[1]
    patch = [m["attack"] for m in members if m["family"] == "patch"]
    assert len({(p["trigger_size"], tuple(p["location"]), p["alpha"], p["targets"][0]) for p in patch}) == 4
    targets = {m["attack"].get("target", m["attack"].get("targets", [None])[0]) for m in members if m.get("attack")}
    assert len(targets) > 5  # not one default target
    recipes = {(m["model"]["arch"], m["train"]["optimizer"], m["train"]["augment"], m["model"]["normalize"])
               for m in members if m["role"] == "clean"}  # fmt: skip
    assert len(recipes) > 3
    # adding backdoored members does not change the clean ones
    more = sample(ZooConfig(clean=10, backdoored=30, seed=7), 43, 32, 32)
    assert [m for m in more if m["role"] == "clean"] == [m for m in members if m["role"] == "clean"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("clean: 2\nbackdoord: 3\n", "unknown setting(s) backdoord"),
        ("families: [badnets, sleeper]\n", "unknown ['sleeper']"),
        ("epochs: [9, 3]\n", "low end 9 is above the high end 3"),
        ("poison_rate: 0.1\n", "must be a range [low, high]"),
        ("clean: 0\nbackdoored: 2\nfamilies: [trojannet]\n", "give clean > 0"),
        ("clean: [1\n", "not valid YAML"),
        ("- 1\n- 2\n", "expected a mapping"),
    ],
)
def test_a_bad_zoo_config_is_one_line_and_exit_2_before_any_work(tmp_path, capsys, text, message):
    config = tmp_path / "zoo.yaml"
    config.write_text(text)
    assert main(["zoo", "build", "--config", str(config), "--out", str(tmp_path / "zoo"), "--executor",
                 "sequential"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "zoo").exists()


def test_a_failed_attack_is_recorded_as_failed_not_as_backdoored():
    member = {"id": "patch-000", "role": "backdoored", "family": "patch", "seed": 1,
              "model": {"arch": "gtsrb_cnn", "normalize": "none"},
              "train": {"epochs": 5, "optimizer": "adam", "lr": 1e-3, "augment": True},
              "attack": {"targets": [4], "poison_rate": 0.1, "pattern": "random-binary", "trigger_size": 3,
                         "location": [2, 2], "alpha": 0.8}}  # fmt: skip
    weak = member_record(member, {"clean_accuracy": 0.97, "attack_success_rate": 0.42}, 10.0, floor=0.8)
    strong = member_record(member, {"clean_accuracy": 0.96, "attack_success_rate": 0.93}, 10.0, floor=0.8)
    assert weak["status"] == "failed" and strong["status"] == "backdoored" and weak["target"] == 4
    table = summarise([weak, strong])
    assert table["patch"]["failed"] == 1 and table["patch"]["backdoored"] == 1
    assert table["patch"]["attack_success_rate"] == {"mean": pytest.approx(0.675), "min": 0.42, "max": 0.93}


def _tiny(tmp_path, make_bright_thirds, families=("patch",)) -> ZooConfig:
    data = make_bright_thirds(tmp_path / "data.npz", 240, 90, seed=3)
    return ZooConfig(
        clean=1,
        backdoored=len(families),
        families=list(families),
        data=str(data),
        epochs=[1, 1],
        architectures=["gtsrb_cnn"],
        poison_rate=[0.2, 0.2],
        patch_size=[6, 6],
        patch_alpha=[1, 1],
    )


def test_a_sequential_zoo_writes_members_and_a_manifest_and_keeps_finished_members(tmp_path, make_bright_thirds):
    cfg = _tiny(tmp_path, make_bright_thirds, families=("patch", "trojannet"))
    zoo = tmp_path / "zoo"
    seen = []
    report = build_zoo(cfg, out=zoo, executor="sequential", progress=False, on_member=seen.append)
    assert report.details["built"] == 3 and report.details["errors"] == {}
    manifest = json.loads((zoo / "zoo.json").read_text())
    rows = list(csv.DictReader((zoo / "zoo.csv").open()))
    ids = [r["id"] for r in rows]
    assert sorted(ids) == ["clean-000", "patch-000", "trojannet-000"] and ids == [m["id"] for m in manifest["members"]]
    trojannet = next(m for m in manifest["members"] if m["family"] == "trojannet")
    assert trojannet["base"] == "clean-000" and trojannet["status"] == "backdoored"
    for row in manifest["members"]:
        loaded = load_model(zoo / row["path"])  # every member is a loadable artefact; the triggers travel with it
        assert len(loaded.triggers) == (0 if row["status"] == "clean" else 1)
        assert row["clean_accuracy"] is not None and row["seconds"] > 0
    assert not (zoo / "work").exists()  # nothing left half-built
    stamps = {p: p.stat().st_mtime_ns for p in (zoo / "members").rglob("*") if p.is_file()}
    again = build_zoo(cfg, out=zoo, executor="sequential", progress=False)
    assert again.details["reused"] == 3 and again.details["built"] == 0
    assert stamps == {p: p.stat().st_mtime_ns for p in (zoo / "members").rglob("*") if p.is_file()}
    # a member whose record is gone is built again; the others are kept
    os.remove(zoo / "members" / "patch-000" / "member.json")
    third = build_zoo(cfg, out=zoo, executor="sequential", progress=False)
    assert third.details["reused"] == 2 and third.details["built"] == 1
    # another config in the same folder is refused, naming what differs
    with pytest.raises(Exception, match="other settings"):
        build_zoo(ZooConfig(**{**cfg.__dict__, "seed": 1}), out=zoo, executor="sequential", progress=False)


def test_asking_for_ray_without_it_or_an_address_without_ray_is_refused(tmp_path, make_bright_thirds, monkeypatch):
    from trojanlab.zoo import build

    cfg = _tiny(tmp_path, make_bright_thirds)
    with pytest.raises(ConfigError, match="--address joins a Ray cluster"):
        build_zoo(cfg, out=tmp_path / "z", executor="sequential", address="10.0.0.1:6379")
    monkeypatch.setattr(build, "ray_available", lambda: False)
    with pytest.raises(ConfigError, match="Ray is not installed"):
        build_zoo(cfg, out=tmp_path / "z", executor="ray")
    assert build.resolve_executor("auto", None) == "sequential"
    assert not (tmp_path / "z").exists()


def test_ray_builds_members_as_tasks_that_return_their_files(tmp_path, make_bright_thirds):
    pytest.importorskip("ray")
    cfg = _tiny(tmp_path, make_bright_thirds)
    zoo = tmp_path / "zoo"
    report = build_zoo(cfg, out=zoo, executor="ray", workers=2, progress=False)
    assert report.details["built"] == 2 and report.details["errors"] == {} and report.details["executor"] == "ray"
    rows = json.loads((zoo / "zoo.json").read_text())["members"]
    assert [r["threads"] for r in rows] == [1, 1]  # one torch thread per task
    assert sorted(r["id"] for r in rows) == ["clean-000", "patch-000"] and rows[0]["status"] == "clean"
    for row in rows:
        assert load_model(zoo / row["path"]).spec["num_classes"] == 3


def test_a_member_that_fails_is_recorded_its_dependants_wait_and_a_rerun_builds_them(
    tmp_path, make_bright_thirds, monkeypatch, capsys
):
    from trojanlab.zoo import build

    cfg = _tiny(tmp_path, make_bright_thirds, families=("trojannet",))
    zoo = tmp_path / "zoo"
    real = build.build_member

    def broken(member, *args, **kwargs):
        if member["role"] == "clean":
            raise RuntimeError("disk on fire")
        return real(member, *args, **kwargs)

    monkeypatch.setattr(build, "build_member", broken)
    report = build_zoo(cfg, out=zoo, executor="sequential", progress=False)
    assert report.details["errors"] == {"clean-000": "RuntimeError: disk on fire",
                                        "trojannet-000": "its base member clean-000 was not built"}  # fmt: skip
    rows = {r["id"]: r for r in json.loads((zoo / "zoo.json").read_text())["members"]}
    assert rows["clean-000"]["status"] == rows["trojannet-000"]["status"] == "error"
    assert not (zoo / "members").exists()
    monkeypatch.setattr(build, "build_member", real)
    again = build_zoo(cfg, out=zoo, executor="sequential", progress=False)
    assert again.details["built"] == 2 and again.details["errors"] == {}
    # a member planted in other weights than its base's current ones (the base was rebuilt) is planted again
    planted = zoo / "members" / "trojannet-000" / "member.json"
    record = json.loads(planted.read_text())
    assert record["base_weights"] and record["base"] == "clean-000"
    planted.write_text(json.dumps({**record, "base_weights": "0" * 64}))
    third = build_zoo(cfg, out=zoo, executor="sequential", progress=False)
    assert third.details["built"] == 1 and third.details["reused"] == 1


def test_a_wanet_zoo_whose_rate_leaves_no_clean_images_is_refused():
    with pytest.raises(ConfigError, match="WaNet warps twice as many"):
        ZooConfig(families=["wanet"], poison_rate=[0.1, 0.4])
    with pytest.raises(ConfigError, match="does not fit 3x3 images"):
        sample(ZooConfig(clean=1, backdoored=1, families=["trojannet"]), 10, 3, 3)


def test_a_work_folder_left_by_a_member_of_other_settings_is_emptied_and_one_of_the_same_is_kept(tmp_path):
    from trojanlab.zoo.build import ZooFolder

    cfg = ZooConfig(clean=1, backdoored=1, families=["patch"])
    members = sample(cfg, 43, 32, 32)
    zoo = ZooFolder(tmp_path, cfg, members)
    member = members[1]
    folder = tmp_path / "work" / member["id"]
    checkpoint = folder / "model" / "checkpoint" / "train.safetensors"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"epoch 3")
    assert zoo.work_for(member) == str(folder) and checkpoint.exists()  # no record yet: an older build's, kept
    assert zoo.work_for(member) == str(folder) and checkpoint.exists()  # the same settings: resumed
    changed = {**member, "attack": {**member["attack"], "alpha": 0.5}}
    zoo.work_for(changed)
    assert not checkpoint.exists() and json.loads((folder / "member.json").read_text()) == changed


def test_a_zoo_grows_when_its_counts_rise_and_keeps_what_it_built(tmp_path, make_bright_thirds):
    from trojanlab.config.base import to_dict
    from trojanlab.io import read_json, write_json
    from trojanlab.runs import fingerprint

    cfg = _tiny(tmp_path, make_bright_thirds, families=("patch",))
    zoo = tmp_path / "zoo"
    build_zoo(cfg, out=zoo, executor="sequential", progress=False)
    # a folder written when the counts were part of the identity (the rule before zoos could grow)
    record = read_json(zoo / "trojanlab-run.json")
    record["identity"]["config"]["ZooConfig"] = to_dict(cfg)
    record["fingerprint"] = fingerprint(record["identity"])
    write_json(zoo / "trojanlab-run.json", record)
    stamps = {p: p.stat().st_mtime_ns for p in (zoo / "members").rglob("*") if p.is_file()}
    bigger = ZooConfig(**{**cfg.__dict__, "backdoored": 2})
    grown = build_zoo(bigger, out=zoo, executor="sequential", progress=False)
    assert grown.details["reused"] == 2 and grown.details["built"] == 1  # patch-001 added, the rest kept
    assert stamps == {p: p.stat().st_mtime_ns for p in stamps}
    assert json.loads((zoo / "zoo.json").read_text())["members_total"] == 3
    # other sampling settings are still another zoo
    with pytest.raises(Exception, match="other settings"):
        build_zoo(ZooConfig(**{**bigger.__dict__, "asr_floor": 0.5}), out=zoo, executor="sequential", progress=False)


def test_members_named_to_build_come_with_the_clean_members_they_are_planted_into():
    from trojanlab.zoo.build import select_members

    members = sample(ZooConfig(clean=10, backdoored=24, seed=7), 43, 32, 32)
    planted = next(m for m in members if m["family"] == "trojannet")
    patch = next(m for m in members if m["family"] == "patch")
    chosen = select_members(members, [patch["id"], planted["id"]])
    assert [m["id"] for m in chosen] == [m["id"] for m in members if m["id"] in {patch["id"], planted["id"],
                                                                                 planted["base"]}]  # fmt: skip
    with pytest.raises(ConfigError, match="no member banana-000 in this zoo"):
        select_members(members, ["banana-000"])
