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
    assert "error: --cuda-graph" not in capsys.readouterr().err
