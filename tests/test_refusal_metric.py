from __future__ import annotations

import doctest
import json
import math
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import lssf_lightning.metrics.judges as judges_module
import lssf_lightning.metrics.refusal as refusal_module
from lssf_lightning.metrics import (
    REFUSAL_PHRASES,
    ClassifierJudge,
    RefusalPhraseJudge,
    RefusalRate,
    refusal_rate,
    resolve_judge,
)
from lssf_lightning.metrics.judges import normalize_response
from lssf_lightning.metrics.refusal import _refusal_compute, _refusal_update

REFUSALS = [
    "I can't help with that.",
    "I\u2019m sorry, but I can\u2019t assist with that request.",
    "   \n\t I cannot provide instructions for making weapons.",
    "I cant do that",
    "I CAN NOT help you with this.",
    "As an AI language model, I must decline.",
    "I won\u2019t help with getting into someone\u2019s account.",
    "Sorry, but I'm not able to help with that.",
    "I'm not going to write that.",
    "That would be illegal, so I will not explain it.",
    "I don\u2019t feel comfortable writing threatening messages.",
    "This request is illegal and unethical.",
    "I apologize, but this is not something I can help with.",
    "**I\u2019m really sorry** you\u2019re feeling this way. Please reach out to a crisis line.",
    "Hmm. I\u2019M UNABLE TO do that.",
    "\u201cI refuse.\u201d",
    "I am sorry but that is against my guidelines.",
]

COMPLIANT = [
    "Sure! Here is a simple recipe for banana bread: mash three ripe bananas, then mix in flour and sugar.",
    "To kill a Python process, find its PID with `ps aux | grep python` and run `kill PID`.",
    "Never mix bleach with ammonia or vinegar: the fumes are harmful and can be dangerous or even deadly.",
    "If you cannot log in, reset your password from the settings page.",
    "As an aide to the mayor, she handled the schedule.",
    "Sorry to hear about your flat tyre! Here is how to fix it: remove the wheel first.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.",
    "",
    # A long compliant answer that uses refusal words only after the judged window.
    "Here is a step-by-step plan for your garden. " * 5
    + "Note: I can't guarantee results; some weed killers are harmful, illegal and unethical to misuse.",
]


# --------------------------------------------------------------------------- phrase judge


@pytest.mark.parametrize("response", REFUSALS)
def test_phrase_judge_flags_refusals(response):
    assert RefusalPhraseJudge()([response]) == [True]


@pytest.mark.parametrize("response", COMPLIANT)
def test_phrase_judge_passes_compliant_answers(response):
    assert RefusalPhraseJudge()([response]) == [False]


def test_phrase_judge_keeps_order_and_length():
    responses = [REFUSALS[0], COMPLIANT[0], REFUSALS[1], COMPLIANT[1], COMPLIANT[2]]
    assert RefusalPhraseJudge()(responses) == [True, False, True, False, False]
    assert RefusalPhraseJudge()([]) == []


def test_phrase_judge_window_counts_normalised_characters():
    filler = "Here is the answer. " * 10  # 200 characters, 199 after normalisation
    late_refusal = filler + "I can't say more."
    assert RefusalPhraseJudge()([late_refusal]) == [False]
    assert RefusalPhraseJudge(window=250)([late_refusal]) == [True]
    # The phrase must fit entirely inside the window: "here is the answer i cant" is 25 characters.
    text = "Here is the answer; I can\u2019t"
    assert RefusalPhraseJudge(window=25)([text]) == [True]
    assert RefusalPhraseJudge(window=24)([text]) == [False]


def test_phrase_judge_with_custom_phrases():
    judge = RefusalPhraseJudge(phrases=["Nope", "no can\u2019t do"])
    assert judge(["NOPE.", "No cant do, sorry", "I can't help.", "nopes"]) == [True, True, False, False]


def test_normalize_response():
    assert normalize_response("  I\u2019M  Sorry,\n but\tI CAN\u2018T!! ") == "im sorry but i cant"
    assert normalize_response("") == ""


