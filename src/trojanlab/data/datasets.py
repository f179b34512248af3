"""Loaders with validation: every bad input raises :class:`DataError` naming the file and the problem."""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError

EMBEDDED_GTSRB = Path(__file__).with_name("gtsrb32.npz")
# artefacts trained by trojanlab's own commands on the embedded GTSRB (each folder's result.json says which command,
# on which commit): what the quick profile starts from instead of training them on its small budget
BUNDLED_VICTIM = Path(__file__).parent / "bundled" / "gtsrb_victim"
BUNDLED_TROJANNET = Path(__file__).parent / "bundled" / "gtsrb_trojannet"
# five real GTSRB classes x 110 photographs at native size: the thesis's 5-class transfer setting (ch. 6)
EMBEDDED_GTSRB5 = Path(__file__).with_name("gtsrb5")
EMBEDDED_GTSRB_SHA256 = "faa92f5eeff77276b991998ab2ab430fdae616552d46c2b72e80d0c68c48e2b7"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".ppm", ".bmp", ".gif", ".tif", ".tiff", ".webp"}

GTSRB_CLASS_NAMES = [
    "speed_limit_20",
    "speed_limit_30",
    "speed_limit_50",
    "speed_limit_60",
    "speed_limit_70",
    "speed_limit_80",
    "end_speed_limit_80",
    "speed_limit_100",
    "speed_limit_120",
    "no_passing",
    "no_passing_over_3.5t",
    "right_of_way_next_intersection",
    "priority_road",
    "yield",
    "stop",
    "no_vehicles",
    "no_vehicles_over_3.5t",
    "no_entry",
    "general_caution",
    "dangerous_curve_left",
    "dangerous_curve_right",
    "double_curve",
    "bumpy_road",
    "slippery_road",
    "road_narrows_right",
    "road_work",
    "traffic_signals",
    "pedestrians",
    "children_crossing",
    "bicycles_crossing",
    "beware_ice_snow",
    "wild_animals_crossing",
    "end_all_limits",
    "turn_right_ahead",
    "turn_left_ahead",
    "ahead_only",
    "go_straight_or_right",
    "go_straight_or_left",
    "keep_right",
    "keep_left",
    "roundabout_mandatory",
    "end_no_passing",
    "end_no_passing_over_3.5t",
]


@dataclass
class ImageSet:
    """Raw images ``x`` (uint8, N x H x W x C) and integer labels ``y`` (int64, N)."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, index: np.ndarray | Sequence[int]) -> ImageSet:
        index = np.asarray(index)
        return ImageSet(self.x[index], self.y[index])

    def batch(
        self, index: np.ndarray, augment: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``index`` as float ``(n, C, H, W)`` in [0, 1] (after ``augment``) and their labels.

        The training loop reads data only through ``batch``, ``y``, ``subset`` and ``len``, so a poisoned view of an
        ImageSet (``trojanlab.attacks.badnets.PoisonedImageSet``) trains through the same loop.
        """
        x = to_tensor(self.x[index])
        return (augment(x) if augment is not None else x), torch.as_tensor(self.y[index])


@dataclass
class DataSplits:
    """A named data set: an optional training split, a test split and the class names."""

    name: str
    train: ImageSet | None
    test: ImageSet
    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images, the input shape a model expects."""
        _, h, w, c = self.test.x.shape
        return (c, h, w)


def to_tensor(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, H, W, C)`` raw images -> float ``(N, C, H, W)`` in [0, 1]."""
    t = torch.as_tensor(np.asarray(x))
    if t.dtype != torch.uint8:
        raise DataError(f"expected uint8 images, got {t.dtype}")
    return t.permute(0, 3, 1, 2).float().div_(255.0)


