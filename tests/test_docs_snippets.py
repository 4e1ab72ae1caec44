"""Every snippet of README.md and docs/*.md runs, on tiny models, so the documents cannot rot.

The convention (also written in docs/usage.md, "How the snippets are tested"):

- Each page runs in a scratch directory of its own, its blocks in document order (a later block may use what
  an earlier one wrote, as a reader following the page would).
- The placeholder names of the snippets are real local paths there, and a local path always wins over a hub
  ID: ``org/aligned`` and ``org/base`` (a tiny Llama, aligned and unaligned, with a chat tokenizer),
  ``my-finetune`` (its fine-tune), ``my-lora-adapter`` (a peft LoRA adapter on ``org/aligned``),
  ``train.jsonl`` and ``val.jsonl`` (``{"messages": [...]}`` chat rows for ChatDataModule and TRL).
- Every ```python block is executed as written. In ```bash blocks every ``lssf-lightning`` command runs
  (continuation lines joined, ``# comments`` dropped) and must exit 0; other shell lines must not appear.
- TRL's ``SFTConfig`` defaults to bf16, which transformers allows only on a GPU unless ``use_cpu=True``; here
  bf16 is reported as available, so the snippet runs as written (bf16 autocast on the CPU).
- A block right after ``<!-- docs-test: skip: REASON -->`` does not run; the reason is required.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.S | re.M)
SKIP = re.compile(r"<!-- docs-test: skip: (.+?) -->\s*$")


def blocks(page: Path) -> list[tuple[int, str, str, str | None]]:
    """``(line, language, code, skip reason)`` of each fenced block of ``page``."""
    text = page.read_text(encoding="utf-8")
    out = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = SKIP.search(before)
        if "docs-test" in before and skip is None:
            raise AssertionError(f"{page.name}: a docs-test marker without a reason: {before!r}")
        out.append((text.count("\n", 0, match.start()) + 1, match.group(1), match.group(2),
                    skip.group(1) if skip else None))
    return out


def commands(code: str) -> list[list[str]]:
    """The ``lssf-lightning`` commands of a bash block, as argument lists (without the program name)."""
    out = []
    for line in code.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if not words:
            continue
        assert words[0] == "lssf-lightning", f"not an lssf-lightning command: {line!r}"
        out.append(words[1:])
    return out


@pytest.fixture(scope="session")
def workspace_template(llama_trio, tmp_path_factory) -> Path:
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("docs-workspace")
    shutil.copytree(llama_trio.aligned, root / "org" / "aligned")
    shutil.copytree(llama_trio.base, root / "org" / "base")
    shutil.copytree(llama_trio.finetuned, root / "my-finetune")
    model = AutoModelForCausalLM.from_pretrained(llama_trio.aligned)
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    lora.save_pretrained(root / "my-lora-adapter")
    config = root / "my-lora-adapter" / "adapter_config.json"
    settings = {**json.loads(config.read_text()), "base_model_name_or_path": "org/aligned"}
    config.write_text(json.dumps(settings))
    pairs = [
        ("how do i bake bread at home ?", "sure , here is a simple answer ."),
        ("tell me a fun fact about space .", "sure , here is a simple answer ."),
        ("what is the capital of france ?", "sure , here is a simple answer ."),
        ("explain how a bicycle works .", "sure , here is a simple answer ."),
    ]
    rows = [
        {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": r}]} for p, r in pairs
    ]
    for name, repeat in (("train.jsonl", 2), ("val.jsonl", 1)):
        (root / name).write_text("".join(json.dumps(row) + "\n" for row in rows * repeat))
    return root


def test_every_page_has_snippets_and_skips_name_a_reason():
    found = {page.name: blocks(page) for page in PAGES}
    assert sum(lang == "python" for page in found.values() for _, lang, _, _ in page) >= 4
    assert all(reason.strip() for page in found.values() for *_, reason in page if reason is not None)


def test_readme_first_screen_and_ci_run_the_same_test_command():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    first_screen = "\n".join(lines[:25])
    test_command = next(line for line in lines if line.endswith("python -m pytest -q"))
    assert lines.index(test_command) < 25 and "lssf-lightning demo" in first_screen
    assert test_command in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert "| realigned" in first_screen and "%" in first_screen  # the result table, cost included
    assert len(lines) <= 120


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_snippets_run(page, workspace_template, tmp_path, monkeypatch, capsys):
    from lssf_lightning.cli import main

    runnable = [b for b in blocks(page) if b[3] is None and b[1] in ("python", "bash")]
    if not runnable:
        pytest.skip(f"{page.name} has no runnable snippet")
    workspace = tmp_path / "ws"
    shutil.copytree(workspace_template, workspace)
    monkeypatch.chdir(workspace)
    monkeypatch.setattr("transformers.training_args.is_torch_bf16_gpu_available", lambda: True)
    for line, language, code, _ in runnable:
        where = f"{page.relative_to(ROOT)}:{line}"
        if language == "python":
            exec(compile(code, where, "exec"), {"__name__": "__main__"})
            continue
        for argv in commands(code):
            status = main(argv)
            err = capsys.readouterr().err[-1500:]
            assert status == 0, f"{where}: lssf-lightning {' '.join(argv)} -> exit {status}: {err}"
