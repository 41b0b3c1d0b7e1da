"""Command line: ``python -m pecker_kernels <command>`` (also installed as ``pecker``).

Commands: ``unlearn`` (class forgetting: one method, or ``--compare`` pecker against sfd; concept
forgetting on a ``StableDiffusionPipeline`` folder: ``unlearn.concept_cli``; ``--resume OUT`` continues an
interrupted run), ``demo`` (the default digits comparison), ``sample`` (draw from a run's generator),
``train-teacher`` and ``train-classifier``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

import torch


def _threads(n: int | None) -> None:
    # The networks are tiny (75k parameters, 8x8 images): a second thread buys little and, on a shared
    # 2-core machine, oversubscription made steps up to 10x slower. One thread unless asked otherwise.
    n = n or int(os.environ.get("PECKER_THREADS", "1"))
    torch.set_num_threads(max(1, n))
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set in this process
        pass


def _add_unlearn_args(p: argparse.ArgumentParser, out_required: bool = True) -> None:
    from .unlearn.trainer import UnlearnConfig

    d = UnlearnConfig()
    p.add_argument(
        "--model",
        "--teacher",
        dest="model",
        default=None,
        help="the teacher: a local diffusers folder, a model folder (config.json + weights) or a pipeline "
        "folder (model_index.json, unet/, scheduler/) (default: the packaged digits teacher)",
    )
    p.add_argument(
        "--null-class",
        action="store_true",
        help="the model's last class embedding is a null (unconditional) label: never sampled",
    )
    p.add_argument(
        "--dataset",
        default=d.dataset,
        help="the model's data, for the classifier's metrics: digits (default), mnist or fashion-mnist",
    )
    p.add_argument("--forget", type=int, default=d.forget, help="class to forget (default %(default)s)")
    p.add_argument(
        "--override",
        default=None,
        help="class whose score replaces the forgotten one: an index or 'random' (default: forget + 1)",
    )
    p.add_argument("--method", default=d.method, help="pecker (saliency-masked) or sfd (no mask)")
    p.add_argument("--compare", action="store_true", help="run pecker and sfd with the same seed and budget")
    p.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="with --compare: every variant on seeds SEED .. SEED+N-1, each with its lr chosen from "
        "--lr-grid on --tune-seed (compare.json, compare.md, pareto.png)",
    )
    p.add_argument(
        "--variants",
        default=None,
        help="with --seeds: comma-separated sfd and pecker[-r<ratio>][-k<refresh>][-gw], e.g. "
        "sfd,pecker,pecker-r0.1,pecker-k10,pecker-gw (default sfd,pecker)",
    )
    p.add_argument(
        "--lr-grid",
        default=None,
        help="with --seeds: comma-separated generator lrs to tune over (default: --lr)",
    )
    p.add_argument(
        "--tune-seed", type=int, default=None, help="with --seeds: the tuning seed (default SEED+N)"
    )
    p.add_argument(
        "--frechet-tolerance",
        type=float,
        default=0.1,
        help="with --seeds: an lr qualifies when its retained-class Frechet is within this fraction of "
        "the start's (default %(default)s)",
    )
    p.add_argument("--jobs", type=int, default=1, help="with --seeds: runs at once (one torch thread each)")
    p.add_argument(
        "--init",
        default=None,
        help="where the generator starts: distilled (stage 1, the packaged distilled generator), teacher "
        "(the teacher's weights: distil and forget at once) or a train-generator folder (default: "
        "distilled when one ships for the model, else teacher)",
    )
    p.add_argument(
        "--weighting",
        default=d.weighting,
        help="loss normalisation: sfd (SFD's: pseudo-score error summed over pixels, forgetting terms a mean "
        "over their own batch times --forget-weight) or pooled (one mean over the pooled batch, pixel mean)",
    )
    p.add_argument(
        "--score", default=d.score, help="saliency score of pecker's mask: grad (|g|) or grad_weight (|g w|)"
    )
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument(
        "--ratio", type=float, default=d.ratio, help="fraction of generator weights updated (pecker)"
    )
    p.add_argument(
        "--refresh-every",
        type=int,
        default=d.refresh_every,
        help="0: one-shot SalUn-style mask from the accumulated forget-loss gradient; K: reselect every K"
        " steps",
    )
    p.add_argument(
        "--mask-batches", type=int, default=d.mask_batches, help="forget batches for the one-shot mask"
    )
    p.add_argument("--backend", default=d.backend, help="SalientAdam backend: auto, eager, cpu, cuda, triton")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--batch", type=int, default=d.batch, help="remaining-class samples per step")
    p.add_argument("--forget-batch", type=int, default=d.forget_batch, help="forget-class samples per step")
    p.add_argument("--lr", type=float, default=d.lr_generator, help="generator learning rate")
    p.add_argument("--lr-pseudo", type=float, default=d.lr_pseudo, help="pseudo-score learning rate")
    p.add_argument(
        "--forget-weight",
        type=float,
        default=None,
        help="coefficient of the forgetting terms (default: SFD's 0.01 with --weighting sfd, 1.0 with "
        "pooled)",
    )
    p.add_argument("--alpha", type=float, default=d.alpha)
    p.add_argument(
        "--ema", type=float, default=d.ema, help="EMA decay of the generator (metrics use the EMA)"
    )
    p.add_argument("--t-init", type=int, default=d.t_init, help="the one-step generator's time step")
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--eval-samples", type=int, default=d.eval_samples)
    p.add_argument("--final-samples", type=int, default=d.final_samples, help="samples per class at the end")
    p.add_argument(
        "--target", type=float, default=d.target, help="forgetting accuracy that counts as forgotten"
    )
    p.add_argument(
        "--teacher-ddim-steps",
        type=int,
        default=d.teacher_ddim_steps,
        help="DDIM steps for the teacher's reference",
    )
    p.add_argument(
        "--classifier",
        default=None,
        help="classifier checkpoint of the model's data (default: the packaged one when the model fits it)",
    )
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=d.checkpoint_every,
        help="steps between checkpoints in OUT/checkpoint (default %(default)s; 0: only when interrupted)",
    )
    p.add_argument("--out", type=Path, required=False, help="new (or empty) folder for the results")
    p.add_argument(
        "--resume",
        type=Path,
        default=None,
        metavar="OUT",
        help="continue the interrupted run in OUT with its recorded options",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default 1, or $PECKER_THREADS)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--distributed",
        action="store_true",
        help="run under torchrun: FSDP2-sharded networks, one global mask over every rank's shards",
    )


def _config(args: argparse.Namespace, method: str):
    from .unlearn.trainer import UnlearnConfig

    override = args.override
    if override is not None and override != "random":
        try:
            override = int(override)
        except (TypeError, ValueError):
            raise ValueError(f"--override must be a class index or 'random', got {override!r}") from None
    return UnlearnConfig(
        dataset=args.dataset,
        forget=args.forget,
        override=override,
        method=method,
        steps=args.steps,
        batch=args.batch,
        forget_batch=args.forget_batch,
        lr_generator=args.lr,
        lr_pseudo=args.lr_pseudo,
        alpha=args.alpha,
        forget_weight=args.forget_weight,
        weighting=args.weighting,
        score=args.score,
        init=args.init,
        ema=args.ema,
        t_init=args.t_init,
        ratio=args.ratio,
        refresh_every=args.refresh_every,
        mask_batches=args.mask_batches,
        backend=args.backend,
        seed=args.seed,
        eval_every=args.eval_every,
        eval_samples=args.eval_samples,
        final_samples=args.final_samples,
        target=args.target,
        teacher_ddim_steps=args.teacher_ddim_steps,
        model=args.model,
        null_class=args.null_class,
        classifier=args.classifier,
        checkpoint_every=args.checkpoint_every,
        distributed=args.distributed,
    )


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; the run was checkpointed."""

    def __init__(self, signum: int, step: int) -> None:
        super().__init__(f"signal {signum} at step {step}")
        self.signum, self.step = signum, step


