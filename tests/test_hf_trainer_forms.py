"""LSSFTrainerCallback(method=...) in real transformers.Trainer runs with a tiny Llama: each checkpoint's
``realigned/`` folder, ``export_dir`` and ``export_adapter_dir`` hold the chosen form, computed here
independently on the raw weights; the Trainer's own files stay raw (an exact resume); the monitor's realigned
pass and ``min_refusal_rate`` see the form; parameters a method does not take are refused."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import state
from peft import LoraConfig, PeftModel, get_peft_model
from test_forms import dense_form
from test_hf_trainer import rows, trainer_args
from transformers import AutoModelForCausalLM, Trainer

from lssf_lightning.integrations.hf_trainer import LSSFTrainerCallback
from lssf_lightning.validation import SettingError

Q = "model.layers.0.self_attn.q_proj.weight"


def blocks(weights: dict) -> list[str]:
    return [k for k in weights if ".layers." in k and k.endswith("proj.weight")]


def assert_form(directory_or_state, raw: dict, trio, callback, method, alpha, add=0.0):
    """Every block matrix is the dense form of ``raw``'s; everything else is ``raw``."""
    written = directory_or_state
    if not isinstance(written, dict):
        written = AutoModelForCausalLM.from_pretrained(written, dtype=torch.float32).state_dict()
    aligned, base = state(trio.models["aligned"]), state(trio.models["base"])
    corrected = 0
    for key, value in raw.items():
        expected = value.double()
        if key in blocks(raw):
            expected = dense_form(method, expected, aligned[key].double(), base[key].double(),
                                  callback.subspace[key], alpha, add=add)
            corrected += 1
        torch.testing.assert_close(written[key].double(), expected, rtol=1e-4, atol=1e-5, msg=key)
    assert corrected == 14


class Spy:
    """A judge that never refuses and records the live q_proj weight each time it judges."""

    def __init__(self):
        self.model, self.seen = None, []

    def __call__(self, responses):
        self.seen.append(self.model.state_dict()[Q].detach().clone())
        return [False] * len(responses)


def run(trio, tokenizer, output_dir, *, resume=None, spy=None, lora=None, **kwargs):
    model = AutoModelForCausalLM.from_pretrained(trio.aligned, dtype=torch.float32)
    if lora is not None:
        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora))
    monitor = False
    if spy is not None:
        spy.model = model
        monitor = {"num_prompts": 1, "max_new_tokens": 2, "judge": spy, "utility_texts": None}
    callback = LSSFTrainerCallback(unaligned=str(trio.base), monitor=monitor, verbose=False, **kwargs)
    data = rows(tokenizer)
    trainer = Trainer(model=model, args=trainer_args(output_dir), train_dataset=data, eval_dataset=data[:2],
                      processing_class=tokenizer, callbacks=[callback])
    trainer.train(resume_from_checkpoint=resume)
    return trainer, callback


@pytest.mark.parametrize(("method", "options"), [
    ("lssf-reset", {"alpha": 2.0}),
    ("lssf-reset", {"alpha": 1.0, "add": 0.5}),
    ("lssf-erosion", {"alpha": 1.0}),
    ("lssf-two-sided", {"alpha": 1.0}),
])
def test_checkpoints_exports_and_adapter_hold_the_form(llama_trio, tiny_tokenizer, tmp_path, method, options):
    aligned = str(llama_trio.aligned) if method == "lssf-two-sided" else None
    trainer, callback = run(llama_trio, tiny_tokenizer, tmp_path / "run", method=method, aligned=aligned,
                            export_dir=tmp_path / "export", export_adapter_dir=tmp_path / "adapter",
                            **options)
    alpha, add = options["alpha"], options.get("add", 0.0)
    live = state(trainer.model)
    assert_form(tmp_path / "export", live, llama_trio, callback, method, alpha, add)
    checkpoint = tmp_path / "run" / "checkpoint-2"
    raw_at_2 = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).state_dict()
    assert not torch.equal(raw_at_2[Q], live[Q]) and not torch.equal(raw_at_2[Q], state(
        llama_trio.models["aligned"])[Q]), "checkpoint-2 should hold the raw weights after two steps"
    assert_form(checkpoint / "realigned", raw_at_2, llama_trio, callback, method, alpha, add)
    saved = json.loads((checkpoint / "lssf_state.json").read_text())
    assert saved["method"] == method and saved["options"] == options
    # the adapter carries the form's correction: merged onto the live model it gives the export
    merged = PeftModel.from_pretrained(trainer.model, tmp_path / "adapter").merge_and_unload().state_dict()
    assert_form(merged, live, llama_trio, callback, method, alpha, add)


