"""The safety spectrum of one matrix: its safety-critical rank, entropy and top-``r`` left singular vectors.

``safety_spectrum(M, η)`` returns what LSSF needs from the SVD of a safety signal ``M`` (``δ`` or ``δ·X̂``):
the rank ``r = min{ρ : H(ρ) ≥ η·H(n)}`` of :mod:`lssf_lightning.core.entropy`, the entropy ``H(n)``, and the
top-``r`` left singular vectors and values. The entropy needs the *whole* spectrum, but not a full SVD.

Paths
-----
``"exact"``
    ``torch.linalg.svd(M, full_matrices=False)``: the reference.
``"gram"``
    Eigenvalues of the Gram matrix of the smaller side (``MMᵀ`` or ``MᵀM``, ``n × n``): every ``σ_i² = λ_i``.
    Large matrices: the Gram matrix in float32 (only its lower block triangle is multiplied, ~45 % fewer
    flops), its eigenvalues by ``eigvalsh`` in float64; float32 ``eigvalsh`` would be ~30× noisier
    (absolute error ``3.6·10⁻⁷·λ_1`` against ``1.3·10⁻⁸·λ_1``, i.e. ``σ`` resolved down to ``6·10⁻⁴`` against
    ``1·10⁻⁴·σ_1``). Eigenvalues under ``4ε₃₂·λ_1`` are treated as an unseen tail (below); if that leaves the
    rank undecided (spectra with much entropy down there: numerically rank-deficient ones, or a threshold
    that falls within ~10⁻⁵ of a partial entropy), the Gram matrix and its eigenvalues are recomputed in
    float64. The top-``r`` eigenvectors come from subspace iteration on the float32 Gram matrix with a
    Rayleigh–Ritz step — block width and iteration count chosen from the known eigenvalues so that the
    predicted mean ``sin²`` to the exact basis is ``≤ 0.002`` — or from ``eigh`` when that is predicted
    cheaper (``r ≳ n/4``); a tall ``M`` gets ``U = MVΣ⁻¹``, re-orthonormalised by Cholesky-QR.
    Small matrices (``n²·N ≤ 2²⁹``, e.g. SmolLM2's 576×1536): Gram matrix and ``eigh`` in float64.
``"randomized"``
    Randomised subspace iteration (Halko, Martinsson & Tropp 2011; ``k = ℓ + max(8, ℓ/4)`` columns, 2 power
    iterations) for the top ``ℓ`` values, and a certificate: with ``T = ‖M‖²_F`` exact, the ``m = n − ℓ``
    unseen values carry ``t = T − Σ_{i≤ℓ} σ_i²`` and each is ``≤ σ_ℓ²``, so their entropy lies between the
    *packed* value (as many ``σ_ℓ²`` as fit plus a remainder: the minimum of a concave function over that
    polytope) and the *uniform* ``−t ln(t/m)`` (:func:`tail_entropy_bounds`). ``H(n)`` between those bounds
    moves the threshold ``η·H(n)`` monotonically; if the ranks at both ends agree, that is the rank
    (:func:`certify_rank`). Otherwise ``ℓ`` doubles (warm-started). The top-``r`` Ritz vectors are accepted
    when Wedin's bound, ``‖MV − UΣ̃‖²_F / (r·(σ̃_r − σ̃_{r+1})²)``, is ``≤ 0.002``; else up to two more rounds
    of power iterations. The certificate takes the Ritz values as exact (they converge fast for the spectra
    it can certify: a tail holding ≲1 % of ``‖M‖²_F``).
``"auto"`` (default)
    Small matrices: the float64 Gram path. Otherwise randomised attempts from ``ℓ = max(32, max_rank)`` while
    their estimated cost stays under 25 % of the Gram path's and less than half of ``‖M‖²_F`` lies beyond
    the computed values, then the Gram path. The randomised path wins on low-rank (LoRA-like) or
    low-rank-plus-small-noise signals and with a small ``max_rank`` (a rank proven ``≥ max_rank`` needs only
    the top ``max_rank`` values); a heavy-tailed ``δ`` from full fine-tuning goes to the Gram path after one
    attempt (≈ 10–15 % of the time).

Numerical floor
---------------
A float32 matrix of true rank 1 has ``n − 1`` singular values of ``~4ε₃₂·σ_1`` from rounding; their entropy
(``~n·ε²``) then *is* ``H(n)``, and the entropy rank becomes ``~η·n`` instead of 1. Every path counts
``σ_i ≤ 64ε₃₂·σ_1 ≈ 7.6·10⁻⁶·σ_1`` as zero. Each value under it holds ``p ≤ 5.8·10⁻¹¹`` and so at most
``1.4·10⁻⁹`` nats: harmless for any real spectrum, while exactly low-rank float32 matrices get their rank.
(``torch.linalg.matrix_rank``'s ``max(d)·ε·σ_1`` is too coarse here: on a Llama-3-8B-shaped
heavy-tailed ``δ`` it cuts values carrying ``~3·10⁻⁵`` nats, enough to move ranks by one at η = 0.9.)

Measurements
------------
Speed and accuracy against ``torch.linalg.svd`` are measured by ``benchmarks/bench_subspace.py``; the
figures (per matrix shape, where the time goes, accuracy on 408 test spectra) are in ``benchmarks/README.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lssf_lightning.config import SVD_METHODS, SVDMethod
from lssf_lightning.core.entropy import check_eta, safety_critical_rank
from lssf_lightning.validation import check_choice, check_int

__all__ = [
    "METHODS",
    "RankCertificate",
    "SafetySpectrum",
    "certify_rank",
    "safety_spectrum",
    "subspace_agreement",
    "tail_entropy_bounds",
]

Method = SVDMethod  # the one list of SVD methods lives with the settings (lssf_lightning.config)
METHODS: tuple[str, ...] = SVD_METHODS

_EPS32 = torch.finfo(torch.float32).eps
_FLOOR = 64 * _EPS32  # singular values below this fraction of σ_1 count as zero (float32 rounding noise)
_GRAM_NOISE = 0.5 * _EPS32  # error bound of the float64 eigenvalues of a float32 Gram matrix, × λ_1
_GRAM_BLIND = 4 * _EPS32  # those eigenvalues below this fraction of λ_1 are treated as an unseen tail
_SMALL_GRAM_FLOPS = 2**29  # n²·N up to this (e.g. 576×1536): float64 Gram + eigh, no randomised attempt
_POWER_ITERATIONS = 2  # randomised path, on M
_FIRST_KNOWN = 32  # values the first randomised attempt certifies with
_RANDOMIZED_BUDGET = 0.25  # share of the Gram path's estimated cost the randomised attempts may spend (auto)
_HOPELESS_TAIL = 0.5  # auto stops doubling when this share of ‖M‖²_F lies beyond all computed values
_EIGH_FLOPS_PER_N3 = 8.0  # measured: float32 eigvalsh + a small basis ≈ 4 n×n×n matmuls
_EIGH_VECTORS_FLOPS_PER_N3 = 10.0  # measured: float32 eigh with vectors ≈ 5 n×n×n matmuls
_MAX_GRAM_ITERATIONS = 8
_GRAM_BLOCKS = 8  # the Gram matrix is built from up to 8×8 blocks, only the lower triangle computed
_GRAM_BLOCK_ROWS = 256
_BASIS_TOLERANCE = 0.002  # predicted mean sin² of the principal angles to the exact basis
_REFINEMENTS = 2  # extra rounds of power iterations when the randomised basis is not yet accurate


@dataclass(frozen=True)
class SafetySpectrum:
    """The safety-critical part of one matrix's spectrum.

    Attributes:
        basis: ``(d_out, r)`` top-``r`` left singular vectors, float32, orthonormal columns.
        singular_values: ``(r,)`` float32, descending.
        rank: the safety-critical rank ``r`` (after the ``max_rank`` cap).
        entropy: ``H(n)`` of the whole spectrum (exact, or the midpoint of certified bounds).
        total_energy: ``‖M‖²_F``.
        kept_energy: ``Σ_{i≤r} σ_i²``.
        n: ``min(M.shape)``.
        method: the path that produced it: ``"exact"``, ``"gram"`` or ``"randomized"``.
    """

    basis: Tensor
    singular_values: Tensor
    rank: int
    entropy: float
    total_energy: float
    kept_energy: float
    n: int
    method: str


@dataclass(frozen=True)
class RankCertificate:
    """What the top of a spectrum proves about its safety-critical rank.

    Attributes:
        rank: the rank (after ``max_rank``) when the bounds decide it, else ``None``.
        min_rank: a proven lower bound on the uncapped rank (``ℓ + 1`` when it lies beyond the known values).
        entropy_low: lower bound on ``H(n)``.
        entropy_high: upper bound on ``H(n)``.
    """

    rank: int | None
    min_rank: int
    entropy_low: float
    entropy_high: float

    @property
    def entropy(self) -> float:
        return 0.5 * (self.entropy_low + self.entropy_high)


def _xlogx(x: float) -> float:
    return x * math.log(x) if x > 0 else 0.0


def tail_entropy_bounds(
    tail_mass: float, count: int, cap: float, floor: float = 0.0, mass_error: float = 0.0
) -> tuple[float, float]:
    """Bounds on ``−Σ p_j ln p_j`` over ``count`` unseen probabilities ``p_j ≤ cap`` summing to ``tail_mass``.

    The entropy is concave, so its minimum over that polytope is at a vertex — ``⌊t/cap⌋`` values at
    ``cap`` and one remainder ("packed") — and its maximum at the centre, ``−t ln(t/count)`` ("uniform").

    Args:
        tail_mass: ``t``, the probability mass of the tail.
        count: ``m``, the number of tail values.
        cap: the largest any tail value can be.
        floor: tail values ``≤ floor`` count as zero (the numerical floor), so up to ``count·floor`` of ``t``
            may carry no entropy. A tail entirely under the floor (``cap ≤ floor``) has entropy ``0``.
        mass_error: ``t`` is only known to ``± mass_error``.

    Returns:
        ``(low, high)`` in nats, valid for every mass in ``[t − count·floor − mass_error, t + mass_error]``
        (clamped to ``[0, count·cap]``).
    """
    if count <= 0 or cap <= floor:
        return 0.0, 0.0
    high_mass = min(max(tail_mass + max(mass_error, 0.0), 0.0), count * cap)
    low_mass = min(max(tail_mass - max(mass_error, 0.0) - count * max(floor, 0.0), 0.0), high_mass)
    return _min_packed(low_mass, high_mass, cap), _max_uniform(low_mass, high_mass, count)


def _min_packed(low_mass: float, high_mass: float, cap: float) -> float:
    # The packed entropy is concave between the break points t = j·cap (where it is j·h(cap)), so over
    # [low, high] its minimum is at an end or at the first break point inside.
    candidates = [_packed(low_mass, cap), _packed(high_mass, cap)]
    first_break = math.ceil(low_mass / cap)
    if first_break * cap <= high_mass:
        candidates.append(-first_break * _xlogx(cap))
    return min(candidates)


def _packed(mass: float, cap: float) -> float:
    full = math.floor(mass / cap * (1 + 1e-12))
    remainder = max(mass - full * cap, 0.0)
    return -(full * _xlogx(cap) + _xlogx(remainder))


def _max_uniform(low_mass: float, high_mass: float, count: int) -> float:
    # −t ln(t/m) is concave in t with its maximum m/e at t = m/e.
    peak = count / math.e
    if low_mass <= peak <= high_mass:
        mass = peak
    else:
        mass = high_mass if high_mass < peak else low_mass
    return -_xlogx(mass / count) * count if mass > 0 else 0.0


def certify_rank(
    top_values: Tensor,
    total_energy: float,
    n: int,
    eta: float,
    *,
    max_rank: int | None = None,
    tail_cap: float | None = None,
    floor: float = 0.0,
    tail_energy: float | None = None,
    tail_energy_error: float = 0.0,
) -> RankCertificate:
    """Decide the safety-critical rank from the top ``ℓ`` singular values and ``‖M‖²_F`` alone.

    The unseen ``n − ℓ`` values each lie below ``tail_cap`` and share the rest of ``total_energy``, which
    bounds ``H(n)`` (:func:`tail_entropy_bounds`). ``ρ_low``/``ρ_high`` = the first ``ρ ≤ ℓ`` with
    ``H(ρ) ≥ η·H_low`` / ``η·H_high``; the true rank lies in ``[ρ_low, ρ_high]``, so it is decided when they
    agree.
    With ``max_rank``, ``max_rank`` is decided as soon as the rank is proven ``≥ max_rank``.

    Args:
        top_values: the ``ℓ`` largest singular values, descending.
        total_energy: ``‖M‖²_F = Σ_i σ_i²`` over all ``n`` values.
        n: the number of singular values, ``min(M.shape)``.
        eta: the entropy share, in ``(0, 1]``.
        max_rank: optional cap on the rank.
        tail_cap: the largest an unseen value can be (default: the smallest known one).
        floor: singular values at or below this count as zero.
        tail_energy: ``Σ`` of the unseen ``σ_i²`` (default: ``total_energy − Σ`` of the known ones).
        tail_energy_error: ``tail_energy`` is only known to within this.

    Returns:
        The :class:`RankCertificate`.
    """
    eta = check_eta(eta)
    known = top_values.detach().to("cpu", torch.float64).reshape(-1)
    ell = known.numel()
    if ell > n:
        raise ValueError(f"got {ell} top values for a spectrum of only n={n} values")
    if total_energy <= 0 or (ell > 0 and known[0] <= floor):  # every value is (numerically) zero
        return RankCertificate(0, 0, 0.0, 0.0)
    if ell == 0:
        return RankCertificate(None, 1, 0.0, math.inf)
    energy = torch.where(known > floor, known.square(), torch.zeros_like(known))
    total_energy = max(total_energy, float(energy.sum()))  # rounding in the known values
    p = energy / total_energy
    partial = torch.cumsum(-p * torch.log(p.clamp_min(1e-300)), 0)
    cap = min(float(known[-1]), math.inf if tail_cap is None else tail_cap)
    tail = 1.0 - float(p.sum()) if tail_energy is None else tail_energy / total_energy
    tail_low, tail_high = tail_entropy_bounds(
        tail, n - ell, cap**2 / total_energy, floor**2 / total_energy, tail_energy_error / total_energy
    )
    low = float(partial[-1]) + tail_low
    high = float(partial[-1]) + tail_high
    rank_low = _first_reaching(partial, eta * low)
    rank_high = _first_reaching(partial, eta * high)
    min_rank = rank_low if rank_low is not None else ell + 1
    if max_rank is not None and min_rank >= max_rank:
        return RankCertificate(max_rank if max_rank <= ell else None, min_rank, low, high)
    if rank_low is not None and rank_low == rank_high:
        return RankCertificate(rank_low if max_rank is None else min(rank_low, max_rank), min_rank, low, high)
    return RankCertificate(None, min_rank, low, high)


def _first_reaching(partial: Tensor, threshold: float) -> int | None:
    # A hair below the threshold so that H(ρ) = η·H(n) exactly (η = 1, a flat spectrum) counts as reached.
    reached = torch.nonzero(partial >= threshold * (1 - 1e-12) - 1e-300)
    return int(reached[0]) + 1 if reached.numel() else None


def subspace_agreement(basis_a: Tensor, basis_b: Tensor) -> float:
    """Mean ``cos²`` of the principal angles between the column spans of two orthonormal bases.

    ``‖AᵀB‖²_F / min(r_a, r_b)``: ``1`` when one span contains the other, ``0`` when they are orthogonal.
    Two empty bases agree (``1``); an empty and a non-empty one do not (``0``).
    """
    if basis_a.ndim != 2 or basis_b.ndim != 2 or basis_a.shape[0] != basis_b.shape[0]:
        shapes = f"{tuple(basis_a.shape)} and {tuple(basis_b.shape)}"
        raise ValueError(f"bases of shapes {shapes} are not comparable")
    dims = min(basis_a.shape[1], basis_b.shape[1])
    if dims == 0:
        return 1.0 if basis_a.shape[1] == basis_b.shape[1] else 0.0
    overlap = basis_a.to(torch.float64).T @ basis_b.to(basis_a.device, torch.float64)
    return float(overlap.square().sum()) / dims


def safety_spectrum(
    matrix: Tensor,
    eta: float,
    *,
    method: Method = "auto",
    max_rank: int | None = None,
    seed: int = 0,
) -> SafetySpectrum:
    """The safety-critical rank, entropy, top singular values and left singular vectors of ``matrix``.

    Args:
        matrix: a ``(d_out, d_in)`` safety signal, any float dtype, on any device (computed there, in
            float32 — float64 for a float64 input or where the module docstring says so).
        eta: the entropy share to keep, in ``(0, 1]``.
        method: ``"auto"``, ``"exact"``, ``"randomized"`` or ``"gram"`` (see the module docstring).
        max_rank: optional cap on the rank, applied after the entropy rule.
        seed: seed of the random test matrices (results are deterministic given it).

    Returns:
        A :class:`SafetySpectrum`; rank ``0`` with an empty ``(d_out, 0)`` basis for an all-zero matrix.

    Raises:
        ValueError: for a bad ``eta``, ``method`` or ``max_rank``, a matrix that is not 2-D floating point,
            or one holding NaN/inf.
    """
    eta = check_eta(eta)
    check_choice("method", method, METHODS)
    if max_rank is not None:
        check_int("max_rank", max_rank)
    work = _working_copy(matrix)
    n = min(work.shape)
    total = _frobenius_energy(work)
    if not math.isfinite(total):  # NaN/inf propagate into the norm; finite float32 values cannot overflow it
        raise ValueError("matrix holds NaN or inf")
    if n == 0 or total == 0.0:
        return _empty_spectrum(work, n, "exact" if method == "auto" else method)
    generator = torch.Generator(device=work.device).manual_seed(seed)
    if method == "exact":
        return _exact(work, eta, max_rank, total)
    if method == "gram" or (method == "auto" and _is_small(work.shape)):
        return _gram(work, eta, max_rank, total, generator)
    budget = math.inf if method == "randomized" else _RANDOMIZED_BUDGET * _gram_cost(*work.shape)
    result = _randomized(work, eta, max_rank, total, generator, budget)
    return result if result is not None else _gram(work, eta, max_rank, total, generator)


def _working_copy(matrix: Tensor) -> Tensor:
    if not isinstance(matrix, Tensor) or matrix.ndim != 2:
        shape = tuple(matrix.shape) if isinstance(matrix, Tensor) else type(matrix).__name__
        raise ValueError(f"matrix must be a 2-D tensor, got {shape}")
    if not matrix.is_floating_point():
        raise ValueError(f"matrix must be floating point, got {matrix.dtype}")
    return matrix.detach().to(torch.float64 if matrix.dtype == torch.float64 else torch.float32)


def _frobenius_energy(matrix: Tensor) -> float:
    """``‖M‖²_F`` accumulated in float64 (without a float64 copy of ``M``)."""
    return float(torch.linalg.vector_norm(matrix, dtype=torch.float64)) ** 2


def _floor(sigma_1: float) -> float:
    return _FLOOR * sigma_1


def _empty_spectrum(matrix: Tensor, n: int, method: str) -> SafetySpectrum:
    return SafetySpectrum(
        basis=matrix.new_zeros((matrix.shape[0], 0), dtype=torch.float32),
        singular_values=matrix.new_zeros((0,), dtype=torch.float32),
        rank=0,
        entropy=0.0,
        total_energy=0.0,
        kept_energy=0.0,
        n=n,
        method=method,
    )


def _finish(
    basis: Tensor, values: Tensor, rank: int, entropy: float, total: float, n: int, method: str
) -> SafetySpectrum:
    kept = values[:rank].to(torch.float64)
    return SafetySpectrum(
        basis=basis[:, :rank].to(torch.float32).contiguous(),
        singular_values=kept.to(torch.float32),
        rank=rank,
        entropy=float(entropy),
        total_energy=float(total),
        kept_energy=float(kept.square().sum()),
        n=n,
        method=method,
    )


def _rank_and_entropy(values: Tensor, floor: float, eta: float, max_rank: int | None) -> tuple[int, float]:
    """Rank and ``H(n)`` of a complete spectrum, values at or below ``floor`` counted as zero."""
    floored = torch.where(values > floor, values, torch.zeros_like(values)).to("cpu", torch.float64)
    rank = safety_critical_rank(floored, eta)
    p = floored.square() / floored.square().sum()
    entropy = float(-(p * torch.log(p.clamp_min(1e-300))).sum()) + 0.0  # no "-0.0"
    return (rank if max_rank is None else min(rank, max_rank)), entropy


def _exact(matrix: Tensor, eta: float, max_rank: int | None, total: float) -> SafetySpectrum:
    u, s, _ = torch.linalg.svd(matrix, full_matrices=False)
    rank, entropy = _rank_and_entropy(s, _floor(float(s[0])), eta, max_rank)
    return _finish(u, s, rank, entropy, total, s.numel(), "exact")


# --- Gram path -------------------------------------------------------------------------------------------


def _is_small(shape: tuple[int, int]) -> bool:
    return min(shape) ** 2 * max(shape) <= _SMALL_GRAM_FLOPS


def _gram_cost(d_out: int, d_in: int) -> float:
    """Estimated cost of the Gram path in matmul flops (eigen-solvers run slower per flop: measured)."""
    n, big = min(d_out, d_in), max(d_out, d_in)
    return 2.0 * n * n * big + _EIGH_FLOPS_PER_N3 * n**3


def _gram(
    matrix: Tensor, eta: float, max_rank: int | None, total: float, generator: torch.Generator
) -> SafetySpectrum:
    """Spectrum from the smaller Gram matrix; vectors by subspace iteration on it, or ``eigh``."""
    n = min(matrix.shape)
    if matrix.dtype == torch.float64 or _is_small(matrix.shape):
        gram = _gram_matrix(matrix, torch.float64)
        lam, vectors = torch.linalg.eigh(gram)
        lam, vectors = lam.flip(0), vectors.flip(1)
        sigma = lam.clamp_min(0).sqrt()
        rank, entropy = _rank_and_entropy(sigma, _floor(float(sigma[0])), eta, max_rank)
        return _finish(_left_vectors(matrix, vectors, sigma, rank), sigma, rank, entropy, total, n, "gram")
    gram = _gram_matrix(matrix, torch.float32)
    lam = torch.linalg.eigvalsh(gram.to(torch.float64)).flip(0)  # float32 eigvalsh would be ~30x noisier
    result = _blind_zone_rank(lam, total, n, eta, max_rank)
    if result is None:
        lam = torch.linalg.eigvalsh(_gram_matrix(matrix, torch.float64)).flip(0)
        result = _rank_and_entropy(lam.clamp_min(0).sqrt(), _floor(float(lam[0].sqrt())), eta, max_rank)
    rank, entropy = result
    sigma = lam.clamp_min(0).sqrt()
    vectors = _top_eigenvectors(gram, lam, rank, generator)
    return _finish(_left_vectors(matrix, vectors, sigma, rank), sigma, rank, entropy, total, n, "gram")


def _gram_matrix(matrix: Tensor, dtype: torch.dtype) -> Tensor:
    """``MMᵀ`` or ``MᵀM``, whichever is smaller; only its lower block triangle is multiplied (~45 % less)."""
    m = matrix.to(dtype)
    rows = m if m.shape[0] <= m.shape[1] else m.T
    n = rows.shape[0]
    blocks = max(1, min(_GRAM_BLOCKS, n // _GRAM_BLOCK_ROWS))
    if blocks == 1:
        return rows @ rows.T
    edges = [round(i * n / blocks) for i in range(blocks + 1)]
    gram = rows.new_empty((n, n))
    for i in range(blocks):
        rows_i = rows[edges[i] : edges[i + 1]]
        for j in range(i + 1):
            block = rows_i @ rows[edges[j] : edges[j + 1]].T
            gram[edges[i] : edges[i + 1], edges[j] : edges[j + 1]] = block
            if i != j:
                gram[edges[j] : edges[j + 1], edges[i] : edges[i + 1]] = block.T
    return gram


def _blind_zone_rank(
    lam: Tensor, total: float, n: int, eta: float, max_rank: int | None
) -> tuple[int, float] | None:
    """Rank and entropy from the float64 eigenvalues of the float32 Gram matrix, or ``None`` if undecided.

    Those eigenvalues carry an absolute error of up to ``~0.1·ε₃₂·λ_1`` (the float32 Gram's rounding), so
    the ones under ``4ε₃₂·λ_1`` are treated as an unseen tail whose mass is their sum, give or take
    ``0.5·ε₃₂·λ_1`` each (:func:`certify_rank`).
    """
    lam_1 = float(lam[0])
    blind = _GRAM_BLIND * lam_1
    seen = int((lam > blind).sum())
    zone = lam[seen:].clamp_min(0)
    certificate = certify_rank(
        lam[:seen].clamp_min(0).sqrt(),
        total,
        n,
        eta,
        max_rank=max_rank,
        tail_cap=math.sqrt(blind),
        floor=_floor(math.sqrt(lam_1)),
        tail_energy=float(zone.sum()),
        tail_energy_error=(n - seen) * _GRAM_NOISE * lam_1,
    )
    return None if certificate.rank is None else (certificate.rank, certificate.entropy)


def _eigh_cost(n: int) -> float:
    return _EIGH_VECTORS_FLOPS_PER_N3 * n**3


def _subspace_plan(lam: Tensor, rank: int) -> tuple[int, int] | None:
    """``(width, iterations)`` of the cheapest subspace iteration predicted to reach the basis tolerance.

    With the eigenvalues known, a Gaussian start block of ``w`` columns leaves direction ``i ≤ r`` at
    ``tan²θ_i ≈ n/(w − r + 1)·(λ_{w+1}/λ_i)^{2q}`` after ``q`` multiplications by the Gram matrix.
    ``None`` when ``eigh`` is predicted cheaper.
    """
    n = lam.numel()
    values = lam.to("cpu", torch.float64).clamp_min(0)
    best, best_cost = None, _eigh_cost(n)
    for width in (2 * rank + 16, 3 * rank + 32, 4 * rank + 64):
        if width >= n // 2:
            break
        ratio = values[width] / values[:rank].clamp_min(1e-300)
        for iterations in range(1, _MAX_GRAM_ITERATIONS + 1):
            sin2 = (ratio.pow(2 * iterations) * (n / (width - rank + 1))).clamp(max=1.0).mean()
            if float(sin2) <= _BASIS_TOLERANCE:
                cost = (iterations + 1) * (2.0 * n * n * width + 8.0 * n * width * width)
                if cost < best_cost:
                    best, best_cost = (width, iterations), cost
                break
    return best


def _top_eigenvectors(gram: Tensor, lam: Tensor, rank: int, generator: torch.Generator) -> Tensor:
    """Top-``rank`` eigenvectors of a PSD matrix: subspace iteration + Rayleigh-Ritz, or ``eigh``."""
    n = gram.shape[0]
    if rank == 0:
        return gram.new_zeros((n, 0))
    plan = _subspace_plan(lam, rank)
    if plan is None:
        return torch.linalg.eigh(gram).eigenvectors.flip(1)[:, :rank]
    width, iterations = plan
    test = torch.randn(n, width, generator=generator, device=gram.device, dtype=torch.float32).to(gram.dtype)
    q = torch.linalg.qr(test).Q
    for _ in range(iterations):
        q = torch.linalg.qr(gram @ q).Q
    _, ritz_vectors = torch.linalg.eigh(q.T @ (gram @ q))
    return q @ ritz_vectors.flip(1)[:, :rank]


def _left_vectors(matrix: Tensor, vectors: Tensor, sigma: Tensor, rank: int) -> Tensor:
    """Top-``rank`` left singular vectors from the Gram eigenvectors (``U = MVΣ⁻¹`` for a tall matrix)."""
    d_out, d_in = matrix.shape
    if d_out <= d_in or rank == 0:
        return vectors[:, :rank]
    left = (matrix.to(vectors.dtype) @ vectors[:, :rank]) / sigma[:rank].to(vectors.dtype)
    return _orthonormalize(left)


def _orthonormalize(columns: Tensor) -> Tensor:
    # The columns are orthonormal up to rounding (cond ≈ 1), so Cholesky-QR is accurate: one matmul and one
    # triangular solve, several times faster than Householder QR; the latter only if Cholesky fails.
    factor, info = torch.linalg.cholesky_ex((columns.T @ columns).to(torch.float64))
    if int(info) != 0:
        return torch.linalg.qr(columns).Q
    return torch.linalg.solve_triangular(factor.to(columns.dtype), columns.T, upper=False).T


# --- randomised path -------------------------------------------------------------------------------------


def _attempt_cost(d_out: int, d_in: int, k: int) -> float:
    """Estimated cost of one randomised attempt in matmul flops (thin matmuls and QR run at ~half speed)."""
    passes = 2 * _POWER_ITERATIONS + 2
    return passes * (4.0 * d_out * d_in * k + 6.0 * max(d_out, d_in) * k * k)


def _randomized(
    matrix: Tensor, eta: float, max_rank: int | None, total: float, generator: torch.Generator, budget: float
) -> SafetySpectrum | None:
    """Certified randomised spectrum, doubling the known values; ``None`` once over budget or hopeless."""
    d_out, d_in = matrix.shape
    n = min(d_out, d_in)
    known = min(n, max(_FIRST_KNOWN, max_rank or 0))
    spent, start = 0.0, None
    while True:
        k = min(n, known + max(8, known // 4))
        spent += _attempt_cost(d_out, d_in, k)
        if spent > budget:
            return None
        sigma, left, start = _subspace_iteration(matrix, k, generator, start)
        certificate = certify_rank(
            sigma[:known], total, n, eta, max_rank=max_rank, floor=_floor(float(sigma[0]))
        )
        if certificate.rank is not None:
            break
        if known >= n:  # cannot happen: with every value known the bounds coincide
            raise RuntimeError("randomized SVD failed to certify a complete spectrum")
        unseen = 1.0 - float(sigma.to(torch.float64).square().sum()) / total
        if math.isfinite(budget) and unseen > _HOPELESS_TAIL:
            return None
        known = min(n, max(2 * known, certificate.min_rank + known // 2))
    rank = certificate.rank
    for _ in range(_REFINEMENTS):
        if _randomized_basis_error(matrix, sigma, left, start, rank) <= _BASIS_TOLERANCE:
            break
        spent += _attempt_cost(d_out, d_in, k)
        if spent > budget:
            return None
        sigma, left, start = _subspace_iteration(matrix, k, generator, start)
    else:
        accurate = _randomized_basis_error(matrix, sigma, left, start, rank) <= _BASIS_TOLERANCE
        if math.isfinite(budget) and not accurate:
            return None
    return _finish(left, sigma, rank, certificate.entropy, total, n, "randomized")


def _randomized_basis_error(matrix: Tensor, sigma: Tensor, left: Tensor, right: Tensor, rank: int) -> float:
    """Wedin estimate of the mean ``sin²`` between the top-``rank`` Ritz vectors and the exact ones.

    The Ritz triplets satisfy ``Mᵀu = σ̃v`` exactly; ``R = MV − UΣ̃`` measures the rest, and
    ``‖sin Θ‖²_F ≤ ‖R‖²_F / (σ̃_r − σ̃_{r+1})²``.
    """
    if rank == 0 or rank >= sigma.numel():
        return 0.0
    residual = matrix @ right[:, :rank] - left[:, :rank] * sigma[:rank]
    gap = float(sigma[rank - 1] - sigma[rank])
    if gap <= 0:
        return math.inf
    return float(residual.to(torch.float64).square().sum()) / (gap * gap * rank)


def _subspace_iteration(
    matrix: Tensor, k: int, generator: torch.Generator, start: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-``k`` singular values, left vectors and right vectors by randomised subspace iteration.

    ``start`` (right vectors of an earlier attempt) seeds the first ``start.shape[1]`` test columns.
    """
    d_in = matrix.shape[1]
    fresh = k - (0 if start is None else start.shape[1])
    test = torch.randn(d_in, fresh, generator=generator, device=matrix.device, dtype=matrix.dtype)
    if start is not None:
        test = torch.cat([start, test], dim=1)
    q = torch.linalg.qr(matrix @ test).Q
    for _ in range(_POWER_ITERATIONS):
        q = torch.linalg.qr(matrix @ torch.linalg.qr(matrix.T @ q).Q).Q
    small = q.T @ matrix
    u_small, sigma, vh = torch.linalg.svd(small, full_matrices=False)
    return sigma, q @ u_small, vh.T
