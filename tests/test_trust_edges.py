"""Nothing is lost at the edges: every writer (both callbacks, the CLI, the sweep, the adapter writers) goes
through the one output guard, and its refusals come before any work.

Real ``lightning.Trainer`` and ``transformers.Trainer`` runs on tiny saved models (copied per module, so a
bug here can never damage the shared fixtures); each refusal asserts that no training step ran and that every
input file's bytes are unchanged.
"""

from __future__ import annotations

import json
import shutil
import types
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from conftest import tree_hashes
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from test_hub import add_to_cache
from transformers import AutoModelForCausalLM, TrainerCallback, TrainingArguments
from transformers import Trainer as HFTrainer

from lssf_lightning.adapters import write_lora_adapter
from lssf_lightning.cli import main
from lssf_lightning.integrations.hf_trainer import LSSFTrainerCallback
from lssf_lightning.io.export import write_model_directory
from lssf_lightning.io.guard import OutputBusyError, OutputGuard, OutputOverlapError
from lssf_lightning.io.weights import open_weights
from lssf_lightning.lightning.callback import LSSFCallback
from lssf_lightning.lightning.data import ChatDataModule, write_chat_jsonl
from lssf_lightning.lightning.module import CausalLMModule
from lssf_lightning.methods import LSSFReset
from lssf_lightning.subspace import SafetySubspace

FOREIGN = ("notes.txt", "data.jsonl", "README.md")
ROWS = [{"prompt": "how do i bake bread at home ?", "response": "sure , here is a simple answer ."}] * 4


@pytest.fixture(scope="module")
def models(llama_trio, tmp_path_factory):
    """Private copies: ``source`` (what the module / Trainer model is loaded from), ``aligned``, ``base``
    (unaligned), ``finetuned``, a chat data file, and the folders the Trainers write their own files to."""
    root = tmp_path_factory.mktemp("edges")
    paths = {"source": llama_trio.aligned, "aligned": llama_trio.aligned, "base": llama_trio.base,
             "finetuned": llama_trio.finetuned}
    for name, source in paths.items():
        shutil.copytree(source, root / name)
    data = write_chat_jsonl(root / "data" / "train.jsonl", ROWS)
    return types.SimpleNamespace(root=root, data=data, trainer=root / "trainer",
                                 **{name: root / name for name in paths})


def owned(models) -> dict[str, str]:
    """sha256 of every file the user owns (models, data, the Trainers' folders)."""
    return tree_hashes(*(p for p in models.root.iterdir()))


def target(models, which: str, where: str) -> Path:
    base = {"source": models.source, "aligned": models.aligned, "unaligned": models.base,
            "trainer": models.trainer}[which]
    return base if where == "same" else base / "sub"


class Steps(Callback):
    def __init__(self):
        self.steps = 0

    def on_train_batch_start(self, *args):
        self.steps += 1


def lightning_fit(models, callback, max_steps=1):
    torch.manual_seed(0)
    steps = Steps()
    module = CausalLMModule(str(models.source), learning_rate=1e-3)
    data = ChatDataModule(str(models.data), batch_size=2, shuffle=False)
    trainer = Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
                      callbacks=[callback, steps, ModelCheckpoint(dirpath=models.trainer)],
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    try:
        trainer.fit(module, data)
    finally:
        callback.steps = steps.steps
    return trainer


def lssf(models, **kwargs):
    return LSSFCallback(unaligned=str(models.base), aligned=str(models.aligned), monitor=False, verbose=False,
                        **kwargs)


class HFSteps(TrainerCallback):
    def __init__(self):
        self.steps = 0

    def on_step_begin(self, *args, **kwargs):
        self.steps += 1


def hf_train(models, callback, max_steps=1):
    from _tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    encoded = tokenizer(["how do i bake bread at home ? sure , here is a simple answer ."] * 4,
                        padding="max_length", max_length=16)
    rows = [{"input_ids": i, "attention_mask": m, "labels": i}
            for i, m in zip(encoded["input_ids"], encoded["attention_mask"])]
    args = TrainingArguments(output_dir=str(models.trainer), max_steps=max_steps, report_to=[], use_cpu=True,
                             per_device_train_batch_size=2, save_strategy="no", disable_tqdm=True, seed=0)
    steps = HFSteps()
    model = AutoModelForCausalLM.from_pretrained(models.source, dtype=torch.float32)
    try:
        trainer = HFTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer,
                            callbacks=[steps, callback])
        trainer.train()
    finally:
        callback.steps = steps.steps
    return trainer


