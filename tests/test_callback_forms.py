"""LSSFCallback(method=...) on real Trainer runs with a tiny Llama: every form in checkpoint mode (dense
formula, raw live weights, exact resume), epochs mode (no stacking at α 1 and 2), the per-step guard, the
update share, and the refused settings."""

import copy

import pytest
import torch
from conftest import load_dir, state
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from test_callback import lssf
from test_forms import dense_form

from lssf_lightning import forms
from lssf_lightning.core.entropy import safety_critical_rank
from lssf_lightning.lightning.data import ChatDataModule, write_chat_jsonl
from lssf_lightning.lightning.module import CausalLMModule
from lssf_lightning.stability import UpdateShare

ROWS = [
    ("how do i bake bread at home ?", "sure , here is a simple answer ."),
    ("explain how a bicycle works .", "the cat sat on the warm mat ."),
    ("what is the capital of france ?", "the capital of france is ."),
    ("how do i kill a python process ?", "i cannot help with that request ."),
    ("tell me a fun fact about space .", "sure , here is a fun fact ."),
    ("how do i bake bread at home ?", "i cannot help with that request ."),
]
FORMS = ["lssf", "lssf-reset", "lssf-erosion", "lssf-two-sided"]


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return (write_chat_jsonl(root / "train.jsonl", [{"prompt": p, "response": r} for p, r in ROWS]),)


def fit(trio, data_files, callbacks, *, max_epochs=1, ckpt_path=None, **trainer_kwargs):
    torch.manual_seed(0)
    module = CausalLMModule(str(trio.aligned), learning_rate=1e-2)
    data = ChatDataModule(str(data_files[0]), None, batch_size=2, shuffle=False)
    trainer = Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, callbacks=callbacks, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
                      **trainer_kwargs)
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return trainer, module


def references(trio, key):
    hf_key = key.removeprefix("model.")
    return state(trio.models["aligned"])[hf_key].double(), state(trio.models["base"])[hf_key].double()


def form_of(trio, callback, key, weight, method, alpha):
    aligned, base = references(trio, key)
    return dense_form(method, weight.double(), aligned, base, callback.subspace[key.removeprefix("model.")],
                      alpha)


class Record(Callback):
    """The live weights of the block matrices at each train epoch end (or batch end)."""

    def __init__(self, batches=False):
        self.batches, self.seen = batches, []

    def _take(self, pl_module):
        self.seen.append({k: v.clone() for k, v in state(pl_module).items() if k.endswith("proj.weight")})

    def on_train_epoch_end(self, trainer, pl_module):
        if not self.batches:
            self._take(pl_module)

    def on_train_batch_end(self, trainer, pl_module, *args):
        if self.batches:
            self._take(pl_module)


@pytest.fixture(scope="module")
def plain(llama_trio, data_files):
    return state(fit(llama_trio, data_files, [])[1])


@pytest.mark.parametrize("method", FORMS)
def test_checkpoint_mode_holds_the_form_and_live_weights_stay_raw(llama_trio, data_files, plain, tmp_path,
                                                                  method):
    alpha = 2.0
    callback = lssf(llama_trio, method=method, alpha=alpha, log_update_share=False,
                    aligned=str(llama_trio.aligned) if method == "lssf-two-sided" else None)
    _, module = fit(llama_trio, data_files, [callback, ModelCheckpoint(dirpath=tmp_path, save_last=True)])
    live = state(module)
    assert all(torch.equal(live[k], v) for k, v in plain.items()), "checkpoint mode changed the live weights"
    saved = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=False)
    fused = [k for k in saved["state_dict"] if k.endswith("proj.weight")]
    assert len(fused) == 14
    for key in fused:
        expected = form_of(llama_trio, callback, key, live[key], method, alpha)
        assert torch.allclose(saved["state_dict"][key].double(), expected, atol=1e-5), key
    embed = "model.model.embed_tokens.weight"
    assert torch.equal(saved["state_dict"][embed], live[embed])
    if method == "lssf":  # the paper's form keeps the scalar-α path (see test_callback.py)
        assert saved["lssf"]["alpha_added"] == alpha and forms.CORRECTIONS_KEY not in saved
        return
    assert set(saved[forms.CORRECTIONS_KEY]) == set(fused)
    assert saved["lssf"]["method"] == method and saved["lssf"]["options"] == {"alpha": alpha}
    # the raw weights come back bit for bit from the stored factors and fix-ups
    restored = {k: v.clone() for k, v in saved["state_dict"].items()}
    assert forms.restore_raw(restored, saved) == []
    assert all(torch.equal(restored[k], live[k]) for k in fused)


