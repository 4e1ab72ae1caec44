"""Disk-backed subspace factors (``lssf_lightning.io.lazy_factors.LazyFactors``) against the eager
subspace."""

import pytest
import torch

from lssf_lightning.core.factors import ShardRegion, local_product, restrict
from lssf_lightning.io.lazy_factors import LazyFactors, entry_bytes
from lssf_lightning.methods import LSSF, apply_edits
from lssf_lightning.subspace import SafetySubspace


@pytest.fixture(scope="module")
def saved(llama_trio, gpt2_trio, tmp_path_factory):
    root = tmp_path_factory.mktemp("lazy")
    out = {}
    for name, trio in (("llama", llama_trio), ("gpt2", gpt2_trio)):
        subspace = SafetySubspace.from_weights(trio.aligned, trio.base, progress=False)
        out[name] = (subspace, subspace.save(root / f"{name}.safetensors"))
    return out


@pytest.mark.parametrize("model", ["llama", "gpt2"])
def test_entries_read_from_the_file_equal_the_built_ones(saved, model):
    subspace, path = saved[model]
    factors = LazyFactors(path)
    assert list(factors) == subspace.keys() and len(factors) == len(subspace)
    assert factors.metadata["fingerprint"] == subspace.metadata["fingerprint"]
    for key in list(subspace.entries):
        entry, built = factors[key], subspace[key]
        assert torch.equal(entry.left, built.left) and torch.equal(entry.right, built.right)
        assert torch.equal(entry.singular_values, built.singular_values)
        assert (entry.entropy, entry.total_energy, entry.conv1d) == (
            built.entropy,
            built.total_energy,
            built.conv1d,
        )
        assert factors.rank(key) == built.rank and factors.shape(key) == built.shape  # from the header alone


def test_the_cache_stays_within_its_budget(saved):
    subspace, path = saved["llama"]
    sizes = [entry_bytes(subspace[k]) for k in list(subspace.entries)]
    budget = 2 * max(sizes)
    factors = LazyFactors(path, budget_bytes=budget)
    for _ in range(2):
        for key in factors:
            factors[key]
            assert factors.resident_bytes <= budget
    assert max(sizes) <= factors.peak_resident_bytes <= budget
    nothing = LazyFactors(path, budget_bytes=0)
    for key in nothing:
        nothing[key]
    assert nothing.peak_resident_bytes == 0 and nothing.resident_bytes == 0
    with pytest.raises(ValueError, match="budget_bytes"):
        LazyFactors(path, budget_bytes=-1)


