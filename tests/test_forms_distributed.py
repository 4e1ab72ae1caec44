"""Every LSSF form of LSSFCallback under 2-process DDP and FSDP2 (ModelParallelStrategy, gloo), on real fits
(forms_dist_fit.py): the per-step reset guard keeps the safety subspace at the aligned state on every rank's
weights; FSDP2 checkpoints hold the dense form of the gathered raw weights, the live weights stay raw, and a
resume is bit-exact."""

import json

import pytest
import torch
from test_callback_forms import references
from test_forms import dense_form
from test_fsdp2 import torchrun, weights

from lssf_lightning.lightning.data import write_chat_jsonl

ROWS = [
    {"prompt": "how do i bake bread at home ?", "response": "sure , here is a simple answer ."},
    {"prompt": "what is the capital of france ?", "response": "please i cannot help with that request ."},
]


def run(strategy, trio, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"forms_{strategy}")
    train = write_chat_jsonl(out / "train.jsonl", ROWS * 4)  # 2 ranks x 2 steps of 2 rows
    torchrun("forms_dist_fit.py", strategy, trio.aligned, trio.base, train, out, timeout=600)
    return out, json.loads((out / "results.json").read_text())


def check_guard(out, results, trio):
    """After each optimizer step, U'ᵀ(W − W_aligned) = 0 on the gathered weights (reset, α = 1, α₁ = 1)."""
    assert results["guard"]["steps"] == 2
    left = weights(out / "subspace_left.safetensors")
    assert len(left) == 14
    moved = False
    for step in (1, 2):
        live = weights(out / f"guard_step{step}.safetensors")
        for key, u in left.items():
            aligned, _ = references(trio, key)
            assert (u.double().T @ (live[key].double() - aligned)).abs().max() < 1e-5, (step, key)
            moved = moved or not torch.allclose(live[key].double(), aligned, atol=1e-4)
    assert moved  # the run still learned outside the subspace


def test_ddp_guard_keeps_the_subspace_at_the_aligned_state(llama_trio, tmp_path_factory):
    out, results = run("ddp", llama_trio, tmp_path_factory)
    assert results["guard"]["type"] == "CoordinateForms"  # full weights on every rank
    check_guard(out, results, llama_trio)


@pytest.fixture(scope="module")
def fsdp2_run(llama_trio, tmp_path_factory):
    return run("fsdp2", llama_trio, tmp_path_factory)


def test_fsdp2_guard_is_shard_local_with_one_all_reduce_per_matrix(fsdp2_run, llama_trio):
    out, results = fsdp2_run
    guard = results["guard"]
    assert guard["type"] == "ShardedForms"
    check_guard(out, results, llama_trio)
    # rank 0's count: one r × d_in float32 all-reduce per matrix and application
    sizes = [r * d_in * 4 for r, d_in in guard["right_shapes"].values()]
    assert guard["cost"]["calls"] == 2 * len(sizes) == 28
    assert guard["cost"]["bytes"] == 2 * sum(sizes)


@pytest.fixture(scope="module")
def fsdp2_lora_run(llama_trio, tmp_path_factory):
    return run("fsdp2-lora", llama_trio, tmp_path_factory)


def lora_layers(live, left):
    """``{subspace name: state-dict prefix of its LoRA layer}``."""
    found = {}
    for name in left:
        key = next(k for k in live if k.endswith(name.removesuffix(".weight") + ".base_layer.weight"))
        found[name] = key.removesuffix("base_layer.weight")
    return found


def test_fsdp2_lora_guard_holds_the_sharded_adapters_out_of_the_subspace(fsdp2_lora_run, llama_trio):
    out, results = fsdp2_lora_run
    lora = results["lora"]
    assert lora["type"] == "LoraHoldOut" and lora["steps"] == 2
    assert lora["b_types"] == ["DTensor"] * 4  # q_proj and up_proj of 2 layers, sharded by rows
    # one r × r_lora float32 all-reduce per adapter and step (rank 0's tally)
    assert lora["cost"]["calls"] == 2 * 4
    assert lora["cost"]["bytes"] == 2 * sum(r * 4 * 4 for r in lora["ranks"].values())
    left = weights(out / "lora_left.safetensors")
    learned = False
    for step in (1, 2):
        live = weights(out / f"lora_step{step}.safetensors")
        for name, prefix in lora_layers(live, left).items():
            u = left[name]
            aligned, _ = references(llama_trio, "model." + name)
            assert torch.equal(live[prefix + "base_layer.weight"].double(), aligned)  # the frozen base
            # W_merged − W_aligned = scaling·B·A (scaling = lora_alpha / r = 2)
            update = 2.0 * live[prefix + "lora_B.default.weight"].double() @ live[
                prefix + "lora_A.default.weight"].double()
            assert (u.double().T @ update).abs().max() < 1e-6, (step, name)
            learned = learned or update.abs().max() > 1e-4
    assert learned  # the adapters still learned outside the subspace