def _check_images(x: np.ndarray, where: str, key: str) -> None:
    if x.dtype != np.uint8:
        raise DataError(f"{where}: '{key}' must be uint8 raw pixels (0..255), got dtype {x.dtype}")
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise DataError(f"{where}: '{key}' must have shape (N, H, W, C) with C = 1 or 3, got {x.shape}")
    if x.shape[0] == 0:
        raise DataError(f"{where}: '{key}' holds no images")


def _check_labels(y: np.ndarray, n: int, where: str, key: str, num_classes: int | None) -> np.ndarray:
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{where}: '{key}' must be a 1-D integer array, got shape {y.shape} dtype {y.dtype}")
    if len(y) != n:
        raise DataError(f"{where}: '{key}' has {len(y)} labels for {n} images")
    if y.min() < 0:
        raise DataError(f"{where}: '{key}' has negative label {int(y.min())}")
    if num_classes is not None and y.max() >= num_classes:
        raise DataError(f"{where}: '{key}' has label {int(y.max())} out of range for {num_classes} classes")
    return y.astype(np.int64)


def load_npz(
    path: str | Path, num_classes: int | None = None, classes: Sequence[str] | None = None, name: str | None = None
) -> DataSplits:
    """Load an ``.npz`` with ``x_train/y_train/x_test/y_test``, or only ``x_test/y_test`` (evaluation).

    ``x_*`` are uint8 ``(N, H, W, C)``; labels are integers in ``[0, num_classes)``. Without ``num_classes`` or
    ``classes``, the class count is the largest label + 1. Never unpickles (``allow_pickle=False``).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in archive.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as exc:
        raise DataError(f"{path}: not a readable .npz archive ({exc})") from exc
    if "x_test" not in arrays or "y_test" not in arrays:
        raise DataError(f"{path}: needs arrays 'x_test' and 'y_test' (found {sorted(arrays)})")
    has_train = "x_train" in arrays or "y_train" in arrays
    if has_train and not ("x_train" in arrays and "y_train" in arrays):
        raise DataError(f"{path}: 'x_train' and 'y_train' must come together (found {sorted(arrays)})")
    if classes is not None:
        num_classes = len(classes)
    splits = {}
    for split in ("train", "test") if has_train else ("test",):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        _check_images(x, str(path), f"x_{split}")
        splits[split] = (x, _check_labels(y, len(x), str(path), f"y_{split}", num_classes))
    if has_train and splits["train"][0].shape[1:] != splits["test"][0].shape[1:]:
        raise DataError(
            f"{path}: train images {splits['train'][0].shape[1:]} and test images "
            f"{splits['test'][0].shape[1:]} differ in shape"
        )
    if num_classes is None:
        num_classes = int(max(int(y.max()) for _, y in splits.values())) + 1
    names = list(classes) if classes is not None else [str(i) for i in range(num_classes)]
    train = ImageSet(*splits["train"]) if has_train else None
    return DataSplits(name or path.stem, train, ImageSet(*splits["test"]), names)


def load_gtsrb(verify: bool = False) -> DataSplits:
    """The embedded GTSRB subset: 43 classes, 32x32, 25,087 train / 5,949 test images."""
    if not EMBEDDED_GTSRB.is_file():
        raise DataError(f"{EMBEDDED_GTSRB}: the embedded GTSRB file is missing from the installation")
    if verify:
        digest = hashlib.sha256(EMBEDDED_GTSRB.read_bytes()).hexdigest()
        if digest != EMBEDDED_GTSRB_SHA256:
            raise DataError(f"{EMBEDDED_GTSRB}: sha256 {digest} differs from {EMBEDDED_GTSRB_SHA256}")
    return load_npz(EMBEDDED_GTSRB, classes=GTSRB_CLASS_NAMES, name="gtsrb")


def _read_image(path: Path, size: tuple[int, int] | None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            if size is not None and img.size != (size[1], size[0]):
                img = img.resize((size[1], size[0]), Image.BILINEAR)
            return np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"{path}: not a readable image ({exc})") from exc


def _stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for label in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == label))
        n_test = max(1, round(len(idx) * test_fraction)) if len(idx) > 1 else 0
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    return np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(test_idx))


def load_image_folder(
    root: str | Path, image_size: int | tuple[int, int] = 32, test_fraction: float = 0.2, seed: int = 0
) -> DataSplits:
    """One sub-folder per class (sorted names = class ids); images resized to ``image_size`` (bilinear).

    The images are split per class into train and test with ``test_fraction`` and ``seed``.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: folder not found")
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{root}: no class sub-folders (expected one sub-folder of images per class)")
    xs, ys = [], []
    for label, folder in enumerate(class_dirs):
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
        images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
        if not images:
            what = f"no image files (found {len(files)} other files)" if files else "is empty"
            raise DataError(f"{folder}: class folder {what}")
        xs += [_read_image(p, size) for p in images]
        ys += [label] * len(images)
    x, y = np.stack(xs), np.asarray(ys, dtype=np.int64)
    if not 0 <= test_fraction < 1:
        raise DataError(f"test_fraction must lie in [0, 1), got {test_fraction}")
    full = ImageSet(x, y)
    if test_fraction == 0:
        return DataSplits(root.name, None, full, [p.name for p in class_dirs])
    train_idx, test_idx = _stratified_split(y, test_fraction, seed)
    return DataSplits(root.name, full.subset(train_idx), full.subset(test_idx), [p.name for p in class_dirs])