class _StopFlag:
    """SIGINT/SIGTERM handlers that ask the loop to checkpoint and stop after the current step; a second
    signal stops at once (KeyboardInterrupt)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._saved: dict[int, object] = {}

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        print(
            f"\nsignal {signum}: stopping with a checkpoint after the current training step (set-up and the"
            " final evaluation run to their end first); again to stop at once",
            file=sys.stderr,
        )

    def __enter__(self) -> _StopFlag:
        import signal

        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._saved[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread: no handlers, no interruption support
                pass
        return self

    def __exit__(self, *exc: object) -> None:
        import signal

        for s, handler in self._saved.items():
            signal.signal(s, handler)


def resume_command(out: Path) -> str:
    """How to continue the run in ``out``, from any directory."""
    return "python -m pecker_kernels unlearn --resume " + shlex.quote(str(Path(out).resolve()))


class RunStatus:
    """``OUT/run.json`` through a run's life: ``running`` while the block works, then ``done``,
    ``interrupted`` (with the step), or ``failed`` (with the error), each said once and the same way
    for every kind of run. ``Interrupted`` ends the block quietly: ``exit_code`` is then 128 + the
    signal; every other error is re-raised once run.json says what happened. ``kept`` says what an
    interrupted or failed run leaves to resume from."""

    def __init__(self, out: Path, record: dict, kept: str = "its checkpoint") -> None:
        from .unlearn import runs

        self.out, self.record, self.kept, self._write = out, record, kept, runs.write_json
        self.command = resume_command(out)
        self.exit_code: int | None = None

    def save(self) -> None:
        self._write(self.out / "run.json", self.record)

    def __enter__(self) -> RunStatus:
        self.record.update(status="running", resume_command=self.command, pid=os.getpid())
        self.record.pop("error", None)
        self.save()
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, tb: object) -> bool:
        where = f"{self.kept} stays in {self.out}"
        if kind is None:
            self.record.update(status="done")
            self.record.pop("pid", None)
        elif issubclass(kind, Interrupted):
            self.record.update(status="interrupted", step=error.step)
            print(f"interrupted at step {error.step}; {where}; resume with:\n  {self.command}")
            self.exit_code = 128 + error.signum
        elif issubclass(kind, KeyboardInterrupt):  # a second signal: stopped at once
            self.record.update(status="interrupted")
            print(f"stopped at once; {where}; resume with:\n  {self.command}")
        else:
            self.record.update(status="failed", error=f"{kind.__name__}: {error}")
            print(f"the run failed; {where}; after a fix: {self.command}", file=sys.stderr)
        self.save()
        return kind is not None and issubclass(kind, Interrupted)


def train_resumably(
    d, folder: Path | None, config, stop: _StopFlag, postfix: Callable[..., dict], show: bool, **bar_options
) -> None:
    """Restores distiller ``d`` from ``folder``'s checkpoint or sets it up, then trains it under a progress
    bar (``postfix(*logs)`` of each step's logs): a checkpoint every ``config.checkpoint_every`` steps and
    at the end, and when a signal arrives (during set-up too) a checkpoint, then ``Interrupted``.
    ``folder`` None: no checkpoints. Shared by class and concept runs."""
    from tqdm import tqdm

    from .unlearn import runs

    resumed = runs.restore_or_set_up(folder, d, config)
    saved_at = d.step if resumed else None

    def save() -> None:
        nonlocal saved_at
        if folder is not None and saved_at != d.step:
            runs.save_checkpoint(folder, d)
            saved_at = d.step

    def after_step(d) -> None:
        every = config.checkpoint_every
        if every and d.step % every == 0:
            save()
        if stop.signum is not None:
            save()
            raise Interrupted(stop.signum, d.step)

    if stop.signum is not None:  # arrived during set-up
        after_step(d)
    bar = tqdm(total=config.steps, initial=d.step, desc=config.method, disable=not show, **bar_options)

    def on_step(step: int, *logs) -> None:
        bar.update(1)
        bar.set_postfix(**postfix(*logs), refresh=False)

    try:
        d.train(on_step, after_step)
    finally:
        bar.close()
    if config.checkpoint_every:
        save()  # the finished state: a failure while writing the results can be resumed from here


def _run_one(config, ctx, part: Path | None, teacher: dict | None, progress: bool, stop: _StopFlag) -> dict:
    """One method's run in ``part`` (None: a non-lead rank, which writes nothing): from its checkpoint
    when there is one; checkpoints every ``checkpoint_every`` steps and when a signal arrives."""
    from .unlearn import runs
    from .unlearn.trainer import Distiller

    d = Distiller(config, ctx)
    checkpoints_on = part is not None and not config.distributed

    def postfix(logs: dict[str, float]) -> dict:
        return dict(
            loss_p=f"{logs['loss_p']:.3f}",
            loss_g=f"{logs['loss_g']:.3f}",
            forget_acc=f"{logs['forget_acc']:.2f}",
        )

    train_resumably(d, part if checkpoints_on else None, config, stop, postfix, progress, dynamic_ncols=True)
    result = d.finish()
    if part is not None:
        runs.write_run(part, result, ctx, teacher, d)
    return result


def run_distributed(job: Callable[[bool], int], backend: str = "gloo") -> NoReturn:
    """``job(lead)`` on this process of a torchrun job (gloo: the class recipe trains on the CPU; a concept
    run on CUDA asks for nccl); ``lead`` is rank 0, the one that writes. The process then ends with the
    job's code through ``distributed.exit_process``: a normal interpreter exit after gloo collectives can
    abort a finished rank. A job that raises leaves with its traceback, as any command does."""
    import torch.distributed as dist

    from .distributed import exit_process

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ValueError(
            "--distributed runs under torchrun, e.g. "
            "torchrun --nproc_per_node 2 -m pecker_kernels unlearn --distributed --out runs/x"
        )
    if not dist.is_initialized():
        dist.init_process_group(backend)
    try:
        code = job(dist.get_rank() == 0)
    except BaseException:
        dist.destroy_process_group()
        raise
    exit_process(code)


_RECORDED = (
    "model", "null_class", "dataset", "forget", "override", "method", "compare", "steps", "ratio",
    "refresh_every", "mask_batches", "backend", "seed", "batch", "forget_batch", "lr", "lr_pseudo",
    "forget_weight", "alpha", "ema", "t_init", "eval_every", "eval_samples", "final_samples", "target",
    "teacher_ddim_steps", "classifier", "checkpoint_every", "threads", "distributed",
)  # fmt: skip
_NAMED_INITS = ("distilled", "teacher")  # --init values that are not folders
# Options added later: a run recorded before them resumes with these values (what it ran with).
_RECORDED_LATER = {
    "init": "teacher", "weighting": "pooled", "score": "grad", "seeds": None, "variants": None,
    "lr_grid": None, "tune_seed": None, "frechet_tolerance": 0.1, "jobs": 1,
}  # fmt: skip


def _is_path(option: str, value: object) -> bool:
    """Whether a recorded option's value is a path (recorded absolute)."""
    if value is None:
        return False
    return option in ("model", "classifier") or (option == "init" and value not in _NAMED_INITS)


def _new_record(args: argparse.Namespace, ctx) -> dict:
    """A new run's run.json: the command, every recorded option, the model and the schedule."""
    return {
        "command": "python -m pecker_kernels " + shlex.join(sys.argv[1:] if args.argv is None else args.argv),
        "options": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if k in _RECORDED or k in _RECORDED_LATER
        },
        "model": ctx.info.to_json(),
        "schedule": ctx.schedule.config,
    }


