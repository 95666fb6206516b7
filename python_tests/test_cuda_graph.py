"""CUDA-only behaviour of the CG loop: a captured graph replays the solve with no host
synchronisation, and the plain callable loop on a GPU never synchronises either."""
from __future__ import annotations

import pytest
import torch

import imaml_ext
from conftest import random_spd
from imaml_ext.linalg import CapturedCG

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def problem(B=6, P=33, dtype=torch.float64):
    A = random_spd(B, P, device="cuda", dtype=dtype)
    b = torch.randn(B, P, device="cuda", dtype=dtype)
    return A, b, lambda v: torch.bmm(A, v.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("use_ext", [None, False])
def test_callable_loop_makes_no_host_sync(use_ext):
    A, b, mv = problem()
    imaml_ext.cg(mv, b, batched=True, max_iter=5, use_ext=use_ext)  # warm-up (lazy init)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        # P = 33 unknowns: more iterations than that, so every system converges (30 left some
        # short of 1e-6 on an H100); the converged ones stop changing without a host test.
        res = imaml_ext.cg(mv, b, batched=True, max_iter=100, rtol=1e-10, use_ext=use_ext)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert res.converged.all()
    torch.testing.assert_close(res.x, torch.linalg.solve(A, b), rtol=1e-6, atol=1e-8)


def test_captured_graph_matches_and_does_not_sync():
    A, b, mv = problem()
    solver = CapturedCG(mv, b, max_iter=60, rtol=1e-12, batched=True)
    b2 = torch.randn_like(b)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        res = solver(b2)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    want = imaml_ext.cg(mv, b2, batched=True, max_iter=60, rtol=1e-12)
    torch.testing.assert_close(res.x, want.x)
    assert torch.equal(res.iterations, want.iterations)
    assert res.converged.all()
    # Captured for a zero start (no A x0 in the graph): a start cannot be given later...
    with pytest.raises(ValueError, match="x0: this solver was captured for a zero start"):
        solver(b2, x0=torch.ones_like(b2))
    # ...but can when the capture had one, and then it is honoured.
    started = CapturedCG(mv, b, torch.zeros_like(b), max_iter=60, rtol=1e-12, batched=True)
    x0 = torch.linalg.solve(A, b2)
    res0 = started(b2, x0=x0)
    assert (res0.iterations == 0).all()
    torch.testing.assert_close(res0.x, x0)


def test_cg_cuda_graph_flag():
    A, b, mv = problem(B=3, P=10)
    res = imaml_ext.cg(mv, b, batched=True, max_iter=40, rtol=1e-12, cuda_graph=True)
    torch.testing.assert_close(res.x, torch.linalg.solve(A, b), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_and_cuda_kernels_agree(dtype):
    A, b, _ = problem(B=4, P=70, dtype=dtype)
    gpu = imaml_ext.cg(A, b, batched=True, max_iter=15, rtol=0.0)
    cpu = imaml_ext.cg(A.cpu(), b.cpu(), batched=True, max_iter=15, rtol=0.0)
    tol = 1e-9 if dtype == torch.float64 else 1e-3
    torch.testing.assert_close(gpu.x.cpu(), cpu.x, rtol=tol, atol=tol)
    assert torch.equal(gpu.status.cpu(), cpu.status)