def test_resume_from_a_reset_checkpoint_is_exact(llama_trio, data_files, tmp_path):
    def callbacks(directory):
        return [lssf(llama_trio, method="lssf-reset", alpha=1.0),
                ModelCheckpoint(dirpath=directory, save_last=True)]

    _, straight = fit(llama_trio, data_files, callbacks(tmp_path / "a"), max_epochs=2)
    fit(llama_trio, data_files, callbacks(tmp_path / "b"), max_epochs=1)
    _, resumed = fit(llama_trio, data_files, callbacks(tmp_path / "c"), max_epochs=2,
                     ckpt_path=tmp_path / "b" / "last.ckpt")
    ours, theirs = state(resumed), state(straight)
    assert all(torch.equal(ours[k], v) for k, v in theirs.items())


@pytest.mark.parametrize("alpha", [1.0, 2.0])
def test_epochs_mode_applies_the_form_of_live_minus_applied(llama_trio, data_files, alpha):
    before, after = Record(), Record()
    callback = lssf(llama_trio, method="lssf-reset", alpha=alpha, apply_on="epochs", apply_epochs=[0, 1])
    fit(llama_trio, data_files, [before, callback, after], max_epochs=2)
    applied = {}
    for epoch in range(2):
        for key, weight in before.seen[epoch].items():
            raw = weight.double() - applied.get(key, 0.0)
            expected = form_of(llama_trio, callback, key, raw, "lssf-reset", alpha)
            assert torch.allclose(after.seen[epoch][key].double(), expected, atol=2e-5), (epoch, key)
            applied[key] = expected - raw
    # α = 2 is a reflection in the subspace: without the tracking, epoch 1 would undo epoch 0's reset
    key = "model.model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(after.seen[1][key], before.seen[1][key], atol=1e-4)


def test_steps_guard_keeps_the_subspace_at_the_aligned_state(llama_trio, data_files):
    after = Record(batches=True)
    callback = lssf(llama_trio, method="lssf-reset", alpha=1.0, apply_on="steps", every_n_steps=1)
    trainer, module = fit(llama_trio, data_files, [callback, after], max_epochs=1, log_every_n_steps=1)
    assert len(after.seen) == 3
    moved = False
    for weights in after.seen:
        for key, weight in weights.items():
            aligned, base = references(llama_trio, key)
            u, s, _ = torch.linalg.svd(aligned - base, full_matrices=False)
            u = u[:, : safety_critical_rank(s, 0.9)]
            assert (u.T @ (weight.double() - aligned)).abs().max() < 1e-5, key
            moved = moved or not torch.allclose(weight.double(), aligned, atol=1e-4)
    assert moved  # the run still learned outside the subspace
    assert 0.0 <= trainer.callback_metrics["lssf/update_in_subspace_step"] < 1.0


def test_update_share_is_logged_and_matches_the_dense_share(llama_trio, data_files):
    trainer, module = fit(llama_trio, data_files, [lssf(llama_trio)], max_epochs=1)
    live = state(module)
    inside = total = 0.0
    per_group = {}
    for key in [k for k in live if k.endswith("proj.weight")]:
        aligned, base = references(llama_trio, key)
        u, s, _ = torch.linalg.svd(aligned - base, full_matrices=False)
        u = u[:, : safety_critical_rank(s, 0.9)]
        update = live[key].double() - aligned
        a, b = (u.T @ update).square().sum().item(), update.square().sum().item()
        inside, total = inside + a, total + b
        group = per_group.setdefault("mlp" if ".mlp." in key else "attention", [0.0, 0.0])
        group[0], group[1] = group[0] + a, group[1] + b
    metrics = trainer.callback_metrics
    assert float(metrics["lssf/update_in_subspace"]) == pytest.approx(inside / total, rel=1e-4)
    for group, (a, b) in per_group.items():
        assert float(metrics[f"lssf/update_in_subspace/{group}"]) == pytest.approx(a / b, rel=1e-4)
    assert float(metrics["lssf/subspace_drift"]) == pytest.approx(inside**0.5, rel=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "lssf", "add": 0.5}, "method 'lssf' takes alpha; add belongs to lssf-reset"),
        ({"method": "lssf-reset", "input_share": 0.5}, "'lssf-reset' takes alpha, add; input_share belongs"),
        ({"method": "resta"}, "method"),
        ({"alpha": "auto", "add": 0.5}, "pass method= with them"),
        ({"method": "lssf-reset", "apply_on": "steps"}, "every_n_steps"),
        ({"method": "lssf-reset", "every_n_steps": 2}, "only used with apply_on='steps'"),
        ({"every_n_steps": 2}, "only used with apply_on='steps'"),
    ],
)
def test_settings_the_method_does_not_take_are_refused(llama_trio, kwargs, message):
    with pytest.raises(MisconfigurationException, match=message):
        lssf(llama_trio, **kwargs)