@pytest.mark.parametrize("model", ["llama", "gpt2"])
def test_restrict_reads_only_the_block_and_gives_the_same_product(saved, model):
    subspace, path = saved[model]
    factors = LazyFactors(path, budget_bytes=0)
    for key in list(subspace.entries):
        d0, d1 = subspace[key].shape
        for region in (
            ShardRegion((d0, d1), (d0 // 3, 0), (d0 - d0 // 3, d1)),  # FSDP2 Shard(0), uneven
            ShardRegion((d0, d1), (0, d1 // 2), (d0, d1 - d1 // 2)),
        ):  # Shard(1)
            local = factors.restrict(key, region)
            eager = restrict(subspace[key], region)
            assert torch.equal(local.left, eager.left) and torch.equal(local.right, eager.right)
            like = torch.zeros(region.shape)
            dense = subspace[key].correction(1.0)[region.rows, region.cols]
            assert torch.allclose(local_product(local, region, like).double(), dense, atol=1e-6)
            # the factors a Shard(0) Linear block keeps: its rows of U' and the whole U'ᵀδ
            if not subspace[key].conv1d and region.offset[1] == 0:
                assert local.left.shape[0] == region.shape[0] and local.right.shape[1] == d1


def test_a_subspace_over_lazy_factors_fuses_like_the_eager_one(saved, llama_trio):
    subspace, path = saved["llama"]
    factors = LazyFactors(path)
    lazy = SafetySubspace(factors, factors.metadata)
    assert lazy.entries is factors and factors.resident_bytes == 0  # nothing read up front
    weights = {k: v.clone() for k, v in llama_trio.models["finetuned"].state_dict().items()}
    eager_fused = apply_edits(weights, LSSF(subspace, 0.5))
    lazy_fused = apply_edits(weights, LSSF(lazy, 0.5))
    assert eager_fused.keys() == lazy_fused.keys()
    for key in eager_fused:
        assert torch.equal(eager_fused[key], lazy_fused[key]), key


def test_not_a_subspace_file_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not a safety subspace"):
        LazyFactors(tmp_path / "other.safetensors")
    save_file({"x": torch.zeros(2)}, tmp_path / "empty.safetensors", metadata={"lssf": "{}"})
    with pytest.raises(ValueError, match="field 'format' is missing"):
        LazyFactors(tmp_path / "empty.safetensors")
    with pytest.raises(FileNotFoundError, match="no such safety subspace file"):
        LazyFactors(tmp_path / "missing.safetensors")
    with pytest.raises(FileNotFoundError, match="it is a directory"):
        LazyFactors(tmp_path)


# -- the same checks as SafetySubspace.load (io.subspace_file), one line naming the file and the tensor ------
def rewrite(source, target, edit_header=None, edit_tensors=None):
    """Copy the subspace file ``source`` to ``target`` with its JSON header and/or tensors edited."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(source), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        header = json.loads(handle.metadata()["lssf"])
    if edit_header:
        edit_header(header)
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, str(target), metadata={"lssf": json.dumps(header)})
    return target


def first_entry(tensors_or_header):
    keys = tensors_or_header["entries"] if "entries" in tensors_or_header else tensors_or_header
    return next(iter(keys)).split(":")[0]


def load_error(path):
    from lssf_lightning.io.schema import FormatError

    with pytest.raises(FormatError) as caught:
        SafetySubspace.load(path)
    return str(caught.value)


@pytest.mark.parametrize(
    "edit",
    [
        lambda h: h.pop("version"),
        lambda h: h.update(version=7),
        lambda h: h["metadata"].update(eta="high"),
        lambda h: h["entries"][first_entry(h)].update(conv1d=1),
        lambda h: h["entries"][first_entry(h)].update(total_energy=-1.0),
        lambda h: h["entries"].update(ghost={"entropy": 1.0, "total_energy": 1.0, "conv1d": False}),
        lambda h: h.update(format="something.else"),
    ],
    ids=[
        "no-version",
        "future-version",
        "eta-string",
        "conv1d-int",
        "negative-energy",
        "ghost-entry",
        "format",
    ],
)
def test_a_tampered_header_is_refused_with_the_load_error(saved, tmp_path, edit):
    from lssf_lightning.io.schema import FormatError

    _, path = saved["llama"]
    bad = rewrite(path, tmp_path / "bad.safetensors", edit_header=edit)
    with pytest.raises(FormatError) as caught:
        LazyFactors(bad)
    assert str(caught.value) == load_error(bad) and str(bad) in str(caught.value)
    assert "\n" not in str(caught.value)


def test_tampered_factor_shapes_are_refused_before_any_product(saved, tmp_path):
    from lssf_lightning.io.schema import FormatError

    subspace, path = saved["llama"]
    key = next(k for k in subspace.entries if subspace[k].left.shape[0] != subspace[k].left.shape[1])

    def transpose_left(tensors):
        tensors[f"{key}:left"] = tensors[f"{key}:left"].T.contiguous()

    bad = rewrite(path, tmp_path / "bad.safetensors", edit_tensors=transpose_left)
    with pytest.raises(FormatError, match="factor shapes disagree") as caught:
        LazyFactors(bad)
    assert str(caught.value) == load_error(bad)


@pytest.mark.parametrize("part", ["left", "right", "sigma"])
def test_a_nan_factor_is_refused_when_read_with_the_load_error(saved, tmp_path, part):
    from lssf_lightning.io.schema import FormatError

    subspace, path = saved["llama"]
    key = next(k for k in subspace.entries if subspace[k].rank > 0)

    def poison(tensors):
        tensors[f"{key}:{part}"].view(-1)[0] = float("nan")

    bad = rewrite(path, tmp_path / "nan.safetensors", edit_tensors=poison)
    expected = load_error(bad)
    assert expected == f"{bad}: tensor '{key}:{part}' holds NaN or inf"
    factors = LazyFactors(bad, budget_bytes=0)  # the header is fine: the factors are checked as they are read
    with pytest.raises(FormatError) as caught:
        factors[key]
    assert str(caught.value) == expected
    other = next(k for k in subspace.entries if k != key)
    assert torch.equal(factors[other].left, subspace[other].left)  # the intact entries stay readable
    if part != "sigma":  # a shard's block that holds the NaN (sigma is never read for a block)
        d0, d1 = subspace[key].shape
        with pytest.raises(FormatError) as caught:
            factors.restrict(key, ShardRegion((d0, d1), (0, 0), (d0 // 2 or 1, d1)))
        assert str(caught.value) == expected


def test_disk_backed_keeps_the_factors_in_the_cache_file_only_when_it_is_this_subspace(saved, gpt2_trio):
    from lssf_lightning.training import disk_backed

    subspace, path = saved["llama"]
    lazy = disk_backed(subspace, str(path), world_size=2)
    assert isinstance(lazy.entries, LazyFactors) and lazy.entries.path == path
    assert lazy.metadata == subspace.metadata and lazy.keys() == subspace.keys()
    key = next(iter(subspace.entries))
    assert torch.equal(lazy[key].right, subspace[key].right) and lazy[key].rank == subspace[key].rank
    assert disk_backed(subspace, str(path), world_size=1) is subspace  # one process: as built
    assert disk_backed(subspace, None, world_size=2) is subspace  # no cache file
    assert disk_backed(subspace, str(path) + ".missing", world_size=2) is subspace
    other, other_path = saved["gpt2"]
    assert disk_backed(subspace, str(other_path), world_size=2) is subspace  # another subspace's file
