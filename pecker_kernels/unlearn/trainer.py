"""The unlearning loop: score-forgetting distillation of a class-conditional DDPM teacher into a one-step
generator, with the generator's updates masked to its most salient parameters (``pecker``) or not masked
(``sfd``).

One iteration (the recipe, docs/RECIPE.md): (1) the pseudo-score network learns the score of the
generator's current samples (noise-prediction MSE, forget-class rows weighted ``forget_weight``, clip by
value, Adam); (2) the generator takes the score-identity distillation loss (alpha = 1.2) in which the
forget-class rows ask the teacher about the override class; (3) the masked, clipped Adam step and EMA
of the generator (``SalientAdam``). The saliency mask is one-shot (SalUn: |summed forget-loss
gradient|, top ``ratio``) or reselected every ``refresh_every`` steps.

A run can be checkpointed (``state_dict``) and resumed (``load_state_dict``) bit-identically on the CPU.
"""

from __future__ import annotations

import copy
import math
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
from .data import LOADERS, Dataset, load_dataset
from .diffusion import OneStepGenerator, Schedule
from .losses import WEIGHTINGS, denoising_loss, pixel_reduction, row_coefficients, sid_loss
from .metrics import classify, evaluate
from .nets import EpsNet, ModelInfo, inspect_model, load_model, load_schedule

METHODS = ("pecker", "sfd")
SCORES = ("grad", "grad_weight")
INITS = ("distilled", "teacher")
# SFD's coefficient of the forgetting terms, and the project's first (pooled-batch) weight.
FORGET_WEIGHT = {"sfd": 0.01, "pooled": 1.0}

# The command-line option of each config field: error messages name what the user typed.
OPTION = {
    "lr_generator": "--lr",
    "lr_pseudo": "--lr-pseudo",
    "model": "--model",
}


def option(name: str) -> str:
    return OPTION.get(name, "--" + name.replace("_", "-"))


