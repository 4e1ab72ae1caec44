import json

import pytest
import torch
from conftest import load_dir, run_cli, state
from safetensors.torch import load_file, save_file
from test_subspace import dense_lssf, rel
from transformers import AutoModelForCausalLM, AutoTokenizer

from lssf_lightning.cli import main
from lssf_lightning.config import SubspaceConfig
from lssf_lightning.core.baselines import safelora_project
from lssf_lightning.realign import realign_checkpoint
from lssf_lightning.subspace import SafetySubspace


def test_realign_llama_end_to_end_loads_and_matches_the_formula(llama_trio, tmp_path):
    out = tmp_path / "realigned"
    code = main(
        [
            "realign",
            "--aligned",
            llama_trio.aligned,
            "--unaligned",
            llama_trio.base,
            "--finetuned",
            llama_trio.finetuned,
            "--output",
            out,
            "--eta",
            "0.8",
            "--alpha",
            "1.5",
            "--max-shard-size",
            "60KB",
        ]
    )
    assert code == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    model = AutoModelForCausalLM.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)
    ft, al, ba = (state(llama_trio.models[n]) for n in ("finetuned", "aligned", "base"))
    got = state(model)
    subspace = SafetySubspace.from_weights(al, ba, SubspaceConfig(eta=0.8), progress=False)
    for key in subspace:
        expected, _ = dense_lssf(ft[key], al[key], ba[key], 0.8, 1.5)
        assert rel(got[key], expected) < 1e-5, key
    for key in set(ft) - set(subspace.keys()):
        assert torch.equal(got[key], ft[key]), key
    assert not list(tmp_path.glob(".realigned*")), "temporary directories left behind"


def test_realign_gpt2_end_to_end(gpt2_trio, tmp_path):
    out = tmp_path / "gpt2-realigned"
    report = realign_checkpoint(
        gpt2_trio.finetuned, out, aligned=gpt2_trio.aligned, unaligned=gpt2_trio.base, progress=False
    )
    assert report.edited == 8
    got = state(AutoModelForCausalLM.from_pretrained(out))
    ft, al, ba = (state(gpt2_trio.models[n]) for n in ("finetuned", "aligned", "base"))
    key = "transformer.h.1.attn.c_attn.weight"
    expected, _ = dense_lssf(ft[key], al[key], ba[key], 0.9, 1.0, transposed=True)
    assert rel(got[key], expected) < 1e-5


def test_precomputed_subspace_gives_the_same_output(llama_trio, tmp_path):
    subspace_file = tmp_path / "s.safetensors"
    assert (
        main(
            [
                "subspace",
                "--aligned",
                llama_trio.aligned,
                "--unaligned",
                llama_trio.base,
                "--output",
                subspace_file,
            ]
        )
        == 0
    )
    realign_checkpoint(llama_trio.finetuned, tmp_path / "a", subspace=subspace_file, progress=False)
    realign_checkpoint(
        llama_trio.finetuned,
        tmp_path / "b",
        aligned=llama_trio.aligned,
        unaligned=llama_trio.base,
        progress=False,
    )
    a, b = load_dir(tmp_path / "a"), load_dir(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resta_adds_the_whole_safety_vector_and_dare_is_seeded(llama_trio, tmp_path):
    realign_checkpoint(
        llama_trio.finetuned,
        tmp_path / "resta",
        method="resta",
        beta=0.5,
        aligned=llama_trio.aligned,
        unaligned=llama_trio.base,
        progress=False,
    )
    ft, al, ba = (state(llama_trio.models[n]) for n in ("finetuned", "aligned", "base"))
    got = load_dir(tmp_path / "resta")
    q = "model.layers.0.self_attn.q_proj.weight"
    assert torch.allclose(got[q], ft[q] + 0.5 * (al[q] - ba[q]), atol=1e-7)
    assert torch.equal(got["model.embed_tokens.weight"], ft["model.embed_tokens.weight"])
    for name in ("d1", "d2"):
        realign_checkpoint(
            llama_trio.finetuned,
            tmp_path / name,
            method="resta",
            drop_rate=0.5,
            seed=3,
            aligned=llama_trio.aligned,
            unaligned=llama_trio.base,
            progress=False,
        )
    d1, d2 = load_dir(tmp_path / "d1"), load_dir(tmp_path / "d2")
    assert torch.equal(d1[q], d2[q])
    added = (d1[q] - ft[q]) / (al[q] - ba[q])
    kept = (added - 2).abs() < 1e-3
    assert 0.4 < kept.float().mean() < 0.6 and torch.all(kept | (added.abs() < 1e-3))


@pytest.fixture(scope="module")
def lora_adapter(llama_trio, tmp_path_factory):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(llama_trio.aligned),
        peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
        ),
    )
    path = tmp_path_factory.mktemp("adapter") / "lora"
    model.save_pretrained(path)
    return path, model


def test_lssf_on_a_lora_adapter_is_merged_plus_correction(llama_trio, lora_adapter, tmp_path):
    path, model = lora_adapter
    import copy

    merged = state(copy.deepcopy(model).merge_and_unload())
    realign_checkpoint(
        path, tmp_path / "out", aligned=llama_trio.aligned, unaligned=llama_trio.base, progress=False
    )
    got = state(AutoModelForCausalLM.from_pretrained(tmp_path / "out"))
    al, ba = (state(llama_trio.models[n]) for n in ("aligned", "base"))
    for key in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight"):
        expected, _ = dense_lssf(merged[key], al[key], ba[key], 0.9, 1.0)
        assert rel(got[key], expected) < 1e-5, key


