"""The fusion variants against their dense formulas (float64), and as planners on real tiny models."""

from __future__ import annotations

import pytest
import torch
from conftest import load_dir

from lssf_lightning.core.basis import basis_weights
from lssf_lightning.core.variants import aligned_coordinates, erosion_factors, reset_factors, variant_factors


def _setup(seed: int = 0, d_out: int = 12, d_in: int = 9, r: int = 4, alpha_1: float = 1.5):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    unaligned = randn(d_out, d_in)
    delta = randn(d_out, 3) @ randn(3, d_in) + 0.1 * randn(d_out, d_in)
    aligned = unaligned + delta
    weight = aligned + 0.3 * randn(d_out, d_in)  # fine-tuned = aligned + a task update
    u, s, _ = torch.linalg.svd(delta)
    weighted = u[:, :r] * basis_weights(s[:r], alpha_1)  # U' (Eq. 11)
    return weighted, weighted.T @ delta, weight, unaligned, aligned, delta


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_aligned_coordinates():
    left, right, _, unaligned, aligned, _ = _setup()
    assert _rel(aligned_coordinates(left, right, unaligned), left.T @ aligned) < 1e-12


@pytest.mark.parametrize("alpha, add", [(1.0, 0.0), (0.5, 0.0), (2.0, 0.0), (1.0, 0.5), (0.0, 1.0)])
def test_reset_matches_its_dense_formula(alpha, add):
    left, right, weight, unaligned, aligned, delta = _setup(seed=1)
    projector = left @ left.T  # P' = U'U'ᵀ
    dense = weight - alpha * projector @ (weight - aligned) + add * projector @ delta
    factor_left, factor_right = reset_factors(left, right, weight, unaligned, alpha, add)
    assert factor_left.dtype == torch.float64 and factor_right.shape == right.shape
    assert _rel(weight + factor_left @ factor_right, dense) < 1e-6


def test_plain_reset_puts_the_subspace_back_to_the_aligned_state():
    left, right, weight, unaligned, aligned, _ = _setup(seed=2, alpha_1=1.0)  # U' orthonormal: P' a projector
    factor_left, factor_right = reset_factors(left, right, weight, unaligned)
    fused = weight + factor_left @ factor_right
    assert _rel(left.T @ fused, left.T @ aligned) < 1e-10
    outside = torch.eye(left.shape[0], dtype=torch.float64) - left @ left.T
    assert _rel(outside @ fused, outside @ weight) < 1e-10  # the rest of the task update is kept


@pytest.mark.parametrize("alpha, add", [(1.0, 0.0), (2.0, 0.0), (1.0, 0.5)])
def test_erosion_matches_its_dense_formula(alpha, add):
    left, right, weight, unaligned, aligned, delta = _setup(seed=3)
    task = weight - aligned
    dense = weight + add * left @ left.T @ delta
    for i in range(left.shape[1]):
        u = left[:, i : i + 1]
        e, s = u.T @ task, u.T @ delta  # rows (1, d_in)
        c = min(float((e * s).sum()), 0.0) / float((s * s).sum())
        dense = dense - alpha * c * u @ s
    factor_left, factor_right = erosion_factors(left, right, weight, unaligned, alpha, add)
    assert _rel(weight + factor_left @ factor_right, dense) < 1e-6


def test_erosion_leaves_a_task_update_that_does_not_oppose_safety():
    left, right, _, unaligned, aligned, delta = _setup(seed=4, alpha_1=1.0)
    weight = aligned + 0.2 * delta  # the task update points along δ: nothing to undo
    factor_left, factor_right = erosion_factors(left, right, weight, unaligned)
    assert float((factor_left @ factor_right).abs().max()) < 1e-12
    weight = aligned - 0.2 * delta  # straight against δ: undone inside the subspace
    factor_left, factor_right = erosion_factors(left, right, weight, unaligned)
    fused = weight + factor_left @ factor_right
    assert _rel(left.T @ fused, left.T @ aligned) < 1e-10


