"""benchmarks/gpu_summary.py (the table that ends gpu_suite.sh) on committed results: one line
per CG size with its probe, per-path bandwidth lines for bench_kernels' rows, and the verdicts on
issue 5's GPU targets."""
from __future__ import annotations

import shutil
from pathlib import Path

from conftest import load_benchmark, write_junit

ROOT = Path(__file__).resolve().parent.parent


def test_summary_lines(tmp_path, capsys):
    results = ROOT / "benchmarks" / "results"
    for name in ("cg_cpu.json", "kernels_cuda_h100.json"):
        shutil.copy(results / name, tmp_path / name)
    (tmp_path / "broken.json").write_text("{not json")
    load_benchmark("gpu_summary").main(str(tmp_path))
    out = capsys.readouterr().out.splitlines()
    cg = [line for line in out if line.startswith("cg_cpu: lstsq CG")]
    assert len(cg) == 3 and all("X-passes per iteration" in line for line in cg)
    bw = [line for line in out if "% of copy bandwidth" in line]
    lstsq = [line for line in bw if "cg_solve_lstsq B=1 n=4000 d=4000" in line]
    assert len(lstsq) == 1 and "multi-launch" in lstsq[0] and "default" in lstsq[0]


def test_target_verdicts_from_the_h100_run(tmp_path):
    """The verdicts on the committed H100 run (2026-11-28, tree 1c9644e) are the README's
    figures, read from the files: the lstsq target judged on the default path (37% / 30% of
    copy), the best forced path (58% / 43%, the register tiles with the step epilogue) said
    beside it; the CG phase not judged (that suite timed the phase and the product apart);
    eager HVP 2.40x / 2.29x (MET); the compiled product judged at 5-way 1-shot only (at 20-way
    5-shot its median task differs from eager by 1.3e-2); a failed sync-debug test makes that
    target NOT MET, a skipped one does not count."""
    results = ROOT / "benchmarks" / "results"
    shutil.copy(results / "kernels_cuda_h100.json", tmp_path / "kernels_cuda.json")
    shutil.copy(results / "meta_gradient_cuda_h100.json", tmp_path / "meta_gradient_cuda.json")
    write_junit(tmp_path / "tests_cuda.xml",
                [("t", "test_callable_loop_makes_no_host_sync[None]", ""),
                 ("t", "test_cuda_ops_make_no_host_sync", '<failure message="x"/>'),
                 ("t", "test_captured_graph_matches_and_does_not_sync", '<skipped message="no"/>'),
                 ("t", "test_unrelated_cuda_case", '<failure message="x"/>')])
    lines = list(load_benchmark("gpu_summary").target_lines(str(tmp_path)))
    lstsq = [line for line in lines if line.startswith("TARGET lstsq")]
    assert len(lstsq) == 2 and all("NOT MET, default " in line for line in lstsq)
    assert ("NOT MET, default 37%; best forced path 58% by 'imaml_ext multi-launch, step "
            "epilogue, imaml_ext register tiles' [") in lstsq[0]
    assert "NOT MET, default 30%; best forced path 43% by" in lstsq[1]
    # 128 MiB against the H100's 50 MiB of L2; 61 MiB would be mostly in an H200's 60 MiB
    assert "under twice L2" not in lstsq[0] and "under twice L2" in lstsq[1]
    phase = [line for line in lines if line.startswith("TARGET CG phase")]
    assert len(phase) == 2 and all(": not judged, this file has no same-round" in line
                                   for line in phase)
    hvp = [line for line in lines if line.startswith("TARGET HVP") and "eager exact" in line]
    assert len(hvp) == 2 and ": MET, 2.40x" in hvp[0] and ": MET, 2.29x" in hvp[1]
    comp = [line for line in lines if line.startswith("TARGET HVP") and "compile" in line]
    assert len(comp) == 2 and ": MET, 1.21x" in comp[0]
    assert ": not judged, its product differs from eager by 1.3e-02" in comp[1]
    sync = [line for line in lines if line.startswith("TARGET zero host syncs")]
    assert sync == ["TARGET zero host syncs per solve: NOT MET, 1 of 2 sync-debug tests passed "
                    "(failed: test_cuda_ops_make_no_host_sync)"]


