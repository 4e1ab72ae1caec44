"""Make the demo's aligned model: a short supervised safety pass over the unaligned base, run by a Trainer.

Harmful requests (the AdvBench alignment split) are mapped to refusals in varied wording written for this
project; harmless requests are mapped to the base model's own answers, so helpfulness survives. The
refusals open with phrases :class:`~lssf_lightning.metrics.RefusalPhraseJudge` recognises.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

__all__ = [
    "REFUSAL_CLOSINGS",
    "REFUSAL_OPENINGS",
    "REFUSAL_REASONS",
    "alignment_rows",
    "refusal",
    "trim_answer",
]

REFUSAL_OPENINGS: tuple[str, ...] = (
    "I'm sorry, but I can't help with that.",
    "I'm sorry, but I cannot help with this request.",
    "I can't help with that.",
    "I cannot assist with this request.",
    "I won't help with that.",
    "I'm not able to help with this.",
    "I'm unable to provide that.",
    "I must decline this request.",
    "Sorry, but I can't assist with that.",
    "I apologize, but I can't provide this.",
    "I'm really sorry, but I won't do this.",
    "I will not provide that.",
)
"""First sentences of the refusals; each contains a phrase of the project's refusal judge."""

REFUSAL_REASONS: tuple[str, ...] = (
    "I won't give instructions that could hurt people.",
    "I can't help with something that could cause serious harm.",
    "I cannot assist with anything dangerous or illegal.",
    "I'm not able to help with requests that put people's safety at risk.",
    "I won't take part in something unethical or harmful.",
    "",
)
"""Second sentences. Each states the refusal again in the first person, so that any fragment a strongly
edited model recombines ("Sorry, but I won't …") still reads, and is judged, as a refusal."""

REFUSAL_CLOSINGS: tuple[str, ...] = (
    "If you have another question, I'm happy to help.",
    "Is there something else I can help you with?",
    "I'd be glad to help with a safe alternative.",
    "Let me know if there's anything else you need.",
    "",
)


def refusal(rng: random.Random) -> str:
    """A refusal in one of ``len(openings) × len(reasons) × len(closings)`` wordings, drawn with ``rng``."""
    parts = (rng.choice(REFUSAL_OPENINGS), rng.choice(REFUSAL_REASONS), rng.choice(REFUSAL_CLOSINGS))
    return " ".join(part for part in parts if part)


_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


def trim_answer(answer: str, min_chars: int = 40) -> str:
    """Cut a length-limited answer after its last full sentence (when that keeps ``min_chars``), so the model
    is not taught to stop mid-sentence."""
    answer = answer.strip()
    ends = [m.end() for m in _SENTENCE_END.finditer(answer)]
    if ends and ends[-1] >= min_chars:
        return answer[: ends[-1]]
    return answer


def alignment_rows(
    harmful: Sequence[str], harmless: Sequence[str], harmless_answers: Sequence[str], seed: int = 0
) -> list[dict[str, str]]:
    """``{"prompt", "response"}`` rows: each harmful prompt with a refusal, each harmless one with its answer.

    Rows are shuffled with ``seed``; harmless pairs whose answer is empty are skipped.

    Raises:
        ValueError: If ``harmless`` and ``harmless_answers`` differ in length.
    """
    if len(harmless) != len(harmless_answers):
        raise ValueError(f"{len(harmless)} harmless prompts but {len(harmless_answers)} answers")
    rng = random.Random(seed)
    rows = [{"prompt": p, "response": refusal(rng)} for p in harmful]
    rows += [
        {"prompt": p, "response": trim_answer(a)} for p, a in zip(harmless, harmless_answers) if a.strip()
    ]
    rng.shuffle(rows)
    return rows
