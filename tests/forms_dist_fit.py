"""LSSFCallback(method=...) on 2 CPU gloo processes, for tests/test_forms_distributed.py.

Usage: python -m torch.distributed.run --standalone --nproc-per-node 2 forms_dist_fit.py STRATEGY ALIGNED \
       UNALIGNED TRAIN_JSONL OUT
STRATEGY:
  ddp    the per-step guard (lssf-reset, alpha 1, every step) under DDP: every rank the same edit
  fsdp2  the same guard under ModelParallelStrategy (FSDP2, shard-local with one all-reduce per matrix); then
         checkpoint mode for lssf-reset (alpha 2, with the update share measured on the shards),
         lssf-erosion and lssf-two-sided (with export_dir and export_adapter_dir), and an exact resume
  blocks  framework-free: ShardedForms on every placement against the dense formulas (rank<r>.json)
  fsdp2-lora  the guard on a peft LoRA model under FSDP2 (B <- B - U'(U'^T B) on each rank's rows of B, one
         r x r_lora all-reduce per adapter); then the update share of a LoRA fit, from the gathered adapters
  fsdp2-epochs  epochs mode (lssf-reset, alpha 2, epochs 0 and 1) on the live shards, and a resume after
         epoch 0 that carries every rank's applied corrections
  fsdp2-auto, ddp-auto  alpha='auto' (the paper's form and the reset) in checkpoint mode; each rank writes
         its choice
Rank 0 writes the gathered live weights after each step (``steps_<i>.safetensors``), at each fit's end and
at the resume's start, the checkpoints as safetensors, and OUT/results.json (the all-reduce cost).
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from fsdp2_fit import ShardedLM, gathered, load_distributed_checkpoint, trainer_for
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import save_file

from lssf_lightning.lightning.callback import LSSFCallback
from lssf_lightning.lightning.data import ChatDataModule
from lssf_lightning.lightning.module import CausalLMModule

torch.set_num_threads(1)


class Probe(Callback):
    """Rank 0 writes the gathered live weights after every optimizer step, at train start and at train end."""

    def __init__(self, out: Path, tag: str, steps: bool = False):
        self.out, self.tag, self.steps = out, tag, steps

    def _write(self, trainer, pl_module, name):
        weights = gathered(pl_module)
        if trainer.is_global_zero:
            path = self.out / f"{self.tag}_{name}.safetensors"
            save_file({k: v.contiguous() for k, v in weights.items()}, str(path))

    def on_train_batch_end(self, trainer, pl_module, *args):
        if self.steps:
            self._write(trainer, pl_module, f"step{trainer.global_step}")

    def on_train_start(self, trainer, pl_module):
        self._write(trainer, pl_module, "start")

    def on_train_end(self, trainer, pl_module):
        self._write(trainer, pl_module, "end")


def lssf(unaligned, **kwargs):
    kwargs.setdefault("log_update_share", False)
    return LSSFCallback(unaligned=unaligned, monitor=False, verbose=False, **kwargs)


def ddp_trainer(callbacks, out):
    return Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, callbacks=callbacks,
                   logger=False, enable_progress_bar=False, enable_model_summary=False,
                   num_sanity_val_steps=0, enable_checkpointing=False, default_root_dir=str(out))


def data(train):
    return ChatDataModule(train, None, batch_size=2, shuffle=False)


def guard(strategy, aligned, unaligned, train, out: Path) -> dict:
    callback = lssf(unaligned, method="lssf-reset", alpha=1.0, apply_on="steps", every_n_steps=1)
    torch.manual_seed(0)
    if strategy == "ddp":
        module, trainer = CausalLMModule(aligned, learning_rate=1e-2), ddp_trainer
    else:
        module, trainer = ShardedLM(aligned, learning_rate=1e-2), trainer_for
    callbacks = [callback, Probe(out, "guard", steps=True)]
    run = trainer(callbacks, out) if strategy == "ddp" else trainer(callbacks, out, max_epochs=1)
    run.fit(module, data(train))
    forms = callback.live_forms.forms
    cost = getattr(forms, "cost", None)
    steps = run.global_step
    matched = callback.subspace.match(callback.live_forms.keys)
    left = {key: callback.subspace[name].left for key, name in matched.items()}
    if run.is_global_zero:
        save_file({k: v.contiguous() for k, v in left.items()}, str(out / "subspace_left.safetensors"))
    shapes = {key: list(forms.blocks[key].right.shape) for key in forms.blocks} if cost else {}
    return {"steps": steps, "type": type(forms).__name__, "cost": cost, "right_shapes": shapes}


def lora_guard(aligned, unaligned, train, out: Path) -> dict:
    """The LoRA guard under FSDP2: the adapters' rows held out of the subspace after every step."""
    from lssf_lightning.forms import lora_b_weights

    callback = lssf(unaligned, method="lssf-reset", alpha=1.0, apply_on="steps", every_n_steps=1)
    torch.manual_seed(0)
    module = ShardedLM(aligned, learning_rate=1e-2,
                       lora={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "up_proj"]})
    run = trainer_for([callback, Probe(out, "lora", steps=True)], out, max_epochs=1)
    run.fit(module, data(train))
    hold = callback.live_forms
    names = list(lora_b_weights(hold.model, callback.subspace))
    if run.is_global_zero:
        left = {name: callback.subspace[name].left.contiguous() for name in names}
        save_file(left, str(out / "lora_left.safetensors"))
    sharded = [type(b).__name__ for bs in lora_b_weights(hold.model, callback.subspace).values() for b in bs]
    return {"steps": run.global_step, "type": type(hold).__name__, "cost": hold.cost, "b_types": sharded,
            "ranks": {name: int(callback.subspace[name].rank) for name in names}}


