"""Shared fixtures: tiny real checkpoints (Llama and GPT-2) written with ``save_pretrained``; and the small
helpers several test files use (``from conftest import run_cli, load_dir, tree_hashes, state``)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from _tiny import build_tiny_llama, build_tiny_tokenizer
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tiny models: one thread is faster than two, and avoids OpenMP spin-waits when cores are shared.
torch.set_num_threads(1)


@dataclass
class Trio:
    """Unaligned base, aligned and fine-tuned checkpoints of one architecture, on disk and in memory."""

    base: Path
    aligned: Path
    finetuned: Path
    models: dict


def _perturb(model, scale: float, rank: int | None, seed: int, blocks_only: bool = True) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim != 2 or (blocks_only and ".layers." not in name and ".h." not in name):
                continue
            if rank is None:
                param.add_(scale * torch.randn(param.shape, generator=generator))
            else:
                left = torch.randn(param.shape[0], rank, generator=generator)
                right = torch.randn(rank, param.shape[1], generator=generator)
                decay = torch.tensor([0.6**i for i in range(rank)])
                noise = 0.05 * torch.randn(param.shape, generator=generator)
                param.add_(scale * ((left * decay) @ right / rank**0.5 + noise))


def make_trio(root: Path, base, tokenizer=None) -> Trio:
    """Save base, aligned (= base + a decaying low-rank δ plus noise) and fine-tuned (= aligned + noise)."""
    aligned = type(base)(base.config)
    aligned.load_state_dict(base.state_dict())
    _perturb(aligned, 0.02, rank=6, seed=1)
    finetuned = type(base)(base.config)
    finetuned.load_state_dict(aligned.state_dict())
    _perturb(finetuned, 0.002, rank=None, seed=2, blocks_only=False)
    paths = {}
    for name, model in (("base", base), ("aligned", aligned), ("finetuned", finetuned)):
        paths[name] = root / name
        model.save_pretrained(paths[name])
        if tokenizer is not None:
            tokenizer.save_pretrained(paths[name])
    models = {"base": base.eval(), "aligned": aligned.eval(), "finetuned": finetuned.eval()}
    return Trio(paths["base"], paths["aligned"], paths["finetuned"], models)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def llama_trio(tmp_path_factory, tiny_tokenizer) -> Trio:
    return make_trio(tmp_path_factory.mktemp("llama"), build_tiny_llama(tiny_tokenizer), tiny_tokenizer)


@pytest.fixture(scope="session")
def gpt2_trio(tmp_path_factory) -> Trio:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return make_trio(tmp_path_factory.mktemp("gpt2"), GPT2LMHeadModel(config))


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def run_cli(*args, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """The command line in a subprocess (``python -m lssf_lightning.cli``): exit code, stdout, stderr.
    ``env`` adds to (or overrides) this process's environment."""
    done = subprocess.run(
        [sys.executable, "-m", "lssf_lightning.cli", *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
        env=None if env is None else {**os.environ, **env},
    )
    return done.returncode, done.stdout, done.stderr


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the ``*.safetensors`` files in a directory (a sharded checkpoint, merged)."""
    tensors = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def tree_hashes(*roots: Path) -> dict[str, str]:
    """sha256 of every file under ``roots`` (a root may be a single file): the bytes the user owns."""
    out = {}
    for root in map(Path, roots):
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for file in files:
            out[str(file)] = hashlib.sha256(file.read_bytes()).hexdigest()
    return out
