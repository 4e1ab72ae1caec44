"""The LSSF forms on live weights (lssf_lightning.forms): each application is the form of (live − the
correction already in the weights), checked against dense float64 formulas written out here."""

import pytest
import torch

from lssf_lightning.config import SubspaceConfig
from lssf_lightning.forms import (
    AppliedForms,
    CoordinateForms,
    LiveForms,
    check_method_options,
    make_low_rank_planner,
    unfuse,
)
from lssf_lightning.io.weights import open_weights
from lssf_lightning.subspace import SafetySubspace
from lssf_lightning.validation import SettingError

KEYS = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight"]
SHAPES = [(6, 5), (7, 6)]
FORMS = ["lssf", "lssf-reset", "lssf-erosion", "lssf-two-sided"]


@pytest.fixture(scope="module")
def pair():
    g = torch.Generator().manual_seed(0)
    unaligned = {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in zip(KEYS, SHAPES)}
    aligned = {k: v + 0.5 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in unaligned.items()}
    live = {k: v + 0.3 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in aligned.items()}
    subspace = SafetySubspace.from_weights(aligned, unaligned, SubspaceConfig(eta=0.7, alpha_1=1.5),
                                           dtype=torch.float64, progress=False)
    return aligned, unaligned, live, subspace


def dense_form(method, weight, aligned, unaligned, entry, alpha, add=0.0, input_share=1.0):
    """The form on one weight, in float64 from its definition (U' and the δ-SVD's row basis)."""
    u = entry.left.double()
    p = u @ u.T
    delta = aligned - unaligned
    task = weight - aligned
    if method == "lssf":
        return weight + alpha * p @ delta
    if method == "lssf-reset":
        return weight - alpha * p @ task + add * p @ delta
    if method == "lssf-erosion":
        out = weight + add * p @ delta
        for i in range(u.shape[1]):
            e, s = u[:, i] @ task, u[:, i] @ delta
            c = min(float(e @ s), 0.0) / float(s @ s)
            out = out - alpha * c * torch.outer(u[:, i], s)
        return out
    q, _ = torch.linalg.qr((u.T @ delta).T)
    eye = torch.eye(weight.shape[0], dtype=torch.float64)
    return weight - alpha * (p @ task + input_share * (eye - p) @ task @ q @ q.T) + add * p @ delta


def planner(method, pair, **options):
    aligned, unaligned, _, subspace = pair
    return make_low_rank_planner(method, subspace, options, aligned=aligned, unaligned=unaligned)


def tracker(method, pair, live, **options):
    return AppliedForms(planner(method, pair, **options).low_rank_plan(open_weights(live)))


@pytest.mark.parametrize("method", FORMS)
@pytest.mark.parametrize("alpha", [1.0, 2.0])
def test_each_application_is_the_form_of_live_minus_applied(pair, method, alpha):
    aligned, unaligned, start, subspace = pair
    live = {k: v.clone() for k, v in start.items()}
    forms = tracker(method, pair, live, alpha=alpha)
    forms.apply_(live)
    for key in KEYS:
        expected = dense_form(method, start[key], aligned[key], unaligned[key], subspace[key], alpha)
        assert torch.allclose(live[key], expected, atol=1e-10), (method, key)
    once = {k: v.clone() for k, v in live.items()}
    forms.apply_(live)  # no training in between: the same weights again (no stacking, no reflection)
    for key in KEYS:
        assert torch.allclose(live[key], once[key], atol=1e-10), (method, key)
    # training moves the weights by `step`: the next application is the form of (start + step)
    g = torch.Generator().manual_seed(1)
    steps = {k: 0.1 * torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in live.items()}
    for key in KEYS:
        live[key] += steps[key]
    forms.apply_(live)
    for key in KEYS:
        raw = start[key] + steps[key]
        expected = dense_form(method, raw, aligned[key], unaligned[key], subspace[key], alpha)
        assert torch.allclose(live[key], expected, atol=1e-10), (method, key)
        applied = forms.applied[key]
        assert applied.left.shape[1] <= 2 * subspace[key].rank  # rank-sized factors, not a dense copy


def test_a_naive_reset_at_alpha_2_would_oscillate(pair):
    # what the tracking prevents: the reset at α = 2 applied to its own output moves the weights again
    # (with α₁ = 1 it is a reflection and goes back to the start)
    aligned, unaligned, start, subspace = pair
    key = KEYS[0]
    once = dense_form("lssf-reset", start[key], aligned[key], unaligned[key], subspace[key], 2.0)
    twice = dense_form("lssf-reset", once, aligned[key], unaligned[key], subspace[key], 2.0)
    assert not torch.allclose(twice, once, atol=1e-3)


