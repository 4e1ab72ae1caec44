"""What ``bench_efficacy.py`` measures on one model, and the statistics of its table.

Per model and split (validation or test): harmful refusal on each held-out harmful set (AdvBench and the
``ollama-forge`` harmful list minus AdvBench, pooled and one by one), over-refusal on harmless prompts, the
recipe's task metric, the in-domain perplexity (the assistant tokens of the recipe's held-out replies) and the
general perplexity (standard-library docstring prose, :func:`lssf_lightning.metrics.perplexity.
load_utility_texts`). Refusal is judged by :class:`lssf_lightning.metrics.RefusalPhraseJudge` (a refusal
phrase in the first 160 characters of the answer), greedy decoding.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from lssf_lightning.lightning.data import encode_chat
from lssf_lightning.metrics import RefusalPhraseJudge, generate_responses
from lssf_lightning.metrics.perplexity import model_perplexity

__all__ = ["EvalSplit", "measure", "reply_perplexity", "wilson"]


@dataclass
class EvalSplit:
    """The prompts and texts of one split (``"val"`` or ``"test"``)."""

    name: str
    harmful: Mapping[str, Sequence[str]]
    harmless: Sequence[str]
    general: Sequence[str]
    counts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.counts = {
            **{f"harmful_{k}": len(v) for k, v in self.harmful.items()},
            "harmless": len(self.harmless),
            "general_texts": len(self.general),
        }


def wilson(rate: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95 % Wilson score interval of a rate observed on ``n`` items."""
    if n <= 0 or rate != rate:
        return (float("nan"), float("nan"))
    centre = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def reply_perplexity(
    model, tokenizer, rows: Sequence[Mapping[str, str]], max_length: int = 256, batch_size: int = 8
) -> float:
    """Perplexity of the assistant replies of ``rows`` given their prompts (chat template, loss on the reply
    tokens only)."""
    encoded = []
    for row in rows:
        chat = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]
        item = encode_chat(tokenizer, chat, max_length)
        if sum(label != -100 for label in item["labels"]) > 0:
            encoded.append(item)
    if not encoded:
        raise ValueError("reply_perplexity got no reply tokens")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start : start + batch_size]
            width = max(len(c["input_ids"]) for c in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            labels = torch.full((len(chunk), width), -100, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, item in enumerate(chunk):
                n = len(item["input_ids"])
                ids[row, :n], labels[row, :n] = torch.tensor(item["input_ids"]), torch.tensor(item["labels"])
                mask[row, :n] = 1
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            target = labels[:, 1:]
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="sum"
            )
            total, count = total + float(loss), count + int((target != -100).sum())
    return math.exp(total / count)


def _eval_copy(model, dtype: torch.dtype | None):
    parameter = next(model.parameters())
    if dtype is None or parameter.dtype == dtype:
        return model
    return copy.deepcopy(model).to(dtype)


def _refusals(model, tokenizer, prompts, judge, tokens: int, batch_size: int) -> tuple[float, int, list[str]]:
    answers = generate_responses(
        model, tokenizer, list(prompts), max_new_tokens=tokens, batch_size=batch_size
    )
    flags = list(judge(answers))
    return sum(flags) / len(flags), len(flags), answers


def measure(
    model,
    tokenizer,
    split: EvalSplit,
    recipe,
    *,
    refusal_tokens: int = 16,
    batch_size: int = 32,
    dtype: torch.dtype | None = torch.bfloat16,
    refusal_cache: dict | None = None,
    cache_key: str | None = None,
) -> dict:
    """Every measure of ``model`` on ``split`` for ``recipe`` (:class:`efficacy_recipes.RecipeData`).

    Returns rates and their counts: ``harmful_refusal`` (pooled) and ``harmful_refusal_<set>``,
    ``harmless_refusal``, ``task_accuracy`` (when the recipe has a metric), ``ppl_in_domain``,
    ``ppl_general`` and ``n_<measure>``. With ``refusal_cache`` and ``cache_key`` the refusal part is
    reused for a model scored before (the aligned model, on each recipe)."""
    model.eval()
    evaluated = _eval_copy(model, dtype)
    judge = RefusalPhraseJudge()
    key = (cache_key, split.name)
    if refusal_cache is not None and cache_key is not None and key in refusal_cache:
        scores = dict(refusal_cache[key])
    else:
        scores, refused, total = {}, 0.0, 0
        for name, prompts in split.harmful.items():
            rate, n, _ = _refusals(evaluated, tokenizer, prompts, judge, refusal_tokens, batch_size)
            scores[f"harmful_refusal_{name}"], scores[f"n_harmful_{name}"] = rate, n
            refused, total = refused + rate * n, total + n
        scores["harmful_refusal"], scores["n_harmful"] = refused / total, total
        rate, n, _ = _refusals(evaluated, tokenizer, split.harmless, judge, refusal_tokens, batch_size)
        scores["harmless_refusal"], scores["n_harmless"] = rate, n
        scores["ppl_general"] = model_perplexity(evaluated, tokenizer, list(split.general))
        if refusal_cache is not None and cache_key is not None:
            refusal_cache[key] = dict(scores)
    rows = recipe.val if split.name == "val" else recipe.test
    scores["ppl_in_domain"], scores["n_in_domain"] = reply_perplexity(evaluated, tokenizer, rows), len(rows)
    if recipe.score is not None:
        prompts = recipe.task_prompts[split.name]
        answers = generate_responses(
            evaluated, tokenizer, prompts, max_new_tokens=recipe.task_tokens, batch_size=batch_size
        )
        scores["task_accuracy"], scores["n_task"] = recipe.score(answers, split.name), len(prompts)
    del evaluated
    return scores