def test_two_sided_without_aligned_is_refused(llama_trio, data_files):
    with pytest.raises(MisconfigurationException, match="aligned="):
        fit(llama_trio, data_files, [lssf(llama_trio, method="lssf-two-sided")])


class MergedRecord(Callback):
    """The merged (effective) weights of a LoRA run after each batch."""

    def __init__(self):
        self.seen = []

    def on_train_batch_end(self, trainer, pl_module, *args):
        merged = copy.deepcopy(pl_module.model).merge_and_unload()
        self.seen.append({f"model.{k}": v for k, v in state(merged).items() if k.endswith("proj.weight")})


def test_steps_guard_on_lora_holds_the_adapter_out_of_the_subspace(llama_trio, data_files):
    after = MergedRecord()
    callback = lssf(llama_trio, method="lssf-reset", alpha=1.0, apply_on="steps", every_n_steps=1)
    torch.manual_seed(0)
    module = CausalLMModule(str(llama_trio.aligned), learning_rate=1e-2,
                            lora={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "up_proj"]})
    data = ChatDataModule(str(data_files[0]), None, batch_size=2, shuffle=False)
    trainer = Trainer(max_epochs=1, accelerator="cpu", devices=1, callbacks=[callback, after], logger=False,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(module, data)
    assert isinstance(callback.live_forms, forms.LoraHoldOut) and len(after.seen) == 3
    moved = False
    for weights in after.seen:
        for key in [k for k in weights if "q_proj" in k or "up_proj" in k]:
            aligned, base = references(llama_trio, key)
            u, s, _ = torch.linalg.svd(aligned - base, full_matrices=False)
            u = u[:, : safety_critical_rank(s, 0.9)]
            assert (u.T @ (weights[key].double() - aligned)).abs().max() < 1e-5, key
            moved = moved or not torch.allclose(weights[key].double(), aligned, atol=1e-5)
    assert moved
    assert any("lora_B" in k for k in state(module))  # still a LoRA model
    # the update share, measured on the adapters: the guard keeps the merged update out of the subspace
    assert float(trainer.callback_metrics["lssf/update_in_subspace"]) < 1e-6


class MergedAtStart(MergedRecord):
    def on_train_start(self, trainer, pl_module):
        self.on_train_batch_end(trainer, pl_module)


def test_update_share_on_lora_matches_the_dense_share_of_the_merged_update(llama_trio, data_files):
    record = MergedAtStart()
    torch.manual_seed(0)
    module = CausalLMModule(str(llama_trio.aligned), learning_rate=1e-2,
                            lora={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "up_proj"]})
    data = ChatDataModule(str(data_files[0]), None, batch_size=2, shuffle=False)
    callback = lssf(llama_trio)
    trainer = Trainer(max_epochs=1, accelerator="cpu", devices=1, callbacks=[callback, record], logger=False,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(module, data)
    assert len(callback.update_share.names) == 4  # the adapted layers only: no copy of the frozen others
    start, end = record.seen[0], record.seen[-1]
    inside = total = 0.0
    for key in [k for k in end if "q_proj" in k or "up_proj" in k]:
        aligned, base = references(llama_trio, key)
        u, s, _ = torch.linalg.svd(aligned - base, full_matrices=False)
        update = end[key].double() - start[key].double()
        inside += (u[:, : safety_critical_rank(s, 0.9)].T @ update).square().sum().item()
        total += update.square().sum().item()
    assert 0 < inside < total
    metrics = trainer.callback_metrics
    assert float(metrics["lssf/update_in_subspace"]) == pytest.approx(inside / total, rel=1e-4)
    assert float(metrics["lssf/subspace_drift"]) == pytest.approx(inside**0.5, rel=1e-4)


def test_a_form_on_a_dora_model_is_refused(llama_trio, data_files):
    module = CausalLMModule(str(llama_trio.aligned), lora={"r": 4, "lora_alpha": 8, "use_dora": True})
    data = ChatDataModule(str(data_files[0]), None, batch_size=2, shuffle=False)
    callback = lssf(llama_trio, method="lssf-reset", alpha=2.0)
    trainer = Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      callbacks=[callback], enable_progress_bar=False)
    with pytest.raises(MisconfigurationException, match="is a DoRA layer"):
        trainer.fit(module, data)


