"""The structure check: does the model's graph hold a second branch that reads a small window of the input and is
merged with the rest on its way to the output? That is how TrojanNet enters a model (a 4x4 patch cut from the
image, an MLP, its probabilities added to the victim's), and no statistical detector sees it when the pattern is
absent (Neural Cleanse is blind to it by design; the thesis's point).

The check reads the ONNX graph (a trojanlab artefact or any PyTorch module is exported first, with the legacy
TorchScript exporter: nothing is executed but tracing one forward pass of our own module). Every tensor gets the box
of input pixels it depends on: the graph input covers the whole image; elementwise operations with constants (the
normalisation) keep the image's layout; a ``Slice`` of an image-layout tensor along its spatial axes narrows the box;
any other operation depends on the union of its inputs' boxes. A **branch** is found where a tensor that depends on
a small window (at most ``small_fraction`` of the image) meets one that depends on a larger region: the window, the
merging operation, and the weights on the branch (the parameters of the operations that read only that window) are
reported as evidence beside the statistical detectors, not as a verdict of its own.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ArtifactError, ConfigError

Box = tuple[int, int, int, int]  # rows [r0, r1), columns [c0, c1)

LAYOUT_OPS = {
    "Add", "Sub", "Mul", "Div", "Relu", "LeakyRelu", "Clip", "Identity", "Cast", "Sigmoid", "Tanh", "Abs", "Neg",
    "Pow", "Sqrt", "Exp", "Log", "Min", "Max", "Dropout", "HardSigmoid", "HardSwish", "Elu", "Selu",
}  # fmt: skip
"""Operations that, applied to one image-layout tensor and constants, keep its layout (pixel i stays pixel i)."""


@dataclass
class Branch:
    """A part of the graph that reads only ``window`` of the input and is merged with a part that reads more."""

    window: Box  # rows [r0, r1), columns [c0, c1) of the input
    merge_op: str  # the operation where it meets the rest
    merge_node: str
    parameters: int  # weights of the operations that read only the window
    operations: int  # operations that read only the window
    tensor: str = ""  # the graph's tensor that carries the branch into the merge

    @property
    def size(self) -> tuple[int, int]:
        return self.window[1] - self.window[0], self.window[3] - self.window[2]


@dataclass
class StructureReport:
    """What the structure check found: the branches (evidence), the graph's size and where the graph came from."""

    branches: list[Branch] = field(default_factory=list)
    operations: int = 0
    input_size: list[int] = field(default_factory=list)
    source: str = ""
    graph: Any = field(default=None, repr=False)  # the ONNX ModelProto read
    input_name: str = ""
    normalization: dict[str, list[float]] | None = None  # applied to [0, 1] images before the graph

    @property
    def suspicious(self) -> bool:
        """A branch with weights of its own reads a small window: the shape of a TrojanNet-style injection."""
        return any(b.parameters > 0 for b in self.branches)

    def to_json(self) -> dict[str, Any]:
        return {"suspicious": self.suspicious, "operations": self.operations, "input_size": self.input_size,
                "source": self.source, "branches": [asdict(b) | {"window": list(b.window), "size": list(b.size)} for b in self.branches]}  # fmt: skip


def export_onnx(model: nn.Module, input_size: list[int] | tuple[int, ...]):
    """``model`` traced into an ONNX graph in memory (the legacy exporter; constant folding turns the slice bounds
    into constants the check reads)."""
    import onnx

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.rand(1, *input_size),), buffer, dynamo=False, input_names=["image"],
                          output_names=["output"])  # fmt: skip
    return onnx.load_from_string(buffer.getvalue())


def _constants(graph) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
                elif attr.name in ("value_int", "value_ints"):
                    values[node.output[0]] = np.array(attr.i if attr.name == "value_int" else list(attr.ints))
    return values


