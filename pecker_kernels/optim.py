"""Drop-in torch.optim optimizers that update only the most salient parameters.

``SalientAdamW``, ``SalientAdam`` and ``SalientSGD`` take the positional arguments and defaults of the
torch optimizer they replace, plus keyword-only saliency options (all settable per param group):

* ``ratio`` in (0, 1]: fraction of the elements in scope updated each step, ``k = max(1, floor(ratio*N))``.
* ``score``: ``"grad"`` (``|g|``) or ``"grad_weight"`` (``|g * w|``).
* ``scope``: ``"global"`` (one selection over every parameter of every group whose scope is global; those
  groups must agree on ratio, score, refresh_every and backend) or ``"per_tensor"``.
* ``refresh_every``: 1 reselects every step; K > 1 reselects at steps 1, K+1, 2K+1, ... and reuses the
  stored bit-packed mask in between; 0 selects once (the first step, or ``compute_mask``/``set_masks``).
* ``clip_value``: clip gradients by value inside the fused step. ``ema``: keep an EMA copy of the
  parameters (decay) in the same pass, see ``ema_parameters()``.
* ``state_dtype``: storage of the moments (``exp_avg``, ``exp_avg_sq``, ``momentum_buffer``): None or
  ``torch.float32`` (default), or ``torch.bfloat16`` to halve their memory. The math stays fp32: each
  moment is loaded to fp32 and rounded once (to nearest even) when stored. The EMA copy stays fp32.
* ``backend``: "auto", "eager", "cpu", "cuda" or "triton".
* ``process_group``: the parameters are this rank's shards of one global set; selections span every
  rank of the group (see ``pecker_kernels.distributed``). Sharded DTensor parameters (FSDP2) bring
  their mesh's group without it. Replicated parameters (DDP) need neither.

Selection order is param-group order, then parameter order, each tensor row-major; ties at the
threshold go to the lower flat index and non-finite scores are never selected. Unselected elements are
frozen: parameter, moments and weight decay untouched. Parameters without a gradient are skipped.
State lives under torch's keys (``step``, ``exp_avg``, ``exp_avg_sq``, ``momentum_buffer``) plus ``mask``
(packed int32 bits), ``ema`` and ``selection_step`` (the host count of ``step()`` calls that drives
``refresh_every``). ``step`` counts applied steps and lives on the parameter's device, as in torch's
fused AdamW: on a GPU the bias corrections are computed there, so nothing in ``step()`` reads back to
the host and the step can be captured in a CUDA graph.

AMP: with ``torch.amp.GradScaler`` the optimizer takes the scaler's ``grad_scale`` and ``found_inf``
(``_step_supports_amp_scaling``): gradients are unscaled inside the fused pass and a step with
inf/NaN gradients is skipped on the device (parameters, moments, EMA, masks and ``step`` unchanged),
without a host sync.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import dispatch, distributed
from .backends import eager
from .backends.base import PARAM_DTYPES, SCORES, STATE_DTYPES, StepConfig, TensorGroup, empty_masks
from .profiling import nvtx_range
from .select import budgets, segments_of
from .update import check_config
from .validation import SCOPES, check_choice, check_ratio

_local = distributed.local

_SCOPE_KEYS = (
    "ratio",
    "score",
    "refresh_every",
    "backend",
)  # what groups sharing a global scope must agree on


class _SalientOptimizer(Optimizer):
    """Shared machinery: scopes, selection schedule, masks, EMA. Subclasses say how to build a step."""

    kind: str
    # torch.amp.GradScaler then hands over grad_scale / found_inf instead of unscaling and syncing.
    _step_supports_amp_scaling = True

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any], process_group: Any = None) -> None:
        self._process_group = process_group
        super().__init__(params, defaults)
        for group in self.param_groups:
            self._check_group(group)
        self._check_ranks()

    # ---- torch.optim plumbing ------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "state"):  # also called from Optimizer.__init__, before our own checks
            self._check_group(self.param_groups[-1])
            self._check_ranks()

    def _check_group(self, group: dict[str, Any]) -> None:
        check_ratio(group["ratio"])
        check_choice("score", group["score"], SCORES)
        check_choice("scope", group["scope"], SCOPES)
        refresh = group["refresh_every"]
        if isinstance(refresh, bool) or not isinstance(refresh, int) or refresh < 0:
            raise ValueError(f"refresh_every must be an int >= 0, got {refresh!r}")
        if group["backend"] != "auto" and group["params"]:
            dispatch.resolve(group["backend"], group["params"][0].device)  # raises if it cannot run there
        check_config(self._config(group, step=1))
        _state_dtype(group)
        for p in group["params"]:
            if p.dtype not in PARAM_DTYPES:
                raise TypeError(
                    f"{type(self).__name__} supports float32, float16 and bfloat16 parameters, got {p.dtype}"
                )

    def _comm(self, groups: list[dict[str, Any]]) -> Any:
        """The process group a scope selects over, or None for a local selection."""
        return distributed.resolve_group([p for g in groups for p in g["params"]], self._process_group)

    def _check_ranks(self) -> None:
        """Sharded scopes run collectives in lockstep: every rank must build the same structure."""
        if self._process_group is None and not any(map(distributed.is_dtensor, self._all_params())):
            return
        for groups in self._scopes():
            comm = self._comm(groups)
            if comm is None:
                continue
            signature = [len(self.param_groups)]
            for g in self.param_groups:
                per_tensor = g["scope"] == "per_tensor"
                signature += [per_tensor, g["ratio"], SCORES.index(g["score"]), g["refresh_every"]]
                signature.append(len(g["params"]) if per_tensor else -1)
            shards = [_local(p) for g in groups for p in g["params"]]
            distributed.check_same_on_all_ranks(
                comm, "param groups", signature, distributed.comm_device(comm, shards)
            )
            return  # one check covers every scope: they all follow the same signature

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("state_dtype", None)  # saved before the option existed

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's, but state keeps its own dtype: moments in their group's ``state_dtype``, fp32 EMA
        and step, int32 masks (torch would cast every state tensor to the parameter's dtype). As with
        torch, the saved param groups (``state_dtype`` included) replace the current ones. Moves state
        to each parameter's device."""
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        pairs = [(g, p) for g in self.param_groups for p in g["params"]]
        for param_id, (group, p) in zip(ids, pairs, strict=True):
            state = self.state[p]
            moments = self._state_keys(group)
            for key, value in saved.get(param_id, {}).items():
                if isinstance(value, Tensor):
                    dtype = value.dtype
                    if value.is_floating_point():
                        dtype = _state_dtype(group) if key in moments else torch.float32
                    state[key] = value.to(device=_local(p).device, dtype=dtype, copy=True)
            if "step" in state and "selection_step" not in state:  # saved before the key existed
                state["selection_step"] = int(state["step"])

    # ---- what subclasses provide ---------------------------------------------------------------

    def _config(self, group: dict[str, Any], step: int) -> StepConfig:
        raise NotImplementedError

    def _step_terms(self, group: dict[str, Any], step: Tensor) -> tuple[Tensor, Tensor]:
        """(step_size, bias_correction2_sqrt) of a float64 device ``step``, as ``_config`` has them."""
        raise NotImplementedError

    def _state_keys(self, group: dict[str, Any]) -> tuple[str | None, str | None]:
        """State keys of the kernel's (first-moment-or-momentum, second-moment) slots."""
        raise NotImplementedError

    # ---- the step ------------------------------------------------------------------------------

    # Compiled training steps graph-break here: the kernels are opaque to dynamo, and running the
    # step eagerly is both correct and as fast (it is one fused pass already).
    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Set by torch.amp.GradScaler.step for the duration of this call (see _step_supports_amp_scaling).
        amp = (getattr(self, "grad_scale", None), getattr(self, "found_inf", None))
        for scope in self._scopes():
            self._step_scope(scope, *amp)
        return loss

    def _scopes(self) -> list[list[dict[str, Any]]]:
        """Groups that select together: all global groups as one, each per-tensor group alone."""
        global_groups = [g for g in self.param_groups if g["scope"] == "global"]
        if global_groups:
            first = global_groups[0]
            for g in global_groups[1:]:
                for key in _SCOPE_KEYS:
                    if g[key] != first[key]:
                        raise ValueError(
                            f"param groups sharing scope='global' must agree on {key!r}: "
                            f"{first[key]!r} != {g[key]!r} (use scope='per_tensor' or equal values)"
                        )
        scopes = [global_groups] if global_groups else []
        return scopes + [[g] for g in self.param_groups if g["scope"] == "per_tensor"]

    def _active(self, groups: list[dict[str, Any]]) -> list[tuple[dict[str, Any], Tensor]]:
        active = []
        for group in groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise TypeError(f"{type(self).__name__} does not support sparse gradients")
                active.append((group, p))
        return active

    def _init_state(self, group: dict[str, Any], p: Tensor) -> dict[str, Any]:
        state = self.state[p]
        dtype = _state_dtype(group)
        moments = [key for key in self._state_keys(group) if key is not None]
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=_local(p).device)
            state["selection_step"] = 0
            for key in moments:
                state[key] = torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)
        for key in moments:
            if state[key].dtype != dtype:  # the group's state_dtype was changed since
                state[key] = state[key].to(dtype)
        if group["ema"] is not None and "ema" not in state:
            state["ema"] = p.detach().float().clone(memory_format=torch.contiguous_format)
        return state

    def _step_scope(
        self, groups: list[dict[str, Any]], grad_scale: Tensor | None = None, found_inf: Tensor | None = None
    ) -> None:
        comm = self._comm(groups)
        active = self._active(groups)
        if not active and comm is None:
            return
        params = [_local(p) for _, p in active]
        grads = [_local(p.grad) for _, p in active]
        devices = {p.device for p in params}
        if len(devices) > 1:
            raise ValueError(
                f"parameters of one selection scope are on several devices ({', '.join(map(str, devices))});"
                " put each device's parameters in its own param group with scope='per_tensor', or one device"
            )
        for p in params:
            if not p.is_contiguous():
                raise ValueError("parameters must be contiguous")
        lead = groups[0]
        device = next(iter(devices)) if devices else distributed.comm_device(comm, [])
        impl = dispatch.resolve(lead["backend"], device)
        states = [self._init_state(g, p) for g, p in active]
        for state in states:
            state["selection_step"] += 1
        # A rank with no gradients in a sharded scope still joins the selection's collectives: it
        # follows the schedule of the scope's parameters as they stand.
        scheduled = states or [self.state[p] for g in groups for p in g["params"]]
        refresh_every = lead["refresh_every"]
        new_step = max((s.get("selection_step", 0) for s in scheduled), default=0) + (not states)
        due = any("mask" not in s for s in scheduled) or (
            refresh_every > 0 and (new_step - 1) % refresh_every == 0
        )
        # Step-dependent scalars on the device (see module doc) except for a plain CPU step, where
        # host and device are one and the host floats are exact and cheapest.
        on_device = device.type != "cpu" or grad_scale is not None or found_inf is not None
        skipped = None if found_inf is None else found_inf.to(device=device, dtype=torch.float32) != 0

        for state, p in zip(states, params, strict=True):
            if "mask" not in state:
                state["mask"] = empty_masks([p])[0]
        masks = [s["mask"] for s in states]
        segments = segments_of(params, lead["scope"])
        score = lead["score"]

        # One update call per (group, step count): bias corrections and hyper-parameters differ.
        # Parameters that joined at the same call share their step count (skips included).
        calls: dict[tuple[int, int], list[int]] = {}
        for index, ((group, _), state) in enumerate(zip(active, states, strict=True)):
            calls.setdefault((id(group), state["selection_step"]), []).append(index)

        selection = None
        if due:
            weights = params if score == "grad_weight" else None
            selection = _select(impl, lead, grads, weights, segments, comm)
            if len(calls) > 1:  # tie ranks span the whole scope: fix the mask once, then update by call
                fresh = masks if skipped is None else empty_masks(params)
                with nvtx_range("write_masks"):
                    impl.write_masks(grads, weights, score, segments, selection, fresh)
                if skipped is not None:  # a skipped step keeps the masks in force
                    for old, new in zip(masks, fresh, strict=True):
                        old.copy_(torch.where(skipped, old, new))
                selection = None

        for indices in calls.values():
            group = active[indices[0]][0]
            steps = [states[i]["step"] for i in indices]
            if on_device:
                config = self._config(group, 1)
                scalars = self._device_scalars(group, steps, grad_scale, skipped, device)
                config = replace(config, scalars=scalars)
            else:
                for step in steps:
                    step += 1
                config = self._config(group, int(steps[0]))
            first, second = self._state_keys(group)
            sub = TensorGroup(
                params=[params[i] for i in indices],
                grads=[grads[i] for i in indices],
                exp_avg=None if first is None else [_local(states[i][first]) for i in indices],
                exp_avg_sq=None if second is None else [_local(states[i][second]) for i in indices],
                ema=[_local(states[i]["ema"]) for i in indices] if group["ema"] is not None else None,
            )
            sub_masks = [masks[i] for i in indices]
            with nvtx_range("update"):
                if selection is not None:
                    impl.update(sub, config, score, segments, selection=selection, masks_out=sub_masks)
                else:
                    sub_segments = [segments[i] for i in indices]
                    impl.update(sub, config, score, sub_segments, masks_in=sub_masks)

    def _device_scalars(
        self,
        group: dict[str, Any],
        steps: list[Tensor],
        grad_scale: Tensor | None,
        skipped: Tensor | None,
        device: torch.device,
    ) -> Tensor:
        """Advance ``steps`` (unless ``skipped``) and return the update's StepConfig.scalars:
        [step_size, bias_correction2_sqrt, inv_grad_scale, found_inf, momentum_init], all on the device."""
        zero = torch.zeros((), dtype=torch.float32, device=device)
        found = zero if skipped is None else skipped.float()
        step = steps[0] + (1.0 - found)  # the call's parameters share one count
        for s in steps:
            s.copy_(step)
        step64 = step.double()
        step_size, bias_correction2_sqrt = self._step_terms(group, step64)
        # As GradScaler.unscale_: the reciprocal in float64, rounded once.
        inv_scale = zero + 1.0 if grad_scale is None else grad_scale.to(device).double().reciprocal()
        momentum_init = (step64 == 1).double()
        terms = [step_size, bias_correction2_sqrt, inv_scale, found.double(), momentum_init]
        return torch.stack([t.to(torch.float64) for t in terms]).to(torch.float32)

    # ---- masks ---------------------------------------------------------------------------------

    def _all_params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def masks(self) -> list[Tensor]:
        """One bool tensor per parameter (param-group order): the selection in force (False before any).
        DTensor parameters get DTensor masks over their local shards."""
        out = []
        for p in self._all_params():
            shard = _local(p)
            mask = self.state[p].get("mask")
            bits = (
                eager.unpack(mask, shard.numel())
                if mask is not None
                else torch.zeros(shard.numel(), dtype=torch.bool)
            )
            out.append(distributed.like(bits.view(shard.shape).to(shard.device), p))
        return out

    def set_masks(
        self,
        masks: Sequence[Tensor] | Mapping[str, Tensor],
        named_parameters: Iterable[tuple[str, Tensor]] | None = None,
    ) -> None:
        """Store a selection: a list of bool/0-1 tensors (param-group order), or a SalUn-style dict
        ``{name: 0/1 tensor}`` together with ``model.named_parameters()``."""
        params = self._all_params()
        if isinstance(masks, Mapping):
            if named_parameters is None:
                raise ValueError("a dict of masks needs named_parameters to map names to parameters")
            by_id = {id(p): name for name, p in named_parameters}
            missing = [i for i, p in enumerate(params) if id(p) not in by_id or by_id[id(p)] not in masks]
            if missing:
                raise ValueError(f"no mask given for {len(missing)} of the optimizer's parameters")
            masks = [masks[by_id[id(p)]] for p in params]
        if len(masks) != len(params):
            raise ValueError(f"got {len(masks)} masks for {len(params)} parameters")
        packed = []
        for i, (mask, p) in enumerate(zip(masks, params, strict=True)):
            shard = _local(p)  # DTensor parameters take DTensor masks, or masks of their local shard
            if not isinstance(mask, Tensor) or _local(mask).shape != shard.shape:
                shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
                raise ValueError(f"mask {i} has shape {shape}; its parameter has shape {tuple(p.shape)}")
            packed.append(eager.pack((_local(mask) != 0).reshape(-1).to(shard.device)))
        for p, words in zip(params, packed, strict=True):
            self.state[p]["mask"] = words

    @torch.no_grad()
    def compute_mask(self, grads: Sequence[Tensor] | None = None) -> None:
        """Select now from ``grads`` (one per parameter, param-group order; default: each ``.grad``)
        and store the masks; with ``refresh_every=0`` they stay in force for the rest of training."""
        params = self._all_params()
        if grads is None:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        grads = list(grads)
        if len(grads) != len(params):
            raise ValueError(f"got {len(grads)} gradients for {len(params)} parameters")
        index = {id(p): i for i, p in enumerate(params)}
        for groups in self._scopes():
            lead = groups[0]
            comm = self._comm(groups)
            scope_params = [p for g in groups for p in g["params"]]
            shards = [_local(p).detach() for p in scope_params]
            scope_grads = [_local(grads[index[id(p)]]).detach().contiguous() for p in scope_params]
            segments = segments_of(shards, lead["scope"])
            impl = dispatch.resolve(lead["backend"], shards[0].device)
            weights = shards if lead["score"] == "grad_weight" else None
            selection = _select(impl, lead, scope_grads, weights, segments, comm)
            masks = empty_masks(shards)
            impl.write_masks(scope_grads, weights, lead["score"], segments, selection, masks)
            for p, words in zip(scope_params, masks, strict=True):
                self.state[p]["mask"] = words

    def ema_parameters(self) -> list[Tensor]:
        """The EMA copies (fp32, param-group order; the parameter itself where no EMA exists yet)."""
        return [self.state[p].get("ema", p.detach()).view(p.shape) for p in self._all_params()]