def _resume_args(args: argparse.Namespace) -> argparse.Namespace:
    """The recorded options of the run in ``args.resume`` (its progress bar choice is this call's)."""
    from .unlearn import runs

    out = args.resume
    if args.out is not None and Path(args.out) != out:
        raise ValueError("--resume OUT continues the run in OUT; give no other --out")
    defaults = build_parser().parse_args(["unlearn", "--resume", str(out)])
    keys = (*_RECORDED, *_RECORDED_LATER)
    given = [k for k in keys if k != "jobs" and getattr(args, k, None) != getattr(defaults, k, None)]
    if given:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise ValueError(f"--resume continues with the options the run recorded; drop {flags}")
    record = runs.read_run(out)
    if record.get("status") == "done":
        raise ValueError(f"the run in {out} is finished; nothing to resume")
    options = record.get("options")
    if not isinstance(options, dict) or any(k not in options for k in _RECORDED):
        raise ValueError(f"{out}/run.json records no options to resume with")
    options = {**_RECORDED_LATER, **options}
    resumed = argparse.Namespace(**{k: options[k] for k in (*_RECORDED, *_RECORDED_LATER)})
    resumed.out, resumed.resume, resumed.no_progress = out, out, args.no_progress
    if getattr(args, "jobs", 1) != 1:  # how many runs at once does not change any result
        resumed.jobs = args.jobs
    resumed.argv, resumed.command = args.argv, args.command
    resumed.recorded = record
    return resumed


