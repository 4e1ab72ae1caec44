"""LSSF across processes, in plain ``torch.distributed`` (no Lightning): :mod:`.collectives` (ranks, small
gathers, full tensors streamed to rank 0), :mod:`.build` (the subspace's SVDs shared by the ranks) and
:mod:`.shards` (fusion, exact resume and fix-ups on each rank's own DTensor shards)."""

from lssf_lightning.distributed.build import (
    assign_by_cost,
    build_across_ranks,
    build_subspace_across_ranks,
    estimated_svd_cost,
)
from lssf_lightning.distributed.collectives import (
    gather_to_rank0,
    gathered_store,
    global_rank,
    is_dtensor,
    local_tensor,
    pad_shard,
    shard_region,
    synced_generation,
    world_size,
)
from lssf_lightning.distributed.shards import (
    apply_shard_fixup,
    fixup_layout_mismatch,
    fixups_of_rank,
    fuse_state_shards,
    gather_fixups,
    is_sharded_fixups,
    realign_shards_in_place,
    restore_raw_shards,
    shard_fixup,
    temporarily_fused_shards,
)

__all__ = [
    "apply_shard_fixup",
    "assign_by_cost",
    "build_across_ranks",
    "build_subspace_across_ranks",
    "estimated_svd_cost",
    "fixup_layout_mismatch",
    "fixups_of_rank",
    "fuse_state_shards",
    "gather_fixups",
    "gather_to_rank0",
    "gathered_store",
    "global_rank",
    "is_dtensor",
    "is_sharded_fixups",
    "local_tensor",
    "pad_shard",
    "realign_shards_in_place",
    "restore_raw_shards",
    "shard_fixup",
    "shard_region",
    "synced_generation",
    "temporarily_fused_shards",
    "world_size",
]
