"""``alpha="auto"`` as a choice of form and strength, in a real transformers Trainer and a real Lightning
Trainer with a tiny Llama: the paper's additive form is chosen without a utility budget (it is first in the
grid), the reset form when the budget excludes the additive one; "target not reached" is warned, logged and
recorded in the checkpoint's metadata, and never called recommended."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import state as state_of
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from test_callback import data_files, fit  # noqa: F401  (a module fixture and the Lightning run)
from test_forms import dense_form
from test_hf_trainer import rows, trainer_args
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback

from lssf_lightning import forms
from lssf_lightning.config import AutoAlphaConfig
from lssf_lightning.integrations.hf_trainer import LSSFTrainerCallback
from lssf_lightning.lightning.callback import LSSFCallback
from lssf_lightning.lightning.monitor import RefusalMonitor
from lssf_lightning.monitoring import DEFAULT_AUTO_METHODS, AlphaTuner, SafetyProbe, auto_methods
from lssf_lightning.validation import SettingError

Q = "model.layers.0.self_attn.q_proj.weight"
LR = 1e-3  # a fine-tune that barely moves the subspace: its reset is a small edit, the additive term is not
PROBE = {"num_prompts": 1, "max_new_tokens": 2, "num_utility_texts": 2}


class Edited:
    """A judge that 'refuses' exactly when a candidate form is applied: the q_proj weight differs from the
    live one snapshotted at the start of the evaluation (each candidate of either form edits it)."""

    def __init__(self):
        self.weight, self.live = None, None

    def read(self):
        return self.weight().detach()

    def snapshot(self):
        self.live = self.read().clone()

    def __call__(self, responses):
        edited = self.live is not None and not torch.equal(self.read(), self.live)
        return [edited] * len(responses)


class Snapshot(TrainerCallback):
    """Placed before the LSSF callback: snapshots the live weight when an evaluation starts its hooks."""

    def __init__(self, judge):
        self.judge = judge

    def on_evaluate(self, args, state, control, **kwargs):
        self.judge.snapshot()


class LightningSnapshot(Callback):
    """:class:`Snapshot` for Lightning."""

    def __init__(self, judge):
        self.judge = judge

    def on_validation_epoch_end(self, trainer, pl_module):
        self.judge.snapshot()


def hf_run(trio, tokenizer, output_dir, judge, **kwargs):
    model = AutoModelForCausalLM.from_pretrained(trio.aligned, dtype=torch.float32)
    judge.weight = lambda: model.get_parameter(Q)
    callback = LSSFTrainerCallback(unaligned=str(trio.base), alpha="auto", monitor={**PROBE, "judge": judge},
                                   checkpoint_subdir=None, verbose=False, **kwargs)
    data = rows(tokenizer)
    args = trainer_args(output_dir, max_steps=2, eval_steps=2, save_steps=2, learning_rate=LR)
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data[:2],
                      processing_class=tokenizer, callbacks=[Snapshot(judge), callback])
    trainer.train()
    return trainer, callback


def points(callback):
    return {(p["method"], p["alpha"]): p for p in callback.alpha_curve}


@pytest.mark.parametrize("budget", [None, 0.01])
def test_transformers_auto_chooses_the_reset_form_when_the_budget_excludes_the_additive_one(
        llama_trio, tiny_tokenizer, tmp_path, budget):
    judge = Edited()
    config = AutoAlphaConfig(alphas=[0.5, 1.0], target=0.5, max_perplexity_increase=budget,
                             methods=["lssf", "lssf-reset"])
    trainer, callback = hf_run(llama_trio, tiny_tokenizer, tmp_path / "run", judge, auto_alpha=config,
                               export_dir=tmp_path / "export")
    curve = points(callback)
    # each form's curve stops at its first α reaching the target: both refuse at α 0.5
    assert set(curve) == {("lssf", 0.5), ("lssf-reset", 0.5)}
    assert all(p["refusal"] == 1.0 for p in curve.values())
    logged = [e for e in trainer.state.log_history if "lssf/alpha" in e][-1]
    saved = json.loads((tmp_path / "run" / "checkpoint-2" / "lssf_state.json").read_text())
    if budget is None:  # no utility measured: the earliest candidate reaching the target, the paper's form
        assert callback.method == "lssf" and callback.live_forms is None and callback.fusion.target == 0.5
        assert logged["lssf/method/lssf"] == 1.0 and logged["lssf/method/lssf-reset"] == 0.0
        return
    reference = callback.tuner.choice.reference_perplexity
    # measured on the tiny model: the additive α 0.5 costs +2.0 % perplexity, the reset of two small steps'
    # update −0.1 %: only the reset keeps the +1 % budget
    assert curve[("lssf", 0.5)]["perplexity"] > 1.01 * reference
    assert curve[("lssf-reset", 0.5)]["perplexity"] <= 1.01 * reference
    assert callback.method == "lssf-reset" and callback.tuner.choice.recommended
    assert isinstance(callback.live_forms, forms.LiveForms) and callback.live_forms.options == {"alpha": 0.5}
    assert logged["lssf/method/lssf-reset"] == 1.0 and logged["lssf/method/lssf"] == 0.0
    assert logged["lssf/alpha"] == 0.5 and logged["lssf/target_reached"] == 1.0
    assert saved["method"] == "lssf-reset" and saved["auto_recommended"] is True
    assert saved["auto_note"].count("recommended lssf-reset alpha=0.5") == 1
    # the export carries the chosen form: the reset of the final weights, not the additive term
    written = AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32).state_dict()[Q]
    live = trainer.model.state_dict()[Q]
    entry = callback.subspace[Q]
    aligned = AutoModelForCausalLM.from_pretrained(llama_trio.aligned, dtype=torch.float32).state_dict()[Q]
    u = entry.left.double()
    expected = live.double() - 0.5 * u @ (u.T @ (live.double() - aligned.double()))
    torch.testing.assert_close(written.double(), expected, rtol=1e-4, atol=1e-6)


def test_transformers_auto_says_target_not_reached_and_records_it(llama_trio, tiny_tokenizer, tmp_path):
    def never(responses):
        return [False] * len(responses)

    config = AutoAlphaConfig(alphas=[0.5, 2.0], target=0.5)
    model = AutoModelForCausalLM.from_pretrained(llama_trio.aligned, dtype=torch.float32)
    callback = LSSFTrainerCallback(unaligned=str(llama_trio.base), alpha="auto", auto_alpha=config,
                                   monitor={**PROBE, "judge": never, "utility_texts": None},
                                   checkpoint_subdir=None, verbose=False)
    data = rows(tiny_tokenizer)
    args = trainer_args(tmp_path / "run", max_steps=2, eval_steps=2, save_steps=2)
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data[:2],
                      processing_class=tiny_tokenizer, callbacks=[callback])
    with pytest.warns(UserWarning, match="target not reached") as caught:
        trainer.train()
    message = next(str(w.message) for w in caught if "target not reached" in str(w.message))
    assert "NOT a recommendation" in message
    assert "recommended" not in message.replace("NOT a recommendation", "")
    assert len(callback.alpha_curve) == 4  # the default grid's two forms, each over the whole α grid
    assert {p["method"] for p in callback.alpha_curve} == set(DEFAULT_AUTO_METHODS)
    saved = json.loads((tmp_path / "run" / "checkpoint-2" / "lssf_state.json").read_text())
    assert saved["auto_recommended"] is False and "target not reached" in saved["auto_note"]
    logged = [e for e in trainer.state.log_history if "lssf/target_reached" in e]
    assert logged and logged[-1]["lssf/target_reached"] == 0.0


def test_lightning_auto_chooses_the_reset_form_within_the_budget_and_fuses_it(llama_trio, data_files,  # noqa: F811
                                                                              tmp_path):
    judge = Edited()
    config = AutoAlphaConfig(alphas=[0.5, 1.0], target=0.5, max_perplexity_increase=0.01,
                             methods=["lssf", "lssf-reset"])
    monitor = RefusalMonitor(**PROBE, judge=judge)
    callback = LSSFCallback(unaligned=str(llama_trio.base), alpha="auto", auto_alpha=config, monitor=monitor,
                            tokenizer=str(llama_trio.aligned), verbose=False, log_update_share=False)

    class Hold(Callback):
        def on_fit_start(self, trainer, pl_module):
            judge.weight = lambda: pl_module.get_parameter("model." + Q)

    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer, module = fit(llama_trio, data_files, [Hold(), LightningSnapshot(judge), callback, checkpoint],
                          max_epochs=1, validate=True, lr=LR)
    curve = points(callback)
    assert curve[("lssf", 0.5)]["perplexity"] > curve[("lssf-reset", 0.5)]["perplexity"]
    assert callback.method == "lssf-reset" and callback.current_alpha == 0.5
    assert float(trainer.callback_metrics["lssf/method/lssf-reset"]) == 1.0
    assert float(trainer.callback_metrics["lssf/target_reached"]) == 1.0
    saved = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=False)
    state = saved["callbacks"][callback.state_key]
    assert state["method"] == "lssf-reset" and state["auto_recommended"] is True
    assert saved["lssf"]["method"] == "lssf-reset" and saved["lssf"]["options"] == {"alpha": 0.5}
    assert forms.CORRECTIONS_KEY in saved  # the checkpoint holds the chosen form, the live weights stay raw


def test_lightning_auto_on_a_lora_model_measures_the_forms_on_the_merged_weights(llama_trio, data_files,  # noqa: F811
                                                                                 tmp_path):
    judge = Edited()
    config = AutoAlphaConfig(alphas=[0.5, 1.0], target=0.5, max_perplexity_increase=0.01,
                             methods=["lssf", "lssf-reset"])
    callback = LSSFCallback(unaligned=str(llama_trio.base), alpha="auto", auto_alpha=config,
                            monitor=RefusalMonitor(**PROBE, judge=judge), tokenizer=str(llama_trio.aligned),
                            verbose=False, log_update_share=False)
    base_q = "model.base_model.model." + Q.replace(".weight", ".base_layer.weight")

    class Hold(Callback):
        def on_fit_start(self, trainer, pl_module):
            judge.weight = lambda: pl_module.get_parameter(base_q)

    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    lora = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "up_proj"]}
    _, module = fit(llama_trio, data_files, [Hold(), LightningSnapshot(judge), callback, checkpoint],
                    max_epochs=1, validate=True, lr=LR, lora=lora)
    curve = points(callback)
    assert curve[("lssf", 0.5)]["perplexity"] > curve[("lssf-reset", 0.5)]["perplexity"]
    assert callback.method == "lssf-reset" and callback.current_alpha == 0.5
    saved = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["lssf"]["method"] == "lssf-reset" and base_q in saved[forms.CORRECTIONS_KEY]
    # the checkpoint's base + the trained s·B·A is the reset of the merged live weight
    merged = module.merged_model().state_dict()[Q].double()
    live = module.state_dict()[base_q].double()  # raw: checkpoint mode
    aligned, base = (state_of(llama_trio.models[name])[Q].double() for name in ("aligned", "base"))
    expected = dense_form("lssf-reset", merged, aligned, base, callback.subspace[Q], 0.5)
    got = saved["state_dict"][base_q].double() + merged - live
    assert torch.allclose(got, expected, atol=1e-5)


def test_lightning_auto_records_target_not_reached_in_the_checkpoint(llama_trio, data_files,  # noqa: F811
                                                                     tmp_path):
    def never(responses):
        return [False] * len(responses)

    config = AutoAlphaConfig(alphas=[0.5], target=0.5)
    callback = LSSFCallback(unaligned=str(llama_trio.base), alpha="auto", auto_alpha=config,
                            monitor=RefusalMonitor(**PROBE, judge=never, utility_texts=None),
                            tokenizer=str(llama_trio.aligned), verbose=False, log_update_share=False)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    with pytest.warns(UserWarning, match="target not reached"):
        trainer, _ = fit(llama_trio, data_files, [callback, checkpoint], max_epochs=1, validate=True)
    saved = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=False)
    state = saved["callbacks"][callback.state_key]
    assert state["auto_recommended"] is False and "target not reached" in state["auto_note"]
    assert "NOT a recommendation" in state["auto_note"]
    assert float(trainer.callback_metrics["lssf/target_reached"]) == 0.0


def test_the_candidate_grid_and_its_settings():
    assert DEFAULT_AUTO_METHODS[0] == "lssf-reset" and "lssf" in DEFAULT_AUTO_METHODS
    assert auto_methods("lssf", {"alpha": "auto"}, AutoAlphaConfig()) == ("lssf",)  # one argument away
    assert auto_methods(None, {}, AutoAlphaConfig(methods=["lssf-erosion"])) == ("lssf-erosion",)
    with pytest.raises(SettingError, match="auto_alpha.methods"):
        auto_methods(None, {}, AutoAlphaConfig(methods=["resta"]))
    with pytest.raises(SettingError, match="methods must be"):
        AutoAlphaConfig(methods="lssf")
    with pytest.raises(SettingError, match="pass method= with them"):
        AlphaTuner(AutoAlphaConfig(), SafetyProbe(), auto_methods(None, {"add": 0.5}, AutoAlphaConfig()))


def test_lightning_resume_keeps_the_chosen_form_and_is_exact(llama_trio, data_files, tmp_path):  # noqa: F811
    judge = Edited()
    seen = []

    class Hold(Callback):
        def __init__(self, lssf):
            self.lssf = lssf

        def on_fit_start(self, trainer, pl_module):
            judge.weight = lambda: pl_module.get_parameter("model." + Q)

        def on_train_epoch_start(self, trainer, pl_module):
            seen.append((trainer.current_epoch, self.lssf.method, self.lssf.current_alpha))

    def callbacks(directory):
        config = AutoAlphaConfig(alphas=[0.5, 1.0], target=0.5, max_perplexity_increase=0.01,
                                 methods=["lssf", "lssf-reset"])
        lssf = LSSFCallback(unaligned=str(llama_trio.base), alpha="auto", auto_alpha=config,
                            monitor=RefusalMonitor(**PROBE, judge=judge), tokenizer=str(llama_trio.aligned),
                            verbose=False, log_update_share=False)
        checkpoint = ModelCheckpoint(dirpath=directory, save_last=True)
        return [Hold(lssf), LightningSnapshot(judge), lssf, checkpoint]

    _, straight = fit(llama_trio, data_files, callbacks(tmp_path / "a"), max_epochs=2, validate=True, lr=LR)
    fit(llama_trio, data_files, callbacks(tmp_path / "b"), max_epochs=1, validate=True, lr=LR)
    seen.clear()
    _, resumed = fit(llama_trio, data_files, callbacks(tmp_path / "c"), max_epochs=2, validate=True, lr=LR,
                     ckpt_path=tmp_path / "b" / "last.ckpt")
    assert seen == [(1, "lssf-reset", 0.5)]  # the form chosen before the checkpoint, before any new choice
    ours, theirs = dict(resumed.state_dict()), dict(straight.state_dict())
    assert all(torch.equal(ours[k], v) for k, v in theirs.items())


def test_transformers_resume_keeps_the_chosen_form(llama_trio, tiny_tokenizer, tmp_path):
    judge = Edited()
    config = AutoAlphaConfig(alphas=[0.5, 1.0], target=0.5, max_perplexity_increase=0.01,
                             methods=["lssf", "lssf-reset"])
    _, first = hf_run(llama_trio, tiny_tokenizer, tmp_path / "run", judge, auto_alpha=config)
    assert first.method == "lssf-reset"
    seen = []

    class After(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            seen.append((lssf.method, lssf.fusion.target, dict(lssf.live_forms.options)))

    model = AutoModelForCausalLM.from_pretrained(llama_trio.aligned, dtype=torch.float32)
    judge.weight = lambda: model.get_parameter(Q)
    lssf = LSSFTrainerCallback(unaligned=str(llama_trio.base), alpha="auto", auto_alpha=config,
                               monitor={**PROBE, "judge": judge}, verbose=False)
    data = rows(tiny_tokenizer)
    args = trainer_args(tmp_path / "run", max_steps=4, eval_steps=4, save_steps=2, learning_rate=LR)
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data[:2],
                      processing_class=tiny_tokenizer, callbacks=[Snapshot(judge), lssf, After()])
    trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert seen == [("lssf-reset", 0.5, {"alpha": 0.5})]
    # checkpoint-4's realigned folder holds the reset form of its raw weights
    checkpoint = tmp_path / "run" / "checkpoint-4"
    def weight(path):
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()[Q].double()

    raw, written, aligned = weight(checkpoint), weight(checkpoint / "realigned"), weight(llama_trio.aligned)
    u = lssf.subspace[Q].left.double()
    alpha = lssf.fusion.target
    assert lssf.method == "lssf-reset"
    torch.testing.assert_close(written, raw - alpha * u @ (u.T @ (raw - aligned)), rtol=1e-4, atol=1e-6)
