"""Drop-in torch.optim optimizers that update only the most salient parameters.

``SalientAdamW``, ``SalientAdam`` and ``SalientSGD`` take the signature and defaults of the torch
optimizer they replace (``amsgrad``, ``maximize``, ``foreach``, ``capturable``, ``differentiable``,
``fused`` and Adam's ``decoupled_weight_decay`` included), plus keyword-only saliency options; every
option is settable per param group, as in torch:

* ``ratio`` in (0, 1]: fraction of the elements in scope updated each step, ``k = max(1, floor(ratio*N))``.
* ``score``: ``"grad"`` (``|g|``) or ``"grad_weight"`` (``|g * w|``).
* ``scope``: ``"global"`` (one selection over every parameter of every group whose scope is global; those
  groups must agree on ratio, score, refresh_every and backend) or ``"per_tensor"``.
* ``refresh_every``: 1 reselects every step; K > 1 reselects at steps 1, K+1, 2K+1, ... and reuses the
  stored bit-packed mask in between; 0 selects once (at the first step that has gradients).
* ``clip_value``: clip gradients by value inside the fused step. ``ema``: keep an EMA copy of the
  parameters (decay) in the same pass, see ``ema_parameters()``.
* ``state_dtype``: storage of the moments (``exp_avg``, ``exp_avg_sq``, ``momentum_buffer``): None or
  ``torch.float32`` (default), or ``torch.bfloat16`` to halve their memory. The math stays fp32: each
  moment is loaded to fp32 and rounded once (to nearest even) when stored. The EMA copy stays fp32.
* ``backend``: "auto", "eager", "cpu", "cuda" or "triton".
* ``process_group``: the parameters are this rank's shards of one global set; selections span every
  rank of the group (see ``pecker_kernels.distributed``). Sharded DTensor parameters (FSDP2) bring
  their mesh's group without it. Replicated parameters (DDP) need neither.

The step is always one fused pass and needs no host synchronisation, so ``foreach``, ``fused`` and
``capturable`` are accepted and change nothing. ``maximize`` works on every backend. ``amsgrad=True``
and ``differentiable=True`` raise ``NotImplementedError``.

Selection order is param-group order, then parameter order, each tensor row-major; ties at the
threshold go to the lower flat index and non-finite scores are never selected. Unselected elements are
frozen: parameter, moments and weight decay untouched. Parameters without a gradient are skipped.
Non-contiguous parameters (``channels_last`` included) and gradients of any strides are stepped through
row-major copies (the state is row-major); contiguous ones in place.

Masks:

* A mask given by ``set_masks`` or ``compute_mask`` stays in force (nothing is reselected) until a
  group's ``refresh_every`` is changed; the next step then selects anew and the scope follows its
  schedule again.
* A first selection that would fix an empty mask is not kept: while a scope has no mask, a step that
  ``GradScaler`` skips (``found_inf``) or whose gradients are all non-finite stores none, and the next
  step selects again. Checking this reads one flag back once, at the step that fixes the mask (not with
  ``refresh_every=1``, which reselects anyway).
* A parameter whose first gradient arrives after its scope's mask was fixed is selected on its own: the
  top ``ratio`` of the newcomers' elements (together for a global scope, per tensor for a per-tensor
  one); the others keep their masks. (A sharded scope reselects as a whole instead, so that every rank
  runs the same collectives.)

State lives under torch's keys (``step``, ``exp_avg``, ``exp_avg_sq``, ``momentum_buffer``) plus ``mask``
(packed int32 bits), ``ema`` and ``selection_step`` (the host count of ``step()`` calls that drives
``refresh_every``). ``step`` counts applied steps and lives on the parameter's device, as in torch's
fused AdamW: on a GPU the bias corrections are computed there, so nothing in ``step()`` reads back to
the host and the step can be captured in a CUDA graph. Adam keeps no first moment while ``beta1 == 0``;
turning ``beta1`` (or SGD's ``momentum``) on later allocates it then: Adam's first moment starts at
zero, SGD's buffer at the gradient (as torch starts it).

Every check (hyper-parameters changed at run time, gradients, state) runs before the first write of a
step, so a step that raises changes nothing. ``load_state_dict`` validates the saved groups and state
against the parameters before replacing anything, and accepts state dicts saved by torch's own AdamW,
Adam and SGD (missing saliency options take the constructor's values).

AMP: with ``torch.amp.GradScaler`` the optimizer takes the scaler's ``grad_scale`` and ``found_inf``
(``_step_supports_amp_scaling``): gradients are unscaled inside the fused pass and a step with
inf/NaN gradients is skipped on the device (parameters, moments, EMA, masks and ``step`` unchanged),
without a host sync.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import dispatch, distributed
from .backends import cpu, eager
from .backends.base import (
    PARAM_DTYPES,
    SCORES,
    STATE_DTYPES,
    StepConfig,
    TensorGroup,
    empty_masks,
    mask_words,
)
from .profiling import nvtx_range
from .select import budgets, segments_of
from .update import check_config
from .validation import (
    SCOPES,
    as_float,
    check_choice,
    check_flag,
    check_kernel_state,
    check_packed_mask,
    check_ratio,
)

_local = distributed.local
_PLAIN = distributed.PLAIN_TYPES

_SCOPE_KEYS = (
    "ratio",
    "score",
    "refresh_every",
    "backend",
)  # what groups sharing a global scope must agree on

_MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "momentum_buffer")
_EMA_DTYPES = (torch.float32,)
# Read per tensor every step: module constants, not attribute lookups.
_INT32, _FLOAT32, _STRIDED = torch.int32, torch.float32, torch.strided


def _compiler_disabled_on_first_call(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.compiler.disable(fn)``, built on the first call: building it imports dynamo (about a
    second), which ``import pecker_kernels`` should not pay, as ``import torch.optim`` does not."""
    disabled: Callable[..., Any] | None = None

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        nonlocal disabled
        if disabled is None:
            disabled = torch.compiler.disable(fn)
        return disabled(*args, **kwargs)

    return call


