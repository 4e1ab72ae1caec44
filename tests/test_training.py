"""lssf_lightning.training: the framework-free state both callbacks share, checked without a Trainer."""

import pytest
import torch
from conftest import state

from lssf_lightning import training
from lssf_lightning.config import SubspaceConfig
from lssf_lightning.validation import SettingError


@pytest.fixture(scope="module")
def subspaces(llama_trio):
    aligned, base = llama_trio.models["aligned"], llama_trio.models["base"]
    return {eta: training.build_subspace(aligned, base, SubspaceConfig(eta=eta), progress=False)
            for eta in (0.9, 0.5)}


def test_fixup_by_hand():
    raw = torch.tensor([1.0, 2.0, 3.0])
    recovered = torch.tensor([1.0, 2.5, 3.0])
    fixup = training.make_fixup(raw, recovered)
    assert fixup["index"].tolist() == [1] and fixup["value"].tolist() == [2.0]
    assert fixup["checksum"] == (6.0, 14.0)  # sum and sum of squares of the raw tensor
    assert training.apply_fixup(recovered, fixup) and torch.equal(recovered, raw)
    assert not training.apply_fixup(torch.tensor([9.0, 0.0, 3.0]), fixup)  # the checksum catches others


def test_fusion_state_adds_only_what_is_missing():
    fusion = training.FusionState(target=1.5, applied=0.5)
    assert fusion.missing == 1.0
    fusion.applied = fusion.target
    assert fusion.missing == 0.0


def test_fused_checkpoint_restores_the_exact_raw_weights(llama_trio, subspaces):
    subspace = subspaces[0.9]
    live = state(llama_trio.models["finetuned"])
    checkpoint = dict(live)  # what Lightning's state_dict holds: references to the live tensors
    fixups = training.fuse_checkpoint(checkpoint, subspace, 1.5)
    key = "model.layers.0.self_attn.q_proj.weight"
    entry = subspace[key]
    expected = live[key].double() + 1.5 * (entry.left.double() @ entry.right.double())
    assert torch.allclose(checkpoint[key].double(), expected, atol=1e-5)
    assert len(fixups) == len(subspace) and checkpoint[key] is not live[key]
    loaded = {k: v.clone() for k, v in checkpoint.items()}  # the fused weights a resume loads
    assert training.restore_raw(loaded, subspace, 1.5, fixups) == []
    assert all(torch.equal(loaded[k], v) for k, v in live.items())


def test_a_non_finite_fused_tensor_is_never_handed_on(llama_trio, subspaces):
    checkpoint = state(llama_trio.models["finetuned"])
    with pytest.raises(ValueError, match="holds NaN or inf"):
        training.fuse_checkpoint(checkpoint, subspaces[0.9], float("inf"))


def test_checkpoint_subspace_is_found_by_fingerprint_or_refused(llama_trio, subspaces, tmp_path):
    old, new = subspaces[0.9], subspaces[0.5]
    info = training.checkpoint_info(old, training.FusionState(target=1.0), SubspaceConfig(eta=0.9))
    assert training.checkpoint_subspace(info, old) is old
    assert training.checkpoint_subspace(info, new, known=[new, old]) is old
    old.save(tmp_path / "old.safetensors")
    cached = training.checkpoint_subspace(info, new, cache=tmp_path / "old.safetensors")
    assert cached.metadata["fingerprint"] == old.metadata["fingerprint"]
    aligned, base = llama_trio.models["aligned"], llama_trio.models["base"]
    rebuilt = training.checkpoint_subspace(info, new, aligned=aligned, unaligned=base, progress=False)
    assert rebuilt.metadata["fingerprint"] == old.metadata["fingerprint"]  # from the settings it stored
    with pytest.raises(training.ResumeError, match=r"cannot resume from run.ckpt.*changed: eta 0.9 -> 0.5"):
        training.checkpoint_subspace(info, new, where="run.ckpt")


def test_apply_epochs_rules():
    assert training.resolve_epochs("epochs", 0.5, 4) == {1}
    assert training.resolve_epochs("epochs", 1.0, 3) == {2}
    assert training.resolve_epochs("epochs", [0, 2], None) == {0, 2}
    assert training.resolve_epochs("checkpoint", None, 3) == set()
    with pytest.raises(SettingError, match="needs a finite"):
        training.resolve_epochs("epochs", 0.5, None)
    with pytest.raises(SettingError, match="only used with apply_on='epochs'"):
        training.check_apply_epochs("checkpoint", [1])
    assert training.check_alpha("auto", allow_auto=True) == "auto" and training.check_alpha(2) == 2.0
    with pytest.raises(SettingError, match="alpha must be a finite number, got 'auto'"):
        training.check_alpha("auto")
