"""How victims are built and trained: from scratch (:class:`TrainConfig`) or on a pretrained backbone
(:class:`TransferConfig`)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from .base import check_choice, check_int, check_number, option

NORMALIZATIONS = ("dataset", "none")
OPTIMIZERS = ("adam", "sgd")


@dataclass
class TrainConfig:
    """The one training loop (:func:`trojanlab.training.fit`): Adam (or SGD) with the Keras time decay of the official
    GTSRB model, a stratified validation split for early stopping, random shifts as augmentation."""

    epochs: int = option(20, "training epochs")
    batch_size: int = option(64, "images per step")
    lr: float = option(1e-3, "Adam learning rate")
    lr_decay: float = option(1e-4, "Keras time decay: lr / (1 + decay * step)")
    val_fraction: float = option(0.1, "share of each class held out for early stopping")
    patience: int = option(4, "early stop after this many epochs without a better validation accuracy")
    augment: bool = option(True, "random shifts of up to 2 pixels (--no-augment: none)")
    optimizer: str = option("adam", "adam, or sgd (momentum 0.9, weight decay 5e-4; give it a larger --lr, e.g. "
                            "0.01)", choices=OPTIMIZERS)  # fmt: skip
    seed: int = option(0, cli=False)

    def __post_init__(self) -> None:
        check_choice("TrainConfig", "optimizer", self.optimizer, OPTIMIZERS)
        check_int("TrainConfig", "epochs", self.epochs, 1)
        check_int("TrainConfig", "batch_size", self.batch_size, 1)
        check_int("TrainConfig", "patience", self.patience, 1)
        check_number("TrainConfig", "lr", self.lr, 0, low_open=True)
        check_number("TrainConfig", "lr_decay", self.lr_decay, 0)
        check_number("TrainConfig", "val_fraction", self.val_fraction, 0, 1, high_open=True)
        check_int("TrainConfig", "seed", self.seed, 0)


@dataclass
class ModelConfig:
    """The classifier a training run builds: its architecture, input normalisation and, for image folders, size and
    split."""

    arch: str = option("gtsrb_cnn", "gtsrb_cnn, gtsrb_cnn_bn (with BatchNorm), efficientnet_lite0 or any "
                       "torchvision classifier name")  # fmt: skip
    normalize: str = option("dataset", "input normalisation: the training split's mean/std, or none",
                            choices=NORMALIZATIONS)  # fmt: skip
    image_size: int | None = option(None, "resize image folders to this size (default 32; pretrained: the backbone's)")
    split: str | None = option(None, "image folders: TRAIN/VAL/TEST shares per class, e.g. 80/20/10")

    def __post_init__(self) -> None:
        check_choice("ModelConfig", "normalize", self.normalize, NORMALIZATIONS)
        if self.image_size is not None:
            check_int("ModelConfig", "image_size", self.image_size, 8)
        self.fractions()

    def fractions(self) -> tuple[float, float] | None:
        """(test share, validation share of the rest) of ``split``, or ``None`` when it is not given."""
        if self.split is None:
            return None
        try:
            parts = [float(v) for v in str(self.split).split("/")]
        except ValueError:
            parts = []
        if len(parts) != 3 or min(parts) < 0 or parts[0] <= 0 or parts[2] <= 0:
            raise ConfigError(f"--split takes TRAIN/VAL/TEST shares such as 80/20/10, got {self.split!r}")
        return parts[2] / sum(parts), parts[1] / (parts[0] + parts[1])


@dataclass
class TransferConfig:
    """``train --pretrained``: a new head on an ImageNet backbone (on cached features), optionally the last blocks."""

    epochs: int = option(200, "epochs of the head on cached features (cheap: a linear layer)", flag="--head-epochs")
    lr: float = option(1e-3, "head learning rate", flag="--head-lr")
    weight_decay: float = option(1e-4, "head weight decay")
    batch_size: int = option(32, "images per head step", flag="--head-batch-size")
    val_fraction: float = option(0.2, "share of each class held out to pick the head epoch", flag="--head-val-fraction")
    patience: int = option(30, "head early-stopping patience in epochs", flag="--head-patience")
    fine_tune_blocks: int = option(0, "also train the backbone's last N blocks")
    fine_tune_epochs: int = option(5, "epochs of the block fine-tuning")
    fine_tune_lr: float = option(1e-4, "learning rate of the block fine-tuning")
    weights: str | None = option(None, "pretrained weights file (safetensors or state dict); never downloaded")
    seed: int = option(0, cli=False)

    def __post_init__(self) -> None:
        check_int("TransferConfig", "epochs", self.epochs, 1)
        check_int("TransferConfig", "batch_size", self.batch_size, 1)
        check_int("TransferConfig", "patience", self.patience, 1)
        check_int("TransferConfig", "fine_tune_blocks", self.fine_tune_blocks, 0)
        check_int("TransferConfig", "fine_tune_epochs", self.fine_tune_epochs, 0)
        check_number("TransferConfig", "lr", self.lr, 0, low_open=True)
        check_number("TransferConfig", "fine_tune_lr", self.fine_tune_lr, 0, low_open=True)
        check_number("TransferConfig", "weight_decay", self.weight_decay, 0)
        check_number("TransferConfig", "val_fraction", self.val_fraction, 0, 1, high_open=True)
