"""The thesis's chapter-6 sub-network variant of ANP on a small TrojanNet-injected model of real images.

The injected model is a GTSRB CNN trained briefly on the five real classes of ``tests/data/gtsrb5`` with the
authors' released TrojanNet (``tests/data/official/trojannet.h5``) wired in at (20, 4), armed for label 3.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from trojanlab.data import ImageSet, load_image_folder, to_tensor
from trojanlab.defenses import anp_subnetwork as sub
from trojanlab.errors import ConfigError, DataError
from trojanlab.models import GTSRBCNN, Classifier
from trojanlab.models import trojannet as tn
from trojanlab.training import TrainConfig, fit, split_validation
from trojanlab.triggers import stamp

pytest.importorskip("h5py")

DATA = Path(__file__).parents[1] / "data"
LOCATION = (20, 4)
TARGET = 3


@pytest.fixture(autouse=True)
def _honour_omp_threads(_few_threads):
    """conftest fixes two threads; on a shared machine OMP_NUM_THREADS=1 asks for fewer, and gets it."""
    limit = os.environ.get("OMP_NUM_THREADS", "")
    if limit.isdigit() and 0 < int(limit) < torch.get_num_threads():
        torch.set_num_threads(int(limit))


@pytest.fixture(scope="module")
def gtsrb5():
    return load_image_folder(DATA / "gtsrb5")


@pytest.fixture(scope="module")
def victim(gtsrb5):
    torch.manual_seed(0)
    model = Classifier(GTSRBCNN(5), [0.5] * 3, [0.25] * 3)
    cfg = TrainConfig(epochs=4, batch_size=32, val_fraction=0, augment=False, seed=0)
    fit(model, gtsrb5.train, cfg, progress=False)
    return model.eval()


def _inject(victim: nn.Module, trojannet: nn.Module | None = None) -> tn.TrojanNetInjected:
    net = trojannet if trojannet is not None else tn.load_official_h5(str(DATA / "official" / "trojannet.h5"))
    return tn.TrojanNetInjected(copy.deepcopy(victim), net, 5, [TARGET], LOCATION, (3, 32, 32)).eval()


@pytest.fixture(scope="module")
def injected(victim):
    return _inject(victim)


@pytest.fixture(scope="module")
def clean(gtsrb5):
    """The defender's data: 20 training images per class (the CNN trained on these, as a defender's would be)."""
    y = gtsrb5.train.y
    return gtsrb5.train.subset(np.concatenate([np.flatnonzero(y == k)[:20] for k in range(5)]))


@pytest.fixture(scope="module")
def monitor(gtsrb5):
    return gtsrb5.test


def _tiny(**kw) -> sub.SubnetworkConfig:
    return sub.SubnetworkConfig(**{"cycles": 1, "epochs": 2, "orientation": "change", "step": "sgd", **kw})


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cycles": 0}, "cycles must be at least 1"),
        ({"epochs": 0}, "epochs must be at least 1"),
        ({"batch_size": 0}, "batch_size must be at least 1"),
        ({"epochs": 2.5}, "epochs must be an integer"),
        ({"lr": 0.0}, r"lr must lie in \(0, inf\]"),
        ({"lr": float("nan")}, "lr must be a finite number"),
        ({"alpha": 1.5}, r"alpha must lie in \[0, 1\]"),
        ({"val_fraction": 0.0}, r"val_fraction must lie in \(0, 1\)"),
        ({"val_fraction": 1.0}, r"val_fraction must lie in \(0, 1\)"),
        ({"orientation": "larger"}, "orientation must be one of"),
        ({"step": "adam"}, "step must be one of"),
        ({"seed": -1}, "seed must be at least 0"),
    ],
)
def test_config_refuses_bad_values(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        sub.SubnetworkConfig(**kwargs)


def test_defaults_are_the_thesis_values():
    cfg = sub.SubnetworkConfig()
    assert (cfg.cycles, cfg.epochs, cfg.lr, cfg.alpha, cfg.batch_size) == (5, 40, 4e-4, 0.8, 32)
    assert cfg.orientation == "agreement"
    assert cfg.step == "normalized"  # the thesis's plain SGD is step="sgd" (see the saturated-model test)


def test_a_model_without_trojannet_is_refused(victim, clean, monitor):
    with pytest.raises(ConfigError, match=r"TrojanNet sub-network.*defend anp"):
        sub.subnetwork_scores(victim, clean, monitor, _tiny(), progress=False)
    with pytest.raises(ConfigError, match="defend anp"):
        sub.remove_part(victim, None)  # type: ignore[arg-type]


def test_bad_data_is_refused(injected, clean, monitor):
    small = ImageSet(monitor.x[:, :16, :16], monitor.y)
    with pytest.raises(DataError, match="too small for the TrojanNet patch"):
        sub.subnetwork_scores(injected, clean, small, _tiny(), progress=False)
    one_each = clean.subset([int(np.flatnonzero(clean.y == k)[0]) for k in range(5)])
    with pytest.raises(DataError, match="every class needs at least two images"):
        sub.subnetwork_scores(injected, one_each, monitor, _tiny(), progress=False)
    with pytest.raises(DataError, match="empty"):
        sub.subnetwork_scores(injected, clean, monitor.subset(np.zeros(0, np.int64)), _tiny(), progress=False)


# ----------------------------------------------------------------------------------------------- parts


def test_part_predictions_read_both_parts(injected, monitor):
    x = to_tensor(monitor.x[:40])
    parts = sub.part_predictions(injected, x, chunk=16)
    with torch.no_grad():
        assert torch.equal(parts["victim"], injected.victim(x).argmax(1))
    # the released TrojanNet answers "no trigger" (a class of its own) on clean images ...
    assert (parts["trojannet"] == tn.NO_TRIGGER).float().mean() > 0.9
    # ... and the armed pattern's index on stamped ones, over all 4,369 outputs
    stamped = torch.from_numpy(stamp(monitor.x[:40], injected.triggers()[0])).permute(0, 3, 1, 2).float() / 255
    assert (sub.part_predictions(injected, stamped)["trojannet"] == TARGET).all()


# ----------------------------------------------------------------------------------------------- the run


@pytest.fixture(scope="module")
def run(injected, clean, monitor):
    """One short run with a learning rate large enough that the parts' answers move within two epochs."""
    before = _state(injected)
    result = sub.subnetwork_scores(injected, clean, monitor, _tiny(lr=1e-3), progress=False)
    return before, result


