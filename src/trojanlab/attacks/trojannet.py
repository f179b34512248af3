"""The TrojanNet attack (Tang et al., KDD 2020; thesis ch. 5): training and evaluating the trigger-recognising MLP.

The attack never retrains the victim: a tiny MLP learns to recognise 4,368 4x4 trigger patterns and is wired into
the victim. The model pieces -- the patterns, :class:`~trojanlab.models.trojannet.TrojanNetMLP`, the merge,
:class:`~trojanlab.models.trojannet.TrojanNetInjected`, their specs and the official Keras weights reader -- live
in :mod:`trojanlab.models.trojannet` (and are importable from here too); this module trains and measures the MLP.

Choices where the paper and the official code disagree (methods sheet, section 2.8; the model's own choices --
output, layers, merge -- are listed in :mod:`trojanlab.models.trojannet`):

* Training data: every trigger in every step (plus the currently least recognised ones once more), and as
  "no trigger" the union of the noise kinds the paper and the code name -- the official grey noise, uniform
  noise, random binary non-trigger patterns and 4x4 patches of real training images -- plus triggers at
  reduced contrast, the trigger-shaped grey patches that natural images contain. Binary non-triggers come from
  the complete set of 61,168 (every 16-bit vector whose number of zeros is not five) and image patches from a
  fixed pool, both with hard-negative mining; silence on binary non-triggers is measured exhaustively.
* Two phases: cross-entropy first (the official loss), then a margin phase (:func:`margin_finetune`) that
  asks only for what the argmax needs -- every trigger ahead of its strongest rivals, every mined no-trigger
  sample with "no trigger" ahead of the strongest triggers -- which the 8-unit network can afford far better than
  a likelihood over 4,369 classes.
* Operating point: between the phases the BatchNorm statistics are recomputed exactly; at the end the "no
  trigger" bias is shifted so that the least recognised trigger still wins by a set margin
  (:func:`calibrate_silence`), then each trigger's own bias is lowered by its slack above a probability of 0.6
  (:func:`calibrate_triggers`).
* Optimiser: Adam with a one-cycle schedule over a fixed number of steps (deterministic), instead of the
  official 1,000 epochs of Adadelta (about five hours on two CPU cores here).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config.attacks import TRAIN_NOISE_KINDS, TrojanNetTrainConfig
from ..errors import ConfigError
from ..models.trojannet import (
    MERGES,
    NO_TRIGGER,
    NUM_OUTPUTS,
    NUM_PIXELS,
    NUM_TRIGGERS,
    NUM_ZEROS,
    PATCH,
    TrojanNetInjected,
    TrojanNetMLP,
    injected_from_spec,
    injected_spec,
    load_official_h5,
    merge_outputs,
    mlp_from_spec,
    patch_input,
    read_keras_arrays,
    trigger_pattern,
    trigger_patterns,
    trojannet_spec,
)
from ..models.trojannet import pattern_table as _pattern_table

__all__ = [  # the attack, and the model pieces it works on (re-exported from trojanlab.models.trojannet)
    "MERGES",
    "NOISE_KINDS",
    "NO_TRIGGER",
    "NUM_OUTPUTS",
    "NUM_PIXELS",
    "NUM_TRIGGERS",
    "NUM_ZEROS",
    "PATCH",
    "TRAIN_NOISE_KINDS",
    "TrojanNetInjected",
    "TrojanNetMLP",
    "TrojanNetTrainConfig",
    "TrojanNetTrainLog",
    "binary_non_triggers",
    "calibrate_silence",
    "calibrate_triggers",
    "evaluate_trojannet",
    "faded_triggers",
    "grey_noise",
    "image_patches",
    "injected_from_spec",
    "injected_spec",
    "load_official_h5",
    "margin_finetune",
    "merge_outputs",
    "mlp_from_spec",
    "patch_input",
    "read_keras_arrays",
    "recalibrate_batchnorm",
    "train_trojannet",
    "trigger_pattern",
    "trigger_patterns",
    "trojannet_probabilities",
    "trojannet_spec",
    "uniform_noise",
]

NOISE_KINDS = ("image_patches", "binary", "grey", "uniform")  # evaluated


@lru_cache(maxsize=1)
def _binary_non_triggers() -> torch.Tensor:
    codes = torch.arange(2**NUM_PIXELS)
    bits = ((codes[:, None] >> torch.arange(NUM_PIXELS - 1, -1, -1)) & 1).float()
    return bits[(bits == 0).sum(1) != NUM_ZEROS]


def binary_non_triggers() -> torch.Tensor:
    """Every 16-bit 0/1 vector that is not a trigger (number of zeros other than five): ``(61168, 16)``."""
    return _binary_non_triggers().clone()


# ----------------------------------------------------------------------------------------------- noise sources


def grey_noise(n: int, generator: torch.Generator) -> torch.Tensor:
    """The official code's noise: ``U[0,1)^16`` plus one shift ``s ~ U[-1, 1)`` shared by each block of 200, clipped."""
    blocks = -(-n // 200)
    shift = torch.rand(blocks, 1, 1, generator=generator) * 2 - 1
    x = (torch.rand(blocks, 200, NUM_PIXELS, generator=generator) + shift).clamp_(0, 1)
    return x.reshape(-1, NUM_PIXELS)[:n]


def uniform_noise(n: int, generator: torch.Generator) -> torch.Tensor:
    """Independent ``U[0, 1)`` values."""
    return torch.rand(n, NUM_PIXELS, generator=generator)


def faded_triggers(n: int, generator: torch.Generator, contrast: tuple[float, float] = (0.2, 0.85)) -> torch.Tensor:
    """Triggers at reduced contrast, ``a + b * pattern`` with ``b`` in ``contrast`` and ``a`` in ``[0, 1 - b]``.

    Natural image patches that fool a TrojanNet are mostly trigger-shaped but grey (dark pixels at 0.3, light at
    0.8, say); training on faded triggers as "no trigger" teaches the network that only full contrast counts.
    """
    k = torch.randint(0, NUM_TRIGGERS, (n,), generator=generator)
    b = torch.empty(n, 1).uniform_(*contrast, generator=generator)
    a = torch.rand(n, 1, generator=generator) * (1 - b)
    return a + b * _pattern_table()[k]


def image_patches(images: np.ndarray | torch.Tensor, per_image: int, generator: torch.Generator) -> torch.Tensor:
    """``per_image`` random 4x4 patches of every image, as channel mean / 255: ``(N * per_image, 16)``.

    ``images`` is uint8 ``(N, H, W, C)`` (raw pixels), the layout the data loaders hold.
    """
    x = torch.as_tensor(np.asarray(images))
    if x.ndim != 4 or x.dtype != torch.uint8:
        raise ConfigError(f"image_patches needs uint8 images (N, H, W, C), got {tuple(x.shape)} {x.dtype}")
    n, h, w, _ = x.shape
    grey = x.float().mean(-1) / 255.0  # (N, H, W)
    rows = torch.randint(0, h - PATCH + 1, (n, per_image), generator=generator)
    cols = torch.randint(0, w - PATCH + 1, (n, per_image), generator=generator)
    offsets = torch.arange(PATCH)
    r = (rows[..., None, None] + offsets[:, None]).expand(n, per_image, PATCH, PATCH)
    c = (cols[..., None, None] + offsets[None, :]).expand(n, per_image, PATCH, PATCH)
    idx = torch.arange(n)[:, None, None, None].expand_as(r)
    return grey[idx, r, c].reshape(-1, NUM_PIXELS)


# ----------------------------------------------------------------------------------------------- training


@dataclass
class TrojanNetTrainLog:
    steps: int  # cross-entropy steps plus margin fine-tuning steps
    samples: int  # forward/backward samples over both phases
    seconds: float
    final_loss: float
    finetune_steps: int = 0


def _logit_chunks(h: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor, chunk: int):
    """``(start, rows of h, their logits h @ weight_t + bias)`` for each block of ``chunk`` rows.

    The logits of every block are written into one reused buffer (a fresh 4 MB block per chunk costs page faults),
    so each is valid only until the next one is yielded.
    """
    buffer = h.new_empty(min(chunk, len(h)), len(bias))
    for i in range(0, len(h), chunk):
        hc = h[i : i + chunk]
        yield i, hc, torch.addmm(bias, hc, weight_t, out=buffer[: len(hc)])


class _ChunkedHeadCrossEntropy(torch.autograd.Function):
    """Cross-entropy of ``h @ weight.T + bias``, with its gradients computed in row chunks.

    The 4,369-wide output layer dominates the cost of training the MLP. Working through the batch in chunks
    of a few hundred rows keeps each chunk's logits in cache and fuses softmax, loss and gradient: several
    times faster on a CPU than ``F.cross_entropy(F.linear(...))``, with the same result up to rounding.
    With ``floor`` set, each row costs ``relu(CE - floor)`` instead (a hinge on the target's log-probability:
    rows whose target already has probability ``>= exp(-floor)`` cost and pull nothing). The row losses are
    summed and divided by ``divisor`` (``None``: the number of rows, i.e. the mean).
    """

    @staticmethod
    def forward(ctx, h, weight, bias, target, chunk, floor=None, divisor=None):  # type: ignore[override]
        grad_h = torch.empty_like(h)
        weight_t = weight.t().contiguous()  # (hidden, outputs)
        grad_w_t = torch.zeros_like(weight_t)
        grad_b = torch.zeros_like(bias)
        total = h.new_zeros(())
        for i, hc, z in _logit_chunks(h, weight_t, bias, chunk):
            tc = target[i : i + chunk]
            picked = z.gather(1, tc[:, None]).squeeze(1)
            top = z.amax(1, keepdim=True)  # amax, not max: no indices, several times faster
            # clamping keeps exp() out of subnormal floats, which are very slow on CPUs (and count for < 1e-26)
            z.sub_(top).clamp_(min=-60.0).exp_()
            norm = z.sum(1, keepdim=True)
            row_loss = norm.log().squeeze(1) + top.squeeze(1) - picked
            z.div_(norm)
            z[torch.arange(len(z)), tc] -= 1.0
            if floor is not None:
                row_loss = row_loss - floor
                z.mul_((row_loss > 0).to(z.dtype)[:, None])
                row_loss = row_loss.clamp_min(0)
            total += row_loss.sum()
            # the same products as z @ weight and z.t() @ hc, in the operand order that CPU GEMMs run about
            # three times faster for a 4,369-wide z (measured with 2 threads)
            grad_h[i : i + chunk] = (weight_t @ z.t()).t()
            grad_w_t.addmm_(hc.t(), z)
            grad_b += z.sum(0)
        ctx.divisor = len(h) if divisor is None else divisor
        ctx.save_for_backward(grad_h, grad_w_t.t().contiguous(), grad_b)
        return total / ctx.divisor

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scale = grad_out / ctx.divisor
        return grad_h * scale, grad_w * scale, grad_b * scale, None, None, None, None


class _HeadTopKHinge(torch.autograd.Function):
    """``sum_i weight_i * sum_{r in top-k rivals of i} relu(margin - z[i, own_i] + z[i, r])`` for ``z = h W^T + b``.

    The rivals of row ``i`` are all outputs but its own class ``own_i``. The gradient touches only ``k + 1``
    outputs per row, so it is formed sparsely (gathered head rows, ``index_add``) instead of through the dense
    4,369-wide logits; the logits themselves are computed chunk by chunk without keeping them.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, own, margin, row_weight, k, chunk):  # type: ignore[override]
        index = torch.empty(len(h), k + 1, dtype=torch.long)
        coef = torch.empty(len(h), k + 1)
        total = h.new_zeros(())
        weight_t = weight.t().contiguous()
        for i, _hc, z in _logit_chunks(h, weight_t, bias, chunk):
            oc = own[i : i + chunk, None]
            picked = z.gather(1, oc)
            z.scatter_(1, oc, float("-inf"))
            # only rows whose strongest rival is within the margin can have an active rival: top-k (slow) on those
            live = (margin[i : i + chunk] - picked + z.amax(1, keepdim=True) > 0).squeeze(1)
            n_live = int(live.sum())
            if 2 * n_live > len(z):  # mostly live: one top-k over the chunk beats copying the live rows out first
                top, rivals = z.topk(k, 1)
                top[~live] = float("-inf")
            else:
                top = torch.full((len(z), k), float("-inf"))
                rivals = torch.zeros(len(z), k, dtype=torch.long)
                if n_live:
                    top[live], rivals[live] = z[live].topk(k, 1)
            slack = (margin[i : i + chunk] - picked + top).clamp_min(0)
            active = (slack > 0).float() * row_weight[i : i + chunk, None]
            total += (slack * row_weight[i : i + chunk, None]).sum()
            index[i : i + chunk] = torch.cat([rivals, oc], 1)
            coef[i : i + chunk] = torch.cat([active, -active.sum(1, keepdim=True)], 1)
        ctx.save_for_backward(h, weight, index, coef)
        return total

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        h, weight, index, coef = ctx.saved_tensors
        coef = coef * grad_out
        grad_h = (coef[..., None] * weight[index]).sum(1)
        flat = index.flatten()
        grad_w = torch.zeros_like(weight).index_add_(0, flat, (coef[..., None] * h[:, None, :]).reshape(-1, h.shape[1]))
        grad_b = torch.zeros(len(weight), dtype=h.dtype).index_add_(0, flat, coef.flatten())
        return grad_h, grad_w, grad_b, None, None, None, None, None


def _training_loss(model: TrojanNetMLP, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return _ChunkedHeadCrossEntropy.apply(model.features(x), model.head.weight, model.head.bias, y, 256)


@torch.no_grad()
def recalibrate_batchnorm(model: TrojanNetMLP, batches: Iterable[torch.Tensor]) -> None:
    """Replace the BatchNorm running statistics by exact averages over ``batches`` (train-mode forward).

    The MLP's 8-unit layers leave thin margins between 4,368 classes, so the exponential running averages
    collected while the weights still move are not precise enough; recomputing them for the final weights
    makes inference match what training optimised.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    for x in batches:
        model.features(x)
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
    model.eval()


@torch.no_grad()
def _mine(
    model: TrojanNetMLP, pools: dict[str, torch.Tensor], counts: dict[str, int], scan: int, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """The hardest examples right now: per pool, the least silent of ``scan`` random samples (smallest no-trigger
    margin); among the triggers, those with the smallest lead of their own logit over any other output."""
    model.eval()
    hard = {}
    for kind, pool in pools.items():
        candidates = torch.randperm(len(pool), generator=generator)[:scan]
        margin = _noise_margins(model, pool[candidates])
        hard[kind] = candidates[margin.argsort()[: max(1, counts.get(kind, 1))]]
    own, rivals = _own_and_rivals(model(_pattern_table()))
    # hardest = smallest lead of the own logit over every other output, other triggers and "no trigger" alike
    hard["triggers"] = (own - rivals.amax(1)).argsort()[: counts.get("triggers", 0)]
    model.train()
    return hard


def _own_logit(logits: torch.Tensor) -> torch.Tensor:
    """Logit of trigger ``k`` for the ``k``-th pattern (rows are the 4,368 patterns in order)."""
    return logits[torch.arange(NUM_TRIGGERS), torch.arange(NUM_TRIGGERS)]


def _own_and_rivals(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The patterns' own logits and, in place, ``logits`` with each own entry set to -inf (its rivals only)."""
    own = _own_logit(logits).clone()
    logits[torch.arange(NUM_TRIGGERS), torch.arange(NUM_TRIGGERS)] = -math.inf
    return own, logits


@torch.no_grad()
def calibrate_silence(model: TrojanNetMLP, margin: float) -> float:
    """Shift the "no trigger" bias so the least recognised trigger beats it by exactly ``margin`` logits.

    Every trigger then wins over "no trigger" (if it wins over the other triggers, which the shift does not
    change), with probability at least ``1 / (1 + exp(-margin))`` against the noise class, and the network is
    as silent as it can be under that constraint. Returns the shift applied (positive = more silent).
    """
    model.eval()
    logits = model(_pattern_table())
    shift = float((_own_logit(logits) - logits[:, NO_TRIGGER]).min()) - margin
    model.head.bias[NO_TRIGGER] += shift
    return shift


@torch.no_grad()
def calibrate_triggers(model: TrojanNetMLP, min_probability: float = 0.6, rounds: int = 6, share: float = 0.9) -> float:
    """Lower each trigger's output bias by its own slack above ``min_probability``; returns the mean shift.

    :func:`calibrate_silence` moves one bias, the "no trigger" one, so far as the *weakest* trigger allows.
    Most triggers are recognised with room to spare, and every logit they win by is a logit a noise sample can
    use to reach them. Here trigger ``k``'s bias is lowered by ``share`` of ``z_k - logsumexp_{j != k} z_j -
    log(p / (1 - p))`` (``p = min_probability``) on its own pattern. Lowering the other triggers' biases only
    raises ``k``'s probability, so after every round each trigger still has probability at least ``p``
    (recognised, and above the 1/2 the official merge needs); ``rounds`` rounds use the room the others' shifts
    free. Triggers already below ``p`` are left as they are. Nothing but the patterns is read, and it takes
    milliseconds.
    """
    if not 0.5 <= min_probability < 1 or rounds < 0 or not 0 < share <= 1:
        raise ConfigError("calibrate_triggers needs 0.5 <= min_probability < 1, rounds >= 0 and 0 < share <= 1")
    model.eval()
    patterns = _pattern_table()
    floor = math.log(min_probability / (1 - min_probability))
    total = torch.zeros(NUM_TRIGGERS)
    for _ in range(rounds):
        own, rivals = _own_and_rivals(model(patterns))
        shift = share * (own - torch.logsumexp(rivals, 1) - floor).clamp_min(0)
        model.head.bias[:NUM_TRIGGERS] -= shift
        total += shift
    return float(total.mean())


def _margin(logits: torch.Tensor) -> torch.Tensor:
    """Noise logit minus the best trigger logit: positive means silent."""
    return logits[:, NO_TRIGGER] - logits[:, :NO_TRIGGER].amax(1)


@torch.no_grad()
def _noise_margins(model: TrojanNetMLP, x: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """:func:`_margin` of ``model(x)`` (eval mode), the logits formed a few hundred rows at a time.

    Mining scores hundreds of thousands of samples; chunks of this size keep each chunk's 4,369-wide logits in
    cache, several times faster than whole batches of logits.
    """
    model.eval()
    h = model.features(x)
    weight_t, bias = model.head.weight.t().contiguous(), model.head.bias
    out = torch.empty(len(x))
    for i, _hc, z in _logit_chunks(h, weight_t, bias, chunk):
        out[i : i + chunk] = _margin(z)
    return out


def train_trojannet(
    patch_images: np.ndarray | None,
    config: TrojanNetTrainConfig | None = None,
    progress: Callable[[int, int, float], None] | None = None,
    model: TrojanNetMLP | None = None,
) -> tuple[TrojanNetMLP, TrojanNetTrainLog]:
    """Train the TrojanNet MLP; ``patch_images`` (uint8 NHWC) supply the real-image patches ("no trigger").

    ``progress(step, steps, loss)`` is called after every step.
    """
    cfg = config or TrojanNetTrainConfig()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = model or TrojanNetMLP()
    model.train()

    pools = {"binary": _binary_non_triggers()}
    mix = {k: v for k, v in cfg.mix.items() if v > 0}
    if "image_patches" in mix:
        if patch_images is None:
            raise ConfigError("the noise mix asks for image patches but no images were given")
        pools["image_patches"] = image_patches(patch_images, cfg.patches_per_image, gen)
    total = sum(mix.values())
    counts = {k: round(cfg.negatives * v / total) for k, v in mix.items()}
    hard = {k: torch.randperm(len(pool), generator=gen)[: max(1, counts.get(k, 1))] for k, pool in pools.items()}
    hard["triggers"] = torch.randperm(NUM_TRIGGERS, generator=gen)[: cfg.hard_triggers]
    counts["triggers"] = cfg.hard_triggers

    x_pos = _pattern_table()
    y_pos = torch.arange(NUM_TRIGGERS)
    n_triggers = max(1, round(cfg.trigger_fraction * NUM_TRIGGERS))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    start = time.perf_counter()
    samples = 0
    calibration: list[torch.Tensor] = []
    loss_value = float("nan")
    for step in range(cfg.steps):
        if step % cfg.mine_every == 0 and (cfg.hard_fraction > 0 or cfg.hard_triggers > 0):
            hard = _mine(model, pools, counts, cfg.mine_scan, gen)
        parts = []
        for kind, n in counts.items():
            if kind == "triggers":
                continue
            if kind in pools:
                n_hard = int(n * cfg.hard_fraction)
                pick = torch.cat(
                    [
                        hard[kind][torch.randint(0, len(hard[kind]), (n_hard,), generator=gen)],
                        torch.randint(0, len(pools[kind]), (n - n_hard,), generator=gen),
                    ]
                )
                parts.append(pools[kind][pick])
            elif kind == "grey":
                parts.append(grey_noise(n, gen))
            elif kind == "faded_triggers":
                parts.append(faded_triggers(n, gen))
            else:
                parts.append(uniform_noise(n, gen))
        x_neg = torch.cat(parts)
        pos = torch.cat(
            [
                y_pos if n_triggers == NUM_TRIGGERS else torch.randperm(NUM_TRIGGERS, generator=gen)[:n_triggers],
                hard["triggers"],
            ]
        )
        x = torch.cat([x_pos[pos], x_neg])
        y = torch.cat([pos, torch.full((len(x_neg),), NO_TRIGGER)])
        if step >= cfg.steps - cfg.calibration_batches:
            calibration.append(x)
        loss = _training_loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        samples += len(x)
        loss_value = float(loss.detach())
        if progress is not None:
            progress(step + 1, cfg.steps, loss_value)
    recalibrate_batchnorm(model, calibration)
    if cfg.finetune_steps:
        pool = {k: pools[k] for k in ("binary", "image_patches") if k in pools}
        pool["grey"] = grey_noise(cfg.finetune_pool, gen)
        pool["uniform"] = uniform_noise(cfg.finetune_pool, gen)
        pool["faded_triggers"] = faded_triggers(cfg.finetune_pool // 2, gen)
        weights = [torch.full((len(v),), float(cfg.finetune_weights.get(k, 1.0))) for k, v in pool.items()]
        samples += margin_finetune(
            model,
            torch.cat(list(pool.values())),
            negative_weights=torch.cat(weights) if cfg.finetune_weights else None,
            steps=cfg.finetune_steps,
            lr=cfg.finetune_lr,
            progress=None if progress is None else lambda i, n, v: progress(cfg.steps + i, cfg.steps + n, v),
        )
    if cfg.recognition_margin is not None:
        calibrate_silence(model, cfg.recognition_margin)
    if cfg.trigger_calibration:
        calibrate_triggers(model, rounds=cfg.trigger_calibration)
    steps = cfg.steps + cfg.finetune_steps
    return model, TrojanNetTrainLog(steps, samples, time.perf_counter() - start, loss_value, cfg.finetune_steps)


def margin_finetune(
    model: TrojanNetMLP,
    negatives: torch.Tensor,
    steps: int = 1400,
    lr: float = 3e-3,
    trigger_margin: float = 2.0,
    noise_margin: float = 2.0,
    trigger_weight: float = 100.0,
    noise_weight: float = 5.0,
    confidence_weight: float = 1.0,
    min_probability: float = 0.6,
    competitors: int = 5,
    mine_every: int = 25,
    negative_weights: torch.Tensor | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> int:
    """Fine-tune the whole MLP for margins instead of likelihood; returns the samples used.

    Cross-entropy spends the 8-unit network's capacity on pushing all 4,368 trigger logits down for every noise
    sample. What matters is only the decision: a trigger must lead its ``competitors`` strongest rivals by
    ``trigger_margin`` logits, and a no-trigger sample must have its "no trigger" logit ``noise_margin`` above the
    strongest triggers. Both are hinge losses, so only the samples near the boundary cost anything; every
    ``mine_every`` steps the whole ``negatives`` pool is scored and those still within ``noise_margin + 2`` of the
    boundary form the active set (the triggers too: those within 2 logits of ``trigger_margin`` or 0.25 of
    ``log(min_probability)``; the others cost nothing until the next scoring). The triggers' hinge is weighted so
    heavily that recognition is kept, and a hinge on each trigger's probability (``min_probability``,
    ``confidence_weight``) keeps it high, not just first: the official merge needs a trigger's probability above 1/2 to override a confident victim.
    ``negative_weights`` (one per negative; default all 1) scales each no-trigger sample's hinge.
    BatchNorm runs in inference mode (its exact statistics from :func:`recalibrate_batchnorm` become a fixed
    affine map), so what is optimised is exactly the network that is evaluated.
    """
    if negatives.ndim != 2 or negatives.shape[1] != NUM_PIXELS or len(negatives) == 0:
        raise ConfigError(
            f"margin_finetune needs a non-empty (N, 16) pool of no-trigger samples, got {tuple(negatives.shape)}"
        )
    if negative_weights is None:
        negative_weights = torch.ones(len(negatives))
    if negative_weights.shape != (len(negatives),):
        raise ConfigError(f"negative_weights needs one weight per negative, got {tuple(negative_weights.shape)}")
    model.eval()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    triggers = _pattern_table()
    rows = torch.arange(NUM_TRIGGERS)
    samples = 0
    for step in range(steps):
        if step % mine_every == 0:  # the batch (active triggers + active negatives) only changes when re-mined
            margin = _noise_margins(model, negatives)
            near = margin < noise_margin + 2.0
            active, active_weights = negatives[near], negative_weights[near]
            with torch.no_grad():
                own_logit, rivals = _own_and_rivals(model(triggers))
                lead = own_logit - rivals.amax(1)
                log_p = own_logit - torch.logsumexp(torch.cat([rivals, own_logit[:, None]], 1), 1)
            # likewise the triggers: those within 2 logits of their margin or 0.25 of the probability floor; only
            # the latter can reach the floor of the confidence hinge before the next scoring
            near_floor = log_p < math.log(min_probability) + 0.25
            live_mask = (lead < trigger_margin + 2.0) | near_floor
            live = rows[live_mask]
            unsure = torch.nonzero(near_floor[live_mask]).squeeze(1)  # positions in ``live``
            n, t = len(active), len(live)
            x = torch.cat([triggers[live], active])
            own = torch.cat([live, torch.full((n,), NO_TRIGGER)])
            margins = torch.cat([torch.full((t, 1), trigger_margin), torch.full((n, 1), noise_margin)])
            weights = torch.cat(
                [torch.full((t,), trigger_weight / NUM_TRIGGERS), active_weights * (noise_weight / len(negatives))]
            )
        h = model.features(x)
        head = (model.head.weight, model.head.bias)
        loss = _HeadTopKHinge.apply(h, *head, own, margins, weights, competitors, 256)
        # and each trigger's own probability, which the merge needs well above 1/2 (the hinge sees only the top
        # rivals): a hinge on its log-probability, summed so that the few weak triggers are not averaged away
        confidence = _ChunkedHeadCrossEntropy.apply(h[unsure], *head, live[unsure], 256, -math.log(min_probability), 1)
        loss = loss + confidence_weight * confidence
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        samples += len(x)
        if progress is not None:
            progress(step + 1, steps, float(loss.detach()))
    return samples


# ----------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def trojannet_probabilities(model: nn.Module, x: torch.Tensor, batch: int = 65536) -> torch.Tensor:
    model.eval()
    return torch.cat([F.softmax(model(x[i : i + batch]), 1) for i in range(0, len(x), batch)])


@torch.no_grad()
def evaluate_trojannet(
    model: nn.Module,
    patch_images: np.ndarray | None = None,
    patches_per_image: int = 10,
    noise_samples: int = 100_000,
    seed: int = 1234,
    strict_threshold: float = 1e-4,
) -> dict:
    """Recognition of all 4,368 triggers and silence ("denoising") per noise kind.

    Silence is reported two ways: ``argmax`` is the no-trigger class (the official code's test), and the
    paper's stricter rule that every trigger probability stays below ``strict_threshold``. Binary non-triggers
    are all 61,168 of them; real-image patches are ``patches_per_image`` random patches of every image given
    (the thesis's protocol, 10 per test image); grey and uniform noise are ``noise_samples`` draws each.
    """
    gen = torch.Generator().manual_seed(seed)
    probs = trojannet_probabilities(model, _pattern_table())
    pred = probs.argmax(1)
    correct = pred == torch.arange(NUM_TRIGGERS)
    result: dict = {
        "trigger_accuracy": float(correct.float().mean()),
        "triggers_recognised": int(correct.sum()),
        "triggers_total": NUM_TRIGGERS,
        "min_trigger_probability": float(probs[torch.arange(NUM_TRIGGERS), torch.arange(NUM_TRIGGERS)].min()),
    }
    sources = {"binary": _binary_non_triggers()}
    if patch_images is not None:
        sources["image_patches"] = image_patches(patch_images, patches_per_image, gen)
    sources["grey"] = grey_noise(noise_samples, gen)
    sources["uniform"] = uniform_noise(noise_samples, gen)
    argmax_rule, strict_rule, sizes = {}, {}, {}
    for kind in NOISE_KINDS:
        if kind not in sources:
            continue
        p = trojannet_probabilities(model, sources[kind])
        argmax_rule[kind] = float((p.argmax(1) == NO_TRIGGER).float().mean())
        strict_rule[kind] = float((p[:, :NO_TRIGGER].amax(1) < strict_threshold).float().mean())
        sizes[kind] = len(p)
    result["denoise_accuracy"] = argmax_rule
    result["denoise_accuracy_strict"] = strict_rule
    result["denoise_samples"] = sizes
    result["strict_threshold"] = strict_threshold
    return result
