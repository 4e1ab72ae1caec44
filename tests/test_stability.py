"""The share of an update inside the safety subspace, and the per-step guard's rank-r edits (full and LoRA),
against dense computations on tiny real models."""

import copy

import pytest
import torch
from conftest import state
from transformers import AutoModelForCausalLM

from lssf_lightning.core.entropy import safety_critical_rank
from lssf_lightning.core.hold import hold_out_adapter_, reset_in_place_
from lssf_lightning.core.stability import (
    factored_energy,
    layer_group,
    orthonormal_basis,
    orthonormal_rows,
    share_by_group,
    subspace_energy,
)
from lssf_lightning.forms import hold_out_lora_, lora_b_weights
from lssf_lightning.stability import UpdateShare, lora_scalings, metric_names
from lssf_lightning.subspace import SafetySubspace


def dense_basis(trio, key, eta=0.9):
    """U_r of δ's SVD, straight from the saved models (float64), output-major."""
    aligned, base = state(trio.models["aligned"])[key].double(), state(trio.models["base"])[key].double()
    delta = aligned - base
    delta = delta.T if "transformer.h." in key else delta  # GPT-2 Conv1D stores (d_in, d_out)
    u, s, _ = torch.linalg.svd(delta, full_matrices=False)
    return u[:, : safety_critical_rank(s, eta)]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_share_since_start_matches_the_dense_share_per_group(arch, llama_trio, gpt2_trio):
    trio = llama_trio if arch == "llama" else gpt2_trio
    subspace = SafetySubspace.from_weights(trio.aligned, trio.base, progress=False)
    model = AutoModelForCausalLM.from_pretrained(trio.aligned)
    live = dict(model.named_parameters())
    matched = subspace.match(list(live))
    share = UpdateShare(subspace, live, matched)
    start = {k: v.detach().clone() for k, v in live.items()}
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for key in matched:  # an update partly inside the subspace, partly outside
            weight = live[key]
            basis = dense_basis(trio, key)
            noise = 0.01 * torch.randn(weight.shape, generator=g)
            inside = basis.float() @ torch.randn(basis.shape[1], basis.shape[0], generator=g) @ (
                noise.T if "transformer.h." in key else noise)
            weight.add_(noise + 0.5 * (inside.T if "transformer.h." in key else inside))
    sums = {}
    for key in matched:
        basis = dense_basis(trio, key)
        update = live[key].detach().double() - start[key].double()
        update = update.T if "transformer.h." in key else update
        inside = (basis @ basis.T @ update).square().sum().item()
        for group in ("all", layer_group(key)):
            acc = sums.setdefault(group, [0.0, 0.0])
            acc[0] += inside
            acc[1] += update.square().sum().item()
    expected = {group: a / b for group, (a, b) in sums.items()}
    measured = share.since_start(live)
    assert set(measured) == set(expected) and {"attention", "mlp"} <= set(measured)
    for group, value in expected.items():
        assert measured[group] == pytest.approx(value, rel=1e-4), group
    assert 0.05 < measured["all"] < 0.95
    assert share.drift(live) == pytest.approx(sums["all"][0] ** 0.5, rel=1e-4)
    assert share.since_mark(live) is None
    share.mark(live)
    assert share.since_mark(live) == {group: 0.0 for group in measured}  # nothing moved since the mark
    names = metric_names(measured)
    assert names["lssf/update_in_subspace"] == measured["all"] and "lssf/update_in_subspace/mlp" in names


def test_share_edges():
    basis = torch.linalg.qr(torch.randn(6, 2, dtype=torch.float64))[0]
    inside, total = subspace_energy(basis, basis @ torch.randn(2, 3, dtype=torch.float64))
    assert inside == pytest.approx(total)
    assert share_by_group({"a.mlp.up_proj.weight": (0.0, 0.0)}) == {"all": 0.0, "mlp": 0.0}
    assert layer_group("model.layers.0.self_attn.q_proj.weight") == "attention"
    assert layer_group("transformer.h.0.mlp.c_fc.weight") == "mlp"
    with pytest.raises(ValueError, match="does not match"):
        subspace_energy(basis, torch.zeros(5, 3))


@pytest.mark.parametrize("alpha", [1.0, 2.0])
@pytest.mark.parametrize("conv1d", [False, True])
def test_reset_in_place_is_the_dense_reset(alpha, conv1d):
    g = torch.Generator().manual_seed(0)
    left = torch.linalg.qr(torch.randn(8, 3, generator=g, dtype=torch.float64))[0] * 1.3
    aligned = torch.randn(8, 5, generator=g, dtype=torch.float64)
    weight = aligned + 0.2 * torch.randn(8, 5, generator=g, dtype=torch.float64)
    expected = weight - alpha * left @ left.T @ (weight - aligned)
    stored = weight.T.clone() if conv1d else weight.clone()
    pointer = stored.data_ptr()
    reset_in_place_(stored, left, left.T @ aligned, alpha, conv1d=conv1d)
    assert stored.data_ptr() == pointer
    assert torch.allclose(stored.T if conv1d else stored, expected, atol=1e-12)
    if alpha == 1.0:
        unit = left / left.norm(dim=0)
        # with a weighted U' the reset at α = 1 scales the subspace coordinates by (1 − α_i²) = −0.69
        assert torch.allclose(unit.T @ ((stored.T if conv1d else stored) - aligned),
                              -0.69 * unit.T @ (weight - aligned), atol=1e-12)
    plain = weight.float().clone()
    unit = (left / left.norm(dim=0)).float()
    reset_in_place_(plain, unit, unit.T @ aligned.float(), 1.0)
    assert (unit.T @ (plain - aligned.float())).abs().max() < 1e-5  # the guard's invariant, float32