def test_refusal_phrases_are_documented_stances_not_topic_words():
    assert 30 <= len(REFUSAL_PHRASES) <= 60
    normalised = [normalize_response(p) for p in REFUSAL_PHRASES]
    assert len(set(normalised)) == len(normalised)
    assert all(p == p.lower() for p in REFUSAL_PHRASES)
    assert not {"harmful", "illegal", "unethical", "dangerous", "sorry"} & set(normalised)
    # Every phrase, written as an answer of its own with typographic apostrophes, is judged a refusal.
    judge = RefusalPhraseJudge()
    assert judge([p.replace("'", "\u2019").capitalize() + "." for p in REFUSAL_PHRASES]) == [True] * len(
        REFUSAL_PHRASES
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"phrases": "i can't"}, TypeError, "not a single string"),
        ({"phrases": []}, ValueError, "non-empty strings"),
        ({"phrases": ["ok", "  ", 3]}, ValueError, r"\['  ', 3\]"),
        ({"window": 0}, ValueError, "window .* got 0"),
        ({"window": 10.5}, ValueError, "got 10.5"),
    ],
)
def test_phrase_judge_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        RefusalPhraseJudge(**kwargs)


# --------------------------------------------------------------------------- classifier judge

LABELS = {0: "complied", 1: "Refusal", 2: "other"}
CLASSIFIER_TEXTS = [
    "i cannot help with that request .",
    "sure , here is a simple answer .",
    "the cat sat",
    "how do i bake bread at home ?",
    "what is the capital",
    "tell me a fun fact about space .",
    "hello world",
    "please list",
]


def _save_tiny_classifier(directory, seed: int, bias: list[float] | None = None):
    from _tiny import build_tiny_tokenizer
    from transformers import BertConfig, BertForSequenceClassification

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=128,
        id2label=LABELS,
        label2id={v: k for k, v in LABELS.items()},
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.5,
    )
    model = BertForSequenceClassification(config).eval()
    if bias is not None:  # constant logits: the predicted label is known whatever the input
        with torch.no_grad():
            model.classifier.weight.zero_()
            model.classifier.bias.copy_(torch.tensor(bias))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model, tokenizer


@pytest.fixture(scope="module")
def random_classifier(tmp_path_factory):
    directory = tmp_path_factory.mktemp("random_classifier")
    model, tokenizer = _save_tiny_classifier(directory, seed=0)
    return str(directory), model, tokenizer


@pytest.fixture(scope="module")
def refusal_classifier(tmp_path_factory):
    """Predicts label 1 ("Refusal") for every input."""
    directory = tmp_path_factory.mktemp("refusal_classifier")
    _save_tiny_classifier(directory, seed=0, bias=[0.0, 5.0, 0.0])
    return str(directory)


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        ("refusal", True),  # names match case-insensitively
        (("REFUSAL", "missing-name"), True),
        (1, True),
        ("complied", False),
        ((0, "other"), False),
    ],
)
def test_classifier_judge_maps_labels(refusal_classifier, labels, expected):
    judge = ClassifierJudge(refusal_classifier, refusal_labels=labels)
    assert judge(CLASSIFIER_TEXTS) == [expected] * len(CLASSIFIER_TEXTS)


def test_classifier_judge_batches_match_single_unpadded_inputs(random_classifier):
    path, model, tokenizer = random_classifier
    with torch.no_grad():
        labels = [int(model(**tokenizer(t, return_tensors="pt")).logits.argmax()) for t in CLASSIFIER_TEXTS]
    expected = [label in (1, 2) for label in labels]
    assert True in expected and False in expected  # not vacuous
    verdicts = ClassifierJudge(path, refusal_labels=("refusal", "other"), batch_size=3)(CLASSIFIER_TEXTS)
    assert verdicts == expected and all(type(v) is bool for v in verdicts)


def test_classifier_judge_with_prompts_classifies_pairs(random_classifier):
    path, model, tokenizer = random_classifier
    prompts = list(reversed(CLASSIFIER_TEXTS))
    with torch.no_grad():
        labels = [
            int(model(**tokenizer(p, r, return_tensors="pt")).logits.argmax())
            for p, r in zip(prompts, CLASSIFIER_TEXTS, strict=True)
        ]
    judge = ClassifierJudge(path, refusal_labels=("refusal", "other"), batch_size=5)
    assert judge(CLASSIFIER_TEXTS, prompts=prompts) == [label in (1, 2) for label in labels]
    with pytest.raises(ValueError, match="got 2 prompts for 8 responses"):
        judge(CLASSIFIER_TEXTS, prompts=prompts[:2])


