"""Integrity and silent wrong results: the subspace cache's history, the factors' integrity hash, fingerprints
checked against the models they are used with, bounded hub calls, hub snapshot links, LoRA
``modules_to_save``, sweep without pickles, a malformed ``lssf_state.json``, over-long prompts."""

from __future__ import annotations

import pytest
import torch
from test_callback import ROWS, EpochEndWeights, StartSnapshot, checkpoint_as_x, fit, lssf

from lssf_lightning import training
from lssf_lightning.config import SubspaceConfig
from lssf_lightning.lightning.finetune import write_chat_jsonl
from lssf_lightning.subspace import SafetySubspace


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    rows = [{"prompt": p, "response": r} for p, r in ROWS]
    return write_chat_jsonl(root / "train.jsonl", rows), write_chat_jsonl(root / "val.jsonl", rows[:4])


# -- 1. the subspace cache keeps every subspace it built -----------------------------------------------------
def test_a_resume_after_two_settings_changes_finds_its_subspace_in_the_cache(llama_trio, chat, tmp_path,
                                                                            monkeypatch):
    cache = tmp_path / "cache.safetensors"
    raw_at = EpochEndWeights()
    fit(llama_trio, chat, [lssf(llama_trio, subspace_cache=str(cache)), raw_at,
                                 checkpoint_as_x(tmp_path / "a")], max_epochs=1)
    fingerprint_a = SafetySubspace.load(cache).metadata["fingerprint"]
    with monkeypatch.context() as patch:
        patch.setattr(training, "CACHE_KEEP", 2)
        for eta in (0.5, 0.7):  # settings B, then C: the cache keeps A next to them
            fit(llama_trio, chat, [lssf(llama_trio, subspace_cache=str(cache),
                                              subspace=SubspaceConfig(eta=eta))], max_epochs=1)
    # the cap of 2: the run's own (C) and the newest earlier one (B); A, the oldest, was removed
    kept = sorted(tmp_path.glob("cache.fp-*.safetensors"))
    assert len(kept) == 1 and SafetySubspace.load(kept[0]).metadata["eta"] == 0.5
    assert SafetySubspace.load(cache).metadata["eta"] == 0.7
    # without the cap, A survives two changes
    cache.unlink()
    for p in tmp_path.glob("cache.fp-*"):
        p.unlink()
    fit(llama_trio, chat, [lssf(llama_trio, subspace_cache=str(cache))], max_epochs=1)
    for eta in (0.5, 0.7):
        fit(llama_trio, chat, [lssf(llama_trio, subspace_cache=str(cache),
                                          subspace=SubspaceConfig(eta=eta))], max_epochs=1)
    assert len(list(tmp_path.glob("cache*.safetensors"))) == 3
    assert training.cache_history_path(cache, fingerprint_a).is_file()

    def no_build(*args, **kwargs):
        raise AssertionError("the subspace should have come from the cache")

    monkeypatch.setattr(SafetySubspace, "from_weights", no_build)
    for settings in ({}, {"subspace": SubspaceConfig(eta=0.7)}):  # resume with A's settings, and with C's
        probe = StartSnapshot()
        callback = lssf(llama_trio, subspace_cache=str(cache), **settings)
        fit(llama_trio, chat, [callback, probe], max_epochs=2, ckpt_path=tmp_path / "a" / "x.ckpt")
        # A's correction came off exactly: the raw weights of A's first epoch
        assert all(torch.equal(probe.weights[k], v) for k, v in raw_at.seen[0].items())
