"""Benchmark: the all-reduce of the shard-local forms under FSDP2 (one ``r × d_in`` matrix per weight).

Under FSDP2's row sharding, the reset (and the erosion, the two-sided reset) needs ``U'ᵀW``, a sum over every
rank's rows: :class:`lssf_lightning.distributed.sharded_forms.ShardedForms` all-reduces one ``r × d_in``
float32 matrix per weight and application. This runs the real ``ShardedForms.apply_`` (the per-step guard's
work: ``lssf-reset``, ``α = 1``) on 2 gloo processes over SmolLM2-135M-shaped weights (hidden 576, MLP 1536,
k/v 192; ``--layers`` of its 30 decoder layers, 7 matrices each, ``Shard(0)``), for each rank in ``--ranks``
(the same ``r`` for every matrix; the demo's data-free subspaces have r ≈ 24–182, mean 103), and prints per
application: all-reduce calls, bytes, all-reduce seconds, and the whole application's seconds.

Usage::

    python benchmarks/bench_forms_allreduce.py                  # 30 layers, r = 24, 103, 182 (~1-2 min)
    python benchmarks/bench_forms_allreduce.py --layers 4 --ranks 103
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

SHAPES = {  # SmolLM2-135M: (d_out, d_in) of each decoder-layer matrix
    "q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576),
    "gate_proj": (1536, 576), "up_proj": (1536, 576), "down_proj": (576, 1536),
}


def worker(layers: int, ranks: list[int], repeats: int) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from lssf_lightning.core.factors import SubspaceEntry
    from lssf_lightning.distributed.sharded_forms import ShardedForms

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    generator = torch.Generator().manual_seed(0)
    keys = [f"layers.{i}.{name}.weight" for i in range(layers) for name in SHAPES]
    def shape(key):
        return SHAPES[key.split(".")[2]]

    weights = {key: distribute_tensor(torch.randn(shape(key), generator=generator) * 0.02, mesh, [Shard(0)])
               for key in keys}
    rows = []
    for r in ranks:
        entries = {}
        for key in keys:
            d_out, d_in = shape(key)
            left, _ = torch.linalg.qr(torch.randn(d_out, r, generator=generator))
            entries[key] = SubspaceEntry(left, torch.randn(r, d_in, generator=generator) * 0.01,
                                         torch.ones(r), 0.0, float(r))
        reference = {key: torch.randn(shape(key), generator=generator) * 0.02 for key in keys}
        names = {k: k for k in keys}
        forms = ShardedForms("reset", weights, entries, reference.__getitem__, names, alpha=1.0)
        times = []
        for _ in range(repeats + 1):  # the first application warms up
            forms.cost.update(calls=0, bytes=0, seconds=0.0)
            dist.barrier()
            start = time.perf_counter()
            forms.apply_(weights)
            times.append((time.perf_counter() - start, dict(forms.cost)))
        measured = times[1:]
        buffers = [torch.zeros(r, shape(key)[1]) for key in keys]
        alone = []
        for _ in range(repeats):  # the same all-reduces back to back: the wire alone, no waiting on a peer
            dist.barrier()
            start = time.perf_counter()
            for buffer in buffers:
                dist.all_reduce(buffer)
            alone.append(time.perf_counter() - start)
        rows.append({"r": r, "calls": measured[0][1]["calls"], "bytes": measured[0][1]["bytes"],
                     "allreduce_s": statistics.median(c["seconds"] for _, c in measured),
                     "alone_s": statistics.median(alone),
                     "apply_s": statistics.median(t for t, _ in measured)})
    if dist.get_rank() == 0:
        print(json.dumps({"layers": layers, "rows": rows}))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--ranks", type=int, nargs="+", default=[24, 103, 182])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.layers, args.ranks, args.repeats)
        return
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", __file__,
               "--worker", "--layers", str(args.layers), "--repeats", str(args.repeats),
               "--ranks", *map(str, args.ranks)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    matrices = result["layers"] * len(SHAPES)
    print(f"ShardedForms.apply_ (lssf-reset, alpha 1), 2 gloo processes, {result['layers']} SmolLM2-135M "
          f"layers ({matrices} matrices), per application, median of {args.repeats}:")
    print("(all-reduce s: inside apply_, waiting on the slower rank included; alone: the same all-reduces "
          "back to back)")
    print(f"{'r':>5} {'all-reduces':>12} {'MB':>8} {'all-reduce s':>13} {'alone s':>8} {'apply s':>8}")
    for row in result["rows"]:
        print(f"{row['r']:>5} {row['calls']:>12} {row['bytes'] / 1e6:>8.2f} {row['allreduce_s']:>13.4f} "
              f"{row['alone_s']:>8.4f} {row['apply_s']:>8.4f}")


if __name__ == "__main__":
    main()