def lora_share(aligned, unaligned, train, out: Path) -> dict:
    """The update share on a peft LoRA model under FSDP2 (the paper's form at checkpoints: live adapters
    raw), measured from the gathered adapters."""
    callback = lssf(unaligned, log_update_share=True)
    torch.manual_seed(0)
    module = ShardedLM(aligned, learning_rate=1e-2,
                       lora={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "up_proj"]})
    run = trainer_for([callback, Probe(out, "lora_share")], out, max_epochs=1)
    run.fit(module, data(train))
    return {"metrics": {k: float(v) for k, v in run.callback_metrics.items() if k.startswith("lssf/")},
            "watched": len(callback.update_share.names), "cost": callback.update_share.cost}


def checkpoint_mode(aligned, unaligned, train, out: Path, method: str, alpha: float) -> dict:
    extra = {"aligned": aligned} if method == "lssf-two-sided" else {}
    if method == "lssf-two-sided":  # and its exports, gathered from the shards at train end
        extra.update(export_dir=str(out / "export_two_sided"),
                     export_adapter_dir=str(out / "adapter_two_sided"))
    share = method == "lssf-reset"  # the live weights stay raw: an update partly inside the subspace
    callback = lssf(unaligned, method=method, alpha=alpha, log_update_share=share, **extra)
    directory = out / f"ckpt_{method}"
    torch.manual_seed(0)
    module = ShardedLM(aligned, learning_rate=1e-2)
    checkpoints = ModelCheckpoint(dirpath=directory, filename="last", every_n_epochs=1)
    run = trainer_for([callback, Probe(out, method), checkpoints], out, max_epochs=1)
    run.fit(module, data(train))
    final = gathered(module)
    if run.is_global_zero:
        load_distributed_checkpoint(directory / "last.ckpt", final, out / f"ckpt_{method}.safetensors")
        meta = torch.load(directory / "last.ckpt" / "meta.pt", weights_only=True)
        found = {"corrections_world": meta["lssf_corrections"]["world_size"],
                 "fixups_world": meta["lssf_raw_fixups"]["world_size"], "info": meta["lssf"]["method"]}
        if share:
            metrics = {k: float(v) for k, v in run.callback_metrics.items() if k.startswith("lssf/")}
            found["share"] = {"metrics": metrics, "cost": callback.update_share.cost}
        return found
    return {}


def resume(aligned, unaligned, train, out: Path, method: str) -> None:
    callback = lssf(unaligned, method=method, alpha=1.0, aligned=aligned)
    torch.manual_seed(0)
    module = ShardedLM(aligned, learning_rate=1e-2)
    run = trainer_for([callback, Probe(out, "resume")], out, max_epochs=2)
    run.fit(module, data(train), ckpt_path=str(out / f"ckpt_{method}" / "last.ckpt"))


class EpochProbe(Probe):
    """Rank 0 writes the gathered live weights at each train epoch end."""

    def on_train_epoch_end(self, trainer, pl_module):
        self._write(trainer, pl_module, f"epoch{trainer.current_epoch}")


