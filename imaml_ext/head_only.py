"""Head-only adaptation (ANIL-style) for iMAML: only the linear softmax head is adapted per task,
on features of a body that keeps the meta-parameters.

    algo = make_algorithm("imaml-gd", adapt="head")     # or "imaml-hf"
    grads, metrics = algo.meta_gradient(model, params, tasks)   # grads for body AND head

The model is split into a body b(theta_body, x) -> features (n, f) and a linear head
(W (c, f), bias (c)): a ConvNet (its `body` and `head`) or an nn.Sequential ending in nn.Linear.

The math, per task (M tasks at once; F_s = b(theta_body, x_support), F_q = b(theta_body, x_query),
each with its own BatchNorm batch statistics, as in full adaptation):

    inner:  phi* = argmin_phi G(phi) = L_tr(phi; F_s) + lam/2 ||phi - theta_head||^2,
            L_tr(phi; F) = (1/n) sum_i CE(W f_i + bias, y_i),  phi = (W, bias).
    outer:  L_test(phi*; F_q).

G is strongly convex in phi (the softmax cross-entropy of a linear head is convex; its Hessian H
is positive semi-definite and equals the Gauss-Newton matrix), so phi* is unique and the
stationarity condition grad_phi L_tr(phi*; F_s) + lam (phi* - theta_head) = 0 defines phi* as a
function of (theta_head, F_s). Differentiating it (implicit function theorem):

    (H + lam I) d phi* = lam d theta_head - C d F_s,    C = d/dF_s grad_phi L_tr(phi*; F_s),

so with g = grad_phi L_test(phi*; F_q) and u = (I + H/lam)^-1 g (H symmetric):

    dL/d theta_head = (I + H/lam)^-1 g = u                                   (iMAML's formula)
    dL/d F_s        = -g^T (H + lam I)^-1 C = -(1/lam) u^T C
                    = -(1/lam) d/dF_s <u, grad_phi L_tr(phi*; F_s)>          (u held fixed)
    dL/d F_q        = d/dF_q L_test(phi*; F_q)                               (phi* held fixed)
    dL/d theta_body = (dF_s/d theta_body)^T dL/dF_s + (dF_q/d theta_body)^T dL/dF_q.

Both feature cotangents have closed forms. With P = softmax(F W^T + bias) row-wise, Y the one-hot
labels, S = F U^T + u_bias the direction's logits (u = (U, u_bias)) and
Omega = P * (S - rowsum(P * S)) (the same product as in the Hessian-vector kernel):

    dL/dF_q = (P_q - Y_q) W / n_q,        dL/dF_s = -((P_s - Y_s) U + Omega_s W) / (lam n_s),

and one reverse pass through the body's two forward graphs gives dL/d theta_body; no second
derivative of the body is ever taken, and the head's derivatives never go through autograd.

Where the numbers come from:
- gradients and losses of the head: closed form (one bmm for the logits, one for the gradient);
- iMAML-GD inner loop: `steps` GD steps on G (proximal "paper": the term in every step;
  "authors": plain steps then one proximal step), all tasks at once, each task's step size
  min(inner_lr, 1 / (lam + L_i)) with L_i a bound on its Hessian's norm (see `head_gd`);
- iMAML-HF inner loop: Newton-CG on G, each direction from the whole-loop fused CG op
  `cg_solve_softmax_head` on (H + lam I) d = -grad G, and a backtracking Armijo search over
  t in {1, 1/2, ..., 1/2^7}: G along the ray is G(phi + t d) with logits Z0 + t Zd (two bmm's),
  so every step size of every task is evaluated at once;
- the implicit solve: `cg_steps` iterations of `cg_solve_softmax_head` on
  ((1 + damping) I + H / cg_lam) u = g. The defaults damping=0, cg_lam=lam are the paper's
  (I + H/lam); with the authors' variant the body term still uses -(1/lam) u, i.e.
  (H + lam I)^-1 g = (1/lam) (I + H/lam)^-1 g with u standing for (I + H/lam)^-1 g.

`use_ext` selects the compiled CG kernels (None: when built) or their pure-PyTorch twins
(imaml_ext.reference), which give the same numbers up to rounding.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from imaml_ext import reference
from imaml_ext.ops import check_softmax_head
from imaml_ext.hvp import Params, TaskLoss, _param_slots, functional_forward
from imaml_ext.implicit import _check_matrix_args, _no_solve
from imaml_ext.inner import PROXIMAL, NewtonLog, _check, batched_theta, check_newton_args
from imaml_ext.linalg import CGResult, _cg
from imaml_ext.structured import SoftmaxHeadOperator

ADAPT = ("all", "head")
HEAD_HVP = ("exact", "ggn")  # the same matrix for a linear softmax head


# ---- the model split ----------------------------------------------------------------------------

@dataclass(frozen=True)
class HeadSplit:
    """A model seen as body + linear head.

    Attributes:
        body: the feature extractor (an nn.Module whose parameter names are the model's without
            `body_prefix`).
        body_prefix: prefix of the body's parameters in the model ("body." for a ConvNet).
        weight, bias: the model's names of the head's weight (c, f) and bias (c,).
        body_names: the model's names of the body's parameters.
    """

    body: nn.Module
    body_prefix: str
    weight: str
    bias: str
    body_names: tuple[str, ...]


def split_head(model: nn.Module) -> HeadSplit:
    """Splits a ConvNet-like model (`body` then `head`, forward = head(body(x))) or an
    nn.Sequential whose last layer is an nn.Linear; ValueError naming `model` otherwise."""
    from imaml_ext.models import ConvNet  # noqa: PLC0415 (models is a sibling layer)

    if type(model) is ConvNet:
        body, head, body_prefix, head_prefix = model.body, model.head, "body.", "head."
    elif type(model) is nn.Sequential and len(model) > 1:
        # _modules, not named_children(): that skips a module met before, so a layer used
        # twice (nn.Sequential(lin, act, lin2, act, head)) would be left out of the body
        children = list(model._modules.items())
        head_name, head = children[-1]
        body = nn.Sequential(OrderedDict(children[:-1]))
        body_prefix, head_prefix = "", f"{head_name}."
    else:
        raise ValueError(f"model: adapt='head' needs a ConvNet or an nn.Sequential ending in "
                         f"nn.Linear, got {type(model).__name__}")
    if type(head) is not nn.Linear or head.bias is None:
        raise ValueError("model: adapt='head' needs a linear head with a bias (nn.Linear(f, c)), "
                         f"got {head!r}")
    body_names = tuple(body_prefix + k for k, _ in body.named_parameters())
    names = {k for k, _ in model.named_parameters()}
    if set(body_names) | {head_prefix + "weight", head_prefix + "bias"} != names:
        raise ValueError("model: its parameters are not exactly the body's and the head's")
    return HeadSplit(body, body_prefix, head_prefix + "weight", head_prefix + "bias", body_names)


class HeadModel:
    """The body's batched features and the head's names, for one model.

    Args:
        model: see `split_head`.
        backend: "auto", "folded" or "vmap": how the body runs M tasks at once (imaml_ext.hvp).
    """

    def __init__(self, model: nn.Module, backend: str = "auto"):
        self.model = model
        self.split = split_head(model)
        self._body = TaskLoss(self.split.body, "cross_entropy", backend)

    def body_params(self, params: Mapping[str, torch.Tensor]) -> Params:
        """The body's entries of a model params dict, under the body module's own names."""
        n = len(self.split.body_prefix)
        return {k[n:]: params[k] for k in self.split.body_names}

    def features(self, params_b: Mapping[str, torch.Tensor], x_b: torch.Tensor) -> torch.Tensor:
        """(M, N, f) features of x_b (M, N, ...) under batched model params (body entries only
        are read); every task's BatchNorm uses its own batch statistics."""
        out = self._body.outputs(self.body_params(params_b), x_b)
        return out.reshape(out.shape[0], out.shape[1], -1)


