"""What an adversarial review of the run folder found: ``--resume`` refuses options it would ignore,
records absolute paths, re-checks a finished run under its lock; training commands never write a NaN
model or replace files they did not make; late failures of out-of-range options happen up front."""

import json
import os
import signal

import pytest

from pecker_kernels.cli import main
from pecker_kernels.unlearn import runs
from pecker_kernels.unlearn.trainer import Distiller

from .test_diffusers_models import FAST


@pytest.fixture
def interrupted(rgb_model, tmp_path, monkeypatch):
    """A run of a relative --model path, interrupted by SIGINT at step 2."""
    real_step = Distiller.train_step

    def signal_at_step_2(self):
        real_step(self)
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(Distiller, "train_step", signal_at_step_2)
    monkeypatch.chdir(rgb_model.parent)
    out = tmp_path / "cut"
    argv = ["unlearn", "--model", rgb_model.name, *FAST, "--steps", "4", "--out", str(out)]
    assert main(argv) == 128 + signal.SIGINT
    monkeypatch.setattr(Distiller, "train_step", real_step)
    return out


def test_resume_refuses_options_it_would_ignore(interrupted):
    with pytest.raises(SystemExit, match="drop --steps, --lr"):
        main(["unlearn", "--resume", str(interrupted), "--steps", "7", "--lr", "0.5", "--no-progress"])
    assert json.loads((interrupted / "run.json").read_text())["status"] == "interrupted"


def test_a_run_records_absolute_paths_and_resumes_from_another_directory(interrupted, rgb_model, monkeypatch):
    record = json.loads((interrupted / "run.json").read_text())
    assert record["options"]["model"] == str(rgb_model.resolve())
    assert str(interrupted.resolve()) in record["resume_command"]
    monkeypatch.chdir(interrupted.parent)
    assert main(["unlearn", "--resume", str(interrupted), "--no-progress"]) == 0
    assert json.loads((interrupted / "run.json").read_text())["status"] == "done"


def test_the_resume_lock_refuses_a_run_that_finished_meanwhile(interrupted):
    record = json.loads((interrupted / "run.json").read_text())
    (interrupted / "run.json").write_text(json.dumps({**record, "status": "done"}))
    with pytest.raises(ValueError, match="is finished"):
        runs.resume_lock(interrupted)


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--seed", str(2**64), r"--seed must be below 2\*\*63"),
        ("--teacher-ddim-steps", "100000", "<= the schedule"),
    ],
)
def test_out_of_range_options_fail_before_the_run_folder_is_made(rgb_model, tmp_path, option, value, message):
    out = tmp_path / "never"
    with pytest.raises(SystemExit, match=message):
        main(["unlearn", "--model", str(rgb_model), *FAST, option, value, "--out", str(out)])
    assert not out.exists()


def test_train_teacher_stops_at_a_non_finite_loss_and_writes_nothing(tmp_path):
    out = tmp_path / "teacher"
    with pytest.raises(SystemExit, match=r"step \d+: the training loss is nan"):
        main(["train-teacher", "--steps", "5", "--batch", "8", "--lr", "1e30", "--out", str(out)])
    assert not out.exists()


def test_train_classifier_refuses_a_json_output_and_an_existing_record(tmp_path):
    with pytest.raises(SystemExit, match="needs another suffix"):
        main(["train-classifier", "--steps", "1", "--batch", "8", "--out", str(tmp_path / "c.json")])
    (tmp_path / "mine.json").write_text("{}")
    with pytest.raises(SystemExit, match=r"mine\.json exists"):
        main(["train-classifier", "--steps", "1", "--batch", "8", "--out", str(tmp_path / "mine.pt")])
    assert (tmp_path / "mine.json").read_text() == "{}"


def test_sample_refuses_a_folder_as_output_and_absurd_counts_before_any_work(interrupted, tmp_path):
    assert main(["unlearn", "--resume", str(interrupted), "--no-progress"]) == 0
    run = ["sample", "--run", str(interrupted), "--class", "1"]
    with pytest.raises(SystemExit, match="is a folder or cannot be written"):
        main([*run, "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"-n must be in \[1, 10000\]"):
        main([*run, "-n", "1000000000", "--out", str(tmp_path / "grid.png")])
