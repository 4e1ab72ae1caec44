"""Output paths never destroy data; every writer goes through one guard and one checked
commit.

In-process runs of the real writers (``write_model_directory``, the subspace file writer) on real files; the
CLI side (one-line errors, the two-process race) is in ``test_trust_cli.py``.
"""

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from conftest import tree_hashes
from safetensors.torch import load_file, save_file

from lssf_lightning.io import guard as guard_module
from lssf_lightning.io.export import write_model_directory
from lssf_lightning.io.guard import (
    LeftoverWarning,
    OutputBusyError,
    OutputChangedError,
    OutputGuard,
    OutputOverlapError,
    check_output,
    guarded_output,
)
from lssf_lightning.io.shards import NonFiniteTensorError
from lssf_lightning.io.subspace_file import read_subspace_file, write_subspace_file
from lssf_lightning.io.weights import MappingStore, open_weights


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".lssf-" in p.name)


@pytest.fixture
def model_dir(tmp_path):
    """A small model directory (a real safetensors file and a config), plus an unrelated file next to it."""
    directory = tmp_path / "finetuned"
    directory.mkdir()
    generator = torch.Generator().manual_seed(0)
    save_file({"a.weight": torch.randn(4, 3, generator=generator),
               "b.weight": torch.randn(5, generator=generator)},
              directory / "model.safetensors", metadata={"format": "pt"})
    (directory / "config.json").write_text('{"model_type": "test"}')
    (tmp_path / "notes.txt").write_text("the user's own file")
    return directory


def write(store_dir: Path, output: Path, **kwargs) -> int:
    return write_model_directory(open_weights(store_dir), output, inputs=[store_dir], progress=False,
                                 **kwargs)


@pytest.mark.parametrize("where", ["same", "inside", "parent", "through_symlink", "dotdot"])
def test_output_overlapping_an_input_is_refused_before_any_work(model_dir, tmp_path, where):
    (tmp_path / "link").symlink_to(model_dir)
    output = {
        "same": model_dir,
        "inside": model_dir / "realigned",
        "parent": tmp_path,
        "through_symlink": tmp_path / "link" / "out",
        "dotdot": model_dir / ".." / "finetuned" / "x",
    }[where]
    before = tree_hashes(tmp_path)
    with pytest.raises(OutputOverlapError) as caught:
        write(model_dir, output, overwrite=True)
    message = str(caught.value)
    assert "output" in message and str(model_dir) in message and "\n" not in message
    assert tree_hashes(tmp_path) == before and leftovers(tmp_path) == [] and leftovers(model_dir) == []


def test_output_holding_a_symlinked_input_blob_is_refused(model_dir, tmp_path):
    # A HF cache snapshot: the input directory holds links into a blobs directory, which must not be the
    # output.
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshot"
    blobs.mkdir()
    snapshot.mkdir()
    (model_dir / "model.safetensors").rename(blobs / "abc123.safetensors")
    (snapshot / "model.safetensors").symlink_to(blobs / "abc123.safetensors")
    with pytest.raises(OutputOverlapError, match="blobs"):
        check_output(blobs, [snapshot], overwrite=True)


