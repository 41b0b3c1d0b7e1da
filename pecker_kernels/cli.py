"""Command line: ``python -m pecker_kernels <command>`` (also installed as ``pecker``).

Commands: ``unlearn`` (one method, or ``--compare`` pecker against sfd), ``demo`` (the default digits
comparison), ``train-teacher`` and ``train-classifier``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

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
    p.add_argument("--dataset", default=d.dataset, help="digits (default), mnist or fashion-mnist")
    p.add_argument("--forget", type=int, default=d.forget, help="class to forget (default %(default)s)")
    p.add_argument(
        "--override",
        default=None,
        help="class whose score replaces the forgotten one: an index or 'random' (default: forget + 1)",
    )
    p.add_argument("--method", default=d.method, help="pecker (saliency-masked) or sfd (no mask)")
    p.add_argument("--compare", action="store_true", help="run pecker and sfd with the same seed and budget")
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
        "--forget-weight", type=float, default=d.forget_weight, help="weight of the forgetting term"
    )
    p.add_argument("--alpha", type=float, default=d.alpha)
    p.add_argument(
        "--ema", type=float, default=d.ema, help="EMA decay of the generator (metrics use the EMA)"
    )
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--eval-samples", type=int, default=d.eval_samples)
    p.add_argument("--final-samples", type=int, default=d.final_samples, help="samples per class at the end")
    p.add_argument(
        "--target", type=float, default=d.target, help="forgetting accuracy that counts as forgotten"
    )
    p.add_argument(
        "--teacher-ddim-steps", type=int, default=50, help="DDIM steps for the teacher's reference"
    )
    p.add_argument("--teacher", default=None, help="teacher checkpoint (default: the packaged one)")
    p.add_argument("--classifier", default=None, help="classifier checkpoint (default: the packaged one)")
    p.add_argument("--out", type=Path, required=out_required, help="new (or empty) folder for the results")
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
        except ValueError:
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
        ema=args.ema,
        ratio=args.ratio,
        refresh_every=args.refresh_every,
        mask_batches=args.mask_batches,
        backend=args.backend,
        seed=args.seed,
        eval_every=args.eval_every,
        eval_samples=args.eval_samples,
        final_samples=args.final_samples,
        target=args.target,
        teacher=args.teacher,
        classifier=args.classifier,
        distributed=args.distributed,
    )


def _run_one(config, ctx, progress: bool) -> dict:
    from tqdm import tqdm

    from .unlearn.trainer import Distiller

    bar = tqdm(total=config.steps, desc=config.method, disable=not progress, dynamic_ncols=True, leave=True)

    def on_step(step: int, logs: dict[str, float]) -> None:
        bar.update(1)
        bar.set_postfix(
            loss_p=f"{logs['loss_p']:.3f}",
            loss_g=f"{logs['loss_g']:.3f}",
            forget_acc=f"{logs['forget_acc']:.2f}",
            refresh=False,
        )

    try:
        return Distiller(config, ctx).run(on_step)
    finally:
        bar.close()


def _init_distributed() -> int:
    """Join the torchrun job (gloo: the recipe trains on the CPU); returns this process's rank."""
    import torch.distributed as dist

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ValueError(
            "--distributed runs under torchrun, e.g. "
            "torchrun --nproc_per_node 2 -m pecker_kernels unlearn --distributed --out runs/x"
        )
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.get_rank()


def cmd_unlearn(args: argparse.Namespace) -> int:
    from .unlearn import runs

    _threads(args.threads)
    runs.check_out(args.out)  # before any work: never overwrite or mix with another run
    if not args.distributed:
        return _unlearn(args, lead=True)
    rank = _init_distributed()
    try:
        return _unlearn(args, lead=rank == 0)
    finally:
        import torch.distributed as dist

        dist.destroy_process_group()