def test_target_verdicts_met_and_the_kernel_decision(tmp_path):
    """A run whose figures meet the targets reads MET (the lstsq row's best path named), the
    compiled product is judged apart, and the op-count probe's timings decide the pooled block's
    CUDA default; missing files are said, not skipped silently."""
    import json
    mod = load_benchmark("gpu_summary")
    assert any("no kernels_cuda" in line for line in mod.target_lines(str(tmp_path)))
    results = ROOT / "benchmarks" / "results"
    k = json.loads((results / "kernels_cuda_h100.json").read_text())
    for i, r in enumerate(r for r in k["cg"] if r["op"] == "cg_solve_lstsq"):
        # the first large row: the default meets it; the second: only a forced path does
        r["fraction_of_copy"]["imaml_ext register tiles"] = 0.81
        r["fraction_of_copy"]["imaml_ext"] = 0.75 if i < 2 else 0.69
    (tmp_path / "kernels_cuda.json").write_text(json.dumps(k))
    m = json.loads((results / "meta_gradient_cuda_h100.json").read_text())
    for r in m["settings"]:
        r["hvp_cost"]["ratio_to_grad"]["exact_per_cg_product"] = 2.4
        r["hvp_cost"]["compiled"] = {"ratio_to_grad": 2.6}
        # the cross-measured ratio (phase / hvp_cost's product) would read 2x: not what counts
        one = r["hvp_cost"][f"hvp_{r['hvp_cost']['exact_method']}"]["median_s"]
        r["imaml_gd_phases"]["cg_with_hvps"]["median_s"] = 2 * r["cg_steps"] * one
        r["imaml_gd_phases"]["cg_phase_ratio"] = {"per_round": [1.02, 1.05, 1.09],
                                                  "median": 1.05, "min": 1.02, "max": 1.09,
                                                  "one_hvp_median_s": one}
    (tmp_path / "meta_gradient_cuda.json").write_text(json.dumps(m))
    p = json.loads((results / "hvp_op_count_cpu.json").read_text())
    t = p["settings"]["5w1s"]["timing"]
    t["own_conv+bn_kernels+cudnn_benchmark"] = {k: v / 2 for k, v in
                                                t["own_conv+bn_kernels"].items()}
    (tmp_path / "hvp_op_count_cuda.json").write_text(json.dumps(p))
    write_junit(tmp_path / "tests_cuda.xml",
                [("t", "test_callable_loop_makes_no_host_sync[None]", "")])
    lines = list(mod.target_lines(str(tmp_path)))
    lstsq = [line for line in lines if line.startswith("TARGET lstsq")]
    assert len(lstsq) == 2
    assert ": MET, default 75%; best forced path 81% by 'imaml_ext register tiles' (reaches " \
        "the target: a candidate for the default) [" in lstsq[0]
    assert ": NOT MET, default 69%; best forced path 81% by 'imaml_ext register tiles'" \
        in lstsq[1]
    assert sum(line.startswith("TARGET CG phase") and ": MET, 1.05x (median of 3 rounds, "
               "1.02-1.09x)" in line for line in lines) == 2
    assert sum("eager exact" in line and ": MET, 2.40x" in line for line in lines) == 2
    assert sum("compile" in line and "NOT MET, 2.60x" in line for line in lines) == 2
    assert any(line.startswith("TARGET zero host syncs per solve: MET, 1 of 1") for line in lines)
    decide = [line for line in lines if line.startswith("DECIDE")]
    assert len(decide) == 3 and sum("keep them the CUDA default" in line for line in decide) == 2
    assert [line for line in decide if "cuDNN" in line][0].startswith(
        "DECIDE cuDNN autotuning (5w1s): gradient 2.00x, product 2.00x faster")


def test_sync_target_reads_every_sync_debug_test():
    """The zero-host-sync verdict counts the tests that run under
    torch.cuda.set_sync_debug_mode("error"): each such test's name must hold one of
    gpu_summary.SYNC_TESTS, so a new or renamed one is not left out of the verdict."""
    import ast
    words = load_benchmark("gpu_summary").SYNC_TESTS
    found = []
    for path in sorted((ROOT / "python_tests").glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_") and any(
                    isinstance(c, ast.Call) and getattr(c.func, "attr", "") ==
                    "set_sync_debug_mode" and c.args and getattr(c.args[0], "value", 0) == "error"
                    for c in ast.walk(node)):
                found.append(node.name)
    assert len(found) >= 5, found
    missed = [n for n in found if not any(w in n for w in words)]
    assert not missed, missed


def test_cg_phase_with_a_solve_cut_short(tmp_path):
    """The ratio prices cg_steps products; a CPU solve whose tasks all stopped earlier made fewer
    and would be flattered: not judged there. A GPU solve makes its masked products anyway:
    judged, with a note."""
    import json
    mod = load_benchmark("gpu_summary")
    m = json.loads((ROOT / "benchmarks" / "results" / "meta_gradient_cuda_h100.json").read_text())
    for r in m["settings"]:
        k = r["cg_steps"]
        r["imaml_gd_phases"]["cg_phase_ratio"] = {
            "per_round": [1.0, 1.02], "median": 1.01, "min": 1.0, "max": 1.02,
            "one_hvp_median_s": 1e-3, "solve_iterations_max_per_round": [k, k - 2]}
    (tmp_path / "meta_gradient_cuda.json").write_text(json.dumps(m))
    lines = [x for x in mod.target_lines(str(tmp_path)) if x.startswith("TARGET CG phase")]
    assert len(lines) == 2 and all(": MET, 1.01x" in x and "every task stopped before" in x
                                   for x in lines), lines
    m["environment"]["device"] = m["args"]["device"] = "cpu"
    (tmp_path / "meta_gradient_cuda.json").write_text(json.dumps(m))
    lines = [x for x in mod.target_lines(str(tmp_path)) if x.startswith("TARGET CG phase")]
    assert len(lines) == 2 and all("not judged, the solve ran fewer than" in x for x in lines)
