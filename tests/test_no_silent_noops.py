"""Options and inputs that would do nothing say so: an empty subspace, a realignment that changes nothing,
subspace settings next to a precomputed subspace, a subspace from another architecture. The CLI in
subprocesses, real tiny checkpoints."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import load_dir, run_cli

from lssf_lightning.realign import realign_checkpoint
from lssf_lightning.subspace import EmptySubspaceWarning, SafetySubspace


def test_subspace_of_identical_models_is_a_one_line_error(llama_trio, tmp_path):
    code, _, err = run_cli("subspace", "--aligned", llama_trio.base, "--unaligned", llama_trio.base,
                           "--output", tmp_path / "s.safetensors")
    lines = err.strip().splitlines()
    assert code == 1 and "identical in all 14 targeted matrices" in lines[-1], err
    assert not any(line.startswith("lssf-lightning") and "identical" in line for line in lines[:-1])
    assert not (tmp_path / "s.safetensors").exists()
    with pytest.warns(EmptySubspaceWarning, match="δ = 0"):
        SafetySubspace.from_weights(llama_trio.base, llama_trio.base, progress=False)


def test_realign_that_changes_nothing_reports_zero_edits(llama_trio, tmp_path):
    code, out, err = run_cli("realign", "--finetuned", llama_trio.finetuned, "--aligned", llama_trio.base,
                             "--unaligned", llama_trio.base, "--output", tmp_path / "out")
    assert code == 0, err
    assert "edited 0 of 21 tensors; 14 planned edits changed nothing" in out
    assert "realign changed no tensor" in err
    written, original = load_dir(tmp_path / "out"), load_dir(llama_trio.finetuned)
    assert written.keys() == original.keys() and all((written[k] == v).all() for k, v in original.items())
    report = realign_checkpoint(llama_trio.finetuned, tmp_path / "real", aligned=llama_trio.aligned,
                                unaligned=llama_trio.base, progress=False)
    assert report.changed == report.edited == 14 and "edited 14 of 21 tensors in" in str(report)


@pytest.fixture(scope="module")
def subspace_file(llama_trio, tmp_path_factory):
    path = tmp_path_factory.mktemp("s") / "safety.safetensors"
    SafetySubspace.from_weights(llama_trio.aligned, llama_trio.base, {"eta": 0.8}, progress=False).save(path)
    return path


@pytest.mark.parametrize("as_adapter", [False, True])
def test_subspace_settings_next_to_a_precomputed_subspace_are_an_error(llama_trio, subspace_file, tmp_path,
                                                                       as_adapter):
    extra = ["--as-adapter"] if as_adapter else []
    code, _, err = run_cli("realign", *extra, "--finetuned", llama_trio.finetuned, "--subspace",
                           subspace_file, "--eta", "0.5", "--output", tmp_path / "out")
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "eta 0.5" in err and "built with eta 0.8" in err and str(subspace_file) in err
    assert not (tmp_path / "out").exists()


def test_a_subspace_from_another_architecture_is_named(llama_trio, subspace_file, tmp_path):
    other = tmp_path / "qwen-finetune"
    shutil.copytree(llama_trio.finetuned, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "qwen2"}))
    code, _, err = run_cli("realign", "--finetuned", other, "--subspace", subspace_file, "--output",
                           tmp_path / "out")
    assert code == 0 and "'qwen2' model" in err and "'llama' model" in err, err
    code, _, err = run_cli("realign", "--finetuned", llama_trio.finetuned, "--subspace", subspace_file,
                           "--output", tmp_path / "same")
    assert code == 0 and "model but the safety subspace" not in err, err
