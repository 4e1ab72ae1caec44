"""What the LSSF forms cost in LSSFCallback, against plain Lightning, on the demo model (SmolLM2-135M).

    python benchmarks/bench_forms.py [--parts save,steps,optimizer] [--batch 4] [--steps 20] [--repeats 2]

``save``: checkpoint-save time and size per form (``apply_on="checkpoint"``) against a plain save of the same
model and optimizer. ``steps``: the step time of the per-step guard (``method="lssf-reset"``, ``alpha=1``,
``apply_on="steps"``) at ``every_n_steps`` 1 and 10, with and without ``log_update_share``, against plain
training, and the callback's own time (between the callbacks around it) over its run's mean step: the robust
number on a shared machine, where other jobs change the step time from one run to the next. ``optimizer``:
where the optimizer's update goes between guard applications (its share inside the subspace), and the loss,
with the weights projected alone, or also the gradient, or also Adam's ``exp_avg``.

The aligned model is the real SmolLM2-135M; the unaligned one is a copy whose block matrices differ by a
rank-192 update with a power-law spectrum (``σ_i ∝ i^-0.5``), so that η 0.9 keeps ranks near the demo's
(mean 176 on its real pair; 99 here). Every configuration runs round-robin, ``--repeats`` times; medians.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer

from lssf_lightning import CausalLMModule, ChatDataModule, LSSFCallback
from lssf_lightning.core.hold import hold_out_adapter_
from lssf_lightning.demo.assets import base_model_dir
from lssf_lightning.demo.task import task_splits
from lssf_lightning.io.export import copy_support_files
from lssf_lightning.io.shards import SafetensorsReader, write_safetensors
from lssf_lightning.lightning.data import write_chat_jsonl
from lssf_lightning.stability import UpdateShare
from lssf_lightning.training import matched_keys, named_tensors

FORMS = ("lssf", "lssf-reset", "lssf-erosion", "lssf-two-sided")


def synthetic_unaligned(aligned: Path, root: Path, rank: int = 192, decay: float = 0.5) -> Path:
    """A copy of ``aligned`` whose block matrices differ by ``L·diag(i^-decay)·R`` (rank ``rank``)."""
    unaligned = root / "unaligned"
    if (unaligned / "model.safetensors").is_file():  # written by an earlier run in --work
        return unaligned
    reader = SafetensorsReader(sorted(aligned.glob("*.safetensors")))
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for key in reader.keys():
        weight = reader.get(key)
        if weight.ndim == 2 and ".layers." in key:
            k = min(rank, *weight.shape)
            scale = torch.arange(1, k + 1, dtype=torch.float32) ** -decay
            left = torch.randn(weight.shape[0], k, generator=generator) / weight.shape[0] ** 0.5
            right = torch.randn(k, weight.shape[1], generator=generator) / weight.shape[1] ** 0.5
            weight = weight - 0.05 * weight.std() * (left * scale) @ right
        tensors[key] = weight
    unaligned.mkdir(parents=True, exist_ok=True)
    write_safetensors(unaligned / "model.safetensors", tensors, {"format": "pt"})
    copy_support_files([aligned], unaligned)
    return unaligned


class Setup:
    def __init__(self, args) -> None:
        self.work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="lssf-bench-forms-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.aligned = base_model_dir(log=None)
        self.unaligned = synthetic_unaligned(self.aligned, self.work)
        self.cache = str(self.work / "subspace.safetensors")
        train, val, _ = task_splits(max(64, args.batch * (args.steps + 3)), 16, 0)
        self.train = write_chat_jsonl(self.work / "train.jsonl", [e.to_row() for e in train])
        self.val = write_chat_jsonl(self.work / "val.jsonl", [e.to_row() for e in val])
        self.args = args

    def callback(self, **kwargs) -> LSSFCallback:
        kwargs.setdefault("log_update_share", False)
        return LSSFCallback(unaligned=str(self.unaligned), aligned=str(self.aligned), monitor=False,
                            verbose=False, subspace_cache=self.cache, **kwargs)

    def fit(self, callbacks, max_steps: int, learning_rate: float = 5e-5):
        gc.collect()  # the previous run's module and trainer (reference cycles)
        torch.manual_seed(0)
        module = CausalLMModule(str(self.aligned), learning_rate=learning_rate)
        data = ChatDataModule(str(self.train), None, batch_size=self.args.batch, max_length=128,
                              shuffle=False)
        trainer = Trainer(max_steps=max_steps, accelerator="cpu", callbacks=callbacks, logger=False,
                          enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                          num_sanity_val_steps=0, limit_val_batches=0)
        trainer.fit(module, data)
        return trainer, module


# -- checkpoint saves --------------------------------------------------------------------------------------
def bench_save(setup: Setup) -> None:
    rows = []
    for method in FORMS:
        callback = setup.callback(method=method, apply_on="checkpoint")
        trainer, _ = setup.fit([callback], max_steps=1)
        if method == FORMS[0]:
            ranks = list(callback.subspace.ranks.values())
            print(f"subspace: {len(ranks)} matrices, mean rank {statistics.mean(ranks):.1f}")
        times: dict[bool, list[float]] = {False: [], True: []}
        sizes = {}
        for _ in range(setup.args.repeats):
            for with_form in (False, True):
                if not with_form:
                    trainer.callbacks.remove(callback)
                path = setup.work / f"ckpt-{with_form}.ckpt"
                start = time.perf_counter()
                trainer.save_checkpoint(path)
                times[with_form].append(time.perf_counter() - start)
                sizes[with_form] = path.stat().st_size / 2**20
                path.unlink()
                if not with_form:
                    trainer.callbacks.insert(0, callback)
        plain, form = statistics.median(times[False]), statistics.median(times[True])
        rows.append((method, plain, form, sizes[False], sizes[True]))
    print("\n| form (apply_on='checkpoint') | plain save s | form save s | time ratio | plain MiB | form MiB "
          "| size ratio |")
    print("|---|---|---|---|---|---|---|")
    for method, plain, form, plain_mib, form_mib in rows:
        print(f"| {method} | {plain:.2f} | {form:.2f} | {form / plain:.2f} | {plain_mib:.0f} "
              f"| {form_mib:.0f} | {form_mib / plain_mib:.3f} (+{form_mib - plain_mib:.1f} MiB) |")


# -- step time of the guard --------------------------------------------------------------------------------
class Start(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.clock.begin = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.clock.before_guard = time.perf_counter()


class End(Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.steps, self.guard = warmup, [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = time.perf_counter()
        if batch_idx >= self.warmup:
            self.steps.append(now - self.begin)
            self.guard.append(now - self.before_guard)


def timed(setup: Setup, lssf: LSSFCallback | None) -> End:
    start, end = Start(), End(warmup=2)
    start.clock = end
    setup.fit([start, *([lssf] if lssf else []), end], max_steps=2 + setup.args.steps)
    return end


def bench_steps(setup: Setup) -> None:
    configs = {
        "plain": lambda: None,
        "guard N=1": lambda: setup.callback(method="lssf-reset", apply_on="steps", every_n_steps=1),
        "guard N=1 + update share": lambda: setup.callback(method="lssf-reset", apply_on="steps",
                                                           every_n_steps=1, log_update_share=True),
        "guard N=10": lambda: setup.callback(method="lssf-reset", apply_on="steps", every_n_steps=10),
    }
    lssf = setup.callback(method="lssf-reset", apply_on="checkpoint")  # builds the subspace cache
    timed(setup, lssf)
    results: dict[str, list[End]] = {name: [] for name in configs}
    for _ in range(setup.args.repeats):
        for name, make in configs.items():
            results[name].append(timed(setup, make()))
    step = {name: statistics.median(s for end in ends for s in end.steps) for name, ends in results.items()}
    mean = {name: statistics.mean(s for end in ends for s in end.steps) for name, ends in results.items()}
    guard = {name: statistics.mean(g for end in ends for g in end.guard) for name, ends in results.items()}
    base = step["plain"]
    print(f"\nbatch {setup.args.batch} x <=128 tokens, {setup.args.steps} timed steps x {setup.args.repeats} "
          f"runs per row, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    print("| row | median step s | ratio | mean step s | ratio | callback s / step (mean) | callback / its "
          "run's mean step |")
    print("|---|---|---|---|---|---|---|")
    for name in configs:
        print(f"| {name} | {step[name]:.2f} | {step[name] / base:.3f} | {mean[name]:.2f} | "
              f"{mean[name] / mean['plain']:.3f} | {guard[name]:.3f} | {guard[name] / mean[name]:.1%} |")
    # the guard's work is fixed per application (two rank-r products per matrix) while a step's grows with
    # its tokens: the batch at which N = 1 costs 5 %, if the step time grows linearly with the batch
    one = guard["guard N=1"] - guard["plain"]
    batch = setup.args.batch * one / (0.05 * base)
    print(f"guard N=1: {one:.2f} s per application = 5 % of a step from batch ~{batch:.0f} (here "
          f"{setup.args.batch}); N=10: {one / 10 / base:.1%} of a step by count")
    _, module = setup.fit([], max_steps=1)
    parameters = named_tensors(module)
    share = UpdateShare(lssf.subspace, parameters, matched_keys(lssf.subspace, parameters))
    start = time.perf_counter()
    share.mark(parameters)
    share.since_mark(parameters)
    seconds = time.perf_counter() - start
    print(f"one per-step update-share measurement (a weight copy, then a GEMM per matrix): {seconds:.2f} s = "
          f"{seconds / base:.1%} of a plain step (made only on logged steps, every log_every_n_steps)")


# -- the optimizer study -----------------------------------------------------------------------------------
class Study(Callback):
    """Listed before the LSSF callback: the share of each optimizer update inside the subspace (before the
    guard edits the weights), the loss; ``project``: ``"gradient"`` or ``"exp_avg"`` besides the weights."""

    def __init__(self, lssf: LSSFCallback, project: str | None) -> None:
        self.lssf, self.project, self.shares, self.losses = lssf, project, [], []

    def _factors(self):
        return self.lssf.live_forms.forms.factors

    def on_train_start(self, trainer, pl_module):
        parameters = named_tensors(pl_module)
        self.share = UpdateShare(self.lssf.subspace, parameters, matched_keys(self.lssf.subspace, parameters))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.share.mark(named_tensors(pl_module))  # after the previous step's guard

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.project == "gradient":
            parameters = named_tensors(pl_module)
            for key, (left, _, _, conv1d) in self._factors().items():
                grad = parameters[key].grad
                hold_out_adapter_(grad.T if conv1d else grad, left)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.shares.append(self.share.since_mark(named_tensors(pl_module))["all"])
        self.losses.append(float(outputs["loss"]))


class ProjectMoments(Callback):
    """Listed after the LSSF callback: Adam's ``exp_avg`` held out of the subspace after the guard."""

    def __init__(self, lssf: LSSFCallback) -> None:
        self.lssf = lssf

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        parameters = named_tensors(pl_module)
        state = trainer.optimizers[0].state
        for key, (left, _, _, conv1d) in self.lssf.live_forms.forms.factors.items():
            moment = state[parameters[key]]["exp_avg"]
            hold_out_adapter_(moment.T if conv1d else moment, left)


