"""Hub model IDs resolved offline through a real huggingface_hub cache layout built from the tiny models."""

from __future__ import annotations

import hashlib
import http.server
import os
import shutil
import threading
from pathlib import Path
from typing import ClassVar

import huggingface_hub.constants
import pytest
import torch
from conftest import run_cli

from lssf_lightning.config import SubspaceConfig
from lssf_lightning.io.hub import is_hub_id, parse_hub_id, resolve_model
from lssf_lightning.methods import LSSF, apply_edits
from lssf_lightning.subspace import SafetySubspace

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


def add_to_cache(
    cache: Path, repo_id: str, source: Path | dict, *, commit=COMMIT, refs=("main",), blobs=True
) -> Path:
    """``models--org--name/{blobs,refs,snapshots/<commit>}`` as ``hf download`` leaves it (symlinks into
    blobs)."""
    folder = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    files = {p.name: p.read_bytes() for p in Path(source).iterdir()} if isinstance(source, Path) else source
    for name, data in files.items():
        if blobs:
            blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
            blob.parent.mkdir(exist_ok=True)
            blob.write_bytes(data)
            (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
        else:
            (snapshot / name).write_bytes(data)
    (folder / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (folder / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture()
def hub(tmp_path, monkeypatch, llama_trio):
    """An offline cache holding org/base, org/aligned, org/finetuned (the tiny Llama trio)."""
    cache = tmp_path / "hub"
    for name in ("base", "aligned", "finetuned"):
        add_to_cache(cache, f"org/{name}", getattr(llama_trio, name), blobs=name != "finetuned")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    return cache


def test_parse_and_shape_rules(tmp_path):
    assert parse_hub_id("org/name") == ("org/name", None)
    assert parse_hub_id("org/name@v1.0") == ("org/name", "v1.0")
    assert is_hub_id("org/name") and is_hub_id("org/name@main")
    assert not is_hub_id("./org/name") and not is_hub_id("/abs/dir") and not is_hub_id("plain-dir")
    assert not is_hub_id(tmp_path / "org" / "name")  # a Path is always a path
    for bad in ("org/name@", "org/name@a b", "org/na me", "a/b/c@main", "org/name--x", "-org/name"):
        with pytest.raises(ValueError, match="not a valid hub model ID"):
            resolve_model(bad)


def test_resolves_branch_tag_and_commit(hub):
    snapshot = hub / "models--org--aligned" / "snapshots" / COMMIT
    assert resolve_model("org/aligned") == snapshot
    assert resolve_model(f"org/aligned@{COMMIT}") == snapshot
    add_to_cache(
        hub,
        "org/tagged",
        {"config.json": b"{}", "model.safetensors": b"x"},
        commit=OTHER_COMMIT,
        refs=("v1",),
    )
    assert resolve_model("org/tagged@v1") == hub / "models--org--tagged" / "snapshots" / OTHER_COMMIT


def test_existing_local_path_wins(hub, llama_trio):
    local = Path("org/aligned")
    local.parent.mkdir()
    shutil.copytree(llama_trio.base, local)  # same name as the cached repo, different weights
    assert resolve_model("org/aligned") == local
    assert not is_hub_id("org/aligned")


def test_from_weights_with_hub_ids_equals_local_paths(hub, llama_trio):
    from_hub = SafetySubspace.from_weights(
        "org/aligned", "org/base", progress=False, config=SubspaceConfig(eta=0.9)
    )
    local = SafetySubspace.from_weights(
        llama_trio.aligned, llama_trio.base, progress=False, config=SubspaceConfig(eta=0.9)
    )
    assert from_hub.keys() == local.keys() and len(local) > 0
    for key in local.entries:
        assert torch.equal(from_hub.entries[key].left, local.entries[key].left)
        assert torch.equal(from_hub.entries[key].right, local.entries[key].right)
    assert from_hub.metadata["fingerprint"] == local.metadata["fingerprint"]


def test_error_offline_not_cached(hub):
    with pytest.raises(
        FileNotFoundError,
        match=r"unaligned org/missing: no such local path, and not in the "
        r"Hugging Face cache .* HF_HUB_OFFLINE=1; download it first, e\.g\. `hf download org/missing`",
    ):
        SafetySubspace.from_weights("org/aligned", "org/missing", progress=False)
    with pytest.raises(FileNotFoundError, match="`hf download org/aligned --revision v9`"):
        resolve_model("org/aligned@v9")


def test_error_only_pickled_weights(hub):
    add_to_cache(hub, "org/pickled", {"config.json": b"{}", "pytorch_model.bin": b"not unpickled"})
    with pytest.raises(
        ValueError,
        match=r"aligned org/pickled has only pickled weights \(pytorch_model\.bin\); "
        "lssf_lightning reads safetensors only",
    ):
        SafetySubspace.from_weights("org/pickled", "org/base", progress=False)
    # A tokenizer lookup does not need weights.
    assert resolve_model("org/pickled", weights=False).name == COMMIT


class _StubHub(http.server.BaseHTTPRequestHandler):
    """Answers every request as the hub answers a gated repo / a missing repo (by the path's repo name)."""

    authorizations: ClassVar[list] = []  # the Authorization header of each request

    def _answer(self):
        self.authorizations.append(self.headers.get("authorization"))
        code, error = (403, "GatedRepo") if "/gated" in self.path else (404, "RepoNotFound")
        self.send_response(code)
        self.send_header("X-Error-Code", error)
        self.send_header("X-Error-Message", "stub")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD = _answer

    def log_message(self, *args):
        pass


@pytest.fixture()
def stub_hub(hub, monkeypatch, tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _StubHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    yield
    server.shutdown()


def test_error_gated_repo_with_and_without_token(stub_hub, monkeypatch):
    with pytest.raises(
        PermissionError,
        match=r"aligned org/gated: gated repo and no token is set; accept its "
        r"conditions at https://huggingface.co/org/gated and set HF_TOKEN",
    ):
        resolve_model("org/gated", what="aligned")
    assert _StubHub.authorizations[-1] is None
    monkeypatch.setenv(
        "HF_TOKEN", "hf_not_granted"
    )  # the usual token variable, read when the request is made
    with pytest.raises(PermissionError, match="gated repo and your token has not been granted access"):
        resolve_model("org/gated", what="aligned")
    assert _StubHub.authorizations[-1] == "Bearer hf_not_granted"


def test_error_no_such_repo_online(stub_hub):
    with pytest.raises(FileNotFoundError, match="org/nothing: no such model on the hub"):
        resolve_model("org/nothing")
    assert (
        resolve_model("org/base").name == COMMIT
    )  # a cached repo still resolves (the cache is the fallback)


def test_cli_subspace_with_hub_ids(hub, tmp_path, llama_trio, capsys):
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub)}
    code, _, err = run_cli(
        "subspace",
        "--aligned",
        "org/aligned",
        "--unaligned",
        f"org/base@{COMMIT}",
        "--output",
        tmp_path / "s.safetensors",
        env=env,
    )
    assert code == 0, err
    built = SafetySubspace.load(tmp_path / "s.safetensors")
    local = SafetySubspace.from_weights(llama_trio.aligned, llama_trio.base, progress=False)
    assert built.ranks == local.ranks  # (another thread count in the subprocess: equal up to rounding)
    assert all(
        torch.allclose(built.entries[k].correction(), local.entries[k].correction(), atol=1e-6)
        for k in local.entries
    )
    from lssf_lightning.cli import main  # the error case in-process (the hub fixture set the cache, offline)

    capsys.readouterr()
    assert (
        main(
            [
                "subspace",
                "--aligned",
                "org/aligned",
                "--unaligned",
                "org/missing",
                "--output",
                str(tmp_path / "t.safetensors"),
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("lssf-lightning subspace: error: unaligned org/missing: no such local path")
    assert last.endswith("download it first, e.g. `hf download org/missing`")
    assert not (tmp_path / "t.safetensors").exists()


def test_lightning_callback_and_module_with_hub_ids(hub, tmp_path, llama_trio):
    from lightning.pytorch import Trainer

    from lssf_lightning.lightning.callback import LSSFCallback
    from lssf_lightning.lightning.data import ChatDataModule, write_chat_jsonl
    from lssf_lightning.lightning.module import CausalLMModule

    rows = [{"prompt": "how do i bake bread at home ?", "response": "sure , here is a simple answer ."}] * 4
    data = ChatDataModule(str(write_chat_jsonl(tmp_path / "train.jsonl", rows)), batch_size=2, shuffle=False)
    module = CausalLMModule("org/aligned", learning_rate=1e-2)  # model and tokenizer from the cache
    assert module.tokenizer is not None
    callback = LSSFCallback(
        unaligned="org/base",
        apply_on="train_end",
        export_dir=str(tmp_path / "export"),
        monitor=False,
        verbose=False,
    )
    Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[callback],
        enable_model_summary=False,
    ).fit(module, data)
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export").state_dict()
    expected = apply_edits(
        {k: v.detach() for k, v in module.model.state_dict().items()},
        LSSF(SafetySubspace.from_weights(llama_trio.aligned, llama_trio.base, progress=False), 1.0),
    )
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(expected[q], module.model.state_dict()[q])  # the correction is not empty
    for key, value in expected.items():
        torch.testing.assert_close(exported[key], value, rtol=1e-5, atol=1e-6)


def test_callback_tokenizer_lookup_with_hub_ids(hub, tiny_tokenizer):
    from lightning.pytorch import LightningModule

    from lssf_lightning.lightning.hf import find_tokenizer

    bare = LightningModule()  # no `tokenizer` attribute: the unaligned model's tokenizer is used
    text = "how do i bake bread at home ?"
    for tokenizer in (find_tokenizer(bare, None, "org/base"), find_tokenizer(bare, "org/aligned@main")):
        assert tokenizer(text)["input_ids"] == tiny_tokenizer(text)["input_ids"]
    with pytest.raises(FileNotFoundError, match="tokenizer org/none: no such local path"):
        find_tokenizer(bare, "org/none")


def test_realign_with_hub_ids_and_an_adapter_whose_base_is_a_hub_id(hub, tmp_path, llama_trio):
    import json

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lssf_lightning.realign import realign_checkpoint

    def weights(directory):
        return AutoModelForCausalLM.from_pretrained(directory).state_dict()

    from lssf_lightning.cli import main

    # In-process: the subprocess test above covers the environment variables.
    assert (
        main(
            [
                "realign",
                "--finetuned",
                "org/finetuned",
                "--aligned",
                "org/aligned",
                "--unaligned",
                "org/base",
                "--output",
                str(tmp_path / "cli"),
            ]
        )
        == 0
    )
    subspace = SafetySubspace.from_weights(llama_trio.aligned, llama_trio.base, progress=False)
    realign_checkpoint(llama_trio.finetuned, tmp_path / "local", subspace=subspace, progress=False)
    expected = weights(tmp_path / "local")
    for key, value in weights(tmp_path / "cli").items():
        torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-6)
    assert (tmp_path / "cli" / "tokenizer.json").is_file()  # support files from the snapshot

    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(llama_trio.aligned), LoraConfig(r=2, target_modules=["q_proj"])
    )
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.fill_(0.01)
    peft_model.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "adapter" / "adapter_config.json").write_text(
        json.dumps({**config, "base_model_name_or_path": "org/aligned"})
    )
    realign_checkpoint(tmp_path / "adapter", tmp_path / "from_hub_base", subspace=subspace, progress=False)
    realign_checkpoint(
        tmp_path / "adapter",
        tmp_path / "from_local_base",
        aligned=llama_trio.aligned,
        subspace=subspace,
        progress=False,
    )
    local = weights(tmp_path / "from_local_base")
    for key, value in weights(tmp_path / "from_hub_base").items():
        assert torch.equal(value, local[key]), key
