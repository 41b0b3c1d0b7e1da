"""Command line of concept forgetting on text-conditioned pipelines: ``unlearn --model PIPELINE_DIR
--forget-prompt P --anchor-prompt A`` (``cli.main`` hands such a command line here), ``sample --run OUT
--prompt P``, and ``train-text-teacher`` (the digits-with-captions demonstration model)."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch


def wants_concept(argv: list[str]) -> bool:
    """Whether an ``unlearn`` command line is concept forgetting: it names forget prompts, its --model is
    a text-conditioned pipeline, or it resumes a concept run."""
    from . import text

    if any(a.split("=")[0] in ("--forget-prompt", "--forget-prompts", "--anchor-prompt") for a in argv):
        return True
    for flag in ("--model", "--teacher", "--resume"):
        for i, a in enumerate(argv):
            value = (
                a.split("=", 1)[1]
                if a.startswith(flag + "=")
                else argv[i + 1]
                if a == flag and i + 1 < len(argv)
                else None
            )
            if value is None:
                continue
            if flag == "--resume":
                run = Path(value) / "run.json"
                if run.is_file() and '"recipe": "concept"' in run.read_text():
                    return True
            elif text.is_text_pipeline(value):
                return True
    return False


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default after its help, where it has one worth saying (not None, off or empty)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default == []:
            return action.help
        return super()._get_help_string(action)


def unlearn_parser() -> argparse.ArgumentParser:
    from .concept import ConceptConfig

    d = ConceptConfig()
    p = argparse.ArgumentParser(
        prog="pecker unlearn",
        description="Concept forgetting on a text-conditioned pipeline (StableDiffusionPipeline folder): "
        "score-forgetting distillation in the pipeline's latent space into a one-step generator whose "
        "updates go to its most salient weights (pecker) or to all (sfd). A command line is concept "
        "forgetting when it names forget or anchor prompts, its --model is such a pipeline, or it "
        "resumes a concept run; class forgetting (a class-conditional model) takes other options: "
        "pecker unlearn --help.",
        formatter_class=_DefaultsHelp,
    )
    p.add_argument(
        "--model", "--teacher", dest="model", default=None, help="a local StableDiffusionPipeline folder"
    )
    p.add_argument("--forget-prompt", action="append", default=[], help="a prompt to forget (repeatable)")
    p.add_argument(
        "--forget-prompts", type=Path, default=None, help="a file of prompts to forget, one a line"
    )
    p.add_argument("--anchor-prompt", default=None, help="what the forget prompts should draw instead")
    p.add_argument(
        "--retain-prompts", type=Path, default=None, help="a file of prompts to keep (default: the anchor)"
    )
    p.add_argument("--method", default=d.method, help="pecker (saliency-masked) or sfd (no mask)")
    p.add_argument("--steps", type=int, default=d.steps, help="training steps")
    p.add_argument("--batch", type=int, default=d.batch, help="retain-prompt samples per step")
    p.add_argument("--forget-batch", type=int, default=d.forget_batch, help="forget-prompt samples per step")
    p.add_argument("--lr", type=float, default=d.lr_generator, help="generator learning rate")
    p.add_argument("--lr-pseudo", type=float, default=d.lr_pseudo, help="pseudo-score learning rate")
    p.add_argument("--alpha", type=float, default=d.alpha, help="the SiD loss's alpha")
    p.add_argument(
        "--forget-weight", type=float, default=d.forget_weight, help="weight of the forget-prompt rows"
    )
    p.add_argument("--cfg", type=float, default=d.cfg, help="the teacher's guidance scale")
    p.add_argument("--cfg-fake", type=float, default=d.cfg_fake, help="the pseudo-score's guidance scale")
    p.add_argument(
        "--init",
        default=None,
        help="a UNet2DConditionModel folder the generator starts from, of the pipeline UNet's architecture "
        "(SFD: a one-step SiD generator); default: the pipeline's UNet",
    )
    p.add_argument("--init-timestep", type=int, default=d.t_init, help="the one-step generator's time step")
    p.add_argument("--t-min", type=int, default=d.t_min, help="lowest diffusion time of the losses")
    p.add_argument("--t-max", type=int, default=d.t_max, help="highest diffusion time of the losses")
    p.add_argument("--clip-value", type=float, default=d.clip_value, help="gradient clip by value")
    p.add_argument("--ema", type=float, default=d.ema, help="EMA decay of the generator (what is saved)")
    p.add_argument("--ratio", type=float, default=d.ratio, help="fraction of generator weights updated")
    p.add_argument(
        "--refresh-every",
        type=int,
        default=d.refresh_every,
        help="0: one-shot mask; K: reselect every K steps",
    )
    p.add_argument(
        "--mask-batches", type=int, default=d.mask_batches, help="forget batches of the one-shot mask"
    )
    p.add_argument("--precision", default=d.precision, help="fp32, fp16 (autocast + GradScaler) or bf16")
    p.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute the generator's and pseudo-score's activations in backward (less memory)",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--backend", default=d.backend, help="SalientAdam backend: auto, eager, cpu, cuda, triton")
    p.add_argument("--seed", type=int, default=d.seed, help="random seed")
    p.add_argument("--sample-prompts", type=Path, default=None, help="prompts of the before/after grids")
    p.add_argument("--samples", type=int, default=d.samples, help="samples per prompt in the grids")
    p.add_argument("--classifier", default=None, help="a classifier checkpoint of the decoded images")
    p.add_argument(
        "--eval-prompts",
        type=Path,
        default=None,
        help='JSON {"group": {"prompt": class, ...}, ...}: classifier accuracy per prompt and group',
    )
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=d.checkpoint_every,
        help="steps between checkpoints in OUT/checkpoint (0: only when interrupted)",
    )
    p.add_argument("--out", type=Path, default=None, help="new (or empty) folder for the results")
    p.add_argument(
        "--resume",
        type=Path,
        default=None,
        metavar="OUT",
        help="continue the interrupted run in OUT with its recorded options (give no other option but "
        "--no-progress)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default 1, or $PECKER_THREADS)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--distributed",
        action="store_true",
        help="run under torchrun: FSDP2-sharded generator and pseudo-score, one global mask over every "
        "rank's shards, each rank its own samples (no checkpoints: such a run cannot be resumed; fp32 or "
        "bf16)",
    )
    return p


def options_help() -> str:
    """The concept options as ``--help`` lists them (the class parser's help shows them too)."""
    p = unlearn_parser()
    formatter = p._get_formatter()
    formatter.start_section("concept-forgetting options")
    formatter.add_arguments([a for a in p._actions if "-h" not in a.option_strings])
    formatter.end_section()
    return formatter.format_help()


# What ``--resume OUT`` may be given besides: how it shows progress (every other option is recorded).
_RESUME_MAY_CHANGE = ("resume", "out", "no_progress")


def refuse_resume_options(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """ValueError naming every option given with ``--resume`` that the recorded run would ignore."""
    given = [
        action.option_strings[0]
        for action in parser._actions
        if action.option_strings
        and action.dest not in (*_RESUME_MAY_CHANGE, "help")
        and getattr(args, action.dest) != action.default
    ]
    if given:
        raise ValueError(f"--resume continues with the options the run recorded; drop {', '.join(given)}")


def cmd_unlearn(argv: list[str]) -> int:
    from .concept import config_from_args, run_concept

    parser = unlearn_parser()
    args = parser.parse_args(argv)
    if args.resume is not None:
        refuse_resume_options(args, parser)
    return run_concept(args, argv, config_from_args)


def add_parsers(sub) -> None:
    """``train-text-teacher`` on ``cli``'s sub-command parser."""
    p = sub.add_parser(
        "train-text-teacher",
        help="train the small text-conditioned digits pipeline (concept-forgetting demonstration)",
    )
    p.add_argument("--dataset", default="digits")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--ema", type=float, default=0.99, help="EMA decay (what is saved)")
    p.add_argument("--cfg", type=float, default=3.0, help="guidance of the recorded DDIM samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="a pipeline folder (default: runs/<dataset>_text_pipeline)")
    p.add_argument("--force", action="store_true", help="replace an existing folder")
    p.add_argument("--threads", type=int, default=None)


def cmd_train_text(args: argparse.Namespace) -> int:
    import tempfile

    import diffusers
    import transformers

    from . import atomic, checkpoints, plots, runs
    from .data import load_dataset
    from .metrics import classify
    from .text import load_pipeline
    from .train_text import (
        HELDOUT_TEMPLATES,
        TRAIN_TEMPLATES,
        guided_ddim,
        prompt,
        save_text_pipeline,
        train_text_teacher,
    )

    if args.steps < 1 or args.batch < 1:
        raise ValueError("--steps and --batch must be >= 1")
    out = Path(args.out) if args.out else Path("runs") / f"{args.dataset.replace('-', '_')}_text_pipeline"
    if out.exists() and not args.force:
        raise ValueError(f"{out} exists; pass --force to replace it")
    from ..cli import _threads

    _threads(args.threads)  # one thread unless asked, as every other command
    data = load_dataset(args.dataset)
    log_every = max(1, args.steps // 20)

    def progress(step: int, loss: float) -> None:
        if step % log_every == 0 or step == args.steps - 1:
            print(f"text teacher step {step + 1}/{args.steps} loss {loss:.4f}", flush=True)

    with tempfile.TemporaryDirectory() as work:
        tokenizer, text_encoder, net, record = train_text_teacher(
            data,
            Path(work),
            steps=args.steps,
            ema=args.ema,
            batch=args.batch,
            lr=args.lr,
            seed=args.seed,
            progress=progress,
        )
        with atomic.folder(out) as stage:
            save_text_pipeline(stage, tokenizer, text_encoder, net)
            pipe = load_pipeline(stage)
            shape = tuple(data.images.shape[1:])
            cpath = checkpoints.default_path(args.dataset, "classifier")
            clf = None
            if cpath.is_file():
                clf = checkpoints.load(cpath, "classifier", data.name, data.image_size, data.num_classes)
            per, rows = 10, {}
            grid_images, grid_labels = [], []
            for group, templates in (
                ("train_templates", TRAIN_TEMPLATES),
                ("heldout_templates", HELDOUT_TEMPLATES),
            ):
                texts = [prompt(t, c) for c in range(data.num_classes) for t in templates for _ in range(per)]
                labels = torch.tensor(
                    [c for c in range(data.num_classes) for _ in templates for _ in range(per)]
                )
                images = guided_ddim(pipe.teacher, pipe.prompts, texts, shape, args.cfg, 25, args.seed + 1)
                if group == "train_templates":
                    first = torch.tensor([i for i in range(len(texts)) if i % (per * len(templates)) < 10])
                    grid_images, grid_labels = images[first], labels[first]
                if clf is not None:
                    preds, _ = classify(clf, images)
                    rows[group] = float((preds == labels).float().mean())
            if clf is not None:
                record["ddim25_cfg_sample_accuracy"] = rows
                record["accuracy_classifier"] = cpath.name
                print(f"teacher DDIM-25 (cfg {args.cfg}) sample accuracy {rows}")
            record.update(
                command="python -m pecker_kernels "
                + shlex.join(sys.argv[1:] if args.argv is None else args.argv),
                dataset=args.dataset,
                cfg=args.cfg,
                samples_per_prompt=per,
                torch=str(torch.__version__),
                diffusers=diffusers.__version__,
                transformers=transformers.__version__,
                threads=torch.get_num_threads(),
            )
            runs.write_json(stage / "record.json", record)
            title = f"'{TRAIN_TEMPLATES[0].format('<digit>')}', DDIM 25, cfg {args.cfg}"
            plots.sample_grid(stage / "samples_ddim25.png", grid_images, grid_labels, data.class_names, title)
    print(f"wrote {out} (pixel-space StableDiffusionPipeline folder, record.json, samples_ddim25.png)")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    """``sample --run OUT --prompt P``: one-step samples of a concept run's generator."""
    from .concept import sample

    sample(Path(args.run), args.prompt, args.n, args.seed, Path(args.out), args.tensor)
    print(f"wrote {args.out}: {args.n} samples of {args.prompt!r}")
    return 0
