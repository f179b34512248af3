"""Neural Cleanse unlearning: the stamped set keeps true labels, and the repair trains through the shared loop."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from trojanlab.data import ImageSet, load_dataset, to_tensor
from trojanlab.defenses.nc_mitigation import (
    region_adversarial_loss,
    region_attack,
    region_attack_success,
    trigger_region,
    unlearn,
    unlearning_set,
)
from trojanlab.errors import ConfigError
from trojanlab.evaluation import attack_success_rate, clean_accuracy
from trojanlab.models import Classifier, load_model
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


def test_trigger_region_is_the_reversed_masks_core_grown_and_none_for_a_diffuse_trigger():
    mask = np.zeros((16, 16), np.float32)
    mask[10:12, 12:14] = 0.8  # the reversed core: 2 x 2 pixels
    mask[0, 0] = 0.2  # below half the largest value: not the region
    reversed_ = Trigger(np.full((16, 16, 3), 0.7, np.float32), (0, 0), 4, mask=mask, name="nc-reversed-4")
    region = trigger_region(reversed_, dilate=1)
    assert region.sum() == 16 and region[9:13, 11:15].all() and region[0, 0] == 0  # the core grown by one pixel
    assert trigger_region(reversed_, dilate=1, max_area=0.05) is None  # 16 of 256 pixels is more than 5 %
    # a diffuse trigger (a blend over the whole image) has no region
    diffuse = Trigger(np.full((16, 16, 3), 0.7, np.float32), (0, 0), 4, mask=np.full((16, 16), 0.3, np.float32))
    assert trigger_region(diffuse) is None


def _square_region(data: ImageSet) -> np.ndarray:
    """The bottom-right 6 x 6 pixels, where the small backdoor's white 4 x 4 square sits, and more."""
    region = np.zeros(data.x.shape[1:3], np.float32)
    region[-6:, -6:] = 1
    return region


def test_the_region_attack_changes_only_the_region_and_finds_the_backdoor_there(small_backdoor):
    folder, npz = small_backdoor
    model = load_model(folder).module.eval()
    test = load_dataset(npz).test
    square = _square_region(test)
    x, y = to_tensor(test.x[:64]), torch.as_tensor(test.y[:64]).long()
    attacked = region_attack(model, x, y, square, target=1, generator=torch.Generator().manual_seed(0))
    outside = torch.from_numpy(square == 0)
    assert torch.equal(attacked[:, :, outside], x[:, :, outside]) and attacked.min() >= 0 and attacked.max() <= 1
    # towards the backdoor's target, the worst pattern in the square's corner sends nearly every image there;
    # a corner of the same size elsewhere holds no backdoor
    assert region_attack_success(model, test, square, 1) > 0.8
    assert region_attack_success(model, test, square[::-1, ::-1].copy(), 1) < 0.2


def test_unlearning_with_the_region_attack_removes_a_patch_the_reversed_trigger_misses(small_backdoor):
    folder, npz = small_backdoor
    loaded = load_model(folder)
    splits = load_dataset(npz)
    real = loaded.triggers[0]
    square = _square_region(splits.test)
    # a "reversed" trigger away from the real square (a grey row, top left): unlearning it leaves the square working;
    # with the square's corner as the region, the worst pattern there is unlearnt too, and the square with it
    mask = np.zeros(splits.test.x.shape[1:3], np.float32)
    mask[2, 2:6] = 1
    elsewhere = Trigger(np.full((*mask.shape, 3), 0.5, np.float32), (0, 0), 1, mask=mask)
    cfg = TrainConfig(epochs=3, batch_size=32, val_fraction=0.0, seed=0)
    plain, adversarial = copy.deepcopy(loaded.module), copy.deepcopy(loaded.module)
    unlearn(plain, splits.train, [elsewhere], 0.2, cfg, progress=False)
    unlearn(adversarial, splits.train, [elsewhere], 0.2, cfg, progress=False, region=square, region_target=1)
    assert attack_success_rate(plain, splits.test, real) > 0.3  # 0.48 measured
    assert attack_success_rate(adversarial, splits.test, real) < 0.1
    assert clean_accuracy(adversarial, splits.test) > 0.9
    assert region_attack_success(adversarial, splits.test, square, 1) < 0.1


def test_the_region_attack_refuses_bad_settings():
    with pytest.raises(ConfigError, match="share"):
        region_adversarial_loss(np.ones((4, 4)), share=0.0)
    with pytest.raises(ConfigError, match="steps"):
        region_attack(_model(), torch.zeros(1, 3, 32, 32), torch.zeros(1).long(), np.ones((32, 32)), steps=0)
