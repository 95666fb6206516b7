"""The public imaml_ext.cg: operators (callable, dense, structured), pytrees, batching,
torch.func transforms, drop-in use, and errors."""
from __future__ import annotations

import warnings

import pytest
import torch

import imaml_ext
from conftest import random_spd
from imaml_ext.linalg import CGError, LstsqOperator, solve_cg

needs_ext = pytest.mark.skipif(not imaml_ext.extension_available(),
                               reason="compiled extension not built")
BOTH = [pytest.param(True, marks=needs_ext, id="ext"), pytest.param(False, id="ref")]


def bmv(A, v):
    return torch.bmm(A, v.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("use_ext", BOTH)
def test_callable_dense_and_solve_agree(device, use_ext):
    A = random_spd(4, 12, device=device)
    b = torch.randn(4, 12, dtype=torch.float64, device=device)
    want = torch.linalg.solve(A, b)
    r1 = imaml_ext.cg(lambda v: bmv(A, v), b, batched=True, rtol=1e-12, use_ext=use_ext)
    r2 = imaml_ext.cg(A, b, batched=True, rtol=1e-12, use_ext=use_ext)
    torch.testing.assert_close(r1.x, want)
    torch.testing.assert_close(r2.x, want)
    assert r1.converged.all() and r2.converged.all()
    assert r1.iterations.dtype == torch.int32 and r1.iterations.shape == (4,)


def test_unbatched_returns_scalars():
    A = random_spd(1, 6)[0]
    b = torch.randn(6, dtype=torch.float64)
    res = imaml_ext.cg(A, b, rtol=1e-12)
    assert res.x.shape == (6,) and res.iterations.dim() == 0 and bool(res.converged)
    torch.testing.assert_close(res.x, torch.linalg.solve(A, b))


@pytest.mark.parametrize("use_ext", BOTH)
def test_pytree_rhs(use_ext):
    g = torch.Generator().manual_seed(3)
    A = random_spd(2, 9, generator=g)
    b = {"w": torch.randn(2, 2, 3, dtype=torch.float64, generator=g),
         "b": (torch.randn(2, 3, dtype=torch.float64, generator=g),)}

    def flat(t):
        return torch.cat([t["w"].reshape(2, -1), t["b"][0]], dim=1)

    def unflat(v):
        return {"w": v[:, :6].reshape(2, 2, 3), "b": (v[:, 6:],)}

    res = imaml_ext.cg(lambda t: unflat(bmv(A, flat(t))), b, batched=True, rtol=1e-12,
                       use_ext=use_ext)
    want = unflat(torch.linalg.solve(A, flat(b)))
    torch.testing.assert_close(res.x["w"], want["w"])
    torch.testing.assert_close(res.x["b"][0], want["b"][0])


@pytest.mark.parametrize("use_ext", BOTH)
def test_lstsq_operator_matches_callable(use_ext):
    X = torch.randn(3, 40, 15, dtype=torch.float64)
    b = torch.randn(3, 15, dtype=torch.float64)
    op = LstsqOperator(X, shift=1.0, scale=1 / (40 * 0.5))
    r1 = imaml_ext.cg(op, b, batched=True, rtol=1e-12, use_ext=use_ext)
    r2 = imaml_ext.cg(lambda v: op(v), b, batched=True, rtol=1e-12, use_ext=use_ext)
    torch.testing.assert_close(r1.x, r2.x)


def test_x0_is_used():
    A = random_spd(2, 8)
    b = torch.randn(2, 8, dtype=torch.float64)
    exact = torch.linalg.solve(A, b)
    res = imaml_ext.cg(A, b, exact.clone(), batched=True, rtol=1e-8)
    assert res.iterations.tolist() == [0, 0]


def test_zero_rhs():
    res = imaml_ext.cg(random_spd(1, 5)[0], torch.zeros(5, dtype=torch.float64))
    assert int(res.iterations) == 0 and torch.equal(res.x, torch.zeros(5, dtype=torch.float64))


def test_empty_batch():
    res = imaml_ext.cg(lambda v: v, torch.zeros(0, 4), batched=True)
    assert res.x.shape == (0, 4) and res.iterations.shape == (0,)


def test_vmap_over_rhs_matches_batched():
    A = random_spd(1, 7)[0]
    bs = torch.randn(5, 7, dtype=torch.float64)
    xs = torch.func.vmap(lambda b: imaml_ext.cg(lambda v: A @ v, b, rtol=1e-12).x)(bs)
    torch.testing.assert_close(xs, torch.linalg.solve(A, bs.T).T)


def test_grad_through_solve_with_autograd():
    A = random_spd(1, 6)[0]
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    x = imaml_ext.cg(lambda v: A @ v, b, rtol=1e-12).x
    (g,) = torch.autograd.grad(x.sum(), b)
    torch.testing.assert_close(g, torch.linalg.solve(A, torch.ones(6, dtype=torch.float64)))


def test_check_raises_on_failure():
    A = random_spd(2, 6)
    A[1] = -A[1]
    res = imaml_ext.cg(A, torch.randn(2, 6, dtype=torch.float64), batched=True, rtol=1e-10)
    assert res.negative_curvature.tolist() == [False, True]
    with pytest.raises(CGError, match="system 1: negative curvature"):
        res.check()


def test_torchopt_style_drop_in():
    A = random_spd(1, 6)[0]
    b = torch.randn(6, dtype=torch.float64)
    x = solve_cg(maxiter=50, rtol=1e-12)(lambda v: A @ v, b)
    torch.testing.assert_close(x, torch.linalg.solve(A, b))


SOLVE_CALLS = (((), {"maxiter": 50, "rtol": 1e-12}), ((0.5,), {"maxiter": 50}),
               ((0.5, torch.ones(6, dtype=torch.float64)), {"rtol": 1e-12}))


def test_solve_cg_calls_match_torchopts():
    # the same calls, ours and TorchOpt's (a peer, installed for the benchmarks: not in CI)
    torchopt = pytest.importorskip("torchopt")
    A = random_spd(1, 6)[0]
    b = torch.randn(6, dtype=torch.float64)
    mv = lambda v: A @ v  # noqa: E731
    ours, theirs = solve_cg(), torchopt.linear_solve.solve_cg()
    for args, kw in SOLVE_CALLS:
        torch.testing.assert_close(ours(mv, b, *args, **kw), theirs(mv, b, *args, **kw))


def test_torchopt_style_solve_signature():
    # TorchOpt's solve is (matvec, b, ridge=None, init=None, **kwargs), its kwargs going to the
    # CG: maxiter / rtol at the solve were a TypeError, and a positional ridge was taken as x0
    A = random_spd(1, 6)[0]
    b = torch.randn(6, dtype=torch.float64)
    mv = lambda v: A @ v  # noqa: E731
    I6 = torch.eye(6, dtype=torch.float64)
    for args, kw in SOLVE_CALLS:  # what each call means: ridge, then the start
        ridge = args[0] if args else 0.0
        start = args[1] if len(args) > 1 else None
        want = imaml_ext.cg(lambda v: A @ v + ridge * v, b, start, max_iter=kw.get("maxiter", 60),
                            rtol=kw.get("rtol", 1e-5)).x
        torch.testing.assert_close(solve_cg()(mv, b, *args, **kw), want)
    ridge = solve_cg(maxiter=50, rtol=1e-12)(mv, b, 0.5)
    torch.testing.assert_close(ridge, torch.linalg.solve(A + 0.5 * I6, b))
    # the solve's keywords win over the factory's; x0 is init's alias
    short = solve_cg(maxiter=50, check=False)(mv, b, maxiter=1)
    torch.testing.assert_close(short, imaml_ext.cg(mv, b, max_iter=1).x)
    start = torch.linalg.solve(A, b)
    assert int(imaml_ext.cg(mv, b, start).iterations) <= 1
    torch.testing.assert_close(solve_cg(maxiter=1, check=False)(mv, b, x0=start), start)
    with pytest.raises(ValueError, match="init or x0, not both"):
        solve_cg()(mv, b, None, start, x0=start)
    with pytest.raises(ValueError, match=r"solve_cg's solve: unknown keyword\(s\) \['M'\].*no "
                                         r"preconditioner"):
        solve_cg()(mv, b, M=mv)
    with pytest.raises(ValueError, match="ridge must be a finite number"):
        solve_cg()(mv, b, start)  # a tensor where TorchOpt puts ridge


def test_torchopt_style_drop_in_warns_on_a_breakdown(recwarn):
    """It returns x alone, so negative curvature and NaN (which cg() reports in its status) warn;
    check=False keeps it quiet, a sound solve warns nothing."""
    import warnings as _w
    A = random_spd(1, 6)[0]
    b = torch.randn(6, dtype=torch.float64)
    with _w.catch_warnings():
        _w.simplefilter("error")
        solve_cg(maxiter=50)(lambda v: A @ v, b)
        solve_cg(maxiter=50, check=False)(lambda v: -(A @ v), b)
    with pytest.warns(RuntimeWarning, match=r"solve_cg: of 1 system\(s\), negative curvature "
                                            r"in 1 \(matvec is not positive definite"):
        x = solve_cg(maxiter=50)(lambda v: -(A @ v), b)
    assert torch.equal(x, torch.zeros_like(b))  # stopped before its first step
    with pytest.warns(RuntimeWarning, match=r"non-finite values in 1"):
        solve_cg(maxiter=50)(lambda v: A @ v * float("nan"), b)
    with pytest.raises(ValueError, match="check must be"):
        solve_cg(check=1)


def test_torchopt_style_drop_in_warns_when_it_stops_short():
    """A solve that ran out of iterations short of the tolerance returns CG's approximation:
    x alone says nothing, so it warns with the residual (check=False for a truncation that is
    meant); cg() itself reports it in the status (0) and stays silent."""
    import warnings as _w
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
    A = Q @ torch.diag(torch.logspace(0, 4, 8, dtype=torch.float64)) @ Q.T
    b = torch.randn(8, generator=g, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match=r"solve_cg: of 1 system\(s\), no convergence in 1: "
                                            r"stopped after max_iter = 3 iterations with residual "
                                            r"norm up to \S+ \(rtol=1e-05"):
        solve_cg(maxiter=3)(lambda v: A @ v, b)
    with _w.catch_warnings():
        _w.simplefilter("error")
        solve_cg(maxiter=3, check=False)(lambda v: A @ v, b)
        assert int(imaml_ext.cg(lambda v: A @ v, b, max_iter=3).status) == 0
        solve_cg(maxiter=100, rtol=1e-10)(lambda v: A @ v, b)


def test_flags_are_bools_not_truthy_values():
    # use_ext=0 or "no" resolved to True (`is False` only), batched="yes" was taken as True
    A = random_spd(1, 4)[0]
    b = torch.randn(4, dtype=torch.float64)
    for kw, msg in ((dict(use_ext=0), "use_ext must be None, True or False, got 0"),
                    (dict(use_ext="no"), "use_ext must be None, True or False"),
                    (dict(batched="yes"), "cg: batched must be True or False"),
                    (dict(cuda_graph=1), "cg: cuda_graph must be True or False")):
        with pytest.raises(ValueError, match=msg):
            imaml_ext.cg(A, b, **kw)


def test_scipy_drop_in():
    scipy = pytest.importorskip("scipy.sparse.linalg")
    A = random_spd(1, 10)[0]
    b = torch.randn(10, dtype=torch.float64)
    x_scipy, info = scipy.cg(A.numpy(), b.numpy(), rtol=1e-10)
    x = imaml_ext.cg(A, b, rtol=1e-10).x
    assert info == 0
    torch.testing.assert_close(x, torch.from_numpy(x_scipy), rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_iter=0), "max_iter must be an int >= 1"),
    (dict(max_iter=2.5), "max_iter must be an int >= 1"),
    (dict(rtol=-1.0), "rtol must be a finite number >= 0"),
    (dict(atol=float("nan")), "atol must be a finite number >= 0"),
])
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        imaml_ext.cg(random_spd(1, 3)[0], torch.ones(3, dtype=torch.float64), **kwargs)


