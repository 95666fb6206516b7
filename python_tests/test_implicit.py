"""imaml_ext.implicit: the batched iMAML solve against dense solves, the structured least-squares
path against the generic one, and the implicit-root autograd op against closed forms."""
from __future__ import annotations

import pytest
import torch

import imaml_ext
from imaml_ext import synthetic as syn
from imaml_ext.hvp import TaskLoss
from imaml_ext.implicit import (custom_root, implicit_meta_gradient, implicit_meta_gradient_lstsq,
                                implicit_root)

DT = torch.float64
needs_ext = pytest.mark.skipif(not imaml_ext.extension_available(),
                               reason="compiled extension not built")


# Tiny tensors: one intra-op thread (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def linear_setup(M=4, d=10, seed=0):
    lt = syn.make_linear_tasks(M, d=d, n_train=20, n_test=30, seed=seed)
    model = syn.linear_model(d)
    phi = {"weight": torch.randn(M, 1, d, dtype=DT, generator=torch.Generator().manual_seed(1))}
    b = torch.randn(M, d, dtype=DT, generator=torch.Generator().manual_seed(2))
    return lt, model, phi, b


def dense_solve(X, b, lam, damping=0.0, cg_lam=None):
    cg_lam = lam if cg_lam is None else cg_lam
    H = X.transpose(1, 2) @ X / X.shape[1]
    A = (1 + damping) * torch.eye(X.shape[2], dtype=X.dtype) + H / cg_lam
    return torch.linalg.solve(A, b)


@pytest.mark.parametrize("hvp", ["exact", "double_backward", "ggn"])
def test_meta_gradient_equals_dense_solve(hvp):
    lt, model, phi, b = linear_setup()
    t = lt.tasks
    out = implicit_meta_gradient(TaskLoss(model, "half_mse"), phi, t.x_support, t.y_support,
                                 b, lam=1.0, cg_steps=5, hvp=hvp)
    torch.testing.assert_close(out.flat, dense_solve(t.x_support, b, 1.0), rtol=1e-9, atol=1e-12)
    assert out.grad["weight"].shape == (4, 1, 10)
    assert (out.cg.iterations <= 5).all() and out.cg.status.dtype == torch.int32


def test_authors_matrix_variant():
    lt, model, phi, b = linear_setup()
    t = lt.tasks
    out = implicit_meta_gradient(TaskLoss(model, "half_mse"), phi, t.x_support, t.y_support,
                                 b, lam=1.0, cg_steps=10, damping=1.0, cg_lam=11.0)
    torch.testing.assert_close(out.flat, dense_solve(t.x_support, b, 1.0, 1.0, 11.0))


def test_zero_cg_steps_returns_rhs():
    lt, model, phi, b = linear_setup()
    t = lt.tasks
    out = implicit_meta_gradient(TaskLoss(model, "half_mse"), phi, t.x_support, t.y_support,
                                 {"weight": b.view(4, 1, 10)}, lam=1.0, cg_steps=0)
    torch.testing.assert_close(out.flat, b, rtol=0, atol=0)
    assert (out.cg.iterations == 0).all()