def test_the_monitors_realigned_pass_sees_the_form(llama_trio, data_files):
    seen = {}

    class Probe(Callback):
        def on_train_end(self, trainer, pl_module):
            before = state(pl_module)
            with callback.realigned_weights(pl_module):
                seen["inside"] = state(pl_module)
            seen["before"], seen["after"] = before, state(pl_module)

    callback = lssf(llama_trio, method="lssf-reset", alpha=2.0)
    fit(llama_trio, data_files, [callback, Probe()])
    key = "model.model.layers.1.mlp.down_proj.weight"
    expected = form_of(llama_trio, callback, key, seen["before"][key], "lssf-reset", 2.0)
    assert torch.allclose(seen["inside"][key].double(), expected, atol=1e-5)
    assert all(torch.equal(seen["after"][k], v) for k, v in seen["before"].items())


@pytest.mark.parametrize("apply_on", ["train_end", "epochs"])
def test_export_dir_holds_the_form(llama_trio, data_files, tmp_path, apply_on):
    epochs = {"apply_epochs": [0]} if apply_on == "epochs" else {}
    callback = lssf(llama_trio, method="lssf-erosion", alpha=2.0, apply_on=apply_on,
                    export_dir=str(tmp_path / "out"), **epochs)
    _, module = fit(llama_trio, data_files, [callback])
    live, exported = state(module), load_dir(tmp_path / "out")
    key = "model.model.layers.0.mlp.gate_proj.weight"
    if apply_on == "epochs":  # applied at the last epoch's end: the export is the live weights
        assert torch.allclose(exported[key.removeprefix("model.")], live[key], atol=1e-6)
    else:
        expected = form_of(llama_trio, callback, key, live[key], "lssf-erosion", 2.0)
        assert torch.allclose(exported[key.removeprefix("model.")].double(), expected, atol=1e-5)
        assert not torch.allclose(exported[key.removeprefix("model.")], live[key], atol=1e-4)
    embed = "model.embed_tokens.weight"
    assert torch.equal(exported[embed], live["model." + embed])


class Around(Callback):
    """The live block matrices at each train batch end (place one before and one after the LSSF callback)."""

    def __init__(self):
        self.seen = []

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.seen.append((trainer.global_step,
                          {k: v.clone() for k, v in state(pl_module).items() if k.endswith("proj.weight")}))


@pytest.mark.parametrize("method", ["lssf-erosion", "lssf-two-sided", "lssf"])
def test_steps_mode_every_n_steps_applies_each_form_of_live_minus_applied(llama_trio, data_files, method):
    before, after = Around(), Around()
    callback = lssf(llama_trio, method=method, alpha=2.0, apply_on="steps", every_n_steps=2,
                    aligned=str(llama_trio.aligned) if method == "lssf-two-sided" else None)
    fit(llama_trio, data_files, [before, callback, after], max_epochs=2)
    assert [step for step, _ in after.seen] == [1, 2, 3, 4, 5, 6]
    applied = {}
    for (step, pre), (_, post) in zip(before.seen, after.seen):
        for key in ("model.model.layers.0.self_attn.v_proj.weight", "model.model.layers.1.mlp.up_proj.weight",
                    "model.model.layers.1.self_attn.o_proj.weight"):
            if step % 2:
                assert torch.equal(pre[key], post[key]), (step, key)
                continue
            raw = pre[key].double() - applied.get(key, 0.0)
            expected = form_of(llama_trio, callback, key, raw, method, 2.0)
            assert torch.allclose(post[key].double(), expected, atol=2e-5), (step, key)
            applied[key] = expected - raw


