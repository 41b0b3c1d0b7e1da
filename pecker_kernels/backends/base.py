"""The contract every backend implements (eager, cpu, cuda, triton).

A *scope* is a list of tensors treated as one flat vector per *segment*: tensor by tensor in list
order, each in row-major order. ``segments[i]`` names the segment of tensor ``i`` (all zeros for one
global selection, ``range(len(tensors))`` for a per-tensor selection). Segments are numbered
``0 .. num_segments - 1``; the tensors of one segment keep their list order.

Score of element ``j``: ``|g_j|`` (``"grad"``) or ``|g_j * w_j|`` (``"grad_weight"``), computed in
fp32 from the stored values and never written to memory. Non-finite scores are never selected.

Selection of segment ``s`` with budget ``k_s``: let ``k = min(k_s, finite elements of s)``. The
threshold is the k-th largest finite score. Selected: every finite score above the threshold, plus the
first ``take = k - count(score > threshold)`` elements equal to the threshold in flat order. Exactly
``k`` elements are selected. With ``k == 0`` the threshold is ``+inf`` and ``take`` is 0. ``ties`` counts
all elements equal to the threshold: when ``take == ties`` the update needs no tie ranks at all.
Otherwise ranking them costs a pass over the scores, unless the select left ``cut``: the segment flat
index just past the take-th tie (-1 where not known; ``None``: no hints). The CPU select gives it where
its sampled bracket holds every tie anyway; a backend may ignore it, and a cut outside the segment is
clamped to it, so a hint never selects outside the segment.

Packed masks: one int32 tensor per parameter of ``ceil(numel / 32)`` words; bit ``b`` of word ``w``
is element ``32 * w + b``; bits past ``numel`` are zero.

Every backend module exposes:

``select(grads, weights, score, segments, ks) -> Selection``
    Exact per-segment top-k threshold, on the tensors' device, with no host synchronisation.
``write_masks(grads, weights, score, segments, selection, masks_out) -> None``
    Writes the packed masks of ``selection``.
``update(group, config, score, segments, selection=None, masks_in=None, masks_out=None) -> None``
    The fused masked optimizer step. Exactly one of ``selection`` / ``masks_in`` is given.
    Selected elements get the optimizer update; unselected ones are frozen (parameter and moments
    untouched). The EMA copy, when present, follows every element. ``masks_out`` (optional)
    receives the packed mask that was applied. ``config.scalars`` (optional, see ``StepConfig``)
    supplies the step-dependent scalars from the device; its ``found_inf`` skips the whole update.

Inputs reach a backend already validated (see ``pecker_kernels.validation``): contiguous, one device,
params and grads of one dtype per tensor among fp32/fp16/bf16. Moments (``exp_avg``, ``exp_avg_sq``) are
fp32 or bf16 (``STATE_DTYPES``), both moments of one tensor in the same dtype; the EMA copy is fp32. A
bf16 moment is loaded to fp32, goes through the same fp32 element math, and is rounded once on store
(round to nearest even, as ``Tensor.to(torch.bfloat16)``); an unselected one keeps its bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor

ScoreKind = Literal["grad", "grad_weight"]
SCORES: tuple[str, ...] = ("grad", "grad_weight")
OPTIMIZERS: tuple[str, ...] = ("adamw", "adam", "sgd")
PARAM_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
# Storage of the moments. The EMA stays fp32: with a decay near 1 a bf16 copy would stop moving.
STATE_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16)
MASK_WORD_BITS = 32

# Layouts shared with the compiled kernels, defined there in csrc/include/pecker/codes.h and exposed by
# both modules (CODES, STEP_SCALARS, RADIX_DIGITS); tests/test_layouts.py checks these copies against them.
SCORE_CODES = {"grad": 0, "grad_weight": 1}
OPTIMIZER_CODES = {"adamw": 0, "adam": 1, "sgd": 2}
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
# Layout of StepConfig.scalars (float32, on the parameters' device).
SCALARS: tuple[str, ...] = (
    "step_size",
    "bias_correction2_sqrt",
    "inv_grad_scale",
    "found_inf",
    "momentum_init",
)
# Radix digits of the fp32 score bits, most significant first: (lowest bit, width), 11 + 11 + 10 bits.
RADIX_DIGITS: tuple[tuple[int, int], ...] = ((21, 11), (10, 11), (0, 10))
# The fields of the compiled StepParams struct, in its order (see kernel_params).
STEP_PARAM_FIELDS: tuple[str, ...] = (
    "kind",
    "lr",
    "weight_decay",
    "beta1",
    "beta2",
    "eps",
    "step_size",
    "bias_correction2_sqrt",
    "momentum",
    "dampening",
    "nesterov",
    "momentum_init",
    "has_clip",
    "clip_value",
    "has_ema",
    "ema_decay",
    "has_exp_avg",
    "has_coefficients",
    "decay_factor",
    "one_minus_beta1",
    "one_minus_beta2",
    "one_minus_dampening",
    "one_minus_ema_decay",
    "has_grad_scale",
    "inv_grad_scale",
    "maximize",
)


@dataclass
class Selection:
    """Per-segment result of ``select``: device tensors, never read back on the host."""

    threshold: Tensor  # float32 [num_segments]: the k-th largest finite score (+inf when k == 0)
    take: Tensor  # int64 [num_segments]: elements equal to the threshold to select, in flat order
    ties: Tensor  # int64 [num_segments]: elements equal to the threshold in all (take == ties: no ranking)
    # int64 [num_segments] or None: the segment flat index just past the take-th tie, -1 where not known.
    # A hint a backend's select may give so that its update ranks no ties; never needed for correctness.
    cut: Tensor | None = None


@dataclass
class TensorGroup:
    """The tensors one update touches, index-aligned. Absent state lists are ``None``."""

    params: list[Tensor]
    grads: list[Tensor]
    exp_avg: list[Tensor] | None = None  # Adam first moment, or SGD momentum buffer (fp32 or bf16)
    exp_avg_sq: list[Tensor] | None = None  # Adam second moment (the dtype of the tensor's exp_avg)
    ema: list[Tensor] | None = None  # EMA copy of the parameters (fp32)

    def state_dtypes(self) -> list[torch.dtype]:
        """Per tensor, the dtype its moments are stored in (fp32 where it keeps none)."""
        moments = [m for m in (self.exp_avg, self.exp_avg_sq) if m is not None]
        return [moments[0][i].dtype if moments else torch.float32 for i in range(len(self.params))]


@dataclass(frozen=True)
class StepConfig:
    """Hyper-parameters of one update; the step-dependent scalars computed on the host or on the device.

    Element math (fp32), for a selected element with gradient ``g`` and parameter ``p``:

    * ``g = -g`` when ``maximize`` is set (as torch's ``maximize=True``: ascend the objective).
    * ``g = clamp(g, -clip_value, clip_value)`` when ``clip_value`` is set.
    * ``adamw``: ``p *= 1 - lr * weight_decay``; ``adam``/``sgd``: ``g += weight_decay * p``.
    * Adam: ``m = m + (1 - beta1) * (g - m)`` (``m = g`` and no state when ``beta1 == 0``),
      ``v = beta2 * v + (1 - beta2) * g * g``,
      ``p -= step_size * m / (sqrt(v) / bias_correction2_sqrt + eps)``.
    * SGD: with ``momentum``: ``buf = g`` if ``momentum_init`` else
      ``buf = momentum * buf + (1 - dampening) * g``; ``g = g + momentum * buf`` (nesterov) or
      ``g = buf``; then ``p -= lr * g``.
    * EMA (every element, selected or not): ``e = e + (1 - ema_decay) * (p_stored - e)``.

    ``m``, ``v`` and ``buf`` are the fp32 values loaded from the stored moments; bf16 moments are
    rounded only when stored, so ``p`` sees the unrounded fp32 moments of this step.

    Device-side step scalars (for a ``GradScaler`` and CUDA-graph capture): ``scalars``, when given, is
    a contiguous float32 tensor of exactly 5 elements on the parameters' device,
    ``[step_size, bias_correction2_sqrt, inv_grad_scale, found_inf, momentum_init]`` (``SCALARS``).
    The update then uses ``scalars[0]`` and ``scalars[1]`` instead of ``step_size`` and
    ``bias_correction2_sqrt``, ``momentum_init = scalars[4] != 0`` instead of ``momentum_init``, and
    multiplies every gradient by ``scalars[2]`` before any other element math (``g = g *
    inv_grad_scale`` comes first in the list above). When ``scalars[3] != 0`` (found_inf) the update
    writes nothing at all: no parameter, moment or EMA, and ``masks_out`` keeps its old content.
    Selection is unchanged: scores come from the gradients as stored (not unscaled), as ``select``
    saw them. Backends never read CUDA scalars back on the host (no synchronisation). ``None``: the
    host fields, exactly as before.
    """

    kind: Literal["adamw", "adam", "sgd"]
    lr: float
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    step_size: float = 0.0  # lr / (1 - beta1 ** step)
    bias_correction2_sqrt: float = 1.0  # sqrt(1 - beta2 ** step)
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    momentum_init: bool = False
    clip_value: float | None = None
    ema_decay: float | None = None
    maximize: bool = False
    scalars: Tensor | None = None  # float32 [5] on the device, see SCALARS; None: the host fields

    def with_device_scalars(
        self, device: torch.device | str, *, inv_grad_scale: float = 1.0, found_inf: bool = False
    ) -> StepConfig:
        """This config with ``scalars`` holding its own host values (plus the given grad scale and
        found_inf) on ``device``: a starting point that a training loop then updates in place."""
        values = [
            self.step_size,
            self.bias_correction2_sqrt,
            inv_grad_scale,
            float(found_inf),
            float(self.momentum_init),
        ]
        return replace(self, scalars=torch.tensor(values, dtype=torch.float32, device=device))

    @staticmethod
    def adam(
        kind: Literal["adamw", "adam"],
        *,
        lr: float,
        step: int,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        clip_value: float | None = None,
        ema_decay: float | None = None,
        maximize: bool = False,
    ) -> StepConfig:
        beta1, beta2 = betas
        if not 0.0 <= beta1 < 1.0:  # the bias correction below divides by 1 - beta1 ** step
            raise ValueError(f"Invalid betas[0] (beta1): {beta1}; expected 0 <= beta1 < 1")
        if isinstance(step, bool) or not isinstance(step, int) or step < 1:
            raise ValueError(f"step must be an int >= 1 (the step being taken), got {step!r}")
        return StepConfig(
            kind=kind,
            lr=lr,
            weight_decay=weight_decay,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            step_size=lr / (1.0 - beta1**step),
            bias_correction2_sqrt=math.sqrt(1.0 - beta2**step),
            clip_value=clip_value,
            ema_decay=ema_decay,
            maximize=maximize,
        )

    @staticmethod
    def sgd(
        *,
        lr: float,
        momentum: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        momentum_init: bool = False,
        clip_value: float | None = None,
        ema_decay: float | None = None,
        maximize: bool = False,
    ) -> StepConfig:
        return StepConfig(
            kind="sgd",
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            dampening=dampening,
            nesterov=nesterov,
            momentum_init=momentum_init,
            clip_value=clip_value,
            ema_decay=ema_decay,
            maximize=maximize,
        )


def kernel_params(config: StepConfig, *, has_exp_avg: bool, has_ema: bool) -> dict[str, int | float]:
    """What every compiled backend receives for ``config``: the fields of StepParams (``STEP_PARAM_FIELDS``).

    The cpu and cuda backends copy it into the compiled struct, the triton backend passes it as kernel
    arguments. The ``1 - x`` coefficients are computed here in double and rounded once to fp32 by the
    kernels' float fields, as torch rounds the eager oracle's Python scalars (in float, ``1 - 0.999f`` is
    0.00099998713, 1.3e-5 off). ``has_grad_scale`` / ``inv_grad_scale`` are the host defaults (no
    scaling); ``config.scalars`` overrides them on the device.
    """
    ema_decay = 0.0 if config.ema_decay is None else config.ema_decay
    return {
        "kind": OPTIMIZER_CODES[config.kind],
        "lr": config.lr,
        "weight_decay": config.weight_decay,
        "beta1": config.beta1,
        "beta2": config.beta2,
        "eps": config.eps,
        "step_size": config.step_size,
        "bias_correction2_sqrt": config.bias_correction2_sqrt,
        "momentum": config.momentum,
        "dampening": config.dampening,
        "nesterov": int(config.nesterov),
        "momentum_init": int(config.momentum_init),
        "has_clip": int(config.clip_value is not None),
        "clip_value": 0.0 if config.clip_value is None else config.clip_value,
        "has_ema": int(has_ema),
        "ema_decay": ema_decay,
        "has_exp_avg": int(has_exp_avg),
        "has_coefficients": 1,
        "decay_factor": 1.0 - config.lr * config.weight_decay,
        "one_minus_beta1": 1.0 - config.beta1,
        "one_minus_beta2": 1.0 - config.beta2,
        "one_minus_dampening": 1.0 - config.dampening,
        "one_minus_ema_decay": 1.0 - ema_decay if config.ema_decay is not None else 0.0,
        "has_grad_scale": 0,
        "inv_grad_scale": 1.0,
        "maximize": int(config.maximize),
    }


def mask_words(numel: int) -> int:
    """Number of int32 words in the packed mask of a tensor with ``numel`` elements."""
    return (numel + MASK_WORD_BITS - 1) // MASK_WORD_BITS


def empty_masks(tensors: list[Tensor]) -> list[Tensor]:
    """Zeroed packed masks for ``tensors``, on their devices."""
    return [torch.zeros(mask_words(t.numel()), dtype=torch.int32, device=t.device) for t in tensors]


def budget(ratio: float, numel: int) -> int:
    """k = max(1, floor(ratio * N)): the number of elements a segment of ``numel`` selects."""
    return max(1, math.floor(ratio * numel))