@pytest.mark.parametrize("use_ext", [False, pytest.param(True, marks=needs_ext)])
def test_lstsq_path_equals_generic_path(use_ext):
    lt, model, phi, b = linear_setup()
    t = lt.tasks
    for steps in (2, 5):
        g1, r1 = implicit_meta_gradient_lstsq(t.x_support, b, lam=1.0, cg_steps=steps,
                                              use_ext=use_ext)
        g2 = implicit_meta_gradient(TaskLoss(model, "half_mse"), phi, t.x_support, t.y_support,
                                    b, lam=1.0, cg_steps=steps, use_ext=use_ext)
        torch.testing.assert_close(g1, g2.flat, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(r1.iterations, g2.cg.iterations)


@needs_ext
def test_use_ext_equals_reference():
    lt, model, phi, b = linear_setup()
    t = lt.tasks
    tl = TaskLoss(model, "half_mse")
    a = implicit_meta_gradient(tl, phi, t.x_support, t.y_support, b, lam=1.0, cg_steps=3,
                               use_ext=True)
    r = implicit_meta_gradient(tl, phi, t.x_support, t.y_support, b, lam=1.0, cg_steps=3,
                               use_ext=False)
    torch.testing.assert_close(a.flat, r.flat, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(a.cg.status, r.cg.status)


def test_negative_curvature_is_flagged_never_nan():
    # loss = -(x w)^2 / 2: H = -X^T X / n, so I + H/lam is indefinite for small lam.
    lt, model, phi, b = linear_setup()
    t = lt.tasks
    tl = TaskLoss(model, lambda out, y: -0.5 * out.squeeze(-1) ** 2)
    out = implicit_meta_gradient(tl, phi, t.x_support, t.y_support, b, lam=0.01, cg_steps=5)
    assert torch.isfinite(out.flat).all()
    assert (out.cg.negative_curvature).all()
    fell_back = out.cg.iterations == 0
    torch.testing.assert_close(out.flat[fell_back], b[fell_back])


@needs_ext
def test_solve_costs_its_products_plus_one_op_per_step_and_two():
    """Outside its cg_steps products an iMAML solve is cg_begin, one cg_step per product (the
    matrix's shift 1 + damping and scale 1 / cg_lam folded in) and cg_end (with the first-order
    fallback): the CG phase's overhead over k HVPs, which on a GPU is launches. It was 41 ops of
    set-up, scaling and finish plus 2 elementwise ops per product."""
    from imaml_ext.hvp import make_hvp
    from test_linalg import _KernelOps
    lt, model, phi, b = linear_setup()
    t = lt.tasks
    tl = TaskLoss(model, "half_mse")
    H = make_hvp(tl, phi, t.x_support, t.y_support, "double_backward")
    H.value_and_grad()
    flat = H.flat
    products = []
    c = _KernelOps()

    def counted(v):
        products.append(1)
        n = len(c.ops)
        out = flat(v)
        del c.ops[n:]  # the product's own ops (it copies v's pieces and concatenates H v's)
        return out

    H.flat = counted
    with c:
        out = implicit_meta_gradient(tl, phi, t.x_support, t.y_support, b, lam=1.0, cg_steps=4,
                                     damping=0.5, cg_lam=3.0, hvp=H, rtol=0.0)
    assert len(products) == 4 and (out.cg.iterations == 4).all()
    assert c.solver_ops() == (["imaml_ext.cg_begin.default"] + ["imaml_ext.cg_step.default"] * 4
                              + ["imaml_ext.cg_end.default"])
    H.flat = flat
    closure = imaml_ext.cg(lambda v: 1.5 * v + flat(v) / 3.0, b, batched=True, rtol=0.0,
                           max_iter=4, use_ext=False)
    torch.testing.assert_close(out.flat, closure.x, rtol=1e-10, atol=1e-13)


def test_bad_arguments():
    lt, model, phi, b = linear_setup()
    t = lt.tasks
    tl = TaskLoss(model, "half_mse")
    for kw, msg in ((dict(lam=0.0), "lam must be"), (dict(lam=-1.0), "lam must be"),
                    (dict(lam=1.0, cg_steps=-1), "cg_steps"),
                    (dict(lam=1.0, cg_lam=0.0), "cg_lam"),
                    (dict(lam=1.0, damping=-1.0), "damping"),
                    # non-finite or bool: damping=inf was reported as a ShiftedOperator shift,
                    # cg_lam=inf silently dropped the Hessian, lam=True passed as 1
                    (dict(lam=1.0, damping=float("inf")), "damping must be a finite number"),
                    (dict(lam=1.0, cg_lam=float("inf")), "cg_lam must be a finite number"),
                    (dict(lam=True), "lam must be a finite number"),
                    (dict(lam=1.0, damping=True), "damping must be")):
        with pytest.raises(ValueError, match=msg):
            implicit_meta_gradient(tl, phi, t.x_support, t.y_support, b, **kw)
    with pytest.raises(ValueError, match="rhs must be"):
        implicit_meta_gradient(tl, phi, t.x_support, t.y_support, b[:, :3], lam=1.0)
    with pytest.raises(ValueError, match="rhs does not match"):
        implicit_meta_gradient(tl, phi, t.x_support, t.y_support, {"w": b}, lam=1.0)
    # a float32 rhs for float64 phi: named rhs (it was "cg_step: Ap must have dtype Double")
    with pytest.raises(ValueError, match=r"rhs must have phi's dtype and device \(torch.float64"):
        implicit_meta_gradient(tl, phi, t.x_support, t.y_support, b.float(), lam=1.0)
    # a dict rhs whose leaf has phi's size but not its shape was flattened into the wrong
    # coordinates without a word (a transposed weight gradient, say)
    w = phi["weight"]
    with pytest.raises(ValueError, match=r"rhs\['weight'\] must be \(M, 1, 10\) with M = 4.*"
                                         r"got \(4, 10, 1\)"):
        implicit_meta_gradient(tl, phi, t.x_support, t.y_support,
                               {"weight": torch.randn_like(w).transpose(1, 2)}, lam=1.0)
    # named, not a deep RuntimeError / StopIteration / AttributeError
    for args, msg in (((phi, t.x_support.float(), t.y_support, b), "x_train must have phi's dtype"),
                      (({}, t.x_support, t.y_support, b), "phi must be a non-empty dict"),
                      ((phi, t.x_support[:2], t.y_support, b), "x_train must be a tensor .* M = 4"),
                      ((phi, t.x_support, t.y_support, b.tolist()), r"rhs must be an \(M, P\) "
                                                                    "tensor or a dict")):
        with pytest.raises(ValueError, match=msg):
            implicit_meta_gradient(tl, *args, lam=1.0)
    # the tolerances are checked even when cg_steps=0 runs no CG
    with pytest.raises(ValueError, match="rtol must be a finite number >= 0"):
        implicit_meta_gradient(tl, phi, t.x_support, t.y_support, b, lam=1.0, cg_steps=0,
                               rtol=-1.0)


def test_no_solve_flags_a_non_finite_rhs():
    # cg_steps=0 returns rhs; a row with NaN was status 0 ("max_iter"), where a solve says 3
    lt, model, phi, b = linear_setup()
    t = lt.tasks
    tl = TaskLoss(model, "half_mse")
    b[1, 3] = float("nan")
    for steps in (0, 3):
        out = implicit_meta_gradient(tl, phi, t.x_support, t.y_support, b, lam=1.0,
                                     cg_steps=steps)
        assert out.cg.status.tolist()[1] == 3 and out.cg.status.tolist()[0] != 3, steps
    X = t.x_support
    g, res = implicit_meta_gradient_lstsq(X, b, lam=1.0, cg_steps=0)
    assert res.status.tolist() == [0, 3, 0, 0] and g is not None


def test_lstsq_bad_arguments():
    lt, model, phi, b = linear_setup()
    X = lt.tasks.x_support
    for args, msg in (((X[:, :0], b), r"at least one sample per task \(n >= 1\)"),
                      ((X, b.float()), r"rhs must have X's dtype and device \(torch.float64"),
                      ((X.long(), b.long()), "X must be a float32/float64 tensor"),
                      ((X, b.tolist()), "rhs must be a float32/float64 tensor, got list")):
        with pytest.raises(ValueError, match=msg):
            implicit_meta_gradient_lstsq(*args, lam=1.0)


# ---- implicit_root: the README's ridge-regression example -----------------------------------------

def ridge_problem(seed=0, n=30, d=6, m=20):
    g = torch.Generator().manual_seed(seed)
    X, Xv = torch.randn(n, d, generator=g, dtype=DT), torch.randn(m, d, generator=g, dtype=DT)
    w0 = torch.randn(d, generator=g, dtype=DT)
    y = X @ w0 + 0.5 * torch.randn(n, generator=g, dtype=DT)
    yv = Xv @ w0 + 0.5 * torch.randn(m, generator=g, dtype=DT)
    return X, y, Xv, yv


def test_ridge_hypergradient_matches_closed_form():
    X, y, Xv, yv = ridge_problem()
    n, d = X.shape
    log_alpha = torch.tensor(-1.0, dtype=DT, requires_grad=True)

    def optimality(w, log_alpha):  # gradient of the ridge objective in w
        return X.T @ (X @ w - y) / n + log_alpha.exp() * w

    with torch.no_grad():  # any solver; here a dense solve
        w_star = torch.linalg.solve(X.T @ X / n + log_alpha.exp() * torch.eye(d, dtype=DT),
                                    X.T @ y / n)
    diag = {}
    w = implicit_root(optimality, w_star, log_alpha, rtol=1e-12, diagnostics=diag)
    val = 0.5 * ((Xv @ w - yv) ** 2).mean()
    val.backward()
    # closed form: dw/dalpha = -(X^T X/n + alpha I)^-1 w, chain rule through log alpha
    alpha = log_alpha.detach().exp()
    A = X.T @ X / n + alpha * torch.eye(d, dtype=DT)
    gv = Xv.T @ (Xv @ w_star - yv) / Xv.shape[0]
    want = -(gv @ torch.linalg.solve(A, w_star)) * alpha
    torch.testing.assert_close(log_alpha.grad, want, rtol=1e-9, atol=1e-12)
    assert bool(diag["cg"].converged)


def test_custom_root_decorator_and_batched_problems():
    X, y, Xv, yv = ridge_problem(d=4)
    n, d = X.shape
    alphas = torch.tensor([0.1, 1.0, 3.0], dtype=DT, requires_grad=True)

    @custom_root(lambda w, a: (w @ X.T - y) @ X / n + a.unsqueeze(1) * w, batched=True,
                 rtol=1e-12)
    def ridge(a):
        A = X.T @ X / n + a.view(-1, 1, 1) * torch.eye(d, dtype=DT)
        return torch.linalg.solve(A, (X.T @ y / n).expand(3, d))

    w = ridge(alphas)
    loss = 0.5 * ((w @ Xv.T - yv) ** 2).mean(1).sum()
    (g,) = torch.autograd.grad(loss, alphas)

    def direct(a):  # differentiate the dense solve itself
        A = X.T @ X / n + a.view(-1, 1, 1) * torch.eye(d, dtype=DT)
        ww = torch.linalg.solve(A, (X.T @ y / n).expand(3, d))
        return 0.5 * ((ww @ Xv.T - yv) ** 2).mean(1).sum()
    (want,) = torch.autograd.grad(direct(alphas), alphas)
    torch.testing.assert_close(g, want, rtol=1e-9, atol=1e-12)


def test_normal_cg_handles_a_nonsymmetric_jacobian():
    g = torch.Generator().manual_seed(3)
    A = torch.eye(5, dtype=DT) * 3 + 0.5 * torch.randn(5, 5, generator=g, dtype=DT)
    c = torch.randn(5, dtype=DT, generator=g, requires_grad=True)
    # root of F(z, c) = A z - c is z = A^-1 c, so dL/dc = A^-T dL/dz
    z = implicit_root(lambda z, c: A @ z - c, torch.linalg.solve(A, c.detach()), c,
                      solver="normal_cg", rtol=1e-13, max_iter=50)
    w = torch.randn(5, dtype=DT, generator=g)
    (gc,) = torch.autograd.grad((z * w).sum(), c)
    torch.testing.assert_close(gc, torch.linalg.solve(A.T, w), rtol=1e-8, atol=1e-10)


def test_pytree_solution_and_nontensor_args():
    X, y, Xv, yv = ridge_problem(d=3)
    n = X.shape[0]
    alpha = torch.tensor(0.5, dtype=DT, requires_grad=True)

    def F(sol, alpha, cfg):
        w, b = sol["w"], sol["b"]
        r = X @ w + b - y
        return {"w": X.T @ r / n + alpha * w, "b": r.mean() + cfg["b_reg"] * b}

    Xa = torch.cat([X, torch.ones(n, 1, dtype=DT)], 1)
    R = torch.diag(torch.tensor([0.5, 0.5, 0.5, 0.1], dtype=DT))
    with torch.no_grad():
        wb = torch.linalg.solve(Xa.T @ Xa / n + R, Xa.T @ y / n)
    sol = implicit_root(F, {"w": wb[:3], "b": wb[3]}, alpha, {"b_reg": 0.1}, rtol=1e-12)
    (ga,) = torch.autograd.grad(sol["w"].sum() + sol["b"], alpha)

    def direct(a):
        RR = torch.diag(torch.stack([a, a, a, torch.tensor(0.1, dtype=DT)]))
        s = torch.linalg.solve(Xa.T @ Xa / n + RR, Xa.T @ y / n)
        return s[:3].sum() + s[3]
    (want,) = torch.autograd.grad(direct(alpha), alpha)
    torch.testing.assert_close(ga, want, rtol=1e-8, atol=1e-10)


def test_implicit_root_reports_a_broken_down_backward(recwarn):
    """A backward CG that meets negative curvature (dF/dz not positive definite: here negative
    definite, so CG stops at once and the gradient is zero) or NaN warns, naming the count and
    the way out; a sound one, or check=False, stays silent."""
    import warnings as _w
    X, y, _, _ = ridge_problem(d=4)
    n, d = X.shape
    lam = torch.tensor(0.5, dtype=DT, requires_grad=True)
    with torch.no_grad():
        w_star = torch.linalg.solve(X.T @ X / n + 0.5 * torch.eye(d, dtype=DT), X.T @ y / n)

    def good(w, lam):
        return X.T @ (X @ w - y) / n + lam * w

    def flipped(w, lam):  # the same root, dF/dz negative definite
        return -good(w, lam)

    def grad_of(fn, sol, **kw):
        return torch.autograd.grad(implicit_root(fn, sol, lam, **kw).sum(), lam)[0]

    with _w.catch_warnings():
        _w.simplefilter("error")
        grad_of(good, w_star)
        grad_of(flipped, w_star, check=False)
        grad_of(good, w_star * float("nan"), check=False)
    with pytest.warns(RuntimeWarning, match=r"negative curvature in 1 of 1 system\(s\).*"
                                            r"solver='normal_cg'"):
        g = grad_of(flipped, w_star)
    assert float(g) == 0.0  # what the warning says: no iterate before the first step
    with pytest.warns(RuntimeWarning, match=r"gradient for args is not finite, though"):
        assert not torch.isfinite(grad_of(good, w_star * float("nan")))  # F linear in w
    with pytest.warns(RuntimeWarning, match=r"non-finite values in the backward's CG in 1 of 1"):
        assert not torch.isfinite(grad_of(lambda w, lam: good(w, lam) + w.pow(3) * 0.1,
                                          w_star * float("nan")))
    # normal_cg handles the flipped Jacobian: the right gradient, no warning
    with _w.catch_warnings():
        _w.simplefilter("error")
        torch.testing.assert_close(grad_of(flipped, w_star, solver="normal_cg", rtol=1e-12),
                                   grad_of(good, w_star, rtol=1e-12), rtol=1e-7, atol=1e-10)
    with pytest.raises(ValueError, match="check must be"):
        implicit_root(good, w_star, lam, check="yes")


def test_a_nan_cotangent_gives_a_nan_gradient(recwarn):
    # CG returns its start (zero) for a NaN right-hand side, flagged: the backward handed back
    # a zero gradient where autograd through the solver gives NaN (GradScaler's skip and anomaly
    # mode look for it), under a warning that said "not finite"; now NaN in those systems only
    a = torch.tensor(2.0, dtype=DT, requires_grad=True)
    z = implicit_root(lambda z, a: a * z - 1, torch.full((3,), 0.5, dtype=DT), a, check=False)
    (z * torch.tensor([float("nan"), 1.0, 1.0], dtype=DT)).sum().backward()
    assert torch.isnan(a.grad)
    la = torch.tensor([2.0, 3.0, 4.0], dtype=DT, requires_grad=True)
    sol = (1 / la.detach())[:, None].expand(3, 2).clone()
    zb = implicit_root(lambda z, a: a[:, None] * z - 1, sol, la, batched=True)
    with pytest.warns(RuntimeWarning, match=r"non-finite values in the backward's CG in 1 of 3"):
        (zb * torch.tensor([[1.0, 1.0], [float("nan"), 1.0], [1.0, 1.0]], dtype=DT)).sum() \
            .backward()
    assert torch.isnan(la.grad[1]) and torch.isfinite(la.grad[[0, 2]]).all()
    torch.testing.assert_close(la.grad[[0, 2]], -2 / la.detach()[[0, 2]] ** 2)


def test_root_options_are_checked_early_and_keywords_reach_the_solver():
    # diagnostics=[] failed in the backward (a TypeError from indexing it), custom_root's
    # keywords only at the first call, a keyword argument to the decorated solver was a
    # TypeError from its wrapper, and a float32 residual for a float64 solution passed silently
    X, y, _, _ = ridge_problem(d=3)
    n, d = X.shape
    I = torch.eye(d, dtype=DT)

    def F(w, lam, scale=1.0):
        return scale * (X.T @ (X @ w - y) / n + lam * w)

    lam = torch.tensor(0.5, dtype=DT, requires_grad=True)
    w = torch.linalg.solve(X.T @ X / n + 0.5 * I, X.T @ y / n)
    with pytest.raises(ValueError, match="diagnostics must be None or a dict"):
        implicit_root(F, w, lam, diagnostics=[])
    with pytest.raises(ValueError, match="solver must be 'cg' or 'normal_cg'"):
        custom_root(F, solver="x")
    with pytest.raises(TypeError, match="custom_root: .*foo"):
        custom_root(F, foo=1)

    @custom_root(F, rtol=1e-12)
    def ridge(lam, scale=1.0):
        return torch.linalg.solve(X.T @ X / n + lam * I, X.T @ y / n)

    (g_pos,) = torch.autograd.grad(ridge(lam, 2.0).sum(), lam)
    (g_kw,) = torch.autograd.grad(ridge(lam=lam, scale=2.0).sum(), lam)
    torch.testing.assert_close(g_kw, g_pos)

    @custom_root(F)
    def kwonly(lam, *, scale=1.0):
        return w

    with pytest.raises(TypeError, match=r"\['scale'\] cannot be passed to optimality_fn"):
        kwonly(lam, scale=2.0)
    z = implicit_root(lambda w, lam: F(w, lam).float(), w, lam)
    with pytest.raises(ValueError, match="residual in the solution's dtype, got torch.float32 "
                                         "for a torch.float64 solution"):
        z.sum().backward()


def test_implicit_root_reports_a_backward_that_did_not_converge():
    """A backward CG that runs out of iterations short of rtol gives an approximate gradient:
    on the CPU it warns with the residual and the way out (here 2 iterations on a 6-dimensional
    ill-conditioned system: the gradient is far off); enough iterations, or check=False, and
    it is silent."""
    import warnings as _w
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=DT))
    A = Q @ torch.diag(torch.logspace(0, 3, 6, dtype=DT)) @ Q.T
    bvec = torch.randn(6, generator=g, dtype=DT)
    z = torch.linalg.solve(A, bvec)
    a = torch.tensor(1.0, dtype=DT, requires_grad=True)

    def grad(**kw):
        return torch.autograd.grad(implicit_root(lambda z, a: A @ z - a * bvec, z, a,
                                                 **kw).sum(), a)[0]

    exact = z.sum()
    with pytest.warns(RuntimeWarning, match=r"did not converge in 1 of 1 system\(s\).*stopped "
                                            r"after max_iter = 2 iterations.*raise max_iter"):
        rough = grad(max_iter=2)
    assert not torch.allclose(rough, exact, rtol=1e-2)  # what the warning is for
    with _w.catch_warnings():
        _w.simplefilter("error")
        grad(max_iter=2, check=False)
        torch.testing.assert_close(grad(rtol=1e-12), exact)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_implicit_root_checks_only_when_asked():
    """On a GPU the statuses are read (a host synchronisation) only with check=True."""
    import warnings as _w
    X, y, _, _ = ridge_problem(d=4)
    X, y = X.cuda(), y.cuda()
    lam = torch.tensor(0.5, dtype=DT, device="cuda", requires_grad=True)
    w_star = torch.zeros(4, dtype=DT, device="cuda")

    def flipped(w, lam):
        return -(X.T @ (X @ w - y) + lam * w)

    with _w.catch_warnings():
        _w.simplefilter("error")
        torch.autograd.grad(implicit_root(flipped, w_star, lam, max_iter=5).sum(), lam)
    with pytest.warns(RuntimeWarning, match="negative curvature"):
        torch.autograd.grad(implicit_root(flipped, w_star, lam, max_iter=5, check=True).sum(),
                            lam)


