"""Input checks, done once in Python before any kernel runs, so bad input changes nothing."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .backends.base import PARAM_DTYPES, SCALARS, SCORES, mask_words

SCOPES: tuple[str, ...] = ("global", "per_tensor")


def check_ratio(ratio: float) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise TypeError(f"ratio must be a float in (0, 1], got {type(ratio).__name__}")
    if not 0.0 < float(ratio) <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    return float(ratio)


def check_choice(name: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(map(repr, choices))}")
    return value


def check_list(name: str, tensors: Sequence[Tensor]) -> None:
    if isinstance(tensors, Tensor) or not isinstance(tensors, Sequence):
        raise TypeError(f"{name} must be a list of tensors, got {type(tensors).__name__}")


def check_tensors(name: str, tensors: Sequence[Tensor], device: torch.device | None = None) -> torch.device:
    """Dense, contiguous fp32/fp16/bf16 tensors on one device; returns that device."""
    check_list(name, tensors)
    if len(tensors) == 0:
        raise ValueError(f"{name} is empty")
    for i, t in enumerate(tensors):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
        if t.is_sparse or t.layout != torch.strided:
            raise TypeError(f"{name}[{i}] is a sparse tensor; only dense tensors are supported")
        if t.dtype not in PARAM_DTYPES:
            raise TypeError(f"{name}[{i}] has dtype {t.dtype}; expected float32, float16 or bfloat16")
        if not t.is_contiguous():
            raise ValueError(f"{name}[{i}] is not contiguous; call .contiguous() first")
        device = device or t.device
        if t.device != device:
            raise ValueError(f"{name}[{i}] is on {t.device} but the other tensors are on {device}")
    return device


def check_like(
    name: str,
    tensors: Sequence[Tensor] | None,
    reference: Sequence[Tensor],
    ref_name: str,
    *,
    dtype: torch.dtype | tuple[torch.dtype, ...] | None = None,
) -> None:
    """``tensors`` pair up with ``reference``: same count, shapes and device (and ``dtype``, one dtype
    or a tuple of allowed ones, if given, else the reference's dtype)."""
    if tensors is None:
        return
    check_tensors(name, tensors, reference[0].device)
    if len(tensors) != len(reference):
        raise ValueError(f"{name} has {len(tensors)} tensors but {ref_name} has {len(reference)}")
    for i, (t, r) in enumerate(zip(tensors, reference, strict=True)):
        if t.shape != r.shape:
            raise ValueError(
                f"{name}[{i}] has shape {tuple(t.shape)} but {ref_name}[{i}] has {tuple(r.shape)}"
            )
        allowed = dtype if isinstance(dtype, tuple) else (dtype or r.dtype,)
        if t.dtype not in allowed:
            want = " or ".join(map(str, allowed))
            raise TypeError(f"{name}[{i}] has dtype {t.dtype}; expected {want}")


def check_masks(name: str, masks: Sequence[Tensor] | None, reference: Sequence[Tensor]) -> None:
    """Packed masks: one contiguous int32 tensor of ceil(numel / 32) words per reference tensor."""
    if masks is None:
        return
    if len(masks) != len(reference):
        raise ValueError(f"{name} has {len(masks)} masks but there are {len(reference)} tensors")
    for i, (m, r) in enumerate(zip(masks, reference, strict=True)):
        if not isinstance(m, Tensor) or m.dtype != torch.int32 or m.dim() != 1 or not m.is_contiguous():
            raise TypeError(f"{name}[{i}] must be a contiguous 1-D int32 tensor (a packed bit mask)")
        if m.numel() != mask_words(r.numel()):
            raise ValueError(
                f"{name}[{i}] has {m.numel()} words; "
                f"a tensor of {r.numel()} elements needs {mask_words(r.numel())}"
            )
        if m.device != r.device:
            raise ValueError(f"{name}[{i}] is on {m.device} but its tensor is on {r.device}")


def check_score_and_scope(score: str, scope: str) -> None:
    check_choice("score", score, SCORES)
    check_choice("scope", scope, SCOPES)


def check_step_scalars(scalars: Tensor | None, device: torch.device | None = None) -> None:
    """``StepConfig.scalars``: None, or a contiguous float32 tensor of 5 elements (on ``device``)."""
    if scalars is None:
        return
    layout = f"[{', '.join(SCALARS)}]"
    if not isinstance(scalars, Tensor):
        raise TypeError(f"config.scalars must be a float32 tensor {layout}, got {type(scalars).__name__}")
    if scalars.dtype != torch.float32:
        raise TypeError(f"config.scalars has dtype {scalars.dtype}; expected torch.float32")
    if scalars.numel() != len(SCALARS):
        raise ValueError(f"config.scalars has {scalars.numel()} elements; expected {len(SCALARS)}: {layout}")
    if not scalars.is_contiguous():
        raise ValueError("config.scalars is not contiguous; call .contiguous() first")
    if device is not None and scalars.device != device:
        raise ValueError(f"config.scalars is on {scalars.device} but the params are on {device}")


def as_float(name: str, value: object) -> float:
    """A hyper-parameter as a Python float: ints, floats and one-element tensors (as torch accepts)."""
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.is_complex():
            raise ValueError(f"Tensor {name} must be 1-element and real, got shape {tuple(value.shape)}")
        return float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    return float(value)


def check_flag(name: str, value: object, *, optional: bool = False) -> None:
    """A boolean option (``None`` too where torch allows it, e.g. ``foreach``/``fused``)."""
    if value is None and optional:
        return
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be {'True, False or None' if optional else 'a bool'}, got {value!r}")


def check_kernel_state(
    where: str, key: str, t: object, shard: Tensor, dtypes: tuple[torch.dtype, ...]
) -> None:
    """One optimizer state tensor exactly as the kernels read it: ``shard``'s shape and device, one of
    ``dtypes``, contiguous (the kernels read ``shard.numel()`` elements from its address)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{where}: state[{key!r}] must be a tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(
            f"{where}: state[{key!r}] has dtype {t.dtype}; expected {' or '.join(map(str, dtypes))}"
        )
    if t.shape != shard.shape:
        raise ValueError(
            f"{where}: state[{key!r}] has shape {tuple(t.shape)} but the parameter has {tuple(shard.shape)}"
        )
    if t.device != shard.device:
        raise ValueError(f"{where}: state[{key!r}] is on {t.device} but the parameter is on {shard.device}")
    if not t.is_contiguous():
        raise ValueError(f"{where}: state[{key!r}] is not contiguous")


def check_packed_mask(where: str, t: object, shard: Tensor) -> None:
    """A stored packed mask: contiguous 1-D int32 of ``mask_words(shard.numel())`` on ``shard``'s device."""
    words = mask_words(shard.numel())
    if not isinstance(t, Tensor) or t.dtype != torch.int32 or t.dim() != 1:
        got = f"{t.dtype} tensor of {t.dim()} dims" if isinstance(t, Tensor) else type(t).__name__
        raise TypeError(f"{where}: state['mask'] must be a 1-D int32 tensor (packed bits), got {got}")
    if t.numel() != words:
        raise ValueError(
            f"{where}: state['mask'] has {t.numel()} words; "
            f"a parameter of {shard.numel()} elements needs {words}"
        )
    if t.device != shard.device or not t.is_contiguous():
        raise ValueError(f"{where}: state['mask'] must be contiguous and on {shard.device}")
