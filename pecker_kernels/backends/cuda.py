"""CUDA backend: the contract of ``base`` on the kernels of ``csrc/cuda`` (module ``_C_cuda``).

The kernels take raw addresses, so this module owns the bookkeeping:

* a *tensor table* (int64 ``[n_tensors, 16]``, ``TensorDesc`` in ``csrc/cuda/api.h``): addresses,
  sizes, dtypes and segment of every tensor of the scope;
* a *work list* of chunks (``CHUNK`` elements of one tensor each), grouped by segment in flat order,
  plus each segment's chunk range. One launch covers every tensor of the scope, whatever their number.

Both are cached (keyed on addresses, sizes, dtypes and segments) so a training loop builds and uploads
them once; uploads go through pinned memory without blocking the host. Scratch buffers come from
torch's caching allocator on the current stream, and every launch goes on that stream. Nothing is
ever read back on the host.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from . import native
from .base import DTYPE_CODES, Selection, StepConfig, TensorGroup, kernel_params

name = "cuda"

_CACHE_SIZE = 64

# Columns of the tensor table: TensorDesc's fields in order (csrc/cuda/api.h; _C_cuda.TENSOR_DESC_OFFSETS
# gives each field's int64 offset, checked in tests/test_layouts.py); "reserved" columns are 0.
TENSOR_COLUMNS = (
    "g",
    "w",
    "p",
    "m",
    "v",
    "e",
    "mask_in",
    "mask_out",
    "numel",
    "segment",
    "dtype",
    "w_dtype",
    "state_dtype",
    "reserved",
    "reserved",
    "reserved",
)


def is_available(device: torch.device) -> bool:
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.is_available() and native.cuda_module is not None


def _module():
    module = native.cuda_module
    if module is None:
        raise RuntimeError("the CUDA backend needs pecker_kernels._C_cuda, which is not built")
    return module


class _LRU(OrderedDict):
    def get_or_build(self, key, build):
        value = self.get(key)
        if value is None:
            value = build()
            self[key] = value
            if len(self) > _CACHE_SIZE:
                self.popitem(last=False)
        else:
            self.move_to_end(key)
        return value


_layouts = _LRU()
_tables = _LRU()
_constants = _LRU()
_num_sms: dict[int, int] = {}


def _upload(rows, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Host data -> device tensor without blocking the host (pinned staging, stream-ordered copy)."""
    host = torch.tensor(rows, dtype=dtype)
    return host.pin_memory().to(device, non_blocking=True)


@dataclass(frozen=True)
class _Layout:
    chunks: Tensor  # int64 [n_chunks, 2]: (tensor | segment << 32, start)
    seg_ranges: Tensor  # int64 [n_segments, 2]: [first chunk, end chunk)
    n_chunks: int
    n_segments: int


def _build_layout(device: torch.device, numels: tuple[int, ...], segments: tuple[int, ...], n_segments: int):
    chunk = _module().CHUNK
    members: list[list[int]] = [[] for _ in range(n_segments)]
    for index, segment in enumerate(segments):
        members[segment].append(index)
    parts, ranges, n_chunks = [], [], 0
    for segment, indices in enumerate(members):
        begin = n_chunks
        for index in indices:
            starts = torch.arange(0, numels[index], chunk, dtype=torch.int64)
            ids = torch.full_like(starts, index | (segment << 32))
            parts.append(torch.stack((ids, starts), dim=1))
            n_chunks += starts.numel()
        ranges.append([begin, n_chunks])
    chunks = torch.cat(parts) if parts else torch.empty((0, 2), dtype=torch.int64)
    return _Layout(
        chunks=chunks.pin_memory().to(device, non_blocking=True) if n_chunks else chunks.to(device),
        seg_ranges=_upload(ranges, torch.int64, device).reshape(n_segments, 2),
        n_chunks=n_chunks,
        n_segments=n_segments,
    )