def test_implicit_root_bad_arguments():
    with pytest.raises(ValueError, match="solver"):
        implicit_root(lambda z: z, torch.zeros(2), solver="lu")
    with pytest.raises(ValueError, match="solution must be"):
        implicit_root(lambda z: z, [1, 2])
    # the backward's settings are checked at the call, not at the first backward
    a = torch.ones(3, dtype=DT, requires_grad=True)
    z = (a / 2).detach()
    for kw, msg in ((dict(max_iter=0), "max_iter must be None or an int >= 1, got 0"),
                    (dict(max_iter=True), "max_iter must be"),
                    (dict(rtol=-1.0), "rtol must be a finite number >= 0"),
                    (dict(atol=float("nan")), "atol must be a finite number >= 0"),
                    (dict(batched=1), "batched must be True or False"),
                    (dict(use_ext="yes"), "use_ext must be None, True or False"),
                    # off CUDA the capture was attempted at the backward, and its ValueError
                    # escaped the documented "warns and runs eagerly"
                    (dict(cuda_graph=True, max_iter=3), "cuda_graph=True .* needs a solution on "
                                                        "a CUDA device, got cpu")):
        with pytest.raises(ValueError, match=msg):
            implicit_root(lambda w, a: 2 * w - a, z, a, **kw)
    # a solution the backward's CG cannot take is refused at the call too (it was accepted, and
    # the first backward raised)
    for sol, kw, msg in (
            ((z, torch.tensor(1.0, dtype=DT)), dict(batched=True),
             "implicit_root: batched=True needs a leading batch dimension on every leaf of "
             "solution"),
            ((z, z[:2]), dict(batched=True), "every leaf of solution must have the batch size 3"),
            ((z, z.float()), {}, "solution leaves must share dtype and device")):
        with pytest.raises(ValueError, match=msg):
            implicit_root(lambda w, a: w, sol, a, **kw)


