"""The fused CG iteration op against its reference twin (imaml_ext.reference.cg_step)."""
from __future__ import annotations

import pytest
import torch

from conftest import assert_within_reference_error, random_spd
from imaml_ext import ops, reference

needs_ext = pytest.mark.skipif(not __import__("imaml_ext").extension_available(),
                               reason="compiled extension not built")


def make_state(B, P, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = random_spd(B, P, generator=g)
    b = torch.randn(B, P, dtype=torch.float64, generator=g)
    x = torch.randn(B, P, dtype=torch.float64, generator=g) * 0.1
    r = b - (A @ x.unsqueeze(-1)).squeeze(-1)
    p = r.clone()
    rs = (r * r).sum(-1)
    bnorm2 = (b * b).sum(-1)
    status = torch.zeros(B, dtype=torch.int32)
    iters = torch.zeros(B, dtype=torch.int32)
    state = dict(A=A, x=x, r=r, p=p, rs=rs, bnorm2=bnorm2, status=status, iters=iters)
    return {k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device))
            for k, v in state.items()}


def run_steps(state, steps, use_ext, rtol=1e-8, atol=0.0):
    s = {k: v.clone() for k, v in state.items()}
    for _ in range(steps):
        Ap = torch.bmm(s["A"], s["p"].unsqueeze(-1)).squeeze(-1)
        ops.cg_step_(s["x"], s["r"], s["p"], Ap, s["rs"], s["bnorm2"], s["status"], s["iters"],
                     rtol, atol, use_ext=use_ext)
    return s


@needs_ext
@pytest.mark.parametrize("B,P", [(1, 1), (1, 5), (3, 17), (4, 257), (2, 1031)])
def test_matches_reference(B, P, device, dtype):
    state = make_state(B, P, dtype, device)
    # Two steps: far from convergence, where rounding differences are not amplified by the
    # vanishing residual.
    ext = run_steps(state, 2, use_ext=True)
    ref = run_steps(state, 2, use_ext=False)
    assert torch.equal(ext["status"], ref["status"]) and torch.equal(ext["iters"], ref["iters"])
    if dtype == torch.float64:
        for k in ("x", "r", "p", "rs"):
            torch.testing.assert_close(ext[k], ref[k], rtol=1e-10, atol=1e-12)
    else:
        # The truth starts from the same (rounded) float32 inputs, computed in float64.
        truth = run_steps({k: v.double() if v.is_floating_point() else v
                           for k, v in state.items()}, 2, use_ext=False)
        for k in ("x", "r", "p"):
            assert_within_reference_error(ext[k], ref[k], truth[k])


@needs_ext
def test_empty_batch(device):
    state = make_state(0, 7, torch.float64, device)
    out = run_steps(state, 2, use_ext=True)
    assert out["x"].shape == (0, 7)


@pytest.mark.parametrize("use_ext", [pytest.param(True, marks=needs_ext), False])
def test_stopped_systems_do_not_change(device, use_ext):
    state = make_state(3, 11, torch.float64, device)
    state["status"][1] = reference.CONVERGED
    state["status"][2] = reference.NEGATIVE_CURVATURE
    out = run_steps(state, 3, use_ext=use_ext)
    for k in ("x", "r", "p", "rs"):
        assert torch.equal(out[k][1:], state[k][1:])
    assert out["iters"].tolist() == [3, 0, 0]


@pytest.mark.parametrize("use_ext", [pytest.param(True, marks=needs_ext), False])
def test_negative_curvature_keeps_last_iterate(device, use_ext):
    state = make_state(2, 9, torch.float64, device)
    state["A"][0] = -state["A"][0]  # indefinite (negative definite) system 0
    out = run_steps(state, 1, use_ext=use_ext)
    assert out["status"].tolist() == [reference.NEGATIVE_CURVATURE, reference.RUNNING]
    assert torch.equal(out["x"][0], state["x"][0])
    assert out["iters"].tolist() == [0, 1]


