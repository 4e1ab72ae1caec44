"""Realignment methods as planners (:mod:`~lssf_lightning.methods.base`), their declared parameters
(:mod:`~lssf_lightning.methods.spec`) and the registry ``realign`` and the sweep use
(:mod:`~lssf_lightning.methods.registry`).

A method is one module (a planner class, its :class:`~lssf_lightning.methods.spec.Param` declarations and a
:class:`~lssf_lightning.methods.spec.MethodSpec`) plus one line in
:data:`~lssf_lightning.methods.registry.METHODS`.
"""

from __future__ import annotations

from lssf_lightning.methods.base import Correction, Edit, LowRankPlanner, Planner, apply_edits
from lssf_lightning.methods.lssf import LSSF
from lssf_lightning.methods.registry import METHODS, check_options, make_planner, register_method
from lssf_lightning.methods.resta import Resta, resta
from lssf_lightning.methods.safelora import SafeLoRA, safelora
from lssf_lightning.methods.spec import MethodInputs, MethodSpec, Param
from lssf_lightning.methods.variants import LSSFErosion, LSSFReset, LSSFTwoSided

__all__ = [
    "LSSF",
    "METHODS",
    "Correction",
    "Edit",
    "LSSFErosion",
    "LSSFReset",
    "LSSFTwoSided",
    "LowRankPlanner",
    "MethodInputs",
    "MethodSpec",
    "Param",
    "Planner",
    "Resta",
    "SafeLoRA",
    "apply_edits",
    "check_options",
    "make_planner",
    "register_method",
    "resta",
    "safelora",
]
