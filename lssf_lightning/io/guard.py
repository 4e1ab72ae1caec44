"""The one output-path guard and the one checked commit that every writer of the project goes through.

A run that writes ``target`` (a model directory, a subspace file, a plot):

1. refuses, before any work, a target that is, contains or lies inside one of its inputs (compared by
   device and inode, so symlinks, bind mounts and ``..`` cannot hide an overlap; a hub ID as its cached
   snapshot and the blobs it links to) — :func:`check_output`; an existing target only with ``overwrite``,
   and a directory only if every file in it matches :data:`OUTPUT_FILE_PATTERNS`;
2. takes a lock next to the target (``.<name>.lssf-lock``, created with ``O_CREAT | O_EXCL``): a second run
   writing the same target fails at once with a message naming the first (pid, host, start time);
3. names the staging directories/files that killed runs left next to the target and removes them when that
   is provably safe (their pid is dead on this host); a previous version moved aside by a run killed in the
   middle of its commit is put back;
4. writes into a recognisable sibling ``.<name>.lssf-staging-<host>-<pid>-<random>``;
5. commits: flushes the staged files to disk, re-checks that the target is still exactly what was checked at
   the start (absent, or the same inode with the same modification time), and renames the staging path in
   with a no-replace rename (``renameat2(RENAME_NOREPLACE)`` on Linux, ``link`` + ``unlink`` for files, a
   plain rename under the lock elsewhere). With ``overwrite`` the old target is moved aside first and
   deleted after.

On any failure the staging path and the empty folders created for the target are removed, and the target
is left as it was. Ctrl-C is held back during the few system calls of the commit itself, so an interrupt
never leaves the target half replaced.

One concept: the life of one output path, from the overlap check to the commit; the steps share the lock,
the staging names and the checked state of the target, so they stay together.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fnmatch
import functools
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import stat
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from typing_extensions import Self

from lssf_lightning.io.hub import cached_snapshot, is_hub_id
from lssf_lightning.io.layout import SUPPORT_FILES

__all__ = [
    "OUTPUT_FILE_PATTERNS",
    "LeftoverWarning",
    "OutputBusyError",
    "OutputChangedError",
    "OutputGuard",
    "OutputOverlapError",
    "check_output",
    "check_overlap",
    "guarded_output",
    "looks_like_model_directory",
    "write_json",
]

STAGING_TAG = ".lssf-staging-"
RETIRED_TAG = ".lssf-old-"
LOCK_SUFFIX = ".lssf-lock"
# The one list of files lssf_lightning writes into a directory, by exact name pattern (``fnmatchcase``): an
# existing directory is replaced (with ``overwrite``) only if every entry in it matches one of them.
OUTPUT_FILE_PATTERNS = (
    "model*.safetensors",
    "model.safetensors.index.json",
    *SUPPORT_FILES,
    "adapter_model.safetensors",
    "adapter_config.json",
    "lssf_state.json",  # alpha="auto"'s state in a transformers checkpoint
    "sweep.json",  # the sweep's results and plot
    "front.png",
    "align_meta.json",  # the demo's aligned model
    "align_train.jsonl",
)


class OutputOverlapError(ValueError):
    """The output is, contains or lies inside one of the run's inputs."""


class OutputBusyError(FileExistsError):
    """Another run holds the lock of the output."""


class OutputChangedError(FileExistsError):
    """The output changed (appeared, was replaced or modified) while the run was writing."""


class LeftoverWarning(UserWarning):
    """A staging path or lock left by a killed run was found (and, when provably stale, removed)."""


_HOST = socket.gethostname()
_HOST_TAG = hashlib.blake2b(_HOST.encode(), digest_size=4).hexdigest()


def _sibling(target: Path, tag: str) -> Path:
    """A path of this run next to ``target``, ``.<name><tag><host>-<pid>-<random>``: a later run can tell
    from the name whose it is (:func:`_sibling_owner`)."""
    return target.with_name(f".{target.name}{tag}{_HOST_TAG}-{os.getpid()}-{secrets.token_hex(4)}")


