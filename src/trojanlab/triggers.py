"""Trigger stamping in raw pixel space, before any normalisation (methods sheet section 1.2).

``x' = (1 - M) * x + M * ((1 - a) * x + a * P)`` with mask ``M`` (h x w, values in [0, 1]), pattern ``P`` (raw
values in [0, 1], meaning 0..255), opacity ``a`` and the trigger's top-left pixel at ``location = (row, col)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .errors import ConfigError


@dataclass
class Trigger:
    """A patch trigger. ``pattern`` is ``(h, w)`` (same value on every channel) or ``(h, w, C)``, in [0, 1]."""

    pattern: np.ndarray
    location: tuple[int, int]
    target_label: int
    mask: np.ndarray | None = None
    alpha: float = 1.0
    name: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.pattern = np.asarray(self.pattern, dtype=np.float32)
        if self.pattern.ndim not in (2, 3) or self.pattern.size == 0:
            raise ConfigError(f"trigger pattern must be (h, w) or (h, w, C), got shape {self.pattern.shape}")
        if self.pattern.min() < 0 or self.pattern.max() > 1:
            raise ConfigError("trigger pattern values must lie in [0, 1] (0 = black, 1 = white)")
        if self.mask is None:
            self.mask = np.ones(self.pattern.shape[:2], dtype=np.float32)
        self.mask = np.asarray(self.mask, dtype=np.float32)
        if self.mask.shape != self.pattern.shape[:2]:
            raise ConfigError(f"trigger mask {self.mask.shape} does not match pattern {self.pattern.shape[:2]}")
        if not 0 < self.alpha <= 1:
            raise ConfigError(f"trigger opacity alpha must lie in (0, 1], got {self.alpha}")
        self.location = (int(self.location[0]), int(self.location[1]))
        self.target_label = int(self.target_label)

    @property
    def size(self) -> tuple[int, int]:
        return self.pattern.shape[0], self.pattern.shape[1]

    def check_fits(self, height: int, width: int) -> None:
        """Raise :class:`ConfigError` when the trigger does not lie inside an ``height`` x ``width`` image."""
        r, c = self.location
        h, w = self.size
        if r < 0 or c < 0 or r + h > height or c + w > width:
            raise ConfigError(
                f"trigger of size {h}x{w} at (row {r}, col {c}) lies outside the {height}x{width} image "
                f"(rows {r}..{r + h - 1}, cols {c}..{c + w - 1})"
            )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "target_label": self.target_label,
            "location": list(self.location),
            "pattern": self.pattern.tolist(),
            "mask": self.mask.tolist(),
            "alpha": self.alpha,
            **({"extra": self.extra} if self.extra else {}),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Trigger:
        return cls(
            pattern=np.asarray(data["pattern"], dtype=np.float32),
            location=tuple(data["location"]),
            target_label=data["target_label"],
            mask=np.asarray(data["mask"], dtype=np.float32) if data.get("mask") is not None else None,
            alpha=float(data.get("alpha", 1.0)),
            name=data.get("name", ""),
            extra=data.get("extra", {}),
        )


def stamp(images: np.ndarray | torch.Tensor, trigger: Trigger) -> np.ndarray | torch.Tensor:
    """Stamp ``trigger`` on a copy of ``images``.

    Accepts raw uint8 ``(N, H, W, C)`` / ``(H, W, C)`` arrays (returns uint8, rounded) or float tensors in [0, 1]
    ``(N, C, H, W)`` / ``(C, H, W)`` (returns float). Raises :class:`ConfigError` if the trigger falls outside.
    """
    r, c = trigger.location
    h, w = trigger.size
    if isinstance(images, torch.Tensor) and images.is_floating_point():
        x = images.clone()
        height, width = x.shape[-2:]
        trigger.check_fits(height, width)
        pattern = torch.as_tensor(trigger.pattern, dtype=x.dtype, device=x.device)
        pattern = pattern[None] if pattern.ndim == 2 else pattern.permute(2, 0, 1)
        mask = torch.as_tensor(trigger.mask, dtype=x.dtype, device=x.device) * trigger.alpha
        region = x[..., r : r + h, c : c + w]
        x[..., r : r + h, c : c + w] = region + mask * (pattern - region)
        return x
    x = np.array(images, copy=True)
    if x.dtype != np.uint8 or x.ndim not in (3, 4):
        raise ConfigError(f"stamp expects uint8 (N, H, W, C) raw images or float tensors, got {x.dtype} {x.shape}")
    height, width = x.shape[-3], x.shape[-2]
    trigger.check_fits(height, width)
    pattern = trigger.pattern * 255.0
    pattern = pattern[..., None] if pattern.ndim == 2 else pattern
    mask = (trigger.mask * trigger.alpha)[..., None]
    region = x[..., r : r + h, c : c + w, :].astype(np.float32)
    x[..., r : r + h, c : c + w, :] = np.clip(np.rint(region + mask * (pattern - region)), 0, 255).astype(np.uint8)
    return x


class StampTrigger:
    """A dataset transform that stamps a trigger on one raw image (uint8 HWC array or PIL image) or tensor."""

    def __init__(self, trigger: Trigger) -> None:
        self.trigger = trigger

    def __call__(self, image: Any) -> Any:
        if isinstance(image, torch.Tensor):
            return stamp(image, self.trigger)
        try:
            from PIL import Image

            if isinstance(image, Image.Image):
                return Image.fromarray(stamp(np.asarray(image.convert("RGB")), self.trigger))
        except ImportError:  # pragma: no cover - Pillow ships with torchvision
            pass
        return stamp(np.asarray(image), self.trigger)


class TriggeredDataset(Dataset):
    """Wrap a dataset of ``(image, label)``: stamp the trigger on every image and, optionally, relabel to the target."""

    def __init__(self, base: Dataset, trigger: Trigger, relabel: bool = False) -> None:
        self.base, self.transform, self.relabel = base, StampTrigger(trigger), relabel

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, label = self.base[index]
        return self.transform(image), (self.transform.trigger.target_label if self.relabel else label)
