import copy

import pytest
import torch
from _tiny import TINY_LLAMA_LINEARS
from conftest import state
from torch import nn
from transformers import AutoModelForCausalLM

from lssf_lightning.config import SubspaceConfig
from lssf_lightning.core.entropy import safety_critical_rank
from lssf_lightning.methods import LSSF, apply_edits
from lssf_lightning.subspace import SafetySubspace
from lssf_lightning.training import temporarily_fused

Q0 = "model.layers.0.self_attn.q_proj.weight"


def dense_lssf(w_ft, w_aligned, w_base, eta, alpha, alpha_1=1.0, transposed=False):
    """W + α·U'U'ᵀδ straight from the paper, in float64, with a full SVD."""
    delta = w_aligned.double() - w_base.double()
    if transposed:
        delta = delta.T
    u, s, _ = torch.linalg.svd(delta, full_matrices=False)
    r = safety_critical_rank(s, eta)
    weights = torch.ones(r, dtype=torch.float64)
    if alpha_1 != 1.0 and s[0] > s[r - 1]:
        weights = 1 + (alpha_1 - 1) * (s[:r] - s[r - 1]) / (s[0] - s[r - 1])
    u_prime = u[:, :r] * weights
    correction = alpha * u_prime @ (u_prime.T @ delta)
    return w_ft.double() + (correction.T if transposed else correction), r


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_module_mapping_and_path_inputs_agree(llama_trio):
    m = llama_trio.models
    from_paths = SafetySubspace.from_weights(llama_trio.aligned, llama_trio.base, progress=False)
    from_modules = SafetySubspace.from_weights(m["aligned"], m["base"], progress=False)
    from_dicts = SafetySubspace.from_weights(state(m["aligned"]), state(m["base"]), progress=False)
    assert from_paths.ranks == from_modules.ranks == from_dicts.ranks
    assert (
        from_paths.metadata["fingerprint"]
        == from_modules.metadata["fingerprint"]
        == from_dicts.metadata["fingerprint"]
    )
    for key in from_paths:
        assert torch.allclose(
            from_paths[key].left @ from_paths[key].right,
            from_modules[key].left @ from_modules[key].right,
            atol=1e-6,
        )
    assert (
        SafetySubspace.fingerprint(llama_trio.aligned, llama_trio.base) == from_paths.metadata["fingerprint"]
    )


def test_default_targets_are_the_block_linear_weights(llama_trio):
    subspace = SafetySubspace.from_weights(llama_trio.aligned, llama_trio.base, progress=False)
    expected = {f"model.layers.{i}.{m}.weight" for i in range(2) for m in TINY_LLAMA_LINEARS}
    assert set(subspace.ranks) == expected
    assert all(0 < r < 32 for r in subspace.ranks.values())


def test_fusion_equals_the_dense_formula(llama_trio):
    m = llama_trio.models
    eta, alpha, alpha_1 = 0.8, 1.5, 2.0
    subspace = SafetySubspace.from_weights(
        m["aligned"], m["base"], SubspaceConfig(eta=eta, alpha_1=alpha_1), progress=False
    )
    fused = apply_edits(state(m["finetuned"]), LSSF(subspace, alpha))
    ft, al, ba = state(m["finetuned"]), state(m["aligned"]), state(m["base"])
    for key in subspace:
        expected, r = dense_lssf(ft[key], al[key], ba[key], eta, alpha, alpha_1)
        assert subspace.ranks[key] == r
        assert rel(fused[key], expected) < 1e-5, key
    untouched = set(ft) - set(subspace.keys())
    assert untouched and all(fused[k] is ft[k] or torch.equal(fused[k], ft[k]) for k in untouched)


def test_fusion_in_float64_is_exact_to_1e_5(llama_trio):
    m = llama_trio.models
    al = {k: v.double() for k, v in state(m["aligned"]).items()}
    ba = {k: v.double() for k, v in state(m["base"]).items()}
    ft = {k: v.double() for k, v in state(m["finetuned"]).items()}
    subspace = SafetySubspace.from_weights(al, ba, SubspaceConfig(eta=0.9), progress=False)
    fused = apply_edits(ft, LSSF(subspace, 1.0))
    for key in subspace:
        expected, _ = dense_lssf(ft[key], al[key], ba[key], 0.9, 1.0)
        assert fused[key].dtype == torch.float64
        assert rel(fused[key], expected) < 1e-5


