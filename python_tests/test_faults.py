"""Numerical faults: each one injected, detected and reported, never a silent NaN.

- Solvers (every operator form of `imaml_ext.cg`, compiled and reference paths): NaN / Inf in the
  right-hand side, in the operator, in x0, or appearing in the middle of a solve; singular,
  zero, indefinite, negative definite and very ill-conditioned systems; max_iter reached;
  squared norms that overflow or underflow. Per system: the status flag, the iterate kept, and
  the other systems of the batch untouched.
- Algorithms and training (once imaml_ext.algorithms is there): a task with a NaN loss in a
  meta-batch is left out and counted, the meta-gradient stays finite; on_nonfinite="raise"
  raises; a meta-step whose tasks are all bad leaves the meta-parameters and Adam's state alone.
  (test_train.py covers the trainer's own counters with a stand-in algorithm.)
"""
from __future__ import annotations

import math

import pytest
import torch

import imaml_ext
from conftest import random_spd
from imaml_ext import reference
from imaml_ext.linalg import CGError, LstsqOperator

try:
    from imaml_ext.structured import SoftmaxHeadOperator
except ImportError:  # the softmax-head operator has not landed
    SoftmaxHeadOperator = None

EXT = imaml_ext.extension_available()
needs_ext = pytest.mark.skipif(not EXT, reason="compiled extension not built")
BOTH = [pytest.param(True, marks=needs_ext, id="ext"), pytest.param(False, id="ref")]
SOLVERS = ["dense", "callable", "lstsq",
           pytest.param("softmax", marks=pytest.mark.skipif(
               SoftmaxHeadOperator is None, reason="imaml_ext.structured.SoftmaxHeadOperator "
               "has not landed"))]
RUNNING, CONVERGED, NEGATIVE, NONFINITE = (reference.RUNNING, reference.CONVERGED,
                                          reference.NEGATIVE_CURVATURE, reference.NONFINITE)
NAN, INF = float("nan"), float("inf")


# ---- one batch of systems per operator form, each system with its own fault ------------------

class Batch:
    """B systems of one operator form whose parts can be spoiled one system at a time."""

    def __init__(self, solver: str, B: int, dtype, device, seed: int = 0, P: int = 12):
        g = torch.Generator().manual_seed(seed)
        self.solver, self.dtype, self.device = solver, dtype, device
        if solver in ("dense", "callable"):
            self.A = random_spd(B, P, generator=g)
            self.P = P
        elif solver == "lstsq":
            self.X = torch.randn(B, 20, P, dtype=torch.float64, generator=g)
            self.P = P
        else:
            c, f = 4, 5
            self.F = torch.randn(B, 10, f, dtype=torch.float64, generator=g)
            self.W = torch.randn(B, c, f, dtype=torch.float64, generator=g)
            self.bias = torch.randn(B, c, dtype=torch.float64, generator=g)
            self.P = c * (f + 1)
        self.b = torch.randn(B, self.P, dtype=torch.float64, generator=g)
        self.shift, self.scale = 1.0, 0.5

    def spoil_operator(self, i: int, value: float) -> None:
        if self.solver in ("dense", "callable"):
            self.A[i, 0, 0] = value
        elif self.solver == "lstsq":
            self.X[i, 0, 0] = value
        else:
            self.F[i, 0, 0] = value

    def negate_operator(self, i: int) -> None:
        """System i becomes negative definite (dense/callable only: the structured operators
        share one shift and scale across the batch)."""
        self.A[i] = -self.A[i]

    def operator(self, rows=None):
        rows = slice(None) if rows is None else rows
        to = lambda t: t[rows].to(self.device, self.dtype)  # noqa: E731
        if self.solver == "dense":
            return to(self.A)
        if self.solver == "callable":
            A = to(self.A)
            return lambda v: torch.bmm(A, v.unsqueeze(-1)).squeeze(-1)
        if self.solver == "lstsq":
            return LstsqOperator(to(self.X), shift=self.shift, scale=self.scale / 20)
        return SoftmaxHeadOperator(to(self.F), to(self.W), to(self.bias), shift=self.shift,
                                   scale=self.scale)

    def solve(self, use_ext, rows=None, x0=None, **kw):
        rows_ = slice(None) if rows is None else rows
        b = self.b[rows_].to(self.device, self.dtype)
        kw.setdefault("rtol", 1e-10 if self.dtype == torch.float64 else 1e-5)
        kw.setdefault("max_iter", 10 * self.P)
        return imaml_ext.cg(self.operator(rows), b, x0, batched=True, use_ext=use_ext, **kw)


