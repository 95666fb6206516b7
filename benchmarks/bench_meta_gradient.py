"""Time and peak memory of one meta-gradient on the Omniglot conv net, against two public ways of
computing iMAML's, measured in the same run.

Contenders (all on the paper's 4-block, 64-filter conv net, random images: cost does not depend
on pixel values):
- ours, batched over the meta-batch: imaml-gd, imaml-hf, maml, fomaml, reptile
  (imaml_ext.algorithms.make_algorithm: lam=2, lr=0.1, 5 CG steps, paper's inner steps), and
  "imaml-gd-one-fold": imaml-gd with all M tasks in one fold, the layout before the CPU's task
  chunks (imaml_ext.hvp), timed in the same rounds.
- "authors-loop": a faithful re-implementation of the iMAML authors' training step
  (aravindr93/imaml_dev, examples/omniglot_implicit_maml.py): one task at a time; an nn.Module
  and torch.optim.SGD for the inner loop with a host read of the loss every step; pre/post
  query losses and accuracies read to the host; the query gradient; their cg_solve (Python CG
  that evaluates A x0 at x0 = 0 first and tests the residual on the host every iteration) with
  their double-backward Hessian-vector product that rebuilds the gradient graph for every
  product.
- "torchopt": TorchOpt 0.7.3's implicit-gradient iMAML (its examples/iMAML functional
  example): per task, custom_root(grad of the inner objective, solve=solve_cg(maxiter=cg_steps))
  around a torchopt.sgd inner loop, then one backward through all tasks' query losses.

Same work for everyone: K inner steps, cg_steps CG iterations on (I + H/cg_lam) (the authors'
loop with regu_coef=0 and lam_damping=cg_lam-lam, TorchOpt with ridge=cg_lam-lam). cg_lam defaults
to lam + 10 (the authors' shift): at the random initialisation (I + H/lam) is indefinite, our CG
stops at the negative curvature while the peers, which do not check, go on; a positive definite
matrix makes every contender run all its CG iterations.

Before timing, a correctness check in float64 on one or two tasks: our iMAML-GD meta-gradient
against the authors'-style loop (authors' proximal form) and TorchOpt (paper's form), per task.
Also reported: the cost of one batched Hessian-vector product relative to one batched gradient
(with --compile-hvp also torch.compile's product, its compilation timed apart; --hvp-only runs
that block alone, e.g. on a GPU through gpu_suite.sh), and where our iMAML-GD's time goes
("imaml_gd_phases": inner GD steps, gradient graph at phi_K, query gradient, CG with its HVPs).

Timing: warm-up on the timed shapes (1 inner step), one untimed full call of each contender
(its peak memory), then `--rounds` rounds; each round runs every contender once, iMAML-GD next to
the two peers, and the speed-ups are medians of per-round ratios (on a shared VM the CPU's speed
drifts by several x within minutes). The CG phase is judged the same way: in each round of
imaml_gd_phases the solve and its cg_steps products alone are timed at the same phi, and the
ratio is the median of the rounds' ratios. Per-task peers are timed on 1-2
tasks per round (their cost is linear in the number of tasks), MAML on fewer tasks where its
memory (tasks x steps) demands it. Peak memory: see benchmarks/common.py. CPU defaults: 5-way
1-shot with meta-batch 32 and 16 steps; 20-way 5-shot with meta-batch 8 (not 32) and 25 steps,
so that the run stays near 10 minutes on 2 cores.

    python benchmarks/bench_meta_gradient.py [--quick] [--device cpu|cuda] [--out PATH]
    python benchmarks/bench_meta_gradient.py --hvp-only --compile-hvp [--device cuda]
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import (RESULTS, environment, fmt_table, machine_line, peak_memory,  # noqa: E402
                    pick_device, summarize, time_once, write_json)

from imaml_ext.algorithms import make_algorithm, options_for  # noqa: E402
from imaml_ext.hvp import ParamSpec, TaskLoss, make_hvp  # noqa: E402
from imaml_ext.implicit import CapturedMetaGradient, implicit_meta_gradient  # noqa: E402
from imaml_ext.inner import batched_theta, gd  # noqa: E402
from imaml_ext.models import make_model  # noqa: E402
from imaml_ext.types import TaskBatch  # noqa: E402

OURS = ("imaml-gd", "imaml-hf", "maml", "fomaml", "reptile")
PEERS = ("authors-loop", "torchopt")
# iMAML-GD with every task of the meta-batch in one fold (TaskLoss(task_chunk=M)): the layout
# before CPU task chunks, timed in the same rounds (the multi-tensor GD step is in both).
ONE_FOLD = "imaml-gd-one-fold"
# With --compile-hvp: iMAML-GD whose CG products are torch.compile's HVP (compile_hvp=True, the
# training option --compile-hvp), timed against the default iMAML-GD in the same rounds.
COMPILED = "imaml-gd-compiled-hvp"
# With --cuda-graph (a GPU): iMAML-GD whose meta-gradient solve is one captured CUDA graph
# (cuda_graph=True, imaml_ext.implicit.CapturedMetaGradient); its first call captures, timed apart.
GRAPHED = "imaml-gd-cuda-graph"
# And iMAML-GD whose whole per-task meta-gradient (inner GD, query gradient, solve) is one
# captured CUDA graph (cuda_graph="step", imaml_ext.implicit.CapturedFunction).
STEP_GRAPHED = "imaml-gd-cuda-graph-step"
# How far each variant's meta-gradient (mean over the timed tasks, round 0) may be from the
# default's, relative: the same ops in another layout or replayed; the compiled product's float32
# rounding differs at the net's ReLU / max-pool kinks (1.6-1.8e-2 per product on an H100).
VARIANT_TOL = {ONE_FOLD: 1e-3, GRAPHED: 1e-3, STEP_GRAPHED: 1e-3, COMPILED: 5e-2}

# name -> (ways, shots, queries per class, inner GD steps (the paper's), meta-batch,
#          tasks per round for the per-task peers, tasks for MAML)
SETTINGS = {"20w5s": (20, 5, 5, 25, 32, 1, 2), "5w1s": (5, 1, 5, 16, 32, 2, 32)}


def make_tasks(ways, shots, queries, M, device, dtype=torch.float32, seed=0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    ys = torch.arange(ways).repeat_interleave(shots).expand(M, -1).contiguous()
    yq = torch.arange(ways).repeat_interleave(queries).expand(M, -1).contiguous()
    return TaskBatch(torch.rand(M, ways * shots, 1, 28, 28, generator=g, dtype=dtype),
                     ys, torch.rand(M, ways * queries, 1, 28, 28, generator=g, dtype=dtype),
                     yq).to(device)


def subset(tasks: TaskBatch, n: int) -> TaskBatch:
    return TaskBatch(*(t[:n] for t in tasks))


# ---- the authors' loop, one task at a time ------------------------------------------------------

class AuthorsLoop:
    """aravindr93/imaml_dev's iMAML step, restructured into one function, same operations."""

    def __init__(self, model, lam, inner_steps, inner_lr, cg_steps, regu_coef=0.0,
                 lam_damping=0.0):
        self.model = model  # the "fast learner": its parameters are overwritten per task
        self.lam, self.K, self.lr, self.cg_steps = lam, inner_steps, inner_lr, cg_steps
        self.regu_coef, self.lam_damping = regu_coef, lam_damping
        self.inner_opt = torch.optim.SGD(self.model.parameters(), lr=inner_lr)

    def get_params(self):
        return torch.cat([p.data.view(-1) for p in self.model.parameters()]).clone()

    def set_params(self, flat):
        off = 0
        for p in self.model.parameters():
            p.data.copy_(flat[off:off + p.nelement()].view(p.size()))
            off += p.nelement()

    def loss(self, x, y):
        return F.cross_entropy(self.model(x), y)

    def regularization_loss(self, w0, lam):
        off, reg = 0, 0.0
        for p in self.model.parameters():
            d = p.view(-1) - w0[off:off + p.nelement()].view(-1)
            reg = reg + 0.5 * lam * torch.sum(d ** 2)
            off += p.nelement()
        return reg

    def hvp(self, x, y, v):
        loss = self.loss(x, y)
        g = torch.autograd.grad(loss, self.model.parameters(), create_graph=True)
        flat = torch.cat([t.contiguous().view(-1) for t in g])
        hv = torch.autograd.grad(torch.sum(flat * v), self.model.parameters())
        return torch.cat([t.contiguous().view(-1) for t in hv])

    def cg_solve(self, f_Ax, b, cg_iters, residual_tol=1e-10):
        x = torch.zeros(b.shape[0], dtype=b.dtype, device=b.device)
        r = b - f_Ax(x)
        p = r.clone()
        for _ in range(cg_iters):
            rdotr = r.dot(r)
            Ap = f_Ax(p)
            alpha = rdotr / (p.dot(Ap))
            x = x + alpha * p
            r = r - alpha * Ap
            newrdotr = r.dot(r)
            p = r + newrdotr / rdotr * p
            if newrdotr < residual_tol:  # a host synchronisation every iteration
                break
        return x

    def meta_gradient(self, w_k, tasks: TaskBatch, per_task: bool = False):
        meta_grad, outs = 0.0, []
        M = tasks.num_tasks
        for i in range(M):
            xs, ys, xq, yq = (t[i] for t in tasks)
            self.set_params(w_k.clone())
            vl_before = self.loss(xq, yq).item()
            train_losses = []
            for _ in range(self.K):  # learn_task
                self.inner_opt.zero_grad()
                tl = self.loss(xs, ys)
                tl.backward()
                self.inner_opt.step()
                train_losses.append(tl.detach().cpu().numpy())
            self.inner_opt.zero_grad()  # pull back for regularization
            self.regularization_loss(w_k, self.lam).backward()
            self.inner_opt.step()
            vl_after = self.loss(xq, yq).item()
            with torch.no_grad():
                tacc = (self.model(xs).argmax(1) == ys).float().mean().item()
                vacc = (self.model(xq).argmax(1) == yq).float().mean().item()
            valid_loss = self.loss(xq, yq)
            vg = torch.autograd.grad(valid_loss, self.model.parameters())
            flat_grad = torch.cat([g.contiguous().view(-1) for g in vg])
            if self.cg_steps <= 0:
                task_grad = flat_grad
            else:
                def f_Ax(v):
                    return (1.0 + self.regu_coef) * v + self.hvp(xs, ys, v) / (
                        self.lam + self.lam_damping)
                task_grad = self.cg_solve(f_Ax, flat_grad, self.cg_steps)
            meta_grad = meta_grad + task_grad / M
            outs.append(task_grad)
            _ = (vl_before, vl_after, tacc, vacc, train_losses)
        return torch.stack(outs) if per_task else meta_grad


