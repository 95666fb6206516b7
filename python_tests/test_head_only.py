"""Head-only adaptation (adapt="head") of iMAML-GD and iMAML-HF: the meta-gradient of every
parameter (body and head) against autograd through an unrolled, converged inner solve in float64;
the head's part against a dense solve with the authors' matrix; the fused kernels against their
reference twins; batched against per-task; the Hessian-free solver decreasing G; adapt/evaluate
against the model's own forward; the config, CLI and trainer route; argument errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import imaml_ext
from conftest import assert_within_reference_error
from imaml_ext import cli, config
from imaml_ext import train as tr
from imaml_ext.algorithms import make_algorithm
from imaml_ext.head_only import (head_gd, head_hessian_free, head_loss_grad, head_smoothness,
                                 split_head, unrolled_meta_gradient)
from imaml_ext.models import ConvNet
from imaml_ext.types import TaskBatch

from test_train import one_thread, synthetic_dataset, tiny_config  # noqa: F401 (fixture)

DT = torch.float64
LAM = 2.0
needs_ext = pytest.mark.skipif(not imaml_ext.extension_available(),
                               reason="compiled extension not built")
# Inner problems solved to machine precision: GD contracts by (1 - lr lam) or better per step,
# Newton converges quadratically; CG runs to convergence on P = c (f + 1) <= 15 unknowns.
EXACT = {"imaml-gd": dict(inner_steps=150, inner_lr=0.25),
         "imaml-hf": dict(inner_steps=10, hf_cg_steps=20)}
CG = dict(cg_steps=40, cg_rtol=1e-14)


def make_model(kind: str, ways: int) -> nn.Module:
    if kind == "conv":
        return ConvNet(1, ways, hidden=4, image_size=16).to(DT)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(),
                         nn.Linear(4, ways)).to(DT)


def setup(kind="conv", M=3, ways=3, shots=2, query=3, seed=0, dtype=DT):
    torch.manual_seed(seed)
    model = make_model(kind, ways).to(dtype)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    shape = (1, 16, 16) if kind == "conv" else (6,)
    tasks = TaskBatch(torch.randn(M, ways * shots, *shape, dtype=dtype),
                      torch.randint(0, ways, (M, ways * shots)),
                      torch.randn(M, ways * query, *shape, dtype=dtype),
                      torch.randint(0, ways, (M, ways * query)))
    return model, params, tasks


def unrolled(model, params, tasks, support_path=True):
    """The independent route: autograd through unrolled GD per task (float64), with a step
    size and a number of steps that make it contract to 1e-15."""
    return unrolled_meta_gradient(model, params, tasks, lam=LAM, support_path=support_path)


def flat(g):
    return torch.cat([v.reshape(-1) for v in g.values()])


def rel_err(a, b):
    fa, fb = flat(a), flat(b)
    return float((fa - fb).norm() / fb.norm())


# ---- the meta-gradient against independent computations -----------------------------------------

@pytest.mark.parametrize("kind", ["conv", "mlp"])
@pytest.mark.parametrize("name", ["imaml-gd", "imaml-hf"])
def test_meta_gradient_matches_unrolled_autograd(name, kind):
    model, params, tasks = setup(kind)
    truth = unrolled(model, params, tasks)
    algo = make_algorithm(name, adapt="head", lam=LAM, **EXACT[name], **CG)
    grads, m = algo.meta_gradient(model, params, tasks)
    assert set(grads) == set(params)
    assert bool(m["task_ok"].all()) and bool((m["cg_status"] == 1).all())
    assert rel_err(grads, truth) < 1e-8
    # The body's gradient through phi*(F_support) is not negligible: without it the check fails.
    query_only = unrolled(model, params, tasks, support_path=False)
    assert rel_err(query_only, truth) > 1e-3
    # ... and the body does get a gradient (the head-only route does not drop it).
    body_keys = split_head(model).body_names
    assert float(flat({k: truth[k] for k in body_keys}).norm()) > 1e-3


def test_head_part_solves_the_authors_matrix():
    """With cg_damping / cg_lam the head's meta-gradient is ((1 + d) I + H / cg_lam)^-1 g, H the
    head's Hessian at phi*: checked per task against a dense solve with the autograd Hessian."""
    model, params, tasks = setup("conv", M=2)
    d, cg_lam = 1.0, LAM + 10
    algo = make_algorithm("imaml-hf", adapt="head", lam=LAM, cg_damping=d, cg_lam=cg_lam,
                          **EXACT["imaml-hf"], **CG)
    grads, _ = algo.meta_gradient(model, params, tasks)
    adapted = algo.adapt(model, params, tasks.x_support, tasks.y_support)
    want = []
    for i in range(tasks.num_tasks):
        with torch.no_grad():
            Fs = model.body(tasks.x_support[i])
            Fq = model.body(tasks.x_query[i])
        W, b = adapted["head.weight"][i], adapted["head.bias"][i]
        c, f = W.shape

        def loss(v, Fx, y):
            return F.cross_entropy(Fx @ v[:c * f].view(c, f).T + v[c * f:], y)

        v = torch.cat([W.reshape(-1), b])
        H = torch.autograd.functional.hessian(lambda v: loss(v, Fs, tasks.y_support[i]), v)
        g = torch.func.grad(loss)(v, Fq, tasks.y_query[i])
        want.append(torch.linalg.solve((1 + d) * torch.eye(v.numel(), dtype=DT) + H / cg_lam, g))
    want = torch.stack(want).mean(0)
    got = torch.cat([grads["head.weight"].reshape(-1), grads["head.bias"]])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


