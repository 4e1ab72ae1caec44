"""Fine-tuning runs with LSSFCallback under Lightning's ModelParallelStrategy (FSDP2, ``fully_shard`` per
decoder layer) on 2 CPU gloo processes, for tests/test_fsdp2.py.

Usage: python -m torch.distributed.run --standalone --nproc-per-node 2 fsdp2_fit.py SCENARIO ALIGNED \
       UNALIGNED TRAIN_JSONL OUT
SCENARIO:
  checkpoint  checkpoint mode with the refusal monitor and an export; then an exact resume from the sharded
              checkpoint; then a resume with other subspace settings (must be refused)
  epochs      apply_on="epochs" at epoch 0 (shard-local live fusion), factors read from the subspace cache
              file
  lora        a peft LoRA model, torch.compile'd (``_orig_mod.``), checkpoint mode and the (merged) export
Rank 0 writes gathered weights (safetensors) and OUT/results.json; the test compares with the dense formula.
"""

import json
import os
import sys
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from safetensors.torch import save_file
from torch.distributed.fsdp import fully_shard

from lssf_lightning.config import SubspaceConfig
from lssf_lightning.distributed import is_dtensor
from lssf_lightning.lightning.callback import LSSFCallback
from lssf_lightning.lightning.data import ChatDataModule
from lssf_lightning.lightning.module import CausalLMModule
from lssf_lightning.lightning.monitor import RefusalMonitor
from lssf_lightning.methods import LSSF, apply_edits
from lssf_lightning.training import ResumeError

torch.set_num_threads(1)
NUM_PROMPTS = 5  # odd: rank 0 answers 3 prompts, rank 1 two plus one of padding


def odd_length(responses):
    return [len(r) % 2 == 1 for r in responses]


class ShardedLM(CausalLMModule):
    """The project's causal-LM module with FSDP2: ``fully_shard`` on every decoder layer, then the root."""

    def __init__(self, *args, compile_model=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.compile_model = compile_model

    def configure_model(self):
        mesh = self.device_mesh["data_parallel"]
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        for layer in base.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(self.model, mesh=mesh)
        if self.compile_model:  # the eager backend: the `_orig_mod.` names without a compiler on the CPU
            self.model = torch.compile(self.model, backend="eager")


def gathered(pl_module) -> dict[str, torch.Tensor]:
    """Full copies of the module's tensors (a collective: every rank calls it)."""
    return {
        k: (v.full_tensor() if is_dtensor(v) else v).detach().cpu().clone()
        for k, v in pl_module.state_dict().items()
    }


class Probe(Callback):
    """Writes the live weights (gathered) at each train epoch end and at train start."""

    def __init__(self, out: Path, tag: str):
        self.out, self.tag = out, tag

    def _write(self, trainer, pl_module, name):
        weights = gathered(pl_module)
        if trainer.is_global_zero:
            save_file(
                {k: v.contiguous() for k, v in weights.items()},
                str(self.out / f"{self.tag}_{name}.safetensors"),
            )

    def on_train_start(self, trainer, pl_module):
        self._write(trainer, pl_module, "start")

    def on_train_epoch_end(self, trainer, pl_module):
        self._write(trainer, pl_module, f"epoch{trainer.current_epoch}")


def load_distributed_checkpoint(directory: Path, like: dict[str, torch.Tensor], out: Path) -> None:
    """Rank 0: the model weights of a distributed checkpoint directory, written as one safetensors file."""
    import torch.distributed.checkpoint as dcp

    # distributed checkpoints name parameters without torch.compile's `_orig_mod.` (get_model_state_dict)
    state = {"state_dict": {k.replace("_orig_mod.", ""): torch.empty_like(v) for k, v in like.items()}}
    dcp.load(state, checkpoint_id=str(directory), no_dist=True)
    save_file({k: v.contiguous() for k, v in state["state_dict"].items()}, str(out))


def trainer_for(callbacks, out, max_epochs=2):
    # benchmarks/gpu_check.sh runs these scenarios on CUDA with LSSF_FSDP2_ACCELERATOR=cuda (one process per
    # GPU)
    accelerator, world = (
        os.environ.get("LSSF_FSDP2_ACCELERATOR", "cpu"),
        int(os.environ.get("WORLD_SIZE", "2")),
    )
    return Trainer(
        accelerator=accelerator,
        devices=world,
        strategy=ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1),
        max_epochs=max_epochs,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(out),
    )


def module_and_data(aligned, train, lora=None, compile_model=False, validate=True):
    torch.manual_seed(0)
    module = ShardedLM(aligned, learning_rate=1e-2, lora=lora, compile_model=compile_model)
    return module, ChatDataModule(train, train if validate else None, batch_size=4, shuffle=False)


