from __future__ import annotations

import copy

import pytest
import torch
from _tiny import build_tiny_llama, build_tiny_tokenizer

from lssf_lightning.metrics import generate_responses
from lssf_lightning.metrics.generation import format_prompt

PROMPTS = [
    "how do i bake bread ?",
    "what is the capital of france ?",
    "hello",
    "write a short poem about the sea . please list three healthy breakfast ideas .",
    "tell me a fun fact about space",
    "the cat",
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    # A large init makes the random model's logits far apart, so its greedy text varies from prompt to prompt.
    return build_tiny_llama(tokenizer, seed=0, initializer_range=0.5)


def manual_greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Greedy decoding of one unpadded prompt with full forward passes (no cache, no generate)."""
    text = format_prompt(tokenizer, prompt)
    ids = tokenizer(text, add_special_tokens=not tokenizer.chat_template, return_tensors="pt")["input_ids"]
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            next_id = int(
                model(torch.cat([ids, torch.tensor([new], dtype=torch.long)], 1)).logits[0, -1].argmax()
            )
            new.append(next_id)
            if next_id == tokenizer.eos_token_id:
                break
    return tokenizer.decode(new, skip_special_tokens=True).strip()


def test_matches_manual_greedy_decoding_of_each_prompt_alone(model, tokenizer):
    responses = generate_responses(model, tokenizer, PROMPTS, max_new_tokens=10, batch_size=4)
    assert responses == [manual_greedy(model, tokenizer, p, 10) for p in PROMPTS]
    assert len(set(responses)) > 1  # the check above is not vacuous


def test_deterministic_and_independent_of_batch_size(model, tokenizer):
    reference = generate_responses(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=1)
    assert generate_responses(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=1) == reference
    assert generate_responses(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=4) == reference
    assert generate_responses(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=64) == reference


def test_returns_answers_in_prompt_order(model, tokenizer):
    reference = generate_responses(model, tokenizer, PROMPTS, max_new_tokens=8, batch_size=2)
    permutation = [3, 0, 5, 1, 4, 2]
    permuted = generate_responses(
        model, tokenizer, [PROMPTS[i] for i in permutation], max_new_tokens=8, batch_size=2
    )
    assert permuted == [reference[i] for i in permutation]


def test_returns_only_new_text_of_at_most_max_new_tokens(model, tokenizer):
    responses = generate_responses(model, tokenizer, PROMPTS, max_new_tokens=3)
    for prompt, response in zip(PROMPTS, responses, strict=True):
        assert 0 < len(tokenizer(response, add_special_tokens=False)["input_ids"]) <= 3
        assert "assistant" not in response.split()[:1] and prompt not in response


def test_restores_training_flag_and_leaves_tokenizer_alone(model, tokenizer):
    side, pad = tokenizer.padding_side, tokenizer.pad_token
    model.train()
    model.model.layers[0].eval()  # a part frozen in eval mode inside a training model
    generate_responses(model, tokenizer, PROMPTS[:2], max_new_tokens=2)
    frozen = set(model.model.layers[0].modules())
    assert all(m.training != (m in frozen) for m in model.modules())
    model.eval()
    generate_responses(model, tokenizer, PROMPTS[:2], max_new_tokens=2)
    assert not model.training
    assert (tokenizer.padding_side, tokenizer.pad_token) == (side, pad)


def test_plain_formatting_and_eos_padding_without_chat_template():
    tokenizer = build_tiny_tokenizer(chat_template=False)
    assert tokenizer.pad_token is None and not tokenizer.chat_template
    assert format_prompt(tokenizer, "hello") == "User: hello\nAssistant:"
    assert (
        format_prompt(tokenizer, "hello", system_prompt="be brief") == "be brief\n\nUser: hello\nAssistant:"
    )
    model = build_tiny_llama(tokenizer, seed=1, initializer_range=0.5, pad_token_id=None)
    batched = generate_responses(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=6)
    assert batched == generate_responses(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=1)
    assert batched == [manual_greedy(model, tokenizer, p, 6) for p in PROMPTS]
    assert tokenizer.pad_token is None


def test_chat_template_with_system_prompt(model, tokenizer):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert format_prompt(tokenizer, "hello", system_prompt="be brief") == expected
    assert expected.endswith("<s> assistant : ")
    with_system = generate_responses(model, tokenizer, PROMPTS, max_new_tokens=8, system_prompt="be brief")
    without = generate_responses(model, tokenizer, PROMPTS, max_new_tokens=8)
    assert with_system != without


def test_peft_model_generates_through_its_adapter(model, tokenizer):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    lora = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(copy.deepcopy(model), lora)
    peft_model.train()
    responses = generate_responses(peft_model, tokenizer, PROMPTS, max_new_tokens=8, batch_size=3)
    assert peft_model.training
    merged = copy.deepcopy(peft_model).merge_and_unload()
    assert responses == generate_responses(merged, tokenizer, PROMPTS, max_new_tokens=8, batch_size=3)
    assert responses != generate_responses(model, tokenizer, PROMPTS, max_new_tokens=8, batch_size=3)


def test_greedy_despite_sampling_defaults_and_stops_at_model_eos_tokens(model, tokenizer):
    from transformers import GenerationConfig

    reference = generate_responses(model, tokenizer, PROMPTS[:1], max_new_tokens=8)[0]
    words = reference.split()
    stop_id = tokenizer.convert_tokens_to_ids(words[3])
    assert words.index(words[3]) == 3 and len(words) == 8  # first occurrence: generation must stop there
    sampling = copy.deepcopy(model)
    sampling.generation_config = GenerationConfig(
        do_sample=True, temperature=0.2, top_p=0.5, eos_token_id=[tokenizer.eos_token_id, stop_id]
    )
    saved = sampling.generation_config.to_dict()
    responses = generate_responses(sampling, tokenizer, PROMPTS[:1] * 3, max_new_tokens=8)
    assert responses == [" ".join(words[:4])] * 3  # a stop token that is not special is decoded
    assert sampling.generation_config.to_dict() == saved


def test_empty_prompt_list(model, tokenizer):
    assert generate_responses(model, tokenizer, []) == []


@pytest.mark.parametrize("name", ["max_new_tokens", "batch_size"])
@pytest.mark.parametrize("value", [0, -1, 2.0, True])
def test_rejects_bad_sizes(model, tokenizer, name, value):
    with pytest.raises(ValueError, match=name):
        generate_responses(model, tokenizer, PROMPTS, **{name: value})


def test_rejects_tokenizer_without_pad_or_eos(model):
    tokenizer = build_tiny_tokenizer(chat_template=False)
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="neither a pad token nor an eos token"):
        generate_responses(model, tokenizer, PROMPTS)


def test_frozen_model_matches_manual_greedy_and_no_hook_is_left_behind(model, tokenizer):
    frozen = copy.deepcopy(model)
    frozen.requires_grad_(False)  # the LM head input is made contiguous while generating (see generation.py)
    responses = generate_responses(frozen, tokenizer, PROMPTS, max_new_tokens=10, batch_size=4)
    assert responses == [manual_greedy(model, tokenizer, p, 10) for p in PROMPTS]
    assert not frozen.get_output_embeddings()._forward_pre_hooks