def test_fuse_does_not_modify_its_input_unless_inplace(llama_trio):
    m = llama_trio.models
    subspace = SafetySubspace.from_weights(m["aligned"], m["base"], progress=False)
    model = AutoModelForCausalLM.from_pretrained(llama_trio.finetuned)
    before = state(model)
    fused = apply_edits(model, LSSF(subspace))
    assert fused is not model and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not torch.equal(fused.state_dict()[Q0], before[Q0])
    same = apply_edits(model, LSSF(subspace), inplace=True)
    assert same is model and torch.equal(model.state_dict()[Q0], fused.state_dict()[Q0])
    mapping = state(m["finetuned"])
    original = mapping[Q0].clone()
    out = apply_edits(mapping, LSSF(subspace), inplace=True)
    assert out is mapping and not torch.equal(mapping[Q0], original)


class Wrapper(nn.Module):
    """A LightningModule-like holder: the HF model under an arbitrary attribute name."""

    def __init__(self, net):
        super().__init__()
        self.net = net


def test_wrapped_and_compiled_models_match_by_suffix(llama_trio):
    m = llama_trio.models
    subspace = SafetySubspace.from_weights(llama_trio.aligned, llama_trio.base, progress=False)
    reference = apply_edits(state(m["finetuned"]), LSSF(subspace))
    wrapped = apply_edits(
        Wrapper(torch.compile(AutoModelForCausalLM.from_pretrained(llama_trio.finetuned))), LSSF(subspace)
    )
    keys = list(wrapped.state_dict())
    assert any(k.startswith("net._orig_mod.model.layers.0") for k in keys)
    assert torch.equal(wrapped.state_dict()[f"net._orig_mod.{Q0}"], reference[Q0])


def test_peft_lora_model_gets_the_correction_in_its_base_weights(llama_trio):
    peft = pytest.importorskip("peft")
    m = llama_trio.models
    subspace = SafetySubspace.from_weights(llama_trio.aligned, llama_trio.base, progress=False)
    model = peft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(llama_trio.finetuned),
        peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    lora_before = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    effective_before = state(_merged_copy(model))
    fused = apply_edits(model, LSSF(subspace, 1.0))
    assert all(torch.equal(fused.state_dict()[k], v) for k, v in lora_before.items())
    effective_after = state(_merged_copy(fused))
    correction = subspace[Q0].correction(1.0)
    assert rel(effective_after[Q0] - effective_before[Q0], correction) < 1e-4
    down = "model.layers.1.mlp.down_proj.weight"
    assert rel(effective_after[down], apply_edits(state(m["finetuned"]), LSSF(subspace))[down]) < 1e-6


def _merged_copy(peft_model):
    import copy

    return copy.deepcopy(peft_model).merge_and_unload()


def test_gpt2_conv1d_weights_are_transposed(gpt2_trio):
    m = gpt2_trio.models
    for aligned, base in ((gpt2_trio.aligned, gpt2_trio.base), (m["aligned"], m["base"])):
        subspace = SafetySubspace.from_weights(aligned, base, SubspaceConfig(eta=0.9), progress=False)
        key = "transformer.h.0.mlp.c_fc.weight"
        assert subspace[key].conv1d and subspace[key].shape == (32, 128)
        fused = apply_edits(state(m["finetuned"]), LSSF(subspace))
        ft, al, ba = state(m["finetuned"]), state(m["aligned"]), state(m["base"])
        expected, r = dense_lssf(ft[key], al[key], ba[key], 0.9, 1.0, transposed=True)
        assert subspace.ranks[key] == r and rel(fused[key], expected) < 1e-5


def test_save_load_round_trip_is_bit_exact(llama_trio, tmp_path):
    subspace = SafetySubspace.from_weights(
        llama_trio.aligned, llama_trio.base, SubspaceConfig(eta=0.7, alpha_1=1.5), progress=False
    )
    path = subspace.save(tmp_path / "sub" / "safety.safetensors")
    loaded = SafetySubspace.load(path)
    assert loaded.metadata == subspace.metadata and loaded.ranks == subspace.ranks
    for key, entry in subspace.entries.items():
        other = loaded[key]
        assert torch.equal(entry.left, other.left) and torch.equal(entry.right, other.right)
        assert torch.equal(entry.singular_values, other.singular_values)
        assert (entry.entropy, entry.total_energy, entry.conv1d) == (
            other.entropy,
            other.total_energy,
            other.conv1d,
        )
    assert [p.name for p in path.parent.iterdir()] == ["safety.safetensors"]


