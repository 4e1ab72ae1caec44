"""Formats: every file the project reads is checked against its schema at the boundary.

Real files corrupted byte-wise or field-wise; each case ends in one line naming the file (and the field),
never a ``KeyError``/shape error from deep inside, and never a NaN written. A bounded fuzz (fixed seed) runs
a few hundred corruptions in-process.
"""

import copy
import io
import json
import os
import random
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lssf_lightning.io.lora import LoraAdapter
from lssf_lightning.io.schema import FormatError
from lssf_lightning.io.shards import (
    SafetensorsReader,
    index_files,
    parse_shard_size,
    read_header,
    write_safetensors,
)
from lssf_lightning.io.weights import open_weights
from lssf_lightning.metrics.prompts import load_prompts
from lssf_lightning.subspace import SafetySubspace
from lssf_lightning.validation import SettingError

PREVIOUS_RELEASE = "871706d"  # the last commit of the 0.1 code, read from this repository's history


@pytest.fixture(scope="module")
def previous_release(tmp_path_factory) -> Path:
    """The 0.1 package, extracted with ``git archive`` (skipped where the checkout has no history)."""
    root = Path(__file__).resolve().parents[1]
    try:
        archive = subprocess.run(["git", "-C", str(root), "archive", PREVIOUS_RELEASE, "lssf_lightning"],
                                 capture_output=True)
    except FileNotFoundError:  # no git on this machine
        pytest.skip("git is not installed: the 0.1 code cannot be read from the history")
    if archive.returncode != 0:
        pytest.skip(f"commit {PREVIOUS_RELEASE} (the 0.1 code) is not in this checkout's git history")
    target = tmp_path_factory.mktemp("release-0.1")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(target, filter="data")
    return target


def split(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def join(header: dict, body: bytes) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body


def assert_clean(err: BaseException, path: Path) -> None:
    """The error a user sees: one line, naming the file; a ValueError or an OSError, nothing internal."""
    assert isinstance(err, (ValueError, OSError)), f"{type(err).__name__}: {err}"
    message = str(err)
    assert "\n" not in message and str(path) in message, message


@pytest.fixture(scope="module")
def subspace_file(llama_trio, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("subspace") / "safety.safetensors"
    SafetySubspace.from_weights(llama_trio.aligned, llama_trio.base, progress=False).save(path)
    return path


# -- safetensors headers ----------------------------------------------------------------------------------
@pytest.fixture
def weights_file(tmp_path) -> Path:
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.randn(3, 4), "b": torch.zeros(3)}, path)
    return path


@pytest.mark.parametrize("corrupt", ["no_dtype", "bad_dtype", "lying_shape", "overlap", "truncated",
                                     "not_json", "huge_length", "metadata_not_strings"])
def test_bad_safetensors_headers_are_one_line_errors(weights_file, corrupt):
    header, body = split(weights_file)
    bad = copy.deepcopy(header)
    if corrupt == "no_dtype":
        del bad["a"]["dtype"]
    elif corrupt == "bad_dtype":
        bad["a"]["dtype"] = "F99"
    elif corrupt == "lying_shape":
        bad["a"]["shape"] = [4, 4]
    elif corrupt == "overlap":
        bad["b"]["data_offsets"] = [0, 12]
    elif corrupt == "metadata_not_strings":
        bad["__metadata__"] = {"format": 5}
    data = join(bad, body)
    if corrupt == "truncated":
        data = join(header, body)[:-7]
    elif corrupt == "not_json":
        data = struct.pack("<Q", 8) + b"{]]]]]]]" + body
    elif corrupt == "huge_length":
        data = struct.pack("<Q", 2**60) + data[8:]
    weights_file.write_bytes(data)
    with pytest.raises(FormatError, match="not a valid safetensors file") as caught:
        SafetensorsReader([weights_file])
    assert_clean(caught.value, weights_file)


# -- shard index ------------------------------------------------------------------------------------------
def sharded_dir(tmp_path) -> Path:
    directory = tmp_path / "sharded"
    directory.mkdir()
    save_file({"a": torch.ones(2)}, directory / "model-00001-of-00002.safetensors")
    save_file({"b": torch.ones(3)}, directory / "model-00002-of-00002.safetensors")
    index = {"metadata": {"total_size": 20}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                                            "b": "model-00002-of-00002.safetensors"}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return directory


