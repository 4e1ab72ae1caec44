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

import re
import sys
from collections.abc import Sequence

from jsonargparse import ArgumentError
from lightning.pytorch.cli import LightningCLI

from lssf_lightning.lightning.data import ChatDataModule
from lssf_lightning.lightning.module import CausalLMModule

__all__ = ["run_fit_cli"]


def run_fit_cli(args: Sequence[str]) -> LightningCLI:
    """Run ``fit`` with ``args`` (``--config``, ``--print_config``, ``--trainer.max_steps=…`` …)."""
    full = ["fit", *args]
    # From the console script, let LightningCLI read sys.argv itself: DDP re-launches the same command line.
    from_command_line = sys.argv[1:] == full
    try:
        return _FitCLI(
            CausalLMModule,
            ChatDataModule,
            args=None if from_command_line else full,
            save_config_kwargs={"overwrite": True},
            # errors are raised (the command prints them in one line), not printed after the whole usage
            parser_kwargs={"prog": "lssf-lightning fit", "exit_on_error": False},
        )
    except ArgumentError as err:
        message = re.sub(r"Subcommand 'fit' does not accept option '([^']+)'",
                         r"unknown option or config key '\1'", str(err))
        configs = [value or after for flag, _, value, after in _flags(args) if flag in ("--config", "-c")]
        where = f" (config: {', '.join(configs)})" if configs else ""
        print(f"lssf-lightning fit: error: {' '.join(message.split())}{where} (see --help)", file=sys.stderr)
        raise SystemExit(2) from None  # a usage error, as the other commands report it


def _flags(args: Sequence[str]):
    """``(flag, "=", inline value, next argument)`` for each argument."""
    return [(*str(arg).partition("="), str(after)) for arg, after in zip(args, [*args[1:], ""])]


class _FitCLI(LightningCLI):
    """LightningCLI whose ``fit`` subcommand is the whole command: its usage line reads
    ``lssf-lightning fit [-c CONFIG] ...``, not ``lssf-lightning fit [options] fit ...``."""

    def _add_subcommands(self, parser, **kwargs) -> None:
        super()._add_subcommands(parser, **kwargs)
        fit = self._subcommand_parsers["fit"]
        fit.prog = "lssf-lightning fit"
        for action in fit._actions:  # help texts come from reST docstrings: plain quotes on a terminal
            if isinstance(action.help, str):
                action.help = action.help.replace("``", "`")