@pytest.mark.parametrize("use_ext", [pytest.param(True, marks=needs_ext), False])
def test_nonfinite_is_flagged_not_propagated(device, use_ext):
    state = make_state(2, 6, torch.float64, device)
    state["A"][1, 2, 3] = float("nan")
    out = run_steps(state, 2, use_ext=use_ext)
    assert out["status"][1].item() == reference.NONFINITE
    assert torch.isfinite(out["x"]).all()


@pytest.mark.parametrize("use_ext", [pytest.param(True, marks=needs_ext), False])
def test_converges_to_solve(device, use_ext):
    state = make_state(3, 20, torch.float64, device)
    out = run_steps(state, 40, use_ext=use_ext, rtol=1e-12)
    b = state["r"] + torch.bmm(state["A"], state["x"].unsqueeze(-1)).squeeze(-1)
    truth = torch.linalg.solve(state["A"], b)
    torch.testing.assert_close(out["x"], truth, rtol=1e-9, atol=1e-9)
    assert (out["status"] == reference.CONVERGED).all()


@needs_ext
def test_opcheck(device):
    s = make_state(3, 13, torch.float64, device)
    Ap = torch.bmm(s["A"], s["p"].unsqueeze(-1)).squeeze(-1)
    args = (s["x"], s["r"], s["p"], Ap, s["rs"], s["bnorm2"], s["status"], s["iters"], 1e-6, 0.0)
    torch.library.opcheck(torch.ops.imaml_ext.cg_step.default, args)


@pytest.mark.parametrize("use_ext", [pytest.param(True, marks=needs_ext), False])
@pytest.mark.parametrize("field,bad,match", [
    ("r", lambda s: s["r"][:, :-1], r"r must be"),
    ("x", lambda s: s["x"].to(torch.int64), r"x must be float32 or float64"),
    ("rs", lambda s: s["rs"][:-1], r"rs must be \(3,\)"),
    ("status", lambda s: s["status"].long(), r"status must be int32"),
    ("Ap", lambda s: s["Ap"].float(), r"Ap must have dtype"),
    # written in place: the reference took a non-contiguous x or an expanded status silently
    ("x", lambda s: s["x"].t().contiguous().t(), r"x is written in place and must be contiguous"),
    ("status", lambda s: s["status"][:1].expand(3),
     r"status is written in place and must be contiguous"),
    # restrict pointers in the kernels: a buffer passed twice ran, with a meaningless result
    ("r", lambda s: s["x"], r"x and r must be separate buffers \(they share memory\)"),
    ("Ap", lambda s: s["r"], r"r and Ap must be separate buffers"),
    ("bnorm2", lambda s: s["rs"], r"rs and bnorm2 must be separate buffers"),
    ("Ap", lambda s: s["x"][:1].expand(3, 5), r"x and Ap must be separate buffers"),
])
def test_bad_arguments_name_the_argument(use_ext, field, bad, match):
    s = make_state(3, 5, torch.float64, "cpu")
    s["Ap"] = s["p"].clone()
    s[field] = bad(s)
    with pytest.raises(ValueError, match=match):
        ops.cg_step_(s["x"], s["r"], s["p"], s["Ap"], s["rs"], s["bnorm2"], s["status"],
                     s["iters"], 1e-6, 0.0, use_ext=use_ext)


@pytest.mark.parametrize("use_ext", [pytest.param(True, marks=needs_ext), False])
def test_negative_tolerance_rejected(use_ext):
    s = make_state(2, 4, torch.float64, "cpu")
    with pytest.raises(ValueError, match="rtol must be finite and >= 0"):
        ops.cg_step_(s["x"], s["r"], s["p"], s["p"].clone(), s["rs"], s["bnorm2"], s["status"],
                     s["iters"], -1.0, 0.0, use_ext=use_ext)


@pytest.mark.parametrize("use_ext", [pytest.param(True, marks=needs_ext), False])
def test_cg_begin_refuses_rescale_with_an_absolute_tolerance(use_ext):
    # the rescaled residual was compared with the unscaled atol: b = 1e-200 with atol 1e-150
    # came out "running", not converged
    b = torch.full((1, 4), 1e-200, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"cg_begin: rescale needs atol = 0"):
        ops.cg_begin(b, 1e-6, 1e-150, True, use_ext=use_ext)
    status = ops.cg_begin(b, 1e-6, 1e-150, False, use_ext=use_ext)[5]
    assert status.tolist() == [1]  # converged: ||b|| = 2e-200 <= atol


