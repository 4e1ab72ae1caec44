"""Schema checks for the files the project reads: a violation is one :class:`FormatError` naming file and
field.

Each parser (safetensors header, shard index, adapter config, subspace metadata, prompt files) validates
what it reads at its boundary with these helpers, so nothing downstream meets a missing key or a wrong type.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

__all__ = ["FormatError", "field", "load_json", "not_utf8"]

_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", dict: "an object",
               list: "a list"}


class FormatError(ValueError):
    """A file does not follow its format; the message names the file and the field."""

    def __init__(self, path: str | os.PathLike, message: str) -> None:
        super().__init__(f"{os.fspath(path)}: {message}")
        self.path = os.fspath(path)


def load_json(path: str | os.PathLike, text: str | None = None, *, where: str = "") -> Any:
    """The JSON document in ``path`` (or ``text`` read from it, at ``where``: ``"line 3"``); text that is not
    UTF-8 or not JSON is a :class:`FormatError` (the one place the project parses JSON it reads)."""
    try:
        if text is None:
            with open(path, encoding="utf-8") as file:
                text = file.read()
        return json.loads(text)
    except UnicodeDecodeError as err:
        raise FormatError(path, not_utf8(err)) from None
    except json.JSONDecodeError as err:
        problem = f"{where}: invalid JSON ({err})" if where else f"invalid JSON ({err})"
        raise FormatError(path, problem) from None


def not_utf8(err: UnicodeDecodeError) -> str:
    """The message for a file that is not UTF-8 text."""
    return f"is not UTF-8 text ({err.reason} at byte {err.start})"


def field(path: str | os.PathLike, record: Any, name: str, kind: type | tuple[type, ...], *,
          where: str = "", default: Any = ..., finite: bool = True) -> Any:
    """``record[name]`` checked to be of ``kind`` (``int`` also for ``float``; ``bool`` never a number).

    Args:
        path: the file, for the message.
        record: the JSON object holding the field.
        name: the field.
        kind: the accepted type(s).
        where: the object's place in the file, e.g. ``"entry 'layers.0.q_proj.weight'"``.
        default: returned when the field is absent (absent is an error without a default).
        finite: numbers must be finite.
    """
    label = f"{where}: field {name!r}" if where else f"field {name!r}"
    if not isinstance(record, dict):
        raise FormatError(path, f"{where or 'the top level'} must be a JSON object, "
                                f"got {type(record).__name__}")
    if name not in record:
        if default is ...:
            raise FormatError(path, f"{label} is missing")
        return default
    value = record[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    numeric = float in kinds and isinstance(value, int) and not isinstance(value, bool)
    wrong_bool = isinstance(value, bool) and bool not in kinds
    if wrong_bool or not (isinstance(value, kinds) or numeric):
        expected = " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)
        raise FormatError(path, f"{label} must be {expected}, got {value!r:.60}")
    if finite and isinstance(value, float) and not math.isfinite(value):
        raise FormatError(path, f"{label} must be a finite number, got {value!r}")
    return value
