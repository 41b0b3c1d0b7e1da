"""The fused masked optimizer step over many tensors: select (or read a stored mask) and update."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import dispatch
from .backends.base import OPTIMIZERS, STATE_DTYPES, StepConfig, TensorGroup
from .profiling import nvtx_range
from .select import budgets, segments_of
from .validation import (
    check_choice,
    check_like,
    check_masks,
    check_ratio,
    check_score_and_scope,
    check_step_scalars,
    check_tensors,
)


def check_config(config: StepConfig, device: torch.device | None = None) -> None:
    """Hyper-parameters torch.optim would accept, with its messages where it has them (NaN is refused:
    every check is written so that NaN fails it); with a ``device``, also that ``config.scalars`` lives
    there."""
    check_choice("optimizer kind", config.kind, OPTIMIZERS)
    if not config.lr >= 0:
        raise ValueError(f"Invalid learning rate: {config.lr}")
    if not config.weight_decay >= 0:
        raise ValueError(f"Invalid weight_decay value: {config.weight_decay}")
    if config.kind == "sgd":
        if not config.momentum >= 0:
            raise ValueError(f"Invalid momentum value: {config.momentum}")
        if not 0.0 <= config.dampening <= 1.0:
            raise ValueError(f"Invalid dampening value: {config.dampening} (expected 0 <= dampening <= 1)")
        if config.nesterov and (config.momentum <= 0 or config.dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
    else:
        if not 0.0 <= config.beta1 < 1.0:
            raise ValueError(f"Invalid betas[0] (beta1): {config.beta1}; expected 0 <= beta1 < 1")
        if not 0.0 <= config.beta2 < 1.0:
            raise ValueError(f"Invalid betas[1] (beta2): {config.beta2}; expected 0 <= beta2 < 1")
        if not config.eps >= 0:
            raise ValueError(f"Invalid epsilon value: {config.eps}")
    if config.clip_value is not None and not config.clip_value > 0:
        raise ValueError(f"clip_value must be positive, got {config.clip_value}")
    if config.ema_decay is not None and not 0.0 <= config.ema_decay <= 1.0:
        raise ValueError(f"ema decay must be in [0, 1], got {config.ema_decay}")
    check_step_scalars(config.scalars, device)


def needs_exp_avg(config: StepConfig) -> bool:
    """Adam keeps no first moment when beta1 == 0; SGD keeps a buffer only with momentum."""
    return config.momentum > 0 if config.kind == "sgd" else config.beta1 > 0


def masked_update(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    config: StepConfig,
    *,
    exp_avg: Sequence[Tensor] | None = None,
    exp_avg_sq: Sequence[Tensor] | None = None,
    ema: Sequence[Tensor] | None = None,
    ratio: float | None = None,
    score: str = "grad",
    scope: str = "global",
    masks_in: Sequence[Tensor] | None = None,
    masks_out: Sequence[Tensor] | None = None,
    backend: str = "auto",
) -> None:
    """Update only the salient elements of ``params`` in place, in one pass over memory.

    Give ``ratio`` to select the top ``ratio`` scores now (exact, ties to the lower flat index), or
    ``masks_in`` (packed int32 masks) to reuse a stored selection. ``masks_out`` receives the packed
    mask that was applied. State tensors are shaped like ``params``; which ones are needed follows
    ``config`` (``exp_avg`` for Adam with beta1 > 0 or SGD with momentum, ``exp_avg_sq`` for Adam,
    ``ema`` when ``config.ema_decay`` is set). The moments are fp32 or bf16 (the math is fp32 either
    way; see ``StepConfig``), both moments of one tensor alike; the EMA is fp32. Inputs are all
    checked before anything is written, so a bad call changes nothing.
    """
    check_config(config)
    check_score_and_scope(score, scope)
    if (ratio is None) == (masks_in is None):
        raise ValueError("give exactly one of ratio (select now) or masks_in (a stored selection)")
    if ratio is not None:
        ratio = check_ratio(ratio)
    device = check_tensors("params", params)
    check_step_scalars(config.scalars, device)
    check_like("grads", grads, params, "params")
    _check_state("exp_avg", exp_avg, needs_exp_avg(config), params, config, STATE_DTYPES)
    _check_state("exp_avg_sq", exp_avg_sq, config.kind != "sgd", params, config, STATE_DTYPES)
    _check_state("ema", ema, config.ema_decay is not None, params, config, torch.float32)
    if exp_avg is not None and exp_avg_sq is not None:
        for i, (m, v) in enumerate(zip(exp_avg, exp_avg_sq, strict=True)):
            if m.dtype != v.dtype:  # the kernels take one moment dtype per tensor
                raise TypeError(f"exp_avg[{i}] has dtype {m.dtype} but exp_avg_sq[{i}] has {v.dtype}")
    check_masks("masks_in", masks_in, params)
    check_masks("masks_out", masks_out, params)

    impl = dispatch.resolve(backend, device)
    group = TensorGroup(
        params=[p.detach() for p in params],
        grads=[g.detach() for g in grads],
        exp_avg=_list(exp_avg),
        exp_avg_sq=_list(exp_avg_sq),
        ema=_list(ema),
    )
    segments = segments_of(params, scope)
    selection = None
    if ratio is not None:
        weights = group.params if score == "grad_weight" else None
        with nvtx_range("select"):
            selection = impl.select(group.grads, weights, score, segments, budgets(params, segments, ratio))
    with nvtx_range("update"):
        impl.update(
            group,
            config,
            score,
            segments,
            selection=selection,
            masks_in=_list(masks_in),
            masks_out=_list(masks_out),
        )


def _check_state(name, tensors, needed: bool, params, config: StepConfig, dtype) -> None:
    if needed and tensors is None:
        raise ValueError(f"{name} is required for this {config.kind} configuration")
    if not needed and tensors is not None:
        raise ValueError(f"{name} was given but this {config.kind} configuration keeps no {name}")
    check_like(name, tensors, params, "params", dtype=dtype)


def _list(tensors: Sequence[Tensor] | None) -> list[Tensor] | None:
    return None if tensors is None else [t.detach() for t in tensors]
