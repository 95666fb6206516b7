"""The whole-loop solver ops (dense and structured least squares) and lstsq_apply, against the
reference twins and torch.linalg.solve."""
from __future__ import annotations

import pytest
import torch

from conftest import assert_within_reference_error, random_spd
from imaml_ext import ops, reference

needs_ext = pytest.mark.skipif(not __import__("imaml_ext").extension_available(),
                               reason="compiled extension not built")
BOTH = [pytest.param(True, marks=needs_ext, id="ext"), pytest.param(False, id="ref")]


def lstsq_problem(B, n, d, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(B, n, d, dtype=torch.float64, generator=g)
    b = torch.randn(B, d, dtype=torch.float64, generator=g)
    return X.to(device, dtype), b.to(device, dtype)


@pytest.mark.parametrize("use_ext", BOTH)
@pytest.mark.parametrize("B,P", [(1, 1), (1, 8), (3, 31), (5, 64)])
def test_dense_solves_spd(B, P, device, use_ext):
    g = torch.Generator().manual_seed(B * 100 + P)
    A = random_spd(B, P, generator=g, device=device)
    b = torch.randn(B, P, dtype=torch.float64, generator=g).to(device)
    x, iters, rnorm, status = ops.cg_solve_dense(A, b, torch.zeros_like(b), 4 * P + 10, 1e-12, 0.0,
                                                 use_ext=use_ext)
    torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=1e-8, atol=1e-10)
    assert (status == reference.CONVERGED).all()
    assert (iters <= 4 * P + 10).all() and (iters >= 1).all()
    assert (rnorm <= 1e-12 * b.norm(dim=-1) + 1e-300).all()


@needs_ext
@pytest.mark.parametrize("B,P", [(1, 3), (4, 47), (2, 300)])
def test_dense_matches_reference(B, P, device, dtype):
    g = torch.Generator().manual_seed(P)
    A64 = random_spd(B, P, generator=g, device=device)
    b64 = torch.randn(B, P, dtype=torch.float64, generator=g).to(device)
    A, b = A64.to(dtype), b64.to(dtype)
    x0 = torch.zeros_like(b)
    ext = ops.cg_solve_dense(A, b, x0, 6, 0.0, 0.0, use_ext=True)
    ref = ops.cg_solve_dense(A, b, x0, 6, 0.0, 0.0, use_ext=False)
    truth = ops.cg_solve_dense(A.double(), b.double(), x0.double(), 6, 0.0, 0.0, use_ext=False)
    assert torch.equal(ext[1], ref[1]) and torch.equal(ext[3], ref[3])
    if dtype == torch.float64:
        torch.testing.assert_close(ext[0], ref[0], rtol=1e-10, atol=1e-12)
    else:
        assert_within_reference_error(ext[0], ref[0], truth[0])


@pytest.mark.parametrize("use_ext", BOTH)
@pytest.mark.parametrize("B,n,d", [(1, 1, 1), (1, 20, 7), (3, 50, 33), (2, 9, 130)])
def test_lstsq_solves(B, n, d, device, use_ext):
    X, b = lstsq_problem(B, n, d, torch.float64, device)
    lam = 0.7
    shift, scale = 1.0, 1.0 / (n * lam)
    x, iters, rnorm, status = ops.cg_solve_lstsq(X, b, torch.zeros_like(b), shift, scale, 300,
                                                 1e-12, 0.0, use_ext=use_ext)
    A = shift * torch.eye(d, dtype=X.dtype, device=device) + scale * X.transpose(1, 2) @ X
    torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=1e-8, atol=1e-10)
    assert (status == reference.CONVERGED).all()


@needs_ext
@pytest.mark.parametrize("B,n,d", [(1, 40, 17), (4, 33, 65), (2, 500, 200)])
def test_lstsq_matches_reference(B, n, d, device, dtype):
    X64, b64 = lstsq_problem(B, n, d, torch.float64, device, seed=d)
    X, b = X64.to(dtype), b64.to(dtype)
    x0 = torch.zeros_like(b)
    args = (1.0, 1.0 / n, 5, 0.0, 0.0)
    ext = ops.cg_solve_lstsq(X, b, x0, *args, use_ext=True)
    ref = ops.cg_solve_lstsq(X, b, x0, *args, use_ext=False)
    truth = ops.cg_solve_lstsq(X.double(), b.double(), x0.double(), *args, use_ext=False)
    assert torch.equal(ext[1], ref[1]) and torch.equal(ext[3], ref[3])
    if dtype == torch.float64:
        torch.testing.assert_close(ext[0], ref[0], rtol=1e-10, atol=1e-12)
    else:
        assert_within_reference_error(ext[0], ref[0], truth[0])


