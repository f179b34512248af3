"""Settings of the detectors: Neural Cleanse, MM-BD, the structure check, and the scan that combines them."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from .base import check_choice, check_int, check_number, option

NC_PROFILES = ("fast", "official")
NC_PROFILE_DEFAULTS = {  # steps, mini-batches per step, images per mini-batch, early-stop patience per patience
    "fast": {"steps": 120, "batches_per_step": 2, "batch_size": 16, "early_stop_factor": 2},
    "official": {"steps": 1000, "batches_per_step": 31, "batch_size": 32, "early_stop_factor": 5},
}


@dataclass
class NCConfig:
    """Neural Cleanse (Wang et al., S&P 2019): a reversed trigger for every label, batched over labels, and the MAD
    outlier test; ``profile`` picks the step size and budget that ``None`` settings take."""

    profile: str = option("fast", "fast: steps of 2 x 16 images, <= 120 steps; official: steps of 31 x 32 images, "
                          "<= 1000 steps", choices=NC_PROFILES)  # fmt: skip
    steps: int | None = option(None, "schedule steps at most (profile default)")
    batches_per_step: int | None = option(None, "mini-batches averaged per schedule step (profile default)")
    batch_size: int | None = option(None, "clean images per mini-batch, shared by all labels (profile default)")
    lr: float = option(0.1, "Adam learning rate of masks and patterns")
    betas: tuple[float, float] = option((0.5, 0.9), "Adam betas", cli=False)
    init_cost: float = option(1e-3, "initial weight of the mask's L1 norm")
    success_threshold: float = option(0.99, "attack success a reversed trigger must reach", cli=False)
    patience: int = option(5, "schedule steps between cost adjustments")
    cost_multiplier: float = option(2.0, "cost up x2, down / 2^1.5 (the official code)", cli=False)
    early_stop: bool = option(True, "stop a label once its norm stops improving", cli=False)
    early_stop_threshold: float = option(1.0, "relative improvement that counts", cli=False)
    early_stop_patience: int | None = option(None, "steps without improvement before stopping (profile default)")
    labels: list[int] | None = option(None, "labels to scan (default: all)", nargs="+")
    split: str = option("test", "clean images to scan with (the official code uses the test split)",
                        choices=("test", "train"))  # fmt: skip
    images: int | None = option(None, "use a random subset of this many clean images")
    threshold: float = option(2.0, "anomaly index above which a label is flagged")
    seed: int = option(0, cli=False)

    def __post_init__(self) -> None:
        check_choice("NCConfig", "profile", self.profile, NC_PROFILES)
        defaults = NC_PROFILE_DEFAULTS[self.profile]
        if self.steps is None:
            self.steps = defaults["steps"]
        if self.batches_per_step is None:
            self.batches_per_step = defaults["batches_per_step"]
        if self.batch_size is None:
            self.batch_size = defaults["batch_size"]
        if self.early_stop_patience is None:
            self.early_stop_patience = defaults["early_stop_factor"] * self.patience
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        for name in ("steps", "batches_per_step", "batch_size", "patience", "early_stop_patience"):
            check_int("NCConfig", name, getattr(self, name), 1)
        if self.images is not None:
            check_int("NCConfig", "images", self.images, 1)
        check_number("NCConfig", "lr", self.lr, 0, low_open=True)
        check_number("NCConfig", "init_cost", self.init_cost, 0, low_open=True)
        check_number("NCConfig", "threshold", self.threshold, 0, low_open=True)
        if self.cost_multiplier <= 1:
            raise ConfigError(f"NCConfig.cost_multiplier must be > 1, got {self.cost_multiplier}")
        check_number("NCConfig", "success_threshold", self.success_threshold, 0, 1, low_open=True)
        check_choice("NCConfig", "split", self.split, ("test", "train"))
        if self.labels is not None:
            for label in self.labels:
                check_int("NCConfig", "labels", label, 0)
            if not self.labels or len(set(self.labels)) != len(self.labels):
                raise ConfigError(f"NCConfig.labels must be distinct labels, at least one, got {list(self.labels)}")

    def official_budget(self, num_labels: int) -> int:
        """Images forwarded by the official schedule without early stopping: 1,000 x 31 x 32 per label."""
        return num_labels * 1000 * (1000 // 32) * 32

    def schedule(self) -> dict:
        """The settings that shape the optimisation (what a scan checkpoint must match to be resumed)."""
        skip = {"labels", "split", "images", "threshold"}
        return {k: v for k, v in self.__dict__.items() if k not in skip}


MMBD_PROFILES = ("fast", "official")
MMBD_PROFILE_DEFAULTS = {  # random starts per label, steps, optimiser, learning rate
    "official": {"starts": 30, "steps": 300, "optimizer": "sgd", "lr": 1e-2},
    "fast": {"starts": 8, "steps": 100, "optimizer": "adam", "lr": 5e-2},
}


@dataclass
class MMBDConfig:
    """MM-BD (Wang et al., S&P 2024): the maximum achievable margin of every label, from random images (no clean
    data), and a Gamma null fitted to the non-extreme labels; ``profile`` picks what ``None`` settings take."""

    profile: str = option("fast", "fast: 8 starts, 100 Adam steps; official: 30 starts, 300 SGD steps at 0.01",
                          choices=MMBD_PROFILES)  # fmt: skip
    starts: int | None = option(None, "random images per label (profile default)")
    steps: int | None = option(None, "gradient-ascent steps at most (profile default)")
    optimizer: str | None = option(None, "sgd (plain ascent, as the official code) or adam (profile default)",
                                   choices=("sgd", "adam"))  # fmt: skip
    lr: float | None = option(None, "step size on the pixels (profile default)")
    tolerance: float = option(1e-5, "a label stops once its loss changes by less than this, relatively", cli=False)
    batch_size: int = option(512, "images per forward pass (all labels share the batch)")
    labels: list[int] | None = option(None, "labels to scan (default: all)", nargs="+")
    threshold: float = option(0.05, "p-value below which the model is flagged")
    seed: int = option(0, cli=False)

    def __post_init__(self) -> None:
        check_choice("MMBDConfig", "profile", self.profile, MMBD_PROFILES)
        for name, value in MMBD_PROFILE_DEFAULTS[self.profile].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        for name in ("starts", "steps", "batch_size"):
            check_int("MMBDConfig", name, getattr(self, name), 1)
        check_choice("MMBDConfig", "optimizer", self.optimizer, ("sgd", "adam"))
        check_number("MMBDConfig", "lr", self.lr, 0, low_open=True)
        check_number("MMBDConfig", "tolerance", self.tolerance, 0)
        check_number("MMBDConfig", "threshold", self.threshold, 0, 1, low_open=True)
        if self.labels is not None:
            for label in self.labels:
                check_int("MMBDConfig", "labels", label, 0)
            if len(self.labels) < 3 or len(set(self.labels)) != len(self.labels):
                raise ConfigError(f"MMBDConfig.labels must be at least 3 distinct labels (the null fit), got "
                                  f"{list(self.labels)}")  # fmt: skip


@dataclass
class StructureConfig:
    """The structure check: a branch that reads a small window of the input and is merged with the rest."""

    small_fraction: float = option(0.25, "largest share of the image a window may cover to count as small")

    def __post_init__(self) -> None:
        check_number("StructureConfig", "small_fraction", self.small_fraction, 0, 1, low_open=True)
        if self.small_fraction >= 1:
            raise ConfigError(f"StructureConfig.small_fraction must be below 1, got {self.small_fraction}")


@dataclass
class MNTDConfig:
    """MNTD's query tuning (Xu et al., S&P 2021): queries and a linear meta-classifier over label-free features of
    the answers, trained together on a population of clean and backdoored models."""

    queries: int = option(10, "query images tuned")
    top: int = option(3, "largest label shares of the mean answer read by the meta-classifier")
    steps: int = option(200, "Adam steps, each over a mini-batch of the population's models")
    batch_models: int = option(16, "models per step (drawn each step, clean and backdoored alike)")
    query_lr: float = option(0.05, "Adam learning rate of the queries (in logit space)")
    lr: float = option(0.01, "Adam learning rate of the meta-classifier")
    l2: float = option(1e-3, "L2 penalty on the meta-classifier's weights")
    seed: int = option(0, cli=False)

    def __post_init__(self) -> None:
        for name in ("queries", "top", "steps", "batch_models"):
            check_int("MNTDConfig", name, getattr(self, name), 1)
        for name in ("query_lr", "lr"):
            check_number("MNTDConfig", name, getattr(self, name), 0, low_open=True)
        check_number("MNTDConfig", "l2", self.l2, 0)


@dataclass
class MNTDScoreConfig:
    """MNTD on one model: the meta-classifier's score of its answers to the tuned queries (> 0 leans backdoored)."""

    meta_file: str | None = option(None, "the meta-classifier (.safetensors; default: the one the package ships)")


