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

import atexit
import os
import re
import sys
import tempfile
from collections.abc import Sequence

import yaml
from jsonargparse import ArgumentError
from lightning.pytorch.cli import LightningCLI

import lssf_lightning  # noqa: F401  (registers the short class names for configs)
from lssf_lightning.lightning.finetune import CausalLMModule, ChatDataModule
from lssf_lightning.lightning.legacy import translate_init_args

__all__ = ["run_fit_cli"]


def run_fit_cli(args: Sequence[str]) -> LightningCLI:
    """Run ``fit`` with ``args`` (``--config``, ``--print_config``, ``--trainer.max_steps=…`` …)."""
    full = ["fit", *args]
    # From the console script, let LightningCLI read sys.argv itself: DDP re-launches the same command line
    # (with an old-style config replaced by its translation).
    translated = _translate_configs(full)
    from_command_line = sys.argv[1:] == full
    if from_command_line:
        sys.argv[1:] = translated
    try:
        return _FitCLI(
            CausalLMModule,
            ChatDataModule,
            args=None if from_command_line else translated,
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


def _translate_configs(args: list[str]) -> list[str]:
    """``args`` with each ``--config`` file that spells LSSFCallback's arguments the 0.1 way (``eta:``,
    ``num_monitor_prompts:`` …) replaced by a translated copy, with a deprecation notice naming the new
    keys."""
    out, i = list(args), 0
    while i < len(out):
        flag, _, value = out[i].partition("=")
        if flag == "--config" and (value or i + 1 < len(out)):
            index = i if value else i + 1
            path = value or out[index]
            new = _translate_config(path)
            if new is not None:
                out[index] = f"--config={new}" if value else new
        i += 1
    return out


def _translate_config(path: str) -> str | None:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as file:
        config = yaml.safe_load(file)
    callbacks = ((config or {}).get("trainer") or {}).get("callbacks") if isinstance(config, dict) else None
    moved = []
    for callback in callbacks if isinstance(callbacks, list) else []:
        if isinstance(callback, dict) and str(callback.get("class_path", "")).endswith("LSSFCallback"):
            callback["init_args"], names = translate_init_args(callback.get("init_args") or {})
            moved += names
    if not moved:
        return None
    print(f"lssf-lightning fit: {path} uses deprecated LSSFCallback keys {sorted(set(moved))}; they now live "
          "under `subspace:` (SubspaceConfig), `monitor:` (RefusalMonitor: num_prompts, max_new_tokens, "
          "judge, ...), `auto_alpha:` (AutoAlphaConfig) and `keep_raw_fixups:`", file=sys.stderr)
    handle, translated = tempfile.mkstemp(prefix="lssf-fit-", suffix=".yaml")
    with os.fdopen(handle, "w", encoding="utf-8") as file:
        yaml.safe_dump(config, file, sort_keys=False)
    atexit.register(lambda: os.path.exists(translated) and os.unlink(translated))
    return translated
