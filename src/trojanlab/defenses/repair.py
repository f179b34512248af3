"""The defenses that retrain or take a model apart instead of ranking neurons: Neural Cleanse's unlearning and its
head-input pruning, and the thesis's sub-network variant of ANP for TrojanNet-injected models."""

from __future__ import annotations

import time

import numpy as np

from ..config.defenses import NCPruneConfig, NCUnlearnConfig, SubnetworkConfig
from ..config.training import TrainConfig
from ..detection.run import read_flagged_labels, read_reversed_triggers
from ..errors import TrojanlabError
from ..evaluation import attack_success_rate
from . import anp_subnetwork as sub
from .base import DefenseContext, DefenseOutcome
from .nc_mitigation import prune_by_activation_gap, unlearn


def _reversed(ctx: DefenseContext, scan: str, labels: list[int] | None):
    """The labels to repair (given, else the scan's flagged ones) and their reversed triggers."""
    if labels is None:
        labels = read_flagged_labels(scan)
    bad = [label for label in labels if not 0 <= label < ctx.num_classes]
    if bad:
        raise TrojanlabError(f"--repair-labels {bad} are out of range for a {ctx.num_classes}-class model")
    triggers = read_reversed_triggers(scan, labels)
    for trigger in triggers:
        trigger.check_fits(*ctx.clean.x.shape[1:3])
    return labels, triggers


def _reversed_asr(ctx: DefenseContext, model, triggers) -> dict[str, float]:
    return {str(t.target_label): attack_success_rate(model, ctx.data.test, t, device=ctx.device) for t in triggers}


def _unchanged(ctx: DefenseContext, scan: str) -> DefenseOutcome:
    note = "no label flagged and none given: the model is returned unchanged (as BackdoorBench does)"
    return DefenseOutcome(
        ctx.model, "nothing: no label flagged", {"labels": [], "reversed_triggers": scan, "note": note}
    )


def nc_unlearn_defense(ctx: DefenseContext, cfg: NCUnlearnConfig) -> DefenseOutcome:
    """Neural Cleanse's unlearning: fine-tuning on the defender's images, a share stamped with the reversed
    triggers and kept at their true label."""
    labels, triggers = _reversed(ctx, cfg.reversed_triggers, cfg.labels)
    if not labels:
        return _unchanged(ctx, cfg.reversed_triggers)
    before = _reversed_asr(ctx, ctx.model, triggers)
    train = TrainConfig(epochs=cfg.epochs, lr=cfg.lr, patience=2, val_fraction=0.1, seed=cfg.seed)
    log = unlearn(ctx.model, ctx.clean, triggers, cfg.stamp_fraction, train, ctx.device, ctx.progress)
    details = {
        "labels": labels, "reversed_triggers": cfg.reversed_triggers, "clean_images_used": len(ctx.clean),
        "epochs_run": log.epochs_run, "history": log.history,
        "reversed_trigger_asr": {"before": before, "after": _reversed_asr(ctx, ctx.model, triggers)},
    }  # fmt: skip
    return DefenseOutcome(ctx.model, f"unlearnt the reversed triggers of {labels} ({log.epochs_run} epochs)", details)


def nc_prune_defense(ctx: DefenseContext, cfg: NCPruneConfig) -> DefenseOutcome:
    """Neural Cleanse's pruning of the classifier's inputs the reversed triggers excite most."""
    labels, triggers = _reversed(ctx, cfg.reversed_triggers, cfg.labels)
    if not labels:
        return _unchanged(ctx, cfg.reversed_triggers)
    before = _reversed_asr(ctx, ctx.model, triggers)
    pruned = prune_by_activation_gap(
        ctx.model, ctx.num_classes, ctx.clean, triggers, cfg.max_prune, target_asr=cfg.target_asr
    )
    details = {
        "labels": labels, "reversed_triggers": cfg.reversed_triggers, "pruning": pruned.to_json(),
        "reversed_trigger_asr": {"before": before, "after": _reversed_asr(ctx, ctx.model, triggers)},
    }  # fmt: skip
    return DefenseOutcome(ctx.model, f"pruned the classifier inputs the reversed triggers of {labels} excite", details)


def subnetwork_defense(ctx: DefenseContext, cfg: SubnetworkConfig) -> DefenseOutcome:
    """The thesis's sub-network ANP: perturb and de-perturb each part of a TrojanNet-injected model, score the
    parts, remove the one that behaves as a backdoor (the plain victim is what remains)."""
    began = time.perf_counter()
    # the monitor: clean test images, as the thesis's 50 (only the parts' answers are compared: no label and no
    # trigger is read); the defender's own training-split images are memorised and never change their answer
    monitor = ctx.data.test
    if cfg.monitor_images and cfg.monitor_images < len(monitor):
        pick = np.random.default_rng(ctx.seed).choice(len(monitor), cfg.monitor_images, replace=False)
        monitor = monitor.subset(np.sort(pick))
    scores = sub.subnetwork_scores(ctx.model, ctx.clean, monitor, cfg, device=ctx.device, progress=ctx.progress)
    pruned, decision = sub.remove_part(ctx.model, scores)
    files = sub.plot_curves(scores, ctx.out)
    spec = dict(ctx.loaded.spec["victim"]) if decision["removed"] == "trojannet" else dict(ctx.loaded.spec)
    spec["triggers"] = ctx.loaded.spec.get("triggers", [])
    details = {
        "monitor_images": len(monitor), "subnetwork": scores.to_json(), "decision": decision,
        "mask_values": scores.scores, "defense_seconds": time.perf_counter() - began,
    }  # fmt: skip
    changed = f"removed the {decision['removed']} part" if decision.get("removed") else decision.get("note", "nothing")
    return DefenseOutcome(pruned, changed, details, files, spec=spec)