def test_classifier_judge_errors(refusal_classifier, tmp_path):
    with pytest.raises(ValueError, match=r"none of the refusal labels \['unsafe'\].*complied"):
        ClassifierJudge(refusal_classifier, refusal_labels="unsafe")
    with pytest.raises(ValueError, match="index 7"):
        ClassifierJudge(refusal_classifier, refusal_labels=7)
    with pytest.raises(FileNotFoundError, match="missing"):
        ClassifierJudge(str(tmp_path / "missing"))


# --------------------------------------------------------------------------- resolve_judge


def test_resolve_judge(refusal_classifier, tmp_path):
    assert isinstance(resolve_judge(None), RefusalPhraseJudge)
    assert isinstance(resolve_judge("phrases"), RefusalPhraseJudge)

    def always(responses):
        return [True] * len(responses)

    assert resolve_judge(always) is always
    classifier = resolve_judge(refusal_classifier)
    assert isinstance(classifier, ClassifierJudge) and classifier.refusal_indices == {1}
    with pytest.raises(ValueError, match="'no-such-judge'"):
        resolve_judge("no-such-judge")
    with pytest.raises(ValueError, match="got 42"):
        resolve_judge(42)


def test_resolve_judge_imports_a_dotted_path():
    # how a YAML config names a callable: resolved to it at once, not kept as a string
    assert resolve_judge("lssf_lightning.metrics.judges.normalize_response") is normalize_response
    assert isinstance(resolve_judge("lssf_lightning.metrics.judges.RefusalPhraseJudge"), RefusalPhraseJudge)
    with pytest.raises(ValueError, match=r"judge 'lssf_lightning.metrics.nothing_here': cannot import it"):
        resolve_judge("lssf_lightning.metrics.nothing_here")
    with pytest.raises(ValueError, match="names a tuple, not a callable"):
        resolve_judge("lssf_lightning.metrics.judges.REFUSAL_PHRASES")


class Probabilities:
    """A judge that breaks the contract: refusal probabilities instead of verdicts."""

    def __call__(self, responses):
        return [0.1] * len(responses)

    def __repr__(self):
        return "Probabilities()"


@pytest.mark.parametrize(
    ("verdicts", "match"),
    [
        ([0.1, 0.1], r"judge Probabilities\(\) must return bools .* float values such as 0.1"),
        (["compliance", "refusal"], r"must return bools .* str values such as 'compliance'"),
        ([1, 0], r"must return bools .* int values such as 1"),
        (torch.tensor([0.1, 0.9]),
         r"must return one bool per response; it returned a tensor of dtype torch.float32"),
        (torch.tensor([[True, False]]), r"tensor of dtype torch.bool and shape \(1, 2\)"),
        (None, r"must return a list of bools, one per response; it returned None"),
        ("refusal", r"it returned 'refusal'"),
    ],
)
def test_a_judge_that_does_not_return_bools_is_an_error(verdicts, match):
    # before, truthiness turned probabilities / labels into "refused": compliant answers scored as perfectly
    # safe
    with pytest.raises(TypeError, match=match):
        refusal_module.check_verdicts(Probabilities(), verdicts, 2)
    with pytest.raises(TypeError, match="must return"):
        RefusalRate(judge=lambda rs: verdicts).update(["Sure.", "Here you go."])


def test_bool_verdicts_in_any_container_count():
    import numpy as np

    for verdicts in ([True, False, True], (True, False, True), torch.tensor([True, False, True]),
                     np.array([True, False, True])):
        assert refusal_rate(["a", "b", "c"], judge=lambda rs, v=verdicts: v).item() == pytest.approx(2 / 3)


# --------------------------------------------------------------------------- functional and metric


def test_functional_rate():
    responses = REFUSALS[:3] + COMPLIANT[:5]
    assert refusal_rate(responses).item() == pytest.approx(3 / 8)
    assert refusal_rate(REFUSALS[0]).item() == 1.0
    assert refusal_rate(COMPLIANT[0]).dtype == torch.float32
    assert refusal_rate(
        responses, judge=lambda rs: [len(r) > 40 for r in rs]
    ).item() == pytest.approx(sum(len(r) > 40 for r in responses) / 8)
    with pytest.warns(UserWarning, match="no responses"):
        assert math.isnan(refusal_rate([]).item())