def _unlearn(args: argparse.Namespace, lead: bool) -> int:
    """The runs; only the lead process (rank 0) shows progress and writes the results."""
    from .unlearn import runs
    from .unlearn.trainer import prepare

    methods = ["pecker", "sfd"] if args.compare else [args.method]
    configs = [_config(args, m) for m in methods]
    ctx = prepare(configs[0])
    for c in configs[1:]:
        c.override = configs[0].override
        c.validate(ctx.data.num_classes)
    start = time.perf_counter()
    results = {c.method: _run_one(c, ctx, lead and not args.no_progress) for c in configs}
    if not lead:
        return 0
    teacher, teacher_images = runs.reference(ctx, configs[0], args.teacher_ddim_steps)
    command = "python -m pecker_kernels " + shlex.join(sys.argv[1:] if args.argv is None else args.argv)
    with runs.staged(args.out) as stage:
        from .unlearn import plots

        labels = torch.arange(ctx.data.num_classes).repeat_interleave(configs[0].final_samples)
        plots.sample_grid(
            stage / "samples_teacher.png", teacher_images, labels, ctx.data.class_names, "teacher (DDIM)"
        )
        text = runs.table(results, teacher)
        if args.compare:
            for name, r in results.items():
                r["metrics"]["command"] = command
                runs.write_run(stage / name, r, ctx, teacher)
            (stage / "compare.md").write_text(text)
            runs.write_json(
                stage / "compare.json", {n: r["metrics"] for n, r in results.items()} | {"teacher": teacher}
            )
            plots.comparison(stage / "compare.png", results, f"forget {configs[0].forget}: pecker vs sfd")
        else:
            r = results[methods[0]]
            r["metrics"]["command"] = command
            runs.write_run(stage, r, ctx, teacher)
            (stage / "summary.md").write_text(text)
    print(text)
    print(f"results in {args.out} ({time.perf_counter() - start:.0f} s)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    if args.out is None:
        args.out = Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    args.compare = True
    return cmd_unlearn(args)


def _record_path(path: Path) -> Path:
    return path.with_suffix(".json")


def cmd_train(args: argparse.Namespace, kind: str) -> int:
    from .unlearn import checkpoints, runs
    from .unlearn.data import load_dataset
    from .unlearn.train import teacher_samples, train_classifier, train_teacher

    _threads(args.threads)
    out = Path(args.out) if args.out else checkpoints.default_path(args.dataset, kind)
    if out.exists() and not args.force:
        raise ValueError(f"{out} exists; pass --force to replace it")
    data = load_dataset(args.dataset)
    command = "python -m pecker_kernels " + shlex.join(sys.argv[1:] if args.argv is None else args.argv)
    log_every = max(1, args.steps // 20)

    def progress(step: int, loss: float) -> None:
        if step % log_every == 0 or step == args.steps - 1:
            print(f"{kind} step {step + 1}/{args.steps} loss {loss:.4f}", flush=True)

    if kind == "classifier":
        train, test = data.split(test_fraction=0.2, seed=0)
        model, record = train_classifier(
            train, test, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed, progress=progress
        )
        print(f"classifier held-out accuracy {record['test_accuracy']:.4f}")
    else:
        model, record = train_teacher(
            data, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed, progress=progress
        )
        cpath = checkpoints.default_path(args.dataset, "classifier")
        if cpath.is_file():  # how good the teacher is, in the terms the unlearning metrics use
            from .unlearn.metrics import classify

            clf = checkpoints.load(cpath, "classifier", data.name, data.image_size, data.num_classes)
            images, labels = teacher_samples(model, data, 100, steps=50, seed=args.seed)
            preds, _ = classify(clf, images)
            record["ddim50_sample_accuracy"] = float((preds == labels).float().mean())
            record["ddim50_sample_accuracy_by_class"] = {
                str(c): float((preds[labels == c] == c).float().mean()) for c in range(data.num_classes)
            }
            record["accuracy_classifier"] = str(cpath.name)
            print(f"teacher DDIM-50 sample accuracy {record['ddim50_sample_accuracy']:.4f}")
    record.update(
        command=command, dataset=args.dataset, torch=str(torch.__version__), threads=torch.get_num_threads()
    )
    checkpoints.save(out, model, kind, data.name, record)
    runs.write_json(_record_path(out), record)
    print(f"wrote {out} and {_record_path(out)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pecker", description="PECKER unlearning recipe: saliency-masked score-forgetting distillation"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("unlearn", help="make the generator forget a class (pecker or sfd, or --compare)")
    _add_unlearn_args(p)
    p = sub.add_parser("demo", help="the default digits comparison, pecker vs sfd (a few CPU minutes)")
    _add_unlearn_args(p, out_required=False)
    defaults = {"teacher": (3000, 128, 2e-3), "classifier": (1500, 128, 2e-3)}
    for kind, (steps, batch, lr) in defaults.items():
        p = sub.add_parser(
            f"train-{kind}", help=f"train the {kind} (default: the packaged checkpoint's recipe)"
        )
        p.add_argument("--dataset", default="digits")
        p.add_argument("--steps", type=int, default=steps)
        p.add_argument("--batch", type=int, default=batch)
        p.add_argument("--lr", type=float, default=lr)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--out", default=None, help="checkpoint path (default: the packaged one)")
        p.add_argument("--force", action="store_true", help="replace an existing checkpoint")
        p.add_argument("--threads", type=int, default=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .unlearn.data import DatasetUnavailableError

    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = None if argv is None else list(argv)
    try:
        if args.command == "unlearn":
            return cmd_unlearn(args)
        if args.command == "demo":
            return cmd_demo(args)
        return cmd_train(args, args.command.removeprefix("train-"))
    except (ValueError, DatasetUnavailableError) as e:
        raise SystemExit(f"pecker {args.command}: error: {e}") from e