def test_existing_output_is_replaced_only_with_overwrite_and_only_if_it_holds_model_files(
    model_dir, tmp_path
):
    output = tmp_path / "out"
    assert write(model_dir, output) == 2
    first = tree_hashes(output)
    with pytest.raises(FileExistsError, match="already exists .*overwrite"):
        write(model_dir, output)
    assert tree_hashes(output) == first
    (output / "model.safetensors").write_bytes(b"stale")  # replaced by a fresh, complete copy
    write(model_dir, output, overwrite=True)
    assert load_file(output / "model.safetensors").keys() == {"a.weight", "b.weight"}
    (output / "my_results").mkdir()  # something an lssf output never holds: refuse to delete it
    with pytest.raises(FileExistsError, match="my_results/.*refusing to replace"):
        write(model_dir, output, overwrite=True)
    assert (output / "my_results").is_dir() and leftovers(tmp_path) == []
    with pytest.raises(NotADirectoryError, match="not a directory"):
        write(model_dir, tmp_path / "notes.txt", overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "the user's own file"


def test_output_that_appears_or_changes_during_the_run_is_never_replaced(model_dir, tmp_path):
    output = tmp_path / "out"

    def appear(weight):
        output.mkdir(exist_ok=True)
        (output / "config.json").write_text("{}")
        return weight

    with pytest.raises(OutputChangedError, match="appeared while this run was writing"):
        write(model_dir, output, edits={"a.weight": appear})
    assert [p.name for p in output.iterdir()] == ["config.json"] and leftovers(tmp_path) == []

    def modify(weight):
        (output / "generation_config.json").write_text("{}")
        return weight

    with pytest.raises(OutputChangedError, match="replaced or modified"):
        write(model_dir, output, edits={"a.weight": modify}, overwrite=True)
    assert sorted(p.name for p in output.iterdir()) == ["config.json", "generation_config.json"]
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("origin", ["edit", "input"])
def test_a_nan_is_never_written(model_dir, tmp_path, origin):
    store = open_weights(model_dir)
    if origin == "input":
        tensors = {k: store.get(k).clone() for k in store.keys()}  # noqa: SIM118
        tensors["b.weight"][2] = float("nan")
        store = MappingStore(tensors, location="finetuned")
    edits = {"a.weight": lambda w: w * float("inf")} if origin == "edit" else {}
    with pytest.raises(NonFiniteTensorError) as caught:
        write_model_directory(store, tmp_path / "out", edits=edits, progress=False)
    expected = "a.weight: its edit produced" if origin == "edit" else "b.weight: the input finetuned holds"
    assert expected in str(caught.value) and "NaN or inf" in str(caught.value)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_a_second_writer_of_the_same_output_fails_clearly(model_dir, tmp_path):
    output = tmp_path / "out"
    with OutputGuard(output, [model_dir]) as first:
        busy = f"being written by another lssf_lightning run \\(pid {os.getpid()}"
        with pytest.raises(OutputBusyError, match=busy):
            write(model_dir, output)
        (first.staging / "config.json").write_text("{}")
        first.commit()
    assert (output / "config.json").is_file() and leftovers(tmp_path) == []


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_leftovers_of_a_killed_run_are_named_and_cleaned(model_dir, tmp_path):
    output = tmp_path / "out"
    script = (
        "import sys, time\n"
        "from lssf_lightning.io.guard import guarded_output\n"
        f"with guarded_output({str(output)!r}) as staging:\n"
        "    (staging / 'model.safetensors').write_bytes(b'half written')\n"
        "    print('ready', flush=True)\n"
        "    time.sleep(60)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert len(leftovers(tmp_path)) == 2  # its lock and its staging directory
    # A run of another host (or a live one) is named but never touched.
    foreign = tmp_path / f".out{guard_module.STAGING_TAG}0000beef-{_dead_pid()}-abcd"
    foreign.mkdir()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        write(model_dir, output)
    messages = [str(w.message) for w in caught if issubclass(w.category, LeftoverWarning)]
    assert any(f"left by a killed run (pid {child.pid}" in m and "lock" in m for m in messages)
    assert any(f"staging path left by a killed run (pid {child.pid})" in m for m in messages)
    assert any(str(foreign) in m and "not touched" in m for m in messages)
    assert leftovers(tmp_path) == [foreign.name]
    assert load_file(output / "model.safetensors").keys() == {"a.weight", "b.weight"}


def test_a_previous_version_moved_aside_by_a_killed_commit_is_put_back(model_dir, tmp_path):
    output = tmp_path / "out"
    write(model_dir, output)
    before = tree_hashes(output)
    aside = tmp_path / f".out{guard_module.RETIRED_TAG}{guard_module._HOST_TAG}-{_dead_pid()}-abcd"
    output.rename(aside)  # what a run killed between its two renames leaves
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(FileExistsError, match="already exists"):
            write(model_dir, output)
    assert any("put back" in str(w.message) for w in caught)
    assert tree_hashes(output) == {k.replace(str(aside), str(output)): v for k, v in before.items()}
    assert leftovers(tmp_path) == []


def test_a_stale_lock_of_a_dead_pid_is_removed_and_a_live_one_is_respected(model_dir, tmp_path):
    output = tmp_path / "out"
    lock = tmp_path / ".out.lssf-lock"
    lock.write_text(json.dumps({"pid": os.getppid(), "host": guard_module._HOST, "nonce": "x", "time": "t"}))
    with pytest.raises(OutputBusyError, match=f"pid {os.getppid()}.*delete .*lssf-lock"):
        write(model_dir, output)
    lock.write_text(json.dumps({"pid": _dead_pid(), "host": guard_module._HOST, "nonce": "y", "time": "t"}))
    with pytest.warns(LeftoverWarning, match="removed the lock"):
        write(model_dir, output)
    assert leftovers(tmp_path) == []


class _Entry:
    def __init__(self, left, right, sigma):
        self.left, self.right, self.singular_values = left, right, sigma
        self.entropy, self.total_energy, self.conv1d = 1.0, 2.0, False


def _entries(value=1.0):
    return {"layers.0.q.weight": _Entry(torch.full((4, 2), value), torch.ones(2, 3), torch.ones(2))}


def test_subspace_file_writer_guards_its_target(model_dir, tmp_path):
    path = tmp_path / "safety.safetensors"
    write_subspace_file(path, _entries(), {"eta": 0.9})
    assert read_subspace_file(path)[1] == {"eta": 0.9}
    write_subspace_file(path, _entries(2.0), {"eta": 0.5}, overwrite=True)
    assert read_subspace_file(path)[1] == {"eta": 0.5}
    with pytest.raises(FileExistsError, match="already exists"):
        write_subspace_file(path, _entries(), {}, overwrite=False)
    weights = model_dir / "model.safetensors"
    before = tree_hashes(model_dir)
    with pytest.raises(FileExistsError, match="already exists"):
        write_subspace_file(weights, _entries(), {})
    with pytest.raises(OutputOverlapError, match="is the input"):
        write_subspace_file(weights, _entries(), {}, overwrite=True, inputs=[weights])
    with pytest.raises(NonFiniteTensorError, match="layers.0.q.weight:left holds NaN"):
        write_subspace_file(tmp_path / "nan.safetensors", _entries(float("nan")), {})
    with pytest.raises(ValueError, match="NaN or inf"):
        write_subspace_file(tmp_path / "nan.safetensors", _entries(), {"eta": float("nan")})
    assert tree_hashes(model_dir) == before and not (tmp_path / "nan.safetensors").exists()
    assert leftovers(tmp_path) == []


def test_commit_holds_back_ctrl_c_until_the_target_is_whole(model_dir, tmp_path, monkeypatch):
    output = tmp_path / "out"
    write(model_dir, output)
    real_rename = guard_module.rename_no_replace

    def interrupted_rename(source, destination):
        real_rename(source, destination)
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C between moving the old version aside and the new one in
        time.sleep(0.05)

    monkeypatch.setattr(guard_module, "rename_no_replace", interrupted_rename)
    with pytest.raises(KeyboardInterrupt):
        write(model_dir, output, overwrite=True)
    assert load_file(output / "model.safetensors").keys() == {"a.weight", "b.weight"}
    assert leftovers(tmp_path) == []


def test_guarded_file_output_is_written_whole_or_not_at_all(tmp_path):
    target = tmp_path / "plot.png"
    with pytest.raises(RuntimeError), guarded_output(target, directory=False) as staging:
        staging.write_bytes(b"half")
        raise RuntimeError("killed mid-write")
    assert not target.exists() and leftovers(tmp_path) == []
    with guarded_output(target, directory=False) as staging:
        staging.write_bytes(b"whole")
    assert target.read_bytes() == b"whole"