@dataclass
class _ScopePlan:
    """One scope's step, fully checked before anything is written (see ``_plan_scope``)."""

    groups: list[dict[str, Any]]
    comm: Any
    impl: Any
    device: torch.device | None
    active: list[tuple[dict[str, Any], Tensor]]  # (group, parameter) with a gradient
    params: list[Tensor]  # what the kernels update: the parameter's local shard, or a row-major copy
    grads: list[Tensor]  # row-major gradients
    states: list[dict[str, Any] | None]  # the parameter's state as the checks found it (None: none yet)
    ready: list[bool]  # the state holds everything this step reads, in the group's state dtype
    write_back: list[tuple[Tensor, Tensor]]  # (parameter, row-major copy): copied back after the step


class _SalientOptimizer(Optimizer):
    """Shared machinery: scopes, selection schedule, masks, EMA. Subclasses say how to build a step."""

    _moment_keys: tuple[str, ...]  # every moment the optimizer can keep (saved state may hold only these)
    # torch.amp.GradScaler then hands over grad_scale / found_inf instead of unscaling and syncing.
    _step_supports_amp_scaling = True

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any], process_group: Any = None) -> None:
        self._process_group = process_group
        self._building = True  # Optimizer.__init__ adds the groups one by one: check ranks once, after
        super().__init__(params, defaults)
        self._building = False
        self._check_ranks()

    # ---- torch.optim plumbing ------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        try:
            self._check_group(self.param_groups[-1], len(self.param_groups) - 1)
            if not getattr(self, "_building", False):
                self._check_ranks()
        except Exception:
            self.param_groups.pop()  # a rejected group must not stay and break later steps
            raise

    def _check_group(self, group: dict[str, Any], index: int) -> None:
        """Every option of ``group`` (as torch checks them, and ours); raises, never writes."""
        check_ratio(group["ratio"])
        check_choice("score", group["score"], SCORES)
        check_choice("scope", group["scope"], SCOPES)
        refresh = group["refresh_every"]
        if isinstance(refresh, bool) or not isinstance(refresh, int) or refresh < 0:
            raise ValueError(f"refresh_every must be an int >= 0, got {refresh!r}")
        for name in ("clip_value", "ema"):
            if group[name] is not None:
                as_float(name, group[name])
        for name in ("amsgrad", "differentiable"):
            if group.get(name, False) is not False:
                check_flag(name, group[name])
                raise NotImplementedError(
                    f"{name}=True is not supported by {type(self).__name__} (param group {index})"
                )
        for name in ("maximize", "capturable", "decoupled_weight_decay", "nesterov"):
            if name in group:
                check_flag(name, group[name])
        for name in ("foreach", "fused"):  # the step is always one fused pass
            if name in group:
                check_flag(name, group[name], optional=True)
        self._check_numbers(group)
        check_config(self._hyper(group))
        _state_dtype(group)
        backend = group["backend"]
        if backend != "auto" and group["params"]:
            dispatch.resolve(backend, _local(group["params"][0]).device)  # raises if it cannot run there
        for p in group["params"]:
            if p.dtype not in PARAM_DTYPES:
                raise TypeError(
                    f"{type(self).__name__} supports float32, float16 and bfloat16 parameters, got {p.dtype}"
                )

    def _check_numbers(self, group: dict[str, Any]) -> None:
        """The numeric hyper-parameters are numbers (before ``_config`` converts them)."""
        raise NotImplementedError

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

    def __getstate__(self) -> dict[str, Any]:
        group = self._process_group
        if group is not None and not isinstance(group, str):
            raise TypeError(
                f"a {type(self).__name__} bound to a ProcessGroup object cannot be copied or pickled; "
                "build it with process_group='world', or anew on the copy"
            )
        return {**super().__getstate__(), "_process_group": group}

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.setdefault("_process_group", None)  # pickled before the attribute was kept
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)  # options added since the group was saved

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's (load hooks included), after checking everything first: a state dict that does
        not fit the parameters (other shapes, dtypes, mask sizes) or whose groups hold invalid options
        raises and changes nothing. Saved groups without our options (a state dict of torch's own AdamW,
        Adam or SGD) take the constructor's values. State keeps its own dtype: moments in their group's
        ``state_dtype``, fp32 EMA and step, int32 masks (torch would cast every state tensor to the
        parameter's dtype). As with torch, the saved param groups replace the current ones. Moves state
        to each parameter's device."""
        state_dict = state_dict.copy()
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        saved_groups = [{**self.defaults, **g} for g in state_dict["param_groups"]]
        state_dict = {**state_dict, "param_groups": saved_groups}
        self._check_saved(state_dict)

        # torch's loading with the hooks held back: the pre-hooks ran above, the post-hooks run below
        # once the state has its dtypes.
        hooks = (self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks)
        self._optimizer_load_state_dict_pre_hooks = type(hooks[0])()
        self._optimizer_load_state_dict_post_hooks = type(hooks[1])()
        try:
            super().load_state_dict(state_dict)
        finally:
            self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks = hooks
        saved_state = state_dict["state"]
        ids = [i for g in saved_groups for i in g["params"]]
        pairs = [(g, p) for g in self.param_groups for p in g["params"]]
        for param_id, (group, p) in zip(ids, pairs, strict=True):
            if param_id in saved_state:
                self._load_param_state(group, p, saved_state[param_id])
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _check_saved(self, state_dict: dict[str, Any]) -> None:
        """A state dict's groups and state, against this optimizer's parameters; raises, never writes."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        for index, (saved, group) in enumerate(zip(saved_groups, self.param_groups, strict=True)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"loaded state dict's param group {index} has {len(saved['params'])} parameters; "
                    f"the optimizer's has {len(group['params'])}"
                )
            self._check_group({**saved, "params": group["params"]}, index)
            for position, (param_id, p) in enumerate(zip(saved["params"], group["params"], strict=True)):
                if param_id in state_dict["state"]:
                    where = _where(saved, index, position)
                    _check_saved_state(where, state_dict["state"][param_id], p, self._moment_keys)

    def _load_param_state(self, group: dict[str, Any], p: Tensor, saved: Mapping[str, Any]) -> None:
        """One parameter's checked saved state, as this optimizer keeps it (copies, own dtypes)."""
        shard = _local(p)
        state = self.state[p]
        moments = self._state_keys(group)
        for key, value in saved.items():
            if value is None:  # torch's SGD saves momentum_buffer=None without momentum
                state.pop(key, None)
            elif key == "step":  # a copy: torch's saved step may be the live tensor of its optimizer
                step = value.detach().clone() if isinstance(value, Tensor) else torch.tensor(value)
                state[key] = step.to(device=shard.device, dtype=torch.float32).reshape(())
            elif key == "selection_step":
                state[key] = int(value)
            elif isinstance(value, Tensor):
                dtype = value.dtype
                if value.is_floating_point():
                    dtype = _state_dtype(group) if key in moments else torch.float32
                state[key] = value.to(device=shard.device, dtype=dtype, copy=True)
        if "step" not in state and any(k in state for k in _MOMENT_KEYS):
            # torch's SGD keeps no step: a saved momentum buffer means the buffer has started.
            state["step"] = torch.ones((), dtype=torch.float32, device=shard.device)
        if "step" in state and "selection_step" not in state:  # torch's state, or saved before the key
            state["selection_step"] = int(state["step"])

    # ---- what subclasses provide ---------------------------------------------------------------

    def _config(self, group: dict[str, Any], step: int, momentum_init: bool = False) -> StepConfig:
        raise NotImplementedError

    def _hyper(self, group: dict[str, Any]) -> StepConfig:
        """The group's hyper-parameters as a StepConfig, before they are checked (no step terms)."""
        return self._config(group, 1)

    def _step_terms(self, group: dict[str, Any], step: Tensor) -> tuple[Tensor, Tensor]:
        """(step_size, bias_correction2_sqrt) of a float64 device ``step``, as ``_config`` has them."""
        raise NotImplementedError

    def _state_keys(self, group: dict[str, Any]) -> tuple[str | None, str | None]:
        """State keys of the kernel's (first-moment-or-momentum, second-moment) slots."""
        raise NotImplementedError

    # ---- the step ------------------------------------------------------------------------------

    # Compiled training steps graph-break here: the kernels are opaque to dynamo, and running the
    # step eagerly is both correct and as fast (it is one fused pass already).
    @_compiler_disabled_on_first_call
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Set by torch.amp.GradScaler.step for the duration of this call (see _step_supports_amp_scaling).
        amp = (getattr(self, "grad_scale", None), getattr(self, "found_inf", None))
        # Everything is checked before the first write: a step that raises changes nothing.
        for index, group in enumerate(self.param_groups):
            self._check_group(group, index)
        plans = [self._plan_scope(scope) for scope in self._scopes()]
        for plan in plans:
            if plan is not None:
                self._step_scope(plan, *amp)
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

    def _plan_scope(self, groups: list[dict[str, Any]]) -> _ScopePlan | None:
        """Checks one scope's gradients and state against what the kernels will read; writes nothing.

        Runs every step over every parameter, so each attribute a check needs is read once, the fast
        test comes first, and the detailed message (and ``_where``) is built only for what fails."""
        comm = self._comm(groups)
        active, params, grads, states, ready, write_back = [], [], [], [], [], []
        devices = set()
        state_of = self.state
        for group in groups:
            index = next(i for i, g in enumerate(self.param_groups) if g is group)
            moments = tuple(key for key in self._state_keys(group) if key is not None)
            dtype, ema = _state_dtype(group), group["ema"] is not None
            checked = tuple((key, STATE_DTYPES) for key in moments) + ((("ema", _EMA_DTYPES),) if ema else ())
            for position, p in enumerate(group["params"]):
                g = p.grad
                if g is None:
                    continue
                if type(p) in _PLAIN:
                    shard = p
                    shape = whole = p.shape
                else:  # a DTensor: its state has the local shard's shape
                    shard = _local(p)
                    shape, whole = shard.shape, p.shape
                grad = g if type(g) in _PLAIN else _local(g)
                device = shard.device
                if g.layout != _STRIDED or g.dtype != p.dtype or g.shape != whole or grad.device != device:
                    _check_grad(_where(group, index, position), p, type(self).__name__)
                state = state_of.get(p)
                complete = False
                if state:
                    complete = _state_ready(state, shape, device, checked, dtype)
                    if complete is None:
                        self._check_existing_state(_where(group, index, position), state, shard, moments, ema)
                devices.add(device)
                active.append((group, p))
                states.append(state)
                ready.append(complete)
                work = shard if shard.is_contiguous() else shard.contiguous()
                if work is not shard:
                    write_back.append((shard, work))
                params.append(work)
                # Gradients of other strides (transposed, expanded, channels_last) are read row-major.
                grads.append(grad if grad.is_contiguous() else grad.contiguous())
        if not active and comm is None:
            return None
        if len(devices) > 1:
            raise ValueError(
                f"parameters of one selection scope are on several devices ({', '.join(map(str, devices))});"
                " put each device's parameters in its own param group with scope='per_tensor', or one device"
            )
        device = next(iter(devices)) if devices else distributed.comm_device(comm, [])
        impl = dispatch.resolve(groups[0]["backend"], device)
        return _ScopePlan(groups, comm, impl, device, active, params, grads, states, ready, write_back)

    @staticmethod
    def _check_existing_state(where: str, state, shard: Tensor, moments, ema: bool) -> None:
        """Raises the detailed error for state that ``_state_ready`` refused (returned None)."""
        for key in moments:
            if key in state:
                check_kernel_state(where, key, _local(state[key]), shard, STATE_DTYPES)
        if ema and "ema" in state:
            check_kernel_state(where, "ema", _local(state["ema"]), shard, _EMA_DTYPES)
        if "mask" in state:
            check_packed_mask(where, state["mask"], shard)
        raise TypeError(f"{where}: state['step'] must be a one-element float32 tensor on {shard.device}")

    def _init_state(
        self,
        group: dict[str, Any],
        p: Tensor,
        state: dict[str, Any] | None,
        dtype: torch.dtype,
        keys: tuple[str | None, str | None],
    ) -> tuple[dict[str, Any], bool]:
        """The parameter's state (``state``, or a new one) with every piece this step needs (moments
        under ``keys``, of ``dtype``); True when the momentum buffer (SGD) was allocated just now, so
        that it starts at the gradient."""
        if state is None:
            state = self.state[p]
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=_local(p).device)
        state.setdefault("selection_step", 0)
        fresh = False
        for key in keys:
            if key is None:
                continue
            if key not in state:
                state[key] = torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)
                fresh = fresh or key == "momentum_buffer"
            elif state[key].dtype != dtype:  # the group's state_dtype was changed since
                state[key] = state[key].to(dtype)
        if group["ema"] is not None and "ema" not in state:
            state["ema"] = p.detach().float().clone(memory_format=torch.contiguous_format)
        return state, fresh

    def _step_scope(
        self, plan: _ScopePlan, grad_scale: Tensor | None = None, found_inf: Tensor | None = None
    ) -> None:
        groups, comm, impl, device = plan.groups, plan.comm, plan.impl, plan.device
        params, grads, active = plan.params, plan.grads, plan.active
        lead = groups[0]
        layout = {id(g): (_state_dtype(g), self._state_keys(g)) for g in groups}  # per group, not per tensor
        initialised = [
            (state, False) if complete else self._init_state(g, p, state, *layout[id(g)])
            for (g, p), state, complete in zip(active, plan.states, plan.ready, strict=True)
        ]
        states = [s for s, _ in initialised]
        for state in states:
            state["selection_step"] += 1
        # A rank with no gradients in a sharded scope still joins the selection's collectives: it
        # follows the schedule of the scope's parameters as they stand.
        scheduled = states or [self.state[p] for g in groups for p in g["params"]]
        refresh_every = lead["refresh_every"]
        new_step = max((s.get("selection_step", 0) for s in scheduled), default=0) + (not states)
        unpinned = False
        for group in groups:  # a changed schedule ends a pinned mask: the next step selects anew
            if group["mask_pinned"] is not None and group["mask_pinned"] != group["refresh_every"]:
                group["mask_pinned"] = None
                unpinned = True
        pinned = any(g["mask_pinned"] is not None for g in groups)
        has_mask = ["mask" in s for s in scheduled]
        by_schedule = (
            not any(has_mask)
            or (refresh_every > 0 and (new_step - 1) % refresh_every == 0)
            or (comm is not None and not all(has_mask))  # a sharded scope reselects as a whole
        )
        due = unpinned or (not pinned and by_schedule)
        late = [] if due else [i for i, s in enumerate(states) if "mask" not in s]
        # Step-dependent scalars on the device (see module doc) except for a plain CPU step, where
        # host and device are one and the host floats are exact and cheapest.
        on_device = device.type != "cpu" or grad_scale is not None or found_inf is not None
        skipped = None if found_inf is None else found_inf.to(device=device, dtype=torch.float32) != 0

        fixing = [i for i, s in enumerate(states) if "mask" not in s]  # masks this step fixes first
        for i in fixing:
            states[i]["mask"] = empty_masks([params[i]])[0]
        masks = [s["mask"] for s in states]
        segments = segments_of(params, lead["scope"])
        score = lead["score"]
        weights = params if score == "grad_weight" else None

        # One update call per (group, step count, fresh buffer): bias corrections and hyper-parameters
        # differ. Parameters that joined at the same call share their step count (skips included).
        keys = [
            (id(group), state["selection_step"], fresh)
            for (group, _), (state, fresh) in zip(active, initialised, strict=True)
        ]
        calls: dict[tuple[int, int, bool], list[int]] = {}
        for index, key in enumerate(keys):
            calls.setdefault(key, []).append(index)

        selection = None
        valid = None  # per parameter of `fixing`: whether its first mask may be kept (a host list)
        if due:
            selection = _select(impl, lead, grads, weights, segments, comm)
            if len(calls) > 1:  # tie ranks span the whole scope: fix the mask once, then update by call
                fresh_masks = masks if skipped is None else empty_masks(params)
                with nvtx_range("write_masks"):
                    impl.write_masks(grads, weights, score, segments, selection, fresh_masks)
                if skipped is not None:  # a skipped step keeps the masks in force
                    for old, new in zip(masks, fresh_masks, strict=True):
                        old.copy_(torch.where(skipped, old, new))
            if fixing and refresh_every != 1:
                valid = _kept(selection, skipped, [segments[i] for i in fixing])
            if len(calls) > 1:
                selection = None
        elif late:
            late_params = [params[i] for i in late]
            late_segments = segments_of(late_params, lead["scope"])
            late_weights = late_params if score == "grad_weight" else None
            late_grads = [grads[i] for i in late]
            chosen = _select(impl, lead, late_grads, late_weights, late_segments, None)
            with nvtx_range("write_masks"):
                impl.write_masks(
                    late_grads, late_weights, score, late_segments, chosen, [masks[i] for i in late]
                )
            valid = _kept(chosen, skipped, late_segments)

        for indices in calls.values():
            group = active[indices[0]][0]
            fresh = initialised[indices[0]][1]
            whole = len(indices) == len(states)  # one call for the scope (the usual case): no sublists
            sub_states = states if whole else [states[i] for i in indices]
            steps = [s["step"] for s in sub_states]
            if on_device:
                config = self._config(group, 1)
                scalars = self._device_scalars(group, steps, grad_scale, skipped, device, fresh)
                config = replace(config, scalars=scalars)
            else:
                _count_steps(steps)
                config = self._config(group, int(steps[0]), momentum_init=fresh or int(steps[0]) == 1)
            first, second = layout[id(group)][1]
            sub = TensorGroup(
                params=params if whole else [params[i] for i in indices],
                grads=grads if whole else [grads[i] for i in indices],
                exp_avg=None if first is None else _locals([s[first] for s in sub_states]),
                exp_avg_sq=None if second is None else _locals([s[second] for s in sub_states]),
                ema=_locals([s["ema"] for s in sub_states]) if group["ema"] is not None else None,
            )
            sub_masks = masks if whole else [masks[i] for i in indices]
            with nvtx_range("update"):
                if selection is not None:
                    impl.update(sub, config, score, segments, selection=selection, masks_out=sub_masks)
                else:
                    sub_segments = segments if whole else [segments[i] for i in indices]
                    impl.update(sub, config, score, sub_segments, masks_in=sub_masks)
        for shard, work in plan.write_back:
            shard.copy_(work)
        if valid is not None:  # a first mask that selected nothing is dropped: the next step selects again
            for i, keep in zip(fixing if due else late, valid, strict=True):
                if not keep:
                    del states[i]["mask"]

    def _device_scalars(
        self,
        group: dict[str, Any],
        steps: list[Tensor],
        grad_scale: Tensor | None,
        skipped: Tensor | None,
        device: torch.device,
        fresh: bool,
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
        momentum_init = (step64 == 1).double() if not fresh else zero.double() + 1.0
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
            mask = self.state[p].get("mask") if p in self.state else None
            bits = (
                eager.unpack(mask, shard.numel())
                if mask is not None
                else torch.zeros(shard.numel(), dtype=torch.bool)
            )
            out.append(distributed.like(bits.view(shard.shape).to(shard.device), p))
        return out

    def set_masks(
        self,
        masks: Sequence[Tensor] | Mapping[str, Tensor] | Mapping[Tensor, Tensor],
        named_parameters: Iterable[tuple[str, Tensor]] | None = None,
    ) -> None:
        """Store a selection and keep it in force until a group's ``refresh_every`` is changed.

        ``masks``: a list of bool or 0/1 tensors (param-group order), a ``{parameter: mask}`` dict, or a
        SalUn-style ``{name: 0/1 tensor}`` dict together with ``model.named_parameters()``. Every
        parameter needs one; values other than 0 and 1 are refused."""
        params = self._all_params()
        masks = _per_param("masks", masks, params, named_parameters)
        packed = []
        for i, (mask, p) in enumerate(zip(masks, params, strict=True)):
            shard = _local(p)  # DTensor parameters take DTensor masks, or masks of their local shard
            if not isinstance(mask, Tensor) or _local(mask).shape != shard.shape:
                shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
                raise ValueError(f"mask {i} has shape {shape}; its parameter has shape {tuple(p.shape)}")
            values = _local(mask)
            if values.device.type == "meta":
                raise ValueError(f"mask {i} is on the meta device and holds no values")
            if values.is_complex() or not bool(((values == 0) | (values == 1)).all()):
                raise ValueError(f"mask {i} holds values other than 0 and 1 (or True/False)")
            packed.append(eager.pack((values != 0).reshape(-1).to(shard.device)))
        for p, words in zip(params, packed, strict=True):
            self.state[p]["mask"] = words
        self._pin()

    @torch.no_grad()
    def compute_mask(
        self,
        grads: Sequence[Tensor] | Mapping[Tensor, Tensor] | Mapping[str, Tensor] | None = None,
        named_parameters: Iterable[tuple[str, Tensor]] | None = None,
    ) -> None:
        """Select now from ``grads`` and keep the masks in force until a group's ``refresh_every`` is
        changed.

        ``grads``: ``SaliencyAccumulator.gradients()`` (matched to the parameters it was built with), a
        ``{parameter: gradient}`` dict, a ``{name: gradient}`` dict with ``named_parameters``, or a list
        in param-group order. Default: each parameter's ``.grad`` (zeros where there is none)."""
        params = self._all_params()
        if grads is None:
            if all(p.grad is None for p in params):
                raise ValueError(
                    "compute_mask() found no .grad on any parameter: run backward first, or pass grads"
                )
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        grads = _per_param("grads", grads, params, named_parameters)
        checked = [_check_given_grad(i, g, p) for i, (g, p) in enumerate(zip(grads, params, strict=True))]
        index = {id(p): i for i, p in enumerate(params)}
        chosen: list[tuple[Tensor, Tensor]] = []
        for groups in self._scopes():
            lead = groups[0]
            comm = self._comm(groups)
            scope_params = [p for g in groups for p in g["params"]]
            if not scope_params and comm is None:
                continue
            shards = [_local(p).detach().contiguous() for p in scope_params]
            scope_grads = [checked[index[id(p)]] for p in scope_params]
            segments = segments_of(shards, lead["scope"])
            impl = dispatch.resolve(lead["backend"], distributed.comm_device(comm, shards))
            weights = shards if lead["score"] == "grad_weight" else None
            selection = _select(impl, lead, scope_grads, weights, segments, comm)
            masks = empty_masks(shards)
            impl.write_masks(scope_grads, weights, lead["score"], segments, selection, masks)
            chosen.extend(zip(scope_params, masks, strict=True))
        for p, words in chosen:
            self.state[p]["mask"] = words
        self._pin()

    def _pin(self) -> None:
        for group in self.param_groups:
            group["mask_pinned"] = group["refresh_every"]

    def ema_parameters(self) -> list[Tensor]:
        """The EMA copies (fp32, param-group order; the parameter itself where no EMA exists yet)."""
        return [self.state[p].get("ema", p.detach()).view(p.shape) for p in self._all_params()]


class SalientAdam(_SalientOptimizer):
    """Adam (L2 weight decay added to the gradient, or AdamW's decoupled decay with
    ``decoupled_weight_decay=True``) that updates only the most salient elements. See module doc."""

    _moment_keys = ("exp_avg", "exp_avg_sq")

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
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
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            foreach=foreach,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=decoupled_weight_decay,
        )
        defaults.update(_saliency(ratio, score, scope, refresh_every, clip_value, ema, state_dtype, backend))
        super().__init__(params, defaults, process_group)

    def _check_numbers(self, group: dict[str, Any]) -> None:
        for name in ("lr", "eps", "weight_decay"):
            as_float(name, group[name])
        betas = group["betas"]
        if isinstance(betas, (str, bytes)) or not isinstance(betas, Sequence) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        for i, beta in enumerate(betas):
            as_float(f"betas[{i}]", beta)

    def _kind(self, group: dict[str, Any]) -> str:
        return "adamw" if group["decoupled_weight_decay"] else "adam"

    def _hyper(self, group: dict[str, Any]) -> StepConfig:
        beta1, beta2 = (as_float("betas", b) for b in group["betas"])
        return StepConfig(
            kind=self._kind(group),
            lr=as_float("lr", group["lr"]),
            weight_decay=as_float("weight_decay", group["weight_decay"]),
            beta1=beta1,
            beta2=beta2,
            eps=as_float("eps", group["eps"]),
            clip_value=group["clip_value"],
            ema_decay=group["ema"],
            maximize=group["maximize"],
        )

    def _config(self, group: dict[str, Any], step: int, momentum_init: bool = False) -> StepConfig:
        beta1, beta2 = (as_float("betas", b) for b in group["betas"])
        return StepConfig.adam(
            self._kind(group),
            lr=as_float("lr", group["lr"]),
            step=step,
            betas=(beta1, beta2),
            eps=as_float("eps", group["eps"]),
            weight_decay=as_float("weight_decay", group["weight_decay"]),
            clip_value=group["clip_value"],
            ema_decay=group["ema"],
            maximize=group["maximize"],
        )

    def _step_terms(self, group: dict[str, Any], step: Tensor) -> tuple[Tensor, Tensor]:
        beta1, beta2 = (as_float("betas", b) for b in group["betas"])
        return as_float("lr", group["lr"]) / (1.0 - beta1**step), torch.sqrt(1.0 - beta2**step)

    def _state_keys(self, group: dict[str, Any]) -> tuple[str | None, str | None]:
        # Adam with beta1 == 0 (SFD's setting) keeps no first moment at all.
        return ("exp_avg" if as_float("betas", group["betas"][0]) > 0 else None), "exp_avg_sq"


