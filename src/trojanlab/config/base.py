"""The pieces every config dataclass uses: an option with its help text, and checks that name what was expected."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from ..errors import ConfigError


def option(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = None, **cli: Any) -> Any:
    """A dataclass field with its ``--help`` text; ``cli`` holds how the command line shows it: ``flag`` (when not
    ``--field-name``), ``choices``, ``metavar``, or ``cli=False`` for settings only the library and the profiles set."""
    metadata = {"help": help, **cli}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def to_dict(config: Any) -> dict[str, Any]:
    """A config as JSON-ready builtins (tuples become lists)."""
    return dataclasses.asdict(config)


def check_int(owner: str, name: str, value: Any, low: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{owner}.{name} must be an integer, got {value!r}")
    if low is not None and value < low:
        raise ConfigError(f"{owner}.{name} must be at least {low}, got {value}")


def check_number(
    owner: str,
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """``value`` is a finite number in the interval (closed unless ``*_open``), or a :class:`ConfigError` says so."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{owner}.{name} must be a finite number, got {value!r}")
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        raise ConfigError(f"{owner}.{name} must lie in {left}{lo}, {hi}{right}, got {value!r}")


def check_choice(owner: str, name: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{owner}.{name} must be one of {', '.join(map(str, choices))}, got {value!r}")
