"""One exact top-k selection over parameters sharded across the ranks of a torch.distributed group.

Each rank holds a shard of one global set of tensors. The selection is an exact radix select over the
bits of the scores (or, for large CPU segments, a sampled bracket: below), with each digit's
histogram all-reduced over the group before the bucket is chosen. Every rank therefore picks the
same threshold and the same number of ties as one process holding every shard would. The histograms
come from the backend's fused ``radix_histogram`` where it has one (``cpu``), else from torch ops (any
device, no host sync).

Global order (which elements equal to the threshold win): rank order, then each rank's local order
(its tensors in list order, each row-major). For a per-tensor selection of parameters sharded on
dim 0 (FSDP2's ``Shard(0)``) that is exactly the row-major order of the full tensor.

Communication per selection: four all-reduces of int64 counts, namely one per digit (11, 11 and
10 bits: 16, 16 and 8 KiB per segment; the first also carries the segment's size) and one of
``world_size`` tie counts per segment, ``8 * (5121 + world_size)`` bytes per segment in all. All stay
on the device; nothing is read back on the host.

A single segment of at least ``BRACKET_MIN_SCORES`` scores on the CPU backend is selected by a sampled
bracket instead (``_bracket_select``): one read of the scores where the radix reads them once per digit,
and six small collectives (the sizes, a global sample of at most 65536 scores, each rank's bracket counts
with a 2048-bin histogram, and the scores of the threshold's bucket). Where the bracket misses, the
radix select above runs, so the result does not depend on the path. ``PECKER_SHARDED_SELECT=radix``
forces the radix select (to compare them).

DTensor parameters (FSDP2 ``fully_shard``) are recognised: their local shards are used and their
1-D mesh supplies the group. Replicated parameters (DDP, or ``Replicate()`` DTensors) need no
communication: every rank holds the same gradients and so selects the same mask.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from .backends import eager
from .backends.base import RADIX_DIGITS, Selection

# (shift, width) of each radix digit, most significant first: 11 + 11 + 10 bits of the fp32 score,
# whose bit pattern orders like the value for non-negative scores (the compiled kernels' digits).
_DIGITS = RADIX_DIGITS


# Types that are never DTensors: the common case, tested without a lookup (every step asks per tensor).
PLAIN_TYPES = (Tensor, torch.nn.Parameter)


def is_dtensor(t: Any) -> bool:
    if type(t) in PLAIN_TYPES:  # the common case, answered without a lookup (every step asks per tensor)
        return False
    # Importing torch.distributed.tensor costs a second; until something has imported it, nothing
    # can be a DTensor, so look it up instead of importing it.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def local(t: Tensor) -> Tensor:
    """This rank's part of ``t``: a DTensor's local shard (sharing its storage), else ``t`` itself."""
    if type(t) in PLAIN_TYPES:  # asked several times per tensor every step: the common case without a call
        return t
    return t.to_local() if is_dtensor(t) else t


def exit_process(code: int = 0) -> NoReturn:
    """End a process that ran gloo collectives as ``sys.exit(code)`` would, without finalising Python.

    torch keeps a gloo process group and its worker threads alive after ``destroy_process_group``. A
    worker still releasing the last collective's tensors while the interpreter finalises waits for the
    GIL, Python ends that thread, and the C++ unwinding aborts the process ("terminate called without an
    active exception", SIGABRT): a finished run reported as failed. Call this last: it destroys the group
    if it is still up, flushes stdout, stderr and logging, and leaves with ``os._exit`` (``atexit``
    handlers do not run).
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or gone: nothing left to flush
            pass
    os._exit(code)


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
    if num_segments == 1 and os.environ.get("PECKER_SHARDED_SELECT") != "radix":
        chosen = _bracket_select(grads, weights, score, ratio, group, impl, device)
        if chosen is not None:
            return chosen
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
    return _rank_share(threshold, take, local_ties, group)


def _rank_share(threshold: Tensor, take: Tensor, local_ties: Tensor, group: Any) -> Selection:
    """This rank's part of a global selection: ``take`` of the ties (per segment, over all ranks) go to
    the lowest global index, so ranks before this one fill the quota first."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    per_rank = torch.zeros(world, local_ties.numel(), dtype=torch.int64, device=local_ties.device)
    per_rank[rank] = local_ties
    dist.all_reduce(per_rank, group=group)
    before = per_rank[:rank].sum(dim=0)
    local_take = torch.minimum((take - before).clamp(min=0), local_ties)
    return Selection(threshold=threshold, take=local_take, ties=local_ties)


# Below this many scores over all ranks the three radix passes cost less than the bracket's collectives.
BRACKET_MIN_SCORES = 1 << 16
_RUN = 16  # scores per sampled run (one cache line of fp32), as the CPU select samples


def _all_gather(values: Tensor, group: Any) -> list[Tensor]:
    """Every rank's ``values`` (same shape on every rank), in rank order."""
    gathered = [torch.empty_like(values) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, values, group=group)
    return gathered


def _all_gather_ragged(values: Tensor, lengths: Sequence[int], group: Any) -> list[Tensor]:
    """Every rank's 1-D ``values``, rank r's of length ``lengths[r]`` (known to every rank)."""
    padded = torch.zeros(max(lengths), dtype=values.dtype)
    padded[: values.numel()] = values
    return [g[:n] for g, n in zip(_all_gather(padded, group), lengths, strict=True)]


def _bracket_select(grads, weights, score, ratio, group, impl, device) -> Selection | None:
    """The global selection of one segment by a sampled bracket, for a backend with fused bracket passes
    (the CPU's): one read of the scores, as the single-process select does, where the radix reads them
    once per digit. A global sample brackets the threshold; one pass counts the scores around the
    bracket and keeps those inside it; the ranks' counts and a histogram of their kept scores find the
    threshold's bucket, whose scores alone are gathered and selected exactly. Six collectives, all
    small. None (on every rank alike) where this does not apply or the bracket missed: the radix
    select then runs. Reads its results on the host: CPU only, where that costs no sync."""
    world, me = dist.get_world_size(group), dist.get_rank(group)
    local_n = sum(g.numel() for g in grads)
    capable = device.type == "cpu" and hasattr(impl, "bracket_counts")
    totals = torch.tensor([local_n, int(capable)], dtype=torch.int64)
    dist.all_reduce(totals, group=group)
    n, capable_ranks = totals.tolist()
    if capable_ranks < world or n < BRACKET_MIN_SCORES:
        return None
    k = max(1, math.floor(ratio * n))  # budget(), as the radix path

    # A sample spread over the global flat order: each rank draws in proportion to its share.
    target = min(max(n // 256, 64 * _RUN), 4096 * _RUN)
    runs = math.ceil(target / _RUN * local_n / n) if local_n else 0
    sample, sampled = impl.sample_scores(grads, weights, score, runs)
    sizes = torch.stack(_all_gather(torch.tensor([sample.numel(), sampled], dtype=torch.int64), group))
    m = int(sizes[:, 1].sum())
    ordered = torch.cat(_all_gather_ragged(sample, sizes[:, 0].tolist(), group)).sort(descending=True).values
    lo, hi, kept_fraction = 0.0, torch.finfo(torch.float32).max, 1.0
    mf = ordered.numel()
    if mf:
        r = min(k * m / n - 0.5, float(m))  # expected position of the k-th largest in the sample
        margin = 4.0 * math.sqrt(max(r, 0.0) + 1.0) + 4.0
        hi_idx, lo_idx = math.floor(r - margin), math.ceil(r + margin)
        if lo_idx < mf:
            lo = float(ordered[max(lo_idx, 0)])
        if hi_idx >= 0:
            hi = float(ordered[min(hi_idx, mf - 1)])
        kept_fraction = max(min(lo_idx, mf) - max(hi_idx, 0), 0) / m
    threads = torch.get_num_threads()
    cap = min(max(local_n // 8, 65536), int(3.0 * kept_fraction * local_n / threads) + 4096)
    local, kept = impl.bracket_counts(grads, weights, score, lo, hi, cap)
    # The kept scores' bucket over the bracket: 2048 bins of their keys (finite non-negative scores
    # order like their bits). Each rank's counts and histogram, so that tie shares need no more rounds.
    key = lambda value: int(torch.tensor([value], dtype=torch.float32).view(torch.int32))  # noqa: E731
    lo_key = key(lo)
    shift = max((key(hi) - lo_key).bit_length() - 11, 0)
    buckets = (kept.view(torch.int32).to(torch.int64) - lo_key) >> shift
    mine = torch.cat([local, torch.bincount(buckets, minlength=2048)])
    per_rank = torch.stack(_all_gather(mine, group))  # [world, 7 + 2048]
    finite, above, eq_hi, eq_lo, mid, _, overflow = per_rank[:, :7].sum(dim=0).tolist()

    def chosen(threshold: float, take: int, ties_per_rank: list[int]) -> Selection:
        before = sum(ties_per_rank[:me])  # ties go to the lowest global index: earlier ranks first
        local_ties = ties_per_rank[me]
        return Selection(
            threshold=torch.tensor([threshold], dtype=torch.float32),
            take=torch.tensor([min(max(take - before, 0), local_ties)], dtype=torch.int64),
            ties=torch.tensor([local_ties], dtype=torch.int64),
        )

    k_eff = min(k, finite)
    if k_eff <= 0:
        return chosen(float("inf"), 0, [0] * world)
    # Descending order of the finite scores: above | == hi | (lo, hi) | == lo | below.
    if k_eff <= above:
        return None
    rank = k_eff - above
    if rank <= eq_hi:
        return chosen(hi, rank, per_rank[:, 2].tolist())
    rank -= eq_hi
    if rank > mid:
        rank -= mid
        return chosen(lo, rank, per_rank[:, 3].tolist()) if rank <= eq_lo else None
    if overflow:
        return None
    at_or_above = per_rank[:, 7:].sum(dim=0).flip(0).cumsum(0).flip(0)
    bucket = int((at_or_above >= rank).sum()) - 1
    rank -= int(at_or_above[bucket + 1]) if bucket + 1 < at_or_above.numel() else 0
    in_bucket = per_rank[:, 7 + bucket].tolist()
    gathered = _all_gather_ragged(kept[buckets == bucket], in_bucket, group)
    candidates = torch.cat(gathered).sort(descending=True).values
    threshold = candidates[rank - 1]
    take = rank - int((candidates > threshold).sum())
    return chosen(float(threshold), take, [int((g == threshold).sum()) for g in gathered])


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