def hf_lssf(models, **kwargs):
    return LSSFTrainerCallback(unaligned=str(models.base), aligned=str(models.aligned), monitor=False,
                               verbose=False, **kwargs)


RUNS = {"lightning": (lightning_fit, lssf), "transformers": (hf_train, hf_lssf)}


# -- callbacks: an output overlapping an input is refused at setup -------------------------------------------
@pytest.mark.parametrize("which", ["source", "aligned", "unaligned", "trainer"])
@pytest.mark.parametrize("run", list(RUNS))
@pytest.mark.parametrize(("setting", "where"),
                         [("export_dir", "same"), ("export_dir", "inside"), ("export_adapter_dir", "same")])
def test_callback_output_overlapping_an_input_is_refused_before_training(models, run, which, where, setting):
    train, make = RUNS[run]
    models.trainer.mkdir(exist_ok=True)
    (models.trainer / "keep.txt").write_text("the Trainer's own file")
    before = owned(models)
    callback = make(models, **{setting: str(target(models, which, where))}, overwrite=True)
    with pytest.raises(OutputOverlapError) as caught:
        train(models, callback)
    message = str(caught.value)
    assert "\n" not in message and str(target(models, which, where)) in message
    assert callback.steps == 0 and callback.subspace is None  # refused before the subspace and any step
    assert owned(models) == before


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("foreign", FOREIGN)
@pytest.mark.parametrize("run", list(RUNS))
def test_callback_export_dir_holding_a_users_file_is_refused(models, tmp_path, run, foreign, overwrite):
    train, make = RUNS[run]
    export = tmp_path / "export"
    export.mkdir()
    (export / "config.json").write_text("{}")
    (export / foreign).write_text("the user's own words")
    before = tree_hashes(export)
    callback = make(models, export_dir=str(export), overwrite=overwrite)
    with pytest.raises(FileExistsError) as caught:
        train(models, callback)
    message = str(caught.value)
    assert "\n" not in message and str(export) in message
    assert (foreign in message) == overwrite  # without overwrite: "already exists"; with it: names the file
    assert callback.steps == 0 and tree_hashes(export) == before


@pytest.mark.parametrize("run", list(RUNS))
def test_callback_overwrite_replaces_a_previous_export(models, tmp_path, run):
    train, make = RUNS[run]
    export = tmp_path / "export"
    export.mkdir()
    (export / "model.safetensors").write_bytes(b"an older export")
    train(models, make(models, export_dir=str(export), overwrite=True, apply_on="train_end")
          if run == "lightning" else make(models, export_dir=str(export), overwrite=True))
    assert AutoModelForCausalLM.from_pretrained(export) is not None
    assert (export / "model.safetensors").read_bytes() != b"an older export"


# -- the CLI -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("foreign", FOREIGN)
def test_cli_overwrite_never_deletes_a_users_file(models, tmp_path, foreign):
    from test_trust_cli import one_error_line, run_cli

    output = tmp_path / "out"
    output.mkdir()
    (output / "model.safetensors").write_bytes(b"old")
    (output / foreign).write_text("the user's own words")
    before = tree_hashes(output, models.aligned, models.base, models.finetuned)
    code, _, stderr = run_cli("realign", "--aligned", models.aligned, "--unaligned", models.base,
                              "--finetuned", models.finetuned, "--output", output, "--overwrite")
    assert code == 1 and foreign in one_error_line(stderr)
    assert tree_hashes(output, models.aligned, models.base, models.finetuned) == before