def held_out_loss(setup: Setup, module) -> float:
    data = ChatDataModule(str(setup.val), None, tokenizer=str(setup.aligned), batch_size=8, max_length=128,
                          shuffle=False)
    data.setup("fit")
    module.eval()
    with torch.no_grad():
        losses = [float(module._loss(batch)) for batch in data.train_dataloader()]
    return statistics.mean(losses)


def bench_optimizer(setup: Setup) -> None:
    steps = setup.args.study_steps
    print(f"\noptimizer study: AdamW lr {setup.args.study_lr:g}, {steps} steps, batch {setup.args.batch}, "
          "guard lssf-reset alpha 1 every step")
    print("| projected | update share in subspace, mean (first, last) | mean train loss | held-out loss |")
    print("|---|---|---|---|")
    for project in (None, "gradient", "exp_avg"):
        lssf = setup.callback(method="lssf-reset", apply_on="steps", every_n_steps=1)
        study = Study(lssf, project)
        extra = [ProjectMoments(lssf)] if project == "exp_avg" else []
        _, module = setup.fit([study, lssf, *extra], max_steps=steps, learning_rate=setup.args.study_lr)
        shares = study.shares[1:]  # the first step's update is not guarded yet (step 0)
        label = "weights" + (f" + {project}" if project else "")
        print(f"| {label} | {statistics.mean(shares):.4f} ({shares[0]:.4f}, {shares[-1]:.4f}) | "
              f"{statistics.mean(study.losses):.4f} | {held_out_loss(setup, module):.4f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="save,steps,optimizer")
    parser.add_argument("--work", help="working folder, kept (its subspace cache is reused); default: new")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20,
                        help="timed steps per run, after 2 warm-up steps (at least 10: the N=10 row's guard)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--study-steps", type=int, default=12)
    parser.add_argument("--study-lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared machine, threads waiting at OpenMP "
                             "barriers make GEMM timings erratic)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    setup = Setup(args)
    parts = args.parts.split(",")
    for part, run in (("save", bench_save), ("steps", bench_steps), ("optimizer", bench_optimizer)):
        if part in parts:
            run(setup)


if __name__ == "__main__":
    main()