def _slice_box(node, values: dict[str, np.ndarray], box: Box, rank: int) -> Box | None:
    """The box after a ``Slice`` of an image-layout tensor (None when its bounds are not constants)."""
    attrs = {a.name: a for a in node.attribute}
    if len(node.input) >= 3:  # opset >= 10: starts, ends, axes, steps are inputs
        names = list(node.input[1:5]) + [""] * (4 - len(node.input[1:5]))
        if any(name and name not in values for name in names):
            return None  # a bound computed at run time: the box cannot be narrowed (never a default in its place)
        starts, ends, axes, steps = (values[name] if name else None for name in names)
        if starts is None or ends is None:
            return None
    else:  # opset < 10: attributes
        starts, ends = np.array(attrs["starts"].ints), np.array(attrs["ends"].ints)
        axes = np.array(attrs["axes"].ints) if "axes" in attrs else None
        steps = None
    axes = np.arange(len(starts)) if axes is None else axes
    steps = np.ones(len(starts), np.int64) if steps is None else steps
    r0, r1, c0, c1 = box
    for start, end, axis, step in zip(starts.tolist(), ends.tolist(), axes.tolist(), steps.tolist()):
        axis = axis + rank if axis < 0 else axis
        if axis not in (rank - 2, rank - 1):
            continue
        if step != 1:
            return None
        low, high = (r0, r1) if axis == rank - 2 else (c0, c1)
        length = high - low
        start = max(0, start + length if start < 0 else min(start, length))
        end = max(0, end + length if end < 0 else min(end, length))
        if axis == rank - 2:
            r0, r1 = low + start, low + max(start, end)
        else:
            c0, c1 = low + start, low + max(start, end)
    return r0, r1, c0, c1


def _union(boxes: list[Box]) -> Box:
    return min(b[0] for b in boxes), max(b[1] for b in boxes), min(b[2] for b in boxes), max(b[3] for b in boxes)


def _area(box: Box) -> int:
    return max(0, box[1] - box[0]) * max(0, box[3] - box[2])


def analyse(
    model_proto, small_fraction: float = 0.25, source: str = "onnx graph", input_size: Sequence[int] | None = None,
    normalization: dict[str, list[float]] | None = None,
) -> StructureReport:  # fmt: skip
    """The branches of an ONNX ``ModelProto`` (see the module docstring). ``input_size`` ``[C, H, W]`` stands in
    for a graph input whose height or width is not fixed; ``normalization`` is what the graph expects applied to
    [0, 1] images (an ONNX file given with ``--mean``/``--std``)."""
    import onnx

    from ..models.external import check_no_external_data, normalise_graph

    if not 0 < small_fraction < 1:
        raise ConfigError(f"small_fraction must be in (0, 1), got {small_fraction}")
    check_no_external_data(model_proto, "the graph")
    copy = onnx.ModelProto()
    copy.CopyFrom(model_proto)
    normalise_graph(copy)  # constants and Identity-aliased weights become initializers: every weight is counted
    model_proto = copy
    graph = model_proto.graph
    values = _constants(graph)
    floats = (1, 10, 11, 16)  # FLOAT, FLOAT16, DOUBLE, BFLOAT16: weights, not slice bounds or shapes
    weights = {t.name: int(np.prod(t.dims)) for t in graph.initializer if t.data_type in floats}
    inits = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise ArtifactError(f"the structure check reads graphs with one image input, got {len(inputs)}")
    dims = [d.dim_value for d in inputs[0].type.tensor_type.shape.dim]
    if len(dims) != 4:
        raise ArtifactError(f"the graph's input has {len(dims)} axes, not N C H W")
    if input_size is not None and not (dims[1] and dims[2] and dims[3]):
        dims = [dims[0], *(int(v) for v in input_size)]
    if not dims[2] or not dims[3]:
        raise ArtifactError(f"the graph's input shape {dims} does not fix H and W; give the input size")
    height, width = dims[2], dims[3]
    full: Box = (0, height, 0, width)
    box: dict[str, Box] = {inputs[0].name: full}
    layout: dict[str, bool] = {inputs[0].name: True}
    reads: dict[Box, list[Any]] = {}  # window -> the operations that read only it
    branches: dict[Box, Branch] = {}
    small = small_fraction * height * width
    for node in graph.node:
        live = [name for name in node.input if name in box]
        if not live:
            continue
        boxes = [box[name] for name in live]
        if node.op_type == "Slice" and layout.get(live[0]) and node.input[0] == live[0]:
            narrowed = _slice_box(node, values, boxes[0], 4)
            out_box, out_layout = (narrowed, True) if narrowed is not None else (boxes[0], False)
        elif node.op_type in LAYOUT_OPS and len(live) == 1:
            out_box, out_layout = boxes[0], layout.get(live[0], False)
        else:
            out_box, out_layout = _union(boxes), False
            if len(set(boxes)) > 1:  # parts that read different regions meet here
                for name, b in zip(live, boxes):
                    if _area(b) <= small and _area(out_box) >= 4 * _area(b) and b not in branches:
                        ops = reads.get(b, [])
                        params = sum(weights.get(w, 0) for op in ops for w in op.input)
                        branches[b] = Branch(b, node.op_type, node.name or node.output[0], params, len(ops), name)
        if _area(out_box) <= small and out_box != full:
            reads.setdefault(out_box, []).append(node)
        for name in node.output:
            box[name], layout[name] = out_box, out_layout
    return StructureReport(list(branches.values()), len(graph.node), [int(v) for v in dims[1:]], source,
                           model_proto, inputs[0].name, normalization)  # fmt: skip


