"""Plain ``torch.distributed`` between ranks: which rank and how many, what a rank holds of a DTensor, small
JSON objects and byte strings gathered (never a pickle), and full tensors streamed to rank 0 one at a time.
Outside ``torch.distributed`` every function is the one-process answer."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lssf_lightning.core.factors import ShardRegion
from lssf_lightning.io.weights import ModuleStore

__all__ = [
    "agreed_count",
    "all_gather_bytes",
    "all_gather_json",
    "comm_device",
    "gather_to_rank0",
    "gathered_store",
    "global_rank",
    "is_dtensor",
    "local_tensor",
    "pad_shard",
    "rank_and_world",
    "shard_region",
    "synced_generation",
    "world_size",
]


def is_dtensor(tensor: Any) -> bool:
    """Whether ``tensor`` is a ``torch.distributed.tensor.DTensor`` (a sharded or replicated parameter)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(tensor, DTensor)


def local_tensor(tensor: Tensor) -> Tensor:
    """The rank's own data of ``tensor``: the local shard of a DTensor, else ``tensor`` itself (no copy)."""
    if not is_dtensor(tensor):
        return tensor
    with torch.no_grad():  # without autograd, `to_local` returns the DTensor's own local tensor (no view)
        return tensor.to_local()


def shard_region(tensor: Tensor) -> ShardRegion:
    """The block of the global 2-D weight that ``tensor``'s local data covers (all of it for a plain tensor).

    Handles any mix of ``Shard(0)``, ``Shard(1)`` and ``Replicate`` over the mesh dimensions, uneven shards
    (``torch.chunk`` sizes, as FSDP2 splits: the last ranks may hold fewer rows, or none) included.

    Raises:
        ValueError: the tensor is not 2-D, or has a placement whose local data is not one block (``Partial``,
            FSDP2+TP's ``_StridedShard``).
    """
    if tensor.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(tensor.shape)}")
    if not is_dtensor(tensor):
        return ShardRegion.full(tensor.shape)
    from torch.distributed.tensor import Replicate, Shard

    # torch has no public function for a DTensor's global offset; this is the one its checkpointing uses.
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    for placement in tensor.placements:
        if type(placement) not in (Shard, Replicate):
            raise ValueError(
                f"cannot fuse a DTensor placed as {tensor.placements}: only Shard(0), Shard(1) and "
                "Replicate keep a rank's data one contiguous block of the weight"
            )
    shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    return ShardRegion(
        tuple(int(s) for s in tensor.shape), tuple(int(o) for o in offset), tuple(int(s) for s in shape)
    )