def test_fsdp2_lora_update_share_matches_the_dense_share_of_the_merged_update(fsdp2_lora_run):
    out, results = fsdp2_lora_run
    share = results["lora_share"]
    assert share["watched"] == 4  # the adapted layers only
    assert share["cost"]["calls"] == 0  # the adapters are gathered, no all-reduce
    left = weights(out / "lora_left.safetensors")
    start, end = weights(out / "lora_share_start.safetensors"), weights(out / "lora_share_end.safetensors")
    inside = total = 0.0
    for name, prefix in lora_layers(end, left).items():
        basis, _ = torch.linalg.qr(left[name].double())

        def merged(state, prefix=prefix):  # the update of the merged weight: scaling · B · A (scaling 2)
            b, a = (state[prefix + f"lora_{m}.default.weight"].double() for m in "BA")
            return 2.0 * b @ a

        update = merged(end) - merged(start)
        inside += (basis.T @ update).square().sum().item()
        total += update.square().sum().item()
    assert 0 < inside < total
    metrics = share["metrics"]
    assert metrics["lssf/update_in_subspace"] == pytest.approx(inside / total, rel=1e-4)
    assert metrics["lssf/subspace_drift"] == pytest.approx(inside**0.5, rel=1e-4)


def test_fsdp2_update_share_matches_the_dense_share_on_the_gathered_weights(fsdp2_run, llama_trio):
    # the lssf-reset checkpoint-mode run: live weights raw, so the update since fit start goes partly inside
    out, results = fsdp2_run
    share = results["lssf-reset"]["share"]
    start, end = weights(out / "lssf-reset_start.safetensors"), weights(out / "lssf-reset_end.safetensors")
    left = weights(out / "subspace_left.safetensors")
    sums = {}
    for key, u in left.items():
        basis, _ = torch.linalg.qr(u.double())
        update = end[key].double() - start[key].double()
        inside, total = (basis.T @ update).square().sum().item(), update.square().sum().item()
        for group in ("all", "mlp" if ".mlp." in key else "attention"):
            acc = sums.setdefault(group, [0.0, 0.0])
            acc[0], acc[1] = acc[0] + inside, acc[1] + total
    metrics = share["metrics"]
    assert 0.001 < sums["all"][0] / sums["all"][1] < 1
    assert metrics["lssf/update_in_subspace"] == pytest.approx(sums["all"][0] / sums["all"][1], rel=1e-3)
    for group in ("attention", "mlp"):
        assert metrics[f"lssf/update_in_subspace/{group}"] == pytest.approx(sums[group][0] / sums[group][1],
                                                                            rel=1e-3)
    assert metrics["lssf/subspace_drift"] == pytest.approx(sums["all"][0] ** 0.5, rel=1e-3)
    # per matrix: one r × r all-reduce (the Gram matrix, at fit start) and one for the epoch's measurement
    assert share["cost"]["calls"] == 2 * 14


CHECKPOINT_FORMS = [("lssf-reset", 2.0), ("lssf-erosion", 1.0), ("lssf-two-sided", 1.0)]


