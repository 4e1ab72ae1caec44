"""Settings as config objects, validated once (peft's ``LoraConfig`` style).

:class:`SubspaceConfig` holds everything that decides a safety subspace (Eqs. 4–11): it is the one place these
settings are spelled out. :meth:`SafetySubspace.from_weights`, the builder, the fingerprint, ``realign``, the
CLI and the callbacks all take it. In a LightningCLI YAML it is a nested block::

    subspace:
      eta: 0.8
      max_rank: 64
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from lssf_lightning.validation import (
    SettingError,
    check_choice,
    check_fraction,
    check_int,
    check_number_list,
    check_positive,
    check_range,
)

__all__ = [
    "DEFAULT_ADD",
    "DEFAULT_ALPHA",
    "DEFAULT_BETA",
    "DEFAULT_DROP_RATE",
    "DEFAULT_INPUT_SHARE",
    "DEFAULT_SEED",
    "DEFAULT_THRESHOLD",
    "AutoAlphaConfig",
    "SubspaceConfig",
    "calibration_identity",
]

# The realignment methods' scalar settings: their defaults, written once for the planners
# (lssf_lightning.methods), their registry factories, ``realign_checkpoint`` and ``lssf-lightning realign``.
DEFAULT_ALPHA = 1.0
"""LSSF fusion strength ``α`` (Eq. 13)."""
DEFAULT_BETA = 1.0
"""RESTA's scale ``β`` of the safety vector."""
DEFAULT_DROP_RATE = 0.0
"""RESTA's DARE drop probability (``0`` = no DARE step)."""
DEFAULT_SEED = 0
"""DARE's seed."""
DEFAULT_THRESHOLD = 0.5
"""SafeLoRA's cosine threshold ``τ``."""
DEFAULT_ADD = 0.0
"""The fusion variants' strength ``β`` of the additive term on top (``lssf-reset``, ``lssf-erosion``,
``lssf-two-sided``)."""
DEFAULT_INPUT_SHARE = 1.0
"""``lssf-two-sided``: the share ``ρ`` of the input-side part that is reset."""

Source = Literal["weights", "activations"]
SVDMethod = Literal["auto", "exact", "randomized", "gram"]
SOURCES: tuple[str, ...] = ("weights", "activations")
SVD_METHODS: tuple[str, ...] = ("auto", "exact", "randomized", "gram")


def _patterns(name: str, value: str | Sequence[str] | None) -> str | tuple[str, ...] | None:
    """peft-style module patterns: ``None``, ``"all-linear"``, a full-match regex string, or a list of
    names."""
    if value is None:
        return None
    if isinstance(value, str):
        if value != "all-linear":
            try:
                re.compile(value)
            except re.error as err:
                raise SettingError(f"{name} is not a valid regular expression: {value!r} ({err})") from None
        return value
    items = tuple(value)
    if not items or not all(isinstance(item, str) and item for item in items):
        raise SettingError(
            f"{name} must be a regex string or a non-empty list of module names, got {value!r}"
        )
    return items


_HASHED_ORDER = ("eta", "alpha_1", "source", "max_rank", "target_modules", "exclude_modules")


