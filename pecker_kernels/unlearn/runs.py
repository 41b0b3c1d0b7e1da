"""Run folders: a new (or empty) folder per run, locked while a process works in it; ``run.json`` says
where the run stands (running, interrupted, failed, done) and what is needed to resume it or use its
generator; checkpoints; the files of one run; the comparison table. Nothing a run has finished writing
is ever deleted by a later error."""

from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from . import atomic, checkpoints, plots
from .metrics import evaluate
from .nets import save_unet
from .train import sample_classes
from .trainer import Context, Distiller, UnlearnConfig

LOCK = ".lock"


def check_out(out: Path) -> None:
    """ValueError when ``out`` cannot take a new run: a symbolic link, not a folder, a folder holding
    anything (another run?), or a place that cannot be written."""
    out = Path(out)
    if out.is_symlink():
        raise ValueError(f"--out {out} is a symbolic link; give a real, new folder")
    if out.exists() and (not out.is_dir() or any(p.name != LOCK for p in out.iterdir())):
        raise ValueError(
            f"output folder {out} already exists and is not empty (another run?); "
            "choose a new --out, remove it first, or continue it with --resume"
        )
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"--out {out}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: {parent} is not writable")


class RunLock:
    """An exclusive ``flock`` on ``OUT/.lock`` for as long as this process works in ``OUT`` (released by
    the kernel if the process dies, so a killed run can be resumed)."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        try:
            fd = os.open(self.out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ValueError(f"--out {self.out} cannot be written: {e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ValueError(
                f"another run (pid {owner}) is working in {self.out}; wait for it or choose a new --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> RunLock:
        return self if self.fd is not None else self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def create_out(out: Path) -> RunLock:
    """Make the new run folder ``out`` and lock it; ValueError when it cannot be made or another
    process got there first."""
    out = Path(out)
    check_out(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {out} cannot be created: {e}") from e
    lock = RunLock(out).acquire()
    try:
        check_out(out)  # someone may have written there meanwhile
    except ValueError:
        lock.release()
        raise
    return lock


def resume_lock(out: Path) -> RunLock:
    """Lock the run folder ``out`` to resume it; ValueError if its run finished meanwhile (another
    process may have completed it between reading run.json and taking the lock)."""
    lock = RunLock(out).acquire()
    try:
        if read_run(out).get("status") == "done":
            raise ValueError(f"the run in {out} is finished; nothing to resume")
    except ValueError:
        lock.release()
        raise
    return lock


def read_run(folder: Path) -> dict[str, Any]:
    """``folder/run.json``; ValueError when there is none."""
    path = Path(folder) / "run.json"
    if not path.is_file():
        raise ValueError(f"{folder} holds no run.json: not a run folder")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not readable JSON: {e}") from e


# ---- checkpoints -----------------------------------------------------------------------------------

CHECKPOINT = "checkpoint"


def save_checkpoint(part: Path, distiller: Distiller) -> None:
    """``part/checkpoint/state.pt`` (replacing the previous checkpoint atomically)."""
    state = distiller.state_dict()
    with atomic.folder(part / CHECKPOINT) as stage:
        torch.save(state, stage / "state.pt")
        write_json(stage / "checkpoint.json", {"step": state["step"], "method": distiller.cfg.method})


def find_checkpoint(part: Path) -> Path | None:
    """The newest complete checkpoint file of ``part`` (a crash mid-replace leaves the previous one
    moved aside: that one is used)."""
    path = part / CHECKPOINT / "state.pt"
    if path.is_file():
        return path
    aside = sorted(part.glob(f".{CHECKPOINT}.old-*/state.pt"))
    return aside[-1] if aside else None


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(
            f"checkpoint {path} is damaged ({reason}); remove {path.parent} to restart that run from step 0"
        ) from e


def restore_or_set_up(part: Path | None, distiller: Any, config: Any) -> bool:
    """Resume ``distiller`` from the newest checkpoint in ``part`` (True), or set it up anew (False:
    no checkpoint, or ``part`` None). A checkpoint of other options (a dataclass ``config``) is refused."""
    import dataclasses

    found = None if part is None else find_checkpoint(part)
    if found is None:
        distiller.setup()
        return False
    state = load_checkpoint(found)
    if state.get("config") != dataclasses.asdict(config):
        raise ValueError(f"{found} was written by a run with other options; it cannot be resumed")
    distiller.load_state_dict(state)
    print(f"{config.method}: resumed from step {distiller.step} ({found})", flush=True)
    return True


def remove_checkpoint(part: Path) -> None:
    """The checkpoint, the one moved aside, and staging folders a killed write left behind."""
    shutil.rmtree(part / CHECKPOINT, ignore_errors=True)
    for old in (*part.glob(f".{CHECKPOINT}.old-*"), *part.glob(f".{CHECKPOINT}.tmp-*")):
        shutil.rmtree(old, ignore_errors=True)


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"cannot serialise {type(value).__name__}")


def write_json(path: Path, data: Any) -> None:
    """JSON, written atomically (temporary file + rename)."""
    atomic.write_text(path, json.dumps(data, indent=2, default=_json_default) + "\n")


def reference(ctx: Context, config: UnlearnConfig) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    """The teacher's own samples (DDIM, the same per-class count as the final evaluation) and, when a
    classifier is available, their metrics: (metrics, images, labels)."""
    images, labels = sample_classes(
        ctx.teacher,
        ctx.num_classes,
        ctx.shape,
        config.final_samples,
        config.teacher_ddim_steps,
        config.seed + 2,
    )
    if ctx.classifier is None:
        metrics: dict[str, Any] = {"forget_accuracy": None, "retain_accuracy": None, "frechet": None}
    else:
        metrics = evaluate(ctx.classifier, images, labels, ctx.real_features, config.forget, ctx.num_classes)
    metrics["ddim_steps"] = config.teacher_ddim_steps
    return metrics, images, labels


def generator_record(ctx: Context, config: UnlearnConfig) -> dict[str, Any]:
    """What ``run.json`` says about the generator: enough to draw from it without this package's
    defaults (``python -m pecker_kernels sample``, or by hand)."""
    return {
        "folder": "generator",
        "class": ctx.info.class_name,
        "weights": f"EMA (decay {config.ema}) of the unlearned generator's network",
        "t_init": config.t_init,
        "formula": "x_init = sqrt(1 - abar[t_init]) z, z ~ N(0, I); eps = net(x_init, t_init, class); "
        "x0 = (x_init - sqrt(1 - abar[t_init]) eps) / sqrt(abar[t_init])",
        "prediction_type": ctx.schedule.prediction_type,
        "shape": list(ctx.shape),
        "num_classes": ctx.num_classes,
        "null_class": ctx.info.null_class,
        "forgotten_class": config.forget,
    }


def write_run(
    folder: Path, result: dict[str, Any], ctx: Context, teacher: dict[str, Any] | None, distiller: Distiller
) -> None:
    """generator/ (the diffusers folder, first: the most valuable), scheduler/, metrics.json,
    history.json, samples_before.png, samples_after.png, curves.png."""
    folder.mkdir(parents=True, exist_ok=True)
    # ``finish()`` left the EMA weights in ``eval_generator`` (loading them again would be a collective
    # under --distributed, which only this process would join).
    with atomic.folder(folder / "generator") as stage:
        save_unet(distiller.eval_generator.net, stage)
    with atomic.folder(folder / "scheduler") as stage:
        ctx.schedule.scheduler.save_pretrained(stage)
    metrics = dict(result["metrics"])
    if teacher is not None:
        metrics["teacher"] = teacher
    write_json(folder / "metrics.json", metrics)
    write_json(folder / "history.json", {"train": result["history"], "evals": result["evals"]})
    labels = torch.arange(ctx.num_classes).repeat_interleave(metrics["config"]["final_samples"])
    names = ctx.class_names
    m = metrics["method"]
    forget = metrics["forget_class"]
    plots.sample_grid(
        folder / "samples_before.png", result["before"], labels, names, "generator before unlearning"
    )
    plots.sample_grid(
        folder / "samples_after.png",
        result["after"],
        labels,
        names,
        f"{m} after {metrics['steps']} steps (forgot {forget})",
    )
    plots.curves(
        folder / "curves.png", result, f"{m}: forget class {forget}, override {metrics['override_class']}"
    )


def load_result(folder: Path) -> dict[str, Any]:
    """A finished run's metrics and history, read back (a resumed --compare needs them for its table)."""
    metrics = json.loads((folder / "metrics.json").read_text())
    history = json.loads((folder / "history.json").read_text())
    return {"metrics": metrics, "history": history["train"], "evals": history["evals"]}


