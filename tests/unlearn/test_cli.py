"""End to end through the command line, on a tiny budget with the packaged checkpoints."""

import json
import math
import subprocess
import sys

import pytest

from pecker_kernels.cli import main

from .torchrun import torchrun

TINY = [
    "--steps", "3", "--batch", "16", "--forget-batch", "8", "--eval-every", "2", "--eval-samples", "16",
    "--final-samples", "6", "--mask-batches", "1", "--teacher-ddim-steps", "2", "--no-progress",
]  # fmt: skip

RUN_FILES = {"metrics.json", "history.json", "samples_before.png", "samples_after.png", "curves.png"}
KEYS = {
    "forget_accuracy", "retain_accuracy", "frechet", "steps", "wall_seconds", "time_to_forget_seconds",
    "steps_to_forget", "per_step_seconds", "initial", "teacher", "config",
}  # fmt: skip


def check_run(folder, method):
    assert RUN_FILES <= {p.name for p in folder.iterdir()}
    metrics = json.loads((folder / "metrics.json").read_text())
    assert KEYS <= metrics.keys()
    assert metrics["method"] == method and metrics["steps"] == 3
    assert 0 <= metrics["forget_accuracy"] <= 1 and 0 <= metrics["retain_accuracy"] <= 1
    assert {"overall", "retain", "per_class"} <= metrics["frechet"].keys()
    assert len(metrics["frechet"]["per_class"]) == 10
    assert {"forward_backward", "update", "pseudo_update"} <= metrics["per_step_seconds"].keys()
    for png in RUN_FILES - {"metrics.json", "history.json"}:
        assert (folder / png).read_bytes()[:4] == b"\x89PNG"
    return metrics


def test_compare_end_to_end(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["unlearn", "--compare", "--forget", "3", *TINY, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| pecker (ratio 0.5, refresh 0) |" in printed and "| sfd |" in printed and "| teacher" in printed
    assert (out / "compare.md").read_text().strip() in printed
    assert (out / "compare.png").exists() and (out / "samples_teacher.png").exists()
    pecker = check_run(out / "pecker", "pecker")
    sfd = check_run(out / "sfd", "sfd")
    assert pecker["updated_fraction"] == 0.5 or abs(pecker["updated_fraction"] - 0.5) < 1e-4
    assert sfd["updated_fraction"] == 1.0
    assert pecker["setup_seconds"] > 0  # the one-shot mask was computed before training
    assert (
        pecker["config"]["seed"] == sfd["config"]["seed"]
        and pecker["config"]["steps"] == sfd["config"]["steps"]
    )


def test_module_entry_point_single_run_with_refresh(tmp_path):
    out = tmp_path / "one"
    cmd = [sys.executable, "-m", "pecker_kernels", "unlearn", "--forget", "5", "--method", "pecker"]
    cmd += ["--refresh-every", "2", "--ratio", "0.25", "--backend", "eager", "--override", "random"]
    proc = subprocess.run([*cmd, *TINY, "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    metrics = check_run(out, "pecker")
    assert metrics["per_step_seconds"]["mask"] > 0  # reselection at steps 1 and 3, timed apart
    assert abs(metrics["updated_fraction"] - 0.25) < 1e-4
    assert metrics["override_class"] == "random"
    assert (out / "summary.md").exists()


def test_distributed_run_under_torchrun_masks_one_global_fraction(tmp_path):
    out = tmp_path / "two-ranks"
    argv = ["unlearn", "--distributed", "--ratio", "0.3", "--refresh-every", "2", *TINY, "--out", str(out)]
    proc = torchrun(2, argv, timeout=300)
    assert proc.returncode == 0, proc.stderr
    metrics = check_run(out, "pecker")
    assert metrics["world_size"] == 2 and metrics["config"]["distributed"]
    # One selection over both ranks' shards: exactly floor(0.3 N) of the N generator weights.
    n = metrics["generator_parameters"]
    assert round(metrics["updated_fraction"] * n) == math.floor(0.3 * n)


def test_distributed_without_torchrun_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(SystemExit, match="runs under torchrun"):
        main(["unlearn", "--distributed", *TINY, "--out", str(tmp_path / "x")])
