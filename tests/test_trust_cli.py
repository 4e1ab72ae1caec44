"""Outputs and formats on the command line: real ``lssf-lightning`` runs in subprocesses on tiny saved
models.

Each case asserts the exit code, one line on stderr (no traceback), no output or staging path left, and that
every input file's bytes are unchanged.
"""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import tree_hashes
from transformers import AutoModelForCausalLM

from lssf_lightning.cli import main

SCRIPT = Path(sys.executable).parent / "lssf-lightning"


def command(*args) -> list[str]:
    """The console script when installed (what a user runs), else the module."""
    base = [str(SCRIPT)] if SCRIPT.is_file() else [sys.executable, "-m", "lssf_lightning.cli"]
    return [*base, *map(str, args)]


def run_cli(*args, env=None):
    done = subprocess.run(command(*args), check=False, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)
    return done.returncode, done.stdout, done.stderr


def one_error_line(stderr: str) -> str:
    """The one line the user reads (progress bars and one-line warnings aside)."""
    lines = [line for line in stderr.splitlines()
             if line.startswith("lssf-lightning") and "warning:" not in line]
    assert "Traceback" not in stderr and len(lines) == 1, stderr
    return lines[0]


def in_process(capsys, *args) -> tuple[int, str]:
    """``main()`` in this process (the same code path as the console script, without the start-up cost)."""
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def leftovers(*directories: Path) -> list[str]:
    return [p.name for d in directories if d.is_dir() for p in d.iterdir() if ".lssf-" in p.name]


@pytest.fixture(scope="module")
def trio(llama_trio):
    return llama_trio


def realign_args(trio, output, *extra):
    return ["realign", "--aligned", trio.aligned, "--unaligned", trio.base, "--finetuned", trio.finetuned,
            "--output", output, *extra]


def test_outputs_that_would_destroy_an_input_are_refused(trio, tmp_path, capsys):
    before = tree_hashes(trio.aligned, trio.base, trio.finetuned)
    code, _, stderr = run_cli(*realign_args(trio, trio.finetuned, "--overwrite"))  # the console script itself
    assert code == 1 and f"output {trio.finetuned} is the input" in one_error_line(stderr), stderr
    cases = [
        (realign_args(trio, trio.finetuned.parent, "--overwrite"), "contains the input"),
        (realign_args(trio, trio.aligned / "sub"), "lies inside the input"),
        (["subspace", "--aligned", trio.aligned, "--unaligned", trio.base, "--output",
          trio.aligned / "model.safetensors", "--overwrite"], "model.safetensors lies inside the input"),
        (["subspace", "--aligned", trio.aligned, "--unaligned", trio.base, "--output",
          trio.base / "model.safetensors"], "model.safetensors lies inside the input"),
        (["inspect", trio.finetuned / "model.safetensors", "--plot", trio.finetuned / "model.safetensors",
          "--overwrite"], "is the input"),
    ]
    for args, expected in cases:
        code, stderr = in_process(capsys, *args)
        line = one_error_line(stderr)
        assert code == 1 and expected in line and "error:" in line, stderr
    assert tree_hashes(trio.aligned, trio.base, trio.finetuned) == before
    assert leftovers(trio.finetuned.parent, trio.aligned, trio.base) == []


def test_an_existing_directory_is_not_replaced_by_a_subspace_file(trio, tmp_path, capsys):
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    code, stderr = in_process(capsys, "subspace", "--aligned", trio.aligned, "--unaligned", trio.base,
                              "--output", target, "--overwrite")
    assert code == 1 and f"{target}: exists and is not a regular file" in one_error_line(stderr)
    code, stderr = in_process(capsys, "subspace", "--aligned", trio.aligned, "--unaligned", trio.base,
                              "--output", target)
    assert code == 1 and f"{target}: already exists" in one_error_line(stderr)
    assert (target / "keep.txt").read_text() == "mine" and leftovers(tmp_path) == []


@contextlib.contextmanager
def tmpfs(path: Path, options: str):
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=False,
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("needs permission to mount a small tmpfs (a full / read-only file system)")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


