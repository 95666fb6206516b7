"""The paper's Fig. 2a findings on a small instance (float64), through the benchmark script's own
computation: MAML and iMAML approach the exact meta-gradient as inner steps grow, iMAML is more
accurate than MAML at equal finite steps, 2 CG steps leave a terminal error that 5 remove, and
the fused least-squares kernel gives the generic path's numbers."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import load_benchmark

STEPS = (1, 4, 16, 64, 256)


@pytest.fixture(scope="module")
def fig2a():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        mod = load_benchmark("fig2a_meta_gradient")
        yield mod, mod.compute(STEPS, num_tasks=4)
    finally:
        torch.set_num_threads(n)


def test_both_approach_the_exact_meta_gradient(fig2a):
    _, r = fig2a
    for c in ("maml", "imaml_cg5"):
        e = r["errors"][c]
        assert all(b < a for a, b in zip(e, e[1:])), (c, e)
        assert e[-1] < 1e-8, (c, e)


def test_imaml_beats_maml_at_equal_finite_steps(fig2a):
    _, r = fig2a
    for K, em, ei in zip(r["steps"], r["errors"]["maml"], r["errors"]["imaml_cg5"]):
        assert ei < em, (K, ei, em)


def test_two_cg_steps_leave_a_terminal_error_that_five_remove(fig2a):
    _, r = fig2a
    e2, e5 = r["errors"]["imaml_cg2"], r["errors"]["imaml_cg5"]
    assert e2[-1] > 1e-2 and abs(e2[-1] - e2[-2]) < 0.1 * e2[-1]  # a plateau, not convergence
    assert e5[-1] < 1e-8


def test_lstsq_kernel_path_matches_generic_path_and_hf_is_exact(fig2a):
    _, r = fig2a
    for a, b in zip(r["errors"]["imaml_cg5"], r["errors"]["imaml_cg5_lstsq_kernel"]):
        assert abs(a - b) <= 1e-9 * a + 1e-13
    assert max(e for e in r["errors"]["imaml_hf"] if e is not None) < 1e-10
    assert min(r["errors"]["fomaml"]) > 0.1  # no Jacobian: a bias that steps cannot remove


def test_script_writes_png_json_and_prints_table(fig2a, tmp_path, capsys):
    mod, _ = fig2a
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        mod.main(["--steps", "1,4", "--tasks", "2", "--out-dir", str(tmp_path), "--name", "f"])
    finally:
        torch.set_num_threads(n)
    data = json.loads((tmp_path / "f.json").read_text())
    assert data["steps"] == [1, 4] and "environment" in data
    assert (tmp_path / "f.png").stat().st_size > 1000
    assert "imaml_cg5" in capsys.readouterr().out