# ---- the affine step and a step-by-step solve's set-up and finish (cg_begin, cg_end) ----------

AFFINE = [(1.0, 0.25), (3.5, 1.0), (0.0, 2.0)]


@pytest.mark.parametrize("use_ext", [pytest.param(True, marks=needs_ext), False])
@pytest.mark.parametrize("shift,scale", AFFINE)
def test_affine_step_is_the_step_on_the_affine_product(device, use_ext, shift, scale):
    """cg_step(..., M p, shift, scale) is cg_step(..., shift p + scale M p): the shift and scale
    folded into the step instead of two more passes over the vectors."""
    state = make_state(3, 257, torch.float64, device)
    fused, plain = ({k: v.clone() for k, v in state.items()} for _ in range(2))
    for _ in range(3):
        for s, affine in ((fused, True), (plain, False)):
            Mp = torch.bmm(s["A"], s["p"].unsqueeze(-1)).squeeze(-1)
            if affine:
                ops.cg_step_(s["x"], s["r"], s["p"], Mp, s["rs"], s["bnorm2"], s["status"],
                             s["iters"], 1e-12, 0.0, shift=shift, scale=scale, use_ext=use_ext)
            else:
                ops.cg_step_(s["x"], s["r"], s["p"], shift * s["p"] + scale * Mp, s["rs"],
                             s["bnorm2"], s["status"], s["iters"], 1e-12, 0.0, use_ext=False)
    assert torch.equal(fused["iters"], plain["iters"]) and (fused["iters"] == 3).all()
    for k in ("x", "r", "p", "rs"):
        torch.testing.assert_close(fused[k], plain[k], rtol=1e-12, atol=1e-14)


@needs_ext
@pytest.mark.parametrize("shift,scale", AFFINE)
def test_affine_step_matches_reference(device, dtype, shift, scale):
    state = make_state(4, 1031, dtype, device)
    out = {}
    for use_ext in (True, False):
        s = {k: v.clone() for k, v in state.items()}
        for _ in range(2):
            Mp = torch.bmm(s["A"], s["p"].unsqueeze(-1)).squeeze(-1)
            ops.cg_step_(s["x"], s["r"], s["p"], Mp, s["rs"], s["bnorm2"], s["status"],
                         s["iters"], 1e-8, 0.0, shift=shift, scale=scale, use_ext=use_ext)
        out[use_ext] = s
    assert torch.equal(out[True]["status"], out[False]["status"])
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-4, atol=1e-5)
    for k in ("x", "r", "p", "rs"):
        torch.testing.assert_close(out[True][k], out[False][k], **tol)


def begin_inputs(dtype, device):
    """Rows: ordinary, tiny (squares underflow), huge (squares overflow; near the largest
    float), zero, NaN, +Inf, and a wide-range row."""
    big = 3e38 if dtype == torch.float32 else 1.5e308
    tiny = 1e-30 if dtype == torch.float32 else 1e-200
    g = torch.Generator().manual_seed(3)
    b = torch.randn(7, 300, generator=g, dtype=torch.float64)
    b[1] *= tiny
    b[2] = b[2].sign() * big * torch.rand(300, generator=g, dtype=torch.float64).clamp(0.5)
    b[3] = 0.0
    b[4, 7] = float("nan")
    b[5, 0] = float("inf")
    b[6] *= torch.logspace(-20, 20, 300, dtype=torch.float64)
    return b.to(dtype).to(device)