def test_bad_operands():
    A = random_spd(2, 4)
    b = torch.randn(2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"A must be \(2, 4, 4\)"):
        imaml_ext.cg(A[:, :3, :3], b, batched=True)
    with pytest.raises(ValueError, match="A must have b's dtype"):
        imaml_ext.cg(A.float(), b, batched=True)
    with pytest.raises(ValueError, match="every leaf of b must have the batch size 2"):
        imaml_ext.cg(lambda v: v, (b, torch.ones(3, 1, dtype=torch.float64)), batched=True)
    with pytest.raises(ValueError, match="leaves must share dtype"):
        imaml_ext.cg(lambda v: v, (b, torch.ones(2, 1)), batched=True)
    with pytest.raises(ValueError, match="x0 must have b's (structure|shapes)"):
        imaml_ext.cg(A, b, torch.zeros(2, 5, dtype=torch.float64), batched=True)
    with pytest.raises(ValueError, match="must be float32 or float64"):
        imaml_ext.cg(lambda v: v, torch.ones(3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"A\(v\) must return b's structure"):
        imaml_ext.cg(lambda v: v[:, :2], b, batched=True)
    with pytest.raises(ValueError, match="A must be a callable"):
        imaml_ext.cg("nope", b)
    with pytest.raises(ValueError, match="cuda_graph=True records exactly max_iter .* got None"):
        imaml_ext.cg(lambda v: v, b, batched=True, cuda_graph=True)
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA right-hand side"):
        imaml_ext.cg(lambda v: v, b, batched=True, max_iter=3, cuda_graph=True)


def test_nonfinite_rhs_flagged_not_nan():
    b = torch.tensor([[1.0, float("nan")], [1.0, 2.0]], dtype=torch.float64)
    res = imaml_ext.cg(lambda v: 2 * v, b, batched=True)
    assert res.nonfinite.tolist() == [True, False]
    assert not torch.isnan(res.x[1]).any()


@pytest.mark.parametrize("use_ext", BOTH)
def test_softmax_head_operator_dispatch_matches_callable(use_ext):
    from imaml_ext.structured import SoftmaxHeadOperator
    g = torch.Generator().manual_seed(5)
    B, n, f, c = 3, 20, 8, 5
    F = torch.randn(B, n, f, dtype=torch.float64, generator=g)
    W = torch.randn(B, c, f, dtype=torch.float64, generator=g)
    bias = torch.randn(B, c, dtype=torch.float64, generator=g)
    op = SoftmaxHeadOperator(F, W, bias, shift=1.0, scale=0.5)
    rhs = (torch.randn(B, c, f, dtype=torch.float64, generator=g),
           torch.randn(B, c, dtype=torch.float64, generator=g))
    fused = imaml_ext.cg(op, rhs, batched=True, rtol=1e-12, use_ext=use_ext)
    generic = imaml_ext.cg(lambda v: op(v), rhs, batched=True, rtol=1e-12, use_ext=False)
    torch.testing.assert_close(fused.x[0], generic.x[0])
    torch.testing.assert_close(fused.x[1], generic.x[1])
    assert fused.converged.all()


def counting_matvec(A):
    """v -> A v for batched A, and the one-element list counting its calls."""
    calls = [0]

    def matvec(v):
        calls[0] += 1
        return torch.bmm(A, v.unsqueeze(-1)).squeeze(-1)
    return matvec, calls


@pytest.mark.parametrize("use_ext", BOTH)
def test_callable_zero_start_makes_no_initial_product(use_ext):
    # With no x0, r0 = b: a k-iteration solve calls the operator k times (one HVP fewer per
    # iMAML solve), and gives what an explicit zero x0 (k + 1 calls) gives (to rounding: the
    # zero start's set-up is one op, cg_begin, whose r.r sums in another order than torch's).
    b = torch.randn(3, 9, dtype=torch.float64)
    matvec, calls = counting_matvec(random_spd(3, 9))
    res = imaml_ext.cg(matvec, b, batched=True, rtol=0.0, max_iter=4, use_ext=use_ext)
    assert calls[0] == 4
    calls[0] = 0
    ref = imaml_ext.cg(matvec, b, torch.zeros_like(b), batched=True, rtol=0.0, max_iter=4,
                       use_ext=use_ext)
    assert calls[0] == 5
    assert torch.equal(res.iterations, ref.iterations)
    torch.testing.assert_close(res.x, ref.x, rtol=1e-12, atol=0.0)
    torch.testing.assert_close(res.residual_norm, ref.residual_norm, rtol=1e-10, atol=0.0)


@pytest.mark.parametrize("use_ext", BOTH)
def test_a_system_started_at_zero_meets_a_non_finite_operator_at_its_first_product(use_ext):
    # An explicit x0 with one system at zero: that system's r0 is b, as from no x0 and in the
    # tensor / structured solvers, so an Inf in its operator is met at A p0 (non-finite after 0
    # iterations, ||r|| = ||b||), not at A x0 (a NaN residual norm).
    A = random_spd(2, 6)
    A[0, 2, 3] = float("inf")
    b = torch.randn(2, 6, dtype=torch.float64)
    x0 = torch.randn_like(b)
    x0[0] = 0.0
    for op in (A, lambda v: torch.bmm(A, v.unsqueeze(-1)).squeeze(-1)):
        res = imaml_ext.cg(op, b, x0, batched=True, rtol=1e-12, max_iter=20, use_ext=use_ext)
        assert res.iterations[0].item() == 0 and not res.converged[0]
        assert res.residual_norm[0].item() == pytest.approx(b[0].norm().item(), rel=1e-12)
        assert res.converged[1] and (res.x[0] == 0).all()


def test_the_reference_solver_makes_max_iter_products_from_a_zero_start():
    # the twin of the whole-loop ops: no product A x0 from x0 = 0 on the CPU (the kernels make
    # max_iter; a twin making one more would time slower than it should)
    from imaml_ext import reference
    b = torch.randn(2, 6, dtype=torch.float64)
    matvec, calls = counting_matvec(random_spd(2, 6))
    reference._solve(matvec, b, torch.zeros_like(b), 4, 0.0, 0.0)
    assert calls[0] == 4
    x0 = torch.zeros_like(b)
    x0[1, 0] = 1.0  # one system from elsewhere: the product, masked for the zero one
    calls[0] = 0
    reference._solve(matvec, b, x0, 4, 0.0, 0.0)
    assert calls[0] == 5


@pytest.mark.parametrize("use_ext", BOTH)
@pytest.mark.parametrize("atol", [0.0, 1e-9], ids=["scaled", "unscaled"])
def test_inputs_are_never_written_and_x_is_fresh(use_ext, atol):
    # b and x0 are read through views where they can be (no copy); no path writes into them,
    # and the returned x never aliases them.
    A = random_spd(3, 8)
    b = torch.randn(3, 8, dtype=torch.float64)
    x0 = torch.randn(3, 8, dtype=torch.float64)
    X = torch.randn(3, 5, 8, dtype=torch.float64)

    def mv(v):
        return torch.bmm(A, v.unsqueeze(-1)).squeeze(-1)

    for op in (A, LstsqOperator(X, 1.0, 0.2), mv):
        b0, x00 = b.clone(), x0.clone()
        res = imaml_ext.cg(op, b, x0, batched=True, max_iter=5, atol=atol, use_ext=use_ext)
        assert torch.equal(b, b0) and torch.equal(x0, x00), type(op)
        assert res.x.data_ptr() not in (b.data_ptr(), x0.data_ptr())
        res.x.add_(1.0)  # the caller may write into x
        assert torch.equal(b, b0) and torch.equal(x0, x00)


@pytest.mark.parametrize("use_ext", BOTH)
def test_operator_returning_its_input_or_a_view_of_it(use_ext):
    # A(v) is used without a copy, even when it is p itself: the identity, a view of v and a
    # scaled copy all solve correctly, which holds only while both step kernels read Ap before
    # they rewrite p.
    b = torch.randn(3, 7, dtype=torch.float64)
    for op, want in ((lambda v: v, b), (lambda v: v.view(3, 7), b), (lambda v: 2.0 * v, b / 2)):
        res = imaml_ext.cg(op, b, batched=True, max_iter=3, use_ext=use_ext)
        torch.testing.assert_close(res.x, want)
        assert bool(res.converged.all())


@pytest.mark.parametrize("max_iter", [None, 300], ids=["default", "given"])
def test_callable_loop_length(device, max_iter):
    """Products a callable solve makes once every system has converged (in fewer than 16
    iterations here): on the CPU it stops there; on a GPU exactly max_iter (masked, no host
    read), and the default 10 P warns that it will make that many."""
    P = 200
    g = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=torch.float64))[0]
    A = ((Q * torch.linspace(1.0, 2.0, P, dtype=torch.float64)) @ Q.T).to(device)
    b = torch.randn(2, P, generator=g, dtype=torch.float64).to(device)
    calls = []

    def matvec(v):
        calls.append(1)
        return v @ A

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = imaml_ext.cg(matvec, b, batched=True, rtol=1e-10, max_iter=max_iter)
    assert res.converged.all() and int(res.iterations.max()) < 16
    torch.testing.assert_close(res.x, torch.linalg.solve(A, b.T).T)
    warned = [w for w in caught if "pass max_iter" in str(w.message)]
    if device == "cpu":
        assert len(calls) == int(res.iterations.max()) and not warned
    else:
        assert len(calls) == (10 * P if max_iter is None else max_iter)
        assert len(warned) == (max_iter is None)