def load_torchvision_gtsrb(root: str | Path, image_size: int = 32) -> DataSplits:
    """The official GTSRB release in ``torchvision.datasets.GTSRB``'s layout under ``root`` (never downloads)."""
    from torchvision.datasets import GTSRB

    root = Path(root)
    splits = {}
    for split in ("train", "test"):
        try:
            ds = GTSRB(str(root), split=split, download=False)
        except (RuntimeError, FileNotFoundError, KeyError, ValueError) as exc:
            raise DataError(f"{root}: no GTSRB '{split}' split in torchvision's layout ({exc})") from exc
        paths = [Path(p) for p, _ in ds._samples]
        if not paths:
            raise DataError(f"{root}: the GTSRB '{split}' split holds no images")
        x = np.stack([_read_image(p, (image_size, image_size)) for p in paths])
        y = np.asarray([t for _, t in ds._samples], dtype=np.int64)
        splits[split] = ImageSet(x, _check_labels(y, len(x), str(root), split, len(GTSRB_CLASS_NAMES)))
    return DataSplits("gtsrb-official", splits["train"], splits["test"], list(GTSRB_CLASS_NAMES))


def load_dataset(
    spec: str | Path, image_size: int | None = None, seed: int = 0, test_fraction: float | None = None
) -> DataSplits:
    """Resolve a ``--data`` argument.

    ``gtsrb`` is the embedded set, ``gtsrb5`` the embedded 5-class image folder; a path ending in ``.npz`` is an array file; ``torchvision-gtsrb:ROOT``
    (or a folder holding a ``gtsrb/`` directory in torchvision's layout) is the official release; any other
    folder is an image folder with one sub-folder per class, split per class with ``test_fraction`` (default 0.2)
    and ``seed``.
    """
    text = str(spec)
    if text == "gtsrb":
        return load_gtsrb()
    if text == "gtsrb5" and not Path(text).exists():
        text = str(EMBEDDED_GTSRB5)
    if text.startswith("torchvision-gtsrb:"):
        return load_torchvision_gtsrb(text.split(":", 1)[1], image_size or 32)
    path = Path(text)
    if path.suffix == ".npz":
        return load_npz(path)
    if path.is_dir():
        if (path / "gtsrb" / "GTSRB").is_dir():
            return load_torchvision_gtsrb(path, image_size or 32)
        return load_image_folder(path, image_size or 32, 0.2 if test_fraction is None else test_fraction, seed)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder (and not a known data set name such as 'gtsrb')")
    raise DataError(f"{path}: unsupported data file (expected .npz, an image folder or 'gtsrb')")
