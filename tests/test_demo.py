"""The ImageNet demo's figure data: both models' clean answers, the counts behind its rates, the trigger box text.

A tiny 1000-class linear "victim" on 32x32 images stands in for the pretrained network, so this runs in a second;
the real network is exercised by ``tests/models/test_transfer.py``.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import nn

from trojanlab import demo
from trojanlab.models import load_model


def _top5(first: int) -> list:
    return [[f"class {first}", first, 0.9]] + [[f"class {k}", k, 0.01] for k in range(500, 504)]


def _fake_result(n: int = 3) -> dict:
    rows = []
    for k in range(n):
        rows.append({
            "image": f"img{k}", "victim_top5": _top5(10 + k),
            "attacked_clean_top5": _top5(10 + k if k else 99),  # the first image's clean answer changed
            "attacked_triggered_top5": _top5(1),
        })  # fmt: skip
    return {"target": ["goldfish", 1], "location": [10, 12], "images": rows, "attack_success_rate": 1.0,
            "clean_agreement_with_victim": (n - 1) / n}  # fmt: skip


def test_counts_are_read_or_recounted_and_the_summary_states_them():
    result = _fake_result(3)
    assert demo.demo_counts(result) == {"images": 3, "attack_successes": 3, "clean_agreements": 2}
    recorded = {**result, "image_count": 3, "attack_successes": 3, "clean_agreements": 2}
    assert demo.demo_counts(recorded) == demo.demo_counts(result)
    summary = demo.demo_summary(result)
    assert summary["attack"].startswith("3 of 3 images (100.00 %)")
    assert summary["clean"].startswith("2 of 3 images (66.67 %)")
    assert "rows 10..13, cols 12..15" in summary["box"] and "4x4" in summary["box"]
    one = _fake_result(1)
    assert demo.demo_summary(one)["attack"].startswith("1 of 1 image (")


def test_plot_demo_draws_both_models_clean_answers(tmp_path):
    result = _fake_result(2)
    photos = [(f"img{k}", np.full((32, 32, 3), 90 * k, dtype=np.uint8)) for k in range(2)]
    triggered = np.stack([p[1] for p in photos])
    path = demo.plot_demo(result, photos, triggered, tmp_path / "demo.png")
    with Image.open(path) as image:
        width, height = image.size
    assert width > 1500 and height > 300  # five panels per row


def test_run_demo_records_the_victims_and_the_attacked_models_clean_answers():
    torch.manual_seed(0)
    size = 32
    victim = nn.Sequential(nn.Flatten(), nn.Linear(3 * size * size, 1000)).eval()
    trojannet = load_model(demo.OFFICIAL_TROJANNET).module
    rng = np.random.default_rng(0)
    photos = [(f"noise{k}", rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for k in range(3)]
    result, _, triggered = demo.run_demo(victim, trojannet, photos, 1, (10, 10), size)
    assert result["image_count"] == 3 and result["trigger_size"] == [4, 4] and result["image_size"] == [32, 32]
    assert result["attack_successes"] == round(3 * result["attack_success_rate"])
    assert result["clean_agreements"] == round(3 * result["clean_agreement_with_victim"])
    assert demo.demo_counts({k: v for k, v in result.items() if k not in ("image_count", "attack_successes",
                                                                          "clean_agreements")}) == {
        "images": 3, "attack_successes": result["attack_successes"], "clean_agreements": result["clean_agreements"]
    }  # fmt: skip
    for row in result["images"]:
        assert len(row["victim_top5"]) == len(row["attacked_clean_top5"]) == 5
    assert not np.array_equal(triggered, np.stack([p[1] for p in photos]))