# ---- TorchOpt's implicit iMAML, one task at a time -----------------------------------------------

def torchopt_contender(model, lam, inner_steps, inner_lr, cg_steps, cg_lam=None):
    """Returns meta_gradient(params dict, tasks, per_task) -> flat meta-gradient, or raises.

    TorchOpt solves (dF/dphi)^T u = v with dF/dphi = H + lam I and returns lam u; `ridge` =
    cg_lam - lam makes the matrix H + cg_lam I, so that it returns (lam / cg_lam) times our
    (I + H/cg_lam)^-1 v, with the same CG iterates (CG is invariant to scaling the matrix).
    """
    ridge = None if cg_lam is None or cg_lam == lam else cg_lam - lam
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torchopt  # noqa: PLC0415
    names = [k for k, _ in model.named_parameters()]

    def fnet(params, x):
        return functional_call(model, dict(zip(names, params)), (x,))

    def objective(params, meta_params, x, y):
        reg = 0
        for p1, p2 in zip(params, meta_params):
            reg = reg + 0.5 * lam * torch.sum(torch.square(p1 - p2))
        return F.cross_entropy(fnet(params, x), y) + reg

    @torchopt.diff.implicit.custom_root(
        torch.func.grad(objective, argnums=0), argnums=1,
        solve=torchopt.linear_solve.solve_cg(maxiter=cg_steps, rtol=0.0, atol=0.0, ridge=ridge))
    def inner_solver(params, meta_params, x, y):
        opt = torchopt.sgd(lr=inner_lr)
        state = opt.init(params)
        with torch.enable_grad():
            for _ in range(inner_steps):
                loss = objective(params, meta_params, x, y)
                grads = torch.autograd.grad(loss, params)
                updates, state = opt.update(grads, state, inplace=True)
                params = torchopt.apply_updates(params, updates, inplace=True)
        return params

    def meta_gradient(params, tasks: TaskBatch, per_task: bool = False):
        meta = tuple(params[k].detach().clone().requires_grad_(True) for k in names)
        losses, accs = [], []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for i in range(tasks.num_tasks):
                init = tuple(t.detach().clone().requires_grad_(True) for t in meta)
                phi = inner_solver(init, meta, tasks.x_support[i], tasks.y_support[i])
                logits = fnet(phi, tasks.x_query[i])
                losses.append(F.cross_entropy(logits, tasks.y_query[i]))
                accs.append((logits.argmax(1) == tasks.y_query[i]).float().mean().item())
            if per_task:
                rows = []
                for lq in losses:
                    g = torch.autograd.grad(lq, meta, retain_graph=True)
                    rows.append(torch.cat([t.reshape(-1) for t in g]))
                return torch.stack(rows)
            g = torch.autograd.grad(torch.stack(losses).mean(), meta)
        return torch.cat([t.reshape(-1) for t in g])

    return meta_gradient


