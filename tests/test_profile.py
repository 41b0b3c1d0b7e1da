"""The profiling entry point runs a few steps (what `nsys profile ... -m pecker_kernels.profile` times)."""

from pecker_kernels.profile import main


def test_profile_entry_point_runs_steps_and_reports_each(capsys):
    main(["--device", "cpu", "--size", "2e4", "--tensors", "3", "--steps", "2"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["step 1", "step 2"]


def test_without_the_nvtx_package_ranges_go_through_torch_cuda_nvtx(monkeypatch):
    from pecker_kernels import profiling

    calls = []

    class FakeTorchNvtx:
        def range_push(self, name):
            calls.append(("push", name))

        def range_pop(self):
            calls.append(("pop",))

    monkeypatch.setattr(profiling, "_domain", None)
    monkeypatch.setattr(profiling, "_torch_nvtx", FakeTorchNvtx())
    with profiling.nvtx_range("select"):
        pass
    assert calls == [("push", "pecker_kernels/select"), ("pop",)]


def test_a_cpu_only_torch_marks_no_range_without_the_nvtx_package(monkeypatch):
    from pecker_kernels import profiling

    monkeypatch.setattr(profiling, "_domain", None)
    monkeypatch.setattr(profiling, "_torch_nvtx", None)
    with profiling.nvtx_range("update"):
        pass
    assert profiling._torch_nvtx is False  # torch here has no CUDA