@needs_ext
@pytest.mark.parametrize("threads", [1, 2])
def test_lstsq_rows_split_over_threads(threads):
    # 2.9 MB of X per system in float64: more than one core's L2 here (2 MiB) and less than two
    # cores' together, so with two threads the systems run in turn with each X's rows split over
    # the threads (solve.h, split_rows); with one thread each system runs whole. Systems stop at
    # different iterations (early stop per system); both layouts must agree with the reference.
    X, b = lstsq_problem(3, 300, 1200, torch.float64, "cpu", seed=5)
    X[1] *= 3.0  # a worse-conditioned system: more iterations than the others
    x0 = torch.zeros_like(b)
    args = (1.0, 1.0 / 300, 200, 1e-9, 0.0)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        ext = ops.cg_solve_lstsq(X, b, x0, *args, use_ext=True)
    finally:
        torch.set_num_threads(n)
    ref = ops.cg_solve_lstsq(X, b, x0, *args, use_ext=False)
    assert torch.equal(ext[1], ref[1]) and torch.equal(ext[3], ref[3])
    assert len(set(ref[1].tolist())) > 1, "the systems should stop at different iterations"
    torch.testing.assert_close(ext[0], ref[0], rtol=1e-10, atol=1e-12)


@needs_ext
def test_dense_rows_split_over_threads():
    # 2.9 MB per system (P = 600, float64): split over two threads' L2 caches like the
    # least-squares test above; rows swept in alternating directions; systems stop apart. Each
    # row's dot product does not depend on the thread that takes it, so one and two threads
    # must agree bit for bit.
    g = torch.Generator().manual_seed(11)
    A = random_spd(3, 600, generator=g)
    A[2] += 40 * torch.eye(600, dtype=A.dtype)  # better conditioned: stops earlier
    b = torch.randn(3, 600, dtype=torch.float64, generator=g)
    n = torch.get_num_threads()
    got = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            got[threads] = ops.cg_solve_dense(A, b, torch.zeros_like(b), 300, 1e-9, 0.0,
                                              use_ext=True)
    finally:
        torch.set_num_threads(n)
    ref = ops.cg_solve_dense(A, b, torch.zeros_like(b), 300, 1e-9, 0.0, use_ext=False)
    for a, c in zip(got[1], got[2]):
        assert torch.equal(a, c)
    ext = got[2]
    assert torch.equal(ext[1], ref[1]) and torch.equal(ext[3], ref[3])
    assert len(set(ref[1].tolist())) > 1, "the systems should stop at different iterations"
    # dozens of iterations in a different summation order: compare against ||x||
    assert ((ext[0] - ref[0]).norm(dim=-1) <= 1e-10 * ref[0].norm(dim=-1)).all()


@needs_ext
@pytest.mark.parametrize("B,n,d", [(1, 1, 1), (3, 17, 29), (2, 64, 1000), (0, 5, 4)])
def test_lstsq_apply_matches_reference(B, n, d, device, dtype):
    X64, v64 = lstsq_problem(B, n, d, torch.float64, device)
    check_lstsq_apply(X64.to(dtype), X64, v64, dtype)


def check_lstsq_apply(X, X64, v64, dtype):
    """The op on X (any layout; X64's values) against the reference twin: to 1e-10 in float64,
    within the twin's own error in float32."""
    n = X.shape[1]
    v = v64.to(dtype)
    ext = ops.lstsq_apply(X, v, 0.3, 1.0 / n, use_ext=True)
    ref = ops.lstsq_apply(X64.to(dtype), v, 0.3, 1.0 / n, use_ext=False)
    truth = ops.lstsq_apply(X64, v64, 0.3, 1.0 / n, use_ext=False)
    if dtype == torch.float64:
        torch.testing.assert_close(ext, ref, rtol=1e-10, atol=1e-12)
    else:
        assert_within_reference_error(ext, ref, truth)


