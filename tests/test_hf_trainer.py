"""LSSFTrainerCallback in real transformers.Trainer and TRL SFTTrainer runs (full fine-tune and LoRA), tiny
Llama."""

from __future__ import annotations

import pytest
import torch
from conftest import state
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

from lssf_lightning.core.entropy import safety_critical_rank
from lssf_lightning.integrations.hf_trainer import LSSFTrainerCallback

TEXTS = [
    "how do i bake bread at home ? sure , here is a simple answer .",
    "explain how a bicycle works . the cat sat on the warm mat .",
    "how do i kill a python process ? i cannot help with that request .",
    "tell me a fun fact about space . sure , here is a fun fact .",
] * 2
MONITOR = {"num_prompts": 2, "max_new_tokens": 3}


def dense_correction(trio, key, alpha=1.0, eta=0.9):
    """``α·U_rU_rᵀδ`` from an SVD of ``δ = W_aligned − W_base`` (float64), independently of the library."""
    delta = state(trio.models["aligned"])[key].double() - state(trio.models["base"])[key].double()
    u, s, _ = torch.linalg.svd(delta, full_matrices=False)
    r = safety_critical_rank(s, eta)
    return alpha * u[:, :r] @ u[:, :r].T @ delta


def assert_realigned(directory, live: dict, trio, alpha=1.0):
    """``directory`` holds live + α·U_rU_rᵀδ on every block weight, live elsewhere."""
    written = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).state_dict()
    corrected = 0
    for key, value in live.items():
        expected = value.double()
        if ".layers." in key and key.endswith("proj.weight"):
            expected = expected + dense_correction(trio, key, alpha)
            corrected += 1
        torch.testing.assert_close(written[key].double(), expected, rtol=1e-4, atol=1e-6)
    assert corrected == 14  # 2 layers × 7 projections


def rows(tokenizer):
    encoded = tokenizer(TEXTS, padding="max_length", max_length=16)
    return [
        {"input_ids": i, "attention_mask": m, "labels": [t if a else -100 for t, a in zip(i, m)]}
        for i, m in zip(encoded["input_ids"], encoded["attention_mask"])
    ]


def trainer_args(output_dir, **kwargs):
    return TrainingArguments(
        **{
            "output_dir": str(output_dir),
            "max_steps": 4,
            "save_steps": 2,
            "per_device_train_batch_size": 2,
            "learning_rate": 1e-2,
            "report_to": [],
            "use_cpu": True,
            "logging_steps": 1,
            "eval_strategy": "steps",
            "eval_steps": 4,
            "per_device_eval_batch_size": 4,
            "seed": 0,
            "disable_tqdm": True,
            **kwargs,
        }
    )


