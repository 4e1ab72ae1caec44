"""The core's public API: config objects, the planner registry, and the numeric
settings refused at every entry point."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import run_cli, state, tree_hashes
from safetensors.torch import load_file

from lssf_lightning.commands import build_parser
from lssf_lightning.config import AutoAlphaConfig, SubspaceConfig
from lssf_lightning.io.layout import MAX_SHARD_BYTES
from lssf_lightning.methods import LSSF, METHODS, MethodInputs, Resta, SafeLoRA, apply_edits, register_method
from lssf_lightning.methods.registry import all_parameters
from lssf_lightning.realign import realign_checkpoint
from lssf_lightning.subspace import SafetySubspace, SubspaceBuilder
from lssf_lightning.training import temporarily_fused
from lssf_lightning.validation import SettingError


def same_entries(a: SafetySubspace, b: SafetySubspace) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k].left, b[k].left) and torch.equal(a[k].right, b[k].right) for k in a.entries
    )


# -- settings come as a config object ---------------------------------------------------------------------
def test_a_mapping_is_a_config_and_loose_keywords_are_refused(llama_trio, tmp_path):
    m = llama_trio.models
    config = SubspaceConfig(eta=0.8, alpha_1=1.5, max_rank=3)
    built = SafetySubspace.from_weights(m["aligned"], m["base"], config, progress=False)
    # a YAML-style mapping is a config too
    assert (
        SafetySubspace.fingerprint(m["aligned"], m["base"], {"eta": 0.8, "alpha_1": 1.5, "max_rank": 3})
        == built.metadata["fingerprint"]
    )
    mapping = {"eta": 0.8, "alpha_1": 1.5, "max_rank": 3}
    assert SubspaceBuilder(m["aligned"], m["base"], mapping).config == config
    with pytest.raises(TypeError, match="etta"):
        SafetySubspace.from_weights(m["aligned"], m["base"], {"etta": 0.8})
    for call in (
        lambda: SafetySubspace.from_weights(m["aligned"], m["base"], eta=0.8),
        lambda: SafetySubspace.fingerprint(m["aligned"], m["base"], eta=0.8),
        lambda: SubspaceBuilder(m["aligned"], m["base"], eta=0.8),
    ):
        with pytest.raises(TypeError, match="eta"):
            call()


def test_realign_refuses_a_keyword_that_is_no_parameter_of_the_method(llama_trio, tmp_path):
    kwargs = {"aligned": llama_trio.aligned, "unaligned": llama_trio.base, "progress": False}
    with pytest.raises(SettingError, match=r"method 'lssf' takes alpha; eta is no method's parameter"):
        realign_checkpoint(llama_trio.finetuned, tmp_path / "old", eta=0.7, **kwargs)
    assert list(tmp_path.iterdir()) == []


# -- one edit protocol ---------------------------------------------------------------------------------------
def test_fuse_is_the_lssf_planner_through_apply_edits(llama_trio):
    subspace = SafetySubspace.from_weights(llama_trio.aligned, llama_trio.base, progress=False)
    ft = state(llama_trio.models["finetuned"])
    fused = apply_edits(ft, LSSF(subspace, 0.7))
    planned = apply_edits(ft, LSSF(subspace, 0.7))
    assert all(torch.equal(fused[k], planned[k]) for k in ft)
    key = "model.layers.1.mlp.down_proj.weight"
    expected = (ft[key].double() + 0.7 * subspace[key].correction()).float()
    assert (fused[key] - expected).abs().max() < 1e-6
    assert torch.equal(fused["model.norm.weight"], ft["model.norm.weight"])


def test_a_registered_method_runs_through_realign(llama_trio, tmp_path):
    class Negate:  # a toy method: flip the sign of every targeted weight
        def __init__(self, inputs: MethodInputs) -> None:
            self.inner = Resta(inputs.aligned, inputs.unaligned)

        def plan(self, target):
            return {key: (lambda w: -w) for key in self.inner.plan(target)}

        def summary(self):
            return {"negated": True}

    register_method("negate")(Negate)
    try:
        report = realign_checkpoint(
            llama_trio.finetuned,
            tmp_path / "out",
            method="negate",
            aligned=llama_trio.aligned,
            unaligned=llama_trio.base,
            progress=False,
        )
    finally:
        METHODS.pop("negate")
    assert report.edited == 14 and report.details == {"negated": True}
    got, ft = load_file(tmp_path / "out" / "model.safetensors"), state(llama_trio.models["finetuned"])
    assert torch.equal(
        got["model.layers.0.self_attn.q_proj.weight"], -ft["model.layers.0.self_attn.q_proj.weight"]
    )
    assert torch.equal(got["model.norm.weight"], ft["model.norm.weight"])
    with pytest.raises(SettingError, match="method must be one of .*'negate'"):
        realign_checkpoint(llama_trio.finetuned, tmp_path / "again", method="negate", progress=False)


# -- the CLI's options come from the config and the one shard-size default -----------------------------------
def test_cli_subspace_options_are_the_config_fields_with_their_defaults():
    parser = build_parser()
    for command in ("subspace", "realign"):
        args = parser.parse_args(
            [command, "--aligned", "a", "--unaligned", "u", "--output", "o"]
            + (["--finetuned", "f"] if command == "realign" else [])
        )
        for field in dataclasses.fields(SubspaceConfig):
            assert getattr(args, field.name) == field.default, (command, field.name)
    args = parser.parse_args(["realign", "--finetuned", "f", "--output", "o"])
    assert args.max_shard_size == MAX_SHARD_BYTES == 2 * 2**30
    sizes = {"2GiB": 2 * 2**30, "2GB": 2 * 10**9, "500MB": 500 * 10**6, "1234": 1234}
    for text, expected in sizes.items():
        assert (
            parser.parse_args(
                ["realign", "--finetuned", "f", "--output", "o", "--max-shard-size", text]
            ).max_shard_size
            == expected
        ), text


def test_cli_method_choices_are_the_registry_and_scalar_defaults_are_written_once(capsys):
    import inspect

    from lssf_lightning import config
    from lssf_lightning.methods.variants import LSSFReset, LSSFTwoSided

    parser = build_parser()
    required = ["realign", "--finetuned", "f", "--output", "o"]
    assert {"lssf", "resta", "safelora", "lssf-reset", "lssf-erosion"} <= set(METHODS)
    register_method("negate")(lambda inputs: None)  # a method registered later is offered too
    try:
        for name in METHODS:
            assert parser.parse_args([*required, "--method", name]).method == name
        with pytest.raises(SystemExit):
            parser.parse_args([*required, "--method", "bogus"])
        listed = capsys.readouterr().err
        assert all(repr(name) in listed for name in METHODS) and "'negate'" in listed, listed
    finally:
        METHODS.pop("negate")
    with pytest.raises(SystemExit):
        parser.parse_args([*required, "--method", "negate"])
    defaults = {
        "alpha": config.DEFAULT_ALPHA,
        "add": config.DEFAULT_ADD,
        "beta": config.DEFAULT_BETA,
        "drop_rate": config.DEFAULT_DROP_RATE,
        "seed": config.DEFAULT_SEED,
        "threshold": config.DEFAULT_THRESHOLD,
    }
    args = parser.parse_args(required)
    declared = all_parameters()
    planners = (LSSF, Resta, SafeLoRA, LSSFReset, LSSFTwoSided)
    signatures = [inspect.signature(f).parameters for f in planners]
    for name, value in defaults.items():
        assert getattr(args, name) is None, name  # not given: the method's declared default applies
        assert declared[name].default == value, name
        assert all(p[name].default == value for p in signatures if name in p), name


# -- every numeric setting refused at the boundary -----------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": float("nan")}, "alpha must be a finite number"),
        ({"alpha": float("inf")}, "alpha must be a finite number"),
        ({"method": "resta", "beta": float("nan")}, "beta must be a finite number"),
        ({"method": "resta", "drop_rate": 1.0}, r"drop_rate must be in \[0, 1\)"),
        ({"method": "resta", "seed": -1}, "seed must be an integer >= 0"),
        ({"method": "resta", "seed": 1.5}, "seed must be an integer >= 0"),
        ({"max_shard_bytes": 0}, "max_shard_bytes must be at least 1 byte"),
        ({"config": {"eta": float("nan")}}, "eta must be a finite number"),
        ({"config": {"alpha_1": 0}}, "alpha_1 must be > 0"),
        ({"config": {"max_rank": 0}}, "max_rank must be an integer >= 1"),
    ],
)
def test_realign_refuses_bad_numbers_before_any_work(llama_trio, tmp_path, kwargs, message):
    before = tree_hashes(llama_trio.aligned, llama_trio.base, llama_trio.finetuned)
    with pytest.raises(SettingError, match=message):
        realign_checkpoint(
            llama_trio.finetuned,
            tmp_path / "out",
            aligned=llama_trio.aligned,
            unaligned=llama_trio.base,
            progress=False,
            **kwargs,
        )
    assert list(tmp_path.iterdir()) == []
    assert tree_hashes(llama_trio.aligned, llama_trio.base, llama_trio.finetuned) == before


def test_python_entry_points_refuse_bad_numbers(llama_trio):
    subspace = SafetySubspace.from_weights(llama_trio.aligned, llama_trio.base, progress=False)
    ft = state(llama_trio.models["finetuned"])
    with pytest.raises(SettingError, match="alpha must be a finite number, got nan"):
        apply_edits(ft, LSSF(subspace, float("nan")))
    with (
        pytest.raises(SettingError, match="alpha must be a finite number"),
        temporarily_fused(llama_trio.models["finetuned"], subspace, float("inf")),
    ):
        pass
    with pytest.raises(SettingError, match="dtype must be a floating-point torch.dtype"):
        SafetySubspace.from_weights(llama_trio.aligned, llama_trio.base, dtype=torch.int8, progress=False)
    with pytest.raises(SettingError, match="threshold must be a finite number"):
        SafeLoRA(llama_trio.aligned, llama_trio.base, threshold=float("nan"))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--alpha", "nan"], "--alpha must be a finite number, got nan"),
        (["--alpha", "inf"], "--alpha must be a finite number, got inf"),
        (["--method", "resta", "--beta", "nan"], "--beta must be a finite number, got nan"),
        (["--method", "resta", "--drop-rate", "1"], r"--drop-rate must be in [0, 1), got 1.0"),
        (["--threshold", "nan"], "--threshold must be a finite number, got nan"),
        (["--max-shard-size", "0GB"], "--max-shard-size must be at least 1 byte"),
        (["--max-shard-size", "2 parsecs"], "--max-shard-size must be a size such as"),
        (["--eta", "nan"], "eta must be a finite number, got nan"),
        (["--max-rank", "0"], "max_rank must be an integer >= 1, got 0"),
    ],
)
def test_cli_refuses_bad_numbers_in_one_line_and_touches_nothing(llama_trio, tmp_path, extra, message):
    inputs = [llama_trio.aligned, llama_trio.base, llama_trio.finetuned]
    before = tree_hashes(*inputs)
    code, _, err = run_cli(
        "realign",
        "--aligned",
        llama_trio.aligned,
        "--unaligned",
        llama_trio.base,
        "--finetuned",
        llama_trio.finetuned,
        "--output",
        tmp_path / "out",
        *extra,
    )
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and message in lines[0] and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == [] and tree_hashes(*inputs) == before


def test_resta_refuses_a_non_finite_safety_vector_and_writes_nothing(llama_trio, tmp_path):
    import shutil

    from safetensors.torch import save_file

    broken = tmp_path / "aligned"
    shutil.copytree(llama_trio.aligned, broken)
    tensors = load_file(broken / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*hold NaN or inf"):
        realign_checkpoint(
            llama_trio.finetuned,
            tmp_path / "out",
            method="resta",
            aligned=broken,
            unaligned=llama_trio.base,
            progress=False,
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["aligned"]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"alphas": []}, "alphas must be a non-empty list"),
        ({"target": 1.5}, r"target must be in \[0, 1\], got 1.5"),
    ],
)
def test_auto_alpha_settings_are_checked_where_they_enter(settings, message):
    with pytest.raises(SettingError, match=message):
        AutoAlphaConfig(**settings)
