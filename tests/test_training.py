from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from trojanlab.data import load_npz
from trojanlab.evaluation import clean_accuracy
from trojanlab.models import Classifier
from trojanlab.training import (
    TensorSet,
    TrainConfig,
    constant_lr,
    cross_entropy,
    fit,
    keras_adam,
    split_validation,
    weighted_cross_entropy,
)


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


# ------------------------------------------------------------------------------- partial and custom training


def _tensor_set(n: int = 96, seed: int = 0) -> TensorSet:
    """Float images of 3 classes (class = which third is bright), as optimisation-made inputs would come."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=gen)
    x = 0.2 * torch.rand(n, 3, 32, 32, generator=gen)
    for i, label in enumerate(y.tolist()):
        x[i, :, :, label * 10 : label * 10 + 10] += 0.6
    return TensorSet(x, y)


def _bn_model() -> Classifier:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Linear(8 * 15 * 15, 3),
    )
    return Classifier(net, [0.5] * 3, [0.25] * 3)


def test_explicit_defaults_are_the_default_loop(small_npz):
    """``loss=cross_entropy, optimizer=keras_adam`` and every parameter are what ``fit`` does when given nothing."""
    data = load_npz(small_npz)
    cfg = TrainConfig(epochs=2, batch_size=32, seed=3)
    a, b = _model(), _model()
    log_a = fit(a, data.train, cfg, progress=False)
    log_b = fit(
        b, data.train, cfg, progress=False, params=list(b.parameters()), loss=cross_entropy, optimizer=keras_adam
    )
    fit_set, _ = split_validation(data.train, cfg.val_fraction, cfg.seed)
    assert log_a.history == log_b.history and log_a.steps == log_b.steps == 2 * -(-len(fit_set) // 32)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    # per-sample weights of 1 are the plain loss
    c = _model()
    log_c = fit(c, data.train, cfg, progress=False, loss=weighted_cross_entropy(np.ones(len(data.train))))
    assert [r["train_loss"] for r in log_c.history] == pytest.approx([r["train_loss"] for r in log_a.history])


def test_only_the_given_parameters_train_and_frozen_modules_stay_in_eval_mode():
    model = _bn_model()
    conv, bn, head = model.net[0], model.net[1], model.net[5]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = []

    def check_modes(_record):
        modes.append((model.net[4].training, model.net[1].training))

    cfg = TrainConfig(epochs=2, batch_size=16, val_fraction=0, augment=False, lr=1e-2)
    log = fit(
        model,
        _tensor_set(),
        cfg,
        progress=False,
        on_epoch=check_modes,
        params=head.parameters(),
        train_modules=[model.net[4], head],
    )
    changed = {k for k in before if not torch.equal(before[k], model.state_dict()[k])}
    assert changed == {"net.5.weight", "net.5.bias"}  # BatchNorm statistics untouched: it stayed in eval mode
    assert modes == [(True, False), (True, False)]  # dropout after the frozen part trains, BatchNorm does not
    assert all(p.requires_grad for p in model.parameters()) and not model.training
    assert log.epochs_run == 2 and log.best_epoch == 2 and log.best_val_accuracy is None
    assert conv.weight.grad is None and bn.weight.grad is None


def test_custom_loss_logs_its_terms_and_sees_positions_in_the_given_set():
    data = _tensor_set(120)
    seen = []

    def loss(model, x, y, index):
        assert torch.equal(torch.as_tensor(data.y[index]), y)  # positions in ``data``, not in the split
        seen.extend(index.tolist())
        ce = nn.functional.cross_entropy(model(x), y)
        return {"loss": 2 * ce, "ce": ce}

    cfg = TrainConfig(epochs=1, batch_size=32, val_fraction=0.2, seed=1)
    log = fit(_model(), data, cfg, progress=False, loss=loss)
    record = log.history[0]
    assert set(record) == {"epoch", "train_loss", "ce", "val_accuracy"}
    assert record["train_loss"] == pytest.approx(2 * record["ce"])
    held_out = set(np.flatnonzero(~np.isin(np.arange(120), seen)).tolist())
    assert len(seen) == len(set(seen)) == 120 - len(held_out) and len(held_out) >= 3  # each training sample once
    # zero weight on every sample: Adam's steps are zero, nothing moves
    model = _model()
    before = [p.clone() for p in model.parameters()]
    fit(model, data, cfg, progress=False, loss=weighted_cross_entropy(np.zeros(120)))
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))


def test_sgd_with_warm_up_clipping_and_resume(tmp_path):
    data = _tensor_set(64)
    cfg = TrainConfig(epochs=3, batch_size=16, lr=0.5, val_fraction=0, augment=False, seed=4)
    made = []

    def sgd(params, config, steps_per_epoch):
        make = constant_lr(lambda p, lr: torch.optim.SGD(p, lr=lr), warmup_epochs=1)
        opt, sched = make(params, config, steps_per_epoch)
        made.append(sched)
        return opt, sched

    model = _model()
    start = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    log = fit(model, data, cfg, progress=False, optimizer=sgd, clip_norm=1e-3)
    assert made[0].get_last_lr() == [0.5] and log.steps == 12
    moved = torch.cat([p.detach().flatten() for p in model.parameters()]) - start
    assert 0 < float(moved.norm()) <= 12 * 0.5 * 1e-3 + 1e-6  # each step moves at most lr x clip norm

    # partial training with its own optimiser and loss resumes to the same weights
    def head_fit(m, **kw):
        sgd_momentum = constant_lr(lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9), warmup_epochs=1)
        return fit(m, data, cfg, progress=False, params=m.net[4].parameters(), optimizer=sgd_momentum, **kw)

    reference = _model()
    head_fit(reference)

    def stop_after_first(record):
        if record["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        head_fit(_model(), checkpoint_dir=tmp_path, on_epoch=stop_after_first)
    resumed = _model()
    log = head_fit(resumed, checkpoint_dir=tmp_path)
    assert log.resumed_from_epoch == 1 and log.steps == 12
    assert all(torch.equal(x, y) for x, y in zip(reference.state_dict().values(), resumed.state_dict().values()))


def test_tensor_set_reads_like_an_image_set():
    data = _tensor_set(30)
    train, val = split_validation(data, 0.2, seed=0)
    assert isinstance(train, TensorSet) and len(train) + len(val) == 30
    x, y = val.batch(np.arange(len(val)))
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and torch.equal(y, torch.as_tensor(val.y))