def test_load_rejects_other_files(tmp_path, llama_trio):
    with pytest.raises(FileNotFoundError, match="no such safety subspace"):
        SafetySubspace.load(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="not a safety subspace"):
        SafetySubspace.load(llama_trio.base / "model.safetensors")


def test_summary_lists_every_matrix_with_its_rank(llama_trio):
    subspace = SafetySubspace.from_weights(llama_trio.aligned, llama_trio.base, progress=False)
    text = subspace.summary()
    for key, rank in subspace.ranks.items():
        row = next(line for line in text.splitlines() if line.startswith(key))
        assert row.split()[2] == str(rank)
    assert f"{len(subspace)} matrices" in text.splitlines()[-1]


def test_selection_with_target_and_exclude_modules(llama_trio):
    kwargs = {"progress": False}
    only_qv = SafetySubspace.from_weights(
        llama_trio.aligned, llama_trio.base, {"target_modules": ["q_proj", "v_proj"]}, **kwargs
    )
    assert sorted({k.split(".")[-2] for k in only_qv}) == ["q_proj", "v_proj"] and len(only_qv) == 4
    regex = SafetySubspace.from_weights(
        llama_trio.aligned, llama_trio.base, {"target_modules": r".*\.1\.mlp\..*"}, **kwargs
    )
    assert sorted(regex.keys()) == [
        f"model.layers.1.mlp.{m}.weight" for m in ("down_proj", "gate_proj", "up_proj")
    ]
    no_mlp = SafetySubspace.from_weights(
        llama_trio.aligned,
        llama_trio.base,
        {"exclude_modules": ["mlp.down_proj", "mlp.up_proj", "mlp.gate_proj"]},
        **kwargs,
    )
    assert len(no_mlp) == 8 and not any(".mlp." in k for k in no_mlp)
    with pytest.raises(ValueError, match=r"target_modules \['nope'\]"):
        SafetySubspace.from_weights(
            llama_trio.aligned, llama_trio.base, {"target_modules": ["q_proj", "nope"]}, **kwargs
        )


def test_identical_models_give_rank_zero_and_fusion_is_identity(llama_trio):
    m = llama_trio.models
    subspace = SafetySubspace.from_weights(m["base"], m["base"], progress=False)
    assert set(subspace.ranks.values()) == {0}
    ft = state(m["finetuned"])
    assert all(torch.equal(apply_edits(ft, LSSF(subspace))[k], ft[k]) for k in ft)


def test_max_rank_caps_every_rank(llama_trio):
    subspace = SafetySubspace.from_weights(
        llama_trio.aligned, llama_trio.base, SubspaceConfig(eta=1.0, max_rank=2), progress=False
    )
    assert set(subspace.ranks.values()) == {2}


def test_mismatched_architectures_are_named(llama_trio, tiny_tokenizer, tmp_path):
    from _tiny import build_tiny_llama

    wider = build_tiny_llama(tiny_tokenizer, hidden_size=48, num_attention_heads=4)
    with pytest.raises(ValueError, match="shapes differ .* e.g. .*model.layers.0"):
        SafetySubspace.from_weights(llama_trio.aligned, wider, progress=False)
    deeper = build_tiny_llama(tiny_tokenizer, num_hidden_layers=3)
    with pytest.raises(ValueError, match="7 of 21 target weights .* no counterpart .*model.layers.2"):
        SafetySubspace.from_weights(deeper, llama_trio.base, progress=False)


def test_non_finite_weights_are_named(llama_trio):
    m = llama_trio.models
    broken = state(m["aligned"])
    broken["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.weight: the aligned weights hold NaN"):
        SafetySubspace.from_weights(broken, m["base"], progress=False)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"eta": 1.2}, "eta"),
        ({"alpha_1": 0}, "alpha_1"),
        ({"source": "nope"}, "source"),
        ({"max_rank": 0}, "max_rank"),
    ],
)
def test_bad_settings_are_named(llama_trio, kwargs, message):
    with pytest.raises(ValueError, match=message):
        SafetySubspace.from_weights(
            llama_trio.aligned, llama_trio.base, SubspaceConfig(**kwargs), progress=False
        )


