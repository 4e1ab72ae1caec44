"""Checks for numeric and choice settings: the one place such a rule is written.

Every entry point (Python functions, the CLI, the callbacks, YAML configs through the config objects) calls
these at its boundary, so a bad value is refused before any work with a message naming the setting and the
value. ``bool`` is never accepted as a number (``True`` is an ``int`` in Python).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = [
    "SettingError",
    "check_choice",
    "check_cosine",
    "check_drop_rate",
    "check_finite",
    "check_fraction",
    "check_int",
    "check_number_list",
    "check_positive",
    "check_range",
    "check_seed",
]


class SettingError(ValueError):
    """A setting has a value it cannot take; the message names the setting and the value."""


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SettingError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise SettingError(f"{name} must be a finite number, got {value!r}")
    return value


def check_finite(name: str, value: Any) -> float:
    """``value`` as a float; refuses non-numbers, NaN and ±inf."""
    return _number(name, value)


def check_positive(name: str, value: Any) -> float:
    """``value`` as a float ``> 0`` (finite)."""
    value = _number(name, value)
    if value <= 0:
        raise SettingError(f"{name} must be > 0, got {value!r}")
    return value


def check_range(
    name: str, value: Any, low: float, high: float, *, low_open: bool = False, high_open: bool = False
) -> float:
    """``value`` as a float inside the interval from ``low`` to ``high`` (closed unless ``*_open``)."""
    value = _number(name, value)
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (above and below):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise SettingError(f"{name} must be in {interval}, got {value!r}")
    return value


def check_fraction(name: str, value: Any) -> float:
    """A rate or share in ``[0, 1]``."""
    return check_range(name, value, 0.0, 1.0)


def check_int(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an int ``≥ minimum`` (default: a positive integer)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise SettingError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise SettingError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_choice(name: str, value: Any, options: Sequence[Any]) -> Any:
    """``value`` if it is one of ``options``."""
    if value not in options:
        raise SettingError(f"{name} must be one of {tuple(options)}, got {value!r}")
    return value


def check_number_list(name: str, values: Iterable[Any] | None, *, positive: bool = True) -> list[float]:
    """A non-empty list of finite numbers (``> 0`` when ``positive``)."""
    if values is None or isinstance(values, (str, bytes)):
        raise SettingError(f"{name} must be a non-empty list of numbers, got {values!r}")
    items = list(values)
    if not items:
        raise SettingError(f"{name} must be a non-empty list of numbers, got {items!r}")
    check = check_positive if positive else check_finite
    return [check(f"{name}[{i}]", item) for i, item in enumerate(items)]


# Named rules for settings that several entry points take (methods, core, CLI): each bound written once.
def check_drop_rate(name: str, value: Any) -> float:
    """A DARE drop probability, in ``[0, 1)``."""
    return check_range(name, value, 0.0, 1.0, high_open=True)


def check_seed(name: str, value: Any) -> int:
    """A random seed, an integer ``≥ 0``."""
    return check_int(name, value, minimum=0)


def check_cosine(name: str, value: Any) -> float:
    """A cosine threshold, in ``[-1, 1]``."""
    return check_range(name, value, -1.0, 1.0)