def _sibling_owner(rest: str, tag: str) -> tuple[str | None, int | None]:
    """``(host tag, pid)`` of a :func:`_sibling` name (``rest``: the part after ``.<name><tag>``)."""
    fields = rest.removeprefix(tag).split("-")
    if len(fields) != 3:
        return None, None
    return fields[0], int(fields[1]) if fields[1].isdigit() else None


# -- inputs vs output -------------------------------------------------------------------------------------
def _paths(inputs: Iterable[Any] | Any) -> list[tuple[str, Path]]:
    """``(name, path)`` of the inputs named by ``inputs``: paths (a hub ID: its cached snapshot), nested
    lists, and objects with an ``input_paths()`` method (weight stores, subspaces, planners); anything else
    is skipped."""
    if isinstance(inputs, (str, os.PathLike)):
        return _spec_paths(inputs) if os.fspath(inputs) else []
    if isinstance(inputs, (list, tuple, set, frozenset)):
        return [path for item in inputs for path in _paths(item)]
    provider = getattr(inputs, "input_paths", None)
    return _paths(list(provider())) if callable(provider) else []


def _spec_paths(spec: str | os.PathLike) -> list[tuple[str, Path]]:
    """A local path as it is; a hub ID (not an existing path) as its snapshot in the local cache, if any."""
    path = Path(spec).expanduser()
    if not isinstance(spec, str) or os.path.lexists(path):
        return [(str(path), path)]
    if not is_hub_id(spec):
        return [(str(path), path)]
    snapshot = cached_snapshot(spec)
    return [(f"{spec} (cached at {snapshot})", snapshot)] if snapshot is not None else []


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def _ancestors(path: Path) -> list[tuple[Path, tuple[int, int]]]:
    """``path`` (made absolute, symlinks of its existing part resolved) and its parents, with identities."""
    found = []
    for candidate in (Path(os.path.abspath(path)), Path(os.path.realpath(path))):
        for item in (candidate, *candidate.parents):
            identity = _identity(item)
            if identity is not None:
                found.append((item, identity))
    return found


def _input_files(path: Path) -> list[Path]:
    """An input and what it links to: a symlinked file's target, and for a directory the targets of its
    symlinked entries (a HF cache snapshot links every file into ``blobs/``)."""
    files = [path]
    if path.is_symlink():
        files.append(Path(os.path.realpath(path)))
    if path.is_dir():
        with contextlib.suppress(OSError):
            files.extend(Path(os.path.realpath(e.path)) for e in os.scandir(path) if e.is_symlink())
    return files


def _relation(target: Path, path: Path, target_chain: list, target_self: tuple[int, int] | None,
              ) -> str | None:
    """How ``target`` relates to the input ``path``: "is", "lies inside", "contains" or ``None``. An input
    that does not exist yet (a Trainer's checkpoint folder) is compared by its path, symlinks resolved."""
    identity = _identity(path)
    if identity is None:
        real_target, real_path = Path(os.path.realpath(target)), Path(os.path.realpath(path))
        if real_target == real_path:
            return "is"
        if real_path in real_target.parents:
            return "lies inside"
        return "contains" if real_target in real_path.parents else None
    if identity == target_self:
        return "is"
    if identity in {i for _, i in target_chain}:
        return "lies inside"
    if target_self is not None and any(i == target_self for _, i in _ancestors(path)):
        return "contains"
    return None


def check_overlap(target: str | os.PathLike, inputs: Iterable[Any] | Any) -> None:
    """Raise :class:`OutputOverlapError` when ``target`` is, contains or lies inside one of ``inputs``
    (compared by device and inode, and through the links of a hub snapshot into its blobs)."""
    target = Path(os.path.abspath(Path(target).expanduser()))
    target_chain = _ancestors(target)
    target_self = _identity(target)  # None when absent
    for name, given in _paths(inputs):
        for path in _input_files(given):
            relation = _relation(target, path, target_chain, target_self)
            if relation is None:
                continue
            detail = f"the input {name}" + (f" (through {path})" if path != given else "")
            raise OutputOverlapError(
                f"output {target} {relation} {detail}; writing it could destroy the input: "
                "choose another output"
            )