def test_a_lora_run_reads_the_merged_weights_and_writes_one_adapter(llama_trio, tiny_tokenizer, tmp_path):
    trainer, callback = run(llama_trio, tiny_tokenizer, tmp_path / "run", method="lssf-reset", alpha=2.0,
                            lora={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "up_proj"]},
                            export_dir=tmp_path / "export", export_adapter_dir=tmp_path / "adapter")
    assert isinstance(trainer.model, PeftModel)
    merged = state(copy.deepcopy(trainer.model).merge_and_unload())
    assert not torch.equal(merged[Q], state(llama_trio.models["aligned"])[Q])  # the task LoRA trained
    assert_form(tmp_path / "export", merged, llama_trio, callback, "lssf-reset", 2.0)
    checkpoint = tmp_path / "run" / "checkpoint-4"
    assert (checkpoint / "adapter_model.safetensors").is_file()  # the Trainer's own files: the raw adapter
    assert_form(checkpoint / "realigned", merged, llama_trio, callback, "lssf-reset", 2.0)
    # ONE adapter (task LoRA + correction) for the aligned model the run started from
    base = AutoModelForCausalLM.from_pretrained(llama_trio.aligned, dtype=torch.float32)
    adapter = PeftModel.from_pretrained(base, tmp_path / "adapter").merge_and_unload().state_dict()
    assert_form(adapter, merged, llama_trio, callback, "lssf-reset", 2.0)


def test_resume_from_a_form_checkpoint_is_exact(llama_trio, tiny_tokenizer, tmp_path):
    straight, _ = run(llama_trio, tiny_tokenizer, tmp_path / "run", method="lssf-reset", alpha=2.0)
    resumed, _ = run(llama_trio, tiny_tokenizer, tmp_path / "run", method="lssf-reset", alpha=2.0,
                     resume=str(tmp_path / "run" / "checkpoint-2"), checkpoint_subdir=None)
    ours, theirs = state(resumed.model), state(straight.model)
    assert all(torch.equal(ours[k], v) for k, v in theirs.items())


def test_monitor_and_min_refusal_rate_apply_the_form_to_the_live_weights(llama_trio, tiny_tokenizer,
                                                                          tmp_path):
    spy = Spy()
    trainer, callback = run(llama_trio, tiny_tokenizer, tmp_path / "run", spy=spy, method="lssf-reset",
                            alpha=2.0, min_refusal_rate=0.5, checkpoint_subdir=None)
    aligned = state(llama_trio.models["aligned"])[Q].double()
    base = state(llama_trio.models["base"])[Q].double()
    # one evaluation (step 4): the raw pass, then the realigned pass, both harmful and harmless
    raw, realigned = spy.seen[0], spy.seen[2]
    assert torch.equal(spy.seen[1], raw) and torch.equal(spy.seen[3], realigned)
    expected = dense_form("lssf-reset", raw.double(), aligned, base, callback.subspace[Q], 2.0)
    torch.testing.assert_close(realigned.double(), expected, rtol=1e-4, atol=1e-5)
    # refusal 0 < 0.5: the live weights now hold the form; the tracked correction keeps a second
    # application from stacking (the reflection at α 2 applied to raw, not to the already reset weights)
    live = trainer.model.state_dict()[Q]
    torch.testing.assert_close(live.double(), expected, rtol=1e-4, atol=1e-5)
    assert callback.live_forms.carries and callback.fusion.missing == 0
    callback.realign_live(trainer.model)
    torch.testing.assert_close(trainer.model.state_dict()[Q].double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"method": "lssf", "add": 0.5}, "method 'lssf' takes alpha; add belongs to"),
    ({"method": "lssf-reset", "input_share": 0.5}, "'lssf-reset' takes alpha, add; input_share belongs"),
    ({"method": "resta"}, "method"),
    ({"method": "lssf-reset", "alpha": float("nan")}, "alpha"),
    ({"alpha": "auto", "add": 0.5}, "pass method= with them"),
    ({"alpha": "auto", "method": "lssf", "input_share": 0.5}, "input_share belongs"),
])
def test_parameters_the_method_does_not_take_are_refused(kwargs, message):
    with pytest.raises(SettingError, match=message):
        LSSFTrainerCallback(unaligned="x", **kwargs)
