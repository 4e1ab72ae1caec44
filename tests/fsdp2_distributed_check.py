"""Checks of lssf_lightning.distributed on 2 real gloo processes, for tests/test_fsdp2.py.

Usage: python -m torch.distributed.run --standalone --nproc-per-node 2 fsdp2_distributed_check.py OUT \
       ALIGNED UNALIGNED [ALIGNED UNALIGNED ...]
Each rank writes OUT/rank<r>.json with what it measured; the asserting happens here and in the test.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

from lssf_lightning.core.basis import add_correction
from lssf_lightning.core.factors import SubspaceEntry, local_product, restrict
from lssf_lightning.distributed import (
    apply_shard_fixup,
    build_across_ranks,
    fuse_state_shards,
    gather_to_rank0,
    is_dtensor,
    local_tensor,
    realign_shards_in_place,
    shard_fixup,
    shard_region,
)
from lssf_lightning.subspace import SafetySubspace, SubspaceBuilder

torch.set_num_threads(1)


def synthetic_entry(d_out, d_in, r, conv1d, seed):
    generator = torch.Generator().manual_seed(seed)
    left = torch.randn(d_out, r, generator=generator)
    right = torch.randn(r, d_in, generator=generator)
    return SubspaceEntry(
        left=left,
        right=right,
        singular_values=torch.ones(r),
        entropy=1.0,
        total_energy=float(r),
        conv1d=conv1d,
    )


def dense(weight, entry, alpha):
    """The dense formula, computed independently in float64: W + α·U'(U'ᵀδ) (transposed for Conv1D)."""
    term = entry.left.double() @ entry.right.double()
    return weight.double() + alpha * (term.T if entry.conv1d else term)


def check_fusion(mesh, rank):
    results = []
    cases = [  # (stored shape, conv1d, placements, dtype)
        ((7, 5), False, [Shard(0)], torch.float32),  # uneven rows: 4 + 3
        ((1, 6), False, [Shard(0)], torch.float32),  # rank 1 holds no row at all
        ((6, 9), False, [Shard(1)], torch.float32),  # tensor-parallel style: uneven columns 5 + 4
        ((6, 4), False, [Replicate()], torch.float32),
        ((5, 8), True, [Shard(0)], torch.float32),  # Conv1D (d_in, d_out): checkpoint rows are columns of R
        ((8, 5), True, [Shard(1)], torch.float32),
        ((9, 6), False, [Shard(0)], torch.bfloat16),  # bf16: rounding makes fix-ups necessary
    ]
    for i, (shape, conv1d, placements, dtype) in enumerate(cases):
        d_out, d_in = (shape[1], shape[0]) if conv1d else shape
        entry = synthetic_entry(d_out, d_in, 3, conv1d, seed=10 + i)
        weight = torch.randn(shape, generator=torch.Generator().manual_seed(i)).to(dtype)
        alpha = 0.7
        sharded = distribute_tensor(weight, mesh, placements)
        region = shard_region(sharded)
        one = SafetySubspace({"w": entry})  # the real path: a state dict fused shard by shard
        state = {"w": sharded}
        fuse_state_shards(state, one, alpha, matched={"w": "w"}, keep_fixups=False)
        fused = state["w"]
        gathered = fused.full_tensor()
        expected = dense(weight, entry, alpha)
        tolerance = 1e-5 if dtype == torch.float32 else 2e-2
        ok_dense = torch.allclose(gathered.double(), expected, atol=tolerance * 10, rtol=tolerance)
        # the same block from restricted factors (what a rank keeps under FSDP2)
        kept = restrict(entry, region)
        ok_restricted = torch.equal(
            local_product(kept, region, local_tensor(sharded)),
            local_product(entry, region, local_tensor(sharded)),
        )
        # in place on a parameter
        parameter = torch.nn.Parameter(distribute_tensor(weight.clone(), mesh, placements))
        realign_shards_in_place({"w": parameter}, one, alpha, matched={"w": "w"})
        ok_inplace = torch.equal(local_tensor(parameter), local_tensor(fused))
        # exact resume: recover raw = fused − term, then the per-shard fix-ups
        raw_local = local_tensor(sharded)
        fused_local = local_tensor(fused)
        product = local_product(entry, region, fused_local)
        recovered = add_correction(fused_local, product, -alpha)
        fixup = shard_fixup(raw_local, recovered, region)
        exact = apply_shard_fixup(recovered, region, fixup) and torch.equal(recovered, raw_local)
        other = type(region)(region.global_shape, (region.offset[0] + 1, region.offset[1]), region.shape)
        refused = not apply_shard_fixup(recovered.clone(), other, fixup)
        results.append(
            {
                "case": i,
                "region": region.as_json(),
                "dense": ok_dense,
                "restricted": ok_restricted,
                "inplace": ok_inplace,
                "exact_resume": exact,
                "fixups": int(fixup["index"].numel()),
                "other_layout_refused": refused,
                "local_numel": raw_local.numel(),
            }
        )
    return results


def check_build(aligned, unaligned, rank):
    builder = SubspaceBuilder(aligned, unaligned, progress=False)
    built = []
    entries = build_across_ranks(builder, progress=built.append)
    reference = SafetySubspace.from_weights(aligned, unaligned, progress=False)
    same = list(entries) == reference.keys()
    for name, entry in entries.items():
        ref = reference[name]
        same &= (
            entry.rank == ref.rank
            and entry.conv1d == ref.conv1d
            and entry.entropy == ref.entropy
            and entry.total_energy == ref.total_energy
            and torch.equal(entry.left, ref.left)
            and torch.equal(entry.right, ref.right)
            and torch.equal(entry.singular_values, ref.singular_values)
        )
    metadata = builder.metadata()
    return {
        "built_here": built,
        "identical": bool(same),
        "n": len(entries),
        "fingerprint_equal": metadata["fingerprint"] == reference.metadata["fingerprint"],
        "ranks_equal": builder.ranks == reference.ranks,
    }


def check_gather(rank):
    tensors = (
        {"index": torch.arange(rank + 2), "value": torch.full((rank + 2,), float(rank))} if rank == 0 else {}
    )
    got = gather_to_rank0(tensors, {"rank": rank})
    if rank != 0:
        return got is None
    return (
        len(got) == 2
        and torch.equal(got[0][0]["index"], torch.arange(2))
        and got[1][0] == {}
        and [info["rank"] for _, info in got] == [0, 1]
    )


def sharded_model(path, mesh):
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    layers = model.model.layers if hasattr(model, "model") else model.transformer.h
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def check_model(out, finetuned, aligned, unaligned, mesh, rank):
    """A HF model sharded with fully_shard per decoder layer: checkpoint fusion, exact resume, live fusion,
    the streamed export."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
    from transformers import AutoModelForCausalLM

    from lssf_lightning.distributed import (
        fixup_layout_mismatch,
        fixups_of_rank,
        fuse_state_shards,
        gather_fixups,
        gathered_store,
        restore_raw_shards,
        temporarily_fused_shards,
    )
    from lssf_lightning.training import ResumeError, export_realigned, matched_keys, restore_raw

    subspace = SafetySubspace.from_weights(aligned, unaligned, progress=False)
    reference = AutoModelForCausalLM.from_pretrained(finetuned)  # unsharded, for the dense formula
    raw_full = {k: v.detach().clone() for k, v in reference.state_dict().items()}
    model = sharded_model(finetuned, mesh)
    parameters = dict(model.state_dict(keep_vars=True))
    matched = matched_keys(subspace, parameters.keys())
    alpha = 0.8
    results = {"matched": len(matched), "sharded": all(is_dtensor(parameters[k]) for k in matched)}

    def dense(key):
        return raw_full[key].double() + subspace[matched[key]].correction(alpha)

    # checkpoint mode: each rank fuses its own shards of the sharded state dict
    state = get_model_state_dict(model)
    fixups = fuse_state_shards(state, subspace, alpha, matched=matched)
    results["checkpoint_dense"] = all(
        torch.allclose(state[k].full_tensor().double(), dense(k), atol=1e-5) for k in matched
    )
    results["live_raw"] = all(torch.equal(parameters[k].full_tensor(), raw_full[k]) for k in matched)
    # a non-finite fused shard on one rank stops the save on every rank (no rank left in a collective)
    broken = get_model_state_dict(model)
    first = next(iter(matched))
    if rank == 1:
        broken[first] = broken[first].clone()
        local_tensor(broken[first]).view(-1)[0] = float("inf")
    try:
        fuse_state_shards(broken, subspace, alpha, matched=matched)
        results["nonfinite_refused"] = None
    except ValueError as err:
        results["nonfinite_refused"] = str(err)
    stored = gather_fixups(fixups)
    results["gathered_fixups"] = stored is not None if rank == 0 else stored is None
    shared = [stored]
    dist.broadcast_object_list(shared, src=0)  # stands in for every rank reading the checkpoint metadata
    # resume: load the fused weights into a fresh sharded model, then restore the raw ones
    resumed = sharded_model(finetuned, mesh)
    set_model_state_dict(resumed, state)
    resumed_parameters = dict(resumed.state_dict(keep_vars=True))
    inexact = restore_raw_shards(
        resumed_parameters, subspace, alpha, fixups_of_rank(shared[0], rank), matched=matched
    )
    results["resume_inexact"] = inexact
    results["resume_exact"] = all(
        torch.equal(resumed_parameters[k].full_tensor(), raw_full[k]) for k in matched
    )
    # fix-ups of another layout (here: the other rank's blocks) are refused on every rank, before any weight
    # moves
    swapped = {**shared[0], "ranks": shared[0]["ranks"][::-1]}
    other = sharded_model(finetuned, mesh)
    set_model_state_dict(other, state)
    other_parameters = dict(other.state_dict(keep_vars=True))
    before = {k: local_tensor(other_parameters[k]).clone() for k in matched}
    results["own_layout_ok"] = (
        fixup_layout_mismatch(resumed_parameters, fixups_of_rank(shared[0], rank), matched) is None
    )
    try:
        restore_raw(other_parameters, subspace, alpha, swapped, matched=matched)
        results["other_layout_refused"] = None
    except ResumeError as err:
        results["other_layout_refused"] = str(err)
    results["refused_untouched"] = all(
        torch.equal(local_tensor(other_parameters[k]), before[k]) for k in matched
    )
    without = sharded_model(finetuned, mesh)
    set_model_state_dict(without, state)
    without_parameters = dict(without.state_dict(keep_vars=True))
    results["resume_without_fixups_inexact"] = len(
        restore_raw_shards(without_parameters, subspace, alpha, {}, matched=matched)
    )
    # the monitor's realigned pass and epochs mode: shard-local, in place
    tokens = torch.tensor([[2, 5, 6, 7, 8]])
    with torch.no_grad():
        logits_raw = model(tokens).logits
        with temporarily_fused_shards(parameters, subspace, alpha, matched=matched):
            logits_fused = model(tokens).logits
            results["temporarily_dense"] = all(
                torch.allclose(parameters[k].full_tensor().double(), dense(k), atol=1e-5) for k in matched
            )
        results["temporarily_restored"] = all(
            torch.equal(parameters[k].full_tensor(), raw_full[k]) for k in matched
        )
        results["forward_changed"] = not torch.allclose(logits_raw, logits_fused)
        results["forward_back"] = torch.equal(model(tokens).logits, logits_raw)
    # what a rank keeps under FSDP2: its rows of U' and the whole U'ᵀδ, fusing exactly as the full entries do
    kept = SafetySubspace(
        {name: restrict(subspace[name], shard_region(parameters[key])) for key, name in matched.items()},
        subspace.metadata,
    )
    with temporarily_fused_shards(parameters, kept, alpha, matched=matched):
        from_kept = {k: local_tensor(parameters[k]).clone() for k in matched}
    with temporarily_fused_shards(parameters, subspace, alpha, matched=matched):
        results["localized_equal"] = all(
            torch.equal(local_tensor(parameters[k]), from_kept[k]) for k in matched
        )
    full_numbers = sum(e.left.numel() + e.right.numel() for e in subspace.entries.values())
    results["localized_share"] = (
        sum(f.left.numel() + f.right.numel() for f in kept.entries.values()) / full_numbers
    )
    realign_shards_in_place(parameters, subspace, alpha, matched=matched)
    results["epochs_dense"] = all(
        torch.allclose(parameters[k].full_tensor().double(), dense(k), atol=1e-5) for k in matched
    )
    # export: full tensors streamed to rank 0 one at a time; compared with the one-process export
    with gathered_store(resumed) as store:
        if store is not None:
            export_realigned(
                store,
                Path(out, "export_sharded"),
                subspace,
                alpha,
                write_support_files=lambda staging: reference.config.save_pretrained(staging),
            )
    if rank == 0:
        from lssf_lightning.io.weights import ModuleStore

        export_realigned(
            ModuleStore(reference),
            Path(out, "export_single"),
            subspace,
            alpha,
            write_support_files=lambda staging: reference.config.save_pretrained(staging),
        )
        one = AutoModelForCausalLM.from_pretrained(Path(out, "export_single")).state_dict()
        two = AutoModelForCausalLM.from_pretrained(Path(out, "export_sharded")).state_dict()
        results["export_equal"] = one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
        results["export_dense"] = all(torch.allclose(two[k].double(), dense(k), atol=1e-5) for k in matched)
    dist.barrier()
    return results


def main(out, *pairs):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    results = {
        "fusion": check_fusion(mesh, rank),
        "build": [check_build(a, u, rank) for a, u in zip(pairs[::2], pairs[1::2])],
        "gather": check_gather(rank),
    }
    results["model"] = check_model(out, Path(pairs[0]).with_name("finetuned"), pairs[0], pairs[1], mesh, rank)
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
