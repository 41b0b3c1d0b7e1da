"""The benchmark harness runs end to end on a tiny plan and writes what it promises."""

import json

import pytest

from benchmarks import bench_step, layouts


def test_ddpm_layout_has_the_published_parameter_count():
    # Ho et al. 2020 report 35.7M parameters for their CIFAR-10 model.
    assert layouts.numel(layouts.ddpm_cifar10()) == pytest.approx(35.7e6, rel=2e-3)


def test_step_benchmark_writes_rows_tables_and_plots(tmp_path, capsys):
    argv = ["--sizes", "1e4", "3e4", "--dtypes", "fp32", "--more-ratios", "--layouts", "unet"]
    bench_step.main([*argv, "--no-compile", "--reps", "3", "--budget", "0.05", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "results.json").read_text())["results"]
    names = {r["name"] for r in rows}
    assert {"torch AdamW (fused)"} <= names and any("SalientAdamW" in n for n in names)
    floor = [r for r in rows if r["name"] == "torch AdamW (fused)"]
    assert all(r["vs_fused_adamw"] == 1.0 for r in floor)
    assert all(r["median_s"] > 0 and r["gb_per_s"] > 0 for r in rows)
    assert all(r["alone"]["median_s"] > 0 and r["alone"]["samples"] >= 1 for r in rows)
    assert all(r["alone"]["vs_fused_adamw"] == 1.0 for r in floor)
    assert (tmp_path / "results.md").read_text().count("| ") > len(rows)
    assert (tmp_path / "time_per_parameter_fp32.png").read_bytes()[:4] == b"\x89PNG"
    assert "Summary" in capsys.readouterr().out


def test_split_layouts_hold_the_flat_sizes_elements_in_equal_tensors():
    from benchmarks import layouts

    assert layouts.split(10, 3) == [(4,), (3,), (3,)]
    args = bench_step.parse(
        ["--sizes", "1e4", "--dtypes", "fp32", "--more-ratios", "--layouts", "--split", "3", "7"]
    )
    shapes = {config.layout: config.shapes for config in bench_step.plan(args)}
    assert set(shapes) == {"flat", "split 3", "split 7"}
    assert [len(shapes[name]) for name in ("flat", "split 3", "split 7")] == [1, 3, 7]
    assert {layouts.numel(list(s)) for s in shapes.values()} == {10_000}
    assert max(s[0] for s in shapes["split 7"]) - min(s[0] for s in shapes["split 7"]) <= 1


def test_ab_step_times_each_build_in_its_own_process_against_fused_adamw(capsys):
    from benchmarks import ab_step

    rows = ab_step.main(
        ["--builds", ".", ".", "--configs", "flat", "--size", "2e4", "--rounds", "1", "--reps", "2"]
    )
    assert [r["build"] for r in rows] == [str(ab_step.HERE)] * 2
    assert all(r["fused_ms"] > 0 and all(r[n] > 0 for n in ab_step.NAMES) for r in rows)
    table = capsys.readouterr().out
    assert table.count("| flat |") == 2 and "x fused, reselect" in table


def test_ab_step_in_bf16_adds_the_bf16_moment_step(capsys):
    from benchmarks import ab_step

    rows = ab_step.main(
        ["--configs", "flat", "--size", "2e4", "--rounds", "1", "--reps", "2", "--dtype", "bf16"]
    )
    assert rows[0]["dtype"] == "bf16" and rows[0][ab_step.LOW_STATE] > 0
    assert f"x fused, {ab_step.LOW_STATE}" in capsys.readouterr().out