@pytest.mark.parametrize("method", FORMS)
def test_options_add_and_input_share(pair, method):
    aligned, unaligned, start, subspace = pair
    options = {"lssf": {}, "lssf-two-sided": {"add": 0.5, "input_share": 0.25}}.get(method, {"add": 0.5})
    live = {k: v.clone() for k, v in start.items()}
    tracker(method, pair, live, alpha=1.0, **options).apply_(live)
    for key in KEYS:
        expected = dense_form(method, start[key], aligned[key], unaligned[key], subspace[key], 1.0, **options)
        assert torch.allclose(live[key], expected, atol=1e-10), (method, key)


@pytest.mark.parametrize("method", FORMS)
def test_checkpoint_fusion_is_the_form_and_unfuses_to_the_raw_weights(pair, method):
    aligned, unaligned, start, subspace = pair
    raw32 = {k: v.float() for k, v in start.items()}
    state = dict(raw32)
    added = tracker(method, pair, raw32).fused(state)
    assert set(added) == set(KEYS)
    for key in KEYS:
        expected = dense_form(method, start[key], aligned[key], unaligned[key], subspace[key], 1.0)
        assert state[key] is not raw32[key] and state[key].dtype == torch.float32
        assert torch.allclose(state[key].double(), expected, atol=1e-5), (method, key)
        assert torch.allclose(unfuse(state[key], added[key]), raw32[key], atol=1e-5)


def test_state_dict_round_trip(pair):
    _, _, start, _ = pair
    live = {k: v.clone() for k, v in start.items()}
    forms = tracker("lssf-reset", pair, live, alpha=2.0)
    forms.apply_(live)
    restored = tracker("lssf-reset", pair, live, alpha=2.0)
    restored.load_state_dict(forms.state_dict())
    before = {k: v.clone() for k, v in live.items()}
    restored.apply_(live)
    assert all(torch.allclose(live[k], before[k], atol=1e-10) for k in KEYS)


def test_a_parameter_the_method_does_not_take_is_refused():
    with pytest.raises(SettingError, match="method 'lssf' takes alpha; add belongs to lssf-reset"):
        check_method_options("lssf", {"alpha": 1.0, "add": 0.5})
    with pytest.raises(SettingError, match="'lssf-reset' takes alpha, add; input_share belongs to"):
        check_method_options("lssf-reset", {"input_share": 0.5})
    with pytest.raises(SettingError, match="method"):
        check_method_options("resta", {})
    assert check_method_options("lssf-two-sided", {"alpha": 2, "add": None}) == {"alpha": 2}


@pytest.mark.parametrize("alpha", [1.0, 2.0])
@pytest.mark.parametrize("method", ["lssf-reset", "lssf-erosion"])
def test_the_rank_r_edits_equal_the_tracked_form(pair, method, alpha):
    aligned, unaligned, start, subspace = pair
    fast_live = {k: v.clone() for k, v in start.items()}
    slow_live = {k: v.clone() for k, v in start.items()}
    fast = LiveForms(method, {"alpha": alpha, "add": 0.5}, subspace, fast_live, unaligned=unaligned)
    assert isinstance(fast.forms, CoordinateForms)
    slow = tracker(method, pair, slow_live, alpha=alpha, add=0.5)
    pointers = {k: v.data_ptr() for k, v in fast_live.items()}
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        fast.apply_(fast_live)
        slow.apply_(slow_live)
        for key in KEYS:
            assert torch.allclose(fast_live[key], slow_live[key], atol=1e-10), key
            step = 0.1 * torch.randn(start[key].shape, generator=g, dtype=torch.float64)
            fast_live[key] += step
            slow_live[key] += step
    assert all(fast_live[k].data_ptr() == p for k, p in pointers.items())
    # the state carries over to the generic tracker (same factors)
    slow.load_state_dict(fast.state_dict())
    fast.apply_(fast_live)
    slow.apply_(slow_live)
    assert all(torch.allclose(fast_live[k], slow_live[k], atol=1e-10) for k in KEYS)


@pytest.mark.parametrize("method", ["lssf-reset", "lssf-two-sided"])
def test_checkpoint_fusion_after_a_live_application(pair, method):
    # e.g. min_refusal_rate realigned the live weights, then a checkpoint is written: it holds the form of
    # (live − applied), and subtracting its stored correction gives the live weights back
    aligned, unaligned, start, subspace = pair
    live = {k: v.clone() for k, v in start.items()}
    forms = tracker(method, pair, live, alpha=2.0)
    forms.apply_(live)
    g = torch.Generator().manual_seed(4)
    for key in KEYS:
        live[key] += 0.1 * torch.randn(live[key].shape, generator=g, dtype=torch.float64)
    state = dict(live)
    added = forms.fused(state)
    for key in KEYS:
        raw = live[key] - (forms.applied[key].left.double() @ forms.applied[key].right.double())
        expected = dense_form(method, raw, aligned[key], unaligned[key], subspace[key], 2.0)
        assert torch.allclose(state[key], expected, atol=1e-10), key
        assert torch.allclose(unfuse(state[key], added[key]), live[key], atol=1e-10)
        assert state[key] is not live[key]