class SalientAdamW(SalientAdam):
    """AdamW (decoupled weight decay) that updates only the most salient elements. See module doc."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
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
            amsgrad,
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=True,
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

    _moment_keys = ("momentum_buffer",)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
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
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            foreach=foreach,
            differentiable=differentiable,
            fused=fused,
        )
        defaults.update(_saliency(ratio, score, scope, refresh_every, clip_value, ema, state_dtype, backend))
        super().__init__(params, defaults, process_group)

    def _check_numbers(self, group: dict[str, Any]) -> None:
        for name in ("lr", "momentum", "dampening", "weight_decay"):
            as_float(name, group[name])

    def _config(self, group: dict[str, Any], step: int, momentum_init: bool = False) -> StepConfig:
        return StepConfig.sgd(
            lr=as_float("lr", group["lr"]),
            momentum=as_float("momentum", group["momentum"]),
            dampening=as_float("dampening", group["dampening"]),
            nesterov=group["nesterov"],
            weight_decay=as_float("weight_decay", group["weight_decay"]),
            momentum_init=momentum_init,  # torch.optim.SGD starts the buffer at the first gradient
            clip_value=group["clip_value"],
            ema_decay=group["ema"],
            maximize=group["maximize"],
        )

    def _step_terms(self, group: dict[str, Any], step: Tensor) -> tuple[Tensor, Tensor]:
        return torch.zeros_like(step), torch.ones_like(step)  # SGD has no bias corrections

    def _state_keys(self, group: dict[str, Any]) -> tuple[str | None, str | None]:
        return ("momentum_buffer" if as_float("momentum", group["momentum"]) > 0 else None), None


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


def _kept(selection, skipped: Tensor | None, segments: Sequence[int]) -> list[bool]:
    """Per entry of ``segments``: whether a first mask from ``selection`` may be kept (it selected
    something, and the step was not skipped). One small read back to the host."""
    ok = torch.isfinite(selection.threshold)
    if skipped is not None:
        ok = ok & ~skipped.to(ok.device)
    ok = ok.tolist()
    return [bool(ok[s]) for s in segments]


def _where(group: dict[str, Any], index: int, position: int) -> str:
    """How errors name a parameter: its name when the group has names, else its position."""
    names = group.get("param_names")
    if names is not None and position < len(names):
        return f"parameter {names[position]!r} (param group {index})"
    return f"parameter {position} of param group {index}"


def _state_ready(
    state: Mapping[str, Any], shape: torch.Size, device: torch.device, checked, dtype: torch.dtype
) -> bool | None:
    """None when a parameter's state is not what the kernels read (``_check_existing_state`` then says
    why); else whether it holds every piece this step needs, the moments in ``dtype``. ``checked``:
    (key, allowed dtypes) of each state tensor the step reads. The fast test of every step: it reads
    each attribute once, inline (a call per tensor costs as much as a check)."""
    get = state.get
    complete = "step" in state and "selection_step" in state
    for key, dtypes in checked:
        t = get(key)
        if t is None:
            complete = False
            continue
        if type(t) not in _PLAIN:
            t = _local(t)
            if not isinstance(t, Tensor):
                return None
        held = t.dtype
        if held not in dtypes or t.shape != shape or t.device != device or not t.is_contiguous():
            return None
        complete = complete and (held == dtype or key == "ema")
    mask = get("mask")
    if mask is not None and not (
        isinstance(mask, Tensor)
        and mask.dtype == _INT32
        and mask.shape == (mask_words(shape.numel()),)
        and mask.device == device
        and mask.is_contiguous()
    ):
        return None
    step = get("step")  # written through its data pointer on the CPU: a plain float32 scalar
    if step is not None and not (
        type(step) is Tensor and step.dtype == _FLOAT32 and step.numel() == 1 and step.device == device
    ):
        return None
    return complete


def _locals(tensors: list[Tensor]) -> list[Tensor]:
    """``_local`` of each tensor, plain ones without a call."""
    return [t if type(t) in _PLAIN else _local(t) for t in tensors]


def _count_steps(steps: list[Tensor]) -> None:
    """Advances the step counters of a host step (float32 one-element CPU tensors, as ``_state_ready``
    checked). An in-place add costs a dispatch of microseconds a parameter; the C++ loop, nanoseconds."""
    if cpu.cpu_module is not None:
        cpu.count_steps(steps)
    else:
        for step in steps:
            step += 1


def _check_grad(where: str, p: Tensor, owner: str) -> None:
    """A parameter's ``.grad`` as the step reads it (any strides: it is read row-major)."""
    g = p.grad
    if g.is_sparse or g.layout != torch.strided:
        raise TypeError(f"{owner} does not support sparse gradients ({where})")
    if g.dtype != p.dtype:
        raise TypeError(f"{where}: .grad has dtype {g.dtype} but the parameter has {p.dtype}")
    if g.shape != p.shape:
        raise ValueError(f"{where}: .grad has shape {tuple(g.shape)} but the parameter has {tuple(p.shape)}")
    if _local(g).device != _local(p).device:
        raise ValueError(
            f"{where}: .grad is on {_local(g).device} but the parameter is on {_local(p).device}"
        )


