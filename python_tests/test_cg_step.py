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
