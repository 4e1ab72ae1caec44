r"""
Refusal monitor
^^^^^^^^^^^^^^^

Watches how often a fine-tuning run's model refuses harmful requests (and, as over-refusal, harmless ones):
greedy answers to a few prompts at every validation epoch end, judged and logged. Useful on its own; next to
an :class:`~lssf_lightning.LSSFCallback` it also reports the rates of the realigned model.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Protocol, runtime_checkable

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lssf_lightning.distributed import is_dtensor, pad_shard, synced_generation
from lssf_lightning.lightning.hf import find_tokenizer, hf_model
from lssf_lightning.lightning.strategy import monitor_supported
from lssf_lightning.metrics.refusal import RefusalRate
from lssf_lightning.monitoring import SafetyProbe, fused_call
from lssf_lightning.training import FusionState
from lssf_lightning.validation import SettingError

__all__ = ["Realigner", "RefusalMonitor"]


@runtime_checkable
class Realigner(Protocol):
    """What the monitor needs from the callback whose realigned model it also measures (``LSSFCallback``)."""

    subspace: Any
    fusion: FusionState
    model_attribute: str | None

    def realigned_weights(self, pl_module: LightningModule) -> AbstractContextManager:
        """The fully realigned weights in ``pl_module`` for a ``with`` block."""
        ...

    def resolve_tokenizer(self, pl_module: LightningModule, required: bool = True) -> Any:
        """The run's tokenizer."""
        ...


