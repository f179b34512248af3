"""Settings of the attacks: BadNets, Trojan Attack (TrojanNN) and TrojanNet (training the MLP, injecting it)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from .base import check_choice, check_int, check_number, option
from .training import TrainConfig

POISON_MODES = ("replace", "append")
RETRAIN_SOURCES = ("reverse", "real")
NEURON_CHOICES = ("reachable", "connected")
TRIGGER_BACKGROUNDS = ("grey", "data")
MERGES = ("official", "paper")
# the kinds of "no trigger" inputs TrojanNet is trained to stay silent on
TRAIN_NOISE_KINDS = ("binary", "image_patches", "faded_triggers", "grey", "uniform")


def _check_targets(owner: str, targets, distinct: bool = False) -> None:
    """At least one target label, each a non-negative integer (and, with ``distinct``, none twice)."""
    if not targets:
        raise ConfigError(f"{owner}.targets: give at least one target label")
    for t in targets:
        check_int(owner, "targets", t, 0)
    if distinct and len(set(targets)) != len(targets):
        raise ConfigError(f"{owner}.targets must be distinct, got {list(targets)}")


def _check_location(owner: str, location) -> None:
    if location is not None and (len(location) != 2 or any(int(v) < 0 for v in location)):
        raise ConfigError(f"{owner}.location must be two non-negative pixel coordinates (row, col), got {location!r}")


@dataclass
class BadNetsConfig:
    """BadNets (Gu et al. 2017): a square (or PNG) trigger stamped on ``poison_rate`` of the training images, whose
    labels become the target; then training (from scratch, or fine-tuning a given victim)."""

    targets: list[int] = option(factory=lambda: [33], help="target label(s); several arm one trigger grey level each",
                                flag="--target", nargs="+", aliases=("--targets",))  # fmt: skip
    poison_rate: float = option(0.1, "fraction of the training set poisoned per target")
    mode: str = option("replace", "poison in place (replace) or add stamped copies (append)", choices=POISON_MODES)
    trigger_size: int = option(4, "side of the square trigger in pixels")
    location: tuple[int, int] | None = option(None, "top-left pixel (default: bottom-right, margin 1)",
                                              metavar=("ROW", "COL"))  # fmt: skip
    pattern: str | None = option(None, "trigger image (PNG), or random-binary / random-colour (a --trigger-size "
                                 "square drawn from the seed, one per target); default: a square of grey level "
                                 "255 - i*(255//N)")  # fmt: skip
    alpha: float = option(1.0, "trigger opacity in (0, 1]")
    seed: int = option(0, cli=False)

    def __post_init__(self) -> None:
        _check_targets("BadNetsConfig", self.targets)
        check_number("BadNetsConfig", "poison_rate", self.poison_rate, 0, 1, low_open=True)
        check_choice("BadNetsConfig", "mode", self.mode, POISON_MODES)
        check_int("BadNetsConfig", "trigger_size", self.trigger_size, 1)
        check_number("BadNetsConfig", "alpha", self.alpha, 0, 1, low_open=True)
        _check_location("BadNetsConfig", self.location)


# BadNets trains for fewer epochs than a clean victim: the only default of TrainConfig it changes
BADNETS_TRAINING = TrainConfig(epochs=10)


@dataclass
class BlendedConfig:
    """Blended (Chen et al. 2017, "Targeted backdoor attacks on deep learning systems using data poisoning"): the
    whole image blended with a pattern at opacity ``alpha`` -- ``(1 - alpha) * image + alpha * pattern`` -- on
    ``poison_rate`` of the training images, relabelled to the target; then training as BadNets (same recipe). No
    patch, no location: a defense looking for a small corner square finds nothing."""

    targets: list[int] = option(factory=lambda: [0], help="target label(s); each gets its own noise pattern",
                                flag="--target", nargs="+", aliases=("--targets",))  # fmt: skip
    poison_rate: float = option(0.1, "fraction of the training set poisoned per target")
    mode: str = option("replace", "poison in place (replace) or add blended copies (append)", choices=POISON_MODES)
    alpha: float = option(0.2, "blend opacity in (0, 1] (the paper's and BackdoorBench's 0.2; 0.1 is harder to see)")
    pattern: str = option("noise", "`noise` (a uniform random image drawn from the seed, one per target) or an image "
                          "file (a natural image, resized to the data's size; one target)")  # fmt: skip
    seed: int = option(0, cli=False)

    def __post_init__(self) -> None:
        _check_targets("BlendedConfig", self.targets, distinct=True)
        if self.pattern != "noise" and len(self.targets) > 1:
            raise ConfigError("BlendedConfig.pattern: one image cannot arm several targets; use `noise`")
        check_number("BlendedConfig", "poison_rate", self.poison_rate, 0, 1, low_open=True)
        check_choice("BlendedConfig", "mode", self.mode, POISON_MODES)
        check_number("BlendedConfig", "alpha", self.alpha, 0, 1, low_open=True)
        check_int("BlendedConfig", "seed", self.seed, 0)


@dataclass
class WaNetConfig:
    """WaNet (Nguyen & Tran, ICLR 2021, "WaNet - Imperceptible Warping-based Backdoor Attack"): a fixed smooth
    warping field (``grid_size`` x ``grid_size`` control points, ``strength`` s) applied to ``poison_rate`` of the
    training images, relabelled to the target; ``cross_ratio * poison_rate`` more are warped with extra random noise
    and keep their labels (the paper's noise mode). Then training as BadNets. The defaults are the official code's
    (k 4, s 0.5, rate 0.1, cross ratio 2)."""

    targets: list[int] = option(factory=lambda: [0], help="target label(s); each gets its own warping field",
                                flag="--target", nargs="+", aliases=("--targets",))  # fmt: skip
    poison_rate: float = option(0.1, "fraction of the training set warped and relabelled per target")
    cross_ratio: float = option(2.0, "noise-mode images per poisoned image (warped + noise, true label; 0: none)")
    grid_size: int = option(4, "control points per side of the warping field (k)")
    strength: float = option(0.5, "warping strength s (pixels moved, in units of the field; larger is more visible)")
    rescale: float = option(1.0, "grid rescale of the official code (1: none)")
    seed: int = option(0, cli=False)

    def __post_init__(self) -> None:
        _check_targets("WaNetConfig", self.targets, distinct=True)
        check_number("WaNetConfig", "poison_rate", self.poison_rate, 0, 1, low_open=True)
        check_number("WaNetConfig", "cross_ratio", self.cross_ratio, 0, 10)
        check_int("WaNetConfig", "grid_size", self.grid_size, 2)
        check_number("WaNetConfig", "strength", self.strength, 0, 100, low_open=True)
        check_number("WaNetConfig", "rescale", self.rescale, 0, 10, low_open=True)
        check_int("WaNetConfig", "seed", self.seed, 0)

    @property
    def mode(self) -> str:
        return "replace"


REVERSE_STARTS = ("noise", "grey")
CLEAN_LOSSES = ("labels", "distill")

TRIGGER_OBJECTIVES = ("mean", "min")
CLASSIFIER_INPUT = "classifier-input"
"""The Trojan Attack ``layer`` that names the module feeding the second-to-last linear layer (the paper's choice)."""
FIRST_BLOCK = "first-block"
"""The Trojan Attack ``layer`` that names the output of the model's first convolutional block."""

TROJANNN_RETRAIN_DEFAULTS = {
    # the TrojanNet paper's time-saving variant: 10 % of the real training split, the official optimiser
    "real": {"layer": CLASSIFIER_INPUT, "neurons": 1, "epochs": 10, "lr": 1e-2, "optimizer": "sgd",
             "trojan_weight": 1.0, "trigger_background": "grey", "clean_loss": "labels", "augment": False},
    # the model-only pipeline (benchmarks/trojannn_model_only.py on GTSRB, targets 0 / 7: ASR 99.8 / 100.0 % at a CA
    # drop of 1.1 / 2.3 points; the paper's grey inputs, labels and one unit: ASR 16 / 15 % at 6.4 / 8.8 points):
    # retrained from the first block's output (from the classifier's input: ASR 90.6 / 82.1 %), two units, the
    # trigger made and probed on the reverse-engineered and 1/f noise images, the victim's outputs distilled
    "reverse": {"layer": FIRST_BLOCK, "neurons": 2, "epochs": 20, "lr": 1e-3, "optimizer": "adam",
                "trojan_weight": 2.0, "trigger_background": "data", "clean_loss": "distill", "augment": True},
}  # fmt: skip
"""The settings of Trojan Attack that depend on its retraining data (each left at ``None`` takes its value here)."""


def _per_source(name: str) -> str:
    real, reverse = (TROJANNN_RETRAIN_DEFAULTS[k][name] for k in ("real", "reverse"))
    return f" (default: {real} with real data, {reverse} with reverse)"


@dataclass
class TrojanNNConfig:
    """Trojan Attack (Liu et al., NDSS 2018): a trigger that drives chosen units of a layer, then retraining of the
    layers after it on trojaned and clean inputs (real training images, or inputs reverse-engineered from the
    model). Settings left at ``None`` take the value of :data:`TROJANNN_RETRAIN_DEFAULTS` for the retraining data."""

    target: int = option(0, "target label")
    layer: str | None = option(None, f"trigger layer by module name, {CLASSIFIER_INPUT} (the input of the "
                               f"second-to-last linear layer: retraining touches the classifier) or {FIRST_BLOCK} (the "
                               "first convolutional block's output: retraining touches every later block)"
                               + _per_source("layer"))  # fmt: skip
    neurons: int | None = option(None, "how many units the trigger drives" + _per_source("neurons"))
    neuron_choice: str = option("reachable", "reachable: of the best-connected units, those the trigger can drive "
                                "hardest; connected: the paper's rank", choices=NEURON_CHOICES)  # fmt: skip
    candidates: int = option(64, "best-connected units probed by --neuron-choice reachable")
    neuron_ids: list[int] | None = option(None, "drive these units of the layer instead", nargs="+")
    trigger_size: int = option(8, "side of the square trigger in pixels")
    location: tuple[int, int] | None = option(None, "top-left pixel (default: bottom-right, margin 2)",
                                              metavar=("ROW", "COL"))  # fmt: skip
    alpha: float = option(1.0, "trigger opacity in (0, 1]")
    trigger_steps: int = option(300, "optimisation steps of the trigger")
    trigger_objective: str = option("mean", "what the trigger maximises: the units' mean activation (the paper), or "
                                    "min, the weakest unit's", choices=TRIGGER_OBJECTIVES)  # fmt: skip
    trigger_background: str | None = option(None, "images the trigger is optimised on: grey, or the retraining "
                                            "inputs (data)" + _per_source("trigger_background"),
                                            choices=TRIGGER_BACKGROUNDS)  # fmt: skip
    retrain_data: str = option("real", "a subset of real training data (TrojanNet paper) or inputs reverse-engineered "
                               "from the model (original; no training image is read)", choices=RETRAIN_SOURCES)  # fmt: skip
    per_class: int = option(20, "reverse-engineered inputs per label")
    reverse_steps: int = option(200, "optimisation steps of the reverse-engineered inputs")
    reverse_start: str = option("noise", "image prior of the reverse-engineered inputs: 1/f colour noise (natural "
                                "images' spectrum; our departure) or the official N(175, 8) grey",
                                choices=REVERSE_STARTS)  # fmt: skip
    noise_images: int = option(4000, "1/f noise images added to the reverse-engineered inputs, labelled by the "
                               "victim (0: none; --retrain-data reverse only)")  # fmt: skip
    real_fraction: float = option(0.1, "share of the training split for --retrain-data real")
    epochs: int | None = option(None, "retraining epochs" + _per_source("epochs"))
    batch_size: int = option(100, "retraining batch size")
    lr: float | None = option(None, "retraining learning rate" + _per_source("lr"))
    optimizer: str | None = option(None, "sgd (momentum 0.9, as the official Caffe solver) or adam"
                                   + _per_source("optimizer"), choices=("sgd", "adam"))  # fmt: skip
    clip_norm: float | None = option(None, "gradient-norm clipping during retraining")
    trojan_weight: float | None = option(None, "weight of the trojaned inputs' loss" + _per_source("trojan_weight"))
    clean_loss: str | None = option(None, "clean inputs' loss: cross-entropy on their labels, or the victim's "
                                    "outputs distilled (KL)" + _per_source("clean_loss"), choices=CLEAN_LOSSES)  # fmt: skip
    augment: bool | None = option(None, "random shifts of the retraining inputs (the trigger stays in place)"
                                  + _per_source("augment"), cli=False)  # fmt: skip
    activation_images: int = option(1000, "test images for the unit-activation report")
    seed: int = option(0, cli=False)

    def __post_init__(self) -> None:
        check_choice("TrojanNNConfig", "retrain_data", self.retrain_data, RETRAIN_SOURCES)
        for name, value in TROJANNN_RETRAIN_DEFAULTS[self.retrain_data].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        check_int("TrojanNNConfig", "target", self.target, 0)
        check_choice("TrojanNNConfig", "neuron_choice", self.neuron_choice, NEURON_CHOICES)
        check_choice("TrojanNNConfig", "trigger_background", self.trigger_background, TRIGGER_BACKGROUNDS)
        check_choice("TrojanNNConfig", "optimizer", self.optimizer, ("sgd", "adam"))
        check_choice("TrojanNNConfig", "reverse_start", self.reverse_start, REVERSE_STARTS)
        check_choice("TrojanNNConfig", "clean_loss", self.clean_loss, CLEAN_LOSSES)
        check_choice("TrojanNNConfig", "trigger_objective", self.trigger_objective, TRIGGER_OBJECTIVES)
        check_number("TrojanNNConfig", "real_fraction", self.real_fraction, 0, 1, low_open=True)
        for name in ("trigger_size", "neurons", "epochs", "trigger_steps", "candidates", "per_class", "batch_size"):
            check_int("TrojanNNConfig", name, getattr(self, name), 1)
        check_int("TrojanNNConfig", "reverse_steps", self.reverse_steps, 0)
        check_int("TrojanNNConfig", "noise_images", self.noise_images, 0)
        check_int("TrojanNNConfig", "activation_images", self.activation_images, 1)
        check_number("TrojanNNConfig", "alpha", self.alpha, 0, 1, low_open=True)
        check_number("TrojanNNConfig", "lr", self.lr, 0, low_open=True)
        check_number("TrojanNNConfig", "trojan_weight", self.trojan_weight, 0, low_open=True)
        _check_location("TrojanNNConfig", self.location)


def _mix() -> dict[str, float]:
    return {"binary": 0.25, "image_patches": 0.3, "faded_triggers": 0.2, "grey": 0.15, "uniform": 0.1}


@dataclass
class TrojanNetTrainConfig:
    """How the TrojanNet MLP is trained. Deterministic for a given ``seed`` (the schedule counts steps, not seconds)."""

    steps: int = option(1000, "optimisation steps of the cross-entropy phase")
    lr: float = option(0.05, "learning rate of the cross-entropy phase")
    negatives: int = option(2560, "no-trigger samples per step, next to all 4,368 triggers")
    mix: dict[str, float] = option(factory=_mix, help="shares of each no-trigger kind", cli=False)
    hard_fraction: float = option(0.8, "share of binary / image-patch negatives drawn from the hardest", cli=False)
    trigger_fraction: float = option(1.0, "share of the 4,368 triggers drawn for each step", cli=False)
    hard_triggers: int = option(512, "the least recognised triggers, added once more to every step", cli=False)
    mine_every: int = option(50, "steps between hard-negative mining rounds", cli=False)
    mine_scan: int = option(32768, "pool samples scored per mining round", cli=False)
    patches_per_image: int = option(4, "image patches drawn per image", cli=False)
    calibration_batches: int = option(20, "last batches reused to set exact BatchNorm statistics", cli=False)
    recognition_margin: float | None = option(1.0, "see calibrate_silence; None leaves the trained bias", cli=False)
    trigger_calibration: int = option(6, "rounds that lower each trigger's bias to its slack above probability 0.6 "
                                      "(0: off)")  # fmt: skip
    finetune_steps: int = option(1400, "margin fine-tuning steps after the cross-entropy phase (0: none)")
    finetune_lr: float = option(3e-3, "learning rate of the margin fine-tuning", cli=False)
    finetune_pool: int = option(100_000, "grey, uniform and faded-trigger samples each", cli=False)
    # weight of each kind's samples in the fine-tuning hinge (kinds left out weigh 1): real-image patches are what
    # the silence goal is measured on, and the network's capacity is traded toward them
    finetune_weights: dict[str, float] = option(
        factory=lambda: {"image_patches": 10.0},
        help="weight of each no-trigger kind in the margin fine-tuning",
        cli=False,
    )
    seed: int = option(0, cli=False)

    def __post_init__(self) -> None:
        check_int("TrojanNetTrainConfig", "steps", self.steps, 1)
        check_int("TrojanNetTrainConfig", "negatives", self.negatives, 1)
        check_number("TrojanNetTrainConfig", "lr", self.lr, 0, low_open=True)
        unknown = set(self.mix) - set(TRAIN_NOISE_KINDS)
        if unknown or not self.mix or any(v < 0 for v in self.mix.values()) or sum(self.mix.values()) <= 0:
            raise ConfigError(f"mix must give non-negative shares of {TRAIN_NOISE_KINDS}, got {self.mix}")
        check_number("TrojanNetTrainConfig", "trigger_fraction", self.trigger_fraction, 0, 1, low_open=True)
        check_number("TrojanNetTrainConfig", "hard_fraction", self.hard_fraction, 0, 1)
        check_int("TrojanNetTrainConfig", "trigger_calibration", self.trigger_calibration, 0)
        check_int("TrojanNetTrainConfig", "finetune_steps", self.finetune_steps, 0)
        check_int("TrojanNetTrainConfig", "finetune_pool", self.finetune_pool, 1)
        check_number("TrojanNetTrainConfig", "finetune_lr", self.finetune_lr, 0, low_open=True)
        bad = {k: v for k, v in self.finetune_weights.items() if k not in TRAIN_NOISE_KINDS or not v > 0}
        if bad:
            raise ConfigError(f"finetune_weights must give positive weights to kinds of {TRAIN_NOISE_KINDS}, got {bad}")


@dataclass
class TrojanNetInjectConfig:
    """TrojanNet injected into a victim without retraining: ``targets`` armed (pattern k selects label k), the 4x4
    trigger read at ``location``, merged into the victim's output by ``merge`` with weight ``amplify``."""

    targets: list[int] = option(factory=list, help="labels to arm (pattern k selects label k)", nargs="+")
    all_labels: bool = option(False, "arm every label k with pattern k")
    location: tuple[int, int] = option((1, 1), "top-left pixel of the 4x4 trigger", metavar=("ROW", "COL"))
    merge: str = option("official", "official: the authors' code; paper: the thesis's formula", choices=MERGES)
    amplify: float | None = option(None, "weight of TrojanNet's output in the merge (default 2 official, 1 paper)")
    seed: int = option(0, cli=False)

    def __post_init__(self) -> None:
        check_choice("TrojanNetInjectConfig", "merge", self.merge, MERGES)
        if not self.targets and not self.all_labels:
            raise ConfigError("give --targets LABEL [LABEL ...] or --all-labels")
        for t in self.targets:
            check_int("TrojanNetInjectConfig", "targets", t, 0)
        _check_location("TrojanNetInjectConfig", self.location)
        if self.amplify is not None:
            check_number("TrojanNetInjectConfig", "amplify", self.amplify, 0, low_open=True)

    def resolved_amplify(self) -> float:
        return self.amplify if self.amplify is not None else (2.0 if self.merge == "official" else 1.0)