def _check_given_grad(index: int, g: Any, p: Tensor) -> Tensor:
    """A gradient handed to ``compute_mask`` for parameter ``index``, as a row-major fp32-family tensor."""
    if not isinstance(g, Tensor):
        raise TypeError(f"grads[{index}] must be a tensor, got {type(g).__name__}")
    if g.is_sparse or g.layout != torch.strided:
        raise TypeError(f"grads[{index}] is sparse; only dense gradients are supported")
    if not g.is_floating_point():
        raise TypeError(f"grads[{index}] has dtype {g.dtype}; expected a floating-point gradient")
    if g.shape != p.shape:
        raise ValueError(f"grads[{index}] has shape {tuple(g.shape)} but its parameter has {tuple(p.shape)}")
    shard, local = _local(p), _local(g)
    if local.device != shard.device:
        raise ValueError(f"grads[{index}] is on {local.device} but its parameter is on {shard.device}")
    if local.dtype not in PARAM_DTYPES:  # float64: the scores are fp32 anyway
        local = local.float()
    return local.detach().contiguous()


def _per_param(
    what: str,
    values: Any,
    params: list[Tensor],
    named_parameters: Iterable[tuple[str, Tensor]] | None,
) -> list[Any]:
    """One entry of ``values`` per optimizer parameter, in param-group order, matched by identity.

    ``values``: a list in param-group order; a list that knows its parameters (``.params``, as
    ``SaliencyAccumulator.gradients()`` returns); a ``{parameter: value}`` dict; or a ``{name: value}``
    dict with ``named_parameters``."""
    if isinstance(values, Tensor):
        raise TypeError(f"{what} must be a list or dict of tensors, one per parameter, not one tensor")
    owners = getattr(values, "params", None)
    if owners is not None:
        values = dict(zip(owners, values, strict=True))
    if isinstance(values, Mapping):
        if values and all(isinstance(k, str) for k in values):
            if named_parameters is None:
                raise ValueError(
                    f"a dict of {what} by name needs named_parameters to map names to parameters"
                )
            names = {id(p): name for name, p in named_parameters}
            missing = [i for i, p in enumerate(params) if names.get(id(p)) not in values]
            if missing:
                raise ValueError(f"no {what[:-1]} given for {len(missing)} of the optimizer's parameters")
            return [values[names[id(p)]] for p in params]
        by_id = {id(k): v for k, v in values.items() if isinstance(k, Tensor)}
        if len(by_id) != len(values):
            raise TypeError(f"{what}: dict keys must be parameters (tensors) or names (str)")
        missing = [i for i, p in enumerate(params) if id(p) not in by_id]
        if missing:
            raise ValueError(
                f"no {what[:-1]} given for {len(missing)} of the optimizer's parameters "
                f"(the first is parameter {missing[0]} in param-group order)"
            )
        return [by_id[id(p)] for p in params]
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise TypeError(f"{what} must be a list or dict of tensors, got {type(values).__name__}")
    values = list(values)
    if len(values) != len(params):
        raise ValueError(f"got {len(values)} {what} for {len(params)} parameters")
    return values