def checkpoint_scenario(aligned, unaligned, train, out: Path) -> dict:
    results = {}
    monitor = RefusalMonitor(num_prompts=NUM_PROMPTS, max_new_tokens=6, judge=odd_length)
    callback = LSSFCallback(
        unaligned=unaligned, alpha=1.5, monitor=monitor, export_dir=str(out / "export"), verbose=False,
        export_adapter_dir=str(out / "adapter"),
    )
    checkpoints = ModelCheckpoint(dirpath=out / "ckpts", filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    module, data = module_and_data(aligned, train)
    trainer = trainer_for([callback, Probe(out, "fit"), checkpoints], out)
    trainer.fit(module, data)
    results["metrics"] = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("lssf/")}
    final = gathered(module)
    # the monitor's rates, recomputed by one process on the same (final) weights, all prompts at once
    if trainer.is_global_zero:
        results["single_process_rates"] = single_process_rates(
            aligned, final, callback, monitor, module.tokenizer, out / "export_single"
        )
        for epoch in range(2):
            load_distributed_checkpoint(
                out / "ckpts" / f"epoch={epoch}.ckpt", final, out / f"ckpt_epoch{epoch}.safetensors"
            )
        results["checkpoint_is_directory"] = (out / "ckpts" / "epoch=0.ckpt").is_dir()
        save_file({k: v.contiguous() for k, v in final.items()}, str(out / "fit_final.safetensors"))
        meta = torch.load(out / "ckpts" / "epoch=0.ckpt" / "meta.pt", weights_only=True)
        fixups = meta.get("lssf_raw_fixups") or {}
        results["fixups_world_size"] = fixups.get("world_size")
        results["fixups_keys"] = [sorted(r) for r in fixups.get("ranks", [])]
        results["alpha_added"] = meta["lssf"]["alpha_added"]
    trainer.strategy.barrier()
    # an exact resume from the sharded checkpoint
    module, data = module_and_data(aligned, train)
    resumed = LSSFCallback(unaligned=unaligned, alpha=1.5, monitor=False, verbose=False)
    trainer = trainer_for([resumed, Probe(out, "resume")], out)
    trainer.fit(module, data, ckpt_path=str(out / "ckpts" / "epoch=0.ckpt"))
    # a resume with other subspace settings: refused before any weight is touched
    module, data = module_and_data(aligned, train)
    changed = LSSFCallback(
        unaligned=unaligned, alpha=1.5, subspace=SubspaceConfig(eta=0.5), monitor=False, verbose=False
    )
    trainer = trainer_for([changed], out)
    try:
        trainer.fit(module, data, ckpt_path=str(out / "ckpts" / "epoch=0.ckpt"))
        results["refused"] = None
    except ResumeError as err:
        results["refused"] = str(err)
    return results


def single_process_rates(aligned, weights, callback, monitor, tokenizer, export_dir: Path) -> dict:
    """The monitor's four rates from one plain (unsharded) model with ``weights``, and its one-process
    export."""
    from transformers import AutoModelForCausalLM

    from lssf_lightning.metrics import generate_responses

    model = AutoModelForCausalLM.from_pretrained(aligned)
    model.load_state_dict({k.removeprefix("model."): v for k, v in weights.items()})
    rates = {}
    for kind, prompts in monitor.prompts().items():
        answers = generate_responses(model, tokenizer, prompts, max_new_tokens=monitor.max_new_tokens)
        rates[kind] = sum(odd_length(answers)) / len(answers)
        fused = apply_edits(model, LSSF(callback.subspace, callback.current_alpha))
        answers = generate_responses(fused, tokenizer, prompts, max_new_tokens=monitor.max_new_tokens)
        rates[f"{kind}_realigned"] = sum(odd_length(answers)) / len(answers)
    from lssf_lightning.io.weights import ModuleStore
    from lssf_lightning.training import export_realigned, hf_support_files

    export_realigned(
        ModuleStore(model),
        export_dir,
        callback.subspace,
        callback.current_alpha,
        write_support_files=hf_support_files(model, tokenizer),
    )
    return rates


def epochs_scenario(aligned, unaligned, train, out: Path) -> dict:
    # 2 processes and a subspace_cache: after setup the factors stay in the file (LazyFactors, read by block)
    callback = LSSFCallback(
        unaligned=unaligned,
        alpha=0.75,
        apply_on="epochs",
        apply_epochs=[0],
        monitor=False,
        subspace_cache=str(out / "subspace.safetensors"),
        verbose=False,
    )
    module, data = module_and_data(
        aligned, train, validate=False
    )  # fusion in on_train_epoch_end, between probes
    trainer = trainer_for([Probe(out, "before"), callback, Probe(out, "after")], out, max_epochs=1)
    trainer.fit(module, data)
    factors = callback.subspace.entries
    return {
        "applied_alpha": callback.applied_alpha,
        "disk_backed": type(factors).__name__,
        "factors_file": str(getattr(factors, "path", "")),
        "resident_bytes": getattr(factors, "peak_resident_bytes", None),
    }


def lora_scenario(aligned, unaligned, train, out: Path) -> dict:
    callback = LSSFCallback(
        unaligned=unaligned, alpha=1.0, monitor=False, export_dir=str(out / "export"), verbose=False
    )
    checkpoints = ModelCheckpoint(dirpath=out / "ckpts", filename="lora", every_n_epochs=1)
    module, data = module_and_data(
        aligned,
        train,
        lora={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        compile_model=True,
    )
    trainer = trainer_for([callback, Probe(out, "lora"), checkpoints], out, max_epochs=1)
    trainer.fit(module, data)
    final = gathered(module)
    results = {"compiled": type(module.model).__name__, "keys": sorted(final)}
    if trainer.is_global_zero:
        load_distributed_checkpoint(out / "ckpts" / "lora.ckpt", final, out / "ckpt_lora.safetensors")
    return results


def main(scenario, aligned, unaligned, train, out):
    out = Path(out)
    results = {"checkpoint": checkpoint_scenario, "epochs": epochs_scenario, "lora": lora_scenario}[scenario](
        aligned, unaligned, train, out
    )
    import torch.distributed as dist

    if dist.get_rank() == 0:
        (out / "results.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main(*sys.argv[1:6])