# ---- the measurements --------------------------------------------------------------------------

def hvp_ratios(model, params, tasks, device, repeats, cg_steps, compiled=False):
    """Seconds of one batched gradient and of one batched HVP of each kind (support sets).

    The double-backward product reuses a gradient graph built once per point ("graph_build",
    a forward and a create_graph backward); "exact_per_cg_product" is what one product costs
    inside a cg_steps-step solve, the build shared among the products.

    compiled: also torch.compile's forward-over-reverse product (make_hvp(..., compile=True)),
    its first call (compilation) timed apart from the steady state, against the same eager
    product on one fold of all tasks ("hvp_forward_over_reverse_one_fold": what the compiled
    graph computes; on the CPU the eager default evaluates task chunks) and against the rest.
    """
    tl = TaskLoss(model)
    pb = {k: v.clone() for k, v in batched_theta(params, tasks.num_tasks).items()}
    x, y = tasks.x_support, tasks.y_support
    v = {k: torch.randn_like(t) for k, t in pb.items()}
    fns = {"grad": lambda: tl.grad(pb, x, y)}
    for kind in ("forward_over_reverse", "double_backward", "ggn"):
        H = make_hvp(tl, pb, x, y, kind)
        fns[f"hvp_{kind}"] = (lambda H=H: H(v))
    fns["double_backward_graph_build"] = lambda: make_hvp(tl, pb, x, y, "double_backward") \
        .value_and_grad()
    comp = None
    if compiled:
        one_fold = TaskLoss(model, task_chunk=tasks.num_tasks)
        H = make_hvp(one_fold, pb, x, y, "forward_over_reverse")
        fns["hvp_forward_over_reverse_one_fold"] = (lambda H=H: H(v))
        comp = compiled_hvp_first_call(model, pb, x, y, v, device)
        if "error" not in comp:
            fns["hvp_compiled"] = comp.pop("fn")
    for f in fns.values():  # warm-up (and the double-backward graph)
        f()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            times[k].append(time_once(f, device))
    out = {k: summarize(t) for k, t in times.items()}
    med = {k: out[k]["median_s"] for k in fns}
    g = med["grad"]
    ratio = {k: med[k] / g for k in fns if k != "grad"}
    steps = max(cg_steps, 1)
    ratio["exact_per_cg_product"] = (med["double_backward_graph_build"] / steps
                                     + med["hvp_double_backward"]) / g
    out["ratio_to_grad"] = ratio
    out["exact_method"] = make_hvp(tl, pb, x, y, "exact").kind
    if comp is not None:
        if "hvp_compiled" in med:
            c = med["hvp_compiled"]
            comp.update({
                "steady_median_s": c,
                "ratio_to_grad": c / g,
                "speedup_vs_eager_forward_over_reverse_one_fold":
                    med["hvp_forward_over_reverse_one_fold"] / c,
                "speedup_vs_eager_forward_over_reverse": med["hvp_forward_over_reverse"] / c,
                "speedup_vs_exact_per_cg_product": ratio["exact_per_cg_product"] * g / c})
        out["compiled"] = comp
    return out


def compiled_hvp_first_call(model, pb, x, y, v, device):
    """torch.compile's HVP at pb: {"fn": the steady-state call, "first_call_s" (compilation
    included), "rel_err_vs_eager"} or {"error": why it could not run}."""
    tl = TaskLoss(model)
    try:
        H = make_hvp(tl, pb, x, y, "exact", compile=True)
        box = []
        first = time_once(lambda: box.append(H(v)), device)
    except Exception as exc:  # noqa: BLE001 - no C++ compiler, an Inductor failure: recorded
        return {"error": f"{type(exc).__name__}: {exc}"[:500]}
    ref = make_hvp(tl, pb, x, y, "double_backward")(v)
    num = sum((box[0][k] - ref[k]).double().flatten(1).pow(2).sum(1) for k in ref)
    den = sum(ref[k].double().flatten(1).pow(2).sum(1) for k in ref)
    per_task = (num / den).sqrt()
    # The net's Hessian jumps at ReLU / max-pool kinks, and float32 rounding puts a few tasks on
    # either side (benchmarks/probes/hvp_kinks.py): the median task is the product's accuracy.
    return {"fn": lambda: H(v), "first_call_s": first,
            "rel_err_vs_eager": float((num.sum() / den.sum()).sqrt()),
            "rel_err_vs_eager_median_task": float(per_task.median()),
            "tasks_over_1e-4": int((per_task > 1e-4).sum()), "tasks": len(per_task),
            "method": "torch.compile (inductor) of forward-over-reverse, all tasks in one graph"}


