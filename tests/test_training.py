from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from trojanlab.data import load_npz
from trojanlab.evaluation import clean_accuracy
from trojanlab.models import Classifier
from trojanlab.training import TrainConfig, fit, split_validation


def _model() -> Classifier:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Dropout(0.1), nn.Linear(8 * 15 * 15, 3)
    )
    return Classifier(net, [0.5] * 3, [0.25] * 3)


def test_fit_learns_and_is_deterministic(small_npz):
    data = load_npz(small_npz)
    cfg = TrainConfig(epochs=3, batch_size=32, seed=1)
    a, b = _model(), _model()
    log = fit(a, data.train, cfg, progress=False)
    fit(b, data.train, cfg, progress=False)
    assert clean_accuracy(a, data.test) > 0.9
    assert log.epochs_run == 3 and 1 <= log.best_epoch <= 3
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_interrupted_fit_resumes_to_the_same_weights(small_npz, tmp_path):
    data = load_npz(small_npz)
    cfg = TrainConfig(epochs=3, batch_size=32, seed=2, patience=10)
    reference = _model()
    fit(reference, data.train, cfg, progress=False)

    def stop_after_first(record):
        if record["epoch"] == 1:
            raise KeyboardInterrupt

    interrupted = _model()
    with pytest.raises(KeyboardInterrupt):
        fit(interrupted, data.train, cfg, checkpoint_dir=tmp_path / "ckpt", progress=False, on_epoch=stop_after_first)
    resumed = _model()
    log = fit(resumed, data.train, cfg, checkpoint_dir=tmp_path / "ckpt", progress=False)
    assert log.resumed_from_epoch == 1 and len(log.history) == 3
    for x, y in zip(reference.state_dict().values(), resumed.state_dict().values()):
        assert torch.allclose(x, y, atol=1e-6)


def test_validation_split_is_stratified():
    from trojanlab.data import ImageSet

    y = np.repeat(np.arange(4), 50)
    data = ImageSet(np.zeros((200, 4, 4, 3), np.uint8), y)
    train, val = split_validation(data, 0.1, seed=0)
    assert np.bincount(val.y).tolist() == [5, 5, 5, 5] and len(train) == 180
