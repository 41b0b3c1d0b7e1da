"""Triton kernels of the ``triton`` backend (the host side lives in ``triton.py``).

Every kernel walks a *work list*: one row per chunk of one tensor, ``(row, start, count, segment, item)``,
where ``row`` indexes an int64 table of the tensors' base addresses (cast to typed pointers in the
kernel, so one launch serves every tensor of a dtype) and ``item`` is the chunk's position in the
segment's flat order (for tie ranks). A program handles one chunk in ``BLOCK``-sized steps.

Scores are compared as the int32 bits of ``|g|`` or ``|g * w|`` in fp32: non-negative floats order like
their bits, every finite score is below ``INF_BITS``, and the bits double as radix digits.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .base import RADIX_DIGITS, SCALARS

NUM_BINS = tl.constexpr(1 << max(width for _, width in RADIX_DIGITS))  # 2048 (the last digit uses 1024)
INF_BITS = tl.constexpr(0x7F800000)
ITEM_COLUMNS = tl.constexpr(5)  # row, start, count, segment, item

# (bits above the digit that must match the prefix, digit shift, digit bits) of the radix passes.
PASSES = tuple(
    (31 if d == 0 else RADIX_DIGITS[d - 1][0], shift, width) for d, (shift, width) in enumerate(RADIX_DIGITS)
)

# Offsets into StepConfig.scalars.
SCALAR_STEP_SIZE = tl.constexpr(SCALARS.index("step_size"))
SCALAR_BIAS_CORRECTION2_SQRT = tl.constexpr(SCALARS.index("bias_correction2_sqrt"))
SCALAR_INV_GRAD_SCALE = tl.constexpr(SCALARS.index("inv_grad_scale"))
SCALAR_FOUND_INF = tl.constexpr(SCALARS.index("found_inf"))
SCALAR_MOMENTUM_INIT = tl.constexpr(SCALARS.index("momentum_init"))


@triton.jit
def _item(items_ptr, pid):
    base = items_ptr + pid * ITEM_COLUMNS
    return tl.load(base), tl.load(base + 1), tl.load(base + 2), tl.load(base + 3), tl.load(base + 4)


@triton.jit
def _score_bits(g_ptr, w_ptr, offs, inb, WEIGHTED: tl.constexpr):
    s = tl.load(g_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    if WEIGHTED:
        s = s * tl.load(w_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    # Clearing the sign bit is |s|, also for NaN; the result orders like the score.
    return s.to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def _choose(bits, inb, thr_bits, take, rank_base, partial):
    """Selected elements of one block, and the tie rank base for the next block."""
    finite = inb & (bits < INF_BITS)
    above = finite & (bits > thr_bits)
    tie = finite & (bits == thr_bits)
    if partial:  # only some ties are taken: the first ``take`` in flat order
        ties = tie.to(tl.int32)
        rank = rank_base + (tl.cumsum(ties, 0) - ties)
        rank_base += tl.sum(ties)
        tie = tie & (rank < take)
    return above | tie, rank_base


@triton.jit
def _pack_store(chosen, words_ptr, off, count, BLOCK: tl.constexpr):
    # Element 32 w + b is bit b of word w; chunks start at multiples of 32, so words never straddle.
    bits = tl.reshape(chosen.to(tl.int32), [BLOCK // 32, 32]) << tl.arange(0, 32)[None, :]
    words = tl.sum(bits, axis=1)  # disjoint bits: the sum is the bitwise or (bit 31 wraps to negative)
    first = off + 32 * tl.arange(0, BLOCK // 32)
    tl.store(words_ptr + first // 32, words, mask=first < count)


@triton.jit
def _round_to(x, DTYPE: tl.constexpr):
    # Round-to-nearest-even to bf16 in integer arithmetic: exact on GPUs (the hardware conversion
    # rounds the same way) and keeps the interpreter, whose bf16 conversion truncates, bit-exact.
    if DTYPE == tl.bfloat16:
        b = x.to(tl.int32, bitcast=True)
        r = ((b + 0x7FFF + ((b >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
        x = tl.where((b & 0x7FFFFFFF) < INF_BITS, r, x)
    return x.to(DTYPE)


@triton.jit
def _histogram_kernel(
    items_ptr,
    addrs_ptr,
    prefix_ptr,
    hist_ptr,
    DTYPE: tl.constexpr,
    WEIGHTED: tl.constexpr,
    PREFIX_SHIFT: tl.constexpr,
    DIGIT_SHIFT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One radix pass: counts, per segment, the digits of the finite scores that match its prefix."""
    row, start, count, segment, _ = _item(items_ptr, tl.program_id(0))
    addrs = addrs_ptr + row * 2  # this tensor's base addresses
    g_ptr = tl.load(addrs).to(tl.pointer_type(DTYPE)) + start
    w_ptr = tl.load(addrs + 1).to(tl.pointer_type(DTYPE)) + start
    prefix = tl.load(prefix_ptr + segment)  # -1 for a segment that selects nothing
    bins = tl.arange(0, NUM_BINS)
    hist = tl.zeros([NUM_BINS], dtype=tl.int32)
    for off in range(0, count, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        inb = offs < count
        bits = _score_bits(g_ptr, w_ptr, offs, inb, WEIGHTED)
        keep = inb & (bits < INF_BITS) & ((bits >> PREFIX_SHIFT) == prefix)
        digit = tl.where(keep, (bits >> DIGIT_SHIFT) & (NUM_BINS - 1), 0)
        hist += tl.histogram(digit, NUM_BINS, mask=keep)
    tl.atomic_add(hist_ptr + segment * NUM_BINS + bins, hist, mask=hist > 0)


@triton.jit
def _pick_kernel(
    hist_ptr,
    prefix_ptr,
    remaining_ptr,
    k_ptr,
    threshold_ptr,
    take_ptr,
    ties_ptr,
    num_segments,
    DIGIT_BITS: tl.constexpr,
    FIRST: tl.constexpr,
    LAST: tl.constexpr,
    ROWS: tl.constexpr,  # segments per program
):
    """Per segment, on the device: the bucket that holds the k-th largest score, counted from the top."""
    segment = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    live = segment < num_segments
    bins = tl.arange(0, NUM_BINS)[None, :]
    cells = hist_ptr + segment[:, None] * NUM_BINS + bins
    hist = tl.load(cells, mask=live[:, None], other=0).to(tl.int64)
    tl.store(cells, tl.zeros([ROWS, NUM_BINS], dtype=tl.int32), mask=live[:, None])  # for the next pass
    total = tl.sum(hist, axis=1)
    if FIRST:  # pass one counts every finite score: k_eff = min(k, finite count)
        remaining = tl.minimum(tl.load(k_ptr + segment, mask=live, other=0), total)
    else:
        remaining = tl.load(remaining_ptr + segment, mask=live, other=0)
    active = remaining > 0
    at_or_above = total[:, None] - tl.cumsum(hist, 1) + hist
    bucket = tl.max(tl.where(at_or_above >= remaining[:, None], bins, 0), axis=1)
    is_bucket = bins == bucket[:, None]
    in_bucket = tl.sum(tl.where(is_bucket, hist, 0), axis=1)
    above = tl.sum(tl.where(is_bucket, at_or_above, 0), axis=1) - in_bucket
    remaining = tl.where(active, remaining - above, 0)
    prefix = tl.load(prefix_ptr + segment, mask=live, other=0)
    prefix = tl.where(active, (prefix << DIGIT_BITS) | bucket, -1)
    tl.store(prefix_ptr + segment, prefix, mask=live)
    tl.store(remaining_ptr + segment, remaining, mask=live)
    if LAST:  # the prefix now holds every bit of the threshold
        threshold = tl.where(active, prefix.to(tl.float32, bitcast=True), float("inf"))
        tl.store(threshold_ptr + segment, threshold, mask=live)
        tl.store(take_ptr + segment, remaining, mask=live)
        tl.store(ties_ptr + segment, tl.where(active, in_bucket, 0), mask=live)


@triton.jit
def _tie_count_kernel(
    items_ptr,
    addrs_ptr,
    threshold_ptr,
    take_ptr,
    ties_ptr,
    counts_ptr,
    DTYPE: tl.constexpr,
    WEIGHTED: tl.constexpr,
    G_COLUMN: tl.constexpr,
    W_COLUMN: tl.constexpr,
    NUM_COLUMNS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Elements equal to the threshold per chunk, for segments that take only some of them."""
    row, start, count, segment, item = _item(items_ptr, tl.program_id(0))
    n = tl.zeros([BLOCK], dtype=tl.int32)
    if tl.load(take_ptr + segment) < tl.load(ties_ptr + segment):
        addrs = addrs_ptr + row * NUM_COLUMNS  # this tensor's base addresses
        g_ptr = tl.load(addrs + G_COLUMN).to(tl.pointer_type(DTYPE)) + start
        w_ptr = tl.load(addrs + W_COLUMN).to(tl.pointer_type(DTYPE)) + start
        thr_bits = tl.load(threshold_ptr + segment).to(tl.int32, bitcast=True)  # finite here
        for off in range(0, count, BLOCK):
            offs = off + tl.arange(0, BLOCK)
            inb = offs < count
            n += (inb & (_score_bits(g_ptr, w_ptr, offs, inb, WEIGHTED) == thr_bits)).to(tl.int32)
    tl.store(counts_ptr + item, tl.sum(n).to(tl.int64))


@triton.jit
def _mask_kernel(
    items_ptr,
    addrs_ptr,
    threshold_ptr,
    take_ptr,
    ties_ptr,
    tie_base_ptr,
    DTYPE: tl.constexpr,
    WEIGHTED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Packed masks of a selection; address columns: grad, weight, mask words."""
    row, start, count, segment, item = _item(items_ptr, tl.program_id(0))
    addrs = addrs_ptr + row * 3  # this tensor's base addresses
    g_ptr = tl.load(addrs).to(tl.pointer_type(DTYPE)) + start
    w_ptr = tl.load(addrs + 1).to(tl.pointer_type(DTYPE)) + start
    words_ptr = tl.load(addrs + 2).to(tl.pointer_type(tl.int32)) + start // 32
    thr_bits = tl.load(threshold_ptr + segment).to(tl.int32, bitcast=True)
    take = tl.load(take_ptr + segment)
    partial = take < tl.load(ties_ptr + segment)
    rank_base = tl.load(tie_base_ptr + item)
    for off in range(0, count, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        inb = offs < count
        bits = _score_bits(g_ptr, w_ptr, offs, inb, WEIGHTED)
        chosen, rank_base = _choose(bits, inb, thr_bits, take, rank_base, partial)
        _pack_store(chosen, words_ptr, off, count, BLOCK)


@triton.jit
def _update_kernel(
    items_ptr,
    addrs_ptr,
    threshold_ptr,
    take_ptr,
    ties_ptr,
    tie_base_ptr,
    scalars_ptr,  # StepConfig.scalars (read only with HAS_SCALARS)
    lr,
    decay,  # adamw: 1 - lr * weight_decay
    weight_decay,
    beta1_c,  # 1 - beta1
    beta2,
    beta2_c,  # 1 - beta2
    eps,
    step_size,
    bias_correction2_sqrt,
    momentum,
    dampening_c,  # 1 - dampening
    clip_value,
    ema_c,  # 1 - ema_decay
    DTYPE: tl.constexpr,
    STATE_DTYPE: tl.constexpr,  # of exp_avg and exp_avg_sq: fp32 or bf16 (the math is fp32 either way)
    WEIGHTED: tl.constexpr,
    KIND: tl.constexpr,  # 0 adamw, 1 adam, 2 sgd
    HAS_M: tl.constexpr,
    L2: tl.constexpr,  # adam/sgd with weight decay: g += weight_decay * p
    CLIP: tl.constexpr,
    NESTEROV: tl.constexpr,
    MOMENTUM_INIT: tl.constexpr,
    EMA: tl.constexpr,
    MAXIMIZE: tl.constexpr,  # negate the unscaled gradient
    MASK_IN: tl.constexpr,  # read the selection from packed masks instead of the threshold
    MASK_OUT: tl.constexpr,
    HAS_SCALARS: tl.constexpr,  # step_size, bias_correction2_sqrt, momentum_init from scalars_ptr
    BLOCK: tl.constexpr,
):
    """The masked optimizer step; address columns: param, grad, exp_avg, exp_avg_sq, ema, mask in, out.

    Unselected elements are never stored (masked stores), so they stay bit-identical. The operation
    order mirrors the eager oracle so that results agree to fp32 rounding.
    """
    row, start, count, segment, item = _item(items_ptr, tl.program_id(0))
    if HAS_SCALARS:  # device step scalars, never read by the host
        step_size = tl.load(scalars_ptr + SCALAR_STEP_SIZE)
        bias_correction2_sqrt = tl.load(scalars_ptr + SCALAR_BIAS_CORRECTION2_SQRT)
        inv_grad_scale = tl.load(scalars_ptr + SCALAR_INV_GRAD_SCALE)
        # found_inf: the chunk counts as empty, so the loop below stores nothing (masks included).
        count = tl.where(tl.load(scalars_ptr + SCALAR_FOUND_INF) != 0, 0, count)
        momentum_init = tl.load(scalars_ptr + SCALAR_MOMENTUM_INIT) != 0
    addrs = addrs_ptr + row * 7  # this tensor's base addresses
    p_ptr = tl.load(addrs).to(tl.pointer_type(DTYPE)) + start
    g_ptr = tl.load(addrs + 1).to(tl.pointer_type(DTYPE)) + start
    m_ptr = tl.load(addrs + 2).to(tl.pointer_type(STATE_DTYPE)) + start
    v_ptr = tl.load(addrs + 3).to(tl.pointer_type(STATE_DTYPE)) + start
    e_ptr = tl.load(addrs + 4).to(tl.pointer_type(tl.float32)) + start
    in_ptr = tl.load(addrs + 5).to(tl.pointer_type(tl.int32)) + start // 32
    out_ptr = tl.load(addrs + 6).to(tl.pointer_type(tl.int32)) + start // 32
    if not MASK_IN:
        thr_bits = tl.load(threshold_ptr + segment).to(tl.int32, bitcast=True)
        take = tl.load(take_ptr + segment)
        partial = take < tl.load(ties_ptr + segment)
        rank_base = tl.load(tie_base_ptr + item)
    for off in range(0, count, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        inb = offs < count
        p = tl.load(p_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        if MASK_IN:
            word = tl.load(in_ptr + offs // 32, mask=inb, other=0)
            chosen = inb & (((word >> (offs % 32).to(tl.int32)) & 1) != 0)
        else:
            s = g
            if WEIGHTED:
                s = g * p
            bits = s.to(tl.int32, bitcast=True) & 0x7FFFFFFF
            chosen, rank_base = _choose(bits, inb, thr_bits, take, rank_base, partial)
        if MASK_OUT:
            _pack_store(chosen, out_ptr, off, count, BLOCK)

        if HAS_SCALARS:  # unscale after the selection, which scores the gradient as stored
            g = g * inv_grad_scale
        if MAXIMIZE:
            g = -g
        if CLIP:  # comparisons keep NaN, like torch.clamp
            g = tl.where(g > clip_value, clip_value, tl.where(g < -clip_value, -clip_value, g))
        new_p = p
        if KIND == 0:
            new_p = p * decay
        elif L2:
            g = g + weight_decay * p
        if KIND < 2:
            if HAS_M:
                m = tl.load(m_ptr + offs, mask=chosen, other=0.0).to(tl.float32)
                m = m + beta1_c * (g - m)
                tl.store(m_ptr + offs, _round_to(m, STATE_DTYPE), mask=chosen)
            else:  # beta1 == 0: the first moment is the gradient, and no state is kept
                m = g
            v = tl.load(v_ptr + offs, mask=chosen, other=0.0).to(tl.float32)
            v = beta2 * v + beta2_c * g * g
            tl.store(v_ptr + offs, _round_to(v, STATE_DTYPE), mask=chosen)
            denom = tl.math.div_rn(tl.math.sqrt_rn(v), bias_correction2_sqrt) + eps
            new_p = new_p - tl.math.div_rn(step_size * m, denom)
        else:
            if HAS_M:
                if MOMENTUM_INIT:
                    buf = g
                else:
                    m = tl.load(m_ptr + offs, mask=chosen, other=0.0).to(tl.float32)
                    buf = momentum * m + dampening_c * g
                    if HAS_SCALARS:
                        buf = tl.where(momentum_init, g, buf)
                tl.store(m_ptr + offs, _round_to(buf, STATE_DTYPE), mask=chosen)
                if NESTEROV:
                    g = g + momentum * buf
                else:
                    g = buf
            new_p = new_p - lr * g
        stored = _round_to(new_p, DTYPE)
        tl.store(p_ptr + offs, stored, mask=chosen)
        if EMA:  # every element follows, from the parameter as stored
            e = tl.load(e_ptr + offs, mask=inb, other=0.0)
            e = e + ema_c * (tl.where(chosen, stored.to(tl.float32), p) - e)
            tl.store(e_ptr + offs, e, mask=inb)


KERNELS = {
    "histogram": _histogram_kernel,
    "pick": _pick_kernel,
    "tie_count": _tie_count_kernel,
    "mask": _mask_kernel,
    "update": _update_kernel,
}