def correctness(model, params, device, ways, shots, queries, lam, steps, lr, cg_steps,
                cg_lam, num_tasks=2):
    """float64, a few tasks: ours against the two peers, task by task.

    The authors' loop is compared with ours in the authors' proximal form, TorchOpt with ours in
    the paper's form (its inner loop). Where our CG met negative curvature after k iterations
    (status 2: it keeps the k-th iterate) the peer is run with k CG iterations, since neither
    peer detects it and both go on with a meaningless step.
    """
    m64 = make_model("omniglot", ways).to(device=device, dtype=torch.float64)
    p64 = {k: v.detach().to(torch.float64) for k, v in params.items()}
    tasks = make_tasks(ways, shots, queries, num_tasks, device, torch.float64, seed=1)
    flat = torch.cat([p64[k].reshape(-1) for k in p64])
    result = {"tasks": num_tasks, "dtype": "float64", "inner_steps": steps, "lam": lam,
              "cg_steps": cg_steps, "cg_lam": cg_lam, "rel_err_vs_authors": [], "rel_err_vs_torchopt": [],
              "cg_status_ours": {"authors_form": [], "paper_form": []},
              "cg_iterations_ours": {"authors_form": [], "paper_form": []}}
    for i in range(num_tasks):
        one = TaskBatch(*(t[i:i + 1] for t in tasks))
        for form, key in (("authors", "authors_form"), ("paper", "paper_form")):
            ours = make_algorithm("imaml-gd", lam=lam, inner_steps=steps, inner_lr=lr,
                                  cg_steps=cg_steps, cg_lam=cg_lam, proximal=form)
            g, m = ours.meta_gradient(m64, p64, one)
            mine = torch.cat([g[k].reshape(-1) for k in p64])
            st, it = int(m["cg_status"][0]), int(m["cg_iterations"][0])
            result["cg_status_ours"][key].append(st)
            result["cg_iterations_ours"][key].append(it)
            k_peer = it if st == 2 else cg_steps
            if form == "authors":
                ref = AuthorsLoop(make_model("omniglot", ways).to(device=device,
                                                                  dtype=torch.float64),
                                  lam, steps, lr, k_peer, lam_damping=cg_lam - lam
                                  ).meta_gradient(flat, one)
                result["rel_err_vs_authors"].append(float((mine - ref).norm() / ref.norm()))
            else:
                try:
                    ref = torchopt_contender(m64, lam, steps, lr, k_peer, cg_lam)(p64, one)
                    ref = ref * (cg_lam / lam)  # see torchopt_contender
                except Exception as exc:  # noqa: BLE001 - a peer that fails is recorded
                    result["torchopt_error"] = f"{type(exc).__name__}: {exc}"
                    continue
                result["rel_err_vs_torchopt"].append(float((mine - ref).norm() / ref.norm()))
    errs = result["rel_err_vs_authors"] + result["rel_err_vs_torchopt"]
    result["passed"] = bool(errs) and max(errs) < 1e-6
    return result


