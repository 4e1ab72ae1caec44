"""Evaluation: the refusal metric, refusal judges, prompt sets, answer generation, and perplexity on general
text (the utility figure)."""

from lssf_lightning.metrics.generation import generate_responses
from lssf_lightning.metrics.judges import REFUSAL_PHRASES, ClassifierJudge, RefusalPhraseJudge, resolve_judge
from lssf_lightning.metrics.perplexity import (
    CausalLMPerplexity,
    causal_lm_perplexity,
    load_utility_texts,
    model_perplexity,
)
from lssf_lightning.metrics.prompts import load_prompt_pairs, load_prompts
from lssf_lightning.metrics.refusal import RefusalRate, refusal_rate

__all__ = [
    "REFUSAL_PHRASES",
    "CausalLMPerplexity",
    "ClassifierJudge",
    "RefusalPhraseJudge",
    "RefusalRate",
    "causal_lm_perplexity",
    "generate_responses",
    "load_prompt_pairs",
    "load_prompts",
    "load_utility_texts",
    "model_perplexity",
    "refusal_rate",
    "resolve_judge",
]
