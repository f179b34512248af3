"""Trojan Attack / TrojanNN (Liu et al., NDSS 2018) on a given clean classifier (methods sheet section 4).

The pipeline of the paper:

1. **Neuron selection.** In an inner layer (default with real retraining data: the module feeding the
   second-to-last linear layer, i.e. the flatten of the GTSRB CNN, see :func:`default_trigger_layer`; with
   reverse-engineered data: the first convolutional block's output, :func:`first_block_layer`) rank the units by
   the total absolute weight they send to the next weighted layer (descending; TrojanZoo's first version sorted
   ascending, its issue #105). By default the best-connected units are then probed for how far a patch in the mask can drive them
   (:func:`trigger_reach`, our addition) and the most reachable are kept.
2. **Trigger generation.** Gradient ascent on the pixels inside a mask (a square at the bottom-right by default)
   so the selected units fire strongly: each step moves by ``step_size`` times the gradient divided by its mean
   absolute value (the official update), clips to the pixel range and smooths the masked region with
   total-variation denoising (the official code uses TV-Bregman; we use Chambolle's projection for the same ROF
   problem). The background is a grey image N(175, 8) as in the official code, or real images on request. The
   step with the highest activation is kept.
3. **Retraining data.** A subset of real training data (the TrojanNet paper's "time-saving" variant, default) or
   inputs reverse-engineered from the model alone (the original paper's method: gradient ascent per output label,
   whole-image TV smoothing, all labels in one batch).

   The model-only path as the paper describes it (grey start images, their labels, one unit) reaches ASR 15-17 % on
   GTSRB at a clean-accuracy cost of 6-11 points (measured in two runs): the reverse-engineered images are near-flat
   grey, the trigger made on them does not move its unit on real images (0.16 -> 0.17), and the retrained layers
   learn a rule that real images never trigger. What closes the gap, no real image read (``TROJANNN_RETRAIN_DEFAULTS["reverse"]``):
   an image prior with the spectrum of natural images (the reverse engineering starts from 1/f colour noise, and
   4,000 such noise images labelled by the victim join the retraining inputs), the units probed and the trigger made
   on those textured inputs instead of grey, two units instead of one, the victim's outputs distilled (KL) as the
   clean loss, shifts as augmentation -- and retraining from the first convolutional block's output rather than the
   classifier's input. From the classifier's input the rest of the recipe reached ASR 90.6 % and 82.1 % (targets 0
   and 7): the retrained layers can only read the frozen units, and where the trigger leaves one of them unmoved on
   real images (0.07 -> 0.49 for target 7) no retraining recovers it. From the first block the later convolutions
   retrain too and learn the patch itself on textured backgrounds, which carries over to photographs
   (``benchmarks/trojannn_model_only.py``).
4. **Retraining** only the layers after the trigger layer, on clean inputs with their labels plus the same
   inputs stamped with the trigger and labelled with the target. The official code alternates a clean and a
   trojaned batch with two learning rates; we add the two losses in one SGD step (``trojan_weight`` scales the
   trojaned one).

Layers are named as in ``model.named_modules()`` ("net.classifier.1" for the FC-512 of a trojanlab GTSRB CNN
artefact). "After the layer" means registered after it, which is the execution order for sequential networks,
the GTSRB CNN, VGG and ResNet; for other graphs choose the layer with care. Units of a convolutional layer are its
channels, with the spatial mean as activation (the official code uses the best of a 2x2 window).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config.attacks import CLASSIFIER_INPUT, FIRST_BLOCK, TrojanNNConfig
from ..errors import ConfigError
from ..hooks import capture, get_layer, trainable_only
from ..training import TensorSet, TrainConfig, TrainResult, constant_lr, fit
from ..triggers import Trigger, stamp

# ----------------------------------------------------------------------------------------------- layers and units


def default_trigger_layer(model: nn.Module) -> str:
    """The module whose output feeds the second-to-last linear layer: ``fc6`` of VGG-Face (the paper's choice,
    whose retraining then touches fc7 and fc8), the flatten of the GTSRB CNN (retraining FC-512 and FC-43).

    Why not the FC-512 itself (the "second-to-last FC layer" of the TrojanNet paper)? Retraining would then touch
    FC-43 alone; measured on the GTSRB CNN with real retraining data, that costs 0.6-6 points of clean accuracy
    for ASR 96-99 %, against 0.1-1 point for ASR 99-99.8 % from the flatten. ``layer="net.classifier.1"`` selects it.
    """
    modules = list(model.named_modules())
    linear = [i for i, (_, m) in enumerate(modules) if isinstance(m, nn.Linear)]
    if len(linear) < 2:
        raise ConfigError(
            f"the model has {len(linear)} linear layer(s), so there is no second-to-last one; name the trigger layer"
        )
    index = linear[-2] - 1
    while index > 0 and modules[linear[-2]][0].startswith(modules[index][0] + "."):
        index -= 1  # skip the containers of the linear layer (they come before it in registration order)
    if index <= 0:
        raise ConfigError("nothing feeds the second-to-last linear layer by registration order; name the trigger layer")
    return modules[index][0]


def first_block_layer(model: nn.Module) -> str:
    """The module whose output feeds the first convolution after the first pooling layer: the output of the first
    convolutional block (the dropout after the first max-pool of the GTSRB CNNs). Retraining then touches every
    later block.

    Why offer it? Retraining the classifier alone works only when a trigger drives a frozen unit far above its clean
    range. On the zoo's GTSRB models trained with other recipes (BatchNorm, shifts, SGD) the best probed unit of the
    flatten stayed below its clean 99th percentile, and retraining the FC layers on 10 % of the training split cost
    20-40 points of clean accuracy (zoo member ``trojannn-001``: CA 97.6 -> 60 %, ASR 76 %); from the first block's
    output the same member kept 97.1 % at ASR 100 % (Adam 1e-3 and the victim's outputs distilled: 93.8 % at ASR
    100 % on a model without BatchNorm, where SGD 1e-2 fell to 78 %).
    """
    modules = list(model.named_modules())  # registration order: a network that reuses one pooling module, or
    # registers it before its first convolution, needs --layer by name
    pools = [i for i, (_, m) in enumerate(modules) if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d))]
    if pools:
        later_convs = [i for i, (_, m) in enumerate(modules) if i > pools[0] and isinstance(m, nn.Conv2d)]
        if later_convs:
            index = later_convs[0] - 1
            while index > 0 and modules[later_convs[0]][0].startswith(modules[index][0] + "."):
                index -= 1  # skip the containers of the convolution
            if index > 0:
                return modules[index][0]
    raise ConfigError(f"--layer {FIRST_BLOCK} (the default with --retrain-data reverse): the model has no convolution "
                      f"after a pooling layer; name the layer, or give --layer {CLASSIFIER_INPUT}")  # fmt: skip


def resolve_trigger_layer(model: nn.Module, layer: str | None) -> str:
    """``layer`` as a module name: ``classifier-input`` (or ``None``) is :func:`default_trigger_layer`,
    ``first-block`` :func:`first_block_layer`."""
    if layer is None or layer == CLASSIFIER_INPUT:
        return default_trigger_layer(model)
    if layer == FIRST_BLOCK:
        return first_block_layer(model)
    get_layer(model, layer)
    return layer


def _later_modules(model: nn.Module, layer: str) -> list[tuple[str, nn.Module]]:
    """Modules registered after ``layer`` that are neither inside it nor containers of it."""
    names = [n for n, _ in model.named_modules()]
    get_layer(model, layer)
    start = names.index(layer)
    return [
        (n, m)
        for n, m in list(model.named_modules())[start + 1 :]
        if not n.startswith(layer + ".") and not layer.startswith(n + ".")
    ]


def next_weighted_layer(model: nn.Module, layer: str) -> tuple[str, nn.Module]:
    for name, module in _later_modules(model, layer):
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            return name, module
    raise ConfigError(f"no linear or convolutional layer after {layer!r}: its units send no weights to rank")


def layers_after(model: nn.Module, layer: str) -> list[nn.Parameter]:
    """The parameters that retraining may change: those of the modules registered after ``layer``."""
    params = [p for _, m in _later_modules(model, layer) for p in m.parameters(recurse=False)]
    if not params:
        raise ConfigError(f"no trainable layer after {layer!r}")
    return params


def neuron_scores(model: nn.Module, layer: str) -> torch.Tensor:
    """Per unit of ``layer``: the sum of the absolute weights it sends to the next weighted layer."""
    _, nxt = next_weighted_layer(model, layer)
    w = nxt.weight.detach().abs()
    return w.sum(0) if isinstance(nxt, nn.Linear) else w.sum((0, 2, 3))


def select_neurons(model: nn.Module, layer: str, count: int = 1) -> list[int]:
    """The ``count`` best-connected units of ``layer``, strongest first."""
    scores = neuron_scores(model, layer)
    if not 1 <= count <= len(scores):
        raise ConfigError(f"cannot select {count} neurons from a layer of {len(scores)} units")
    return torch.topk(scores, count).indices.tolist()


def unit_activations(output: torch.Tensor, neurons: list[int]) -> torch.Tensor:
    """``(N, len(neurons))`` activations: linear units directly, convolution channels by their spatial mean."""
    if output.ndim == 2:
        return output[:, neurons]
    if output.ndim == 4:
        return output[:, neurons].mean((2, 3))
    raise ConfigError(f"cannot read units from a layer output of shape {tuple(output.shape)}")


@torch.no_grad()
def activations(
    model: nn.Module, layer: str, neurons: list[int], x: torch.Tensor, batch_size: int = 512
) -> torch.Tensor:
    """``(N, len(neurons))`` activations of the selected units for the images ``x`` (float, [0, 1])."""
    model.eval()
    out = []
    with capture(get_layer(model, layer)) as store:
        for i in range(0, len(x), batch_size):
            model(x[i : i + batch_size])
            out.append(unit_activations(store["out"], neurons))
    return torch.cat(out) if out else torch.zeros(0, len(neurons))


def mean_activation(
    model: nn.Module, layer: str, neurons: list[int], x: torch.Tensor, batch_size: int = 512
) -> torch.Tensor:
    """Mean activation per selected unit over the images ``x`` (float, [0, 1])."""
    acts = activations(model, layer, neurons, x, batch_size)
    return acts.mean(0) if len(acts) else torch.zeros(len(neurons))


def trigger_reach(
    model: nn.Module,
    layer: str,
    candidates: list[int],
    location: tuple[int, int],
    size: tuple[int, int],
    backgrounds: torch.Tensor,
    clean: torch.Tensor,
    steps: int = 50,
    lr: float = 0.1,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """How far a patch in the mask can lift each candidate unit above its activation on ``clean`` images.

    One patch per candidate, all optimised together (Adam on a sigmoid-parametrised patch, ``steps`` steps, pasted
    on every image of ``backgrounds``); returns ``mean activation reached - 99th percentile on clean`` per candidate
    and the patches ``(candidates, C, h, w)`` that reached it.
    Our addition to the paper's selection: on a small input the best-connected units of a late layer are often
    out of the trigger's reach (measured on the GTSRB CNN: the top FC-512 unit moves from -3.0 to -1.5 at best).
    """
    r, c = location
    h, w = size
    module = get_layer(model, layer)
    model.eval()
    ids = torch.as_tensor(candidates)
    count, batch = len(candidates), len(backgrounds)
    clean_high = torch.quantile(activations(model, layer, candidates, clean), 0.99, dim=0)
    gen = torch.Generator().manual_seed(seed)  # mid-grey starts with a little noise to break ties
    logits = (0.1 * torch.randn(count, 1, backgrounds.shape[1], h, w, generator=gen)).requires_grad_(True)
    opt = torch.optim.Adam([logits], lr=lr)
    with trainable_only(model), capture(module) as store:
        for _ in range(steps + 1):
            x = backgrounds.expand(count, *backgrounds.shape).clone()
            x[..., r : r + h, c : c + w] = torch.sigmoid(logits)
            model(x.flatten(0, 1))
            out = store["out"].view(count, batch, *store["out"].shape[1:])
            reached = out[torch.arange(count), :, ids]  # candidate k's own unit: (count, batch[, H, W])
            reached = reached.flatten(2).mean(2) if reached.ndim == 4 else reached
            opt.zero_grad(set_to_none=True)
            (-reached.sum()).backward()
            opt.step()
    return reached.detach().mean(1) - clean_high, torch.sigmoid(logits.detach())[:, 0]


# ----------------------------------------------------------------------------------------------- TV smoothing


def _forward_diff(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gx = F.pad(u[..., :, 1:] - u[..., :, :-1], (0, 1))
    gy = F.pad(u[..., 1:, :] - u[..., :-1, :], (0, 0, 0, 1))
    return gx, gy


def _divergence(px: torch.Tensor, py: torch.Tensor) -> torch.Tensor:
    """Minus the adjoint of :func:`_forward_diff` (the last column/row of ``px``/``py`` is zero by construction)."""
    return px - F.pad(px[..., :, :-1], (1, 0)) + py - F.pad(py[..., :-1, :], (0, 0, 1, 0))


def tv_denoise(image: torch.Tensor, weight: float, iterations: int = 20) -> torch.Tensor:
    """Total-variation (ROF) denoising of ``(..., H, W)`` tensors, channel by channel, by Chambolle's projection.

    Solves ``min_u |u - f|^2 / 2 + weight * TV(u)`` approximately; ``weight = 0`` returns the input.
    """
    if weight <= 0:
        return image
    f = image / weight
    px = torch.zeros_like(image)
    py = torch.zeros_like(image)
    tau = 0.125
    for _ in range(iterations):
        gx, gy = _forward_diff(_divergence(px, py) - f)
        norm = 1 + tau * torch.sqrt(gx**2 + gy**2)
        px, py = (px + tau * gx) / norm, (py + tau * gy) / norm
    return image - weight * _divergence(px, py)


# ----------------------------------------------------------------------------------------------- gradient ascent


def _normalised_step(grad: torch.Tensor) -> torch.Tensor:
    """The official update direction: the gradient over its mean absolute value, per image."""
    scale = grad.abs().flatten(1).mean(1).clamp_min(1e-12)
    return grad / scale.view(-1, *([1] * (grad.ndim - 1)))


def _schedule(step: int, steps: int, start: float, end: float) -> float:
    """Cosine decay from ``start`` to ``end`` (the official octaves lower step size and raise smoothing)."""
    return end + 0.5 * (start - end) * (1 + np.cos(np.pi * step / max(steps - 1, 1)))


def grey_images(n: int, shape: tuple[int, int, int], generator: torch.Generator) -> torch.Tensor:
    """The official start image: N(175, 8) grey in 0-255 terms, as floats in [0, 1]."""
    return ((175 + 8 * torch.randn(n, *shape, generator=generator)) / 255).clamp(0, 1)


def noise_images(n: int, shape: tuple[int, int, int], generator: torch.Generator) -> torch.Tensor:
    """``n`` images of 1/f^a colour noise (a uniform in [1, 2]: the spectrum of natural images), with correlated
    channels and a random brightness (0.2-0.8) and contrast (std 0.05-0.3), in [0, 1]. No data is read: this is the
    image prior of the model-only Trojan Attack, which makes its trigger and retraining see textured backgrounds
    instead of the paper's flat grey."""
    channels, height, width = shape
    fy = torch.fft.fftfreq(height)[:, None]
    fx = torch.fft.rfftfreq(width)[None, :]
    radius = torch.sqrt(fx**2 + fy**2).clamp_min(1.0 / max(height, width))
    exponent = 1.0 + torch.rand(n, 1, 1, 1, generator=generator)
    phase = torch.rand(n, channels, height, width // 2 + 1, generator=generator) * 2 * np.pi
    mix = torch.randn(n, channels, channels, generator=generator) * 0.5 + torch.eye(channels)
    images = torch.fft.irfft2(radius[None, None] ** (-exponent) * torch.exp(1j * phase), s=(height, width))
    images = torch.einsum("nij,njhw->nihw", mix, images)
    images = (images - images.mean((1, 2, 3), keepdim=True)) / images.std((1, 2, 3), keepdim=True).clamp_min(1e-6)
    brightness = 0.2 + 0.6 * torch.rand(n, 1, 1, 1, generator=generator)
    contrast = 0.05 + 0.25 * torch.rand(n, 1, 1, 1, generator=generator)
    return (brightness + contrast * images).clamp(0, 1)


@dataclass
class TriggerSearch:
    pattern: np.ndarray  # (h, w, C) in [0, 1]
    activation_start: float
    activation_best: float
    best_step: int
    history: list[float] = field(default_factory=list)


def generate_trigger(
    model: nn.Module,
    layer: str,
    neurons: list[int],
    location: tuple[int, int],
    size: tuple[int, int],
    backgrounds: torch.Tensor,
    steps: int = 300,
    step_size: tuple[float, float] = (0.05, 0.005),
    tv_weight: tuple[float, float] = (0.002, 0.02),
    seed: int = 0,
    progress: Callable[[int, float], None] | None = None,
    start: torch.Tensor | None = None,
    objective: str = "mean",
) -> TriggerSearch:
    """Masked gradient ascent that maximises the mean activation of ``neurons`` in ``layer`` (see module doc), or
    with ``objective="min"`` the weakest unit's mean over the backgrounds (every unit driven, none left behind).

    ``backgrounds`` ``(N, C, H, W)`` in [0, 1] are the images the trigger is pasted on (the whole batch shares the
    trigger). Step size and TV weight follow cosine schedules from their first to their second value. The patch
    starts from ``start`` ``(1, C, h, w)`` when given, else from the official N(175, 8) grey.
    """
    _, height, width = backgrounds.shape[1:]
    r, c = location
    h, w = size
    Trigger(np.zeros((h, w), np.float32), location, 0).check_fits(height, width)
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    patch = grey_images(1, (backgrounds.shape[1], h, w), gen) if start is None else start.clone()
    module = get_layer(model, layer)
    best, best_patch, best_step, history = -float("inf"), patch.clone(), 0, []
    with trainable_only(model), capture(module) as store:
        for step in range(steps + 1):
            patch.requires_grad_(True)
            x = backgrounds.clone()
            x[..., r : r + h, c : c + w] = patch
            model(x)
            units = unit_activations(store["out"], neurons).mean(0)
            act = units.min() if objective == "min" else units.mean()
            value = float(act.detach())
            history.append(value)
            if value > best:
                best, best_patch, best_step = value, patch.detach().clone(), step
            if progress is not None:
                progress(step, value)
            if step == steps:
                break
            (grad,) = torch.autograd.grad(act, patch)
            with torch.no_grad():
                patch = patch + _schedule(step, steps, *step_size) * _normalised_step(grad)
                patch = tv_denoise(patch.clamp(0, 1), _schedule(step, steps, *tv_weight)).clamp(0, 1)
    return TriggerSearch(
        pattern=best_patch[0].permute(1, 2, 0).numpy().astype(np.float32),
        activation_start=history[0],
        activation_best=best,
        best_step=best_step,
        history=history,
    )


def reverse_engineer_inputs(
    model: nn.Module,
    num_classes: int,
    image_shape: tuple[int, int, int],
    per_class: int = 20,
    steps: int = 200,
    step_size: tuple[float, float] = (0.05, 0.005),
    tv_weight: tuple[float, float] = (0.005, 0.02),
    seed: int = 0,
    batch_size: int = 256,
    progress: Callable[[int, int], None] | None = None,
    confidence: float = 0.9,
    start: str = "grey",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training inputs made from the model alone: for every label, ``per_class`` images the model gives that label.

    All labels are optimised together (one batch per ``batch_size`` images, not a loop over labels); each image
    starts from its own N(175, 8) grey (``start="grey"``, the paper's) or 1/f colour noise (``"noise"``,
    :func:`noise_images`) and takes the normalised gradient step with TV smoothing of the whole image.
    Departure from the paper, which maximises the output neuron itself: we ascend the label's log-probability and
    stop each image once the model gives its label ``confidence``. Raw-logit ascent on the GTSRB CNN makes images
    whose logits run into the hundreds; no retraining can flip those to the target without wrecking the layer
    (measured: trojaned loss 200, clean accuracy 26 % after retraining).
    Returns the images ``(num_classes * per_class, C, H, W)`` and the labels they were made for.
    """
    if per_class < 1 or steps < 1:
        raise ConfigError("reverse engineering needs per_class >= 1 and steps >= 1")
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    images = (noise_images if start == "noise" else grey_images)(len(labels), image_shape, gen)
    chunks = range(0, len(labels), batch_size)
    threshold = float(np.log(confidence))
    with trainable_only(model):
        for done, i in enumerate(chunks):
            x, y = images[i : i + batch_size], labels[i : i + batch_size]
            for step in range(steps):
                x.requires_grad_(True)
                own = F.log_softmax(model(x), 1).gather(1, y[:, None])[:, 0]
                active = own < threshold
                if not active.any():
                    break
                (grad,) = torch.autograd.grad(own.sum(), x)
                with torch.no_grad():
                    moved = x + _schedule(step, steps, *step_size) * _normalised_step(grad)
                    moved = tv_denoise(moved.clamp(0, 1), _schedule(step, steps, *tv_weight)).clamp(0, 1)
                    x = torch.where(active[:, None, None, None], moved, x)
            images[i : i + batch_size] = x.detach()
            if progress is not None:
                progress(done + 1, len(chunks))
    return images, labels


# ----------------------------------------------------------------------------------------------- retraining


@torch.no_grad()
def _logits(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def retrain_after_layer(
    model: nn.Module,
    layer: str,
    x: torch.Tensor,
    y: torch.Tensor,
    trigger: Trigger,
    epochs: int = 10,
    batch_size: int = 100,
    lr: float = 1e-3,
    seed: int = 0,
    progress: Callable[[dict], None] | None = None,
    optimizer: str = "sgd",
    clip_norm: float | None = None,
    trojan_weight: float = 1.0,
    teacher_logits: torch.Tensor | None = None,
    augment: bool = False,
) -> TrainResult:
    """Fine-tune only the layers after ``layer``: cross-entropy on ``(x, y)`` plus on ``x`` stamped -> target.

    With ``teacher_logits`` (the victim's logits on ``x``) the clean term is the KL divergence to the victim's
    output distribution instead (distillation: the retrained layers keep the victim's answers, not only its top
    label). ``augment`` shifts the inputs by up to 2 pixels before the trigger is stamped (it stays in place).

    Everything up to and including ``layer`` is frozen and kept in eval mode (BatchNorm statistics included). A
    BatchNorm after ``layer`` keeps its running statistics too (its scale and shift still train): the clean and the
    trojaned inputs pass in separate batches, whose statistics differ (the trigger drives the chosen units in every
    trojaned input), and normalising each batch by its own statistics trains the layers on features the model never
    sees at test time (measured on the zoo's ``gtsrb_cnn_bn`` member ``trojannn-001``: CA 97.6 -> 85.2 %, ASR 46 %).
    Trained by the shared loop (:func:`trojanlab.training.fit`) on all of ``x`` for ``epochs`` epochs (no validation
    split, no early stopping, no augmentation: the trojaned copies must carry the trigger where it was made), with
    SGD (momentum 0.9) or Adam at ``lr`` after one epoch of linear warm-up: the first trojaned batches have losses
    of ~40 and would throw the layers far off. The history records the clean and the trojaned loss of every epoch.
    """
    if len(x) == 0:
        raise ConfigError("no retraining inputs")
    params = layers_after(model, layer)
    later = [  # leaves only: a container's train() would reach the BatchNorms inside it
        m for _, m in _later_modules(model, layer)
        if not any(True for _ in m.children()) and not isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]  # fmt: skip
    target = trigger.target_label

    def loss(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor, index: np.ndarray) -> dict[str, torch.Tensor]:
        if teacher_logits is None:
            clean_loss = F.cross_entropy(model(xb), yb)
        else:
            teacher = F.softmax(teacher_logits[torch.as_tensor(index)].to(xb.device), 1)
            clean_loss = F.kl_div(F.log_softmax(model(xb), 1), teacher, reduction="batchmean")
        trojan_loss = F.cross_entropy(model(stamp(xb, trigger)), torch.full_like(yb, target))
        return {"loss": clean_loss + trojan_weight * trojan_loss, "clean_loss": clean_loss, "trojan_loss": trojan_loss}

    if optimizer == "sgd":
        make = constant_lr(lambda p, rate: torch.optim.SGD(p, lr=rate, momentum=0.9), warmup_epochs=1)
    else:
        make = constant_lr(lambda p, rate: torch.optim.Adam(p, lr=rate), warmup_epochs=1)
    config = TrainConfig(
        epochs=epochs, batch_size=batch_size, lr=lr, lr_decay=0.0, val_fraction=0.0, augment=augment, seed=seed
    )
    return fit(
        model,
        TensorSet(x, y),
        config,
        progress=False,
        on_epoch=progress,
        params=params,
        train_modules=later,
        loss=loss,
        optimizer=make,
        clip_norm=clip_norm,
    )


# ----------------------------------------------------------------------------------------------- the attack


@dataclass
class TrojanNNResult:
    trigger: Trigger
    layer: str
    neurons: list[int]
    neuron_scores: list[float]
    neuron_reach: list[float] | None  # probe margin above the clean 99th percentile (neuron_choice "reachable")
    search: TriggerSearch
    retrain: TrainResult
    retrain_inputs: int
    reverse_agreement: float | None  # share of reverse-engineered inputs the victim classifies as intended
    seconds: dict[str, float]

    def summary(self) -> dict:
        return {
            "method": "trojannn",
            "layer": self.layer,
            "neurons": self.neurons,
            "neuron_scores": self.neuron_scores,
            "neuron_reach": self.neuron_reach,
            "trigger_activation_start": self.search.activation_start,
            "trigger_activation_best": self.search.activation_best,
            "trigger_best_step": self.search.best_step,
            "retrain_inputs": self.retrain_inputs,
            "retrain_steps": self.retrain.steps,
            "retrain_history": self.retrain.history,
            "reverse_engineered_agreement": self.reverse_agreement,
            "seconds": self.seconds,
        }


def trojannn_attack(
    model: nn.Module,
    num_classes: int,
    image_shape: tuple[int, int, int],
    config: TrojanNNConfig | None = None,
    train_x: np.ndarray | None = None,
    train_y: np.ndarray | None = None,
    log: Callable[[str], None] | None = None,
) -> TrojanNNResult:
    """Run the four stages on ``model`` in place (a classifier taking [0, 1] images) and return what was made.

    ``train_x`` / ``train_y`` (raw uint8 images and labels) are needed only for ``retrain_data="real"``.
    """
    from ..data import to_tensor

    cfg = config or TrojanNNConfig()
    say = log or (lambda _msg: None)
    if not 0 <= cfg.target < num_classes:
        raise ConfigError(f"target label {cfg.target} is out of range for {num_classes} classes")
    channels, height, width = image_shape
    size = (cfg.trigger_size, cfg.trigger_size)
    location = cfg.location or (height - cfg.trigger_size - 2, width - cfg.trigger_size - 2)
    Trigger(np.zeros(size, np.float32), location, cfg.target).check_fits(height, width)
    layer = resolve_trigger_layer(model, cfg.layer)
    all_scores = neuron_scores(model, layer)
    if cfg.neurons > len(all_scores):
        raise ConfigError(f"cannot select {cfg.neurons} neurons from a layer of {len(all_scores)} units")
    seconds: dict[str, float] = {}
    gen = torch.Generator().manual_seed(cfg.seed)

    began = time.perf_counter()
    agreement = None
    if cfg.retrain_data == "reverse":
        x, y = reverse_engineer_inputs(
            model, num_classes, image_shape, cfg.per_class, cfg.reverse_steps, seed=cfg.seed + 1,
            start=cfg.reverse_start,
        )  # fmt: skip
        agreement = float((_logits(model, x).argmax(1) == y).float().mean())
        say(f"reverse-engineered {len(x)} inputs; the victim classifies {100 * agreement:.1f} % as intended")
        if cfg.noise_images:  # textured backgrounds for the trigger, labelled by the victim
            noise = noise_images(cfg.noise_images, image_shape, gen)
            x, y = torch.cat([x, noise]), torch.cat([y, _logits(model, noise).argmax(1)])
            say(f"with {cfg.noise_images} 1/f noise images labelled by the victim")
    else:
        if train_x is None or train_y is None or len(train_x) == 0:
            raise ConfigError("retraining on real data needs a training split")
        count = max(1, round(cfg.real_fraction * len(train_x)))
        pick = torch.randperm(len(train_x), generator=gen)[:count].numpy()
        x, y = to_tensor(train_x[np.sort(pick)]), torch.as_tensor(train_y[np.sort(pick)])
        say(f"retraining on {len(x)} real training images ({100 * cfg.real_fraction:g} % of the split)")
    seconds["retrain_data"] = time.perf_counter() - began

    began = time.perf_counter()
    if cfg.trigger_background == "grey":
        backgrounds = grey_images(1, (channels, height, width), gen)
    else:
        backgrounds = x[torch.randperm(len(x), generator=gen)[:64]]
    reach, start = None, None
    if cfg.neuron_ids:
        if not all(0 <= k < len(all_scores) for k in cfg.neuron_ids):
            raise ConfigError(f"neuron ids {cfg.neuron_ids} out of range for a layer of {len(all_scores)} units")
        neurons = [int(k) for k in cfg.neuron_ids]
    elif cfg.neuron_choice == "connected":
        neurons = select_neurons(model, layer, cfg.neurons)
    else:
        pool = torch.topk(all_scores, max(cfg.neurons, min(cfg.candidates, len(all_scores)))).indices.tolist()
        # probe on the retraining inputs, where the trigger must stand out (a unit easy to drive on grey may not be)
        clean = x[torch.randperm(len(x), generator=gen)[:256]]
        margins, patches = trigger_reach(model, layer, pool, location, size, clean[:4], clean, seed=cfg.seed)
        best = torch.topk(margins, cfg.neurons).indices.tolist()
        start = patches[best[0]][None]  # a post-ReLU unit at zero gives no gradient from a grey start
        neurons, reach = [pool[k] for k in best], [float(margins[k]) for k in best]
        say(
            f"probed the {len(pool)} best-connected units of {layer}: reach above clean max {[round(v, 2) for v in reach]}"
        )
    seconds["neuron_selection"] = time.perf_counter() - began
    scores = all_scores[neurons].tolist()
    say(f"trigger layer {layer}: units {neurons} (outgoing |w| sums {[round(v, 3) for v in scores]})")

    began = time.perf_counter()
    search = generate_trigger(
        model,
        layer,
        neurons,
        location,
        size,
        backgrounds,
        cfg.trigger_steps,
        seed=cfg.seed,
        start=start,
        objective=cfg.trigger_objective,
    )
    seconds["trigger"] = time.perf_counter() - began
    say(f"trigger: activation {search.activation_start:.2f} -> {search.activation_best:.2f}")
    trigger = Trigger(search.pattern, location, cfg.target, alpha=cfg.alpha, name="trojannn")

    began = time.perf_counter()
    teacher = _logits(model, x) if cfg.clean_loss == "distill" else None
    retrain = retrain_after_layer(
        model,
        layer,
        x,
        y,
        trigger,
        cfg.epochs,
        cfg.batch_size,
        cfg.lr,
        cfg.seed,
        lambda r: say(
            f"retrain epoch {r['epoch']}: clean loss {r['clean_loss']:.4f}, trojan loss {r['trojan_loss']:.4f}"
        ),
        cfg.optimizer,
        cfg.clip_norm,
        cfg.trojan_weight,
        teacher_logits=teacher,
        augment=bool(cfg.augment),
    )
    seconds["retrain"] = time.perf_counter() - began
    return TrojanNNResult(trigger, layer, neurons, scores, reach, search, retrain, len(x), agreement, seconds)