def test_additive_is_the_papers_form_and_forms_are_checked():
    left, right, weight, unaligned, _, delta = _setup(seed=5)
    factor_left, factor_right = variant_factors("additive", left, right, weight, None, 0.7)
    assert _rel(factor_left @ factor_right, 0.7 * left @ left.T @ delta) < 1e-12
    with pytest.raises(ValueError, match="needs the unaligned weight"):
        variant_factors("reset", left, right, weight, None, 1.0)
    with pytest.raises(ValueError, match="fusion form must be one of"):
        variant_factors("double", left, right, weight, unaligned, 1.0)
    with pytest.raises(ValueError, match="does not match"):
        reset_factors(left, right, weight[:, :-1], unaligned)


def test_zero_safety_rows_give_no_erosion_correction():
    left, right, weight, unaligned, _, _ = _setup(seed=6)
    right = right.clone()
    right[1] = 0.0
    _, factor_right = erosion_factors(left, right, weight, unaligned)
    assert torch.isfinite(factor_right).all() and float(factor_right[1].abs().max()) == 0.0


# -- as planners on real tiny checkpoints --------------------------------------------------------------------


def _dense_reset(trio, key, alpha, add, subspace):
    """The reset form of one weight from the three checkpoints' tensors and the entry's U' (float64)."""
    state = {name: model.state_dict() for name, model in trio.models.items()}
    entry = subspace[key]
    left = entry.left.double()
    if entry.conv1d:
        weight, aligned, base = (state[n][key].double().T for n in ("finetuned", "aligned", "base"))
    else:
        weight, aligned, base = (state[n][key].double() for n in ("finetuned", "aligned", "base"))
    projector = left @ left.T
    fused = weight - alpha * projector @ (weight - aligned) + add * projector @ (aligned - base)
    return fused.T if entry.conv1d else fused


@pytest.mark.parametrize("trio_name", ["llama_trio", "gpt2_trio"])
def test_reset_planner_on_tiny_models(request, trio_name):
    from lssf_lightning.methods.base import apply_edits
    from lssf_lightning.methods.variants import LSSFReset
    from lssf_lightning.subspace import SafetySubspace

    trio = request.getfixturevalue(trio_name)
    subspace = SafetySubspace.from_weights(str(trio.aligned), str(trio.base), progress=False)
    planner = LSSFReset(subspace, str(trio.base), alpha=1.0, add=0.25)
    fused = apply_edits(trio.models["finetuned"], planner).state_dict()
    raw = trio.models["finetuned"].state_dict()
    for key in list(subspace.entries):
        expected = _dense_reset(trio, key, 1.0, 0.25, subspace)
        assert _rel(fused[key].double(), expected) < 1e-6, key
    untouched = [k for k in raw if k not in list(subspace.entries)]
    assert untouched and all(torch.equal(fused[k], raw[k]) for k in untouched)
    assert planner.summary()["form"] == "reset"


def test_variant_planners_built_lazily_match_a_built_subspace(llama_trio):
    from lssf_lightning.methods.base import apply_edits
    from lssf_lightning.methods.variants import LSSFErosion
    from lssf_lightning.subspace import SafetySubspace

    subspace = SafetySubspace.from_weights(str(llama_trio.aligned), str(llama_trio.base), progress=False)
    eager = apply_edits(llama_trio.models["finetuned"], LSSFErosion(subspace, str(llama_trio.base), 1.0))
    planner = LSSFErosion.from_pair(str(llama_trio.aligned), str(llama_trio.base), None, 1.0, progress=False)
    lazy = apply_edits(llama_trio.models["finetuned"], planner)
    for key in list(subspace.entries):
        assert torch.equal(eager.state_dict()[key], lazy.state_dict()[key]), key
    changed = sum(not torch.equal(eager.state_dict()[k], llama_trio.models["finetuned"].state_dict()[k])
                  for k in list(subspace.entries))
    assert changed > 0


def test_variant_planner_needs_the_unaligned_weights(llama_trio):
    from lssf_lightning.methods.variants import LSSFReset
    from lssf_lightning.subspace import SafetySubspace

    subspace = SafetySubspace.from_weights(str(llama_trio.aligned), str(llama_trio.base), progress=False)
    with pytest.raises(ValueError, match="needs the unaligned weights"):
        LSSFReset(subspace)


