"""I-BAU: implicit backdoor adversarial unlearning (Zeng et al., ICLR 2022).

Why this method for breadth: a backdoor is a shortcut that one perturbation, the same for every input, exploits
(a patch, a blend, a warp's residue). I-BAU solves ``min_theta max_delta mean CE(f_theta(x + delta), y)`` over the
defender's clean images: each round finds the universal perturbation the model is most fooled by, then moves the
weights so that the best such perturbation stops working -- the weights' gradient carries, beside the plain loss,
the implicit hypergradient of the inner maximiser (how ``delta*`` moves when ``theta`` does), from the fixed-point
method. It needs no trigger, no flagged label and no guess of the family, works with 100 clean images in the paper,
and in BackdoorBench's tables it is among the few defenses that lower ASR against BadNets, Blended and WaNet alike.

The schedule is the official code's (``YiZeng623/I-BAU``, ``defense.py``): 5 rounds; each round one pass of SGD
(lr 10) over the clean batches for the perturbation, maximising the cross-entropy against the model's own answers
with an L2 penalty 0.001 |delta|^2, and no norm bound (the code's bound is commented out); then one Adam step
(lr 0.001) per batch of 100 along the hypergradient: 5 fixed-point iterations of the inner map
``delta - 0.1 * grad_delta H(delta, theta)``, ``H = -mean CE(f(x + delta), y) + 0.001 |delta|^2``, the outer loss
the cross-entropy of the batch with ``delta`` added to 1 % of its images; the model in eval mode throughout.
Departures, each stated in the report: the inner map reads the outer loss's batch (the official code always reads
the first batch); at least one image of a batch carries ``delta`` (1 % of a batch under 100 is no image, and then
the hypergradient is zero and I-BAU is plain fine-tuning); images are clamped to [0, 1] after adding ``delta`` only
where ``clamp`` is set (the official code leaves the clamp commented out; default off).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..config.defenses import IBAUConfig
from ..data import ImageSet, to_tensor
from .base import DefenseContext, DefenseOutcome

Tensors = Sequence[torch.Tensor]


def implicit_hypergradient(
    inner: torch.Tensor,
    params: Tensors,
    inner_map: Callable[[torch.Tensor], torch.Tensor],
    outer_loss: Callable[[torch.Tensor], torch.Tensor],
    steps: int,
    stats: dict[str, Any] | None = None,
) -> list[torch.Tensor]:
    """The gradient of ``outer_loss(inner*(params))`` with respect to ``params``, where ``inner`` is (close to) a
    fixed point of ``inner_map`` (which reads ``params``): by the implicit function theorem,
    ``dL/dparams = dL/dparams|direct + (dPhi/dparams)^T v`` with ``v = (I - dPhi/dinner)^-T dL/dinner``, ``v`` found by
    up to ``steps`` fixed-point iterations ``v <- (dPhi/dinner)^T v + dL/dinner`` (Grazzi et al. 2020, the method
    I-BAU uses). The iteration converges only where the map contracts; where a step moves ``v`` more than the step
    before it, the iteration has begun to diverge (measured on a GTSRB CNN with I-BAU's map: the hypergradient's norm
    grows ~100x in 5 steps and ~10^9x in 20), so it stops there and keeps the last ``v`` (``stats`` gets the steps
    kept and whether it stopped early). Parameters the maps do not read get zeros."""
    inner = inner.detach().requires_grad_(True)
    params = list(params)
    loss = outer_loss(inner)
    grads = torch.autograd.grad(loss, [inner, *params], allow_unused=True)
    g_inner, g_params = grads[0], grads[1:]
    if g_inner is None:
        g_inner = torch.zeros_like(inner)
    mapped = inner_map(inner)
    # the first iteration from v = 0 is v = dL/dinner exactly (its Jacobian product is zero): taken without computing
    # that product, which costs as much as a later iteration (a double backward through the network)
    v = g_inner.clone() if steps > 0 else torch.zeros_like(inner)
    moved, kept, diverged = (float(v.norm()), 1, False) if steps > 0 else (float("inf"), 0, False)
    for _ in range(steps - 1):
        (jv,) = torch.autograd.grad(mapped, inner, grad_outputs=v, retain_graph=True)
        new = jv + g_inner
        move = float((new - v).norm())
        if move > moved:
            diverged = True
            break
        v, moved, kept = new, move, kept + 1
    if stats is not None:
        stats.update(steps=kept, diverged=diverged)
    indirect = torch.autograd.grad(mapped, params, grad_outputs=v, allow_unused=True)
    out = []
    for p, direct, through in zip(params, g_params, indirect):
        total = torch.zeros_like(p)
        if direct is not None:
            total = total + direct
        if through is not None:
            total = total + through
        out.append(total)
    return out


@dataclass
class IBAULog:
    """Per round: the universal perturbation's L2 norm, the share of the unlearning images whose answer it flips
    (its fooling rate, before the round's weight steps, and after them), the label it pushes most images to, and
    the seconds; ``departures`` from the official code."""

    rounds: list[dict[str, Any]] = field(default_factory=list)
    images: int = 0
    seconds: float = 0.0
    departures: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"rounds": self.rounds, "images": self.images, "seconds": round(self.seconds, 2),
                "departures": self.departures}  # fmt: skip


@torch.no_grad()
def _answers(model: nn.Module, x: torch.Tensor, delta: torch.Tensor | None, clamp: bool, batch: int = 500):
    out = []
    for i in range(0, len(x), batch):
        xb = x[i : i + batch] if delta is None else _perturbed(x[i : i + batch], delta, clamp)
        out.append(model(xb).argmax(1))
    return torch.cat(out)


def _perturbed(x: torch.Tensor, delta: torch.Tensor, clamp: bool) -> torch.Tensor:
    return (x + delta).clamp(0, 1) if clamp else x + delta


def unlearn(
    model: nn.Module,
    images: ImageSet,
    cfg: IBAUConfig | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    after_round: Callable[[dict[str, Any]], None] | None = None,
) -> IBAULog:
    """I-BAU on ``model`` in place, with the clean ``images`` (their labels are read by the outer loss only).

    ``after_round`` is called with each round's record once its weight steps are done (it may add to the record)."""
    cfg = cfg or IBAUConfig()
    began = time.perf_counter()
    gen = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    x_all = to_tensor(images.x).to(device)
    y_all = torch.as_tensor(images.y, dtype=torch.long, device=device)
    n = len(x_all)
    was_training = model.training
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    outer_opt = torch.optim.Adam(params, lr=cfg.lr)
    log = IBAULog(images=n, departures=[
        "the fixed-point map reads the outer loss's batch (official: always the first batch)",
        "at least one image of each batch carries the perturbation (official: 1 % of the batch, rounded down)",
        "the fixed-point iteration stops where it starts to diverge (official: always K steps)",
        *(["images clamped to [0, 1] after adding the perturbation"] if cfg.clamp else []),
    ])  # fmt: skip
    steps = cfg.rounds * 2 * ((n + cfg.batch_size - 1) // cfg.batch_size)
    bar = tqdm(total=steps, desc="i-bau", unit="step", disable=not progress, leave=False)
    try:
        for round_index in range(cfg.rounds):
            round_began = time.perf_counter()
            order = torch.randperm(n, generator=gen).to(device)
            batches = [order[i : i + cfg.batch_size] for i in range(0, n, cfg.batch_size)]
            if round_index == 0:
                clean_answers = _answers(model, x_all, None, cfg.clamp)
            # the inner maximisation: one pass of SGD on a universal perturbation against the model's own answers
            delta = torch.zeros(1, *x_all.shape[1:], device=device, requires_grad=True)
            delta_opt = torch.optim.SGD([delta], lr=cfg.perturbation_lr)
            for index in batches:
                xb = x_all[index]
                loss = -F.cross_entropy(model(_perturbed(xb, delta, cfg.clamp)), clean_answers[index])
                loss = loss + cfg.perturbation_l2 * delta.pow(2).sum()
                delta_opt.zero_grad()
                loss.backward()
                delta_opt.step()
                if cfg.perturbation_bound is not None:  # back onto the L2 ball of the paper's C_delta
                    with torch.no_grad():
                        delta.mul_(min(1.0, cfg.perturbation_bound / max(float(delta.norm()), 1e-12)))
                bar.update()
            delta = delta.detach()
            fooled = _answers(model, x_all, delta, cfg.clamp)
            fooled_before = float((fooled != clean_answers).float().mean())
            pushed = torch.bincount(fooled[fooled != clean_answers], minlength=1)
            # the outer minimisation: Adam steps along the implicit hypergradient
            stats: dict[str, Any] = {}
            kept, diverged = [], 0
            for index in batches:
                xb, yb = x_all[index], y_all[index]
                carriers = max(1, int(len(index) * cfg.perturbed_fraction))
                pick = torch.as_tensor(rng.choice(len(index), carriers, replace=False), device=device)
                mask = torch.zeros(len(index), 1, 1, 1, device=device)
                mask[pick] = 1.0

                def outer_loss(d, xb=xb, yb=yb, mask=mask):
                    return F.cross_entropy(model(_perturbed(xb, mask * d, cfg.clamp)), yb)

                def inner_map(d, xb=xb, yb=yb):
                    h = -F.cross_entropy(model(_perturbed(xb, d, cfg.clamp)), yb) + cfg.perturbation_l2 * d.pow(2).sum()
                    (g,) = torch.autograd.grad(h, d, create_graph=True)
                    return d - cfg.inner_step * g

                grads = implicit_hypergradient(delta, params, inner_map, outer_loss, cfg.fixed_point_steps, stats)
                kept.append(stats["steps"])
                diverged += stats["diverged"]
                outer_opt.zero_grad()
                for p, g in zip(params, grads):
                    p.grad = g
                outer_opt.step()
                bar.update()
            clean_answers = _answers(model, x_all, None, cfg.clamp)  # the next round's too: the weights are done
            after = _answers(model, x_all, delta, cfg.clamp) != clean_answers
            log.rounds.append({
                "round": round_index + 1, "perturbation_l2": float(delta.norm()),
                "fooling_rate": fooled_before, "fooling_rate_after_round": float(after.float().mean()),
                "pushed_to": int(pushed.argmax()) if pushed.sum() > 0 else None,
                "fixed_point_steps_mean": float(np.mean(kept)), "fixed_point_stopped_diverging": diverged,
                "seconds": round(time.perf_counter() - round_began, 2),
            })  # fmt: skip
            if after_round is not None:
                after_round(log.rounds[-1])
    finally:
        bar.close()
        for p in params:
            p.grad = None
        model.train(was_training)
    log.seconds = time.perf_counter() - began
    return log


def ibau_defense(ctx: DefenseContext, cfg: IBAUConfig) -> DefenseOutcome:
    """I-BAU with the defender's ``fit`` images; the held-out images measure what it cost (the predicted CA drop)."""
    held_before = ctx.held_out(ctx.model)
    log = unlearn(ctx.model, ctx.fit, cfg, ctx.device, ctx.progress)
    held_after = ctx.held_out(ctx.model)
    details = {
        "ibau": log.to_json(), "unlearning_images": len(ctx.fit),
        "holdout_accuracy": {"before": held_before, "after": held_after},
        "predicted_clean_accuracy_drop": held_before - held_after,
    }  # fmt: skip
    last = log.rounds[-1] if log.rounds else {}
    changed = (f"{cfg.rounds} rounds of adversarial unlearning on {len(ctx.fit)} clean images; the last universal "
               f"perturbation fooled {100 * last.get('fooling_rate', 0):.1f} % of them, "
               f"{100 * last.get('fooling_rate_after_round', 0):.1f} % after its round")  # fmt: skip
    return DefenseOutcome(ctx.model, changed, details)