# -- what is at the target ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class _State:
    """What a path held when it was checked: absent, or one inode with its type, size and modification
    time."""

    kind: str  # "absent", "directory", "file", "symlink" or "other"
    identity: tuple[int, ...] = ()

    def same_inode(self, other: _State) -> bool:
        return self.kind == other.kind and self.identity[:2] == other.identity[:2]

    @classmethod
    def of(cls, path: Path) -> _State:
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            return cls("absent")
        mode = info.st_mode
        kind = ("directory" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode)
                else "symlink" if stat.S_ISLNK(mode) else "other")
        return cls(kind, (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns))


def looks_like_model_directory(directory: Path) -> str | None:
    """``None`` when every entry of ``directory`` is a file lssf_lightning writes (a name matching
    :data:`OUTPUT_FILE_PATTERNS`), else the first few entries that are not."""
    foreign = []
    with os.scandir(directory) as entries:
        for entry in entries:
            ours = entry.is_file(follow_symlinks=False) and any(
                fnmatch.fnmatchcase(entry.name, pattern) for pattern in OUTPUT_FILE_PATTERNS)
            if not ours:
                foreign.append(entry.name + ("/" if entry.is_dir(follow_symlinks=False) else ""))
    return ", ".join(sorted(foreign)[:3]) if foreign else None


def check_output(
    target: str | os.PathLike,
    inputs: Iterable[Any] | Any = (),
    *,
    overwrite: bool = False,
    directory: bool = True,
    replaceable: Callable[[Path], str | None] | None = looks_like_model_directory,
) -> Path:
    """Refuse ``target`` unless writing it is safe; returns it as an absolute path. Call it before any work.

    Args:
        target: the output path.
        inputs: the run's input paths (files or directories; nested lists; non-paths are ignored).
        overwrite: allow replacing an existing target.
        directory: the output is a directory (else a single file).
        replaceable: for an existing directory target, returns ``None`` when it may be replaced, else a short
            description of the entries that make it irreplaceable. Default: every file in it is one
            lssf_lightning writes (:func:`looks_like_model_directory`).

    Raises:
        OutputOverlapError: the target is, contains or lies inside an input.
        FileExistsError: the target exists and ``overwrite`` is false, or it cannot be replaced.
        IsADirectoryError, NotADirectoryError: the target exists with the other kind.
    """
    target = Path(os.path.abspath(Path(target).expanduser()))
    check_overlap(target, inputs)
    state = _State.of(target)
    if state.kind == "absent":
        return target
    if not overwrite:
        raise FileExistsError(errno.EEXIST,
                              "already exists (pass overwrite=True / --overwrite to replace it)", str(target))
    if state.kind == "symlink":
        raise FileExistsError(errno.EEXIST, f"is a symbolic link (to {os.readlink(target)}); refusing to "
                              "replace it: give the real path", str(target))
    if state.kind != ("directory" if directory else "file"):
        error, code = (NotADirectoryError, errno.ENOTDIR) if directory else (IsADirectoryError, errno.EISDIR)
        what = "a directory" if directory else "a regular file"
        raise error(code, f"exists and is not {what}; refusing to replace it", str(target))
    foreign = replaceable(target) if directory and replaceable is not None else None
    if foreign:
        raise FileExistsError(errno.EEXIST, f"holds {foreign}, which lssf_lightning does not write; refusing "
                              "to replace it (nothing was changed): move it away or choose another output",
                              str(target))
    return target


# -- the lock ----------------------------------------------------------------------------------------------
def _process_start(pid: int) -> str | None:
    """The start time of ``pid`` in clock ticks since boot (Linux), to tell a reused pid from the original."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None = None) -> bool:
    """Whether ``pid`` still runs on this host (and is the same process, where its start time is known)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: the pid exists, owned by another user
        return True
    return not (start and _process_start(pid) not in (None, start))


def _read_lock(path: Path) -> dict[str, Any]:
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _stale(info: dict[str, Any]) -> bool:
    pid = info.get("pid")
    return info.get("host") == _HOST and isinstance(pid, int) and not _alive(pid, info.get("start"))


def _describe(info: dict[str, Any]) -> str:
    if not info:
        return "an unreadable lock"
    return f"pid {info.get('pid')} on {info.get('host')}, since {info.get('time')}"