def set_env(monkeypatch, name, value):
    """value, or unset (the default) for None."""
    if value is None:
        monkeypatch.delenv(name, raising=False)
    else:
        monkeypatch.setenv(name, value)


@needs_ext
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("step", ["separate", "epilogue", None], ids=["separate", "epilogue",
                                                                     "default_step"])
@pytest.mark.parametrize("kernel", ["rows", "tiles", "bulk", "prefetch", None],
                         ids=["rows", "tiles", "bulk", "prefetch", "default"])
def test_cuda_lstsq_product_kernels(kernel, step, dtype, monkeypatch):
    # IMAML_CUDA_XTXV selects the CUDA least-squares product: "tiles" (rows held in registers,
    # read once) where it applies, "bulk" the same fed by the copy engine through a ring of
    # shared-memory stages (sm_90), "prefetch" tiles asking L2 for each block's next tile (the
    # n = 5000 and 20000 shapes stride over several; partial last tiles bound the prefetch), "rows"
    # the row kernel, unset tiles in the CG loop and for a
    # lone product larger than L2. Shapes cover 1, 2 and 4 column groups per
    # thread in both dtypes, row counts that leave a partial tile, blocks that stride over several
    # tiles (n = 5000; n = 20000, d = 256: about ten tiles per block, so the bulk kernel's ring
    # wraps several times), d too wide for the register kernels (float64 d = 4000), an unaligned X
    # (the scalar kernel), and the multi-launch solver with zero and nonzero starts (its mask
    # skips systems). IMAML_CUDA_CG_STEP=epilogue (the default) runs that solver's CG step in the
    # product kernel, "separate" as launches of its own.
    set_env(monkeypatch, "IMAML_CUDA_XTXV", kernel)
    set_env(monkeypatch, "IMAML_CUDA_CG_STEP", step)
    monkeypatch.setenv("IMAML_CG_FUSED", "0")
    for B, n, d in ((1, 1, 4), (3, 37, 1000), (2, 5, 2000), (1, 300, 4000), (2, 7, 36),
                    (1, 5000, 1000), (1, 20000, 256)):
        X64, v64 = lstsq_problem(B, n, d, torch.float64, "cuda", seed=n + d)
        X, v = X64.to(dtype), v64.to(dtype)
        unaligned = torch.empty(X.numel() + 1, dtype=dtype, device="cuda")[1:].view(X.shape)
        for Xk in (X, unaligned.copy_(X)):
            check_lstsq_apply(Xk, X64, v64, dtype)
        x0 = torch.randn_like(v)
        x0[0] = 0.0
        # No tolerance and fewer iterations than the operator's distinct eigenvalues (rank n + 1):
        # every system runs them all in both, away from the rounding noise after exact convergence.
        args = (1.0, 1.0 / n, min(4, n), 0.0, 0.0)
        got = ops.cg_solve_lstsq(X, v, x0, *args, use_ext=True)
        want = ops.cg_solve_lstsq(X, v, x0, *args, use_ext=False)
        assert torch.equal(got[1], want[1]) and torch.equal(got[3], want[3])
        tol = 1e-9 if dtype == torch.float64 else 1e-3
        assert ((got[0] - want[0]).norm() <= tol * want[0].norm()).item(), (B, n, d)
    # Repeated products leave the accumulators zero: a second call gives the same answer, up to
    # the order of the float atomics (a stale accumulator would double the product). Measured on
    # an H100: float32 elements differ by up to 3e-5 relative where a sum cancels, so the check is
    # on the norm, not elementwise.
    X, v = lstsq_problem(2, 50, 1000, dtype, "cuda", seed=5)
    first = ops.lstsq_apply(X, v, 0.0, 1.0, use_ext=True)
    second = ops.lstsq_apply(X, v, 0.0, 1.0, use_ext=True)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert ((second - first).norm() <= tol * first.norm()).item()


