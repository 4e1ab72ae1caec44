"""What LSSFCallback costs a run: checkpoint save time with and without it, and the refusal monitor's share
of a training epoch, on the demo's configuration (SmolLM2-135M, the generated topic task, batch 8).

    python benchmarks/bench_callback.py [--models demo_output/models] [--train-examples 384]

Uses the demo's aligned and base models when `lssf-lightning demo` has written them; otherwise real
SmolLM2-135M weights as the aligned model and a copy with a synthetic low-rank difference as the base.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer

from lssf_lightning import CausalLMModule, ChatDataModule, LSSFCallback
from lssf_lightning.demo.task import task_splits
from lssf_lightning.lightning.data import write_chat_jsonl
from lssf_lightning.lightning.monitor import RefusalMonitor


class TimedMonitor(RefusalMonitor):
    """The default refusal monitor, recording the wall time of each measurement."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seconds: list[float] = []

    def measure(self, trainer, pl_module):
        start = time.perf_counter()
        values = super().measure(trainer, pl_module)
        self.seconds.append(time.perf_counter() - start)
        return values


class EpochTimer(Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self.seconds = time.perf_counter() - self.start


def synthetic_pair(root: Path) -> tuple[Path, Path]:
    """(aligned, unaligned): real SmolLM2-135M, and a copy whose block matrices differ by a low-rank
    update."""
    from lssf_lightning.demo.assets import base_model_dir
    from lssf_lightning.io.export import copy_support_files
    from lssf_lightning.io.shards import SafetensorsReader, write_safetensors

    aligned = base_model_dir()
    reader = SafetensorsReader(sorted(aligned.glob("*.safetensors")))
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    names = reader.keys()  # a weight store, not a dict
    for key in names:
        weight = reader.get(key)
        if weight.ndim == 2 and ".layers." in key:
            left = torch.randn(weight.shape[0], 32, generator=generator)
            right = torch.randn(32, weight.shape[1], generator=generator)
            weight = weight - 1e-3 * (left @ right) / 32
        tensors[key] = weight
    unaligned = root / "unaligned"
    unaligned.mkdir(parents=True)
    write_safetensors(unaligned / "model.safetensors", tensors, {"format": "pt"})
    copy_support_files([aligned], unaligned)
    return aligned, unaligned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="demo_output/models")
    parser.add_argument("--train-examples", type=int, default=384,
                        help="rows per epoch, batch 8 (default: the full demo's task_train.jsonl)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lssf-bench-callback-"))
    models = Path(args.models)
    if (models / "aligned" / "config.json").is_file() and (models / "base" / "config.json").is_file():
        aligned, unaligned, source = models / "aligned", models / "base", f"the demo's models in {models}"
    else:
        (aligned, unaligned), source = synthetic_pair(work), "SmolLM2-135M with a synthetic base"
    train, val, _ = task_splits(args.train_examples, 16, 0)
    train_file = write_chat_jsonl(work / "train.jsonl", [e.to_row() for e in train])
    val_file = write_chat_jsonl(work / "val.jsonl", [e.to_row() for e in val])
    threads = torch.get_num_threads()
    print(f"models: {source}; {args.train_examples} training rows, batch 8; {threads} threads")

    monitor = TimedMonitor()
    callback = LSSFCallback(unaligned=str(unaligned), monitor=monitor, verbose=False)
    timer = EpochTimer()
    module = CausalLMModule(str(aligned), learning_rate=5e-5)
    data = ChatDataModule(str(train_file), str(val_file), batch_size=8, max_length=128)
    trainer = Trainer(max_epochs=1, accelerator="cpu", callbacks=[callback, timer], logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0)
    start = time.perf_counter()
    trainer.fit(module, data)
    fit_seconds = time.perf_counter() - start
    monitor_seconds = sum(monitor.seconds)
    print(f"subspace: {callback.subspace}")
    print(f"epoch {timer.seconds:.1f} s (fit {fit_seconds:.1f} s); refusal monitor {monitor_seconds:.1f} s "
          f"= {monitor_seconds / timer.seconds:.1%} of the epoch (target <= 5%)")

    def save_seconds(with_callback: bool) -> float:
        if not with_callback:
            trainer.callbacks.remove(callback)
        try:
            path = work / f"ckpt-{with_callback}.ckpt"
            start = time.perf_counter()
            trainer.save_checkpoint(path)
            return time.perf_counter() - start
        finally:
            if not with_callback:
                trainer.callbacks.insert(0, callback)

    timings = {True: [], False: []}
    for _ in range(args.repeats):
        for with_callback in (False, True):
            timings[with_callback].append(save_seconds(with_callback))
    plain, lssf = statistics.median(timings[False]), statistics.median(timings[True])
    sizes = {w: (work / f"ckpt-{w}.ckpt").stat().st_size / 2**20 for w in (False, True)}
    print(f"checkpoint save: plain {plain:.2f} s ({sizes[False]:.0f} MiB), with LSSFCallback {lssf:.2f} s "
          f"({sizes[True]:.0f} MiB); ratio {lssf / plain:.2f} (target <= 1.10)")


if __name__ == "__main__":
    main()