def _check_saved_state(where: str, state: Any, p: Tensor, own_moments: tuple[str, ...]) -> None:
    """One parameter's saved state (before loading): what the kernels will read must fit ``p``."""
    if not isinstance(state, Mapping):
        raise TypeError(f"{where}: saved state must be a dict, got {type(state).__name__}")
    foreign = [key for key in _MOMENT_KEYS if key in state and key not in own_moments]
    if foreign:
        raise ValueError(
            f"{where}: saved state holds {foreign[0]!r}, which this optimizer does not keep "
            "(a state dict of another kind of optimizer?)"
        )
    shard = _local(p)
    for key, value in state.items():
        if key in (*_MOMENT_KEYS, "ema"):
            if value is None and key == "momentum_buffer":
                continue
            if not isinstance(value, Tensor) or not value.is_floating_point() or value.is_complex():
                got = value.dtype if isinstance(value, Tensor) else type(value).__name__
                raise TypeError(f"{where}: saved state[{key!r}] must be a floating-point tensor, got {got}")
            if tuple(value.shape) not in (tuple(p.shape), tuple(shard.shape)):
                raise ValueError(
                    f"{where}: saved state[{key!r}] has shape {tuple(value.shape)} "
                    f"but the parameter has {tuple(p.shape)}"
                )
        elif key == "mask":
            check_packed_mask(where, _local(value).reshape(-1) if isinstance(value, Tensor) else value, shard)
        elif key == "step":
            if isinstance(value, Tensor) and value.numel() == 1 and not value.is_complex():
                value = float(value)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not 0 <= value < float("inf")
            ):
                raise ValueError(f"{where}: saved state['step'] must be a finite count >= 0, got {value!r}")
        elif key == "selection_step":
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{where}: saved state['selection_step'] must be an int >= 0, got {value!r}")
        elif key == "max_exp_avg_sq":
            raise NotImplementedError(
                f"{where}: saved state has max_exp_avg_sq (amsgrad), which is not supported"
            )


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
        mask_pinned=None,  # the refresh_every a mask from set_masks/compute_mask was pinned at
    )


def _state_dtype(group: dict[str, Any]) -> torch.dtype:
    """The dtype a group's moments are stored in; raises for anything but None, fp32 and bf16."""
    dtype = group["state_dtype"]
    if dtype is None:
        return torch.float32
    if dtype not in STATE_DTYPES:
        raise ValueError(f"state_dtype must be None, torch.float32 or torch.bfloat16, got {dtype!r}")
    return dtype
