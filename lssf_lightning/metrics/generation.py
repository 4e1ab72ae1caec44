"""Greedy, batched answer generation for refusal evaluation."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lssf_lightning.validation import check_int

__all__ = ["format_prompt", "generate_responses"]


def format_prompt(tokenizer, prompt: str, system_prompt: str | None = None) -> str:
    """The text a chat model sees for ``prompt``: its chat template with the generation prompt appended, or
    ``"User: …\\nAssistant:"`` (preceded by ``system_prompt`` and a blank line) for tokenizers without one."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        if system_prompt is not None:
            messages.insert(0, {"role": "system", "content": system_prompt})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    text = f"User: {prompt}\nAssistant:"
    return text if system_prompt is None else f"{system_prompt}\n\n{text}"


def generate_responses(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    system_prompt: str | None = None,
    progress: bool = False,
) -> list[str]:
    """Answer each prompt with greedy decoding and return only the generated text.

    Prompts are formatted with :func:`format_prompt`, sorted by length into left-padded batches (padding with
    the eos token when the tokenizer has no pad token) and decoded with the KV cache under
    ``torch.inference_mode()``. The model runs in eval mode on its own device and gets its training flags back
    afterwards, module by module; the tokenizer is not modified. Works with ``PreTrainedModel`` and peft
    models.

    Args:
        model: A causal LM with ``generate`` (e.g. ``AutoModelForCausalLM`` or a ``PeftModel``).
        tokenizer: Its tokenizer.
        prompts: User requests.
        max_new_tokens: Tokens generated per prompt at most.
        batch_size: Prompts per ``generate`` call.
        system_prompt: Optional system message.
        progress: Show a progress bar over batches.

    Returns:
        One answer per prompt, in the order of ``prompts``, special tokens removed and whitespace stripped.

    A prompt longer than the model's positions allow (``max_position_embeddings`` minus ``max_new_tokens``)
    keeps its last tokens (where the question and the assistant's turn are), with one warning for the call.

    Raises:
        ValueError: If ``max_new_tokens`` or ``batch_size`` is not a positive integer, ``max_new_tokens``
            leaves no position for a prompt, or the tokenizer has neither a pad nor an eos token.
    """
    check_int("max_new_tokens", max_new_tokens)
    check_int("batch_size", batch_size)
    prompts = list(prompts)
    if not prompts:
        return []
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has neither a pad token nor an eos token")
    encoded = _fit_positions(model, _encode(tokenizer, [format_prompt(tokenizer, p, system_prompt)
                                                        for p in prompts]), max_new_tokens)
    # Longest first: similar lengths share a batch (little padding) and memory problems surface at once.
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]), reverse=True)
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="generating", unit="batch")
    device = _device_of(model)
    config = _greedy_config(model, max_new_tokens, pad_id)
    responses: list[str] = [""] * len(prompts)
    # Per module, so that parts a user froze in eval mode inside a training model stay that way.
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    contiguous_hook = _contiguous_head_inputs(model)
    try:
        with torch.inference_mode():
            for batch in batches:
                input_ids, attention_mask = _left_pad([encoded[i] for i in batch], pad_id, device)
                output = model.generate(
                    input_ids=input_ids, attention_mask=attention_mask, generation_config=config
                )
                texts = tokenizer.batch_decode(output[:, input_ids.shape[1] :], skip_special_tokens=True)
                for index, text in zip(batch, texts, strict=True):
                    responses[index] = text.strip()
    finally:
        for module, training in modes:
            module.training = training
        if contiguous_hook is not None:
            contiguous_hook.remove()
    return responses


def _fit_positions(model: nn.Module, encoded: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """``encoded`` with each prompt cut to its last ``max positions − max_new_tokens`` tokens (models with a
    fixed number of positions, e.g. GPT-2's ``n_positions``; others are returned as they are)."""
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None) if config is not None else None
    if not isinstance(limit, int) or limit <= 0:
        return encoded
    room = limit - max_new_tokens
    if room < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt: the model has "
                         f"{limit} positions")
    long = sum(len(ids) > room for ids in encoded)
    if long:
        warnings.warn(f"{long} prompt(s) are longer than the {room} tokens the model's {limit} positions "
                      f"leave besides max_new_tokens={max_new_tokens}; each keeps its last {room} tokens",
                      stacklevel=3)
    return [ids[-room:] if len(ids) > room else ids for ids in encoded]


def _contiguous_head_inputs(model: nn.Module):
    """Make the output layer's input contiguous while generating; returns the hook handle (or ``None``).

    ``generate`` feeds the LM head the last position only, a strided view of the hidden states. For such a 3-D
    input and a weight that does not require grad (frozen or tied embeddings, LoRA bases) ``torch.matmul``
    does not fold the batch and instead copies the weight once per sequence: batch × vocabulary × hidden
    elements (1.8 G for 32 prompts on a 49k vocabulary), which doubled the generation time of such models.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Module):
        return None
    return head.register_forward_pre_hook(
        lambda _module, args: (args[0].contiguous(), *args[1:]) if args else None
    )


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    # Chat templates already hold the special tokens they need; plain text gets the tokenizer's (e.g. BOS).
    add_special = not getattr(tokenizer, "chat_template", None)
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=add_special)["input_ids"]]


def _left_pad(sequences: list[list[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        if ids:
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def _device_of(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _greedy_config(model: nn.Module, max_new_tokens: int, pad_id: int):
    """The model's generation config (keeping its eos tokens) switched to plain greedy decoding."""
    from transformers import GenerationConfig

    base = getattr(model, "generation_config", None)
    config = copy.deepcopy(base) if base is not None else GenerationConfig()
    # Sampling knobs get their neutral values rather than None: newer transformers refill None fields from the
    # model's own generation config (e.g. temperature=0.2) and then warn that greedy decoding ignores them.
    config.update(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        temperature=1.0,
        top_p=1.0,
        top_k=50,
        pad_token_id=pad_id,
        use_cache=True,
    )
    return config
