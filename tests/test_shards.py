import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from lssf_lightning.io.shards import SafetensorsReader, ShardedWriter, read_header, write_safetensors


def sample_tensors():
    generator = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(5, 7, generator=generator),
        "b.weight": torch.randn(3, 4, generator=generator).to(torch.bfloat16),
        "c.half": torch.randn(6, generator=generator).to(torch.float16),
        "d.ids": torch.arange(10, dtype=torch.int64),
        "e.mask": torch.tensor([True, False, True]),
        "f.empty": torch.zeros(4, 0),
        "g.double": torch.randn(2, 2, generator=generator, dtype=torch.float64),
    }


def assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def test_round_trip_and_compatibility_with_the_safetensors_library(tmp_path):
    tensors = sample_tensors()
    write_safetensors(tmp_path / "ours.safetensors", tensors, {"note": "x"})
    assert_same(load_file(tmp_path / "ours.safetensors"), tensors)
    save_file(tensors, tmp_path / "theirs.safetensors")
    reader = SafetensorsReader([tmp_path / "theirs.safetensors"])
    assert_same({k: reader.get(k) for k in reader.entries}, tensors)
    assert read_header(tmp_path / "ours.safetensors")[1] == {"note": "x"}


def test_sharded_writer_streams_in_plan_order(tmp_path):
    tensors = {f"layer.{i}.weight": torch.full((16, 16), float(i)) for i in range(5)}
    plan = [(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()]
    writer = ShardedWriter(tmp_path, plan, max_shard_bytes=2 * 16 * 16 * 4)
    for key, tensor in tensors.items():
        writer.write(key, tensor)
    writer.finish()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 5 * 16 * 16 * 4
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    loaded = {}
    for name in files:
        loaded.update(load_file(tmp_path / name))
    assert_same(loaded, tensors)


def test_sharded_writer_rejects_unplanned_tensors(tmp_path):
    plan = [("a", torch.float32, (2,)), ("b", torch.float32, (3,))]
    writer = ShardedWriter(tmp_path, plan)
    with pytest.raises(ValueError, match="out of the planned order"):
        writer.write("b", torch.zeros(3))
    writer.write("a", torch.zeros(2))
    with pytest.raises(ValueError, match="planned"):
        writer.write("b", torch.zeros(4))
    with pytest.raises(ValueError, match="never written"):
        writer.finish()
    writer.close()


def test_bad_files_are_reported(tmp_path):
    (tmp_path / "short.safetensors").write_bytes(b"abc")
    with pytest.raises(ValueError, match="short.safetensors: not a valid safetensors file .*too small"):
        read_header(tmp_path / "short.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{]")
    with pytest.raises(ValueError, match="junk.safetensors: not a valid safetensors file"):
        read_header(tmp_path / "junk.safetensors")
    write_safetensors(tmp_path / "cut.safetensors", {"a": torch.zeros(100)})
    data = (tmp_path / "cut.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-10])
    with pytest.raises(ValueError, match="cut.safetensors: not a valid safetensors file .*not fully covered"):
        SafetensorsReader([tmp_path / "cut.safetensors"])
