"""CapturedMetaGradient and make_algorithm(cuda_graph=True): iMAML's meta-gradient solve (the
HVP's set-up at phi and its CG) recorded once as a CUDA graph and replayed; CapturedFunction and
cuda_graph="step": the whole per-task meta-gradient likewise; implicit_root(cuda_graph=True): the
backward pass of a root.

On the CPU the capture itself cannot run; there an eager stand-in for `_capture_graph`
(tree_stand_in: it reruns the recorded function and copies the results into the first run's
output tensors, as a replay rewrites a graph's static outputs) checks everything around it:
that each call's inputs reach the captured work, that results come back as fresh tensors, that
the algorithm reuses one capture per shape, captures anew when shapes change, and runs eagerly
when a capture fails (implicit_root, which refuses cuda_graph=True off CUDA at the call, is
told the CPU is capturable here). The CUDA tests replay a real graph."""
from __future__ import annotations

import traceback
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from imaml_ext import hvp as hvp_mod
from imaml_ext import implicit
from imaml_ext.algorithms import make_algorithm
from imaml_ext.hvp import ParamSpec, TaskLoss, make_hvp
from imaml_ext.implicit import CapturedFunction, CapturedMetaGradient, implicit_meta_gradient
from imaml_ext.inner import batched_theta
from imaml_ext.models import ConvNet
from imaml_ext.types import TaskBatch

DT = torch.float64
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(autouse=True)
def _cpu_capturable(monkeypatch):
    monkeypatch.setattr(implicit, "_CAPTURE_DEVICES", ("cuda", "cpu"))


def setup(M=3, ways=3, shots=2, seed=0, device="cpu", dtype=DT):
    torch.manual_seed(seed)
    model = ConvNet(1, ways, hidden=4, image_size=16).to(device=device, dtype=dtype)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    return model, params, tasks_for(M, ways, shots, seed, device, dtype)


def tasks_for(M, ways, shots, seed, device="cpu", dtype=DT):
    g = torch.Generator().manual_seed(100 + seed)
    n = ways * shots
    return TaskBatch(torch.randn(M, n, 1, 16, 16, generator=g, dtype=dtype),
                     torch.randint(0, ways, (M, n), generator=g),
                     torch.randn(M, n, 1, 16, 16, generator=g, dtype=dtype),
                     torch.randint(0, ways, (M, n), generator=g)).to(device)


def point(params, tasks, seed):
    """phi (params moved per task) and a right-hand side b, both depending on seed."""
    g = torch.Generator().manual_seed(seed)
    phi = {k: (v + 0.1 * torch.randn(v.shape, generator=g, dtype=v.dtype).to(v.device))
           for k, v in batched_theta(params, tasks.num_tasks).items()}
    P = ParamSpec.of(phi).numel
    b = torch.randn(tasks.num_tasks, P, generator=g, dtype=next(iter(params.values())).dtype)
    return phi, b.to(next(iter(params.values())).device)


def tree_stand_in(calls: list):
    """_capture_graph without CUDA for any output structure: replay reruns `run` and copies
    every output tensor into the first run's."""
    def capture(run, device, warmup):
        calls.append(device)
        out = run()

        def replay():
            for a, b in zip(pytree.tree_leaves(out), pytree.tree_leaves(run())):
                if isinstance(a, torch.Tensor):
                    a.copy_(b)
        return replay, out
    return capture


def eager_solve(tl, phi, tasks, b, **kw):
    H = make_hvp(tl, phi, tasks.x_support, tasks.y_support, "exact")
    out = implicit_meta_gradient(tl, phi, tasks.x_support, tasks.y_support, b, hvp=H, **kw)
    return out, H.value_and_grad()[0]


KW = dict(lam=2.0, cg_steps=4, damping=1.0, cg_lam=12.0)


