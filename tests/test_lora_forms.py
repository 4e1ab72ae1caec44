"""LSSFCallback(method=...) on a peft LoRA model, on real Trainer runs with a tiny Llama: each form reads
the merged weight ``base + s·B·A`` and puts its correction into the frozen base. Checkpoint mode (the dense
form of the merged live weights, raw live weights, exact resume), train_end's model and adapter, epochs mode
(no stacking, and the adapter for the aligned model)."""

import copy

import pytest
import torch
from conftest import load_dir, state
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from test_callback import lssf
from test_callback_forms import ROWS, form_of
from test_forms import dense_form
from transformers import AutoModelForCausalLM

from lssf_lightning import forms, training
from lssf_lightning.io.names import canonical_key
from lssf_lightning.lightning.data import ChatDataModule, write_chat_jsonl
from lssf_lightning.lightning.module import CausalLMModule
from lssf_lightning.subspace import SafetySubspace

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "up_proj"]}
METHODS = ["lssf-reset", "lssf-erosion", "lssf-two-sided"]
PREFIX = "model.base_model.model."


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return (write_chat_jsonl(root / "train.jsonl", [{"prompt": p, "response": r} for p, r in ROWS]),)


def fit(trio, data_files, callbacks, *, max_epochs=1, ckpt_path=None):
    torch.manual_seed(0)
    module = CausalLMModule(str(trio.aligned), learning_rate=1e-2, lora=LORA)
    data = ChatDataModule(str(data_files[0]), None, batch_size=2, shuffle=False)
    trainer = Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, callbacks=callbacks, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks))
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return trainer, module


def merged(module):
    """``{Lightning key of a full model: merged weight}`` of the block matrices (``model.model.layers…``)."""
    return {f"model.{k}": v for k, v in state(module.merged_model()).items() if k.endswith("proj.weight")}


def stored_key(key, live):
    """The LoRA model's state-dict key of a merged key (``…base_layer.weight`` for an adapted matrix)."""
    inner = PREFIX + key.removeprefix("model.")
    adapted = inner.replace(".weight", ".base_layer.weight")
    return adapted if adapted in live else inner


def callback(trio, method, **kwargs):
    aligned = {"aligned": str(trio.aligned)} if method == "lssf-two-sided" else {}
    return lssf(trio, method=method, log_update_share=False, **aligned, **kwargs)


@pytest.fixture(scope="module")
def plain(llama_trio, data_files):
    return state(fit(llama_trio, data_files, [])[1])


@pytest.mark.parametrize("method", METHODS)
def test_checkpoint_holds_the_form_of_the_merged_weights(llama_trio, data_files, plain, tmp_path,
                                                         method):
    lssf_callback = callback(llama_trio, method, alpha=2.0)
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    _, module = fit(llama_trio, data_files, [lssf_callback, checkpoints])
    live = state(module)
    assert all(torch.equal(live[k], v) for k, v in plain.items()), "checkpoint mode changed the live weights"
    saved = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=False)
    adapted = 0
    for key, weight in merged(module).items():
        expected = form_of(llama_trio, lssf_callback, key, weight, method, 2.0)  # on the merged live weight
        stored = stored_key(key, live)
        adapted += stored.endswith(".base_layer.weight")
        got = saved["state_dict"][stored].double() + (weight.double() - live[stored].double())  # + s·B·A
        assert torch.allclose(got, expected, atol=1e-5), key
    assert adapted == 4  # q_proj and up_proj of both layers: the correction went into the frozen base
    for key in (k for k in live if "lora_" in k):  # the adapters are stored as trained
        assert torch.equal(saved["state_dict"][key], live[key])
    assert saved["lssf"]["method"] == method
    restored = {k: v.clone() for k, v in saved["state_dict"].items()}
    assert forms.restore_raw(restored, saved) == []
    assert all(torch.equal(restored[k], live[k]) for k in saved[forms.CORRECTIONS_KEY])