# ---- the fused kernels, batching, backends ------------------------------------------------------

@needs_ext
@pytest.mark.parametrize("name", ["imaml-gd", "imaml-hf"])
def test_use_ext_equals_reference(name):
    model, params, tasks = setup("conv", M=4)
    kw = dict(adapt="head", lam=LAM, inner_steps=5 if name == "imaml-gd" else 3, cg_steps=5)
    ext, m_ext = make_algorithm(name, use_ext=True, **kw).meta_gradient(model, params, tasks)
    ref, m_ref = make_algorithm(name, use_ext=False, **kw).meta_gradient(model, params, tasks)
    for k in params:
        torch.testing.assert_close(ext[k], ref[k], rtol=1e-10, atol=1e-13, msg=k)
    assert torch.equal(m_ext["cg_iterations"], m_ref["cg_iterations"])
    # float32: the kernels' error against the float64 truth within STYLE.md's rule
    p32 = {k: v.float() for k, v in params.items()}
    t32 = tasks.to(dtype=torch.float32)
    m32 = model.float()
    e32, _ = make_algorithm(name, use_ext=True, **kw).meta_gradient(m32, p32, t32)
    r32, _ = make_algorithm(name, use_ext=False, **kw).meta_gradient(m32, p32, t32)
    assert_within_reference_error(flat(e32), flat(r32), flat(ext))


@needs_ext
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name", ["imaml-gd", "imaml-hf"])
def test_cuda_matches_cpu(name):
    """The CUDA softmax-head kernels inside the head-only algorithms give the CPU's meta-gradient
    (float64)."""
    model, params, tasks = setup("conv", M=4)
    kw = dict(adapt="head", lam=LAM, inner_steps=5 if name == "imaml-gd" else 3, cg_steps=5)
    cpu, m_cpu = make_algorithm(name, **kw).meta_gradient(model, params, tasks)
    dev = torch.device("cuda")
    gpu, m_gpu = make_algorithm(name, **kw).meta_gradient(
        model.to(dev), {k: v.to(dev) for k, v in params.items()}, tasks.to(device=dev))
    for k in params:
        assert gpu[k].device.type == "cuda", k
        torch.testing.assert_close(gpu[k].cpu(), cpu[k], rtol=1e-9, atol=1e-12, msg=k)
    assert torch.equal(m_gpu["cg_iterations"].cpu(), m_cpu["cg_iterations"])


@pytest.mark.parametrize("name", ["imaml-gd", "imaml-hf"])
def test_batched_equals_per_task_and_backends_agree(name):
    model, params, tasks = setup("conv", M=3)
    kw = dict(adapt="head", lam=LAM, inner_steps=4 if name == "imaml-gd" else 2, cg_steps=3)
    algo = make_algorithm(name, **kw)
    batched, m = algo.meta_gradient(model, params, tasks)
    singles = [algo.meta_gradient(model, params, TaskBatch(*(t[i:i + 1] for t in tasks)))[0]
               for i in range(tasks.num_tasks)]
    for k in params:
        torch.testing.assert_close(batched[k], torch.stack([s[k] for s in singles]).mean(0),
                                   rtol=1e-10, atol=1e-13, msg=k)
    vm, m_vm = make_algorithm(name, backend="vmap", **kw).meta_gradient(model, params, tasks)
    for k in params:
        torch.testing.assert_close(vm[k], batched[k], rtol=1e-9, atol=1e-12, msg=k)
    torch.testing.assert_close(m_vm["query_loss"], m["query_loss"], rtol=1e-10, atol=0)