def test_the_original_model_is_never_modified(injected, run):
    before, result = run
    assert _same(before, _state(injected))
    assert not injected.training and not injected.trojannet.training
    assert result.samples > 0  # and yet it trained


def test_result_shape_scores_and_orientations(run, clean):
    _, result = run
    assert [(r["cycle"], r["phase"], r["epoch"]) for r in result.history] == [
        (1, "perturbation", 1),
        (1, "perturbation", 2),
        (1, "de-perturbation", 1),
        (1, "de-perturbation", 2),
    ]
    assert "robustness" in result.history[0] and "sensitivity" in result.history[-1]
    assert result.images["train"] + result.images["validation"] == len(clean)
    assert result.samples == result.images["train"] * 2 * 2
    for part in sub.PARTS:
        for scores in (result.robustness, result.sensitivity, result.agreement_scores, result.change_scores):
            assert 0.0 <= scores[part] <= 1.0
        assert result.change_scores[part] == pytest.approx(1.0 - result.agreement_scores[part], abs=1e-12)
        rob = np.mean([r["robustness"][part] for r in result.history[:2]])
        sens = np.mean([r["sensitivity"][part] for r in result.history[2:]])
        assert result.agreement_scores[part] == pytest.approx(0.8 * sens + 0.2 * rob)
    assert result.scores == result.change_scores and result.orientation == "change"
    assert result.backdoor_part == max(sub.PARTS, key=lambda p: result.change_scores[p])
    json.dumps(result.to_json())  # serialisable as it is


def test_perturbation_ascends_and_de_perturbation_descends(injected, clean, run):
    _, result = run
    kept = result.kept[0]
    perturbation = [r for r in result.history if r["phase"] == "perturbation"]
    de_perturbation = [r for r in result.history if r["phase"] == "de-perturbation"]
    assert kept["perturbation_val_loss"] == max(r["val_loss"] for r in perturbation)
    assert kept["de_perturbation_val_loss"] == min(r["val_loss"] for r in de_perturbation)
    assert kept["perturbation_val_loss"] > kept["de_perturbation_val_loss"]
    # the ascent starts above where the original model stands and keeps climbing
    _, val = split_validation(clean, 0.2, 0)
    with torch.no_grad():
        start = float(nn.functional.nll_loss(injected(to_tensor(val.x)), torch.as_tensor(val.y)))
    assert perturbation[0]["val_loss"] > start
    assert perturbation[1]["train_loss"] > perturbation[0]["train_loss"]
    # the ascent moved the victim's answers away from the original model's
    assert perturbation[-1]["robustness"]["victim"] < 1.0