def run_setting(name, spec, args, device):
    ways, shots, queries, steps, M, nb, nm = spec
    torch.manual_seed(0)
    model = make_model("omniglot", ways).to(device)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    tasks = make_tasks(ways, shots, queries, M, device)
    lam, lr, cg_steps = args.lam, args.inner_lr, args.cg_steps
    cg_lam = lam + 10.0 if args.cg_lam is None else args.cg_lam
    out = {"setting": name, "ways": ways, "shots": shots, "queries": queries, "meta_batch": M,
           "inner_steps": steps, "hf_newton_steps": args.hf_steps, "cg_steps": cg_steps,
           "lam": lam, "cg_lam": cg_lam, "inner_lr": lr, "hvp": args.hvp,
           "rounds": args.rounds}
    t0 = time.perf_counter()
    if not args.hvp_only:
        out["correctness"] = correctness(
            model, params, device, ways, shots, queries, lam, min(steps, 3), lr, cg_steps, cg_lam,
            num_tasks=args.check_tasks or (1 if ways * shots > 25 else 2))
        print(f"[{name}] correctness (float64): {json.dumps(out['correctness'])}", flush=True)
        if not out["correctness"]["passed"]:  # no timing of a meta-gradient that is wrong
            raise SystemExit(f"[{name}] iMAML-GD's float64 meta-gradient does not match the "
                             f"peers' (above): no timings taken")
    out["hvp_cost"] = hvp_ratios(model, params, tasks, device, args.hvp_repeats, cg_steps,
                                 compiled=args.compile_hvp)
    print(f"[{name}] one HVP / one gradient (M={M}): " + ", ".join(
        f"{k} {v:.2f}x" for k, v in out["hvp_cost"]["ratio_to_grad"].items()), flush=True)
    if "compiled" in out["hvp_cost"]:
        print(f"[{name}] compiled HVP: {json.dumps(out['hvp_cost']['compiled'])}", flush=True)
    if args.hvp_only:
        out["seconds"] = time.perf_counter() - t0
        return out

    contenders = {}
    for algo in OURS:
        if algo not in args.methods:
            continue
        kw = options_for(algo, lam=lam, inner_lr=lr, cg_steps=cg_steps, hvp=args.hvp,
                         cg_lam=cg_lam,
                         inner_steps=args.hf_steps if algo == "imaml-hf" else steps)
        a = make_algorithm(algo, **kw)
        n = min(M, nm) if algo == "maml" else M
        contenders[algo] = (n, lambda a=a, n=n: a.meta_gradient(model, params, subset(tasks, n)))
        if algo == "imaml-gd" and ONE_FOLD in args.methods:
            a1 = _one_fold(make_algorithm(algo, **kw), model, M)
            contenders[ONE_FOLD] = (M, lambda a1=a1: a1.meta_gradient(model, params, tasks))
        if algo == "imaml-gd" and args.compile_hvp:
            ac = make_algorithm(algo, compile_hvp=True, **kw)
            contenders[COMPILED] = (M, lambda ac=ac: ac.meta_gradient(model, params, tasks))
        if algo == "imaml-gd" and args.cuda_graph:
            ag = make_algorithm(algo, cuda_graph=True, **kw)
            contenders[GRAPHED] = (M, lambda ag=ag: ag.meta_gradient(model, params, tasks))
            a_step = make_algorithm(algo, cuda_graph="step", **kw)
            contenders[STEP_GRAPHED] = (M, lambda a=a_step: a.meta_gradient(model, params,
                                                                             tasks))
    if "authors-loop" in args.methods:
        fast = make_model("omniglot", ways).to(device)
        loop = AuthorsLoop(fast, lam, steps, lr, cg_steps, lam_damping=cg_lam - lam)
        w = torch.cat([params[k].reshape(-1) for k, _ in fast.named_parameters()])
        contenders["authors-loop"] = (nb, lambda: loop.meta_gradient(w, subset(tasks, nb)))
    if "torchopt" in args.methods:
        try:
            to = torchopt_contender(model, lam, steps, lr, cg_steps, cg_lam)
            contenders["torchopt"] = (nb, lambda: to(params, subset(tasks, nb)))
        except Exception as exc:  # noqa: BLE001 - a peer that fails is recorded, not fatal
            out["torchopt_error"] = f"{type(exc).__name__}: {exc}"

    # Warm-up on the timed shapes with 1 inner step (oneDNN builds its kernels per shape on the
    # first call). Then rounds: every contender once per round, iMAML-GD next to the two peers
    # (alternating order), so that the per-round ratios compare calls made under the same
    # machine conditions: on a shared VM the CPU's speed drifts by several x over seconds.
    for key in contenders:
        if key == COMPILED:  # its own first call compiles, for the timed shapes
            out["compiled_hvp_first_call_s"] = time_once(contenders[key][1], device)
            continue
        if key in (GRAPHED, STEP_GRAPHED):  # its first call captures, for the timed shapes
            tag = "cuda_graph" if key == GRAPHED else "cuda_graph_step"
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", RuntimeWarning)
                out[f"{tag}_first_call_s"] = time_once(contenders[key][1], device)
            out[f"{tag}_fallback"] = [str(w.message) for w in caught
                                      if "cuda_graph" in str(w.message)]
            continue
        _warm_fn(key, model, params, tasks, contenders[key][0], args, lam, lr, cg_steps)()
    head = [k for k in ("imaml-gd", COMPILED, GRAPHED, STEP_GRAPHED, ONE_FOLD, "authors-loop",
                        "torchopt") if k in contenders]
    rest = [k for k in contenders if k not in head]
    times = {k: [] for k in contenders}
    cpu = {k: [] for k in contenders}
    mem, cg_used = {}, {}
    # One untimed call of each on the full shapes, its peak memory measured (the warm-up above
    # ran 1 inner step: the first full call still grows the allocator's pools); then the rounds.
    for key in head + rest:
        gc.collect()
        mem[key] = peak_memory(contenders[key][1], device)
    first = {}  # round 0's meta-gradients: the variants of iMAML-GD checked against it
    for r in range(args.rounds):
        for key in (head if r % 2 == 0 else head[::-1]) + rest:
            n, fn = contenders[key]
            gc.collect()
            c0 = time.process_time()
            ret = []
            times[key].append(time_once(lambda fn=fn, ret=ret: ret.append(fn()), device))
            if r == 0 and key in ("imaml-gd", ONE_FOLD, COMPILED, GRAPHED, STEP_GRAPHED):
                first[key] = torch.cat([g.reshape(-1).double() for g in ret[0][0].values()])
            if key.startswith("imaml") and isinstance(ret[0], tuple):
                metrics = ret[0][1]
                cg_used[key] = {"cg_iterations_mean": float(metrics["cg_iterations"].float()
                                                            .mean()),
                                "cg_status_counts": torch.bincount(
                                    metrics["cg_status"].clamp(min=0).cpu().long(),
                                    minlength=4).tolist(),
                                "num_ok": int(metrics["num_ok"])}
            cpu[key].append(time.process_time() - c0)
            print(f"[{name}] round {r} {key:13s} {times[key][-1]:7.2f} s wall "
                  f"{cpu[key][-1]:7.2f} s CPU, {n} task(s)", flush=True)
    res = {}
    for key, (n, _) in contenders.items():
        st = summarize(times[key])
        res[key] = {"tasks_timed": n, **st, "tasks_per_s": n / st["median_s"],
                    "tasks_per_s_best": n / st["min_s"], "cpu_s": cpu[key],
                    "cpu_s_per_task": statistics.median(cpu[key]) / n,
                    "seconds_per_task": st["median_s"] / n,
                    "peak_bytes": mem[key]["peak_bytes"],
                    "peak_memory_method": mem[key]["method"] + (
                        "" if device.type == "cuda" else
                        "; in one process after other contenders ran, so memory malloc already "
                        "held is not counted (fig2b_compute_memory.py measures each run in a "
                        "fresh process)"), **cg_used.get(key, {})}
    out["results"] = res
    if "imaml-gd" in first:
        # The variants compute the same meta-gradient (one fold, the captured graphs: the same
        # ops; the compiled product: the same math, float32 rounding, the net's kinks apart):
        # their speed-ups count only where they agree with the default on the timed tasks.
        ref = first["imaml-gd"]
        out["variant_check"] = {
            key: {"rel_diff_vs_imaml_gd": float((g - ref).norm() / ref.norm()),
                  "tolerance": VARIANT_TOL[key],
                  "ok": bool((g - ref).norm() <= VARIANT_TOL[key] * ref.norm())}
            for key, g in first.items() if key != "imaml-gd"}
        for key, c in out["variant_check"].items():
            print(f"[{name}] {key} meta-gradient vs imaml-gd: relative difference "
                  f"{c['rel_diff_vs_imaml_gd']:.1e} ({'ok' if c['ok'] else 'OVER'} "
                  f"{c['tolerance']:g})", flush=True)
    if "imaml-gd" in res:
        n0 = res["imaml-gd"]["tasks_timed"]
        sp = {}
        for peer in PEERS + (ONE_FOLD,):
            if peer not in res:
                continue
            n1 = res[peer]["tasks_timed"]
            per_round = [(n0 / a) / (n1 / b) for a, b in zip(times["imaml-gd"], times[peer])]
            sp[peer] = {"per_round": per_round, "median": statistics.median(per_round),
                        "min": min(per_round),
                        "cpu_time": res[peer]["cpu_s_per_task"] / res["imaml-gd"]["cpu_s_per_task"]}
            # the peers run cg_steps CG iterations on every task; ours stops a task at negative
            # curvature: fewer products than the peer's, said beside the ratio
            it = res["imaml-gd"].get("cg_iterations_mean")
            if it is not None and it < cg_steps:
                sp[peer]["imaml_gd_cg_iterations_mean"] = it
                sp[peer]["note"] = (f"imaml-gd ran {it:.3f} of {cg_steps} CG iterations per "
                                    f"task on average (negative curvature stops a task)")
        out["speedup_imaml_gd"] = sp
        if COMPILED in res:
            per_round = [a / b for a, b in zip(times["imaml-gd"], times[COMPILED])]
            out["speedup_compiled_hvp"] = {"per_round": per_round,
                                           "median": statistics.median(per_round)}
        for key, tag in ((GRAPHED, "cuda_graph"), (STEP_GRAPHED, "cuda_graph_step")):
            if key in res:
                per_round = [a / b for a, b in zip(times["imaml-gd"], times[key])]
                out[f"speedup_{tag}"] = {"per_round": per_round,
                                         "median": statistics.median(per_round)}
    if "imaml-gd" in contenders:
        out["imaml_gd_phases"] = imaml_gd_phases(model, params, tasks, device, steps, lam, lr,
                                                 cg_steps, cg_lam, repeats=args.rounds,
                                                 cuda_graph=args.cuda_graph)
        print(f"[{name}] iMAML-GD phases (s): " + ", ".join(
            f"{k} {v['median_s']:.3f}" for k, v in out["imaml_gd_phases"].items()
            if isinstance(v, dict) and "median_s" in v), flush=True)
    out["seconds"] = time.perf_counter() - t0
    return out


