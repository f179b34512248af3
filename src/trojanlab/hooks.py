"""Attaching to any ``nn.Module`` without rewriting it: layers by name, forward hooks, gradient switches."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .errors import ConfigError


def get_layer(model: nn.Module, name: str) -> nn.Module:
    modules = dict(model.named_modules())
    if name not in modules or name == "":
        leaves = [n for n, m in model.named_modules() if n and not any(True for _ in m.children())]
        shown = ", ".join(leaves[:40]) + (", ..." if len(leaves) > 40 else "")
        raise ConfigError(f"no layer named {name!r} in the model (its layers: {shown})")
    return modules[name]


@contextmanager
def capture(module: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Record ``module``'s output of the next forward passes in ``store["out"]``.

    The output is cloned: an in-place ReLU after the layer (as in the GTSRB CNN) would otherwise overwrite it,
    and the units are read before their activation function, where the gradient does not vanish.
    """
    store: dict[str, torch.Tensor] = {}
    handle = module.register_forward_hook(lambda _m, _i, out: store.__setitem__("out", out.clone()))
    try:
        yield store
    finally:
        handle.remove()


@contextmanager
def trainable_only(model: nn.Module, params: list[nn.Parameter] | tuple = ()) -> Iterator[None]:
    """Within the block, only ``params`` require gradients (none by default); the flags are restored after."""
    keep = {id(p) for p in params}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(id(p) in keep)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextmanager
def capture_input(module: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Record the (first) input of ``module`` in the next forward passes in ``store["in"]`` (detached copy)."""
    store: dict[str, torch.Tensor] = {}
    handle = module.register_forward_pre_hook(lambda _m, args: store.__setitem__("in", args[0].detach().clone()))
    try:
        yield store
    finally:
        handle.remove()


def classifier_layer(model: nn.Module, num_classes: int) -> tuple[str, nn.Linear]:
    """The model's output layer: the last ``nn.Linear`` (in registration order) with ``num_classes`` outputs.

    Its inputs are the "second-to-last layer" neurons of Neural Cleanse's pruning. In a TrojanNet-injected model
    this is the victim's head (TrojanNet's own head has 4,369 outputs).
    """
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]
    if not found:
        raise ConfigError(f"the model has no linear layer with {num_classes} outputs (its classification head)")
    return found[-1]


@torch.no_grad()
def layer_inputs(model: nn.Module, layer: nn.Module, x, batch_size: int = 512) -> torch.Tensor:
    """The inputs of ``layer``, flattened to ``(N, features)``, for images ``x`` (float tensors in [0, 1], or raw
    uint8 arrays converted batch by batch), the model in eval mode."""
    from .data import to_tensor

    model.eval()
    out = []
    with capture_input(layer) as store:
        for i in range(0, len(x), batch_size):
            chunk = x[i : i + batch_size]
            model(chunk if isinstance(chunk, torch.Tensor) else to_tensor(chunk))
            out.append(store["in"].flatten(1))
    return torch.cat(out) if out else torch.zeros(0)
