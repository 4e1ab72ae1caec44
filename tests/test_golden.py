"""Byte-identical results across the issue-8 restructuring (old vs new code on the same inputs).

:func:`golden_digests` builds the fixed-seed tiny trios of ``conftest.py`` and hashes every tensor the core
produces: subspace factors and a saved subspace file's bytes, fingerprints, LSSF fusion results
(module and state dict) and the realign output (tensors, shard file bytes, index) for LSSF (streamed and
precomputed), RESTA with DARE and SafeLoRA. The calls have since moved to the config objects and the LSSF
planner (``apply_edits``); the computation, and so every digest, is the same.

The values in :data:`EXPECTED` were recorded by running this file on the pre-session code
(``PYTHONPATH=/tmp/lssf_orig python tests/test_golden.py`` from a scratch directory, one thread, torch 2.13
CPU); the test asserts the current code reproduces them bit for bit. Another CPU or BLAS may round float32
differently (old and new code alike): there the test is skipped, decided by :func:`platform_canary`.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _tiny import build_tiny_llama, build_tiny_tokenizer
from conftest import make_trio

from lssf_lightning.config import SubspaceConfig
from lssf_lightning.methods import LSSF, apply_edits


def _tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach().contiguous().cpu()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]


def _subspace_digest(subspace) -> str:
    tensors = {}
    for key, entry in subspace.entries.items():
        tensors.update(
            {f"{key}:left": entry.left, f"{key}:right": entry.right, f"{key}:sigma": entry.singular_values}
        )
    return _tensor_digest(tensors)


def _directory_digest(path: Path) -> dict[str, str]:
    from safetensors.torch import load_file

    tensors, files = {}, hashlib.sha256()
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
        files.update(file.name.encode() + file.read_bytes())
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files.update(index.read_bytes())
    return {"tensors": _tensor_digest(tensors), "files": files.hexdigest()[:32]}


def _without_integrity(path: Path) -> bytes:
    """The bytes of the subspace file ``path`` without its ``lssf_integrity`` and ``lssf_inputs`` records
    (added after the restructuring; the rest of the file, the ``"lssf"`` metadata and the factors, must be
    byte-identical)."""
    raw = path.read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + length])
    added = [k for k in ("lssf_integrity", "lssf_inputs") if k in header.get("__metadata__", {})]
    if not added:
        return raw
    for key in added:
        del header["__metadata__"][key]
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + raw[8 + length:]


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def platform_canary() -> str:
    """A digest of this platform's float32 rounding in the operations the core uses (matmul, QR, SVD)."""
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(96, 64, generator=generator)
    b = torch.randn(64, 80, generator=generator)
    q, r = torch.linalg.qr(a @ b)
    u, s, _ = torch.linalg.svd(a @ b, full_matrices=False)
    return _tensor_digest(
        {"mm": a @ b, "q": q, "r": r, "u": u.abs(), "s": s, "eigh": torch.linalg.eigvalsh(a.T @ a)}
    )


