"""Naming the target: candidates examined again, Neural Cleanse for a patch, a universal warp for a warp."""

from __future__ import annotations

import pytest
import torch

from trojanlab.config.detection import ScanConfig, TargetConfig
from trojanlab.data import load_dataset, to_tensor
from trojanlab.detection import target as tg
from trojanlab.detection.scan import scan_model
from trojanlab.errors import ConfigError
from trojanlab.models import load_model


def _scan(folder, npz, cfg: ScanConfig):
    loaded = load_model(folder)
    test = load_dataset(npz).test
    return scan_model(loaded.module, 3, (3, 32, 32), cfg, examples=test, loaded=loaded)


def test_a_warping_backdoors_target_comes_first_by_the_universal_warp(warp_backdoor):
    found = _scan(*warp_backdoor, ScanConfig(detectors=["mmbd", "nc"]))
    check = found.detectors["target"]
    assert check["candidates"] and sorted(check["candidates"]) == [0, 1, 2]  # every label of 3 is a candidate
    warps = check["warp_success"]
    # one smooth field takes most images to the planted label and few to the others (the rule: which third is
    # bright, which a move of at most 1.5 pixels does not change)
    assert warps["2"] >= 0.5 > max(warps["0"], warps["1"])
    assert check["ranked"][0] == 2 and found.suspected_labels[0] == 2
    assert found.seconds["target"] > 0


def test_the_check_orders_labels_only_and_can_be_turned_off(small_backdoor):
    found = _scan(*small_backdoor, ScanConfig(detectors=["mmbd", "nc"]))
    check = found.detectors["target"]
    # reversed again, longer, every candidate's trigger is at most as large as the scan's short reversal found
    scan_norms = {int(k): v for k, v in found.detectors["nc"]["l1_norms"].items()}
    assert all(v <= scan_norms[int(k)] + 1e-6 for k, v in check["refined_l1_norms"].items())
    # a white square is no warp: no candidate is taken there by one (measured: at most 2 % of the images)
    assert max(check["warp_success"].values()) < 0.5
    # the statistics the probability reads are the detectors' own
    assert set(found.features) == {"mmbd_log1p_neg_log10_p", "mmbd_log1p_top_z", "nc_log1p_anomaly_index",
                                   "nc_log_norm_ratio"}  # fmt: skip
    off = _scan(*small_backdoor, ScanConfig(detectors=["mmbd", "nc"], confirm_nc=0, confirm_mmbd=0))
    assert "target" not in off.detectors and off.features == found.features
    # no MM-BD and no Neural Cleanse candidates: no label to examine, no check
    alone = _scan(*small_backdoor, ScanConfig(detectors=["nc"], confirm_nc=0))
    assert "target" not in alone.detectors
    assert off.suspected_labels[0] == off.detectors["nc"]["smallest_norm_label"]


def test_a_label_the_warp_reaches_comes_first_then_the_smallest_norms():
    refined = {3: 40.0, 7: 12.0, 9: 25.0, 11: 60.0}
    assert tg.rank(refined, {3: 0.1, 7: 0.0, 9: 0.2, 11: 0.05}, 0.5) == [7, 9, 3, 11]  # no warp: by norm
    # a warp that reaches a label outranks any norm; of two, the larger share first
    assert tg.rank(refined, {3: 0.1, 7: 0.0, 9: 0.2, 11: 0.9}, 0.5) == [11, 7, 9, 3]
    assert tg.rank(refined, {3: 0.6, 7: 0.0, 9: 0.2, 11: 0.9}, 0.5) == [11, 3, 7, 9]
    assert tg.rank(refined, {3: 0.6, 7: 0.0, 9: 0.2, 11: 0.9}, 0.95) == [7, 9, 3, 11]


def test_candidates_are_the_smallest_norms_then_the_largest_margins_each_once():
    norms = {0: 50.0, 1: 10.0, 2: 30.0, 3: 20.0, 4: 90.0}
    margins = {0: 1.0, 1: 9.0, 2: 2.0, 3: 3.0, 4: 8.0}
    cfg = TargetConfig(nc_candidates=2, mmbd_candidates=2)
    assert tg.candidates(norms, margins, cfg) == [1, 3, 4]  # 1 is both a small norm and a large margin
    assert tg.candidates(norms, None, cfg) == [1, 3]
    assert tg.candidates(norms, margins, TargetConfig(nc_candidates=0, mmbd_candidates=1)) == [1]


def test_the_universal_warp_leaves_the_model_as_it_was(small_backdoor):
    model, npz = small_backdoor
    module = load_model(model).module.train()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    test = load_dataset(npz).test
    x, y = to_tensor(test.x[:16]), torch.as_tensor(test.y[:16]).long()
    success = tg.universal_warp_success(module, x, y, [0, 2], TargetConfig(warp_steps=3))
    assert set(success) == {0, 2} and all(0 <= v <= 1 for v in success.values())
    assert module.training  # its mode given back
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"warp_grid": 1}, "warp_grid"),
        ({"warp_bound": 0.0}, "warp_bound"),
        ({"warp_success": 0.0}, "warp_success"),
        ({"nc_candidates": -1}, "nc_candidates"),
        ({"refine_steps": 0}, "refine_steps"),
    ],
)
def test_bad_target_settings_are_refused(settings, named):
    with pytest.raises(ConfigError, match=named):
        TargetConfig(**settings)


def test_the_scan_refuses_a_negative_candidate_count():
    with pytest.raises(ConfigError, match="mmbd_candidates"):
        ScanConfig(confirm_mmbd=-1)