@pytest.mark.parametrize("use_ext", [pytest.param(True, marks=needs_ext), False])
def test_cg_begin_state(device, dtype, use_ext):
    b = begin_inputs(dtype, device)
    x, r, p, rs, bnorm2, status, iters, s = ops.cg_begin(b, 1e-6, 0.0, True, use_ext=use_ext)
    finite_rows = [0, 1, 2, 3, 6]
    assert torch.equal(x, torch.zeros_like(b)) and torch.equal(iters, torch.zeros_like(iters))
    assert status.tolist() == [0, 0, 0, 1, 3, 3, 0]
    assert s[[3, 4, 5]].tolist() == [1.0, 1.0, 1.0]
    # s is a power of two with max|b| / s in [1, 2), so r = b / s is exact and r.r finite
    m = torch.frexp(s.double())[0]
    assert (m == 0.5).all() and torch.isfinite(s).all()
    amax = b[finite_rows].abs().amax(1).double() / s[finite_rows].double()
    assert ((amax[:3] >= 1) & (amax[:3] < 2)).all() and amax[3] == 0
    assert torch.equal(r[finite_rows], b[finite_rows] / s[finite_rows].unsqueeze(1))
    assert torch.equal(p.nan_to_num(7.0), r.nan_to_num(7.0)) and p.data_ptr() != r.data_ptr()
    assert torch.equal(rs.nan_to_num(7.0), bnorm2.nan_to_num(7.0))
    assert torch.isfinite(rs[finite_rows]).all()
    torch.testing.assert_close(rs[finite_rows], (r[finite_rows].double() ** 2).sum(1).to(dtype),
                               rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=0.0)
    # without rescale: s = 1, and the huge row's r.r overflows, which is flagged
    _, r1, _, rs1, _, st1, _, s1 = ops.cg_begin(b, 1e-6, 0.0, False, use_ext=use_ext)
    assert (s1 == 1).all() and torch.equal(r1.nan_to_num(7.0), b.nan_to_num(7.0))
    assert st1[2].item() == reference.NONFINITE


@needs_ext
@pytest.mark.parametrize("rescale", [True, False])
def test_cg_begin_matches_reference(device, dtype, rescale):
    b = begin_inputs(dtype, device)
    ext = ops.cg_begin(b, 1e-6, 1e-30 if not rescale else 0.0, rescale, use_ext=True)
    ref = ops.cg_begin(b, 1e-6, 1e-30 if not rescale else 0.0, rescale, use_ext=False)
    names = ("x", "r", "p", "rs", "bnorm2", "status", "iters", "s")
    for name, e, f in zip(names, ext, ref):
        assert e.dtype == f.dtype and e.shape == f.shape, name
        if name in ("rs", "bnorm2"):
            torch.testing.assert_close(e, f, rtol=1e-5 if dtype == torch.float32 else 1e-13,
                                       atol=0.0, equal_nan=True, msg=name)
        else:
            assert torch.equal(e.nan_to_num(7.0), f.nan_to_num(7.0)), name


@pytest.mark.parametrize("use_ext", [pytest.param(True, marks=needs_ext), False])
def test_cg_end_unscales_and_falls_back(device, use_ext):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, 9, generator=g, dtype=torch.float64).to(device)
    rs = torch.rand(4, generator=g, dtype=torch.float64).to(device)
    scale = torch.tensor([1.0, 0.25, 1024.0, 2.0 ** -40], dtype=torch.float64, device=device)
    status = torch.tensor([1, 2, 2, 0], dtype=torch.int32, device=device)
    iters = torch.tensor([3, 0, 2, 0], dtype=torch.int32, device=device)
    fb = torch.randn(4, 9, generator=g, dtype=torch.float64).to(device)
    out, rnorm = ops.cg_end(x, rs, status, iters, scale, use_ext=use_ext)
    assert torch.equal(out, x * scale.unsqueeze(1))
    assert torch.equal(rnorm, rs.sqrt() * scale)
    out, _ = ops.cg_end(x, rs, status, iters, scale, fb, use_ext=use_ext)
    # only system 1 met negative curvature before any step
    want = x * scale.unsqueeze(1)
    want[1] = fb[1]
    assert torch.equal(out, want)
    assert out.data_ptr() != x.data_ptr()