def golden_digests(root: Path) -> dict[str, object]:
    """Every digest the golden test compares (see the module docstring)."""
    import peft
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    from lssf_lightning.realign import realign_checkpoint
    from lssf_lightning.subspace import SafetySubspace

    torch.set_num_threads(1)
    tokenizer = build_tiny_tokenizer()
    llama = make_trio(root / "llama", build_tiny_llama(tokenizer), tokenizer)
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    gpt2 = make_trio(root / "gpt2", GPT2LMHeadModel(config))
    out: dict[str, object] = {"platform": platform_canary()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the partial-match and calibration warnings
        s_llama = SafetySubspace.from_weights(llama.aligned, llama.base, progress=False)
        s_gpt2 = SafetySubspace.from_weights(
            gpt2.aligned, gpt2.base, progress=False, config=SubspaceConfig(eta=0.8, alpha_1=2.0, max_rank=3)
        )
        s_qv = SafetySubspace.from_weights(
            llama.models["aligned"],
            llama.models["base"],
            progress=False,
            config=SubspaceConfig(eta=0.7, target_modules=["q_proj", "v_proj"]),
        )
        pairs = [
            ("how do i bake bread at home ?", "i cannot help with that request ."),
            ("tell me a fun fact about space .", "sure , here is a simple answer ."),
        ]
        s_act = SafetySubspace.from_weights(
            llama.models["aligned"],
            llama.models["base"],
            tokenizer=tokenizer,
            progress=False,
            config=SubspaceConfig(source="activations", calibration=pairs, eta=0.8),
        )
        out["fingerprint_gpt2"] = SafetySubspace.fingerprint(
            gpt2.aligned, gpt2.base, config=SubspaceConfig(eta=0.8, alpha_1=2.0, max_rank=3)
        )
        out["fingerprint_qv"] = SafetySubspace.fingerprint(
            llama.aligned, llama.base, config=SubspaceConfig(eta=0.7, target_modules=["q_proj", "v_proj"])
        )
    for name, subspace in (("llama", s_llama), ("gpt2", s_gpt2), ("qv", s_qv), ("act", s_act)):
        out[f"subspace_{name}"] = _subspace_digest(subspace)
        out[f"fingerprint_{name}_metadata"] = subspace.metadata["fingerprint"]
        out[f"ranks_{name}"] = sum(subspace.ranks.values())
    out["fuse_llama_mapping"] = _tensor_digest(
        apply_edits(_state(llama.models["finetuned"]), LSSF(s_llama, 1.3))
    )
    out["fuse_llama_module"] = _tensor_digest(
        _state(apply_edits(llama.models["finetuned"], LSSF(s_llama, 1.3)))
    )
    out["fuse_gpt2_module"] = _tensor_digest(_state(apply_edits(gpt2.models["finetuned"], LSSF(s_gpt2, 0.6))))
    out["fuse_llama_bf16"] = _tensor_digest(
        apply_edits(
            {k: v.to(torch.bfloat16) for k, v in _state(llama.models["finetuned"]).items()},
            LSSF(s_llama, 1.0),
        )
    )
    s_gpt2.save(root / "gpt2.safetensors")
    here = os.getcwd()
    try:  # relative paths: the metadata records them, so the file's bytes do not depend on ``root``
        os.chdir(root)
        SafetySubspace.from_weights("llama/aligned", "llama/base", progress=False).save("llama.safetensors")
        file_bytes = _without_integrity(Path("llama.safetensors"))
        out["subspace_file_llama"] = hashlib.sha256(file_bytes).hexdigest()[:32]
    finally:
        os.chdir(here)
    runs = {
        "lssf_llama": {
            "finetuned": llama.finetuned,
            "aligned": llama.aligned,
            "unaligned": llama.base,
            "config": SubspaceConfig(eta=0.8),
            "alpha": 1.5,
            "max_shard_bytes": 60_000,
        },
        "lssf_gpt2_precomputed": {
            "finetuned": gpt2.finetuned,
            "subspace": root / "gpt2.safetensors",
            "alpha": 0.6,
        },
        "resta_llama": {
            "finetuned": llama.finetuned,
            "aligned": llama.aligned,
            "unaligned": llama.base,
            "method": "resta",
            "beta": 0.7,
            "drop_rate": 0.3,
            "seed": 5,
        },
    }
    lora = peft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(llama.aligned),
        peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
        ),
    )
    lora.save_pretrained(root / "lora")
    runs["safelora_llama"] = {
        "finetuned": root / "lora",
        "aligned": llama.aligned,
        "unaligned": llama.base,
        "method": "safelora",
        "threshold": 0.99,
    }
    runs["lssf_lora"] = {
        "finetuned": root / "lora",
        "aligned": llama.aligned,
        "unaligned": llama.base,
        "alpha": 0.5,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, kwargs in runs.items():
            finetuned = kwargs.pop("finetuned")
            report = realign_checkpoint(finetuned, root / name, progress=False, **kwargs)
            out[f"realign_{name}"] = {**_directory_digest(root / name), "edited": report.edited}
    return out


# Recorded from the pre-session code (see the module docstring), on a platform whose canary is PLATFORM.
PLATFORM = "e0cf92cca1b9944c00b50e1996a4c408"
EXPECTED: dict[str, object] = {
    "fingerprint_act_metadata": "9427656900fe39d89897b4886559590f",
    "fingerprint_gpt2": "dcfcef30c00136ea2544486b33a6c147",
    "fingerprint_gpt2_metadata": "dcfcef30c00136ea2544486b33a6c147",
    "fingerprint_llama_metadata": "9c3ffbaf7f1dcaf407aa9e28eefbb127",
    "fingerprint_qv": "fca060b028d96c78eaa54ccb3e1d6ef2",
    "fingerprint_qv_metadata": "fca060b028d96c78eaa54ccb3e1d6ef2",
    "fuse_gpt2_module": "f85befc791db7fe51ada33ba5e282a25",
    "fuse_llama_bf16": "1332c85e3df4a4b078d5656263629ea6",
    "fuse_llama_mapping": "3fc4a882e6d29dc2760acf07f25d62f3",
    "fuse_llama_module": "3fc4a882e6d29dc2760acf07f25d62f3",
    "ranks_act": 44,
    "ranks_gpt2": 24,
    "ranks_llama": 66,
    "ranks_qv": 12,
    "realign_lssf_gpt2_precomputed": {
        "edited": 8,
        "files": "0321d9c4dd6cb9ec004b8704d8794fee",
        "tensors": "a02412aa5a5135e0593533597da859f9",
    },
    "realign_lssf_llama": {
        "edited": 14,
        "files": "cefe0d3826d3753c9dbd98f090d6813c",
        "tensors": "61e1f2b8fda7a426b1710232e958f097",
    },
    "realign_lssf_lora": {
        "edited": 14,
        "files": "73190b5596f29e353995ca634bb499c1",
        "tensors": "2dde1b9d29d50ab376486d43888741e0",
    },
    "realign_resta_llama": {
        "edited": 14,
        "files": "96a67bc51de6542c12a82f268b190663",
        "tensors": "cbf11508593b250c43bc6723820a0fbf",
    },
    "realign_safelora_llama": {
        "edited": 6,
        "files": "f5e99e8d99fa89394982488603f2d486",
        "tensors": "19bf0c641921f1ebe72f268b339a734e",
    },
    "subspace_act": "b205c2dde9ff485c80b027a71fee34db",
    "subspace_file_llama": "308644f9df2e43e7e3cd91bc82da7215",
    "subspace_gpt2": "c4327b6aa87d2da450be04fdcb8b12e9",
    "subspace_llama": "ae7d5c82a2a5a42e53e60742cebdbd92",
    "subspace_qv": "14ac84b733d6614f7542a8ec7c1f1299",
}


def test_core_outputs_are_bit_identical_to_the_pre_restructuring_code(tmp_path):
    if platform_canary() != PLATFORM:
        pytest.skip("the digests were recorded on a CPU/BLAS that rounds float32 differently from this one")
    got = golden_digests(tmp_path)
    assert {k: got[k] for k in EXPECTED} == EXPECTED


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as scratch:
        print(json.dumps(golden_digests(Path(scratch)), indent=1, sort_keys=True))