class SalientAdamW(_SalientOptimizer):
    """AdamW (decoupled weight decay) that updates only the most salient elements. See module doc."""

    kind = "adamw"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        ratio: float = 0.5,
        score: str = "grad",
        scope: str = "global",
        refresh_every: int = 1,
        clip_value: float | None = None,
        ema: float | None = None,
        state_dtype: torch.dtype | None = None,
        backend: str = "auto",
        process_group: Any = None,
    ) -> None:
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        defaults.update(_saliency(ratio, score, scope, refresh_every, clip_value, ema, state_dtype, backend))
        super().__init__(params, defaults, process_group)

    def _config(self, group: dict[str, Any], step: int) -> StepConfig:
        return StepConfig.adam(
            self.kind,
            lr=float(group["lr"]),
            step=step,
            betas=tuple(group["betas"]),
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            clip_value=group["clip_value"],
            ema_decay=group["ema"],
        )

    def _step_terms(self, group: dict[str, Any], step: Tensor) -> tuple[Tensor, Tensor]:
        beta1, beta2 = group["betas"]
        return float(group["lr"]) / (1.0 - beta1**step), torch.sqrt(1.0 - beta2**step)

    def _state_keys(self, group: dict[str, Any]) -> tuple[str | None, str | None]:
        # Adam with beta1 == 0 (SFD's setting) keeps no first moment at all.
        return ("exp_avg" if group["betas"][0] > 0 else None), "exp_avg_sq"