SCAN_DETECTORS = ("structure", "mmbd", "nc", "mntd")


@dataclass
class TargetConfig:
    """Naming the target (:mod:`trojanlab.detection.target`): Neural Cleanse's ``nc_candidates`` smallest norms and
    MM-BD's ``mmbd_candidates`` largest margins examined again -- Neural Cleanse for them alone, ``refine_steps``
    steps, and a targeted universal warp (one smooth field on a ``warp_grid`` x ``warp_grid`` control grid, offsets
    within ``warp_bound``, ``warp_steps`` Adam steps on ``warp_images`` images); a label the warp takes at least
    ``warp_success`` of the images to comes first, then the others by their norm."""

    nc_candidates: int = option(5, "Neural Cleanse's smallest-norm labels examined again")
    mmbd_candidates: int = option(3, "MM-BD's largest-margin labels examined again")
    refine_steps: int = option(120, "Neural Cleanse's schedule steps for the candidates alone")
    warp_steps: int = option(40, "Adam steps of the targeted universal warp")
    warp_images: int = option(64, "example images the warp is optimised and read on")
    warp_grid: int = option(4, "control points per side of the warp's field (WaNet's k)")
    warp_bound: float = option(3.0, "largest control offset, in WaNet's units (strength x flow: 3 moves a pixel by "
                               "at most 1.5 pixels on a 32-pixel image)")  # fmt: skip
    warp_success: float = option(0.5, "share of images a warp must take to a label for it to come first")
    seed: int = option(0, cli=False)

    def __post_init__(self) -> None:
        for name in ("nc_candidates", "mmbd_candidates"):
            check_int("TargetConfig", name, getattr(self, name), 0)
        for name in ("refine_steps", "warp_steps", "warp_images"):
            check_int("TargetConfig", name, getattr(self, name), 1)
        check_int("TargetConfig", "warp_grid", self.warp_grid, 2)
        check_number("TargetConfig", "warp_bound", self.warp_bound, 0, low_open=True)
        check_number("TargetConfig", "warp_success", self.warp_success, 0, 1, low_open=True)


