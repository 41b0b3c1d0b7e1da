"""Concept forgetting on a text-conditioned pipeline (a ``StableDiffusionPipeline`` folder): score-forgetting
distillation in the pipeline's latent space (docs/RECIPE.md, "Concept forgetting").

Three ``UNet2DConditionModel``s start from the pipeline's UNet: the teacher (frozen), the pseudo-score and
the one-step generator G(z, prompt) = the UNet at ``t_init`` (625, as SFD on SD) on sqrt(1 - abar) z. One
iteration: (1) the pseudo-score learns the noise of G's current latents (its classifier-free-guided
prediction, scale ``cfg_fake``); (2) G takes the SiD loss, the teacher guided at ``cfg``; on the forget rows
G and the pseudo-score read the forget prompt while the teacher reads the anchor prompt (its score
replaces the concept's); (3) the masked, clipped Adam step and EMA of G (``SalientAdam``), the mask one-shot
from the forget rows' gradient or reselected every ``refresh_every`` steps. The frozen text encoder encodes
each prompt once; the frozen VAE only decodes the grids and the evaluation samples. fp16 runs under
autocast with a ``GradScaler`` per optimizer, bf16 under autocast alone; gradient checkpointing on request.
Checkpoints hold everything the loop needs to continue bit-identically on the CPU. Under torchrun
(``distributed``) the generator and the pseudo-score are sharded with FSDP2, every rank draws its own
samples (the global batch is world_size x batch) and the mask is one global top-k over every rank's shards,
as for class forgetting; such runs keep no checkpoints.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import shlex
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..optim import SalientAdam
from .diffusion import OneStepGenerator
from .losses import class_weights, denoising_loss, sid_loss, weighted_mean
from .text import TextEpsNet, TextPipeline, guided_eps, inspect_pipeline, load_pipeline, read_prompts
from .trainer import DistillerParts, NonFiniteLossError, _Timer, shard

METHODS = ("pecker", "sfd")
PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class ConceptConfig:
    """One concept-forgetting run; SFD's Stable Diffusion values as defaults where they transfer."""

    model: str | None = None
    forget_prompts: list[str] = field(default_factory=list)
    anchor_prompt: str | None = None
    retain_prompts: list[str] = field(default_factory=list)  # empty: the anchor prompt alone
    method: str = "pecker"
    steps: int = 200
    batch: int = 4  # retain-prompt samples per step (SFD: total batch 8 over the GPUs)
    forget_batch: int = 4
    # A UNet2DConditionModel folder the one-step generator starts from (SFD: a one-step SiD generator of
    # the pipeline); None: the pipeline's own UNet (distil and forget at once).
    init: str | None = None
    lr_generator: float = 1e-6  # SFD on SD-1.5
    lr_pseudo: float = 3e-6
    adam_eps: float = 1e-6
    alpha: float = 1.2
    forget_weight: float = 1.0
    cfg: float = 4.5  # the teacher's guidance
    cfg_fake: float = 4.5  # the pseudo-score's guidance (its training loss and the generator loss)
    t_init: int = 625
    t_min: int = 20
    t_max: int = 980
    clip_value: float = 1.0
    ema: float = 0.99
    ratio: float = 0.5
    refresh_every: int = 0
    mask_batches: int = 4
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    device: str = "cpu"
    backend: str = "auto"
    seed: int = 0
    sample_prompts: list[str] = field(default_factory=list)  # empty: forget, anchor, first retain prompts
    samples: int = 8  # per prompt: the grids, and the evaluation per prompt
    classifier: str | None = None
    eval_prompts: dict[str, dict[str, int]] = field(default_factory=dict)  # group -> prompt -> class
    checkpoint_every: int = 100
    # Under torchrun: FSDP2-sharded generator and pseudo-score, each rank its own samples (the global batch
    # is world_size x batch), one global mask; gloo on the CPU, nccl on cuda:LOCAL_RANK. No checkpoints.
    distributed: bool = False

    def validate(self, timesteps: int = 1000) -> None:
        """ValueError naming the option, before any work or output."""
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; expected one of: {', '.join(METHODS)}")
        if not self.forget_prompts:
            raise ValueError(
                "concept forgetting needs --forget-prompt P (repeatable) or --forget-prompts FILE"
            )
        if not self.anchor_prompt:
            raise ValueError(
                "concept forgetting needs --anchor-prompt A: what the forget prompts draw instead"
            )
        if self.anchor_prompt in self.forget_prompts:
            raise ValueError(f"the anchor prompt {self.anchor_prompt!r} is also a forget prompt")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.distributed and self.precision == "fp16":
            raise ValueError(
                "--distributed runs in fp32 or bf16: fp16's GradScaler would decide on each rank alone "
                "whether to skip a step (use --precision bf16)"
            )
        for name in ("steps", "batch", "forget_batch", "mask_batches", "samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
        for name in ("refresh_every", "checkpoint_every", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 0, got {value!r}")
        checks = {
            "lr_generator": ("--lr", lambda v: v > 0, "> 0"),
            "lr_pseudo": ("--lr-pseudo", lambda v: v > 0, "> 0"),
            "clip_value": ("--clip-value", lambda v: v > 0, "> 0"),
            "forget_weight": ("--forget-weight", lambda v: v >= 0, ">= 0"),
            "alpha": ("--alpha", lambda v: True, "finite"),
            "cfg": ("--cfg", lambda v: v >= 1, ">= 1"),
            "cfg_fake": ("--cfg-fake", lambda v: v >= 1, ">= 1"),
            "ema": ("--ema", lambda v: 0 <= v < 1, "in [0, 1)"),
            "ratio": ("--ratio", lambda v: 0 < v <= 1, "in (0, 1]"),
        }
        for name, (flag, ok, where) in checks.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"{flag} must be a finite number, got {value!r}")
            if not ok(value):
                raise ValueError(f"{flag} must be {where}, got {value}")
        if not 0 <= self.t_min < self.t_max <= timesteps or not 0 <= self.t_init < timesteps:
            raise ValueError(
                f"need 0 <= --t-min < --t-max <= {timesteps} and 0 <= --init-timestep < {timesteps}"
            )
        if self.init is not None and not (Path(self.init) / "config.json").is_file():
            raise ValueError(f"--init {self.init}: not a UNet2DConditionModel folder (no config.json)")
        if self.eval_prompts and not self.classifier:
            raise ValueError("--eval-prompts needs --classifier PATH (the classifier of the decoded images)")

    @property
    def retain(self) -> list[str]:
        return self.retain_prompts or [str(self.anchor_prompt)]

    @property
    def grid_prompts(self) -> list[str]:
        if self.sample_prompts:
            return list(self.sample_prompts)
        return list(dict.fromkeys([*self.forget_prompts, str(self.anchor_prompt), *self.retain[:3]]))


def _with_unet_weights(base: nn.Module, folder: str) -> nn.Module:
    """A copy of ``base`` (a TextEpsNet) whose UNet holds the weights of the UNet2DConditionModel saved in
    ``folder``, which must have the pipeline UNet's architecture."""
    from diffusers import UNet2DConditionModel

    loaded = UNet2DConditionModel.from_pretrained(folder)
    net = copy.deepcopy(base)
    try:
        net.unet.load_state_dict(loaded.state_dict())
    except RuntimeError as e:
        first = str(e).splitlines()[1:2] or [""]
        raise ValueError(
            f"--init {folder}: its UNet does not have the pipeline UNet's architecture ({first[0].strip()})"
        ) from e
    return net


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def run_device(cfg: ConceptConfig) -> torch.device:
    """``cfg.device``; under --distributed on CUDA, this rank's GPU (torchrun's LOCAL_RANK)."""
    device = torch.device(cfg.device)
    if cfg.distributed and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


class ConceptDistiller(DistillerParts):
    """One concept-forgetting run: ``setup()``, ``train()`` (resumable via ``state_dict``), ``finish()``."""

    LOSS_OPTIONS = "--lr, --lr-pseudo, --cfg, --precision"

    def __init__(
        self, config: ConceptConfig, pipe: TextPipeline, classifier: nn.Module | None = None
    ) -> None:
        self.cfg, self.pipe, self.classifier = config, pipe, classifier
        cfg = config
        self.rank = torch.distributed.get_rank() if cfg.distributed else 0
        self.device = run_device(cfg)
        self.dtype = PRECISIONS[cfg.precision]
        self.schedule = pipe.schedule
        self.shape = pipe.info.latent_shape
        torch.manual_seed(cfg.seed)
        # All sampling in the loop draws from it; each rank draws its own part of the global batch.
        self.gen = torch.Generator().manual_seed(cfg.seed + 7919 * self.rank)
        base = pipe.teacher.to(self.device)
        start = base if cfg.init is None else _with_unet_weights(base, cfg.init)
        trained = copy.deepcopy(start).requires_grad_(True)
        self.generator = OneStepGenerator(trained, self.schedule, cfg.t_init)
        self.pseudo = copy.deepcopy(base).requires_grad_(True)  # the pseudo-score starts from the teacher
        self.eval_generator = OneStepGenerator(copy.deepcopy(start), self.schedule, cfg.t_init).eval()
        self.teacher = base if self.dtype is None else base.to(self.dtype)  # frozen: half weights suffice
        if cfg.gradient_checkpointing:
            for net in (self.generator.net, self.pseudo):
                net.unet.enable_gradient_checkpointing()
                net.unet.train()  # diffusers checkpoints only in training mode (the UNets have no dropout)
        if cfg.distributed:
            shard(self.generator.net, self.pseudo)
        self.gen_params = list(self.generator.net.parameters())
        self.opt_g = SalientAdam(
            self.gen_params,
            lr=cfg.lr_generator,
            betas=(0.0, 0.999),
            eps=cfg.adam_eps,
            ratio=cfg.ratio if cfg.method == "pecker" else 1.0,
            refresh_every=0,  # reselection is explicit (compute_mask) and timed apart
            clip_value=cfg.clip_value,
            ema=cfg.ema,
            backend=cfg.backend,
        )
        self.opt_p = torch.optim.Adam(
            self.pseudo.parameters(), lr=cfg.lr_pseudo, betas=(0.0, 0.999), eps=cfg.adam_eps
        )
        fp16 = cfg.precision == "fp16"
        self.scaler_g = torch.amp.GradScaler(self.device.type, enabled=fp16)
        self.scaler_p = torch.amp.GradScaler(self.device.type, enabled=fp16)
        encode = pipe.prompts
        self.forget_states = encode(cfg.forget_prompts).to(self.device)
        self.anchor_state = encode([str(cfg.anchor_prompt)]).to(self.device)
        self.retain_states = encode(cfg.retain).to(self.device)
        self.uncond = encode([""]).to(self.device)
        eval_g = torch.Generator().manual_seed(cfg.seed + 1)
        self.grid_z = torch.randn((len(cfg.grid_prompts) * cfg.samples, *self.shape), generator=eval_g)
        self.eval_z = torch.randn((cfg.samples, *self.shape), generator=eval_g)
        self.step = 0
        self.timer = _Timer()
        self.history: dict[str, list] = {"step": [], "loss_pseudo": [], "loss_generator": [], "skipped": []}
        self.setup_seconds = self.train_seconds = 0.0
        self.initial: dict[str, Any] | None = None
        self.before: Tensor | None = None

    # ---- one batch -------------------------------------------------------------------------------

    def _autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def _randn(self, n: int) -> Tensor:
        return torch.randn((n, *self.shape), generator=self.gen).to(self.device)

    def _times(self, n: int) -> Tensor:
        return torch.randint(self.cfg.t_min, self.cfg.t_max, (n,), generator=self.gen).to(self.device)

    def _batch(self, retain: bool = True) -> tuple[Tensor, Tensor, Tensor]:
        """(states for G and the pseudo-score, states for the teacher, per-sample weights): retain rows
        then forget rows; the teacher reads the anchor prompt on the forget rows."""
        cfg = self.cfg
        f = torch.randint(0, len(self.forget_states), (cfg.forget_batch,), generator=self.gen)
        forget = self.forget_states[f.to(self.device)]
        anchor = self.anchor_state.expand(cfg.forget_batch, -1, -1)
        if not retain:
            return forget, anchor, torch.ones(cfg.forget_batch, device=self.device)
        r = torch.randint(0, len(self.retain_states), (cfg.batch,), generator=self.gen)
        kept = self.retain_states[r.to(self.device)]
        is_forget = torch.arange(cfg.batch + cfg.forget_batch, device=self.device) >= cfg.batch
        weights = class_weights(is_forget, cfg.forget_weight)
        return torch.cat([kept, forget]), torch.cat([kept, anchor]), weights

    def pseudo_loss(self, states: Tensor, weights: Tensor) -> Tensor:
        with torch.no_grad(), self._autocast():
            x0 = self.generator(self._randn(len(states)), states).float()
        t, eps = self._times(len(states)), self._randn(len(states))
        with self._autocast():
            pred = guided_eps(
                self.pseudo, self.schedule.q_sample(x0, t, eps), t, states, self.uncond, self.cfg_fake
            )
        return weighted_mean(denoising_loss(pred.float(), eps), weights)

    @property
    def cfg_fake(self) -> float:
        return self.cfg.cfg_fake

    @property
    def skips_non_finite(self) -> bool:
        return self.cfg.precision == "fp16"  # GradScaler skips an overflowing step and lowers its scale

    def generator_loss(self, states: Tensor, teacher_states: Tensor, weights: Tensor) -> Tensor:
        with self._autocast():
            x0 = self.generator(self._randn(len(states)), states).float()
        t, eps = self._times(len(states)), self._randn(len(states))
        xt = self.schedule.q_sample(x0, t, eps)
        with self._autocast():
            e_t = guided_eps(self.teacher, xt, t, teacher_states, self.uncond, self.cfg.cfg)
            e_p = guided_eps(self.pseudo, xt, t, states, self.uncond, self.cfg_fake)
        f_teacher = self.schedule.x0_from_eps(xt, t, e_t.float())
        f_pseudo = self.schedule.x0_from_eps(xt, t, e_p.float())
        return weighted_mean(sid_loss(x0, f_teacher, f_pseudo, self.cfg.alpha), weights)

    # ---- the loop --------------------------------------------------------------------------------

    def forget_loss(self) -> Tensor:
        """The forget rows' generator loss (the one-shot mask's saliency), scaled under fp16: the mask
        clips each batch's gradient to norm 1, which makes the loss scale irrelevant."""
        return self.scaler_g.scale(self.generator_loss(*self._batch(retain=False)))

    def setup(self) -> None:
        start = time.perf_counter()
        self.before = self.grid_samples()
        self.initial = self.evaluate()
        t0 = time.perf_counter()
        self.setup_seconds = self.set_up_mask()
        self.train_seconds = self.setup_seconds
        self.timer.seconds["setup_eval"] = t0 - start

    def train_step(self) -> None:
        cfg, timer = self.cfg, self.timer
        t0 = time.perf_counter()
        states, teacher_states, weights = self._batch()
        # 1. pseudo-score.
        loss_p = self.pseudo_loss(states, weights)
        lp = self.finite_loss(loss_p, "pseudo-score")
        self.opt_p.zero_grad(set_to_none=True)
        self.scaler_p.scale(loss_p).backward()
        t1 = timer.add("pseudo_forward_backward", t0)
        self.scaler_p.unscale_(self.opt_p)
        nn.utils.clip_grad_value_(self.pseudo.parameters(), cfg.clip_value)
        self.scaler_p.step(self.opt_p)
        self.scaler_p.update()
        t2 = timer.add("pseudo_update", t1)
        # 2. generator: no gradient into the pseudo-score's or the teacher's weights.
        self.pseudo.requires_grad_(False)
        loss_g = self.generator_loss(states, teacher_states, weights)
        lg = self.finite_loss(loss_g, "generator")
        self.opt_g.zero_grad(set_to_none=True)
        self.scaler_g.scale(loss_g).backward()
        self.pseudo.requires_grad_(True)
        t3 = timer.add("generator_forward_backward", t2)
        # 3. the mask (reselected on schedule), then the masked, clipped Adam step and EMA.
        scale = self.scaler_g.get_scale() if self.scaler_g.is_enabled() else 1.0
        self.scaler_g.unscale_(self.opt_g)
        finite = math.isfinite(lg)
        # fp16: an overflowing gradient skips the step (GradScaler), and the reselection with it.
        if finite and self.scaler_g.is_enabled():
            grads = [p.grad for p in self.gen_params if p.grad is not None]
            finite = bool(torch.stack([g.isfinite().all() for g in grads]).all())
        if cfg.method == "pecker" and cfg.refresh_every > 0 and self.step % cfg.refresh_every == 0 and finite:
            self.opt_g.compute_mask()
            t3 = timer.add("mask", t3)
        self.scaler_g.step(self.opt_g)
        self.scaler_g.update()
        skipped = self.scaler_g.is_enabled() and self.scaler_g.get_scale() < scale
        timer.add("generator_update", t3)
        self.train_seconds += time.perf_counter() - t0
        self.step += 1
        self.history["step"].append(self.step)
        self.history["loss_pseudo"].append(lp)
        self.history["loss_generator"].append(lg)
        self.history["skipped"].append(bool(skipped))

    def train(self, on_step=None, after_step=None) -> None:
        while self.step < self.cfg.steps:
            self.train_step()
            if on_step is not None:
                on_step(self.step, self.history["loss_pseudo"][-1], self.history["loss_generator"][-1])
            if after_step is not None:
                after_step(self)

    # ---- samples and evaluation ------------------------------------------------------------------

    @torch.no_grad()
    def draw(self, prompts: list[str], z: Tensor) -> Tensor:
        """Decoded images of the EMA generator, one per row of ``z`` (prompts repeated to fit)."""
        self._load_ema()
        states = self.pipe.prompts(prompts).to(self.device)
        out = []
        for i in range(0, len(z), 64):
            chunk = z[i : i + 64].to(self.device)
            with self._autocast():
                latents = self.eval_generator(chunk, states[i : i + 64]).float()
            out.append(self.pipe.decode(latents).cpu())
        return torch.cat(out)

    def grid_samples(self) -> Tensor:
        prompts = [p for p in self.cfg.grid_prompts for _ in range(self.cfg.samples)]
        return self.draw(prompts, self.grid_z)

    def evaluate(self) -> dict[str, Any] | None:
        """Per prompt of ``eval_prompts``: the fraction of its samples the classifier labels its class."""
        if self.classifier is None or not self.cfg.eval_prompts:
            return None
        from .metrics import classify

        result: dict[str, Any] = {}
        for group, prompts in self.cfg.eval_prompts.items():
            per: dict[str, float] = {}
            for text, label in prompts.items():
                images = self.draw([text] * len(self.eval_z), self.eval_z)
                preds, _ = classify(self.classifier, images)
                per[text] = float((preds == label).float().mean())
            result[group] = {"mean": sum(per.values()) / len(per), "per_prompt": per}
        return result

    def finish(self) -> dict[str, Any]:
        after = self.grid_samples()
        final = self.evaluate()
        per_step = {k: v / max(1, self.step) for k, v in self.timer.seconds.items() if k != "setup_eval"}
        metrics = {
            "recipe": "concept",
            "method": self.cfg.method,
            "forget_prompts": self.cfg.forget_prompts,
            "anchor_prompt": self.cfg.anchor_prompt,
            "steps": self.step,
            "train_seconds": self.train_seconds,
            "setup_seconds": self.setup_seconds,
            "per_step_seconds": per_step,
            "updated_fraction": self.updated_fraction(),
            "generator_parameters": sum(p.numel() for p in self.gen_params),
            "skipped_steps": sum(self.history["skipped"]),
            "initial": self.initial,
            "final": final,
            "config": asdict(self.cfg),
            "model": self.pipe.info.to_json(),
            "threads": torch.get_num_threads(),
            "world_size": torch.distributed.get_world_size() if self.cfg.distributed else 1,
        }
        return {"metrics": metrics, "history": self.history, "before": self.before, "after": after}

    # ---- checkpoints -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        state = self.training_state()
        state.update(scaler_g=self.scaler_g.state_dict(), scaler_p=self.scaler_p.state_dict())
        if self.device.type == "cuda":
            state["rng"]["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.load_training_state(state)
        if state["scaler_g"]:
            self.scaler_g.load_state_dict(state["scaler_g"])
            self.scaler_p.load_state_dict(state["scaler_p"])
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)


# ---- the command -------------------------------------------------------------------------------------


def config_from_args(args: argparse.Namespace) -> ConceptConfig:
    forget = list(args.forget_prompt)
    if args.forget_prompts is not None:
        forget += read_prompts(args.forget_prompts, "--forget-prompts")
    retain = read_prompts(args.retain_prompts, "--retain-prompts") if args.retain_prompts else []
    grid = read_prompts(args.sample_prompts, "--sample-prompts") if args.sample_prompts else []
    eval_prompts: dict[str, dict[str, int]] = {}
    if args.eval_prompts is not None:
        try:
            eval_prompts = json.loads(Path(args.eval_prompts).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"--eval-prompts {args.eval_prompts}: {e}") from e
        ok = isinstance(eval_prompts, dict) and all(
            isinstance(g, dict) and all(isinstance(c, int) and not isinstance(c, bool) for c in g.values())
            for g in eval_prompts.values()
        )
        if not ok:
            raise ValueError(f'--eval-prompts {args.eval_prompts} must hold {{"group": {{"prompt": class}}}}')
    return ConceptConfig(
        model=args.model,
        forget_prompts=list(dict.fromkeys(forget)),
        anchor_prompt=args.anchor_prompt,
        retain_prompts=retain,
        method=args.method,
        steps=args.steps,
        batch=args.batch,
        forget_batch=args.forget_batch,
        init=args.init,
        lr_generator=args.lr,
        lr_pseudo=args.lr_pseudo,
        alpha=args.alpha,
        forget_weight=args.forget_weight,
        cfg=args.cfg,
        cfg_fake=args.cfg_fake,
        t_init=args.init_timestep,
        t_min=args.t_min,
        t_max=args.t_max,
        clip_value=args.clip_value,
        ema=args.ema,
        ratio=args.ratio,
        refresh_every=args.refresh_every,
        mask_batches=args.mask_batches,
        precision=args.precision,
        gradient_checkpointing=args.gradient_checkpointing,
        device=args.device or default_device(),
        backend=args.backend,
        seed=args.seed,
        sample_prompts=grid,
        samples=args.samples,
        classifier=args.classifier,
        eval_prompts=eval_prompts,
        checkpoint_every=args.checkpoint_every,
        distributed=args.distributed,
    )


def _classifier(cfg: ConceptConfig, pipe: TextPipeline) -> nn.Module | None:
    if not cfg.classifier:
        return None
    from . import checkpoints
    from .models import build

    blob = checkpoints.read_config(cfg.classifier, "classifier")
    c = blob["config"]
    info = pipe.info
    if (c.get("channels", 1), c.get("image_size")) != (info.image_channels, info.image_size):
        raise ValueError(
            f"--classifier {cfg.classifier} classifies {c.get('channels', 1)}x{c.get('image_size')} images; "
            f"the pipeline decodes {info.image_channels}x{info.image_size}"
        )
    classes = c.get("num_classes")
    for group in cfg.eval_prompts.values():
        for text, label in group.items():
            if not 0 <= label < classes:
                raise ValueError(f"--eval-prompts: class {label} of {text!r} is not in [0, {classes})")
    model = build("classifier", c)
    model.load_state_dict(blob["state_dict"])
    return model.eval().requires_grad_(False)


def generator_record(cfg: ConceptConfig, pipe: TextPipeline) -> dict[str, Any]:
    info = pipe.info
    return {
        "folder": "generator",
        "class": "UNet2DConditionModel",
        "weights": f"EMA (decay {cfg.ema}) of the unlearned generator's network",
        "pipeline": str(info.path),
        "t_init": cfg.t_init,
        "formula": "x_init = sqrt(1 - abar[t_init]) z, z ~ N(0, I) of latent_shape; "
        "eps = unet(x_init, t_init, text_encoder(prompt)); "
        "latents = (x_init - sqrt(1 - abar[t_init]) eps) / sqrt(abar[t_init]); "
        "image = vae.decode(latents / scaling_factor) (no VAE: image = latents)",
        "prediction_type": pipe.schedule.prediction_type,
        "latent_shape": list(info.latent_shape),
        "scaling_factor": info.scaling_factor,
        "forgotten_prompts": cfg.forget_prompts,
        "anchor_prompt": cfg.anchor_prompt,
    }


def summary(metrics: dict[str, Any]) -> str:
    lines = [
        f"### Concept forgetting ({metrics['method']}): {', '.join(map(repr, metrics['forget_prompts']))} -> "
        f"{metrics['anchor_prompt']!r}",
        "",
        f"{metrics['steps']} steps, {metrics['train_seconds']:.1f} s (mask set-up "
        f"{metrics['setup_seconds']:.2f} s), updated fraction {metrics['updated_fraction']:.3f} of "
        f"{metrics['generator_parameters']:,} generator weights; per step: "
        + ", ".join(f"{k} {1000 * v:.1f} ms" for k, v in metrics["per_step_seconds"].items()),
    ]
    if metrics["final"] is not None:
        lines += [
            "",
            "| prompt group | prompt | labelled as its class, before | after |",
            "|---|---|---:|---:|",
        ]
        for group, res in metrics["final"].items():
            before = metrics["initial"][group]
            for text, acc in res["per_prompt"].items():
                lines.append(
                    f"| {group} | {text} | {100 * before['per_prompt'][text]:.1f}% | {100 * acc:.1f}% |"
                )
            lines.append(f"| {group} | (mean) | {100 * before['mean']:.1f}% | {100 * res['mean']:.1f}% |")
    return "\n".join(lines) + "\n"


def write_results(out: Path, result: dict[str, Any], d: ConceptDistiller) -> None:
    from . import atomic, plots, runs

    with atomic.folder(out / "generator") as stage:
        d.eval_generator.net.unet.save_pretrained(stage, safe_serialization=True)
    with atomic.folder(out / "scheduler") as stage:
        d.schedule.scheduler.save_pretrained(stage)
    runs.write_json(out / "metrics.json", result["metrics"])
    runs.write_json(out / "history.json", {"train": result["history"]})
    prompts = tuple(p[:28] for p in d.cfg.grid_prompts)
    labels = torch.arange(len(prompts)).repeat_interleave(d.cfg.samples)
    columns = min(10, d.cfg.samples)
    plots.sample_grid(
        out / "samples_before.png", result["before"], labels, prompts, "before unlearning", columns
    )
    title = f"{d.cfg.method} after {d.step} steps"
    plots.sample_grid(out / "samples_after.png", result["after"], labels, prompts, title, columns)
    atomic.write_text(out / "summary.md", summary(result["metrics"]))


def run_concept(args: argparse.Namespace, argv: list[str], make_config) -> int:
    """``unlearn`` on a text-conditioned pipeline: a new run in ``--out`` or ``--resume OUT``; under
    torchrun with ``--distributed``, every rank trains and only rank 0 writes."""
    from ..cli import _threads, run_distributed
    from . import runs

    recorded = None
    if args.resume is not None:
        out = Path(args.resume)
        if args.out is not None and Path(args.out) != out:
            raise ValueError("--resume OUT continues the run in OUT; give no other --out")
        recorded = runs.read_run(out)
        if recorded.get("recipe") != "concept" or not isinstance(recorded.get("concept_config"), dict):
            raise ValueError(f"{out}/run.json is not a concept-forgetting run")
        if recorded.get("status") == "done":
            raise ValueError(f"the run in {out} is finished; nothing to resume")
        config = ConceptConfig(**recorded["concept_config"])
        if config.distributed:
            raise ValueError("--distributed runs keep no checkpoints: they cannot be resumed")
        threads = recorded.get("threads")
    else:
        if args.out is None:
            raise ValueError("--out OUT (a new folder) is required, or --resume OUT to continue a run")
        out = Path(args.out)
        config = make_config(args)
        threads = args.threads
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    _threads(threads)
    if config.model is None:
        raise ValueError("--model PIPELINE_DIR is required (a local StableDiffusionPipeline folder)")
    info = inspect_pipeline(config.model)
    from .nets import load_schedule
    from .text import _ScheduleWhere

    config.validate(load_schedule(_ScheduleWhere(info.path)).steps)
    if recorded is None:
        runs.check_out(out)  # before loading anything large: never overwrite another run
    if not config.distributed:
        return _run(args, argv, config, info, out, recorded)
    device = run_device(config)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    return run_distributed(lambda lead: _run(args, argv, config, info, out, None, lead=lead), backend)


def _run(args, argv, config: ConceptConfig, info, out: Path, recorded: dict | None, lead: bool = True) -> int:
    """The run itself, once every option is checked; a non-lead rank (``lead`` False) trains its part
    and writes nothing."""
    from ..cli import RunStatus, _StopFlag, train_resumably
    from . import runs
    from .trainer import check_backend

    pipe = load_pipeline(info.path)
    classifier = _classifier(config, pipe)
    check_backend(config.backend)
    if not lead:
        d = ConceptDistiller(config, pipe, classifier)
        d.setup()
        d.train()
        d.finish()
        return 0
    checkpoints_on = not config.distributed
    lock = runs.resume_lock(out) if recorded is not None else runs.create_out(out)
    with lock, _StopFlag() as stop:
        record = recorded or {
            "recipe": "concept",
            "command": "python -m pecker_kernels unlearn " + shlex.join(argv),
            "concept_config": asdict(config),
            "threads": torch.get_num_threads(),
            "model": info.to_json(),
            "schedule": pipe.schedule.config,
            "generator": generator_record(config, pipe),
        }
        with RunStatus(out, record) as status:
            d = ConceptDistiller(config, pipe, classifier)

            def postfix(lp: float, lg: float) -> dict:
                return dict(loss_p=f"{lp:.3f}", loss_g=f"{lg:.3f}")

            train_resumably(d, out if checkpoints_on else None, config, stop, postfix, not args.no_progress)
            result = d.finish()
            write_results(out, result, d)
            runs.remove_checkpoint(out)
    if status.exit_code is not None:
        return status.exit_code
    print((out / "summary.md").read_text())
    print(f"results in {out}")
    return 0


def sample(run: Path, prompt: str, n: int, seed: int, out: Path, tensor: Path | None = None) -> Tensor:
    """``n`` one-step samples of ``prompt`` from a finished concept run's generator, decoded by the
    pipeline's VAE, as a PNG grid (and optionally a tensor file)."""
    from . import atomic, plots, runs
    from .diffusion import Schedule
    from .text import load_prompt_encoder, load_unet, load_vae

    record = runs.read_run(run)
    if record.get("recipe") != "concept":
        raise ValueError(f"{run} is a class-forgetting run: sample it with --class C")
    g = record["generator"]
    folder = Path(run) / g["folder"]
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} holds no generator yet (run status: {record.get('status')})")
    if n < 1:
        raise ValueError(f"-n must be >= 1, got {n}")
    pipeline = Path(g["pipeline"])
    info = inspect_pipeline(pipeline)
    schedule = Schedule.from_config(record["schedule"])
    net = TextEpsNet(load_unet(folder).float().eval(), schedule)
    generator = OneStepGenerator(net, schedule, g["t_init"])
    prompts = load_prompt_encoder(pipeline)
    vae = load_vae(pipeline) if info.has_vae else None
    decoder = TextPipeline(info, net, schedule, prompts, vae)
    z = torch.randn((n, *g["latent_shape"]), generator=torch.Generator().manual_seed(seed))
    states = prompts([prompt])
    with torch.no_grad():
        images = torch.cat([decoder.decode(generator(c, states.expand(len(c), -1, -1))) for c in z.split(64)])
    columns = min(n, 10)
    rows = math.ceil(n / columns)
    plots.sample_grid(
        Path(out), images, torch.arange(n) // columns, ("",) * rows, f"{prompt!r} (one step)", columns=columns
    )
    if tensor is not None:
        atomic.write_file(Path(tensor), lambda tmp: torch.save(images, tmp))
    return images


__all__ = [
    "ConceptConfig",
    "ConceptDistiller",
    "NonFiniteLossError",
    "config_from_args",
    "run_concept",
    "sample",
]