@pytest.mark.parametrize(("change", "expected"), [
    (lambda i: i.pop("weight_map"), "field 'weight_map' is missing"),
    (lambda i: i.update(weight_map=["a"]), "field 'weight_map' must be an object"),
    (lambda i: i["weight_map"].update(a="../elsewhere/model.safetensors"), "must be the file name of a"),
    (lambda i: i["weight_map"].update(a="/etc/model.safetensors"), "must be the file name of a"),
    (lambda i: i["weight_map"].update(a="pytorch_model.bin"), "must be the file name of a .safetensors"),
    (lambda i: i["weight_map"].update(a="subdir.safetensors"), "is a directory"),
    (lambda i: i["weight_map"].update(a="model-00002-of-00002.safetensors"), "puts 'a' in model-00002"),
    (lambda i: i["weight_map"].update(c="missing.safetensors"), "missing shard"),
])
def test_bad_shard_index_is_one_line_error(tmp_path, change, expected):
    directory = sharded_dir(tmp_path)
    (directory / "subdir.safetensors").mkdir()
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    change(index)
    index_path.write_text(json.dumps(index))
    with pytest.raises((FormatError, OSError), match=expected) as caught:
        open_weights(directory)
    assert "\n" not in str(caught.value) and str(directory) in str(caught.value)


def test_a_valid_index_lists_its_shards(tmp_path):
    directory = sharded_dir(tmp_path)
    assert [p.name for p in index_files(directory / "model.safetensors.index.json")] == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]


# -- adapter config ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("config", "expected"), [
    ("[1, 2]", "must hold a JSON object"),
    ("{not json", "invalid JSON"),
    ('{"peft_type": "LORA", "lora_alpha": "sixteen"}', "field 'lora_alpha' must be a number"),
    ('{"peft_type": "LORA", "use_rslora": "yes"}', "field 'use_rslora' must be a boolean"),
    ('{"peft_type": "LORA", "alpha_pattern": {"q_proj": null}}',
     "alpha_pattern: field 'q_proj' must be a number"),
    ('{"peft_type": "LORA", "alpha_pattern": {"(": 2}}', "not a valid regular expression"),
    ('{"peft_type": 3}', "field 'peft_type' must be a string"),
])
def test_bad_adapter_config_is_one_line_error(tmp_path, config, expected):
    adapter = write_adapter(tmp_path, config, b_shape=(4, 2))
    with pytest.raises(FormatError, match=expected) as caught:
        LoraAdapter(adapter)
    assert_clean(caught.value, adapter / "adapter_config.json")


def write_adapter(tmp_path: Path, config: str, b_shape: tuple[int, int]) -> Path:
    """A peft adapter directory: ``config`` and one layer's LoRA factors (``lora_A`` 2×4, ``lora_B``
    ``b_shape``)."""
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(config)
    save_file({"base_model.model.layers.0.q_proj.lora_A.weight": torch.ones(2, 4),
               "base_model.model.layers.0.q_proj.lora_B.weight": torch.ones(*b_shape)},
              adapter / "adapter_model.safetensors")
    return adapter


def test_adapter_factor_shapes_must_agree(tmp_path):
    adapter = write_adapter(tmp_path, '{"peft_type": "LORA", "lora_alpha": 8}', b_shape=(4, 3))
    with pytest.raises(FormatError, match="factor shapes disagree: lora_A \\[2, 4\\].*lora_B \\[4, 3\\]"):
        LoraAdapter(adapter)


# -- subspace file ----------------------------------------------------------------------------------------
def tamper(path: Path, target: Path, edit) -> Path:
    """Copy ``path`` to ``target`` with its lssf metadata (and possibly tensor headers) edited by ``edit``."""
    header, body = split(path)
    lssf = json.loads(header["__metadata__"]["lssf"])
    edit(header, lssf)
    header["__metadata__"]["lssf"] = json.dumps(lssf)
    target.write_bytes(join(header, body))
    return target


def _first(lssf):
    return next(iter(lssf["entries"]))


