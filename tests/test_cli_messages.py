"""The command line's own words: one-line usage errors (also for `fit` and its YAML), unknown options named
before missing ones, CLI spelling in errors, other libraries' warnings not relabelled, help without reST."""

from __future__ import annotations

import subprocess
import sys

from conftest import run_cli

from lssf_lightning.cli import _one_line_warning


def fit(*args, cwd=None):
    done = subprocess.run([sys.executable, "-m", "lssf_lightning", "fit", *map(str, args)],
                          capture_output=True, text=True, check=False, cwd=cwd, timeout=300)
    return done.returncode, done.stdout, done.stderr


def test_fit_yaml_typo_is_one_line_naming_the_key_and_file(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("trainer:\n  max_epochs: 1\n  callbakcs: []\n"
                      "model:\n  model: x\ndata:\n  train_file: t\n")
    code, _, err = fit("--config", config, cwd=tmp_path)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "unknown option or config key 'trainer.callbakcs'" in err and str(config) in err


def test_fit_unknown_option_is_one_line():
    code, _, err = fit("--model.modle", "x")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--model.modle" in err, err


def test_fit_help_usage_line_and_plain_quotes():
    code, out, _ = fit("--help")
    assert code == 0 and out.startswith("usage: lssf-lightning fit [-c CONFIG]")
    assert "``" not in out and "fit [options] fit" not in out
    code, out, _ = run_cli("--help")
    assert code == 0 and "``" not in out


def test_a_typo_is_named_before_a_missing_option(tmp_path):
    code, _, err = run_cli("subspace", "--aligend", "a", "--unaligned", "b", "--output", tmp_path / "s")
    assert code == 2 and err.strip() == ("lssf-lightning subspace: error: unrecognized arguments: --aligend; "
                                         "did you mean --aligned? (see --help)")
    code, _, err = run_cli("subspace", "--unaligned", "b", "--output", tmp_path / "s")
    assert code == 2 and "required: --aligned" in err


def test_errors_use_the_command_line_spelling(llama_trio, tmp_path):
    existing = tmp_path / "s.safetensors"
    existing.write_bytes(b"keep")
    code, _, err = run_cli("subspace", "--aligned", llama_trio.aligned, "--unaligned", llama_trio.base,
                           "--output", existing)
    assert code == 1 and "--overwrite" in err and "overwrite=True" not in err, err
    assert existing.read_bytes() == b"keep"


def test_only_this_package_s_warnings_carry_its_label(capsys):
    _one_line_warning("a  note\n over lines", FutureWarning,
                      "/venv/lib/python3.11/site-packages/transformers/modeling_utils.py", 3)
    _one_line_warning("ours", UserWarning, "/repo/lssf_lightning/realign.py", 3)
    assert capsys.readouterr().err.splitlines() == [
        "transformers: FutureWarning: a note over lines", "lssf-lightning: warning: ours"]