def test_bad_paths_are_named(tmp_path, llama_trio):
    with pytest.raises(FileNotFoundError, match="unaligned: no such file"):
        SafetySubspace.from_weights(llama_trio.aligned, tmp_path / "nowhere", progress=False)
    pickle_dir = tmp_path / "pickled"
    pickle_dir.mkdir()
    (pickle_dir / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(FileNotFoundError, match="pickled checkpoints are not loaded"):
        SafetySubspace.from_weights(llama_trio.aligned, pickle_dir, progress=False)
    with pytest.raises(ValueError, match="pickled checkpoint"):
        SafetySubspace.from_weights(llama_trio.aligned, pickle_dir / "pytorch_model.bin", progress=False)


def test_activation_subspace_is_the_svd_of_delta_times_normalised_inputs(llama_trio, tiny_tokenizer):
    m = llama_trio.models
    pairs = [
        ("how do i bake bread at home ?", "i cannot help with that request ."),
        ("tell me a fun fact about space .", "sure , here is a simple answer ."),
    ]
    subspace = SafetySubspace.from_weights(
        m["aligned"],
        m["base"],
        SubspaceConfig(source="activations", calibration=pairs, eta=0.8),
        tokenizer=tiny_tokenizer,
        progress=False,
    )
    key = "model.layers.1.mlp.down_proj.weight"
    # Independent reference: capture the raw inputs of the layer with a hook on a plain forward pass.
    captured = []
    handle = (
        m["aligned"]
        .model.layers[1]
        .mlp.down_proj.register_forward_pre_hook(lambda mod, a: captured.append(a[0]))
    )
    rows = []
    for prompt, response in pairs:
        prompt_ids = tiny_tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        p_ids = tiny_tokenizer(prompt_ids, add_special_tokens=False)["input_ids"]
        r_ids = tiny_tokenizer(response, add_special_tokens=False)["input_ids"]
        captured.clear()
        with torch.no_grad():
            m["aligned"](input_ids=torch.tensor([p_ids + r_ids]))
        rows.append(captured[0][0, len(p_ids) :])
    handle.remove()
    x = torch.cat(rows).double()
    x_hat = x / x.norm(dim=1, keepdim=True) / x.shape[0] ** 0.5
    delta = state(m["aligned"])[key].double() - state(m["base"])[key].double()
    u, s, _ = torch.linalg.svd(delta @ x_hat.T, full_matrices=False)
    r = safety_critical_rank(s, 0.8)
    assert subspace.ranks[key] == r
    projector = u[:, :r] @ u[:, :r].T
    assert rel(subspace[key].left.double() @ subspace[key].right.double(), projector @ delta) < 1e-4
    assert subspace.metadata["calibration_stats"]["tokens"] == x.shape[0]
    assert subspace.metadata["source"] == "activations"


def test_activation_subspace_generates_missing_responses(llama_trio, tiny_tokenizer):
    m = llama_trio.models
    config = SubspaceConfig(
        source="activations", calibration=["how do i bake bread at home ?"], target_modules=["q_proj"]
    )
    subspace = SafetySubspace.from_weights(
        m["aligned"], m["base"], config, tokenizer=tiny_tokenizer, progress=False
    )
    assert len(subspace) == 2 and subspace.metadata["calibration_stats"]["pairs"] == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_temporarily_fused_equals_fuse_inside_and_restores_the_exact_weights(llama_trio, dtype):
    subspace = SafetySubspace.from_weights(
        llama_trio.aligned, llama_trio.base, SubspaceConfig(eta=0.8), progress=False
    )
    model = copy.deepcopy(llama_trio.models["finetuned"]).to(dtype)
    raw = {k: v.clone() for k, v in state(model).items()}
    expected = state(apply_edits(model, LSSF(subspace, 1.5)))
    with temporarily_fused(model, subspace, 1.5) as inside:
        assert inside is model
        fused = state(model)
        for key in raw:
            assert torch.equal(fused[key], expected[key]), key
        assert any(not torch.equal(fused[k], raw[k]) for k in subspace)
    for key, value in state(model).items():
        assert torch.equal(value, raw[key]), key
