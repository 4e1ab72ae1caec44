"""The demo's training curves: the monitor's numbers and the update's share inside the safety subspace,
measured while the fine-tune runs.

:class:`TrainingCurves` is a :class:`~lssf_lightning.lightning.monitor.RefusalMonitor` that measures every
``every`` optimizer steps during training (the demo's fine-tunes run no validation loop) instead of at
validation epoch end: harmful refusal and over-refusal on validation prompts and perplexity on general text,
raw and as the run's :class:`~lssf_lightning.LSSFCallback` would realign them, plus the share of the update
since fit start that lies inside the safety subspace (``LSSFCallback.update_share``).
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningModule, Trainer
from typing_extensions import override

from lssf_lightning import training
from lssf_lightning.lightning.monitor import RefusalMonitor

__all__ = ["TrainingCurves"]


class TrainingCurves(RefusalMonitor):
    """Rows ``{"step", "refusal_rate", "refusal_rate_realigned", …, "update_in_subspace"}`` in ``rows``.

    The run's LSSF callback (realigned weights, update share) is the one the monitor finds among the
    Trainer's callbacks.

    Args:
        every: measure after every ``every``-th optimizer step (and at step 0 and the Trainer's last step).
        monitor: the :class:`RefusalMonitor` settings (``harmful_prompts``, ``num_prompts`` …).
    """

    def __init__(self, every: int, **monitor: Any) -> None:
        super().__init__(**monitor)
        self.every = every
        self.rows: list[dict[str, float]] = []

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The numbers at step 0 (the aligned model the fine-tune starts from)."""
        self._record(trainer, pl_module)

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Every ``every`` optimizer steps, and at the last one (after the LSSF callback's own hook)."""
        step = trainer.global_step
        if step and (step % self.every == 0 or step == trainer.max_steps) and step != self.rows[-1]["step"]:
            self._record(trainer, pl_module)

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Nothing: the curves are measured during training."""

    def _record(self, trainer: Trainer, pl_module: LightningModule) -> None:
        was_training = pl_module.training
        pl_module.eval()
        row = {"step": float(trainer.global_step)}
        row.update({name: float(value) for name, value in self.measure(trainer, pl_module).items()})
        share = getattr(self.lssf(trainer), "update_share", None)
        if share is not None and trainer.global_step:
            row["update_in_subspace"] = share.since_start(training.named_tensors(pl_module))["all"]
        self.rows.append(row)
        pl_module.train(was_training)
