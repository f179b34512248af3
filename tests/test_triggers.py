from __future__ import annotations

import numpy as np
import pytest
import torch

from trojanlab.errors import ConfigError
from trojanlab.triggers import StampTrigger, Trigger, TriggeredDataset, stamp


def _checker() -> np.ndarray:
    return np.array([[0, 1], [1, 0]], dtype=np.float32)


def test_stamp_uint8_black_white_and_untouched_elsewhere():
    x = np.full((3, 6, 6, 3), 100, dtype=np.uint8)
    t = Trigger(_checker(), location=(4, 3), target_label=1)
    out = stamp(x, t)
    assert out[:, 4, 3].tolist() == [[0, 0, 0]] * 3 and out[:, 4, 4].tolist() == [[255, 255, 255]] * 3
    untouched = np.ones((6, 6), bool)
    untouched[4:6, 3:5] = False
    assert (out[:, untouched] == 100).all()
    assert (x == 100).all(), "stamping must not modify its input"


def test_stamp_float_matches_uint8():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (2, 8, 8, 3)).astype(np.uint8)
    t = Trigger(rng.random((3, 3, 3)).astype(np.float32), (2, 5), 0, mask=np.array([[1, 0.5, 0]] * 3), alpha=0.8)
    raw = stamp(x, t).astype(np.float32) / 255
    as_tensor = stamp(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255, t).permute(0, 2, 3, 1).numpy()
    assert np.abs(raw - as_tensor).max() <= 0.5 / 255 + 1e-6
    assert np.allclose(as_tensor[:, 2:5, 7], x[:, 2:5, 7] / 255)  # mask 0 keeps the image


@pytest.mark.parametrize("location", [(-1, 0), (0, 5), (5, 0), (7, 7)])
def test_trigger_outside_image_is_an_error(location):
    with pytest.raises(ConfigError, match="outside the 6x6 image"):
        stamp(np.zeros((1, 6, 6, 3), np.uint8), Trigger(np.ones((2, 2)), location, 0))


def test_bad_trigger_values():
    with pytest.raises(ConfigError, match="in \\[0, 1\\]"):
        Trigger(np.full((2, 2), 2.0), (0, 0), 0)
    with pytest.raises(ConfigError, match="does not match"):
        Trigger(np.ones((2, 2)), (0, 0), 0, mask=np.ones((3, 3)))


def test_transform_and_dataset():
    t = Trigger(np.zeros((2, 2)), (0, 0), target_label=7)
    base = [(np.full((4, 4, 3), 200, np.uint8), 3)]
    image, label = TriggeredDataset(base, t, relabel=True)[0]
    assert label == 7 and image[0, 0, 0] == 0 and image[3, 3, 0] == 200
    assert TriggeredDataset(base, t)[0][1] == 3
    from PIL import Image

    pil = StampTrigger(t)(Image.fromarray(base[0][0]))
    assert np.asarray(pil)[1, 1, 2] == 0
    assert Trigger.from_json(t.to_json()).to_json() == t.to_json()
