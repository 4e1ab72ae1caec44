"""A fine-tuning run with LSSFCallback on 1 or 2 CPU processes (gloo), for tests/test_ddp.py.

Usage: python ddp_fit.py ALIGNED UNALIGNED TRAIN_JSONL OUT DEVICES
Each step sees all 8 rows either way (full-batch), so both runs take the same optimisation steps
whatever order the distributed sampler picks.
"""

import json
import sys

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lssf_lightning import LSSFCallback
from lssf_lightning.lightning.data import ChatDataModule
from lssf_lightning.lightning.module import CausalLMModule
from lssf_lightning.lightning.monitor import RefusalMonitor


def odd_length(responses):
    return [len(r) % 2 == 1 for r in responses]


def main(aligned, unaligned, train_file, out, devices):
    devices = int(devices)
    torch.manual_seed(0)
    module = CausalLMModule(aligned, learning_rate=1e-2)
    data = ChatDataModule(train_file, train_file, batch_size=8 // devices, shuffle=False)
    monitor = RefusalMonitor(judge=odd_length, num_prompts=8, max_new_tokens=6)
    callback = LSSFCallback(unaligned=unaligned, monitor=monitor, verbose=False)
    trainer = Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_epochs=3,
        callbacks=[callback, ModelCheckpoint(dirpath=out, filename="final")], logger=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        use_distributed_sampler=True,
    )
    trainer.fit(module, data)
    if trainer.is_global_zero:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("lssf/")}
        with open(f"{out}/metrics.json", "w") as f:
            json.dump(metrics, f)


if __name__ == "__main__":
    main(*sys.argv[1:6])
