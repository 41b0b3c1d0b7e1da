"""The optimizer steps a benchmark compares, each a closure over the problem of one configuration.

Every contender updates the same parameters with AdamW (lr 1e-3, weight decay 1e-2); the masked ones keep
the top ``ratio`` of ``|grad|`` over all tensors together. ``bytes_per_param`` follows the bytes model in
docs/DESIGN.md, written for any parameter dtype: an Adam step reads p, g and its moments and writes p and the
moments; parameters and gradients take the parameter dtype's bytes, moments take torch's choice (the
parameter dtype) or ours (fp32). GB/s therefore means the same thing for every row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

import pecker_kernels as pk
from pecker_kernels.backends.base import budget

from . import layouts

LR, WEIGHT_DECAY = 1e-3, 1e-2
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Config:
    """One benchmark configuration: a parameter layout, its dtype, the fraction kept, the device."""

    layout: str  # "flat" or a name from layouts.MODELS
    shapes: tuple[tuple[int, ...], ...]
    dtype: str  # a key of DTYPES
    ratio: float
    device: str

    @property
    def numel(self) -> int:
        return layouts.numel(list(self.shapes))

    @property
    def element_bytes(self) -> int:
        return DTYPES[self.dtype].itemsize

    def describe(self) -> str:
        tensors = f" ({len(self.shapes)} tensors)" if len(self.shapes) > 1 else ""
        return f"{self.layout} {self.numel:.3g}{tensors}, {self.dtype}, ratio {self.ratio}"


@dataclass
class Contender:
    name: str
    step: Callable[[], None]
    bytes_per_param: float
    prepare: Callable[[], None] | None = None  # untimed, before every step


@dataclass
class Problem:
    """Parameters and gradients shared by every contender of a configuration; each contender keeps its
    own optimizer state. A step moves parameters by about lr, which changes no timing, and sharing is
    what lets 1e9 parameters and all the fused contenders fit on one GPU together."""

    params: list[Tensor]
    grads: list[Tensor]


def make_problem(config: Config, seed: int = 0) -> Problem:
    gen = torch.Generator(device=config.device).manual_seed(seed)
    dtype = DTYPES[config.dtype]

    def draw(shape: tuple[int, ...]) -> Tensor:
        return torch.randn(shape, generator=gen, device=config.device, dtype=dtype)

    return Problem([draw(s) for s in config.shapes], [draw(s) for s in config.shapes])


def _leaves(problem: Problem, grads: list[Tensor] | None = None) -> list[Tensor]:
    """New leaf tensors over the shared parameter storage, so each optimizer has its own ``.grad`` slot
    and state (optimizers key both by tensor object)."""
    out = []
    for p, g in zip(problem.params, grads or problem.grads, strict=True):
        leaf = p.detach().requires_grad_(True)
        leaf.grad = g
        out.append(leaf)
    return out


def adam_bytes(param_bytes: int, state_bytes: int, moments: int = 2) -> float:
    """Reads p, g and the moments; writes p and the moments."""
    return 3 * param_bytes + 2 * moments * state_bytes


def bandwidth_reference(config: Config) -> Contender:
    """Read and write one fp32 tensor in place: the traffic pattern of an optimizer step. (A copy into
    a second buffer also pays the write-allocate read of the destination, and reads slower per byte
    than AdamW itself on the CPU.)"""
    x = torch.ones(config.numel, device=config.device)
    return Contender("in-place scale (bandwidth reference)", lambda: x.mul_(1.0), 8.0)


def torch_adamw(config: Config, problem: Problem, impl: str) -> Contender:
    flags = {"fused": dict(fused=True), "foreach": dict(foreach=True), "single-tensor": dict(foreach=False)}
    opt = torch.optim.AdamW(_leaves(problem), lr=LR, weight_decay=WEIGHT_DECAY, **flags[impl])
    size = config.element_bytes
    return Contender(f"torch AdamW ({impl})", opt.step, adam_bytes(size, size))


def salient_adamw(
    config: Config,
    problem: Problem,
    backend: str,
    *,
    stored_mask: bool,
    beta1: float = 0.9,
    low_state: bool = False,
) -> Contender:
    """Our drop-in optimizer. A stored mask is selected at the first (warm-up) step and reused.
    ``low_state``: moments stored in the parameters' dtype (``state_dtype``) instead of fp32."""
    opt = pk.SalientAdamW(
        _leaves(problem),
        lr=LR,
        betas=(beta1, 0.999),
        weight_decay=WEIGHT_DECAY,
        ratio=config.ratio,
        refresh_every=0 if stored_mask else 1,
        state_dtype=DTYPES[config.dtype] if low_state else None,
        backend=backend,
    )
    size = config.element_bytes
    # Moments (none for beta1 = 0); a stored mask adds 1 bit, reselection about three passes over g.
    base = adam_bytes(size, size if low_state else 4, moments=2 if beta1 > 0 else 1)
    extra = 1 / 8 if stored_mask else 3 * size
    mode = ("stored mask" if stored_mask else "reselect") + (", beta1=0" if beta1 == 0 else "")
    mode += f", {config.dtype} moments" if low_state else ""
    return Contender(f"SalientAdamW {backend} ({mode})", opt.step, base + extra)


