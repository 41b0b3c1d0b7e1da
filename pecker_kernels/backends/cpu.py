"""C++/OpenMP implementation of the backend contract (``pecker_kernels._C``) for CPU tensors.

The compiled module takes lists of data pointers, sizes and dtype codes, so one call covers every
tensor of a scope; this module only gathers those lists and allocates the outputs. Inputs are
already validated (see ``base``), so nothing is checked here beyond what the C++ side needs. The
``Selection`` tensors live on the CPU and the kernels read them directly: on the host there is no
synchronisation to avoid.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .base import DTYPE_CODES, SCALARS, SCORE_CODES, Selection, StepConfig, TensorGroup, kernel_params
from .native import cpu_module

name = "cpu"


def is_available(device: torch.device) -> bool:
    return cpu_module is not None and torch.device(device).type == "cpu"


def _ptrs(tensors: Sequence[Tensor] | None) -> list[int]:
    return [] if tensors is None else [t.data_ptr() for t in tensors]


def _sizes(tensors: Sequence[Tensor]) -> tuple[list[int], list[int]]:
    return [t.numel() for t in tensors], [DTYPE_CODES[t.dtype] for t in tensors]


def _weight_ptrs(weights: Sequence[Tensor] | None, score: str) -> list[int]:
    # The C++ side reads weights only for the grad_weight score; an empty list means "none".
    return _ptrs(weights) if score == "grad_weight" else []


def _scored(
    grads: Sequence[Tensor], weights: Sequence[Tensor] | None, score: str, segments: Sequence[int]
) -> tuple:
    """The leading arguments of every op that scores: pointers, sizes, dtypes, score code, segments."""
    numel, dtypes = _sizes(grads)
    return _ptrs(grads), _weight_ptrs(weights, score), numel, dtypes, SCORE_CODES[score], list(segments)


def _selection_tensors(selection: Selection) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    # Selections from select() are already in this layout (no copy); the caller keeps the results
    # alive while the kernel reads them.
    threshold = selection.threshold.to(torch.float32).contiguous()
    cut = selection.cut
    if cut is not None:
        if cut.shape != threshold.shape or cut.device != threshold.device:
            raise ValueError(
                f"Selection.cut must match threshold ({tuple(threshold.shape)} on {threshold.device}), "
                f"got {tuple(cut.shape)} on {cut.device}"
            )
        cut = cut.to(torch.int64).contiguous()
    return (
        threshold,
        selection.take.to(torch.int64).contiguous(),
        selection.ties.to(torch.int64).contiguous(),
        cut,
    )


def _address(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def select(
    grads: Sequence[Tensor],
    weights: Sequence[Tensor] | None,
    score: str,
    segments: Sequence[int],
    ks: Sequence[int],
) -> Selection:
    num_segments = len(ks)
    threshold = torch.empty(num_segments, dtype=torch.float32)
    take = torch.empty(num_segments, dtype=torch.int64)
    ties = torch.empty(num_segments, dtype=torch.int64)
    cut = torch.empty(num_segments, dtype=torch.int64)
    cpu_module.select(
        *_scored(grads, weights, score, segments),
        [int(k) for k in ks],
        threshold.data_ptr(),
        take.data_ptr(),
        ties.data_ptr(),
        cut.data_ptr(),
        torch.get_num_threads(),
    )
    return Selection(threshold=threshold, take=take, ties=ties, cut=cut)


def radix_histogram(
    grads: Sequence[Tensor],
    weights: Sequence[Tensor] | None,
    score: str,
    segments: Sequence[int],
    num_segments: int,
    digit: int,
    prefix: Tensor,
) -> Tensor:
    """One digit pass of the radix select (see ``pecker_kernels.distributed``): int64 counts
    ``[num_segments, 2048]`` of the finite scores whose higher digits equal ``prefix[segment]``."""
    hist = torch.empty(num_segments, 2048, dtype=torch.int64)
    prefix_bits = prefix.to(torch.int32).contiguous()  # read as uint32 by the kernel
    cpu_module.radix_histogram(
        *_scored(grads, weights, score, segments),
        num_segments,
        digit,
        prefix_bits.data_ptr(),
        hist.data_ptr(),
        torch.get_num_threads(),
    )
    return hist


def sample_scores(
    grads: Sequence[Tensor], weights: Sequence[Tensor] | None, score: str, runs: int
) -> tuple[Tensor, int]:
    """The finite scores of ``runs`` evenly spaced runs of 16 over the tensors' flat order, and how
    many scores were read (finite or not): the sample of the sharded select's bracket."""
    out = torch.empty(16 * max(runs, 0), dtype=torch.float32)
    sampled = torch.zeros(1, dtype=torch.int64)
    numel, dtypes = _sizes(grads)
    count = cpu_module.sample_scores(
        _ptrs(grads),
        _weight_ptrs(weights, score),
        numel,
        dtypes,
        SCORE_CODES[score],
        runs,
        out.data_ptr(),
        sampled.data_ptr(),
        torch.get_num_threads(),
    )
    return out[:count], int(sampled)