def test_lora_hold_out_is_the_reset_of_the_merged_weights(llama_trio):
    from peft import LoraConfig, get_peft_model

    subspace = SafetySubspace.from_weights(llama_trio.aligned, llama_trio.base, progress=False)
    aligned = AutoModelForCausalLM.from_pretrained(llama_trio.aligned)
    reference = state(aligned)
    model = get_peft_model(aligned, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=g))
    pairs = lora_b_weights(model, subspace)
    assert len(pairs) == 4  # q_proj and up_proj of 2 layers
    merged_before = state(copy.deepcopy(model).merge_and_unload())
    assert hold_out_lora_(model, subspace, 1.0) == 4
    merged_after = state(copy.deepcopy(model).merge_and_unload())
    for name in pairs:
        u = subspace[name].left.double()
        w0, wa = merged_before[name].double(), reference[name].double()
        expected = w0 - u @ u.T @ (w0 - wa)
        assert torch.allclose(merged_after[name].double(), expected, atol=1e-5), name
        assert (u.T @ (merged_after[name].double() - wa)).abs().max() < 1e-5, name
    untouched = "model.layers.0.self_attn.k_proj.weight"
    assert torch.equal(merged_after[untouched], merged_before[untouched])
    b = torch.randn(6, 2, dtype=torch.float64)
    u = torch.linalg.qr(torch.randn(6, 2, dtype=torch.float64))[0]
    hold = b.clone()
    hold_out_adapter_(hold, u)
    assert torch.allclose(u.T @ hold, torch.zeros(2, 2, dtype=torch.float64), atol=1e-12)


def test_factored_energy_is_the_energy_of_the_product():
    g = torch.Generator().manual_seed(1)
    basis = torch.linalg.qr(torch.randn(7, 3, generator=g, dtype=torch.float64))[0]
    left, right = torch.randn(7, 4, generator=g, dtype=torch.float64), torch.randn(4, 5, generator=g,
                                                                                  dtype=torch.float64)
    inside, total = factored_energy(basis, left, right)
    assert (inside, total) == pytest.approx(subspace_energy(basis, left @ right), rel=1e-12)
    with pytest.raises(ValueError, match="do not match"):
        factored_energy(basis, left, right.T)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_share_on_a_lora_model_is_the_share_of_the_merged_update(arch, llama_trio, gpt2_trio):
    from peft import LoraConfig, get_peft_model

    trio = llama_trio if arch == "llama" else gpt2_trio
    targets = ["q_proj", "up_proj"] if arch == "llama" else ["c_attn", "c_fc"]
    subspace = SafetySubspace.from_weights(trio.aligned, trio.base, progress=False)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=arch == "gpt2")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(trio.aligned), config)
    g = torch.Generator().manual_seed(2)

    def step():
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_" in name:
                    parameter.add_(0.1 * torch.randn(parameter.shape, generator=g))

    step()  # B₀ ≠ 0: the start's adapter product is subtracted too
    live = dict(model.named_parameters())
    matched = {k: n for k, n in subspace.match(list(live)).items() if k.endswith("base_layer.weight")}
    assert len(matched) == 4
    share = UpdateShare(subspace, live, matched, lora_scalings(model))
    start = state(copy.deepcopy(model).merge_and_unload())
    step()
    end = state(copy.deepcopy(model).merge_and_unload())
    sums = {}
    for name in matched.values():
        basis = dense_basis(trio, name)
        update = end[name].double() - start[name].double()
        update = update.T if "transformer.h." in name else update
        for group in ("all", layer_group(name)):
            acc = sums.setdefault(group, [0.0, 0.0])
            acc[0] += (basis.T @ update).square().sum().item()
            acc[1] += update.square().sum().item()
    measured = share.since_start(live)
    assert set(measured) == set(sums)
    for group, (inside, total) in sums.items():
        assert 0 < inside < total
        assert measured[group] == pytest.approx(inside / total, rel=1e-4), group
    assert share.drift(live) == pytest.approx(sums["all"][0] ** 0.5, rel=1e-4)


def test_orthonormal_rows_from_row_blocks_span_what_qr_spans():
    g = torch.Generator().manual_seed(4)
    left = torch.randn(9, 3, generator=g, dtype=torch.float64)  # not even orthogonal columns
    gram = sum(block.T @ block for block in (left[:5], left[5:]))  # the blocks' sum, as the ranks' all-reduce
    rows = torch.cat([orthonormal_rows(left[:5], gram), orthonormal_rows(left[5:], gram)])
    assert torch.allclose(rows.T @ rows, torch.eye(3, dtype=rows.dtype), atol=1e-10)
    q = orthonormal_basis(left)
    assert torch.allclose(rows @ rows.T, q @ q.T, atol=1e-10)  # the same projection
    assert orthonormal_rows(left[:, :0], gram[:0, :0]).shape == (9, 0)
