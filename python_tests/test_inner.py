"""imaml_ext.inner: batched GD (both proximal forms) against per-task loops, and the Hessian-free
solver: its line search decreases G on every task, it solves quadratics in one step, and bad
curvature or values are flagged rather than propagated."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from imaml_ext import synthetic as syn
from imaml_ext.hvp import TaskLoss
from imaml_ext.inner import batched_theta, gd, hessian_free, objective
from imaml_ext.models import ConvNet

DT = torch.float64


# Tiny tensors: one intra-op thread (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def conv_setup(M=3, ways=3, shots=2, seed=0):
    torch.manual_seed(seed)
    model = ConvNet(1, ways, hidden=4, image_size=16).to(DT)
    theta = {k: v.detach().clone() for k, v in model.named_parameters()}
    x = torch.randn(M, ways * shots, 1, 16, 16, dtype=DT)
    y = torch.randint(0, ways, (M, ways * shots))
    return model, theta, x, y


def loop_gd(model, theta, x, y, steps, lr, lam, proximal):
    """Per task, torch.autograd and in-place updates: an independent GD."""
    out = []
    for i in range(x.shape[0]):
        phi = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
        for _ in range(steps):
            loss = F.cross_entropy(functional_call(model, phi, (x[i],)), y[i])
            if proximal == "paper":
                loss = loss + 0.5 * lam * sum(((phi[k] - theta[k]) ** 2).sum() for k in phi)
            gs = torch.autograd.grad(loss, list(phi.values()))
            with torch.no_grad():
                for (k, p), g in zip(phi.items(), gs):
                    p -= lr * g
        with torch.no_grad():
            if proximal == "authors":
                for k, p in phi.items():
                    p -= lr * lam * (p - theta[k])
        out.append({k: v.detach() for k, v in phi.items()})
    return {k: torch.stack([o[k] for o in out]) for k in theta}


@pytest.mark.parametrize("proximal", ["paper", "authors"])
def test_gd_equals_per_task_loop(proximal):
    model, theta, x, y = conv_setup()
    res = gd(TaskLoss(model), batched_theta(theta, 3), x, y, steps=3, lr=0.1, lam=2.0,
             proximal=proximal)
    want = loop_gd(model, theta, x, y, 3, 0.1, 2.0, proximal)
    for k in theta:
        torch.testing.assert_close(res.params[k], want[k])
    assert res.finite.all() and res.loss.shape == (3,)
    assert (res.loss < res.metrics["loss_first"]).all()


def test_gd_create_graph_same_values_and_zero_steps():
    model, theta, x, y = conv_setup()
    tl = TaskLoss(model)
    a = gd(tl, batched_theta(theta, 3), x, y, steps=2, lr=0.1, lam=0.0)
    tb = {k: v.unsqueeze(0).expand(3, *v.shape).clone().requires_grad_(True)
          for k, v in theta.items()}
    b = gd(tl, tb, x, y, steps=2, lr=0.1, lam=0.0, create_graph=True)
    assert all(v.requires_grad for v in b.params.values())
    for k in theta:
        torch.testing.assert_close(a.params[k], b.params[k].detach())
    z = gd(tl, batched_theta(theta, 3), x, y, steps=0, lr=0.1, lam=1.0)
    for k in theta:
        torch.testing.assert_close(z.params[k], batched_theta(theta, 3)[k])


def test_gd_nonfinite_task_is_flagged_and_isolated():
    model, theta, x, y = conv_setup()
    x = x.clone()
    x[1, 0, 0, 0, 0] = float("nan")
    tl = TaskLoss(model)
    res = gd(tl, batched_theta(theta, 3), x, y, steps=2, lr=0.1, lam=1.0)
    assert res.finite.tolist() == [True, False, True]
    clean = gd(tl, batched_theta(theta, 1), x[2:3], y[2:3], steps=2, lr=0.1, lam=1.0)
    for k in theta:
        torch.testing.assert_close(res.params[k][2:3], clean.params[k])


def test_gd_bad_arguments():
    model, theta, x, y = conv_setup()
    tl = TaskLoss(model)
    tb = batched_theta(theta, 3)
    with pytest.raises(ValueError, match="steps"):
        gd(tl, tb, x, y, steps=-1, lr=0.1)
    with pytest.raises(ValueError, match="inner_lr"):
        gd(tl, tb, x, y, steps=1, lr=0.0)
    with pytest.raises(ValueError, match="lam"):
        gd(tl, tb, x, y, steps=1, lr=0.1, lam=-1.0)
    with pytest.raises(ValueError, match="proximal"):
        gd(tl, tb, x, y, steps=1, lr=0.1, proximal="both")


@pytest.mark.parametrize("hvp", ["exact", "ggn"])
def test_hf_line_search_decreases_G_on_every_task(hvp):
    model, theta, x, y = conv_setup(M=4)
    tl = TaskLoss(model)
    tb = batched_theta(theta, 4)
    res = hessian_free(tl, tb, x, y, lam=0.5, steps=3, cg_steps=5, hvp=hvp)
    hist = res.metrics["hf_objective"]
    assert hist.shape == (4, 4)
    assert (hist[1:] <= hist[:-1]).all()             # never increases
    assert (hist[-1] < hist[0] - 1e-6).all()          # and strictly decreased on every task
    torch.testing.assert_close(hist[-1], objective(tl, res.params, tb, x, y, 0.5))
    assert res.finite.all()
    for key in ("hf_step_size", "hf_ls_failures", "hf_negative_curvature", "hf_cg_iterations",
                "hf_cg_residual"):
        assert res.metrics[key].shape == (4,)


def test_hf_one_newton_step_solves_a_quadratic():
    lt = syn.make_linear_tasks(3, d=10, seed=1)
    t = lt.tasks
    model = syn.linear_model(10)
    theta = {"weight": torch.randn(1, 10, dtype=DT)}
    res = hessian_free(TaskLoss(model, "half_mse"), batched_theta(theta, 3), t.x_support,
                       t.y_support, lam=1.0, steps=1, cg_steps=5)
    want = syn.inner_solution(t, theta["weight"].view(1, -1).expand(3, -1), 1.0)
    torch.testing.assert_close(res.params["weight"].squeeze(1), want, rtol=1e-10, atol=1e-12)
    assert (res.metrics["hf_step_size"] == 1).all()


def test_hf_indefinite_curvature_is_counted_and_finite():
    # L = -(x w)^2/2 is concave: H + lam I indefinite for small lam; G is unbounded below, so
    # every step must still be a finite, accepted descent step.
    lt = syn.make_linear_tasks(3, d=10, seed=2)
    t = lt.tasks
    model = syn.linear_model(10)
    tl = TaskLoss(model, lambda out, y: -0.5 * out.squeeze(-1) ** 2)
    theta = {"weight": torch.randn(1, 10, dtype=DT)}
    res = hessian_free(tl, batched_theta(theta, 3), t.x_support, t.y_support, lam=0.01, steps=2)
    assert (res.metrics["hf_negative_curvature"] > 0).all()
    assert res.finite.all() and torch.isfinite(res.params["weight"]).all()
    hist = res.metrics["hf_objective"]
    assert (hist[1:] < hist[:-1]).all()


def test_hf_nonfinite_task_is_isolated():
    model, theta, x, y = conv_setup()
    x = x.clone()
    x[0] = float("inf")
    res = hessian_free(TaskLoss(model), batched_theta(theta, 3), x, y, lam=1.0, steps=1)
    assert res.finite.tolist() == [False, True, True]
    assert torch.isfinite(res.params["head.weight"][1:]).all()


def test_hf_bad_arguments():
    model, theta, x, y = conv_setup()
    tl, tb = TaskLoss(model), batched_theta(theta, 3)
    with pytest.raises(ValueError, match="lam must be > 0"):
        hessian_free(tl, tb, x, y, lam=0.0)
    with pytest.raises(ValueError, match="hf_cg_steps"):
        hessian_free(tl, tb, x, y, lam=1.0, cg_steps=0)
    with pytest.raises(ValueError, match="line search"):
        hessian_free(tl, tb, x, y, lam=1.0, backtrack=1.5)


@pytest.mark.parametrize("lam", [0.0, 2.0])
@pytest.mark.parametrize("owned", [False, True])
def test_multi_tensor_step_is_bitwise_the_plain_step(lam, owned):
    # gd's no-graph loop updates all leaves with _foreach ops; the same operations in the same
    # order as _step, so float32 results agree bit for bit (a broadcast theta included).
    from imaml_ext.inner import _step, _step_all
    torch.manual_seed(0)
    theta = {"w": torch.randn(3, 4).unsqueeze(0).expand(5, 3, 4), "b": torch.randn(5, 7)}
    phi = {k: v + 0.1 * torch.randn(v.shape) for k, v in theta.items()}
    g = {k: torch.randn(v.shape) for k, v in theta.items()}
    want = {k: _step(phi[k], g[k], theta[k], 0.1, lam) for k in phi}
    start = {k: v.clone() for k, v in phi.items()}
    got = _step_all(start, {k: v.clone() for k, v in g.items()}, theta, list(phi), 0.1, lam,
                    owned=owned)
    for k in want:
        assert torch.equal(got[k], want[k]), k
        # not ours (e.g. theta itself): left untouched; ours: updated in place
        assert (got[k] is start[k]) == owned and torch.equal(start[k], want[k] if owned
                                                               else phi[k]), k


def test_gd_refuses_infinite_lr_and_boolean_lam():
    from imaml_ext.inner import gd
    from imaml_ext.hvp import TaskLoss
    net = torch.nn.Linear(3, 2).double()
    tl = TaskLoss(net)
    theta = {k: v.detach().unsqueeze(0) for k, v in net.named_parameters()}
    x, y = torch.randn(1, 4, 3, dtype=torch.float64), torch.zeros(1, 4, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"inner_lr must be a finite number > 0, got inf"):
        gd(tl, theta, x, y, steps=1, lr=float("inf"))
    with pytest.raises(ValueError, match=r"lam must be a finite number >= 0, got True"):
        gd(tl, theta, x, y, steps=1, lr=0.1, lam=True)


def test_hf_after_a_failed_line_search_takes_steepest_descent():
    # w x with per-sample loss cos(10 w x) at a w where H + lam = 1e-6 > 0: the Newton step is
    # huge and every t of the ladder overshoots. The task then computed the same direction in
    # every iteration and ended at theta (task ok, its meta-gradient taken there); now the
    # iteration after a failure goes along -grad G.
    import math
    model = torch.nn.Linear(1, 1, bias=False).double()
    lam = 1e-3
    w0 = math.acos((lam - 1e-6) / 100) / 10
    tl = TaskLoss(model, lambda out, y: torch.cos(10 * out.squeeze(-1)))
    tb = batched_theta({"weight": torch.tensor([[w0]], dtype=DT)}, 2)
    x, y = torch.ones(2, 1, 1, dtype=DT), torch.zeros(2, 1, dtype=DT)
    res = hessian_free(tl, tb, x, y, lam=lam, steps=4, cg_steps=5)
    G = res.metrics["hf_objective"]
    assert res.metrics["hf_ls_failures"].tolist() == [1, 1]  # the first Newton step only
    assert bool((G[1] == G[0]).all())                           # no move at the failure
    assert bool((G[2:] < G[1:-1]).all()) and bool((G[-1] < -0.9).all()), G


def test_hf_at_a_minimum_counts_no_line_search_failures():
    # Converged tasks: G's changes are below its rounding, the Armijo test failed (or passed by
    # luck) on rounding alone and counted failures; they are stationary, not failed, and the
    # Newton steps go on to |grad G| at rounding level.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(),
                                torch.nn.Linear(5, 3)).double()
    theta = {k: v.detach() for k, v in model.named_parameters()}
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 6, 3, generator=g, dtype=DT)
    y = torch.randint(0, 3, (3, 6), generator=g)
    tl = TaskLoss(model)
    res = hessian_free(tl, batched_theta(theta, 3), x, y, lam=2.0, steps=8, cg_steps=5)
    assert res.metrics["hf_ls_failures"].tolist() == [0, 0, 0]
    gs, _, _ = tl.grad(res.params, x, y)
    gG = torch.cat([(gs[k] + 2.0 * (res.params[k] - theta[k])).reshape(3, -1) for k in theta], 1)
    assert float(gG.norm(dim=1).max()) < 1e-13
