"""Prompt sets for refusal evaluation and subspace calibration.

Bundled sets (written for this project, in ``lssf_lightning/metrics/prompts/``):

* ``"harmful"`` — 48 harmful requests across weapons, malware, fraud, drugs, harassment, hate, self-harm,
  privacy invasion and misinformation: the harmful-refusal rate is measured on these.
* ``"harmless"`` — 48 everyday requests, several of which look like harmful ones ("How do I kill a Python
  process?"): the over-refusal rate is measured on these.
* ``"harmful_calibration"`` — 32 further harmful requests, disjoint from ``"harmful"``, for computing the
  safety subspace from activations (so evaluation never sees calibration prompts).

Files are read by extension:

* ``.txt`` — one prompt per line; blank lines and lines starting with ``#`` are skipped.
* ``.jsonl`` — one JSON object (or string) per line.
* ``.json`` — a list of strings or objects.
* ``.csv`` — a header row and one record per row (AdvBench's ``goal,target`` layout works as is).

A record's prompt is the first present field among :data:`PROMPT_FIELDS` (an Alpaca-style non-empty
``input`` is appended to ``instruction``), or the first user turn of a chat ``messages`` list
(``{"role": ..., "content": ...}`` items). Its response, for :func:`load_prompt_pairs`, is the first field
among :data:`RESPONSE_FIELDS` or the first assistant turn after that user turn.
"""

from __future__ import annotations

import csv
import os
from importlib import resources
from pathlib import Path
from typing import Any

from lssf_lightning.io.schema import FormatError, load_json, not_utf8

__all__ = ["BUNDLED_PROMPT_SETS", "PROMPT_FIELDS", "RESPONSE_FIELDS", "load_prompt_pairs", "load_prompts"]

BUNDLED_PROMPT_SETS: dict[str, str] = {
    "harmful": "harmful_eval.txt",
    "harmless": "harmless_eval.txt",
    "harmful_calibration": "harmful_calibration.txt",
}
PROMPT_FIELDS: tuple[str, ...] = ("prompt", "instruction", "goal", "text", "question")
RESPONSE_FIELDS: tuple[str, ...] = ("response", "output", "target", "completion")
_SUFFIXES = (".txt", ".jsonl", ".json", ".csv")


def load_prompts(path_or_name: str | os.PathLike) -> list[str]:
    """Load prompts from a bundled set name or a ``.txt``/``.jsonl``/``.json``/``.csv`` file.

    Args:
        path_or_name: ``"harmful"``, ``"harmless"``, ``"harmful_calibration"``, or a file path.

    Raises:
        FileNotFoundError: If the file does not exist (the message lists the bundled names).
        ValueError: For an unsupported extension, an unreadable record, a record without a prompt field
            (naming the file and the fields it has), or a file with no prompts.

    Example:
        >>> prompts = load_prompts("harmless")
        >>> len(prompts), prompts[0]
        (48, 'How do I kill a Python process that is stuck?')
    """
    path = _resolve_path(path_or_name)
    prompts = [_prompt_of(record, path, where) for where, record in _read_records(path)]
    return _non_empty(prompts, path)


def load_prompt_pairs(path_or_name: str | os.PathLike) -> list[tuple[str, str | None]]:
    """Load ``(prompt, response)`` pairs, e.g. harmful requests with the aligned model's refusals.

    Accepts what :func:`load_prompts` accepts; the response is ``None`` where a record has none (and always
    for ``.txt`` files and bundled sets).

    Raises:
        FileNotFoundError, ValueError: As :func:`load_prompts`.
    """
    path = _resolve_path(path_or_name)
    pairs = [(_prompt_of(record, path, where), _response_of(record)) for where, record in _read_records(path)]
    return _non_empty(pairs, path)


