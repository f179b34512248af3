"""``defend auto``: scan the model, then repair it by what the scan found -- reading only the defender's clean
images and the scan's outputs, never the planted trigger or a test figure.

The rule, in order:

1. **Scan** (:func:`~trojanlab.detection.scan.scan_model`: structure check, MM-BD, Neural Cleanse on the defender's
   ``fit`` images -- jittered as the held-out measure is where the model fitted them, since the calibration was
   fitted on scans of unseen images --, the shipped calibration). Below ``threshold``, **random smooth warps are
   unlearnt** (:mod:`~trojanlab.defenses.warp_unlearning`, ``warp_strength``; a warping trigger paints no pixel for
   Neural Cleanse to reverse, and the zoo's WaNet members scan at 0.1-0.2), kept within ``quiet_tolerance`` of
   held-out accuracy (half the usual tolerance; 0: the model is returned unchanged). Where that step is undone (or
   off), **I-BAU** runs instead, the model left as it was after its last round within the same budget: the scan
   misses some backdoors, while on the zoo's clean members all five rounds of I-BAU read 4-5 points of held-out
   accuracy -- a defense costs a model that had no backdoor accuracy. I-BAU does not follow a kept warp step
   (``quiet_ibau`` makes it): on the zoo's wanet-000 its rounds brought the warp back (ASR 1.3 -> 6.6 %).
2. **A branch merged into the output** (the structure check: how TrojanNet enters a model): where the model is a
   trojanlab TrojanNet-injected artefact, the branch and the merge are cut and the victim kept (the sub-network
   variant's result, without its search); otherwise said so, and step 3 runs.
3. **Unlearning the reversed trigger** of the scan's first ``labels`` suspected labels that Neural Cleanse reversed
   (Neural Cleanse's own mitigation: fine-tune on the defender's images, ``stamp_fraction`` of them stamped and kept
   at their true label). The trigger unlearnt is reversed again for that label alone, ``refine_steps`` steps on the
   defender's images as they are: the scan's reversal is short and reads jittered images, and its trigger is loose
   (the zoo's badnets-001: L1 norm 51, spread over the image; reversed again: 8.6, on the real square's corner).
   Where that trigger is patch-sized (its core grown by a pixel covers at most ``region_area`` of the image),
   ``stamp_fraction`` of each batch also gets its region filled with the pattern that pulls that image hardest
   towards the label (:func:`~trojanlab.defenses.nc_mitigation.region_adversarial_loss`): Neural Cleanse reverses
   the smallest part of a patch that flips the model, not the patch, and unlearning that part alone can leave the
   rest working. Then the same attack is read on the held-out images
   (:func:`~trojanlab.defenses.nc_mitigation.region_attack_success`): while it takes more than ``region_success`` of
   them to the label, another round, up to ``unlearn_rounds``. Once it does not, Neural Cleanse runs again for the
   label alone, as the scan ran it: where it finds no small trigger either (median norm over its norm below
   ``clean_norm_ratio``), the backdoor counts as gone and I-BAU is not run (on badnets-001 its rounds brought the
   removed square back: ASR 1.0 -> 13.1 %); where it still does, the trigger was not a patch alone and I-BAU runs (a
   blend reversed as a blob: the zoo's blended-003, its 54-pixel region cleared, kept 3.9 % ASR). Without a patch
   region, rounds are repeated while Neural Cleanse, run again for that label alone as the scan ran it, still finds
   a small trigger (median norm over its norm >= ``clean_norm_ratio``; the zoo's clean members have a mean ratio of
   1.49 for their smallest label), up to ``unlearn_rounds`` times; then **I-BAU** where ``ibau`` is set (it needs no
   label and reaches what the reversed trigger missed).
4. **Each unlearning step and I-BAU are kept only as far as the defender's held-out measure allows**
   (:mod:`~trojanlab.defenses.heldout`: checked against the model's stated clean accuracy; the branch cut is
   structural and always kept): the held-out accuracy must stay within ``tolerance`` of the model's as given -- one
   budget for the whole repair, not one per step. An unlearning step over it is undone and tried once more at
   ``backoff`` times its learning rate, and undone for good if that too costs more. I-BAU is read after every round
   and the model is left as it was after the last round within the budget (all rounds run: on the zoo's wanet-003
   the first round read more than the quiet tolerance, all five together 0.9 points and ASR 98 -> 15 %); only where
   no round is within it is I-BAU undone and tried again gentler. The held-out images are read after every round to
   choose the round, so the drop they predict is slightly optimistic. Each step's held-out accuracy and the reversed
   trigger's success on held-out images (before and after) are reported: the rule's predicted cost beside the
   measured one.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from typing import Any

import numpy as np

from ..config.defenses import AutoConfig, IBAUConfig
from ..config.detection import ScanConfig
from ..config.training import TrainConfig
from ..detection import neural_cleanse as nc
from ..detection import run as detection_run
from ..detection.scan import scan_model
from ..evaluation import attack_success_rate
from ..models.trojannet import TrojanNetInjected
from . import ibau
from .base import DefenseContext, DefenseOutcome
from .nc_mitigation import region_attack_success, trigger_region, unlearn
from .warp_unlearning import unlearn_warps


def auto_defense(ctx: DefenseContext, cfg: AutoConfig) -> DefenseOutcome:
    """The rule of this module on ``ctx.model``; ``details`` record the scan, every step, why, and whether kept."""
    began = time.perf_counter()
    model = ctx.model
    _, height, width, channels = ctx.fit.x.shape
    shape = tuple(int(v) for v in ctx.loaded.spec.get("input_size", (channels, height, width)))
    scan_cfg = ScanConfig(seed=cfg.seed)
    scanned = ctx.measure.like_measure(ctx.fit, cfg.seed) if cfg.scan_like_measure else ctx.fit
    scan = scan_model(model, ctx.num_classes, shape, scan_cfg, examples=scanned,
                      calibration=detection_run.default_calibrations(), loaded=ctx.loaded, device=ctx.device,
                      progress=ctx.progress)  # fmt: skip
    record: dict[str, Any] = {"scan": {"probability": scan.probability, "suspected_labels": scan.suspected_labels,
                                       "features": scan.features, "seconds": scan.seconds,
                                       "images": "the defender's fitting images" + (
                                           f", jittered at strength {ctx.measure.strength:.2f} as the held-out "
                                           "measure" if scanned is not ctx.fit else "")}, "steps": []}  # fmt: skip
    held = ctx.held_out(model)
    record["holdout_accuracy_before"] = held
    if scan.probability is None or scan.probability < cfg.threshold:
        if not cfg.quiet_tolerance:
            record["decision"] = (f"the scan's probability {scan.probability} is below {cfg.threshold}: the model is "
                                  "returned unchanged")  # fmt: skip
            return _finish(model, record, began, held, nothing="nothing: the scan found no backdoor")
        then = "then I-BAU" if cfg.quiet_ibau else "I-BAU where that step is undone"
        record["decision"] = (f"the scan's probability {scan.probability} is below {cfg.threshold}: "
                              + (f"random warps unlearnt, {then}" if cfg.warp_strength else "I-BAU") + ", kept only "
                              f"as far as they cost at most {100 * cfg.quiet_tolerance:g} held-out points together (a "
                              "scan misses some triggers, warps above all; a model without a backdoor pays more for "
                              "it)")  # fmt: skip
        warped = _warp_step(model, ctx, cfg, _scales(cfg), record) if cfg.warp_strength else None
        held = held if warped is None else warped
        if warped is not None and not cfg.quiet_ibau:
            record["steps"].append({"step": "I-BAU", "kept": False, "why": "not run: the warp unlearning was kept, "
                                    "and I-BAU's rounds can bring a warp back (the zoo's wanet-000: ASR 1.3 -> 6.6 %)"})  # fmt: skip
        else:
            held = _ibau_step(
                model,
                ctx,
                cfg,
                held,
                cfg.quiet_tolerance,
                (1.0,),
                record,
                "the scan found no backdoor, yet it misses some (warping triggers); I-BAU needs no label",
            )
        return _finish(model, record, began, held)

    spec = None
    structure = scan.detectors.get("structure", {})
    if structure.get("suspicious"):
        if isinstance(model, TrojanNetInjected):
            model = copy.deepcopy(model.victim).eval()
            spec = dict(ctx.loaded.spec["victim"])
            spec["triggers"] = ctx.loaded.spec.get("triggers", [])
            after = ctx.held_out(model)
            record["steps"].append({"step": "cut the branch", "why": "the structure check found a branch reading a "
                                    f"small input window merged into the output (label {structure.get('window_target')})",
                                    "holdout_accuracy": after, "kept": True})  # fmt: skip
            held = after
        else:
            record["steps"].append({"step": "cut the branch", "kept": False,
                                    "why": "a branch was found, but the model is no trojanlab TrojanNet artefact: "
                                           "its parts cannot be told apart here; unlearning instead"})  # fmt: skip
    if not record["steps"] or not record["steps"][-1]["kept"]:
        reversed_labels = [label for label in scan.suspected_labels if scan.nc is not None and label in scan.nc.labels]
        labels = reversed_labels[: cfg.labels]
        median_norm = float(np.median(scan.nc.l1_norms))
        pick = np.arange(len(scanned))
        if len(scanned) > scan_cfg.nc_images:
            pick = np.sort(np.random.default_rng(cfg.seed).choice(len(scanned), scan_cfg.nc_images, replace=False))
        nc_data, plain = scanned.subset(pick), ctx.fit.subset(pick)
        scales = _scales(cfg)
        cleared = []
        for label in labels:
            held, gone = _unlearn_label(
                model, ctx, cfg, label, scan.nc, median_norm, nc_data, plain, scales, held, record
            )
            cleared.append(gone)
        if cfg.ibau and labels and all(cleared):
            record["steps"].append({"step": "I-BAU", "kept": False, "why": "not run: the reversed trigger was a patch, "
                                    "the region attack no longer reaches the label and Neural Cleanse finds no small "
                                    "trigger for it again; I-BAU's rounds can bring a removed patch back (the zoo's "
                                    "badnets-001: ASR 1.0 -> 13.1 %)"})  # fmt: skip
        elif cfg.ibau:
            held = _ibau_step(
                model,
                ctx,
                cfg,
                held,
                cfg.tolerance,
                scales,
                record,
                "adversarial unlearning needs no label: it reaches what the reversed trigger missed",
            )
    return _finish(model, record, began, held, spec)


def _unlearn_label(
    model,
    ctx: DefenseContext,
    cfg: AutoConfig,
    label: int,
    scanned: nc.NCResult,
    median_norm: float,
    nc_data,
    plain,
    scales: tuple[float, ...],
    held: float,
    record: dict[str, Any],
) -> tuple[float, bool]:
    """Step 3 of the module docstring for one suspected ``label``, in place, each step appended to ``record``:
    returns the held-out accuracy after it, and whether the reversed trigger was a patch whose region the region
    attack no longer takes to the label (then the backdoor counts as gone)."""
    scan_cfg = ScanConfig(seed=cfg.seed)
    refine_cfg = dataclasses.replace(scan_cfg.nc(), steps=cfg.refine_steps)
    trigger, norm, region = scanned.trigger(label), scanned.norms()[label], None
    why = "the scan's suspected label, reversed by Neural Cleanse"
    for attempt in range(1, cfg.unlearn_rounds + 1):
        if cfg.refine_steps:  # the trigger unlearnt: reversed again, longer, on the images as they are
            trigger = nc.reverse_engineer(model, plain, ctx.num_classes, [label], refine_cfg, ctx.device,
                                          progress=False).trigger(label)  # fmt: skip
        if region is None and cfg.region_area:  # a patch stays where it was found first
            region = trigger_region(trigger, max_area=cfg.region_area)
        before_success = attack_success_rate(model, ctx.holdout, trigger, device=ctx.device)
        saved = copy.deepcopy(model.state_dict())
        for scale in scales:
            train = TrainConfig(epochs=cfg.unlearn_epochs, lr=cfg.unlearn_lr * scale, patience=2, val_fraction=0.1,
                                seed=cfg.seed + attempt - 1)  # fmt: skip
            unlearn(model, ctx.fit, [trigger], cfg.stamp_fraction, train, ctx.device, ctx.progress, region,
                    cfg.stamp_fraction, label)  # fmt: skip
            after = ctx.held_out(model)
            over = _over_budget(record, after, cfg.tolerance)
            name = f"unlearn the reversed trigger of label {label}" + (f" (round {attempt})" if attempt > 1 else "")
            step = {"step": name + (f" (gentler: lr x {scale:g})" if scale != 1 else ""), "why": why,
                    "lr": train.lr, "reversed_trigger_l1_norm": norm,
                    "unlearnt_trigger_l1_norm": float(trigger.mask.sum()),
                    "region_pixels": 0 if region is None else int(region.sum()),
                    "reversed_trigger_success": {"before": before_success,
                                                 "after": attack_success_rate(model, ctx.holdout, trigger, device=ctx.device)},
                    "holdout_accuracy": after, "kept": over is None}  # fmt: skip
            record["steps"].append(step)
            if over is None:
                break
            model.load_state_dict(saved)
            step["undone"] = over
        if over is not None:
            return held, False
        held = after
        if region is not None:  # does the region still hold a backdoor? the worst pattern in it, per image
            success = region_attack_success(model, ctx.holdout, region, label, seed=cfg.seed, device=ctx.device)
            step["region_attack_success"] = success
            if success <= cfg.region_success:
                # the region is clean; is the label? a blend reversed as a blob can leave a small trigger elsewhere
                _reversed_again(model, ctx, scan_cfg, label, nc_data, median_norm, step)
                ratio = step["reversed_again_norm_ratio"]
                if ratio < cfg.clean_norm_ratio:
                    return held, True
                step["why_not_cleared"] = (
                    f"the region attack no longer reaches the label ({success:.0%} <= {cfg.region_success:.0%}), "
                    f"but reversed again its trigger is still small (median norm / its norm {ratio:.2f} >= "
                    f"{cfg.clean_norm_ratio}): not a patch alone"
                )
                return held, False
            why = (f"the region attack still takes {success:.0%} of the held-out images to the label "
                   f"(> {cfg.region_success:.0%})")  # fmt: skip
        else:  # is a small trigger for this label still there? Neural Cleanse once more, for this label alone
            if attempt == cfg.unlearn_rounds:
                break
            again = _reversed_again(model, ctx, scan_cfg, label, nc_data, median_norm, step)
            norm = again.l1_norms[0]
            if median_norm / norm < cfg.clean_norm_ratio:
                break
            why = (f"reversed again after unlearning, its trigger is still small: median norm / its norm "
                   f"{median_norm / norm:.2f} >= {cfg.clean_norm_ratio}")  # fmt: skip
            trigger = again.trigger(label)
    return held, False


def _reversed_again(
    model, ctx: DefenseContext, scan_cfg: ScanConfig, label: int, nc_data, median_norm: float, step: dict[str, Any]
) -> nc.NCResult:
    """Neural Cleanse once more for ``label`` alone, as the scan ran it; its norm, and the scan's median norm over
    it, are written to ``step``."""
    again = nc.reverse_engineer(model, nc_data, ctx.num_classes, [label], scan_cfg.nc(), ctx.device, progress=False)
    step["reversed_again_l1_norm"] = again.l1_norms[0]
    step["reversed_again_norm_ratio"] = median_norm / again.l1_norms[0]
    return again


def _scales(cfg: AutoConfig) -> tuple[float, ...]:
    """The learning-rate scales an unlearning step is tried at: a step over the tolerance is tried once gentler."""
    return (1.0, cfg.backoff) if cfg.backoff else (1.0,)


def _warp_step(
    model, ctx: DefenseContext, cfg: AutoConfig, scales: tuple[float, ...], record: dict[str, Any]
) -> float | None:
    """Random smooth warps unlearnt (:func:`~trojanlab.defenses.warp_unlearning.unlearn_warps`: ``warp_epochs``,
    all run, at ``unlearn_lr``), in place, kept within ``quiet_tolerance`` of the model's held-out accuracy as given,
    else undone and tried again at each further learning-rate scale; the step is appended to ``record``. Returns
    the held-out accuracy after it, or None where it was undone."""
    saved = copy.deepcopy(model.state_dict())
    for scale in scales:
        train = TrainConfig(epochs=cfg.warp_epochs, lr=cfg.unlearn_lr * scale, val_fraction=0.0, seed=cfg.seed)
        unlearn_warps(model, ctx.fit, train, strength=cfg.warp_strength, device=ctx.device, progress=ctx.progress)
        after = ctx.held_out(model)
        over = _over_budget(record, after, cfg.quiet_tolerance)
        step = {"step": "unlearn random warps" + (f" (gentler: lr x {scale:g})" if scale != 1 else ""),
                "why": "a warping trigger paints no pixel for Neural Cleanse to reverse: random smooth warps at true "
                       "labels teach the network that a warp is no evidence of a label",
                "lr": train.lr, "strength": cfg.warp_strength, "holdout_accuracy": after, "kept": over is None}  # fmt: skip
        record["steps"].append(step)
        if over is None:
            return after
        model.load_state_dict(saved)
        step["undone"] = over
    return None


def _ibau_step(
    model,
    ctx: DefenseContext,
    cfg: AutoConfig,
    held: float,
    tolerance: float,
    scales: tuple[float, ...],
    record: dict[str, Any],
    why: str,
) -> float:
    """I-BAU on ``model`` in place, every round read on the held-out images: the model is left as it was after the
    last round whose held-out accuracy stays within ``tolerance`` of the model's as given (a round over it does not
    stop I-BAU: a later round may come back within it). Where no round is within it, I-BAU is undone and tried again
    at each further learning-rate scale. The step is appended to ``record``; returns the held-out accuracy after it."""
    for scale in scales:
        ibau_cfg = IBAUConfig(seed=cfg.seed)
        ibau_cfg = dataclasses.replace(ibau_cfg, lr=ibau_cfg.lr * scale)
        kept = {"weights": copy.deepcopy(model.state_dict()), "held": held, "round": 0}  # the last round within

        def check(round_record: dict[str, Any], kept: dict[str, Any] = kept) -> None:
            after = ctx.held_out(model)
            round_record["holdout_accuracy"] = after
            over = _over_budget(record, after, tolerance)
            if over is None:
                kept.update(weights=copy.deepcopy(model.state_dict()), held=after, round=round_record["round"])
            else:
                round_record["over_budget"] = over

        log = ibau.unlearn(model, ctx.fit, ibau_cfg, ctx.device, ctx.progress, after_round=check)
        rounds = kept["round"]
        if rounds < len(log.rounds):
            model.load_state_dict(kept["weights"])  # back to the last round within the budget (or as given)
        last = log.rounds[-1]
        # held-out accuracy: after the rounds kept, or (none kept) after the last round, which was undone
        step = {"step": "I-BAU" + (f" (gentler: lr x {scale:g})" if scale != 1 else ""), "why": why,
                "tolerance": tolerance, "rounds_kept": rounds, "rounds": len(log.rounds), "ibau": log.to_json(),
                "holdout_accuracy": kept["held"] if rounds else last["holdout_accuracy"], "kept": rounds > 0}  # fmt: skip
        record["steps"].append(step)
        if rounds:
            return kept["held"]
        step["undone"] = last["over_budget"]
    return held


def _over_budget(record: dict[str, Any], after: float, tolerance: float) -> str | None:
    """Why a step leaving held-out accuracy ``after`` is undone, or None when it is kept: one budget for the whole
    repair, measured from the model as it was given (not from the step before)."""
    drop = record["holdout_accuracy_before"] - after
    if drop <= tolerance:
        return None
    return f"held-out accuracy {100 * drop:.2f} points below the model's as given > {100 * tolerance:g}"


def _finish(
    model,
    record: dict[str, Any],
    began: float,
    held: float,
    spec: dict[str, Any] | None = None,
    nothing: str = "nothing kept: every step cost more held-out accuracy than allowed",
) -> DefenseOutcome:
    """The outcome of the steps in ``record``, ``held`` the held-out accuracy after them: the drop the rule predicts,
    the steps kept."""
    record["holdout_accuracy_after"] = held
    record["predicted_clean_accuracy_drop"] = record["holdout_accuracy_before"] - held
    record["defense_seconds"] = time.perf_counter() - began
    done = [s["step"] + (f" ({s['rounds_kept']} of {s['rounds']} rounds)" if s["rounds_kept"] < s["rounds"] else "")
            if "rounds_kept" in s else s["step"] for s in record["steps"] if s["kept"]]  # fmt: skip
    return DefenseOutcome(model, "; ".join(done) if done else nothing, record, spec=spec)
