"""The softmax-head ops: softmax_head_hvp against its reference twin and torch.func (jvp of grad of
the mean cross-entropy, vmapped over systems), and the whole-loop cg_solve_softmax_head against
torch.linalg.solve on the explicitly formed operator and against the reference."""
from __future__ import annotations

import pytest
import torch

import imaml_ext
from conftest import assert_within_reference_error, random_spd
from imaml_ext import ops, reference
from imaml_ext.structured import SoftmaxHeadOperator

needs_ext = pytest.mark.skipif(not imaml_ext.extension_available(),
                               reason="compiled extension not built")
BOTH = [pytest.param(True, marks=needs_ext, id="ext"), pytest.param(False, id="ref")]

# (B, n, f, c): odd sizes, one system, one class (H = 0), and the Omniglot / Mini-ImageNet heads
# (20-way 5-shot on 64 features, 5-way 5-shot on 800).
SIZES = [(1, 1, 1, 1), (1, 5, 3, 2), (2, 7, 13, 3), (3, 33, 70, 11), (2, 100, 64, 20),
         (2, 25, 800, 5), (1, 9, 5, 1)]


def head_problem(B, n, f, c, dtype=torch.float64, device="cpu", seed=0, logit_scale=1.0):
    g = torch.Generator().manual_seed(seed * 7919 + B * 131 + n * 17 + f * 3 + c)
    F = torch.randn(B, n, f, dtype=torch.float64, generator=g)
    W = torch.randn(B, c, f, dtype=torch.float64, generator=g) * (logit_scale / max(f, 1) ** 0.5)
    bias = torch.randn(B, c, dtype=torch.float64, generator=g)
    V = torch.randn(B, c, f, dtype=torch.float64, generator=g)
    vb = torch.randn(B, c, dtype=torch.float64, generator=g)
    return tuple(t.to(device=device, dtype=dtype) for t in (F, W, bias, V, vb))


def func_hvp(F, W, bias, V, vb):
    """H (V, vb) by forward-over-reverse torch.func on the mean cross-entropy, vmapped over B.
    The labels are arbitrary: the Hessian does not depend on them."""
    y = torch.zeros(F.shape[:2], dtype=torch.long, device=F.device)

    def loss(W, b, F, y):
        return torch.nn.functional.cross_entropy(F @ W.T + b, y)

    def one(F, W, b, V, vb, y):
        grad = torch.func.grad(loss, argnums=(0, 1))
        return torch.func.jvp(lambda W, b: grad(W, b, F, y), (W, b), (V, vb))[1]

    return torch.func.vmap(one)(F, W, bias, V, vb, y)


def explicit_operator(F, W, bias, shift, scale):
    """(B, P, P) matrix of v -> shift v + scale H v, column by column through the reference."""
    B, c, f = W.shape
    P = c * (f + 1)
    eye = torch.eye(P, dtype=F.dtype, device=F.device)
    cols = []
    for j in range(P):
        e = eye[j].expand(B, P)
        oV, ob = reference.softmax_head_hvp(F, W, bias, *reference.softmax_head_split(e, c, f),
                                            shift, scale)
        cols.append(reference.softmax_head_join(oV, ob))
    return torch.stack(cols, dim=-1)


# ---- softmax_head_hvp ---------------------------------------------------------------------------