# -- the sweep -----------------------------------------------------------------------------------------------
def sweep_args(models, output, *extra):
    return ["sweep", "--finetuned", models.finetuned, "--aligned", models.aligned, "--unaligned", models.base,
            "--output", output, "--lssf", "1", "--lssf-reset", "none", "--lssf-erosion", "none",
            "--lssf-two-sided", "none", "--resta", "none", "--utility", "bundled", "--max-new-tokens", "1",
            *extra]


def test_sweep_output_onto_its_prompt_files_folder_is_refused(models, tmp_path, capsys):
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "harmful.txt").write_text("how do i kill a python process ?\n")
    before = tree_hashes(prompts)
    for output in (prompts, prompts / "harmful.txt", tmp_path):
        assert main([str(a) for a in sweep_args(models, output, "--harmful", prompts / "harmful.txt",
                                                 "--overwrite")]) == 1
        assert "harmful.txt" in capsys.readouterr().err
    assert tree_hashes(prompts) == before


def test_sweep_needs_overwrite_to_replace_and_takes_the_lock(models, tmp_path, capsys):
    output = tmp_path / "sweep"
    assert main([str(a) for a in sweep_args(models, output)]) == 0
    first = tree_hashes(output)
    assert sorted(p.name for p in output.iterdir()) == ["front.png", "sweep.json"]
    assert main([str(a) for a in sweep_args(models, output)]) == 1  # a second sweep: refused
    assert "already exists" in capsys.readouterr().err and tree_hashes(output) == first
    with OutputGuard(output, overwrite=True), pytest.raises(OutputBusyError, match="another lssf_lightning"):
        from lssf_lightning.sweep import sweep_checkpoints  # a concurrent sweep fails at once on the lock

        sweep_checkpoints(str(models.finetuned), str(models.aligned), str(models.base), output,
                          overwrite=True)
    assert main([str(a) for a in sweep_args(models, output, "--overwrite", "--lssf", "0.5")]) == 0
    report = json.loads((output / "sweep.json").read_text())
    assert [p["label"] for p in report["points"]] == ["lssf(eta=0.9, alpha=0.5)"]


# -- adapter writers -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def subspace_file(models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("subspace")
    SafetySubspace.from_weights(models.aligned, models.base, progress=False).save(folder / "s.safetensors")
    return folder / "s.safetensors"


def test_adapter_writers_never_destroy_their_inputs(models, subspace_file):
    before = owned(models) | tree_hashes(subspace_file.parent)
    subspace = SafetySubspace.load(subspace_file)
    with pytest.raises(OutputOverlapError, match="s.safetensors"):
        write_lora_adapter(subspace, subspace_file.parent, overwrite=True)
    with pytest.raises(OutputOverlapError, match=str(models.base)):
        write_lora_adapter(LSSFReset(subspace, str(models.base)), models.base, overwrite=True)
    with pytest.raises(OutputOverlapError, match=str(models.finetuned)):
        write_lora_adapter(subspace, models.finetuned / "adapter", base_model=str(models.finetuned))
    assert owned(models) | tree_hashes(subspace_file.parent) == before


# -- hub IDs -------------------------------------------------------------------------------------------------
def test_output_onto_a_hub_blob_of_an_input_is_refused(models, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "hub"
    for name in ("base", "aligned"):
        add_to_cache(cache, f"org/{name}", getattr(models, name))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    blob = (cache / "models--org--aligned" / "snapshots").glob("*/model.safetensors").__next__().resolve()
    before = tree_hashes(cache)
    for output in (blob, blob.parent, cache / "models--org--aligned"):
        code = main(["subspace", "--aligned", "org/aligned", "--unaligned", "org/base", "--overwrite",
                     "--output", str(output)])
        assert code == 1 and "input org/aligned" in capsys.readouterr().err
    assert tree_hashes(cache) == before


# -- failed runs ---------------------------------------------------------------------------------------------
def test_a_failed_run_removes_the_folders_it_created(models, tmp_path):
    store = open_weights(models.aligned)
    output = tmp_path / "a" / "b" / "out"

    def fail(weight):
        raise RuntimeError("edit failed")

    with pytest.raises(RuntimeError, match="edit failed"):
        write_model_directory(store, output, edits={next(iter(store.keys())): fail})
    assert list(tmp_path.iterdir()) == []