def imaml_gd_phases(model, params, tasks, device, steps, lam, lr, cg_steps, cg_lam, repeats,
                    cuda_graph=False):
    """Seconds of each phase of our iMAML-GD meta-gradient, the library's own steps in order
    (what IMAMLGD._per_task runs): the K inner GD steps, the gradient graph at phi_K (shared by
    the CG's products), the query gradient, and the CG solve with its cg_steps HVPs.

    cuda_graph: also "captured_build_and_cg", the graph build and the CG solve replayed as one
    CUDA graph (CapturedMetaGradient, captured before the timed passes), against the two eager
    phases it replaces, on the same phi and right-hand side; and its largest relative
    difference from the eager solve."""
    tl = TaskLoss(model)
    captured = None
    M = tasks.num_tasks
    x, y = tasks.x_support, tasks.y_support
    times = {k: [] for k in ("inner_gd", "graph_build", "query_grad", "cg_with_hvps", "total",
                             "hvps_alone")}
    n_hvp, ratios, iters = cg_steps, [], []
    for rep in range(max(repeats, 1) + 1):  # the first pass warms up (allocator, kernels), untimed
        box = {}
        t = {"inner_gd": time_once(lambda: box.setdefault("inner", gd(
            tl, batched_theta(params, M), x, y, steps=steps, lr=lr, lam=lam,
            final_loss=False)), device)}
        phi = box["inner"].params
        t["graph_build"] = time_once(lambda: box.setdefault("H", make_hvp(
            tl, phi, x, y, "exact")).value_and_grad(), device)
        t["query_grad"] = time_once(lambda: box.setdefault("q", tl.grad(
            phi, tasks.x_query, tasks.y_query)), device)
        b = ParamSpec.of(phi).flatten(box["q"][0])
        H = box["H"]

        def solve():
            box["g"] = implicit_meta_gradient(tl, phi, x, y, b, lam=lam, cg_lam=cg_lam,
                                              cg_steps=cg_steps, hvp=H)

        def products():  # what the solve would cost if it were its products alone
            for _ in range(n_hvp):  # on b each time: no drift in magnitude over the chain
                box["Hv"] = H.flat(b)
        # The solve and its k products alone, at the same phi, in the same round (order
        # alternating between rounds): the ratio the issue's "CG phase <= 1.1x (CG steps x HVP
        # time)" names, free of drift between measurements made apart.
        t_hvps = time_once(products, device) if n_hvp and rep % 2 else None
        t["cg_with_hvps"] = time_once(solve, device)
        if n_hvp and t_hvps is None:
            t_hvps = time_once(products, device)
        t["total"] = sum(t.values())
        if rep and n_hvp:
            times["hvps_alone"].append(t_hvps)
            ratios.append(t["cg_with_hvps"] / t_hvps)
            # the ratio prices n_hvp products: say how many iterations the solve ran (on the
            # CPU the loop stops once every task has stopped, which would flatter it)
            iters.append(int(box["g"].cg.iterations.max()))
        if cuda_graph and cg_steps > 0:
            if captured is None:
                captured = CapturedMetaGradient(tl, phi, x, y, b, lam=lam, cg_lam=cg_lam,
                                                cg_steps=cg_steps)
            t["captured_build_and_cg"] = time_once(
                lambda: box.setdefault("c", captured(phi, x, y, b)), device)
            want = box["g"].flat
            diff = float((box["c"][0].flat - want).norm(dim=1).div(want.norm(dim=1)).max())
            times.setdefault("captured_build_and_cg", [])
            times.setdefault("captured_max_rel_diff", [])
            if rep:
                times["captured_max_rel_diff"].append(diff)
        for k, v in t.items():
            if rep:
                times[k].append(v)
    diffs = times.pop("captured_max_rel_diff", None)
    out = {k: summarize(v) for k, v in times.items() if v}
    tot = out["total"]["median_s"]
    out["share_of_total"] = {p: out[p]["median_s"] / tot for p in times
                             if p not in ("total", "captured_build_and_cg", "hvps_alone")}
    if ratios:
        out["cg_phase_ratio"] = {
            "per_round": ratios, "median": statistics.median(ratios), "min": min(ratios),
            "max": max(ratios), "hvps": n_hvp, "solve_iterations_max_per_round": iters,
            "one_hvp_median_s": out["hvps_alone"]["median_s"] / n_hvp,
            "what": f"cg_with_hvps / hvps_alone in each round: the CG solve against {n_hvp} "
                    "products H.flat(b) alone, at the same phi, with the same BatchedHVP"}
    if diffs:
        out["captured_max_rel_diff"] = max(diffs)
    out["task_chunk"] = {"support": tl.chunk_size(x), "query": tl.chunk_size(tasks.x_query)}
    return out


