"""The config dataclasses: one home for every default, validated at construction with messages naming the field."""

from __future__ import annotations

import dataclasses

import pytest

from trojanlab import config as cfg
from trojanlab.errors import ConfigError
from trojanlab.reproduce import load_config
from trojanlab.reproduce.pipeline import SECTIONS, section_keys


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: cfg.TrainConfig(lr=float("nan")), "TrainConfig.lr"),
        (lambda: cfg.TrainConfig(epochs=0), "TrainConfig.epochs"),
        (lambda: cfg.ANPConfig(momentum=1.0), "ANPConfig.momentum"),
        (lambda: cfg.PruneRule(prune="fraction"), "--prune-value"),
        (lambda: cfg.DefenderConfig(clean_fraction=1.0), "DefenderConfig.clean_fraction"),
        (lambda: cfg.NCConfig(profile="slow"), "NCConfig.profile"),
        (lambda: cfg.BadNetsConfig(targets=[]), "BadNetsConfig.targets"),
        (lambda: cfg.TrojanNetInjectConfig(), "--all-labels"),
        (lambda: cfg.FinePruningConfig(fine_tune_lr=0), "FinePruningConfig.fine_tune_lr"),
        (lambda: cfg.ModelConfig(split="80/20"), "--split"),
    ],
)
def test_a_bad_setting_is_refused_naming_it(build, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        build()


def test_the_nc_profile_fills_only_what_was_left_out():
    fast, official = cfg.NCConfig(), cfg.NCConfig(profile="official", steps=7)
    assert (fast.steps, fast.batch_size, fast.early_stop_patience) == (120, 16, 10)
    assert (official.steps, official.batch_size, official.batches_per_step) == (7, 32, 31)


def test_the_config_modules_do_not_import_torch():
    import subprocess
    import sys

    code = "import sys, trojanlab.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("profile", ["full", "quick"])
def test_profile_sections_hold_only_fields_and_restate_no_default(profile):
    """Each profile section's keys are fields of its config classes, and no value repeats the class default (a
    default is stated once, in the dataclass)."""
    config = load_config(profile)
    checked = 0
    for path, (classes, _own) in SECTIONS.items():
        node = config
        for part in path.split("."):
            node = node[part]
        assert set(node) <= section_keys(path), path
        if profile == "quick":
            continue  # the quick profile's values are over the full one's, not over the defaults
        for key, value in node.items():
            for cls in classes:
                field = {f.name: f for f in dataclasses.fields(cls)}.get(key)
                if field is None:
                    continue
                default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
                default = list(default) if isinstance(default, tuple) else default
                assert value != default, f"{path}.{key} restates {cls.__name__}'s default {default!r}"
                checked += 1
    assert profile == "quick" or checked >= 10