def _layout(device: torch.device, tensors: Sequence[Tensor], segments: Sequence[int], n_segments: int):
    segments = tuple(int(s) for s in segments)
    if len(segments) != len(tensors):
        raise ValueError(f"segments: expected {len(tensors)} entries (one per tensor), got {len(segments)}")
    if any(s < 0 or s >= n_segments for s in segments):
        raise ValueError(f"segments: every entry must lie in [0, {n_segments})")
    numels = tuple(t.numel() for t in tensors)
    key = (device, numels, segments, n_segments)
    return _layouts.get_or_build(key, lambda: _build_layout(device, numels, segments, n_segments))


def _addr(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _table(
    device: torch.device,
    *,
    grads,
    segments,
    weights=None,
    params=None,
    exp_avg=None,
    exp_avg_sq=None,
    ema=None,
    masks_in=None,
    masks_out=None,
) -> Tensor:
    """The tensor table (``TensorDesc`` rows), cached on everything the kernels read from it."""
    rows = []
    for i, g in enumerate(grads):

        def at(lst, i=i):
            return None if lst is None else lst[i]

        w, p, m, v, e, mi, mo = (
            at(x) for x in (weights, params, exp_avg, exp_avg_sq, ema, masks_in, masks_out)
        )
        # Moments in fp32 or bf16 (one dtype for both), the EMA in fp32.
        state_dtype = torch.float32 if m is None and v is None else (m if m is not None else v).dtype
        addresses = (g, w, p, m, v, e, mi, mo)
        row = dict(zip(TENSOR_COLUMNS[: len(addresses)], map(_addr, addresses), strict=True))
        row.update(
            numel=g.numel(),
            segment=int(segments[i]),
            dtype=DTYPE_CODES[g.dtype],
            w_dtype=-1 if w is None else DTYPE_CODES[w.dtype],
            state_dtype=DTYPE_CODES[state_dtype],
        )
        rows.append([row.get(column, 0) for column in TENSOR_COLUMNS])
    key = (device, tuple(rows))
    return _tables.get_or_build(key, lambda: _upload(rows, torch.int64, device))


def _constant(device: torch.device, values: tuple[int, ...]) -> Tensor:
    return _constants.get_or_build((device, values), lambda: _upload(list(values), torch.int64, device))


def _sms(device: torch.device) -> int:
    if device.index not in _num_sms:
        _num_sms[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    return _num_sms[device.index]


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _selection_on(selection: Selection, device: torch.device, n_segments: int) -> Selection:
    if selection.threshold.numel() != n_segments:
        raise ValueError(f"selection: expected {n_segments} segments, got {selection.threshold.numel()}")
    return Selection(
        threshold=selection.threshold.to(device=device, dtype=torch.float32).contiguous(),
        take=selection.take.to(device=device, dtype=torch.int64).contiguous(),
        ties=selection.ties.to(device=device, dtype=torch.int64).contiguous(),
    )


def select(
    grads: Sequence[Tensor],
    weights: Sequence[Tensor] | None,
    score: str,
    segments: Sequence[int],
    ks: Sequence[int],
) -> Selection:
    device = grads[0].device
    weighted = score == "grad_weight"
    n_segments = len(ks)
    layout = _layout(device, grads, segments, n_segments)
    table = _table(device, grads=grads, segments=segments, weights=weights if weighted else None)
    ks_dev = _constant(device, tuple(int(k) for k in ks))
    hist = torch.empty((n_segments, _module().RADIX_BINS), dtype=torch.int64, device=device)
    state = torch.empty((n_segments, 2), dtype=torch.int64, device=device)
    threshold = torch.empty(n_segments, dtype=torch.float32, device=device)
    take = torch.empty(n_segments, dtype=torch.int64, device=device)
    ties = torch.empty(n_segments, dtype=torch.int64, device=device)
    with torch.cuda.device(device):
        _module().select(
            tensors=table.data_ptr(),
            chunks=layout.chunks.data_ptr(),
            n_chunks=layout.n_chunks,
            seg_ranges=layout.seg_ranges.data_ptr(),
            n_segments=n_segments,
            ks=ks_dev.data_ptr(),
            hist=hist.data_ptr(),
            state=state.data_ptr(),
            threshold=threshold.data_ptr(),
            take=take.data_ptr(),
            ties=ties.data_ptr(),
            num_sms=_sms(device),
            stream=_stream(device),
        )
    return Selection(threshold=threshold, take=take, ties=ties)


def _selection_args(selection: Selection | None, layout: _Layout, device: torch.device):
    """Kernel arguments of a selection plus its tie-rank scratch (returned too, to keep it alive)."""
    if selection is None:
        return {"threshold": 0, "take": 0, "ties": 0, "chunk_ties": 0, "chunk_base": 0}, ()
    # Freed when the caller returns: the caching allocator reuses the memory only for work queued
    # later on this stream, i.e. after the kernels that use it.
    chunk_ties = torch.empty(layout.n_chunks, dtype=torch.int64, device=device)
    chunk_base = torch.empty(layout.n_chunks, dtype=torch.int64, device=device)
    args = {
        "threshold": selection.threshold.data_ptr(),
        "take": selection.take.data_ptr(),
        "ties": selection.ties.data_ptr(),
        "chunk_ties": chunk_ties.data_ptr(),
        "chunk_base": chunk_base.data_ptr(),
    }
    return args, (selection, chunk_ties, chunk_base)


def write_masks(grads, weights, score, segments, selection: Selection, masks_out) -> None:
    device = grads[0].device
    weighted = score == "grad_weight"
    n_segments = selection.threshold.numel()
    selection = _selection_on(selection, device, n_segments)
    layout = _layout(device, grads, segments, n_segments)
    table = _table(
        device, grads=grads, segments=segments, weights=weights if weighted else None, masks_out=masks_out
    )
    sel, _scratch = _selection_args(selection, layout, device)
    with torch.cuda.device(device):
        _module().write_masks(
            tensors=table.data_ptr(),
            chunks=layout.chunks.data_ptr(),
            n_chunks=layout.n_chunks,
            seg_ranges=layout.seg_ranges.data_ptr(),
            n_segments=n_segments,
            stream=_stream(device),
            **sel,
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
    params, grads = list(group.params), list(group.grads)
    if not params:
        return
    adam = config.kind != "sgd"
    weighted = score == "grad_weight"
    device = params[0].device
    scalars_addr = _addr(config.scalars)  # read by the kernel, never by the host
    if selection is not None:
        n_segments = selection.threshold.numel()
        selection = _selection_on(selection, device, n_segments)
    else:
        n_segments = max((int(s) for s in segments), default=-1) + 1
    layout = _layout(device, params, segments, n_segments)
    table = _table(
        device,
        grads=grads,
        segments=segments,
        weights=params if weighted else None,  # the tie-rank pass scores |g * p| from this slot
        params=params,
        exp_avg=group.exp_avg,
        exp_avg_sq=group.exp_avg_sq if adam else None,
        ema=group.ema,
        masks_in=masks_in,
        masks_out=masks_out,
    )
    sel, _scratch = _selection_args(selection, layout, device)
    module = _module()
    step_params = module.StepParams()
    has_ema = group.ema is not None
    for field, value in kernel_params(config, has_exp_avg=group.exp_avg is not None, has_ema=has_ema).items():
        setattr(step_params, field, value)
    with torch.cuda.device(device):
        module.update(
            tensors=table.data_ptr(),
            chunks=layout.chunks.data_ptr(),
            n_chunks=layout.n_chunks,
            seg_ranges=layout.seg_ranges.data_ptr(),
            n_segments=n_segments,
            use_masks_in=masks_in is not None,
            weighted=weighted,
            params=step_params,
            scalars=scalars_addr,
            stream=_stream(device),
            **sel,
        )
