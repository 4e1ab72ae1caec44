"""``lssf-lightning fit``: LightningCLI over the generic causal-LM module and the JSONL chat data module.

Callbacks, LSSFCallback included, come from the config's ``trainer.callbacks`` list::

    trainer:
      callbacks:
        - class_path: lssf_lightning.LSSFCallback
          init_args:
            unaligned: /models/Llama-3.1-8B
            alpha: 1.0
            subspace: {eta: 0.9}                  # a SubspaceConfig
            monitor: {num_prompts: 32, judge: my_package.judges.my_judge}  # a RefusalMonitor
    model: {model: /models/Llama-3.1-8B-Instruct, lora: {r: 16, lora_alpha: 32}}
    data: {train_file: train.jsonl}
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from lightning.pytorch.cli import LightningCLI

from lssf_lightning.lightning.data import ChatDataModule
from lssf_lightning.lightning.module import CausalLMModule

__all__ = ["run_fit_cli"]


def run_fit_cli(args: Sequence[str]) -> LightningCLI:
    """Run ``fit`` with ``args`` (``--config``, ``--print_config``, ``--trainer.max_steps=…`` …)."""
    full = ["fit", *args]
    # From the console script, let LightningCLI read sys.argv itself: DDP re-launches the same command line.
    from_command_line = sys.argv[1:] == full
    return LightningCLI(
        CausalLMModule,
        ChatDataModule,
        args=None if from_command_line else full,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "lssf-lightning fit"},
    )