@needs_ext
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("case", ["row product", "fused lstsq", "fused dense"])
def test_cuda_kernels_just_under_the_default_shared_memory_limit(case, dtype, monkeypatch):
    # Dynamic shared memory at or just under 48 KB, which with the kernel's static arrays is over
    # the default limit: the launch failed ("invalid argument") where the limit was raised only
    # above 48 KB of dynamic memory (found by reading, 2026-11-29; not yet seen on a card).
    f32 = dtype == torch.float32
    if case == "row product":  # (d + 12) * 4 or 8 bytes, odd d: the row kernel
        monkeypatch.setenv("IMAML_CUDA_XTXV", "rows")
        X64, v64 = lstsq_problem(2, 8, 12251 if f32 else 6125, torch.float64, "cuda", seed=3)
        check_lstsq_apply(X64.to(dtype), X64, v64, dtype)
        return
    monkeypatch.setenv("IMAML_CG_FUSED", "1")
    args = (4, 0.0, 0.0)  # iterations, no tolerance: both run them all
    if case == "fused lstsq":  # (d + n + 4) * 4 or 8 bytes
        X64, b64 = lstsq_problem(2, 12, 12264 if f32 else 6130, torch.float64, "cuda", seed=4)
        run = lambda X, b, ext: ops.cg_solve_lstsq(X, b, torch.zeros_like(b), 1.0,  # noqa: E731
                                                   1.0 / 12, *args, use_ext=ext)
        inputs = (X64, b64)
    else:  # P * 4 or 8 bytes: exactly 48 KB
        P = 12288 if f32 else 6144
        g = torch.Generator(device="cuda").manual_seed(5)
        M = torch.randn(1, P, P, dtype=torch.float64, device="cuda", generator=g)
        A64 = torch.eye(P, dtype=torch.float64, device="cuda") + (M + M.mT) * (0.125 / P ** 0.5)
        del M
        b64 = torch.randn(1, P, dtype=torch.float64, device="cuda", generator=g)
        run = lambda A, b, ext: ops.cg_solve_dense(A, b, torch.zeros_like(b), *args,  # noqa: E731
                                                   use_ext=ext)
        inputs = (A64, b64)
    got = run(*(t.to(dtype) for t in inputs), True)
    want = run(*inputs, False)
    assert torch.equal(got[1], want[1]) and torch.equal(got[3], want[3])
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert ((got[0].double() - want[0]).norm() <= tol * want[0].norm()).item(), case


@needs_ext
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("fused", ["1", "0"], ids=["one_launch", "multi_launch"])
def test_cuda_structured_solvers_make_no_host_sync(fused, monkeypatch):
    # The whole-loop solvers the least-squares bandwidth target times (one launch, or the fixed
    # sequence of launches for data too large for one block): no host synchronisation anywhere
    # in a solve (the suite's zero-host-sync verdict reads this test with the others)
    monkeypatch.setenv("IMAML_CG_FUSED", fused)
    X, b = lstsq_problem(3, 40, 300, torch.float32, "cuda", seed=1)
    A = random_spd(3, 64, device="cuda", dtype=torch.float32)
    bd = torch.randn(3, 64, device="cuda")
    g = torch.Generator().manual_seed(2)
    F = torch.randn(3, 30, 16, generator=g).cuda()
    W = (torch.randn(3, 5, 16, generator=g) * 0.25).cuda()
    bias = torch.randn(3, 5, generator=g).cuda()
    bh = torch.randn(3, 5 * 17, generator=g).cuda()

    def solves():
        return (ops.cg_solve_lstsq(X, b, torch.zeros_like(b), 1.0, 1.0 / 40, 20, 1e-6, 0.0,
                                   use_ext=True),
                ops.cg_solve_dense(A, bd, torch.zeros_like(bd), 20, 1e-6, 0.0, use_ext=True),
                ops.cg_solve_softmax_head(F, W, bias, bh, torch.zeros_like(bh), 1.0, 1.0, 20,
                                          1e-6, 0.0, use_ext=True))
    want = solves()  # warm-up (lazy initialisation, the kernels' attribute queries)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = solves()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for a, w in zip(got, want):  # the same solves (float atomics' order aside)
        assert ((a[0] - w[0]).norm() <= 1e-3 * w[0].norm()).item()


