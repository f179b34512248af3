"""Settings of the defenses: what the defender holds (:class:`DefenderConfig`), the pruning rule the pruning
defenses share (:class:`PruneRule`) and each method's own settings."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from .base import check_choice, check_int, check_number, option

PRUNE_RULES = ("auto", "threshold", "fraction", "count")
AUTO_MEASURES = ("top1", "probability")
ORIENTATIONS = ("change", "agreement")
SUBNETWORK_STEPS = ("sgd", "normalized")


@dataclass
class DefenderConfig:
    """The defender's clean images: every image of ``clean_data`` (their own), else ``clean_fraction`` of the data's
    training split (stratified); ``holdout`` of them are held out for the defenses' automatic rules, whose measure is
    checked against ``clean_accuracy`` (:mod:`trojanlab.defenses.heldout`)."""

    clean_fraction: float = option(0.01, "defender's share of the training split")
    clean_data: str | None = option(None, "the defender's own clean images (.npz or image folder) instead of a share "
                                    "of --data's training split")  # fmt: skip
    holdout: float = option(0.5, "share of the defender's images held out for the automatic rule")
    clean_accuracy: float | None = option(None, "the model's clean accuracy as stated for it (its supplier's figure, "
                                          "or one measured on your own images): the automatic rules check that their "
                                          "held-out measure reads it (default: the figure recorded beside a trojanlab "
                                          "artefact; none: unchecked)")  # fmt: skip

    def __post_init__(self) -> None:
        check_number("DefenderConfig", "clean_fraction", self.clean_fraction, 0, 1, low_open=True, high_open=True)
        check_number("DefenderConfig", "holdout", self.holdout, 0, 1, low_open=True, high_open=True)
        if self.clean_accuracy is not None:
            check_number("DefenderConfig", "clean_accuracy", self.clean_accuracy, 0, 1, low_open=True)


@dataclass
class PruneRule:
    """How many ranked neurons a pruning defense removes: ``auto`` (the largest grid value whose pruned model keeps
    the held-out accuracy within ``tolerance``, read on ``jitter`` jittered copies of each held-out image) or a fixed
    ``threshold``, ``fraction`` or ``count`` given as ``value``."""

    prune: str = option("auto", "how the pruned neurons are chosen", choices=PRUNE_RULES)
    value: float | None = option(None, "the threshold, fraction or count of --prune", flag="--prune-value")
    tolerance: float = option(0.02, "auto: largest held-out accuracy drop allowed")
    measure: str = option("top1", "auto: held-out accuracy read as top-1 accuracy or as the mean probability of "
                          "the true label", choices=AUTO_MEASURES, flag="--auto-measure")  # fmt: skip
    jitter: int = option(8, "auto: score this many jittered copies (shift, brightness, contrast, noise) of each "
                         "held-out image, whose accuracy falls with test accuracy where the memorised images' own "
                         "does not; 0 scores the images", flag="--auto-jitter")  # fmt: skip
    prune_bias: bool = option(False, "also zero a pruned neuron's bias (output exactly 0)")
    curve_images: int = option(2000, "test images for the CA/ASR pruning curve (report only; 0: no curve)")

    def __post_init__(self) -> None:
        check_choice("PruneRule", "prune", self.prune, PRUNE_RULES)
        if self.prune != "auto" and self.value is None:
            raise ConfigError(f"--prune {self.prune} needs --prune-value")
        if self.value is not None:
            check_number("PruneRule", "value", self.value, 0)
        check_number("PruneRule", "tolerance", self.tolerance, 0, 1)
        check_choice("PruneRule", "measure", self.measure, AUTO_MEASURES)
        check_int("PruneRule", "jitter", self.jitter, 0)
        check_int("PruneRule", "curve_images", self.curve_images, 0)


@dataclass
class ANPConfig:
    """Adversarial Neuron Pruning (Wu & Wang, NeurIPS 2021); the defaults are the paper's and the official code's
    (methods.md 6.4). ``--iterations 500 --batch-size 64`` is the cheaper schedule the paper also reports."""

    eps: float = option(0.4, "perturbation bound")
    steps: int = option(1, "signed ascent steps per iteration", flag="--anp-steps")
    alpha: float = option(0.2, "weight of the unperturbed loss")
    lr: float = option(0.2, "mask SGD learning rate")
    momentum: float = option(0.9, "mask SGD momentum")
    batch_size: int = option(128, "images per iteration")
    iterations: int = option(2000, "mask iterations")
    augment: bool = option(True, "random shifts of the defender's images")
    train_mode: bool = option(False, "optimise in train mode (BN batch statistics, dropout)")
    include_classifier: bool = option(False, "the classifier layer's units are neurons too")
    masks_from: str | None = option(None, "the run folder of an earlier `defend anp` on the same model, defender "
                                    "data and ANP settings: its learnt masks are reused (say, to prune by another "
                                    "rule) instead of learnt again", metavar="RUN")  # fmt: skip
    seed: int = option(0, cli=False)

    def __post_init__(self) -> None:
        check_number("ANPConfig", "eps", self.eps, 0)
        for name in ("steps", "iterations", "batch_size"):
            check_int("ANPConfig", name, getattr(self, name), 1)
        check_number("ANPConfig", "alpha", self.alpha, 0, 1)
        check_number("ANPConfig", "lr", self.lr, 0, low_open=True)
        check_number("ANPConfig", "momentum", self.momentum, 0, 1, high_open=True)

    def passes(self) -> int:
        """Images forwarded and back-propagated: ``steps`` perturbed passes plus the two mask-loss passes."""
        return self.iterations * self.batch_size * (self.steps + (2 if self.alpha > 0 else 1))


@dataclass
class SubnetworkConfig:
    """The thesis's sub-network variant of ANP for TrojanNet-injected models; the defaults are the thesis's (batch
    size, cycle chaining, step rule ours).

    ``cycles`` perturbation/de-perturbation pairs of ``epochs`` epochs each, steps of ``lr`` in both phases
    (``step``: ``normalized``, lr x |w| along each weight tensor's gradient, or ``sgd``, the thesis's plain SGD),
    score ``alpha * sensitivity + (1 - alpha) * robustness``, ``batch_size`` images per step, ``val_fraction`` of
    the defender's clean images held out (stratified) to pick the kept epoch, ``orientation`` of the score that
    decides (``change``: 1 - agreement, the thesis's code; ``agreement``: the thesis's formulas), ``monitor_images``
    clean test images whose answers are compared (only the parts' answers: no label and no trigger is read).
    """

    cycles: int = option(5, "perturbation/de-perturbation cycles")
    epochs: int = option(40, "epochs per phase")
    lr: float = option(4e-4, "learning rate (normalized steps: share of each weight tensor's norm per step)")
    alpha: float = option(0.8, "weight of sensitivity in the score")
    batch_size: int = option(32, "images per step")
    val_fraction: float = option(0.2, "share of the defender's images held out to pick the kept epoch")
    orientation: str = option("agreement", "score from agreement fractions (the thesis's formulas) or change "
                              "fractions (its code)", choices=ORIENTATIONS)  # fmt: skip
    step: str = option("normalized", "steps of --lr times each weight tensor's norm along its gradient (they move a "
                       "model whose merged softmax has saturated), or the thesis's plain SGD",
                       choices=SUBNETWORK_STEPS)  # fmt: skip
    monitor_images: int = option(500, "clean test images whose answers are compared")
    seed: int = option(0, cli=False)

    def __post_init__(self) -> None:
        for name in ("cycles", "epochs", "batch_size"):
            check_int("SubnetworkConfig", name, getattr(self, name), 1)
        check_int("SubnetworkConfig", "seed", self.seed, 0)
        check_int("SubnetworkConfig", "monitor_images", self.monitor_images, 0)
        check_number("SubnetworkConfig", "lr", self.lr, 0, low_open=True)
        check_number("SubnetworkConfig", "alpha", self.alpha, 0, 1)
        check_number("SubnetworkConfig", "val_fraction", self.val_fraction, 0, 1, low_open=True, high_open=True)
        check_choice("SubnetworkConfig", "orientation", self.orientation, ORIENTATIONS)
        check_choice("SubnetworkConfig", "step", self.step, SUBNETWORK_STEPS)


@dataclass
class NCGuidedConfig:
    """Neural Cleanse's pruning mitigation on ANP's neurons: ranked by how much the reversed triggers of the flagged
    labels excite them, pruned by the shared rule (on a grid of 0-30 % of the neurons)."""

    reversed_triggers: str | None = option(None, "a `trojanlab detect nc` output folder (its "
                                           "reversed_triggers.safetensors and result.json)")  # fmt: skip
    guide_labels: list[int] | None = option(None, "the reversed triggers to rank with (default: the labels the scan "
                                            "flagged)", nargs="+")  # fmt: skip
    include_classifier: bool = option(False, "the classifier layer's units are neurons too")

    def __post_init__(self) -> None:
        if not self.reversed_triggers:
            raise ConfigError("nc-guided needs --reversed-triggers (a `trojanlab detect nc` output folder)")


@dataclass
class NCUnlearnConfig:
    """Neural Cleanse's unlearning: fine-tune on the defender's images with ``stamp_fraction`` of them stamped with
    the reversed triggers and kept at their true label."""

    reversed_triggers: str | None = option(None, "a `trojanlab detect nc` output folder")
    labels: list[int] | None = option(None, "repair these labels (default: the flagged ones)", nargs="*",
                                      flag="--repair-labels")  # fmt: skip
    stamp_fraction: float = option(0.2, "share of the defender's images stamped (true label kept)")
    epochs: int = option(5, "unlearning epochs")
    lr: float = option(1e-3, "unlearning learning rate")
    seed: int = option(0, cli=False)

    def __post_init__(self) -> None:
        if not self.reversed_triggers:
            raise ConfigError("nc-unlearn needs --reversed-triggers (a `trojanlab detect nc` output folder)")
        check_number("NCUnlearnConfig", "stamp_fraction", self.stamp_fraction, 0, 1, low_open=True)
        check_int("NCUnlearnConfig", "epochs", self.epochs, 1)
        check_number("NCUnlearnConfig", "lr", self.lr, 0, low_open=True)


@dataclass
class NCPruneConfig:
    """Neural Cleanse's pruning: the classifier's inputs whose activation the reversed triggers raise most are cut,
    until the reversed triggers succeed on at most ``target_asr`` of the defender's images."""

    reversed_triggers: str | None = option(None, "a `trojanlab detect nc` output folder")
    labels: list[int] | None = option(None, "repair these labels (default: the flagged ones)", nargs="*",
                                      flag="--repair-labels")  # fmt: skip
    max_prune: float = option(0.3, "largest fraction of the classifier's inputs pruned")
    target_asr: float = option(0.0, "stop once the reversed trigger succeeds on at most this share of the "
                               "defender's images", flag="--prune-target-asr")  # fmt: skip

    def __post_init__(self) -> None:
        if not self.reversed_triggers:
            raise ConfigError("nc-prune needs --reversed-triggers (a `trojanlab detect nc` output folder)")
        check_number("NCPruneConfig", "max_prune", self.max_prune, 0, 1, low_open=True)
        check_number("NCPruneConfig", "target_asr", self.target_asr, 0, 1)


@dataclass
class FinePruningConfig:
    """Fine-Pruning (Liu, Dolan-Gavitt & Garg, RAID 2018): the last convolution's channels pruned in increasing order
    of mean activation on the defender's clean images (the shared rule picks how many, on a grid of 0-95 % of the
    channels), then fine-tuning on those images."""

    layer: str | None = option(None, "the convolution to prune, by module name (default: the last one)")
    fine_tune_epochs: int = option(10, "fine-tuning epochs after pruning (0: prune only)")
    fine_tune_lr: float = option(1e-3, "fine-tuning learning rate (Adam)")
    seed: int = option(0, cli=False)

    def __post_init__(self) -> None:
        check_int("FinePruningConfig", "fine_tune_epochs", self.fine_tune_epochs, 0)
        check_number("FinePruningConfig", "fine_tune_lr", self.fine_tune_lr, 0, low_open=True)


@dataclass
class IBAUConfig:
    """I-BAU (Zeng et al., ICLR 2022); the defaults are the official code's (``defense.py``): ``rounds`` of a
    universal perturbation found by one SGD pass (``perturbation_lr``, penalty ``perturbation_l2`` |delta|^2), then
    one Adam step (``lr``) per batch along the implicit hypergradient (``fixed_point_steps`` iterations of the inner
    map, step ``inner_step``), the outer loss adding the perturbation to ``perturbed_fraction`` of each batch."""

    rounds: int = option(5, "unlearning rounds (a perturbation found, then the weights stepped)")
    fixed_point_steps: int = option(5, "fixed-point iterations of the implicit hypergradient")
    lr: float = option(1e-3, "the weights' Adam learning rate")
    batch_size: int = option(100, "images per step")
    perturbation_lr: float = option(10.0, "SGD learning rate of the universal perturbation")
    perturbation_l2: float = option(1e-3, "L2 penalty on the perturbation")
    perturbation_bound: float | None = option(10.0, "L2 radius the perturbation is projected onto after every step "
                                              "(the paper's C_delta; None: unbounded, as the official code)")  # fmt: skip
    inner_step: float = option(0.1, "step of the inner map whose fixed point the hypergradient differentiates")
    perturbed_fraction: float = option(0.01, "share of each batch the outer loss adds the perturbation to (at "
                                       "least one image)")  # fmt: skip
    clamp: bool = option(False, "clamp perturbed images to [0, 1] (the official code does not)")
    seed: int = option(0, cli=False)

    def __post_init__(self) -> None:
        for name in ("rounds", "fixed_point_steps", "batch_size"):
            check_int("IBAUConfig", name, getattr(self, name), 1)
        for name in ("lr", "perturbation_lr", "inner_step"):
            check_number("IBAUConfig", name, getattr(self, name), 0, low_open=True)
        check_number("IBAUConfig", "perturbation_l2", self.perturbation_l2, 0)
        if self.perturbation_bound is not None:
            check_number("IBAUConfig", "perturbation_bound", self.perturbation_bound, 0, low_open=True)
        check_number("IBAUConfig", "perturbed_fraction", self.perturbed_fraction, 0, 1)


@dataclass
class WarpUnlearnConfig:
    """Unlearning random smooth warps (:mod:`trojanlab.defenses.warp_unlearning`): ``epochs`` of fine-tuning (Adam,
    ``lr``, all run) on the defender's images, ``share`` of each batch moved by a fresh warp on a control grid of
    one of ``grid_sizes`` points at a strength uniform up to ``strength``, kept at its true label."""

    strength: float = option(6.0, "largest warp strength (WaNet's s; each image its own, uniform up to this)")
    epochs: int = option(10, "epochs of the warp unlearning (all run)")
    lr: float = option(1e-3, "learning rate (Adam; `defend auto` unlearns warps at its --unlearn-lr)")
    share: float = option(0.5, "share of each batch warped")
    grid_sizes: tuple[int, ...] = option((2, 4, 8), "control-grid sizes a batch's warps are drawn on", nargs="+")
    seed: int = option(0, cli=False)

    def __post_init__(self) -> None:
        self.grid_sizes = tuple(self.grid_sizes)
        check_number("WarpUnlearnConfig", "strength", self.strength, 0, low_open=True)
        check_int("WarpUnlearnConfig", "epochs", self.epochs, 1)
        check_number("WarpUnlearnConfig", "lr", self.lr, 0, low_open=True)
        check_number("WarpUnlearnConfig", "share", self.share, 0, 1, low_open=True)
        if not self.grid_sizes:
            raise ConfigError("WarpUnlearnConfig.grid_sizes must name at least one grid size")
        for size in self.grid_sizes:
            check_int("WarpUnlearnConfig", "grid_sizes", size, 2)


@dataclass
class AutoConfig:
    """``defend auto``'s rule (:mod:`trojanlab.defenses.auto`): repair where the scan's probability reaches
    ``threshold``; unlearn the reversed triggers of the first ``labels`` suspected labels, reversed again for
    ``refine_steps`` (``unlearn_epochs`` at ``unlearn_lr``, ``stamp_fraction`` of the images stamped; a patch's
    region with the region attack, rounds while it reaches the label above ``region_success``), then I-BAU
    (``ibau``) unless the patch is gone (the region attack fails and Neural Cleanse finds no small trigger again); a
    step whose held-out accuracy drop exceeds ``tolerance`` is undone. Below ``threshold``, random warps unlearnt
    (``warp_strength``), then I-BAU where that step is undone or off (always with ``quiet_ibau``), both within
    ``quiet_tolerance``."""

    threshold: float = option(0.5, "the scan's probability from which the model is repaired")
    labels: int = option(1, "suspected labels whose reversed triggers are unlearnt", flag="--repair-count")
    unlearn_epochs: int = option(5, "unlearning epochs per reversed trigger")
    unlearn_rounds: int = option(3, "unlearning rounds per label while Neural Cleanse still finds a small trigger")
    clean_norm_ratio: float = option(1.5, "a label's reversed trigger counts as small while the median norm over its "
                                     "norm is at least this (the zoo's clean members: mean 1.49)")  # fmt: skip
    refine_steps: int = option(120, "Neural Cleanse's steps to reverse each label to unlearn once more, on the defender's "
                               "images as they are, before unlearning it (the scan's reversal is short and on jittered "
                               "images: a looser trigger); 0: the scan's trigger")  # fmt: skip
    unlearn_lr: float = option(1e-3, "unlearning learning rate (Adam)")
    stamp_fraction: float = option(0.2, "share of the defender's images stamped with the reversed trigger")
    region_area: float = option(0.1, "where the reversed trigger is a patch (its core grown by a pixel covers at most "
                                "this share of the image), also unlearn its region filled per image with the pattern "
                                "that pulls hardest towards the label (0: never)")  # fmt: skip
    region_success: float = option(0.1, "a patch's region counts as clean once the region attack (the worst pattern "
                                   "in it, per image) takes at most this share of held-out images to the label "
                                   "(and the patch counts as gone where Neural Cleanse then finds no small trigger "
                                   "for the label); above it, another unlearning round")  # fmt: skip
    scan_like_measure: bool = option(True, "scan the defender's images jittered as the held-out measure is (images "
                                     "the model fitted read like unseen ones; the calibration was fitted on "
                                     "unseen images)")  # fmt: skip
    ibau: bool = option(True, "follow the unlearning of a reversed trigger with I-BAU (above the threshold; below it, "
                        "see --quiet-ibau)")  # fmt: skip
    warp_strength: float = option(WarpUnlearnConfig.strength, "below the threshold, first unlearn random smooth warps "
                                  "(WaNet's kind, strength uniform up to this; 0: not)")  # fmt: skip
    warp_epochs: int = option(WarpUnlearnConfig.epochs, "epochs of the warp unlearning (all run)")
    quiet_ibau: bool = option(False, "below the threshold, follow a kept warp unlearning with I-BAU too (its rounds "
                              "can bring a warp back: the zoo's wanet-000, ASR 1.3 -> 6.6 %); where the warp step is "
                              "undone or off, I-BAU runs regardless")  # fmt: skip
    quiet_tolerance: float = option(0.01, "below the threshold, the largest held-out accuracy drop the warp step and I-BAU "
                                    "may cost together (I-BAU: the model left after its last round within it; 0: the "
                                    "model is returned unchanged)")  # fmt: skip
    tolerance: float = option(0.02, "largest held-out accuracy drop the repair may cost (all steps together; a step "
                              "that takes it further is undone)")  # fmt: skip
    backoff: float = option(0.3, "a step over the tolerance is undone and tried once more at this times its learning "
                            "rate (I-BAU: where none of its rounds fits; 0: not tried again)")  # fmt: skip
    seed: int = option(0, cli=False)

    def __post_init__(self) -> None:
        check_number("AutoConfig", "backoff", self.backoff, 0, 1, high_open=True)
        check_number("AutoConfig", "threshold", self.threshold, 0, 1)
        check_int("AutoConfig", "labels", self.labels, 0)
        check_int("AutoConfig", "unlearn_epochs", self.unlearn_epochs, 1)
        check_int("AutoConfig", "unlearn_rounds", self.unlearn_rounds, 1)
        check_int("AutoConfig", "refine_steps", self.refine_steps, 0)
        check_number("AutoConfig", "clean_norm_ratio", self.clean_norm_ratio, 1)
        check_number("AutoConfig", "unlearn_lr", self.unlearn_lr, 0, low_open=True)
        check_number("AutoConfig", "stamp_fraction", self.stamp_fraction, 0, 1, low_open=True, high_open=True)
        check_number("AutoConfig", "tolerance", self.tolerance, 0, 1)
        check_number("AutoConfig", "quiet_tolerance", self.quiet_tolerance, 0, 1)
        check_number("AutoConfig", "region_area", self.region_area, 0, 1)
        check_number("AutoConfig", "region_success", self.region_success, 0, 1)
        check_number("AutoConfig", "warp_strength", self.warp_strength, 0)
        check_int("AutoConfig", "warp_epochs", self.warp_epochs, 1)
