"""Plain PyTorch implementation of the backend contract: the test oracle and the portable fallback.

Written for obviousness, not speed: selection is a stable descending sort of the concatenated scores
(a stable sort keeps equal scores in flat order, which is exactly the tie rule), and the update is
the element math of ``StepConfig`` spelled out with ``torch.where``. Everything stays on the tensors'
device and nothing is read back on the host.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .base import MASK_WORD_BITS, Selection, StepConfig, TensorGroup

name = "eager"


def is_available(device: torch.device) -> bool:
    return True


def scores(grad: Tensor, weight: Tensor | None, score: str) -> Tensor:
    """fp32 saliency scores of one tensor, flattened; non-finite scores become -1 (never selected)."""
    g = grad.reshape(-1).float()
    s = (g * weight.reshape(-1).float()).abs() if score == "grad_weight" else g.abs()
    return torch.where(torch.isfinite(s), s, torch.full_like(s, -1.0))


def _segment_members(segments: Sequence[int], num_segments: int) -> list[list[int]]:
    members: list[list[int]] = [[] for _ in range(num_segments)]
    for index, segment in enumerate(segments):
        members[segment].append(index)
    return members


def _segment_scores(grads, weights, score, members) -> Tensor:
    parts = [scores(grads[i], None if weights is None else weights[i], score) for i in members]
    if not parts:
        return torch.empty(0, dtype=torch.float32)
    return torch.cat(parts)


def select(
    grads: Sequence[Tensor],
    weights: Sequence[Tensor] | None,
    score: str,
    segments: Sequence[int],
    ks: Sequence[int],
) -> Selection:
    device = grads[0].device
    thresholds, takes, ties = [], [], []
    for members, k in zip(_segment_members(segments, len(ks)), ks, strict=True):
        s = _segment_scores(grads, weights, score, members).to(device)
        if s.numel() == 0:
            thresholds.append(torch.full((), float("inf"), device=device))
            takes.append(torch.zeros((), dtype=torch.int64, device=device))
            ties.append(torch.zeros((), dtype=torch.int64, device=device))
            continue
        ordered = torch.sort(s, descending=True, stable=True).values
        k_eff = torch.clamp((s >= 0).sum(), max=k)
        kth = ordered.gather(0, torch.clamp(k_eff - 1, min=0).reshape(1)).squeeze(0)
        threshold = torch.where(k_eff > 0, kth, torch.full_like(kth, float("inf")))
        thresholds.append(threshold)
        takes.append(k_eff - (s > threshold).sum())
        ties.append((s == threshold).sum())
    return Selection(threshold=torch.stack(thresholds), take=torch.stack(takes), ties=torch.stack(ties))


def selected(
    grads: Sequence[Tensor],
    weights: Sequence[Tensor] | None,
    score: str,
    segments: Sequence[int],
    selection: Selection,
) -> list[Tensor]:
    """Bool mask (flat) per tensor for ``selection``."""
    out: list[Tensor | None] = [None] * len(grads)
    for segment, members in enumerate(_segment_members(segments, selection.threshold.numel())):
        if not members:
            continue
        s = _segment_scores(grads, weights, score, members).to(grads[members[0]].device)
        threshold, take = selection.threshold[segment], selection.take[segment]
        ties = s == threshold
        chosen = (s > threshold) | (ties & (torch.cumsum(ties, 0) <= take))
        for i, part in zip(members, chosen.split([grads[i].numel() for i in members]), strict=True):
            out[i] = part
    return out  # type: ignore[return-value]


def pack(mask: Tensor) -> Tensor:
    """Bool flat mask -> int32 words (bit b of word w is element 32 w + b)."""
    n = mask.numel()
    words = (n + MASK_WORD_BITS - 1) // MASK_WORD_BITS
    bits = torch.zeros(words * MASK_WORD_BITS, dtype=torch.int64, device=mask.device)
    bits[:n] = mask.reshape(-1).to(torch.int64)
    shifts = torch.arange(MASK_WORD_BITS, dtype=torch.int64, device=mask.device)
    value = (bits.view(words, MASK_WORD_BITS) << shifts).sum(dim=1)
    return torch.where(value >= 2**31, value - 2**32, value).to(torch.int32)


def unpack(words: Tensor, numel: int) -> Tensor:
    """int32 words -> bool flat mask of ``numel`` elements."""
    shifts = torch.arange(MASK_WORD_BITS, dtype=torch.int64, device=words.device)
    bits = (words.to(torch.int64).unsqueeze(1) >> shifts) & 1
    return bits.reshape(-1)[:numel].bool()


def write_masks(grads, weights, score, segments, selection, masks_out) -> None:
    for mask, out in zip(selected(grads, weights, score, segments, selection), masks_out, strict=True):
        out.copy_(pack(mask))


def _store(state: Tensor, chosen: Tensor, value: Tensor) -> None:
    """``state[chosen] = value`` rounded to the state's dtype; unselected elements keep their bits."""
    state.copy_(torch.where(chosen, value.to(state.dtype), state.reshape(-1)).view_as(state))