class NonFiniteLossError(ValueError):
    """A loss became NaN or infinite: the run stops instead of skipping the step."""


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
    # How the losses are normalised (losses.row_coefficients): "sfd" as SFD's code (pseudo-score squared
    # error summed over pixels; each forgetting term a mean over its own forget-class batch, times
    # forget_weight) or "pooled" (the project's first weighting: one mean over the pooled batch, the
    # pseudo-score error averaged over pixels).
    weighting: str = "sfd"
    # Coefficient of the forgetting terms in both losses; None: 0.01 (SFD's) under "sfd", 1.0 under
    # "pooled".
    forget_weight: float | None = None
    t_init: int = 440
    t_min: int = 38
    t_max: int = 712
    clip_value: float = 1.0
    ema: float = 0.95  # SFD: 0.9999 over 50k+ steps; a few hundred steps need a shorter average
    ratio: float = 0.5
    score: str = "grad"  # saliency score: |g| ("grad") or |g * w| ("grad_weight")
    refresh_every: int = 0  # 0: one-shot SalUn-style mask; K: reselect every K steps from that step's grad
    mask_batches: int = 8  # forget-loss batches accumulated for the one-shot mask
    backend: str = "auto"
    seed: int = 0
    eval_every: int = 5
    eval_samples: int = 200  # forget-class samples per evaluation during training
    final_samples: int = 100  # per class, for the final metrics
    target: float = 0.05  # forgetting accuracy that counts as forgotten
    teacher_ddim_steps: int = 50  # DDIM steps of the teacher's reference samples
    # A local diffusers folder (model or pipeline); None: the packaged teacher of the data set.
    model: str | None = None
    # Where the generator starts: "distilled" (a one-step generator distilled from the teacher without
    # forgetting, stage 1: the packaged one for the packaged teacher), "teacher" (the teacher's weights:
    # distillation and forgetting in one stage), or a folder written by train-generator. None: distilled
    # when one ships for the model, else teacher.
    init: str | None = None
    # Stage 1: SiD distillation of every class, no forgetting term, no mask (train-generator).
    distill: bool = False
    null_class: bool = False  # the model's last class embedding is a null (unconditional) label
    classifier: str | None = None  # None: the packaged classifier when the model fits its data
    checkpoint_every: int = 100  # steps between checkpoints of a run folder; 0: only on interrupt
    # Under torchrun: the generator and pseudo-score are sharded with FSDP2 and every rank draws its
    # own samples (the global batch is world_size x batch); the saliency mask is one global top-k.
    distributed: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def validate_options(self) -> None:
        """Everything that can be checked without the model: ValueError naming the option. Resolves
        ``forget_weight`` from ``weighting`` when it is None."""
        if self.weighting not in WEIGHTINGS:
            raise ValueError(
                f"unknown --weighting {self.weighting!r}; expected one of: {', '.join(WEIGHTINGS)}"
            )
        if self.forget_weight is None:
            self.forget_weight = FORGET_WEIGHT[self.weighting]
        if self.score not in SCORES:
            raise ValueError(f"unknown --score {self.score!r}; expected one of: {', '.join(SCORES)}")
        if self.distill and self.method != "sfd":
            raise ValueError("stage-1 distillation (distill) updates every weight: method must be 'sfd'")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; expected one of: {', '.join(METHODS)}")
        if self.dataset not in LOADERS:
            raise ValueError(f"unknown dataset {self.dataset!r}; expected one of: {', '.join(LOADERS)}")
        ints = ("steps", "batch", "forget_batch", "eval_every", "eval_samples", "mask_batches")
        for name in (*ints, "teacher_ddim_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{option(name)} must be an integer >= 1, got {value!r}")
        for name in ("refresh_every", "checkpoint_every", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{option(name)} must be an integer >= 0, got {value!r}")
        if self.seed >= 2**63:  # torch's generators take a signed 64-bit seed
            raise ValueError(f"--seed must be below 2**63, got {self.seed}")
        if self.final_samples < 2:
            raise ValueError(
                f"--final-samples must be >= 2 (Frechet needs a covariance), got {self.final_samples}"
            )
        floats = {
            "lr_generator": "> 0",
            "lr_pseudo": "> 0",
            "clip_value": "> 0",
            "forget_weight": ">= 0",
            "alpha": "any",
            "ema": "[0, 1)",
            "ratio": "(0, 1]",
            "target": "(0, 1)",
        }
        for name, allowed in floats.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"{option(name)} must be a finite number, got {value!r}")
            ok = {
                "> 0": value > 0,
                ">= 0": value >= 0,
                "any": True,
                "[0, 1)": 0 <= value < 1,
                "(0, 1]": 0 < value <= 1,
                "(0, 1)": 0 < value < 1,
            }[allowed]
            if not ok:
                where = allowed if allowed[0] in "<>" else f"in {allowed}"
                raise ValueError(f"{option(name)} must be {where}, got {value}")
        if isinstance(self.forget, bool) or not isinstance(self.forget, int):
            raise ValueError(f"forget class must be an integer, got {self.forget!r}")
        if self.override is not None and self.override != "random":
            if isinstance(self.override, bool) or not isinstance(self.override, int):
                raise ValueError(f"override must be a class index or 'random', got {self.override!r}")

    def validate(self, num_classes: int, timesteps: int = 1000) -> None:
        """Raise ValueError on anything that cannot run; called before any work or output."""
        self.validate_options()
        if num_classes < 2:
            raise ValueError(
                f"the model has {num_classes} class(es) to sample; forgetting one needs at least 2"
            )
        if self.teacher_ddim_steps > timesteps:
            raise ValueError(
                f"--teacher-ddim-steps must be <= the schedule's {timesteps} steps, "
                f"got {self.teacher_ddim_steps}"
            )
        if (
            isinstance(self.forget, bool)
            or not isinstance(self.forget, int)
            or not 0 <= self.forget < num_classes
        ):
            raise ValueError(f"forget class must be an integer in [0, {num_classes}), got {self.forget!r}")
        if self.override is not None and self.override != "random":
            if not 0 <= self.override < num_classes:
                raise ValueError(f"override class must be in [0, {num_classes}), got {self.override}")
            if self.override == self.forget:
                raise ValueError(
                    f"override class {self.override} equals the forget class: the forgotten class's score "
                    "must be replaced by another class's"
                )
        if not 0 <= self.t_min < self.t_max <= timesteps or not 0 <= self.t_init < timesteps:
            raise ValueError(f"need 0 <= t_min < t_max <= {timesteps} and 0 <= t_init < {timesteps}")

    def override_class(self) -> int | None:
        return None if self.override == "random" else self.override