def test_implicit_root_warns_that_create_graph_gives_first_order_gradients():
    a = torch.ones(3, dtype=DT, requires_grad=True)
    z = implicit_root(lambda w, a: 2 * w - a, (a / 2).detach(), a, max_iter=5)
    with pytest.warns(RuntimeWarning, match="create_graph=True gives first-order gradients"):
        (g,) = torch.autograd.grad((z ** 2).sum(), a, create_graph=True)
    torch.testing.assert_close(g, a.detach() / 2)  # d/da sum((a/2)^2) = a/2



def test_a_closure_tensor_that_requires_grad_is_warned_about():
    """Only args get gradients: a tensor optimality_fn reads from its closure got none,
    silently (d val / d lam 0.4 where it is 0.27 in the review's ridge case): the call warns
    when F depends on one. The check calls F as the backward does, z requiring grad: an F that
    differentiates in z, with a module in its closure, failed in the first version."""
    import functools
    import warnings
    dt = torch.float64
    g = torch.Generator().manual_seed(0)
    X = torch.randn(30, 4, generator=g, dtype=dt)
    y = torch.randn(30, generator=g, dtype=dt)
    lam = torch.tensor(0.2, dtype=dt, requires_grad=True)
    w_star = torch.linalg.solve(X.T @ X / 30 + 0.2 * torch.eye(4, dtype=dt), X.T @ y / 30)

    def ridge(w, lam):
        return X.T @ (X @ w - y) / 30 + lam * w

    def grad_of(w_root):
        return torch.autograd.grad((w_root ** 2).sum(), lam, allow_unused=True)

    closure = (lambda w: ridge(w, lam))  # noqa: E731
    for fn in (closure, functools.partial(ridge, lam=lam)):
        with pytest.warns(RuntimeWarning, match=r"depends on 1 tensor\(s\) that require grad "
                                                r"from outside its arguments"):
            implicit_root(fn, w_star)
    model = torch.nn.Linear(4, 1).double()

    def by_autograd(w, a):  # F as the gradient of an objective in w: needs w to require grad
        obj = 0.5 * ((X @ w - y) ** 2).mean() + 0.5 * a * (w @ w) + 0 * model.weight.sum()
        return torch.autograd.grad(obj, w, create_graph=True)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.autograd.grad((implicit_root(ridge, w_star, lam) ** 2).sum(), lam)  # an arg
        with torch.no_grad():
            implicit_root(closure, w_star)  # nothing recorded: nothing to say
        implicit_root(lambda w: ridge(w, lam.detach()), w_star)  # read, but detached
        a = torch.tensor(0.2, dtype=dt, requires_grad=True)
        (ga,) = torch.autograd.grad((implicit_root(by_autograd, w_star, a) ** 2).sum(), a)
    (want,) = torch.autograd.grad((implicit_root(ridge, w_star, a) ** 2).sum(), a)
    torch.testing.assert_close(ga, want)


def test_inside_torch_func_transforms_is_a_clear_error():
    """torch's own message was "must override the setup_context staticmethod"."""
    dt = torch.float64
    A = torch.eye(3, dtype=dt) * 2

    def solve(c):
        z = torch.linalg.solve(A, c.detach())
        return implicit_root(lambda z, c: A @ z - c, z, c).sum()
    c = torch.ones(3, dtype=dt)
    with pytest.raises(ValueError, match="implicit_root cannot run inside torch.func transforms"):
        torch.func.grad(solve)(c)
    with pytest.raises(ValueError, match="implicit_root cannot run inside torch.func transforms"):
        torch.func.vmap(solve)(c.expand(2, 3))