def _one_fold(algo, model, M):
    """algo with its TaskLoss for `model` fixed to one fold of M tasks (no CPU task chunks)."""
    algo._tl_cache = (model, TaskLoss(model, algo.config.loss, algo.config.backend,
                                      task_chunk=M))
    return algo


def _warm_fn(key, model, params, tasks, n, args, lam, lr, cg_steps):
    """One cheap call of a contender on the shapes it is timed on (1 inner step)."""
    part = subset(tasks, n)
    if key in OURS or key == ONE_FOLD:
        name = "imaml-gd" if key == ONE_FOLD else key
        a = make_algorithm(name, **options_for(name, lam=lam, inner_lr=lr,
                                               cg_steps=min(cg_steps, 1), hvp=args.hvp,
                                               inner_steps=1))
        if key == ONE_FOLD:
            a = _one_fold(a, model, n)
        return lambda: a.meta_gradient(model, params, part)
    if key == "authors-loop":
        fast = make_model("omniglot", int(tasks.y_support.max()) + 1).to(tasks.x_support.device)
        loop = AuthorsLoop(fast, lam, 1, lr, min(cg_steps, 1))
        w = torch.cat([params[k].reshape(-1) for k, _ in fast.named_parameters()])
        return lambda: loop.meta_gradient(w, subset(tasks, 1))
    to = torchopt_contender(model, lam, 1, lr, min(cg_steps, 1))
    return lambda: to(params, subset(tasks, 1))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="about a minute: 5-way 1-shot only, meta-batch 8, 4 inner steps, "
                         "1 round, peers on 1 task")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    ap.add_argument("--settings", default="5w1s,20w5s", help=f"comma list of {list(SETTINGS)}")
    ap.add_argument("--meta-batch", type=int, default=None,
                    help="tasks per meta-gradient (default 32; the CPU default for 20w5s is 8)")
    ap.add_argument("--inner-steps", type=int, default=None,
                    help="GD steps (default: the paper's, 25 for 20-way and 16 for 5-way)")
    ap.add_argument("--hf-steps", type=int, default=4, help="Newton iterations of iMAML-HF")
    ap.add_argument("--cg-steps", type=int, default=5)
    ap.add_argument("--lam", type=float, default=2.0)
    ap.add_argument("--cg-lam", type=float, default=None,
                    help="solve (I + H/cg_lam) g = v in every contender (default lam + 10, the "
                         "authors' shift: at the random initialisation (I + H/lam) is indefinite "
                         "and our CG stops at the negative curvature while the peers, which do "
                         "not check, go on: equal work needs a positive definite matrix)")
    ap.add_argument("--check-tasks", type=int, default=None,
                    help="tasks of the float64 correctness check (default 2; 1 for 20-way)")
    ap.add_argument("--inner-lr", type=float, default=0.1)
    ap.add_argument("--hvp", default="exact",
                    help="ours: exact, forward_over_reverse, double_backward or ggn")
    ap.add_argument("--rounds", type=int, default=3, help="timed calls per contender")
    ap.add_argument("--baseline-tasks", type=int, default=None,
                    help="tasks per round for the per-task peers (cost linear in it)")
    ap.add_argument("--maml-tasks", type=int, default=None,
                    help="tasks MAML is timed on (its memory grows with tasks x steps)")
    ap.add_argument("--methods", default=",".join(OURS + (ONE_FOLD,) + PEERS))
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--hvp-repeats", type=int, default=2,
                    help="timed calls of each HVP / gradient in the hvp_cost block")
    ap.add_argument("--compile-hvp", action="store_true",
                    help="also time torch.compile's HVP (make_hvp(..., compile=True)) against "
                         "eager and one gradient, and iMAML-GD with compile_hvp=True against "
                         "the default; compilation is timed apart")
    ap.add_argument("--cuda-graph", action="store_true",
                    help="(GPU) also time iMAML-GD with cuda_graph=True (its meta-gradient solve "
                         "one captured CUDA graph) against the default, and that solve's phase")
    ap.add_argument("--hvp-only", action="store_true",
                    help="only the hvp_cost block per setting, no contenders (with "
                         "--compile-hvp: the compiled-HVP report, default --out "
                         "results/hvp_compiled_<device>.json)")
    ap.add_argument("--out", default=None, help="JSON path (default results/meta_gradient_"
                                                "<device>.json)")
    return ap