def cmd_unlearn(args: argparse.Namespace) -> int:
    from .unlearn import runs

    if args.resume is not None:
        args = _resume_args(args)
    elif args.out is None:
        raise ValueError("--out OUT (a new folder) is required, or --resume OUT to continue a run")
    else:  # absolute paths, as the run records them: a resume may start from another directory
        for option in ("model", "classifier", "init"):
            if _is_path(option, getattr(args, option, None)):
                setattr(args, option, str(Path(getattr(args, option)).resolve()))
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    _threads(args.threads)
    args.threads = torch.get_num_threads()  # recorded: a resumed run uses the same
    if args.resume is None:
        runs.check_out(args.out)  # before any work: never overwrite or mix with another run
    if not args.distributed:
        return _unlearn(args, lead=True)
    if args.resume is not None:
        raise ValueError("--distributed runs keep no checkpoints: they cannot be resumed")
    return run_distributed(lambda lead: _unlearn(args, lead))


def _unlearn(args: argparse.Namespace, lead: bool) -> int:
    """The runs; only the lead process (rank 0) shows progress and writes the results."""
    from .unlearn import runs
    from .unlearn.trainer import prepare

    if args.seeds is not None:
        return _unlearn_seeded(args)
    methods = ["pecker", "sfd"] if args.compare else [args.method]
    configs = [_config(args, m) for m in methods]
    ctx = prepare(configs[0])  # every option, the model and the classifier: checked before any output
    for c in configs[1:]:
        c.override, c.init = configs[0].override, configs[0].init
        c.validate(ctx.num_classes, ctx.schedule.steps)
    if not lead:
        stop = _StopFlag()
        for c in configs:
            _run_one(c, ctx, None, None, False, stop)
        return 0
    out: Path = args.out
    lock = runs.resume_lock(out) if args.resume is not None else runs.create_out(out)
    with lock, _StopFlag() as stop:
        start = time.perf_counter()
        record = getattr(args, "recorded", None) or _new_record(args, ctx)
        record["methods"] = record.get("methods") or {m: "pending" for m in methods}
        if not args.compare:
            record["generator"] = runs.generator_record(ctx, configs[0])
        with RunStatus(out, record) as status:
            teacher = _teacher_reference(ctx, configs[0], out)
            results = {}
            for c in configs:
                part = out / c.method if args.compare else out
                if record["methods"].get(c.method) == "done" and (part / "metrics.json").is_file():
                    results[c.method] = runs.load_result(part)
                    continue
                record["methods"][c.method] = "running"
                status.save()
                results[c.method] = _run_one(c, ctx, part, teacher, not args.no_progress, stop)
                if args.compare:
                    skip = ("methods", "generator", "pid", "resume_command")
                    part_record = {k: v for k, v in record.items() if k not in skip}
                    part_record.update(
                        status="done", method=c.method, generator=runs.generator_record(ctx, c)
                    )
                    runs.write_json(part / "run.json", part_record)
                record["methods"][c.method] = "done"
                status.save()
            text = runs.table(results, teacher)
            from .unlearn import atomic

            if args.compare:
                from .unlearn import plots

                runs.write_json(
                    out / "compare.json", {n: r["metrics"] for n, r in results.items()} | {"teacher": teacher}
                )
                plots.comparison(out / "compare.png", results, f"forget {configs[0].forget}: pecker vs sfd")
                atomic.write_text(out / "compare.md", text)
            else:
                atomic.write_text(out / "summary.md", text)
            for c in configs:
                runs.remove_checkpoint(out / c.method if args.compare else out)
    if status.exit_code is not None:
        return status.exit_code
    print(text)
    print(f"results in {out} ({time.perf_counter() - start:.0f} s)")
    return 0


