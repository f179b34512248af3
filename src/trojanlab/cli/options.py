"""Command-line options built from the config dataclasses, so that a default is written once (in the dataclass)
and ``--help`` shows it."""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
from typing import Any

from ..errors import ConfigError

_MISSING = dataclasses.MISSING


def _default(f: dataclasses.Field, defaults: Any) -> Any:
    if defaults is not None:
        return getattr(defaults, f.name)
    if f.default is not _MISSING:
        return f.default
    if f.default_factory is not _MISSING:
        return f.default_factory()
    return None


def _unwrap(tp: Any) -> tuple[Any, bool]:
    """(the type inside ``X | None``, whether ``None`` is allowed)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else tp), True
    return tp, False


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value)) if value else "none"
    return "none" if value is None else str(value)


def add_config(parser: argparse.ArgumentParser, cls: type, group: str, defaults: Any = None) -> None:
    """One option per field of the dataclass ``cls`` that the command line shows; each option's value lands in
    ``args`` as ``{group}.{field}``. ``defaults`` (an instance of ``cls``) replaces the class defaults."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if meta.get("cli", True) is False:
            continue
        tp, _optional = _unwrap(hints[f.name])
        default = _default(f, defaults)
        dest = f"{group}.{f.name}"
        flag = meta.get("flag", "--" + f.name.replace("_", "-"))
        names = [flag, *meta.get("aliases", ())]
        text = meta.get("help", "")
        if tp is bool:
            if default:
                negative = "--no-" + flag[2:]
                parser.add_argument(negative, dest=dest, action="store_false", help=f"turn off: {text} (on by default)")
            else:
                parser.add_argument(*names, dest=dest, action="store_true", help=text)
            parser.set_defaults(**{dest: default})
            continue
        kwargs: dict[str, Any] = {"dest": dest, "default": default, "metavar": f.name.upper()}
        origin = typing.get_origin(tp)
        if origin in (list, tuple):
            inner = typing.get_args(tp)[0]
            kwargs["type"] = inner
            kwargs["nargs"] = meta.get("nargs", 2 if origin is tuple else "+")
        else:
            kwargs["type"] = tp
        if "choices" in meta:
            kwargs["choices"] = meta["choices"]
        if "metavar" in meta:
            kwargs["metavar"] = meta["metavar"]
        kwargs["help"] = f"{text} (default: {_show(default)})" if text else f"default: {_show(default)}"
        parser.add_argument(*names, **kwargs)


def config_from(args: argparse.Namespace, cls: type, group: str, **fixed: Any) -> Any:
    """The ``cls`` instance the options of ``add_config(..., cls, group)`` hold, with ``fixed`` fields set."""
    values = {}
    prefix = f"{group}."
    for key, value in vars(args).items():
        if key.startswith(prefix):
            values[key[len(prefix) :]] = value
    names = {f.name for f in dataclasses.fields(cls)}
    values.update({k: v for k, v in fixed.items() if k in names})
    for name, value in list(values.items()):
        if isinstance(value, list) and typing.get_origin(_unwrap(typing.get_type_hints(cls)[name])[0]) is tuple:
            values[name] = tuple(value)
    try:
        return cls(**values)
    except ConfigError as exc:  # name the option the user typed, not the dataclass field
        message = str(exc)
        for f in dataclasses.fields(cls):
            flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
            message = re.sub(rf"\b{cls.__name__}\.{f.name}\b", flag, message)
        raise ConfigError(message) from None


def add_run_options(parser: argparse.ArgumentParser, data: str | None = "gtsrb", device: bool = True) -> None:
    """The options every run shares: its data, output folder, device, seed and quietness."""
    if data is not None:
        parser.add_argument("--data", default=data,
                            help=f"gtsrb, gtsrb5, an .npz, an image folder or torchvision-gtsrb:ROOT "
                            f"(default: {data})")  # fmt: skip
    parser.add_argument("--out", required=True, help="run folder: the artefact and result.json are written here")
    add_folder_options(parser)
    if device:
        parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default: cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice (default: 0)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def add_folder_options(parser: argparse.ArgumentParser) -> None:
    """``--restart`` and ``--force``: what a command may do with an ``--out`` that holds an earlier run."""
    parser.add_argument("--restart", action="store_true",
                        help="start over in an --out that holds this command's run with other settings or inputs "
                        "(the same run resumes without it)")  # fmt: skip
    parser.add_argument("--force", action="store_true",
                        help="also replace another command's run in --out, or write beside files no trojanlab run "
                        "wrote")  # fmt: skip


def folder_flags(args: argparse.Namespace) -> dict[str, bool]:
    """The keyword arguments of ``add_folder_options`` for an entry point."""
    return {"restart": bool(getattr(args, "restart", False)), "force": bool(getattr(args, "force", False))}


def unused_options(args: argparse.Namespace, cls: type, group: str) -> list[str]:
    """The flags of ``add_config(..., cls, group)`` the user set to something other than their default: for a
    command that will not read them (an option silently ignored is a wrong result waiting to happen)."""
    set_flags = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli", True) is False:
            continue
        value = getattr(args, f"{group}.{f.name}", None)
        default = _default(f, None)
        if isinstance(value, list) and isinstance(default, tuple):
            value = tuple(value)
        if value != default:
            set_flags.append(f.metadata.get("flag", "--" + f.name.replace("_", "-")))
    return set_flags


def add_model_source_options(parser: argparse.ArgumentParser) -> None:
    """``--model`` as any model file: an artefact folder, an ONNX file or a state dict, and what it does not state."""
    parser.add_argument("--model", required=True,
                        help="a trojanlab artefact folder, an .onnx file, or a state dict (.safetensors, or .pt/.pth "
                        "read with weights_only) with --arch")  # fmt: skip
    parser.add_argument("--arch", help="the architecture a state dict fills (gtsrb_cnn, any torchvision classifier)")
    parser.add_argument("--num-classes", type=int, help="classes of a state dict's model, or of an ONNX graph that "
                        "does not state them")  # fmt: skip
    parser.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"),
                        help="input size where the file does not state it")  # fmt: skip
    parser.add_argument("--mean", type=float, nargs="+", help="the input normalisation the model expects (with "
                        "--std; default: none, it takes [0, 1] images)")  # fmt: skip
    parser.add_argument("--std", type=float, nargs="+", help="see --mean")


def model_source(args: argparse.Namespace):
    """The :class:`~trojanlab.models.external.ModelSource` of ``add_model_source_options``."""
    from ..models.external import ModelSource

    return ModelSource(args.model, args.arch, args.num_classes, args.input_size, args.mean, args.std)
