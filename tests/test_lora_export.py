"""The safety correction as a peft LoRA adapter: loaded with peft it is the realigned model."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli, state
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from lssf_lightning.adapters import write_lora_adapter, write_model_adapter
from lssf_lightning.config import SubspaceConfig
from lssf_lightning.core.entropy import safety_critical_rank
from lssf_lightning.methods import LSSFErosion, LSSFReset, LSSFTwoSided
from lssf_lightning.realign import realign_checkpoint
from lssf_lightning.subspace import SafetySubspace
from lssf_lightning.validation import SettingError


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def merged(base_path, adapter_dir):
    return PeftModel.from_pretrained(load(base_path), adapter_dir).merge_and_unload().state_dict()


def rel_error(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def assert_same_model(actual: dict, expected: dict, tolerance=1e-4):
    assert set(actual) == set(expected)
    for key, value in expected.items():
        assert rel_error(actual[key], value) < tolerance, key


def dense_correction(trio, key, alpha, conv1d=False, eta=0.9):
    """``α·U_rU_rᵀδ`` straight from an SVD of ``δ`` (float64), in the checkpoint's layout."""
    delta = state(trio.models["aligned"])[key].double() - state(trio.models["base"])[key].double()
    delta = delta.T if conv1d else delta
    u, s, _ = torch.linalg.svd(delta, full_matrices=False)
    r = safety_critical_rank(s, eta)
    term = alpha * u[:, :r] @ u[:, :r].T @ delta
    return term.T if conv1d else term


@pytest.fixture(scope="module")
def llama_subspace(llama_trio):
    return SafetySubspace.from_weights(llama_trio.aligned, llama_trio.base, progress=False)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_adapter_equals_realign(arch, request, tmp_path):
    trio = request.getfixturevalue(f"{arch}_trio")
    subspace = SafetySubspace.from_weights(trio.aligned, trio.base, progress=False)
    report = write_lora_adapter(subspace, tmp_path / "adapter", alpha=0.7, base_model=trio.finetuned)
    realign_checkpoint(trio.finetuned, tmp_path / "realigned", subspace=subspace, alpha=0.7, progress=False)
    expected = load(tmp_path / "realigned").state_dict()
    assert_same_model(merged(trio.finetuned, tmp_path / "adapter"), expected)

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["fan_in_fan_out"] is (arch == "gpt2")
    assert config["r"] == config["lora_alpha"] == max(subspace.ranks.values()) == report.max_rank
    assert len(config["target_modules"]) == len(subspace) == len(report.ranks)
    for module, rank in config["rank_pattern"].items():
        assert config["alpha_pattern"][module] == rank < config["r"]
    # The dense formula, independently of the library: fine-tuned + α·U_rU_rᵀδ.
    key = "transformer.h.1.attn.c_attn.weight" if arch == "gpt2" else "model.layers.1.mlp.down_proj.weight"
    live = state(trio.models["finetuned"])[key].double()
    dense = live + dense_correction(trio, key, 0.7, conv1d=arch == "gpt2")
    assert rel_error(expected[key], dense) < 1e-4
    # Unmerged, the peft model computes the realigned model's logits.
    ids = torch.tensor([[1, 5, 7, 9, 11, 3]])
    peft_model = PeftModel.from_pretrained(load(trio.finetuned), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(
            peft_model(ids).logits, load(tmp_path / "realigned")(ids).logits, rtol=1e-4, atol=1e-5
        )


def test_size_and_rank_zero_matrices_left_out(llama_trio, tmp_path):
    aligned = state(llama_trio.models["aligned"])
    base = state(llama_trio.models["base"])
    untouched = "model.layers.0.mlp.up_proj.weight"
    aligned[untouched] = base[untouched].clone()  # δ = 0 → rank 0
    subspace = SafetySubspace.from_weights(aligned, base, progress=False)
    assert subspace.ranks[untouched] == 0
    report = write_lora_adapter(subspace, tmp_path / "a", base_model=llama_trio.finetuned)
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert "model.layers.0.mlp.up_proj" not in config["target_modules"]
    assert len(config["target_modules"]) == len(subspace) - 1
    weights = (tmp_path / "a" / "adapter_model.safetensors").stat().st_size
    assert report.adapter_bytes == weights
    model_bytes = sum(
        t.numel() * t.element_size() for t in llama_trio.models["finetuned"].state_dict().values()
    )
    assert report.model_bytes == model_bytes and weights < model_bytes
    ranks = subspace.ranks
    numbers = sum(r * sum(subspace.entries[k].shape) for k, r in ranks.items())
    assert report.parameters == numbers  # r·(d_out + d_in) per matrix, nothing else
    assert "MiB" in str(report) and "of the model's" in str(report)


def test_rank_cap(llama_trio, llama_subspace, tmp_path):
    report = write_lora_adapter(
        llama_subspace, tmp_path / "capped", base_model=llama_trio.finetuned, max_rank=2
    )
    config = json.loads((tmp_path / "capped" / "adapter_config.json").read_text())
    assert config["r"] == 2 and report.max_rank == 2
    assert report.energy_kept and all(0 < e < 1 for e in report.energy_kept.values())
    weights = merged(llama_trio.finetuned, tmp_path / "capped")
    live = state(llama_trio.models["finetuned"])
    key = "model.layers.0.self_attn.q_proj.weight"
    term = llama_subspace.entries[key].correction()
    u, s, vh = torch.linalg.svd(term)
    assert rel_error(weights[key] - live[key], u[:, :2] * s[:2] @ vh[:2]) < 1e-4


@pytest.fixture(scope="module")
def task_adapter(llama_trio, tmp_path_factory):
    """A LoRA fine-tune's adapter on the aligned model (rsLoRA and a rank pattern, so scales must be
    folded)."""
    model = load(llama_trio.aligned)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "up_proj"],
        use_rslora=True,
        rank_pattern={"up_proj": 2},
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    directory = tmp_path_factory.mktemp("task") / "adapter"
    peft_model.save_pretrained(directory)
    return directory