@needs_ext
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name", ["IMAML_CUDA_XTXV", "IMAML_CUDA_CG_STEP", "IMAML_CG_FUSED"])
def test_cuda_lstsq_path_switch_with_an_unknown_value_is_refused(name, monkeypatch):
    monkeypatch.setenv("IMAML_CG_FUSED", "0")  # the multi-launch loop, where all are read
    monkeypatch.setenv(name, "fast")
    X, b = lstsq_problem(2, 30, 64, torch.float32, "cuda")
    with pytest.raises(ValueError, match=f"{name} must be .* got 'fast'"):
        ops.cg_solve_lstsq(X, b, torch.zeros_like(b), 1.0, 1.0 / 30, 5, 0.0, 0.0, use_ext=True)


@needs_ext
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("kernel", ["rows", "tiles", "bulk", "prefetch"])
def test_cuda_lstsq_step_epilogue_stops_each_system(kernel, monkeypatch):
    # The CG step as the product's epilogue (IMAML_CUDA_CG_STEP=epilogue), systems converging
    # after different iteration counts: each stops on its own, with the reference's iteration
    # count, status and residual (float64, so the counts are exact).
    monkeypatch.setenv("IMAML_CUDA_XTXV", kernel)
    monkeypatch.setenv("IMAML_CG_FUSED", "0")
    monkeypatch.setenv("IMAML_CUDA_CG_STEP", "epilogue")
    X, b = lstsq_problem(4, 60, 400, torch.float64, "cuda", seed=3)
    X = X * torch.tensor([0.1, 1.0, 3.0, 10.0], dtype=X.dtype, device="cuda").view(4, 1, 1)
    b[2] = 0.0  # converged before the first iteration
    args = (torch.zeros_like(b), 1.0, 1.0 / 60, 200, 1e-9, 0.0)
    got = ops.cg_solve_lstsq(X, b, *args, use_ext=True)
    want = ops.cg_solve_lstsq(X, b, *args, use_ext=False)
    assert torch.equal(got[1], want[1]) and torch.equal(got[3], want[3])
    assert len(set(got[1].tolist())) >= 3 and (got[3] == 1).all()
    torch.testing.assert_close(got[0], want[0], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got[2], want[2], rtol=1e-6, atol=1e-14)


@needs_ext
@pytest.mark.parametrize("d", [700, 70000], ids=["kernels", "wide"])
def test_non_finite_operator_from_zero_and_nonzero_starts(d, device):
    """An operator with an Inf, systems started from x0 = 0 and from x0 != 0: the ops and the
    twin agree on status, count and residual norm. From x0 = 0 nobody forms A x0 (r0 = b), so
    the Inf is met at the first product: non-finite after 0 iterations, ||r|| = ||b||, x = 0.
    d = 70000 is wider than the CUDA kernels' shared memory (two batched products instead,
    which once formed A x0 for every system and reported a NaN norm)."""
    X, b = lstsq_problem(3, 3, d, torch.float64, device, seed=d)
    X[0, 1, 5] = float("inf")
    x0 = torch.randn_like(b)
    x0[0] = 0.0
    x0[2] = 0.0
    args = (1.0, 1.0 / 3, 5, 0.0, 0.0)
    got = ops.cg_solve_lstsq(X, b, x0, *args, use_ext=True)
    want = ops.cg_solve_lstsq(X, b, x0, *args, use_ext=False)
    assert got[1].tolist() == want[1].tolist() == [0, 5, 5]
    assert got[3].tolist() == want[3].tolist() == [reference.NONFINITE, 0, 0]
    for res in (got, want):
        assert res[2][0].item() == pytest.approx(b[0].norm().item(), rel=1e-12)
        assert (res[0][0] == 0).all() and torch.isfinite(res[2]).all()
    torch.testing.assert_close(got[0], want[0], rtol=1e-8, atol=1e-10)
    # the dense op through the same solver set-up
    A = X.transpose(1, 2)[:, :40, :] @ X[:, :, :40] / 3 + torch.eye(40, dtype=X.dtype,
                                                                      device=device)
    bd, xd = b[:, :40].contiguous(), x0[:, :40].contiguous()
    A[1, 0, 0] = float("nan")
    got = ops.cg_solve_dense(A, bd, xd, 5, 0.0, 0.0, use_ext=True)
    want = ops.cg_solve_dense(A, bd, xd, 5, 0.0, 0.0, use_ext=False)
    assert got[1].tolist() == want[1].tolist() and got[3].tolist() == want[3].tolist()
    torch.testing.assert_close(got[2], want[2], rtol=1e-8, atol=1e-10, equal_nan=True)