def test_full_disk_is_one_line_naming_the_path(trio, tmp_path):
    before = tree_hashes(trio.aligned, trio.base, trio.finetuned)
    with tmpfs(tmp_path / "mnt", "size=48k") as mount:
        code, _, stderr = run_cli(*realign_args(trio, mount / "out"))
        line = one_error_line(stderr)
        assert code == 1 and "No space left on device" in line and f"{mount / 'out'}" in line, stderr
        assert ".lssf-staging" not in line
        assert list(mount.iterdir()) == []  # no output, no staging directory, no lock
    assert tree_hashes(trio.aligned, trio.base, trio.finetuned) == before


def test_read_only_output_is_one_line_naming_the_path(trio, tmp_path, capsys):
    with tmpfs(tmp_path / "ro", "ro,size=1m") as mount:
        code, stderr = in_process(capsys, "subspace", "--aligned", trio.aligned, "--unaligned", trio.base,
                                  "--output", mount / "s.safetensors")
        line = one_error_line(stderr)
        assert code == 1 and "Read-only file system" in line and str(mount) in line, stderr


@pytest.mark.parametrize(("signum", "delay", "code", "word"), [
    (signal.SIGINT, 0.3, 130, "interrupted"),  # still importing
    (signal.SIGINT, 1.5, 130, "interrupted"),  # importing torch, or working
    (signal.SIGTERM, 1.5, 143, "terminated"),  # `kill`, a scheduler's time limit: cleaned up like Ctrl-C
])
def test_ctrl_c_or_kill_at_any_moment_is_one_line(trio, tmp_path, signum, delay, code, word):
    output = tmp_path / "out"
    child = subprocess.Popen(command(*realign_args(trio, output)), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    child.send_signal(signum)
    _, stderr = child.communicate(timeout=120)
    if child.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert child.returncode == code, stderr
    assert word in one_error_line(stderr)
    assert not output.exists() and leftovers(tmp_path) == []


def test_two_runs_on_one_output_one_wins_the_other_fails_clearly(trio, tmp_path):
    output = tmp_path / "out"
    runs = [subprocess.Popen(command(*realign_args(trio, output)), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 1], results
    loser = next(stderr for code, stderr in results if code == 1)
    line = one_error_line(loser)
    assert str(output) in line and any(
        reason in line for reason in ("being written by another", "already exists", "appeared while")), line
    model = AutoModelForCausalLM.from_pretrained(output)  # complete and loadable
    assert set(model.state_dict()) == set(trio.models["finetuned"].state_dict())
    assert leftovers(tmp_path) == []


def test_debug_variable_still_shows_the_traceback(trio, monkeypatch):
    from lssf_lightning.io.guard import OutputOverlapError

    monkeypatch.setenv("LSSF_LIGHTNING_DEBUG", "1")
    with pytest.raises(OutputOverlapError, match="is the input"):  # raised, so Python prints the traceback
        main([str(a) for a in realign_args(trio, trio.finetuned, "--overwrite")])


def test_inspect_plot_follows_the_same_output_rule(trio, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    subspace = tmp_path / "s.safetensors"
    assert in_process(capsys, "subspace", "--aligned", trio.aligned, "--unaligned", trio.base, "--output",
                      subspace)[0] == 0
    plot = tmp_path / "ranks.png"
    assert in_process(capsys, "inspect", subspace, "--plot", plot)[0] == 0
    first = plot.read_bytes()
    assert first.startswith(b"\x89PNG")
    code, stderr = in_process(capsys, "inspect", subspace, "--plot", plot)
    assert code == 1 and "already exists" in one_error_line(stderr) and plot.read_bytes() == first
    code, stderr = in_process(capsys, "inspect", subspace, "--plot", subspace, "--overwrite")
    assert code == 1 and "is the input" in one_error_line(stderr)
    assert in_process(capsys, "inspect", subspace, "--plot", plot, "--overwrite")[0] == 0
    assert leftovers(tmp_path) == []
