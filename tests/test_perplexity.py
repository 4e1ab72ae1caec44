"""Perplexity on general text: a hand-computed case, the model's own loss, the text sets and their splits."""

from __future__ import annotations

import math

import pytest
import torch
from _tiny import build_tiny_llama

from lssf_lightning.metrics.perplexity import (
    CausalLMPerplexity,
    causal_lm_perplexity,
    load_utility_texts,
    model_perplexity,
    stdlib_docstring_texts,
)


def test_hand_computed_case():
    # Two sequences; position t is predicted from the logits at t-1. Sequence 0 predicts tokens 1, 2 with
    # probabilities 1/2 and 1/4; sequence 1 predicts token 0 with probability 1/4 and its last label is
    # ignored.
    logits = torch.full((2, 3, 4), -1e9)
    logits[0, 0] = torch.log(torch.tensor([0.25, 0.5, 0.125, 0.125]))
    logits[0, 1] = torch.log(torch.tensor([0.25, 0.25, 0.25, 0.25]))
    logits[1, 0] = torch.log(torch.tensor([0.25, 0.25, 0.25, 0.25]))
    labels = torch.tensor([[3, 1, 2], [1, 0, -100]])
    expected = math.exp(-(math.log(0.5) + math.log(0.25) + math.log(0.25)) / 3)
    assert causal_lm_perplexity(logits, labels).item() == pytest.approx(expected, rel=1e-6)
    metric = CausalLMPerplexity()
    metric.update(logits[:1], labels[:1])
    metric.update(logits[1:], labels[1:])
    assert metric.compute().item() == pytest.approx(expected, rel=1e-6)


def test_bfloat16_logits_are_accepted():
    logits = torch.randn(1, 5, 7).to(torch.bfloat16)
    labels = torch.randint(7, (1, 5))
    assert causal_lm_perplexity(logits, labels).item() == pytest.approx(
        causal_lm_perplexity(logits.float(), labels).item(), rel=1e-6
    )


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="same first two sizes"):
        causal_lm_perplexity(torch.zeros(1, 4, 3), torch.zeros(1, 5, dtype=torch.long))


def test_matches_the_models_own_loss(tiny_tokenizer):
    model = build_tiny_llama(tiny_tokenizer).eval()
    text = "how do i bake bread at home ? the cat sat on the warm mat ."
    ids = tiny_tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert model_perplexity(model, tiny_tokenizer, [text]) == pytest.approx(math.exp(loss.item()), rel=1e-5)


def test_padding_does_not_count_and_texts_pool_by_token(tiny_tokenizer):
    model = build_tiny_llama(tiny_tokenizer).eval()
    texts = [
        "how do i bake bread at home ?",
        "the cat sat on the warm mat . tell me a fun fact about space .",
    ]
    total_nll = total_tokens = 0.0
    for text in texts:  # one text at a time: no padding at all
        ids = tiny_tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss.item()
        count = ids.shape[1] - 1
        total_nll, total_tokens = total_nll + loss * count, total_tokens + count
    batched = model_perplexity(model, tiny_tokenizer, texts, batch_size=2)
    assert batched == pytest.approx(math.exp(total_nll / total_tokens), rel=1e-5)
    assert model.training is False


def test_a_better_model_has_a_lower_perplexity(tiny_tokenizer):
    # Train the tiny model a few steps on the texts: their perplexity must fall.
    torch.manual_seed(0)
    model = build_tiny_llama(tiny_tokenizer)
    texts = ["the cat sat on the warm mat .", "write a short poem about the sea ."]
    before = model_perplexity(model, tiny_tokenizer, texts)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = tiny_tokenizer(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model.train()
    for _ in range(20):
        optimizer.zero_grad()
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
    assert model_perplexity(model, tiny_tokenizer, texts) < 0.5 * before


def test_nothing_to_predict_is_an_error(tiny_tokenizer):
    model = build_tiny_llama(tiny_tokenizer).eval()
    with pytest.raises(ValueError, match="at least two tokens"):
        model_perplexity(model, tiny_tokenizer, ["cat"])


def test_bundled_set_and_its_disjoint_splits():
    texts = load_utility_texts("bundled")
    validation, test = load_utility_texts("bundled", "validation"), load_utility_texts("bundled", "test")
    assert len(texts) == 32 and all(len(t) > 200 for t in texts)
    assert not set(validation) & set(test) and sorted(validation + test) == sorted(texts)
    assert load_utility_texts("bundled", limit=3) == texts[:3]


def test_stdlib_prose_is_split_by_module():
    grouped = stdlib_docstring_texts()
    assert len(grouped) > 40
    validation, test = load_utility_texts("stdlib", "validation"), load_utility_texts("stdlib", "test")
    modules = {split: {m for m, p in grouped if p in set(texts)} for split, texts in
               (("validation", validation), ("test", test))}
    assert validation and test and not modules["validation"] & modules["test"]
    assert not any(p.lstrip().startswith(">>>") for p in validation + test)


def test_text_files(tmp_path):
    (tmp_path / "a.txt").write_text("# comment\nfirst paragraph\nwraps here.\n\nsecond one.\n")
    assert load_utility_texts(tmp_path / "a.txt") == ["first paragraph wraps here.", "second one."]
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n"two"\n')
    assert load_utility_texts(tmp_path / "b.jsonl") == ["one", "two"]
    (tmp_path / "c.jsonl").write_text('{"body": "one"}\n')
    with pytest.raises(ValueError, match="'text' field"):
        load_utility_texts(tmp_path / "c.jsonl")
    with pytest.raises(FileNotFoundError, match="bundled sets"):
        load_utility_texts(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="split"):
        load_utility_texts("bundled", "train")