@pytest.mark.parametrize("method,alpha", CHECKPOINT_FORMS)
def test_fsdp2_checkpoint_holds_the_dense_form_and_live_weights_stay_raw(fsdp2_run, llama_trio, method,
                                                                         alpha):
    out, results = fsdp2_run
    found = {k: v for k, v in results[method].items() if k != "share"}
    assert found == {"corrections_world": 2, "fixups_world": 2, "info": method}
    live, saved = weights(out / f"{method}_end.safetensors"), weights(out / f"ckpt_{method}.safetensors")
    left = weights(out / "subspace_left.safetensors")
    from lssf_lightning.config import SubspaceConfig
    from lssf_lightning.training import build_subspace

    subspace = build_subspace(str(llama_trio.aligned), str(llama_trio.base), SubspaceConfig())
    other = weights(out / "lssf-reset_end.safetensors")  # another form's run from the same seed and data
    assert live.keys() == saved.keys() == other.keys()
    changed = 0
    for key, value in live.items():
        if key in left:
            aligned, base = references(llama_trio, key)
            expected = dense_form(method, value.double(), aligned, base, subspace[key.removeprefix("model.")],
                                  alpha)
            assert torch.allclose(saved[key].double(), expected, atol=1e-5), key
            changed += not torch.allclose(saved[key], value)
        else:
            assert torch.equal(saved[key], value), key
        assert torch.equal(value, other[key]), key  # the live weights stayed raw: no form touched them
    assert changed  # the form did edit the checkpoint


