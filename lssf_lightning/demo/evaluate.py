"""Score a model on the demo's axes: harmful refusal, over-refusal of harmless prompts, task accuracy, and
general language ability (perplexity on general text).

Refusals and the task come from greedy generation (:func:`~lssf_lightning.metrics.generate_responses`)
judged by :class:`~lssf_lightning.metrics.RefusalPhraseJudge` (refusals) or exact match (the task);
perplexity from a forward pass (:func:`~lssf_lightning.metrics.perplexity.model_perplexity`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from lssf_lightning.demo.task import TaskExample, is_correct
from lssf_lightning.metrics import RefusalPhraseJudge, generate_responses
from lssf_lightning.metrics.perplexity import model_perplexity

__all__ = ["EvalSets", "evaluate_model"]


@dataclass
class EvalSets:
    """What one evaluation runs on.

    ``harmful`` gives ``harmful_refusal``, ``harmless`` gives ``harmless_refusal`` (over-refusal), ``task``
    gives ``task_accuracy``, ``utility`` (general texts) gives ``perplexity``; every entry of
    ``extra_harmful`` / ``extra_harmless`` adds ``harmful_refusal_<name>`` / ``harmless_refusal_<name>``
    (e.g. out-of-distribution sets).
    """

    harmful: list[str]
    harmless: list[str]
    task: list[TaskExample]
    extra_harmful: dict[str, list[str]] = field(default_factory=dict)
    extra_harmless: dict[str, list[str]] = field(default_factory=dict)
    utility: list[str] = field(default_factory=list)

    def sizes(self) -> dict[str, int]:
        sizes = {"harmful": len(self.harmful), "harmless": len(self.harmless), "task": len(self.task)}
        if self.utility:
            sizes["utility_texts"] = len(self.utility)
        sizes.update({f"harmful_{k}": len(v) for k, v in self.extra_harmful.items()})
        sizes.update({f"harmless_{k}": len(v) for k, v in self.extra_harmless.items()})
        return sizes


def _rate(flags: Sequence[bool]) -> float:
    return sum(bool(f) for f in flags) / len(flags) if flags else float("nan")


def evaluate_model(
    model,
    tokenizer,
    sets: EvalSets,
    *,
    max_new_tokens: int = 24,
    task_new_tokens: int = 6,
    batch_size: int = 32,
    judge: Callable[[list[str]], Sequence[bool]] | None = None,
    keep_responses: bool = True,
    progress: bool = False,
) -> dict:
    """Generate answers for every set and score them.

    Args:
        model: A causal LM (HF or peft).
        tokenizer: Its tokenizer (with the chat template the model was trained on).
        sets: The prompts and task examples.
        max_new_tokens: Tokens generated per refusal prompt (the judge reads the start of the answer).
        task_new_tokens: Tokens generated per task prompt (the answer is one word).
        batch_size: Prompts per ``generate`` call.
        judge: Refusal judge; default :class:`RefusalPhraseJudge`.
        keep_responses: Also return every prompt with its answer under ``"responses"``.
        progress: Show a progress bar per set.

    Returns:
        ``{"harmful_refusal", "harmless_refusal", "task_accuracy", "harmful_refusal_<extra>", ...,
        "perplexity", "responses": {set: [{"prompt", "response", "refusal"|"correct"}]}}`` with rates in
        ``[0, 1]`` (``perplexity`` only with ``sets.utility``).
    """
    judge = judge or RefusalPhraseJudge()
    refusal_sets = {"harmful": sets.harmful, "harmless": sets.harmless}
    refusal_sets.update({f"harmful_{k}": v for k, v in sets.extra_harmful.items()})
    refusal_sets.update({f"harmless_{k}": v for k, v in sets.extra_harmless.items()})
    scores: dict = {}
    responses: dict[str, list[dict]] = {}
    for name, prompts in refusal_sets.items():
        if not prompts:
            continue
        answers = generate_responses(
            model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress
        )
        flags = list(judge(answers))
        kind, _, extra = name.partition("_")
        scores[f"{kind}_refusal" + (f"_{extra}" if extra else "")] = _rate(flags)
        responses[name] = [
            {"prompt": p, "response": a, "refusal": bool(f)} for p, a, f in zip(prompts, answers, flags)
        ]
    if sets.task:
        prompts = [example.prompt for example in sets.task]
        answers = generate_responses(
            model,
            tokenizer,
            prompts,
            max_new_tokens=task_new_tokens,
            batch_size=batch_size,
            progress=progress,
        )
        correct = [is_correct(a, e.topic) for a, e in zip(answers, sets.task)]
        scores["task_accuracy"] = _rate(correct)
        responses["task"] = [
            {"prompt": e.headline, "response": a, "answer": e.topic, "correct": c}
            for e, a, c in zip(sets.task, answers, correct)
        ]
    if sets.utility:
        scores["perplexity"] = model_perplexity(model, tokenizer, sets.utility)
    if keep_responses:
        scores["responses"] = responses
    return scores