def _unlearn_seeded(args: argparse.Namespace) -> int:
    """``--compare --seeds N``: every variant's lr tuned by one rule, then N seeds each (unlearn.compare)."""
    import math

    from .unlearn import compare, runs
    from .unlearn.trainer import prepare

    if not args.compare:
        raise ValueError("--seeds N runs a comparison: give --compare too")
    if args.distributed:
        raise ValueError(
            "--compare --seeds runs on one process (--jobs for parallel runs), not --distributed"
        )
    if isinstance(args.seeds, bool) or not isinstance(args.seeds, int) or args.seeds < 1:
        raise ValueError(f"--seeds must be an integer >= 1, got {args.seeds!r}")
    if not isinstance(args.jobs, int) or args.jobs < 1:
        raise ValueError(f"--jobs must be an integer >= 1, got {args.jobs!r}")
    tol = args.frechet_tolerance
    if not isinstance(tol, int | float) or not math.isfinite(tol) or tol < 0:
        raise ValueError(f"--frechet-tolerance must be a finite number >= 0, got {tol!r}")
    variants = compare.parse_variants(args.variants)
    grid = compare.parse_grid(args.lr_grid, args.lr)
    base = _config(args, "sfd")
    ctx = prepare(base)
    for v in variants:  # every variant's options, checked before any output
        for lr in grid:
            compare.variant_config(base, v, lr, base.seed).validate(ctx.num_classes, ctx.schedule.steps)
    out: Path = args.out
    lock = runs.resume_lock(out) if args.resume is not None else runs.create_out(out)
    with lock, _StopFlag():
        start = time.perf_counter()
        record = getattr(args, "recorded", None) or _new_record(args, ctx)
        with RunStatus(out, record, kept="every finished run") as status:
            teacher = _teacher_reference(ctx, base, out)
            result = compare.seeded_compare(
                base, ctx, out, teacher, variants, grid, args.seeds, args.tune_seed, tol, args.jobs,
                log=lambda line: print(line, flush=True),
            )  # fmt: skip
    if status.exit_code is not None:
        return status.exit_code
    print(compare.table(result))
    print(f"results in {out} ({time.perf_counter() - start:.0f} s)")
    return 0


def _teacher_reference(ctx, config, out: Path) -> dict:
    """The teacher's DDIM reference, computed once per run folder (teacher.json, samples_teacher.png)."""
    import json

    from .unlearn import plots, runs

    path = out / "teacher.json"
    if path.is_file():
        return json.loads(path.read_text())
    teacher, images, labels = runs.reference(ctx, config)
    title = f"teacher (DDIM {config.teacher_ddim_steps})"
    plots.sample_grid(out / "samples_teacher.png", images, labels, ctx.class_names, title)
    runs.write_json(path, teacher)
    return teacher


