"""Tiny, offline-built transformers parts for tests (no hub access, no downloads).

Plain helper module (not a conftest): import what you need, e.g.
``from _tiny import build_tiny_tokenizer, build_tiny_llama``.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

TINY_SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>")

TINY_CORPUS = (
    "how do i bake bread at home ?",
    "explain how a bicycle works .",
    "write a short poem about the sea .",
    "what is the capital of france ?",
    "i cannot help with that request .",
    "sure , here is a simple answer .",
    "the cat sat on the warm mat .",
    "please list three healthy breakfast ideas .",
    "how do i kill a python process ?",
    "tell me a fun fact about space .",
    "user assistant system : hello world",
)

# The linear modules of each block of :func:`build_tiny_llama` (written out by hand: what tests expect).
TINY_LLAMA_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)

# ChatML-like, kept to words the tiny vocabulary knows so every piece tokenizes.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<s> {{ message['role'] }} : {{ message['content'] }} </s> "
    "{% endfor %}"
    "{% if add_generation_prompt %}<s> assistant : {% endif %}"
)


def build_tiny_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    """A word-level tokenizer trained on :data:`TINY_CORPUS` (63 tokens), optionally with a chat template.

    ``<pad>`` is the padding token only when ``chat_template`` is true; without it the tokenizer has no pad
    token at all, which exercises the "pad with eos" fallback of code under test.
    """
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordLevelTrainer(special_tokens=list(TINY_SPECIAL_TOKENS))
    tokenizer.train_from_iterator(TINY_CORPUS, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>" if chat_template else None,
        model_max_length=256,
    )
    if chat_template:
        wrapped.chat_template = TINY_CHAT_TEMPLATE
    return wrapped


def build_tiny_llama(tokenizer: PreTrainedTokenizerFast, seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A randomly initialised 2-layer ``LlamaForCausalLM`` (hidden 32) sized to ``tokenizer`` (fp32, CPU)."""
    settings = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    settings.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**settings)).eval()
