"""LSSF on sharded (DTensor / FSDP2) weights with 2 real gloo processes on the CPU.

``fsdp2_distributed_check.py`` runs the framework-free parts of :mod:`lssf_lightning.distributed` under
``torch.distributed.run``; these tests read what each rank measured.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent


def torchrun(script: str, *args, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone`` with ``nproc`` gloo processes, one thread each."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        str(HERE / script),
        *map(str, args),
    ]
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    return done


@pytest.fixture(scope="module")
def distributed_results(llama_trio, gpt2_trio, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2_distributed")
    torchrun(
        "fsdp2_distributed_check.py",
        out,
        llama_trio.aligned,
        llama_trio.base,
        gpt2_trio.aligned,
        gpt2_trio.base,
    )
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_shard_local_fusion_equals_the_dense_formula_on_every_placement(distributed_results):
    for rank, results in enumerate(distributed_results):
        assert len(results["fusion"]) == 7
        for case in results["fusion"]:
            assert case["dense"], (rank, case)  # gathered shard-local fusion = W + α·U'U'ᵀδ (float64)
            assert case["restricted"], (rank, case)  # kept rows of U' / columns of R give the same block
            assert case["inplace"], (rank, case)  # in place on a DTensor parameter = out of place


def test_uneven_shards_cover_the_weight_once(distributed_results):
    # Shard(0) of 7 rows: 4 + 3 (torch.chunk sizes); Shard(0) of 1 row leaves rank 1 an empty block; Shard(1)
    # of 9 columns: 5 + 4; Replicate: both ranks hold the whole weight.
    regions = [[case["region"] for case in results["fusion"]] for results in distributed_results]
    assert [r[0]["offset"] + r[0]["shape"] for r in regions] == [[0, 0, 4, 5], [4, 0, 3, 5]]
    assert [r[1]["shape"] for r in regions] == [[1, 6], [0, 6]]
    assert [r[2]["offset"] + r[2]["shape"] for r in regions] == [[0, 0, 6, 5], [0, 5, 6, 4]]
    assert regions[0][3] == regions[1][3] and regions[0][3]["shape"] == [6, 4]


def test_per_shard_fixups_make_the_resume_exact_and_detect_another_layout(distributed_results):
    for results in distributed_results:
        for case in results["fusion"]:
            assert case["exact_resume"], case
            assert case["other_layout_refused"], case
    # the fix-ups were needed: fused − term does not round back to the raw value everywhere
    assert sum(case["fixups"] for results in distributed_results for case in results["fusion"]) > 0


def test_subspace_built_across_two_ranks_is_bit_identical_to_one_process(distributed_results):
    for model in range(2):  # Llama (Linear) and GPT-2 (Conv1D)
        builds = [results["build"][model] for results in distributed_results]
        for build in builds:
            assert build["identical"] and build["fingerprint_equal"] and build["ranks_equal"], build
        shares = [set(build["built_here"]) for build in builds]
        assert shares[0] and shares[1] and not shares[0] & shares[1]  # the work was split, nothing twice
        assert len(shares[0] | shares[1]) == builds[0]["n"] > 0


def test_gather_to_rank0_moves_tensors_and_info_without_pickle(distributed_results):
    assert [results["gather"] for results in distributed_results] == [True, True]


def test_a_model_sharded_per_decoder_layer_checkpoint_resume_live_fusion_and_export(distributed_results):
    for rank, results in enumerate(distributed_results):
        model = results["model"]
        assert model["matched"] == 14 and model["sharded"], model
        assert model["checkpoint_dense"] and model["live_raw"], (
            model
        )  # checkpoint = live + α·U'U'ᵀδ; live raw
        assert model["gathered_fixups"], model  # rank 0 holds every rank's fix-ups
        assert model["resume_exact"] and model["resume_inexact"] == [], model
        assert model["resume_without_fixups_inexact"] == 14, model  # missing fix-ups are reported, not hidden
        assert model["own_layout_ok"] and model["refused_untouched"], model
        assert "NaN or inf" in model["nonfinite_refused"], model  # rank 1's inf refused on both ranks
        assert "not laid out as when the checkpoint was saved" in model["other_layout_refused"], model
        assert model["temporarily_dense"] and model["temporarily_restored"], model
        assert model["forward_changed"] and model["forward_back"], (
            model
        )  # FSDP2 forward sees the fused shards
        assert model["epochs_dense"], model
        assert model["localized_equal"] and 0.5 < model["localized_share"] < 0.9, (
            model
        )  # rows of U' + all of U'ᵀδ
    # the export streamed one gathered tensor at a time equals the one-process export and loads
    assert distributed_results[0]["model"]["export_equal"] and distributed_results[0]["model"]["export_dense"]


# -- Lightning's ModelParallelStrategy: real fits with LSSFCallback (fsdp2_fit.py) --------------------------
def fit_run(scenario, trio, tmp_path_factory):
    from lssf_lightning.lightning.data import write_chat_jsonl

    out = tmp_path_factory.mktemp(f"fsdp2_{scenario}")
    # Rows with equal numbers of labelled tokens (as in test_ddp): each rank's half-batch mean averages to the
    # full-batch loss, so the run is the one-process run up to float rounding.
    rows = [
        {"prompt": "how do i bake bread at home ?", "response": "sure , here is a simple answer ."},
        {"prompt": "what is the capital of france ?", "response": "please i cannot help with that request ."},
    ]
    train = write_chat_jsonl(out / "train.jsonl", rows * 4)
    torchrun("fsdp2_fit.py", scenario, trio.aligned, trio.base, train, out, timeout=420)
    return out, json.loads((out / "results.json").read_text())


def weights(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def dense_correction(trio, key, alpha):
    from test_callback import correction

    from lssf_lightning.io.names import canonical_key

    return correction(trio, "model." + canonical_key(key.removeprefix("model.")), alpha=alpha)


FUSED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def is_fused(key):
    return any(f".{name}." in key for name in FUSED) and "lora_" not in key


@pytest.fixture(scope="module")
def checkpoint_run(llama_trio, tmp_path_factory):
    return fit_run("checkpoint", llama_trio, tmp_path_factory)


def test_fsdp2_sharded_checkpoints_hold_live_plus_the_dense_correction(checkpoint_run, llama_trio):
    out, results = checkpoint_run
    assert results["checkpoint_is_directory"] and results["alpha_added"] == 1.5
    assert results["fixups_world_size"] == 2 and [len(keys) for keys in results["fixups_keys"]] == [14, 14]
    for epoch in range(2):
        live, saved = (
            weights(out / f"fit_epoch{epoch}.safetensors"),
            weights(out / f"ckpt_epoch{epoch}.safetensors"),
        )
        assert live.keys() == saved.keys() and sum(map(is_fused, live)) == 14
        for key, value in live.items():
            if is_fused(key):  # each rank fused its own rows; gathered, they are W + α·U'U'ᵀδ
                expected = value.double() + dense_correction(llama_trio, key, 1.5)
                assert torch.allclose(saved[key].double(), expected, atol=1e-5), key
            else:
                assert torch.equal(saved[key], value), key


def test_fsdp2_resume_from_the_sharded_checkpoint_is_exact_and_refused_on_other_settings(checkpoint_run):
    out, results = checkpoint_run
    raw, resumed = weights(out / "fit_epoch0.safetensors"), weights(out / "resume_start.safetensors")
    assert raw.keys() == resumed.keys()
    assert all(torch.equal(resumed[k], raw[k]) for k in raw)  # bit for bit, per-shard fix-ups included
    assert results["refused"] and "eta 0.9 -> 0.5" in results["refused"]


def test_fsdp2_monitor_rates_equal_one_process_with_uneven_prompt_shards(checkpoint_run):
    _, results = (
        checkpoint_run  # 5 prompts: rank 0 answers 3, rank 1 two plus a padding prompt; the run ended
    )
    metrics, single = results["metrics"], results["single_process_rates"]
    assert metrics["lssf/refusal_rate"] == pytest.approx(single["harmful"])
    assert metrics["lssf/refusal_rate_realigned"] == pytest.approx(single["harmful_realigned"])
    assert metrics["lssf/harmless_refusal_rate"] == pytest.approx(single["harmless"])
    assert metrics["lssf/harmless_refusal_rate_realigned"] == pytest.approx(single["harmless_realigned"])


def test_fsdp2_streamed_export_equals_the_one_process_export_and_loads(checkpoint_run):
    from transformers import AutoModelForCausalLM

    out, _ = checkpoint_run
    sharded = AutoModelForCausalLM.from_pretrained(out / "export").state_dict()
    single = AutoModelForCausalLM.from_pretrained(out / "export_single").state_dict()
    assert sharded.keys() == single.keys()
    assert all(torch.equal(sharded[k], single[k]) for k in single)


def test_fsdp2_adapter_of_the_paper_form_merged_on_the_final_weights_gives_the_export(checkpoint_run,
                                                                                        llama_trio):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, _ = checkpoint_run
    model = AutoModelForCausalLM.from_pretrained(llama_trio.aligned, dtype=torch.float32)
    final = {k.removeprefix("model."): v for k, v in weights(out / "fit_final.safetensors").items()}
    model.load_state_dict(final)
    merged = PeftModel.from_pretrained(model, out / "adapter").merge_and_unload().state_dict()
    exported = weights(out / "export" / "model.safetensors")
    assert all(torch.allclose(merged[k], v, atol=1e-5) for k, v in exported.items())
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(exported[q], final[q], atol=1e-4)  # the adapter carries the correction


def test_fsdp2_epochs_mode_fuses_the_live_shards(llama_trio, tmp_path_factory):
    out, results = fit_run("epochs", llama_trio, tmp_path_factory)
    assert results["applied_alpha"] == 0.75
    # LSSFCallback itself: 2 ranks and a subspace_cache, so its factors stay in the file, read block by block
    assert results["disk_backed"] == "LazyFactors" and results["resident_bytes"] == 0
    assert results["factors_file"] == str(out / "subspace.safetensors")
    before, after = weights(out / "before_epoch0.safetensors"), weights(out / "after_epoch0.safetensors")
    for key, value in before.items():
        if is_fused(key):
            expected = value.double() + dense_correction(llama_trio, key, 0.75)
            assert torch.allclose(after[key].double(), expected, atol=1e-5), key
        else:
            assert torch.equal(after[key], value), key


@pytest.mark.slow  # ~1 min on 2 shared cores (dynamo tracing of the compiled peft model)
def test_fsdp2_lora_model_compiled_checkpoint_mode(llama_trio, tmp_path_factory):
    out, results = fit_run("lora", llama_trio, tmp_path_factory)
    assert results["compiled"] == "OptimizedModule"
    live = {k.replace("_orig_mod.", ""): v for k, v in weights(out / "lora_epoch0.safetensors").items()}
    saved = weights(out / "ckpt_lora.safetensors")
    assert live.keys() == saved.keys() and sum(".base_layer." in k for k in live) == 4
    assert sum(map(is_fused, live)) == 14
    assert any(saved[k].abs().sum() > 0 for k in saved if "lora_B" in k)  # the adapters trained (from B = 0)
    for key, value in live.items():
        if is_fused(key):  # LoRA layers: the frozen base_layer carries the correction, the adapters stay
            expected = value.double() + dense_correction(llama_trio, key, 1.0)
            assert torch.allclose(saved[key].double(), expected, atol=1e-5), key
        else:
            assert torch.equal(saved[key], value), key
    # the export, gathered tensor by tensor: the merged weight W + (lora_alpha/r)·B·A plus the correction
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(out / "export").state_dict()
    prefix = "model.base_model.model.model.layers.0.self_attn.q_proj."
    merged = live[prefix + "base_layer.weight"].double() + 2.0 * (
        live[prefix + "lora_B.default.weight"].double() @ live[prefix + "lora_A.default.weight"].double()
    )
    expected = merged + dense_correction(llama_trio, prefix + "base_layer.weight", 1.0)
    assert torch.allclose(exported["model.layers.0.self_attn.q_proj.weight"].double(), expected, atol=1e-5)


def test_model_parallel_strategy_is_accepted_with_a_number_and_with_auto_alpha(llama_trio):
    from lightning.pytorch import Trainer
    from lightning.pytorch.strategies import ModelParallelStrategy

    from lssf_lightning.lightning import strategy
    from lssf_lightning.lightning.callback import LSSFCallback

    def trainer(alpha):
        callback = LSSFCallback(unaligned=str(llama_trio.base), alpha=alpha, monitor=False, verbose=False)
        return Trainer(
            accelerator="cpu",
            devices=2,
            callbacks=[callback],
            logger=False,
            strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        )

    fixed = trainer(1.0)  # constructing a Trainer launches nothing
    strategy.check_strategy(fixed, "checkpoint", edits_live_weights=True)
    assert strategy.sharded_checkpoints(fixed) and strategy.monitor_supported(fixed)
    strategy.check_strategy(trainer("auto"), "checkpoint", edits_live_weights=False)  # test_forms_distributed