@pytest.mark.parametrize("use_ext", BOTH)
@pytest.mark.parametrize("B,n,f,c", SIZES)
def test_hvp_matches_torch_func(B, n, f, c, device, use_ext):
    F, W, bias, V, vb = head_problem(B, n, f, c, device=device)
    HV, Hb = ops.softmax_head_hvp(F, W, bias, V, vb, 0.0, 1.0, use_ext=use_ext)
    tV, tb = func_hvp(F, W, bias, V, vb)
    torch.testing.assert_close(HV, tV, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(Hb, tb, rtol=1e-10, atol=1e-12)


@needs_ext
@pytest.mark.parametrize("B,n,f,c", SIZES)
def test_hvp_matches_reference(B, n, f, c, device, dtype):
    F64, W64, b64, V64, vb64 = head_problem(B, n, f, c, device=device, seed=1, logit_scale=3.0)
    args = [t.to(dtype) for t in (F64, W64, b64, V64, vb64)]
    shift, scale = 0.7, 1.3
    ext = ops.softmax_head_hvp(*args, shift, scale, use_ext=True)
    ref = ops.softmax_head_hvp(*args, shift, scale, use_ext=False)
    truth = ops.softmax_head_hvp(*[a.double() for a in args], shift, scale, use_ext=False)
    for e, r, t in zip(ext, ref, truth):
        assert e.dtype == dtype and e.is_contiguous()
        if dtype == torch.float64:
            torch.testing.assert_close(e, r, rtol=1e-10, atol=1e-12)
        else:
            assert_within_reference_error(e, r, t)


@pytest.mark.parametrize("use_ext", BOTH)
def test_hvp_shift_scale_and_one_class(device, use_ext):
    # One class: the softmax is constant, H = 0, so the op returns shift * (V, vb).
    F, W, bias, V, vb = head_problem(2, 6, 4, 1, device=device)
    oV, ob = ops.softmax_head_hvp(F, W, bias, V, vb, 2.5, 3.0, use_ext=use_ext)
    torch.testing.assert_close(oV, 2.5 * V, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ob, 2.5 * vb, rtol=1e-12, atol=1e-12)
    # shift and scale combine linearly with H.
    F, W, bias, V, vb = head_problem(2, 6, 4, 3, device=device)
    HV, Hb = ops.softmax_head_hvp(F, W, bias, V, vb, 0.0, 1.0, use_ext=use_ext)
    oV, ob = ops.softmax_head_hvp(F, W, bias, V, vb, 0.5, 2.0, use_ext=use_ext)
    torch.testing.assert_close(oV, 0.5 * V + 2.0 * HV)
    torch.testing.assert_close(ob, 0.5 * vb + 2.0 * Hb)


@pytest.mark.parametrize("use_ext", BOTH)
def test_hvp_empty_batch_and_no_samples(device, use_ext):
    F, W, bias, V, vb = head_problem(0, 5, 4, 3, device=device)
    oV, ob = ops.softmax_head_hvp(F, W, bias, V, vb, 1.0, 1.0, use_ext=use_ext)
    assert oV.shape == (0, 3, 4) and ob.shape == (0, 3)
    # No samples: the mean over none is taken as 0, so H = 0.
    F, W, bias, V, vb = head_problem(2, 0, 4, 3, device=device)
    oV, ob = ops.softmax_head_hvp(F, W, bias, V, vb, 1.5, 1.0, use_ext=use_ext)
    torch.testing.assert_close(oV, 1.5 * V)
    torch.testing.assert_close(ob, 1.5 * vb)


@pytest.mark.parametrize("use_ext", BOTH)
def test_hvp_non_contiguous_inputs(device, use_ext):
    F, W, bias, V, vb = head_problem(3, 11, 9, 4, device=device)
    nc = [t.transpose(-1, -2).contiguous().transpose(-1, -2) if t.dim() == 3 else
          torch.stack([t, t], dim=-1)[..., 0] for t in (F, W, bias, V, vb)]
    assert not any(t.is_contiguous() for t in nc)
    got = ops.softmax_head_hvp(*nc, 0.3, 0.9, use_ext=use_ext)
    want = ops.softmax_head_hvp(F, W, bias, V, vb, 0.3, 0.9, use_ext=False)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


@needs_ext
def test_hvp_thread_split_matches_per_system(device):
    # B < threads splits one system's samples over per-thread accumulators; B >= threads gives
    # each system to one thread. Both must agree with the reference.
    F, W, bias, V, vb = head_problem(1, 57, 19, 6, device=device)
    FB, WB, bB, VB, vbB = (torch.cat([t] * 4) for t in (F, W, bias, V, vb))
    one = ops.softmax_head_hvp(F, W, bias, V, vb, 0.0, 1.0, use_ext=True)
    many = ops.softmax_head_hvp(FB, WB, bB, VB, vbB, 0.0, 1.0, use_ext=True)
    for o, m in zip(one, many):
        torch.testing.assert_close(m, o.expand_as(m), rtol=1e-12, atol=1e-13)


@needs_ext
def test_hvp_opcheck(device):
    F, W, bias, V, vb = head_problem(2, 9, 7, 3, device=device)
    torch.library.opcheck(torch.ops.imaml_ext.softmax_head_hvp.default,
                          (F, W, bias, V, vb, 0.5, 2.0))
    torch.library.opcheck(torch.ops.imaml_ext.cg_solve_softmax_head.default,
                          (F, W, bias, reference.softmax_head_join(V, vb),
                           torch.zeros(2, 3 * 8, dtype=F.dtype, device=device), 1.0, 1.0, 5, 1e-8,
                           0.0))


# ---- cg_solve_softmax_head ----------------------------------------------------------------------

@pytest.mark.parametrize("use_ext", BOTH)
@pytest.mark.parametrize("B,n,f,c", [(1, 1, 1, 1), (1, 6, 4, 3), (3, 20, 7, 5), (2, 9, 16, 2)])
def test_cg_solves_explicit_system(B, n, f, c, device, use_ext):
    F, W, bias, V, vb = head_problem(B, n, f, c, device=device, seed=2)
    shift, scale = 1.0, 1.0 / 0.5  # (I + H / lam), lam = 0.5
    b = reference.softmax_head_join(V, vb)
    P = c * (f + 1)
    x, iters, rnorm, status = ops.cg_solve_softmax_head(F, W, bias, b, torch.zeros_like(b), shift,
                                                        scale, 4 * P + 10, 1e-12, 0.0,
                                                        use_ext=use_ext)
    A = explicit_operator(F, W, bias, shift, scale)
    torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=1e-8, atol=1e-10)
    assert (status == reference.CONVERGED).all()
    assert (rnorm <= 1e-12 * b.norm(dim=-1) + 1e-300).all()