def test_combined_adapter_equals_task_lora_plus_correction(
    llama_trio, llama_subspace, task_adapter, tmp_path
):
    report = write_lora_adapter(
        llama_subspace,
        tmp_path / "combined",
        alpha=1.5,
        base_model=llama_trio.aligned,
        task_adapter=task_adapter,
    )
    realign_checkpoint(
        task_adapter,
        tmp_path / "realigned",
        aligned=llama_trio.aligned,
        subspace=llama_subspace,
        alpha=1.5,
        progress=False,
    )
    combined = merged(llama_trio.aligned, tmp_path / "combined")
    assert_same_model(combined, load(tmp_path / "realigned").state_dict())
    task = merged(llama_trio.aligned, task_adapter)
    key = "model.layers.0.self_attn.q_proj.weight"
    assert report.ranks["model.layers.0.self_attn.q_proj"] == 4 + llama_subspace.ranks[key]
    assert rel_error(combined[key], task[key] + dense_correction(llama_trio, key, 1.5)) < 1e-4
    other = "model.layers.0.self_attn.k_proj.weight"  # corrected, not adapted by the task
    assert rel_error(combined[other], task[other] + dense_correction(llama_trio, other, 1.5)) < 1e-4
    # A cap applies to the total rank: the task's 4 stay exact, the correction gets the rest.
    capped = write_lora_adapter(
        llama_subspace,
        tmp_path / "capped",
        base_model=llama_trio.aligned,
        task_adapter=task_adapter,
        max_rank=5,
    )
    assert capped.max_rank == 5
    with pytest.raises(ValueError, match="max_rank=4 leaves no rank for the correction"):
        write_lora_adapter(llama_subspace, tmp_path / "x", task_adapter=task_adapter, max_rank=4)