def test_each_call_solves_for_its_own_inputs(monkeypatch):
    calls = []
    monkeypatch.setattr(implicit, "_capture_graph", tree_stand_in(calls))
    model, params, tasks = setup()
    tl = TaskLoss(model)
    phi1, b1 = point(params, tasks, 1)
    solver = CapturedMetaGradient(tl, phi1, tasks.x_support, tasks.y_support, b1, **KW)
    tasks2 = tasks_for(3, 3, 2, seed=7)
    phi2, b2 = point(params, tasks2, 2)
    got, losses = solver(phi2, tasks2.x_support, tasks2.y_support, b2)
    want, want_losses = eager_solve(tl, phi2, tasks2, b2, **KW)
    first, _ = eager_solve(tl, phi1, tasks, b1, **KW)
    assert not torch.allclose(want.flat, first.flat, rtol=1e-3)  # the inputs matter
    torch.testing.assert_close(got.flat, want.flat, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got.grad["head.weight"], want.grad["head.weight"])
    torch.testing.assert_close(losses, want_losses)
    assert torch.equal(got.cg.iterations, want.cg.iterations)
    assert torch.equal(got.cg.status, want.cg.status)
    # Fresh tensors: the next replay does not rewrite what an earlier call returned.
    kept = got.flat.clone()
    again, _ = solver(phi1, tasks.x_support, tasks.y_support, b1)
    torch.testing.assert_close(again.flat, first.flat, rtol=1e-12, atol=1e-14)
    assert torch.equal(got.flat, kept)
    assert len(calls) == 1


def test_argument_errors(monkeypatch):
    model, params, tasks = setup()
    tl = TaskLoss(model)
    phi, b = point(params, tasks, 1)
    args = (tl, phi, tasks.x_support, tasks.y_support, b)
    with pytest.raises(ValueError, match="CUDA graph capture needs CUDA tensors, got cpu"):
        CapturedMetaGradient(*args, **KW)
    with pytest.raises(ValueError, match="cg_steps must be >= 1"):
        CapturedMetaGradient(*args, lam=2.0, cg_steps=0)
    with pytest.raises(ValueError, match="hvp must be one of"):
        CapturedMetaGradient(*args, lam=2.0, hvp=make_hvp(tl, phi, tasks.x_support,
                                                          tasks.y_support))
    with pytest.raises(ValueError, match="lam must be"):
        CapturedMetaGradient(*args, lam=0.0)
    monkeypatch.setattr(implicit, "_capture_graph", tree_stand_in([]))
    solver = CapturedMetaGradient(*args, **KW)
    small = tasks_for(2, 3, 2, seed=3)
    phi2, b2 = point(params, small, 2)
    assert not solver.matches(tl, phi2, small.x_support, small.y_support, b2)
    with pytest.raises(ValueError, match="captured shapes"):
        solver(phi2, small.x_support, small.y_support, b2)
    assert not solver.matches(TaskLoss(model), *args[1:])
    assert solver.matches(*args)


@pytest.mark.parametrize("mode", [True, "step"])
@pytest.mark.parametrize("name", ["imaml-gd", "imaml-hf"])
def test_algorithm_reuses_one_capture_per_shape(name, mode, monkeypatch):
    # True: the solve captured (CapturedMetaGradient); "step": the whole per-task meta-gradient
    # (CapturedFunction of _per_task)
    calls = []
    monkeypatch.setattr(implicit, "_capture_graph", tree_stand_in(calls))
    model, params, tasks = setup()
    kw = dict(inner_steps=2, inner_lr=0.1, cg_steps=3)
    graphed, plain = make_algorithm(name, cuda_graph=mode, **kw), make_algorithm(name, **kw)
    params2 = {k: v + 0.01 for k, v in params.items()}
    for p, t in ((params, tasks), (params2, tasks_for(3, 3, 2, seed=5)),
                 (params, tasks_for(2, 3, 2, seed=6))):
        g1, m1 = graphed.meta_gradient(model, p, t)
        g2, m2 = plain.meta_gradient(model, p, t)
        for k in g2:
            torch.testing.assert_close(g1[k], g2[k], rtol=1e-10, atol=1e-12)
        assert set(m1) == set(m2)
        for k in m2:
            torch.testing.assert_close(m1[k], m2[k], rtol=1e-10, atol=1e-12)
    assert len(calls) == 2  # M = 3 twice (one capture; new params and tasks), then M = 2