def rank_and_world(group) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def comm_device(group) -> torch.device:
    """Where collective buffers live: the current CUDA device under NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_bytes(payload: bytes, group=None, only_rank0: bool = False) -> list[bytes] | None:
    """Every rank's ``payload``, in rank order (sizes all-gathered, then the padded bytes all-gathered — or
    gathered to rank 0 alone with ``only_rank0``, where the other ranks get ``None``)."""
    rank, world = rank_and_world(group)
    if world == 1:
        return [payload]
    device = comm_device(group)
    size = torch.tensor([len(payload)], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    longest = max(int(s) for s in sizes)
    buffer = torch.zeros(longest, dtype=torch.uint8, device=device)
    if payload:
        buffer[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    if only_rank0:
        gathered = [torch.empty_like(buffer) for _ in range(world)] if rank == 0 else None
        dist.gather(buffer, gathered, dst=_group_rank0(group), group=group)
        if rank != 0:
            return None
    else:
        gathered = [torch.empty_like(buffer) for _ in range(world)]
        dist.all_gather(gathered, buffer, group=group)
    return [bytes(g[: int(s)].cpu().numpy()) for g, s in zip(gathered, sizes)]


def all_gather_json(obj: Any, group=None) -> list[Any]:  # small objects only (every rank gets all)
    return [json.loads(b) for b in all_gather_bytes(json.dumps(obj).encode(), group)]


def gather_to_rank0(
    tensors: Mapping[str, Tensor], info: Any = None, group=None
) -> list[tuple[dict[str, Tensor], Any]] | None:
    """Rank 0 receives every rank's ``(tensors, info)`` (tensors as safetensors bytes, ``info`` as JSON);
    other ranks get ``None``. A collective: every rank calls it. Used for per-shard fix-ups, which only rank 0
    writes into the checkpoint metadata under distributed checkpointing."""
    from safetensors.torch import load, save

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    infos = all_gather_bytes(json.dumps(info).encode(), group, only_rank0=True)
    blobs = all_gather_bytes(save(tensors), group, only_rank0=True)  # never empty: a header at least
    if infos is None or blobs is None:
        return None
    return [(load(blob), json.loads(text)) for blob, text in zip(blobs, infos, strict=True)]


def agreed_count(count: int, group=None) -> int:
    """``count`` summed over the ranks (a collective when distributed): every rank takes the same branch."""
    if world_size(group) == 1:
        return count
    total = torch.tensor([count], dtype=torch.int64, device=comm_device(group))
    dist.all_reduce(total, group=group)
    return int(total)


class _GatheringStore:
    """Rank 0's view of a sharded module: ``get(key)`` asks every rank to all-gather ``key`` (see
    :func:`gathered_store`); shapes and names need no communication."""

    def __init__(self, module, tensors: dict[str, Tensor], group) -> None:
        self._inner = ModuleStore(module)
        self._tensors, self._index, self._group = tensors, {k: i for i, k in enumerate(tensors)}, group
        self.location = f"<{type(module).__name__}, gathered from {rank_and_world(group)[1]} ranks>"

    def __getattr__(self, name: str) -> Any:  # keys, shape, dtype, is_conv1d, is_linear, owner, ...
        return getattr(self._inner, name)

    def __iter__(self):
        return iter(self._inner.keys())

    def full(self, key: str) -> Tensor:
        """The whole tensor ``key`` (gathered when sharded), on the CPU."""
        tensor = self._tensors[key]
        if not is_dtensor(tensor):
            return tensor.detach()
        _request(self._index[key], self._group)
        return tensor.detach().full_tensor().cpu()

    def get(self, key: str) -> Tensor:
        weight = self.full(key)
        layer = self._inner.lora_layer(key)
        if layer is None or getattr(layer, "merged", False):
            return weight
        prefix = key[: -len(".base_layer.weight")]
        for adapter in layer.active_adapters:
            if adapter not in layer.lora_A:
                continue
            a = self.full(f"{prefix}.lora_A.{adapter}.weight").to(torch.float32)
            b = self.full(f"{prefix}.lora_B.{adapter}.weight").to(torch.float32)
            delta = (b @ a) * layer.scaling[adapter]
            if getattr(layer, "fan_in_fan_out", False):
                delta = delta.T
            weight = weight + delta.to(weight.dtype)
        return weight


def _request(index: int, group) -> None:
    _, world = rank_and_world(group)
    if world > 1:
        message = torch.tensor([index], dtype=torch.int64, device=comm_device(group))
        dist.broadcast(message, src=_group_rank0(group), group=group)


def _group_rank0(group) -> int:
    return dist.get_process_group_ranks(group)[0] if group is not None else 0


@contextlib.contextmanager
def gathered_store(module, group=None) -> Iterator[_GatheringStore | None]:
    """Stream a sharded module's full tensors to rank 0, one at a time, in whatever order rank 0 reads them.

    ``with gathered_store(module) as store:`` — on rank 0 ``store`` is a weight store (``keys``, ``shape``,
    ``get``…) whose ``get`` gathers one full tensor; the other ranks serve those gathers on entering until
    rank 0 leaves the block (also on an error there), and get ``None``. Host memory: one full tensor plus the
    shards. A collective: every rank enters. Plain (non-DTensor) tensors are read locally.
    """
    tensors = dict(module.state_dict(keep_vars=True))
    rank, world = rank_and_world(group)
    if rank == 0 or world == 1:
        try:
            yield _GatheringStore(module, tensors, group)
        finally:
            if world > 1:
                _request(-1, group)
        return
    keys, device = list(tensors), comm_device(group)
    while True:
        message = torch.empty(1, dtype=torch.int64, device=device)
        dist.broadcast(message, src=_group_rank0(group), group=group)
        if int(message) < 0:
            break
        tensors[keys[int(message)]].detach().full_tensor()
    yield None


def global_rank(group=None) -> int:
    """This process's rank (0 outside ``torch.distributed``)."""
    return rank_and_world(group)[0]


def pad_shard(prompts: list, rank: int, world: int) -> tuple[list, int]:
    """``(this rank's prompts padded to ⌈n/world⌉, how many are real)``. Under FSDP2 every forward pass is a
    collective, so every rank must generate for the same number of prompts; padding repeats the first prompt
    and its answers are dropped."""
    shard = list(prompts[rank::world])
    size = -(-len(prompts) // world) if prompts else 0
    return shard + [prompts[0]] * (size - len(shard)), len(shard)


def synced_generation(model) -> None:
    """Make ``generate`` keep every rank decoding until all are done (transformers' ``synced_gpus``), as it
    does for models it shards itself: transformers does not recognise a model sharded by ``fully_shard`` by
    hand."""
    for module in (model, getattr(model, "get_base_model", lambda: None)()):
        if module is not None:  # transformers' own flag (its apply_fsdp2 sets it; generate reads it)
            module._is_fsdp_managed_module = True


def world_size(group=None) -> int:
    """The number of processes (1 outside ``torch.distributed``)."""
    return rank_and_world(group)[1]