class SalientAdam(SalientAdamW):
    """Adam (L2 weight decay added to the gradient) that updates only the most salient elements."""

    kind = "adam"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        ratio: float = 0.5,
        score: str = "grad",
        scope: str = "global",
        refresh_every: int = 1,
        clip_value: float | None = None,
        ema: float | None = None,
        state_dtype: torch.dtype | None = None,
        backend: str = "auto",
        process_group: Any = None,
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            ratio=ratio,
            score=score,
            scope=scope,
            refresh_every=refresh_every,
            clip_value=clip_value,
            ema=ema,
            state_dtype=state_dtype,
            backend=backend,
            process_group=process_group,
        )


class SalientSGD(_SalientOptimizer):
    """SGD with momentum / dampening / nesterov that updates only the most salient elements."""

    kind = "sgd"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        ratio: float = 0.5,
        score: str = "grad",
        scope: str = "global",
        refresh_every: int = 1,
        clip_value: float | None = None,
        ema: float | None = None,
        state_dtype: torch.dtype | None = None,
        backend: str = "auto",
        process_group: Any = None,
    ) -> None:
        defaults = dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov
        )
        defaults.update(_saliency(ratio, score, scope, refresh_every, clip_value, ema, state_dtype, backend))
        super().__init__(params, defaults, process_group)

    def _config(self, group: dict[str, Any], step: int) -> StepConfig:
        return StepConfig.sgd(
            lr=float(group["lr"]),
            momentum=group["momentum"],
            dampening=group["dampening"],
            nesterov=group["nesterov"],
            weight_decay=group["weight_decay"],
            momentum_init=step == 1,  # torch.optim.SGD starts the buffer at the first gradient
            clip_value=group["clip_value"],
            ema_decay=group["ema"],
        )

    def _step_terms(self, group: dict[str, Any], step: Tensor) -> tuple[Tensor, Tensor]:
        return torch.zeros_like(step), torch.ones_like(step)  # SGD has no bias corrections

    def _state_keys(self, group: dict[str, Any]) -> tuple[str | None, str | None]:
        return ("momentum_buffer" if group["momentum"] > 0 else None), None