# ---- the softmax head in closed form ------------------------------------------------------------

def head_logits(F_: torch.Tensor, W: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """(M, n, c) = F W^T + bias for F (M, n, f), W (M, c, f), bias (M, c)."""
    return torch.baddbmm(bias.unsqueeze(1), F_, W.transpose(1, 2))


def _ce(z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-task mean cross-entropy (..., M), log-probabilities) of logits z (..., M, n, c)."""
    logp = torch.log_softmax(z, dim=-1)
    nll = -logp.gather(-1, y.expand(*z.shape[:-1]).unsqueeze(-1)).squeeze(-1)
    return nll.mean(-1), logp


def head_loss(F_, W, bias, y) -> torch.Tensor:
    """(M,) mean cross-entropy of the head (W, bias) on features F (M, n, f), labels y (M, n)."""
    return _ce(head_logits(F_, W, bias), y)[0]


def _residual(probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(P - Y) / n: the gradient of the mean cross-entropy in the logits (M, n, c)."""
    r = probs.clone()
    r.scatter_add_(-1, y.unsqueeze(-1), torch.full_like(r[..., :1], -1.0))
    return r / max(y.shape[1], 1)


def head_loss_grad(F_, W, bias, y):
    """(loss (M,), grad_W (M, c, f), grad_bias (M, c), probs (M, n, c)) in closed form."""
    loss, logp = _ce(head_logits(F_, W, bias), y)
    probs = logp.exp()
    r = _residual(probs, y)
    return loss, torch.bmm(r.transpose(1, 2), F_), r.sum(1), probs


def _join(W, bias):
    return reference.softmax_head_join(W, bias)


def _split(v, c, f):
    return reference.softmax_head_split(v, c, f)


# ---- inner solvers on the head ------------------------------------------------------------------

@dataclass
class HeadInner:
    """What a head inner solver returns.

    Attributes:
        W, bias: (M, c, f), (M, c) adapted heads.
        loss: (M,) L_tr at the result. loss_first: (M,) L_tr at theta_head.
        finite: (M,) bool, False where a loss or a parameter went NaN/Inf.
        metrics: solver-specific (M,)-shaped tensors (HF: "hf_objective", step sizes, CG).
    """

    W: torch.Tensor
    bias: torch.Tensor
    loss: torch.Tensor
    loss_first: torch.Tensor
    finite: torch.Tensor
    metrics: dict = field(default_factory=dict)


def _finite(*ts) -> torch.Tensor:
    ok = None
    for t in ts:
        f = torch.isfinite(t.reshape(t.shape[0], -1)).all(1)
        ok = f if ok is None else ok & f
    return ok


def head_smoothness(F_: torch.Tensor) -> torch.Tensor:
    """(M,) an upper bound on ||H||, H the Hessian of the mean softmax cross-entropy in (W, bias)
    on features F (M, n, f), whatever the head: with X = [F, 1] (n, f+1),
    H = (1/n) sum_j (diag(p_j) - p_j p_j^T) (x) x_j x_j^T and diag(p) - p p^T <= I/2
    (Gershgorin: row k sums to 2 p_k (1 - p_k) <= 1/2), so
    ||H|| <= ||X^T X|| / (2n) <= ||X X^T||_F / (2n). No decomposition (no host synchronisation,
    NaN propagates instead of raising)."""
    X = torch.cat([F_, F_.new_ones(*F_.shape[:2], 1)], dim=-1)
    gram = torch.bmm(X, X.transpose(1, 2)) if X.shape[1] <= X.shape[2] else \
        torch.bmm(X.transpose(1, 2), X)
    return torch.linalg.matrix_norm(gram) / (2 * max(F_.shape[1], 1))


def _check_head_inputs(who: str, F_, W, b, y=None, names=("F_", "W0", "b0")) -> None:
    """ValueError naming the argument unless F_ (M, n, f), W (M, c, f) and b (M, c) are one
    floating dtype on one device (ops.check_softmax_head) and y, if given, is (M, n) int64 (in
    [0, c) on the CPU; on a GPU that would be a host read: the algorithms mask such labels on
    the device)."""
    check_softmax_head(who, F_, W, b, 0.0, 1.0, names=names)
    if y is None:
        return
    (M, n, _), c = F_.shape, W.shape[1]
    if not isinstance(y, torch.Tensor) or y.dtype != torch.int64 or tuple(y.shape) != (M, n) \
            or y.device != F_.device:
        got = f"{y.dtype} {tuple(y.shape)} on {y.device}" if isinstance(y, torch.Tensor) \
            else type(y).__name__
        raise ValueError(f"{who}: y must be (M, n) = ({M}, {n}) int64 labels on {F_.device}, "
                         f"got {got}")
    if y.device.type == "cpu" and y.numel() and not bool(((y >= 0) & (y < c)).all()):
        raise ValueError(f"{who}: y must hold labels in [0, {c}) ({names[1]} has c={c} "
                         f"classes), got {int(y.min())}..{int(y.max())}")


def _norm(gW, gb) -> torch.Tensor:
    """(M,) norm of the head gradient (gW, gb)."""
    return torch.sqrt(gW.square().sum((1, 2)) + gb.square().sum(1))


def _grad_norm(F_, W, b, y, W0, b0, lam_in: float) -> torch.Tensor:
    """(M,) norm of the gradient of L_tr + lam_in/2 ||(W, b) - (W0, b0)||^2."""
    _, gW, gb, _ = head_loss_grad(F_, W, b, y)
    if lam_in:
        gW = gW + lam_in * (W - W0)
        gb = gb + lam_in * (b - b0)
    return _norm(gW, gb)


def head_gd(F_, y, W0, b0, *, lam: float, steps: int, lr: float, proximal: str = "paper",
            safeguard: bool = True) -> HeadInner:
    """`steps` GD steps on G = L_tr + lam/2 ||phi - (W0, b0)||^2 for M heads at once.

    The step of task i is min(lr, 1 / (lam + L_i)) with L_i = head_smoothness(F_i) >= ||H_i||
    (safeguard=True, the default), so G decreases at every step whatever the scale of the
    features: meta-training the body under head-only adaptation makes its features grow, and a
    fixed step then diverges (on Omniglot 5-way 1-shot, ||H|| went from about 20 at the
    initialisation to over 100 within 20 meta-steps, beyond the 2/lr - lam = 18 that lr = 0.1
    tolerates; benchmarks/bench_head_only.py measures both). safeguard=False: the fixed step lr.

    Args:
        F_: (M, n, f) support features (no graph). y: (M, n) int64 labels.
        W0, b0: (M, c, f), (M, c) starting points and proximal centres.
        lam: >= 0. steps: >= 0. lr: > 0. proximal: "paper" or "authors" (imaml_ext.inner.gd;
            "authors" bounds the step by 1 / L_i, its steps having no proximal term).

    The safeguarded step converges slowly where L_i >> lam (rate about 1 - lam / (lam + L_i) a
    step): as meta-training grows the features, K steps leave phi far from argmin G, and the
    implicit meta-gradient, which assumes the minimiser, drifts from the exact one (a review on
    2026-11-29 measured 15% relative error after one meta-step of Omniglot 5-way 1-shot and 2.3x
    after 3000, the body's part worst; head_hessian_free stayed at 13%). "head_grad_ratio"
    reports it: |grad G(phi_K)| / |grad G(theta)| per task, how far from the minimiser of G
    the implicit meta-gradient is taken (with proximal="authors" the steps minimise L_tr and
    then take one proximal step, which does not lead to argmin G: the ratio stays large).

    Returns:
        HeadInner with metrics {"head_lr": (M,) the step sizes taken, "head_grad_ratio": (M,)}.
    """
    _check(steps, lr, lam)
    _check_head_inputs("head_gd", F_, W0, b0, y)
    if proximal not in PROXIMAL:
        raise ValueError(f"proximal must be one of {PROXIMAL}, got {proximal!r}")
    lam_in = lam if proximal == "paper" else 0.0
    step = F_.new_full((F_.shape[0],), float(lr))
    if safeguard:
        step = torch.minimum(step, 1.0 / (lam_in + head_smoothness(F_)))
    sW, sb = step.view(-1, 1, 1), step.view(-1, 1)
    W, b = W0, b0
    loss_first, g_first = None, None
    for _ in range(steps):
        loss, gW, gb, _ = head_loss_grad(F_, W, b, y)
        if loss_first is None:
            loss_first = loss
            g_first = _norm(gW, gb)  # at W0, b0, where the proximal term's gradient is 0
        if lam_in:
            gW = gW + lam_in * (W - W0)
            gb = gb + lam_in * (b - b0)
        W, b = W - sW * gW, b - sb * gb
    if proximal == "authors" and lam > 0:
        W, b = W - (sW * lam) * (W - W0), b - (sb * lam) * (b - b0)
    final = head_loss(F_, W, b, y)
    if g_first is None:
        ratio = torch.ones_like(final)
    else:
        g_last = _grad_norm(F_, W, b, y, W0, b0, lam)
        ratio = g_last / g_first.clamp_min(torch.finfo(g_first.dtype).tiny)
    return HeadInner(W, b, final, final if loss_first is None else loss_first,
                     _finite(W, b) & torch.isfinite(final),
                     {"head_lr": step, "head_grad_ratio": ratio})


def head_hessian_free(F_, y, W0, b0, *, lam: float, steps: int = 4, cg_steps: int = 5,
                      armijo: float = 1e-4, backtrack: float = 0.5, ls_steps: int = 8,
                      cg_rtol: float = 1e-10, use_ext: bool | None = None) -> HeadInner:
    """Newton-CG on G for M heads at once (the iMAML-HF inner solver, head only).

    Per iteration and task: `cg_steps` iterations of the fused whole-loop CG on
    (H + lam I) d = -grad G from d = 0 (H positive semi-definite, so the matrix is positive
    definite; a direction that is not one of descent, e.g. after NaN, falls back to -grad G), then
    the largest t in {1, backtrack, ..., backtrack^(ls_steps-1)} with
    G(phi + t d) <= G(phi) + armijo t grad G . d, all t at once from the logits Z0 + t Zd. A task
    with no such t (features so large that even the shortest step overshoots) takes the gradient
    step -grad G / (lam + L_i) instead, L_i = head_smoothness(F_) bounding the loss's Hessian
    everywhere, so G decreases by at least |grad G|^2 / (2 (lam + L_i)) (counted in
    "hf_ls_failures"; such a task stayed at theta before 2026-11-29, its meta-gradient taken
    there as if it were the minimiser).

    Returns:
        HeadInner with metrics as imaml_ext.inner.hessian_free's: "hf_objective" (steps+1, M),
        "hf_step_size", "hf_ls_failures", "hf_negative_curvature", "hf_cg_iterations",
        "hf_cg_residual", and "head_grad_ratio" as head_gd's.
    """
    check_newton_args(steps, lam, cg_steps, armijo, backtrack, ls_steps)
    _check_head_inputs("head_hessian_free", F_, W0, b0, y)
    M, c, f = W0.shape
    theta = _join(W0, b0)
    phi = theta.clone()
    # made on the device (a tensor from a Python list would be a host-to-device copy per call)
    ts = torch.full((ls_steps,), float(backtrack), dtype=phi.dtype, device=phi.device).pow(
        torch.arange(ls_steps, dtype=phi.dtype, device=phi.device))
    finite = torch.ones(M, dtype=torch.bool, device=phi.device)
    log = NewtonLog(phi)
    fallback_t = (1.0 / (lam + head_smoothness(F_))).unsqueeze(1) if steps else None
    g_first = None
    for _ in range(steps):
        W, b = _split(phi, c, f)
        z0 = head_logits(F_, W, b)
        L0, logp = _ce(z0, y)
        r = _residual(logp.exp(), y)
        delta = phi - theta
        g = _join(torch.bmm(r.transpose(1, 2), F_), r.sum(1)).add_(delta, alpha=lam)
        if g_first is None:
            g_first = g.norm(dim=1)
        dd = (delta * delta).sum(1)
        G0 = L0 + 0.5 * lam * dd
        log.objective.append(G0)
        finite &= torch.isfinite(G0) & torch.isfinite(g).all(1)
        op = SoftmaxHeadOperator(F_, W.contiguous(), b.contiguous(), shift=lam, scale=1.0)
        d, slope = log.direction(op, g, cg_steps=cg_steps, cg_rtol=cg_rtol, use_ext=use_ext)
        # G(phi + t d) for every t of the ladder: logits z0 + t zd, proximal term quadratic in t.
        dW, db = _split(d, c, f)
        zd = head_logits(F_, dW, db)
        Lt = _ce(z0.unsqueeze(0) + ts.view(-1, 1, 1, 1) * zd.unsqueeze(0), y)[0]  # (T, M)
        tt = ts.view(-1, 1)
        Gt = Lt + 0.5 * lam * (dd + 2 * tt * (delta * d).sum(1) + tt * tt * (d * d).sum(1))
        ok = torch.isfinite(Gt) & (Gt <= G0 + log.rounding(G0) + armijo * tt * slope)
        first = ok.to(torch.int8).argmax(0)  # the largest passing t (ts is decreasing)
        t_sel = torch.where(ok.any(0), ts[first], torch.zeros_like(G0))
        # stationary to working precision: no step (t = 0), and neither a failure nor the
        # fallback step
        found = ok.any(0) | log.stationary(slope, G0)
        log.line_search(found, t_sel)
        move = torch.where(found.unsqueeze(1), t_sel.unsqueeze(1) * d, -fallback_t * g)
        phi = phi + torch.where(finite.unsqueeze(1), move, torch.zeros_like(d))
    W, b = _split(phi, c, f)
    final = head_loss(F_, W, b, y)
    delta = phi - theta
    log.objective.append(final + 0.5 * lam * (delta * delta).sum(1))
    finite &= torch.isfinite(final) & torch.isfinite(phi).all(1)
    metrics = log.metrics()
    if g_first is None:
        metrics["head_grad_ratio"] = torch.ones_like(final)
    else:
        g_last = _grad_norm(F_, W, b, y, W0, b0, lam)
        metrics["head_grad_ratio"] = g_last / g_first.clamp_min(torch.finfo(g_first.dtype).tiny)
    return HeadInner(W, b, final, log.objective[0] if steps else final, finite, metrics)


# ---- the implicit solve and the meta-gradient ---------------------------------------------------

def head_implicit_solve(F_, W, bias, rhs, *, lam: float, cg_steps: int = 5,
                        damping: float = 0.0, cg_lam: float | None = None, rtol: float = 1e-10,
                        atol: float = 0.0, use_ext: bool | None = None
                        ) -> tuple[torch.Tensor, CGResult]:
    """u with ((1 + damping) I + H / cg_lam) u = rhs per task, H the head's cross-entropy
    Hessian at (W, bias) on F, by the fused whole-loop CG (`cg_steps` iterations; 0: u = rhs).

    Args:
        F_: (M, n, f). W: (M, c, f). bias: (M, c). rhs: (M, c*(f+1)) in the layout
            [W row-major, then bias].
        lam, cg_steps, damping, cg_lam, rtol, atol, use_ext: as implicit_meta_gradient.

    Returns:
        (u (M, c*(f+1)), CGResult); a system that meets negative curvature before any step keeps
        rhs (as in imaml_ext.implicit).
    """
    cg_lam = _check_matrix_args(lam, cg_steps, damping, cg_lam, rtol, atol)
    _check_head_inputs("head_implicit_solve", F_, W, bias, names=("F_", "W", "bias"))
    if not isinstance(rhs, torch.Tensor) or rhs.dtype != F_.dtype or rhs.device != F_.device:
        got = f"({rhs.dtype}, {rhs.device})" if isinstance(rhs, torch.Tensor) \
            else type(rhs).__name__
        raise ValueError(f"head_implicit_solve: rhs must have F_'s dtype and device ({F_.dtype}, "
                         f"{F_.device}), got {got}")
    b = rhs.detach()
    M, c, f = W.shape
    if b.shape != (M, c * (f + 1)):
        raise ValueError(f"rhs must be (M, c*(f+1)) = ({M}, {c * (f + 1)}), got "
                         f"{tuple(b.shape)}")
    if cg_steps == 0:
        return b, _no_solve(b)
    op = SoftmaxHeadOperator(F_, W.contiguous(), bias.contiguous(), shift=1.0 + float(damping),
                             scale=1.0 / cg_lam)
    res = _cg(op, b, max_iter=cg_steps, rtol=rtol, atol=atol, batched=True, use_ext=use_ext,
              fallback=b)
    return res.x, res


InnerFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], HeadInner]


