"""The CPU kernels under torch's thread counts: the same answers (float64, to rounding) with one
thread and with several, in both thread layouts of csrc/cpu/solve.h (systems spread over the
threads when there are at least as many systems as threads; one system's rows or samples split
over the threads, each into its own accumulator, when there are fewer). The extension runs these
layouts only when it is compiled with OpenMP (build_info()["cpu_parallel"]); before that every
kernel ran on one thread whatever the setting, and these tests would not have run the split paths.
"""
from __future__ import annotations

import pytest
import torch

import imaml_ext
from conftest import random_spd
from imaml_ext import ops

pytestmark = pytest.mark.skipif(not imaml_ext.extension_available(),
                                reason="compiled extension not built")

# (threads, systems): systems spread over threads (B >= threads) and split systems (B < threads).
LAYOUTS = [(2, 5), (2, 1), (3, 2)]


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def with_threads(k, fn):
    torch.set_num_threads(k)
    return fn()


def assert_same(one, many, rtol=1e-12):
    for a, b in zip(one, many):
        if a.is_floating_point():
            scale = float(a.abs().max().clamp(min=1)) if a.numel() else 1.0
            torch.testing.assert_close(b, a, rtol=rtol, atol=rtol * scale)
        else:
            assert torch.equal(a, b), (a, b)


@pytest.mark.parametrize("threads,B", LAYOUTS)
def test_lstsq_ops(threads, B, restore_threads):
    g = torch.Generator().manual_seed(threads * 10 + B)
    n, d = 67, 45  # rows split over the threads in chunks of 16 when B < threads
    X = torch.randn(B, n, d, generator=g, dtype=torch.float64)
    b = torch.randn(B, d, generator=g, dtype=torch.float64)
    def solve():
        return ops.cg_solve_lstsq(X, b, torch.zeros_like(b), 1.0, 1.0 / n, 30, 1e-10, 0.0,
                                  use_ext=True)

    def apply():
        return (ops.lstsq_apply(X, b, 0.5, 1.0 / n, use_ext=True),)

    for fn in (solve, apply):
        assert_same(with_threads(1, fn), with_threads(threads, fn))
    x = with_threads(threads, solve)[0]
    A = torch.eye(d, dtype=X.dtype) + X.transpose(1, 2) @ X / n
    torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("threads,B", LAYOUTS)
def test_dense_solve(threads, B, restore_threads):
    g = torch.Generator().manual_seed(threads * 10 + B)
    P = 150  # rows split over the threads in chunks of 64 when B < threads
    A = random_spd(B, P, dtype=torch.float64, generator=g)
    b = torch.randn(B, P, generator=g, dtype=torch.float64)
    def fn():
        return ops.cg_solve_dense(A, b, torch.zeros_like(b), 400, 1e-12, 0.0, use_ext=True)

    assert_same(with_threads(1, fn), with_threads(threads, fn), rtol=1e-10)


@pytest.mark.parametrize("threads,B", LAYOUTS)
@pytest.mark.parametrize("f,c", [(64, 20), (30, 3)])  # transposed and dot-product products
def test_softmax_head_ops(threads, B, f, c, restore_threads):
    g = torch.Generator().manual_seed(threads * 10 + B + f)
    n = 41  # samples split over the threads in chunks of 4 when B < threads
    F = torch.randn(B, n, f, generator=g, dtype=torch.float64)
    W = 0.3 * torch.randn(B, c, f, generator=g, dtype=torch.float64)
    bias, vb = (torch.randn(B, c, generator=g, dtype=torch.float64) for _ in range(2))
    V = torch.randn(B, c, f, generator=g, dtype=torch.float64)
    rhs = torch.randn(B, c * (f + 1), generator=g, dtype=torch.float64)
    def hvp():
        return ops.softmax_head_hvp(F, W, bias, V, vb, 1.0, 0.5, use_ext=True)

    def solve():
        return ops.cg_solve_softmax_head(F, W, bias, rhs, torch.zeros_like(rhs), 1.0, 0.5, 25,
                                         1e-10, 0.0, use_ext=True)

    for fn in (hvp, solve):
        assert_same(with_threads(1, fn), with_threads(threads, fn), rtol=1e-10)
    ref = ops.softmax_head_hvp(F, W, bias, V, vb, 1.0, 0.5, use_ext=False)
    assert_same(ref, with_threads(threads, hvp), rtol=1e-10)