def test_resume_from_a_lora_checkpoint_is_exact(llama_trio, data_files, tmp_path):
    def callbacks(directory):
        return [callback(llama_trio, "lssf-reset", alpha=2.0),
                ModelCheckpoint(dirpath=directory, save_last=True)]

    _, straight = fit(llama_trio, data_files, callbacks(tmp_path / "a"), max_epochs=2)
    fit(llama_trio, data_files, callbacks(tmp_path / "b"), max_epochs=1)
    _, resumed = fit(llama_trio, data_files, callbacks(tmp_path / "c"), max_epochs=2,
                     ckpt_path=tmp_path / "b" / "last.ckpt")
    ours, theirs = state(resumed), state(straight)
    assert all(torch.equal(ours[k], v) for k, v in theirs.items())


@pytest.mark.parametrize("method", METHODS)
def test_train_end_exports_the_form_and_one_adapter_for_the_aligned_model(llama_trio, data_files,
                                                                          tmp_path, method):
    from peft import PeftModel

    lssf_callback = callback(llama_trio, method, alpha=2.0, apply_on="train_end",
                             export_dir=str(tmp_path / "out"), export_adapter_dir=str(tmp_path / "adapter"))
    _, module = fit(llama_trio, data_files, [lssf_callback])
    exported = load_dir(tmp_path / "out")
    changed = 0
    for key, weight in merged(module).items():
        expected = form_of(llama_trio, lssf_callback, key, weight, method, 2.0)
        assert torch.allclose(exported[key.removeprefix("model.")].double(), expected, atol=1e-5), key
        changed += not torch.allclose(expected, weight.double(), atol=1e-4)
    assert changed  # the form did something
    base = AutoModelForCausalLM.from_pretrained(llama_trio.aligned)
    adapter = state(PeftModel.from_pretrained(base, tmp_path / "adapter").merge_and_unload())
    assert adapter.keys() == exported.keys()
    for key, value in exported.items():
        error = (adapter[key].double() - value.double()).norm() / value.double().norm()
        assert error < 1e-5, (key, float(error))


class MergedAround(Callback):
    """The merged block matrices at each train epoch end (one before and one after the LSSF callback)."""

    def __init__(self):
        self.seen = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.seen.append(merged(pl_module))


@pytest.mark.parametrize("method", ["lssf-reset", "lssf-two-sided"])
def test_epochs_mode_edits_the_base_and_never_stacks(llama_trio, data_files, tmp_path, method):
    before, after = MergedAround(), MergedAround()
    lssf_callback = callback(llama_trio, method, alpha=2.0, apply_on="epochs", apply_epochs=[0, 1],
                             export_adapter_dir=str(tmp_path / "adapter"))
    _, module = fit(llama_trio, data_files, [before, lssf_callback, after], max_epochs=2)
    applied = {}
    for epoch in range(2):
        for key, weight in before.seen[epoch].items():
            raw = weight.double() - applied.get(key, 0.0)
            expected = form_of(llama_trio, lssf_callback, key, raw, method, 2.0)
            assert torch.allclose(after.seen[epoch][key].double(), expected, atol=2e-5), (epoch, key)
            applied[key] = expected - raw
    # α = 2 resets reflect: without the tracking, epoch 1 would undo epoch 0's edit
    key = "model.model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(after.seen[1][key], before.seen[1][key], atol=1e-4)
    assert any("lora_B" in k for k in state(module))  # still a LoRA model
    # the adapter, for the aligned model the run started from, is the form of the raw merged weights
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(llama_trio.aligned)
    adapter = state(PeftModel.from_pretrained(base, tmp_path / "adapter").merge_and_unload())
    for key, weight in after.seen[1].items():
        assert torch.allclose(adapter[key.removeprefix("model.")].double(), weight.double(), atol=1e-5), key



class MergedSteps(Callback):
    """The merged block matrices at each train batch end, with the optimizer step."""

    def __init__(self):
        self.seen = []

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.seen.append((trainer.global_step, merged(pl_module)))