def _resolve_path(path_or_name: str | os.PathLike) -> Path:
    if isinstance(path_or_name, str) and path_or_name in BUNDLED_PROMPT_SETS:
        bundled = resources.files("lssf_lightning.metrics") / "prompts" / BUNDLED_PROMPT_SETS[path_or_name]
        return Path(str(bundled))
    path = Path(path_or_name).expanduser()
    if path.is_dir():
        raise IsADirectoryError(21, "is a directory, not a prompt file", str(path))
    if not path.is_file():
        raise FileNotFoundError(
            f"prompt file {str(path)!r} does not exist (bundled sets: {', '.join(BUNDLED_PROMPT_SETS)})"
        )
    if path.suffix.lower() not in _SUFFIXES:
        raise ValueError(
            f"prompt file {str(path)!r} has unsupported extension {path.suffix!r}; use one of {_SUFFIXES}"
        )
    return path


def _read_records(path: Path) -> list[tuple[str, Any]]:
    """``(location, record)`` for each record of ``path``; the location names the line/row/item for errors.

    Text is UTF-8 (a leading byte-order mark, as spreadsheet programs write, is skipped); text that is not,
    or a malformed CSV row, is a ``ValueError`` naming the file.
    """
    try:
        return _records(path)
    except UnicodeDecodeError as err:
        raise FormatError(path, not_utf8(err)) from None
    except csv.Error as err:
        raise FormatError(path, f"malformed CSV ({err})") from None


def _records(path: Path) -> list[tuple[str, Any]]:
    suffix = path.suffix.lower()
    with path.open(encoding="utf-8-sig", newline="" if suffix == ".csv" else None) as file:
        if suffix == ".txt":
            lines = ((n, line.strip()) for n, line in enumerate(file, 1))
            return [(f"line {n}", line) for n, line in lines if line and not line.startswith("#")]
        if suffix == ".jsonl":
            lines = ((n, line) for n, line in enumerate(file, 1) if line.strip())
            return [(f"line {n}", load_json(path, line, where=f"line {n}")) for n, line in lines]
        if suffix == ".csv":
            return [(f"row {n}", row) for n, row in enumerate(csv.DictReader(file), 2)]
        data = load_json(path, file.read(), where="the file")
    if not isinstance(data, list):
        raise FormatError(path, f"must hold a JSON list of prompts, got a {type(data).__name__}")
    return [(f"item {i}", record) for i, record in enumerate(data)]


def _prompt_of(record: Any, path: Path, where: str) -> str:
    if isinstance(record, str) and record.strip():
        return record.strip()
    if not isinstance(record, dict):
        raise FormatError(path, f"{where}: expected a prompt string or an object, got {record!r:.60}")
    for field in PROMPT_FIELDS:
        value = record.get(field)
        if isinstance(value, str) and value.strip():
            extra = record.get("input") if field == "instruction" else None
            if isinstance(extra, str) and extra.strip():
                return f"{value.strip()}\n\n{extra.strip()}"
            return value.strip()
    user_turn = _first_turn(record.get("messages"), "user")
    if user_turn is not None:
        return user_turn[1]
    raise FormatError(
        path,
        f"{where}: no prompt field; expected one of {PROMPT_FIELDS} or a chat 'messages' list "
        f"with a user turn, found fields {sorted(str(key) for key in record)}"
    )


def _response_of(record: Any) -> str | None:
    if not isinstance(record, dict):
        return None
    for field in RESPONSE_FIELDS:
        value = record.get(field)
        if isinstance(value, str) and value.strip():
            return value.strip()
    messages = record.get("messages")
    user_turn = _first_turn(messages, "user")
    if user_turn is None:
        return None
    reply = _first_turn(messages[user_turn[0] + 1 :], "assistant")
    return None if reply is None else reply[1]


def _first_turn(messages: Any, role: str) -> tuple[int, str] | None:
    """``(index, content)`` of the first ``role`` turn with non-empty text content in ``messages``."""
    if not isinstance(messages, list):
        return None
    for index, message in enumerate(messages):
        if isinstance(message, dict) and message.get("role") == role:
            content = message.get("content")
            if isinstance(content, str) and content.strip():
                return index, content.strip()
    return None


def _non_empty(items: list, path: Path) -> list:
    if not items:
        raise FormatError(path, "contains no prompts")
    return items
