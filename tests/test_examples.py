"""The examples run as a user would run them, on tiny checkpoints."""

import subprocess
import sys
from pathlib import Path

import torch
from conftest import state
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lssf_lightning.lightning.data import write_chat_jsonl
from lssf_lightning.methods import LSSF, apply_edits
from lssf_lightning.subspace import SafetySubspace

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(script, *args, cwd):
    # A deprecated spelling in an example (a DeprecationWarning attributed to the script) fails the run.
    command = [
        sys.executable,
        "-W",
        "error::DeprecationWarning:__main__",
        str(EXAMPLES / script),
        *map(str, args),
    ]
    done = subprocess.run(command, check=False, capture_output=True, text=True, cwd=cwd, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_posthoc_realign_example(llama_trio, tmp_path):
    stdout = run(
        "posthoc_realign.py",
        llama_trio.aligned,
        llama_trio.base,
        llama_trio.finetuned,
        tmp_path / "out",
        cwd=tmp_path,
    )
    assert "rank" in stdout
    subspace = SafetySubspace.load(tmp_path / "out-subspace.safetensors")
    fused = state(AutoModelForCausalLM.from_pretrained(tmp_path / "out"))
    expected = apply_edits(state(llama_trio.models["finetuned"]), LSSF(subspace))
    assert all(torch.allclose(fused[k], v) for k, v in expected.items() if k in fused)
    assert (tmp_path / "out" / "tokenizer.json").is_file()


def test_finetune_example(llama_trio, tmp_path):
    rows = [{"prompt": "how do i bake bread at home ?", "response": "sure , here is a simple answer ."}] * 8
    train = write_chat_jsonl(tmp_path / "train.jsonl", rows)
    run(
        "finetune_with_callback.py",
        llama_trio.aligned,
        llama_trio.base,
        train,
        tmp_path / "run",
        "--lora",
        cwd=tmp_path,
    )
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    exported = load_file(tmp_path / "run" / "realigned" / "model.safetensors")
    assert "model.layers.0.self_attn.q_proj.weight" in exported and not any("lora" in k for k in exported)