@needs_ext
def test_opcheck_begin_end_and_affine_step(device):
    s = make_state(3, 13, torch.float64, device)
    Ap = torch.bmm(s["A"], s["p"].unsqueeze(-1)).squeeze(-1)
    torch.library.opcheck(torch.ops.imaml_ext.cg_step.default,
                          (s["x"], s["r"], s["p"], Ap, s["rs"], s["bnorm2"], s["status"],
                           s["iters"], 1e-6, 0.0, 1.5, 0.25))
    b = s["r"].clone()
    for rescale in (True, False):
        torch.library.opcheck(torch.ops.imaml_ext.cg_begin.default, (b, 1e-6, 0.0, rescale))
    scale = torch.full((3,), 0.5, dtype=torch.float64, device=device)
    for fb in (None, b):
        torch.library.opcheck(torch.ops.imaml_ext.cg_end.default,
                              (s["x"], s["rs"], s["status"], s["iters"], scale, fb))


@pytest.mark.parametrize("use_ext", [pytest.param(True, marks=needs_ext), False])
def test_begin_end_and_affine_bad_arguments(use_ext):
    s = make_state(3, 5, torch.float64, "cpu")
    with pytest.raises(ValueError, match="cg_step: shift and scale must be finite, got inf"):
        ops.cg_step_(s["x"], s["r"], s["p"], s["p"].clone(), s["rs"], s["bnorm2"], s["status"],
                     s["iters"], 1e-6, 0.0, shift=float("inf"), use_ext=use_ext)
    with pytest.raises(ValueError, match=r"cg_begin: b must be \(B, P\), got .5"):
        ops.cg_begin(s["x"][0], 1e-6, 0.0, use_ext=use_ext)
    with pytest.raises(ValueError, match="cg_begin: b must be float32 or float64"):
        ops.cg_begin(s["status"].reshape(3, 1), 1e-6, 0.0, use_ext=use_ext)
    with pytest.raises(ValueError, match="cg_begin: rtol must be finite and >= 0"):
        ops.cg_begin(s["x"], -1.0, 0.0, use_ext=use_ext)
    end = (s["x"], s["rs"], s["status"], s["iters"], torch.ones(3, dtype=torch.float64))
    for i, bad, match in ((1, s["rs"][:2], r"cg_end: rs must be \(3,\)"),
                          (4, torch.ones(3), "cg_end: scale must have dtype"),
                          (2, s["status"].long(), "cg_end: status must be int32"),
                          (3, s["iters"][:1], r"cg_end: iters must be \(3,\)")):
        args = list(end)
        args[i] = bad
        with pytest.raises(ValueError, match=match):
            ops.cg_end(*args, use_ext=use_ext)
    with pytest.raises(ValueError, match=r"cg_end: fallback must be .3, 5. like x"):
        ops.cg_end(*end, s["x"][:, :2], use_ext=use_ext)


@needs_ext
def test_threshold_status_rounds_as_the_kernels(device):
    # float32: float(atol)^2 and float(atol^2) differ by an ulp for about half of all atol; the
    # reference (and the CUDA multi-launch set-up) used the latter, the kernels the former, so
    # a residual exactly on the threshold was converged in one and running in the other
    import numpy as np
    atols = [a for a in np.random.default_rng(0).uniform(1e-3, 1.0, 400).tolist()
             if np.float32(np.float32(a) * np.float32(a)) != np.float32(a * a)][:40]
    assert len(atols) >= 20
    for atol in atols:
        b = torch.tensor([[float(np.float32(atol))]], device=device)  # ||b||^2 = float(atol)^2
        st = [ops.cg_begin(b, 0.0, atol, False, use_ext=u)[5].item() for u in (True, False)]
        assert st[0] == st[1], (atol, st)
        A, x0 = torch.ones(1, 1, 1, device=device), torch.zeros_like(b)
        st = [ops.cg_solve_dense(A, b, x0, 3, 0.0, atol, use_ext=u)[3].item()
              for u in (True, False)]
        assert st[0] == st[1], (atol, st)
        X = torch.ones(1, 1, 1, device=device)
        st = [ops.cg_solve_lstsq(X, b, x0, 0.0, 1.0, 3, 0.0, atol, use_ext=u)[3].item()
              for u in (True, False)]
        assert st[0] == st[1], (atol, st)
