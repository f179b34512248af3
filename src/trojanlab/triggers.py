"""Trigger stamping in raw pixel space, before any normalisation (methods sheet section 1.2).

Two kinds of trigger travel with a model (in its spec's ``triggers``, read back by :func:`trigger_from_json`):

* :class:`Trigger`, a patch: ``x' = (1 - M) * x + M * ((1 - a) * x + a * P)`` with mask ``M`` (h x w, values in
  [0, 1]), pattern ``P`` (raw values in [0, 1], meaning 0..255), opacity ``a`` and the trigger's top-left pixel at
  ``location = (row, col)``. BadNets, Blended (a full-image patch), Trojan Attack and TrojanNet use it.
* :class:`WarpTrigger`, WaNet's smooth warping field: no pixel is painted, every pixel moves a little.

:func:`stamp` applies either.
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


def warp_grid(
    flow: torch.Tensor, strength: float | torch.Tensor, height: int, width: int, rescale: float = 1.0
) -> torch.Tensor:
    """WaNet's ``(N, H, W, 2)`` sampling grid (x, y order, as ``grid_sample`` reads it) of control offsets ``flow``
    ``(N, 2, k, k)``, upsampled (bicubic) to ``height`` x ``width``: ``clamp((identity + strength * flow / H) *
    rescale, -1, 1)``; ``strength`` a number or one per field (``(N, 1, 1, 1)``)."""
    flow = torch.nn.functional.interpolate(flow, size=(height, width), mode="bicubic", align_corners=True)
    rows = torch.linspace(-1, 1, height, device=flow.device, dtype=flow.dtype)
    cols = torch.linspace(-1, 1, width, device=flow.device, dtype=flow.dtype)
    y, x = torch.meshgrid(rows, cols, indexing="ij")
    identity = torch.stack((x, y), dim=-1)[None]
    # the paper divides by the image height for both axes; its images are square
    grid = (identity + strength * flow.permute(0, 2, 3, 1) / height) * rescale
    return grid.clamp(-1, 1)


@dataclass
class WarpTrigger:
    """WaNet's trigger (Nguyen & Tran, ICLR 2021): a fixed, smooth warping field applied with ``grid_sample``.

    ``flow`` is the ``(k, k, 2)`` field of control offsets (uniform in [-1, 1], scaled so its mean absolute value is
    1); it is upsampled (bicubic) to the image size and moves each pixel by ``strength * flow / H`` in grid units,
    ``grid = clamp((identity + strength * flow / H) * rescale, -1, 1)``. With ``noise > 0`` (the paper's noise mode)
    every image gets fresh random offsets of up to ``noise / H`` on top; such images keep their true label
    (``relabels = False``) so the network learns the fixed field, not "any warp". The field is resized to any image
    size, so it fits every image.
    """

    flow: np.ndarray
    strength: float
    target_label: int
    rescale: float = 1.0
    noise: float = 0.0
    relabels: bool = True
    name: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.flow = np.asarray(self.flow, dtype=np.float32)
        if self.flow.ndim != 3 or self.flow.shape[2] != 2 or min(self.flow.shape[:2]) < 2:
            raise ConfigError(f"warp field must be (k, k, 2) with k >= 2, got shape {self.flow.shape}")
        if not np.isfinite(self.flow).all():
            raise ConfigError("warp field has non-finite values")
        if not (np.isfinite(self.strength) and self.strength > 0):
            raise ConfigError(f"warp strength must be a positive number, got {self.strength}")
        if not (np.isfinite(self.rescale) and self.rescale > 0) or not (np.isfinite(self.noise) and self.noise >= 0):
            raise ConfigError(f"warp rescale must be > 0 and noise >= 0, got {self.rescale} and {self.noise}")
        self.target_label = int(self.target_label)

    def check_fits(self, height: int, width: int) -> None:
        """A warping field is resized to the image: it fits any ``height`` x ``width`` of at least 2 x 2 pixels."""
        if height < 2 or width < 2:
            raise ConfigError(f"a warping trigger needs images of at least 2x2 pixels, got {height}x{width}")

    def grid(self, height: int, width: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """The ``(1, H, W, 2)`` sampling grid (x, y order, as ``grid_sample`` reads it), before any noise."""
        flow = torch.as_tensor(self.flow, dtype=torch.float32).permute(2, 0, 1)[None]
        return warp_grid(flow, self.strength, height, width, self.rescale).to(device)

    def warp(self, x: torch.Tensor) -> torch.Tensor:
        """Warp float images ``(N, C, H, W)`` or ``(C, H, W)`` in [0, 1]."""
        single = x.ndim == 3
        batch = x[None] if single else x
        n, _, height, width = batch.shape
        grid = self.grid(height, width, batch.device).to(batch.dtype).expand(n, -1, -1, -1)
        if self.noise > 0:
            shake = torch.rand(n, height, width, 2, device=batch.device, dtype=batch.dtype) * 2 - 1
            grid = (grid + shake * self.noise / height).clamp(-1, 1)
        out = torch.nn.functional.grid_sample(batch, grid, mode="bilinear", padding_mode="border", align_corners=True)
        return out[0] if single else out

    def to_json(self) -> dict[str, Any]:
        return {
            "type": "warp",
            "name": self.name,
            "target_label": self.target_label,
            "flow": self.flow.tolist(),
            "strength": self.strength,
            "rescale": self.rescale,
            **({"noise": self.noise} if self.noise else {}),
            **({"relabels": False} if not self.relabels else {}),
            **({"extra": self.extra} if self.extra else {}),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WarpTrigger:
        return cls(
            flow=np.asarray(data["flow"], dtype=np.float32),
            strength=float(data["strength"]),
            target_label=data["target_label"],
            rescale=float(data.get("rescale", 1.0)),
            noise=float(data.get("noise", 0.0)),
            relabels=bool(data.get("relabels", True)),
            name=data.get("name", ""),
            extra=data.get("extra", {}),
        )


AnyTrigger = Trigger | WarpTrigger
TRIGGER_TYPES = {"patch": Trigger, "warp": WarpTrigger}
"""The trigger kinds a spec may carry, by their ``type`` key (absent: a patch, as every older spec)."""


def trigger_from_json(data: dict[str, Any]) -> AnyTrigger:
    """A trigger from its JSON form, of the kind its ``type`` names."""
    kind = data.get("type", "patch")
    if kind not in TRIGGER_TYPES:
        raise ConfigError(f"unknown trigger type {kind!r} (known: {', '.join(TRIGGER_TYPES)})")
    return TRIGGER_TYPES[kind].from_json(data)


def stamp(images: np.ndarray | torch.Tensor, trigger: AnyTrigger) -> np.ndarray | torch.Tensor:
    """Stamp ``trigger`` on a copy of ``images``.

    Accepts raw uint8 ``(N, H, W, C)`` / ``(H, W, C)`` arrays (returns uint8, rounded) or float tensors in [0, 1]
    ``(N, C, H, W)`` / ``(C, H, W)`` (returns float). Raises :class:`ConfigError` if the trigger falls outside.
    """
    if isinstance(trigger, WarpTrigger):
        return _warp(images, trigger)
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


def _warp(images: np.ndarray | torch.Tensor, trigger: WarpTrigger) -> np.ndarray | torch.Tensor:
    if isinstance(images, torch.Tensor) and images.is_floating_point():
        trigger.check_fits(*images.shape[-2:])
        return trigger.warp(images)
    x = np.asarray(images)
    if x.dtype != np.uint8 or x.ndim not in (3, 4):
        raise ConfigError(f"stamp expects uint8 (N, H, W, C) raw images or float tensors, got {x.dtype} {x.shape}")
    trigger.check_fits(x.shape[-3], x.shape[-2])
    tensor = torch.from_numpy(x.astype(np.float32) / 255.0).movedim(-1, -3)
    warped = trigger.warp(tensor).movedim(-3, -1).numpy()
    return np.clip(np.rint(warped * 255.0), 0, 255).astype(np.uint8)


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
