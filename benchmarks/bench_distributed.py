"""Benchmark: LSSF across ranks — the distributed subspace build, sharded checkpoint saves, memory per rank.

Parts (each a table; results and readings in ``benchmarks/README.md``):

``build``
    The safety subspace of a synthetic Llama-3.2-1B-shaped model (hidden 2048, MLP 8192, k/v 512; ``--layers``
    of its 16 decoder layers, random base weights, ``δ`` from ``bench_subspace.synthetic_delta``), built by
    one process and by 2 gloo processes (:func:`lssf_lightning.distributed.build_across_ranks`), ``--threads``
    threads each. Reports wall times, their ratio, and whether ranks and factors are bit-identical.
``save``
    2 gloo processes, the same model as a ``LlamaForCausalLM`` sharded with ``fully_shard`` per decoder layer:
    time of a distributed checkpoint save (``get_model_state_dict`` + ``torch.distributed.checkpoint.save``)
    without and with LSSF (each rank fuses its own shards, per-shard fix-ups gathered to rank 0). Median of
    ``--repeats``.
``memory``
    Per-rank peak RSS (``VmHWM``) of that save with all factors resident (``SafetySubspace.load``) and with
    disk-backed factors (:class:`lssf_lightning.io.lazy_factors.LazyFactors`, 64 MiB budget), and the factor
    bytes each rank holds.
``table``
    Factor bytes of a Llama-3-8B-shaped model at η = 0.5 and 0.9 (bf16 factors): total, and per rank with
    8 ranks — all resident, FSDP2 rows only (``U'[rows]`` + ``U'ᵀδ``), disk-backed. Ranks come from the
    spectra of one synthetic 8B-shaped layer (same ``δ`` recipe), taken for all 32 layers.

Usage::

    python benchmarks/bench_distributed.py                        # all parts, 2 layers (~5 min on 2 cores)
    python benchmarks/bench_distributed.py --parts build --layers 16 --threads 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_subspace import DELTA_SCALE, LLAMA3_8B_LAYER, bench_cache, synthetic_delta  # noqa: E402 (path)

from lssf_lightning.config import SubspaceConfig  # noqa: E402 (path)

LLAMA32_1B = {
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "num_hidden_layers": 16,
}
LAYER_1B = {
    "self_attn.q_proj": (2048, 2048),
    "self_attn.k_proj": (512, 2048),
    "self_attn.v_proj": (512, 2048),
    "self_attn.o_proj": (2048, 2048),
    "mlp.gate_proj": (8192, 2048),
    "mlp.up_proj": (8192, 2048),
    "mlp.down_proj": (2048, 8192),
}
BUDGET = 64 * 2**20


# -- inputs ------------------------------------------------------------------------------------------------
def prepare(layers: int, log) -> dict[str, Path]:
    """Unaligned / aligned safetensors of ``layers`` decoder layers of Llama-3.2-1B shape (once, cached)."""
    from safetensors.torch import save_file

    folder = bench_cache() / f"llama32-1b-{layers}layers"
    paths = {side: folder / f"{side}.safetensors" for side in ("unaligned", "aligned")}
    if all(p.is_file() for p in paths.values()):
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    log(f"generating {layers} Llama-3.2-1B-shaped layers into {folder} (once)")
    generator = torch.Generator().manual_seed(0)
    base, aligned = {}, {}
    for layer in range(layers):
        for name, shape in LAYER_1B.items():
            key = f"model.layers.{layer}.{name}.weight"
            base[key] = 0.02 * torch.randn(shape, generator=generator)
            delta = synthetic_delta(*shape, generator)
            aligned[key] = base[key] + delta * (DELTA_SCALE * float(base[key].norm()))
    save_file(base, str(paths["unaligned"]))
    save_file(aligned, str(paths["aligned"]))
    return paths


def peak_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# -- workers (run under torch.distributed.run) -----------------------------------------------------------
def worker_build(args) -> dict:
    import torch.distributed as dist

    from lssf_lightning.distributed import build_across_ranks
    from lssf_lightning.subspace import SafetySubspace, SubspaceBuilder

    builder = SubspaceBuilder(
        args.aligned, args.unaligned, progress=False, config=SubspaceConfig(eta=args.eta)
    )
    dist.barrier()
    start = time.perf_counter()
    built = []
    entries = build_across_ranks(builder, keep=lambda name: dist.get_rank() == 0, progress=built.append)
    seconds = time.perf_counter() - start
    if dist.get_rank() == 0:
        SafetySubspace(entries, builder.metadata()).save(args.output)
    return {"seconds": seconds, "built": len(built), "peak_mib": peak_mib()}


def _sharded_model(layers: int, mesh):
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        **{**LLAMA32_1B, "num_hidden_layers": layers}, vocab_size=256, tie_word_embeddings=False
    )
    model = LlamaForCausalLM(config)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def worker_save(args) -> dict:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    from lssf_lightning.distributed import fuse_state_shards, gather_fixups
    from lssf_lightning.io.lazy_factors import LazyFactors, entry_bytes
    from lssf_lightning.subspace import SafetySubspace
    from lssf_lightning.training import matched_keys

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = _sharded_model(args.layers, mesh)
    if args.factors == "lazy":
        factors = LazyFactors(args.subspace, budget_bytes=BUDGET)
        subspace = SafetySubspace(factors, factors.metadata)
    else:
        subspace = SafetySubspace.load(args.subspace)
    matched = matched_keys(subspace, dict(model.state_dict(keep_vars=True)).keys())
    options = StateDictOptions(cpu_offload=True)
    times = {"plain": [], "lssf": []}
    for repeat in range(args.repeats):
        for mode in ("plain", "lssf"):
            with tempfile.TemporaryDirectory(dir=args.scratch) as scratch:
                scratch = dist.get_rank() == 0 and [scratch] or [None]
                dist.broadcast_object_list(scratch, src=0)
                dist.barrier()
                start = time.perf_counter()
                state = get_model_state_dict(model, options=options)
                meta = {}
                if mode == "lssf":
                    fixups = fuse_state_shards(state, subspace, 1.0, matched=matched)
                    meta["fixups"] = gather_fixups(fixups)
                dcp.save({"state_dict": state}, checkpoint_id=scratch[0])
                if dist.get_rank() == 0:
                    torch.save(meta, Path(scratch[0]) / "meta.pt")
                dist.barrier()
                times[mode].append(time.perf_counter() - start)
                del state, meta
    resident = (
        factors.peak_resident_bytes
        if args.factors == "lazy"
        else sum(entry_bytes(e) for e in subspace.entries.values())
    )
    return {
        "plain": statistics.median(times["plain"]),
        "lssf": statistics.median(times["lssf"]),
        "peak_mib": peak_mib(),
        "resident_factor_bytes": resident,
        "matched": len(matched),
    }


def worker(args) -> None:
    import torch.distributed as dist

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    result = {"build": worker_build, "save": worker_save}[args.worker](args)
    Path(args.result, f"rank{dist.get_rank()}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def launch(nproc: int, threads: int, *worker_args: str) -> list[dict]:
    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            __file__,
            "--worker",
            *worker_args,
            "--result",
            out,
            "--threads",
            str(threads),
        ]
        done = subprocess.run(command, check=False, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-4000:])
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(nproc)]


# -- parts -------------------------------------------------------------------------------------------------
def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]

    def line(cells):
        return "| " + " | ".join(str(c).rjust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def same_subspace(a: Path, b: Path) -> tuple[bool, float]:
    from lssf_lightning.subspace import SafetySubspace

    one, two = SafetySubspace.load(a), SafetySubspace.load(b)
    same = one.keys() == two.keys() and one.metadata["fingerprint"] == two.metadata["fingerprint"]
    for key in list(one.entries):
        x, y = one[key], two[key]
        same &= x.rank == y.rank and torch.equal(x.left, y.left) and torch.equal(x.right, y.right)
        same &= torch.equal(x.singular_values, y.singular_values)
    ranks = list(one.ranks.values())
    return bool(same), sum(ranks) / len(ranks)


def launch_build(nproc: int, args, paths, output: Path) -> list[dict]:
    """The ``build`` worker on ``nproc`` processes: the subspace of (aligned, unaligned) at ``args.eta``."""
    return launch(
        nproc,
        args.threads,
        "build",
        "--aligned",
        str(paths["aligned"]),
        "--unaligned",
        str(paths["unaligned"]),
        "--eta",
        str(args.eta),
        "--output",
        str(output),
    )


def part_build(args, paths, scratch: Path, log) -> None:
    rows = []
    files = {n: scratch / f"subspace_{n}proc.safetensors" for n in (1, 2)}
    results = {}
    for nproc in (1, 2):
        log(f"build: {nproc} process(es)")
        results[nproc] = launch_build(nproc, args, paths, files[nproc])
    same, mean_rank = same_subspace(files[1], files[2])
    one = max(r["seconds"] for r in results[1])
    two = max(r["seconds"] for r in results[2])
    rows.append(
        [
            args.layers * len(LAYER_1B),
            args.eta,
            f"{mean_rank:.1f}",
            f"{one:.1f}",
            f"{two:.1f}",
            f"{one / two:.2f}x",
            "/".join(str(r["built"]) for r in results[2]),
            "yes" if same else "NO",
        ]
    )
    print(
        table(
            rows,
            [
                "matrices",
                "η",
                "mean rank",
                "1 proc s",
                "2 procs s",
                "speed-up",
                "built per rank",
                "bit-identical",
            ],
        )
    )
    args.subspace_file = files[1]


def part_save(args, paths, scratch: Path, log) -> None:
    subspace = getattr(args, "subspace_file", None)
    if subspace is None or not Path(subspace).is_file():
        log("save: building the subspace once (1 process)")
        subspace = scratch / "subspace_1proc.safetensors"
        launch_build(1, args, paths, subspace)
    rows = []
    for factors in ("resident", "lazy"):
        log(f"save: 2 processes, factors {factors}")
        results = launch(
            2,
            args.threads,
            "save",
            "--subspace",
            str(subspace),
            "--layers",
            str(args.layers),
            "--repeats",
            str(args.repeats),
            "--factors",
            factors,
            "--scratch",
            str(scratch),
        )
        plain = max(r["plain"] for r in results)
        lssf = max(r["lssf"] for r in results)
        rows.append(
            [
                factors,
                results[0]["matched"],
                f"{plain:.2f}",
                f"{lssf:.2f}",
                f"{lssf / plain:.2f}x",
                " / ".join(f"{r['peak_mib']:.0f}" for r in results),
                " / ".join(f"{r['resident_factor_bytes'] / 2**20:.0f}" for r in results),
            ]
        )
    print(
        table(
            rows,
            [
                "factors",
                "matrices",
                "save s (plain)",
                "save s (LSSF)",
                "ratio",
                "peak MiB rank 0 / 1",
                "factor MiB held rank 0 / 1",
            ],
        )
    )


def part_table(args, log) -> None:
    from lssf_lightning.core.entropy import safety_critical_rank

    log("table: spectra of one synthetic Llama-3-8B-shaped layer (Gram eigenvalues in float64)")
    generator = torch.Generator().manual_seed(0)
    ranks = {0.5: {}, 0.9: {}}
    for name, (d_out, d_in) in LLAMA3_8B_LAYER.items():
        delta = synthetic_delta(d_out, d_in, generator)
        small = delta if d_out <= d_in else delta.T
        gram = (small @ small.T).double()
        sigma = torch.linalg.eigvalsh(gram).clamp_min(0).sqrt().flip(0)
        for eta, by_name in ranks.items():
            by_name[name] = safety_critical_rank(sigma, eta)
        del delta, small, gram
    world, element, layers = 8, 2, 32
    rows = []
    for eta, by_name in ranks.items():
        total = (
            sum((d_out + d_in) * by_name[n] * element for n, (d_out, d_in) in LLAMA3_8B_LAYER.items())
            * layers
        )
        rows_only = (
            sum(
                (-(-d_out // world) + d_in) * by_name[n] * element
                for n, (d_out, d_in) in LLAMA3_8B_LAYER.items()
            )
            * layers
        )
        largest = max(
            (d_out + d_in) * by_name[n] * element + by_name[n] * 4
            for n, (d_out, d_in) in LLAMA3_8B_LAYER.items()
        )
        mean = statistics.mean(by_name[n] / min(s) for n, s in LLAMA3_8B_LAYER.items())
        rows.append(
            [
                eta,
                f"{mean:.1%}",
                f"{total / 2**30:.2f}",
                f"{total / 2**30:.2f}",
                f"{rows_only / 2**30:.2f}",
                f"{(BUDGET + largest) / 2**20:.0f} MiB",
            ]
        )
    print("Llama-3-8B shape (32 layers x 7 matrices, bf16 factors; model weights 15 GiB in bf16):")
    print(
        table(
            rows,
            [
                "η",
                "mean r/n",
                "total GiB",
                "per rank GiB, all resident",
                "per rank GiB, FSDP2 rows",
                "per rank, disk-backed (64 MiB + largest)",
            ],
        )
    )
    print("ranks per matrix:", json.dumps(ranks))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--parts", nargs="+", default=["build", "save", "table"], choices=["build", "save", "table"]
    )
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of the 1B-shaped model (of 16)")
    parser.add_argument("--eta", type=float, default=0.9)
    parser.add_argument("--threads", type=int, default=1, help="threads per process")
    parser.add_argument("--repeats", type=int, default=3)
    # worker-only arguments
    parser.add_argument("--worker", choices=["build", "save"])
    parser.add_argument("--result"), parser.add_argument("--aligned"), parser.add_argument("--unaligned")
    parser.add_argument("--output"), parser.add_argument("--subspace"), parser.add_argument("--scratch")
    parser.add_argument("--factors", choices=["resident", "lazy"], default="resident")
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    paths = prepare(args.layers, log) if {"build", "save"} & set(args.parts) else None
    with tempfile.TemporaryDirectory() as scratch:
        if "build" in args.parts:
            part_build(args, paths, Path(scratch), log)
        if "save" in args.parts:
            part_save(args, paths, Path(scratch), log)
    if "table" in args.parts:
        part_table(args, log)
    return None


if __name__ == "__main__":
    main()