@dataclass
class Context:
    """What the runs of one invocation share: the frozen teacher, its schedule, and (when a classifier
    of the model's data is available) the classifier, the data and its real features."""

    teacher: EpsNet
    schedule: Schedule
    info: ModelInfo
    class_names: tuple[str, ...]
    classifier: nn.Module | None = None
    data: Dataset | None = None
    real_features: dict[int, Tensor] | None = None
    classifier_path: Path | None = None
    metrics_note: str | None = None  # why there are no metrics, when there are none
    start: EpsNet | None = None  # the generator's starting network; None: the teacher's weights
    start_path: Path | None = None

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.info.shape

    @property
    def model_path(self) -> Path:
        return self.info.path


def model_path(config: UnlearnConfig) -> Path:
    """``config.model``, or the packaged teacher of ``config.dataset`` (ValueError when none ships)."""
    if config.model:
        return Path(config.model)
    path = checkpoints.default_path(config.dataset, "teacher")
    if not path.is_dir():
        raise ValueError(
            f"no packaged teacher for {config.dataset!r}; pass --model DIR (a diffusers folder) or train "
            f"one: python -m pecker_kernels train-teacher --dataset {config.dataset} --out DIR"
        )
    return path


def _classifier(config: UnlearnConfig, info: ModelInfo) -> tuple[Path | None, str | None]:
    """The classifier checkpoint to use (None: metrics off) and, when off, why."""
    shape = f"{info.channels}x{info.image_size}x{info.image_size}, {info.num_classes} classes"
    if config.classifier:
        path = Path(config.classifier)
        blob = checkpoints.read_config(path, "classifier")
        c = blob["config"]
        got = (c.get("channels", 1), c.get("image_size"), c.get("num_classes"))
        if got != (info.channels, info.image_size, info.num_classes):
            raise ValueError(
                f"--classifier {path} classifies {got[0]}x{got[1]}x{got[1]} images into {got[2]} classes; "
                f"the model makes {shape}"
            )
        return path, None
    path = checkpoints.default_path(config.dataset, "classifier")
    note = (
        f"no classifier for this model's data ({shape}): no accuracies or Frechet distances, only "
        "losses and sample grids; pass --classifier PATH (python -m pecker_kernels train-classifier)"
    )
    if not path.is_file():
        return None, note
    c = checkpoints.read_config(path, "classifier")["config"]
    if (c.get("channels", 1), c.get("image_size"), c.get("num_classes")) != (
        info.channels,
        info.image_size,
        info.num_classes,
    ):
        return None, note
    return path, None


def prepare(config: UnlearnConfig) -> Context:
    """Check every option, the model folder and the classifier, then load them (ValueError on anything
    that does not fit): all of it before any training or output."""
    config.validate_options()
    info = inspect_model(model_path(config), config.null_class)
    if config.override is None:
        config.override = (config.forget + 1) % info.num_classes
    schedule = load_schedule(info)
    config.validate(info.num_classes, schedule.steps)
    cpath, note = _classifier(config, info)
    data = classifier = real = None
    names = tuple(str(c) for c in range(info.num_classes))
    if cpath is not None:
        data = load_dataset(config.dataset)
        if data.num_classes != info.num_classes or tuple(data.images.shape[1:]) != info.shape:
            raise ValueError(
                f"the {config.dataset!r} data set ({data.num_classes} classes of "
                f"{'x'.join(map(str, data.images.shape[1:]))}) does not fit the model ({info.num_classes} "
                f"classes of {'x'.join(map(str, info.shape))}); pass --dataset of the model's data"
            )
        classifier = checkpoints.load(cpath, "classifier", data.name, data.image_size, data.num_classes)
        classifier.requires_grad_(False)
        _, feats = classify(classifier, data.images)
        real = {c: feats[data.labels == c] for c in range(data.num_classes)}
        names = data.class_names
    teacher, schedule, info = load_model(info.path, config.null_class)
    start, start_path = load_start(config, teacher, info)
    check_backend(config.backend)
    return Context(teacher, schedule, info, names, classifier, data, real, cpath, note, start, start_path)


