"""Old home of ``alpha="auto"``'s helpers; they live in :mod:`lssf_lightning.sweep` now (one rule, one place).

``from lssf_lightning.tuning import tune_alpha`` (and ``refusal_curve``, ``smallest_alpha_reaching``,
``AlphaPoint``, ``AlphaChoice``) keeps working.
"""

from __future__ import annotations

from lssf_lightning.sweep import AlphaChoice, AlphaPoint, refusal_curve, smallest_alpha_reaching, tune_alpha

__all__ = ["AlphaChoice", "AlphaPoint", "refusal_curve", "smallest_alpha_reaching", "tune_alpha"]
