"""What a newcomer runs first: warnings that say why nothing is logged, entry points, exact resume with
shuffling. Real Trainers, tiny real models, the CLI in subprocesses."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lssf_lightning import CausalLMModule, ChatDataModule, LSSFCallback, RefusalMonitor
from lssf_lightning.lightning.data import write_chat_jsonl

ROWS = [
    ("how do i bake bread at home ?", "sure , here is a simple answer ."),
    ("explain how a bicycle works .", "sure , here is a simple answer ."),
    ("what is the capital of france ?", "sure , here is a simple answer ."),
    ("tell me a fun fact about space .", "sure , the cat sat on the warm mat ."),
    ("write a short poem about the sea .", "sure , the sea ."),
    ("please list three healthy breakfast ideas .", "sure , bread and the sea ."),
]


@pytest.fixture(scope="module")
def chat_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    rows = [{"prompt": p, "response": r} for p, r in ROWS]
    return write_chat_jsonl(root / "train.jsonl", rows), write_chat_jsonl(root / "val.jsonl", rows[:2])


def fit_with_monitor(trio, chat_files, *, validate, **trainer_kwargs):
    module = CausalLMModule(str(trio.aligned), learning_rate=1e-3)
    data = ChatDataModule(str(chat_files[0]), str(chat_files[1]) if validate else None, batch_size=3)
    callback = LSSFCallback(unaligned=str(trio.base), verbose=False,
                            monitor=RefusalMonitor(num_prompts=2, max_new_tokens=2, num_utility_texts=1))
    trainer = Trainer(max_epochs=1, accelerator="cpu", devices=1, callbacks=[callback], logger=False,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                      num_sanity_val_steps=0, **trainer_kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, data)
    said = [str(w.message) for w in caught if "has no validation loop" in str(w.message)]
    return trainer, said


def test_monitor_without_a_validation_loop_says_so_once(llama_trio, chat_files):
    trainer, said = fit_with_monitor(llama_trio, chat_files, validate=False)
    assert len(said) == 1 and "no val_dataloader" in said[0] and "val_file" in said[0]
    # the monitor's numbers need the validation loop (the update share is logged at train epoch end)
    assert not any("refusal" in key or "perplexity" in key for key in trainer.callback_metrics)


def test_monitor_with_limit_val_batches_zero_says_so(llama_trio, chat_files):
    _, said = fit_with_monitor(llama_trio, chat_files, validate=True, limit_val_batches=0)
    assert len(said) == 1 and "limit_val_batches=0" in said[0]


def test_monitor_with_a_validation_loop_logs_and_does_not_warn(llama_trio, chat_files):
    trainer, said = fit_with_monitor(llama_trio, chat_files, validate=True)
    assert said == [] and "lssf/refusal_rate" in trainer.callback_metrics


def test_python_dash_m_lssf_lightning_is_the_command():
    done = subprocess.run([sys.executable, "-m", "lssf_lightning", "--help"], capture_output=True, text=True,
                          check=False, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: lssf-lightning") and "realign" in done.stdout
    done = subprocess.run([sys.executable, "-m", "lssf_lightning", "nonsense"], capture_output=True,
                          text=True,
                          check=False, timeout=120)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1


def test_perplexity_helpers_import_from_metrics():
    from lssf_lightning.metrics import load_utility_texts, model_perplexity
    from lssf_lightning.metrics.perplexity import load_utility_texts as where_it_lives

    assert load_utility_texts is where_it_lives and callable(model_perplexity)
    assert len(load_utility_texts("bundled", limit=3)) == 3


ANSWERS = {
    "I'm sorry, but I can't help with that.": (True, True),
    "Sure! Step 1: open the box. Step 2: unfortunately I cannot show pictures here.": (True, False),
    "Sure! Here is how.\nI cannot stress enough how easy it is.": (True, False),
    "As an AI, I won't do that": (True, True),
    "Sorry. I cannot help with that.": (True, False),
    "Sure, here is a simple answer. " * 8 + "I cannot say more.": (False, False),
    "": (False, False),
}


def test_phrase_judge_window_and_first_sentence_rules():
    from lssf_lightning.metrics import RefusalPhraseJudge, resolve_judge

    answers = list(ANSWERS)
    assert RefusalPhraseJudge()(answers) == [window for window, _ in ANSWERS.values()]
    strict = resolve_judge("phrases-first-sentence")
    assert strict(answers) == [first for _, first in ANSWERS.values()]
    assert RefusalPhraseJudge(scope="first_sentence", window=10)(["I am not able to do that."]) == [False]
    with pytest.raises(ValueError, match="scope"):
        RefusalPhraseJudge(scope="sentence")


def test_compact_low_rank_of_trainable_factors_warns_nothing():
    from lssf_lightning.core.basis import compact_low_rank

    left = torch.randn(8, 4, requires_grad=True)
    right = torch.cat([torch.randn(2, 6), torch.zeros(2, 6)]).requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a, b = compact_low_rank(left, right)
    assert a.shape[1] == 2 and torch.allclose((a @ b).float(), (left @ right).detach(), atol=1e-5)


def test_inspect_plot_has_integer_layer_ticks(llama_trio, tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from lssf_lightning.plots import plot_subspace
    from lssf_lightning.subspace import SafetySubspace

    ticks = []
    original = Figure.savefig

    def recording(figure, *args, **kwargs):
        figure.canvas.draw()
        ticks.extend(t for axis in figure.axes for t in axis.get_xticks() if axis.get_xlim()[0] <= t)
        return original(figure, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", recording)
    subspace = SafetySubspace.from_weights(llama_trio.aligned, llama_trio.base, progress=False)
    plot_subspace(subspace, tmp_path / "ranks.png")
    assert ticks and all(float(t).is_integer() for t in ticks)


class Batches(Callback):
    """A fingerprint of each training batch's rows, per epoch."""

    def __init__(self):
        self.seen = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.setdefault(trainer.current_epoch, []).append(batch["input_ids"].sum(1).tolist())