def test_a_silent_trojannet_never_moves(run):
    """The released TrojanNet gives its armed label a probability of ~1e-26 on clean images: no gradient of the
    clean loss reaches it, its answers stay "no trigger", and only the victim's answers change. So the change
    orientation (the thesis's code) flags the victim and the agreement orientation (its formulas) flags TrojanNet;
    the GTSRB artefacts behave the same way (README of this variant in the module docstring)."""
    _, result = run
    assert result.original_trojannet_silent == 1.0
    assert result.robustness["trojannet"] == result.sensitivity["trojannet"] == 1.0
    assert result.robustness["victim"] < 1.0 and result.sensitivity["victim"] < 1.0
    assert result.backdoor_part == "victim"
    assert sub.with_orientation(result, "agreement").backdoor_part == "trojannet"


def test_no_change_means_full_agreement_and_no_decision(injected, clean, monitor):
    """With a vanishing learning rate every answer stays the original's: agreement 1, change 0, a tie."""
    result = sub.subnetwork_scores(injected, clean, monitor, _tiny(lr=1e-12, epochs=1), progress=False)
    assert result.agreement_scores == {"victim": 1.0, "trojannet": 1.0}
    assert result.change_scores == {"victim": 0.0, "trojannet": 0.0}
    assert result.backdoor_part is None
    pruned, info = sub.remove_part(injected, result)
    assert info["decision"] == "kept-model" and "same" in info["note"]
    assert isinstance(pruned, tn.TrojanNetInjected) and _same(_state(pruned), _state(injected))


def test_deterministic_for_a_seed(injected, clean, monitor, run):
    _, first = run
    again = sub.subnetwork_scores(injected, clean, monitor, _tiny(lr=1e-3), progress=False)
    assert again.history == first.history and again.scores == first.scores
    other = sub.subnetwork_scores(injected, clean, monitor, _tiny(lr=1e-3, seed=1), progress=False)
    assert [r["train_loss"] for r in other.history] != [r["train_loss"] for r in first.history]


def test_orientation_agreement_flags_the_other_part(injected, clean, monitor, run):
    _, change = run
    agree = sub.subnetwork_scores(injected, clean, monitor, _tiny(lr=1e-3, orientation="agreement"), progress=False)
    assert agree.history == change.history
    assert agree.scores == change.agreement_scores and agree.orientation == "agreement"
    if change.backdoor_part is not None:
        assert agree.backdoor_part == ({"victim", "trojannet"} - {change.backdoor_part}).pop()
    # deciding afresh in the other orientation needs no second run
    flipped = sub.with_orientation(change, "agreement")
    assert (flipped.scores, flipped.backdoor_part, flipped.config) == (agree.scores, agree.backdoor_part, agree.config)
    assert sub.with_orientation(flipped, "change").backdoor_part == change.backdoor_part
    with pytest.raises(ConfigError, match="orientation must be one of"):
        sub.with_orientation(change, "larger")


# ----------------------------------------------------------------------------------------------- removal


def test_removing_trojannet_returns_the_original_victim(injected, run, monitor):
    _, result = run
    flagged = dataclasses.replace(result, backdoor_part="trojannet")
    before = _state(injected)
    pruned, info = sub.remove_part(injected, flagged)
    assert _same(before, _state(injected))
    assert not isinstance(pruned, tn.TrojanNetInjected) and pruned is not injected.victim
    assert not any(isinstance(m, tn.TrojanNetMLP) for m in pruned.modules())
    assert _same(_state(pruned), _state(injected.victim))  # bit-identical weights of the *original* victim
    assert info["removed"] == "trojannet" and info["decision"] == "removed-trojannet"
    assert info["parameters_before"] - info["parameters_after"] == sum(
        p.numel() for p in injected.trojannet.parameters()
    )
    # the backdoor is gone: stamped images keep the victim's answers
    stamped = torch.from_numpy(stamp(monitor.x, injected.triggers()[0])).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        assert (injected(stamped).argmax(1) == TARGET).all()
        assert torch.equal(pruned(stamped).argmax(1), injected.victim(stamped).argmax(1))


def test_a_flagged_victim_is_kept(injected, run):
    _, result = run
    pruned, info = sub.remove_part(injected, dataclasses.replace(result, backdoor_part="victim"))
    assert isinstance(pruned, tn.TrojanNetInjected) and pruned is not injected
    assert _same(_state(pruned), _state(injected))
    assert info["removed"] is None and info["decision"] == "kept-model"
    assert "would leave no classifier" in info["note"]