@pytest.mark.parametrize(("edit", "expected"), [
    (lambda h, m: m.pop("version"), "field 'version' is missing"),
    (lambda h, m: m.update(version="1"), "field 'version' must be an integer"),
    (lambda h, m: m.update(version=7), "format version 7.*upgrade"),
    (lambda h, m: m.update(entries=list(m["entries"])), "field 'entries' must be an object"),
    (lambda h, m: m["metadata"].update(eta="high"), "metadata: field 'eta' must be a number"),
    (lambda h, m: m["entries"][_first(m)].pop("entropy"), "field 'entropy' is missing"),
    (lambda h, m: m["entries"][_first(m)].update(conv1d=1), "field 'conv1d' must be a boolean"),
    (lambda h, m: m["entries"].update(ghost={"entropy": 1.0, "total_energy": 1.0, "conv1d": False}),
     "entry 'ghost': tensor 'ghost:left' is missing"),
    (lambda h, m: m["entries"].pop(_first(m)), "belongs to no entry"),
    (lambda h, m: m.update(format="something.else"), "is not a safety subspace"),
])
def test_bad_subspace_metadata_is_one_line_error(subspace_file, tmp_path, edit, expected):
    bad = tamper(subspace_file, tmp_path / "bad.safetensors", edit)
    with pytest.raises(FormatError, match=expected) as caught:
        SafetySubspace.load(bad)
    assert_clean(caught.value, bad)


def test_tampered_factor_shapes_are_named_not_a_matmul_error(subspace_file, tmp_path):
    def transpose_left(header, lssf):
        key = next(k for k in lssf["entries"] if len(set(header[f"{k}:left"]["shape"])) == 2)
        header[f"{key}:left"]["shape"].reverse()  # same bytes, so the safetensors header stays valid

    bad = tamper(subspace_file, tmp_path / "bad.safetensors", transpose_left)
    with pytest.raises(FormatError, match="factor shapes disagree") as caught:
        SafetySubspace.load(bad)
    assert_clean(caught.value, bad)


def test_a_nan_factor_is_refused_when_loaded(subspace_file, tmp_path):
    header, body = split(subspace_file)
    key = next(k for k in header if k.endswith(":right"))
    start = header[key]["data_offsets"][0]
    body = body[:start] + struct.pack("<f", float("nan")) + body[start + 4:]
    bad = tmp_path / "nan.safetensors"
    bad.write_bytes(join(header, body))
    with pytest.raises(FormatError, match=f"tensor '{key}' holds NaN or inf"):
        SafetySubspace.load(bad)


def test_subspace_files_written_by_the_previous_release_still_load(previous_release, llama_trio, tmp_path):
    old = tmp_path / "old.safetensors"
    script = ("import sys, torch; torch.set_num_threads(1); "
              "from lssf_lightning.subspace import SafetySubspace; "
              "SafetySubspace.from_weights(sys.argv[1], sys.argv[2], progress=False).save(sys.argv[3])")
    env = {**os.environ, "PYTHONPATH": str(previous_release)}
    subprocess.run([sys.executable, "-c", script, llama_trio.aligned, llama_trio.base, old], check=True,
                   env=env, cwd=tmp_path, capture_output=True)
    loaded = SafetySubspace.load(old)
    new = SafetySubspace.from_weights(llama_trio.aligned, llama_trio.base, progress=False)
    assert loaded.keys() == new.keys() and loaded.metadata["fingerprint"] == new.metadata["fingerprint"]
    for key in new.entries:
        assert torch.equal(loaded[key].left, new[key].left) and torch.equal(loaded[key].right, new[key].right)


# -- prompt files and sizes ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "data", "expected"), [
    ("latin1.txt", "caf\xe9 prompt\n".encode("latin-1"), "is not UTF-8 text"),
    ("huge.csv", b'goal\n"' + b"x" * 200_000 + b'"\n', "malformed CSV .*field limit"),
    ("list.json", b'{"prompts": ["a"]}', "must hold a JSON list"),
])
def test_bad_prompt_files_are_one_line_errors(tmp_path, name, data, expected):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(ValueError, match=expected) as caught:
        load_prompts(path)
    assert_clean(caught.value, path)


