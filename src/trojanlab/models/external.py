"""Models trojanlab did not write: an ONNX file, or a state dict (safetensors or a ``weights_only`` torch file) for a
named architecture, loaded as a :class:`~trojanlab.models.LoadedModel` that every detector and defense takes.

Nothing a stranger sent is executed or unpickled. An ONNX graph is data: it is checked, converted down to the opset
``onnx2torch`` knows (:data:`ONNX_OPSET`) and rebuilt as a PyTorch module from its operators and weights, so
detectors that need gradients and hooks work on it. External data files are refused (a graph could name any file
on the machine). A state dict is read by ``safetensors`` or ``torch.load(weights_only=True)`` into an architecture
of the registry.

The module takes images in [0, 1]; ``mean`` / ``std`` are the normalisation the model expects (none: it takes
[0, 1] as it is, or normalises inside its graph). The spec records what was read from the file and what was
assumed from the options (``spec["assumed"]``), so a scan states the input size and normalisation it used.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ArtifactError, ConfigError
from .artifacts import SPEC_FILE, Classifier, LoadedModel, classifier_spec, load_model
from .registry import build_network

ONNX_OPSET = 17
"""The opset an ONNX graph is converted to before ``onnx2torch`` rebuilds it (the newest it converts fully)."""

STATE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


@dataclass
class ModelSource:
    """Where a model comes from and what must be assumed about it: ``path`` is an artefact folder, an ``.onnx`` file
    or a state dict; ``arch`` and ``num_classes`` name the architecture a state dict fills; ``input_size`` ``[C, H,
    W]`` and ``mean`` / ``std`` are needed where the file does not state them."""

    path: str
    arch: str | None = None
    num_classes: int | None = None
    input_size: Sequence[int] | None = None
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None

    def load(self, device: str | torch.device = "cpu") -> LoadedModel:
        return load_any(self, device=device)


def _check_options(source: ModelSource) -> None:
    if source.input_size is not None and (len(source.input_size) != 3 or min(source.input_size) < 1):
        raise ConfigError(f"--input-size must be C H W, three positive integers, got {list(source.input_size)}")
    if (source.mean is None) != (source.std is None):
        raise ConfigError("--mean and --std go together (the model's input normalisation)")
    if source.std is not None and min(source.std) <= 0:
        raise ConfigError(f"--std must be positive, got {list(source.std)}")
    if source.num_classes is not None and source.num_classes < 2:
        raise ConfigError(f"--num-classes must be at least 2, got {source.num_classes}")


def load_any(source: ModelSource | str, device: str | torch.device = "cpu") -> LoadedModel:
    """The model at ``source`` (see :class:`ModelSource`), in eval mode on ``device``."""
    source = ModelSource(str(source)) if isinstance(source, str) else source
    _check_options(source)
    path = Path(source.path)
    if path.is_dir():
        given = [name for name in ("arch", "num_classes", "input_size", "mean", "std") if getattr(source, name)]
        if given:
            raise ConfigError(f"{path}: a trojanlab artefact states its own {', '.join(given)} in {SPEC_FILE}")
        loaded = load_model(path, device=device)
        loaded.spec.setdefault("assumed", {"input_size": "artefact", "normalization": "artefact"})
        return loaded
    if not path.is_file():
        raise ArtifactError(f"{path}: no such model file or artefact folder")
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        net, input_size, num_classes = _onnx(path, source)
        arch, fmt = "onnx", "onnx"
    elif suffix in STATE_SUFFIXES:
        if not source.arch or source.num_classes is None or source.input_size is None:
            raise ConfigError(f"{path}: a state dict needs --arch, --num-classes and --input-size")
        input_size, num_classes, arch, fmt = list(source.input_size), source.num_classes, source.arch, "state-dict"
        net = build_network(arch, num_classes, input_size)
        _fill(net, _state_dict(path), path)
    else:
        raise ArtifactError(
            f"{path}: not a model this can read (an artefact folder, .onnx or {', '.join(STATE_SUFFIXES)})"
        )
    channels = input_size[0]
    mean = list(source.mean) if source.mean is not None else [0.0] * channels
    std = list(source.std) if source.std is not None else [1.0] * channels
    if len(mean) != channels or len(std) != channels:
        raise ConfigError(
            f"--mean and --std need {channels} values (the model's channels), got {len(mean)}, {len(std)}"
        )
    module = Classifier(net, mean, std).to(device).eval()
    spec = classifier_spec(arch, [str(i) for i in range(num_classes)], input_size, mean, std,
                           provenance={"source": str(path), "format": fmt})  # fmt: skip
    spec["assumed"] = {
        "input_size": "options" if fmt == "state-dict" or source.input_size is not None else "onnx graph",
        "normalization": "options" if source.mean is not None else "none: the model takes [0, 1] images",
    }
    return LoadedModel(module, spec, path)


def _onnx(path: Path, source: ModelSource) -> tuple[nn.Module, list[int], int]:
    try:
        import onnx
        import onnx2torch  # noqa: F401 -- checked here, used by graph_to_module
    except ImportError as exc:
        raise ConfigError("reading ONNX models needs the onnx extra: pip install 'trojanlab[onnx]'") from exc
    try:
        graph = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # any parse failure of a stranger's file is one clear line
        raise ArtifactError(f"{path}: not a valid ONNX model ({type(exc).__name__}: {_first_line(exc)})") from exc
    check_no_external_data(graph, path)  # before the checker, which would open the files they name
    try:
        onnx.checker.check_model(graph)
    except Exception as exc:
        raise ArtifactError(f"{path}: not a valid ONNX model ({type(exc).__name__}: {_first_line(exc)})") from exc
    weights = {t.name for t in graph.graph.initializer}
    inputs = [i for i in graph.graph.input if i.name not in weights]
    if len(inputs) != 1 or len(graph.graph.output) != 1:
        raise ArtifactError(f"{path}: a classifier graph has one image input and one output, got {len(inputs)} and "
                            f"{len(graph.graph.output)}")  # fmt: skip
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim]
    out_dims = [
        d.dim_value if d.HasField("dim_value") else None for d in graph.graph.output[0].type.tensor_type.shape.dim
    ]
    if source.input_size is not None:
        input_size = list(source.input_size)
    elif len(dims) == 4 and all(dims[1:]):
        input_size = [int(v) for v in dims[1:]]
    else:
        raise ConfigError(f"{path}: the graph's input shape {dims} does not state C H W; give --input-size")
    if source.num_classes is not None:
        num_classes = source.num_classes
    elif out_dims and out_dims[-1]:
        num_classes = int(out_dims[-1])
    else:
        raise ConfigError(f"{path}: the graph's output shape {out_dims} does not state the classes; give --num-classes")
    try:
        net = graph_to_module(graph)
    except Exception as exc:  # an operator onnx2torch lacks, a failed conversion: one clear line
        raise ArtifactError(
            f"{path}: cannot rebuild the ONNX graph in PyTorch ({type(exc).__name__}: {_first_line(exc)})"
        ) from exc
    _check_runs(net, input_size, num_classes, path)
    return net, input_size, num_classes


def graph_to_module(model_proto) -> nn.Module:
    """An ONNX ``ModelProto`` rebuilt as a PyTorch module: written the way onnx2torch reads (:func:`normalise_graph`),
    converted down to :data:`ONNX_OPSET` when newer. Raises what the converters raise."""
    import onnx
    import onnx2torch

    normalise_graph(model_proto)
    opset = max((o.version for o in model_proto.opset_import if o.domain in ("", "ai.onnx")), default=ONNX_OPSET)
    if opset > ONNX_OPSET:
        model_proto = onnx.version_converter.convert_version(model_proto, ONNX_OPSET)
    return onnx2torch.convert(model_proto)


def normalise_graph(model_proto) -> None:
    """The same graph written the one way onnx2torch reads: ``Constant`` nodes moved into the initializers, empty
    trailing inputs dropped (a ``Clip`` with a lower bound only), and the ``Identity`` aliases of a weight (how the
    exporter shares equal tensors) replaced by the weight itself (a convolution's bias must be a weight)."""
    graph = model_proto.graph
    kept = []
    for node in graph.node:
        while node.input and not node.input[-1]:  # a trailing optional input left empty ("" names no tensor), which
            node.input.pop()  # onnx2torch looks up as a name; omitting it means the same in ONNX
        value = next((a.t for a in node.attribute if a.name == "value"), None) if node.op_type == "Constant" else None
        if value is None:
            kept.append(node)
            continue
        tensor = type(value)()
        tensor.CopyFrom(value)
        tensor.name = node.output[0]
        graph.initializer.append(tensor)
    # an Identity of a weight (how the exporter shares one tensor between two names): its readers read the weight
    weights = {t.name for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    alias = {n.output[0]: n.input[0] for n in kept
             if n.op_type == "Identity" and n.input[0] in weights and n.output[0] not in outputs}  # fmt: skip
    kept = [n for n in kept if not (n.op_type == "Identity" and n.output and n.output[0] in alias)]
    for node in kept:
        for i, name in enumerate(node.input):
            if name in alias:
                node.input[i] = alias[name]
    del graph.node[:]
    graph.node.extend(kept)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def check_no_external_data(model_proto, where: Path | str) -> None:
    """Refuse a graph with any tensor stored outside it (weights, ``Constant`` values, subgraphs): its location could
    name any file the reader can open."""
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    external = [t.name or "(unnamed)" for t in _get_all_tensors(model_proto) if uses_external_data(t)]
    external += [t.values.name for t in model_proto.graph.sparse_initializer if uses_external_data(t.values)]
    if external:
        raise ArtifactError(f"{where}: tensors stored in external files ({external[0]}...) are refused; embed them")


def _check_runs(net: nn.Module, input_size: list[int], num_classes: int, path: Path) -> None:
    """One forward pass of two blank images: the graph takes the stated input and returns one logit per class."""
    try:
        with torch.no_grad():
            out = net.eval()(torch.zeros(2, *input_size))
    except Exception as exc:  # whatever the graph raises
        raise ArtifactError(
            f"{path}: the model does not run on {input_size} images ({type(exc).__name__}: {_first_line(exc)})"
        ) from exc
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ArtifactError(f"{path}: the model returns {shape} for 2 images, not (2, {num_classes}) logits")


def _state_dict(path: Path) -> dict[str, Any]:
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses pickled code: say so in one line
        raise ArtifactError(
            f"{path}: not a readable state dict ({type(exc).__name__}: {str(exc).splitlines()[0]})"
        ) from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ArtifactError(f"{path}: holds no state dict (a mapping of names to tensors)")
    for prefix in ("module.", "net."):  # saved from DataParallel; a trojanlab artefact's weights (its Classifier)
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _fill(net: nn.Module, state: dict[str, Any], path: Path) -> None:
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0:2]
        raise ArtifactError(f"{path}: the weights do not fit the architecture: {' '.join(first)}") from exc
