"""Stage 1 (a distilled generator to start from, ``--init``), SFD's loss normalisation against a direct
implementation of it, and ``--compare --seeds`` with its learning-rate rule."""

import json

import pytest
import torch

from pecker_kernels.cli import main
from pecker_kernels.unlearn import checkpoints, compare
from pecker_kernels.unlearn.losses import sid_loss
from pecker_kernels.unlearn.nets import load_model
from pecker_kernels.unlearn.trainer import Distiller, UnlearnConfig, prepare

SMALL = dict(steps=2, batch=6, forget_batch=3, eval_every=2, eval_samples=8, final_samples=4, mask_batches=1)
TINY = [
    "--steps", "2", "--batch", "8", "--forget-batch", "4", "--eval-every", "1", "--eval-samples", "8",
    "--final-samples", "4", "--mask-batches", "1", "--teacher-ddim-steps", "1", "--no-progress",
]  # fmt: skip


def same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


def test_packaged_teacher_starts_from_the_packaged_distilled_generator_by_default():
    cfg = UnlearnConfig(**SMALL)
    ctx = prepare(cfg)
    assert cfg.init == "distilled" and ctx.start_path == checkpoints.default_path("digits", "generator")
    packaged, _, _ = load_model(ctx.start_path)
    d = Distiller(cfg, ctx)
    assert same_weights(d.generator.net, packaged) and not same_weights(d.generator.net, ctx.teacher)
    teacher_cfg = UnlearnConfig(**SMALL, init="teacher")
    d = Distiller(teacher_cfg, prepare(teacher_cfg))
    assert same_weights(d.generator.net, d.ctx.teacher)
    # The distilled generator is what stage 1 promises: a good one-step generator of every class.
    record = json.loads((ctx.start_path / "record.json").read_text())
    assert record["after"]["accuracy"] > 0.95
    assert record["after"]["frechet_overall"] < record["before"]["frechet_overall"] / 5


def test_init_errors_name_the_option(tmp_path, rgb_model):
    with pytest.raises(ValueError, match="--init distilled: no distilled generator ships for this model"):
        prepare(UnlearnConfig(**SMALL, model=str(rgb_model), init="distilled"))
    assert prepare(UnlearnConfig(**SMALL, model=str(rgb_model))).start is None  # default: the teacher
    with pytest.raises(ValueError, match="--init must be distilled, teacher or a generator folder"):
        prepare(UnlearnConfig(**SMALL, init=str(tmp_path / "missing")))
    packaged = checkpoints.default_path("digits", "generator")
    with pytest.raises(ValueError, match="distilled at t_init 440; this run uses --t-init 300"):
        prepare(UnlearnConfig(**SMALL, init=str(packaged), t_init=300))


def test_train_generator_writes_a_folder_that_init_starts_from(tmp_path):
    out = tmp_path / "gen"
    assert main(["train-generator", "--steps", "2", "--batch", "8", "--out", str(out)]) == 0
    record = json.loads((out / "record.json").read_text())
    assert record["steps"] == 2 and record["t_init"] == 440 and "frechet_overall" in record["after"]
    assert record["config"]["distill"] and record["config"]["forget_weight"] == 0.01
    cfg = UnlearnConfig(**SMALL, init=str(out))
    d = Distiller(cfg, prepare(cfg))
    saved, _, _ = load_model(out)
    assert same_weights(d.generator.net, saved)
    with pytest.raises(SystemExit, match="exists"):  # never over an existing folder
        main(["train-generator", "--steps", "1", "--out", str(out)])


def losses_of(weighting, **kw):
    """(pseudo loss, generator loss, and what they saw) for one batch, with the stream replayed."""
    cfg = UnlearnConfig(**SMALL, weighting=weighting, **kw)
    d = Distiller(cfg, prepare(cfg))
    labels, teacher_labels, is_forget, coef = d._labels()
    state = d.gen.get_state()
    loss_p = d.pseudo_loss(labels, coef)
    loss_g = d.generator_loss(labels, teacher_labels, coef)
    d.gen.set_state(state)
    with torch.no_grad():  # replay the draws: generator samples, times and noise, in the loop's order
        x0 = d.generator(d._noise(len(labels)), labels)
        t, eps = d._times(len(labels)), d._noise(len(labels))
        pred = d.pseudo(d.schedule.q_sample(x0, t, eps), t, labels)
        x0_g = d.generator(d._noise(len(labels)), labels)
        t_g, eps_g = d._times(len(labels)), d._noise(len(labels))
        xt = d.schedule.q_sample(x0_g, t_g, eps_g)
        f_t = d.schedule.x0_from_eps(xt, t_g, d.teacher(xt, t_g, teacher_labels))
        f_p = d.schedule.x0_from_eps(xt, t_g, d.pseudo(xt, t_g, labels))
        sid = sid_loss(x0_g, f_t, f_p, cfg.alpha)
    return cfg, float(loss_p.detach()), float(loss_g.detach()), is_forget, pred - eps, sid


def test_sfd_weighting_is_sfds_normalisation():
    """SFD: pseudo-score error summed over pixels; each loss = mean over the remaining-class batch +
    0.01 x mean over the forget-class batch."""
    cfg, loss_p, loss_g, is_forget, err, sid = losses_of("sfd")
    assert cfg.forget_weight == 0.01
    remaining = [b for b in range(len(is_forget)) if not is_forget[b]]
    forget = [b for b in range(len(is_forget)) if is_forget[b]]
    assert len(remaining) == SMALL["batch"] and len(forget) == SMALL["forget_batch"]

    def pixel_sum(b):
        return sum(float(v) ** 2 for v in err[b].flatten())

    direct_p = sum(pixel_sum(b) for b in remaining) / len(remaining)
    direct_p += 0.01 * sum(pixel_sum(b) for b in forget) / len(forget)
    direct_g = sum(float(sid[b]) for b in remaining) / len(remaining)
    direct_g += 0.01 * sum(float(sid[b]) for b in forget) / len(forget)
    assert loss_p == pytest.approx(direct_p, rel=1e-5)
    assert loss_g == pytest.approx(direct_g, rel=1e-4, abs=1e-4)