def bracket_counts(
    grads: Sequence[Tensor], weights: Sequence[Tensor] | None, score: str, lo: float, hi: float, cap: int
) -> tuple[Tensor, Tensor]:
    """One pass over the scores: int64 counts [finite, > hi, == hi, == lo (lo < hi), in (lo, hi), kept,
    overflow], and the scores in (lo, hi) themselves (all of them unless ``overflow``: each thread keeps
    at most ``cap``)."""
    threads = torch.get_num_threads()
    kept = torch.empty(threads * cap, dtype=torch.float32)
    counts = torch.zeros(cpu_module.BRACKET_COUNTS, dtype=torch.int64)
    numel, dtypes = _sizes(grads)
    cpu_module.bracket_counts(
        _ptrs(grads),
        _weight_ptrs(weights, score),
        numel,
        dtypes,
        SCORE_CODES[score],
        lo,
        hi,
        cap,
        kept.data_ptr(),
        counts.data_ptr(),
        threads,
    )
    return counts, kept[: int(counts[5])]


def write_masks(
    grads: Sequence[Tensor],
    weights: Sequence[Tensor] | None,
    score: str,
    segments: Sequence[int],
    selection: Selection,
    masks_out: Sequence[Tensor],
) -> None:
    threshold, take, ties, cut = _selection_tensors(selection)
    cpu_module.write_masks(
        *_scored(grads, weights, score, segments),
        threshold.data_ptr(),
        take.data_ptr(),
        ties.data_ptr(),
        _address(cut),
        threshold.numel(),
        _ptrs(masks_out),
        torch.get_num_threads(),
    )


def _step_params(config: StepConfig, has_exp_avg: bool, has_ema: bool):
    sp = cpu_module.StepParams()
    for field, value in kernel_params(config, has_exp_avg=has_exp_avg, has_ema=has_ema).items():
        setattr(sp, field, value)
    return sp


def _apply_scalars(sp, scalars: Tensor) -> bool:
    """Overrides ``sp`` with ``StepConfig.scalars`` (read here: on the CPU that costs no sync);
    False when found_inf says the step is skipped."""
    values = dict(zip(SCALARS, scalars.tolist(), strict=True))
    if values["found_inf"] != 0:
        return False
    sp.step_size = values["step_size"]
    sp.bias_correction2_sqrt = values["bias_correction2_sqrt"]
    sp.momentum_init = int(values["momentum_init"] != 0)
    sp.has_grad_scale = 1
    sp.inv_grad_scale = values["inv_grad_scale"]
    return True


def count_steps(steps: Sequence[Tensor]) -> None:
    """``step += 1`` for every float32 one-element CPU tensor of ``steps``, in one call."""
    cpu_module.count_steps(_ptrs(steps))


def update(
    group: TensorGroup,
    config: StepConfig,
    score: str,
    segments: Sequence[int],
    selection: Selection | None = None,
    masks_in: Sequence[Tensor] | None = None,
    masks_out: Sequence[Tensor] | None = None,
) -> None:
    # The kernel keeps no first moment without exp_avg (Adam beta1 == 0, SGD without momentum).
    exp_avg = group.exp_avg
    exp_avg_sq = group.exp_avg_sq if config.kind != "sgd" else None
    ema = group.ema if config.ema_decay is not None else None
    sp = _step_params(config, exp_avg is not None, ema is not None)
    if config.scalars is not None and not _apply_scalars(sp, config.scalars):
        return  # found_inf: nothing is written, masks_out included
    numel, dtypes = _sizes(group.params)
    state_dtypes = [DTYPE_CODES[d] for d in group.state_dtypes()]
    chosen = None if selection is None else _selection_tensors(selection)
    threshold, take, ties, cut = (0, 0, 0, 0) if chosen is None else (_address(t) for t in chosen)
    num_segments = 0 if chosen is None else chosen[0].numel()
    cpu_module.update(
        _ptrs(group.params),
        _ptrs(group.grads),
        _ptrs(exp_avg),
        _ptrs(exp_avg_sq),
        _ptrs(ema),
        numel,
        dtypes,
        state_dtypes,
        sp,
        SCORE_CODES[score],
        list(segments),
        threshold,
        take,
        ties,
        cut,
        num_segments,
        _ptrs(masks_in if selection is None else None),
        _ptrs(masks_out),
        torch.get_num_threads(),
    )
