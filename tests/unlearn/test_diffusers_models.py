"""``unlearn --model DIR`` on diffusers folders built here from configs: the generator is kept as a
loadable diffusers folder, only the masked fraction of it moves, and a run survives interruption."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from safetensors.torch import load_file

from pecker_kernels.cli import main
from pecker_kernels.unlearn import runs
from pecker_kernels.unlearn.trainer import Distiller

FAST = [
    "--steps", "4", "--batch", "8", "--forget-batch", "4", "--eval-every", "2", "--eval-samples", "8",
    "--final-samples", "4", "--mask-batches", "1", "--teacher-ddim-steps", "2", "--no-progress",
]  # fmt: skip


def generator_weights(out):
    return load_file(out / "generator" / "diffusion_pytorch_model.safetensors")


def test_generator_is_saved_reloadable_and_moved_at_most_the_mask_ratio(rgb_model, tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(
            [
                "unlearn",
                "--model",
                str(rgb_model),
                "--forget",
                "1",
                "--ratio",
                "0.3",
                *FAST,
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "no classifier for this model's data (3x8x8, 4 classes)" in printed  # says why no metrics
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "done" and not (out / "checkpoint").exists()
    g = record["generator"]
    assert (g["class"], g["t_init"], g["shape"], g["num_classes"]) == ("UNet2DModel", 440, [3, 8, 8], 4)
    assert record["schedule"]["beta_start"] == 1e-4 and record["schedule"]["num_train_timesteps"] == 1000

    generator = UNet2DModel.from_pretrained(out / "generator")
    teacher = UNet2DModel.from_pretrained(rgb_model)
    moved = total = 0
    for p, t in zip(generator.parameters(), teacher.parameters(), strict=True):
        moved += int((p != t).sum())
        total += p.numel()
    assert 0 < moved <= math.floor(0.3 * total)  # only the one-shot mask's weights (and their EMA) moved

    grid = tmp_path / "grid.png"
    assert main(["sample", "--run", str(out), "--class", "2", "-n", "12", "--out", str(grid)]) == 0
    assert grid.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit, match=r"--class must be in \[0, 4\)"):
        main(["sample", "--run", str(out), "--class", "4", "--out", str(grid)])


def test_concat_conditioning_pipeline_folder_with_its_own_schedule_and_null_class(concat_pipeline, tmp_path):
    out = tmp_path / "cmp"
    argv = ["unlearn", "--model", str(concat_pipeline), "--null-class", "--compare", "--forget", "0"]
    assert main([*argv, *FAST, "--out", str(out)]) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["model"]["class"] == "UNet2DConditionModel" and record["model"]["null_class"] == 3
    assert record["schedule"]["prediction_type"] == "v_prediction" and record["schedule"]["beta_end"] == 0.012
    for method in ("pecker", "sfd"):
        part = json.loads((out / method / "run.json").read_text())
        assert part["generator"]["num_classes"] == 3 and part["status"] == "done"
        reloaded = UNet2DConditionModel.from_pretrained(out / method / "generator")
        assert reloaded.config.class_embeddings_concat
    assert (
        main(
            ["sample", "--run", str(out / "sfd"), "--class", "2", "-n", "3", "--out", str(tmp_path / "g.png")]
        )
        == 0
    )
    with pytest.raises(SystemExit, match="holds no single generator"):
        main(["sample", "--run", str(out), "--class", "0", "--out", str(tmp_path / "x.png")])


@pytest.mark.parametrize("refresh", ["0", "2"])  # the one-shot mask, and reselection every 2 steps
def test_interrupted_and_crashed_runs_resume_bit_identical(rgb_model, tmp_path, monkeypatch, capsys, refresh):
    argv = ["unlearn", "--model", str(rgb_model), "--refresh-every", refresh, *FAST, "--steps", "5"]
    whole = tmp_path / "whole"
    assert main([*argv, "--out", str(whole)]) == 0

    real_step = Distiller.train_step

    def signal_at_step_2(self):
        real_step(self)
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    cut = tmp_path / "cut"
    monkeypatch.setattr(Distiller, "train_step", signal_at_step_2)
    assert main([*argv, "--checkpoint-every", "100", "--out", str(cut)]) == 128 + signal.SIGINT
    record = json.loads((cut / "run.json").read_text())
    assert record["status"] == "interrupted" and record["step"] == 2
    assert f"unlearn --resume {cut}" in capsys.readouterr().out
    assert not (cut / "generator").exists()

    def crash_at_step_4(self):
        real_step(self)
        if self.step == 4:
            raise RuntimeError("power cut")

    monkeypatch.setattr(Distiller, "train_step", crash_at_step_4)  # as kill -9, after a checkpoint at 3
    cut_args = ["unlearn", "--resume", str(cut), "--no-progress"]
    crashed = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="power cut"):
        main([*argv, "--checkpoint-every", "3", "--out", str(crashed)])
    assert json.loads((crashed / "checkpoint" / "checkpoint.json").read_text())["step"] == 3

    monkeypatch.setattr(Distiller, "train_step", real_step)
    assert main(cut_args) == 0
    assert main(["unlearn", "--resume", str(crashed), "--no-progress"]) == 0
    expected = generator_weights(whole)
    history = json.loads((whole / "history.json").read_text())["train"]
    for folder in (cut, crashed):
        assert json.loads((folder / "run.json").read_text())["status"] == "done"
        got = generator_weights(folder)
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in expected)
        assert json.loads((folder / "history.json").read_text())["train"] == history
    with pytest.raises(SystemExit, match="is finished; nothing to resume"):
        main(cut_args)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_killed_process_keeps_its_checkpoint(rgb_model, tmp_path, sig):
    """SIGTERM: a checkpoint after the current step, exit 143 and the resume command. kill -9: the last
    periodic checkpoint stays, and the lock dies with the process, so the run can be resumed."""
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "pecker_kernels", "unlearn", "--model", str(rgb_model), *FAST]
    cmd += ["--steps", "100000", "--checkpoint-every", "1", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoint" / "checkpoint.json").is_file():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    record = json.loads((out / "run.json").read_text())
    found = runs.find_checkpoint(out)  # kill -9 may land while a checkpoint replaces the last one
    step = json.loads((found.parent / "checkpoint.json").read_text())["step"]
    assert step >= 1 and runs.load_checkpoint(found)["step"] == step
    if sig == signal.SIGTERM:
        assert proc.returncode == 128 + signal.SIGTERM, stderr
        assert "python -m pecker_kernels unlearn --resume" in stdout
        assert record["status"] == "interrupted" and record["step"] == step
    else:
        assert proc.returncode == -signal.SIGKILL
        assert record["status"] == "running"  # as the process left it
        runs.RunLock(out).acquire().release()  # free: --resume may continue it


def test_second_run_into_a_locked_folder_is_refused_at_the_start(rgb_model, tmp_path, monkeypatch):
    monkeypatch.setattr(Distiller, "train_step", lambda self: pytest.fail("trained"))
    out = tmp_path / "busy"
    out.mkdir()
    with runs.RunLock(out):  # another process has just started its run here
        with pytest.raises(SystemExit, match=r"another run \(pid \d+\) is working in"):
            main(["unlearn", "--model", str(rgb_model), *FAST, "--out", str(out)])
    assert sorted(p.name for p in out.iterdir()) == [".lock"]


def test_compare_interrupted_in_its_second_method_resumes_only_that_one(rgb_model, tmp_path, monkeypatch):
    argv = ["unlearn", "--model", str(rgb_model), "--compare", *FAST]
    whole = tmp_path / "whole"
    assert main([*argv, "--out", str(whole)]) == 0

    real_step = Distiller.train_step

    def sigterm_in_sfd(self):
        real_step(self)
        if self.cfg.method == "sfd" and self.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    cut = tmp_path / "cut"
    monkeypatch.setattr(Distiller, "train_step", sigterm_in_sfd)
    assert main([*argv, "--out", str(cut)]) == 128 + signal.SIGTERM
    methods = json.loads((cut / "run.json").read_text())["methods"]
    assert methods == {"pecker": "done", "sfd": "running"}
    pecker_written = (cut / "pecker" / "generator").stat().st_mtime_ns

    monkeypatch.setattr(Distiller, "train_step", real_step)
    assert main(["unlearn", "--resume", str(cut), "--no-progress"]) == 0
    assert (cut / "pecker" / "generator").stat().st_mtime_ns == pecker_written  # not run again
    assert (cut / "compare.md").is_file() and (cut / "compare.png").is_file()
    for method in ("pecker", "sfd"):
        expected, got = generator_weights(whole / method), generator_weights(cut / method)
        assert all(torch.equal(got[k], expected[k]) for k in expected)
