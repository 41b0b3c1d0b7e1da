"""One exact top-k selection over parameters sharded across the ranks of a torch.distributed group.

Each rank holds a shard of one global set of tensors. The selection is an exact radix select over the
bits of the scores, with each digit's histogram all-reduced over the group before the bucket is
chosen. Every rank therefore picks the same threshold and the same number of ties as one process
holding every shard would. The histograms come from the backend's fused ``radix_histogram`` where it
has one (``cpu``), else from torch ops (any device, no host sync).

Global order (which elements equal to the threshold win): rank order, then each rank's local order
(its tensors in list order, each row-major). For a per-tensor selection of parameters sharded on
dim 0 (FSDP2's ``Shard(0)``) that is exactly the row-major order of the full tensor.

Communication per selection: four all-reduces of int64 counts, namely one per digit (11, 11 and
10 bits: 16, 16 and 8 KiB per segment; the first also carries the segment's size) and one of
``world_size`` tie counts per segment, ``8 * (5121 + world_size)`` bytes per segment in all. All stay
on the device; nothing is read back on the host.

DTensor parameters (FSDP2 ``fully_shard``) are recognised: their local shards are used and their
1-D mesh supplies the group. Replicated parameters (DDP, or ``Replicate()`` DTensors) need no
communication: every rank holds the same gradients and so selects the same mask.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from .backends import eager
from .backends.base import RADIX_DIGITS, Selection

# (shift, width) of each radix digit, most significant first: 11 + 11 + 10 bits of the fp32 score,
# whose bit pattern orders like the value for non-negative scores (the compiled kernels' digits).
_DIGITS = RADIX_DIGITS


_PLAIN = (Tensor, torch.nn.Parameter)


def is_dtensor(t: Any) -> bool:
    if type(t) in _PLAIN:  # the common case, answered without a lookup (every step asks per tensor)
        return False
    # Importing torch.distributed.tensor costs a second; until something has imported it, nothing
    # can be a DTensor, so look it up instead of importing it.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def local(t: Tensor) -> Tensor:
    """This rank's part of ``t``: a DTensor's local shard (sharing its storage), else ``t`` itself."""
    return t.to_local() if is_dtensor(t) else t


def like(value: Tensor, reference: Tensor) -> Tensor:
    """``value`` (shaped like ``reference``'s local part) as a DTensor laid out like ``reference``."""
    if not is_dtensor(reference):
        return value
    return type(reference).from_local(
        value,
        reference.device_mesh,
        reference.placements,
        run_check=False,
        shape=reference.shape,
        stride=reference.stride(),
    )


def resolve_group(tensors: Sequence[Tensor], process_group: Any = None) -> Any:
    """The group whose ranks share one selection over ``tensors``, or None for a local selection.

    ``process_group`` is a ``ProcessGroup`` or ``"world"``; without one, sharded DTensors bring their
    mesh's group. Raises on anything that would make ranks disagree silently.
    """
    if process_group is not None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "process_group was given but torch.distributed is not initialised; "
                "call torch.distributed.init_process_group first (torchrun sets up its environment)"
            )
        if isinstance(process_group, str):
            if process_group != "world":
                raise ValueError(f"process_group must be a ProcessGroup or 'world', got {process_group!r}")
            process_group = dist.group.WORLD
    dtensors = [t for t in tensors if is_dtensor(t)]
    if not dtensors:
        return process_group
    from torch.distributed.tensor import Replicate, Shard

    if len(dtensors) != len(tensors):
        raise ValueError(
            "a selection scope mixes DTensor and plain parameters; shard them all (fully_shard the whole "
            "model) or give the plain ones their own param group with scope='per_tensor'"
        )
    mesh = dtensors[0].device_mesh
    for t in dtensors[1:]:
        if t.device_mesh != mesh:
            raise ValueError(
                f"DTensor parameters of one selection scope live on different device meshes ({mesh} and "
                f"{t.device_mesh}); one global selection needs one mesh"
            )
    if mesh.ndim != 1:
        raise NotImplementedError(
            f"DTensor parameters on a {mesh.ndim}-D mesh are not supported; use a 1-D mesh (FSDP2)"
        )
    kinds = {type(p) for t in dtensors for p in t.placements}
    if kinds == {Replicate}:  # every rank holds everything: a local selection agrees already
        if process_group is not None:
            raise ValueError("the DTensor parameters are replicated; a process_group would count them twice")
        return None
    if kinds != {Shard}:
        raise ValueError("a selection scope mixes sharded and replicated DTensor parameters; shard them all")
    if (
        process_group is not None
        and dist.get_process_group_ranks(process_group) != mesh.mesh.flatten().tolist()
    ):
        raise ValueError(
            "process_group differs from the device mesh of the DTensor parameters; leave process_group "
            "unset and the mesh's group is used"
        )
    return mesh.get_group()