def test_prompt_file_with_a_byte_order_mark_reads(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes("goal,target\nWrite a thing,Sure\n".encode("utf-8-sig"))
    assert load_prompts(path) == ["Write a thing"]


def test_shard_sizes_parse_through_huggingface_hub_and_binary_units():
    assert parse_shard_size("2GB") == 2 * 10**9 and parse_shard_size("2GiB") == 2 * 2**30
    assert parse_shard_size("500MB") == 500 * 10**6 and parse_shard_size(4096) == 4096
    for bad in ("2XB", "-1GB", 0, True, "lots"):
        with pytest.raises(SettingError, match="max shard size"):
            parse_shard_size(bad)


# -- bounded fuzz -------------------------------------------------------------------------------------------
def _mutations(rng: random.Random, data: bytes, header_end: int, count: int):
    for _ in range(count):
        buffer = bytearray(data)
        kind = rng.randrange(4)
        if kind == 0:  # flip bytes of the length prefix or the header
            for _ in range(rng.randint(1, 4)):
                buffer[rng.randrange(header_end)] = rng.randrange(256)
        elif kind == 1:  # truncate
            del buffer[rng.randrange(len(buffer)):]
        elif kind == 2:  # overwrite a run of the header with JSON-ish punctuation
            start = rng.randrange(8, header_end)
            for i in range(start, min(start + rng.randint(1, 6), header_end)):
                buffer[i] = ord(rng.choice('{}[]",:0123456789-eE.ntrufals '))
        else:  # a digit of a shape or offset changed
            digits = [i for i in range(8, header_end) if chr(buffer[i]).isdigit()]
            if digits:
                buffer[rng.choice(digits)] = ord(rng.choice("0123456789"))
        yield bytes(buffer)


def _header_end(path: Path) -> int:
    return 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]


def test_fuzzed_files_end_in_one_clean_line_or_a_correct_result(subspace_file, weights_file, tmp_path):
    rng = random.Random(0)
    outcomes = {"error": 0, "loaded": 0}
    target = tmp_path / "fuzz.safetensors"
    cases = [(weights_file, 150, "weights"), (subspace_file, 200, "subspace")]
    for source, count, kind in cases:
        data = source.read_bytes()
        for mutated in _mutations(rng, data, _header_end(source), count):
            target.write_bytes(mutated)
            try:
                if kind == "weights":
                    reader = SafetensorsReader([target])
                    tensors = [reader.get(k) for k in reader.entries]
                    assert all(t.numel() >= 0 for t in tensors)
                else:
                    loaded = SafetySubspace.load(target)
                    for entry in loaded.entries.values():  # whatever loads is usable and finite
                        assert torch.isfinite(entry.correction()).all()
            except (ValueError, OSError) as err:
                assert_clean(err, target)
                outcomes["error"] += 1
            else:
                outcomes["loaded"] += 1
    index_dir = sharded_dir(tmp_path)
    index_path = index_dir / "model.safetensors.index.json"
    original = json.loads(index_path.read_text())
    values = [None, 3, 2.5, "", "../x.safetensors", "/abs.safetensors", [], {}, True,
              "model-00001-of-00002.safetensors"]
    for _ in range(100):
        index = copy.deepcopy(original)
        slot = rng.choice(["top", "map", "value"])
        if slot == "top":
            index[rng.choice(["weight_map", "metadata"])] = rng.choice(values)
        elif slot == "map":
            index["weight_map"][rng.choice(["a", "b", "zz"])] = rng.choice(values)
        else:
            index = rng.choice(values)
        index_path.write_text(json.dumps(index))
        try:
            files = index_files(index_path)
            assert all(f.parent == index_dir and f.is_file() for f in files)
            outcomes["loaded"] += 1
        except (ValueError, OSError) as err:
            assert_clean(err, index_dir)
            outcomes["error"] += 1
    assert outcomes["error"] > 300 and sum(outcomes.values()) == 450


def test_read_header_keeps_the_file_order_of_tensors(tmp_path):
    path = tmp_path / "ordered.safetensors"
    write_safetensors(path, {"z": torch.ones(1), "a": torch.ones(2), "m": torch.ones(3)})
    assert list(read_header(path)[0]) == ["z", "a", "m"]