def test_safelora_projects_low_cosine_layers(llama_trio, lora_adapter, tmp_path):
    path, model = lora_adapter
    report = realign_checkpoint(
        path,
        tmp_path / "safe",
        method="safelora",
        threshold=0.99,
        aligned=llama_trio.aligned,
        unaligned=llama_trio.base,
        progress=False,
    )
    assert report.edited == 6 and report.details["projected"] == "6/6 layers"
    got = state(AutoModelForCausalLM.from_pretrained(tmp_path / "safe"))
    al, ba = (state(llama_trio.models[n]) for n in ("aligned", "base"))
    key = "model.layers.1.self_attn.v_proj.weight"
    layer = model.base_model.model.model.layers[1].self_attn.v_proj
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    v = (al[key] - ba[key]).double()
    c = v @ v.T / torch.linalg.matrix_norm(v)
    expected = al[key].double() + 2.0 * (c @ b.double()) @ a.double()
    assert rel(got[key], expected) < 1e-5
    assert safelora_project(a, b, v.float(), 0.99)[2]
    with pytest.raises(ValueError, match="safelora needs a LoRA run"):
        realign_checkpoint(
            llama_trio.finetuned,
            tmp_path / "x",
            method="safelora",
            aligned=llama_trio.aligned,
            unaligned=llama_trio.base,
            progress=False,
        )


def test_cli_errors_are_one_line_without_traceback(llama_trio, gpt2_trio, tmp_path):
    base = ["realign", "--aligned", llama_trio.aligned, "--unaligned", llama_trio.base]
    cases = {
        "missing": (
            [*base, "--finetuned", tmp_path / "nope", "--output", tmp_path / "o1"],
            1,
            "no such file or directory",
        ),
        "mismatch": (
            [*base, "--finetuned", gpt2_trio.finetuned, "--output", tmp_path / "o2"],
            1,
            "no counterpart",
        ),
        "option": (
            [*base, "--finetuned", llama_trio.finetuned, "--output", tmp_path / "o3", "--bogus"],
            2,
            "unrecognized arguments: --bogus",
        ),
        "eta": (
            [*base, "--finetuned", llama_trio.finetuned, "--output", tmp_path / "o4", "--eta", "2"],
            2,
            "eta must be in (0, 1], got 2.0",
        ),
        "alpha": (
            [*base, "--finetuned", llama_trio.finetuned, "--output", tmp_path / "o5", "--alpha", "nan"],
            2,
            "--alpha must be a finite number, got nan",
        ),
        "exists": (
            [*base, "--finetuned", llama_trio.finetuned, "--output", llama_trio.base],
            1,
            "is the input",
        ),
    }
    for name, (args, code, message) in cases.items():
        returncode, _, stderr = run_cli(*args)
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert returncode == code, (name, stderr)
        assert message in lines[-1] and "Traceback" not in stderr, (name, stderr)
        assert len([line for line in lines if "error" in line]) == 1, (name, stderr)
    assert not (tmp_path / "o2").exists()


def test_non_finite_weights_fail_and_leave_nothing_behind(llama_trio, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    tensors = load_file(llama_trio.finetuned / "model.safetensors")
    tensors["model.norm.weight"][3] = float("inf")
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"model\.norm\.weight.* holds NaN or inf"):
        realign_checkpoint(broken, out, aligned=llama_trio.aligned, unaligned=llama_trio.base, progress=False)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["broken"]


def test_overwrite_replaces_atomically(llama_trio, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model-00001-of-00002.safetensors").write_text("old")  # a shard of an older output
    realign_checkpoint(
        llama_trio.finetuned,
        out,
        aligned=llama_trio.aligned,
        unaligned=llama_trio.base,
        overwrite=True,
        progress=False,
    )
    assert not (out / "model-00001-of-00002.safetensors").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_inspect_prints_the_table_and_plots(llama_trio, tmp_path):
    subspace_file = tmp_path / "s.safetensors"
    SafetySubspace.from_weights(llama_trio.aligned, llama_trio.base, progress=False).save(subspace_file)
    code, stdout, _ = run_cli("inspect", subspace_file, "--plot", tmp_path / "ranks.png")
    assert code == 0 and "model.layers.1.mlp.down_proj.weight" in stdout and "14 matrices" in stdout
    assert (tmp_path / "ranks.png").read_bytes()[:4] == b"\x89PNG"


def test_streamed_build_writes_the_same_weights_as_a_precomputed_subspace(llama_trio, tmp_path):
    subspace = SafetySubspace.from_weights(
        llama_trio.aligned, llama_trio.base, SubspaceConfig(eta=0.7), progress=False
    )
    with_subspace = realign_checkpoint(
        llama_trio.finetuned, tmp_path / "a", subspace=subspace, alpha=1.5, progress=False
    )
    streamed = realign_checkpoint(
        llama_trio.finetuned,
        tmp_path / "b",
        aligned=llama_trio.aligned,
        unaligned=llama_trio.base,
        config=SubspaceConfig(eta=0.7),
        alpha=1.5,
        progress=False,
    )
    first, second = load_dir(tmp_path / "a"), load_dir(tmp_path / "b")
    assert first.keys() == second.keys() and streamed.edited == with_subspace.edited == len(subspace) > 0
    for key in first:
        assert torch.equal(first[key], second[key]), key
    ranks = list(subspace.ranks.values())
    assert streamed.details["mean_rank"] == round(sum(ranks) / len(ranks), 1)