class Recorder(TrainerCallback):
    """Sees what the Trainer's loggers (``report_to``) see: every ``on_log`` call."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def run_trainer(trio, tokenizer, output_dir, resume=None, **callback_kwargs):
    model = AutoModelForCausalLM.from_pretrained(trio.aligned, dtype=torch.float32)
    callback = LSSFTrainerCallback(
        unaligned=str(trio.base), monitor=MONITOR, verbose=False, **callback_kwargs
    )
    recorder = Recorder()
    data = rows(tokenizer)
    trainer = Trainer(
        model=model,
        args=trainer_args(output_dir),
        train_dataset=data,
        eval_dataset=data[:4],
        processing_class=tokenizer,
        callbacks=[recorder, callback],
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer, recorder


def test_transformers_trainer_checkpoints_export_logs_and_resume(llama_trio, tiny_tokenizer, tmp_path):
    trainer, recorder = run_trainer(
        llama_trio,
        tiny_tokenizer,
        tmp_path / "run",
        export_dir=tmp_path / "export",
        export_adapter_dir=tmp_path / "adapter",
    )
    live = state(trainer.model)
    assert not torch.equal(
        live["model.layers.0.self_attn.q_proj.weight"],
        state(llama_trio.models["aligned"])["model.layers.0.self_attn.q_proj.weight"],
    )
    assert_realigned(tmp_path / "export", live, llama_trio)
    # checkpoint-2: raw weights for the Trainer, a realigned model beside them.
    checkpoint = tmp_path / "run" / "checkpoint-2"
    raw_at_2 = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).state_dict()
    assert not torch.equal(
        raw_at_2["model.layers.0.mlp.up_proj.weight"], live["model.layers.0.mlp.up_proj.weight"]
    )
    assert_realigned(checkpoint / "realigned", raw_at_2, llama_trio)
    assert (checkpoint / "realigned" / "tokenizer.json").is_file()
    # The rates are in the Trainer's logs (and the evaluation's metrics).
    logged = [entry for entry in trainer.state.log_history if "lssf/refusal_rate" in entry]
    assert logged and logged[-1]["step"] == 4
    assert [entry for entry in recorder.logs if "lssf/refusal_rate" in entry]  # reached the loggers
    for name in ("refusal_rate_realigned", "harmless_refusal_rate", "harmless_refusal_rate_realigned"):
        assert 0.0 <= logged[-1][f"lssf/{name}"] <= 1.0
    # The correction as a LoRA adapter on the live weights gives the exported model.
    merged = PeftModel.from_pretrained(trainer.model, tmp_path / "adapter").merge_and_unload().state_dict()
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32).state_dict()
    for key, value in exported.items():
        torch.testing.assert_close(merged[key], value, rtol=1e-4, atol=1e-6)
    # Resuming from checkpoint-2 continues from the raw weights exactly.
    resumed, _ = run_trainer(
        llama_trio, tiny_tokenizer, tmp_path / "run", resume=str(checkpoint), checkpoint_subdir=None
    )
    for key, value in state(resumed.model).items():
        assert torch.equal(value, live[key]), key


def test_settings_are_checked():
    with pytest.raises(ValueError, match="alpha must be a finite number"):
        LSSFTrainerCallback(unaligned="x", alpha=float("inf"))
    with pytest.raises(ValueError, match="checkpoint_subdir must be a plain folder name"):
        LSSFTrainerCallback(unaligned="x", checkpoint_subdir="../out")
    with pytest.raises(ValueError, match=r"monitor settings \['prompts'\] are not known"):
        LSSFTrainerCallback(unaligned="x", monitor={"prompts": 3})


@pytest.fixture(scope="module")
def sft_data():
    datasets = pytest.importorskip("datasets")
    return datasets.Dataset.from_dict({"text": TEXTS})


def run_sft(trio, tokenizer, output_dir, data, peft_config=None, resume=None, **callback_kwargs):
    from trl import SFTConfig, SFTTrainer

    model = AutoModelForCausalLM.from_pretrained(trio.aligned, dtype=torch.float32)
    callback = LSSFTrainerCallback(unaligned=str(trio.base), monitor=False, verbose=False, **callback_kwargs)
    config = SFTConfig(
        output_dir=str(output_dir),
        max_steps=4,
        save_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-2 if peft_config is None else 5e-2,
        report_to=[],
        use_cpu=True,
        max_length=16,
        seed=0,
        disable_tqdm=True,
        logging_steps=1,
        dataset_text_field="text",
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[callback],
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def effective(model) -> dict:
    """A peft model's merged weights (a copy), or a plain model's state dict."""
    if not isinstance(model, PeftModel):
        return state(model)
    from lssf_lightning.io.weights import ModuleStore
    from lssf_lightning.training import export_names

    store = ModuleStore(model)
    keys = store.keys()
    names = export_names(keys)
    return {names[k]: store.get(k).clone() for k in keys if names[k] is not None}


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_trl_sft_trainer(lora, llama_trio, tiny_tokenizer, sft_data, tmp_path):
    peft_config = (
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
        if lora
        else None
    )
    trainer = run_sft(
        llama_trio,
        tiny_tokenizer,
        tmp_path / "run",
        sft_data,
        peft_config,
        export_dir=tmp_path / "export",
        export_adapter_dir=tmp_path / "adapter",
    )
    assert isinstance(trainer.model, PeftModel) is lora
    live = effective(trainer.model)
    assert_realigned(tmp_path / "export", live, llama_trio)
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert (checkpoint / ("adapter_model.safetensors" if lora else "model.safetensors")).is_file()
    raw_at_2 = AutoModelForCausalLM.from_pretrained(
        llama_trio.aligned if lora else checkpoint, dtype=torch.float32
    )
    raw_at_2 = effective(PeftModel.from_pretrained(raw_at_2, checkpoint) if lora else raw_at_2)
    assert_realigned(checkpoint / "realigned", raw_at_2, llama_trio)
    # The adapter: on the live (full) model, or combined with the task LoRA on the aligned model.
    base = (
        AutoModelForCausalLM.from_pretrained(llama_trio.aligned, dtype=torch.float32)
        if lora
        else trainer.model
    )
    merged = PeftModel.from_pretrained(base, tmp_path / "adapter").merge_and_unload().state_dict()
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32).state_dict()
    for key, value in exported.items():
        torch.testing.assert_close(merged[key], value, rtol=1e-4, atol=1e-6)
    # Resuming from checkpoint-2 continues from its raw weights (the task LoRA's raw adapter) exactly.
    resumed = run_sft(
        llama_trio,
        tiny_tokenizer,
        tmp_path / "run",
        sft_data,
        peft_config,
        resume=str(checkpoint),
        checkpoint_subdir=None,
    )
    for key, value in effective(resumed.model).items():
        assert torch.equal(value, live[key]), key


def test_auto_alpha_is_chosen_logged_exported_and_kept_in_checkpoints(llama_trio, tiny_tokenizer, tmp_path):
    import json

    from lssf_lightning.config import AutoAlphaConfig

    trainer, _ = run_trainer(
        llama_trio,
        tiny_tokenizer,
        tmp_path / "run",
        alpha="auto",
        method="lssf",  # the paper's form only (the default grid tries the reset form first)
        auto_alpha=AutoAlphaConfig(alphas=[0.5, 2.0]),
        export_dir=tmp_path / "export",
    )
    chosen = [entry["lssf/alpha"] for entry in trainer.state.log_history if "lssf/alpha" in entry]
    # The tiny random model never refuses: target = max(0 − tolerance, 0) = 0, reached by the smallest α.
    assert chosen == [0.5]
    assert_realigned(tmp_path / "export", state(trainer.model), llama_trio, alpha=0.5)
    saved = json.loads((tmp_path / "run" / "checkpoint-4" / "lssf_state.json").read_text())
    assert saved["alpha"] == 0.5 and saved["auto_target"] == 0.0 and len(saved["alpha_curve"]) == 1


def test_two_process_ddp_run(llama_trio, tmp_path):
    """Two gloo processes (torchrun): prompts split, counts summed, rank 0 writes; ~35 s on a loaded 2-core
    box."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("hf_ddp_train.py")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(script),
            str(llama_trio.aligned),
            str(llama_trio.base),
            str(tmp_path),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and len(metrics["logged"]) == 1
    assert metrics["logged"][0]["lssf/alpha"] == 0.25  # auto: the tiny model never refuses → smallest α
    for name in ("refusal_rate", "refusal_rate_realigned", "harmless_refusal_rate"):
        assert metrics["logged"][0][f"lssf/{name}"] * 4 % 1 == 0  # 4 prompts counted over both processes
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "final", dtype=torch.float32).state_dict()
    assert_realigned(tmp_path / "export", final, llama_trio, alpha=0.25)
    checkpoint = tmp_path / "trainer" / "checkpoint-2"
    raw = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).state_dict()
    assert_realigned(checkpoint / "realigned", raw, llama_trio, alpha=0.25)
