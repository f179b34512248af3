"""The pruning defenses: rank neurons, then prune the lowest-ranked by one shared rule.

ANP (masks learnt under adversarial neuron perturbation), the NC-guided variant (Neural Cleanse's reversed triggers)
and Fine-Pruning (mean activation on clean images) differ only in how they rank; :func:`prune_ranked` applies the
rule of :class:`~trojanlab.config.PruneRule` (the automatic one reads only the defender's held-out clean images),
prunes, and records the pruning curve on test images for the report.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..config.defenses import ANPConfig, FinePruningConfig, NCGuidedConfig, PruneRule
from ..data import to_tensor
from ..detection.run import read_flagged_labels, read_reversed_triggers
from ..errors import TrojanlabError
from ..evaluation import evaluate_model
from ..io import write_json
from . import anp, fine_pruning, guided
from .anp import NeuronLayer
from .base import DefenseContext, DefenseOutcome


@dataclass
class Ranking:
    """Neurons and a value per neuron: the lowest values are pruned first; ``grid`` the values the rule tries."""

    layers: list[NeuronLayer]
    values: torch.Tensor
    grid: Sequence[float]
    what: str  # what a grid value means, for the rule's sentence
    seconds: float


def _test_curve(ctx: DefenseContext, ranking: Ranking, rule: PruneRule) -> list[dict[str, Any]]:
    """CA and ASR on a test subset after pruning at each value of the grid (report only)."""
    test = ctx.data.test
    if rule.curve_images < len(test):
        test = test.subset(np.sort(np.random.default_rng(ctx.seed).choice(len(test), rule.curve_images, False)))
    curve, metrics = [], None
    for threshold, index, new in anp.threshold_prunings(ranking.values, ranking.grid):
        if new or metrics is None:  # a threshold that prunes nothing new has the last point's figures
            pruned = anp.prune_neurons(ctx.model, ranking.layers, index, rule.prune_bias)
            metrics = evaluate_model(pruned, test, ctx.triggers, device=ctx.device)
        point = {"threshold": threshold, "pruned": len(index), "fraction": len(index) / len(ranking.values)}
        point["clean_accuracy"] = metrics["clean_accuracy"]
        if "attack_success_rate" in metrics:
            point["attack_success_rate"] = metrics["attack_success_rate"]
        curve.append(point)
    return curve


def prune_ranked(ctx: DefenseContext, ranking: Ranking, rule: PruneRule) -> DefenseOutcome:
    """Prune ``ranking`` by ``rule``; the details every pruning defense reports (rule, curve, what was pruned)."""
    import time

    selecting = time.perf_counter()
    details: dict[str, Any] = {}
    values = ranking.values
    if rule.prune == "auto":
        checked = ctx.measure.checked  # the checked measure replaces the fixed jitter
        threshold, holdout_curve = anp.auto_threshold(
            ctx.model, ranking.layers, values, ctx.holdout, rule.tolerance, grid=ranking.grid,
            prune_bias=rule.prune_bias, device=ctx.device, measure=rule.measure, jitter=rule.jitter, seed=ctx.seed,
            scored=(ctx.measure.x, ctx.measure.y) if checked else None,
        )  # fmt: skip
        index = anp.select_by_rule(values, "threshold", threshold)
        measured = (
            "top-1 accuracy" if rule.measure == "top1" else "expected accuracy (mean probability of the true label)"
        )
        if checked:
            on = ctx.measure.describe()
        else:
            on = f"{rule.jitter} jittered copies of " if rule.jitter else ""
            on += f"{len(ctx.holdout)} held-out clean images (unchecked: no clean accuracy is stated for the model)"
        grid = ranking.grid
        details["rule"] = (
            f"auto: the largest {ranking.what} of {grid[0]}, {grid[1]}, ..., {grid[-1]} whose pruned model keeps the "
            f"{measured} within {rule.tolerance:.1%} of the unpruned model's on {on} (chosen {threshold:g})"
        )
        details["holdout_curve"] = holdout_curve
    else:
        threshold = rule.value if rule.prune == "threshold" else None
        index = anp.select_by_rule(values, rule.prune, rule.value)
        details["rule"] = f"{rule.prune} {rule.value:g}"
    pruned = anp.prune_neurons(ctx.model, ranking.layers, index, rule.prune_bias)
    details.update(
        threshold=threshold,
        neurons=values.numel(),
        neuron_layers=[layer.to_json() for layer in ranking.layers],
        pruned=len(index),
        pruned_fraction=len(index) / values.numel(),
        pruned_per_layer=anp.pruned_per_layer(ranking.layers, index),
        mask_seconds=ranking.seconds,
        selection_seconds=time.perf_counter() - selecting,
    )
    files = []
    if rule.curve_images:
        curve = _test_curve(ctx, ranking, rule)
        details["test_curve"] = curve
        anp.plot_pruning_curve(curve, ctx.out / "pruning_curve.png", len(index) / values.numel())
        files.append("pruning_curve.png")
    changed = f"pruned {len(index)} of {values.numel()} neurons ({details['rule']})"
    return DefenseOutcome(pruned, changed, details, files)


def anp_defense(ctx: DefenseContext, cfg: ANPConfig, rule: PruneRule) -> DefenseOutcome:
    """Adversarial Neuron Pruning: masks learnt under adversarial neuron perturbation, then the shared rule."""
    masks = anp.optimize_masks(
        ctx.model, ctx.fit, cfg, ctx.num_classes, ctx.device, ctx.out / "checkpoint", ctx.progress
    )
    ranking = Ranking(masks.layers, masks.masks, anp.THRESHOLD_GRID, "threshold", masks.seconds)
    outcome = prune_ranked(ctx, ranking, rule)
    outcome.details["premise"] = anp.collapse_check(ctx.model, masks.layers, ctx.holdout, cfg.eps, ctx.seed, ctx.device)
    anp.save_masks(masks, ctx.out / "masks.safetensors")
    table = masks.mask_table()
    write_json(ctx.out / "mask_values.json", table)
    anp.plot_masks(masks.masks, ctx.out / "mask_histogram.png", outcome.details["threshold"])
    outcome.files += ["masks.safetensors", "mask_values.json", "mask_histogram.png"]
    outcome.details.update(
        mask_values={
            "lowest": table[:20],
            "mean": float(masks.masks.mean()),
            "below_0.2": sum(r["mask"] <= 0.2 for r in table),
        },
        samples=masks.samples,
        official_recipe_samples=ANPConfig().passes(),
        history=masks.history,
    )
    return outcome


def nc_guided_defense(ctx: DefenseContext, cfg: NCGuidedConfig, rule: PruneRule) -> DefenseOutcome:
    """ANP's neurons ranked by how much Neural Cleanse's reversed triggers excite them (no masks), then the shared
    rule on a grid of 0-30 % of the neurons. Nothing flagged and no label given: nothing is pruned."""
    import time

    began = time.perf_counter()
    labels = cfg.guide_labels
    if labels is None:
        labels = read_flagged_labels(cfg.reversed_triggers)
    bad = [label for label in labels if not 0 <= label < ctx.num_classes]
    if bad:
        raise TrojanlabError(f"--guide-labels {bad} are out of range for a {ctx.num_classes}-class model")
    probe = to_tensor(ctx.fit.x[:2]).to(ctx.device)
    layers = anp.find_neurons(ctx.model, probe, ctx.num_classes, cfg.include_classifier)
    guide: dict[str, Any] = {"reversed_triggers": str(cfg.reversed_triggers), "labels": [int(v) for v in labels]}
    if not labels:  # as the Neural Cleanse mitigation (and BackdoorBench): nothing flagged, nothing repaired
        note = ("none: Neural Cleanse flagged no label and none was given, so nothing is pruned (the model is "
                "returned unchanged, as the Neural Cleanse mitigation and BackdoorBench do)")  # fmt: skip
        details = {"guide": guide, "rule": note, "threshold": None, "neurons": sum(layer.size for layer in layers),
                   "neuron_layers": [layer.to_json() for layer in layers], "pruned": 0, "pruned_fraction": 0.0,
                   "pruned_per_layer": {}, "mask_seconds": time.perf_counter() - began,
                   "selection_seconds": 0.0}  # fmt: skip
        return DefenseOutcome(ctx.model, "nothing: no label flagged", details)
    triggers = read_reversed_triggers(cfg.reversed_triggers, labels)
    for trigger in triggers:
        trigger.check_fits(*probe.shape[-2:])  # a scan of another model's images: a clear error, not a shape clash
    scores = guided.trigger_scores(ctx.model, layers, ctx.fit, triggers, ctx.device)
    describe = anp.NeuronPerturbation(layers).describe
    guide.update(
        score="largest relative rise of the mean activation under a reversed trigger, (stamped - clean) / (clean + "
        "1e-3), on the defender's fitting images of other labels",
        highest=[
            {"index": i, "layer": describe(i)[0], "neuron": describe(i)[1], "score": float(scores[i])}
            for i in torch.argsort(-scores, stable=True)[:20].tolist()
        ],
    )
    what = "fraction of neurons (ranked by the reversed triggers)"
    ranking = Ranking(layers, guided.rank_masks(scores), guided.GUIDED_GRID, what, time.perf_counter() - began)
    outcome = prune_ranked(ctx, ranking, rule)
    outcome.details["guide"] = guide
    return outcome


def fine_pruning_defense(ctx: DefenseContext, cfg: FinePruningConfig, rule: PruneRule) -> DefenseOutcome:
    """Fine-Pruning: the last convolution's channels ranked by mean activation on the defender's images (dormant
    first), pruned by the shared rule, then the pruned model fine-tuned on the defender's fitting images."""
    ranked = fine_pruning.rank_channels(ctx.model, ctx.fit, cfg.layer, ctx.device)
    what = f"fraction of {ranked.layer}'s channels (least active first)"
    ranking = Ranking(ranked.layers, ranked.masks, fine_pruning.PRUNING_GRID, what, ranked.seconds)
    outcome = prune_ranked(ctx, ranking, rule)
    outcome.details["layer"] = ranked.layer
    outcome.details["mean_activation"] = ranked.activations.tolist()
    if cfg.fine_tune_epochs:
        log = fine_pruning.fine_tune(
            outcome.model, ctx.fit, cfg.fine_tune_epochs, cfg.fine_tune_lr, cfg.seed, ctx.device, ctx.progress
        )
        outcome.details["fine_tune"] = {"epochs": cfg.fine_tune_epochs, "seconds": log.seconds, "history": log.history}
        outcome.changed += f", then fine-tuned for {cfg.fine_tune_epochs} epochs"
    return outcome