def test_fsdp2_exports_of_a_form_hold_the_dense_form_of_the_gathered_weights(fsdp2_run, llama_trio):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lssf_lightning.config import SubspaceConfig
    from lssf_lightning.training import build_subspace

    out, _ = fsdp2_run
    live = weights(out / "lssf-two-sided_end.safetensors")  # the raw weights at train end (gathered)
    exported = weights(out / "export_two_sided" / "model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(llama_trio.aligned, dtype=torch.float32)
    model.load_state_dict({k.removeprefix("model."): v for k, v in live.items()})
    merged = PeftModel.from_pretrained(model, out / "adapter_two_sided").merge_and_unload().state_dict()
    subspace = build_subspace(str(llama_trio.aligned), str(llama_trio.base), SubspaceConfig())
    left = weights(out / "subspace_left.safetensors")
    for key, value in live.items():
        hf_key = key.removeprefix("model.")
        expected = value.double()
        if key in left:
            aligned, base = references(llama_trio, key)
            expected = dense_form("lssf-two-sided", expected, aligned, base, subspace[hf_key], 1.0)
            assert not torch.allclose(expected, value.double(), atol=1e-4), key
        if hf_key in exported:
            assert torch.allclose(exported[hf_key].double(), expected, atol=1e-5), key
        # the adapter holds the form's correction: merged onto the live model it gives the same weights
        assert torch.allclose(merged[hf_key].double(), expected, atol=1e-5), key
    assert {k.removeprefix("model.") for k in left} <= exported.keys()


def test_fsdp2_resume_from_a_form_checkpoint_is_exact(fsdp2_run):
    out, _ = fsdp2_run
    raw, resumed = weights(out / "lssf-two-sided_end.safetensors"), weights(out / "resume_start.safetensors")
    assert raw.keys() == resumed.keys()
    assert all(torch.equal(resumed[k], raw[k]) for k in raw)  # bit for bit: per-shard factors and fix-ups


def test_fsdp2_epochs_mode_applies_the_form_of_live_minus_applied_and_resumes(llama_trio, tmp_path_factory):
    from lssf_lightning.config import SubspaceConfig
    from lssf_lightning.training import build_subspace

    out, results = run("fsdp2-epochs", llama_trio, tmp_path_factory)
    assert results["epochs"] == {"type": "ShardedForms", "applied": 14}
    subspace = build_subspace(str(llama_trio.aligned), str(llama_trio.base), SubspaceConfig())
    applied = {}
    for epoch in range(2):
        before = weights(out / f"straight_before_epoch{epoch}.safetensors")
        after = weights(out / f"straight_after_epoch{epoch}.safetensors")
        for key, weight in before.items():
            if not key.endswith("proj.weight"):
                assert torch.equal(after[key], weight), key
                continue
            aligned, base = references(llama_trio, key)
            raw = weight.double() - applied.get(key, 0.0)
            expected = dense_form("lssf-reset", raw, aligned, base, subspace[key.removeprefix("model.")], 2.0)
            assert torch.allclose(after[key].double(), expected, atol=2e-5), (epoch, key)
            applied[key] = expected - raw
    # a reflection: without the tracked corrections, epoch 1 would undo epoch 0's reset
    key = "model.model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(after[key], before[key], atol=1e-4)
    # stopped after epoch 0 and resumed: every rank's applied corrections came back, the same weights
    straight, resumed = (weights(out / f"{tag}_after_epoch1.safetensors") for tag in ("straight", "resumed"))
    assert all(torch.equal(resumed[k], v) for k, v in straight.items())


@pytest.mark.parametrize("strategy,forms", [("fsdp2", "ShardedForms"), ("ddp", "CoordinateForms")])
def test_auto_picks_the_same_form_on_every_rank_and_the_checkpoint_holds_it(llama_trio, tmp_path_factory,
                                                                            strategy, forms):
    from lssf_lightning.config import SubspaceConfig
    from lssf_lightning.training import build_subspace

    out, results = run(f"{strategy}-auto", llama_trio, tmp_path_factory)
    ranks = [json.loads((out / f"auto_rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]  # the same choice, curve and logs on every rank
    chosen = ranks[0]
    assert chosen["target"] == 0.95  # measured at fit start (FSDP2: on the shards): the aligned model refuses
    curve = {(p["method"], p["alpha"]): p for p in chosen["curve"]}
    assert curve[("lssf", 0.5)]["perplexity"] > curve[("lssf-reset", 0.5)]["perplexity"]
    assert (chosen["method"], chosen["alpha"], chosen["live"]) == ("lssf-reset", 0.5, forms)
    assert chosen["metrics"]["lssf/alpha"] == 0.5 and chosen["metrics"]["lssf/method/lssf-reset"] == 1.0
    assert chosen["metrics"]["lssf/method/lssf"] == 0.0 and chosen["metrics"]["lssf/target_reached"] == 1.0
    assert results["auto"]["method"] == "lssf-reset" and results["auto"]["recommended"] is True
    assert results["auto"]["info"]["method"] == "lssf-reset"
    assert results["auto"]["info"]["options"]["alpha"] == 0.5
    live, saved = weights(out / "auto_end.safetensors"), weights(out / "ckpt_auto.safetensors")
    subspace = build_subspace(str(llama_trio.aligned), str(llama_trio.base), SubspaceConfig())
    changed = 0
    for key, value in live.items():
        if key.endswith("proj.weight"):
            aligned, base = references(llama_trio, key)
            expected = dense_form("lssf-reset", value.double(), aligned, base,
                                  subspace[key.removeprefix("model.")], 0.5)
            assert torch.allclose(saved[key].double(), expected, atol=1e-5), key
            changed += not torch.allclose(saved[key], value)
        else:
            assert torch.equal(saved[key], value), key
    assert changed


def test_sharded_forms_on_every_placement_equal_the_dense_formulas(tmp_path):
    # Shard(0) and Shard(1) of a stored and of a transposed (Conv1D) weight, 7 rows over 2 ranks; α 2, β 0.5,
    # ρ 0.7: two applications with a step between, then a checkpoint fusion and its bit-exact restore
    torchrun("forms_dist_fit.py", "blocks", "-", "-", "-", tmp_path, timeout=300)
    for rank in range(2):
        cases = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert len(cases) == 16
        for case in cases:
            assert case["first"] and case["second"] and case["fused"] and case["restored"], (rank, case)
            # one all-reduce per application (and fusion); two-sided: one more where the columns are sharded
            reads_columns = case["form"] == "two_sided" and case["conv1d"] != (case["dim"] == 1)
            assert case["calls"] == (0 if case["form"] == "additive" else 6 if reads_columns else 3), case


def test_forms_are_refused_in_one_line_where_they_cannot_run_yet():
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy

    from lssf_lightning.lightning.strategy import forms_problem

    def on(strategy):
        return SimpleNamespace(strategy=strategy)

    sharded = on(ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1))
    assert forms_problem(on(DDPStrategy()), "steps", exports=True, lora=True) is None
    assert forms_problem(sharded, "steps", exports=False, lora=False) is None
    assert forms_problem(sharded, "checkpoint", exports=False, lora=False) is None
    assert forms_problem(sharded, "epochs", exports=True, lora=False) is None
    assert "export_dir" in forms_problem(sharded, "steps", exports=True, lora=True)
    assert forms_problem(sharded, "steps", exports=False, lora=True) is None  # the LoRA guard
    assert "LoRA" in forms_problem(sharded, "checkpoint", exports=False, lora=True)
    whole = on(ModelParallelStrategy(save_distributed_checkpoint=False))
    assert "save_distributed_checkpoint=True" in forms_problem(whole, "checkpoint", exports=False, lora=False)
    assert "FSDP1" in forms_problem(on(FSDPStrategy()), "checkpoint", exports=False, lora=False)