def _model_name(metrics: dict[str, Any]) -> str:
    model = metrics.get("model") or {}
    path = model.get("path", "")
    if (
        path
        and Path(path).resolve()
        == checkpoints.default_path(metrics["config"]["dataset"], "teacher").resolve()
    ):
        return f"{metrics['config']['dataset']} (packaged teacher)"
    return f"model {Path(path).name or path}"


def _pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _num(x: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if x is None else fmt.format(x)


def table(results: dict[str, dict[str, Any]], teacher: dict[str, Any] | None) -> str:
    """Markdown table: teacher, the generator before unlearning, then each method."""
    first = next(iter(results.values()))["metrics"]
    forget = str(first["forget_class"])
    head = (
        "| model | forget acc | retain acc | Frechet retained | Frechet forgotten | Frechet overall "
        "| steps to forget | s to forget | mask set-up s | steps | wall s | ms/step fwd+bwd | ms/step mask "
        "| ms/step update |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def row(name: str, m: dict[str, Any], run: dict[str, Any] | None) -> str:
        fd = m["frechet"] or {"retain": None, "overall": None, "per_class": {}}
        cells = [
            name,
            _pct(m["forget_accuracy"]),
            _pct(m["retain_accuracy"]),
            _num(fd["retain"]),
            _num(fd["per_class"].get(forget)),
            _num(fd["overall"]),
        ]
        if run is None:
            cells += ["-"] * 8
        else:
            per = run["per_step_seconds"]
            cells += [
                _num(run["steps_to_forget"], "{}"),
                _num(run["time_to_forget_seconds"]),
                _num(run["setup_seconds"], "{:.2f}"),
                str(run["steps"]),
                _num(run["wall_seconds"]),
                _num(1000 * per.get("forward_backward", 0.0)),
                _num(1000 * per.get("mask", 0.0), "{:.2f}"),
                _num(1000 * per.get("update", 0.0), "{:.2f}"),
            ]
        return "| " + " | ".join(cells) + " |"

    if teacher is not None:
        lines.append(row(f"teacher (DDIM {teacher['ddim_steps']})", teacher, None))
    lines.append(row("generator before unlearning", first["initial"], None))
    for name, r in results.items():
        m = r["metrics"]
        label = (
            name
            if m["method"] == "sfd"
            else f"{name} (ratio {m['config']['ratio']}, refresh {m['config']['refresh_every']})"
        )
        lines.append(row(label, m, m))
    target = first["target"]
    lines.append("")
    if first.get("metrics_note"):
        lines.append(f"Metrics: {first['metrics_note']}.")
        lines.append("")
    lines.append(
        f"Forget class {forget}, override {first['override_class']}, {_model_name(first)}, seed "
        f"{first['config']['seed']}; accuracies and Frechet distances (classifier features) from "
        f"{first['config']['final_samples']} samples per class; 'to forget' = first evaluation (every "
        f"{first['config']['eval_every']} steps) with forget acc < {target:.0%}; seconds include the mask "
        "set-up (pecker's one-shot saliency pass) and exclude evaluation; Frechet forgotten = samples "
        "generated for the forgotten class against its real images (large once it is forgotten)."
    )
    return "\n".join(lines) + "\n"