def start_path(config: UnlearnConfig) -> Path | None:
    """The folder of the distilled generator ``config.init`` names (None: start from the teacher);
    resolves ``init=None`` to "distilled" when one ships for the model, else "teacher"."""
    packaged = checkpoints.default_path(config.dataset, "generator")
    own_teacher = config.model is None
    if config.init is None:
        config.init = "distilled" if own_teacher and packaged.is_dir() else "teacher"
    if config.init == "teacher":
        return None
    if config.init == "distilled":
        if not own_teacher or not packaged.is_dir():
            raise ValueError(
                "--init distilled: no distilled generator ships for this model; train one with "
                "python -m pecker_kernels train-generator --model DIR --out GEN and pass --init GEN, or "
                "start from the teacher with --init teacher"
            )
        return packaged
    path = Path(config.init)
    if not path.is_dir():
        raise ValueError(f"--init must be distilled, teacher or a generator folder; {path} is not a folder")
    return path


def load_start(config: UnlearnConfig, teacher: EpsNet, info: ModelInfo) -> tuple[EpsNet | None, Path | None]:
    """The distilled generator's network (same architecture as the teacher; distilled at the same
    t_init), or (None, None) for a start from the teacher."""
    path = start_path(config)
    if path is None:
        return None, None
    record_file = path / "record.json"
    if record_file.is_file():
        import json

        t_init = json.loads(record_file.read_text()).get("t_init")
        if t_init is not None and t_init != config.t_init:
            raise ValueError(
                f"--init {path}: that generator was distilled at t_init {t_init}; this run uses --t-init "
                f"{config.t_init}"
            )
    net, _, start_info = load_model(path, config.null_class)
    if start_info.class_name != info.class_name or start_info.shape != info.shape:
        raise ValueError(
            f"--init {path} is a {start_info.class_name} of {start_info.shape}; the teacher is not"
        )
    try:
        copy.deepcopy(teacher).load_state_dict(net.state_dict())
    except RuntimeError as e:
        raise ValueError(f"--init {path} does not have the teacher's architecture: {e}") from e
    net.schedule = teacher.schedule
    return net, path


def check_backend(backend: str) -> None:
    """ValueError now, not at the first step, when the optimizer cannot run on ``backend`` here."""
    probe = nn.Parameter(torch.zeros(4))
    try:
        SalientAdam([probe], lr=1e-3, backend=backend)
    except (ValueError, RuntimeError, TypeError) as e:
        raise ValueError(f"--backend {backend}: {e}") from e


class _Timer:
    """Accumulates wall seconds per phase (after the GPU's queued work, where there is a GPU)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def add(self, name: str, start: float) -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - start
        return now


def shard(*modules: nn.Module) -> None:
    """FSDP2 over each module (under --distributed): its parameters become DTensor shards, so the
    saliency mask and the optimizer span every rank's."""
    from torch.distributed.fsdp import fully_shard

    for module in modules:
        fully_shard(module)


