"""The command line is built from the config dataclasses: every parser default is the dataclass's."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from trojanlab import config as cfg
from trojanlab.cli import build_parser
from trojanlab.cli.options import config_from
from trojanlab.config.attacks import BADNETS_TRAINING
from trojanlab.defenses import DEFENSES


def _subparsers(parser: argparse.ArgumentParser, prefix=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _subparsers(sub, (*prefix, name))
    if prefix:
        yield prefix, parser


COMMANDS = dict(_subparsers(build_parser()))
CLASSES = {c.__name__: c for c in vars(cfg).values() if isinstance(c, type) and dataclasses.is_dataclass(c)}
GROUPS = {"model": cfg.ModelConfig, "train": cfg.TrainConfig, "transfer": cfg.TransferConfig,
          "trojannet": cfg.TrojanNetTrainConfig, "inject": cfg.TrojanNetInjectConfig, "badnets": cfg.BadNetsConfig,
          "blended": cfg.BlendedConfig, "wanet": cfg.WaNetConfig,
          "trojannn": cfg.TrojanNNConfig, "nc": cfg.NCConfig, "defender": cfg.DefenderConfig, "mmbd": cfg.MMBDConfig,
          "structure": cfg.StructureConfig, "scan": cfg.ScanConfig, "mntd": cfg.MNTDScoreConfig, **CLASSES}  # fmt: skip


def _expected(command: tuple[str, ...], group: str, name: str):
    """The default a dataclass states for ``group.name`` in ``command`` (a registry or attack may replace an
    instance's defaults: those are stated once too, beside the method)."""
    if command in (("attack", "badnets"), ("attack", "blended"), ("attack", "wanet")) and group == "train":
        return getattr(BADNETS_TRAINING, name)
    if command[0] == "defend" and group == "defender":
        return getattr(DEFENSES[command[1]].defender, name)
    field = {f.name: f for f in dataclasses.fields(GROUPS[group])}[name]
    return field.default if field.default is not dataclasses.MISSING else field.default_factory()


def test_every_command_of_the_tree_exists():
    assert {("defend", m) for m in ("anp", "subnetwork", "nc-guided", "nc-unlearn", "nc-prune", "fine-pruning")} <= set(
        COMMANDS
    )
    attacks = {("attack", m) for m in ("badnets", "blended", "trojannn", "trojannet")}
    assert attacks | {("detect", d) for d in ("nc", "mmbd", "structure", "mntd")} | {("scan",)} <= set(COMMANDS)


def test_every_parser_default_is_the_dataclass_default():
    checked = 0
    for command, parser in COMMANDS.items():
        for action in parser._actions:
            if "." not in action.dest:
                continue
            group, name = action.dest.split(".", 1)
            assert action.default == _expected(command, group, name), f"{' '.join(command)} {action.option_strings}"
            checked += 1
    assert checked > 100


def test_every_cli_field_has_an_option_and_help():
    for command, parser in COMMANDS.items():
        dests = {a.dest: a for a in parser._actions}
        for dest, action in dests.items():
            if "." in dest:
                assert action.help, f"{' '.join(command)} {action.option_strings} has no help"
    defend = dict(COMMANDS)[("defend", "anp")]
    dests = {a.dest for a in defend._actions}
    for cls in (cfg.ANPConfig, cfg.PruneRule, cfg.DefenderConfig):
        for f in dataclasses.fields(cls):
            if f.metadata.get("cli", True):
                assert f"{cls.__name__ if cls is not cfg.DefenderConfig else 'defender'}.{f.name}" in dests


def test_options_become_the_config_the_library_takes():
    args = build_parser().parse_args(
        [
            "defend",
            "anp",
            "--model",
            "m",
            "--out",
            "o",
            "--eps",
            "0.3",
            "--no-augment",
            "--prune",
            "fraction",
            "--prune-value",
            "0.1",
            "--seed",
            "4",
        ]  # fmt: skip
    )
    anp = config_from(args, cfg.ANPConfig, "ANPConfig", seed=args.seed)
    rule = config_from(args, cfg.PruneRule, "PruneRule")
    assert anp == cfg.ANPConfig(eps=0.3, augment=False, seed=4)
    assert rule == cfg.PruneRule(prune="fraction", value=0.1)
    args = build_parser().parse_args(["attack", "badnets", "--out", "o", "--location", "3", "5", "--target", "1", "2"])
    badnets = config_from(args, cfg.BadNetsConfig, "badnets")
    assert badnets.location == (3, 5) and badnets.targets == [1, 2]
    # a tuple of any length (nargs "+"), not a pair
    args = build_parser().parse_args(["defend", "warp-unlearn", "--model", "m", "--out", "o", "--grid-sizes", "4", "8",
                                      "16", "--strength", "3"])  # fmt: skip
    warps = config_from(args, cfg.WarpUnlearnConfig, "WarpUnlearnConfig")
    assert warps == cfg.WarpUnlearnConfig(grid_sizes=(4, 8, 16), strength=3.0)


@pytest.mark.parametrize("command", [("defend", "anp"), ("train",), ("detect", "nc")])
def test_help_shows_the_defaults(command, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([*command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    if command == ("defend", "anp"):
        assert "(default: 2000)" in text and "(default: 0.01)" in text
    if command == ("train",):
        assert "(default: 20)" in text and "(default: gtsrb_cnn)" in text
    if command == ("detect", "nc"):
        assert "(default: 2.0)" in text


def test_a_bad_value_is_named_by_its_option(tmp_path, capsys):
    from trojanlab.cli import main

    out = tmp_path / "x"
    assert main(["defend", "anp", "--model", str(tmp_path), "--out", str(out), "--anp-steps", "0"]) == 2
    assert capsys.readouterr().err.strip() == "trojanlab: error: --anp-steps must be at least 1, got 0"
    assert main(["train", "--out", str(out), "--lr", "nan"]) == 2
    assert "--lr must be a finite number" in capsys.readouterr().err
    assert not out.exists()  # refused before any folder is made