@pytest.mark.parametrize("use_ext", BOTH)
def test_non_contiguous_inputs(device, use_ext):
    X, b = lstsq_problem(2, 30, 12, torch.float64, device)
    Xt = X.transpose(1, 2).contiguous().transpose(1, 2)  # same values, column-major strides
    bt = torch.stack([b, b], dim=-1)[..., 0]             # strided view
    assert not Xt.is_contiguous() and not bt.is_contiguous()
    got = ops.cg_solve_lstsq(Xt, bt, torch.zeros_like(b), 1.0, 0.1, 50, 1e-12, 0.0, use_ext=use_ext)
    want = ops.cg_solve_lstsq(X, b, torch.zeros_like(b), 1.0, 0.1, 50, 1e-12, 0.0, use_ext=False)
    torch.testing.assert_close(got[0], want[0])


@pytest.mark.parametrize("use_ext", BOTH)
def test_zero_rhs_returns_zeros_in_zero_iterations(device, use_ext):
    A = random_spd(3, 6, device=device)
    b = torch.zeros(3, 6, dtype=torch.float64, device=device)
    x, iters, rnorm, status = ops.cg_solve_dense(A, b, torch.zeros_like(b), 10, 1e-6, 0.0,
                                                 use_ext=use_ext)
    assert torch.equal(x, torch.zeros_like(b))
    assert iters.tolist() == [0, 0, 0] and (status == reference.CONVERGED).all()


@pytest.mark.parametrize("use_ext", BOTH)
def test_max_iter_reached_is_not_converged(device, use_ext):
    A = random_spd(2, 40, cond=1e4, device=device)
    b = torch.randn(2, 40, dtype=torch.float64, device=device)
    x, iters, rnorm, status = ops.cg_solve_dense(A, b, torch.zeros_like(b), 3, 1e-14, 0.0,
                                                 use_ext=use_ext)
    assert iters.tolist() == [3, 3] and (status == reference.RUNNING).all()


@pytest.mark.parametrize("use_ext", BOTH)
def test_indefinite_system_flagged_and_finite(device, use_ext):
    A = random_spd(2, 10, device=device)
    A[1] -= 50 * torch.eye(10, dtype=A.dtype, device=device)  # eigenvalues in [-49, 50]
    b = torch.randn(2, 10, dtype=torch.float64, device=device)
    x, iters, rnorm, status = ops.cg_solve_dense(A, b, torch.zeros_like(b), 100, 1e-12, 0.0,
                                                 use_ext=use_ext)
    assert status.tolist()[0] == reference.CONVERGED
    assert status.tolist()[1] in (reference.NEGATIVE_CURVATURE, reference.CONVERGED)
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("use_ext", BOTH)
def test_nonfinite_rhs_flagged(device, use_ext):
    A = random_spd(2, 5, device=device)
    b = torch.randn(2, 5, dtype=torch.float64, device=device)
    b[0, 1] = float("inf")
    x, iters, rnorm, status = ops.cg_solve_dense(A, b, torch.zeros_like(b), 20, 1e-10, 0.0,
                                                 use_ext=use_ext)
    assert status.tolist() == [reference.NONFINITE, reference.CONVERGED]
    assert torch.isfinite(x).all()


@needs_ext
@pytest.mark.parametrize("start", ["zero", "nonzero"])
def test_nonfinite_operator_flagged_like_reference(device, start):
    # From x0 = 0 the kernels skip the product A x0 (r0 = b); a NaN or inf in X must still stop
    # that system as non-finite, at the same iteration as the reference (which forms A x0).
    X, b = lstsq_problem(3, 12, 9, torch.float64, device, seed=3)
    X[0, 4, 2] = float("nan")
    X[2, 0, 0] = float("inf")
    x0 = torch.zeros_like(b) if start == "zero" else torch.full_like(b, 0.5)
    ext = ops.cg_solve_lstsq(X, b, x0, 1.0, 0.1, 30, 1e-10, 0.0, use_ext=True)
    ref = ops.cg_solve_lstsq(X, b, x0, 1.0, 0.1, 30, 1e-10, 0.0, use_ext=False)
    assert ext[3].tolist() == [reference.NONFINITE, reference.CONVERGED, reference.NONFINITE]
    assert torch.equal(ext[1], ref[1]) and torch.equal(ext[3], ref[3])
    assert torch.isfinite(ext[0]).all()