@pytest.mark.parametrize(("method", "alpha"), [("lssf-erosion", 2.0), ("lssf-reset", 1.0)])
def test_steps_mode_applies_the_form_of_merged_minus_applied(llama_trio, data_files, tmp_path, method, alpha):
    # the reset at α 1 with an export: the form on the merged weights (the adapter guard cannot export)
    before, after = MergedSteps(), MergedSteps()
    lssf_callback = callback(llama_trio, method, alpha=alpha, apply_on="steps", every_n_steps=2,
                             export_dir=str(tmp_path / "out"))
    fit(llama_trio, data_files, [before, lssf_callback, after], max_epochs=2)
    assert isinstance(lssf_callback.live_forms, forms.LiveForms)
    assert [step for step, _ in after.seen] == [1, 2, 3, 4, 5, 6]
    applied = {}
    for (step, pre), (_, post) in zip(before.seen, after.seen):
        for key in pre:
            if step % 2:
                assert torch.equal(pre[key], post[key]), (step, key)
                continue
            raw = pre[key].double() - applied.get(key, 0.0)
            expected = form_of(llama_trio, lssf_callback, key, raw, method, alpha)
            assert torch.allclose(post[key].double(), expected, atol=2e-5), (step, key)
            applied[key] = expected - raw
    exported = load_dir(tmp_path / "out")  # applied at the last step: the export is the live weights
    for key, weight in after.seen[-1][1].items():
        assert torch.allclose(exported[key.removeprefix("model.")], weight, atol=1e-5), key


def test_the_monitors_realigned_pass_sees_the_form_of_the_merged_weights(llama_trio, data_files):
    seen = {}

    class Probe(Callback):
        def on_train_end(self, trainer, pl_module):
            before = state(pl_module)
            seen["merged"] = merged(pl_module)
            with lssf_callback.realigned_weights(pl_module):
                seen["inside"] = merged(pl_module)
            seen["before"], seen["after"] = before, state(pl_module)

    lssf_callback = callback(llama_trio, "lssf-erosion", alpha=2.0)
    fit(llama_trio, data_files, [lssf_callback, Probe()])
    changed = 0
    for key, weight in seen["merged"].items():
        expected = form_of(llama_trio, lssf_callback, key, weight, "lssf-erosion", 2.0)
        assert torch.allclose(seen["inside"][key].double(), expected, atol=1e-5), key
        changed += not torch.allclose(seen["inside"][key], weight, atol=1e-4)
    assert changed
    assert all(torch.equal(seen["after"][k], v) for k, v in seen["before"].items())


@pytest.mark.parametrize("method", METHODS)
def test_gpt2_conv1d_lora_layers_are_read_merged_in_their_layout(gpt2_trio, method):
    """GPT-2's ``Conv1D`` stores ``Wᵀ`` and peft's update is ``(s·B·A)ᵀ`` (``fan_in_fan_out``): the checkpoint
    fusion (dense) and a live application (the reset's and erosion's rank-sized coordinates) both read the
    merged weight."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(gpt2_trio.aligned), config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.5)  # a trained adapter
    subspace = SafetySubspace.from_weights(str(gpt2_trio.aligned), str(gpt2_trio.base), progress=False)
    parameters = training.named_tensors(model)
    live = forms.LiveForms(method, {"alpha": 2.0}, subspace, parameters, aligned=str(gpt2_trio.aligned),
                           unaligned=str(gpt2_trio.base), module=model)
    assert len(live.forms.outside) == 4  # c_attn and c_fc of both blocks
    merged_before = state(copy.deepcopy(model).merge_and_unload())
    aligned, base = state(gpt2_trio.models["aligned"]), state(gpt2_trio.models["base"])

    def expected(key):
        name = canonical_key(key)
        return dense_form(method, merged_before[name].double().T, aligned[name].double().T,
                          base[name].double().T, subspace[name], 2.0).T

    checkpoint = {"state_dict": dict(model.state_dict())}
    live.fuse_checkpoint(checkpoint)
    for key in live.keys:
        lora = merged_before[canonical_key(key)].double() - parameters[key].double()  # (s·B·A)ᵀ or 0
        assert torch.allclose(checkpoint["state_dict"][key].double() + lora, expected(key), atol=1e-5), key
    live.apply_(parameters)
    merged_after = state(copy.deepcopy(model).merge_and_unload())
    for key in live.keys:
        assert torch.allclose(merged_after[canonical_key(key)].double(), expected(key), atol=1e-5), key