def test_skipped_task_is_left_out():
    model, params, tasks = setup("conv", M=3)
    xs = tasks.x_support.clone()
    xs[1, 0, 0, 0, 0] = float("nan")
    bad = TaskBatch(xs, *tasks[1:])
    algo = make_algorithm("imaml-gd", adapt="head", lam=LAM, inner_steps=3, cg_steps=3)
    grads, m = algo.meta_gradient(model, params, bad)
    assert m["task_ok"].tolist() == [True, False, True]
    good = [algo.meta_gradient(model, params, TaskBatch(*(t[i:i + 1] for t in tasks)))[0]
            for i in (0, 2)]
    for k in params:
        torch.testing.assert_close(grads[k], (good[0][k] + good[1][k]) / 2, rtol=1e-10,
                                   atol=1e-13, msg=k)
    with pytest.raises(FloatingPointError, match=r"tasks \[1\]"):
        algo.with_options(on_nonfinite="raise").meta_gradient(model, params, bad)


# ---- the inner solvers --------------------------------------------------------------------------

def test_hessian_free_decreases_G_and_reaches_the_minimiser():
    torch.manual_seed(3)
    M, n, f, c = 5, 12, 7, 4
    F_ = torch.randn(M, n, f, dtype=DT) * 3  # large logits: a far-from-quadratic start
    y = torch.randint(0, c, (M, n))
    W0, b0 = torch.randn(M, c, f, dtype=DT), torch.randn(M, c, dtype=DT)
    r = head_hessian_free(F_, y, W0, b0, lam=0.1, steps=6, cg_steps=3)
    G = r.metrics["hf_objective"]
    assert G.shape == (7, M)
    assert bool((G[1:] <= G[:-1] + 1e-12).all()), G
    assert bool((G[-1] < G[0] - 1e-3).all())
    # many more Newton steps: the gradient of G vanishes at the result
    r = head_hessian_free(F_, y, W0, b0, lam=0.1, steps=25, cg_steps=30)
    _, gW, gb, _ = head_loss_grad(F_, r.W, r.bias, y)
    gW, gb = gW + 0.1 * (r.W - W0), gb + 0.1 * (r.bias - b0)
    assert float(torch.cat([gW.reshape(M, -1), gb], 1).abs().max()) < 1e-10
    assert bool(r.finite.all())


def test_gd_step_safeguard():
    """head_smoothness bounds the Hessian's norm; with it GD decreases G at every step on large
    features, where the fixed step lr = 0.1 diverges."""
    torch.manual_seed(4)
    M, n, f, c = 4, 10, 6, 5
    F_ = torch.rand(M, n, f, dtype=DT) * 8  # positive, correlated: ||H|| far above 2/lr - lam
    y = torch.randint(0, c, (M, n))
    W0, b0 = torch.randn(M, c, f, dtype=DT) * 0.1, torch.zeros(M, c, dtype=DT)
    bound = head_smoothness(F_)
    for i in range(M):
        def loss(v):
            return F.cross_entropy(F_[i] @ v[:c * f].view(c, f).T + v[c * f:], y[i])
        H = torch.autograd.functional.hessian(loss, torch.cat([W0[i].reshape(-1), b0[i]]))
        top = float(torch.linalg.eigvalsh(H)[-1])
        assert top <= float(bound[i]) and top > 2 / 0.1 - LAM

    def objectives(safeguard):
        out = []
        for k in range(6):
            r = head_gd(F_, y, W0, b0, lam=LAM, steps=k, lr=0.1, safeguard=safeguard)
            dist = ((r.W - W0) ** 2).sum((1, 2)) + ((r.bias - b0) ** 2).sum(1)
            out.append(r.loss + 0.5 * LAM * dist)
        return torch.stack(out)

    G = objectives(True)
    assert bool((G[1:] < G[:-1]).all())
    fixed = objectives(False)
    assert bool((fixed[1:] > fixed[:-1]).any())  # the fixed step overshoots here


