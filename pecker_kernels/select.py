"""Exact top-k selection over many tensors: the threshold (``select``) and bool masks (``topk_mask``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from . import dispatch, distributed
from .backends import eager
from .backends.base import Selection, budget, empty_masks
from .profiling import nvtx_range
from .validation import check_like, check_list, check_ratio, check_score_and_scope, check_tensors


def segments_of(tensors: Sequence[Tensor], scope: str) -> list[int]:
    """Segment id per tensor: one segment for "global", one per tensor for "per_tensor"."""
    return [0] * len(tensors) if scope == "global" else list(range(len(tensors)))


def budgets(tensors: Sequence[Tensor], segments: Sequence[int], ratio: float) -> list[int]:
    """k = max(1, floor(ratio * N)) for each segment's N elements."""
    totals = [0] * (max(segments) + 1)
    for t, segment in zip(tensors, segments, strict=True):
        totals[segment] += t.numel()
    return [budget(ratio, n) for n in totals]


def select(
    grads: Sequence[Tensor],
    ratio: float,
    *,
    weights: Sequence[Tensor] | None = None,
    score: str = "grad",
    scope: str = "global",
    backend: str = "auto",
    process_group: Any = None,
) -> Selection:
    """Threshold and tie quota of the top ``ratio`` scores of ``grads`` (see ``backends.base``).

    ``score="grad_weight"`` ranks ``|grad * weight|`` and needs ``weights``. Runs on the tensors'
    device without host synchronisation. With ``process_group`` (or sharded DTensors) the tensors are
    this rank's shards of one global set, and the result is this rank's part of the global selection
    (see ``pecker_kernels.distributed``).
    """
    ratio = check_ratio(ratio)
    check_score_and_scope(score, scope)
    check_list("grads", grads)
    group = distributed.resolve_group(grads, process_group)
    grads = [distributed.local(g) for g in grads]
    weights = None if weights is None else [distributed.local(w) for w in weights]
    if group is not None and not grads:
        return distributed.select([], None, score, [], 1 if scope == "global" else 0, ratio, group)
    device = check_tensors("grads", grads)
    if score == "grad_weight":
        if weights is None:
            raise ValueError('score="grad_weight" needs weights (the parameters)')
        check_like("weights", weights, grads, "grads")
    segments = segments_of(grads, scope)
    weights = _list(weights, score)
    impl = dispatch.resolve(backend, device)
    with nvtx_range("select"):
        if group is not None:
            num_segments = max(segments) + 1
            return distributed.select(grads, weights, score, segments, num_segments, ratio, group, impl)
        return impl.select(grads, weights, score, segments, budgets(grads, segments, ratio))


def topk_mask(
    tensors: Sequence[Tensor],
    ratio: float,
    score: str = "grad",
    scope: str = "global",
    *,
    weights: Sequence[Tensor] | None = None,
    backend: str = "auto",
    process_group: Any = None,
) -> list[Tensor]:
    """Bool mask per tensor marking the exactly-k most salient elements.

    ``tensors`` are gradients, or parameters that all have ``.grad`` set (then they are also the weights
    of ``score="grad_weight"``); parameters of which some lack ``.grad`` are refused. Ties at the
    threshold go to the lower flat index; non-finite scores are never selected. With ``process_group``
    (or sharded DTensors) the masks are this rank's part of one selection over every rank's shards
    (DTensors in, DTensors out).
    """
    check_list("tensors", tensors)
    tensors = list(tensors)
    with_grad = [getattr(t, "grad", None) is not None for t in tensors]
    if tensors and all(with_grad):
        weights = tensors if weights is None else weights
        tensors = [t.grad for t in tensors]
    elif any(with_grad) or any(getattr(t, "requires_grad", False) for t in tensors):
        # Parameters, not gradients: ranking their values instead of missing gradients would be silent.
        missing = [i for i, has in enumerate(with_grad) if not has]
        raise ValueError(
            f"topk_mask got parameters, but tensors {missing[:5]} have no .grad; "
            "pass the gradients themselves, or parameters that all have .grad"
        )
    tensors = [t.detach() for t in tensors]
    weights = None if weights is None else [w.detach() for w in weights]
    selection = select(
        tensors,
        ratio,
        weights=weights,
        score=score,
        scope=scope,
        backend=backend,
        process_group=process_group,
    )
    shards = [distributed.local(t) for t in tensors]
    if not shards:
        return []
    shard_weights = None if weights is None else [distributed.local(w) for w in weights]
    impl = dispatch.resolve(backend, shards[0].device)
    masks = empty_masks(shards)
    with nvtx_range("write_masks"):
        impl.write_masks(
            shards, _list(shard_weights, score), score, segments_of(shards, scope), selection, masks
        )
    return [
        distributed.like(eager.unpack(m, s.numel()).view(s.shape), t)
        for m, s, t in zip(masks, shards, tensors, strict=True)
    ]


def _list(weights: Sequence[Tensor] | None, score: str) -> list[Tensor] | None:
    return list(weights) if score == "grad_weight" and weights is not None else None


__all__ = ["Selection", "budgets", "segments_of", "select", "topk_mask"]
