"""The optimizers at the kernel boundary: every input ordinary code can produce either steps correctly or
raises a clear error, a call that raises writes nothing, and masks are never silently empty or replaced.

Inputs that once corrupted memory run in a child process, so a regression fails the test instead of
killing the test run.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap

import pytest
import torch

import pecker_kernels as pk

HEADER = """
import copy, torch, pecker_kernels as pk
torch.manual_seed(0)
"""


def run_isolated(code: str) -> str:
    """Runs ``code`` in a fresh interpreter; fails the test on a signal, an abort or an exception."""
    done = subprocess.run(
        [sys.executable, "-c", HEADER + textwrap.dedent(code)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"child exited with {done.returncode}:\n{done.stdout}\n{done.stderr[-3000:]}"
    return done.stdout


def torch_twin(params, torch_cls=torch.optim.Adam, **kwargs):
    """Copies of ``params`` (with their gradients) and a torch optimizer over them."""
    twins = []
    for p in params:
        t = p.detach().clone().requires_grad_()
        t.grad = None if p.grad is None else p.grad.detach().clone()
        twins.append(t)
    return twins, torch_cls(twins, **kwargs)


# ---- 1. nothing reaches compiled code unchecked ---------------------------------------------------


def test_accumulator_gradients_land_on_their_own_layers_with_decay_and_no_decay_groups():
    run_isolated("""
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 4))
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias")]
    opt = pk.SalientAdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], refresh_every=0)
    acc = pk.SaliencyAccumulator(model.parameters())  # model order, not the optimizer's
    for _ in range(3):
        model.zero_grad(); model(torch.randn(8, 16)).square().sum().backward(); acc.accumulate()
    opt.compute_mask(acc.gradients())
    by_param = dict(zip(acc.params, acc.gradients()))
    want = pk.topk_mask([by_param[p] for p in decay + no_decay], 0.5)
    assert all(torch.equal(a, b) for a, b in zip(opt.masks(), want, strict=True))
    """)


def test_gradients_given_as_a_dict_by_parameter_or_name_match_by_identity():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))  # equal shapes
    params = list(model.parameters())
    opt = pk.SalientAdam(params[::-1], ratio=0.25, refresh_every=0)
    grads = {p: torch.randn_like(p) for p in params}
    opt.compute_mask(grads)
    want = pk.topk_mask([grads[p] for p in params[::-1]], 0.25)
    assert all(torch.equal(a, b) for a, b in zip(opt.masks(), want, strict=True))
    named = {n: grads[p] for n, p in model.named_parameters()}
    opt.compute_mask(named, model.named_parameters())
    assert all(torch.equal(a, b) for a, b in zip(opt.masks(), want, strict=True))


@pytest.mark.parametrize("shape", [(15,), (17,), (4, 4)], ids=["smaller", "larger", "other-shape"])
def test_compute_mask_with_gradients_of_another_size_raises_naming_the_gradient(shape):
    run_isolated(f"""
    p = torch.nn.Parameter(torch.randn(16))
    opt = pk.SalientAdam([p])
    try:
        opt.compute_mask([torch.randn{shape}])
    except ValueError as error:
        assert "grads[0]" in str(error), error
    else:
        raise AssertionError("accepted")
    assert "mask" not in opt.state[p]
    """)


@pytest.mark.parametrize("numel", [1000, 20_000_000])
def test_a_stride_zero_gradient_steps_like_torch(numel):
    run_isolated(f"""
    b = torch.nn.Parameter(torch.randn({numel}))
    (b.grad,) = torch.autograd.grad(b.sum(), [b])
    assert b.grad.stride() == (0,)
    twin = b.detach().clone().requires_grad_(); twin.grad = torch.ones({numel})
    pk.SalientAdam([b], ratio=1.0).step(); torch.optim.Adam([twin]).step()
    torch.testing.assert_close(b.detach(), twin.detach(), rtol=1e-6, atol=1e-7)
    """)


def test_a_transposed_gradient_is_read_as_the_gradient_it_is():
    w = torch.nn.Parameter(torch.randn(6, 9))
    g = torch.randn(9, 6)
    w.grad = g.t()
    (twin,), torch_opt = torch_twin([w])
    pk.SalientAdam([w], ratio=1.0).step()
    torch_opt.step()
    torch.testing.assert_close(w.detach(), twin.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_channels_last_and_non_contiguous_parameters_step_like_torch_and_keep_their_layout(name):
    ours = torch.nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)
    theirs = copy.deepcopy(ours)
    ours_extra = torch.nn.Parameter(torch.empty(7, 5).t())  # a non-contiguous leaf
    with torch.no_grad():
        ours_extra.copy_(torch.randn(5, 7))
    theirs_extra = torch.nn.Parameter(ours_extra.detach().clone())
    cls, torch_cls, kwargs = {
        "adamw": (pk.SalientAdamW, torch.optim.AdamW, {}),
        "sgd": (pk.SalientSGD, torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
    }[name]
    opt = cls([*ours.parameters(), ours_extra], ratio=1.0, **kwargs)
    torch_opt = torch_cls([*theirs.parameters(), theirs_extra], **kwargs)
    x = torch.randn(2, 3, 9, 9).to(memory_format=torch.channels_last)
    for _ in range(3):
        for model, extra, optimizer in ((ours, ours_extra, opt), (theirs, theirs_extra, torch_opt)):
            optimizer.zero_grad()
            (model(x).sum() + (extra * torch.arange(35.0).view(5, 7)).sum()).backward()
            optimizer.step()
    for a, b in zip([*ours.parameters(), ours_extra], [*theirs.parameters(), theirs_extra], strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)
    assert ours.weight.is_contiguous(memory_format=torch.channels_last)
    assert not ours_extra.is_contiguous()


LOAD_CASES = {
    "linear-4-into-64": "saved = small_state()",
    "short-exp-avg-sq": "saved = big_state(); saved['state'][0]['exp_avg_sq'] = torch.zeros(16)",
    "one-word-mask": "saved = big_state(); saved['state'][0]['mask'] = torch.zeros(1, dtype=torch.int32)",
    "int64-mask": "saved = big_state(); saved['state'][0]['mask'] = saved['state'][0]['mask'].long()",
    "int64-moment": "saved = big_state(); saved['state'][0]['exp_avg'] = saved['state'][0]['exp_avg'].long()",
}


@pytest.mark.parametrize("case", list(LOAD_CASES))
def test_load_state_dict_that_does_not_fit_the_parameters_raises_and_changes_nothing(case):
    run_isolated(f"""
    def trained(model):
        opt = pk.SalientAdamW(model.parameters())
        model(torch.randn(2, model.in_features)).sum().backward()
        opt.step()
        return opt.state_dict()
    small_state = lambda: trained(torch.nn.Linear(4, 4))
    big_state = lambda: copy.deepcopy(trained(torch.nn.Linear(256, 256)))
    {LOAD_CASES[case]}
    target = torch.nn.Linear(256, 256)
    opt = pk.SalientAdamW(target.parameters())
    target(torch.randn(2, 256)).sum().backward(); opt.step()
    before = copy.deepcopy(opt.state_dict())
    try:
        opt.load_state_dict(saved)
    except (ValueError, TypeError) as error:
        assert "param group 0" in str(error), error
    else:
        raise AssertionError("accepted")
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for i in before["state"]:
        for key, value in before["state"][i].items():
            assert torch.equal(torch.as_tensor(after["state"][i][key]), torch.as_tensor(value)), key
    opt.step()  # still steps
    """)


def test_load_state_dict_refuses_saved_groups_with_invalid_options_and_changes_nothing():
    model = torch.nn.Linear(3, 3)
    opt = pk.SalientAdamW(model.parameters(), ratio=0.5)
    for change in ({"ratio": 2.0}, {"score": "loss"}, {"scope": "layer"}, {"betas": (1.0, 0.999)}):
        saved = opt.state_dict()
        saved["param_groups"][0].update(change)
        with pytest.raises(ValueError):
            opt.load_state_dict(saved)
        assert opt.param_groups[0]["ratio"] == 0.5 and opt.param_groups[0]["betas"] == (0.9, 0.999)


# ---- 2. a step that raises writes nothing ---------------------------------------------------------


def _snapshot(model, opt):
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict())


def _assert_unchanged(model, opt, snapshot):
    params, saved = snapshot
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))
    assert opt.state_dict()["param_groups"] == saved["param_groups"]
    assert opt.state_dict()["state"].keys() == saved["state"].keys()


def test_a_global_group_is_not_stepped_when_a_later_per_tensor_group_is_invalid():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    opt = pk.SalientAdam(
        [{"params": model[0].parameters()}, {"params": model[1].parameters(), "scope": "per_tensor"}]
    )
    model(torch.randn(2, 3)).sum().backward()
    model[1].weight.grad = model[1].weight.grad.to_sparse()  # the kernels take dense gradients only
    snapshot = _snapshot(model, opt)
    with pytest.raises(TypeError, match="parameter 0 of param group 1"):
        opt.step()
    _assert_unchanged(model, opt, snapshot)


@pytest.mark.parametrize(
    "key, value, error",
    [
        ("betas", (1.0, 0.999), "betas"),
        ("lr", float("nan"), "learning rate"),
        ("lr", -1.0, "learning rate"),
        ("ratio", 0.0, "ratio"),
        ("score", "loss", "score"),
    ],
)
def test_a_hyper_parameter_changed_at_run_time_is_refused_before_any_group_steps(key, value, error):
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    opt = pk.SalientAdam(
        [{"params": model[0].parameters()}, {"params": model[1].parameters(), "scope": "per_tensor"}]
    )
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    opt.param_groups[1][key] = value
    snapshot = _snapshot(model, opt)
    with pytest.raises(ValueError, match=error):
        opt.step()
    _assert_unchanged(model, opt, snapshot)
    assert all(int(s["step"]) == 1 for s in opt.state.values())


@pytest.mark.parametrize(
    "step",
    [
        torch.tensor(1),
        torch.tensor(1.0, dtype=torch.float64),
        torch.ones(2),
        torch.tensor(1.0, device="meta"),
    ],
    ids=["int64", "float64", "two elements", "meta"],
)
def test_a_step_counter_the_kernel_cannot_add_to_is_refused_before_anything_is_written(step):
    # A host step adds one to every counter through its data pointer: only a float32 scalar on the
    # parameter's device takes that write.
    model = torch.nn.Linear(3, 3)
    opt = pk.SalientAdam(model.parameters(), backend="cpu")
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    opt.state[model.bias]["step"] = step
    snapshot = _snapshot(model, opt)
    with pytest.raises(TypeError, match="one-element float32 tensor on cpu"):
        opt.step()
    _assert_unchanged(model, opt, snapshot)
    assert int(opt.state[model.weight]["step"]) == 1


def _set_data(state, key, value):
    state[key].data = value


@pytest.mark.parametrize(
    "change, error",
    [
        (lambda s: s["exp_avg"].resize_(2), r"state\['exp_avg'\] has shape \(2,\)"),
        (lambda s: s["exp_avg_sq"].t_(), r"state\['exp_avg_sq'\] is not contiguous"),
        (
            lambda s: _set_data(s, "exp_avg", s["exp_avg"].double()),
            r"state\['exp_avg'\] has dtype torch.float64",
        ),
        (lambda s: s.update(exp_avg_sq=s["exp_avg_sq"].to("meta")), r"state\['exp_avg_sq'\] is on meta"),
        (lambda s: s.update(exp_avg=s["exp_avg"].tolist()), r"state\['exp_avg'\] must be a tensor, got list"),
        (lambda s: s["ema"].t_(), r"state\['ema'\] is not contiguous"),
        (lambda s: s["mask"].resize_(0), r"state\['mask'\] has 0 words"),
    ],
    ids=["resized", "transposed", "float64", "meta", "list", "transposed ema", "empty mask"],
)
def test_state_changed_after_a_step_is_refused_before_anything_is_written(change, error):
    # After its first step a parameter's state is complete and takes the fast checks of every step:
    # those must still see a change inside a tensor they passed before, or a tensor replaced.
    model = torch.nn.Linear(3, 3)
    opt = pk.SalientAdamW(model.parameters(), ema=0.9, backend="cpu")
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    change(opt.state[model.weight])
    bias_state = {k: v.clone() for k, v in opt.state[model.bias].items() if isinstance(v, torch.Tensor)}
    snapshot = _snapshot(model, opt)
    with pytest.raises((TypeError, ValueError), match="parameter 0 of param group 0: " + error):
        opt.step()
    _assert_unchanged(model, opt, snapshot)
    assert all(torch.equal(opt.state[model.bias][k], v) for k, v in bias_state.items())


@pytest.mark.parametrize("backend", ["cpu", "eager"])
def test_step_counters_advance_with_and_without_the_compiled_module(backend, monkeypatch):
    from pecker_kernels.backends import cpu

    if backend == "eager":  # a build without _C still counts, one in-place add per parameter
        monkeypatch.setattr(cpu, "cpu_module", None)
    model = torch.nn.Linear(3, 3)
    opt = pk.SalientAdam(model.parameters(), backend=backend, ratio=1.0)
    (twin,), torch_opt = torch_twin([model.weight])
    for _ in range(3):
        model.weight.grad = torch.randn(3, 3)
        model.bias.grad = torch.randn(3)
        twin.grad = model.weight.grad.clone()
        opt.step()
        torch_opt.step()
    assert [float(s["step"]) for s in opt.state.values()] == [3.0, 3.0]
    torch.testing.assert_close(model.weight.detach(), twin.detach(), rtol=1e-6, atol=1e-7)


def test_a_rejected_add_param_group_does_not_stay_and_later_steps_work():
    model = torch.nn.Linear(3, 3)
    opt = pk.SalientAdam(model.parameters())
    extra = torch.nn.Parameter(torch.ones(4))
    for bad in ({"ratio": 2.0}, {"score": "loss"}, {"betas": (1.0, 0.9)}, {"amsgrad": True}):
        with pytest.raises((ValueError, NotImplementedError)):
            opt.add_param_group({"params": [extra], **bad})
        assert len(opt.param_groups) == 1
    model(torch.randn(2, 3)).sum().backward()
    opt.step()


# ---- 3. drop-in with torch.optim --------------------------------------------------------------------


def test_sgd_momentum_turned_on_mid_training_starts_its_buffer_like_torch():
    p = torch.nn.Parameter(torch.randn(20))
    (twin,), torch_opt = torch_twin([p], torch.optim.SGD, lr=0.1)
    opt = pk.SalientSGD([p], lr=0.1, ratio=1.0)
    for step in range(4):
        if step == 2:
            for group in (*opt.param_groups, *torch_opt.param_groups):
                group["momentum"], group["dampening"] = 0.9, 0.5
        grad = torch.randn(20)
        p.grad, twin.grad = grad.clone(), grad.clone()
        opt.step()
        torch_opt.step()
    torch.testing.assert_close(p.detach(), twin.detach(), rtol=1e-6, atol=1e-7)


def test_step_saved_as_a_python_number_advances_the_bias_correction():
    p = torch.nn.Parameter(torch.randn(8))
    (twin,), torch_opt = torch_twin([p])
    p.grad = twin.grad = None
    for _ in range(2):
        twin.grad = torch.ones(8)
        torch_opt.step()
    saved = copy.deepcopy(torch_opt.state_dict())
    saved["state"][0]["step"] = 2  # a plain number, as older torch versions saved it
    opt = pk.SalientAdam([p], ratio=1.0)
    with torch.no_grad():
        p.copy_(twin)
    opt.load_state_dict(saved)
    for _ in range(3):
        p.grad, twin.grad = torch.ones(8), torch.ones(8)
        opt.step()
        torch_opt.step()
    assert int(opt.state[p]["step"]) == 5
    torch.testing.assert_close(p.detach(), twin.detach(), rtol=1e-6, atol=1e-7)


# ---- 4. masks are never silently empty or replaced --------------------------------------------------


def _moved(before, after):
    return int((before != after).sum())


@pytest.mark.parametrize("backend", ["eager", "cpu"])
def test_an_overflowing_first_amp_step_does_not_fix_an_empty_one_shot_mask(backend):
    p = torch.nn.Parameter(torch.randn(200))
    opt = pk.SalientAdam([p], ratio=0.25, refresh_every=0, backend=backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    scaler.scale((p * float("inf")).sum()).backward()  # overflows
    scaler.step(opt)
    scaler.update()
    assert "mask" not in opt.state[p]
    before = p.detach().clone()
    opt.zero_grad()
    scaler.scale((p * torch.randn(200)).sum()).backward()
    scaler.step(opt)
    assert _moved(before, p.detach()) == 50
    assert int(opt.masks()[0].sum()) == 50


def test_all_non_finite_first_gradients_do_not_fix_an_empty_one_shot_mask():
    p = torch.nn.Parameter(torch.randn(100))
    opt = pk.SalientAdam([p], ratio=0.5, refresh_every=0)
    p.grad = torch.full((100,), float("nan"))
    opt.step()
    assert "mask" not in opt.state[p]
    p.grad = torch.randn(100)
    before = p.detach().clone()
    opt.step()
    assert _moved(before, p.detach()) == 50


@pytest.mark.parametrize("how", ["set_masks", "compute_mask"])
def test_a_mask_the_user_sets_stays_in_force_until_refresh_every_changes(how):
    p = torch.nn.Parameter(torch.randn(64))
    opt = pk.SalientAdam([p], ratio=0.5)  # default refresh_every=1
    mine = torch.zeros(64, dtype=torch.bool)
    mine[:8] = True
    if how == "set_masks":
        opt.set_masks([mine])
    else:
        grad = torch.zeros(64)
        grad[:32] = 1.0  # the top half by |grad| is the first 32
        opt.compute_mask([grad])
        mine = pk.topk_mask([grad], 0.5)[0]
    for _ in range(3):
        p.grad = torch.randn(64)
        before = p.detach().clone()
        opt.step()
        assert torch.equal(before != p.detach(), mine)
    opt.param_groups[0]["refresh_every"] = 2  # a new schedule: the next step selects anew
    p.grad = torch.randn(64)
    opt.step()
    assert torch.equal(opt.masks()[0], pk.topk_mask([p.grad], 0.5)[0])


def test_a_parameter_whose_first_gradient_comes_later_is_selected_alone():
    a, b = torch.nn.Parameter(torch.randn(40)), torch.nn.Parameter(torch.randn(10))
    opt = pk.SalientAdam([a, b], ratio=0.5, refresh_every=0)
    a.grad = torch.randn(40)
    opt.step()
    mask_a = opt.masks()[0].clone()
    a.grad, b.grad = torch.randn(40), torch.randn(10)
    opt.step()
    assert torch.equal(opt.masks()[0], mask_a)
    assert torch.equal(opt.masks()[1], pk.topk_mask([b.grad], 0.5)[0])


def test_topk_mask_of_parameters_that_lack_some_gradients_raises():
    a, b = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(4))
    a.grad = torch.randn(4)
    with pytest.raises(ValueError, match=r"\[1\] have no .grad"):
        pk.topk_mask([a, b], 0.5)
    with pytest.raises(ValueError, match=r"no \.grad"):
        pk.topk_mask([b], 0.5)


def test_accumulator_leaves_out_a_batch_with_a_nan_and_refuses_a_wrong_shape():
    p = torch.nn.Parameter(torch.zeros(3, 4))
    acc = pk.SaliencyAccumulator([p], clip_norm=1.0)
    good = torch.full((3, 4), 0.1)
    bad = good.clone()
    bad[1, 2] = float("nan")
    acc.accumulate([good])
    acc.accumulate([bad])
    assert torch.isfinite(acc.gradients()[0]).all() and acc.skipped_batches == 1
    torch.testing.assert_close(acc.gradients()[0], good)
    with pytest.raises(ValueError, match="shape"):
        acc.accumulate([torch.ones(4)])


@pytest.mark.parametrize("value", [2.0, 0.5, float("nan"), -1.0])
def test_set_masks_with_values_other_than_zero_and_one_raises(value):
    p = torch.nn.Parameter(torch.randn(8))
    opt = pk.SalientAdam([p])
    mask = torch.ones(8)
    mask[3] = value
    with pytest.raises(ValueError, match="other than 0 and 1"):
        opt.set_masks([mask])
    assert "mask" not in opt.state[p]


def test_compute_mask_without_any_gradient_raises_instead_of_ranking_zeros():
    opt = pk.SalientAdam([torch.nn.Parameter(torch.randn(8))])
    with pytest.raises(ValueError, match=r"no \.grad"):
        opt.compute_mask()


def test_a_state_dict_of_another_kind_of_optimizer_is_refused():
    p = torch.nn.Parameter(torch.randn(8))
    sgd = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    p.grad = torch.randn(8)
    sgd.step()
    opt = pk.SalientAdamW([p])
    with pytest.raises(ValueError, match="momentum_buffer"):
        opt.load_state_dict(sgd.state_dict())


def test_masks_on_the_meta_device_and_bare_tensors_give_clear_errors():
    p = torch.nn.Parameter(torch.randn(8))
    with pytest.raises(ValueError, match="meta"):
        pk.SalientAdam([p]).set_masks([torch.ones(8, device="meta")])
    with pytest.raises(TypeError, match="tensors must be a list"):
        pk.topk_mask(torch.randn(8), 0.5)
    with pytest.raises(TypeError, match="clip_norm"):
        pk.SaliencyAccumulator([p], clip_norm="1.0")


@pytest.mark.parametrize("kwargs", [dict(betas=(1.0, 0.999), step=2), dict(step=0)])
def test_step_config_refuses_what_would_divide_by_zero(kwargs):
    with pytest.raises(ValueError, match=r"beta1|step"):
        pk.StepConfig.adam("adam", lr=1e-3, **kwargs)