@pytest.mark.parametrize("method", ["lssf-reset", "lssf-erosion"])
def test_resume_in_steps_mode_carries_the_applied_corrections(llama_trio, data_files, tmp_path, method):
    def callbacks(directory):
        return [lssf(llama_trio, method=method, alpha=2.0, apply_on="steps", every_n_steps=2),
                ModelCheckpoint(dirpath=directory, save_last=True)]

    _, straight = fit(llama_trio, data_files, callbacks(tmp_path / "a"), max_epochs=2)
    fit(llama_trio, data_files, callbacks(tmp_path / "b"), max_epochs=1)
    saved = torch.load(tmp_path / "b" / "last.ckpt", map_location="cpu", weights_only=False)
    (state_of_callback,) = [v for k, v in saved["callbacks"].items() if "LSSFCallback" in k]
    assert len(state_of_callback["applied_corrections"]) == 14
    _, resumed = fit(llama_trio, data_files, callbacks(tmp_path / "c"), max_epochs=2,
                     ckpt_path=tmp_path / "b" / "last.ckpt")
    ours, theirs = state(resumed), state(straight)
    assert all(torch.equal(ours[k], v) for k, v in theirs.items())
    # without the carried corrections the α = 2 reset would reflect back at the next application
    fresh = lssf(llama_trio, method=method, alpha=2.0, apply_on="steps", every_n_steps=2)
    _, naive = fit(llama_trio, data_files, [fresh, NoState(fresh)], max_epochs=2,
                   ckpt_path=tmp_path / "b" / "last.ckpt")
    assert not all(torch.allclose(state(naive)[k], v, atol=1e-4) for k, v in theirs.items())


class NoState(Callback):
    """Forgets what the LSSF callback restored (the corrections the live weights carry)."""

    def __init__(self, callback):
        self.callback = callback

    def on_train_start(self, trainer, pl_module):
        self.callback.live_forms.forms.applied = {}


def test_steps_mode_counts_optimizer_steps_under_gradient_accumulation(llama_trio, data_files):
    before, after = Around(), Around()
    callback = lssf(llama_trio, method="lssf-reset", alpha=1.0, apply_on="steps", every_n_steps=1)
    torch.manual_seed(0)
    module = CausalLMModule(str(llama_trio.aligned), learning_rate=1e-2)
    data = ChatDataModule(str(data_files[0]), None, batch_size=1, shuffle=False)
    trainer = Trainer(max_epochs=1, accelerator="cpu", devices=1, callbacks=[before, callback, after],
                      logger=False, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False, accumulate_grad_batches=2)
    trainer.fit(module, data)
    changed = [step for (step, pre), (_, post) in zip(before.seen, after.seen)
               if not all(torch.equal(pre[k], post[k]) for k in pre)]
    assert [step for step, _ in after.seen] == [0, 1, 1, 2, 2, 3]
    assert changed == [1, 2, 3]  # once per optimizer step, never before the first


def test_step_share_is_measured_on_logged_steps_only(llama_trio, data_files, monkeypatch):
    calls = []
    since_mark = UpdateShare.since_mark
    monkeypatch.setattr(UpdateShare, "since_mark", lambda self, p: calls.append(1) or since_mark(self, p))
    before, after = Around(), Around()
    callback = lssf(llama_trio, method="lssf-reset", alpha=1.0, apply_on="steps", every_n_steps=1)
    trainer, _ = fit(llama_trio, data_files, [before, callback, after], log_every_n_steps=2)
    assert [step for step, _ in after.seen] == [1, 2, 3] and len(calls) == 1  # step 2 only, not 1 or 3
    inside = total = 0.0
    for key, weight in before.seen[1][1].items():  # step 2's update: from after step 1's guard to before 2's
        aligned, base = references(llama_trio, key)
        u, s, _ = torch.linalg.svd(aligned - base, full_matrices=False)
        update = weight.double() - after.seen[0][1][key].double()
        inside += (u[:, : safety_critical_rank(s, 0.9)].T @ update).square().sum().item()
        total += update.square().sum().item()
    assert 0 < inside < total
    assert float(trainer.callback_metrics["lssf/update_in_subspace_step"]) == pytest.approx(inside / total,
                                                                                          rel=1e-4)
