"""``alpha="auto"``: the fusion strength chosen from refusals on tuning prompts, as a small strategy object.

:class:`LSSFCallback` calls :meth:`AutoAlpha.measure_target` at fit start and :meth:`AutoAlpha.choose` at
each validation epoch end (or once at the end of training without validation). The selection rule itself is
one function, :func:`lssf_lightning.sweep.tune_alpha` (the sweep's :func:`~lssf_lightning.sweep.recommend`
along the ``α`` curve; with ``max_perplexity_increase`` it also keeps the perplexity on the monitor's utility
texts within that budget).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lssf_lightning.config import AutoAlphaConfig

if TYPE_CHECKING:
    from lssf_lightning.lightning.callback import LSSFCallback
    from lssf_lightning.lightning.monitor import RefusalMonitor

__all__ = ["AutoAlpha"]


class AutoAlpha:
    """Choose ``α``: the smallest of ``config.alphas`` whose realigned model refuses at least the target share
    of the tuning prompts (``config.target``, or the aligned model's own rate at fit start minus
    ``config.tolerance``); the highest-refusal ``α`` when none reaches it.

    Args:
        config: the grid, target, tolerance and tuning prompts; default ``AutoAlphaConfig()``.
        monitor: generates and judges the answers (its judge and ``max_new_tokens``; under DDP its
            :meth:`~RefusalMonitor.rate` sums the counts over ranks); default: a ``RefusalMonitor()``.
    """

    def __init__(self, config: AutoAlphaConfig | None = None, monitor: RefusalMonitor | None = None) -> None:
        from lssf_lightning.lightning.monitor import RefusalMonitor

        self.config = config or AutoAlphaConfig()
        self.monitor = monitor or RefusalMonitor()
        self.target: float | None = self.config.target
        self.curve: list[dict[str, float]] = []
        self._prompts: list[str] | None = None

    def prompts(self, trainer: Trainer) -> list[str]:
        """This rank's share of the tuning prompts (default: the bundled calibration set)."""
        if self._prompts is None:
            from lssf_lightning.metrics import load_prompts

            self._prompts = load_prompts(self.config.prompts or "harmful_calibration")
        return self._prompts[trainer.global_rank :: trainer.world_size]

    def measure_target(self, trainer: Trainer, pl_module: LightningModule, verbose: bool = True) -> float:
        """Set ``target`` from the aligned model's own refusal rate (the weights at fit start), unless
        given."""
        if self.target is None:
            aligned_rate = self.monitor.refusal_rate(trainer, pl_module, self.prompts(trainer))
            self.target = max(aligned_rate - self.config.tolerance, 0.0)
            if verbose:
                rank_zero_info(f"LSSF: the aligned model refuses {aligned_rate:.0%} of the alpha-tuning "
                               f"prompts; alpha='auto' aims at {self.target:.0%}")
        return self.target

    def choose(self, trainer: Trainer, pl_module: LightningModule, lssf: LSSFCallback) -> float:
        """Measure the grid on the live model (which already carries ``lssf.fusion.applied``); returns the
        total α."""
        from lssf_lightning.sweep import tune_alpha

        target = self.target if self.target is not None else 1.0 - self.config.tolerance
        model = self.monitor.model(trainer, pl_module)
        tokenizer = self.monitor.tokenizer_for(trainer, pl_module)
        choice = tune_alpha(
            model, tokenizer, lssf.subspace, self.config.alphas, self.prompts(trainer), target,
            offset=lssf.fusion.applied, max_new_tokens=self.monitor.max_new_tokens,
            rate=lambda answers: float(self.monitor.rate(pl_module, answers)),
            max_perplexity_increase=self.config.max_perplexity_increase,
            perplexity=self._perplexity(tokenizer),
        )
        self.curve = [{"alpha": p.alpha, "refusal": p.harmful_refusal,
                       **({"perplexity": p.perplexity} if p.perplexity is not None else {})}
                      for p in choice.curve]
        if not choice.reached:
            chosen = next(p for p in choice.curve if p.alpha == choice.alpha)
            rank_zero_warn(f"LSSFCallback: no alpha in {self.config.alphas} restores {target:.0%} refusal on "
                           f"the tuning prompts; using alpha={choice.alpha:g}, the highest refusal reached "
                           f"({chosen.harmful_refusal:.2f}; curve {self.curve})")
        if lssf.verbose:
            rank_zero_info(f"LSSF: alpha='auto' chose alpha={choice.alpha:g} (curve {self.curve})")
        return choice.alpha

    def _perplexity(self, tokenizer):
        """``model ↦ perplexity`` on the monitor's utility texts (the bundled set when it has none), or
        ``None`` without a utility budget. Every rank scores all texts; the metric reduces across ranks."""
        if self.config.max_perplexity_increase is None:
            return None
        from lssf_lightning.metrics.perplexity import load_utility_texts, model_perplexity

        texts = load_utility_texts(self.monitor.utility_texts or "bundled",
                                   limit=self.monitor.num_utility_texts)
        return lambda model: model_perplexity(model, tokenizer, texts)

    def state_dict(self) -> dict[str, Any]:
        """The measured target and the last curve (stored in the LSSF callback's state)."""
        return {"auto_target": self.target, "alpha_curve": self.curve}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.target = state.get("auto_target", self.target)
        self.curve = list(state.get("alpha_curve", []))