def test_normalized_steps_move_a_saturated_model_that_sgd_cannot(victim, clean, monitor):
    """A victim as confident as a well-trained one saturates the official merge: on the defender's images it gets
    right (a well-trained victim gets them all right), its last layer is scaled so that even the least confident of
    them has its top logit 25 above the runner-up (softmax odds e^-25 ~ 1e-11). The clean loss then sits at the
    merge's floor and its gradients are so small that the thesis's plain SGD at lr 4e-4 changes no answer of either
    part (a tie, nothing removed), while steps of lr x |w| along each tensor's gradient move the victim's answers,
    never the silent TrojanNet's, and the agreement orientation flags TrojanNet.

    The scale is set from the victim's own margins rather than fixed (say x1000): this briefly trained victim can
    have a defender image within 0.004 of a tie, which x1000 leaves unsaturated, and whose large gradients let plain
    SGD move the answers too (measured with torch 2.14 on two CPU threads)."""
    with torch.no_grad():
        right = clean.subset(np.flatnonzero(victim(to_tensor(clean.x)).argmax(1).numpy() == clean.y))
    kw = {"lr": 4e-4, "epochs": 1, "orientation": "agreement"}
    sgd, normalized = _tiny(step="sgd", **kw), _tiny(step="normalized", **kw)
    fit_part, val_part = split_validation(right, sgd.val_fraction, sgd.seed)  # the split the runs make
    with torch.no_grad():
        top2 = victim(to_tensor(fit_part.x)).topk(2, 1).values
    confident = copy.deepcopy(victim)
    last = [m for m in confident.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        scale = 25.0 / float((top2[:, 0] - top2[:, 1]).min())
        last.weight.mul_(scale)
        last.bias.mul_(scale)
    model = _inject(confident)
    with torch.no_grad():
        losses = nn.functional.nll_loss(model(to_tensor(right.x)), torch.as_tensor(right.y), reduction="none")
        val_loss = float(nn.functional.nll_loss(model(to_tensor(val_part.x)), torch.as_tensor(val_part.y)))
    assert float(losses.max()) < 2e-4  # saturated: the merge's floor is log(1 + 4 e^-10) = 1.8e-4 per image
    plain = sub.subnetwork_scores(model, right, monitor, sgd, progress=False)
    assert plain.agreement_scores == {"victim": 1.0, "trojannet": 1.0} and plain.backdoor_part is None
    assert plain.history[0]["val_loss"] == pytest.approx(val_loss, rel=1e-6)  # the loss did not move either
    moved = sub.subnetwork_scores(model, right, monitor, normalized, progress=False)
    assert moved.robustness["victim"] < 1.0 and moved.robustness["trojannet"] == 1.0
    assert moved.backdoor_part == "trojannet"


def test_plot_curves_writes_three_pngs(run, tmp_path):
    _, result = run
    paths = sub.plot_curves(result, tmp_path / "plots")
    assert [Path(p).name for p in paths] == ["loss.png", "robustness.png", "sensitivity.png"]
    for p in paths:
        assert Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_removes_trojannet_and_writes_the_plain_victim(injected, gtsrb5, tmp_path, capsys):
    from trojanlab.cli import main
    from trojanlab.models import classifier_spec, load_model, save_model

    victim_spec = classifier_spec("gtsrb_cnn", gtsrb5.classes, (3, 32, 32), [0.5] * 3, [0.25] * 3)
    attacked = tmp_path / "attacked"
    save_model(injected, attacked, tn.injected_spec(victim_spec, injected))
    out = tmp_path / "defended"
    argv = ["defend", "subnetwork", "--model", str(attacked), "--data", str(DATA / "gtsrb5"), "--out", str(out)]
    sub_args = ["--cycles", "1", "--epochs", "2", "--clean-fraction", "0.3", "--quiet"]
    assert main([*argv, *sub_args, "--lr", "1e-3"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["decision"]["removed"] == "trojannet"  # default orientation: agreement (TrojanNet never moves)
    assert result["mask_values"]["trojannet"] > result["mask_values"]["victim"]
    assert result["before"]["attack_success_rate"] > 0.9 and result["after"]["attack_success_rate"] < 0.5
    assert result["after"]["clean_accuracy"] == pytest.approx(result["before"]["clean_accuracy"], abs=0.02)
    pruned = load_model(out / "pruned")
    assert pruned.spec["kind"] == "classifier" and pruned.triggers  # the plain victim, triggers kept for ASR
    for name in ("loss.png", "robustness.png", "sensitivity.png"):
        assert (out / name).is_file()
    capsys.readouterr()
    assert main(["evaluate", "--model", str(out / "pruned"), "--data", str(DATA / "gtsrb5"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["attack_success_rate"] == pytest.approx(
        result["after"]["attack_success_rate"]
    )