class DistillerParts:
    """What the class and the concept distillers share: the mask before training, the EMA weights of the
    evaluation generator, the updated fraction, and the part of a checkpoint common to both. A subclass
    sets ``cfg``, ``rank``, ``gen`` (the loop's random stream), ``generator``, ``pseudo``,
    ``eval_generator``, ``gen_params``, ``opt_g``, ``opt_p``, ``step``, ``history``, ``timer``,
    ``setup_seconds``, ``train_seconds``, ``initial`` and ``before``, and defines ``forget_loss()``."""

    # What a non-finite loss's error names to check (the options that make a loss overflow).
    LOSS_OPTIONS = "--lr, --lr-pseudo, --alpha, --forget-weight"
    # Whether a non-finite loss skips its step instead of stopping the run (fp16's GradScaler).
    skips_non_finite = False

    def forget_loss(self) -> Tensor:
        """One batch's forgetting loss (forget rows only), ready for ``backward()``: what scores saliency."""
        raise NotImplementedError

    def finite_loss(self, loss: Tensor, what: str) -> float:
        """The loss's value; NonFiniteLossError when it is NaN or infinite (unless ``skips_non_finite``)."""
        value = float(loss.detach())
        if not math.isfinite(value) and not self.skips_non_finite:
            raise NonFiniteLossError(
                f"step {self.step + 1}: the {what} loss is {value} (not finite); the run stopped rather "
                f"than skip the step (check {self.LOSS_OPTIONS})"
            )
        return value

    def one_shot_mask(self) -> None:
        """SalUn: |sum over forget batches of the (norm-1 clipped) forgetting-loss gradient|, top ratio.
        Sharded (--distributed): each rank sums its shards, clipped by the norm over every rank's."""
        acc = SaliencyAccumulator(self.gen_params, clip_norm=1.0)  # shards: clipped by every rank's norm
        # Its own random stream: pecker and sfd then train on the very same noise, labels and times.
        stream = self.cfg.seed + 3 + 7919 * self.rank
        train_stream, self.gen = self.gen, torch.Generator().manual_seed(stream)
        self.pseudo.requires_grad_(False)
        for _ in range(self.cfg.mask_batches):
            self.opt_g.zero_grad(set_to_none=True)
            self.forget_loss().backward()
            acc.accumulate()
        self.pseudo.requires_grad_(True)
        self.gen = train_stream
        self.opt_g.compute_mask(acc.gradients())  # sharded: one global selection over every rank's sums
        self.opt_g.zero_grad(set_to_none=True)

    def set_up_mask(self) -> float:
        """The mask before training: one-shot (pecker without reselection), every weight (sfd), or none
        yet (pecker reselecting: its first step selects). Returns the seconds it took."""
        start = time.perf_counter()
        if self.cfg.method == "pecker" and self.cfg.refresh_every == 0:
            self.one_shot_mask()
        elif self.cfg.method == "sfd":
            self.opt_g.set_masks([torch.ones_like(p, dtype=torch.bool) for p in self.gen_params])
        return time.perf_counter() - start

    @torch.no_grad()
    def _load_ema(self) -> None:
        for p, e in zip(self.eval_generator.net.parameters(), self.opt_g.ema_parameters(), strict=True):
            p.copy_(_full(e))

    def updated_fraction(self) -> float:
        """The fraction of the generator's weights its mask updates (over every rank's shards)."""
        selected = sum(int(_full(m).sum()) for m in self.opt_g.masks())
        return float(selected / sum(p.numel() for p in self.gen_params))

    def training_state(self) -> dict[str, Any]:
        """The checkpoint's common part: both networks, both optimizers (the generator's with its masks
        and EMA), the loop's and torch's random states, the step, the history, the time so far, the
        start's samples and metrics, and the options."""
        if self.cfg.distributed:
            raise ValueError("checkpoints of --distributed runs are not supported")
        return {
            "step": self.step,
            "generator": {k: v.detach().clone() for k, v in self.generator.net.state_dict().items()},
            "pseudo": {k: v.detach().clone() for k, v in self.pseudo.state_dict().items()},
            "opt_g": copy.deepcopy(self.opt_g.state_dict()),
            "opt_p": copy.deepcopy(self.opt_p.state_dict()),
            "rng": {"loop": self.gen.get_state(), "torch": torch.get_rng_state()},
            "history": copy.deepcopy(self.history),
            "progress": {
                "timer": dict(self.timer.seconds),
                "setup_seconds": self.setup_seconds,
                "train_seconds": self.train_seconds,
            },
            "initial": self.initial,
            "before": self.before,
            "config": asdict(self.cfg),
        }

    def load_training_state(self, state: dict[str, Any]) -> None:
        """Continue from ``training_state()``'s part of a checkpoint."""
        self.generator.net.load_state_dict(state["generator"])
        self.pseudo.load_state_dict(state["pseudo"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_p.load_state_dict(state["opt_p"])
        self.gen.set_state(state["rng"]["loop"])
        torch.set_rng_state(state["rng"]["torch"])
        self.step = int(state["step"])
        self.history = state["history"]
        progress = state["progress"]
        self.timer.seconds = dict(progress["timer"])
        self.setup_seconds = progress["setup_seconds"]
        self.train_seconds = progress["train_seconds"]
        self.initial, self.before = state["initial"], state["before"]


class Distiller(DistillerParts):
    """One unlearning run: ``setup()`` (initial metrics, the one-shot mask), ``train()`` (resumable; a
    checkpoint is ``state_dict()``), ``finish()`` (final metrics). ``run()`` does all three."""

    def __init__(self, config: UnlearnConfig, ctx: Context) -> None:
        self.cfg, self.ctx = config, ctx
        self.num_classes = ctx.num_classes
        self.shape = tuple(ctx.shape)
        # Stage 1 (distill) draws every class; unlearning every class but the forgotten one.
        self.remaining = torch.tensor(
            [c for c in range(self.num_classes) if config.distill or c != config.forget]
        )
        self.schedule = ctx.schedule
        torch.manual_seed(config.seed)
        self.rank = torch.distributed.get_rank() if config.distributed else 0
        # All sampling in the loop draws from it; each rank draws its own part of the global batch.
        self.gen = torch.Generator().manual_seed(config.seed + 7919 * self.rank)
        self.teacher = ctx.teacher
        start = ctx.start if ctx.start is not None else ctx.teacher
        self.generator = OneStepGenerator(
            copy.deepcopy(start).requires_grad_(True), self.schedule, config.t_init
        )
        self.pseudo = copy.deepcopy(ctx.teacher).requires_grad_(True)
        if config.distributed:
            shard(self.generator.net, self.pseudo)
        self.eval_generator = OneStepGenerator(copy.deepcopy(start), self.schedule, config.t_init)
        self.gen_params = list(self.generator.net.parameters())
        self.opt_g = SalientAdam(
            self.gen_params,
            lr=config.lr_generator,
            betas=(0.0, 0.999),
            eps=1e-8,
            ratio=config.ratio if config.method == "pecker" else 1.0,
            score=config.score,
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
        # Progress: what a checkpoint holds besides the networks and optimizers.
        self.step = 0
        self.timer = _Timer()
        self.history: dict[str, list] = {"step": [], "loss_pseudo": [], "loss_generator": []}
        self.evals: dict[str, list] = {
            "step": [],
            "train_seconds": [],
            "forget_accuracy": [],
            "retain_accuracy": [],
        }
        self.setup_seconds = self.train_seconds = self.loop_seconds = 0.0
        self.steps_to_forget: int | None = None
        self.time_to_forget: float | None = None
        self.initial: dict[str, Any] | None = None
        self.before: Tensor | None = None
        self.last_forget_accuracy = float("nan")

    @property
    def has_metrics(self) -> bool:
        return self.ctx.classifier is not None

    # ---- sampling helpers ------------------------------------------------------------------------

    def _labels(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(labels for G and the pseudo-score, teacher labels, forget mask, per-row loss coefficients:
        ``losses.row_coefficients``, a loss is the sum of coefficient x per-sample loss)."""
        cfg = self.cfg
        pick = torch.randint(0, len(self.remaining), (cfg.batch,), generator=self.gen)
        retain = self.remaining[pick]
        if cfg.distill:  # stage 1: every class, no forgetting rows
            none = torch.zeros(cfg.batch, dtype=torch.bool)
            return retain, retain, none, row_coefficients(none, 0.0, cfg.weighting)
        forget = torch.full((cfg.forget_batch,), cfg.forget)
        if cfg.override_class() is None:  # random override: any class but the forgotten one
            o = self.remaining[torch.randint(0, len(self.remaining), (cfg.forget_batch,), generator=self.gen)]
        else:
            o = torch.full((cfg.forget_batch,), cfg.override_class())
        labels = torch.cat([retain, forget])
        is_forget = labels == cfg.forget
        coefficients = row_coefficients(is_forget, cfg.forget_weight, cfg.weighting)
        return labels, torch.cat([retain, o]), is_forget, coefficients

    def _noise(self, n: int) -> Tensor:
        return torch.randn((n, *self.shape), generator=self.gen)

    def _times(self, n: int) -> Tensor:
        return torch.randint(self.cfg.t_min, self.cfg.t_max, (n,), generator=self.gen)

    # ---- the two losses --------------------------------------------------------------------------

    def pseudo_loss(self, labels: Tensor, coefficients: Tensor) -> Tensor:
        with torch.no_grad():
            x0 = self.generator(self._noise(len(labels)), labels)
        t, eps = self._times(len(labels)), self._noise(len(labels))
        pred = self.pseudo(self.schedule.q_sample(x0, t, eps), t, labels)
        return (denoising_loss(pred, eps, pixel_reduction(self.cfg.weighting)) * coefficients).sum()

    def generator_loss(self, labels: Tensor, teacher_labels: Tensor, coefficients: Tensor) -> Tensor:
        """SiD loss (summed over pixels); the forget rows ask the teacher about the override class
        (teacher_labels)."""
        x0 = self.generator(self._noise(len(labels)), labels)
        t, eps = self._times(len(labels)), self._noise(len(labels))
        xt = self.schedule.q_sample(x0, t, eps)
        f_teacher = self.schedule.x0_from_eps(xt, t, self.teacher(xt, t, teacher_labels))
        f_pseudo = self.schedule.x0_from_eps(xt, t, self.pseudo(xt, t, labels))
        return (sid_loss(x0, f_teacher, f_pseudo, self.cfg.alpha) * coefficients).sum()

    def forget_loss(self) -> Tensor:
        """The forgetting term alone (forget-class rows), the loss that defines one-shot saliency."""
        cfg = self.cfg
        labels, teacher_labels, _, _ = self._labels()
        rows = slice(cfg.batch, None)
        mean = torch.full((cfg.forget_batch,), 1.0 / cfg.forget_batch)
        return self.generator_loss(labels[rows], teacher_labels[rows], mean)

    # ---- evaluation ------------------------------------------------------------------------------

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

    def _evaluate(self, samples: Tensor) -> dict[str, Any]:
        if not self.has_metrics:
            return {
                "forget_accuracy": None,
                "retain_accuracy": None,
                "per_class_accuracy": None,
                "frechet": None,
                "note": self.ctx.metrics_note,
            }
        ctx = self.ctx
        return evaluate(
            ctx.classifier, samples, self.final_labels, ctx.real_features, self.cfg.forget, self.num_classes
        )

    def _record_eval(self) -> None:
        if not self.has_metrics:
            return
        t0 = time.perf_counter()
        fa, ra = self._quick_eval()
        self.timer.add("eval", t0)
        self.evals["step"].append(self.step)
        self.evals["train_seconds"].append(self.train_seconds)
        self.evals["forget_accuracy"].append(fa)
        self.evals["retain_accuracy"].append(ra)
        if self.steps_to_forget is None and fa < self.cfg.target:
            self.steps_to_forget, self.time_to_forget = self.step, self.train_seconds
        self.last_forget_accuracy = fa

    # ---- the loop --------------------------------------------------------------------------------

    def setup(self) -> None:
        """The generator's metrics before unlearning, the mask (one-shot pecker; all-ones sfd) and the
        evaluation at step 0."""
        self.before = self.final_samples()
        self.initial = self._evaluate(self.before)
        self.setup_seconds = self.set_up_mask()
        # What time-to-forget counts: setup + training steps, no evaluation.
        self.train_seconds = self.setup_seconds
        self._record_eval()

    def train_step(self) -> None:
        cfg, timer = self.cfg, self.timer
        t0 = time.perf_counter()
        labels, teacher_labels, _, weights = self._labels()
        # 1. pseudo-score: learn the score of the generator's current samples.
        loss_p = self.pseudo_loss(labels, weights)
        lp = self.finite_loss(loss_p, "pseudo-score")
        self.opt_p.zero_grad(set_to_none=True)
        loss_p.backward()
        t1 = timer.add("forward_backward", t0)
        nn.utils.clip_grad_value_(self.pseudo.parameters(), cfg.clip_value)
        self.opt_p.step()
        t2 = timer.add("pseudo_update", t1)
        # 2. generator: SiD loss + forgetting term; no gradient into teacher or pseudo-score weights.
        self.pseudo.requires_grad_(False)
        loss_g = self.generator_loss(labels, teacher_labels, weights)
        lg = self.finite_loss(loss_g, "generator")
        self.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        self.pseudo.requires_grad_(True)
        t3 = timer.add("forward_backward", t2)
        # 3. saliency mask (pecker with a refresh schedule), then the masked, clipped Adam step + EMA.
        if cfg.method == "pecker" and cfg.refresh_every > 0 and self.step % cfg.refresh_every == 0:
            self.opt_g.compute_mask()
            t3 = timer.add("mask", t3)
        self.opt_g.step()
        timer.add("update", t3)
        elapsed = time.perf_counter() - t0
        self.train_seconds += elapsed
        self.step += 1
        self.history["step"].append(self.step)
        self.history["loss_pseudo"].append(lp)
        self.history["loss_generator"].append(lg)
        if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
            self._record_eval()

    def train(
        self,
        on_step: Callable[[int, dict[str, float]], None] | None = None,
        after_step: Callable[[Distiller], None] | None = None,
    ) -> None:
        """Steps from the current one to ``cfg.steps``; ``after_step`` runs after each (checkpoints,
        interruption)."""
        while self.step < self.cfg.steps:
            t0 = time.perf_counter()
            self.train_step()
            self.loop_seconds += time.perf_counter() - t0  # evaluation included: the wall clock
            if on_step is not None:
                on_step(
                    self.step,
                    {
                        "loss_p": self.history["loss_pseudo"][-1],
                        "loss_g": self.history["loss_generator"][-1],
                        "forget_acc": self.last_forget_accuracy,
                    },
                )
            if after_step is not None:
                after_step(self)

    def finish(self) -> dict[str, Any]:
        """Final metrics of the EMA generator; returns the result dict (metrics, history, evals, before
        and after samples)."""
        cfg = self.cfg
        after = self.final_samples()
        final = self._evaluate(after)
        per_step = {k: v / max(1, self.step) for k, v in self.timer.seconds.items() if k != "eval"}
        metrics = {
            "method": cfg.method,
            "forget_class": cfg.forget,
            "override_class": cfg.override,
            **{k: final[k] for k in ("forget_accuracy", "retain_accuracy", "frechet", "per_class_accuracy")},
            "metrics_note": self.ctx.metrics_note,
            "steps": cfg.steps,
            "wall_seconds": self.setup_seconds + self.loop_seconds,
            "train_seconds": self.train_seconds,
            "setup_seconds": self.setup_seconds,
            "eval_seconds": self.timer.seconds.get("eval", 0.0),
            "steps_to_forget": self.steps_to_forget,
            "time_to_forget_seconds": self.time_to_forget,
            "target": cfg.target,
            "per_step_seconds": per_step,
            "updated_fraction": self.updated_fraction(),
            "generator_parameters": sum(p.numel() for p in self.gen_params),
            "initial": self.initial,
            "config": asdict(cfg),
            "model": self.ctx.info.to_json(),
            "init": cfg.init,
            "init_path": None if self.ctx.start_path is None else str(self.ctx.start_path),
            "classifier_checkpoint": None
            if self.ctx.classifier_path is None
            else str(self.ctx.classifier_path),
            "threads": torch.get_num_threads(),
            "world_size": torch.distributed.get_world_size() if cfg.distributed else 1,
        }
        return {
            "metrics": metrics,
            "history": self.history,
            "evals": self.evals,
            "before": self.before,
            "after": after,
        }

    def run(self, on_step: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, Any]:
        self.setup()
        self.train(on_step)
        return self.finish()

    # ---- checkpoints -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything the loop needs to continue bit-identically: both networks, both optimizers (the
        generator's with its masks and EMA), every random state, the step and the history."""
        state = self.training_state()
        state["evals"] = copy.deepcopy(self.evals)
        state["progress"].update(
            loop_seconds=self.loop_seconds,
            steps_to_forget=self.steps_to_forget,
            time_to_forget=self.time_to_forget,
            last_forget_accuracy=self.last_forget_accuracy,
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state_dict()``: the opposite of ``setup()`` plus the steps done so far."""
        self.load_training_state(state)
        self.evals = state["evals"]
        progress = state["progress"]
        self.loop_seconds = progress["loop_seconds"]
        self.steps_to_forget = progress["steps_to_forget"]
        self.time_to_forget = progress["time_to_forget"]
        self.last_forget_accuracy = progress["last_forget_accuracy"]


def _full(t: Tensor) -> Tensor:
    """The whole tensor: a DTensor's shards gathered from every rank (a collective), else ``t``."""
    return t.full_tensor() if is_dtensor(t) else t