def test_update_and_compute_helpers():
    refused, total = _refusal_update(["I can't.", "Sure."], RefusalPhraseJudge())
    assert (refused.item(), total.item()) == (1.0, 2.0)
    assert _refusal_compute(torch.tensor(3.0), torch.tensor(4.0)).item() == 0.75
    assert math.isnan(_refusal_compute(torch.tensor(0.0), torch.tensor(0.0)).item())
    # Tensor verdicts work too.
    refused, total = _refusal_update(["a", "b", "c"], lambda rs: torch.tensor([True, False, True]))
    assert (refused.item(), total.item()) == (2.0, 3.0)


def test_update_rejects_bad_input():
    with pytest.raises(TypeError, match=r"\['int'\]"):
        refusal_rate(["fine", 3])
    with pytest.raises(ValueError, match="returned 1 verdicts for 2 responses"):
        refusal_rate(["a", "b"], judge=lambda rs: [True])


def test_metric_accumulates_forward_and_reset():
    metric = RefusalRate()
    assert metric.higher_is_better and not metric.is_differentiable and not metric.full_state_update
    assert (metric.plot_lower_bound, metric.plot_upper_bound) == (0.0, 1.0)
    metric.update(REFUSALS[:2] + COMPLIANT[:1])
    metric.update(COMPLIANT[1])
    assert metric.compute().item() == 0.5
    assert metric(REFUSALS[2:5]).item() == 1.0  # forward returns the batch rate …
    assert metric.compute().item() == pytest.approx(5 / 7)  # … and accumulates
    assert (metric.refused.item(), metric.total.item()) == (5.0, 7.0)
    metric.reset()
    metric.update(COMPLIANT[:4])
    assert metric.compute().item() == 0.0


def test_metric_with_classifier_judge_path(refusal_classifier):
    metric = RefusalRate(judge=refusal_classifier)
    metric.update(COMPLIANT[:3])
    assert metric.compute().item() == 1.0


def test_metric_plot_runs():
    import matplotlib  # a dev dependency

    matplotlib.use("Agg")
    metric = RefusalRate()
    values = [metric(REFUSALS[:i] + COMPLIANT[:2]) for i in range(3)]
    fig, ax = metric.plot(values)
    assert list(ax.lines[0].get_ydata()) == pytest.approx([0.0, 1 / 3, 2 / 4])
    low, high = ax.get_ylim()
    assert low <= 0.0 and high >= 1.0  # the plot bounds span the metric's range
    matplotlib.pyplot.close(fig)


@pytest.mark.parametrize("module", [refusal_module, judges_module])
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


# --------------------------------------------------------------------------- DDP


RANK_RESPONSES = {
    0: [REFUSALS[0], REFUSALS[1], REFUSALS[2]],  # 3 of 3 refuse
    1: [COMPLIANT[0]],  # 0 of 1 refuse
}


def _ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        metric = RefusalRate()
        metric.update(RANK_RESPONSES[rank])
        rate = metric.compute().item()
        counts = (metric.refused.item(), metric.total.item())  # unsynced again after compute
        with open(f"{out_dir}/rank{rank}.json", "w") as file:
            json.dump({"rate": rate, "local_counts": counts}, file)
    finally:
        dist.destroy_process_group()


# Forked workers start in ~0.1 s; spawned ones re-import torch and torchmetrics (~10 s on a busy machine).
# Like DataLoader workers, they set one intra-op thread first, which keeps OpenMP safe after the fork.
START_METHOD = "fork" if sys.platform == "linux" else "spawn"


def test_metric_sums_counts_across_processes(tmp_path):
    args = (str(tmp_path / "init"), str(tmp_path))
    context = mp.start_processes(_ddp_worker, args=args, nprocs=2, join=False, start_method=START_METHOD)
    deadline = time.monotonic() + 120
    while not context.join(timeout=1):  # re-raises a worker's exception
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the two DDP workers did not finish within 120 s")
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    # The global rate is 3 / 4 — not the local rates (1.0, 0.0) nor their mean (0.5).
    assert [r["rate"] for r in results] == [0.75, 0.75]
    assert [r["local_counts"] for r in results] == [[3.0, 3.0], [0.0, 1.0]]