def test_pooled_weighting_keeps_the_first_normalisation():
    """The project's first weighting: one mean over the pooled batch, forget rows weighted 1.0, the
    pseudo-score error averaged over pixels."""
    cfg, loss_p, loss_g, is_forget, err, sid = losses_of("pooled")
    assert cfg.forget_weight == 1.0
    n, pixels = len(is_forget), err[0].numel()
    direct_p = sum(sum(float(v) ** 2 for v in err[b].flatten()) / pixels for b in range(n)) / n
    assert loss_p == pytest.approx(direct_p, rel=1e-5)
    assert loss_g == pytest.approx(float(sid.mean()), rel=1e-4, abs=1e-4)


def tuning_row(lr, steps, frechet, start=10.0):
    return {"lr": lr, "steps_to_forget": steps, "frechet_retain": frechet, "frechet_retain_start": start}


def test_lr_rule_fastest_within_tolerance_then_fallbacks():
    rows = [tuning_row(1e-3, 30, 10.5), tuning_row(3e-3, 10, 11.5), tuning_row(1e-2, 20, 10.9)]
    assert compare.choose_lr(rows, 0.1)[0] == 1e-2  # 3e-3 is faster but 15% worse than the start
    assert compare.choose_lr(rows, 0.2)[0] == 3e-3
    rows = [tuning_row(1e-3, 30, 12.0), tuning_row(3e-3, 10, 15.0), tuning_row(1e-2, None, 9.0)]
    lr, why = compare.choose_lr(rows, 0.1)
    assert lr == 1e-3 and "lowest Frechet among the lrs that forgot" in why
    lr, why = compare.choose_lr([tuning_row(1e-3, None, 12.0), tuning_row(3e-3, None, 11.0)], 0.1)
    assert lr == 3e-3 and why == "no lr forgot: lowest Frechet"
    assert compare.choose_lr([tuning_row(1e-3, 20, 10.0), tuning_row(3e-3, 20, 10.0)], 0.1)[0] == 1e-3


def test_variant_names():
    assert compare.parse_variant("sfd") == {"method": "sfd"}
    assert compare.parse_variant("pecker-r0.3-k10-gw") == {
        "method": "pecker", "ratio": 0.3, "refresh_every": 10, "score": "grad_weight",
    }  # fmt: skip
    for bad in ("salun", "pecker-x3", "sfd-r0.5", "pecker-rabc"):
        with pytest.raises(ValueError):
            compare.parse_variant(bad)
    with pytest.raises(SystemExit, match="--seeds N runs a comparison: give --compare too"):
        main(["unlearn", "--seeds", "2", "--out", "x"])


def test_compare_seeds_writes_a_row_per_variant_and_seed_with_the_rule_s_lr(tmp_path):
    out = tmp_path / "cmp"
    argv = ["unlearn", "--compare", "--seeds", "2", "--variants", "sfd,pecker-r0.3-gw"]
    argv += ["--lr-grid", "1e-3,1e-2"]
    assert main([*argv, "--target", "0.5", "--init", "teacher", *TINY, "--out", str(out)]) == 0
    result = json.loads((out / "compare.json").read_text())
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG" and (out / "compare.md").is_file()
    assert result["seeds"] == [0, 1] and result["tune_seed"] == 2
    assert {(r["variant"], r["lr"]) for r in result["tuning"]} == {
        (v, lr) for v in ("sfd", "pecker-r0.3-gw") for lr in (1e-3, 1e-2)
    }
    assert all(r["seed"] == 2 for r in result["tuning"])
    assert sorted((r["variant"], r["seed"]) for r in result["rows"]) == [
        ("pecker-r0.3-gw", 0), ("pecker-r0.3-gw", 1), ("sfd", 0), ("sfd", 1),
    ]  # fmt: skip
    for v, choice in result["chosen_lr"].items():
        tuned = [r for r in result["tuning"] if r["variant"] == v]
        assert choice["lr"] == compare.choose_lr(tuned, 0.1)[0]
        assert all(r["lr"] == choice["lr"] for r in result["rows"] if r["variant"] == v)
    pecker = [r for r in result["rows"] if r["variant"] == "pecker-r0.3-gw"]
    assert all(r["score"] == "grad_weight" and abs(r["updated_fraction"] - 0.3) < 1e-3 for r in pecker)
    s = result["summary"]["pecker-r0.3-gw"]
    values = [r["frechet_retain"] for r in pecker]
    assert s["frechet_retain"]["mean"] == pytest.approx(sum(values) / 2)
    assert s["frechet_retain"]["std"] == pytest.approx(abs(values[0] - values[1]) / 2**0.5)
    sfd = {r["seed"]: r for r in result["rows"] if r["variant"] == "sfd"}
    diff = [r["frechet_retain"] - sfd[r["seed"]]["frechet_retain"] for r in pecker]
    assert s["minus_sfd"]["frechet_retain"]["mean"] == pytest.approx(sum(diff) / 2)
    assert json.loads((out / "run.json").read_text())["status"] == "done"
