"""Neural Cleanse unlearning: the stamped set keeps true labels, and the repair trains through the shared loop."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from trojanlab.data import ImageSet
from trojanlab.defenses.nc_mitigation import region_triggers, unlearn, unlearning_set
from trojanlab.models import Classifier
from trojanlab.training import TrainConfig, fit
from trojanlab.triggers import Trigger


def _data(n: int = 120) -> ImageSet:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, n)
    x = rng.integers(0, 60, (n, 32, 32, 3)).astype(np.uint8)
    for i, label in enumerate(y):
        x[i, :, label * 10 : label * 10 + 10] += 150
    return ImageSet(x, y.astype(np.int64))


def _model() -> Classifier:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 15 * 15, 3))
    return Classifier(net, [0.5] * 3, [0.25] * 3)


def test_unlearning_set_stamps_non_target_images_and_keeps_their_labels():
    data = _data()
    trigger = Trigger(np.ones((4, 4)), (26, 26), 0)
    view = unlearning_set(data, [trigger], 0.25, seed=1)
    stamped = view.poisoned
    assert np.array_equal(view.y, data.y)  # true labels kept
    assert 0 < len(stamped) <= 30 and (data.y[stamped] != 0).all()
    x, _ = view.batch(stamped)
    assert torch.all(x[:, :, 26:30, 26:30] == 1.0)


def test_unlearn_is_the_shared_training_loop_on_the_stamped_set():
    data, trigger = _data(), Trigger(np.ones((4, 4)), (26, 26), 0)
    cfg = TrainConfig(epochs=2, batch_size=32, seed=3)
    repaired, reference = _model(), _model()
    log = unlearn(repaired, data, [trigger], 0.2, cfg, progress=False)
    expected = fit(reference, unlearning_set(data, [trigger], 0.2, cfg.seed), cfg, progress=False)
    assert log.history == expected.history and set(log.history[0]) == {"epoch", "train_loss", "val_accuracy"}
    assert all(torch.equal(a, b) for a, b in zip(repaired.state_dict().values(), reference.state_dict().values()))


def test_region_triggers_fill_the_reversed_triggers_region_with_other_patterns():
    mask = np.zeros((16, 16), np.float32)
    mask[10:12, 12:14] = 0.8  # the reversed core: 2 x 2 pixels
    mask[0, 0] = 0.2  # below half the largest value: not the region
    reversed_ = Trigger(np.full((16, 16, 3), 0.7, np.float32), (0, 0), 4, mask=mask, name="nc-reversed-4")
    triggers = region_triggers(reversed_, dilate=1, noise=2, seed=0)
    assert len(triggers) == 8 + 2  # the colour cube's corners, then the noise patterns
    region = triggers[0].mask
    assert region.sum() == 16 and region[9:13, 11:15].all() and region[0, 0] == 0  # the core grown by one pixel
    colours = {tuple(t.pattern[10, 12]) for t in triggers[:8]}
    assert (0.0, 0.0, 0.0) in colours and (1.0, 1.0, 1.0) in colours and len(colours) == 8
    assert all(t.target_label == 4 for t in triggers)
    noise = triggers[8].pattern[9:13, 11:15, 0]
    assert set(np.unique(noise)) <= {0.0, 1.0}
    # a diffuse trigger (a blend over the whole image) has no region to fill
    diffuse = Trigger(np.full((16, 16, 3), 0.7, np.float32), (0, 0), 4, mask=np.full((16, 16), 0.3, np.float32))
    assert region_triggers(diffuse) == []
