"""benchmarks/bench_meta_gradient.py's --cuda-graph contender and phase, run on the CPU with an
eager stand-in for the CUDA graph capture (test_captured_meta_gradient.tree_stand_in): the
bench's own code paths and summary lines, which otherwise run only on a GPU."""
from __future__ import annotations

import torch

from conftest import load_benchmark
from imaml_ext import implicit
from test_captured_meta_gradient import tree_stand_in


def test_cuda_graph_rows_and_summary_lines(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(implicit, "_capture_graph", tree_stand_in(calls))
    bench = load_benchmark("bench_meta_gradient")
    args = bench.build_parser().parse_args(
        ["--settings", "5w1s", "--rounds", "1", "--hvp-repeats", "1", "--cuda-graph",
         "--methods", "imaml-gd"])
    ways, shots, queries, *_ = bench.SETTINGS["5w1s"]
    out = bench.run_setting("5w1s", (ways, shots, queries, 2, 2, 1, 1), args,
                            torch.device("cpu"))
    assert bench.GRAPHED in out["results"] and out["cuda_graph_fallback"] == []
    assert bench.STEP_GRAPHED in out["results"] and out["cuda_graph_step_fallback"] == []
    ph = out["imaml_gd_phases"]
    assert ph["captured_build_and_cg"]["repeats"] == 1
    assert ph["captured_max_rel_diff"] < 1e-5  # float32, the same kernels as the eager solve
    lines = bench._meta_lines(out)
    assert any("graph build + CG as one CUDA graph" in ln for ln in lines)
    assert any("iMAML-GD with cuda_graph=True" in ln and "FAILED" not in ln for ln in lines)
    assert any("iMAML-GD with cuda_graph='step'" in ln and "FAILED" not in ln for ln in lines)
    assert len(calls) == 3  # the two contenders' captures and the phase's
    # each variant's meta-gradient is checked against the default's on the timed tasks
    vc = out["variant_check"]
    assert set(vc) == {bench.GRAPHED, bench.STEP_GRAPHED}
    assert all(c["ok"] and c["rel_diff_vs_imaml_gd"] < 1e-5 for c in vc.values()), vc
    assert "error: --cuda-graph" not in capsys.readouterr().err


def test_cg_phase_ratio_is_timed_in_the_same_rounds():
    """The CG-phase target's ratio: in every round of imaml_gd_phases the solve and its cg_steps
    products alone, at the same phi; the ratio is the median of those rounds' ratios (an earlier
    version divided the phase by a product timed elsewhere, at the initial parameters). Each
    contender's memory is probed in an untimed call, so every timed round is a warm one."""
    bench = load_benchmark("bench_meta_gradient")
    args = bench.build_parser().parse_args(
        ["--settings", "5w1s", "--rounds", "3", "--hvp-repeats", "1", "--methods", "imaml-gd"])
    ways, shots, queries, *_ = bench.SETTINGS["5w1s"]
    out = bench.run_setting("5w1s", (ways, shots, queries, 2, 2, 1, 1), args,
                            torch.device("cpu"))
    ph = out["imaml_gd_phases"]
    r = ph["cg_phase_ratio"]
    cg, alone = ph["cg_with_hvps"]["times_s"], ph["hvps_alone"]["times_s"]
    assert len(cg) == len(alone) == len(r["per_round"]) == 3 and r["hvps"] == args.cg_steps
    assert r["per_round"] == [a / b for a, b in zip(cg, alone)]
    assert r["median"] == sorted(r["per_round"])[1]
    assert r["one_hvp_median_s"] == ph["hvps_alone"]["median_s"] / args.cg_steps
    assert r["solve_iterations_max_per_round"] == [args.cg_steps] * 3
    assert "hvps_alone" not in ph["share_of_total"]
    line = [ln for ln in bench._meta_lines(out) if "CG phase" in ln]
    assert len(line) == 1 and f"= {r['median']:.2f}x its {args.cg_steps} products alone" \
        in line[0] and "median of 3 rounds' ratios" in line[0]
    res = out["results"]["imaml-gd"]
    assert res["repeats"] == 3 and res["peak_bytes"] is not None
    assert "fresh process" in res["peak_memory_method"]


def test_cg_phase_without_cg_steps():
    """cg_steps=0 (no solve): the phases are timed, no ratio is made up."""
    from imaml_ext.models import make_model
    bench = load_benchmark("bench_meta_gradient")
    torch.manual_seed(0)
    model = make_model("omniglot", 5)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    tasks = bench.make_tasks(5, 1, 1, 2, torch.device("cpu"))
    ph = bench.imaml_gd_phases(model, params, tasks, torch.device("cpu"), 1, 2.0, 0.1, 0, 12.0,
                               repeats=1)
    assert "cg_phase_ratio" not in ph and "hvps_alone" not in ph
    assert ph["cg_with_hvps"]["repeats"] == 1


def test_a_failed_correctness_check_takes_no_timings(monkeypatch):
    bench = load_benchmark("bench_meta_gradient")
    monkeypatch.setattr(bench, "correctness", lambda *a, **k: {"passed": False})
    timed = []
    monkeypatch.setattr(bench, "time_once", lambda *a, **k: timed.append(1) or 0.0)
    args = bench.build_parser().parse_args(
        ["--settings", "5w1s", "--rounds", "1", "--hvp-repeats", "1", "--methods", "imaml-gd"])
    ways, shots, queries, *_ = bench.SETTINGS["5w1s"]
    import pytest
    with pytest.raises(SystemExit, match="does not match the peers'"):
        bench.run_setting("5w1s", (ways, shots, queries, 2, 2, 1, 1), args, torch.device("cpu"))
    assert not timed
