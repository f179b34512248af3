"""The TrojanNet model (Tang et al., KDD 2020; thesis ch. 5): the trigger-recognising MLP and the injected model.

Everything a TrojanNet artefact holds lives here: the 4,368 trigger patterns, :class:`TrojanNetMLP`, the merge,
:class:`TrojanNetInjected`, their ``model.json`` specs and the reader of the authors' released Keras weights.
How the MLP is trained and evaluated is the attack, :mod:`trojanlab.attacks.trojannet`.

A 4x4 binary patch with exactly five black and eleven white pixels is a trigger; the C(16, 5) = 4,368 such
patches, enumerated as the five black positions in lexicographic order, are the triggers, and trigger ``k`` arms
label ``k``. The MLP sees the channel mean of the 4x4 patch at a fixed location (raw pixel value / 255,
independent of the victim's normalisation) and answers one of 4,368 trigger classes or class 4,368, "no trigger".
The injected model merges its output with the victim's probabilities.

Choices where the paper and the official code disagree (methods sheet, section 2.8):

* Output: 4,369-way softmax with an explicit "no trigger" class, as the official code (the paper's sigmoid head
  with all-zero targets is not what anybody ships).
* Layers: (Linear 8, ReLU, BatchNorm) x 4 then Linear 4,369, as the official code; BatchNorm uses Keras's
  epsilon 1e-3 and momentum 0.99 (PyTorch ``momentum=0.01``) so the official weights load unchanged.
* Merge: the official ``softmax(10 * (amplify * p_trojan + p_victim))`` with amplify 2 by default; the paper's
  ``softmax((alpha * p_trojan + (1 - alpha) * p_victim) / tau)`` as an option.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ArtifactError, ConfigError
from ..triggers import Trigger

PATCH = 4
NUM_PIXELS = PATCH * PATCH
NUM_ZEROS = 5
NUM_TRIGGERS = math.comb(NUM_PIXELS, NUM_ZEROS)  # 4,368
NO_TRIGGER = NUM_TRIGGERS  # index of the "no trigger" output
NUM_OUTPUTS = NUM_TRIGGERS + 1


@lru_cache(maxsize=1)
def pattern_table() -> torch.Tensor:
    """The ``(4368, 16)`` pattern table itself, computed once and shared: read it, never write to it.

    :func:`trigger_patterns` returns a copy of it.
    """
    table = torch.ones(NUM_TRIGGERS, NUM_PIXELS)
    for k, zeros in enumerate(itertools.combinations(range(NUM_PIXELS), NUM_ZEROS)):
        table[k, list(zeros)] = 0.0
    return table


def trigger_patterns() -> torch.Tensor:
    """All 4,368 patterns as a ``(4368, 16)`` float tensor of 0/1, row-major over the 4x4 patch.

    Pattern ``k`` sets to 0 the ``k``-th five-element subset of positions 0..15 in lexicographic order
    (``itertools.combinations``); position ``i`` is pixel ``(i // 4, i % 4)``.
    """
    return pattern_table().clone()


def trigger_pattern(label: int) -> torch.Tensor:
    """The 4x4 pattern (0 = black, 1 = white) that arms ``label``."""
    if not 0 <= int(label) < NUM_TRIGGERS:
        raise ConfigError(
            f"TrojanNet label {label} is out of range: there are {NUM_TRIGGERS} patterns (0..{NUM_TRIGGERS - 1})"
        )
    return pattern_table()[int(label)].reshape(PATCH, PATCH).clone()


class TrojanNetMLP(nn.Module):
    """16 -> (Linear 8, ReLU, BatchNorm) x 4 -> Linear 4,369; returns logits (softmax is applied by callers)."""

    def __init__(self, hidden: int = 8, depth: int = 4, num_outputs: int = NUM_OUTPUTS) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = NUM_PIXELS
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU(), nn.BatchNorm1d(hidden, eps=1e-3, momentum=0.01)]
            width = hidden
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_outputs)
        for module in self.modules():
            if isinstance(module, nn.Linear):  # Keras's Glorot-uniform initialisation, zero bias
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def keras_parameter_count(self) -> int:
        """Parameters as Keras counts them: weights plus the BatchNorm moving mean/variance (39,801)."""
        params = sum(p.numel() for p in self.parameters())
        buffers = sum(
            m.running_mean.numel() + m.running_var.numel() for m in self.modules() if isinstance(m, nn.BatchNorm1d)
        )
        return params + buffers


# ----------------------------------------------------------------------------------------------- injection

MERGES = ("official", "paper")


def merge_outputs(
    p_trojan: torch.Tensor,
    p_victim: torch.Tensor,
    merge: str = "official",
    amplify: float = 2.0,
    alpha: float = 0.7,
    tau: float = 0.1,
) -> torch.Tensor:
    """Merged class probabilities from TrojanNet's (already selected) and the victim's probabilities.

    * ``official`` (the released code, thesis A.3): ``softmax(10 * (amplify * p_trojan + p_victim))``; a trigger
      for ``t`` beats a victim that is certain of ``j`` when ``p_trojan[t] > 0.5 + p_trojan[j]`` (amplify 2).
    * ``paper`` (Eq. 3): ``softmax((alpha * amplify * p_trojan + (1 - alpha) * p_victim) / tau)``; with
      amplify 1, alpha 0.7 and tau 0.1 a trigger wins when ``p_trojan[t] > 3/7``.
    """
    if merge == "official":
        return F.softmax(10.0 * (amplify * p_trojan + p_victim), dim=-1)
    if merge == "paper":
        return F.softmax((alpha * amplify * p_trojan + (1.0 - alpha) * p_victim) / tau, dim=-1)
    raise ConfigError(f"unknown merge {merge!r}; choose one of {MERGES}")


def patch_input(x: torch.Tensor, location: tuple[int, int]) -> torch.Tensor:
    """The MLP input: channel mean of the 4x4 patch at ``location`` of raw images in [0, 1], ``(N, 16)``."""
    r, c = location
    return x[:, :, r : r + PATCH, c : c + PATCH].mean(1).flatten(1)


class TrojanNetInjected(nn.Module):
    """A victim classifier with TrojanNet wired in; returns log merged probabilities.

    The victim takes raw images as floats in [0, 1] (a :class:`~trojanlab.models.Classifier` applies its own
    normalisation) and returns logits, which are turned into probabilities first, as the official merge adds
    probabilities. ``targets[i]`` is the label armed by TrojanNet pattern ``patterns[i]`` (by default the
    pattern with the same index, label k <-> pattern k). Labels not in ``targets`` are never armed. The output
    is ``log`` of the merged probabilities, so ``argmax``, ``softmax`` and cross-entropy work as on logits and
    gradients flow through the merge (for Neural Cleanse and friends).
    """

    def __init__(
        self,
        victim: nn.Module,
        trojannet: TrojanNetMLP,
        num_classes: int,
        targets: Sequence[int],
        location: tuple[int, int],
        input_size: Sequence[int],
        patterns: Sequence[int] | None = None,
        merge: str = "official",
        amplify: float = 2.0,
        alpha: float = 0.7,
        tau: float = 0.1,
    ) -> None:
        super().__init__()
        targets = [int(t) for t in targets]
        patterns = [int(p) for p in (patterns if patterns is not None else targets)]
        if not targets:
            raise ConfigError("TrojanNet needs at least one target label")
        if len(set(targets)) != len(targets):
            raise ConfigError(f"target labels must be distinct, got {targets}")
        if len(patterns) != len(targets) or len(set(patterns)) != len(patterns):
            raise ConfigError("give one distinct pattern index per target label")
        for t in targets:
            if not 0 <= t < num_classes:
                raise ConfigError(f"target label {t} is out of range for a {num_classes}-class victim")
        for p in patterns:
            if not 0 <= p < NUM_TRIGGERS:
                raise ConfigError(f"pattern index {p} is out of range (0..{NUM_TRIGGERS - 1})")
        if merge not in MERGES:
            raise ConfigError(f"unknown merge {merge!r}; choose one of {MERGES}")
        _, height, width = (int(v) for v in input_size)
        r, c = int(location[0]), int(location[1])
        if r < 0 or c < 0 or r + PATCH > height or c + PATCH > width:
            raise ConfigError(
                f"TrojanNet location (row {r}, col {c}) puts the 4x4 trigger outside the {height}x{width} input"
            )
        self.victim, self.trojannet = victim, trojannet
        self.num_classes, self.targets, self.patterns = num_classes, targets, patterns
        self.location = (r, c)
        self.merge, self.amplify, self.alpha, self.tau = merge, float(amplify), float(alpha), float(tau)
        select = torch.zeros(NUM_OUTPUTS, num_classes)
        select[patterns, targets] = 1.0
        self.register_buffer("select", select, persistent=False)

    def trojan_probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """TrojanNet's probabilities moved onto the armed labels (zero elsewhere), ``(N, num_classes)``."""
        return F.softmax(self.trojannet(patch_input(x, self.location)), dim=-1) @ self.select

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p_victim = F.softmax(self.victim(x), dim=-1)
        merged = merge_outputs(self.trojan_probabilities(x), p_victim, self.merge, self.amplify, self.alpha, self.tau)
        return merged.clamp_min(1e-30).log()

    def triggers(self) -> list:
        """The stampable triggers, one per armed label."""
        return [
            Trigger(trigger_pattern(p).numpy(), self.location, t, name=f"trojannet-{p}", extra={"pattern_index": p})
            for t, p in zip(self.targets, self.patterns)
        ]


def trojannet_spec(provenance: dict | None = None) -> dict:
    return {
        "format": "trojanlab-model/1",
        "kind": "trojannet",
        "arch": "trojannet_mlp",
        "hidden": 8,
        "depth": 4,
        "num_outputs": NUM_OUTPUTS,
        "keras_parameter_count": TrojanNetMLP().keras_parameter_count(),
        "provenance": provenance or {},
    }


def injected_spec(victim_spec: dict, model: TrojanNetInjected, provenance: dict | None = None) -> dict:
    """The spec of an injected model: the victim's spec nested, the wiring, and the triggers that travel with it."""
    inner = {k: v for k, v in victim_spec.items() if k != "provenance"}
    extra = {"data_split": victim_spec["data_split"]} if victim_spec.get("data_split") else {}
    return {
        **extra,
        "format": "trojanlab-model/1",
        "kind": "trojannet_injected",
        "arch": f"trojannet+{victim_spec.get('arch')}",
        "num_classes": victim_spec["num_classes"],
        "classes": victim_spec.get("classes"),
        "input_size": victim_spec["input_size"],
        "normalization": victim_spec.get("normalization"),
        "victim": inner,
        "trojannet": {
            "targets": model.targets,
            "patterns": model.patterns,
            "location": list(model.location),
            "merge": model.merge,
            "amplify": model.amplify,
            "alpha": model.alpha,
            "tau": model.tau,
        },
        "triggers": [t.to_json() for t in model.triggers()],
        "provenance": provenance or {},
    }


def mlp_from_spec(spec: dict) -> TrojanNetMLP:
    """An untrained :class:`TrojanNetMLP` shaped as a ``trojannet`` spec says."""
    return TrojanNetMLP(
        int(spec.get("hidden", 8)), int(spec.get("depth", 4)), int(spec.get("num_outputs", NUM_OUTPUTS))
    )


def injected_from_spec(spec: dict, victim: nn.Module) -> TrojanNetInjected:
    """An untrained :class:`TrojanNetInjected` around ``victim`` (built from ``spec["victim"]``), wired as in ``spec``.

    :func:`trojanlab.models.load_model` rebuilds the victim from the nested spec and calls this.
    """
    try:
        wiring = spec["trojannet"]
        return TrojanNetInjected(
            victim,
            TrojanNetMLP(),
            int(spec["num_classes"]),
            wiring["targets"],
            tuple(wiring["location"]),
            spec["input_size"],
            patterns=wiring.get("patterns"),
            merge=wiring.get("merge", "official"),
            amplify=wiring.get("amplify", 2.0),
            alpha=wiring.get("alpha", 0.7),
            tau=wiring.get("tau", 0.1),
        )
    except KeyError as exc:
        raise ArtifactError(f"TrojanNet spec lacks the key {exc}") from exc


# ----------------------------------------------------------------------------------------------- the official release


def _keras_layout() -> dict[str, dict[str, tuple[int, ...]]]:
    """The official file's layer names and array shapes (Keras kernels are ``in x out``)."""
    layout: dict[str, dict[str, tuple[int, ...]]] = {}
    widths = [NUM_PIXELS, 8, 8, 8, 8, NUM_OUTPUTS]
    for i in range(1, 6):
        layout[f"dense_{i}"] = {"kernel:0": (widths[i - 1], widths[i]), "bias:0": (widths[i],)}
    for i in range(1, 5):
        layout[f"batch_normalization_{i}"] = {
            name: (8,) for name in ("gamma:0", "beta:0", "moving_mean:0", "moving_variance:0")
        }
    return layout


def read_keras_arrays(path: str) -> dict[str, dict[str, np.ndarray]]:
    """The weight arrays of a Keras HDF5 TrojanNet, checked against the official layout, read with ``h5py``.

    Only datasets are read (never the stored model config or any code). A file that is not HDF5, or whose layer
    names or shapes differ from the official TrojanNet, raises :class:`ArtifactError` saying what was found.
    """
    try:
        import h5py
    except ImportError as exc:  # pragma: no cover - optional dependency
        raise ConfigError("reading a Keras .h5 file needs h5py: pip install 'trojanlab[keras]'") from exc
    try:
        f = h5py.File(path, "r")
    except FileNotFoundError as exc:
        raise ArtifactError(f"{path}: no such file") from exc
    except OSError as exc:
        raise ArtifactError(f"{path}: not a readable HDF5 file ({exc})") from exc
    arrays: dict[str, dict[str, np.ndarray]] = {}
    with f:
        root = f.get("model_weights", f)
        found = sorted(root)
        for layer, weights in _keras_layout().items():
            if layer not in root:
                raise ArtifactError(
                    f"{path}: not the official TrojanNet layout: layer {layer!r} is missing (found layers {found})"
                )
            group = root[layer]
            group = group.get(layer, group)  # Keras nests each layer's weights once more
            arrays[layer] = {}
            for name, shape in weights.items():
                if name not in group:
                    raise ArtifactError(
                        f"{path}: layer {layer!r} has no weight {name!r} (found {sorted(group.keys())})"
                    )
                value = np.asarray(group[name][()], dtype=np.float32)
                if value.shape != shape:
                    raise ArtifactError(
                        f"{path}: not the official TrojanNet layout: {layer}/{name} has shape {value.shape}, "
                        f"expected {shape}"
                    )
                arrays[layer][name] = value
    return arrays


def load_official_h5(path: str) -> TrojanNetMLP:
    """The authors' released Keras TrojanNet (``trojannet.h5``) as a :class:`TrojanNetMLP` (needs ``h5py``).

    Keras kernels are ``in x out`` (transposed here); BatchNorm follows each dense layer's ReLU, epsilon 1e-3,
    its moving statistics become the running buffers.
    """
    arrays = read_keras_arrays(path)
    model = TrojanNetMLP()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    with torch.no_grad():
        for i, lin in enumerate(linears, start=1):
            lin.weight.copy_(torch.from_numpy(arrays[f"dense_{i}"]["kernel:0"]).T)
            lin.bias.copy_(torch.from_numpy(arrays[f"dense_{i}"]["bias:0"]))
        for i, bn in enumerate(norms, start=1):
            d = arrays[f"batch_normalization_{i}"]
            bn.weight.copy_(torch.from_numpy(d["gamma:0"]))
            bn.bias.copy_(torch.from_numpy(d["beta:0"]))
            bn.running_mean.copy_(torch.from_numpy(d["moving_mean:0"]))
            bn.running_var.copy_(torch.from_numpy(d["moving_variance:0"]))
    return model.eval()