def test_hessian_free_line_search_failure_takes_the_safeguarded_gradient_step():
    # Features so large that every step of the ladder overshoots: such a task stayed at theta
    # (G end / start 1.000 for every task at scale 100), its meta-gradient taken there as if at
    # the minimiser, with task_ok True.
    torch.manual_seed(6)
    M, n, f, c = 8, 5, 64, 5
    F_ = torch.rand(M, n, f, dtype=DT) * 100
    y = torch.arange(n).remainder(c).expand(M, n).contiguous()
    W0, b0 = torch.randn(M, c, f, dtype=DT) * 0.01, torch.zeros(M, c, dtype=DT)
    r = head_hessian_free(F_, y, W0, b0, lam=LAM, steps=4, cg_steps=5)
    assert int(r.metrics["hf_ls_failures"].sum()) > 0  # the case is exercised
    G = r.metrics["hf_objective"]
    assert bool((G[1:] <= G[:-1]).all()) and bool((G[-1] < 0.99 * G[0]).all()), G
    assert bool((r.metrics["head_grad_ratio"] < 1).all())


def test_hessian_free_at_the_minimum_counts_no_line_search_failures():
    # Converged heads: G's changes are below its rounding, the Armijo test failed on rounding
    # alone, counted failures and took the fallback gradient step; they are stationary now, and
    # the Newton steps go on to |grad G| at rounding level.
    # (seed 4: three failures in two tasks before)
    torch.manual_seed(4)
    M, n, f, c = 4, 10, 6, 5
    F_ = torch.randn(M, n, f, dtype=DT)
    y = torch.arange(n).remainder(c).expand(M, n).contiguous()
    W0, b0 = torch.randn(M, c, f, dtype=DT) * 0.1, torch.zeros(M, c, dtype=DT)
    r = head_hessian_free(F_, y, W0, b0, lam=LAM, steps=12, cg_steps=30)
    assert r.metrics["hf_ls_failures"].tolist() == [0] * M
    assert bool((r.metrics["head_grad_ratio"] < 1e-14).all()), r.metrics["head_grad_ratio"]


def test_head_grad_ratio_reports_how_far_from_the_minimiser():
    torch.manual_seed(7)
    M, n, f, c = 4, 10, 6, 5
    y = torch.randint(0, c, (M, n))
    W0, b0 = torch.randn(M, c, f, dtype=DT) * 0.1, torch.zeros(M, c, dtype=DT)
    small = head_gd(torch.randn(M, n, f, dtype=DT), y, W0, b0, lam=LAM, steps=200, lr=0.1)
    assert bool((small.metrics["head_grad_ratio"] < 1e-3).all())
    # large features: the safeguarded step is tiny and 16 steps stay far from argmin G
    large = head_gd(torch.rand(M, n, f, dtype=DT) * 30, y, W0, b0, lam=LAM, steps=16, lr=0.1)
    assert bool((large.metrics["head_grad_ratio"] > 0.1).all())
    # the authors' steps minimise L_train, then one proximal step: not argmin G, and it says so
    authors = head_gd(torch.randn(M, n, f, dtype=DT), y, W0, b0, lam=LAM, steps=200, lr=0.1,
                      proximal="authors")
    assert bool((authors.metrics["head_grad_ratio"] > 1e-2).all())
    hf = head_hessian_free(torch.rand(M, n, f, dtype=DT) * 30, y, W0, b0, lam=LAM, steps=8,
                           cg_steps=20)
    assert bool((hf.metrics["head_grad_ratio"] < 1e-3).all())
    assert bool((head_gd(torch.randn(M, n, f, dtype=DT), y, W0, b0, lam=LAM, steps=0, lr=0.1)
                 .metrics["head_grad_ratio"] == 1).all())


@pytest.mark.parametrize("case", ["y range", "W0 shape", "F_ dtype", "y dtype", "rhs dtype",
                                  "ls_steps"])