def assert_flags_consistent(res) -> None:
    """Exactly one of the four outcomes per system, and x finite unless flagged non-finite."""
    st = res.status.cpu()
    assert ((st >= RUNNING) & (st <= NONFINITE)).all(), st
    n = (res.converged.int() + res.negative_curvature.int() + res.nonfinite.int()).cpu()
    assert (n <= 1).all() and torch.equal(n == 0, st == RUNNING)
    x = res.x if isinstance(res.x, torch.Tensor) else torch.cat(
        [t.reshape(t.shape[0], -1) for t in torch.utils._pytree.tree_leaves(res.x)], 1)
    finite = torch.isfinite(x.reshape(x.shape[0], -1)).all(-1).cpu()
    assert (finite | (st == NONFINITE)).all(), "a non-finite x that is not flagged"


@pytest.mark.parametrize("use_ext", BOTH)
@pytest.mark.parametrize("solver", SOLVERS)
def test_faults_are_flagged_per_system_and_isolated(solver, use_ext, dtype, device):
    """One batch: good systems, NaN / +Inf / -Inf right-hand sides, NaN / Inf operators, a zero
    right-hand side, and (dense and callable) negative definite and zero operators. Each faulty
    system gets its flag with x = x0; the good ones get what they get when solved alone."""
    kinds = ["good", "nan_b", "good", "inf_b", "ninf_b", "nan_op", "inf_op", "zero_b", "good"]
    if solver in ("dense", "callable"):
        kinds += ["negdef", "zero_op"]
    sys = Batch(solver, len(kinds), dtype, device)
    for i, k in enumerate(kinds):
        if k.endswith("_b") and k != "zero_b":
            sys.b[i, 3] = {"nan_b": NAN, "inf_b": INF, "ninf_b": -INF}[k]
        elif k == "zero_b":
            sys.b[i] = 0.0
        elif k in ("nan_op", "inf_op"):
            sys.spoil_operator(i, NAN if k == "nan_op" else INF)
        elif k == "negdef":
            sys.negate_operator(i)
        elif k == "zero_op":
            sys.A[i] = 0.0
    x0 = torch.zeros(len(kinds), sys.P, dtype=dtype, device=device)
    res = sys.solve(use_ext, x0=x0)
    assert_flags_consistent(res)
    want = {"good": CONVERGED, "nan_b": NONFINITE, "inf_b": NONFINITE, "ninf_b": NONFINITE,
            "nan_op": NONFINITE, "inf_op": NONFINITE, "zero_b": CONVERGED, "negdef": NEGATIVE,
            "zero_op": NEGATIVE}
    assert res.status.tolist() == [want[k] for k in kinds]
    for i, k in enumerate(kinds):
        if k != "good":
            assert int(res.iterations[i]) == 0, k
            assert torch.equal(res.x[i], x0[i]), k
    good = [i for i, k in enumerate(kinds) if k == "good"]
    # (alone from the same explicit zero x0: a solve from x0 = None starts with cg_begin, whose
    # r.r rounds otherwise, which can move a float32 stop by an iteration)
    alone = sys.solve(use_ext, rows=torch.tensor(good), x0=x0[good])
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(res.x[good], alone.x, rtol=tol, atol=tol)
    assert res.iterations[good].tolist() == alone.iterations.tolist()


