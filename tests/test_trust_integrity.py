"""Integrity and silent wrong results: the subspace cache's history, the factors' integrity hash, fingerprints
checked against the models they are used with, bounded hub calls, hub snapshot links, LoRA
``modules_to_save``, sweep without pickles, a malformed ``lssf_state.json``, over-long prompts."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from test_callback import ROWS, EpochEndWeights, StartSnapshot, checkpoint_as_x, fit, lssf
from test_hub import hub  # noqa: F401  (the offline hub cache fixture)

from lssf_lightning import training
from lssf_lightning.config import SubspaceConfig
from lssf_lightning.io.schema import FormatError
from lssf_lightning.lightning.data import write_chat_jsonl
from lssf_lightning.subspace import SafetySubspace


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    rows = [{"prompt": p, "response": r} for p, r in ROWS]
    return write_chat_jsonl(root / "train.jsonl", rows), write_chat_jsonl(root / "val.jsonl", rows[:4])


# -- 1. the subspace cache keeps every subspace it built -----------------------------------------------------
def test_a_resume_after_two_settings_changes_finds_its_subspace_in_the_cache(llama_trio, chat, tmp_path,
                                                                            monkeypatch):
    cache = tmp_path / "cache.safetensors"
    raw_at = EpochEndWeights()
    fit(llama_trio, chat, [lssf(llama_trio, subspace_cache=str(cache)), raw_at,
                                 checkpoint_as_x(tmp_path / "a")], max_epochs=1)
    fingerprint_a = SafetySubspace.load(cache).metadata["fingerprint"]
    with monkeypatch.context() as patch:
        patch.setattr(training, "CACHE_KEEP", 2)
        for eta in (0.5, 0.7):  # settings B, then C: the cache keeps A next to them
            fit(llama_trio, chat, [lssf(llama_trio, subspace_cache=str(cache),
                                              subspace=SubspaceConfig(eta=eta))], max_epochs=1)
    # the cap of 2: the run's own (C) and the newest earlier one (B); A, the oldest, was removed
    kept = sorted(tmp_path.glob("cache.fp-*.safetensors"))
    assert len(kept) == 1 and SafetySubspace.load(kept[0]).metadata["eta"] == 0.5
    assert SafetySubspace.load(cache).metadata["eta"] == 0.7
    # without the cap, A survives two changes
    cache.unlink()
    for p in tmp_path.glob("cache.fp-*"):
        p.unlink()
    fit(llama_trio, chat, [lssf(llama_trio, subspace_cache=str(cache))], max_epochs=1)
    for eta in (0.5, 0.7):
        fit(llama_trio, chat, [lssf(llama_trio, subspace_cache=str(cache),
                                          subspace=SubspaceConfig(eta=eta))], max_epochs=1)
    assert len(list(tmp_path.glob("cache*.safetensors"))) == 3
    assert training.cache_history_path(cache, fingerprint_a).is_file()

    def no_build(*args, **kwargs):
        raise AssertionError("the subspace should have come from the cache")

    monkeypatch.setattr(SafetySubspace, "from_weights", no_build)
    for settings in ({}, {"subspace": SubspaceConfig(eta=0.7)}):  # resume with A's settings, and with C's
        probe = StartSnapshot()
        callback = lssf(llama_trio, subspace_cache=str(cache), **settings)
        fit(llama_trio, chat, [callback, probe], max_epochs=2, ckpt_path=tmp_path / "a" / "x.ckpt")
        # A's correction came off exactly: the raw weights of A's first epoch
        assert all(torch.equal(probe.weights[k], v) for k, v in raw_at.seen[0].items())


# -- 2. the factors carry an integrity hash checked on load --------------------------------------------------
def _split(path):
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def _join(header, body):
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body


@pytest.fixture(scope="module")
def gpt2_subspace(gpt2_trio, tmp_path_factory):
    path = tmp_path_factory.mktemp("integrity") / "safety.safetensors"
    SafetySubspace.from_weights(gpt2_trio.aligned, gpt2_trio.base, progress=False).save(path)
    return path


def _loaders(path):
    from lssf_lightning.io.lazy_factors import LazyFactors

    def lazy():
        factors = LazyFactors(path)
        return [factors[key] for key in factors]

    return [lambda: SafetySubspace.load(path), lazy]


def test_a_flipped_conv1d_flag_is_refused_naming_the_file_and_the_entry(gpt2_subspace, tmp_path):
    header, body = _split(gpt2_subspace)
    lssf = json.loads(header["__metadata__"]["lssf"])
    key = next(k for k in lssf["entries"] if lssf["entries"][k]["conv1d"])
    lssf["entries"][key]["conv1d"] = False
    header["__metadata__"]["lssf"] = json.dumps(lssf)
    bad = tmp_path / "flag.safetensors"
    bad.write_bytes(_join(header, body))
    for load in _loaders(bad):
        with pytest.raises(FormatError, match=rf"{bad}.*entry '{key}' does not match its integrity hash"
                                              r".*'conv1d'") as caught:
            load()
        assert "\n" not in str(caught.value)


def test_an_edited_factor_value_is_refused_naming_the_file_and_the_entry(gpt2_subspace, tmp_path):
    from lssf_lightning.core.factors import ShardRegion
    from lssf_lightning.io.lazy_factors import LazyFactors

    header, body = _split(gpt2_subspace)
    name = next(k for k in header if k.endswith(":right"))
    start = header[name]["data_offsets"][0]
    value = struct.unpack("<f", body[start:start + 4])[0]
    body = body[:start] + struct.pack("<f", value * 1.01 + 1e-3) + body[start + 4:]
    bad = tmp_path / "value.safetensors"
    bad.write_bytes(_join(header, body))
    key = name.removesuffix(":right")
    for load in _loaders(bad):
        with pytest.raises(FormatError, match=rf"{bad}.*entry '{key}': the factors' bytes do not match"):
            load()
    factors = LazyFactors(bad)  # a shard's block is checked too (the whole entry, once)
    rows, cols = factors.shape(key)
    region = ShardRegion((rows, cols), (0, 0), (rows // 2, cols))
    with pytest.raises(FormatError, match=rf"entry '{key}': the factors' bytes"):
        factors.restrict(key, region)
    assert LazyFactors(gpt2_subspace).restrict(key, region).left.shape[0] > 0
    # the original loads, and a file without the record (as written by 0.1) loads too, same fingerprint
    original = SafetySubspace.load(gpt2_subspace)
    header, body = _split(gpt2_subspace)
    del header["__metadata__"]["lssf_integrity"]
    old = tmp_path / "old.safetensors"
    old.write_bytes(_join(header, body))
    assert SafetySubspace.load(old).metadata["fingerprint"] == original.metadata["fingerprint"]


def test_edited_metadata_or_input_digests_are_refused(gpt2_subspace, tmp_path):
    for edit in ("eta", "inputs"):
        header, body = _split(gpt2_subspace)
        if edit == "eta":
            lssf = json.loads(header["__metadata__"]["lssf"])
            lssf["metadata"]["eta"] = 0.5
            header["__metadata__"]["lssf"] = json.dumps(lssf)
        else:
            inputs = json.loads(header["__metadata__"]["lssf_inputs"])
            name = next(iter(inputs["unaligned"]))
            digest = inputs["unaligned"][name]
            inputs["unaligned"][name] = digest[:-1] + ("1" if digest[-1] != "1" else "2")
            header["__metadata__"]["lssf_inputs"] = json.dumps(inputs)
        bad = tmp_path / f"{edit}.safetensors"
        bad.write_bytes(_join(header, body))
        with pytest.raises(FormatError, match=rf"{bad}: the subspace's metadata does not match its "):
            SafetySubspace.load(bad)


def test_any_metadata_a_user_gives_reads_back_through_the_integrity_check(gpt2_subspace, tmp_path):
    subspace = SafetySubspace.load(gpt2_subspace)
    for extra in ({"input_digests": {}}, {"input_digests": "mine", "notes": ("a", 1)}, {}):
        metadata = {k: v for k, v in subspace.metadata.items() if k != "input_digests"} | extra
        path = SafetySubspace(subspace.entries, metadata).save(tmp_path / "m.safetensors", overwrite=True)
        assert SafetySubspace.load(path).metadata.get("notes") == (["a", 1] if extra.get("notes") else None)


# -- 3. the subspace's fingerprint is compared with the models it is used with ----------------------------
def test_a_subspace_used_with_a_model_it_was_not_built_from_is_refused(llama_trio, tmp_path):
    subspace = tmp_path / "s.safetensors"
    SafetySubspace.from_weights(llama_trio.aligned, llama_trio.base, progress=False).save(subspace)
    fingerprint = SafetySubspace.load(subspace).metadata["fingerprint"][:12]
    other = llama_trio.finetuned  # same architecture and shapes, other weights
    cases = [("lssf-reset", "--unaligned", "unaligned"), ("lssf-two-sided", "--aligned", "aligned")]
    for method, flag, side in cases:
        output = tmp_path / f"out-{method}"
        code, _, err = run_cli("realign", "--finetuned", llama_trio.finetuned, "--method", method,
                               "--subspace", subspace, flag, other, "--output", output)
        assert code != 0 and not output.exists(), err
        line = err.strip().splitlines()[-1]
        assert f"fingerprint {fingerprint}" in line and str(other) in line and f"{side} model" in line, err
        assert f"the safety subspace {subspace} " in line, err
        # the models it was built from: accepted
        right = llama_trio.base if side == "unaligned" else llama_trio.aligned
        code, _, err = run_cli("realign", "--finetuned", llama_trio.finetuned, "--method", method,
                               "--subspace", subspace, flag, right, "--output", output)
        assert code == 0 and output.is_dir(), err


# -- 8. a malformed lssf_state.json ---------------------------------------------------------------------
@pytest.mark.parametrize(("text", "expected"), [
    ('{"alpha": "x"}', "field 'alpha' must be a number"),
    ('{"auto_target": 0.1}', "field 'alpha' is missing"),
    ('[1, 2]', "the top level must be a JSON object"),
    ('{"alpha": 1.0, "alpha_curve": [{"alpha": 1.0}]}', r"alpha_curve\[0\]: field 'refusal' is missing"),
    ('{"alpha": 1.0, "alpha_curve": 3}', "field 'alpha_curve' must be a list"),
    ('{"alpha": 1.0, "auto_target": 7}', "field 'auto_target' must be a rate"),
    ('{"alpha": 1.0', "invalid JSON"),
])
def test_a_malformed_lssf_state_file_is_one_line_naming_the_file_and_field(tmp_path, text, expected):
    from lssf_lightning.integrations.hf_trainer import AUTO_STATE_FILE, LSSFTrainerCallback

    path = tmp_path / AUTO_STATE_FILE
    path.write_text(text)
    callback = LSSFTrainerCallback(unaligned=str(tmp_path), alpha="auto")
    with pytest.raises(FormatError, match=expected) as caught:
        callback._load_state(path)
    assert str(caught.value).startswith(str(path)) and "\n" not in str(caught.value)
    path.write_text('{"alpha": 0.5, "auto_target": 0.25, "alpha_curve": [{"alpha": 0.5, "refusal": 0.3}]}')
    callback._load_state(path)
    assert (callback.fusion.target, callback.auto_target) == (0.5, 0.25)


# -- 9. over-long prompts are truncated to the model's positions ---------------------------------------------
def test_an_over_long_prompt_is_cut_to_the_positions_a_gpt2_has():
    from _tiny import build_tiny_tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel

    from lssf_lightning.metrics.generation import generate_responses

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=1, n_head=2,
                                       n_positions=24, bos_token_id=0, eos_token_id=0))
    long = "tell me a fun fact about space . " * 20  # far more than 24 tokens
    with pytest.warns(UserWarning, match=r"1 prompt\(s\) are longer than the 20 tokens .* 24 positions"):
        answers = generate_responses(model, tokenizer, [long, "hello ."], max_new_tokens=4)
    assert len(answers) == 2
    with pytest.raises(ValueError, match="max_new_tokens=24 leaves no room for a prompt"):
        generate_responses(model, tokenizer, ["hello ."], max_new_tokens=24)


# -- 7. sweep does not unpickle ------------------------------------------------------------------------------
def test_sweep_refuses_a_pickled_model_without_unpickling_it(llama_trio, tmp_path, monkeypatch, capsys):
    import shutil

    from lssf_lightning.cli import main

    pickled = tmp_path / "pickled"  # the layout transformers reads: config.json and pytorch_model.bin
    pickled.mkdir()
    shutil.copy(llama_trio.finetuned / "config.json", pickled)
    torch.save(llama_trio.models["finetuned"].state_dict(), pickled / "pytorch_model.bin")

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    for finetuned, aligned in ((pickled, llama_trio.aligned), (llama_trio.finetuned, pickled)):
        output = tmp_path / "sweep"
        code = main(["sweep", "--finetuned", str(finetuned), "--aligned", str(aligned), "--unaligned",
                     str(llama_trio.base), "--output", str(output), "--lssf", "1", "--max-new-tokens", "1"])
        err = capsys.readouterr().err
        assert code == 1 and "pickled checkpoints are not loaded" in err and str(pickled) in err, err
        assert not (output / "sweep.json").exists()


# -- 4. hub calls are bounded; 5. snapshot links must point into blobs/ --------------------------------------
def _cache() -> Path:
    """The offline hub cache the ``hub`` fixture of ``test_hub.py`` laid out (and pointed the library at)."""
    import huggingface_hub.constants

    return Path(huggingface_hub.constants.HF_HUB_CACHE)


@pytest.fixture()
def silent_hub(request, monkeypatch, tmp_path):
    """A hub endpoint that accepts connections and never answers (a proxy that swallows requests)."""
    import socket

    import huggingface_hub.constants

    request.getfixturevalue("hub")

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    endpoint = f"http://127.0.0.1:{server.getsockname()[1]}"
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_ETAG_TIMEOUT", 2)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    yield endpoint
    server.close()


def test_a_hub_that_never_answers_falls_back_to_the_cache_within_the_timeout(silent_hub, tmp_path):
    import time

    from test_hub import COMMIT

    from lssf_lightning.io.hub import resolve_model

    start = time.monotonic()
    expected = (r"^aligned org/aligned: the hub did not answer within 2 s \(HF_HUB_ETAG_TIMEOUT\); using its "
                r"snapshot in the Hugging Face cache$")
    with pytest.warns(UserWarning, match=expected):
        assert resolve_model("org/aligned", what="aligned").name == COMMIT
    assert resolve_model(f"org/base@{COMMIT}").name == COMMIT  # a commit: not asked again, no listing
    assert time.monotonic() - start < 15
    # not cached: one line, within the bound too (the command line, HF_HUB_OFFLINE unset)
    env = {"HF_ENDPOINT": silent_hub, "HF_HUB_CACHE": str(_cache()), "HF_HUB_ETAG_TIMEOUT": "2",
           "NO_PROXY": "127.0.0.1", "HF_HUB_OFFLINE": ""}
    start = time.monotonic()
    code, _, err = run_cli("subspace", "--aligned", "org/aligned", "--unaligned", "org/missing", "--output",
                           tmp_path / "s.safetensors", env=env)
    assert time.monotonic() - start < 30  # the bound, plus starting Python and torch
    lines = err.strip().splitlines()
    assert code == 1, err
    assert ("unaligned org/missing: no such local path, not in the Hugging Face cache, and the hub could not "
            "be reached (the hub did not answer within 2 s") in lines[-1], err
    assert "aligned org/aligned: the hub did not answer" in err  # the cached one said so, in one line
    assert not (tmp_path / "s.safetensors").exists()


@pytest.mark.usefixtures("hub")
def test_a_snapshot_file_linking_out_of_the_cache_is_refused(tmp_path):
    from test_hub import COMMIT

    from lssf_lightning.io.hub import resolve_model

    snapshot = _cache() / "models--org--aligned" / "snapshots" / COMMIT
    outside = tmp_path / "elsewhere.json"
    outside.write_text("{}")
    (snapshot / "config.json").unlink()
    (snapshot / "config.json").symlink_to(outside)
    with pytest.raises(ValueError, match=r"aligned org/aligned: .*config.json is a link to .*elsewhere.json, "
                                         r"outside the cache's .*blobs; refusing to read it") as caught:
        resolve_model("org/aligned", what="aligned")
    assert "\n" not in str(caught.value)
    assert resolve_model("org/base").is_dir()  # links into blobs/ are the cache's own layout


# -- 6. a LoRA adapter's fully trained tensors reach the merged output ---------------------------------------
def test_a_lora_adapters_modules_to_save_are_carried_into_the_realigned_model(llama_trio, tmp_path):
    import peft
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from lssf_lightning.realign import realign_checkpoint

    torch.manual_seed(0)
    model = peft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(llama_trio.aligned),
        peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"],
                        init_lora_weights=False),
    )
    with torch.no_grad():  # "training" the head: the adapter's copy moves away from the aligned head
        head = model.base_model.model.lm_head.modules_to_save["default"].weight
        head.add_(0.5 * torch.randn_like(head))
    trained_head = head.detach().clone()
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)
    merged = model.merge_and_unload()
    output = tmp_path / "out"
    realign_checkpoint(adapter, output, aligned=llama_trio.aligned, unaligned=llama_trio.base, alpha=0.0,
                       progress=False)
    written = {}
    for file in output.glob("*.safetensors"):
        written.update(load_file(file))
    assert torch.equal(written["lm_head.weight"], trained_head)
    aligned_head = load_file(next(llama_trio.aligned.glob("*.safetensors")))["lm_head.weight"]
    assert not torch.equal(written["lm_head.weight"], aligned_head)
    # with alpha = 0 the realigned model is peft's merge, tensor for tensor
    for key, value in merged.state_dict().items():
        assert torch.allclose(written[key], value, atol=1e-6), key


def test_a_lora_adapter_training_tensors_that_cannot_be_merged_is_refused(llama_trio, tmp_path):
    import peft
    from transformers import AutoModelForCausalLM

    from lssf_lightning.realign import realign_checkpoint

    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(llama_trio.aligned),
                                peft.LoraConfig(r=2, target_modules=["q_proj"], lora_bias=True))
    model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match=r"adapter .* trains .*q_proj\.lora_B\.bias, which lssf_lightning "
                                         r"cannot merge") as caught:
        realign_checkpoint(tmp_path / "adapter", tmp_path / "out", aligned=llama_trio.aligned,
                           unaligned=llama_trio.base, progress=False)
    assert "\n" not in str(caught.value) and not (tmp_path / "out").exists()