def test_algorithm_solves_eagerly_after_a_failed_capture(monkeypatch):
    calls = []

    def failing(run, device, warmup):
        calls.append(device)
        raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(implicit, "_capture_graph", failing)
    model, params, tasks = setup()
    kw = dict(inner_steps=2, inner_lr=0.1, cg_steps=3)
    graphed, plain = make_algorithm("imaml-gd", cuda_graph=True, **kw), \
        make_algorithm("imaml-gd", **kw)
    with pytest.warns(RuntimeWarning, match="capturing the meta-gradient solve failed .*"
                                            "not permitted.*runs eagerly"):
        g1, _ = graphed.meta_gradient(model, params, tasks)
    g2, _ = plain.meta_gradient(model, params, tasks)
    for k in g2:
        torch.testing.assert_close(g1[k], g2[k], rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        graphed.meta_gradient(model, params, tasks)
    assert len(calls) == 1


def test_algorithm_errors():
    model, params, tasks = setup()
    with pytest.raises(ValueError, match="CUDA graph capture needs CUDA tensors"):
        make_algorithm("imaml-gd", cuda_graph=True, inner_steps=1).meta_gradient(
            model, params, tasks)
    for kw in (dict(name="maml"), dict(adapt="head"), dict(hvp="lstsq", loss="half_mse"),
               dict(compile_hvp=True)):
        for mode in (True, "step"):
            with pytest.raises(ValueError, match="cuda_graph='(solve|step)' captures"):
                make_algorithm(**{"name": "imaml-gd", **kw}, cuda_graph=mode)
    for bad in (1, "all", None):
        with pytest.raises(ValueError, match="cuda_graph must be False, True, 'solve' or 'step'"):
            make_algorithm("imaml-gd", cuda_graph=bad)
    assert make_algorithm("imaml-gd", cuda_graph=True).config.cuda_graph == "solve"
    with pytest.raises(ValueError, match="CUDA graph capture needs CUDA tensors"):
        make_algorithm("imaml-gd", cuda_graph="step", inner_steps=1).meta_gradient(
            model, params, tasks)
    # cg_steps=0 has no solve to capture: the option is then a no-op.
    g, m = make_algorithm("imaml-gd", cuda_graph=True, cg_steps=0, inner_steps=1) \
        .meta_gradient(model, params, tasks)
    assert (m["cg_iterations"] == 0).all()


# ---- cuda_graph="step": the whole per-task meta-gradient as one CapturedFunction ----------------

def test_captured_function_copies_its_inputs_and_returns_fresh_outputs(monkeypatch):
    calls = []
    monkeypatch.setattr(implicit, "_capture_graph", tree_stand_in(calls))
    fn = lambda d, x, k: {"s": d["a"] * x + k, "n": (x.sum(), None)}  # noqa: E731
    a, x = torch.randn(3), torch.randn(3)
    step = CapturedFunction(fn, ({"a": a}, x, 2.0))
    a2, x2 = torch.randn(3), torch.randn(3)
    out = step(({"a": a2}, x2, 2.0))
    torch.testing.assert_close(out["s"], a2 * x2 + 2.0)
    torch.testing.assert_close(out["n"][0], x2.sum())
    assert out["n"][1] is None
    kept = out["s"].clone()
    step(({"a": a}, x, 2.0))
    assert torch.equal(out["s"], kept)  # fresh tensors: a later replay does not rewrite them
    assert len(calls) == 1
    assert not step.matches(({"a": a}, x, 3.0))  # a constant differs
    assert not step.matches(({"a": a}, x, 2))  # or its type
    assert not step.matches(({"a": a}, x[:2], 2.0))
    assert not step.matches(({"b": a}, x, 2.0))
    with pytest.raises(ValueError, match="captured structure, shapes"):
        step(({"a": a}, x.double(), 2.0))
    with pytest.raises(ValueError, match="args hold no tensor"):
        CapturedFunction(fn, (1.0,))


def test_algorithm_step_runs_eagerly_after_a_failed_capture(monkeypatch):
    def failing(run, device, warmup):
        raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(implicit, "_capture_graph", failing)
    model, params, tasks = setup()
    kw = dict(inner_steps=2, inner_lr=0.1, cg_steps=3)
    graphed = make_algorithm("imaml-gd", cuda_graph="step", **kw)
    with pytest.warns(RuntimeWarning, match="cuda_graph='step': capturing the meta-gradient "
                                            "failed .*not permitted.*eagerly"):
        g1, _ = graphed.meta_gradient(model, params, tasks)
    g2, _ = make_algorithm("imaml-gd", **kw).meta_gradient(model, params, tasks)
    for k in g2:
        torch.testing.assert_close(g1[k], g2[k], rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        graphed.meta_gradient(model, params, tasks)  # no second try, no second warning


# Host read-backs (item(), bool() of a tensor: aten._local_scalar_dense) that the captured solve's
# code makes on the CPU, each behind a device test: (file, function) of the read.
CPU_ONLY_READS = {("hvp.py", "_bn_relu_pool"),  # skips a sign flip when BN scales are >= 0
                  ("linalg.py", "_cg_callable"),  # stops the loop when every system stopped
                  ("inner.py", "hessian_free"),  # stops Newton-CG when every task converged
                  ("implicit.py", "_report_breakdown"),  # implicit_root's warning (check=None)
                  ("linalg.py", "breakdown_counts")}  # the same, its statuses


class HostReads(TorchDispatchMode):
    """Records where the package's code reads a tensor's value back to the host."""

    def __init__(self):
        super().__init__()
        self.sites = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            ours = [f for f in traceback.extract_stack() if "/imaml_ext/" in f.filename]
            self.sites.add((Path(ours[-1].filename).name, ours[-1].name) if ours else ("?", "?"))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("hvp", ["exact", "forward_over_reverse", "ggn"])
def test_the_captured_solve_reads_nothing_back_but_on_the_cpu(hvp):
    # A CUDA graph cannot hold a read-back to the host (the capture fails), and an eager GPU solve
    # would synchronise on it. What the capture records (the HVP's set-up and the CG) is run
    # here on the CPU: every read it makes must be one of the reads made only on the CPU.
    model, params, tasks = setup(M=2)
    tl = TaskLoss(model)
    phi, b = point(params, tasks, 1)
    with HostReads() as reads:
        H = make_hvp(tl, phi, tasks.x_support, tasks.y_support, hvp)
        if H.kind == "double_backward":
            H.value_and_grad()
        implicit_meta_gradient(tl, phi, tasks.x_support, tasks.y_support, b, hvp=H, **KW)
    assert reads.sites <= CPU_ONLY_READS, reads.sites - CPU_ONLY_READS
    assert ("linalg.py", "_cg_callable") in reads.sites  # the recorder sees reads


@pytest.mark.parametrize("name", ["imaml-gd", "imaml-hf"])
def test_the_captured_step_reads_nothing_back_but_on_the_cpu(name):
    # cuda_graph="step" records _per_task: the inner solver, the query gradient and the solve
    model, params, tasks = setup(M=2)
    algo = make_algorithm(name, inner_steps=2, cg_steps=3)
    tl = algo.task_loss(model)
    with HostReads() as reads:
        algo._per_task(tl, params, tasks, ParamSpec.of(params, batched=False))
    assert reads.sites <= CPU_ONLY_READS, reads.sites - CPU_ONLY_READS
    assert ("linalg.py", "_cg_callable") in reads.sites


# ---- on a GPU: a real capture ------------------------------------------------------------------

@cuda
@pytest.mark.parametrize("kernels", [False, True], ids=["ref_block", "block_kernels"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_replay_matches_the_eager_solve_without_host_sync(dtype, kernels, monkeypatch):
    # block_kernels: the pooled batch-norm block's derivative kernels on CUDA (the default there)
    monkeypatch.setattr(hvp_mod, "POOLED_BN_KERNELS", ("cpu", "cuda") if kernels else ("cpu",))
    model, params, tasks = setup(device="cuda", dtype=dtype)
    tl = TaskLoss(model)
    phi1, b1 = point(params, tasks, 1)
    solver = CapturedMetaGradient(tl, phi1, tasks.x_support, tasks.y_support, b1, **KW)
    tasks2 = tasks_for(3, 3, 2, seed=7, device="cuda", dtype=dtype)
    phi2, b2 = point(params, tasks2, 2)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got, losses = solver(phi2, tasks2.x_support, tasks2.y_support, b2)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    want, want_losses = eager_solve(tl, phi2, tasks2, b2, **KW)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.flat, want.flat, **tol)
    torch.testing.assert_close(losses, want_losses, **tol)
    assert torch.equal(got.cg.iterations, want.cg.iterations)
    first, _ = eager_solve(tl, phi1, tasks, b1, **KW)
    again, _ = solver(phi1, tasks.x_support, tasks.y_support, b1)
    torch.testing.assert_close(again.flat, first.flat, **tol)


@cuda
def test_cuda_algorithm_with_cuda_graph_matches_the_default():
    model, params, tasks = setup(device="cuda")
    kw = dict(inner_steps=2, inner_lr=0.1, cg_steps=3)
    graphed, plain = make_algorithm("imaml-gd", cuda_graph=True, **kw), \
        make_algorithm("imaml-gd", **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the capture must not fall back
        for t in (tasks, tasks_for(3, 3, 2, seed=5, device="cuda")):
            g1, m1 = graphed.meta_gradient(model, params, t)
            g2, m2 = plain.meta_gradient(model, params, t)
            for k in g2:
                torch.testing.assert_close(g1[k], g2[k], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(m1["inner_loss"], m2["inner_loss"])
    assert graphed._graph is not None


@cuda
@pytest.mark.parametrize("name", ["imaml-gd", "imaml-hf"])
def test_cuda_step_capture_matches_the_default_without_host_sync(name):
    model, params, tasks = setup(device="cuda")
    kw = dict(inner_steps=2, inner_lr=0.1, cg_steps=3)
    graphed, plain = make_algorithm(name, cuda_graph="step", **kw), make_algorithm(name, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the capture must not fall back
        graphed.meta_gradient(model, params, tasks)  # captures
        params2 = {k: v + 0.01 for k, v in params.items()}
        tasks2 = tasks_for(3, 3, 2, seed=5, device="cuda")
        step = graphed._graph
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = step((params2, tasks2))  # the replay alone: no host synchronisation
        finally:
            torch.cuda.set_sync_debug_mode("default")
        want = plain._per_task(plain.task_loss(model), params2, tasks2,
                               ParamSpec.of(params2, batched=False))
        torch.testing.assert_close(out[0], want[0], rtol=1e-10, atol=1e-12)
        for k in want[2]:
            torch.testing.assert_close(out[2][k], want[2][k], rtol=1e-10, atol=1e-12)
        g1, _ = graphed.meta_gradient(model, params2, tasks2)
        g2, _ = plain.meta_gradient(model, params2, tasks2)
        for k in g2:
            torch.testing.assert_close(g1[k], g2[k], rtol=1e-10, atol=1e-12)
    assert graphed._graph is step  # one capture for the shape


# ---- implicit_root(cuda_graph=True): each backward pass as one CapturedFunction ---------------

def ridge_root(n=30, d=5, seed=0, device="cpu"):
    """(F, solve, rebind): the ridge optimality F(w, a) = X^T (X w - y) / n + a w with X read
    from F's closure, its solution for a, and rebind(X2) that puts another X in that closure."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=DT).to(device)
    y = torch.randn(n, generator=g, dtype=DT).to(device)

    def F(w, a):
        return X.T @ (X @ w - y) / n + a * w

    def solve(a):
        with torch.no_grad():
            return torch.linalg.solve(X.T @ X / n + a * torch.eye(d, dtype=DT, device=device),
                                      X.T @ y / n)

    def rebind(X2):
        nonlocal X
        X = X2
    return F, solve, rebind


def root_grad(F, solve, a, **kw):
    """d/da of a fixed loss of w*(a) through implicit_root, and the backward's CGResult."""
    a = a.detach().requires_grad_(True)
    diag = {}
    w = implicit.implicit_root(F, solve(a), a, rtol=1e-12, diagnostics=diag, **kw)
    (g,) = torch.autograd.grad((w * torch.arange(1.0, w.shape[0] + 1, dtype=DT,
                                                 device=w.device)).sum(), a)
    return g, diag["cg"]


def test_root_backward_replays_one_capture_per_shape_and_constants(monkeypatch):
    calls = []
    monkeypatch.setattr(implicit, "_capture_graph", tree_stand_in(calls))
    F, solve, rebind = ridge_root()
    kw = dict(max_iter=20, cuda_graph=True)
    a1, a2 = torch.tensor(0.3, dtype=DT), torch.tensor(1.7, dtype=DT)
    g1, res1 = root_grad(F, solve, a1, **kw)
    kept = res1.x[0].clone()
    g2, res2 = root_grad(F, solve, a2, **kw)
    assert len(calls) == 1  # the second backward replayed the first's capture ...
    torch.testing.assert_close(g1, root_grad(F, solve, a1, max_iter=20)[0], rtol=1e-10, atol=0)
    torch.testing.assert_close(g2, root_grad(F, solve, a2, max_iter=20)[0], rtol=1e-10, atol=0)
    assert not torch.allclose(g1, g2)  # ... with its own inputs
    assert torch.equal(res1.x[0], kept)  # and fresh outputs: diagnostics are not rewritten
    assert bool(res2.converged)
    root_grad(F, solve, a1, max_iter=15, cuda_graph=True)  # another constant: a new capture
    assert len(calls) == 2
    X2 = torch.randn(30, 5, generator=torch.Generator().manual_seed(9), dtype=DT)
    rebind(X2)  # another tensor in F's closure: a new capture, which reads the new X
    g3, _ = root_grad(F, solve, a1, **kw)
    assert len(calls) == 3
    torch.testing.assert_close(g3, root_grad(F, solve, a1, max_iter=20)[0], rtol=1e-10, atol=0)
    assert not torch.allclose(g3, g1)
    a = a1.clone().requires_grad_(True)
    w = implicit.implicit_root(F, solve(a), a, max_iter=20, cuda_graph=True)
    with pytest.warns(RuntimeWarning, match="create_graph=True gives first-order"):
        torch.autograd.grad(w.sum(), a, create_graph=True)  # create_graph: eager, no capture
    assert len(calls) == 3


def test_root_backward_keeps_four_captures_and_runs_eagerly_after_a_failed_one(monkeypatch):
    calls = []
    monkeypatch.setattr(implicit, "_capture_graph", tree_stand_in(calls))
    F, solve, _ = ridge_root()
    a = torch.tensor(0.5, dtype=DT)
    for it in (11, 12, 13, 14):
        root_grad(F, solve, a, max_iter=it, cuda_graph=True)
    with pytest.warns(RuntimeWarning, match="more than 4 shapes or constant arguments"):
        root_grad(F, solve, a, max_iter=15, cuda_graph=True)
    root_grad(F, solve, a, max_iter=15, cuda_graph=True)
    assert len(calls) == 5

    def failing(run, device, warmup):
        raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(implicit, "_capture_graph", failing)
    G, solve2, _ = ridge_root(seed=1)
    with pytest.warns(RuntimeWarning, match="capturing the backward failed .*not permitted"):
        g, _ = root_grad(G, solve2, a, max_iter=20, cuda_graph=True)
    torch.testing.assert_close(g, root_grad(G, solve2, a, max_iter=20)[0], rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        root_grad(G, solve2, a, max_iter=20, cuda_graph=True)  # no second try or warning


def test_root_cuda_graph_errors():
    F, solve, _ = ridge_root()
    a = torch.tensor(0.5, dtype=DT, requires_grad=True)
    with pytest.raises(ValueError, match="give max_iter"):
        implicit.implicit_root(F, solve(a), a, cuda_graph=True)
    with pytest.raises(ValueError, match="cuda_graph must be True or False"):
        implicit.implicit_root(F, solve(a), a, max_iter=5, cuda_graph="yes")
    w = implicit.implicit_root(F, solve(a), a, max_iter=5, cuda_graph=True)
    with pytest.raises(ValueError, match="needs CUDA tensors, got cpu"):
        w.sum().backward()  # the real capture, on the CPU


def test_the_captured_root_backward_reads_nothing_back_but_on_the_cpu():
    F, solve, _ = ridge_root()
    with HostReads() as reads:
        root_grad(F, solve, torch.tensor(0.5, dtype=DT), max_iter=20)
    assert reads.sites <= CPU_ONLY_READS, reads.sites - CPU_ONLY_READS
    assert ("linalg.py", "_cg_callable") in reads.sites


@cuda
def test_cuda_root_backward_replay_matches_eager_without_host_sync():
    F, solve, _ = ridge_root(device="cuda")
    kw = dict(max_iter=20, cuda_graph=True)
    a1 = torch.tensor(0.3, dtype=DT, device="cuda")
    a2 = torch.tensor(1.7, dtype=DT, device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the capture must not fall back
        root_grad(F, solve, a1, **kw)  # captures
        a = a2.clone().requires_grad_(True)
        w = implicit.implicit_root(F, solve(a), a, rtol=1e-12, **kw)
        loss = (w * torch.arange(1.0, 6.0, dtype=DT, device="cuda")).sum()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            (g,) = torch.autograd.grad(loss, a)  # the replay: no host synchronisation
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(g, root_grad(F, solve, a2, max_iter=20)[0], rtol=1e-10, atol=0)
    assert len(implicit._ROOT_GRAPHS[F].graphs) == 1