@needs_ext
def test_opcheck_solvers(device):
    A = random_spd(2, 7, device=device)
    b = torch.randn(2, 7, dtype=torch.float64, device=device)
    torch.library.opcheck(torch.ops.imaml_ext.cg_solve_dense.default,
                          (A, b, torch.zeros_like(b), 5, 1e-8, 0.0))
    X, v = lstsq_problem(2, 9, 7, torch.float64, device)
    torch.library.opcheck(torch.ops.imaml_ext.cg_solve_lstsq.default,
                          (X, v, torch.zeros_like(v), 1.0, 0.5, 5, 1e-8, 0.0))
    torch.library.opcheck(torch.ops.imaml_ext.lstsq_apply.default, (X, v, 0.0, 1.0 / 9))


@pytest.mark.parametrize("use_ext", BOTH)
@pytest.mark.parametrize("call,match", [
    (lambda X, b, u: ops.cg_solve_lstsq(X, b, torch.zeros_like(b), 1.0, 1.0, 0, 1e-6, 0.0,
                                        use_ext=u), "max_iter must be >= 1"),
    (lambda X, b, u: ops.cg_solve_lstsq(X, b, torch.zeros_like(b), 1.0, 1.0, 5, 1e-6, -1.0,
                                        use_ext=u), "atol must be finite and >= 0"),
    (lambda X, b, u: ops.cg_solve_lstsq(X, b[:, :-1], torch.zeros_like(b[:, :-1]), 1.0, 1.0, 5,
                                        1e-6, 0.0, use_ext=u), "must be \\(2, 6\\) to match X"),
    (lambda X, b, u: ops.cg_solve_lstsq(X.float(), b, torch.zeros_like(b), 1.0, 1.0, 5, 1e-6, 0.0,
                                        use_ext=u), "X must have dtype"),
    (lambda X, b, u: ops.cg_solve_lstsq(X, b, torch.zeros(2, 5, dtype=b.dtype), 1.0, 1.0, 5,
                                        1e-6, 0.0, use_ext=u), "x0 must be"),
    (lambda X, b, u: ops.cg_solve_dense(X, b, torch.zeros_like(b), 5, 1e-6, 0.0, use_ext=u),
     "A must be \\(2, 6, 6\\)"),
])
def test_bad_arguments(use_ext, call, match):
    X, b = lstsq_problem(2, 4, 6, torch.float64, "cpu")
    with pytest.raises(ValueError, match=match):
        call(X, b, use_ext)


def test_reference_refuses_a_fractional_max_iter():
    # int(2.5) ran 2 iterations; the compiled op's schema refuses a float (RuntimeError)
    X, b = lstsq_problem(2, 4, 6, torch.float64, "cpu")
    with pytest.raises(ValueError, match="cg_solve_lstsq: max_iter must be an int, got 2.5"):
        ops.cg_solve_lstsq(X, b, torch.zeros_like(b), 1.0, 1.0, 2.5, 1e-6, 0.0, use_ext=False)


