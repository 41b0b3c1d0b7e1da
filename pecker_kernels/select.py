"""Exact top-k selection over many tensors: the threshold (``select``) and bool masks (``topk_mask``)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from . import dispatch
from .backends import eager
from .backends.base import Selection, budget, empty_masks
from .profiling import nvtx_range
from .validation import check_like, check_ratio, check_score_and_scope, check_tensors


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
) -> Selection:
    """Threshold and tie quota of the top ``ratio`` scores of ``grads`` (see ``backends.base``).

    ``score="grad_weight"`` ranks ``|grad * weight|`` and needs ``weights``. Runs on the tensors'
    device without host synchronisation.
    """
    ratio = check_ratio(ratio)
    check_score_and_scope(score, scope)
    device = check_tensors("grads", grads)
    if score == "grad_weight":
        if weights is None:
            raise ValueError('score="grad_weight" needs weights (the parameters)')
        check_like("weights", weights, grads, "grads")
    impl = dispatch.resolve(backend, device)
    segments = segments_of(grads, scope)
    with nvtx_range("select"):
        return impl.select(
            list(grads), _list(weights, score), score, segments, budgets(grads, segments, ratio)
        )


def topk_mask(
    tensors: Sequence[Tensor],
    ratio: float,
    score: str = "grad",
    scope: str = "global",
    *,
    weights: Sequence[Tensor] | None = None,
    backend: str = "auto",
) -> list[Tensor]:
    """Bool mask per tensor marking the exactly-k most salient elements.

    ``tensors`` are gradients, or parameters whose ``.grad`` is set (then they are also the weights of
    ``score="grad_weight"``). Ties at the threshold go to the lower flat index; non-finite scores are
    never selected.
    """
    tensors = list(tensors)
    if tensors and all(getattr(t, "grad", None) is not None for t in tensors):
        weights = tensors if weights is None else weights
        tensors = [t.grad for t in tensors]
    tensors = [t.detach() for t in tensors]
    weights = None if weights is None else [w.detach() for w in weights]
    selection = select(tensors, ratio, weights=weights, score=score, scope=scope, backend=backend)
    impl = dispatch.resolve(backend, tensors[0].device)
    masks = empty_masks(tensors)
    with nvtx_range("write_masks"):
        impl.write_masks(tensors, _list(weights, score), score, segments_of(tensors, scope), selection, masks)
    return [eager.unpack(m, t.numel()).view(t.shape) for m, t in zip(masks, tensors, strict=True)]


def _list(weights: Sequence[Tensor] | None, score: str) -> list[Tensor] | None:
    return list(weights) if score == "grad_weight" and weights is not None else None


__all__ = ["Selection", "budgets", "segments_of", "select", "topk_mask"]