@needs_ext
@pytest.mark.parametrize("B,n,f,c", [(1, 13, 9, 4), (4, 25, 40, 5), (2, 100, 64, 20),
                                     (3, 25, 800, 5)])
def test_cg_matches_reference(B, n, f, c, device, dtype):
    F64, W64, b64, V64, vb64 = head_problem(B, n, f, c, device=device, seed=3, logit_scale=2.0)
    F, W, bias = (t.to(dtype) for t in (F64, W64, b64))
    b = reference.softmax_head_join(V64, vb64).to(dtype)
    x0 = 0.1 * torch.ones_like(b)
    args = (1.0, 1.0 / 0.4, 6, 0.0, 0.0)
    ext = ops.cg_solve_softmax_head(F, W, bias, b, x0, *args, use_ext=True)
    ref = ops.cg_solve_softmax_head(F, W, bias, b, x0, *args, use_ext=False)
    truth = ops.cg_solve_softmax_head(F64, W64, b64, b.double(), x0.double(), *args,
                                      use_ext=False)
    assert torch.equal(ext[1], ref[1]) and torch.equal(ext[3], ref[3])
    if dtype == torch.float64:
        torch.testing.assert_close(ext[0], ref[0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(ext[2], ref[2], rtol=1e-8, atol=1e-14)
    else:
        assert_within_reference_error(ext[0], ref[0], truth[0])


@needs_ext
@pytest.mark.parametrize("B,n,f,c", [(5, 30, 12, 4), (1, 50, 20, 6), (33, 10, 8, 3)])
def test_cg_iterations_and_status_match_reference_float64(B, n, f, c, device):
    # Early stop per system: a loose tolerance stops systems at different iterations.
    F, W, bias, V, vb = head_problem(B, n, f, c, device=device, seed=4, logit_scale=4.0)
    b = reference.softmax_head_join(V, vb)
    b = b * torch.logspace(-3, 0, B, dtype=b.dtype, device=device).unsqueeze(-1)
    x0 = torch.zeros_like(b)
    for rtol, atol in ((1e-3, 0.0), (1e-8, 1e-4), (1e-10, 0.0)):
        ext = ops.cg_solve_softmax_head(F, W, bias, b, x0, 1.0, 3.0, 40, rtol, atol, use_ext=True)
        ref = ops.cg_solve_softmax_head(F, W, bias, b, x0, 1.0, 3.0, 40, rtol, atol,
                                        use_ext=False)
        assert ext[1].tolist() == ref[1].tolist()
        assert ext[3].tolist() == ref[3].tolist()
        torch.testing.assert_close(ext[0], ref[0], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("use_ext", BOTH)
def test_cg_zero_rhs_empty_batch_and_max_iter(device, use_ext):
    F, W, bias, V, vb = head_problem(3, 8, 5, 3, device=device)
    b = torch.zeros(3, 18, dtype=F.dtype, device=device)
    x, iters, rnorm, status = ops.cg_solve_softmax_head(F, W, bias, b, torch.zeros_like(b), 1.0,
                                                        1.0, 10, 1e-6, 0.0, use_ext=use_ext)
    assert torch.equal(x, torch.zeros_like(b)) and iters.tolist() == [0, 0, 0]
    assert (status == reference.CONVERGED).all()
    b = reference.softmax_head_join(V, vb)
    x, iters, rnorm, status = ops.cg_solve_softmax_head(F, W, bias, b, torch.zeros_like(b), 1.0,
                                                        100.0, 2, 1e-14, 0.0, use_ext=use_ext)
    assert iters.tolist() == [2, 2, 2] and (status == reference.RUNNING).all()
    F0, W0, b0, V0, vb0 = head_problem(0, 8, 5, 3, device=device)
    x, iters, rnorm, status = ops.cg_solve_softmax_head(
        F0, W0, b0, torch.zeros(0, 18, dtype=F.dtype, device=device),
        torch.zeros(0, 18, dtype=F.dtype, device=device), 1.0, 1.0, 5, 1e-6, 0.0,
        use_ext=use_ext)
    assert x.shape == (0, 18) and iters.shape == (0,)


@pytest.mark.parametrize("use_ext", BOTH)
def test_cg_non_contiguous_inputs(device, use_ext):
    F, W, bias, V, vb = head_problem(2, 12, 6, 3, device=device)
    Ft = F.transpose(1, 2).contiguous().transpose(1, 2)
    Wt = W.transpose(1, 2).contiguous().transpose(1, 2)
    b = reference.softmax_head_join(V, vb)
    bt = torch.stack([b, b], dim=-1)[..., 0]
    assert not (Ft.is_contiguous() or Wt.is_contiguous() or bt.is_contiguous())
    got = ops.cg_solve_softmax_head(Ft, Wt, bias, bt, torch.zeros_like(b), 1.0, 2.0, 50, 1e-12,
                                    0.0, use_ext=use_ext)
    want = ops.cg_solve_softmax_head(F, W, bias, b, torch.zeros_like(b), 1.0, 2.0, 50, 1e-12, 0.0,
                                     use_ext=False)
    torch.testing.assert_close(got[0], want[0])


# ---- the public operator ------------------------------------------------------------------------

@pytest.mark.parametrize("use_ext", BOTH)
def test_operator_through_public_cg(device, use_ext):
    F, W, bias, V, vb = head_problem(3, 10, 6, 4, device=device, seed=5)
    op = SoftmaxHeadOperator(F, W, bias, shift=1.0, scale=2.0)
    res = imaml_ext.cg(op, (V, vb), batched=True, max_iter=200, rtol=1e-12, use_ext=use_ext)
    xV, xb = res.x
    assert xV.shape == V.shape and xb.shape == vb.shape and bool(res.converged.all())
    oV, ob = op((xV, xb))  # the reference apply on the pair structure
    torch.testing.assert_close(oV, V, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(ob, vb, rtol=1e-8, atol=1e-10)
    # The flat form and the whole-loop entry point agree with the callable form.
    flat = op(reference.softmax_head_join(xV, xb))
    torch.testing.assert_close(flat, reference.softmax_head_join(V, vb), rtol=1e-8, atol=1e-10)
    b = reference.softmax_head_join(V, vb)
    out = op.solve_flat(b, torch.zeros_like(b), max_iter=200, rtol=1e-12, atol=0.0,
                        use_ext=use_ext, reference_only=False)
    torch.testing.assert_close(out[0], reference.softmax_head_join(xV, xb), rtol=1e-8,
                               atol=1e-10)


def test_operator_single_system_and_checks():
    F, W, bias, V, vb = head_problem(1, 10, 6, 4, seed=6)
    op1 = SoftmaxHeadOperator(F[0], W[0], bias[0], shift=1.0, scale=0.5)
    opB = SoftmaxHeadOperator(F, W, bias, shift=1.0, scale=0.5)
    oV, ob = op1((V[0], vb[0]))
    wV, wb = opB((V, vb))
    torch.testing.assert_close(oV, wV[0])
    torch.testing.assert_close(ob, wb[0])
    assert op1.num_params == 4 * 7
    b = torch.zeros(1, 27, dtype=F.dtype)
    with pytest.raises(ValueError, match="c\\*\\(f\\+1\\) = 28 unknowns"):
        opB.solve_flat(b, b, max_iter=5, rtol=1e-6, atol=0.0, use_ext=False, reference_only=True)
    with pytest.raises(ValueError, match="A.F must have b's dtype"):
        opB.solve_flat(b.float(), b.float(), max_iter=5, rtol=1e-6, atol=0.0, use_ext=False,
                       reference_only=True)


def test_operator_is_differentiable_reference():
    # The callable runs the reference, so autograd flows to W (e.g. for a GGN/implicit layer).
    F, W, bias, V, vb = head_problem(2, 7, 5, 3, seed=7)
    W = W.clone().requires_grad_(True)
    oV, ob = SoftmaxHeadOperator(F, W, bias)((V, vb))
    (oV.sum() + ob.sum()).backward()
    assert W.grad is not None and torch.isfinite(W.grad).all()


# ---- bad arguments ------------------------------------------------------------------------------

def _hvp(F, W, bias, V, vb, u, shift=0.0, scale=1.0):
    return ops.softmax_head_hvp(F, W, bias, V, vb, shift, scale, use_ext=u)


def _cg(F, W, bias, b, u, max_iter=5, rtol=1e-6, atol=0.0, x0=None):
    return ops.cg_solve_softmax_head(F, W, bias, b, torch.zeros_like(b) if x0 is None else x0,
                                     1.0, 1.0, max_iter, rtol, atol, use_ext=u)


@pytest.mark.parametrize("use_ext", BOTH)
@pytest.mark.parametrize("call,match", [
    (lambda F, W, bs, V, vb, b, u: _hvp(F[0], W, bs, V, vb, u), "F must be \\(B, n, f\\)"),
    (lambda F, W, bs, V, vb, b, u: _hvp(F.int(), W, bs, V, vb, u), "F must be float32 or float64"),
    (lambda F, W, bs, V, vb, b, u: _hvp(F, W[:, :, :-1], bs, V, vb, u),
     "W must be \\(2, c, 4\\) to match F"),
    (lambda F, W, bs, V, vb, b, u: _hvp(F, W.float(), bs, V, vb, u), "W must have dtype"),
    (lambda F, W, bs, V, vb, b, u: _hvp(F, W, bs[:, :-1], V, vb, u),
     "bias must be \\(2, 3\\) to match W"),
    (lambda F, W, bs, V, vb, b, u: _hvp(F, W, bs, V[:1], vb, u), "V must be .* like W"),
    (lambda F, W, bs, V, vb, b, u: _hvp(F, W, bs, V, vb.float(), u), "vb must have dtype"),
    (lambda F, W, bs, V, vb, b, u: _hvp(F, W, bs, V, vb[:, :2], u), "vb must be .* like bias"),
    (lambda F, W, bs, V, vb, b, u: _hvp(F, W, bs, V, vb, u, shift=float("nan")),
     "shift and scale must be finite"),
    (lambda F, W, bs, V, vb, b, u: _cg(F, W, bs, b[:, :-1], u),
     "b must be \\(2, 15\\) = \\(B, c\\*\\(f\\+1\\)\\)"),
    (lambda F, W, bs, V, vb, b, u: _cg(F, W, bs, b, u, max_iter=0), "max_iter must be >= 1"),
    (lambda F, W, bs, V, vb, b, u: _cg(F, W, bs, b, u, rtol=-1.0), "rtol must be finite"),
    (lambda F, W, bs, V, vb, b, u: _cg(F, W, bs, b, u, x0=b[:, :-1]), "x0 must be"),
    (lambda F, W, bs, V, vb, b, u: _cg(F, W[:1], bs, b, u), "W must be \\(2, c, 4\\)"),
])
def test_bad_arguments(use_ext, call, match):
    F, W, bias, V, vb = head_problem(2, 5, 4, 3)
    b = reference.softmax_head_join(V, vb)
    with pytest.raises(ValueError, match=match):
        call(F, W, bias, V, vb, b, use_ext)


# ---- the CUDA paths: single-launch (one block per system) and multi-launch -------------------

def _unaligned(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of t whose data starts 4 bytes past a 16-byte boundary (no 16-byte
    vector loads possible)."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    return out


@needs_ext
@pytest.mark.parametrize("fused", ["0", "1"])
def test_solver_paths_match_reference(fused, device, dtype, monkeypatch):
    # IMAML_CG_FUSED forces the CUDA path (0: a fixed sequence of launches, 1: one launch with a
    # block per system); the CPU ignores it. Iterations and status must match the reference in
    # float64, the solution within the tolerance rule in float32. d, P multiples of 4 take the
    # 16-byte-load kernels; odd ones and an unaligned X the scalar ones.
    monkeypatch.setenv("IMAML_CG_FUSED", fused)
    g = torch.Generator().manual_seed(11)

    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    for B, n, d in ((3, 40, 64), (2, 33, 37)):
        X64 = torch.randn(B, n, d, dtype=torch.float64, generator=g).to(device)
        b64 = torch.randn(B, d, dtype=torch.float64, generator=g).to(device)
        A64 = random_spd(B, d, device=device, cond=50.0, generator=g)
        for aligned in (True, False):
            X, A, b = X64.to(dtype), A64.to(dtype), b64.to(dtype)
            if not aligned:
                X, A = _unaligned(X), _unaligned(A)
            x0 = torch.zeros_like(b)
            for name, run in (
                ("lstsq", lambda u, X=X, b=b, x0=x0: ops.cg_solve_lstsq(
                    X, b, x0, 1.0, 1.0 / n, 30, 1e-6, 0.0, use_ext=u)),
                ("dense", lambda u, A=A, b=b, x0=x0: ops.cg_solve_dense(
                    A, b, x0, 30, 1e-6, 0.0, use_ext=u)),
            ):
                ext, ref = run(True), run(False)
                if dtype == torch.float64:
                    assert ext[1].tolist() == ref[1].tolist(), name
                    assert ext[3].tolist() == ref[3].tolist(), name
                    # 30 iterations amplify rounding differences: agree to within what the
                    # solve promises (rtol 1e-6 times the condition number, 50).
                    assert rel(ext[0], ref[0]) < 1e-5, name
                else:
                    assert rel(ext[0], ref[0]) < 1e-3, name
    for B, n, f, c in ((4, 20, 16, 5), (3, 9, 13, 3), (2, 25, 800, 5)):
        F, W, bias, V, vb = head_problem(B, n, f, c, dtype=dtype, device=device, seed=12)
        b = reference.softmax_head_join(V, vb)
        x0 = torch.zeros_like(b)
        ext = ops.cg_solve_softmax_head(F, W, bias, b, x0, 1.0, 2.0, 25, 1e-6, 0.0, use_ext=True)
        ref = ops.cg_solve_softmax_head(F, W, bias, b, x0, 1.0, 2.0, 25, 1e-6, 0.0, use_ext=False)
        if dtype == torch.float64:
            assert ext[1].tolist() == ref[1].tolist() and ext[3].tolist() == ref[3].tolist()
            torch.testing.assert_close(ext[0], ref[0], rtol=1e-8, atol=1e-10)
        else:
            truth = ops.cg_solve_softmax_head(F.double(), W.double(), bias.double(), b.double(),
                                              x0.double(), 1.0, 2.0, 25, 1e-6, 0.0,
                                              use_ext=False)
            assert_within_reference_error(ext[0], ref[0], truth[0], factor=4.0)


@needs_ext
@pytest.mark.parametrize("fused", ["0", "1"])
def test_solvers_mixed_starts(fused, device, monkeypatch):
    # Systems that start at x0 = 0 skip the product A x0 (r0 = b) while the others in the same
    # batch form it, on both CUDA paths and the CPU; a zero-start system whose operator holds a
    # NaN is still flagged at the reference's iteration, and its neighbours are unaffected.
    monkeypatch.setenv("IMAML_CG_FUSED", fused)
    g = torch.Generator().manual_seed(21)
    B, n, d = 4, 30, 24
    X = torch.randn(B, n, d, dtype=torch.float64, generator=g).to(device)
    A = random_spd(B, d, device=device, cond=20.0, generator=g)
    b = torch.randn(B, d, dtype=torch.float64, generator=g).to(device)
    x0 = torch.randn(B, d, dtype=torch.float64, generator=g).to(device)
    x0[0] = 0.0
    x0[2] = 0.0
    X[2, 3, 5] = float("nan")
    A[2, 1, 1] = float("nan")
    F, W, bias, V, vb = head_problem(B, 15, 8, 3, device=device, seed=22)
    F[2, 4, 1] = float("nan")
    hb = reference.softmax_head_join(V, vb)
    h0 = torch.randn(hb.shape, dtype=torch.float64, generator=g).to(device)
    h0[0] = 0.0
    h0[2] = 0.0
    for name, run in (
        ("lstsq", lambda u: ops.cg_solve_lstsq(X, b, x0, 1.0, 1.0 / n, 15, 1e-9, 0.0, use_ext=u)),
        ("dense", lambda u: ops.cg_solve_dense(A, b, x0, 15, 1e-9, 0.0, use_ext=u)),
        ("head", lambda u: ops.cg_solve_softmax_head(F, W, bias, hb, h0, 1.0, 2.0, 15, 1e-9, 0.0,
                                                     use_ext=u)),
    ):
        ext, ref = run(True), run(False)
        assert ext[3].tolist() == ref[3].tolist(), name
        assert ext[3][2].item() == reference.NONFINITE, name
        assert ext[1].tolist() == ref[1].tolist(), name
        keep = [0, 1, 3]
        torch.testing.assert_close(ext[0][keep], ref[0][keep], rtol=1e-8, atol=1e-10, msg=name)
        assert torch.isfinite(ext[0]).all(), name


@needs_ext
@pytest.mark.parametrize("B,n,f,c", [(2, 12, 640, 100), (2, 3, 2, 4000)])
def test_hvp_large_heads(B, n, f, c, device, dtype):
    # c*f beyond shared memory (global accumulators on CUDA), and c so large that even the
    # per-warp class scratch goes to global memory.
    F64, W64, b64, V64, vb64 = head_problem(B, n, f, c, device=device, seed=13, logit_scale=2.0)
    args = [t.to(dtype) for t in (F64, W64, b64, V64, vb64)]
    ext = ops.softmax_head_hvp(*args, 0.5, 3.0, use_ext=True)
    ref = ops.softmax_head_hvp(*args, 0.5, 3.0, use_ext=False)
    truth = ops.softmax_head_hvp(*[a.double() for a in args], 0.5, 3.0, use_ext=False)
    for e, r, t in zip(ext, ref, truth):
        if dtype == torch.float64:
            torch.testing.assert_close(e, r, rtol=1e-10, atol=1e-12)
        else:
            assert_within_reference_error(e, r, t, factor=4.0)
    b = reference.softmax_head_join(*args[3:])
    x0 = torch.zeros_like(b)
    ext = ops.cg_solve_softmax_head(*args[:3], b, x0, 1.0, 1.0, 3, 0.0, 0.0, use_ext=True)
    ref = ops.cg_solve_softmax_head(*args[:3], b, x0, 1.0, 1.0, 3, 0.0, 0.0, use_ext=False)
    assert ext[1].tolist() == ref[1].tolist()
    rel = (ext[0] - ref[0]).norm() / ref[0].norm()
    assert rel < (1e-10 if dtype == torch.float64 else 1e-4)


@pytest.mark.parametrize("use_ext", BOTH)
@pytest.mark.parametrize("B,f,c", [(1, 1, 1), (2, 1, 1), (3, 4, 2), (4, 70, 11)])
def test_no_samples_is_shift_identity(B, f, c, dtype, use_ext):
    """n = 0: H = 0, so the HVP is shift * v and the solve is b / shift, for every system and
    thread layout (a system with no samples once made the CPU solver read the null head it is
    given, since its probabilities buffer was empty)."""
    g = torch.Generator().manual_seed(3)
    F = torch.empty(B, 0, f, dtype=dtype)
    W, V = (torch.randn(B, c, f, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
    bias, vb = (torch.randn(B, c, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
    HV, Hb = ops.softmax_head_hvp(F, W, bias, V, vb, 0.5, 2.0, use_ext=use_ext)
    torch.testing.assert_close(HV, 0.5 * V)
    torch.testing.assert_close(Hb, 0.5 * vb)
    b = torch.randn(B, c * (f + 1), generator=g, dtype=torch.float64).to(dtype)
    x, iters, _, status = ops.cg_solve_softmax_head(F, W, bias, b, torch.zeros_like(b), 0.5, 2.0,
                                                    5, 1e-6, 0.0, use_ext=use_ext)
    torch.testing.assert_close(x, b / 0.5)
    assert bool((status == 1).all()) and bool((iters == 1).all()), (status, iters)
