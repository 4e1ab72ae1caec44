r"""
Refusal monitor
^^^^^^^^^^^^^^^

Watches how often a fine-tuning run's model refuses harmful requests (and, as over-refusal, harmless ones):
greedy answers to a few prompts at every validation epoch end, judged and logged. Useful on its own; next to
an :class:`~lssf_lightning.LSSFCallback` it also reports the rates of the realigned model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lssf_lightning.distributed import is_dtensor, pad_shard, synced_generation
from lssf_lightning.lightning.hf import find_tokenizer, hf_model
from lssf_lightning.lightning.strategy import monitor_supported
from lssf_lightning.metrics.judges import resolve_judge
from lssf_lightning.metrics.refusal import RefusalRate
from lssf_lightning.validation import SettingError, check_fraction, check_int

if TYPE_CHECKING:
    from lssf_lightning.lightning.callback import LSSFCallback

__all__ = ["RefusalMonitor"]


class RefusalMonitor(Callback):
    r"""Log the refusal rates of the model being fine-tuned at every validation epoch end.

    Logs ``lssf/refusal_rate`` (answers to harmful prompts that refuse: higher is safer) and
    ``lssf/harmless_refusal_rate`` (over-refusal: lower is better). When an
    :class:`~lssf_lightning.LSSFCallback` is in ``trainer.callbacks`` (or owns this monitor), also
    ``lssf/refusal_rate_realigned`` and ``lssf/harmless_refusal_rate_realigned``: the same prompts with the
    fusion swapped in, then the exact raw weights swapped back. Under DDP the prompts are split over ranks
    and the counts summed.

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
        min_refusal_rate: with an :class:`~lssf_lightning.LSSFCallback`: realign the live weights when the raw
            refusal rate falls below this.
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
        min_refusal_rate: float | None = None,
        model_attribute: str | None = None,
        tokenizer: str | None = None,
        utility_texts: str | None = "bundled",
        num_utility_texts: int = 8,
    ) -> None:
        super().__init__()
        try:
            self.num_prompts = check_int("num_prompts", num_prompts)
            self.max_new_tokens = check_int("max_new_tokens", max_new_tokens)
            self.min_refusal_rate = None if min_refusal_rate is None else check_fraction("min_refusal_rate",
                                                                                         min_refusal_rate)
            self.judge = resolve_judge(judge)
            self.num_utility_texts = check_int("num_utility_texts", num_utility_texts)
        except (SettingError, ValueError) as err:
            raise MisconfigurationException(f"RefusalMonitor: {err}") from None
        self.harmful_prompts = harmful_prompts
        self.harmless_prompts = harmless_prompts
        self.model_attribute = model_attribute
        self.tokenizer = tokenizer
        self.utility_texts = utility_texts
        self._utility: list[str] | None = None
        self.owner: LSSFCallback | None = None  # set by an LSSFCallback that runs this monitor itself
        self.enabled = True
        self.last: dict[str, Tensor] = {}
        self._metric = RefusalRate(judge=self.judge)
        self._prompts: dict[str, list[str]] | None = None
        self._tokenizer = None

    # -- hooks ------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Check the strategy and that ``min_refusal_rate`` has an LSSF callback to act on."""
        if stage != "fit":
            return
        if self.enabled and not monitor_supported(trainer):
            rank_zero_warn("RefusalMonitor is off under FSDP (generation needs full weights).")
            self.enabled = False
        if self.min_refusal_rate is not None and self.lssf(trainer) is None:
            raise MisconfigurationException("RefusalMonitor(min_refusal_rate=...) needs an LSSFCallback to "
                                            "realign the weights with; add one to `Trainer(callbacks=...)`.")

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Measure and log the refusal rates (not during the sanity check or outside fit)."""
        if trainer.sanity_checking or trainer.state.fn != "fit" or not self.enabled:
            return
        self.last = self.measure(trainer, pl_module)
        for name, value in self.last.items():
            pl_module.log(f"lssf/{name}", value, on_epoch=True, prog_bar=name == "refusal_rate",
                          sync_dist=False)
        lssf = self.lssf(trainer)
        if self.min_refusal_rate is not None and lssf is not None:
            rate = float(self.last["refusal_rate"])
            if rate < self.min_refusal_rate and lssf.fusion.missing != 0:
                lssf.realign_live(pl_module)
                rank_zero_info(f"LSSF: refusal rate {rate:.2f} < {self.min_refusal_rate}: realigned the live "
                               "weights")

    # -- measuring (public, overridable) ----------------------------------------------------------------
    def measure(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Tensor]:
        """The rates to log, by name (without the ``lssf/`` prefix); a collective under DDP (every rank calls
        it)."""
        model, tokenizer = self.model(trainer, pl_module), self.tokenizer_for(trainer, pl_module)
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

        raw = answers()
        lssf = self.lssf(trainer)
        realigned = _realigned(lssf, pl_module, answers, raw)
        values = {"refusal_rate": self.rate(pl_module, raw["harmful"])}
        if realigned is not None:
            values["refusal_rate_realigned"] = self.rate(pl_module, realigned["harmful"])
        values["harmless_refusal_rate"] = self.rate(pl_module, raw["harmless"])
        if realigned is not None:
            values["harmless_refusal_rate_realigned"] = self.rate(pl_module, realigned["harmless"])
        values.update(self.measure_utility(trainer, pl_module, lssf))
        return values

    def measure_utility(
        self, trainer: Trainer, pl_module: LightningModule, lssf: LSSFCallback | None
    ) -> dict[str, Tensor]:
        """Utility numbers logged next to the rates: ``perplexity`` (raw weights) and ``perplexity_realigned``
        (inside ``lssf.realigned_weights``) on the utility texts. Every rank scores all of them (equal forward
        passes, as FSDP2 needs); the metric's sums are reduced across ranks."""
        import torch

        from lssf_lightning.metrics.perplexity import CausalLMPerplexity, load_utility_texts, model_perplexity

        if self.utility_texts is None:
            return {}
        if self._utility is None:
            self._utility = load_utility_texts(self.utility_texts, limit=self.num_utility_texts)
        model, tokenizer = self.model(trainer, pl_module), self.tokenizer_for(trainer, pl_module)

        def measure() -> Tensor:
            metric = CausalLMPerplexity()
            return torch.tensor(model_perplexity(model, tokenizer, self._utility, metric=metric))

        values = {"perplexity": measure()}
        realigned = _realigned(lssf, pl_module, measure, values["perplexity"])
        if realigned is not None:
            values["perplexity_realigned"] = realigned
        return values

    def generate(self, model: nn.Module, tokenizer, prompts: list[str]) -> list[str]:
        """Greedy answers to ``prompts`` (``max_new_tokens`` each)."""
        from lssf_lightning.metrics import generate_responses

        return generate_responses(model, tokenizer, prompts, max_new_tokens=self.max_new_tokens)

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
        if self._prompts is None:
            from lssf_lightning.metrics import load_prompts

            self._prompts = {
                "harmful": load_prompts(self.harmful_prompts or "harmful")[: self.num_prompts],
                "harmless": load_prompts(self.harmless_prompts or "harmless")[: self.num_prompts],
            }
        return self._prompts

    def lssf(self, trainer: Trainer) -> LSSFCallback | None:
        """The LSSF callback whose realigned model is measured too: the owner, else one in
        ``trainer.callbacks``."""
        from lssf_lightning.lightning.callback import LSSFCallback

        if self.owner is not None:
            return self.owner
        return next((c for c in trainer.callbacks if isinstance(c, LSSFCallback)), None)

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


def _realigned(
    lssf: LSSFCallback | None, pl_module: LightningModule, measure: Callable[[], Any], raw: Any
) -> Any:
    """``measure()`` with ``lssf``'s missing fusion swapped in for the call (the exact raw weights come back
    after); ``raw`` when the live weights already carry it all; ``None`` without an LSSF subspace."""
    if lssf is None or lssf.subspace is None:
        return None
    if lssf.fusion.missing == 0:
        return raw
    with lssf.realigned_weights(pl_module):
        return measure()