def _update_one(p: Tensor, g: Tensor, m, v, e, chosen: Tensor, c: StepConfig) -> None:
    shape = p.shape
    param = p.reshape(-1).float()
    grad = g.reshape(-1).float()
    # Moments in fp32 (bf16 ones too: a bf16 operand would make torch round every intermediate).
    m32 = None if m is None else m.reshape(-1).float()
    v32 = None if v is None else v.reshape(-1).float()
    step_size, bias_correction2_sqrt, momentum_init = c.step_size, c.bias_correction2_sqrt, c.momentum_init
    skip = None
    if c.scalars is not None:  # device scalars: 0-d tensors, never read on the host
        step_size, bias_correction2_sqrt, inv_grad_scale, found_inf, init = c.scalars.unbind()
        grad = grad * inv_grad_scale
        momentum_init = init != 0
        skip = found_inf != 0
        chosen = chosen & ~skip
    if c.maximize:
        grad = -grad
    if c.clip_value is not None:
        grad = grad.clamp(-c.clip_value, c.clip_value)
    new_p = param
    if c.kind == "adamw":
        new_p = param * (1 - c.lr * c.weight_decay)
    elif c.weight_decay != 0:
        grad = grad + c.weight_decay * param
    if c.kind in ("adamw", "adam"):
        exp_avg = grad if m is None else m32 + (1 - c.beta1) * (grad - m32)
        exp_avg_sq = c.beta2 * v32 + (1 - c.beta2) * grad * grad
        denom = exp_avg_sq.sqrt() / bias_correction2_sqrt + c.eps
        new_p = new_p - step_size * exp_avg / denom
        _store(v, chosen, exp_avg_sq)
        if m is not None:
            _store(m, chosen, exp_avg)
    else:
        if m is not None:
            buf = c.momentum * m32 + (1 - c.dampening) * grad
            if isinstance(momentum_init, Tensor):
                buf = torch.where(momentum_init, grad, buf)
            elif momentum_init:
                buf = grad
            _store(m, chosen, buf)
            grad = grad + c.momentum * buf if c.nesterov else buf
        new_p = new_p - c.lr * grad
    p.copy_(torch.where(chosen, new_p, param).view(shape))
    if e is not None:
        stored = p.reshape(-1).float()
        ema = e.reshape(-1) + (1 - c.ema_decay) * (stored - e.reshape(-1))
        e.copy_((ema if skip is None else torch.where(skip, e.reshape(-1), ema)).view_as(e))


def update(
    group: TensorGroup,
    config: StepConfig,
    score: str,
    segments: Sequence[int],
    selection: Selection | None = None,
    masks_in: Sequence[Tensor] | None = None,
    masks_out: Sequence[Tensor] | None = None,
) -> None:
    if selection is not None:
        weights = group.params if score == "grad_weight" else None
        chosen = selected(group.grads, weights, score, segments, selection)
    else:
        chosen = [unpack(w, p.numel()) for w, p in zip(masks_in, group.params, strict=True)]
    n = len(group.params)
    for i in range(n):
        _update_one(
            group.params[i],
            group.grads[i],
            None if group.exp_avg is None else group.exp_avg[i],
            None if group.exp_avg_sq is None else group.exp_avg_sq[i],
            None if group.ema is None else group.ema[i],
            chosen[i],
            config,
        )
    if masks_out is not None:
        # found_inf leaves masks_out as it was, like everything else the update writes.
        skip = None if config.scalars is None else config.scalars[3] != 0
        for mask, out in zip(chosen, masks_out, strict=True):
            out.copy_(pack(mask) if skip is None else torch.where(skip, out, pack(mask)))
