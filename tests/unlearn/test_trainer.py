"""The loop's contracts: pecker and sfd see the same random stream; unselected weights stay frozen; the
forgetting rows ask the teacher about the override class."""

import torch

from pecker_kernels.unlearn.trainer import Distiller, UnlearnConfig, prepare

SMALL = dict(steps=3, batch=8, forget_batch=4, eval_every=3, eval_samples=8, final_samples=4, mask_batches=1)


def run(**kw):
    cfg = UnlearnConfig(**{**SMALL, **kw})
    d = Distiller(cfg, prepare(cfg))
    d.run()
    return d


def test_full_mask_equals_sfd_and_unselected_weights_stay_frozen():
    sfd = run(method="sfd")
    full = run(method="pecker", ratio=1.0)
    for a, b in zip(sfd.gen_params, full.gen_params, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    half = run(method="pecker", ratio=0.5)
    start = list(half.ctx.start.parameters())  # the packaged distilled generator (the default --init)
    masks = half.opt_g.masks()
    moved = 0
    for p, t, m in zip(half.gen_params, start, masks, strict=True):
        assert torch.equal(p[~m], t[~m])  # unselected: exactly the starting generator's value
        moved += int((p[m] != t[m]).sum())
    assert moved > 0


def test_forget_rows_ask_teacher_about_override():
    cfg = UnlearnConfig(**SMALL, forget=2, override=7)
    d = Distiller(cfg, prepare(cfg))
    seen = []
    real_teacher = d.teacher

    def spy(x, t, c):
        seen.append(c.clone())
        return real_teacher(x, t, c)

    d.teacher = spy
    labels, teacher_labels, is_forget, weights = d._labels()
    d.generator_loss(labels, teacher_labels, weights)
    (c,) = seen
    assert torch.equal(c[is_forget], torch.full((cfg.forget_batch,), 7))
    assert torch.equal(c[~is_forget], labels[~is_forget]) and not (labels[~is_forget] == 2).any()
    # SFD's normalisation (the default): 0.01 x the mean over the forget batch, the mean over the rest.
    assert torch.allclose(weights[is_forget], torch.full((cfg.forget_batch,), 0.01 / cfg.forget_batch))
    assert torch.allclose(weights[~is_forget], torch.full((cfg.batch,), 1 / cfg.batch))