class RefusalMonitor(Callback):
    r"""Log the refusal rates of the model being fine-tuned at every validation epoch end.

    Logs ``lssf/refusal_rate`` (answers to harmful prompts that refuse: higher is safer),
    ``lssf/harmless_refusal_rate`` (over-refusal: lower is better) and ``lssf/perplexity`` on utility texts.
    When a :class:`Realigner` (an :class:`~lssf_lightning.LSSFCallback`) is in ``trainer.callbacks`` (or owns
    this monitor), also each one's ``*_realigned`` twin: the same prompts with the fusion swapped in, then the
    exact raw weights swapped back. Under DDP the prompts are split over ranks and the counts summed. What is
    measured, and how, is :class:`lssf_lightning.monitoring.SafetyProbe` (shared with the transformers
    callback); this class translates Lightning's hooks and logging.

    Example::

        trainer = Trainer(callbacks=[RefusalMonitor(num_prompts=32)])  # no LSSF needed

    Args:
        harmful_prompts: harmful prompts (a .txt/.jsonl/.csv path); default: the bundled set.
        harmless_prompts: harmless prompts for the over-refusal rate; default: the bundled set.
        num_prompts: how many prompts of each set are answered.
        max_new_tokens: tokens generated per answer. The judge reads only the start: on the demo's 1,920
            answers, cutting 16 tokens to 8 changed one verdict.
        judge: ``None``/``"phrases"`` (refusal-phrase matching), a local HF classifier directory, a callable
            ``list[str] -> list[bool]``, or (in YAML) its dotted import path. Resolved once, here.
        model_attribute: the LightningModule attribute holding the HF model; default: found automatically.
        tokenizer: tokenizer path; default: the module's ``tokenizer`` attribute (or the LSSF callback's).
        utility_texts: general texts whose perplexity is logged as ``lssf/perplexity`` (and
            ``lssf/perplexity_realigned``): ``"bundled"`` (default), ``"stdlib"``, a file, or ``None`` for
            none.
        num_utility_texts: how many of them (a forward pass each, no generation).
    """

    def __init__(
        self,
        harmful_prompts: str | None = None,
        harmless_prompts: str | None = None,
        num_prompts: int = 16,
        max_new_tokens: int = 8,
        judge: str | Callable[[list[str]], Any] | None = None,
        model_attribute: str | None = None,
        tokenizer: str | None = None,
        utility_texts: str | None = "bundled",
        num_utility_texts: int = 8,
    ) -> None:
        super().__init__()
        try:
            self.probe = SafetyProbe(harmful_prompts, harmless_prompts, num_prompts, max_new_tokens, judge,
                                     utility_texts, num_utility_texts)
        except (SettingError, ValueError) as err:
            raise MisconfigurationException(f"RefusalMonitor: {err}") from None
        self.model_attribute = model_attribute
        self.tokenizer = tokenizer
        self.owner: Realigner | None = None  # set by an LSSFCallback that runs this monitor itself
        self.enabled = True
        self.last: dict[str, Tensor] = {}
        self._metric = RefusalRate(judge=self.probe.judge)
        self._tokenizer = None

    judge = property(lambda self: self.probe.judge, doc="The resolved judge.")
    num_prompts = property(lambda self: self.probe.num_prompts, doc="Prompts answered per set.")
    max_new_tokens = property(lambda self: self.probe.max_new_tokens, doc="Tokens per answer.")
    harmful_prompts = property(lambda self: self.probe.harmful_prompts, doc="The harmful prompt set.")
    harmless_prompts = property(lambda self: self.probe.harmless_prompts, doc="The harmless prompt set.")
    utility_texts = property(lambda self: self.probe.utility_texts, doc="The utility texts.")
    num_utility_texts = property(lambda self: self.probe.num_utility_texts, doc="Utility texts scored.")

    # -- hooks ------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Switch off under FSDP (generation needs full weights)."""
        if stage == "fit" and self.enabled and not monitor_supported(trainer):
            rank_zero_warn("RefusalMonitor is off under FSDP (generation needs full weights).")
            self.enabled = False

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Measure and log the refusal rates (not during the sanity check or outside fit)."""
        if trainer.sanity_checking or trainer.state.fn != "fit" or not self.enabled:
            return
        self.last = self.measure(trainer, pl_module)
        for name, value in self.last.items():
            pl_module.log(f"lssf/{name}", value, on_epoch=True, prog_bar=name == "refusal_rate",
                          sync_dist=False)

    # -- measuring (public, overridable) ----------------------------------------------------------------
    def measure(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Tensor]:
        """The numbers to log, by name (without the ``lssf/`` prefix); a collective under DDP (every rank
        calls it)."""
        model, tokenizer = self.model(trainer, pl_module), self.tokenizer_for(trainer, pl_module)
        lssf = self.lssf(trainer)
        realigned = None
        if lssf is not None and lssf.subspace is not None:
            realigned = fused_call(lssf.fusion, lambda: lssf.realigned_weights(pl_module))
        return self.probe.measure(
            self._answers(trainer, model, tokenizer),
            lambda answers: self.rate(pl_module, answers),
            lambda: self.probe.perplexity(model, tokenizer),
            realigned,
        )

    def _answers(self, trainer: Trainer, model: nn.Module, tokenizer) -> Callable[[], dict[str, list[str]]]:
        """This rank's answers to its share of each prompt set."""
        rank, world = trainer.global_rank, trainer.world_size
        shards = {kind: prompts[rank::world] for kind, prompts in self.prompts().items()}
        real = {kind: len(prompts) for kind, prompts in shards.items()}
        if any(is_dtensor(p) for p in model.parameters()):
            # FSDP2: every forward pass is a collective, so every rank answers as many prompts (padded, the
            # padding's answers dropped) and decodes until all ranks are done (synced generation).
            synced_generation(model)
            padded = {kind: pad_shard(prompts, rank, world) for kind, prompts in self.prompts().items()}
            shards, real = {k: v[0] for k, v in padded.items()}, {k: v[1] for k, v in padded.items()}

        def answers() -> dict[str, list[str]]:
            return {kind: self.generate(model, tokenizer, prompts)[: real[kind]]
                    for kind, prompts in shards.items()}

        return answers

    def generate(self, model: nn.Module, tokenizer, prompts: list[str]) -> list[str]:
        """Greedy answers to ``prompts`` (``max_new_tokens`` each)."""
        return self.probe.generate(model, tokenizer, prompts)

    def rate(self, pl_module: LightningModule, answers: list[str]) -> Tensor:
        """The refusal rate of ``answers`` with counts summed over ranks (a collective: every rank calls
        it)."""
        metric = self._metric.to(pl_module.device)
        metric.reset()
        metric.update(answers)
        value = metric.compute()
        metric.reset()
        return value

    def refusal_rate(self, trainer: Trainer, pl_module: LightningModule, prompts: list[str]) -> float:
        """Generate answers to this rank's ``prompts`` and return the rate over all ranks."""
        model, tokenizer = self.model(trainer, pl_module), self.tokenizer_for(trainer, pl_module)
        return float(self.rate(pl_module, self.generate(model, tokenizer, prompts)))

    # -- what it reads ----------------------------------------------------------------------------------
    def prompts(self) -> dict[str, list[str]]:
        """``{"harmful": [...], "harmless": [...]}``: the first ``num_prompts`` of each set (read once)."""
        return self.probe.prompts()

    def lssf(self, trainer: Trainer) -> Realigner | None:
        """The realigner whose realigned model is measured too: the owner, else one in ``trainer.callbacks``
        (found by what it offers, :class:`Realigner`)."""
        if self.owner is not None:
            return self.owner
        return next((c for c in trainer.callbacks if isinstance(c, Realigner)), None)

    def model(self, trainer: Trainer, pl_module: LightningModule) -> nn.Module:
        """The HF model being trained."""
        lssf = self.lssf(trainer)
        attribute = self.model_attribute or (lssf.model_attribute if lssf is not None else None)
        return hf_model(pl_module, attribute, owner=type(self).__name__)

    def tokenizer_for(self, trainer: Trainer, pl_module: LightningModule):
        """The tokenizer (resolved once): ``tokenizer``, else the LSSF callback's, else the module's."""
        if self._tokenizer is None:
            lssf = self.lssf(trainer)
            if self.tokenizer is None and lssf is not None:
                self._tokenizer = lssf.resolve_tokenizer(pl_module)
            else:
                self._tokenizer = find_tokenizer(pl_module, self.tokenizer, owner=type(self).__name__)
        return self._tokenizer
