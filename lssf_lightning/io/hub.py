"""Hugging Face Hub model IDs: ``org/name`` or ``org/name@revision`` → a local snapshot directory.

Everywhere a model is accepted, a local path that exists wins; otherwise an ID is resolved through
``huggingface_hub.snapshot_download`` into the usual cache (``HF_HUB_CACHE`` / ``HF_HOME``), offline when
``HF_HUB_OFFLINE=1``, with the usual token (``HF_TOKEN``, ``hf auth login``). Only what the project reads is
fetched — top-level safetensors weights, their index, config, generation config and tokenizer files, a peft
adapter's config — never a pickle. The library reads these variables once, when it is imported.

Online, every call to the hub is bounded: the revision is resolved with a timeout of
``HF_HUB_ETAG_TIMEOUT`` seconds (default 10), the files are checked with the same ``etag_timeout`` and
downloaded with ``HF_HUB_DOWNLOAD_TIMEOUT``; a hub that does not answer in time is taken as unreachable: the
cached snapshot is used, with one warning saying so (or, if the model is not cached, one error), and the
process does not ask that hub again. A file of a snapshot that is a symbolic link must point into its repo's
``blobs/`` folder, as the hub's cache lays them out; any other link is refused.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path

from lssf_lightning.io.layout import PICKLE_SUFFIXES, SUPPORT_FILES

__all__ = ["HUB_WEIGHT_PATTERNS", "cached_snapshot", "is_hub_id", "parse_hub_id", "resolve_model"]

HUB_WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "adapter_config.json")
"""Weight files fetched for a model ID (with the config and tokenizer files of
``io.layout.SUPPORT_FILES``)."""

_UNANSWERED: set[str] = set()  # endpoints that did not answer in time: not asked again by this process
_TOP_LEVEL_ONLY = ("*/*",)  # snapshot_download's ``*`` crosses folders; repos keep variants in sub-folders


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~", "\\")) or os.path.isabs(spec)


def parse_hub_id(spec: str) -> tuple[str, str | None]:
    """``"org/name@rev"`` → ``("org/name", "rev")``; ``"org/name"`` → ``("org/name", None)``.

    Raises:
        ValueError: not of that form (one line, naming the spec).
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    repo_id, at, revision = spec.partition("@")
    problem = None
    if at and not revision.strip():
        problem = "the revision after '@' is empty"
    elif any(c.isspace() for c in revision):
        problem = "the revision contains whitespace"
    elif repo_id.count("/") != 1:
        problem = "a hub ID has exactly one '/' (org/name)"
    else:
        try:
            validate_repo_id(repo_id)
        except HFValidationError:
            problem = "names use letters, digits, '-', '_' and '.', without '--' or '..'"
    if problem:
        raise ValueError(f"{spec!r} is not a valid hub model ID (org/name or org/name@revision): {problem}")
    return repo_id, revision or None


def is_hub_id(spec: object) -> bool:
    """True for a string meant as a hub ID: not an existing path, and ``org/name`` or ``…@revision``
    shaped."""
    if not isinstance(spec, str) or _looks_like_path(spec) or Path(spec).expanduser().exists():
        return False
    repo_id = spec.partition("@")[0]
    return "@" in spec or repo_id.count("/") == 1


def resolve_model(spec: str | os.PathLike, *, what: str = "model", weights: bool = True) -> Path:
    """The local directory for ``spec``: an existing local path, else the snapshot of a hub model ID.

    Args:
        spec: a local path, ``org/name`` or ``org/name@revision`` (a branch, tag or commit).
        what: what the model is, for error messages (``"aligned"``, ``"tokenizer"``…).
        weights: also fetch and require safetensors weights; ``False`` fetches config and tokenizer files
            only.

    Returns:
        ``Path(spec)`` for anything that is not a hub ID (a missing local path is left to the caller's own
        "not found" error), else the snapshot directory in the Hugging Face cache.

    Raises:
        FileNotFoundError: offline and not in the cache, or no such repo / revision on the hub.
        PermissionError: a gated or private repo without a token that has access.
        ValueError: a malformed ID, or a repo that holds only pickled weights.
    """
    if not is_hub_id(spec):
        return Path(spec).expanduser()
    repo_id, revision = parse_hub_id(str(spec))
    directory = _snapshot(repo_id, revision, what, weights)
    _check_links(directory, f"{what} {spec}")
    if weights:
        _require_safetensors(directory, repo_id, revision, what)
    return directory


def cached_snapshot(spec: str) -> Path | None:
    """The snapshot directory of the hub ID ``spec`` already in the local cache (no network), or ``None``:
    what the output guard compares outputs with (the snapshot's files and the blobs they link to)."""
    from huggingface_hub import snapshot_download

    try:
        repo_id, revision = parse_hub_id(spec)
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached, or not a valid ID: nothing of it to protect on disk
        return None