def test_reset_through_realign_matches_the_dense_formula(llama_trio, tmp_path):
    from lssf_lightning.realign import realign_checkpoint
    from lssf_lightning.subspace import SafetySubspace

    report = realign_checkpoint(str(llama_trio.finetuned), tmp_path / "out", aligned=str(llama_trio.aligned),
                                unaligned=str(llama_trio.base), method="lssf-reset", alpha=1.0,
                                add=0.25, progress=False)
    written = load_dir(tmp_path / "out")
    subspace = SafetySubspace.from_weights(str(llama_trio.aligned), str(llama_trio.base), progress=False)
    for key in subspace.entries:
        assert _rel(written[key].double(), _dense_reset(llama_trio, key, 1.0, 0.25, subspace)) < 1e-6, key
    assert report.edited == len(subspace)


def test_erosion_from_the_command_line(llama_trio, tmp_path):
    from lssf_lightning.cli import main
    from lssf_lightning.methods.base import apply_edits
    from lssf_lightning.methods.variants import LSSFErosion
    from lssf_lightning.subspace import SafetySubspace

    code = main(["realign", "--finetuned", str(llama_trio.finetuned), "--aligned", str(llama_trio.aligned),
                 "--unaligned", str(llama_trio.base), "--output", str(tmp_path / "out"),
                 "--method", "lssf-erosion", "--alpha", "2", "--add", "0.5"])
    assert code == 0
    written = load_dir(tmp_path / "out")
    subspace = SafetySubspace.from_weights(str(llama_trio.aligned), str(llama_trio.base), progress=False)
    planner = LSSFErosion(subspace, str(llama_trio.base), 2.0, 0.5)
    expected = apply_edits(llama_trio.models["finetuned"], planner)
    for key in subspace.entries:
        assert torch.equal(written[key], expected.state_dict()[key]), key


@pytest.mark.parametrize("alpha, share, add", [(1.0, 1.0, 0.0), (1.0, 0.5, 0.0), (0.5, 1.0, 0.25)])
def test_two_sided_reset_matches_its_dense_formula(alpha, share, add):
    from lssf_lightning.core.variants import two_sided_reset_factors

    left, right, weight, _, aligned, delta = _setup(seed=7, alpha_1=1.0)
    _, _, vh = torch.linalg.svd(delta)
    q = vh[: left.shape[1]].T  # for the data-free subspace the row space of U'ᵀδ is V_r
    projector, reads = left @ left.T, q @ q.T
    task = weight - aligned
    identity = torch.eye(left.shape[0], dtype=torch.float64)
    removed = projector @ task + share * (identity - projector) @ task @ reads
    dense = weight - alpha * removed + add * projector @ delta
    factor_left, factor_right = two_sided_reset_factors(left, right, weight, aligned, alpha, share, add)
    assert factor_left.shape[1] == 2 * left.shape[1]
    assert _rel(weight + factor_left @ factor_right, dense) < 1e-6
    full = weight + factor_left @ factor_right
    if (alpha, share, add) == (1.0, 1.0, 0.0):  # both sides of the subspace back to the aligned state
        assert _rel(left.T @ full, left.T @ aligned) < 1e-10 and _rel(full @ q, aligned @ q) < 1e-10


def test_two_sided_planner_through_realign(llama_trio, tmp_path):
    from lssf_lightning.core.variants import input_basis
    from lssf_lightning.realign import realign_checkpoint
    from lssf_lightning.subspace import SafetySubspace

    realign_checkpoint(str(llama_trio.finetuned), tmp_path / "out", aligned=str(llama_trio.aligned),
                       unaligned=str(llama_trio.base), method="lssf-two-sided", alpha=1.0,
                       input_share=0.5, progress=False)
    written = load_dir(tmp_path / "out")
    subspace = SafetySubspace.from_weights(str(llama_trio.aligned), str(llama_trio.base), progress=False)
    state = {name: model.state_dict() for name, model in llama_trio.models.items()}
    for key, entry in subspace.entries.items():
        weight, aligned = state["finetuned"][key].double(), state["aligned"][key].double()
        left = entry.left.double()
        q = input_basis(entry.right.double())
        task = weight - aligned
        outside = torch.eye(left.shape[0], dtype=torch.float64) - left @ left.T
        expected = weight - (left @ left.T @ task + 0.5 * outside @ task @ q @ q.T)
        assert _rel(written[key].double(), expected) < 1e-6, key