def branch_labels(report: StructureReport, branch: Branch, num_classes: int, samples: int = 4096,
                  seed: int = 0) -> dict[int, float] | None:  # fmt: skip
    """Which labels ``branch`` writes to: its part of the graph cut out (the image in, the branch's tensor at the
    merge out) and run on window contents -- every binary pattern when the window holds at most 16 pixels (the
    shape of TrojanNet's triggers), else ``samples`` random binary and uniform ones; per label, the largest value
    the branch gave it. None when the branch's tensor is not one value per label (it merges before the logits)."""
    import onnx

    if report.graph is None or not branch.tensor:
        return None
    try:
        typed = onnx.shape_inference.infer_shapes(report.graph)  # the cut needs the intermediate tensors' types
        part = onnx.utils.Extractor(typed).extract_model([report.input_name], [branch.tensor])
        from ..models.external import graph_to_module

        net = graph_to_module(part).eval()
    except Exception:  # noqa: BLE001 -- a part the converter cannot rebuild: no label evidence, the branch itself stays reported
        return None
    channels, height, width = report.input_size
    r0, r1, c0, c1 = branch.window
    h, w = r1 - r0, c1 - c0
    gen = torch.Generator().manual_seed(seed)
    if h * w <= 16:
        codes = torch.arange(2 ** (h * w))
        patches = ((codes[:, None] >> torch.arange(h * w)) & 1).float().view(-1, 1, h, w).expand(-1, channels, h, w)
    else:
        patches = torch.cat([(torch.rand(samples // 2, channels, h, w, generator=gen) > 0.5).float(),
                             torch.rand(samples - samples // 2, channels, h, w, generator=gen)])  # fmt: skip
    best = None
    mean = std = None
    if report.normalization:
        mean = torch.tensor(report.normalization["mean"]).view(1, -1, 1, 1)
        std = torch.tensor(report.normalization["std"]).view(1, -1, 1, 1)
    per_chunk = max(1, min(4096, 2**26 // (channels * height * width)))  # at most 256 MB of images at once
    with torch.no_grad():
        for chunk in patches.split(per_chunk):
            x = torch.full((len(chunk), channels, height, width), 0.5)
            x[:, :, r0:r1, c0:c1] = chunk
            out = net(x if mean is None else (x - mean) / std)
            if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[1] != num_classes:
                return None
            top = out.max(0).values
            best = top if best is None else torch.maximum(best, top)
    return {k: float(v) for k, v in enumerate(best)}


def check_model(loaded, small_fraction: float = 0.25) -> StructureReport:
    """The structure check of a loaded model: its ONNX graph when it came from one, else its module exported."""
    import onnx

    path = getattr(loaded, "path", None)
    shape = [int(v) for v in loaded.spec["input_size"]]
    if path is not None and str(path).lower().endswith(".onnx"):
        norm = loaded.spec.get("normalization")
        plain = norm is None or (all(v == 0 for v in norm["mean"]) and all(v == 1 for v in norm["std"]))
        return analyse(onnx.load(str(path), load_external_data=False), small_fraction, "the ONNX file's graph",
                       input_size=shape, normalization=None if plain else norm)  # fmt: skip
    try:
        proto = export_onnx(loaded.module, shape)
    except Exception as exc:  # a module the tracer cannot export: say so instead of guessing
        raise ArtifactError(f"the structure check could not trace the model into a graph ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc  # fmt: skip
    return analyse(proto, small_fraction, "the module traced into ONNX")