class _Lock:
    """``O_CREAT | O_EXCL`` lock file next to the target, holding who took it."""

    def __init__(self, target: Path) -> None:
        self.target = target
        self.path = target.parent / f".{target.name}{LOCK_SUFFIX}"
        self.info = {"pid": os.getpid(), "host": _HOST, "start": _process_start(os.getpid()),
                     "time": time.strftime("%Y-%m-%d %H:%M:%S"), "nonce": secrets.token_hex(8),
                     "command": " ".join(sys.argv[:2])[:200]}
        self.held = False

    def acquire(self) -> None:
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read_lock(self.path)
                if _stale(holder) and self._remove_stale(holder):
                    continue
                raise OutputBusyError(
                    errno.EEXIST, f"is being written by another lssf_lightning run ({_describe(holder)}); "
                    "wait for it (a lock of a killed run on this host is removed by the next run), or delete "
                    f"{self.path} if no such run is alive", str(self.target)) from None
            with os.fdopen(fd, "w") as f:
                json.dump(self.info, f)
            self.held = True
            return
        raise OutputBusyError(errno.EEXIST, f"its lock {self.path} keeps changing; is another run starting?",
                              str(self.target))

    def _remove_stale(self, holder: dict[str, Any]) -> bool:
        """Move a dead run's lock away and delete it; a lock taken meanwhile by a live run is put back."""
        moved = self.path.with_name(f"{self.path.name}.stale-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            os.rename(self.path, moved)
        except FileNotFoundError:
            return True  # another run removed it first: try again
        if _read_lock(moved).get("nonce") != holder.get("nonce"):
            with contextlib.suppress(OSError):
                os.link(moved, self.path)  # never replaces a lock that appeared in between
            with contextlib.suppress(OSError):
                os.unlink(moved)
            return False
        os.unlink(moved)
        warnings.warn(f"removed the lock {self.path} left by a killed run ({_describe(holder)}); its staging "
                      "files are removed too",
                      LeftoverWarning, stacklevel=5)
        return True

    def release(self) -> None:
        if self.held:
            self.held = False
            if _read_lock(self.path).get("nonce") == self.info["nonce"]:
                with contextlib.suppress(OSError):
                    os.unlink(self.path)


# -- no-replace rename -------------------------------------------------------------------------------------
_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def _renameat2() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_RENAMEAT2 = _renameat2()


def rename_no_replace(source: Path, destination: Path) -> None:
    """Rename ``source`` to ``destination``, failing with ``FileExistsError`` if ``destination`` exists.

    Atomic with ``renameat2(RENAME_NOREPLACE)`` (Linux) or ``link`` + ``unlink`` (files); elsewhere an
    existence check and a rename, which the caller's lock protects from other lssf_lightning runs.
    """
    if _RENAMEAT2 is not None:
        paths = os.fsencode(source), os.fsencode(destination)
        if _RENAMEAT2(_AT_FDCWD, paths[0], _AT_FDCWD, paths[1], _RENAME_NOREPLACE) == 0:
            return
        code = ctypes.get_errno()
        if code == errno.EEXIST:
            raise FileExistsError(code, os.strerror(code), str(destination))
        if code not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EPERM):
            raise OSError(code, os.strerror(code), str(source), None, str(destination))
    if source.is_file() and not source.is_symlink():
        try:
            os.link(source, destination)
        except FileExistsError:
            raise
        except OSError:
            pass  # a file system without hard links: fall back below
        else:
            os.unlink(source)
            return
    if os.path.lexists(destination):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(destination))
    os.rename(source, destination)


def _fsync(path: Path) -> None:
    """Flush one file or directory to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:  # some file systems cannot fsync a directory
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    """Flush ``path`` (a file, or a directory and the files in it) to disk."""
    for item in [path] if path.is_file() else [*(p for p in path.rglob("*") if p.is_file()), path]:
        _fsync(item)


@contextlib.contextmanager
def _interrupts_held() -> Iterator[None]:
    """Delay Ctrl-C and SIGTERM until the block is done (main thread only), then deliver them."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {signum: signal.signal(signum, lambda number, frame: caught.append(number)) for signum in held}
    try:
        yield
    finally:  # a handler installed outside Python reads back as None: restore the default then
        for signum, handler in previous.items():
            default = signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
            signal.signal(signum, handler if handler is not None else default)
    for signum in dict.fromkeys(caught):
        signal.raise_signal(signum)  # the handler in place before (Ctrl-C: KeyboardInterrupt) decides


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.unlink(path)


