"""The held-out measure every clean-data rule reads, and the check that it measures the model's clean accuracy.

A defense's automatic rule promises to keep clean accuracy within a tolerance, and it can only read the defender's
held-out clean images to keep that promise. Those images usually come from the model's training split, which it has
memorised: a model whose test accuracy is 94 % scores 100 % on them, and a repair that costs five points of test
accuracy costs them none. Images of another distribution fail the other way (a model trained without augmentation
scored 41 % on jittered copies of its images while its test accuracy was 94 %, and a pruning rule read on them cut
it to 66 %).

So the measure is checked before it is used. Its reference is the model's clean accuracy as stated for it -- given
by the defender (``--clean-accuracy``: the supplier's figure, or one measured on their own data), else the figure
recorded beside a trojanlab artefact when it was made. The unrepaired model's score on the held-out images is
compared with it:

- at or below it, by at most ``margin`` (at least two standard errors of an accuracy read on that many images):
  the images are scored as they are;
- above it (images the model has fitted, however few): they are scored through a jitter (sub-pixel shift,
  brightness, contrast, noise; drawn once, so a strength only scales it) whose strength is chosen by bisection so
  that the unrepaired model scores its reference on the jittered copies -- images about as hard for it as its test
  images (fitted images barely move when a repair costs test accuracy);
- further below, or above by more than the strongest jitter takes away: no measure here tracks its clean accuracy,
  and the defense refuses before any work, saying so.

Without a reference nothing can be checked: the images are scored as the rule always scored them and the report
says the measure is unchecked. Every defense's report gives the drop this measure predicts beside the measured one.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data import ImageSet, to_tensor
from ..errors import DataError

MAX_STRENGTH = 4.0  # 4x the base jitter: shifts of 12 px, brightness +-0.8 at 32 x 32 -- past that nothing is left
BISECTION_STEPS = 14


def recorded_clean_accuracy(path: str | Path) -> float | None:
    """The clean accuracy recorded beside the trojanlab artefact at ``path`` when it was made (its ``result.json``,
    in the model folder or the run folder above it), or ``None``."""
    folder = Path(path)
    for candidate in (folder / "result.json", folder.parent / "result.json"):
        try:
            record = json.loads(candidate.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(record, dict):
            continue
        after = record.get("after")
        value = after.get("clean_accuracy") if isinstance(after, dict) else record.get("clean_accuracy")
        if isinstance(value, (int, float)) and 0 < value <= 1:
            return float(value)
    return None


class Jitter:
    """Label-preserving jitter of ``x`` (``(N, C, H, W)`` in [0, 1]), ``copies`` versions of each image, with every
    random draw made once: :meth:`apply` at strength ``s`` shifts by up to ``s`` tenths of the side (sub-pixel,
    edges replicated), moves brightness by up to ``0.2 s``, scales contrast by ``1 +- 0.2 s`` and adds noise of std
    ``0.03 s``; strength 1 is :func:`~trojanlab.defenses.anp.jitter_images`'s jitter."""

    def __init__(self, x: torch.Tensor, copies: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.x = x.repeat(copies, 1, 1, 1)
        n = len(self.x)
        self.shift = torch.rand(n, 2, generator=gen) * 2 - 1
        self.brightness = torch.rand(n, 1, 1, 1, generator=gen) - 0.5
        self.contrast = torch.rand(n, 1, 1, 1, generator=gen) - 0.5
        self.noise = torch.randn(self.x.shape, generator=gen)

    def apply(self, strength: float) -> torch.Tensor:
        if strength <= 0:
            return self.x
        n = len(self.x)
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0] = theta[:, 1, 1] = 1
        theta[:, :, 2] = self.shift * 0.2 * strength  # a tenth of the side is 0.2 in grid units ([-1, 1])
        grid = F.affine_grid(theta, list(self.x.shape), align_corners=False)
        moved = F.grid_sample(self.x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        contrast = 1 + self.contrast * 0.4 * strength
        out = (moved - 0.5) * contrast + 0.5 + self.brightness * 0.4 * strength + self.noise * 0.03 * strength
        return out.clamp_(0, 1)


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device, batch: int = 512) -> float:
    model.eval()
    hits = sum(int((model(x[i : i + batch].to(device)).argmax(1).cpu() == y[i : i + batch]).sum())
               for i in range(0, len(x), batch))  # fmt: skip
    return hits / max(1, len(y))