@pytest.mark.parametrize("use_ext", BOTH)
@pytest.mark.parametrize("value", [NAN, INF], ids=["nan", "inf"])
@pytest.mark.parametrize("x0_given", [True, False], ids=["x0", "no-x0"])
def test_nonfinite_appearing_mid_solve_keeps_the_last_good_iterate(use_ext, value, x0_given,
                                                                   device):
    """A callable operator whose product turns NaN/Inf for system 1 at its 4th call: that system
    stops with the iterate of the good iterations before it (2 when x0 is given, whose initial
    residual takes the first call; 3 with no x0, where r0 = b and no product is made); the
    others converge."""
    A = random_spd(3, 10, device=device)
    b = torch.randn(3, 10, dtype=torch.float64, device=device)
    calls = [0]

    def matvec(v):
        calls[0] += 1
        out = torch.bmm(A, v.unsqueeze(-1)).squeeze(-1)
        if calls[0] >= 4:
            out = out.clone()
            out[1, 5] = value
        return out

    x0 = torch.zeros_like(b) if x0_given else None
    res = imaml_ext.cg(matvec, b, x0, batched=True, rtol=1e-12, max_iter=100, use_ext=use_ext)
    good = 2 if x0_given else 3
    assert calls[0] > 4
    assert res.status.tolist() == [CONVERGED, NONFINITE, CONVERGED]
    assert int(res.iterations[1]) == good
    first = imaml_ext.cg(A, b, batched=True, rtol=0.0, max_iter=good, use_ext=use_ext)
    torch.testing.assert_close(res.x[1], first.x[1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(res.x[[0, 2]], torch.linalg.solve(A[[0, 2]], b[[0, 2]]))
    with pytest.raises(CGError, match="system 1: non-finite values"):
        res.check()


@pytest.mark.parametrize("use_ext", BOTH)
def test_nonfinite_x0_is_flagged(use_ext, device):
    A = random_spd(2, 6, device=device)
    b = torch.randn(2, 6, dtype=torch.float64, device=device)
    x0 = torch.zeros_like(b)
    x0[0, 2] = NAN
    res = imaml_ext.cg(A, b, x0, batched=True, rtol=1e-10, use_ext=use_ext)
    assert res.status.tolist() == [NONFINITE, CONVERGED]
    assert int(res.iterations[0]) == 0
    assert_flags_consistent(res)


# ---- singular, indefinite, ill-conditioned ----------------------------------------------------

def singular_psd(P: int, rank: int, dtype, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(P, P, dtype=torch.float64, generator=g))
    ev = torch.cat([torch.linspace(1, 10, rank, dtype=torch.float64),
                    torch.zeros(P - rank, dtype=torch.float64)])
    A = q @ torch.diag(ev) @ q.T
    return ((A + A.T) / 2).to(device, dtype), q


@pytest.mark.parametrize("use_ext", BOTH)
def test_singular_system(use_ext, dtype, device):
    """Singular PSD: a right-hand side in the range converges (to the minimum-norm solution, as
    CG from 0 stays in the range); one with a null-space component cannot converge and is
    reported as not converged (max_iter or negative curvature), with a finite x."""
    P, rank = 16, 10
    A, q = singular_psd(P, rank, dtype, device)
    g = torch.Generator().manual_seed(1)
    in_range = (q[:, :rank] @ torch.randn(rank, dtype=torch.float64, generator=g)).to(device, dtype)
    outside = in_range + q[:, -1].to(device, dtype)
    rtol = 1e-10 if dtype == torch.float64 else 1e-5
    res = imaml_ext.cg(torch.stack([A, A]), torch.stack([in_range, outside]), batched=True,
                       rtol=rtol, max_iter=200, use_ext=use_ext)
    assert_flags_consistent(res)
    assert res.status.tolist()[0] == CONVERGED
    if dtype == torch.float64:
        want = torch.linalg.pinv(A) @ in_range
        torch.testing.assert_close(res.x[0], want, rtol=1e-8, atol=1e-8)
    else:
        # Rounded to float32, A is only nearly singular (eigenvalues ~1e-7 for the null space),
        # so the minimum-norm solution is not what CG approaches; its residual is still small.
        r = in_range.double() - A.double() @ res.x[0].double()
        assert r.norm() <= 1e-3 * in_range.double().norm()
    assert res.status.tolist()[1] in (RUNNING, NEGATIVE)
    with pytest.raises(CGError, match="system 1"):
        res.check()


@pytest.mark.parametrize("use_ext", BOTH)
def test_singular_structured_operators(use_ext, dtype):
    """H alone (shift 0): least squares with fewer samples than unknowns, and the softmax head
    (singular: adding a constant to every logit changes nothing). Random right-hand sides are
    not in the range: flagged as not converged, x finite; X^T y is in the range: converges."""
    g = torch.Generator().manual_seed(2)
    X = torch.randn(3, 5, 12, dtype=torch.float64, generator=g).to(dtype)   # rank 5 < 12
    b = torch.randn(3, 12, dtype=torch.float64, generator=g).to(dtype)
    b[0] = X[0].T @ torch.randn(5, dtype=torch.float64, generator=g).to(dtype)
    res = imaml_ext.cg(LstsqOperator(X, shift=0.0, scale=1.0), b, batched=True, max_iter=60,
                       rtol=1e-8 if dtype == torch.float64 else 1e-4, use_ext=use_ext)
    assert_flags_consistent(res)
    assert res.status[0] == CONVERGED and (res.status[1:] != CONVERGED).all()
    if SoftmaxHeadOperator is not None:
        F = torch.randn(2, 8, 3, dtype=torch.float64, generator=g).to(dtype)
        W = torch.randn(2, 4, 3, dtype=torch.float64, generator=g).to(dtype)
        bias = torch.zeros(2, 4, dtype=dtype)
        rhs = (torch.randn(2, 4, 3, dtype=torch.float64, generator=g).to(dtype),
               torch.ones(2, 4, dtype=dtype))   # the all-ones bias direction is H's null space
        res = imaml_ext.cg(SoftmaxHeadOperator(F, W, bias, shift=0.0, scale=1.0), rhs,
                           batched=True, max_iter=60, rtol=1e-8, use_ext=use_ext)
        assert_flags_consistent(res)
        assert (res.status != CONVERGED).all()


@pytest.mark.parametrize("use_ext", BOTH)
@pytest.mark.parametrize("solver", SOLVERS)
def test_negative_definite_stops_at_once(solver, use_ext, dtype):
    """A negative definite operator (structured ones: shift -1, a small scale): negative
    curvature at the first iteration, x = x0, never a step uphill."""
    sys = Batch(solver, 2, dtype, "cpu")
    sys.shift, sys.scale = -1.0, 1e-3
    if solver in ("dense", "callable"):
        sys.negate_operator(0), sys.negate_operator(1)
    x0 = torch.full((2, sys.P), 0.25, dtype=dtype)
    res = sys.solve(use_ext, x0=x0)
    assert res.status.tolist() == [NEGATIVE, NEGATIVE]
    assert res.iterations.tolist() == [0, 0] and torch.equal(res.x, x0)


@pytest.mark.parametrize("use_ext", BOTH)
def test_indefinite_callable_keeps_last_good_iterate(use_ext, device):
    """Eigenvalues of both signs: CG runs until p^T A p <= 0 (or converges, if the Krylov space
    happens to avoid the negative directions); x finite and what CG had before that step."""
    A = random_spd(4, 20, device=device, cond=10.0)
    A = A - 5.5 * torch.eye(20, dtype=A.dtype, device=device)
    b = torch.randn(4, 20, dtype=torch.float64, device=device)
    res = imaml_ext.cg(lambda v: torch.bmm(A, v.unsqueeze(-1)).squeeze(-1), b, batched=True,
                       rtol=1e-10, max_iter=200, use_ext=use_ext)
    assert_flags_consistent(res)
    for i in (res.status == NEGATIVE).nonzero().flatten().tolist():
        k = int(res.iterations[i])
        before = imaml_ext.cg(A[i:i + 1], b[i:i + 1], batched=True, rtol=0.0, max_iter=max(k, 1),
                              use_ext=use_ext)
        want = before.x[0] if k else torch.zeros_like(b[i])
        torch.testing.assert_close(res.x[i], want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("use_ext", BOTH)
def test_very_ill_conditioned(use_ext, dtype, device):
    """cond 1e12 (float64) / 1e7 (float32): the solve stays finite and honest. Either it reports
    convergence and the true residual is small, or it reports max_iter (or negative curvature,
    which rounding can produce at that conditioning); never NaN."""
    cond = 1e12 if dtype == torch.float64 else 1e7
    A = random_spd(3, 30, cond=cond, dtype=dtype, device=device)
    b = torch.randn(3, 30, dtype=torch.float64, device=device).to(dtype)
    rtol = 1e-8 if dtype == torch.float64 else 1e-4
    res = imaml_ext.cg(A, b, batched=True, rtol=rtol, max_iter=90, use_ext=use_ext)
    assert_flags_consistent(res)
    assert (res.status != NONFINITE).all()
    true_res = (b.double() - (A.double() @ res.x.double().unsqueeze(-1)).squeeze(-1)).norm(dim=-1)
    eps = torch.finfo(dtype).eps
    for i in (res.status == CONVERGED).nonzero().flatten().tolist():
        # the recursive residual drifts from the true one by about eps * cond * |b|
        assert true_res[i] <= (10 * rtol + 10 * eps * math.sqrt(cond)) * b[i].double().norm() \
            + 10 * eps * cond * res.x[i].double().norm() * eps, true_res[i]


@pytest.mark.parametrize("use_ext", BOTH)
@pytest.mark.parametrize("solver", SOLVERS)
def test_max_iter_reached_is_reported(solver, use_ext, dtype):
    sys = Batch(solver, 3, dtype, "cpu")
    res = sys.solve(use_ext, max_iter=2, rtol=1e-14)
    assert res.status.tolist() == [RUNNING] * 3 and res.iterations.tolist() == [2, 2, 2]
    assert not res.converged.any()
    assert_flags_consistent(res)
    with pytest.raises(CGError, match=r"3 system\(s\) did not converge \(system 0: max_iter "
                                      r"reached, system 1: max_iter reached"):
        res.check()
    assert res.check(allow_max_iter=True) is res


# ---- squared norms that leave the floating-point range ----------------------------------------

@pytest.mark.parametrize("use_ext", BOTH)
def test_overflowing_norm_is_flagged_not_silent(use_ext, dtype):
    """Finite entries whose squared norm overflows (1e200 in float64, 1e20 in float32): the solver
    cannot form ||b||^2, and flags the system non-finite instead of returning garbage."""
    big = 1e200 if dtype == torch.float64 else 1e20
    A = 2 * torch.eye(3, dtype=dtype).expand(2, 3, 3).contiguous()
    b = torch.tensor([[big, big, big], [1.0, 2.0, 3.0]], dtype=dtype)
    # With atol > 0 the absolute test is kept unscaled, so ||b||^2 overflows: flagged.
    res = imaml_ext.cg(A, b, batched=True, use_ext=use_ext, atol=1e-30)
    assert res.status.tolist() == [NONFINITE, CONVERGED]
    assert torch.isfinite(res.x).all()
    # With atol = 0 (the default) cg scales each system first and solves it.
    res = imaml_ext.cg(A, b, batched=True, use_ext=use_ext)
    assert res.converged.all()
    torch.testing.assert_close(res.x, b / 2)


@pytest.mark.parametrize("use_ext", BOTH)
def test_underflowing_norm_is_not_reported_converged(use_ext, dtype):
    """Entries whose squares underflow (||b||^2 == 0): cg scales each system by a power of two
    near max|b| first, so the solve is exact instead of 'converged at x = 0'."""
    tiny = 1e-170 if dtype == torch.float64 else 1e-23
    A = 2 * torch.eye(3, dtype=dtype)
    b = torch.full((3,), tiny, dtype=dtype)
    res = imaml_ext.cg(A, b, use_ext=use_ext, rtol=1e-6)
    assert bool(res.converged)
    torch.testing.assert_close(res.x, b / 2, rtol=1e-5, atol=0.0)


# ---- algorithms: a task that goes bad is left out and counted, never averaged in --------------

try:
    from imaml_ext.algorithms import ALGORITHMS, make_algorithm, options_for
except ImportError:  # imaml_ext.algorithms has not landed
    ALGORITHMS, make_algorithm, options_for = (), None, None
needs_algorithms = pytest.mark.skipif(make_algorithm is None,
                                      reason="imaml_ext.algorithms has not landed")


def tiny_problem(M: int = 4, ways: int = 3, seed: int = 0, dtype=torch.float64):
    """A small conv net with batch-statistics BatchNorm (so that a leak between the tasks of a
    meta-batch would show) and M tasks of 16x16 images."""
    from imaml_ext.models import ConvNet
    from imaml_ext.types import TaskBatch
    torch.manual_seed(seed)
    model = ConvNet(1, ways, hidden=4, image_size=16).to(dtype)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(M, ways, 1, 16, 16, generator=g, dtype=dtype)
    xq = torch.randn(M, 2 * ways, 1, 16, 16, generator=g, dtype=dtype)
    ys = torch.arange(ways).repeat(M, 1)
    yq = torch.arange(ways).repeat(M, 2)
    return model, params, TaskBatch(xs, ys, xq, yq)


def subset(tasks, idx):
    from imaml_ext.types import TaskBatch
    return TaskBatch(*(t[idx] for t in tasks))


def small_algorithm(name: str, **kw):
    if name == "imaml-hf":  # Newton-CG: one iteration of 2 CG steps is enough to go bad
        kw = {"inner_steps": 1, "hf_cg_steps": 2, **kw}
    kw = {"inner_steps": 2, **kw}
    return make_algorithm(name, **options_for(name, inner_lr=0.1, cg_steps=2, lam=2.0, **kw))


@needs_algorithms
@pytest.mark.parametrize("name,where", [(n, "support") for n in ALGORITHMS]
                         + [("imaml-gd", "query"), ("reptile", "query")])
def test_task_with_nan_loss_is_excluded_and_counted(name, where):
    """Task 2 of 4 gets a NaN pixel (a NaN loss): the meta-gradient is finite and equals the
    meta-gradient of the three good tasks alone, and the metrics say which task was dropped."""
    model, params, tasks = tiny_problem()
    x = (tasks.x_support if where == "support" else tasks.x_query).clone()
    x[2, 0, 0, 3, 3] = NAN
    bad = tasks._replace(**{f"x_{where}": x})
    algo = small_algorithm(name)
    grads, metrics = algo.meta_gradient(model, params, bad)
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert metrics["task_ok"].tolist() == [True, True, False, True]
    assert int(metrics["num_ok"]) == 3 and metrics["nonfinite"].tolist() == [False, False, True, False]
    good, _ = algo.meta_gradient(model, params, subset(tasks, [0, 1, 3]))
    for k in grads:
        torch.testing.assert_close(grads[k], good[k], rtol=1e-9, atol=1e-12, msg=k)


@needs_algorithms
@pytest.mark.parametrize("name", ["imaml-gd", "maml"])
def test_raise_policy_names_the_task(name):
    model, params, tasks = tiny_problem()
    x = tasks.x_support.clone()
    x[1, 0, 0, 0, 0] = INF
    with pytest.raises(FloatingPointError, match=r"1 of 4 tasks non-finite \(tasks \[1\]\)"):
        small_algorithm(name, on_nonfinite="raise").meta_gradient(
            model, params, tasks._replace(x_support=x))


@needs_algorithms
@pytest.mark.parametrize("name,where,adapt", [("imaml-gd", "support", "all"),
                                              ("imaml-gd", "query", "all"),
                                              ("maml", "support", "all"),
                                              ("imaml-hf", "query", "head")])
def test_out_of_range_labels_on_a_device_are_masked_and_counted(monkeypatch, name, where,
                                                                  adapt):
    """On a GPU meta_gradient does not read the labels (a synchronisation per step); a label
    outside the head's classes would meet cross-entropy's device-side assert, which ends the
    CUDA context. Masked instead: that task is excluded and counted ("bad_labels"), the rest is
    the meta-gradient of the good tasks alone. The CPU plays the device here (HOST_LABELS
    empty, so check_tasks does not read them)."""
    import imaml_ext.algorithms as alg
    monkeypatch.setattr(alg, "HOST_LABELS", ())
    model, params, tasks = tiny_problem()
    y = getattr(tasks, f"y_{where}").clone()
    y[2, 1] = 3 if where == "support" else -1  # 3 ways: labels 0..2
    bad = tasks._replace(**{f"y_{where}": y})
    kw = {"adapt": adapt} if adapt == "head" else {}
    algo = small_algorithm(name, **kw)
    grads, metrics = algo.meta_gradient(model, params, bad)
    assert metrics["bad_labels"].tolist() == [False, False, True, False]
    assert metrics["task_ok"].tolist() == [True, True, False, True]
    assert all(torch.isfinite(g).all() for g in grads.values())
    good, m_good = algo.meta_gradient(model, params, subset(tasks, [0, 1, 3]))
    assert not m_good["bad_labels"].any()
    for k in grads:
        torch.testing.assert_close(grads[k], good[k], rtol=1e-9, atol=1e-12, msg=k)
    with pytest.raises(FloatingPointError, match=r"tasks \[2\] hold labels outside the head's "
                                                 r"classes"):
        small_algorithm(name, on_nonfinite="raise", **kw).meta_gradient(model, params, bad)
    # adapt and evaluate read them on the host wherever they are: a ValueError naming them
    with pytest.raises(ValueError, match=rf"tasks.y_{where} holds labels in"):
        algo.evaluate(model, params, bad)
    if where == "support":
        with pytest.raises(ValueError, match="tasks.y_support holds labels in"):
            algo.adapt(model, params, bad.x_support, bad.y_support)


@needs_algorithms
@pytest.mark.parametrize("name", ["imaml-gd", "fomaml", "reptile"])
def test_all_tasks_bad_gives_a_zero_finite_meta_gradient(name):
    model, params, tasks = tiny_problem()
    grads, metrics = small_algorithm(name).meta_gradient(
        model, params, tasks._replace(x_support=tasks.x_support * NAN))
    assert int(metrics["num_ok"]) == 0 and not metrics["task_ok"].any()
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads.values())


@needs_algorithms
def test_task_whose_cg_breaks_down_is_skipped(monkeypatch):
    """iMAML: a task whose meta-gradient CG met NaN/Inf (status 3) is left out even when its x
    came back finite; one that met negative curvature keeps its last good iterate, stays in the
    average and is flagged."""
    from imaml_ext import algorithms
    real = algorithms.implicit_meta_gradient

    def breaking(*a, **k):
        out = real(*a, **k)
        out.cg.status[1] = NONFINITE
        out.cg.status[3] = NEGATIVE
        return out
    model, params, tasks = tiny_problem()
    algo = small_algorithm("imaml-gd")
    _, clean = algo.meta_gradient(model, params, tasks)
    monkeypatch.setattr(algorithms, "implicit_meta_gradient", breaking)
    grads, metrics = algo.meta_gradient(model, params, tasks)
    assert metrics["task_ok"].tolist() == [True, False, True, True]
    want_neg = clean["cg_negative_curvature"].clone()   # the net may have some of its own
    want_neg[1], want_neg[3] = False, True
    assert torch.equal(metrics["cg_negative_curvature"], want_neg)
    monkeypatch.setattr(algorithms, "implicit_meta_gradient", real)
    want, _ = algo.meta_gradient(model, params, subset(tasks, [0, 2, 3]))
    for k in grads:
        torch.testing.assert_close(grads[k], want[k], rtol=1e-9, atol=1e-12, msg=k)


@needs_algorithms
def test_genuine_negative_curvature_stays_finite():
    """A conv net's Hessian is indefinite: with a tiny lam, (I + H/lam) has negative eigenvalues
    and CG meets p^T A p <= 0 in some tasks. Those tasks keep their last good iterate: the
    meta-gradient is finite, they stay in the average, and the metrics flag them."""
    model, params, tasks = tiny_problem(M=4, seed=3)
    algo = make_algorithm("imaml-gd", inner_steps=2, inner_lr=0.3, cg_steps=6, lam=1e-3)
    grads, metrics = algo.meta_gradient(model, params, tasks)
    assert all(torch.isfinite(g).all() for g in grads.values())
    neg = metrics["cg_status"] == NEGATIVE
    assert neg.any(), metrics["cg_status"]
    assert torch.equal(metrics["cg_negative_curvature"], neg)
    assert metrics["task_ok"][neg].all()


# ---- training: bad tasks counted, an all-bad step skipped, the meta-parameters never NaN ------

class PoisonTasks:
    """Wraps a real algorithm; at the given meta-step (call) numbers, puts NaN into the support
    images of the given tasks ("all": every task) before the algorithm sees them."""

    def __init__(self, algo, plan):
        self.algo, self.plan, self.calls = algo, plan, 0

    def meta_gradient(self, model, params, tasks):
        which = self.plan.get(self.calls)
        self.calls += 1
        if which is not None:
            x = tasks.x_support.clone()
            x[slice(None) if which == "all" else list(which)] = NAN
            tasks = tasks._replace(x_support=x)
        return self.algo.meta_gradient(model, params, tasks)

    def evaluate(self, *a, **k):
        return self.algo.evaluate(*a, **k)


@needs_algorithms
@pytest.mark.parametrize("name", ["imaml-gd", "fomaml"])
def test_training_skips_bad_tasks_and_all_bad_steps(tmp_path, name):
    from imaml_ext import train as tr
    from imaml_ext.config import TrainConfig
    from imaml_ext.data import FewShotDataset
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(10, 4, 1, 28, 28, generator=g) < 0.3).to(torch.uint8) * 255
    data = FewShotDataset(images, [f"c{i}" for i in range(10)], "omniglot", "train", (0.0,),
                          (1.0,), rotate=True, source="synthetic")
    cfg = TrainConfig(dataset="omniglot", ways=3, shots=1, queries=1, algo=name, steps=4,
                      meta_batch=2, inner_steps=1, cg_steps=1 if name == "imaml-gd" else None,
                      meta_lr=1e-2, val_every=0, ckpt_every=0, log_every=1, quiet=True,
                      out=str(tmp_path / "run"))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        algo = PoisonTasks(tr.build_algorithm(tr.resolve(cfg)), {1: [0], 2: "all"})
        t = tr.Trainer(cfg, algorithm=algo, dist_info=tr.DistInfo(), train_data=data)
        snaps = []
        t.run(on_log=lambda row: snaps.append({k: v.clone() for k, v in t.params.items()}))
    finally:
        torch.set_num_threads(n)
    assert len(snaps) == 4
    changed = lambda a, b: any(not torch.equal(a[k], b[k]) for k in a)  # noqa: E731
    assert changed(snaps[0], snaps[1])        # step 2: one bad task, the other one used
    assert not changed(snaps[1], snaps[2])    # step 3: every task bad, no update
    assert changed(snaps[2], snaps[3])
    assert float(t.opt.t) == 3.0              # Adam's step count skipped the bad step too
    assert t.counters["skipped_tasks"] == 1 + 2 and t.counters["bad_steps"] == 1
    assert all(torch.isfinite(v).all() for v in t.params.values())
    rows = tr.read_metrics(tmp_path / "run")
    assert [r["skipped_tasks"] for r in rows] == [0, 1, 3, 3]
    assert [r["bad_steps"] for r in rows] == [0, 0, 1, 1]
