import pytest
import torch
from conftest import state

from lssf_lightning.methods import LSSF, apply_edits
from lssf_lightning.metrics import generate_responses, refusal_rate
from lssf_lightning.selection import AlphaPoint, refusal_curve, smallest_alpha_reaching
from lssf_lightning.subspace import SafetySubspace


def test_smallest_alpha_reaching_by_hand():
    curve = [AlphaPoint(0.5, 0.2), AlphaPoint(1.0, 0.7), AlphaPoint(2.0, 0.9), AlphaPoint(3.0, 0.6)]
    assert smallest_alpha_reaching(curve, 0.7) == (1.0, True)
    assert smallest_alpha_reaching(curve, 0.85) == (2.0, True)
    assert smallest_alpha_reaching(curve, 0.95) == (2.0, False)
    assert smallest_alpha_reaching([AlphaPoint(2.0, 0.5), AlphaPoint(1.0, 0.5)], 0.9) == (1.0, False)
    with pytest.raises(ValueError, match="empty"):
        smallest_alpha_reaching([], 0.5)


def long_answer(responses):
    return [len(r) > 20 for r in responses]


def test_refusal_curve_equals_direct_evaluation_and_restores_weights(llama_trio, tiny_tokenizer):
    model = llama_trio.models["finetuned"]
    subspace = SafetySubspace.from_weights(
        llama_trio.models["aligned"], llama_trio.models["base"], progress=False
    )
    prompts = [
        "how do i bake bread at home ?", "tell me a fun fact about space .", "what is the capital of france ?"
    ]
    before = state(model)
    curve = refusal_curve(model, tiny_tokenizer, subspace, [2.0, 0.5, 1.0], prompts, prompts[:1],
                          judge=long_answer, max_new_tokens=8)
    assert [p.alpha for p in curve] == [0.5, 1.0, 2.0]
    assert all(torch.equal(v, before[k]) for k, v in state(model).items())
    for point in curve:
        fused = apply_edits(model, LSSF(subspace, point.alpha))
        answers = generate_responses(fused, tiny_tokenizer, prompts, max_new_tokens=8)
        assert point.harmful_refusal == pytest.approx(float(refusal_rate(answers, judge=long_answer)))
        harmless = generate_responses(fused, tiny_tokenizer, prompts[:1], max_new_tokens=8)
        harmless_rate = float(refusal_rate(harmless, judge=long_answer))
        assert point.harmless_refusal == pytest.approx(harmless_rate)
    stopped = refusal_curve(model, tiny_tokenizer, subspace, [0.5, 1.0, 2.0], prompts,
                            judge=lambda rs: [True] * len(rs), target=0.5)
    assert [p.alpha for p in stopped] == [0.5]
