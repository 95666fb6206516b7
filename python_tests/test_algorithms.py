"""imaml_ext.algorithms: every meta-gradient against an independent computation (float64):
MAML against unrolled autograd per task, first-order MAML and Reptile against their definitions,
iMAML against an authors'-style per-task loop and against the closed form on linear regression;
batched equals per-task; use_ext equals the reference; the failure policy and argument errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import imaml_ext
from imaml_ext import synthetic as syn
from imaml_ext.algorithms import ALGORITHMS, NO_CG, make_algorithm, options_for
from imaml_ext.models import ConvNet
from imaml_ext.types import TaskBatch

DT = torch.float64
needs_ext = pytest.mark.skipif(not imaml_ext.extension_available(),
                               reason="compiled extension not built")


# Tiny tensors: one intra-op thread (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def conv_setup(M=3, ways=3, shots=2, query=2, seed=0):
    torch.manual_seed(seed)
    model = ConvNet(1, ways, hidden=4, image_size=16).to(DT)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    tasks = TaskBatch(torch.randn(M, ways * shots, 1, 16, 16, dtype=DT),
                      torch.randint(0, ways, (M, ways * shots)),
                      torch.randn(M, ways * query, 1, 16, 16, dtype=DT),
                      torch.randint(0, ways, (M, ways * query)))
    return model, params, tasks


def ce(model, p, x, y):
    return F.cross_entropy(functional_call(model, p, (x,)), y)


def task(tasks, i):
    return TaskBatch(*(t[i:i + 1] for t in tasks))


def close(a, b, rtol=1e-9, atol=1e-11):
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=k)


# ---- independent per-task references ------------------------------------------------------------

def unrolled_maml(model, params, tasks, K, lr, lam=0.0):
    """Per task, plain torch.autograd with create_graph through K steps."""
    grads = []
    for i in range(tasks.num_tasks):
        theta = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        phi = dict(theta)
        for _ in range(K):
            loss = ce(model, phi, tasks.x_support[i], tasks.y_support[i])
            gs = torch.autograd.grad(loss, list(phi.values()), create_graph=True)
            phi = {k: p - lr * (g + lam * (p - theta[k])) for (k, p), g in zip(phi.items(), gs)}
        q = ce(model, phi, tasks.x_query[i], tasks.y_query[i])
        grads.append(dict(zip(theta, torch.autograd.grad(q, list(theta.values())))))
    return {k: torch.stack([g[k] for g in grads]).mean(0) for k in params}


def sgd_per_task(model, params, x, y, K, lr, lam=0.0):
    phi = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    for _ in range(K):
        loss = ce(model, phi, x, y)
        loss = loss + 0.5 * lam * sum(((phi[k] - params[k]) ** 2).sum() for k in phi)
        gs = torch.autograd.grad(loss, list(phi.values()))
        phi = {k: (p - lr * g).detach().requires_grad_(True) for (k, p), g in zip(phi.items(), gs)}
    return {k: v.detach() for k, v in phi.items()}


def authors_style_imaml(model, params, tasks, K, lr, lam, cg_steps, damping=0.0, cg_lam=None):
    """One task at a time: GD on G, query gradient, Python CG with double-backward HVPs."""
    cg_lam = lam if cg_lam is None else cg_lam
    names = list(params)
    total = 0
    for i in range(tasks.num_tasks):
        phi = sgd_per_task(model, params, tasks.x_support[i], tasks.y_support[i], K, lr, lam)
        p = {k: v.clone().requires_grad_(True) for k, v in phi.items()}
        gq = torch.autograd.grad(ce(model, p, tasks.x_query[i], tasks.y_query[i]),
                                 [p[k] for k in names])
        b = torch.cat([g.reshape(-1) for g in gq])

        def Av(v):
            g = torch.autograd.grad(ce(model, p, tasks.x_support[i], tasks.y_support[i]),
                                    [p[k] for k in names], create_graph=True)
            flat = torch.cat([t.reshape(-1) for t in g])
            hv = torch.autograd.grad(flat @ v, [p[k] for k in names])
            return (1 + damping) * v + torch.cat([t.reshape(-1) for t in hv]) / cg_lam

        x = torch.zeros_like(b)
        r = b.clone()
        d = r.clone()
        rs = r @ r
        for _ in range(cg_steps):
            Ad = Av(d)
            a = rs / (d @ Ad)
            x = x + a * d
            r = r - a * Ad
            rs_new = r @ r
            d = r + rs_new / rs * d
            rs = rs_new
        total = total + (x if cg_steps else b)
    mean = total / tasks.num_tasks
    out, off = {}, 0
    for k in names:
        n = params[k].numel()
        out[k] = mean[off:off + n].view(params[k].shape)
        off += n
    return out


# ---- correctness --------------------------------------------------------------------------------

@pytest.mark.parametrize("regularized", [False, True])
def test_maml_equals_unrolled_autograd(regularized):
    model, params, tasks = conv_setup()
    algo = make_algorithm("maml", inner_steps=3, inner_lr=0.1, regularized=regularized,
                          **({"lam": 0.7} if regularized else {}))
    g, m = algo.meta_gradient(model, params, tasks)
    close(g, unrolled_maml(model, params, tasks, 3, 0.1, 0.7 if regularized else 0.0))
    assert m["task_ok"].all() and (m["cg_status"] == NO_CG).all()


def test_fomaml_equals_definition():
    model, params, tasks = conv_setup()
    g, _ = make_algorithm("fomaml", inner_steps=3, inner_lr=0.1).meta_gradient(model, params,
                                                                                tasks)
    want = []
    for i in range(3):
        phi = sgd_per_task(model, params, tasks.x_support[i], tasks.y_support[i], 3, 0.1)
        p = {k: v.requires_grad_(True) for k, v in phi.items()}
        want.append(dict(zip(p, torch.autograd.grad(ce(model, p, tasks.x_query[i],
                                                       tasks.y_query[i]), list(p.values())))))
    close(g, {k: torch.stack([w[k] for w in want]).mean(0) for k in params})


def test_reptile_direction_equals_definition():
    model, params, tasks = conv_setup()
    g, m = make_algorithm("reptile", inner_steps=4, inner_lr=0.1).meta_gradient(model, params,
                                                                                 tasks)
    phis = [sgd_per_task(model, params, tasks.x_support[i], tasks.y_support[i], 4, 0.1)
            for i in range(3)]
    close(g, {k: params[k] - torch.stack([p[k] for p in phis]).mean(0) for k in params})
    assert "query_acc" in m and m["query_loss"].shape == (3,)


@pytest.mark.parametrize("lam,variant", [(19.0, dict()), (2.0, dict(cg_damping=1.0, cg_lam=12.0))])
def test_imaml_gd_equals_authors_style_loop(lam, variant):
    # lam large enough that (I + H/lam) is positive definite on this tiny random net
    model, params, tasks = conv_setup()
    algo = make_algorithm("imaml-gd", inner_steps=3, inner_lr=0.1, lam=lam, cg_steps=4,
                          **variant)
    g, m = algo.meta_gradient(model, params, tasks)
    assert (m["cg_status"] == 0).all() and (m["cg_iterations"] == 4).all()
    want = authors_style_imaml(model, params, tasks, 3, 0.1, lam, 4,
                               damping=variant.get("cg_damping", 0.0),
                               cg_lam=variant.get("cg_lam"))
    close(g, want, rtol=1e-8, atol=1e-10)


def test_inner_loss_metric_is_the_same_whichever_product_provides_it():
    """The double-backward and Gauss-Newton products' graphs supply L_train at phi (the GD loop
    then skips its final forward); forward-over-reverse has none and GD evaluates it."""
    model, params, tasks = conv_setup()
    got = {hvp: make_algorithm("imaml-gd", inner_steps=2, inner_lr=0.1, lam=19.0, cg_steps=2,
                               hvp=hvp).meta_gradient(model, params, tasks)[1]["inner_loss"]
           for hvp in ("forward_over_reverse", "exact", "ggn")}
    torch.testing.assert_close(got["exact"], got["forward_over_reverse"])
    torch.testing.assert_close(got["ggn"], got["forward_over_reverse"])


def test_imaml_negative_curvature_keeps_last_good_iterate():
    # With lam=2 the tiny net's (I + H/lam) is indefinite: CG stops per task at the breakdown
    # and keeps the iterate before it, which is the authors' CG run for that many steps.
    model, params, tasks = conv_setup()
    algo = make_algorithm("imaml-gd", inner_steps=3, inner_lr=0.1, lam=2.0, cg_steps=4)
    g, m = algo.meta_gradient(model, params, tasks)
    assert m["cg_negative_curvature"].any() and m["task_ok"].all()
    assert all(torch.isfinite(v).all() for v in g.values())
    per_task = [authors_style_imaml(model, params, task(tasks, i), 3, 0.1, 2.0,
                                    int(m["cg_iterations"][i])) for i in range(3)]
    close(g, {k: torch.stack([p[k] for p in per_task]).mean(0) for k in params}, rtol=1e-8,
          atol=1e-10)


def test_imaml_zero_cg_steps_equals_first_order():
    model, params, tasks = conv_setup()
    kw = dict(inner_steps=3, inner_lr=0.1, lam=2.0)
    g0, m0 = make_algorithm("imaml-gd", cg_steps=0, **kw).meta_gradient(model, params, tasks)
    gf, _ = make_algorithm("fomaml", regularized=True, **kw).meta_gradient(model, params, tasks)
    close(g0, gf, rtol=0, atol=0)
    assert (m0["cg_iterations"] == 0).all()


def test_imaml_closed_form_linear_regression():
    lt = syn.make_linear_tasks(4, d=10, n_train=20, n_test=30, seed=0)
    model = syn.linear_model(10)
    theta = torch.randn(1, 10, dtype=DT, generator=torch.Generator().manual_seed(5))
    exact = syn.exact_meta_gradient(lt.tasks, theta.expand(4, -1), 1.0).mean(0)
    lr = syn.safe_lr(lt.spectrum, 1.0)
    for hvp in ("exact", "lstsq"):
        algo = make_algorithm("imaml-gd", loss="half_mse", lam=1.0, inner_steps=300, inner_lr=lr,
                              cg_steps=5, hvp=hvp)
        g, _ = algo.meta_gradient(model, {"weight": theta}, lt.tasks)
        assert syn.relative_error(g["weight"].view(-1), exact) < 1e-8
    hf = make_algorithm("imaml-hf", loss="half_mse", lam=1.0, inner_steps=2, cg_steps=5)
    g, m = hf.meta_gradient(model, {"weight": theta}, lt.tasks)
    assert syn.relative_error(g["weight"].view(-1), exact) < 1e-8
    assert "hf_step_size" in m and "query_acc" not in m


@pytest.mark.parametrize("name", ALGORITHMS)
def test_batched_equals_per_task_and_vmap_backend(name):
    model, params, tasks = conv_setup()
    algo = make_algorithm(name, **options_for(name, inner_steps=2, inner_lr=0.1, cg_steps=2))
    g, m = algo.meta_gradient(model, params, tasks)
    singles = [algo.meta_gradient(model, params, task(tasks, i))[0] for i in range(3)]
    close(g, {k: torch.stack([s[k] for s in singles]).mean(0) for k in params}, rtol=1e-8,
          atol=1e-10)
    gv, _ = algo.with_options(backend="vmap").meta_gradient(model, params, tasks)
    close(g, gv, rtol=1e-8, atol=1e-10)
    for key in ("inner_loss", "query_loss", "query_acc", "cg_residual", "cg_iterations",
                "cg_status", "task_ok", "cg_negative_curvature"):
        assert m[key].shape == (3,), key
    assert int(m["num_ok"]) == 3


@needs_ext
@pytest.mark.parametrize("name", ["imaml-gd", "imaml-hf"])
def test_use_ext_equals_reference(name):
    model, params, tasks = conv_setup()
    kw = dict(inner_steps=2, inner_lr=0.1, cg_steps=3)
    g1, m1 = make_algorithm(name, use_ext=True, **kw).meta_gradient(model, params, tasks)
    g2, m2 = make_algorithm(name, use_ext=False, **kw).meta_gradient(model, params, tasks)
    close(g1, g2, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(m1["cg_status"], m2["cg_status"])


def test_adapt_and_evaluate():
    model, params, tasks = conv_setup()
    algo = make_algorithm("imaml-gd", inner_steps=2, inner_lr=0.1)
    phi = algo.adapt(model, params, tasks.x_support, tasks.y_support)
    assert phi["head.weight"].shape == (3, *params["head.weight"].shape)
    loss, acc = algo.evaluate(model, params, tasks)
    assert loss.shape == acc.shape == (3,)
    _, m = algo.meta_gradient(model, params, tasks)
    torch.testing.assert_close(loss, m["query_loss"])
    # Reptile adapts with plain SGD on L_train
    rep = make_algorithm("reptile", inner_steps=2, inner_lr=0.1)
    phi_r = rep.adapt(model, params, tasks.x_support[:1], tasks.y_support[:1])
    want = sgd_per_task(model, params, tasks.x_support[0], tasks.y_support[0], 2, 0.1)
    close({k: v[0] for k, v in phi_r.items()}, want)


@pytest.mark.parametrize("name", ALGORITHMS)
def test_same_results_under_no_grad(name):
    # the trainer may call these under torch.no_grad(): the inner gradients must still flow
    model, params, tasks = conv_setup(M=2)
    algo = make_algorithm(name, **options_for(name, inner_steps=2, inner_lr=0.1, cg_steps=2))
    g, _ = algo.meta_gradient(model, params, tasks)
    with torch.no_grad():
        g0, _ = algo.meta_gradient(model, params, tasks)
        loss0, _ = algo.evaluate(model, params, tasks)
    close(g, g0, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(loss0, algo.evaluate(model, params, tasks)[0])


# ---- failure policy -----------------------------------------------------------------------------

def poisoned(tasks, which):
    xs = tasks.x_support.clone()
    xs[which] = float("nan")
    return TaskBatch(xs, *tasks[1:])


@pytest.mark.parametrize("name", ALGORITHMS)
def test_nonfinite_task_is_skipped_and_counted(name):
    model, params, tasks = conv_setup()
    algo = make_algorithm(name, **options_for(name, inner_steps=2, inner_lr=0.1, cg_steps=2))
    g, m = algo.meta_gradient(model, params, poisoned(tasks, 1))
    assert m["task_ok"].tolist() == [True, False, True] and int(m["num_ok"]) == 2
    assert all(torch.isfinite(v).all() for v in g.values())
    g02 = [algo.meta_gradient(model, params, task(tasks, i))[0] for i in (0, 2)]
    close(g, {k: (g02[0][k] + g02[1][k]) / 2 for k in params}, rtol=1e-8, atol=1e-10)


def test_all_tasks_nonfinite_gives_zero_and_raise_policy():
    model, params, tasks = conv_setup()
    bad = poisoned(tasks, slice(None))
    g, m = make_algorithm("imaml-gd", inner_steps=1).meta_gradient(model, params, bad)
    assert int(m["num_ok"]) == 0 and all((v == 0).all() for v in g.values())
    with pytest.raises(FloatingPointError, match=r"tasks \[1\]"):
        make_algorithm("maml", inner_steps=1, on_nonfinite="raise").meta_gradient(
            model, params, poisoned(tasks, 1))


def test_indefinite_curvature_flagged_never_nan():
    lt = syn.make_linear_tasks(3, d=10, seed=0)
    model = syn.linear_model(10)
    concave = lambda out, y: -0.5 * out.squeeze(-1) ** 2  # noqa: E731
    algo = make_algorithm("imaml-gd", loss=concave, lam=0.01, inner_steps=1, inner_lr=1e-3)
    g, m = algo.meta_gradient(model, {"weight": torch.randn(1, 10, dtype=DT)}, lt.tasks)
    assert torch.isfinite(g["weight"]).all()
    assert m["cg_negative_curvature"].all() and m["task_ok"].all()


# ---- argument errors ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["imaml-gd", "imaml-hf"])
def test_compile_hvp_gives_the_same_meta_gradient(name, monkeypatch):
    # compile_hvp=True: the CG products are torch.compile's forward-over-reverse HVP; float64
    # meta-gradient as with the default product. One conv block, so it compiles in seconds.
    from imaml_ext.hvp import TaskLoss
    used = []
    real = TaskLoss.compiled_hvp
    monkeypatch.setattr(TaskLoss, "compiled_hvp", lambda self: used.append(1) or real(self))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1),
                          nn.BatchNorm2d(3, track_running_stats=False), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Flatten(), nn.Linear(3 * 4 * 4, 3)).to(DT)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    tasks = TaskBatch(torch.randn(2, 6, 1, 8, 8, dtype=DT), torch.randint(0, 3, (2, 6)),
                      torch.randn(2, 6, 1, 8, 8, dtype=DT), torch.randint(0, 3, (2, 6)))
    kw = dict(inner_steps=2, inner_lr=0.1, cg_steps=3)
    g1, m1 = make_algorithm(name, compile_hvp=True, **kw).meta_gradient(model, params, tasks)
    assert len(used) >= 3  # one per CG product
    n = len(used)
    g2, m2 = make_algorithm(name, **kw).meta_gradient(model, params, tasks)
    assert len(used) == n
    close(g1, g2, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(m1["cg_iterations"], m2["cg_iterations"])


def test_argument_errors():
    model, params, tasks = conv_setup()
    with pytest.raises(ValueError, match="name must be one of"):
        make_algorithm("anil")
    for lam in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="lam must be"):
            make_algorithm("imaml-gd", lam=lam)
    with pytest.raises(ValueError, match="cg_steps"):
        make_algorithm("imaml-gd", cg_steps=-1)
    with pytest.raises(ValueError, match="hvp"):
        make_algorithm("imaml-gd", hvp="fisher")
    with pytest.raises(ValueError, match="on_nonfinite"):
        make_algorithm("maml", on_nonfinite="ignore")
    for kw in (dict(name="maml"), dict(hvp="ggn"), dict(adapt="head")):
        with pytest.raises(ValueError, match="compile_hvp=True"):
            make_algorithm(**{"name": "imaml-gd", **kw}, compile_hvp=True)
    with pytest.raises(ValueError, match="compile_hvp must be a bool"):
        make_algorithm("imaml-gd", compile_hvp="yes")
    for kw in (dict(name="imaml-hf"), dict(name="maml"), dict(name="reptile", regularized=False)):
        with pytest.raises(ValueError, match="proximal='authors' .* needs a regularized GD"):
            make_algorithm(**kw, proximal="authors")
    for kw in (dict(name="imaml-gd"), dict(name="fomaml", regularized=True)):
        assert make_algorithm(**kw, proximal="authors").config.proximal == "authors"
    algo = make_algorithm("imaml-gd", inner_steps=1)
    missing = {k: v for k, v in params.items() if k != "head.bias"}
    with pytest.raises(ValueError, match=r"params does not match.*missing \['head.bias'\]"):
        algo.meta_gradient(model, missing, tasks)
    wrong = dict(params, **{"head.bias": torch.zeros(7, dtype=DT)})
    with pytest.raises(ValueError, match=r"params\['head.bias'\] has shape \(7,\)"):
        algo.meta_gradient(model, wrong, tasks)
    uneven = TaskBatch([tasks.x_support[0], tasks.x_support[1, :4]], *tasks[1:])
    with pytest.raises(ValueError, match="tasks.x_support: tasks of one batch must have equal"):
        algo.meta_gradient(model, params, uneven)
    with pytest.raises(ValueError, match="tasks.y_query must be int64"):
        algo.meta_gradient(model, params, TaskBatch(*tasks[:3], tasks.y_query.float()))
    with pytest.raises(ValueError, match="tasks.y_support must be"):
        algo.meta_gradient(model, params, TaskBatch(tasks.x_support, tasks.y_support[:2],
                                                    *tasks[2:]))
    with pytest.raises(ValueError, match="tasks.x_support is torch.float32"):
        algo.meta_gradient(model, params, TaskBatch(tasks.x_support.float(), *tasks[1:]))
    rgb = tasks.x_support.expand(-1, -1, 3, -1, -1)
    for call in (lambda t: algo.meta_gradient(model, params, t),
                 lambda t: algo.evaluate(model, params, t),
                 lambda t: algo.adapt(model, params, t.x_support, t.y_support)):
        with pytest.raises(ValueError, match=r"tasks.x_support has 3 channels per image .* the "
                                             r"model's first convolution takes 1"):
            call(TaskBatch(rgb, *tasks[1:]))
        with pytest.raises(ValueError, match=r"tasks.y_support holds labels in \[1, 3\]; the "
                                             r"model's head has 3 outputs, so labels must be in "
                                             r"\[0, 2\]"):
            call(TaskBatch(tasks.x_support, torch.ones_like(tasks.y_support).index_fill(
                1, torch.tensor([0]), 3), *tasks[2:]))
    with pytest.raises(ValueError, match=r"tasks.y_query holds labels in \[-1, 2\]"):
        algo.meta_gradient(model, params, TaskBatch(*tasks[:3], torch.full_like(
            tasks.y_query, 2).index_fill(1, torch.tensor([0]), -1)))


def test_settings_are_checked_when_the_algorithm_is_made():
    # each was accepted and failed later, under another name, or silently (review, 2026-11-28):
    # inner_lr=inf made every task non-finite and the meta-gradient zero
    for kw, msg in ((dict(inner_lr=float("inf")), "inner_lr must be a finite number > 0"),
                    (dict(inner_lr=True), "inner_lr must be"),
                    (dict(cg_damping=float("inf")), "cg_damping must be a finite number >= 0"),
                    (dict(cg_damping=True), "cg_damping must be"),
                    (dict(cg_lam=float("inf")), "cg_lam must be None or a finite number > 0"),
                    (dict(cg_rtol=-1.0), "cg_rtol must be a finite number >= 0"),
                    (dict(cg_rtol="x"), "cg_rtol must be"),
                    (dict(backend="bogus"), r"backend must be one of \('auto', 'folded', 'vmap'\)"),
                    (dict(use_ext="yes"), "use_ext must be None, True or False"),
                    (dict(hvp="lstsq"), "hvp='lstsq' is the Hessian of loss 'half_mse'")):
        with pytest.raises(ValueError, match=msg):
            make_algorithm("imaml-gd", **kw)
    assert make_algorithm("imaml-gd", hvp="lstsq", loss="half_mse").config.hvp == "lstsq"


def test_a_hand_built_config_and_another_name_get_that_algorithms_defaults():
    from imaml_ext.algorithms import IMAMLHF, MAML, AlgorithmConfig
    # the dataclass's own defaults (regularized=True, inner_steps=16) used to win
    assert MAML(AlgorithmConfig("maml")).config == make_algorithm("maml").config
    assert IMAMLHF(AlgorithmConfig("imaml-hf")).config.inner_steps == 4
    moved = make_algorithm("imaml-gd").with_options(name="maml")
    assert moved.config == make_algorithm("maml").config
    assert make_algorithm("imaml-gd", inner_steps=3).with_options(lam=1.0).config.inner_steps == 3


def test_zero_inner_steps_with_forward_over_reverse_products():
    # phi is then theta broadcast to the tasks (stride 0), from which torch.func.jvp could not
    # make a forward-mode input: RuntimeError "more than one element of the written-to tensor"
    lt = syn.make_linear_tasks(2, d=5, n_train=10, n_test=10, seed=0)
    model = syn.linear_model(5)
    params = {"weight": torch.zeros(1, 5, dtype=torch.float64)}
    want = make_algorithm("imaml-gd", loss="half_mse", inner_steps=0, hvp="exact")
    got = make_algorithm("imaml-gd", loss="half_mse", inner_steps=0, hvp="forward_over_reverse")
    torch.testing.assert_close(got.meta_gradient(model, params, lt.tasks)[0]["weight"],
                               want.meta_gradient(model, params, lt.tasks)[0]["weight"])


def test_regression_targets_must_have_the_params_dtype():
    # float64 targets with float32 params made the losses float64, and imaml-hf's Newton step
    # then turned phi float64: "expected scalar type Float but found Double"
    lt = syn.make_linear_tasks(2, d=5, n_train=10, n_test=10, seed=0)
    t = lt.tasks
    t32 = TaskBatch(t.x_support.float(), t.y_support.double(), t.x_query.float(),
                    t.y_query.float())
    model = syn.linear_model(5, dtype=torch.float32)
    params = {"weight": torch.zeros(1, 5)}
    for name in ("imaml-gd", "imaml-hf"):
        with pytest.raises(ValueError, match=r"tasks.y_support must be float targets of the "
                                             r"params' dtype torch.float32 for half_mse, got "
                                             r"torch.float64"):
            make_algorithm(name, loss="half_mse").meta_gradient(model, params, t32)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_batch_norm_with_running_statistics_is_refused(mode):
    # eval mode silently used the never-updated running buffers for every task instead of its
    # own batch statistics; train mode failed inside vmap
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                        nn.Linear(144, 3))
    getattr(net, mode)()
    params = {k: v.detach() for k, v in net.named_parameters()}
    tasks = TaskBatch(torch.randn(2, 6, 1, 8, 8), torch.randint(0, 3, (2, 6)),
                      torch.randn(2, 9, 1, 8, 8), torch.randint(0, 3, (2, 9)))
    with pytest.raises(ValueError, match=r"model.1: BatchNorm2d must have "
                                         r"track_running_stats=False"):
        make_algorithm("fomaml").meta_gradient(net, params, tasks)


@pytest.mark.parametrize("name", ["maml", "fomaml", "reptile", "imaml-gd", "imaml-hf"])
def test_options_the_algorithm_would_ignore_are_refused(name):
    # as the CLI does: a baseline given the implicit solve's options (imaml-gd the Newton-CG
    # solver's, imaml-hf a GD step size) would run without them, silently
    ignored = {"imaml-gd": {"hf_cg_steps": 3}, "imaml-hf": {"inner_lr": 0.05}}.get(
        name, {"cg_steps": 2, "hvp": "ggn", "cg_damping": 1.0, "cg_lam": 3.0, "cg_rtol": 1e-6})
    for k, v in ignored.items():
        with pytest.raises(ValueError, match=f"{name} does not use {k}={v!r}"):
            make_algorithm(name, **{k: v})
    make_algorithm(name, **options_for(name, **ignored))  # the helper keeps what applies
    # lam is the proximal term's: a baseline takes it only with regularized=True
    assert set(options_for(name, lam=1.0, **ignored)) == \
        ({"lam"} if name.startswith("imaml") else set())
    if not name.startswith("imaml"):
        with pytest.raises(ValueError, match=f"{name} does not use lam=1.0 .lam is the strength "
                                             f"of the proximal term, which only "
                                             f"regularized=True adds"):
            make_algorithm(name, lam=1.0)
        kw = options_for(name, lam=1.0, regularized=True, **ignored)
        assert set(kw) == {"lam", "regularized"}
        assert make_algorithm(name, **kw).config.lam == 1.0
    if name != "imaml-hf":
        assert set(options_for("imaml-hf", lam=1.0, **ignored)) == {"lam", *ignored}
    with pytest.raises(ValueError, match="name must be one of"):
        options_for("anil", lam=1.0)


def test_a_baseline_config_with_implicit_fields_still_builds():
    # a checkpoint's config written before such options were refused
    import dataclasses

    from imaml_ext.config import TrainConfig, resolve
    cfg = dataclasses.replace(resolve(TrainConfig(algo="maml")), cg_steps=9, hvp="ggn")
    assert "cg_steps" not in cfg.algorithm_kwargs() and "hvp" not in cfg.algorithm_kwargs()
    make_algorithm(cfg.algo, **cfg.algorithm_kwargs())


def test_a_config_built_by_hand_is_checked_as_make_algorithm_checks_it():
    """The classes take an AlgorithmConfig; one made by hand goes through make_algorithm's
    rules (refusals and normalisation), so that door lets nothing through that make_algorithm
    would refuse or ignore."""
    from imaml_ext.algorithms import IMAMLGD, MAML, AlgorithmConfig
    algo = IMAMLGD(AlgorithmConfig("imaml-gd", cuda_graph=True, lam=3))
    assert algo.config.cuda_graph == "solve" and algo.config.lam == 3.0
    assert isinstance(algo.config.lam, float)
    with pytest.raises(ValueError, match=r"maml does not use cg_steps=10"):
        MAML(AlgorithmConfig("maml", cg_steps=10))
    with pytest.raises(ValueError, match=r"MAML cannot run config.name 'imaml-gd' \(that is "
                                         r"IMAMLGD\)"):
        MAML(AlgorithmConfig("imaml-gd"))
    with pytest.raises(ValueError, match="lam must be a finite number > 0, got -1.0"):
        IMAMLGD(AlgorithmConfig("imaml-gd", lam=-1.0))
    with pytest.raises(ValueError, match="config must be an AlgorithmConfig, got dict"):
        IMAMLGD({"name": "imaml-gd"})
    # make_algorithm's own instances are built once, unchanged
    a = make_algorithm("imaml-gd", lam=2.0)
    assert IMAMLGD(a.config).config == a.config


def test_input_errors_found_by_the_review_name_the_argument():
    # each ran silently or failed deep inside a product (review, 2026-11-29)
    model, params, tasks = conv_setup()
    algo = make_algorithm("imaml-gd", inner_steps=1, cg_steps=1)
    empty = TaskBatch(tasks.x_support, tasks.y_support, tasks.x_query[:, :0],
                      tasks.y_query[:, :0])
    with pytest.raises(ValueError, match=r"tasks.x_query holds no samples \(shape \(3, 0, 1, 16, "
                                         r"16\)\)"):
        algo.meta_gradient(model, params, empty)  # was a NaN query loss and a zero gradient
    mlp = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    mp = {k: v.detach() for k, v in mlp.named_parameters()}
    wide = TaskBatch(torch.randn(2, 3, 6, dtype=DT), torch.randint(0, 3, (2, 3)),
                     torch.randn(2, 3, 6, dtype=DT), torch.randint(0, 3, (2, 3)))
    with pytest.raises(ValueError, match=r"tasks.x_support has 6 features per sample \(shape "
                                         r"\(2, 3, 6\)\), the model's first layer takes 5"):
        algo.meta_gradient(mlp, mp, wide)
    # models the check must not judge (a review of the first version, which refused them):
    # images flattened by the model (MAML's Omniglot MLP), flat images unflattened by the model,
    # a head registered before the body it follows
    fomaml = make_algorithm("fomaml", inner_steps=1)
    imgs = torch.randn(2, 3, 1, 4, 4, dtype=DT)
    y3 = torch.randint(0, 3, (2, 3))

    class HeadFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(8, 3)
            self.body = nn.Linear(16, 8)

        def forward(self, x):
            return self.head(torch.relu(self.body(x)))
    for net, x in ((nn.Sequential(nn.Flatten(), nn.Linear(16, 3)), imgs),
                   (nn.Sequential(nn.Unflatten(-1, (1, 4, 4)), nn.Conv2d(1, 2, 3), nn.Flatten(),
                                  nn.Linear(8, 3)), imgs.flatten(2)),
                   (HeadFirst(), imgs.flatten(2))):
        net = net.to(DT)
        p = {k: v.detach() for k, v in net.named_parameters()}
        _, m = fomaml.meta_gradient(net, p, TaskBatch(x, y3, x, y3))
        assert bool(m["task_ok"].all()), type(net).__name__


def test_regression_outputs_and_targets_of_other_shapes_are_refused():
    # (M, N, 3) outputs minus (M, N) targets broadcast: with M = N = 3 task i's loss used the
    # targets of the other tasks, silently
    mlp = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    params = {k: v.detach() for k, v in mlp.named_parameters()}
    x = torch.randn(3, 3, 4, dtype=DT)
    tasks = TaskBatch(x, torch.randn(3, 3, dtype=DT), x, torch.randn(3, 3, dtype=DT))
    for name in ("fomaml", "imaml-gd"):
        with pytest.raises(ValueError, match=r"loss 'mse': the model's outputs \(3, 3, 3\) do not "
                                             r"match the targets \(3, 3\)"):
            make_algorithm(name, loss="mse", inner_steps=1).meta_gradient(mlp, params, tasks)
    # a single output against targets without its axis, and matching shapes, still work
    one = nn.Sequential(nn.Linear(4, 1)).to(DT)
    p1 = {k: v.detach() for k, v in one.named_parameters()}
    g, m = make_algorithm("imaml-gd", loss="mse", inner_steps=1).meta_gradient(one, p1, tasks)
    assert bool(m["task_ok"].all())
    t3 = TaskBatch(x, torch.randn(3, 3, 3, dtype=DT), x, torch.randn(3, 3, 3, dtype=DT))
    g, m = make_algorithm("imaml-gd", loss="mse", inner_steps=1).meta_gradient(mlp, params, t3)
    assert bool(m["task_ok"].all())


@pytest.mark.parametrize("name", ["fomaml", "imaml-gd"])
def test_dropout_in_training_mode_is_refused(name):
    # each forward drew a new mask: two identical calls gave different meta-gradients, and the
    # Hessian inside CG was a different network at every product
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Dropout(0.3), nn.Linear(5, 3)).to(DT)
    params = {k: v.detach() for k, v in net.named_parameters()}
    tasks = TaskBatch(torch.randn(2, 3, 4, dtype=DT), torch.randint(0, 3, (2, 3)),
                      torch.randn(2, 3, 4, dtype=DT), torch.randint(0, 3, (2, 3)))
    algo = make_algorithm(name, inner_steps=1)
    with pytest.raises(ValueError, match=r"model.2 is Dropout\(p=0.3\) in training mode"):
        algo.meta_gradient(net, params, tasks)
    net.eval()
    a = algo.meta_gradient(net, params, tasks)[0]
    b = algo.meta_gradient(net, params, tasks)[0]
    close(a, b, rtol=0, atol=0)
    net.train()  # the same model again, after the cached TaskLoss was made
    with pytest.raises(ValueError, match="in training mode"):
        algo.meta_gradient(net, params, tasks)


@pytest.mark.parametrize("name", ["imaml-gd", "imaml-hf", "maml", "fomaml", "reptile"])
def test_a_parameter_the_forward_never_uses_is_named(name):
    """autograd's own error ("appears to not have been used in the graph", or a freed graph on
    the retry) says nothing of which parameter: the ValueError names it."""
    class Partial(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)
            self.unused = nn.Parameter(torch.randn(2))

        def forward(self, x):
            return self.lin(x)

    torch.manual_seed(0)
    model = Partial().double()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (2, 4))
    with pytest.raises(ValueError, match=r"params: the loss does not depend on \['unused'\]"):
        make_algorithm(name, inner_steps=2).meta_gradient(model, params, TaskBatch(x, y, x, y))


def test_regularized_must_be_a_bool_and_inner_lr_lam_below_two():
    """regularized="no" was stored as True; a GD inner loop with inner_lr * lam >= 2 diverged
    (losses 1e25, every task reported ok) where the proximal term alone scales phi - theta by
    1 - inner_lr lam each step."""
    for bad in ("no", 1, 0.0):
        with pytest.raises(ValueError, match=f"regularized must be None, True or False, got "
                                             f"{bad!r}"):
            make_algorithm("maml", regularized=bad)
    for name, kw in (("imaml-gd", {"lam": 100.0}), ("imaml-gd", {"lam": 20.0}),
                     ("imaml-gd", {"lam": 2.0, "inner_lr": 3.0, "proximal": "authors"}),
                     ("reptile", {"lam": 30.0, "regularized": True})):
        with pytest.raises(ValueError, match=r"inner_lr \* lam must be < 2"):
            make_algorithm(name, **kw)
    make_algorithm("imaml-gd", lam=19.0)  # 1.9: contracts
    make_algorithm("imaml-hf", lam=100.0)  # Newton-CG with a line search: no GD step
    make_algorithm("imaml-gd", lam=100.0, adapt="head")  # safeguarded steps
    make_algorithm("imaml-gd", lam=100.0, inner_steps=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_imaml_names_a_half_precision_params_dtype_up_front(dtype):
    """The inner loop ran, then an op refused "phi['0.weight']" or "cg: b leaf 0"."""
    model = nn.Linear(3, 2).to(dtype)
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(2, 4, 3, dtype=dtype)
    y = torch.randint(0, 2, (2, 4))
    for name in ("imaml-gd", "imaml-hf"):
        with pytest.raises(ValueError, match=f"params: {name} needs float32 or float64 "
                                             f"parameters .* got {dtype}"):
            make_algorithm(name, inner_steps=1).meta_gradient(model, params,
                                                               TaskBatch(x, y, x, y))


def test_task_and_loss_shapes_the_review_found_are_named():
    """Each raised a raw PyTorch error from deep inside (a bmm's sizes, a reshape of a scalar,
    a broadcast in the accuracy)."""
    model = nn.Sequential(nn.Linear(1, 3)).to(DT)
    params = {k: v.detach() for k, v in model.named_parameters()}
    y = torch.randint(0, 3, (2, 4))
    x2 = torch.randn(2, 4, dtype=DT)
    algo = make_algorithm("maml", inner_steps=1)
    with pytest.raises(ValueError, match=r"tasks.x_support must be \(M, N, features\) .* got "
                                         r"\(2, 4\) .*x.unsqueeze\(-1\)"):
        algo.meta_gradient(model, params, TaskBatch(x2, y, x2, y))
    x = x2.unsqueeze(-1)
    with pytest.raises(ValueError, match=r"tasks.y_support must be \(M, N\) class labels for "
                                         r"cross_entropy, got \(2, 4, 1\)"):
        algo.meta_gradient(model, params, TaskBatch(x, y.unsqueeze(-1), x, y.unsqueeze(-1)))
    scalar = make_algorithm("maml", inner_steps=1,
                            loss=lambda out, t: F.cross_entropy(out.reshape(-1, 3), t.reshape(-1)))
    with pytest.raises(ValueError, match=r"loss: a callable loss\(outputs, targets\) must return "
                                         r"per-sample losses of shape \(2, 4\) .* got \(\)"):
        scalar.meta_gradient(model, params, TaskBatch(x, y, x, y))


def test_a_lam_beyond_the_params_dtype_is_named():
    """imaml-hf raised "value cannot be converted to type float without overflow" from inside
    its Newton step; imaml-gd flagged every task non-finite."""
    model = nn.Linear(3, 2)
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(2, 4, 3)
    y = torch.randint(0, 2, (2, 4))
    for name in ("imaml-gd", "imaml-hf"):
        algo = make_algorithm(name, **options_for(name, lam=1e300, inner_lr=1e-301),
                              inner_steps=1)
        with pytest.raises(ValueError, match=r"lam=1e\+300 is beyond torch.float32's range"):
            algo.meta_gradient(model, params, TaskBatch(x, y, x, y))


def test_numpy_integers_are_taken_for_counts():
    """np.int64(3) for inner_steps was refused while np.float64 for lam was taken (a sweep over
    np.arange values hits it)."""
    import numpy as np
    algo = make_algorithm("imaml-gd", inner_steps=np.int64(3), cg_steps=np.int32(4))
    assert (algo.config.inner_steps, algo.config.cg_steps) == (3, 4)
    assert type(algo.config.inner_steps) is int
    res = imaml_ext.cg(torch.eye(3, dtype=DT), torch.ones(3, dtype=DT), max_iter=np.int64(5))
    assert bool(res.converged)
    with pytest.raises(ValueError, match="inner_steps must be an int >= 0, got np.True_|"
                                         "inner_steps must be an int >= 0, got True"):
        make_algorithm("imaml-gd", inner_steps=np.bool_(True))