def _make_parents(directory: Path) -> list[Path]:
    """Create ``directory`` and its missing parents; returns those created, innermost first."""
    missing = []
    for item in (directory, *directory.parents):
        if os.path.lexists(item):
            break
        missing.append(item)
    directory.mkdir(parents=True, exist_ok=True)
    return missing


def _remove_empty(directories: list[Path]) -> None:
    """Remove the folders of ``directories`` (innermost first) that are still empty."""
    for item in directories:
        try:
            os.rmdir(item)
        except OSError:
            return


# -- the guard ---------------------------------------------------------------------------------------------
class OutputGuard:
    """Guards one output: checks, lock, staging path, checked commit. Use :func:`guarded_output`.

    Args:
        target: the output path.
        inputs: the run's input paths (see :func:`check_output`).
        overwrite: allow replacing an existing target (checked at the start and again at commit).
        directory: the output is a directory (the staging directory is created) or a single file (the caller
            writes the file at :attr:`staging`).
        replaceable: see :func:`check_output`.
    """

    def __init__(
        self,
        target: str | os.PathLike,
        inputs: Iterable[Any] | Any = (),
        *,
        overwrite: bool = False,
        directory: bool = True,
        replaceable: Callable[[Path], str | None] | None = looks_like_model_directory,
    ) -> None:
        self.target = Path(os.path.abspath(Path(target).expanduser()))
        self.directory = directory
        self._check = functools.partial(check_output, self.target, inputs, overwrite=overwrite,
                                        directory=directory, replaceable=replaceable)
        self.staging: Path | None = None
        self._lock = _Lock(self.target)
        self._checked: _State | None = None
        self._created: list[Path] = []
        self.committed = False

    def __enter__(self) -> Self:
        self._check()  # before the lock is written: the target's directory may be an input
        self._created = _make_parents(self.target.parent)
        try:
            self._lock.acquire()
        except BaseException:
            _remove_empty(self._created)
            raise
        try:
            self._leftovers()
            # Checked again under the lock: the state recorded here is what the commit insists on finding.
            self._check()
            self._checked = _State.of(self.target)
            self.staging = _sibling(self.target, STAGING_TAG)
            if self.directory:
                self.staging.mkdir()
        except BaseException:
            self._lock.release()
            _remove_empty(self._created)
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            if self.staging is not None and os.path.lexists(self.staging):
                _remove(self.staging)
        finally:
            self._lock.release()
            if not self.committed:  # a failed run leaves no empty folders it created for the output
                _remove_empty(self._created)

    def commit(self) -> Path:
        """Move the staged output into place; the target must still be what was checked at the start."""
        assert self.staging is not None and self._checked is not None, "commit() outside the `with` block"
        if not os.path.lexists(self.staging):
            raise FileNotFoundError(errno.ENOENT, "nothing was written to the staging path",
                                    str(self.staging))
        _fsync_tree(self.staging)
        retired = None
        try:
            with _interrupts_held():
                retired = self._swap()
        finally:  # also when a Ctrl-C held back during the swap is raised now
            if self.committed:
                with contextlib.suppress(OSError):  # the rename is done: flushing its entry is best effort
                    _fsync(self.target.parent)
                if retired is not None:
                    _remove(retired)
        return self.target

    def _swap(self) -> Path | None:
        """Check the target, move an old version aside, rename the staging path in; returns the old
        version."""
        assert self.staging is not None and self._checked is not None
        now = _State.of(self.target)
        if now != self._checked:
            what = "appeared" if self._checked.kind == "absent" else "was replaced or modified"
            raise OutputChangedError(errno.EEXIST, f"{what} while this run was writing; it was left as it is "
                                     "and nothing was written", str(self.target))
        retired = None
        if now.kind != "absent":
            retired = _sibling(self.target, RETIRED_TAG)
            rename_no_replace(self.target, retired)
            if not _State.of(retired).same_inode(self._checked):  # swapped between the check and the rename
                rename_no_replace(retired, self.target)
                raise OutputChangedError(errno.EEXIST, "was replaced while this run was committing; it was "
                                         "left as it is and nothing was written", str(self.target))
        try:
            rename_no_replace(self.staging, self.target)
        except BaseException:
            if retired is not None:
                with contextlib.suppress(OSError):
                    rename_no_replace(retired, self.target)
            raise
        self.committed = True
        return retired

    def _leftovers(self) -> None:
        """Name (and, when provably stale, clean) what killed runs left next to the target. Runs under the
        lock."""
        prefix = f".{self.target.name}"
        try:
            names = [e.name for e in os.scandir(self.target.parent) if e.name.startswith(prefix)]
        except OSError:
            return
        for name in names:
            rest = name[len(prefix):]
            path = self.target.parent / name
            if rest.startswith(STAGING_TAG):
                self._leftover(path, *_sibling_owner(rest, STAGING_TAG), retired=False)
            elif rest.startswith(RETIRED_TAG):
                self._leftover(path, *_sibling_owner(rest, RETIRED_TAG), retired=True)
            elif rest.startswith((".partial-", ".old-")):  # the names of lssf_lightning 0.1
                warnings.warn(f"found {path}, apparently left by an interrupted lssf_lightning run; it was "
                              "not touched: delete it if no run is writing it", LeftoverWarning, stacklevel=4)

    def _leftover(self, path: Path, host: str | None, pid: int | None, retired: bool) -> None:
        dead = host == _HOST_TAG and pid is not None and not _alive(pid)
        what = "a previous version of the output moved aside" if retired else "a staging path"
        if not dead:
            warnings.warn(f"found {path}, {what} of an lssf_lightning run (pid {pid}) that may still be "
                          "alive or ran on another host; it was not touched", LeftoverWarning, stacklevel=4)
        elif retired and not os.path.lexists(self.target):
            rename_no_replace(path, self.target)
            warnings.warn(f"put back {self.target} from {path.name}, where a run killed while replacing it "
                          f"(pid {pid}) had moved it", LeftoverWarning, stacklevel=4)
        else:
            _remove(path)
            warnings.warn(f"removed {path}, {what} left by a killed run (pid {pid})", LeftoverWarning,
                          stacklevel=4)