@dataclass
class ScanConfig:
    """The scan: which detectors run (cheapest first) and their budgets; the probability comes from a calibration.

    The budgets are below the detectors' own profiles so that the whole scan of a 43-class GTSRB model fits the
    issue's 2 minutes on 2 CPU cores (MM-BD 5 x 50 steps, Neural Cleanse 30 schedule steps); the calibration is
    fitted on statistics measured with these budgets, so it reads them as they are. The target check
    (``confirm_nc``, ``confirm_mmbd``) adds about 40 s on one thread (``benchmarks/results/scan_targets.md``)."""

    detectors: list[str] = option(factory=lambda: list(SCAN_DETECTORS), help="detectors to run: structure (the "
                                  "graph), mmbd (no data), nc (needs --examples), mntd (the meta-classifier; skipped, and said so, on a "
                                  "model unlike those it was fitted on)", nargs="+")  # fmt: skip
    mmbd_profile: str = option("fast", "MM-BD's profile", choices=MMBD_PROFILES)
    mmbd_starts: int | None = option(5, "MM-BD's random images per label (None: its profile's)")
    mmbd_steps: int | None = option(50, "MM-BD's ascent steps at most (None: its profile's)")
    nc_profile: str = option("fast", "Neural Cleanse's profile", choices=NC_PROFILES)
    nc_steps: int | None = option(30, "Neural Cleanse's schedule steps at most (None: its profile's)")
    nc_images: int | None = option(200, "clean example images Neural Cleanse uses at most")
    small_fraction: float = option(0.25, "the structure check's largest share of the image for a small window")
    confirm_nc: int = option(TargetConfig.nc_candidates, "Neural Cleanse's smallest-norm labels examined again to "
                             "name the target (with --confirm-mmbd; both 0: the detectors' own labels)")  # fmt: skip
    confirm_mmbd: int = option(TargetConfig.mmbd_candidates, "MM-BD's largest-margin labels examined again to name "
                               "the target")  # fmt: skip
    mntd_file: str | None = option(None, "an MNTD meta-classifier (.safetensors; default: the one the package ships)")
    threshold: float = option(0.5, "probability at or above which the verdict is 'backdoored'")
    seed: int = option(0, cli=False)

    def __post_init__(self) -> None:
        self.detectors = list(self.detectors)
        unknown = [d for d in self.detectors if d not in SCAN_DETECTORS]
        if unknown or not self.detectors or len(set(self.detectors)) != len(self.detectors):
            raise ConfigError(f"ScanConfig.detectors must be distinct ones of {', '.join(SCAN_DETECTORS)}, got "
                              f"{self.detectors}")  # fmt: skip
        check_choice("ScanConfig", "mmbd_profile", self.mmbd_profile, MMBD_PROFILES)
        check_choice("ScanConfig", "nc_profile", self.nc_profile, NC_PROFILES)
        if self.nc_images is not None:
            check_int("ScanConfig", "nc_images", self.nc_images, 1)
        StructureConfig(self.small_fraction)
        self.mmbd()  # their own checks
        self.nc()
        self.target()
        check_number("ScanConfig", "threshold", self.threshold, 0, 1)

    def mmbd(self) -> MMBDConfig:
        """MM-BD's settings in this scan."""
        return MMBDConfig(profile=self.mmbd_profile, starts=self.mmbd_starts, steps=self.mmbd_steps, seed=self.seed)

    def target(self) -> TargetConfig:
        """The target check's settings in this scan."""
        return TargetConfig(nc_candidates=self.confirm_nc, mmbd_candidates=self.confirm_mmbd, seed=self.seed)

    def nc(self) -> NCConfig:
        """Neural Cleanse's settings in this scan."""
        return NCConfig(profile=self.nc_profile, steps=self.nc_steps, seed=self.seed)
