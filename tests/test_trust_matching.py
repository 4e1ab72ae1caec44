"""Architecture matching: the targeted matrices of aligned, unaligned, fine-tuned and subspace correspond both
ways.

A model with an extra layer on any side is refused with a message naming unmatched weights of each side, and
nothing is written; ``--allow-partial`` / ``allow_partial=True`` realigns the common weights with a warning
that gives the counts. Real CLI runs on tiny models saved with ``save_pretrained``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from _tiny import build_tiny_llama
from conftest import run_cli, state, tree_hashes
from safetensors.torch import load_file

from lssf_lightning.methods import LSSF, apply_edits
from lssf_lightning.realign import realign_checkpoint
from lssf_lightning.subspace import SafetySubspace


def deeper(model, tokenizer, path):
    """A 3-layer copy of a 2-layer tiny Llama: its weights, plus a random ``model.layers.2``."""
    bigger = build_tiny_llama(tokenizer, seed=7, num_hidden_layers=3)
    missing, unexpected = bigger.load_state_dict(state(model), strict=False)
    assert not unexpected and all(".layers.2." in k for k in missing)
    bigger.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def deeper_models(llama_trio, tiny_tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("deeper")
    return {
        "finetuned": deeper(llama_trio.models["finetuned"], tiny_tokenizer, root / "finetuned3"),
        "base": deeper(llama_trio.models["base"], tiny_tokenizer, root / "base3"),
    }


@pytest.fixture(scope="module")
def subspace_file(llama_trio, tmp_path_factory):
    path = tmp_path_factory.mktemp("subspace") / "s.safetensors"
    SafetySubspace.from_weights(llama_trio.aligned, llama_trio.base, progress=False).save(path)
    return path


def one_line_error(code, err, *needles):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_unaligned_with_an_extra_layer_is_refused(llama_trio, deeper_models, tmp_path):
    inputs = [llama_trio.aligned, deeper_models["base"]]
    before = tree_hashes(*inputs)
    code, _, err = run_cli(
        "subspace",
        "--aligned",
        llama_trio.aligned,
        "--unaligned",
        deeper_models["base"],
        "--output",
        tmp_path / "s.safetensors",
    )
    one_line_error(
        code, err, "7 of 21 target weights", "no counterpart", "model.layers.2.", "--allow-partial"
    )
    assert list(tmp_path.iterdir()) == [] and tree_hashes(*inputs) == before
    with pytest.warns(UserWarning, match=r"partial realignment: 7 of 21 .*only the 14 common weights"):
        partial = SafetySubspace.from_weights(
            llama_trio.aligned, deeper_models["base"], allow_partial=True, progress=False
        )
    full = SafetySubspace.from_weights(llama_trio.aligned, llama_trio.base, progress=False)
    assert partial.keys() == full.keys()
    assert all(torch.equal(partial[k].left, full[k].left) for k in full.entries)


def test_finetuned_with_more_layers_than_the_subspace_is_refused(
    llama_trio, deeper_models, subspace_file, tmp_path
):
    inputs = [llama_trio.aligned, llama_trio.base, deeper_models["finetuned"], subspace_file]
    before = tree_hashes(*inputs)
    out = tmp_path / "out"
    args = [
        "realign",
        "--subspace",
        subspace_file,
        "--finetuned",
        deeper_models["finetuned"],
        "--output",
        out,
    ]
    code, _, err = run_cli(*args)
    one_line_error(
        code,
        err,
        "7 of 21 target weights",
        deeper_models["finetuned"].name,
        "model.layers.2.",
        "--allow-partial",
    )
    assert list(tmp_path.iterdir()) == [] and tree_hashes(*inputs) == before

    code, stdout, err = run_cli(*args, "--allow-partial")
    assert code == 0 and "partial realignment: 7 of 21" in err and "edited 14 of" in stdout, err
    got, ft = (
        load_file(out / "model.safetensors"),
        load_file(deeper_models["finetuned"] / "model.safetensors"),
    )
    expected = apply_edits(state(llama_trio.models["finetuned"]), LSSF(SafetySubspace.load(subspace_file)))
    for key, tensor in got.items():
        assert torch.equal(tensor, ft[key] if ".layers.2." in key else expected[key]), key
    assert tree_hashes(*inputs) == before


def test_streamed_realign_checks_the_finetuned_side_too(llama_trio, deeper_models, subspace_file, tmp_path):
    pair = {"aligned": llama_trio.aligned, "unaligned": llama_trio.base, "progress": False}
    with pytest.raises(ValueError, match=r"7 of 21 target weights of .*finetuned3 .*model\.layers\.2\."):
        realign_checkpoint(deeper_models["finetuned"], tmp_path / "out", **pair)
    assert list(tmp_path.iterdir()) == []
    with pytest.warns(UserWarning, match="partial realignment: 7 of 21"):
        report = realign_checkpoint(deeper_models["finetuned"], tmp_path / "out", allow_partial=True, **pair)
    precomputed = realign_checkpoint(
        deeper_models["finetuned"],
        tmp_path / "pre",
        subspace=subspace_file,
        allow_partial=True,
        progress=False,
    )
    assert report.edited == precomputed.edited == 14
    got, want = (
        load_file(tmp_path / "out" / "model.safetensors"),
        load_file(tmp_path / "pre" / "model.safetensors"),
    )
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


def test_resta_and_fuse_check_both_directions(llama_trio, deeper_models, subspace_file, tmp_path):
    with pytest.raises(ValueError, match=r"7 of 21 target weights .* no counterpart .*model\.layers\.2\."):
        realign_checkpoint(
            deeper_models["finetuned"],
            tmp_path / "resta",
            method="resta",
            aligned=llama_trio.aligned,
            unaligned=llama_trio.base,
            progress=False,
        )
    assert not (tmp_path / "resta").exists()
    subspace = SafetySubspace.load(subspace_file)
    model = build_tiny_llama(load_tokenizer(llama_trio), num_hidden_layers=3)
    with pytest.raises(
        ValueError, match=r"no counterpart in the safety subspace, e\.g\. \['model\.layers\.2\."
    ):
        apply_edits(model, LSSF(subspace))
    with pytest.warns(UserWarning, match="partial realignment"):
        apply_edits(model, LSSF(subspace, allow_partial=True))
    # the other way round: a fine-tune lacking layers of the subspace
    smaller = build_tiny_llama(load_tokenizer(llama_trio), num_hidden_layers=1)
    with pytest.raises(
        ValueError, match=r"7 of 14 target weights of the safety subspace have no counterpart"
    ):
        apply_edits(smaller, LSSF(subspace))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_edits(
            llama_trio.models["finetuned"], LSSF(subspace)
        )  # matching architectures: no warning at all


def load_tokenizer(trio):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(trio.aligned)