def test_head_solvers_name_the_argument(case):
    # were raw torch errors ("index 5 is out of bounds", "Expected size for first two
    # dimensions of batch2", "full(): argument 'size'") or "cg: A.F must have b's dtype"
    from imaml_ext.head_only import head_implicit_solve
    M, n, f, c = 2, 4, 3, 3
    F_, y = torch.randn(M, n, f, dtype=DT), torch.randint(0, c, (M, n))
    W0, b0 = torch.zeros(M, c, f, dtype=DT), torch.zeros(M, c, dtype=DT)
    call, match = {
        "y range": (lambda: head_gd(F_, y + c, W0, b0, lam=LAM, steps=1, lr=0.1),
                    r"head_gd: y must hold labels in \[0, 3\)"),
        "W0 shape": (lambda: head_gd(F_, y, W0[:, :, :2], b0, lam=LAM, steps=1, lr=0.1),
                     r"head_gd: W0 must be \(2, c, 3\) to match F_ \(2, 4, 3\), got \(2, 3, 2\)"),
        "F_ dtype": (lambda: head_hessian_free(F_.float(), y, W0, b0, lam=LAM),
                     r"head_hessian_free: W0 must have dtype torch.float32 like F_, got "
                     r"torch.float64"),
        "y dtype": (lambda: head_hessian_free(F_, y.int(), W0, b0, lam=LAM),
                    r"head_hessian_free: y must be \(M, n\) = \(2, 4\) int64 labels"),
        "rhs dtype": (lambda: head_implicit_solve(F_, W0, b0, torch.zeros(M, c * (f + 1)),
                                                  lam=LAM),
                      r"head_implicit_solve: rhs must have F_'s dtype and device"),
        "ls_steps": (lambda: head_hessian_free(F_, y, W0, b0, lam=LAM, ls_steps=2.5),
                     r"ls_steps must be an int >= 1, got 2.5"),
    }[case]
    with pytest.raises(ValueError, match=match):
        call()


def test_softmax_head_hvp_twin_returns_contiguous_outputs():
    from imaml_ext import ops
    M, n, f, c = 2, 4, 5, 3
    F_ = torch.randn(M, n, f, dtype=DT)
    W, bias = torch.randn(M, c, f, dtype=DT), torch.randn(M, c, dtype=DT)
    V, vb = torch.randn(M, f, c, dtype=DT).mT, torch.randn(c, M, dtype=DT).T  # strided
    outW, outb = ops.softmax_head_hvp(F_, W, bias, V, vb, 1.0, 0.5, use_ext=False)
    assert outW.is_contiguous() and outb.is_contiguous()  # as documented, and as the kernels'


@pytest.mark.parametrize("name", ["imaml-gd", "imaml-hf"])
def test_adapt_and_evaluate_match_the_model_forward(name):
    model, params, tasks = setup("conv", M=2)
    algo = make_algorithm(name, adapt="head", lam=LAM, inner_steps=3 if name == "imaml-gd" else 2)
    phi = algo.adapt(model, params, tasks.x_support, tasks.y_support)
    for k in params:  # the body is not adapted
        if not k.startswith("head."):
            assert torch.equal(phi[k], params[k].expand_as(phi[k]))
    loss, acc = algo.evaluate(model, params, tasks)
    for i in range(tasks.num_tasks):
        out = functional_call(model, {k: v[i] for k, v in phi.items()}, (tasks.x_query[i],))
        torch.testing.assert_close(loss[i], F.cross_entropy(out, tasks.y_query[i]),
                                   rtol=1e-12, atol=0)
        assert float(acc[i]) == float((out.argmax(-1) == tasks.y_query[i]).double().mean())
    _, m = algo.meta_gradient(model, params, tasks)
    torch.testing.assert_close(m["query_loss"], loss, rtol=1e-12, atol=0)
    assert bool((m["inner_loss"] < m["inner_loss_before"]).all())


def test_body_keeps_a_layer_used_twice():
    """A module object at two places in the Sequential (one nn.Tanh shared by both hidden
    layers) is part of the body at both: the features are the model's own body applied per task,
    and adapt/evaluate reproduce the model's forward."""
    import copy
    torch.manual_seed(0)
    act = nn.Tanh()
    model = nn.Sequential(nn.Linear(6, 5), act, nn.Linear(5, 4), act, nn.Linear(4, 3)).to(DT)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    tasks = TaskBatch(torch.randn(2, 6, 6, dtype=DT), torch.randint(0, 3, (2, 6)),
                      torch.randn(2, 9, 6, dtype=DT), torch.randint(0, 3, (2, 9)))
    split = split_head(model)
    assert len(split.body) == 4
    body = nn.Sequential(*list(model)[:-1])  # iterating a Sequential visits every slot
    torch.testing.assert_close(split.body(tasks.x_query[0]), body(tasks.x_query[0]))
    algo = make_algorithm("imaml-gd", adapt="head", lam=LAM, inner_steps=3)
    phi = algo.adapt(model, params, tasks.x_support, tasks.y_support)
    loss, _ = algo.evaluate(model, params, tasks)
    for i in range(2):
        twin = copy.deepcopy(model)
        with torch.no_grad():
            for k, v in twin.named_parameters():
                v.copy_(phi[k][i])
        torch.testing.assert_close(loss[i], F.cross_entropy(twin(tasks.x_query[i]),
                                                            tasks.y_query[i]),
                                   rtol=1e-12, atol=0)