def comm_device(group: Any, tensors: Sequence[Tensor]) -> torch.device:
    """Where the counts live: with the tensors, or (a rank holding none) where the backend wants them."""
    if tensors:
        return tensors[0].device
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_same_on_all_ranks(group: Any, what: str, values: Sequence[float], device: torch.device) -> None:
    """Raise ValueError on every rank unless every rank passed the same ``values`` (setup only:
    this reads the result back on the host)."""
    length = torch.tensor([len(values), -len(values)], dtype=torch.float64, device=device)
    dist.all_reduce(length, op=dist.ReduceOp.MAX, group=group)
    same = int(length[0]) == -int(length[1])
    if same:
        vector = torch.tensor(list(values), dtype=torch.float64, device=device)
        both = torch.cat([vector, -vector])
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
        same = bool(torch.equal(both[: len(values)], -both[len(values) :]))
    if not same:
        raise ValueError(
            f"{what} differ across the ranks of the process group; every rank must build the optimizer "
            "with the same param groups, options and (for scope='per_tensor') number of parameters"
        )


def select(
    grads: Sequence[Tensor],
    weights: Sequence[Tensor] | None,
    score: str,
    segments: Sequence[int],
    num_segments: int,
    ratio: float,
    group: Any,
    impl: Any = None,
) -> Selection:
    """This rank's part of the global selection of the top ``ratio`` of each segment's scores.

    ``grads`` (and ``weights``) are this rank's local tensors; ``segments`` numbers them as every rank
    does. The threshold is global; ``take`` and ``ties`` are this rank's share of the ties, so the
    result plugs straight into a backend's ``update`` or ``write_masks`` over the local tensors.
    ``impl`` (a backend module) counts the digits when it has a fused ``radix_histogram``.
    """
    device = comm_device(group, grads)
    count = _histogram_counter(impl, grads, weights, score, segments, num_segments, device)
    sizes = [0] * num_segments
    for g, segment in zip(grads, segments, strict=True):
        sizes[segment] += g.numel()
    prefix = torch.zeros(num_segments, dtype=torch.int64, device=device)
    for digit, (_, width) in enumerate(_DIGITS):
        local_counts = count(digit, prefix)
        if digit == 0:  # one round also sums each segment's size and finite count
            sizes_column = torch.tensor(sizes, dtype=torch.int64, device=device)[:, None]
            counts = torch.cat([local_counts, sizes_column], dim=1)
            dist.all_reduce(counts, group=group)
            counts, total = counts[:, :-1], counts[:, -1].to(torch.float64)
            k = torch.floor(ratio * total).clamp(min=1).to(torch.int64)  # budget(): max(1, floor(ratio*N))
            remaining = torch.minimum(k, counts.sum(dim=1))
            found = remaining > 0
        else:
            counts = local_counts.clone()
            dist.all_reduce(counts, group=group)
        at_or_above = counts.flip(1).cumsum(1).flip(1)  # [S, bins]: candidates with digit >= b
        bucket = ((at_or_above >= remaining[:, None]).sum(dim=1) - 1).clamp(min=0)
        above = F.pad(at_or_above, (0, 1)).gather(1, (bucket + 1)[:, None]).squeeze(1)
        remaining = remaining - above
        prefix = (prefix << width) | bucket
    zero = torch.zeros_like(remaining)
    threshold = prefix.to(torch.int32).view(torch.float32)
    threshold = torch.where(found, threshold, torch.full_like(threshold, float("inf")))
    take = torch.where(found, remaining, zero)
    local_ties = torch.where(found, local_counts.gather(1, bucket[:, None]).squeeze(1), zero)
    # Ties go to the lowest global index: ranks before this one fill the quota first.
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    per_rank = torch.zeros(world, num_segments, dtype=torch.int64, device=device)
    per_rank[rank] = local_ties
    dist.all_reduce(per_rank, group=group)
    before = per_rank[:rank].sum(dim=0)
    local_take = torch.minimum((take - before).clamp(min=0), local_ties)
    return Selection(threshold=threshold, take=local_take, ties=local_ties)


def _histogram_counter(impl, grads, weights, score, segments, num_segments, device):
    """``count(digit, prefix) -> int64 [num_segments, 2 ** width]``: this rank's digit histogram of
    the finite scores whose higher digits equal ``prefix[segment]``."""
    if grads and hasattr(impl, "radix_histogram"):  # fused: scores recomputed on the fly, never stored
        return lambda digit, prefix: impl.radix_histogram(
            grads, weights, score, segments, num_segments, digit, prefix
        )[:, : 1 << _DIGITS[digit][1]]
    keys = [  # torch ops: any device, no host sync; non-finite scores are -1.0, negative as int32
        eager.scores(g, None if weights is None else weights[i], score).view(torch.int32)
        for i, g in enumerate(grads)
    ]

    def count(digit: int, prefix: Tensor) -> Tensor:
        shift, width = _DIGITS[digit]
        bins = 1 << width
        hist = torch.zeros(num_segments, bins + 1, dtype=torch.int64, device=device)
        for key, segment in zip(keys, segments, strict=True):
            candidate = key >= 0
            if digit > 0:
                candidate &= (key >> (shift + width)).to(torch.int64) == prefix[segment]
            # The spare bin collects what is not a candidate; scatter_add_ (unlike bincount) never syncs.
            index = torch.where(candidate, (key >> shift) & (bins - 1), bins).to(torch.int64)
            hist[segment].scatter_add_(0, index, torch.ones_like(index))
        return hist[:, :bins]

    return count