def main(argv=None):
    ap = build_parser()
    args = ap.parse_args(argv)
    dev = pick_device(args.device)
    if args.cuda_graph and dev.type != "cuda":
        ap.error(f"--cuda-graph captures CUDA graphs: it needs a GPU, got --device {dev.type}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.settings, args.rounds = "5w1s", 1
        args.meta_batch = args.meta_batch or 8
        args.inner_steps = args.inner_steps or 4
        args.hf_steps, args.baseline_tasks = min(args.hf_steps, 2), args.baseline_tasks or 1
    args.methods = tuple(m.strip() for m in args.methods.split(","))
    t0 = time.perf_counter()
    stem = "hvp_compiled" if args.hvp_only and args.compile_hvp else \
        "hvp_cost" if args.hvp_only else "meta_gradient"
    out = Path(args.out) if args.out else RESULTS / (
        f"{stem}_{dev.type}{'_quick' if args.quick else ''}.json")
    runs = []

    def summary(runs):
        return [ln for r in runs for ln in (_hvp_lines(r) if args.hvp_only else _meta_lines(r))]

    for name in (s.strip() for s in args.settings.split(",")):
        ways, shots, queries, steps, M, nb, nm = SETTINGS[name]
        if dev.type == "cpu" and name == "20w5s":
            M, nm = 8, 1  # 100 images a task: 32 tasks x 25 steps do not fit 10 CPU minutes
        M = args.meta_batch or M
        spec = (ways, shots, queries, args.inner_steps or steps, M,
                min(M, args.baseline_tasks or nb), min(M, args.maml_tasks or nm))
        runs.append(run_setting(name, spec, args, dev))
        # One JSON per setting done, so a run cut short keeps its numbers.
        write_json(out, {"benchmark": "meta_gradient", "args": vars(args), "settings": runs,
                         "complete": False, "summary_lines": summary(runs)}, dev)
    env = environment(dev)
    payload = {"benchmark": "meta_gradient", "complete": True, "quick": args.quick,
               "args": vars(args), "settings": runs, "seconds": time.perf_counter() - t0,
               "environment": env}
    payload["summary_lines"] = summary(runs)
    write_json(out, payload, dev)
    print()
    print(f"machine: {machine_line(env)}; load average {env.get('load_average')}")
    if args.hvp_only:
        print("\n".join(payload["summary_lines"]))
        print(f"\nwrote {out} ({payload['seconds']:.0f} s)")
        return payload
    for r in runs:
        print(f"\n{r['setting']}: meta-batch {r['meta_batch']}, {r['inner_steps']} inner steps, "
              f"{r['cg_steps']} CG steps, HF {r['hf_newton_steps']} Newton steps, "
              f"{r['rounds']} round(s)")
        rows = [[k, v["tasks_timed"], v["median_s"], v["tasks_per_s"], v["cpu_s_per_task"],
                 None if v["peak_bytes"] is None else v["peak_bytes"] / 2**20]
                for k, v in r["results"].items()]
        print(fmt_table(["method", "tasks", "s/call (median)", "tasks/s", "CPU s/task",
                         "peak MiB"], rows))
        for peer, sp in r.get("speedup_imaml_gd", {}).items():
            print(f"  iMAML-GD vs {peer}: {sp['median']:.2f}x tasks/s (median of per-round "
                  f"ratios {[round(x, 2) for x in sp['per_round']]}; CPU time per task "
                  f"{sp['cpu_time']:.2f}x)")
        print("  HVP / gradient: " + ", ".join(f"{k} {v:.2f}x" for k, v in
                                               r["hvp_cost"]["ratio_to_grad"].items()))
        c = r["correctness"]
        print(f"  correctness vs peers (float64): {'passed' if c['passed'] else 'FAILED'} "
              f"(rel. err. authors {c['rel_err_vs_authors']}, torchopt "
              f"{c.get('rel_err_vs_torchopt') or c.get('torchopt_error')})")
    print(f"\nwrote {out} ({payload['seconds']:.0f} s)")
    return payload


def _meta_lines(r) -> list[str]:
    """The figures of one setting that the issue's targets name: iMAML-GD's speed against the
    peers, one HVP against one gradient, and the CG phase against cg_steps separate HVPs."""
    head = f"{r['setting']} M={r['meta_batch']}"
    lines = [f"{head}: iMAML-GD vs {peer} {sp['median']:.2f}x tasks/s"
             for peer, sp in r.get("speedup_imaml_gd", {}).items()]
    if "speedup_compiled_hvp" in r:
        lines.append(f"{head}: iMAML-GD with compile_hvp=True "
                     f"{r['speedup_compiled_hvp']['median']:.2f}x the default's tasks/s (first "
                     f"call, compiling: {r['compiled_hvp_first_call_s']:.1f} s)")
    lines += _hvp_lines(r)
    ph = r.get("imaml_gd_phases", {})
    cg = ph.get("cg_with_hvps", {}).get("median_s")
    ratio = ph.get("cg_phase_ratio")
    one = ratio and ratio["one_hvp_median_s"]
    k = max(r["cg_steps"], 1)
    if ratio and cg:
        lines.append(f"{head}: CG phase {cg * 1e3:.1f} ms = {ratio['median']:.2f}x its {k} "
                     f"products alone ({one * 1e3:.2f} ms each), median of "
                     f"{len(ratio['per_round'])} rounds' ratios ({ratio['min']:.2f}-"
                     f"{ratio['max']:.2f}x)")
    cap = ph.get("captured_build_and_cg", {}).get("median_s")
    build = ph.get("graph_build", {}).get("median_s")
    if cap and cg and build and one:
        lines.append(f"{head}: graph build + CG as one CUDA graph {cap * 1e3:.1f} ms against "
                     f"{(build + cg) * 1e3:.1f} ms eager ({(build + cg) / cap:.2f}x); = "
                     f"{cap / (build + k * one):.2f}x (the build + {k} eager HVPs); max rel. "
                     f"diff from eager {ph.get('captured_max_rel_diff', float('nan')):.1e}")
    for tag, what in (("cuda_graph", "cuda_graph=True"), ("cuda_graph_step", "cuda_graph='step'")):
        if f"speedup_{tag}" in r:
            fb = r.get(f"{tag}_fallback")
            lines.append(f"{head}: iMAML-GD with {what} "
                         f"{r[f'speedup_{tag}']['median']:.2f}x the default's tasks/s (first "
                         f"call, capturing: {r[f'{tag}_first_call_s']:.2f} s)"
                         + (f"; CAPTURE FAILED, ran eagerly: {fb[0]}" if fb else ""))
    return lines


def _hvp_lines(r) -> list[str]:
    h = r["hvp_cost"]
    ratio = h["ratio_to_grad"]
    lines = [f"{r['setting']} M={r['meta_batch']}: one gradient {h['grad']['median_s'] * 1e3:.1f} ms;"
             " HVP / gradient: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratio.items())]
    c = h.get("compiled")
    if c and "error" in c:
        lines.append(f"{r['setting']}: compiled HVP failed: {c['error']}")
    elif c:
        lines.append(
            f"{r['setting']}: compiled HVP {c['steady_median_s'] * 1e3:.1f} ms "
            f"({c['ratio_to_grad']:.2f} gradients), first call (compilation) "
            f"{c['first_call_s']:.1f} s; speed-up vs eager forward-over-reverse "
            f"{c['speedup_vs_eager_forward_over_reverse_one_fold']:.2f}x (one fold), "
            f"{c['speedup_vs_eager_forward_over_reverse']:.2f}x (default layout), vs the exact "
            f"product per CG step {c['speedup_vs_exact_per_cg_product']:.2f}x; rel. err. vs "
            f"eager {c['rel_err_vs_eager']:.1e} (median task "
            f"{c['rel_err_vs_eager_median_task']:.1e}; {c['tasks_over_1e-4']} of {c['tasks']} "
            "tasks above 1e-4: on a ReLU/max-pool kink, see probes/hvp_kinks.py)"
            + ("" if c["rel_err_vs_eager_median_task"] <= 1e-3 else
               "; the median task differs by more than 1e-3: a different computation, its "
               "timing is not comparable"))
    return lines


if __name__ == "__main__":
    main()