# ---- the eager pipelines users write today --------------------------------------------------------


def _scores(grads: list[Tensor]) -> Tensor:
    """|g| of every tensor, concatenated in order (SalUn's code concatenates too)."""
    return torch.cat([g.abs().reshape(-1) for g in grads])


def _split(flat: Tensor, grads: list[Tensor]) -> list[Tensor]:
    return [m.view_as(g) for m, g in zip(flat.split([g.numel() for g in grads]), grads, strict=True)]


def kthvalue_masks(grads: list[Tensor], k: int) -> list[Tensor]:
    scores = _scores(grads)
    threshold = scores.kthvalue(scores.numel() - k + 1).values
    return _split(scores >= threshold, grads)  # ties at the threshold are all kept: not exact


def topk_masks(grads: list[Tensor], k: int) -> list[Tensor]:
    scores = _scores(grads)
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    mask[scores.topk(k, sorted=False).indices] = True
    return _split(mask, grads)


def salun_masks(grads: list[Tensor], k: int) -> list[Tensor]:
    """SalUn's mask generation: rank all scores by argsort twice, int64 0/1 mask per parameter."""
    scores = _scores(grads)
    ranks = torch.argsort(torch.argsort(scores, descending=True))
    return _split((ranks < k).to(torch.int64), grads)


# name, mask builder, bytes of one mask element, extra bytes per element of the sorts (two int64
# permutations written and read for SalUn's ranks)
PIPELINES = {
    "kthvalue": ("eager kthvalue + mul + AdamW", kthvalue_masks, 1, 0),
    "topk": ("eager topk + mul + AdamW", topk_masks, 1, 0),
    "salun": ("eager SalUn (argsort x2) + AdamW", salun_masks, 8, 32),
}


def eager_masked(config: Config, problem: Problem, pipeline: str) -> Contender:
    """Build a mask from |grad|, ``grad.mul_(mask)``, step torch's fused AdamW. The multiply writes the
    gradient, so this contender has its own copy, refreshed untimed before each step as a backward
    pass would."""
    name, make_masks, mask_bytes, sort_bytes = PIPELINES[pipeline]
    grads = [g.clone() for g in problem.grads]
    opt = torch.optim.AdamW(_leaves(problem, grads), lr=LR, weight_decay=WEIGHT_DECAY, fused=True)
    k = budget(config.ratio, config.numel)

    def step() -> None:
        for g, mask in zip(grads, make_masks(grads, k), strict=True):
            g.mul_(mask)
        opt.step()

    def fresh_gradients() -> None:
        for g, source in zip(grads, problem.grads, strict=True):
            g.copy_(source)

    size = config.element_bytes
    # A lower bound on the traffic beyond AdamW: |g| written and read, the mask written and read, the
    # multiply's read and write of g, the sort's permutations. Sorting reads its data several times more.
    extra = 2 * size + 2 * mask_bytes + 2 * size + sort_bytes
    return Contender(name, step, adam_bytes(size, size) + extra, prepare=fresh_gradients)


def compiled_kthvalue(config: Config, problem: Problem) -> Contender:
    """torch.compile of the eager kthvalue step, shapes static."""
    torch._dynamo.reset()  # compile afresh: no recompile limit reached across configurations
    # Compile in this process: a pool of compile workers starting in the background would take CPU time
    # from the contenders timed meanwhile.
    torch._inductor.config.compile_threads = 1
    contender = eager_masked(config, problem, "kthvalue")
    contender.step = torch.compile(contender.step, dynamic=False)
    contender.name = "torch.compile(kthvalue + mul + AdamW)"
    return contender