def cmd_demo(args: argparse.Namespace) -> int:
    if args.out is None and args.resume is None:
        args.out = Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    args.compare = True
    return cmd_unlearn(args)


def cmd_sample(args: argparse.Namespace) -> int:
    """Draw ``-n`` samples of one class from a finished run's generator into a PNG grid."""
    import math

    from .unlearn import plots, runs
    from .unlearn.diffusion import OneStepGenerator, Schedule
    from .unlearn.nets import UNET_CLASSES, EpsNet

    _threads(args.threads)
    if args.prompt is not None:
        from .unlearn import concept_cli

        return concept_cli.cmd_sample(args)
    if args.class_ is None:
        raise ValueError("--class C (a class-forgetting run) or --prompt P (a concept run) is required")
    record = runs.read_run(args.run)
    if record.get("recipe") == "concept":
        raise ValueError(f"{args.run} is a concept-forgetting run: sample it with --prompt P")
    if "generator" not in record:
        parts = sorted(p.name for p in Path(args.run).iterdir() if (p / "run.json").is_file())
        hint = f"; its runs: {', '.join(str(Path(args.run) / p) for p in parts)}" if parts else ""
        raise ValueError(f"{args.run} holds no single generator{hint}")
    g = record["generator"]
    folder = Path(args.run) / g["folder"]
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} holds no generator yet (run status: {record.get('status')})")
    if not 0 <= args.class_ < g["num_classes"]:
        raise ValueError(f"--class must be in [0, {g['num_classes']}), got {args.class_}")
    if not 1 <= args.n <= 10_000:
        raise ValueError(f"-n must be in [1, 10000], got {args.n}")
    for option, path in (("--out", args.out), ("--tensor", args.tensor)):
        if path is not None and (Path(path).is_dir() or not os.access(Path(path).parent.resolve(), os.W_OK)):
            raise ValueError(f"{option} {path} is a folder or cannot be written")
    schedule = Schedule.from_config(record["schedule"])
    unet = (
        UNET_CLASSES[g["class"]]
        .from_pretrained(folder, local_files_only=True, low_cpu_mem_usage=False)
        .eval()
    )
    generator = OneStepGenerator(EpsNet(unet, schedule), schedule, g["t_init"])
    z = torch.randn((args.n, *g["shape"]), generator=torch.Generator().manual_seed(args.seed))
    with torch.no_grad():
        images = torch.cat(
            [generator(chunk, torch.full((len(chunk),), args.class_)) for chunk in z.split(256)]
        )
    columns = min(args.n, 10)
    rows = math.ceil(args.n / columns)
    labels = torch.arange(args.n) // columns
    title = f"class {args.class_} from {args.run} (one step)"
    plots.sample_grid(Path(args.out), images, labels, ("",) * rows, title, columns=columns)
    if args.tensor:
        from .unlearn import atomic

        atomic.write_file(Path(args.tensor), lambda tmp: torch.save(images, tmp))
    print(f"wrote {args.out}: {args.n} samples of class {args.class_}")
    return 0


