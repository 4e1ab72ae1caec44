"""Refusal evaluation: the harmful-refusal metric, refusal judges, prompt sets and answer generation."""

from lssf_lightning.metrics.generation import generate_responses
from lssf_lightning.metrics.judges import REFUSAL_PHRASES, ClassifierJudge, RefusalPhraseJudge, resolve_judge
from lssf_lightning.metrics.prompts import load_prompt_pairs, load_prompts
from lssf_lightning.metrics.refusal import RefusalRate, refusal_rate

__all__ = [
    "REFUSAL_PHRASES",
    "ClassifierJudge",
    "RefusalPhraseJudge",
    "RefusalRate",
    "generate_responses",
    "load_prompt_pairs",
    "load_prompts",
    "refusal_rate",
    "resolve_judge",
]
