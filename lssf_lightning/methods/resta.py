"""RESTA (Bhardwaj et al., ACL 2024) as a planner: ``W ← W + β·DARE(δ)`` on every targeted weight.

The per-matrix math is :func:`lssf_lightning.core.baselines.resta_weight`; this module pairs the weights.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lssf_lightning.config import DEFAULT_BETA, DEFAULT_DROP_RATE, DEFAULT_SEED
from lssf_lightning.core.baselines import resta_weight
from lssf_lightning.core.checks import all_finite
from lssf_lightning.io.names import KeyMatcher
from lssf_lightning.io.weights import WeightsLike, WeightStore, open_weights
from lssf_lightning.methods.base import Edit, apply_edits
from lssf_lightning.methods.spec import MAX_STRENGTH, MethodInputs, MethodSpec, Param
from lssf_lightning.subspace import check_correspondence, select_target_pairs, target_keys
from lssf_lightning.validation import check_drop_rate, check_finite, check_seed

__all__ = ["SPEC", "Resta", "resta"]

BETA = Param("beta", float, DEFAULT_BETA, "RESTA's scale of the safety vector", low=0.0, high=MAX_STRENGTH)
DROP_RATE = Param("drop_rate", float, DEFAULT_DROP_RATE, "RESTA's DARE drop probability (0 = no DARE)",
                  low=0.0, high=1.0, high_open=True)
SEED = Param("seed", int, DEFAULT_SEED, "DARE's seed", low=0)


def _seed_for(seed: int, key: str) -> int:
    return (seed + int.from_bytes(hashlib.blake2b(key.encode(), digest_size=4).digest(), "little")) % 2**31


class Resta:
    """RESTA: ``W ← W + β·δ`` on every targeted weight, with optional DARE (drop ``p``, rescale ``1/(1−p)``).

    Args:
        aligned: the aligned model (module, mapping or path).
        unaligned: its unaligned counterpart.
        beta: the scale ``β`` of the safety vector.
        drop_rate: DARE drop probability ``p`` in ``[0, 1)``; ``0`` disables DARE.
        seed: DARE's seed (each weight gets its own stream derived from it and its name).
        target_modules: peft-style selection; default: the linear weights of the transformer blocks.
        exclude_modules: peft-style exclusion.
        allow_partial: edit only the weights the fine-tuned model and the pair have in common (a warning
            gives the counts) instead of refusing a mismatch.
    """

    def __init__(
        self,
        aligned: WeightsLike,
        unaligned: WeightsLike,
        beta: float = DEFAULT_BETA,
        drop_rate: float = DEFAULT_DROP_RATE,
        seed: int = DEFAULT_SEED,
        target_modules: str | Sequence[str] | None = None,
        exclude_modules: str | Sequence[str] | None = None,
        *,
        allow_partial: bool = False,
    ) -> None:
        self.beta = check_finite("beta", beta)
        self.drop_rate = check_drop_rate("drop_rate", drop_rate)
        self.seed = check_seed("seed", seed)
        self.aligned = open_weights(aligned, name="aligned")
        self.unaligned = open_weights(unaligned, name="unaligned")
        self.target_modules, self.exclude_modules = target_modules, exclude_modules
        self.allow_partial = allow_partial
        self.pairs = select_target_pairs(
            self.aligned, self.unaligned, target_modules, exclude_modules, allow_partial=allow_partial
        )

    def plan(self, target: WeightStore) -> dict[str, Edit]:
        """``{key of target: W ↦ W + β·DARE(δ)}`` for every targeted weight of ``target``."""
        matched = KeyMatcher(self.pairs).match_all(target.keys())
        if not matched:
            raise ValueError(
                f"no weight of {target.location} matches the targeted weights of {self.aligned.location}"
            )
        targeted = target_keys(target, self.target_modules, self.exclude_modules, known_linear=matched)
        check_correspondence(
            self.pairs, targeted, self.aligned.location, target.location, allow_partial=self.allow_partial
        )
        return {key: self._edit(name) for key, name in matched.items()}

    def summary(self) -> dict[str, Any]:
        """RESTA's settings."""
        return {"beta": self.beta, "drop_rate": self.drop_rate}

    def _edit(self, name: str) -> Edit:
        def edit(weight: Tensor) -> Tensor:
            aligned_key, unaligned_key = self.pairs[name]
            delta = self.aligned.get(aligned_key).float() - self.unaligned.get(unaligned_key).float()
            if not all_finite(delta):
                raise ValueError(f"{name}: the aligned or unaligned weights hold NaN or inf")
            generator = torch.Generator().manual_seed(_seed_for(self.seed, name))
            return resta_weight(weight, delta, self.beta, self.drop_rate, generator)

        return edit


def resta(
    target,
    aligned,
    unaligned,
    *,
    beta=DEFAULT_BETA,
    drop_rate=DEFAULT_DROP_RATE,
    seed=DEFAULT_SEED,
    target_modules=None,
    exclude_modules=None,
    allow_partial=False,
    inplace=False,
):
    """RESTA on a module or state dict: ``W + β·DARE(δ)`` on every targeted weight (see :class:`Resta`)."""
    planner = Resta(
        aligned,
        unaligned,
        beta,
        drop_rate,
        seed,
        target_modules,
        exclude_modules,
        allow_partial=allow_partial,
    )
    return apply_edits(target, planner, inplace)


def _factory(inputs: MethodInputs) -> Resta:
    options = inputs.options
    inputs.require_pair("resta")
    return Resta(
        inputs.aligned,
        inputs.unaligned,
        options["beta"],
        options["drop_rate"],
        options["seed"],
        inputs.config.target_modules,
        inputs.config.exclude_modules,
        allow_partial=inputs.allow_partial,
    )


SPEC = MethodSpec(
    "resta", _factory, (BETA, DROP_RATE, SEED), grid=((0.5, 0.0), (1.0, 0.0), (1.0, 0.9)),
    help="RESTA: W + beta*DARE(delta)",
)