@dataclass
class HeldOutMeasure:
    """The images a rule scores (``x``, ``y``), how they were chosen, and the unrepaired model's score on them."""

    x: torch.Tensor
    y: torch.Tensor
    base: float
    strength: float
    reference: float | None
    reference_from: str | None
    plain: float
    checked: bool
    record: dict[str, Any] = field(default_factory=dict)

    def score(self, model: nn.Module, device: str | torch.device = "cpu") -> float:
        """``model``'s top-1 accuracy on the measure's images."""
        return _accuracy(model, self.x, self.y, device)

    def predicted_drop(self, model: nn.Module, device: str | torch.device = "cpu") -> float:
        """The clean-accuracy drop the measure predicts for ``model`` against the unrepaired one."""
        return self.base - self.score(model, device)

    def like_measure(self, images: ImageSet, seed: int = 0) -> ImageSet:
        """``images`` jittered (one copy each) at this measure's strength: images the model scores about its stated
        accuracy on, where ``images`` are fitted like the held-out ones (unchanged when the measure reads the images
        as they are)."""
        if self.strength == 0:
            return images
        x = Jitter(to_tensor(images.x), 1, seed).apply(self.strength)
        pixels = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        return ImageSet(pixels, images.y.copy())

    def describe(self) -> str:
        if not self.checked:
            return (f"{len(self.y)} held-out images as they are, unchecked: no clean accuracy is stated for the model "
                    "(give --clean-accuracy)")  # fmt: skip
        if self.strength == 0:
            return (f"{len(self.y)} held-out images as they are: the model scores {self.plain:.1%} on them, "
                    f"its stated clean accuracy is {self.reference:.1%}")  # fmt: skip
        return (f"{len(self.y)} jittered copies of the held-out images at strength {self.strength:.2f}, where the "
                f"model scores {self.base:.1%}, its stated clean accuracy {self.reference:.1%} (on the images as they "
                f"are: {self.plain:.1%}, fitted)")  # fmt: skip


def held_out_measure(
    model: nn.Module,
    holdout: ImageSet,
    reference: float | None,
    reference_from: str | None = None,
    *,
    margin: float = 0.01,
    copies: int = 8,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> HeldOutMeasure:
    """The checked measure of the module docstring; :class:`DataError` when no measure tracks ``reference``."""
    x = to_tensor(holdout.x)
    y = torch.as_tensor(holdout.y).long()
    plain = _accuracy(model, x, y, device)
    if reference is not None:  # two standard errors of an accuracy read on this many images, at least ``margin``
        margin = max(margin, 2 * math.sqrt(reference * (1 - reference) / max(1, len(y))))
    record: dict[str, Any] = {"plain_accuracy": plain, "reference": reference, "reference_from": reference_from,
                              "margin": margin, "images": len(y)}  # fmt: skip
    if reference is None or reference - margin <= plain <= reference:
        record["strength"] = 0.0
        measure = HeldOutMeasure(x, y, plain, 0.0, reference, reference_from, plain, reference is not None, record)
        record["measure"] = measure.describe()
        return measure
    if plain < reference:
        raise DataError(
            f"the defender's held-out images score {plain:.1%} on the model, its stated clean accuracy is "
            f"{reference:.1%} ({reference_from}): they do not measure it (another distribution?), so no clean-data "
            "rule can keep its promise; give --clean-data images like the model's own, or --clean-accuracy"
        )
    jitter = Jitter(x, copies, seed)
    ys = y.repeat(copies)
    strongest = _accuracy(model, jitter.apply(MAX_STRENGTH), ys, device)
    if strongest > reference + margin:
        raise DataError(
            f"the defender's held-out images score {plain:.1%} on the model, its stated clean accuracy is "
            f"{reference:.1%} ({reference_from}), and even jittered at strength {MAX_STRENGTH:g} they score "
            f"{strongest:.1%}: no measure here tracks its clean accuracy; give --clean-data images it did not train "
            "on, or --clean-accuracy"
        )
    low, high, scores = 0.0, MAX_STRENGTH, []
    for _ in range(BISECTION_STEPS):
        mid = (low + high) / 2
        value = _accuracy(model, jitter.apply(mid), ys, device)
        scores.append({"strength": mid, "accuracy": value})
        if value > reference:
            low = mid
        else:
            high = mid
    strength = (low + high) / 2
    xs = jitter.apply(strength).clone()
    base = _accuracy(model, xs, ys, device)
    record.update(strength=strength, jittered_accuracy=base, copies=copies, bisection=scores)
    measure = HeldOutMeasure(xs, ys, base, strength, reference, reference_from, plain, True, record)
    record["measure"] = measure.describe()
    return measure