def test_refusals(llama_trio, llama_subspace, task_adapter, tmp_path):
    write_lora_adapter(llama_subspace, tmp_path / "a")
    with pytest.raises(FileExistsError):
        write_lora_adapter(llama_subspace, tmp_path / "a")
    write_lora_adapter(llama_subspace, tmp_path / "a", overwrite=True)
    with pytest.raises(SettingError, match="alpha must be a finite number"):
        write_lora_adapter(llama_subspace, tmp_path / "b", alpha=float("nan"))
    with pytest.raises(SettingError, match="max_rank"):
        write_lora_adapter(llama_subspace, tmp_path / "b", max_rank=0)
    with pytest.raises(ValueError, match="the correction is empty"):
        write_lora_adapter(llama_subspace, tmp_path / "b", alpha=0.0)
    config = json.loads((task_adapter / "adapter_config.json").read_text())
    saving = tmp_path / "saving"
    saving.mkdir()
    (saving / "adapter_model.safetensors").write_bytes(
        (task_adapter / "adapter_model.safetensors").read_bytes()
    )
    (saving / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": ["lm_head"]}))
    with pytest.raises(ValueError, match=r"uses \['modules_to_save'\]: a combined LoRA adapter cannot carry"):
        write_lora_adapter(llama_subspace, tmp_path / "b", task_adapter=saving)
    assert not (tmp_path / "b").exists()
    with pytest.raises(ValueError, match="inside"):  # never write into an input
        write_lora_adapter(llama_subspace, llama_trio.finetuned / "adapter", base_model=llama_trio.finetuned)
    assert not (llama_trio.finetuned / "adapter").exists()


def test_cli_realign_as_adapter(llama_trio, llama_subspace, task_adapter, tmp_path, capsys):
    from lssf_lightning.cli import main

    code, out, err = run_cli(
        "realign",
        "--as-adapter",
        "--finetuned",
        llama_trio.finetuned,
        "--aligned",
        llama_trio.aligned,
        "--unaligned",
        llama_trio.base,
        "--alpha",
        "0.5",
        "--output",
        tmp_path / "adapter",
    )
    assert code == 0, err
    assert "LoRA adapter:" in out and "of the model's" in out
    realign_checkpoint(
        llama_trio.finetuned, tmp_path / "realigned", subspace=llama_subspace, alpha=0.5, progress=False
    )
    assert_same_model(
        merged(llama_trio.finetuned, tmp_path / "adapter"), load(tmp_path / "realigned").state_dict()
    )
    # A LoRA fine-tune with a precomputed subspace and a rank cap: one combined adapter, rank <= 5.
    llama_subspace.save(tmp_path / "s.safetensors")
    assert (
        main(
            [
                "realign",
                "--as-adapter",
                "--finetuned",
                task_adapter,
                "--aligned",
                llama_trio.aligned,
                "--subspace",
                tmp_path / "s.safetensors",
                "--adapter-max-rank",
                "5",
                "--output",
                tmp_path / "combined",
            ]
        )
        == 0
    )  # in-process: the same parser and runner, faster
    assert json.loads((tmp_path / "combined" / "adapter_config.json").read_text())["r"] == 5
    capsys.readouterr()
    assert (
        main(
            [
                "realign",
                "--as-adapter",
                "--method",
                "resta",
                "--finetuned",
                llama_trio.finetuned,
                "--aligned",
                llama_trio.aligned,
                "--unaligned",
                llama_trio.base,
                "--output",
                tmp_path / "x",
            ]
        )
        == 1
    )
    assert "method 'resta' is not one" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_write_lora_adapter_of_a_subspace(llama_trio, llama_subspace, tmp_path):
    report = write_lora_adapter(llama_subspace, tmp_path / "a", alpha=0.7, base_model=llama_trio.finetuned)
    write_lora_adapter(llama_subspace, tmp_path / "b", alpha=0.7, base_model=llama_trio.finetuned)
    assert sorted(report.ranks.values()) == sorted(llama_subspace.ranks.values())
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


# -- the other LSSF forms (reset, erosion, two-sided): their corrections are low-rank too ----------------


FORMS = {
    "lssf-reset": lambda subspace, trio: LSSFReset(subspace, trio.base, alpha=0.8, add=0.3),
    "lssf-erosion": lambda subspace, trio: LSSFErosion(subspace, trio.base, alpha=1.0),
    "lssf-two-sided": lambda subspace, trio: LSSFTwoSided(subspace, trio.aligned, alpha=1.0, input_share=0.5),
}
FORM_OPTIONS = {
    "lssf-reset": {"alpha": 0.8, "add": 0.3},
    "lssf-erosion": {"alpha": 1.0},
    "lssf-two-sided": {"alpha": 1.0, "input_share": 0.5},
}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method", sorted(FORMS))
def test_form_adapter_equals_realign(arch, method, request, tmp_path):
    trio = request.getfixturevalue(f"{arch}_trio")
    # η = 0.99 for the two-sided form: ranks so high that 2r exceeds some matrices' smaller side
    config = SubspaceConfig(eta=0.99 if method == "lssf-two-sided" else 0.9)
    subspace = SafetySubspace.from_weights(trio.aligned, trio.base, config, progress=False)
    report = write_lora_adapter(
        FORMS[method](subspace, trio), tmp_path / "adapter", base_model=trio.finetuned
    )
    realign_checkpoint(
        trio.finetuned,
        tmp_path / "realigned",
        aligned=trio.aligned,
        unaligned=trio.base,
        subspace=subspace,
        method=method,
        progress=False,
        **FORM_OPTIONS[method],
    )
    assert_same_model(merged(trio.finetuned, tmp_path / "adapter"), load(tmp_path / "realigned").state_dict())
    if method == "lssf-two-sided":  # rank 2r (output and input side), at most min(d_out, d_in), losslessly
        expected = {
            k.removesuffix(".weight"): min(2 * r, *subspace.entries[k].shape)
            for k, r in subspace.ranks.items()
        }
        assert report.ranks == {m: r for m, r in expected.items() if r}
        assert any(2 * r > min(subspace.entries[k].shape) for k, r in subspace.ranks.items())


def test_reset_adapter_dense_formula(llama_trio, llama_subspace, tmp_path):
    """Reset α=1 puts the safety subspace back to the aligned model: W − U_rU_rᵀ(W − W_aligned)."""
    write_lora_adapter(
        LSSFReset(llama_subspace, llama_trio.base), tmp_path / "a", base_model=llama_trio.finetuned
    )
    key = "model.layers.1.self_attn.o_proj.weight"
    live, aligned, base = (
        state(llama_trio.models[k])[key].double() for k in ("finetuned", "aligned", "base")
    )
    u, s, _ = torch.linalg.svd(aligned - base, full_matrices=False)
    u = u[:, : safety_critical_rank(s, 0.9)]
    expected = live - u @ (u.T @ (live - aligned))
    assert rel_error(merged(llama_trio.finetuned, tmp_path / "a")[key], expected) < 1e-4


def test_two_sided_combined_adapter_for_lora(llama_trio, llama_subspace, task_adapter, tmp_path):
    """A LoRA fine-tune's ONE adapter with the two-sided reset (computed on the merged weights) equals
    realign's output, from the adapter directory and from the live peft model."""
    planner = LSSFTwoSided(llama_subspace, llama_trio.aligned, alpha=1.0, input_share=0.5)
    report = write_lora_adapter(
        planner, tmp_path / "combined", base_model=llama_trio.aligned, task_adapter=task_adapter
    )
    realign_checkpoint(
        task_adapter,
        tmp_path / "realigned",
        aligned=llama_trio.aligned,
        subspace=llama_subspace,
        method="lssf-two-sided",
        alpha=1.0,
        input_share=0.5,
        progress=False,
    )
    expected = load(tmp_path / "realigned").state_dict()
    assert_same_model(merged(llama_trio.aligned, tmp_path / "combined"), expected)
    # The reset acts on the task update only: rank ≤ 2 × the task's 4 (q_proj) and 2 (up_proj); the matrices
    # the task left unchanged have a zero correction and are left out.
    layer = "model.layers.0"
    assert report.ranks[f"{layer}.self_attn.q_proj"] == 4 + min(
        8, 2 * llama_subspace.ranks[f"{layer}.self_attn.q_proj.weight"]
    )
    assert report.ranks[f"{layer}.mlp.up_proj"] <= 2 + 4
    assert f"{layer}.self_attn.k_proj" not in report.ranks
    assert set(report.ranks) == {m for m in report.ranks if m.endswith(("q_proj", "v_proj", "up_proj"))}

    live = PeftModel.from_pretrained(load(llama_trio.aligned), task_adapter)
    before = {k: v.clone() for k, v in live.state_dict().items()}
    write_model_adapter(live, planner, tmp_path / "live")
    assert_same_model(merged(llama_trio.aligned, tmp_path / "live"), expected)
    assert all(torch.equal(v, before[k]) for k, v in live.state_dict().items())  # the model is untouched
    assert not live.base_model.model.model.layers[0].self_attn.q_proj.disable_adapters  # adapters back on


def test_form_adapter_refusals(llama_trio, llama_subspace, tmp_path):
    reset = LSSFReset(llama_subspace, llama_trio.base)
    with pytest.raises(
        ValueError, match="reset correction depends on the fine-tuned weights: pass base_model"
    ):
        write_lora_adapter(reset, tmp_path / "a")
    with pytest.raises(ValueError, match="alpha=0.5 is given twice"):
        write_lora_adapter(reset, tmp_path / "a", alpha=0.5, base_model=llama_trio.finetuned)
    with pytest.raises(TypeError, match="correction must be a SafetySubspace or a low-rank fusion planner"):
        write_lora_adapter(object(), tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_cli_two_sided_adapter_for_lora(llama_trio, llama_subspace, task_adapter, tmp_path):
    from lssf_lightning.cli import main

    llama_subspace.save(tmp_path / "s.safetensors")
    common = [
        "--finetuned",
        task_adapter,
        "--aligned",
        llama_trio.aligned,
        "--subspace",
        tmp_path / "s.safetensors",
        "--method",
        "lssf-two-sided",
        "--input-share",
        "0.5",
    ]
    assert main(["realign", "--as-adapter", *common, "--output", tmp_path / "adapter"]) == 0
    assert main(["realign", *common, "--output", tmp_path / "realigned"]) == 0
    assert_same_model(
        merged(llama_trio.aligned, tmp_path / "adapter"), load(tmp_path / "realigned").state_dict()
    )
