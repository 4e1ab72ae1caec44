"""Parameter names: wrapper prefixes, module selection (peft vocabulary) and matching across checkpoints.

A weight is known by its canonical state-dict key, e.g. ``model.layers.0.self_attn.q_proj.weight``. The same
weight seen through a LightningModule, DDP, ``torch.compile``, FSDP or peft carries extra segments
(``model.``, ``_forward_module.``, ``_orig_mod.``, ``base_model.model.``, ``.base_layer``):
:func:`canonical_key` removes them, and :class:`KeyMatcher` pairs keys of two checkpoints by their longest
common dotted suffix, so a LightningModule holding the HF model under any attribute name still matches a plain
HF checkpoint.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Sequence

__all__ = [
    "KeyMatcher",
    "canonical_key",
    "in_transformer_block",
    "is_adapter_key",
    "matches_modules",
    "module_name",
]

# Segments that wrappers insert anywhere in a key (Fabric/Lightning, torch.compile, FSDP, activation
# checkpointing).
_WRAPPER_SEGMENTS = {"_forward_module", "_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"}
_LEADING_WRAPPERS = (("module",), ("base_model", "model"))
_ADAPTER_SEGMENT = re.compile(r"^(lora_[A-Za-z_]+|original_module|hada_\w+|lokr_\w+|ia3_\w+)$")
_LAYER_INDEX = re.compile(r"\.\d+\.")
_NON_BLOCK_WORDS = ("embed", "norm", "lm_head", "wte", "wpe", "ln_")


def is_adapter_key(key: str) -> bool:
    """True for peft adapter tensors (``lora_A``, ``lora_B``, ``original_module``…), which are never
    targets."""
    return any(_ADAPTER_SEGMENT.match(segment) for segment in key.split("."))


def canonical_key(key: str) -> str:
    """Strip wrapper segments: ``_forward_module.model._orig_mod.layers.0.q.base_layer.weight`` →
    ``model.layers.0.q.weight``.

    Leading ``module.`` (DDP) and ``base_model.model.`` (peft) are removed, as are ``.base_layer`` (peft LoRA)
    and ``.modules_to_save.<adapter>`` (peft's trained copies) wherever they appear.
    """
    segments = [s for s in key.split(".") if s not in _WRAPPER_SEGMENTS]
    stripped = True
    while stripped:
        stripped = False
        for prefix in _LEADING_WRAPPERS:
            if tuple(segments[: len(prefix)]) == prefix and len(segments) > len(prefix):
                segments = segments[len(prefix) :]
                stripped = True
    out: list[str] = []
    skip_next = False
    for segment in segments:
        if skip_next:
            skip_next = False
            continue
        if segment == "base_layer":
            continue
        if segment == "modules_to_save":
            skip_next = True
            continue
        out.append(segment)
    return ".".join(out)


def module_name(key: str) -> str:
    """The module a parameter belongs to: ``a.b.weight`` → ``a.b``."""
    return key.rsplit(".", 1)[0] if "." in key else ""


def in_transformer_block(key: str) -> bool:
    """True for weights inside a numbered block (``layers.3.``, ``h.3.``) that are not embeddings or norms."""
    if not key.endswith(".weight") or not _LAYER_INDEX.search(key):
        return False
    leaf = module_name(key).rsplit(".", 1)[-1].lower()
    return not any(word in leaf for word in _NON_BLOCK_WORDS)


def matches_modules(name: str, patterns: str | Sequence[str] | None) -> bool:
    """peft's ``target_modules`` rule: a list matches a module whose name equals or ends with ``.<item>``;
    a string is a regular expression that must match the whole module name."""
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


class KeyMatcher:
    """Pairs keys of one naming scheme with the keys of a reference checkpoint.

    A key matches the reference key that shares its longest common dotted suffix, provided that suffix is
    shared by that reference key alone and covers at least the module name and one more segment
    (``q_proj.weight`` alone never decides). Canonicalisation happens on both sides first.

    Example:
        >>> m = KeyMatcher(["model.layers.0.self_attn.q_proj.weight",
        ...                 "model.layers.1.self_attn.q_proj.weight"])
        >>> m.match("model.model.layers.1.self_attn.q_proj.base_layer.weight")
        'model.layers.1.self_attn.q_proj.weight'
    """

    def __init__(self, reference_keys: Iterable[str], min_segments: int = 3) -> None:
        self.min_segments = min_segments
        self._by_suffix: dict[tuple[str, ...], set[str]] = defaultdict(set)
        self._canonical: dict[str, tuple[str, ...]] = {}
        for key in reference_keys:
            if is_adapter_key(key):
                continue
            segments = tuple(canonical_key(key).split("."))
            self._canonical[key] = segments
            for start in range(len(segments)):
                self._by_suffix[segments[start:]].add(key)

    def match(self, key: str) -> str | None:
        """The reference key for ``key``, or ``None`` when there is none or it is ambiguous."""
        if is_adapter_key(key):
            return None
        segments = tuple(canonical_key(key).split("."))
        for start in range(len(segments)):
            suffix = segments[start:]
            candidates = self._by_suffix.get(suffix, set())
            if len(suffix) < self.min_segments:
                # A short suffix decides only when it is a whole key (``lm_head.weight``), never a bare leaf.
                candidates = {c for c in candidates if self._canonical[c] == suffix}
            if candidates:
                return next(iter(candidates)) if len(candidates) == 1 else None
        return None

    def match_all(self, keys: Iterable[str]) -> dict[str, str]:
        """``{key: reference_key}`` for every key that matches; two keys claiming one reference key is an
        error."""
        pairs: dict[str, str] = {}
        claimed: dict[str, str] = {}
        for key in keys:
            reference = self.match(key)
            if reference is None:
                continue
            if reference in claimed:
                raise ValueError(
                    f"both {claimed[reference]!r} and {key!r} match {reference!r}; "
                    "select one of them with target_modules / exclude_modules"
                )
            claimed[reference] = key
            pairs[key] = reference
        return pairs
