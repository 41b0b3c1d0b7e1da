"""The unlearning loop of RECIPE.md: score-forgetting distillation into a one-step generator, with the
generator's updates masked to its most salient parameters (``pecker``) or not masked (``sfd``)."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..distributed import is_dtensor
from ..optim import SalientAdam
from ..saliency import SaliencyAccumulator
from . import checkpoints
from .data import Dataset, load_dataset
from .diffusion import OneStepGenerator, Schedule
from .losses import class_weights, denoising_loss, sid_loss, weighted_mean
from .metrics import classify, evaluate

METHODS = ("pecker", "sfd")


@dataclass
class UnlearnConfig:
    """Everything that defines a run; SFD's values where they transfer, shorter ones for small runs."""

    dataset: str = "digits"
    forget: int = 3
    override: int | str | None = None  # a class, "random", or None: (forget + 1) mod classes
    method: str = "pecker"
    steps: int = 150
    batch: int = 64  # remaining-class samples per step
    forget_batch: int = 16  # forget-class samples per step
    lr_generator: float = 1e-3  # SFD: 1e-5 over 50k+ steps; this budget is a few hundred steps
    lr_pseudo: float = 1e-3
    alpha: float = 1.2
    # Weight of the forgetting term in both losses. SFD uses 0.01 over 50k+ steps; at 0.01 a 200-step
    # digits run still labelled 88% of forget samples as the class, so short runs weight it 1.0.
    forget_weight: float = 1.0
    t_init: int = 440
    t_min: int = 38
    t_max: int = 712
    clip_value: float = 1.0
    ema: float = 0.95  # SFD: 0.9999 over 50k+ steps; a few hundred steps need a shorter average
    ratio: float = 0.5
    refresh_every: int = 0  # 0: one-shot SalUn-style mask; K: reselect every K steps from that step's grad
    mask_batches: int = 8  # forget-loss batches accumulated for the one-shot mask
    backend: str = "auto"
    seed: int = 0
    eval_every: int = 5
    eval_samples: int = 200  # forget-class samples per evaluation during training
    final_samples: int = 100  # per class, for the final metrics
    target: float = 0.05  # forgetting accuracy that counts as forgotten
    teacher: str | None = None  # checkpoint paths; None: the packaged ones for the data set
    classifier: str | None = None
    # Under torchrun: the generator and pseudo-score are sharded with FSDP2 and every rank draws its
    # own samples (the global batch is world_size x batch); the saliency mask is one global top-k.
    distributed: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self, num_classes: int) -> None:
        """Raise ValueError on anything that cannot run; called before any work or output."""
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; expected one of: {', '.join(METHODS)}")
        if (
            isinstance(self.forget, bool)
            or not isinstance(self.forget, int)
            or not 0 <= self.forget < num_classes
        ):
            raise ValueError(f"forget class must be an integer in [0, {num_classes}), got {self.forget!r}")
        if self.override is not None and self.override != "random":
            if isinstance(self.override, bool) or not isinstance(self.override, int):
                raise ValueError(f"override must be a class index or 'random', got {self.override!r}")
            if not 0 <= self.override < num_classes:
                raise ValueError(f"override class must be in [0, {num_classes}), got {self.override}")
            if self.override == self.forget:
                raise ValueError(
                    f"override class {self.override} equals the forget class: the forgotten class's score "
                    "must be replaced by another class's"
                )
        if not 0 < self.ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {self.ratio}")
        for name in ("steps", "batch", "forget_batch", "eval_every", "eval_samples", "mask_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.final_samples < 2:
            raise ValueError(
                f"final_samples must be >= 2 (Frechet needs a covariance), got {self.final_samples}"
            )
        if self.refresh_every < 0:
            raise ValueError(f"refresh_every must be >= 0, got {self.refresh_every}")
        if not 0 <= self.t_min < self.t_max <= 1000 or not 0 <= self.t_init < 1000:
            raise ValueError("need 0 <= t_min < t_max <= 1000 and 0 <= t_init < 1000")

    def override_class(self) -> int | None:
        return None if self.override == "random" else self.override


@dataclass
class Context:
    """What the runs of one invocation share: data, frozen networks, real features."""

    data: Dataset
    teacher: nn.Module
    classifier: nn.Module
    real_features: dict[int, Tensor]
    teacher_path: Path
    classifier_path: Path


def prepare(config: UnlearnConfig) -> Context:
    """Load the data set and checkpoints and validate ``config`` against them (ValueError on mismatch)."""
    data = load_dataset(config.dataset)
    if config.override is None:
        config.override = (config.forget + 1) % data.num_classes if isinstance(config.forget, int) else None
    config.validate(data.num_classes)
    tpath = Path(config.teacher) if config.teacher else checkpoints.default_path(config.dataset, "teacher")
    cpath = (
        Path(config.classifier)
        if config.classifier
        else checkpoints.default_path(config.dataset, "classifier")
    )
    teacher = checkpoints.load(tpath, "teacher", data.name, data.image_size, data.num_classes)
    classifier = checkpoints.load(cpath, "classifier", data.name, data.image_size, data.num_classes)
    teacher.requires_grad_(False)
    classifier.requires_grad_(False)
    _, feats = classify(classifier, data.images)
    real = {c: feats[data.labels == c] for c in range(data.num_classes)}
    return Context(data, teacher, classifier, real, tpath, cpath)


class _Timer:
    """Accumulates wall seconds per phase."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def add(self, name: str, start: float) -> float:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - start
        return now


class Distiller:
    """One unlearning run. ``run()`` returns the metrics dict and the before/after sample tensors."""

    def __init__(self, config: UnlearnConfig, ctx: Context) -> None:
        self.cfg, self.ctx = config, ctx
        data = ctx.data
        self.num_classes = data.num_classes
        self.shape = tuple(data.images.shape[1:])
        self.remaining = torch.tensor([c for c in range(self.num_classes) if c != config.forget])
        self.schedule = Schedule()
        torch.manual_seed(config.seed)
        self.rank = torch.distributed.get_rank() if config.distributed else 0
        # All sampling in the loop draws from it; each rank draws its own part of the global batch.
        self.gen = torch.Generator().manual_seed(config.seed + 7919 * self.rank)
        self.teacher = ctx.teacher
        self.generator = OneStepGenerator(
            copy.deepcopy(ctx.teacher).requires_grad_(True), self.schedule, config.t_init
        )
        self.pseudo = copy.deepcopy(ctx.teacher).requires_grad_(True)
        if config.distributed:
            from torch.distributed.fsdp import fully_shard

            fully_shard(self.generator.net)  # parameters become DTensor shards: the mask spans them all
            fully_shard(self.pseudo)
        self.eval_generator = OneStepGenerator(copy.deepcopy(ctx.teacher), self.schedule, config.t_init)
        self.gen_params = list(self.generator.net.parameters())
        self.opt_g = SalientAdam(
            self.gen_params,
            lr=config.lr_generator,
            betas=(0.0, 0.999),
            eps=1e-8,
            ratio=config.ratio if config.method == "pecker" else 1.0,
            refresh_every=0,  # selection is done explicitly (compute_mask) so its time is measured apart
            clip_value=config.clip_value,
            ema=config.ema,
            backend=config.backend,
        )
        self.opt_p = torch.optim.Adam(
            self.pseudo.parameters(), lr=config.lr_pseudo, betas=(0.0, 0.999), eps=1e-8
        )
        # Fixed evaluation noise: curves and before/after grids compare like with like.
        eval_g = torch.Generator().manual_seed(config.seed + 1)
        self.eval_z = torch.randn((config.eval_samples, *self.shape), generator=eval_g)
        self.final_labels = torch.arange(self.num_classes).repeat_interleave(config.final_samples)
        self.final_z = torch.randn((len(self.final_labels), *self.shape), generator=eval_g)

    # ---- sampling helpers ------------------------------------------------------------------------

    def _labels(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(labels for G and the pseudo-score, teacher labels, forget mask, per-sample weights)."""
        cfg = self.cfg
        pick = torch.randint(0, len(self.remaining), (cfg.batch,), generator=self.gen)
        retain = self.remaining[pick]
        forget = torch.full((cfg.forget_batch,), cfg.forget)
        if cfg.override_class() is None:  # random override: any class but the forgotten one
            o = self.remaining[torch.randint(0, len(self.remaining), (cfg.forget_batch,), generator=self.gen)]
        else:
            o = torch.full((cfg.forget_batch,), cfg.override_class())
        labels = torch.cat([retain, forget])
        is_forget = labels == cfg.forget
        return labels, torch.cat([retain, o]), is_forget, class_weights(is_forget, cfg.forget_weight)

    def _noise(self, n: int) -> Tensor:
        return torch.randn((n, *self.shape), generator=self.gen)

    def _times(self, n: int) -> Tensor:
        return torch.randint(self.cfg.t_min, self.cfg.t_max, (n,), generator=self.gen)

    # ---- the two losses --------------------------------------------------------------------------

    def pseudo_loss(self, labels: Tensor, weights: Tensor) -> Tensor:
        with torch.no_grad():
            x0 = self.generator(self._noise(len(labels)), labels)
        t, eps = self._times(len(labels)), self._noise(len(labels))
        pred = self.pseudo(self.schedule.q_sample(x0, t, eps), t, labels)
        return weighted_mean(denoising_loss(pred, eps), weights)

    def generator_loss(self, labels: Tensor, teacher_labels: Tensor, weights: Tensor) -> Tensor:
        """SiD loss; the forget rows ask the teacher about the override class (teacher_labels)."""
        x0 = self.generator(self._noise(len(labels)), labels)
        t, eps = self._times(len(labels)), self._noise(len(labels))
        xt = self.schedule.q_sample(x0, t, eps)
        f_teacher = self.schedule.x0_from_eps(xt, t, self.teacher(xt, t, teacher_labels))
        f_pseudo = self.schedule.x0_from_eps(xt, t, self.pseudo(xt, t, labels))
        return weighted_mean(sid_loss(x0, f_teacher, f_pseudo, self.cfg.alpha), weights)

    def forget_only_loss(self) -> Tensor:
        """The forgetting term alone (forget-class rows), the loss that defines one-shot saliency."""
        cfg = self.cfg
        labels, teacher_labels, _, _ = self._labels()
        rows = slice(cfg.batch, None)
        return self.generator_loss(labels[rows], teacher_labels[rows], torch.ones(cfg.forget_batch))

    # ---- evaluation ------------------------------------------------------------------------------

    @torch.no_grad()
    def _load_ema(self) -> None:
        for p, e in zip(self.eval_generator.net.parameters(), self.opt_g.ema_parameters(), strict=True):
            p.copy_(_full(e))

    @torch.no_grad()
    def _quick_eval(self) -> tuple[float, float]:
        """(forgetting accuracy, retain accuracy) of the EMA generator on the fixed evaluation noise."""
        self._load_ema()
        clf, cfg = self.ctx.classifier, self.cfg
        f = self.eval_generator(self.eval_z, torch.full((len(self.eval_z),), cfg.forget))
        r_labels = self.remaining.repeat(len(self.eval_z) // len(self.remaining) + 1)[: len(self.eval_z)]
        r = self.eval_generator(self.eval_z, r_labels)
        preds_f, _ = classify(clf, f)
        preds_r, _ = classify(clf, r)
        return float((preds_f == cfg.forget).float().mean()), float((preds_r == r_labels).float().mean())

    @torch.no_grad()
    def final_samples(self) -> Tensor:
        self._load_ema()
        return self.eval_generator(self.final_z, self.final_labels)

    # ---- the loop --------------------------------------------------------------------------------

    def one_shot_mask(self) -> None:
        """SalUn: |sum over forget batches of the (norm-1 clipped) forgetting-loss gradient|, top ratio."""
        acc = SaliencyAccumulator(self.gen_params, clip_norm=1.0)
        # Its own random stream: pecker and sfd then train on the very same noise, labels and times.
        train_stream, self.gen = self.gen, torch.Generator().manual_seed(self.cfg.seed + 3 + 7919 * self.rank)
        for _ in range(self.cfg.mask_batches):
            self.opt_g.zero_grad(set_to_none=True)
            self.pseudo.requires_grad_(False)
            self.forget_only_loss().backward()
            self.pseudo.requires_grad_(True)
            acc.accumulate()
        self.gen = train_stream
        self.opt_g.compute_mask(acc.gradients())
        self.opt_g.zero_grad(set_to_none=True)

    def run(self, on_step: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, Any]:
        cfg, timer = self.cfg, _Timer()
        history: dict[str, list] = {"step": [], "loss_pseudo": [], "loss_generator": []}
        evals: dict[str, list] = {
            "step": [],
            "train_seconds": [],
            "forget_accuracy": [],
            "retain_accuracy": [],
        }

        before = self.final_samples()
        initial = evaluate(
            self.ctx.classifier,
            before,
            self.final_labels,
            self.ctx.real_features,
            cfg.forget,
            self.num_classes,
        )

        start = time.perf_counter()
        if cfg.method == "pecker" and cfg.refresh_every == 0:
            self.one_shot_mask()
        elif cfg.method == "sfd":
            self.opt_g.set_masks([torch.ones_like(p, dtype=torch.bool) for p in self.gen_params])
        setup_seconds = time.perf_counter() - start
        train_seconds = setup_seconds  # what time-to-forget counts: setup + training steps, no evaluation

        steps_to_forget = time_to_forget = None

        def record_eval(step: int) -> float:
            nonlocal steps_to_forget, time_to_forget
            t0 = time.perf_counter()
            fa, ra = self._quick_eval()
            timer.add("eval", t0)
            evals["step"].append(step)
            evals["train_seconds"].append(train_seconds)
            evals["forget_accuracy"].append(fa)
            evals["retain_accuracy"].append(ra)
            if steps_to_forget is None and fa < cfg.target:
                steps_to_forget, time_to_forget = step, train_seconds
            return fa

        fa = record_eval(0)
        wall_start = time.perf_counter()
        for step in range(1, cfg.steps + 1):
            t0 = time.perf_counter()
            labels, teacher_labels, _, weights = self._labels()
            # 1. pseudo-score: learn the score of the generator's current samples.
            loss_p = self.pseudo_loss(labels, weights)
            self.opt_p.zero_grad(set_to_none=True)
            loss_p.backward()
            t1 = timer.add("forward_backward", t0)
            nn.utils.clip_grad_value_(self.pseudo.parameters(), cfg.clip_value)
            self.opt_p.step()
            t2 = timer.add("pseudo_update", t1)
            # 2. generator: SiD loss + forgetting term; no gradient into teacher or pseudo-score weights.
            self.pseudo.requires_grad_(False)
            loss_g = self.generator_loss(labels, teacher_labels, weights)
            self.opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            self.pseudo.requires_grad_(True)
            t3 = timer.add("forward_backward", t2)
            # 3. saliency mask (pecker with a refresh schedule), then the masked, clipped Adam step + EMA.
            if cfg.method == "pecker" and cfg.refresh_every > 0 and (step - 1) % cfg.refresh_every == 0:
                self.opt_g.compute_mask()
                t3 = timer.add("mask", t3)
            self.opt_g.step()
            timer.add("update", t3)
            train_seconds += time.perf_counter() - t0

            history["step"].append(step)
            history["loss_pseudo"].append(float(loss_p.detach()))
            history["loss_generator"].append(float(loss_g.detach()))
            if step % cfg.eval_every == 0 or step == cfg.steps:
                fa = record_eval(step)
            if on_step is not None:
                on_step(
                    step,
                    {
                        "loss_p": history["loss_pseudo"][-1],
                        "loss_g": history["loss_generator"][-1],
                        "forget_acc": fa,
                    },
                )
        wall_seconds = setup_seconds + time.perf_counter() - wall_start

        after = self.final_samples()
        final = evaluate(
            self.ctx.classifier,
            after,
            self.final_labels,
            self.ctx.real_features,
            cfg.forget,
            self.num_classes,
        )
        per_step = {k: v / cfg.steps for k, v in timer.seconds.items() if k != "eval"}
        mask_fraction = float(
            sum(int(_full(m).sum()) for m in self.opt_g.masks()) / sum(p.numel() for p in self.gen_params)
        )
        metrics = {
            "method": cfg.method,
            "forget_class": cfg.forget,
            "override_class": cfg.override,
            **{k: final[k] for k in ("forget_accuracy", "retain_accuracy", "frechet", "per_class_accuracy")},
            "steps": cfg.steps,
            "wall_seconds": wall_seconds,
            "train_seconds": train_seconds,
            "setup_seconds": setup_seconds,
            "eval_seconds": timer.seconds.get("eval", 0.0),
            "steps_to_forget": steps_to_forget,
            "time_to_forget_seconds": time_to_forget,
            "target": cfg.target,
            "per_step_seconds": per_step,
            "updated_fraction": mask_fraction,
            "generator_parameters": sum(p.numel() for p in self.gen_params),
            "initial": initial,
            "config": asdict(cfg),
            "teacher_checkpoint": str(self.ctx.teacher_path),
            "classifier_checkpoint": str(self.ctx.classifier_path),
            "threads": torch.get_num_threads(),
            "world_size": torch.distributed.get_world_size() if cfg.distributed else 1,
        }
        return {"metrics": metrics, "history": history, "evals": evals, "before": before, "after": after}


def _full(t: Tensor) -> Tensor:
    """The whole tensor: a DTensor's shards gathered from every rank (a collective), else ``t``."""
    return t.full_tensor() if is_dtensor(t) else t