# ---- configuration, command line, trainer -------------------------------------------------------

def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="adapt must be one of"):
        make_algorithm("imaml-gd", adapt="body")
    for name in ("maml", "fomaml", "reptile"):
        with pytest.raises(ValueError, match="adapt='head' is implemented for imaml-gd and "
                                             f"imaml-hf, not '{name}'"):
            make_algorithm(name, adapt="head")
    with pytest.raises(ValueError, match="adapt='head' needs loss='cross_entropy'"):
        make_algorithm("imaml-gd", adapt="head", loss="mse")
    with pytest.raises(ValueError, match="adapt='head' takes hvp"):
        make_algorithm("imaml-hf", adapt="head", hvp="double_backward")
    _, params, tasks = setup("mlp")
    algo = make_algorithm("imaml-gd", adapt="head")
    relu_last = nn.Sequential(nn.Linear(6, 3), nn.ReLU())
    p = {k: v.detach().double() for k, v in relu_last.named_parameters()}
    with pytest.raises(ValueError, match="model: adapt='head' needs a linear head"):
        algo.meta_gradient(relu_last.double(), p, tasks)
    lone = nn.Linear(6, 3).double()
    with pytest.raises(ValueError, match="model: adapt='head' needs a ConvNet or an "
                                         "nn.Sequential"):
        algo.meta_gradient(lone, {k: v.detach() for k, v in lone.named_parameters()}, tasks)
    model, params, _ = setup("mlp")
    with pytest.raises(ValueError, match=r"tasks.y_support must be int64"):
        algo.meta_gradient(model, params, TaskBatch(tasks.x_support, tasks.y_support.double(),
                                                    tasks.x_query, tasks.y_query))


def test_config_and_cli_route(tmp_path, capsys):
    cfg = config.resolve(tiny_config(tmp_path, algo="imaml-hf", adapt="head"))
    assert cfg.algorithm_kwargs()["adapt"] == "head"
    assert tr.build_algorithm(cfg).config.adapt == "head"
    for bad, needle in ((dict(algo="maml"), "--adapt head is implemented for imaml-gd and "
                                            "imaml-hf, not maml"),
                        (dict(algo="imaml-gd", hvp="double_backward"), "--adapt head takes --hvp"),
                        (dict(algo="imaml-gd", adapt="body"), "--adapt must be one of")):
        with pytest.raises(config.UsageError, match=needle):
            config.resolve(tiny_config(tmp_path, **{"adapt": "head", **bad}))
    code = cli.main(["train", "--algo", "reptile", "--adapt", "head", "--out",
                     str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "--adapt head is implemented for" in err and "Traceback" not in err
    # a checkpoint written before the option existed (no "adapt") was trained with "all"
    saved = {k: v for k, v in cfg.to_dict().items() if k != "adapt"}
    assert config.identity_mismatch(saved, cfg.replace(adapt="all").to_dict()) == []
    assert config.identity_mismatch(saved, cfg.to_dict()) == [
        "adapt: checkpoint 'all', requested 'head'"]


def test_trainer_runs_head_only(tmp_path):
    cfg = tiny_config(tmp_path, algo="imaml-gd", adapt="head", steps=2, ckpt_every=2)
    t = tr.Trainer(cfg, dist_info=tr.DistInfo(), train_data=synthetic_dataset())
    before = {k: v.clone() for k, v in t.params.items()}
    summary = t.run()
    assert summary["step"] == 2 and summary["bad_steps"] == 0
    assert all(not torch.equal(before[k], t.params[k]) for k in ("body.0.weight", "head.weight"))