def _select(
    impl,
    lead: dict[str, Any],
    grads: list[Tensor],
    weights: list[Tensor] | None,
    segments: list[int],
    comm: Any = None,
):
    """The scope's selection: the top ``lead["ratio"]`` of the ``lead["score"]`` scores per segment,
    over every rank of ``comm`` when it is given."""
    score, ratio = lead["score"], lead["ratio"]
    with nvtx_range("select"):
        if comm is not None:
            num_segments = 1 if lead["scope"] == "global" else len(grads)
            return distributed.select(grads, weights, score, segments, num_segments, ratio, comm, impl)
        return impl.select(grads, weights, score, segments, budgets(grads, segments, ratio))


def _saliency(ratio, score, scope, refresh_every, clip_value, ema, state_dtype, backend) -> dict[str, Any]:
    return dict(
        ratio=ratio,
        score=score,
        scope=scope,
        refresh_every=refresh_every,
        clip_value=clip_value,
        ema=ema,
        state_dtype=state_dtype,
        backend=backend,
    )


def _state_dtype(group: dict[str, Any]) -> torch.dtype:
    """The dtype a group's moments are stored in; raises for anything but None, fp32 and bf16."""
    dtype = group["state_dtype"]
    if dtype is None:
        return torch.float32
    if dtype not in STATE_DTYPES:
        raise ValueError(f"state_dtype must be None, torch.float32 or torch.bfloat16, got {dtype!r}")
    return dtype