@contextlib.contextmanager
def guarded_output(
    target: str | os.PathLike,
    inputs: Iterable[Any] | Any = (),
    *,
    overwrite: bool = False,
    directory: bool = True,
    replaceable: Callable[[Path], str | None] | None = looks_like_model_directory,
) -> Iterator[Path]:
    """Yield a staging path for ``target``; it becomes ``target`` when the block succeeds (checked commit).

    A directory target gets a fresh staging directory; a file target gets a path to write the file at.
    Arguments and errors as in :class:`OutputGuard` and :func:`check_output`; on any error nothing is left.

    Example::

        with guarded_output("out/model", inputs=[finetuned_dir], overwrite=False) as staging:
            write_shards(staging)
    """
    with OutputGuard(target, inputs, overwrite=overwrite, directory=directory,
                     replaceable=replaceable) as guard:
        assert guard.staging is not None
        try:
            yield guard.staging
        except OSError as err:  # name the output the user asked for, not the staging path
            inside = err.filename is not None and str(err.filename).startswith(str(guard.staging))
            if not inside or err.errno is None:
                raise
            part = Path(str(err.filename)).relative_to(guard.staging).as_posix()
            detail = f" (writing {part})" if part != "." else ""
            raise OSError(err.errno, f"{err.strerror}{detail}", str(guard.target)) from err
        guard.commit()


def write_json(
    path: str | os.PathLike, data: Any, inputs: Iterable[Any] | Any = (), *, overwrite: bool = True,
    indent: int = 2,
) -> Path:
    """Write ``data`` as JSON to the file ``path`` through the guard (whole or not at all, under the lock;
    refused when it overlaps ``inputs``); an existing file is replaced only with ``overwrite``."""
    text = json.dumps(data, indent=indent, ensure_ascii=False) + "\n"
    with guarded_output(path, inputs, overwrite=overwrite, directory=False) as staging:
        staging.write_text(text, encoding="utf-8")
    return Path(path)
