"""benchmarks/gpu_summary.py (the table that ends gpu_suite.sh) on committed results: one line
per CG size with its probe, and per-path bandwidth lines for bench_kernels' rows."""
from __future__ import annotations

import shutil
from pathlib import Path

from conftest import load_benchmark

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
