"""Triton implementation of the backend contract (kernels in ``triton_kernels``).

One launch per dtype group and op, over a cached *work list* of chunks of every tensor of the group.
Selection is a three-pass MSD radix select (11 + 11 + 10 bits of the fp32 score): each pass builds
per-segment histograms, then a small kernel picks each segment's bucket on the device, so nothing is
read back on the host. On CPU tensors the kernels run under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .base import Selection, StepConfig, TensorGroup, kernel_params

try:
    import triton
    import triton.language as tl

    from . import triton_kernels as K
except ImportError:  # the backend is simply unavailable
    triton = None

name = "triton"

BLOCK = 1024  # elements per step of a program
CHUNK = 16 * BLOCK  # elements per program (a multiple of 32: packed mask words never straddle chunks)
NUM_WARPS = 4
# The interpreter pays milliseconds per program: it picks for many segments per program. A GPU picks
# one segment per program (the kernel is the same; ROWS only sets the tile height).
INTERPRETER_PICK_ROWS = 32
_CACHE_SIZE = 32


def is_available(device: torch.device) -> bool:
    if triton is None:
        return False
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


@dataclass
class _Launch:
    """The work of one dtype group: chunks as (row, start, count, segment, item), and base addresses."""

    dtype: torch.dtype
    state_dtype: torch.dtype  # of the moments (update); fp32 elsewhere
    items: Tensor  # int64 [chunks, 5]
    addrs: Tensor  # int64 [tensors, columns]

    @property
    def grid(self) -> tuple[int]:
        return (self.items.shape[0],)


@dataclass
class _Plan:
    launches: list[_Launch]
    num_items: int
    segment_first: Tensor  # int64 [items]: the first item of each item's segment (for the tie scan)


# The update kernel's scalar arguments, each taken from the kernel_params field named here.
_SCALAR_ARGS = {
    "lr": "lr",
    "decay": "decay_factor",
    "weight_decay": "weight_decay",
    "beta1_c": "one_minus_beta1",
    "beta2": "beta2",
    "beta2_c": "one_minus_beta2",
    "eps": "eps",
    "step_size": "step_size",
    "bias_correction2_sqrt": "bias_correction2_sqrt",
    "momentum": "momentum",
    "dampening_c": "one_minus_dampening",
    "clip_value": "clip_value",
    "ema_c": "one_minus_ema_decay",
}

_plans: OrderedDict[tuple, _Plan] = OrderedDict()
_budgets: OrderedDict[tuple, Tensor] = OrderedDict()


def _cached(cache: OrderedDict, key: tuple, make):
    """``cache[key]``, made on a miss; the least recently used entries go beyond ``_CACHE_SIZE``."""
    value = cache.get(key)
    if value is None:
        value = cache[key] = make()
        if len(cache) > _CACHE_SIZE:
            cache.popitem(last=False)
    cache.move_to_end(key)
    return value


def _tl_dtype(dtype: torch.dtype) -> tl.dtype:
    return {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]


def _plan(
    tensors: Sequence[Tensor],
    columns: Sequence[Sequence[Tensor | None] | None],
    segments,
    state_dtypes: Sequence[torch.dtype] | None = None,
) -> _Plan:
    """The work lists of ``tensors`` (which fix sizes and dtypes); ``columns`` give the addresses.
    One launch per (tensor dtype, ``state_dtypes`` entry): the update's moment dtype, fp32 if None.

    Cached on every address, size and dtype, so a training loop builds it once: the device tensors it
    holds make later calls free of host-to-device copies.
    """
    state_dtypes = tuple(state_dtypes or [torch.float32] * len(tensors))
    key = (
        tuple((t.data_ptr(), t.numel(), t.dtype) for t in tensors),
        tuple(None if c is None else tuple(0 if t is None else t.data_ptr() for t in c) for c in columns),
        tuple(segments),
        state_dtypes,
    )
    return _cached(_plans, key, lambda: _build_plan(tensors, columns, segments, state_dtypes))


def _build_plan(tensors, columns, segments, state_dtypes) -> _Plan:
    # Items are numbered in segment-major flat order, so a segment's chunks are consecutive.
    order = sorted(range(len(tensors)), key=lambda i: (segments[i], i))
    item_of: dict[tuple[int, int], int] = {}
    segment_first: list[int] = []
    first_of_segment: dict[int, int] = {}
    for i in order:
        for start in range(0, tensors[i].numel(), CHUNK):
            item = len(segment_first)
            first_of_segment.setdefault(segments[i], item)
            item_of[i, start] = item
            segment_first.append(first_of_segment[segments[i]])
    device = tensors[0].device
    launches = []
    kinds = [(t.dtype, s) for t, s in zip(tensors, state_dtypes, strict=True)]
    for dtype, state_dtype in dict.fromkeys(kinds):
        members = [i for i, k in enumerate(kinds) if k == (dtype, state_dtype) and tensors[i].numel() > 0]
        if not members:
            continue
        rows = [
            (row, start, min(CHUNK, tensors[i].numel() - start), segments[i], item_of[i, start])
            for row, i in enumerate(members)
            for start in range(0, tensors[i].numel(), CHUNK)
        ]
        addrs = [[0 if c is None or c[i] is None else c[i].data_ptr() for c in columns] for i in members]
        launches.append(
            _Launch(
                dtype,
                state_dtype,
                torch.tensor(rows, dtype=torch.int64, device=device),
                torch.tensor(addrs, dtype=torch.int64, device=device),
            )
        )
    return _Plan(launches, len(segment_first), torch.tensor(segment_first, dtype=torch.int64, device=device))


def select(
    grads: Sequence[Tensor],
    weights: Sequence[Tensor] | None,
    score: str,
    segments: Sequence[int],
    ks: Sequence[int],
) -> Selection:
    device = grads[0].device
    num_segments = len(ks)
    plan = _plan(grads, [grads, weights], segments)
    weighted = score == "grad_weight"
    # Cached like the plans: no host-to-device copy once a training loop has settled.
    k = _cached(_budgets, (device, *ks), lambda: torch.tensor(list(ks), dtype=torch.int64, device=device))
    hist = torch.zeros(num_segments, K.NUM_BINS.value, dtype=torch.int32, device=device)
    prefix = torch.zeros(num_segments, dtype=torch.int32, device=device)
    remaining = torch.zeros(num_segments, dtype=torch.int64, device=device)
    threshold = torch.empty(num_segments, dtype=torch.float32, device=device)
    take = torch.empty(num_segments, dtype=torch.int64, device=device)
    ties = torch.empty(num_segments, dtype=torch.int64, device=device)
    rows = 1 if device.type == "cuda" else INTERPRETER_PICK_ROWS
    for index, (prefix_shift, digit_shift, digit_bits) in enumerate(K.PASSES):
        for launch in plan.launches:
            K._histogram_kernel[launch.grid](
                launch.items,
                launch.addrs,
                prefix,
                hist,
                DTYPE=_tl_dtype(launch.dtype),
                WEIGHTED=weighted,
                PREFIX_SHIFT=prefix_shift,
                DIGIT_SHIFT=digit_shift,
                BLOCK=BLOCK,
                num_warps=NUM_WARPS,
            )
        K._pick_kernel[(triton.cdiv(num_segments, rows),)](
            hist,
            prefix,
            remaining,
            k,
            threshold,
            take,
            ties,
            num_segments,
            DIGIT_BITS=digit_bits,
            FIRST=index == 0,
            LAST=index == len(K.PASSES) - 1,
            ROWS=rows,
            num_warps=NUM_WARPS,
        )
    return Selection(threshold=threshold, take=take, ties=ties)


def _tie_bases(plan: _Plan, selection: Selection, weighted: bool, g_column: int, w_column: int) -> Tensor:
    """Per item: elements equal to the threshold in the earlier chunks of its segment (flat order)."""
    counts = torch.zeros(plan.num_items, dtype=torch.int64, device=selection.take.device)
    for launch in plan.launches:
        K._tie_count_kernel[launch.grid](
            launch.items,
            launch.addrs,
            selection.threshold,
            selection.take,
            selection.ties,
            counts,
            DTYPE=_tl_dtype(launch.dtype),
            WEIGHTED=weighted,
            G_COLUMN=g_column,
            W_COLUMN=w_column,
            NUM_COLUMNS=launch.addrs.shape[1],
            BLOCK=BLOCK,
            num_warps=NUM_WARPS,
        )
    before = torch.cumsum(counts, 0) - counts  # exclusive scan over all items, on the device
    return before - before[plan.segment_first]


def write_masks(
    grads: Sequence[Tensor],
    weights: Sequence[Tensor] | None,
    score: str,
    segments: Sequence[int],
    selection: Selection,
    masks_out: Sequence[Tensor],
) -> None:
    plan = _plan(grads, [grads, weights, masks_out], segments)
    weighted = score == "grad_weight"
    tie_base = _tie_bases(plan, selection, weighted, 0, 1)
    for launch in plan.launches:
        K._mask_kernel[launch.grid](
            launch.items,
            launch.addrs,
            selection.threshold,
            selection.take,
            selection.ties,
            tie_base,
            DTYPE=_tl_dtype(launch.dtype),
            WEIGHTED=weighted,
            BLOCK=BLOCK,
            num_warps=NUM_WARPS,
        )


def update(
    group: TensorGroup,
    config: StepConfig,
    score: str,
    segments: Sequence[int],
    selection: Selection | None = None,
    masks_in: Sequence[Tensor] | None = None,
    masks_out: Sequence[Tensor] | None = None,
) -> None:
    c = config
    columns = [group.params, group.grads, group.exp_avg, group.exp_avg_sq, group.ema, masks_in, masks_out]
    plan = _plan(group.params, columns, segments, group.state_dtypes())
    weighted = score == "grad_weight"
    device = group.params[0].device
    if selection is not None:
        tie_base = _tie_bases(plan, selection, weighted, 1, 0)
        threshold, take, ties = selection.threshold, selection.take, selection.ties
    else:  # unused by the kernel (MASK_IN), but every argument needs a tensor
        threshold = torch.zeros(1, dtype=torch.float32, device=device)
        tie_base = take = ties = torch.zeros(1, dtype=torch.int64, device=device)
    k = kernel_params(c, has_exp_avg=group.exp_avg is not None, has_ema=group.ema is not None)
    host_scalars = {arg: k[field] for arg, field in _SCALAR_ARGS.items()}
    for launch in plan.launches:
        K._update_kernel[launch.grid](
            launch.items,
            launch.addrs,
            threshold,
            take,
            ties,
            tie_base,
            threshold if c.scalars is None else c.scalars,  # unused without HAS_SCALARS: any fp32 tensor
            **host_scalars,
            DTYPE=_tl_dtype(launch.dtype),
            STATE_DTYPE=_tl_dtype(launch.state_dtype),
            WEIGHTED=weighted,
            KIND=k["kind"],
            HAS_M=bool(k["has_exp_avg"]),
            L2=c.kind != "adamw" and c.weight_decay != 0,
            CLIP=bool(k["has_clip"]),
            NESTEROV=bool(k["nesterov"]),
            MOMENTUM_INIT=bool(k["momentum_init"]) and c.scalars is None,  # else from the scalars, run time
            EMA=bool(k["has_ema"]),
            MAXIMIZE=bool(k["maximize"]),
            MASK_IN=selection is None,
            MASK_OUT=masks_out is not None,
            HAS_SCALARS=c.scalars is not None,
            BLOCK=BLOCK,
            num_warps=NUM_WARPS,
        )