def head_meta_gradient(hm: HeadModel, params: Mapping[str, torch.Tensor], tasks, inner: InnerFn,
                       *, lam: float, cg_steps: int = 5, damping: float = 0.0,
                       cg_lam: float | None = None, rtol: float = 1e-10,
                       use_ext: bool | None = None):
    """Per-task meta-gradients of head-only iMAML (see the module docstring for the math).

    Args:
        hm: the HeadModel. params: the model's unbatched, detached params.
        tasks: a checked TaskBatch (M tasks, int64 labels).
        inner: (F_support, y_support, W0 (M, c, f), b0 (M, c)) -> HeadInner.
        lam, cg_steps, damping, cg_lam, rtol, use_ext: the implicit solve.

    Returns:
        (grads: dict name -> (M, ...) per-task meta-gradients for every parameter,
         finite (M,) bool, metrics dict of (M,) tensors).
    """
    s = hm.split
    pb = batched_theta(params, tasks.num_tasks)
    W0, b0 = pb[s.weight], pb[s.bias]
    c, f = W0.shape[1], W0.shape[2]
    with torch.enable_grad():
        # per-task copies: each task's body gradient is its own block (for the task_ok average)
        body = {k: pb[k].clone().requires_grad_(True) for k in s.body_names}
        Fs = hm.features(body, tasks.x_support)
        Fq = hm.features(body, tasks.x_query)
    if Fs.shape[-1] != f:
        raise ValueError(f"model: the body gives {Fs.shape[-1]} features but the head takes {f}")
    Fs_d, Fq_d = Fs.detach(), Fq.detach()
    res_in = inner(Fs_d, tasks.y_support, W0, b0)
    W, b = res_in.W, res_in.bias
    lq, gqW, gqb, pq = head_loss_grad(Fq_d, W, b, tasks.y_query)
    u, res = head_implicit_solve(Fs_d, W, b, _join(gqW, gqb), lam=lam, cg_steps=cg_steps,
                                 damping=damping, cg_lam=cg_lam, rtol=rtol, use_ext=use_ext)
    uW, ub = _split(u, c, f)
    # Feature cotangents (module docstring): query through phi* fixed, support through phi*(F_s).
    cot_q = torch.bmm(_residual(pq, tasks.y_query), W)
    ps = torch.softmax(head_logits(Fs_d, W, b), dim=-1)
    sdir = head_logits(Fs_d, uW, ub)
    omega = ps * (sdir - (ps * sdir).sum(-1, keepdim=True))
    n_s = max(Fs_d.shape[1], 1)
    cot_s = (torch.bmm(_residual(ps, tasks.y_support), uW) + torch.bmm(omega, W) / n_s) \
        .mul_(-1.0 / lam)
    leaves = [body[k] for k in s.body_names]
    if leaves:
        gb = torch.autograd.grad([Fs, Fq], leaves, grad_outputs=[cot_s, cot_q], allow_unused=True)
    else:
        gb = []
    grads = {k: torch.zeros_like(t) if g is None else g
             for k, t, g in zip(s.body_names, leaves, gb)}
    grads[s.weight] = uW
    grads[s.bias] = ub
    finite = res_in.finite & torch.isfinite(lq) & _finite(Fs_d, Fq_d)
    metrics = {"inner_loss": res_in.loss, "inner_loss_before": res_in.loss_first,
               "query_loss": lq, "query_acc": _accuracy(pq, tasks.y_query),
               "cg_residual": res.residual_norm, "cg_iterations": res.iterations,
               "cg_status": res.status,
               "cg_negative_curvature": res.status == reference.NEGATIVE_CURVATURE}
    metrics.update(res_in.metrics)
    return grads, finite, metrics