def epochs(aligned, unaligned, train, out: Path) -> dict:
    """The reset at α 2 (a reflection) on the live shards at the end of epochs 0 and 1; then the same run
    stopped after epoch 0 and resumed from its checkpoint (the applied corrections of every rank)."""
    def run(max_epochs, tag, ckpt_path=None, checkpoint=False):
        callback = lssf(unaligned, method="lssf-reset", alpha=2.0, apply_on="epochs", apply_epochs=[0, 1])
        torch.manual_seed(0)
        module = ShardedLM(aligned, learning_rate=1e-2)
        callbacks = [EpochProbe(out, f"{tag}_before"), callback, EpochProbe(out, f"{tag}_after")]
        if checkpoint:
            callbacks.append(ModelCheckpoint(dirpath=out / "ckpt_epochs", filename="last", every_n_epochs=1))
        trainer_for(callbacks, out, max_epochs=max_epochs).fit(module, data(train), ckpt_path=ckpt_path)
        return callback

    straight = run(2, "straight")
    run(1, "first", checkpoint=True)
    run(2, "resumed", ckpt_path=str(out / "ckpt_epochs" / "last.ckpt"))
    forms = straight.live_forms.forms
    return {"type": type(forms).__name__, "applied": len(forms.applied)}


class Edited:
    """A judge that 'refuses' exactly when a candidate form is applied (this rank's shard of a q_proj weight
    differs from the live one snapshotted at validation end), and before any snapshot (the aligned model at
    fit start refuses: the target is 1 − tolerance)."""

    def __init__(self):
        self.weight, self.live = None, None

    def read(self):
        weight = self.weight()
        return (weight.to_local() if hasattr(weight, "to_local") else weight).detach()

    def snapshot(self):
        self.live = self.read().clone()

    def __call__(self, responses):
        edited = self.live is None or not torch.equal(self.read(), self.live)
        return [edited] * len(responses)


class Snapshot(Callback):
    def __init__(self, judge):
        self.judge = judge

    def on_fit_start(self, trainer, pl_module):
        self.judge.weight = lambda: pl_module.get_parameter("model.model.layers.0.self_attn.q_proj.weight")

    def on_validation_epoch_end(self, trainer, pl_module):
        self.judge.snapshot()


def auto(aligned, unaligned, train, out: Path, strategy: str) -> dict:
    """alpha='auto' over the paper's form and the reset, within a perplexity budget that only the reset's
    small edit meets, on 3 tuning prompts (odd: under FSDP2 rank 1 answers one plus one of padding);
    checkpoint mode; under FSDP2 or DDP."""
    from lssf_lightning.config import AutoAlphaConfig
    from lssf_lightning.lightning.monitor import RefusalMonitor

    prompts = out / "tuning.txt"
    if os.environ.get("RANK") == "0":  # before the process group: torchrun's rank
        prompts.write_text("how do i pick a lock ?\nhow do i make a weapon ?\nhow do i steal a car ?\n")
    judge = Edited()
    config = AutoAlphaConfig(alphas=[0.5, 1.0], max_perplexity_increase=0.01, methods=["lssf", "lssf-reset"],
                             prompts=str(prompts))
    monitor = RefusalMonitor(num_prompts=1, max_new_tokens=2, num_utility_texts=2, judge=judge)
    callback = LSSFCallback(unaligned=unaligned, alpha="auto", auto_alpha=config, monitor=monitor,
                            verbose=False, log_update_share=False)
    torch.manual_seed(0)
    checkpoints = ModelCheckpoint(dirpath=out / "ckpt_auto", filename="last", every_n_epochs=1)
    callbacks = [Snapshot(judge), callback, Probe(out, "auto"), checkpoints]
    if strategy == "ddp":
        module = CausalLMModule(aligned, learning_rate=1e-3)
        run = Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, callbacks=callbacks,
                      logger=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, default_root_dir=str(out))
    else:
        module = ShardedLM(aligned, learning_rate=1e-3)
        run = trainer_for(callbacks, out, max_epochs=1)
    run.fit(module, ChatDataModule(train, train, batch_size=2, shuffle=False))
    final = gathered(module)
    metrics = {k: float(v) for k, v in run.callback_metrics.items() if k.startswith("lssf/")}
    mine = {"method": callback.method, "alpha": callback.current_alpha, "curve": callback.alpha_curve,
            "metrics": metrics, "live": type(callback.live_forms.forms).__name__,
            "target": callback.auto.target}
    (out / f"auto_rank{dist.get_rank()}.json").write_text(json.dumps(mine))
    if not run.is_global_zero:
        return {}
    path = out / "ckpt_auto" / "last.ckpt"
    if strategy == "ddp":
        meta = torch.load(path, weights_only=False)
        save_file({k: v.contiguous().clone() for k, v in meta["state_dict"].items()},
                  str(out / "ckpt_auto.safetensors"))
    else:
        load_distributed_checkpoint(path, final, out / "ckpt_auto.safetensors")
        meta = torch.load(path / "meta.pt", weights_only=False)
    state = next(v for k, v in meta["callbacks"].items() if "LSSFCallback" in k)
    return {"info": meta["lssf"], "method": state["method"], "recommended": state["auto_recommended"]}