@needs_ext
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_float_atomics_honour_deterministic_mode():
    """The CUDA least-squares and softmax-head products add per-block sums with float atomics
    when a system has several blocks: under torch.use_deterministic_algorithms(True) they raise
    (warn with warn_only=True), as ATen's own such ops do; one block per system, the two-bmm
    route and the PyTorch twin run."""
    X, v = lstsq_problem(2, 5000, 256, torch.float32, "cuda")
    c, f = 5, 64
    F = torch.randn(2, 5000, f, device="cuda")
    W, bias = torch.randn(2, c, f, device="cuda"), torch.randn(2, c, device="cuda")
    V, vb = torch.randn_like(W), torch.randn_like(bias)
    was, warn_only = (torch.are_deterministic_algorithms_enabled(),
                      torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        torch.use_deterministic_algorithms(True)
        with pytest.raises(RuntimeError, match="least-squares product .* deterministic"):
            ops.lstsq_apply(X, v, 0.0, 1.0, use_ext=True)
            torch.cuda.synchronize()
        with pytest.raises(RuntimeError, match="softmax-head Hessian product .* deterministic"):
            ops.softmax_head_hvp(F, W, bias, V, vb, 0.0, 1.0, use_ext=True)
        ops.lstsq_apply(X, v, 0.0, 1.0, use_ext=False)
        ops.lstsq_apply(X[:, :3], v, 0.0, 1.0, use_ext=True)  # one block per system
        wide, vw = lstsq_problem(1, 2, 70000, torch.float32, "cuda")  # the two-bmm route
        ops.lstsq_apply(wide, vw, 0.0, 1.0, use_ext=True)
        torch.use_deterministic_algorithms(True, warn_only=True)
        with pytest.warns(UserWarning, match="least-squares product"):
            ops.lstsq_apply(X, v, 0.0, 1.0, use_ext=True)
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn_only)


@needs_ext
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("fused", ["1", "0"], ids=["one_launch", "multi_launch"])
def test_cuda_more_systems_than_one_grid_holds(fused, monkeypatch):
    # The chunked kernels put the systems on gridDim.y (at most 65535): every op refused more
    # on CUDA, where the CPU takes any count; they now run in runs of 65535, equal to the twins
    monkeypatch.setenv("IMAML_CG_FUSED", fused)
    import imaml_ext
    B, dt, dev = 65535 + 9, torch.float64, "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    b = torch.randn(B, 3, generator=g, device=dev, dtype=dt)
    diag = 1 + torch.rand(B, 3, generator=g, device=dev, dtype=dt)
    A = torch.diag_embed(diag)
    X = torch.randn(B, 4, 3, generator=g, device=dev, dtype=dt)
    F = torch.randn(B, 5, 3, generator=g, device=dev, dtype=dt)
    W = torch.randn(B, 2, 3, generator=g, device=dev, dtype=dt)
    bias = torch.randn(B, 2, generator=g, device=dev, dtype=dt)
    x0 = torch.zeros_like(b)
    bh = torch.randn(B, 8, generator=g, device=dev, dtype=dt)

    def same(got, want, what):
        for i, (u, v) in enumerate(zip(got, want)):
            if u.is_floating_point():
                torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-12, msg=f"{what}[{i}]")
            else:
                assert torch.equal(u, v), f"{what}[{i}]"

    both = lambda f: [f(u) for u in (True, False)]  # noqa: E731
    ext, ref = both(lambda u: ops.cg_begin(b, 1e-8, 0.0, True, use_ext=u))
    same(ext, ref, "cg_begin")
    states = [[t.clone() for t in ext[:7]] for _ in range(2)]
    for u, (x, r, p, rs, bn, st, it) in zip((True, False), states):
        ops.cg_step_(x, r, p, diag * p, rs, bn, st, it, 1e-8, 0.0, use_ext=u)
    same(states[0], states[1], "cg_step")
    same(*both(lambda u: ops.cg_end(states[0][0], states[0][3], states[0][5], states[0][6],
                                    ext[7], use_ext=u)), "cg_end")
    same(*both(lambda u: ops.cg_solve_dense(A, b, x0, 5, 1e-10, 0.0, use_ext=u)), "dense")
    same(*both(lambda u: ops.cg_solve_lstsq(X, b, x0, 0.5, 1.0, 5, 1e-10, 0.0, use_ext=u)),
         "lstsq")
    same(*both(lambda u: (ops.lstsq_apply(X, b, 0.5, 1.0, use_ext=u),)), "lstsq_apply")
    same(*both(lambda u: ops.softmax_head_hvp(F, W, bias, W, bias, 0.5, 1.0, use_ext=u)),
         "softmax_head_hvp")
    same(*both(lambda u: ops.cg_solve_softmax_head(F, W, bias, bh, torch.zeros_like(bh), 0.5, 1.0,
                                                    5, 1e-10, 0.0, use_ext=u)), "softmax_head")
    res = imaml_ext.cg(lambda v: diag * v, b, max_iter=5, rtol=1e-12, batched=True)
    torch.testing.assert_close(res.x, b / diag, rtol=1e-9, atol=1e-12)
