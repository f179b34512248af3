from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

FIXTURES = Path(__file__).parent / "data"
GTSRB5 = FIXTURES / "gtsrb5"


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def gtsrb():
    from trojanlab.data.datasets import load_gtsrb

    return load_gtsrb()


def bright_thirds(path, train: int, test: int, seed: int):
    """An .npz of a tiny 3-class data set with a learnable rule (class = which third of the image is bright)."""
    rng = np.random.default_rng(seed)

    def make(n):
        y = rng.integers(0, 3, n)
        x = rng.integers(0, 60, (n, 32, 32, 3)).astype(np.uint8)
        for i, label in enumerate(y):
            x[i, :, label * 10 : label * 10 + 10] += 150
        return x, y.astype(np.int64)

    (x_train, y_train), (x_test, y_test) = make(train), make(test)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path


@pytest.fixture(scope="session")
def make_bright_thirds():
    """:func:`bright_thirds` for tests in other modules (conftest is not importable under importlib mode)."""
    return bright_thirds


@pytest.fixture()
def small_npz(tmp_path):
    """A tiny 3-class data set with a learnable rule (class = which third of the image is bright)."""
    return bright_thirds(tmp_path / "small.npz", 300, 90, seed=0)


@pytest.fixture(scope="session")
def small_backdoor(tmp_path_factory):
    """A GTSRB CNN with a BadNets backdoor (white 4x4 square -> label 1) on a tiny 3-class generated data set:
    ``(model folder, data .npz)``."""
    from trojanlab.attacks.run import badnets
    from trojanlab.config import BadNetsConfig, TrainConfig

    folder = tmp_path_factory.mktemp("small_backdoor")
    data = bright_thirds(folder / "data.npz", 600, 150, seed=1)
    cfg = BadNetsConfig(targets=[1], poison_rate=0.2)
    badnets(
        cfg,
        TrainConfig(epochs=8, batch_size=32, val_fraction=0.0, patience=8),
        data=data,
        out=folder / "model",
        progress=False,
    )
    return folder / "model", data


@pytest.fixture(scope="session")
def warp_backdoor(tmp_path_factory):
    """A GTSRB CNN with a WaNet backdoor (label 2, strength 4) on the tiny 3-class rule: ``(model folder, .npz)``."""
    from trojanlab.attacks.run import wanet
    from trojanlab.config import TrainConfig, WaNetConfig

    folder = tmp_path_factory.mktemp("warp_backdoor")
    npz = bright_thirds(folder / "data.npz", 600, 150, seed=4)
    wanet(WaNetConfig(targets=[2], strength=4.0), TrainConfig(epochs=10, batch_size=32, val_fraction=0.0),
          data=npz, out=folder / "wanet", progress=False)  # fmt: skip
    return folder / "wanet", npz