def _setting(default: Any, help: str) -> Any:
    """A config field whose help text lives in its metadata (peft's ``LoraConfig`` style): the CLI's
    ``--help``, the class docstring (and with it LightningCLI's help) are generated from it."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class SubspaceConfig:
    """What decides a safety subspace."""

    eta: float = _setting(0.9, "share ``η`` of the safety singular value entropy each rank keeps, in "
                               "``(0, 1]`` (Eq. 7)")
    alpha_1: float = _setting(1.0, "weight ``α₁`` of the strongest direction in the weighted projector "
                                   "(Eq. 10); ``1`` = plain")
    source: Source = _setting("weights", "``weights``: SVD of ``δ`` (data-free); ``activations``: SVD of "
                                         "``δ·X̂`` on the layer inputs of ``calibration`` (Eq. 4)")
    calibration: str | list[str] | None = _setting(
        None, "for ``activations``: a prompt file (.txt/.jsonl/.csv/.json), a list of prompts or of "
              "``(prompt, response)`` pairs; ``None``: the bundled harmful calibration prompts")
    target_modules: str | list[str] | None = _setting(
        None, "peft-style selection: module-name suffixes, a full-match regex, or ``all-linear``; ``None``: "
              "every linear layer of the transformer blocks")
    exclude_modules: str | list[str] | None = _setting(
        None, "peft-style exclusion, applied after ``target_modules``")
    max_rank: int | None = _setting(None, "optional cap on every rank, after the entropy rule")
    svd_method: SVDMethod = _setting("auto", "``auto`` (fast, certified), ``exact``, ``randomized`` or "
                                             "``gram``")
    max_calibration_tokens: int | None = _setting(
        None, "stop collecting calibration inputs after this many response tokens")

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "eta", check_range("eta", self.eta, 0.0, 1.0, low_open=True))
        set_(self, "alpha_1", check_positive("alpha_1", self.alpha_1))
        check_choice("source", self.source, SOURCES)
        check_choice("svd_method", self.svd_method, SVD_METHODS)
        set_(self, "target_modules", _patterns("target_modules", self.target_modules))
        set_(self, "exclude_modules", _patterns("exclude_modules", self.exclude_modules))
        if self.max_rank is not None:
            check_int("max_rank", self.max_rank)
        if self.max_calibration_tokens is not None:
            check_int("max_calibration_tokens", self.max_calibration_tokens)
        if isinstance(self.calibration, list):
            set_(self, "calibration", tuple(tuple(c) if isinstance(c, list) else c for c in self.calibration))

    def replace(self, **changes: Any) -> SubspaceConfig:
        """A copy with ``changes`` applied (validated again)."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings (lists, not tuples)."""

        def plain(value):
            return [plain(v) for v in value] if isinstance(value, (list, tuple)) else value

        return {key: plain(value) for key, value in asdict(self).items()}

    def hashed_settings(self) -> dict[str, Any]:
        """The settings recorded in a subspace's metadata and hashed into its fingerprint.

        ``svd_method`` is left out (every method certifies the same ranks); so is an unset
        ``max_calibration_tokens``, which keeps fingerprints of files written before it existed valid.
        """
        everything = self.to_dict()
        # In the order subspace files recorded them before config objects (keeps their headers identical).
        settings = {key: everything[key] for key in _HASHED_ORDER}
        if everything["max_calibration_tokens"] is not None:
            settings["max_calibration_tokens"] = everything["max_calibration_tokens"]
        calibration = everything["calibration"]
        if self.source == "activations":
            settings["calibration"] = calibration_identity(calibration)
        return settings

    @classmethod
    def coerce(cls, config: SubspaceConfig | Mapping[str, Any] | None) -> SubspaceConfig:
        """``config`` as a :class:`SubspaceConfig`: itself, one built from a mapping of its fields (a YAML
        block), or the defaults for ``None``. Unknown names raise ``TypeError`` like a normal call."""
        if isinstance(config, Mapping):
            return cls(**config)
        return config if config is not None else cls()

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> SubspaceConfig:
        """The config recorded in a subspace file's metadata (calibration is only known by its hash there)."""
        names = {f.name for f in fields(cls)} - {"calibration"}
        return cls(**{k: v for k, v in metadata.items() if k in names})



def _document_fields(cls: type) -> type:
    """Append an ``Args:`` section written from the fields' help metadata to ``cls``'s docstring."""
    lines = [f"        {f.name}: {f.metadata['help']}." for f in fields(cls) if "help" in f.metadata]
    cls.__doc__ = f"{cls.__doc__}\n\n    Args:\n" + "\n".join(lines) + "\n    "
    return cls


_document_fields(SubspaceConfig)

@dataclass(frozen=True)
class AutoAlphaConfig:
    """How ``alpha="auto"`` chooses the fusion strength.

    Args:
        alphas: the grid, scanned from the smallest value (refusal is not monotone in ``α``).
        target: the refusal rate to reach on ``prompts``; ``None``: the aligned model's own rate at fit start
            minus ``tolerance``.
        tolerance: see ``target``.
        prompts: harmful prompts for tuning (a path); ``None``: the bundled calibration set, disjoint from the
            monitor's evaluation prompts.
        max_perplexity_increase: utility budget: the largest allowed relative perplexity increase over the raw
            weights on the utility texts (``0.05`` = +5 %); ``None``: no utility constraint.
        methods: the forms to choose among (low-rank methods, e.g. ``["lssf-reset", "lssf"]``; earlier ones
            win ties); ``None``: ``monitoring.DEFAULT_AUTO_METHODS``. A callback's ``method=`` narrows it to
            that one form.
    """

    alphas: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0])
    target: float | None = None
    tolerance: float = 0.05
    prompts: str | None = None
    max_perplexity_increase: float | None = None
    methods: list[str] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "alphas", sorted(check_number_list("alphas", self.alphas)))
        if self.methods is not None:
            if isinstance(self.methods, str) or not self.methods or not all(
                    isinstance(m, str) for m in self.methods):
                raise SettingError(f"methods must be a non-empty list of method names, got {self.methods!r}")
            object.__setattr__(self, "methods", list(dict.fromkeys(self.methods)))
        if self.target is not None:
            object.__setattr__(self, "target", check_fraction("target", self.target))
        object.__setattr__(self, "tolerance", check_fraction("tolerance", self.tolerance))
        if self.max_perplexity_increase is not None:
            check_range("max_perplexity_increase", self.max_perplexity_increase, 0.0, float("inf"))


def calibration_identity(calibration) -> dict[str, str]:
    """What the calibration set is, by content: a file's bytes, an inline list, or the bundled set."""
    if calibration is None:
        return {"source": "bundled:harmful_calibration"}
    if isinstance(calibration, (str, os.PathLike)):
        path = Path(calibration).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"calibration file not found: {path}")
        return {"source": str(path), "hash": hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()}
    items = [i if isinstance(i, str) else list(i) for i in calibration]
    return {
        "source": "inline",
        "hash": hashlib.blake2b(json.dumps(items).encode(), digest_size=16).hexdigest(),
    }