def _snapshot(repo_id: str, revision: str | None, what: str, weights: bool) -> Path:
    from huggingface_hub import constants, get_token, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    label = f"{what} {repo_id}" + (f"@{revision}" if revision else "")
    patterns = [*(HUB_WEIGHT_PATTERNS if weights else ()), *SUPPORT_FILES]
    timeout = float(constants.HF_HUB_ETAG_TIMEOUT)
    unreachable = None
    try:
        resolved, answered = (revision, True) if constants.is_offline_mode() else _resolve_revision(
            repo_id, revision, timeout)
        if not answered:  # the cache only
            unreachable = f"the hub did not answer within {timeout:g} s (HF_HUB_ETAG_TIMEOUT)"
        directory = Path(
            snapshot_download(
                repo_id, revision=resolved, allow_patterns=patterns, ignore_patterns=list(_TOP_LEVEL_ONLY),
                etag_timeout=timeout, local_files_only=not answered,
            )
        )
        if unreachable:
            warnings.warn(f"{label}: {unreachable}; using its snapshot in the Hugging Face cache",
                          stacklevel=4)
        return directory
    except GatedRepoError:
        token = "your token has not been granted access" if get_token() else "no token is set"
        raise PermissionError(
            f"{label}: gated repo and {token}; accept its conditions at https://huggingface.co/{repo_id} and "
            "set HF_TOKEN (or run `hf auth login`)"
        ) from None
    except RevisionNotFoundError:
        raise FileNotFoundError(f"{label}: the hub has no revision {revision!r} of {repo_id}") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(
            f"{label}: no such model on the hub (a private repo needs HF_TOKEN or `hf auth login`), "
            "and no such local path"
        ) from None
    except LocalEntryNotFoundError as err:
        if isinstance(err, IncompleteSnapshotError):
            reason = "its snapshot in the Hugging Face cache is incomplete"
        elif constants.is_offline_mode():
            reason = (
                f"no such local path, and not in the Hugging Face cache ({constants.HF_HUB_CACHE}) "
                "with HF_HUB_OFFLINE=1"
            )
        else:
            reason = ("no such local path, not in the Hugging Face cache, and the hub could not be reached"
                      + (f" ({unreachable})" if unreachable else ""))
        raise FileNotFoundError(
            f"{label}: {reason}; download it first, e.g. `hf download {repo_id}"
            + (f" --revision {revision}" if revision else "")
            + "`"
        ) from None


def _resolve_revision(repo_id: str, revision: str | None, timeout: float) -> tuple[str | None, bool]:
    """``(revision to download, whether the hub answered)``, the hub asked with ``timeout`` seconds to answer.

    The revision is the commit ``revision`` (default: the main branch) points to, recorded in the cache's
    ``refs/`` as ``snapshot_download`` records it; ``revision`` itself when the hub answered with an error
    (``snapshot_download`` then asks again and handles it, as always) or could not be reached in time.
    """
    import importlib

    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
    from huggingface_hub.file_download import REGEX_COMMIT_HASH, repo_folder_name

    if constants.ENDPOINT in _UNANSWERED:
        return revision, False
    unreachable: list[type[BaseException]] = [OfflineModeIsEnabled]  # + the HTTP clients' transport errors
    for client in ("httpx2", "httpx"):
        with contextlib.suppress(ImportError, AttributeError):
            unreachable.append(importlib.import_module(client).TransportError)
    try:
        sha = HfApi().repo_info(repo_id, revision=revision, timeout=timeout).sha
    except tuple(unreachable):
        _UNANSWERED.add(constants.ENDPOINT)
        return revision, False
    except HfHubHTTPError:  # not found, gated, down...: as snapshot_download always decided
        return revision, True
    if revision is not None and REGEX_COMMIT_HASH.fullmatch(revision):
        return revision, True  # (asked all the same: snapshot_download lists the commit's files next)
    folder = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")
    with contextlib.suppress(OSError):
        ref = folder / "refs" / (revision or constants.DEFAULT_REVISION)
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(sha)
    return sha, True


def _check_links(directory: Path, label: str) -> None:
    """Refuse a snapshot file that is a symbolic link anywhere but into its repo's ``blobs/`` folder."""
    blobs = (directory.parent.parent / "blobs").resolve()
    for file in sorted(directory.iterdir()):
        if not file.is_symlink():
            continue
        target = file.resolve()
        if not target.is_relative_to(blobs):
            raise ValueError(f"{label}: {file} is a link to {target}, outside the cache's {blobs}; refusing "
                             "to read it (the hub's cache links snapshot files only into blobs/)")


def _require_safetensors(directory: Path, repo_id: str, revision: str | None, what: str) -> None:
    """Refuse a snapshot without top-level safetensors, naming the pickles the repo holds instead."""
    if any(directory.glob("*.safetensors")):
        return
    from huggingface_hub import get_cached_repo_tree
    from huggingface_hub.errors import CachedRepoTreeNotFoundError


    files = [p.name for p in directory.iterdir()]
    # The repo's full listing, cached by an online snapshot_download; without one the folder decides.
    with contextlib.suppress(CachedRepoTreeNotFoundError, OSError, ValueError):
        files += [f.path for f in get_cached_repo_tree(repo_id, revision=revision)]
    pickles = sorted({f for f in files if f.endswith(PICKLE_SUFFIXES) and "/" not in f})
    label = f"{what} {repo_id}" + (f"@{revision}" if revision else "")
    if pickles:
        raise ValueError(
            f"{label} has only pickled weights ({', '.join(pickles[:3])}); lssf_lightning reads safetensors "
            "only (pickles can run code): use a revision with safetensors, or convert it yourself with "
            "`save_pretrained(dir, safe_serialization=True)` and pass the directory"
        )
    raise FileNotFoundError(f"{label}: no *.safetensors weights in its snapshot {directory}")
