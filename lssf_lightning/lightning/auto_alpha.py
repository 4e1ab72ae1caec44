"""``alpha="auto"`` in Lightning: :class:`~lssf_lightning.monitoring.AlphaTuner` driven by callback hooks.

:class:`LSSFCallback` calls :meth:`AutoAlpha.measure_target` at fit start and :meth:`AutoAlpha.choose` at
each validation epoch end (or once at the end of training without validation). The target, the choice of
form and strength (:func:`lssf_lightning.selection.recommend`, the sweep's rule over the candidate grid,
with the utility budget ``max_perplexity_increase`` on the monitor's utility texts) and the state are the
framework-neutral :class:`~lssf_lightning.monitoring.AlphaTuner`, which the transformers callback uses too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn

from lssf_lightning.config import AutoAlphaConfig
from lssf_lightning.distributed import is_dtensor, pad_shard, synced_generation
from lssf_lightning.distributed.collectives import all_gather_json
from lssf_lightning.forms import Candidates
from lssf_lightning.lightning.monitor import RefusalMonitor
from lssf_lightning.monitoring import AlphaTuner, FormChoice
from lssf_lightning.selection import SweepPoint

__all__ = ["AutoAlpha"]


class AutoAlpha:
    """Choose the form and ``α``: among ``methods`` × ``config.alphas``, the candidate with the lowest
    perplexity whose realigned model refuses at least the target share of the tuning prompts
    (``config.target``, or the aligned model's own rate at fit start minus ``config.tolerance``) within the
    utility budget (without a budget: the smallest ``α`` of the first form reaching it); when none does,
    "target not reached" with the best point of each side, and the safest within the budget is used (never
    called recommended).

    Args:
        config: the grid, target, tolerance, tuning prompts, budget and forms; default ``AutoAlphaConfig()``.
        monitor: generates and judges the answers (its judge and ``max_new_tokens``; under DDP its
            :meth:`~RefusalMonitor.rate` sums the counts over ranks); default: a ``RefusalMonitor()``.
        methods: the forms (default ``config.methods`` or ``monitoring.DEFAULT_AUTO_METHODS``).
    """

    def __init__(self, config: AutoAlphaConfig | None = None, monitor: RefusalMonitor | None = None,
                 methods: Sequence[str] | None = None) -> None:
        self.monitor = monitor or RefusalMonitor()
        self.tuner = AlphaTuner(config, self.monitor.probe, methods)

    config = property(lambda self: self.tuner.config, doc="The grid, target, tolerance, prompts, budget.")
    curve = property(lambda self: self.tuner.curve, doc="The last measured curve.")
    target = property(lambda self: self.tuner.target, doc="The refusal rate to reach.")

    def prompts(self, trainer: Trainer, model: nn.Module | None = None) -> tuple[list[str], int]:
        """``(this rank's share of the tuning prompts, how many are real)`` (default: the bundled calibration
        set). On FSDP2 shards of ``model`` every rank answers as many prompts (padded, the padding's answers
        dropped) and decodes until all ranks are done, as the monitor does: every forward is a collective."""
        rank, world = trainer.global_rank, trainer.world_size
        if model is not None and any(is_dtensor(p) for p in model.parameters()):
            synced_generation(model)
            return self.tuner.prompts(lambda prompts: pad_shard(prompts, rank, world))
        shard = self.tuner.prompts(lambda prompts: prompts[rank::world])
        return shard, len(shard)

    def measure_target(self, trainer: Trainer, pl_module: LightningModule, verbose: bool = True) -> float:
        """Set ``target`` from the aligned model's own refusal rate (the weights at fit start), unless
        given."""
        if self.tuner.target is None:
            model, tokenizer = self.monitor.model(trainer, pl_module), self.monitor.tokenizer_for(trainer,
                                                                                                  pl_module)
            prompts, real = self.prompts(trainer, model)
            if any(is_dtensor(p) for p in model.parameters()):
                _first_forward(model)
            answers = self.monitor.generate(model, tokenizer, prompts)[:real]
            aligned_rate = float(self.monitor.rate(pl_module, answers))
            self.tuner.set_target(aligned_rate)
            if verbose:
                rank_zero_info(f"LSSF: the aligned model refuses {aligned_rate:.0%} of the alpha-tuning "
                               f"prompts; alpha='auto' aims at {self.tuner.target:.0%}")
        return self.tuner.target

    def choose(self, trainer: Trainer, pl_module: LightningModule, candidates: Candidates,
               verbose: bool = False) -> FormChoice:
        """Measure the candidate forms and strengths on the live model, each applied in turn by
        ``candidates`` (:class:`~lssf_lightning.forms.Candidates`); returns the choice ("target not
        reached" is warned). On several processes every rank measures (the rates summed over ranks) and
        takes rank 0's choice and curve, so that all apply the same form."""
        model = self.monitor.model(trainer, pl_module)
        prompts, real = self.prompts(trainer, model)
        choice = self.tuner.choose(
            model, self.monitor.tokenizer_for(trainer, pl_module), candidates, prompts=prompts,
            rate=lambda answers: float(self.monitor.rate(pl_module, answers[:real])), raw=candidates.raw,
            methods=candidates.methods(self.tuner.methods),
        )
        if trainer.world_size > 1:  # perplexities may differ in the last bits between ranks: rank 0's decide
            shared = all_gather_json({"points": [p.to_dict() for p in choice.curve],
                                      "reference": choice.reference_perplexity})[0]
            points = [SweepPoint.from_dict(p) for p in shared["points"]]
            choice = self.tuner.decide(points, shared["reference"])
        if not choice.recommended:
            rank_zero_warn(f"LSSFCallback: {self.tuner.describe(choice)}")
        elif verbose:
            rank_zero_info(f"LSSF: {self.tuner.describe(choice)} (curve {self.curve})")
        return choice

    def state_dict(self) -> dict[str, Any]:
        """The measured target and the last curve (stored in the LSSF callback's state)."""
        return self.tuner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.tuner.load_state_dict(state)


def _first_forward(model: nn.Module) -> None:
    """One forward pass outside inference mode (every rank: a collective). FSDP2 allocates the unsharded
    parameters at the first forward; made under generation's ``torch.inference_mode`` they would be
    inference tensors, which the training steps after fit start cannot write into."""
    device = next(model.parameters()).device
    with torch.no_grad():
        model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device))