def test_cg_result_is_a_pytree_that_vmap_returns():
    # registered as a pytree node: torch.func returns it whole (and a CUDA-graph capture hands
    # back fresh copies of its fields)
    A = random_spd(1, 3)[0]
    bs = torch.randn(4, 3, dtype=torch.float64)
    res = torch.func.vmap(lambda b: imaml_ext.cg(lambda v: A @ v, b, max_iter=10,
                                                 rtol=1e-12))(bs)
    assert res.x.shape == (4, 3) and res.iterations.shape == (4,)
    torch.testing.assert_close(res.x, torch.linalg.solve(A, bs.T).T)
    assert torch.utils._pytree.tree_leaves(res)[0] is res.x


# ---- ShiftedOperator, and what a step-by-step solve costs beyond its products ------------------

@pytest.mark.parametrize("use_ext", BOTH)
@pytest.mark.parametrize("x0", [False, True], ids=["zero", "x0"])
def test_shifted_operator_solves_the_shifted_system(device, use_ext, x0):
    """cg(ShiftedOperator(M, shift, scale)) solves (shift I + scale M) x = b, as the same
    operator written as a closure, on a pytree right-hand side, from zero and from an x0."""
    A = random_spd(3, 10, device=device)
    g = torch.Generator().manual_seed(5)
    b = {"w": torch.randn(3, 2, 3, dtype=torch.float64, generator=g).to(device),
         "c": torch.randn(3, 4, dtype=torch.float64, generator=g).to(device)}
    flat = lambda t: torch.cat([t["w"].reshape(3, -1), t["c"]], 1)  # noqa: E731
    unflat = lambda v: {"w": v[:, :6].reshape(3, 2, 3), "c": v[:, 6:]}  # noqa: E731

    def M(v):
        return unflat(bmv(A, flat(v)))

    op = imaml_ext.ShiftedOperator(M, 1.5, 0.25)
    start = {k: torch.full_like(t, 0.1) for k, t in b.items()} if x0 else None
    res = imaml_ext.cg(op, b, start, batched=True, rtol=1e-12, max_iter=40, use_ext=use_ext)
    want = torch.linalg.solve(1.5 * torch.eye(10, dtype=torch.float64, device=device) + 0.25 * A,
                              flat(b))
    torch.testing.assert_close(flat(res.x), want, rtol=1e-9, atol=1e-10)
    assert res.converged.all()
    # step for step the closure's iterates (6 steps, before rounding decides the stops)
    closure = imaml_ext.cg(lambda v: {k: 1.5 * v[k] + 0.25 * t for k, t in M(v).items()}, b,
                           start, batched=True, rtol=0.0, max_iter=6, use_ext=use_ext)
    res = imaml_ext.cg(op, b, start, batched=True, rtol=0.0, max_iter=6, use_ext=use_ext)
    assert (closure.iterations == 6).all() and (res.iterations == 6).all()
    torch.testing.assert_close(flat(closure.x), flat(res.x), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(closure.residual_norm, res.residual_norm, rtol=1e-8, atol=0.0)
    # called directly it is the shifted product
    v = {k: torch.randn_like(t) for k, t in b.items()}
    torch.testing.assert_close(flat(op(v)), 1.5 * flat(v) + 0.25 * bmv(A, flat(v)))


def test_shifted_operator_checks_its_arguments():
    with pytest.raises(ValueError, match="ShiftedOperator: op must be callable, got Tensor"):
        imaml_ext.ShiftedOperator(torch.eye(2))
    with pytest.raises(ValueError, match=r"ShiftedOperator: shift must be a finite number, got nan"):
        imaml_ext.ShiftedOperator(lambda v: v, float("nan"))
    with pytest.raises(ValueError, match=r"ShiftedOperator: scale must be a finite number, got "
                                         r"tensor"):
        imaml_ext.ShiftedOperator(lambda v: v, 1.0, torch.tensor(2.0))


def test_shifted_operator_under_torch_func():
    """Inside torch.func transforms the functional twin applies the shift and scale itself."""
    A = random_spd(1, 5)[0]
    b = torch.randn(5, dtype=torch.float64)

    def solve(bb):
        op = imaml_ext.ShiftedOperator(lambda v: A @ v, 2.0, 0.5)
        return imaml_ext.cg(op, bb, rtol=1e-13, max_iter=30).x

    J = torch.func.jacrev(solve)(b)
    torch.testing.assert_close(J, torch.linalg.inv(2.0 * torch.eye(5, dtype=torch.float64)
                                                   + 0.5 * A))


class _KernelOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the ops that run a kernel (views and the like excluded), by name."""

    FREE = {"aten.detach.default", "aten.alias.default", "aten.empty.memory_format",
            "aten.empty_like.default", "aten.new_empty.default", "aten.empty_strided.default",
            "aten.new_empty_strided.default", "aten._unsafe_view.default"}
    # the CPU's early stop reads the status to the host (a GPU runs every iteration masked)
    CPU_ONLY = {"aten.eq.Scalar", "aten.any.default", "aten._local_scalar_dense.default"}

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name not in self.FREE and not getattr(func, "is_view", False):
            self.ops.append(name)
        return func(*args, **(kwargs or {}))

    def solver_ops(self):
        return [n for n in self.ops if n not in self.CPU_ONLY]


@needs_ext
@pytest.mark.parametrize("shifted", [False, True], ids=["plain", "shifted"])
def test_a_solve_costs_its_products_plus_one_op_per_step_and_two(shifted):
    """From zero, a k-step solve over a callable is cg_begin, k x (product, cg_step), cg_end:
    on a GPU every op is a launch, and a small solve is bound by them (an iMAML solve's set-up,
    scaling and finish used to be 41 ops, its shifted product 2 more per step)."""
    d = torch.rand(4, 50, dtype=torch.float64) + 1.0
    b = torch.randn(4, 50, dtype=torch.float64)
    A = imaml_ext.ShiftedOperator(lambda v: v * d, 1.0, 0.5) if shifted else (lambda v: v * d)
    with _KernelOps() as c:
        res = imaml_ext.cg(A, b, batched=True, rtol=0.0, max_iter=4)
    assert (res.iterations == 4).all()
    assert c.solver_ops() == (["imaml_ext.cg_begin.default"]
                              + ["aten.mul.Tensor", "imaml_ext.cg_step.default"] * 4
                              + ["imaml_ext.cg_end.default"])


@pytest.mark.parametrize("use_ext", BOTH)
@pytest.mark.parametrize("solver", ["callable", "dense", "lstsq"])
def test_entries_near_the_largest_float_are_solved(solver, use_ext, dtype):
    """max|b| near the largest float: the scale 2^e of frexp overflowed to Inf there and the
    solve returned NaN reported converged; the scale is now 2^(e - 1) (max|b| / s in [1, 2))."""
    big = 3e38 if dtype == torch.float32 else 1.5e308
    b = torch.tensor([[big, 1.0, -big / 4], [1.0, 2.0, 3.0]], dtype=dtype)
    A2 = 2 * torch.eye(3, dtype=dtype).expand(2, 3, 3).contiguous()
    A = {"callable": lambda v: 2 * v, "dense": A2,
         "lstsq": LstsqOperator(torch.eye(3, dtype=dtype).expand(2, 3, 3).contiguous(), 1.0,
                                1.0)}[solver]
    res = imaml_ext.cg(A, b, batched=True, use_ext=use_ext, max_iter=5)
    assert res.converged.all() and torch.isfinite(res.x).all()
    torch.testing.assert_close(res.x, b / 2)


@pytest.mark.parametrize("use_ext", BOTH)
@pytest.mark.parametrize("atol", [0.0, 1e-9], ids=["scaled", "unscaled"])
@pytest.mark.parametrize("start", ["zero", "x0", "autograd"])
def test_systems_of_no_unknowns_are_converged(use_ext, atol, start):
    """(B, 0) right-hand sides on every callable path (cg_begin, an x0, the functional twin
    under autograd): converged after 0 iterations, x of shape (B, 0)."""
    b = torch.zeros(3, 0, dtype=torch.float64, requires_grad=start == "autograd")
    x0 = torch.zeros(3, 0, dtype=torch.float64) if start == "x0" else None
    res = imaml_ext.cg(lambda v: 2 * v, b, x0, batched=True, max_iter=2, atol=atol,
                       use_ext=use_ext)
    assert res.x.shape == (3, 0) and res.converged.all() and (res.iterations == 0).all()


# ---- found by review (2026-11-28): each failed before its fix ---------------------------------

@pytest.mark.parametrize("use_ext", BOTH)
@pytest.mark.parametrize("solver", ["callable", "dense", "lstsq"])
def test_a_zero_right_hand_side_from_any_start_is_solved_at_once(solver, use_ext):
    # x = 0 solves A x = 0 exactly; from x0 != 0 the test ||r|| <= rtol ||b|| = 0 could only
    # pass at an exactly zero residual, so the solve ran every iteration and said "not converged"
    g = torch.Generator().manual_seed(0)
    X = torch.randn(3, 6, 4, generator=g, dtype=torch.float64)
    A = torch.bmm(X.transpose(1, 2), X) / 6 + torch.eye(4, dtype=torch.float64)
    b = torch.randn(3, 4, generator=g, dtype=torch.float64)
    b[1] = 0.0
    x0 = torch.ones(3, 4, dtype=torch.float64)
    op = {"callable": lambda v: bmv(A, v), "dense": A,
          "lstsq": LstsqOperator(X, shift=1.0, scale=1.0 / 6)}[solver]
    res = imaml_ext.cg(op, b, x0, batched=True, max_iter=20, rtol=1e-10, use_ext=use_ext)
    assert res.status.tolist() == [1, 1, 1]
    assert int(res.iterations[1]) == 0 and bool((res.x[1] == 0).all())
    torch.testing.assert_close(res.x, torch.linalg.solve(A, b), rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("use_ext", [pytest.param(None, marks=needs_ext, id="default"),
                                     pytest.param(False, id="ref")])
def test_autograd_reaches_tensors_the_operator_reads(use_ext):
    # The solve's output depended on M through A(v) = M v, but the compiled in-place steps
    # dropped the graph (x.requires_grad False) and the reference's in-place copy broke it.
    g = torch.Generator().manual_seed(1)
    Q = torch.randn(4, 4, generator=g, dtype=torch.float64)
    M = (Q @ Q.T + 4 * torch.eye(4, dtype=torch.float64)).requires_grad_(True)
    b = torch.randn(4, generator=g, dtype=torch.float64)
    x = imaml_ext.cg(lambda v: M @ v, b, max_iter=50, rtol=1e-14, use_ext=use_ext).x
    assert x.requires_grad
    (gM,) = torch.autograd.grad(x.sum(), M)
    xs = torch.linalg.solve(M.detach(), b)
    want = -torch.outer(torch.linalg.solve(M.detach().T, torch.ones(4, dtype=torch.float64)), xs)
    # the implicit derivative: torch.linalg.solve's gradient, not only its symmetric part
    torch.testing.assert_close(gM, want, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("kind", ["dense", "callable"])
def test_vmap_over_the_operator(kind):
    # the CPU early stop read a status batched by vmap ("data-dependent control flow"); the
    # callable loop then reached the in-place op, which has no batching rule
    g = torch.Generator().manual_seed(2)
    As = torch.stack([random_spd(1, 3, generator=g)[0] for _ in range(4)]).double()
    b = torch.randn(3, generator=g, dtype=torch.float64)

    def solve(M):
        op = M if kind == "dense" else (lambda v: M @ v)
        return imaml_ext.cg(op, b, max_iter=30, rtol=1e-13).x
    got = torch.func.vmap(solve)(As)
    torch.testing.assert_close(got, torch.linalg.solve(As, b.expand(4, 3)), rtol=1e-9, atol=1e-12)


def test_the_operator_output_is_checked_on_every_path():
    A = random_spd(1, 3)[0].double()
    bb = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)  # autograd: functional path
    for b in (bb, bb.detach()):
        with pytest.raises(ValueError, match=r"A\(v\) must keep b's 3 system\(s\) along the batch"):
            imaml_ext.cg(lambda v: (v @ A)[:1], b, batched=True, max_iter=5)
    b32 = torch.ones(3, requires_grad=True)
    with pytest.raises(ValueError, match=r"A\(v\) must return b's dtype and device \(torch.float32"):
        imaml_ext.cg(lambda v: A @ v.double(), b32, max_iter=5)
    with pytest.raises(ValueError, match=r"A\(v\) must return b's dtype"):
        imaml_ext.cg(lambda v: A @ v.double(), b32.detach(), max_iter=5)


def test_x0_and_a_b_of_no_systems_are_checked():
    b = torch.ones(3, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"x0 must have b's 3 system\(s\) along the batch "
                                         r"dimension, got 2"):
        imaml_ext.cg(lambda v: 2 * v, b, torch.ones(2, 3, dtype=torch.float64), batched=True)
    with pytest.raises(ValueError, match=r"x0 must have b's 3 system\(s\).*got 1"):
        imaml_ext.cg(lambda v: 2 * v, b, torch.ones(1, 3, dtype=torch.float64), batched=True)
    with pytest.raises(ValueError, match="A must be a callable, a tensor or an LstsqOperator"):
        imaml_ext.cg("abc", torch.zeros(0, 3), batched=True)
    for name in ("rtol", "atol"):
        with pytest.raises(ValueError, match=f"{name} must be a finite number"):
            imaml_ext.cg(lambda v: v, b, **{name: True})


def test_solve_cg_takes_torchopts_keywords():
    g = torch.Generator().manual_seed(3)
    A = random_spd(1, 4, generator=g)[0].double()
    b = torch.randn(4, generator=g, dtype=torch.float64)
    I4 = torch.eye(4, dtype=torch.float64)
    mv = lambda v: A @ v  # noqa: E731
    # ridge: (A + ridge I) x = b, in the factory or the call
    want = torch.linalg.solve(A + 0.7 * I4, b)
    for x in (solve_cg(ridge=0.7, maxiter=50, rtol=1e-13)(mv, b),
              solve_cg(maxiter=50, rtol=1e-13)(mv, b, ridge=0.7)):
        torch.testing.assert_close(x, want, rtol=1e-9, atol=1e-12)
    # init: the start (one iteration from the solution stays there)
    xs = torch.linalg.solve(A, b)
    torch.testing.assert_close(solve_cg(maxiter=1, init=xs)(mv, b), xs, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(solve_cg(maxiter=1)(mv, b, init=xs), xs, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match=r"unknown keyword\(s\) \['M'\]"):
        solve_cg(M=lambda v: v)
    with pytest.raises(ValueError, match="maxiter or max_iter, not both"):
        solve_cg(maxiter=3, max_iter=4)
    with pytest.raises(ValueError, match="init or x0, not both"):
        solve_cg()(mv, b, init=xs, x0=xs)
    with pytest.raises(ValueError, match="ridge must be a finite number"):
        solve_cg(ridge=float("nan"))(mv, b)


def test_sparse_matrices_run_as_their_products():
    # a torch sparse A reached the dense solver's op: "Could not run 'imaml_ext::cg_solve_dense'
    # with arguments from the 'SparseCPU' backend" (COO), "Sparse CSR tensors do not have
    # strides" (CSR)
    import warnings as _w
    A = random_spd(2, 6)
    b = torch.randn(2, 6, dtype=torch.float64)
    want = torch.linalg.solve(A, b)
    with _w.catch_warnings():
        _w.simplefilter("ignore")  # CSR's "beta" notice
        for layout in (torch.Tensor.to_sparse, torch.Tensor.to_sparse_csr):
            x = imaml_ext.cg(layout(A[0]), b[0], rtol=1e-12).x
            torch.testing.assert_close(x, want[0])
        res = imaml_ext.cg(A.to_sparse(), b, batched=True, rtol=1e-12)
        torch.testing.assert_close(res.x, want)
        assert res.converged.all()
        with pytest.raises(ValueError, match="batched sparse A must be COO"):
            imaml_ext.cg(A.to_sparse_csr(), b, batched=True)
    with pytest.raises(ValueError, match=r"sparse A takes b as one tensor of shape \(P,\), got "
                                         r"dict"):
        imaml_ext.cg(A[0].to_sparse(), {"w": b[0]})
    with pytest.raises(ValueError, match=r"A must be \(6, 6\)"):
        imaml_ext.cg(A.to_sparse(), b[0])


@pytest.mark.parametrize("use_ext", [False, pytest.param(None, marks=needs_ext)])
@pytest.mark.parametrize("kind", ["callable", "dense"])
def test_cg_compiles_into_one_graph(kind, use_ext):
    # torch.compile broke the solve into six graphs: the functorch query (_needs_reference), the
    # CPU loop's early exits and the alias check's storage addresses are not traceable; they are
    # skipped while tracing (every iteration then runs, masked, as on a GPU)
    import torch._dynamo as dynamo
    A = random_spd(1, 6)[0]
    op = (lambda v: A @ v) if kind == "callable" else A

    def f(b):
        return imaml_ext.cg(op, b, max_iter=8, rtol=1e-12, use_ext=use_ext).x

    b = torch.randn(6, dtype=torch.float64)
    dynamo.reset()
    try:
        explained = dynamo.explain(f)(b)
        assert explained.graph_break_count == 0, [r.reason.splitlines()[0]
                                                 for r in explained.break_reasons]
        dynamo.reset()
        torch.testing.assert_close(torch.compile(f, backend="eager")(b), f(b))
    finally:
        dynamo.reset()


def test_compiled_vmap_over_cg_and_the_default_max_iter_warning():
    # skipping the functorch query while compiling sent a vmapped solve to the compiled op
    # ("Batching rule not implemented for imaml_ext::cg_step"); and under compile the default
    # max_iter (10 P) is unrolled into the graph: warned, as on a GPU
    import torch._dynamo as dynamo
    A = random_spd(1, 5)[0]
    bs = torch.randn(3, 5, dtype=torch.float64)
    f = torch.func.vmap(lambda b: imaml_ext.cg(lambda v: A @ v, b, max_iter=12, rtol=1e-12).x)
    dynamo.reset()
    try:
        torch.testing.assert_close(torch.compile(f, backend="eager")(bs), f(bs))
        dynamo.reset()
        with pytest.warns(RuntimeWarning, match="under torch.compile .* pass max_iter"):
            torch.compile(lambda b: imaml_ext.cg(lambda v: A @ v, b).x, backend="eager")(bs[0])
    finally:
        dynamo.reset()


# ---- autograd: the implicit derivative of A^{-1} b -----------------------------------------------

def _spd(P, seed):
    g = torch.Generator().manual_seed(seed)
    Q = torch.randn(P, P, generator=g, dtype=torch.float64)
    return Q @ Q.T / P + torch.eye(P, dtype=torch.float64)


@pytest.mark.parametrize("kind", ["dense", "callable", "batched"])
def test_a_solve_of_no_iterations_keeps_its_gradient(kind):
    """x = A^{-1} b is linear in b: a zero b (0 iterations, x = 0) or an x0 already within the
    tolerance (0 iterations, x = x0) still has the gradient A^{-1} g. Differentiating the
    iterations run gave zero, or no graph at all."""
    A = torch.diag(torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64))
    want = torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64)
    op = A if kind == "dense" else (lambda v: v @ A)
    if kind == "batched":
        b = torch.zeros(2, 3, dtype=torch.float64)
        b[1] = 1
        b.requires_grad_(True)
        res = imaml_ext.cg(op, b, batched=True, max_iter=20)
        assert res.iterations.tolist()[0] == 0
        (g,) = torch.autograd.grad(res.x.sum(), b)
        torch.testing.assert_close(g, want.expand(2, 3))
        return
    b = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    res = imaml_ext.cg(op, b, max_iter=20)
    assert int(res.iterations) == 0 and res.x.requires_grad
    torch.testing.assert_close(torch.autograd.grad(res.x.sum(), b)[0], want)
    b = torch.ones(3, dtype=torch.float64, requires_grad=True)
    res = imaml_ext.cg(op, b, torch.linalg.solve(A, b.detach()), max_iter=20)
    assert int(res.iterations) == 0
    torch.testing.assert_close(torch.autograd.grad(res.x.sum(), b)[0], want)
    # the same under torch.func.grad (which runs the functional twin, differentiated through
    # its iterations, here one: the warm start at zero takes one step)
    g = torch.func.grad(lambda bb: imaml_ext.cg(op, bb, max_iter=20, rtol=1e-12).x.sum())(
        torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(g, want)


@pytest.mark.parametrize("use_ext", BOTH)
def test_a_warm_started_solve_has_the_solutions_gradient(use_ext):
    """The better x0, the fewer iterations: differentiating those gave d x / d lam 32% off at an
    x0 within 1e-6 of the solution. The implicit derivative does not depend on x0."""
    P = 20
    M = _spd(P, 0)
    b = torch.randn(P, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    lam = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    eye = torch.eye(P, dtype=torch.float64)
    truth = torch.autograd.grad(torch.linalg.solve(M + lam * eye, b).sum(), lam)[0]
    sol = torch.linalg.solve(M + lam.detach() * eye, b)
    for eps in (1e-1, 1e-6):
        x0 = sol + eps * torch.randn(P, generator=torch.Generator().manual_seed(2),
                                     dtype=torch.float64)
        x = imaml_ext.cg(lambda v: M @ v + lam * v, b, x0, rtol=1e-10, max_iter=200,
                         use_ext=use_ext).x
        (g,) = torch.autograd.grad(x.sum(), lam)
        torch.testing.assert_close(g, truth, rtol=1e-7, atol=0)


@pytest.mark.parametrize("use_ext", BOTH)
def test_structured_operators_differentiate_their_tensor_coefficients(use_ext):
    """LstsqOperator(X, shift=lam): ridge regression's gradient in lam (it was dropped: the
    solvers took float(shift)); SoftmaxHeadOperator likewise, against central differences."""
    g = torch.Generator().manual_seed(3)
    X = torch.randn(30, 5, generator=g, dtype=torch.float64)
    y = torch.randn(30, generator=g, dtype=torch.float64)
    lam = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    w = imaml_ext.cg(LstsqOperator(X, shift=lam, scale=1 / 30), X.T @ y / 30, rtol=1e-13,
                     use_ext=use_ext).x
    (got,) = torch.autograd.grad((w ** 2).sum(), lam)
    wt = torch.linalg.solve(X.T @ X / 30 + lam * torch.eye(5, dtype=torch.float64), X.T @ y / 30)
    (want,) = torch.autograd.grad((wt ** 2).sum(), lam)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=0)

    from imaml_ext.structured import SoftmaxHeadOperator
    F = torch.randn(2, 7, 3, generator=g, dtype=torch.float64)
    W = torch.randn(2, 4, 3, generator=g, dtype=torch.float64)
    bias = torch.randn(2, 4, generator=g, dtype=torch.float64)
    rhs = torch.randn(2, 16, generator=g, dtype=torch.float64)

    def solve(s):
        op = SoftmaxHeadOperator(F, W, bias, shift=s, scale=0.5)
        return imaml_ext.cg(op, rhs, batched=True, rtol=1e-13, max_iter=100, use_ext=use_ext).x
    s = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    (got,) = torch.autograd.grad(solve(s).sum(), s)
    h = 1e-6
    with torch.no_grad():
        fd = (solve(torch.tensor(0.7 + h, dtype=torch.float64)).sum()
              - solve(torch.tensor(0.7 - h, dtype=torch.float64)).sum()) / (2 * h)
    torch.testing.assert_close(got, fd, rtol=1e-6, atol=0)


def test_operator_coefficients_are_checked():
    X = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"LstsqOperator: shift must be a finite number or a "
                                         r"0-d floating tensor, got '1'"):
        LstsqOperator(X, shift="1")
    with pytest.raises(ValueError, match="LstsqOperator: scale must be .* got None"):
        LstsqOperator(X, scale=None)
    with pytest.raises(ValueError, match="LstsqOperator: shift must be .* got nan"):
        LstsqOperator(X, shift=float("nan"))
    with pytest.raises(ValueError, match=r"LstsqOperator: shift must be .* got a torch.float64 "
                                         r"tensor of shape \(2,\)"):
        LstsqOperator(X, shift=torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="LstsqOperator: X must be a tensor"):
        LstsqOperator([[1.0]])


def test_the_solve_under_autograd_runs_once_plus_one_product():
    """Under autograd the solve runs on the kernels (no graph of its iterations) and its
    derivative costs one more product, A z, recorded; with nothing to differentiate, none."""
    M = _spd(6, 4)
    w = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    calls = [0]

    def op(v):
        calls[0] += 1
        return (M @ v.unsqueeze(-1)).squeeze(-1) * w
    b = torch.randn(2, 6, dtype=torch.float64)
    res = imaml_ext.cg(op, b, batched=True, rtol=0.0, max_iter=4)
    assert calls[0] == 4 + 1 and res.x.requires_grad
    calls[0] = 0
    w = w.detach()  # op now reads nothing autograd records
    res = imaml_ext.cg(op, b, batched=True, rtol=0.0, max_iter=4)
    assert calls[0] == 4 and not res.x.requires_grad


def test_the_adjoint_solve_reports_and_nans_what_broke():
    A = _spd(5, 5)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    x = imaml_ext.cg(A, b, rtol=1e-12).x
    with pytest.warns(RuntimeWarning, match="non-finite values in the backward's adjoint solve"):
        (g,) = torch.autograd.grad(x, b, grad_outputs=torch.full((5,), float("nan"),
                                                                 dtype=torch.float64))
    assert torch.isnan(g).all()
    x = imaml_ext.cg(A, b, rtol=1e-12).x
    with pytest.warns(RuntimeWarning, match="first-order implicit derivative"):
        torch.autograd.grad(x.sum(), b, create_graph=True)


def test_solve_cg_checks_nothing_inside_vmap():
    """The default check read the statuses with .tolist(), impossible on a vmapped tensor."""
    As = torch.stack([_spd(4, 6), _spd(4, 7)])
    bs = torch.randn(2, 4, dtype=torch.float64)
    got = torch.func.vmap(lambda A, b: solve_cg(maxiter=50, rtol=1e-12)(lambda v: A @ v, b))(
        As, bs)
    torch.testing.assert_close(got, torch.linalg.solve(As, bs))


@pytest.mark.parametrize("use_ext", BOTH)
@pytest.mark.parametrize("kind", ["dense", "lstsq"])
def test_a_solution_beyond_the_dtype_range_is_flagged(kind, use_ext):
    """float32 b = 3e38 with A = I / 2: the scaled solve converges, its unscaling overflows to
    Inf, which was returned with status converged."""
    A = 0.5 * torch.eye(4) if kind == "dense" else LstsqOperator(torch.eye(4), 0.25, 0.25)
    b = torch.full((4,), 3e38)
    res = imaml_ext.cg(A, b, max_iter=10, use_ext=use_ext)
    assert bool(res.nonfinite) and not bool(res.converged)
    ok = imaml_ext.cg(A, b / 4, max_iter=10, use_ext=use_ext)
    assert bool(ok.converged) and torch.isfinite(ok.x).all()


def test_cuda_graph_is_refused_for_an_operator_solved_in_one_op():
    A = torch.eye(3).expand(2, 3, 3)
    with pytest.raises(ValueError, match="cuda_graph=True captures a callable operator's loop; "
                                         "a Tensor A runs its whole solve as one op already"):
        imaml_ext.cg(A, torch.ones(2, 3), batched=True, max_iter=3, cuda_graph=True)
    with pytest.raises(ValueError, match="an? LstsqOperator A runs its whole solve"):
        imaml_ext.cg(LstsqOperator(torch.ones(2, 4, 3)), torch.ones(2, 3), batched=True,
                     max_iter=3, cuda_graph=True)


def test_several_right_hand_sides_in_one_b_get_a_hint():
    """b (P, k) with A (P, P) read "A must be (Pk, Pk)" and nothing about batched=True."""
    with pytest.raises(ValueError, match=r"A must be \(6, 6\) .* got \(3, 3\) \(b's 6 = 2 x 3 "
                                         r"entries are one system here; several right-hand "
                                         r"sides of one A are rows of b with batched=True"):
        imaml_ext.cg(torch.eye(3), torch.ones(3, 2))


def test_an_operator_building_its_own_graph_and_a_small_cotangent():
    """Review of the implicit route: (1) a hand-written HVP, autograd.grad(..., create_graph=True)
    inside the operator, failed from its second product on (they ran under no_grad); (2) the
    adjoint took the forward's atol, so a cotangent below it counted as converged at u = 0: a
    silent zero gradient."""
    g = torch.Generator().manual_seed(5)
    M = _spd(5, 8) * 5
    theta = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)

    def loss(t):
        return 0.5 * t @ M @ t + (t ** 4).sum()

    def hvp(v):
        gr = torch.autograd.grad(loss(theta), theta, create_graph=True)[0]
        return torch.autograd.grad(gr, theta, v, create_graph=True)[0]
    b = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    x = imaml_ext.cg(hvp, b, max_iter=30, rtol=1e-12).x
    got = torch.autograd.grad(x.sum(), [b, theta])
    want = torch.autograd.grad(torch.linalg.solve(torch.func.hessian(loss)(theta), b).sum(),
                               [b, theta])
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, rtol=1e-9, atol=1e-12)

    bb = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    for A in (M, lambda v: M @ v):
        x = imaml_ext.cg(A, bb, rtol=1e-8, atol=1e-6).x
        (gb,) = torch.autograd.grad((1e-7 * x).sum(), bb)
        torch.testing.assert_close(gb, 1e-7 * torch.linalg.solve(M, torch.ones(5,
                                                                              dtype=torch.float64)),
                                   rtol=1e-7, atol=0)


def test_an_absolute_only_forward_gets_an_adjoint_as_accurate():
    """rtol=0, atol>0: the adjoint fell back to rtol 1e-5, gradients 7e-6 off where the forward
    was 9e-14; it now asks the relative accuracy atol / ||b|| the forward asked."""
    g = torch.Generator().manual_seed(9)
    Q, _ = torch.linalg.qr(torch.randn(60, 60, generator=g, dtype=torch.float64))
    M = Q @ torch.diag(torch.logspace(0, 4, 60, dtype=torch.float64)) @ Q.T
    b = torch.randn(60, generator=g, dtype=torch.float64, requires_grad=True)
    x = imaml_ext.cg(M, b, rtol=0.0, atol=1e-10, max_iter=3000).x
    (gb,) = torch.autograd.grad(x.sum(), b)
    want = torch.linalg.solve(M, torch.ones(60, dtype=torch.float64))
    assert float((gb - want).norm() / want.norm()) < 1e-9
