"""The profiling entry point runs a few steps (what `nsys profile ... -m pecker_kernels.profile` times)."""

from pecker_kernels.profile import main


def test_profile_entry_point_runs_steps_and_reports_each(capsys):
    main(["--device", "cpu", "--size", "2e4", "--tensors", "3", "--steps", "2"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["step 1", "step 2"]
