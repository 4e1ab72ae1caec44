"""What the demo's stages share: the run's state, its progress log, and small file and model helpers."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lssf_lightning.demo.config import DemoConfig
from lssf_lightning.demo.evaluate import EvalSets

__all__ = ["Progress", "Run", "load_model", "save_responses", "score_summary"]

class Progress:
    """Stage headers and timed messages on stdout."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.timings: dict[str, float] = {}
        self._stage: tuple[str, float] | None = None

    def _clock(self) -> str:
        seconds = int(time.monotonic() - self.start)
        return f"[{seconds // 60:02d}:{seconds % 60:02d}]"

    def stage(self, name: str) -> None:
        self._close()
        self._stage = (name, time.monotonic())
        print(f"\n{self._clock()} == {name} ==", flush=True)

    def info(self, message: str) -> None:
        print(f"{self._clock()}   {message}", flush=True)

    def _close(self) -> None:
        if self._stage is not None:
            name, began = self._stage
            self.timings[name] = round(time.monotonic() - began, 1)
            self._stage = None

    def finish(self) -> dict[str, float]:
        self._close()
        self.timings["total"] = round(time.monotonic() - self.start, 1)
        return self.timings


def load_model(directory: Path, dtype: str = "float32"):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        directory, dtype=getattr(torch, dtype), local_files_only=True
    )
    model.eval()
    return model, AutoTokenizer.from_pretrained(directory, local_files_only=True)


def score_summary(result: dict) -> dict:
    """The rates of an evaluation (responses left out)."""
    return {k: v for k, v in result.items() if k != "responses"}


def save_responses(output: Path, name: str, result: dict) -> None:
    directory = output / "responses"
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / f"{name}.jsonl").open("w", encoding="utf-8") as file:
        for split, rows in result.get("responses", {}).items():
            for row in rows:
                file.write(json.dumps({"set": split, **row}, ensure_ascii=False) + "\n")


@dataclass
class Run:
    """What the stages share."""

    config: DemoConfig
    quick: bool
    output: Path
    cache: Path
    log: Progress
    base_dir: Path | None = None
    aligned_dir: Path | None = None
    prompts: Any = None
    task_train: list = field(default_factory=list)
    test_sets: EvalSets | None = None
    val_sets: EvalSets | None = None
    aligned_val: dict = field(default_factory=dict)
    train_file: Path | None = None
    evaluations: dict = field(default_factory=dict)
    report: dict = field(default_factory=dict)
    curve_files: tuple = ()  # the training curves' validation prompts (harmful, harmless) and general text
    curves: dict = field(default_factory=dict)  # {run name: TrainingCurves rows}