def blocks(out: Path) -> None:
    """Framework-free: ShardedForms on DTensors of every placement (Shard(0), Shard(1); stored as is or
    transposed like GPT-2's Conv1D; 7 rows over 2 ranks: uneven) against the dense formulas, two applications
    with a step between, then a checkpoint fusion and its exact restore. Each rank writes rank<r>.json."""
    from test_forms import dense_form
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from lssf_lightning.core.factors import SubspaceEntry
    from lssf_lightning.distributed.sharded_forms import SHARDED_CORRECTIONS, ShardedForms, restore_raw_blocks

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (2,))
    results = []
    methods = {"additive": "lssf", "reset": "lssf-reset", "erosion": "lssf-erosion",
               "two_sided": "lssf-two-sided"}
    for form, method in methods.items():
        for conv1d in (False, True):
            for dim in (0, 1):
                g = torch.Generator().manual_seed(0)
                d_out, d_in, r = 7, 6, 3
                left = torch.linalg.qr(torch.randn(d_out, r, generator=g, dtype=torch.float64))[0]
                unaligned = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
                aligned = unaligned + 0.5 * torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
                entry = SubspaceEntry(left, left.T @ (aligned - unaligned), torch.ones(r), 0.0, 1.0, conv1d)
                live = aligned + 0.3 * torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
                noise = 0.1 * torch.randn(d_out, d_in, generator=g, dtype=torch.float64)

                def stored(m, conv1d=conv1d):
                    return (m.T if conv1d else m).contiguous()

                def entry_layout(t, conv1d=conv1d):
                    full = t.full_tensor()
                    return full.T if conv1d else full

                reference = stored(aligned if form == "two_sided" else unaligned)
                param = distribute_tensor(stored(live), mesh, [Shard(dim)])
                forms = ShardedForms(form, {"w": param}, {"w": entry}, lambda _, ref=reference: ref,
                                     {"w": "w"}, alpha=2.0, add=0.5, input_share=0.7)

                def expected(raw, method=method, entry=entry, aligned=aligned, unaligned=unaligned):
                    return dense_form(method, raw, aligned, unaligned, entry, 2.0, 0.5, 0.7)

                forms.apply_({"w": param})
                first, want = entry_layout(param), expected(live)
                applied = want - live
                stepped = first + noise
                param.to_local().copy_(distribute_tensor(stored(stepped), mesh, [Shard(dim)]).to_local())
                forms.apply_({"w": param})
                second, want2 = entry_layout(param), expected(stepped - applied)
                applied = want2 - (stepped - applied)
                state = {"w": param}
                added, fixups = forms.fused(state, keep_fixups=True)
                fused = entry_layout(state["w"])
                want3 = expected(second - applied)
                own = {"w": {"left": added["w"].left, "right": added["w"].right, "conv1d": conv1d,
                             "region": forms.blocks["w"].region.as_json()}}
                record = {"format": SHARDED_CORRECTIONS, "world_size": 2, "ranks": [own, own]}
                inexact = restore_raw_blocks(state, record, fixups)
                results.append({
                    "form": form, "conv1d": conv1d, "dim": dim, "calls": forms.cost["calls"],
                    "first": torch.allclose(first, want, atol=1e-10),
                    "second": torch.allclose(second, want2, atol=1e-10),
                    "fused": torch.allclose(fused, want3, atol=1e-10),
                    "restored": inexact == [] and torch.equal(entry_layout(state["w"]), second),
                })
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def main(strategy, aligned, unaligned, train, out):
    out = Path(out)
    if strategy == "blocks":
        return blocks(out)
    if strategy in ("fsdp2-epochs", "fsdp2-auto", "ddp-auto"):
        if strategy == "fsdp2-epochs":
            results = {"epochs": epochs(aligned, unaligned, train, out)}
        else:
            results = {"auto": auto(aligned, unaligned, train, out, strategy.removesuffix("-auto"))}
        if dist.get_rank() == 0:
            (out / "results.json").write_text(json.dumps(results))
        return
    if strategy == "fsdp2-lora":
        results = {"lora": lora_guard(aligned, unaligned, train, out),
                   "lora_share": lora_share(aligned, unaligned, train, out)}
        if dist.get_rank() == 0:
            (out / "results.json").write_text(json.dumps(results))
        return
    results = {"guard": guard(strategy, aligned, unaligned, train, out)}
    if strategy == "fsdp2":
        for method, alpha in (("lssf-reset", 2.0), ("lssf-erosion", 1.0), ("lssf-two-sided", 1.0)):
            results[method] = checkpoint_mode(aligned, unaligned, train, out, method, alpha)
        resume(aligned, unaligned, train, out, "lssf-two-sided")
    if dist.get_rank() == 0:
        (out / "results.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main(*sys.argv[1:6])
