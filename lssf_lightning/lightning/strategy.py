"""What each Lightning strategy allows the LSSF callbacks to do, and how weights are reached under it.

The one place strategy-specific code lives: the support checks, full parameters for writing, and the weight
store an export streams from.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from torch import nn

from lssf_lightning.distributed import gathered_store
from lssf_lightning.io.weights import MappingStore, ModuleStore, WeightStore

__all__ = ["check_checkpoint_callbacks", "check_strategy", "export_store", "forms_problem", "full_parameters",
           "monitor_supported", "sharded_checkpoints", "shards_in_configure_model"]


def _setting(strategy, attribute: str, default):
    """A constructor setting a Lightning strategy keeps only privately (``FSDPStrategy(state_dict_type=)``,
    ``ModelParallelStrategy(save_distributed_checkpoint=)``: Lightning 2.6 has no public accessor). The one
    place this package reads another object's private attribute; ``default`` is Lightning's own default."""
    return getattr(strategy, attribute, default)


def check_strategy(trainer: Trainer, apply_on: str, edits_live_weights: bool) -> None:
    """Refuse strategies whose checkpoints or weights the callback cannot realign (``edits_live_weights``:
    ``apply_on="epochs"`` or ``min_refusal_rate``), and weights-only checkpoints in checkpoint mode."""
    if apply_on == "checkpoint":
        check_checkpoint_callbacks(trainer)
    strategy = trainer.strategy
    if isinstance(strategy, DeepSpeedStrategy):
        raise MisconfigurationException(
            "LSSFCallback does not support DeepSpeed: DeepSpeed drops `state_dict` from Lightning's "
            "checkpoint and saves its own shards, so realigned weights would be lost silently. Train with "
            "DDP or FSDP, or realign the saved model afterwards with `lssf-lightning realign`."
        )
    if isinstance(strategy, FSDPStrategy):
        if _setting(strategy, "_state_dict_type", "full") != "full":
            raise MisconfigurationException(
                "LSSFCallback needs full state dicts under FSDP: set FSDPStrategy(state_dict_type='full'), "
                "or train with ModelParallelStrategy (FSDP2), whose sharded checkpoints each rank realigns "
                "shard by shard."
            )
        if edits_live_weights:
            raise MisconfigurationException(
                "LSSFCallback cannot edit sharded live weights under FSDP: use apply_on='checkpoint' or "
                "'train_end', and no `min_refusal_rate`."
            )


def sharded_checkpoints(trainer: Trainer) -> bool:
    """Whether every rank writes its own shards of the weights (``ModelParallelStrategy``'s distributed
    checkpoints): then every rank fuses its shards in ``on_save_checkpoint``, not rank 0 alone."""
    strategy = trainer.strategy
    return isinstance(strategy, ModelParallelStrategy) and _setting(
        strategy, "_save_distributed_checkpoint", True
    )


def forms_problem(trainer: Trainer, apply_on: str, exports: bool, lora: bool) -> str | None:
    """Why a form tracked per matrix (:mod:`lssf_lightning.forms`) cannot run under this strategy, else
    ``None``. Single device and DDP: every rank applies the same edit to its full weights. FSDP2
    (``ModelParallelStrategy``): shard-local, each rank writing its own shards; an export gathers the form
    applied shard-locally (``export_dir``) or every rank's factors (``export_adapter_dir``)."""
    strategy = trainer.strategy
    if isinstance(strategy, FSDPStrategy):
        return ("is not supported under FSDPStrategy (FSDP1, flat parameters): use ModelParallelStrategy "
                "(FSDP2)")
    if not isinstance(strategy, ModelParallelStrategy):
        return None
    if exports and lora:
        return ("cannot write export_dir or export_adapter_dir of a peft LoRA model under "
                "ModelParallelStrategy (FSDP2) yet")
    if lora and apply_on != "steps":
        return ("on a peft LoRA model runs under ModelParallelStrategy (FSDP2) only as the per-step guard "
                "(apply_on='steps')")
    if apply_on == "checkpoint" and not sharded_checkpoints(trainer):
        return ("needs ModelParallelStrategy(save_distributed_checkpoint=True): each rank fuses and stores "
                "its own shards")
    return None


def shards_in_configure_model(trainer: Trainer) -> bool:
    """Whether the weights become DTensor shards after the ``setup`` hook (``ModelParallelStrategy``: in
    ``configure_model``; its checkpoints are restored after ``on_fit_start``)."""
    return isinstance(trainer.strategy, ModelParallelStrategy)


def monitor_supported(trainer: Trainer) -> bool:
    """Whether the refusal monitor can generate under this strategy (FSDP1: no, generation needs full
    weights)."""
    return not isinstance(trainer.strategy, FSDPStrategy)


def check_checkpoint_callbacks(trainer: Trainer) -> None:
    """``apply_on="checkpoint"`` needs checkpoints that call ``on_save_checkpoint`` (not weights-only
    ones)."""
    if any(isinstance(cb, ModelCheckpoint) and cb.save_weights_only for cb in trainer.checkpoint_callbacks):
        raise MisconfigurationException(
            "ModelCheckpoint(save_weights_only=True) skips callbacks' `on_save_checkpoint`, so its "
            "checkpoints would not be realigned. Set save_weights_only=False, or use "
            "LSSFCallback(apply_on='train_end', export_dir=...) to export a realigned model at the end."
        )


@contextlib.contextmanager
def full_parameters(trainer: Trainer, pl_module: LightningModule) -> Iterator[None]:
    """Under FSDP, expose full parameters for writing (collective); elsewhere a no-op."""
    if isinstance(trainer.strategy, FSDPStrategy):
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(pl_module, writeback=True):
            yield
    else:
        yield


@contextlib.contextmanager
def export_store(
    trainer: Trainer, model: nn.Module, attribute: str
) -> Iterator[tuple[WeightStore | None, str]]:
    """``(store, key prefix)`` an export streams from, for the ``with`` block (every rank enters): FSDP's
    gathered full state dict; under ``ModelParallelStrategy`` full tensors gathered one at a time while rank 0
    reads them
    (the other ranks serve the gathers on entering and get ``None``); else the HF model itself."""
    if isinstance(trainer.strategy, FSDPStrategy):
        state = trainer.strategy.lightning_module_state_dict()
        yield MappingStore(state, location="FSDP full state dict"), attribute + "."
    elif isinstance(trainer.strategy, ModelParallelStrategy):
        with gathered_store(model) as store:
            yield store, ""
    else:
        yield ModuleStore(model), ""