def _accuracy(scores: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (scores.argmax(-1) == y).to(scores.dtype).mean(1)


def head_evaluate(hm: HeadModel, params, tasks, inner: InnerFn):
    """Adapts the heads on the support features, then (query loss (M,), query accuracy (M,))."""
    pb = batched_theta(params, tasks.num_tasks)
    with torch.no_grad():
        Fs = hm.features(pb, tasks.x_support)
        Fq = hm.features(pb, tasks.x_query)
        r = inner(Fs, tasks.y_support, pb[hm.split.weight], pb[hm.split.bias])
        z = head_logits(Fq, r.W, r.bias)
        return _ce(z, tasks.y_query)[0], _accuracy(z, tasks.y_query)


def head_adapt(hm: HeadModel, params, x_support, y_support, inner: InnerFn) -> Params:
    """dict of (M, ...) adapted params: the body broadcast unchanged, the heads adapted."""
    s = hm.split
    out = batched_theta(params, x_support.shape[0])
    with torch.no_grad():
        r = inner(hm.features(out, x_support), y_support, out[s.weight], out[s.bias])
    out[s.weight], out[s.bias] = r.W, r.bias
    return out


def unrolled_meta_gradient(model: nn.Module, params: Mapping[str, torch.Tensor], tasks, *,
                           lam: float, steps: int | None = None, lr: float | None = None,
                           tol: float = 1e-15, support_path: bool = True) -> Params:
    """The test oracle: the same meta-gradient by plain autograd, one task at a time, through
    unrolled GD steps on the head's G (create_graph), averaged over the tasks.

    Nothing of the implicit route is used: the features come from the body module itself
    (functional_call), the head's gradients from autograd, the derivative through phi* from
    differentiating the unrolled iterates. GD with lr <= 1 / (lam + ||H||) on the strongly convex
    G contracts by at least (1 - lr lam) per step, in the iterate and in its derivative, so the
    last iterate's derivative converges to the implicit one. lr=None takes
    1 / (lam + max_i (||f_i||^2 + 1) / 2), a bound on that (the Hessian of one sample's
    cross-entropy in (W, bias) has norm <= (||f_i||^2 + 1) / 2); steps=None takes enough steps
    for (1 - lr lam)^steps <= tol. Use float64 for a tight check. support_path=False detaches
    the support features (the query path alone), to show what the implicit body term adds.
    """
    s = split_head(model)
    slots = _param_slots(s.body)
    n = len(s.body_prefix)
    out = []
    for i in range(tasks.x_support.shape[0]):
        th = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        body = {k[n:]: th[k] for k in s.body_names}
        Fs = functional_forward(s.body, body, tasks.x_support[i], slots).flatten(1)
        Fq = functional_forward(s.body, body, tasks.x_query[i], slots).flatten(1)
        step = lr if lr is not None else \
            1.0 / (lam + 0.5 * float((Fs.detach() ** 2).sum(1).max()) + 0.5)
        K = steps if steps is not None else \
            math.ceil(math.log(tol) / math.log1p(-min(step * lam, 0.5)))
        if not support_path:
            Fs = Fs.detach()
        W0, b0 = th[s.weight], th[s.bias]
        W, b = W0, b0
        for _ in range(K):
            loss = F.cross_entropy(Fs @ W.T + b, tasks.y_support[i])
            gW, gb = torch.autograd.grad(loss, [W, b], create_graph=True)
            W, b = W - step * (gW + lam * (W - W0)), b - step * (gb + lam * (b - b0))
        lq = F.cross_entropy(Fq @ W.T + b, tasks.y_query[i])
        gs = torch.autograd.grad(lq, list(th.values()), allow_unused=True)
        out.append([torch.zeros_like(v) if g is None else g for v, g in zip(th.values(), gs)])
    return {k: torch.stack([o[j] for o in out]).mean(0) for j, k in enumerate(params)}


__all__ = ["ADAPT", "HEAD_HVP", "HeadInner", "HeadModel", "HeadSplit", "head_adapt",
           "head_evaluate", "head_gd", "head_hessian_free", "head_implicit_solve", "head_loss",
           "head_loss_grad", "head_logits", "head_meta_gradient", "head_smoothness",
           "split_head", "unrolled_meta_gradient"]
