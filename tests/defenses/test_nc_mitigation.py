"""Neural Cleanse unlearning: the stamped set keeps true labels, and the repair trains through the shared loop."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from trojanlab.data import ImageSet
from trojanlab.defenses.nc_mitigation import unlearn, unlearning_set
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
