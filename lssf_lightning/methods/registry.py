"""The registry of realignment methods: one line per method, and what the declarations give everyone else.

A method is one module that declares a :class:`~lssf_lightning.methods.spec.MethodSpec` (its factory, its
parameters with type, range, default and help, its default sweep points) plus one line in :data:`METHODS`
below. From the declarations come ``realign --method``'s choices and flags (:func:`all_parameters`), option
checking (:func:`check_options`: a parameter the method does not take is an error naming the ones it takes),
the sweep grid and the planner (:func:`make_planner`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from lssf_lightning.methods import lssf, resta, safelora, variants
from lssf_lightning.methods.base import Planner
from lssf_lightning.methods.spec import MethodInputs, MethodSpec, Param
from lssf_lightning.validation import SettingError, check_choice

__all__ = [
    "METHODS",
    "all_parameters",
    "check_options",
    "make_planner",
    "register_method",
]

METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (lssf.SPEC, variants.RESET, variants.EROSION, variants.TWO_SIDED, resta.SPEC, safelora.SPEC)
}
"""Every method by name, in the order the sweep runs them."""


def register_method(
    name: str, parameters: tuple[Param, ...] = (), **spec: Any
) -> Callable[[Callable[[MethodInputs], Planner]], Callable[[MethodInputs], Planner]]:
    """Decorator: register ``factory`` as the method ``name`` (replacing an earlier one of that name), with
    its declared ``parameters`` and the further :class:`MethodSpec` fields in ``spec`` (``grid``, …)."""

    def register(factory: Callable[[MethodInputs], Planner]) -> Callable[[MethodInputs], Planner]:
        METHODS[name] = MethodSpec(name, factory, tuple(parameters), **spec)
        return factory

    return register


def all_parameters() -> dict[str, Param]:
    """Every declared parameter by name, with the methods that take it (a name means one declaration)."""
    found: dict[str, Param] = {}
    for spec in METHODS.values():
        for param in spec.parameters:
            if found.setdefault(param.name, param) != param:
                raise ValueError(f"parameter {param.name!r} is declared twice, differently ({spec.name!r})")
    return found


def takers(name: str) -> list[str]:
    """The methods that take the parameter ``name``."""
    return [spec.name for spec in METHODS.values() if name in spec.names]


def check_options(
    method: str, options: Mapping[str, Any], spell: Callable[[str], str] = str
) -> dict[str, Any]:
    """``method``'s parameters: the given ``options`` checked against their declarations, the rest defaulted.

    A parameter the method does not take is an error naming the ones it takes and the method(s) the given one
    belongs to; ``spell`` writes a parameter name as the caller knows it (the CLI: ``--input-share``).
    """
    spec = METHODS[check_choice("method", method, tuple(METHODS))]
    for name in options:
        if name not in spec.names:
            takes = ", ".join(spell(n) for n in spec.names) or "no parameters"
            owners = takers(name)
            where = (f"{spell(name)} belongs to {', '.join(owners)}" if owners
                     else f"{spell(name)} is no method's parameter")
            raise SettingError(f"method {method!r} takes {takes}; {where}")
    return {p.name: p.check(options[p.name], spell(p.name)) if p.name in options else p.default
            for p in spec.parameters}


def make_planner(method: str, inputs: MethodInputs) -> Planner:
    """The planner of the registered ``method`` for ``inputs`` (its options checked and completed first)."""
    options = check_options(method, inputs.options)
    return METHODS[method].factory(
        MethodInputs(inputs.finetuned, inputs.aligned, inputs.unaligned, inputs.subspace, inputs.config,
                     options, inputs.allow_partial, inputs.progress)
    )