def _check_train_args(args: argparse.Namespace, kind: str) -> Path:
    """The output path, after refusing bad options and anything that would overwrite a checkpoint."""
    import math

    from .unlearn import checkpoints

    for name in ("steps", "batch"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not math.isfinite(args.lr) or args.lr <= 0:
        raise ValueError(f"--lr must be a finite number > 0, got {args.lr}")
    stem = f"{args.dataset.replace('-', '_')}_{kind}"
    folder = kind in ("teacher", "generator")
    out = Path(args.out) if args.out else Path("runs") / (stem if folder else f"{stem}.pt")
    if out.is_symlink():
        raise ValueError(f"--out {out} is a symbolic link; give the real path")
    if not folder and out.suffix == ".json":
        raise ValueError(
            f"--out {out}: a checkpoint needs another suffix (its record is written to a .json beside it)"
        )
    for path in (out,) if folder else (out, out.with_suffix(".json")):
        if path.exists() and not args.force:
            where = "a packaged checkpoint" if checkpoints.is_packaged(path) else "it"
            raise ValueError(f"{path} exists ({where}); pass --force to replace it")
    return out


def cmd_train(args: argparse.Namespace, kind: str) -> int:
    import math

    from .unlearn import atomic, checkpoints, runs
    from .unlearn.data import load_dataset
    from .unlearn.train import teacher_samples, train_classifier, train_teacher

    _threads(args.threads)
    out = _check_train_args(args, kind)
    data = load_dataset(args.dataset)
    if args.batch > len(data.images):
        raise ValueError(f"--batch {args.batch} is larger than the data set ({len(data.images)} images)")
    command = "python -m pecker_kernels " + shlex.join(sys.argv[1:] if args.argv is None else args.argv)
    log_every = max(1, args.steps // 20)

    def progress(step: int, loss: float) -> None:
        if not math.isfinite(loss):  # nothing is written: the output would be a NaN model
            raise ValueError(
                f"step {step + 1}: the training loss is {loss}; nothing was written (lower --lr?)"
            )
        if step % log_every == 0 or step == args.steps - 1:
            print(f"{kind} step {step + 1}/{args.steps} loss {loss:.4f}", flush=True)

    base = dict(command=command, dataset=args.dataset, torch=str(torch.__version__))
    if kind == "classifier":
        train, test = data.split(test_fraction=0.2, seed=0)
        model, record = train_classifier(
            train, test, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed, progress=progress
        )
        print(f"classifier held-out accuracy {record['test_accuracy']:.4f}")
        record.update(base, threads=torch.get_num_threads())
        checkpoints.save(out, model, kind, data.name, record)
        runs.write_json(out.with_suffix(".json"), record)
        print(f"wrote {out} and {out.with_suffix('.json')}")
        return 0

    import diffusers

    from .unlearn import plots

    model, record = train_teacher(
        data, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed, progress=progress
    )
    images, labels = teacher_samples(model, data, 100, steps=50, seed=args.seed)
    cpath = checkpoints.default_path(args.dataset, "classifier")
    if cpath.is_file():  # how good the teacher is, in the terms the unlearning metrics use
        from .unlearn.metrics import classify

        clf = checkpoints.load(cpath, "classifier", data.name, data.image_size, data.num_classes)
        preds, _ = classify(clf, images)
        record["ddim50_sample_accuracy"] = float((preds == labels).float().mean())
        record["ddim50_sample_accuracy_by_class"] = {
            str(c): float((preds[labels == c] == c).float().mean()) for c in range(data.num_classes)
        }
        record["accuracy_classifier"] = str(cpath.name)
        print(f"teacher DDIM-50 sample accuracy {record['ddim50_sample_accuracy']:.4f}")
    record.update(base, diffusers=diffusers.__version__, threads=torch.get_num_threads())
    with atomic.folder(out) as stage:
        model.unet.save_pretrained(stage, safe_serialization=True)
        runs.write_json(stage / "record.json", record)
        title = f"teacher, DDIM 50 steps ({args.steps} training steps)"
        plots.sample_grid(stage / "samples_ddim50.png", images, labels, data.class_names, title)
    print(f"wrote {out} (diffusers UNet2DModel folder, record.json, samples_ddim50.png)")
    return 0


def cmd_train_generator(args: argparse.Namespace) -> int:
    """Stage 1: distil the teacher into a one-step generator (every class, no forgetting), written as a
    diffusers folder with its record; ``unlearn --init`` starts from it."""
    from .unlearn import atomic, plots, runs
    from .unlearn.nets import save_unet
    from .unlearn.train import distill_generator
    from .unlearn.trainer import UnlearnConfig

    _threads(args.threads)
    out = _check_train_args(args, "generator")
    config = UnlearnConfig(
        dataset=args.dataset,
        method="sfd",
        distill=True,
        init="teacher",
        model=args.model,
        classifier=args.classifier,
        steps=args.steps,
        batch=args.batch,
        lr_generator=args.lr,
        lr_pseudo=args.lr_pseudo,
        ema=args.ema,
        t_init=args.t_init,
        seed=args.seed,
        eval_every=args.steps,
        final_samples=100,
        checkpoint_every=0,
    )
    log_every = max(1, args.steps // 20)

    def progress(step: int, logs: dict[str, float]) -> None:
        if step % log_every == 0 or step == args.steps:
            print(
                f"generator step {step}/{args.steps} loss_p {logs['loss_p']:.3f} loss_g {logs['loss_g']:.3f}",
                flush=True,
            )

    d, record, result = distill_generator(config, progress)
    command = "python -m pecker_kernels " + shlex.join(sys.argv[1:] if args.argv is None else args.argv)
    record.update(command=command, torch=str(torch.__version__), threads=torch.get_num_threads())
    with atomic.folder(out) as stage:
        save_unet(d.eval_generator.net, stage)
        runs.write_json(stage / "record.json", record)
        labels = d.final_labels
        title = f"one-step generator after {args.steps} distillation steps"
        plots.sample_grid(stage / "samples.png", result["after"], labels, d.ctx.class_names, title)
    after = record["after"]
    if "frechet_overall" in after:
        print(f"accuracy {after['accuracy']:.4f}, Frechet (all classes) {after['frechet_overall']:.2f}")
    print(f"wrote {out} (diffusers folder of the generator's network, record.json, samples.png)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pecker", description="PECKER unlearning recipe: saliency-masked score-forgetting distillation"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    from .unlearn import concept_cli

    p = sub.add_parser(
        "unlearn",
        help="make the generator forget a class, or a prompt's concept on a StableDiffusionPipeline folder "
        "(pecker or sfd, or --compare)",
        description=textwrap.fill(
            "Two modes. Class forgetting (the options below): a class-conditional diffusers model "
            "(default: the packaged digits teacher) forgets --forget C. Concept forgetting (the options "
            "at the end): --model a StableDiffusionPipeline folder with --forget-prompt P (or "
            "--forget-prompts FILE) and --anchor-prompt A. A command line naming forget or anchor "
            "prompts, a text-conditioned pipeline folder as --model, or --resume of a concept run is "
            "concept forgetting.",
            width=100,
        ),
        epilog="Concept forgetting (--model PIPELINE_DIR --forget-prompt P --anchor-prompt A) takes these\n"
        "options instead of the class-forgetting ones above:\n\n" + concept_cli.options_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_unlearn_args(p)
    p = sub.add_parser("demo", help="the default digits comparison, pecker vs sfd (a few CPU minutes)")
    _add_unlearn_args(p, out_required=False)
    p = sub.add_parser("sample", help="draw samples of one class from a finished run's generator")
    p.add_argument("--run", type=Path, required=True, help="the run folder (holding run.json, generator/)")
    p.add_argument("--class", dest="class_", metavar="C", type=int, default=None, help="the class to draw")
    p.add_argument("--prompt", default=None, help="the prompt to draw (a concept-forgetting run)")
    p.add_argument("-n", type=int, default=20, help="how many samples (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="PNG grid to write")
    p.add_argument("--tensor", type=Path, default=None, help="also save the samples as a torch tensor file")
    p.add_argument("--threads", type=int, default=None)
    defaults = {"teacher": (4000, 128, 2e-3), "classifier": (1500, 128, 2e-3)}
    for kind, (steps, batch, lr) in defaults.items():
        p = sub.add_parser(
            f"train-{kind}", help=f"train the {kind} (default: the packaged checkpoint's recipe)"
        )
        p.add_argument("--dataset", default="digits")
        p.add_argument("--steps", type=int, default=steps)
        p.add_argument("--batch", type=int, default=batch)
        p.add_argument("--lr", type=float, default=lr)
        p.add_argument("--seed", type=int, default=0)
        where = "a model folder" if kind == "teacher" else "a .pt file"
        p.add_argument("--out", default=None, help=f"{where} (default: runs/<dataset>_{kind})")
        p.add_argument("--force", action="store_true", help="replace an existing checkpoint")
        p.add_argument("--threads", type=int, default=None)
    p = sub.add_parser(
        "train-generator",
        help="stage 1: distil the teacher into a one-step generator without forgetting (unlearn --init)",
    )
    p.add_argument(
        "--model", default=None, help="the teacher folder (default: the packaged one of --dataset)"
    )
    p.add_argument("--dataset", default="digits")
    p.add_argument("--classifier", default=None, help="classifier checkpoint for the record's metrics")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3, help="generator learning rate")
    p.add_argument("--lr-pseudo", type=float, default=1e-3)
    p.add_argument("--ema", type=float, default=0.99, help="EMA decay of the generator (what is saved)")
    p.add_argument("--t-init", type=int, default=440)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="a model folder (default: runs/<dataset>_generator)")
    p.add_argument("--force", action="store_true", help="replace an existing folder")
    p.add_argument("--threads", type=int, default=None)
    concept_cli.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .unlearn import concept_cli
    from .unlearn.data import DatasetUnavailableError

    words = list(sys.argv[1:] if argv is None else argv)
    if words[:1] == ["unlearn"] and concept_cli.wants_concept(words[1:]):  # a text-conditioned pipeline
        try:
            return concept_cli.cmd_unlearn(words[1:])
        except (ValueError, DatasetUnavailableError) as e:
            raise SystemExit(f"pecker unlearn: error: {e}") from e
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = None if argv is None else list(argv)
    try:
        if args.command == "unlearn":
            return cmd_unlearn(args)
        if args.command == "demo":
            return cmd_demo(args)
        if args.command == "sample":
            return cmd_sample(args)
        if args.command == "train-text-teacher":
            return concept_cli.cmd_train_text(args)
        if args.command == "train-generator":
            return cmd_train_generator(args)
        return cmd_train(args, args.command.removeprefix("train-"))
    except (ValueError, DatasetUnavailableError) as e:
        raise SystemExit(f"pecker {args.command}: error: {e}") from e