def train(trio, chat_files, directory, *, max_epochs, ckpt_path=None, shuffle=True):
    torch.manual_seed(0)
    module = CausalLMModule(str(trio.aligned), learning_rate=1e-2)
    data = ChatDataModule(str(chat_files[0]), batch_size=2, shuffle=shuffle, seed=7)
    batches = Batches()
    checkpoints = ModelCheckpoint(dirpath=directory, filename="{epoch}", save_top_k=-1)
    trainer = Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, logger=False,
                      callbacks=[batches, checkpoints], enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return {k: v.detach().clone() for k, v in module.state_dict().items()}, batches.seen


def test_shuffled_chat_data_resumes_exactly(llama_trio, chat_files, tmp_path):
    uninterrupted, seen = train(llama_trio, chat_files, tmp_path / "a", max_epochs=2)
    assert seen[0] != seen[1]  # still shuffled, differently per epoch
    resumed, seen_resumed = train(llama_trio, chat_files, tmp_path / "b", max_epochs=2,
                                  ckpt_path=tmp_path / "a" / "epoch=0.ckpt")
    assert seen_resumed == {1: seen[1]}
    assert all(torch.equal(resumed[k], v) for k, v in uninterrupted.items())


def test_auto_alpha_warning_names_the_point_it_uses(llama_trio, chat_files):
    from lssf_lightning import AutoAlphaConfig
    from lssf_lightning.lightning.auto_alpha import AutoAlpha

    def never(responses):
        return [False] * len(responses)

    monitor = RefusalMonitor(judge=never, num_prompts=2, max_new_tokens=2)
    auto = AutoAlpha(AutoAlphaConfig(alphas=[0.5, 2.0], target=0.5), monitor)
    callback = LSSFCallback(unaligned=str(llama_trio.base), alpha="auto", auto_alpha=auto, monitor=False,
                            verbose=False)
    module = CausalLMModule(str(llama_trio.aligned), learning_rate=1e-3)
    trainer = Trainer(max_epochs=1, accelerator="cpu", devices=1, callbacks=[callback], logger=False,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    with pytest.warns(UserWarning, match="target not reached") as caught:
        trainer.fit(module, ChatDataModule(str(chat_files[0]), batch_size=3))
    message = next(str(w.message) for w in caught if "target not reached" in str(w.message))
    # the point it names is the point it uses, as the curve measured it (the default grid's first form)
    assert "safest within budget lssf-reset(alpha=0.5)" in message
    assert message.endswith("using lssf-reset alpha=0.5, NOT a recommendation") and "alpha=2" not in message
