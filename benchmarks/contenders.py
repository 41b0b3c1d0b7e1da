"""The optimizer steps a benchmark compares, each a closure over its own copy of one flat problem.

Every contender updates the same number of parameters with AdamW (lr 1e-3, weight decay 1e-2);
the masked ones keep the top ``ratio`` of ``|grad|``. ``bytes_per_param`` follows the bytes model in
DESIGN.md, so GB/s means the same thing for every row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

import pecker_kernels as pk
from pecker_kernels.backends.base import budget, empty_masks


@dataclass
class Contender:
    name: str
    step: Callable[[], None]
    bytes_per_param: float


def _problem(n: int, device: str, seed: int = 0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    p = torch.randn(n, generator=gen).to(device).requires_grad_(True)
    p.grad = torch.randn(n, generator=gen).to(device)
    return p


def torch_adamw(n: int, device: str, impl: str) -> Contender:
    p = _problem(n, device)
    flags = {"fused": dict(fused=True), "foreach": dict(foreach=True), "single-tensor": dict(foreach=False)}[
        impl
    ]
    opt = torch.optim.AdamW([p], lr=1e-3, weight_decay=1e-2, **flags)
    return Contender(f"torch AdamW ({impl})", opt.step, 28.0)


def _masked_then_adamw(
    n: int, device: str, make_mask: Callable[[torch.Tensor], torch.Tensor], name: str, extra_bytes: float
) -> Contender:
    """The eager pattern users write today: build a mask, multiply the gradient, step torch AdamW."""
    p = _problem(n, device)
    opt = torch.optim.AdamW([p], lr=1e-3, weight_decay=1e-2, fused=True)

    def step() -> None:
        p.grad.mul_(make_mask(p.grad))
        opt.step()

    return Contender(name, step, 28.0 + extra_bytes)


def eager_kthvalue(n: int, device: str, ratio: float) -> Contender:
    k = budget(ratio, n)

    def mask(g: torch.Tensor) -> torch.Tensor:
        s = g.abs()
        threshold = s.kthvalue(n - k + 1).values  # ties at the threshold are all kept: not exact
        return (s >= threshold).to(g.dtype)

    return _masked_then_adamw(n, device, mask, "eager kthvalue + mul + AdamW", 16.0)


def eager_topk(n: int, device: str, ratio: float) -> Contender:
    k = budget(ratio, n)

    def mask(g: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(g)
        out[g.abs().topk(k, sorted=False).indices] = 1.0
        return out

    return _masked_then_adamw(n, device, mask, "eager topk + mul + AdamW", 16.0)


def eager_salun(n: int, device: str, ratio: float) -> Contender:
    """SalUn's mask generation: concatenate, abs, argsort twice (ranks), int64 mask, multiply."""
    k = budget(ratio, n)

    def mask(g: torch.Tensor) -> torch.Tensor:
        scores = torch.cat([g.abs().reshape(-1)])
        ranks = torch.argsort(torch.argsort(scores, descending=True))
        return (ranks < k).to(torch.int64).to(g.dtype)

    return _masked_then_adamw(n, device, mask, "eager SalUn (argsort x2) + AdamW", 48.0)


def compiled_kthvalue(n: int, device: str, ratio: float) -> Contender:
    contender = eager_kthvalue(n, device, ratio)
    contender.step = torch.compile(contender.step)
    contender.name = "torch.compile(kthvalue + mul + AdamW)"
    return contender


def ours(n: int, device: str, ratio: float, backend: str, stored_mask: bool, beta1: float = 0.9) -> Contender:
    leaf = _problem(n, device)
    p, g = leaf.detach(), leaf.grad
    m = None if beta1 == 0 else torch.zeros_like(p)
    v = torch.zeros_like(p)
    masks = empty_masks([p])
    pk.masked_update(
        [p],
        [g],
        _config(beta1),
        exp_avg=None if m is None else [m],
        exp_avg_sq=[v],
        ratio=ratio,
        masks_out=masks,
        backend=backend,
    )
    state = {"step": 1}

    def step() -> None:
        state["step"] += 1
        kwargs = dict(masks_in=masks) if stored_mask else dict(ratio=ratio)
        pk.masked_update(
            [p],
            [g],
            _config(beta1, state["step"]),
            exp_avg=None if m is None else [m],
            exp_avg_sq=[v],
            backend=backend,
            **kwargs,
        )

    base = 28.0 if beta1 > 0 else 20.0
    # Stored mask: + 1 bit. Reselection: about three digit passes over g (+ a possible tie pass).
    extra = 1 / 8 if stored_mask else 3 * 4.0
    mode = ("stored mask" if stored_mask else "reselect") + (", beta1=0" if beta1 == 0 else "")
    return Contender(f"pecker {backend} ({mode})", step, base + extra)


def _config(beta1: float, step: int = 1) -> pk.StepConfig:
    return pk.StepConfig.adam("adamw", lr=1e-3, step=step, betas=(beta1, 0.999), weight_decay=1e-2)


def bandwidth_reference(n: int, device: str) -> Contender:
    """Read and write one fp32 tensor in place: the traffic pattern of an optimizer step. (A copy into
    a second buffer also pays the write-allocate read of the destination, and reads slower per byte
    than AdamW itself on the CPU.)"""
    x = torch.randn(n, device=device)
    return Contender("in-place scale (bandwidth reference)", lambda: x.mul_(1.0), 8.0)
