"""The 0.1 spellings of ``LSSFCallback``'s flat arguments, mapped to the config objects with a
DeprecationWarning naming the new spelling (kept for one release)."""

from __future__ import annotations

import warnings
from typing import Any

from lightning.fabric.utilities.exceptions import MisconfigurationException

from lssf_lightning.config import AutoAlphaConfig
from lssf_lightning.lightning.monitor import RefusalMonitor
from lssf_lightning.validation import SettingError

__all__ = ["legacy_auto", "legacy_monitor", "pop_renamed", "split_arguments", "translate_init_args"]

# old keyword -> the new argument of RefusalMonitor / AutoAlphaConfig
_LEGACY_MONITOR = {"refusal_prompts": "harmful_prompts", "harmless_prompts": "harmless_prompts",
                   "num_monitor_prompts": "num_prompts", "monitor_max_new_tokens": "max_new_tokens",
                   "judge": "judge"}
_LEGACY_AUTO = {"auto_alphas": "alphas", "auto_target": "target", "auto_tolerance": "tolerance",
                "auto_prompts": "prompts"}


def split_arguments(legacy: dict[str, Any], monitor, auto_alpha, keep_raw_fixups) -> tuple:
    """``(monitor, auto-α's monitor, auto_alpha, keep_raw_fixups)`` with the 0.1 keywords in ``legacy`` merged
    in and removed from it (each warned about, naming its new spelling); the subspace ones are left."""
    keep_raw_fixups = pop_renamed(legacy, "keep_raw_weights", "keep_raw_fixups", keep_raw_fixups,
                                  stacklevel=4)
    monitor, auto_monitor = legacy_monitor(legacy, monitor, stacklevel=4)
    auto_alpha = legacy_auto(legacy, auto_alpha, stacklevel=4)
    return monitor, auto_monitor, auto_alpha, keep_raw_fixups


def pop_renamed(legacy: dict[str, Any], old: str, new: str, value: Any, stacklevel: int = 3) -> Any:
    """``legacy.pop(old)`` with a DeprecationWarning naming ``new`` when given, else ``value``."""
    if old not in legacy:
        return value
    warnings.warn(f"LSSFCallback({old}=) is deprecated; use {new}=", DeprecationWarning,
                  stacklevel=stacklevel)
    return legacy.pop(old)


def _pop_group(legacy: dict[str, Any], renames: dict[str, str], spelling: str, stacklevel: int) -> dict:
    """``{new name: value}`` of the 0.1 keywords of ``renames`` given in ``legacy`` (removed from it), with
    one DeprecationWarning naming the new spelling, ``spelling(new=, ...)``."""
    given = {new: legacy.pop(old) for old, new in renames.items() if old in legacy}
    if given:
        old = ", ".join(f"{o}=" for o, n in renames.items() if n in given)
        new = ", ".join(f"{n}=" for n in given)
        warnings.warn(f"LSSFCallback({old}) is deprecated; use {spelling}({new})", DeprecationWarning,
                      stacklevel=stacklevel)
    return given


def legacy_monitor(
    legacy: dict[str, Any], monitor: RefusalMonitor | bool, stacklevel: int = 3
) -> tuple[RefusalMonitor | bool, Any]:
    """``(monitor, auto-α's monitor)`` from the 0.1 ``monitor_refusal``/``judge``/… arguments, if any."""
    monitor = pop_renamed(legacy, "monitor_refusal", "monitor", monitor, stacklevel=stacklevel + 1)
    given = _pop_group(legacy, _LEGACY_MONITOR, "monitor=RefusalMonitor", stacklevel=stacklevel + 1)
    if not given:
        return monitor, None
    try:
        built = RefusalMonitor(**given)
    except MisconfigurationException as err:
        raise SettingError(str(err).removeprefix("RefusalMonitor: ")) from None
    return (built if monitor is True else monitor), built


def legacy_auto(legacy: dict[str, Any], config: Any, stacklevel: int = 3) -> Any:
    """``config`` with the 0.1 ``auto_alphas``/``auto_target``/… arguments merged in."""
    given = _pop_group(legacy, _LEGACY_AUTO, "auto_alpha=AutoAlphaConfig", stacklevel=stacklevel + 1)
    if not given:
        return config
    return AutoAlphaConfig(**{**(vars(config) if config else {}), **given})


def translate_init_args(init_args: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A YAML ``init_args`` block of ``LSSFCallback`` written with the 0.1 names, in the new nesting
    (``subspace:``, ``monitor:``, ``auto_alpha:``); returns it and the old names it moved."""
    from dataclasses import fields

    from lssf_lightning.config import SubspaceConfig

    args, moved = dict(init_args), []

    def take(old: str) -> Any:
        moved.append(old)
        return args.pop(old)

    subspace = {f.name: take(f.name) for f in fields(SubspaceConfig) if f.name in args}
    if subspace:
        args["subspace"] = {**(args.get("subspace") or {}), **subspace}
    monitor = {new: take(old) for old, new in _LEGACY_MONITOR.items() if old in args}
    if "monitor_refusal" in args and not take("monitor_refusal"):
        args["monitor"] = False
    elif monitor:
        args["monitor"] = {"class_path": f"{RefusalMonitor.__module__}.RefusalMonitor", "init_args": monitor}
    auto = {new: take(old) for old, new in _LEGACY_AUTO.items() if old in args}
    if auto:
        args["auto_alpha"] = auto
    if "keep_raw_weights" in args:
        args["keep_raw_fixups"] = take("keep_raw_weights")
    return args, moved
