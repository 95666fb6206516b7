"""Inner-loop solvers, batched over the M tasks of a meta-batch.

The inner problem of task i (paper Eq. 4 / Sec. 3):

    phi_i* = argmin_phi G_i(phi) = L_train_i(phi) + (lam / 2) ||phi - theta||^2

- `gd`: K steps of gradient descent, all tasks at once. proximal="paper" puts the proximal term
  in every step (the paper's Eq. 4); proximal="authors" takes K plain steps on L_train and then
  one step on the proximal term alone, phi <- phi - lr * lam * (phi - theta) (the iMAML authors'
  code, aravindr93/imaml_dev); lam=0 is plain GD on L_train (MAML, Reptile). create_graph=True
  keeps the graph through the steps (MAML).
- `hessian_free`: Newton-CG on G. Per iteration and task: CG (hf_cg_steps, default 5) on
  (H + lam I) d = -grad G with exact or Gauss-Newton products, then a backtracking Armijo line
  search over t in {1, 1/2, ..., 1/2^7} evaluated for all tasks at once. Default 4 iterations.

Nothing here loops over tasks or reads a device value on the host, except CPU-only early exits
that cost no synchronisation (as in imaml_ext.cg). Non-finite losses do not raise: each result
carries a per-task `finite` mask that the algorithms turn into `task_ok`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch

from imaml_ext import reference
from imaml_ext.hvp import ParamSpec, Params, TaskLoss, expand_params, grad_of_params, make_hvp
from imaml_ext.linalg import ShiftedOperator, _cg

PROXIMAL = ("paper", "authors")


@dataclass
class InnerResult:
    """What an inner solver returns.

    Attributes:
        params: dict of (M, ...) adapted parameters phi_i.
        loss: (M,) L_train at the returned params (detached).
        finite: (M,) bool, False where a loss, gradient or parameter went NaN/Inf.
        metrics: solver-specific (M,)-shaped tensors (HF: step sizes, CG flags, ...).
    """

    params: Params
    loss: torch.Tensor
    finite: torch.Tensor
    metrics: dict = field(default_factory=dict)


def _check(steps, lr, lam, name_steps="steps"):
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"{name_steps} must be an int >= 0, got {steps!r}")
    if isinstance(lr, bool) or not (isinstance(lr, (int, float)) and 0 < lr < float("inf")):
        raise ValueError(f"inner_lr must be a finite number > 0, got {lr!r}")
    if isinstance(lam, bool) or not (isinstance(lam, (int, float)) and 0 <= lam < float("inf")):
        raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")


def batched_theta(theta: Mapping[str, torch.Tensor], M: int) -> Params:
    """theta as (M, ...) leaves: unbatched leaves are broadcast (no copy)."""
    return expand_params({k: v.detach() for k, v in theta.items()}, M)


def _finite_params(params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    leaves = list(params.values())
    M = leaves[0].shape[0]
    ok = torch.ones(M, dtype=torch.bool, device=leaves[0].device)
    for t in leaves:
        ok &= torch.isfinite(t.reshape(M, -1)).all(1)
    return ok


def train_loss(task_loss: TaskLoss, params_b, x, y) -> torch.Tensor:
    """(M,) L_train at params_b, without a graph."""
    with torch.no_grad():
        return task_loss(params_b, x, y)


def gd(task_loss: TaskLoss, theta_b: Mapping[str, torch.Tensor], x: torch.Tensor,
       y: torch.Tensor, *, steps: int, lr: float, lam: float = 0.0, proximal: str = "paper",
       create_graph: bool = False, final_loss: bool = True) -> InnerResult:
    """K gradient steps on G_i for all tasks.

    Args:
        task_loss: the TaskLoss of L_train.
        theta_b: dict of (M, ...) starting points and proximal centres (broadcast views are
            fine). With create_graph=True these should require grad (MAML's meta-parameters).
        x, y: support sets (M, N, ...).
        steps: K >= 0. lr: step size alpha. lam: proximal strength (0: plain GD on L_train).
        proximal: "paper" or "authors" (see the module docstring).
        create_graph: keep the graph through the steps (for backpropagation through them).
        final_loss: evaluate L_train at the result (one forward); False leaves `loss` None for
            a caller that gets it elsewhere (and `finite` then checks the parameters only).

    Returns:
        InnerResult with metrics {"loss_first": (M,) L_train at theta, None when steps=0 and
        final_loss=False}.
    """
    _check(steps, lr, lam)
    if proximal not in PROXIMAL:
        raise ValueError(f"proximal must be one of {PROXIMAL}, got {proximal!r}")
    names = list(theta_b)
    theta = dict(theta_b)
    phi = dict(theta_b)
    lam_in_steps = lam if proximal == "paper" else 0.0
    loss_first = None
    if create_graph:
        with torch.enable_grad():
            for _ in range(steps):
                # the layout whose second derivatives are cheap: this graph is differentiated again
                losses = task_loss(phi, x, y, mode="hvp")
                if loss_first is None:
                    loss_first = losses.detach()
                gs = grad_of_params(losses.sum(), {k: phi[k] for k in names}, create_graph=True)
                phi = {k: _step(phi[k], g, theta[k], lr, lam_in_steps) for k, g in zip(names, gs)}
            if proximal == "authors" and lam > 0:
                phi = {k: phi[k] - (lr * lam) * (phi[k] - theta[k]) for k in names}
    else:
        phi = {k: v.detach() for k, v in phi.items()}
        theta = {k: v.detach() for k, v in theta.items()}
        for i in range(steps):
            gs, losses, _ = task_loss.grad(phi, x, y)
            if loss_first is None:
                loss_first = losses.detach()
            phi = _step_all(phi, gs, theta, names, lr, lam_in_steps, owned=i > 0)
        if proximal == "authors" and lam > 0:
            phi = {k: phi[k] - (lr * lam) * (phi[k] - theta[k]) for k in names}
    final = train_loss(task_loss, phi, x, y) if final_loss else None
    if loss_first is None:
        loss_first = final
    finite = _finite_params(phi)
    if final is not None:
        finite &= torch.isfinite(final)
    return InnerResult(phi, final, finite, {"loss_first": loss_first})


def _step(p, g, t, lr, lam):
    if lam == 0.0:
        return p - lr * g
    return p - lr * (g + lam * (p - t))


def _step_all(phi, gs, theta, names, lr, lam, owned: bool):
    """`_step` on every leaf (no graph) with multi-tensor (_foreach) ops, updating the fresh
    gradients in place and phi too once it is our own buffer (owned; the first step's phi is
    theta, often a broadcast view): the same operations in the same order as `_step`, so the
    same values bit for bit, without five new (M, P)-sized tensors a step (on the CPU those
    were a seventh of a step's time on the Omniglot conv net, 5-way 1-shot, M=32)."""
    P = [phi[k] for k in names]
    G = [gs[k] for k in names]
    if lam != 0.0:
        d = torch._foreach_sub(P, [theta[k] for k in names])
        torch._foreach_mul_(d, lam)
        torch._foreach_add_(d, G)  # lam (p - t) + g: the same sum as g + lam (p - t)
        G = d
    torch._foreach_mul_(G, lr)
    if owned:
        torch._foreach_sub_(P, G)
    else:
        P = torch._foreach_sub(P, G)
    return dict(zip(names, P))


def objective(task_loss: TaskLoss, phi, theta, x, y, lam: float) -> torch.Tensor:
    """(M,) G_i(phi_i) = L_train_i(phi_i) + lam/2 ||phi_i - theta_i||^2, without a graph."""
    with torch.no_grad():
        return task_loss(phi, x, y) + 0.5 * lam * _sqdist(phi, theta)


def _sqdist(a, b) -> torch.Tensor:
    out = None
    for k in a:
        d = (a[k] - b[k]).reshape(a[k].shape[0], -1)
        s = (d * d).sum(1)
        out = s if out is None else out + s
    return out


def check_newton_args(steps, lam, cg_steps, armijo, backtrack, ls_steps) -> None:
    """ValueError naming the argument unless the Newton-CG settings are valid."""
    _check(steps, 1.0, lam)
    if not lam > 0:
        raise ValueError(f"lam must be > 0 for the Hessian-free solver, got {lam!r}")
    if isinstance(cg_steps, bool) or not isinstance(cg_steps, int) or cg_steps < 1:
        raise ValueError(f"hf_cg_steps must be an int >= 1, got {cg_steps!r}")
    if isinstance(ls_steps, bool) or not isinstance(ls_steps, int):
        raise ValueError(f"ls_steps must be an int >= 1, got {ls_steps!r}")
    if not (0 < backtrack < 1) or not (0 < armijo < 1) or ls_steps < 1:
        raise ValueError("line search needs 0 < backtrack < 1, 0 < armijo < 1, ls_steps >= 1")


class NewtonLog:
    """The Newton-CG directions and per-task bookkeeping of a batched Hessian-free solve (shared
    by `hessian_free` and the head-only solver of imaml_ext.head_only).

    Args:
        like: an (M, P) tensor of the problem's dtype and device.
    """

    def __init__(self, like: torch.Tensor):
        M, dev = like.shape[0], like.device
        self.objective: list[torch.Tensor] = []  # G before each iteration, then at the end
        self.ls_fail = torch.zeros(M, dtype=torch.int32, device=dev)
        self.negcurv = torch.zeros(M, dtype=torch.int32, device=dev)
        self.cg_iters = torch.zeros(M, dtype=torch.int32, device=dev)
        self.cg_res = like.new_zeros(M)
        self.t_last = like.new_zeros(M)

    def direction(self, A, g: torch.Tensor, *, cg_steps: int, cg_rtol: float,
                  use_ext: bool | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(d, grad G . d): CG with `cg_steps` iterations on A d = -g from d = 0 (A a callable or
        a structured operator on (M, P) buffers); where CG gives no descent direction (no step
        taken, slope >= 0 or not finite) d = -g."""
        # _cg: the Newton direction is not differentiated (cg would attach its derivative)
        res = _cg(A, -g, max_iter=cg_steps, rtol=cg_rtol, batched=True, use_ext=use_ext)
        d = res.x
        self.negcurv += (res.status == reference.NEGATIVE_CURVATURE).to(torch.int32)
        self.cg_iters += res.iterations
        self.cg_res = res.residual_norm
        slope = (g * d).sum(1)
        bad = (res.iterations == 0) | ~(slope < 0) | ~torch.isfinite(slope)
        d = torch.where(bad.unsqueeze(1), -g, d)
        return d, torch.where(bad, -(g * g).sum(1), slope)

    @staticmethod
    def rounding(G0: torch.Tensor) -> torch.Tensor:
        """(M,) the rounding of G's values, 10 eps |G|: the line search's Armijo test allows
        G(phi + t d) to exceed its target by this much (else, near a minimum, the test failed
        on rounding alone, or passed by luck where two values rounded alike)."""
        return 10 * torch.finfo(G0.dtype).eps * G0.abs()

    @staticmethod
    def stationary(slope: torch.Tensor, G0: torch.Tensor) -> torch.Tensor:
        """(M,) bool: tasks whose descent along d, |grad G . d|, is below G's rounding:
        stationary to working precision. A line search that finds no t there is no failure
        (no step, t = 0)."""
        return -slope <= NewtonLog.rounding(G0)

    def line_search(self, found: torch.Tensor, t_sel: torch.Tensor) -> None:
        """Records one line search: found (M,) bool, the accepted step sizes t_sel (M,)."""
        self.ls_fail += (~found).to(torch.int32)
        self.t_last = t_sel

    def metrics(self) -> dict:
        return {"hf_objective": torch.stack(self.objective), "hf_step_size": self.t_last,
                "hf_ls_failures": self.ls_fail, "hf_negative_curvature": self.negcurv,
                "hf_cg_iterations": self.cg_iters, "hf_cg_residual": self.cg_res}


def hessian_free(task_loss: TaskLoss, theta_b: Mapping[str, torch.Tensor], x: torch.Tensor,
                 y: torch.Tensor, *, lam: float, steps: int = 4, cg_steps: int = 5,
                 hvp: str = "exact", armijo: float = 1e-4, backtrack: float = 0.5,
                 ls_steps: int = 8, cg_rtol: float = 1e-10,
                 use_ext: bool | None = None) -> InnerResult:
    """Newton-CG on G_i for all tasks (the paper's iMAML-HF inner solver).

    Each iteration, per task: CG with `cg_steps` iterations on (H + lam I) d = -grad G from
    d0 = 0. Where CG meets negative curvature it keeps its last good iterate (steepest descent
    -grad G when it has none); a direction that is not a descent direction is replaced by -grad G.
    Step size: the largest t in {1, backtrack, ..., backtrack^(ls_steps-1)} with
    G(phi + t d) <= G(phi) + armijo * t * grad G . d (+ G's rounding, 10 eps |G|); if none
    qualifies the task does not move in this iteration (counted in "hf_ls_failures"), so G never
    increases beyond rounding, and takes steepest descent d = -grad G in the next one (before
    2026-11-29 it computed the same failing direction again and ended at theta, its
    meta-gradient taken there as if theta were the minimiser). A task whose descent along d is
    below G's rounding is stationary to working precision: if no t qualifies, no step and no
    failure counted.

    Args:
        task_loss, theta_b, x, y: as in `gd`. lam: > 0.
        steps: Newton iterations (default 4). cg_steps: CG iterations per direction (default 5).
        hvp: "exact", "ggn" (Gauss-Newton, PSD), "forward_over_reverse" or "double_backward".
        armijo, backtrack, ls_steps: line-search constants.

    Returns:
        InnerResult with metrics (per task): "hf_objective" (steps+1, M) G before each iteration
        and at the end, "hf_step_size" last accepted t, "hf_ls_failures", "hf_negative_curvature"
        (CG negative-curvature count), "hf_cg_iterations" (total), "hf_cg_residual" (last).
    """
    check_newton_args(steps, lam, cg_steps, armijo, backtrack, ls_steps)
    theta = {k: v.detach() for k, v in theta_b.items()}
    spec = ParamSpec.of(theta)
    theta_flat = spec.flatten(theta)
    phi_flat = theta_flat.clone()
    M = phi_flat.shape[0]
    dev = phi_flat.device
    finite = torch.ones(M, dtype=torch.bool, device=dev)
    log = NewtonLog(phi_flat)
    ts = [backtrack ** j for j in range(ls_steps)]
    on_cpu = dev.type == "cpu"
    failed = torch.zeros(M, dtype=torch.bool, device=dev)  # the last line search found no t
    for _ in range(steps):
        phi = spec.unflatten(phi_flat)
        H = make_hvp(task_loss, phi, x, y, hvp)
        L0, gl = H.value_and_grad()  # from the HVP's own graph where it has one
        delta = phi_flat - theta_flat
        g = spec.flatten(gl).add_(delta, alpha=lam)
        G0 = L0 + 0.5 * lam * (delta * delta).sum(1)
        log.objective.append(G0)
        finite &= torch.isfinite(G0) & torch.isfinite(g).all(1)

        # (H + lam I) d = -g; the shift goes into the fused CG step (linalg.ShiftedOperator)
        d, slope = log.direction(ShiftedOperator(H.flat, lam, 1.0), g, cg_steps=cg_steps,
                                 cg_rtol=cg_rtol, use_ext=use_ext)
        # where the last ladder failed along the Newton direction: steepest descent (a failure
        # there means the quadratic model was wrong beyond the ladder's shortest step)
        d = torch.where(failed.unsqueeze(1), -g, d)
        slope = torch.where(failed, -(g * g).sum(1), slope)
        # Backtracking over a fixed ladder of step sizes, all tasks at once; a task keeps the
        # first (largest) t that passes. On the CPU the ladder stops once every task has passed.
        t_sel = torch.zeros(M, dtype=phi_flat.dtype, device=dev)
        found = torch.zeros(M, dtype=torch.bool, device=dev)
        target = G0 + log.rounding(G0)
        for t in ts:
            trial = phi_flat + t * d
            Gt = objective(task_loss, spec.unflatten(trial), theta, x, y, lam)
            ok = ~found & torch.isfinite(Gt) & (Gt <= target + armijo * t * slope)
            t_sel = torch.where(ok, torch.full_like(t_sel, t), t_sel)
            found |= ok
            if on_cpu and bool(found.all()):  # CPU values: no device synchronisation
                break
        found |= log.stationary(slope, G0)  # nothing left to gain: t = 0, not a failure
        log.line_search(found, t_sel)
        failed = ~found
        phi_flat = phi_flat + t_sel.unsqueeze(1) * torch.where(finite.unsqueeze(1), d,
                                                                torch.zeros_like(d))
    phi = spec.unflatten(phi_flat)
    final = train_loss(task_loss, phi, x, y)
    delta = phi_flat - theta_flat
    log.objective.append(final + 0.5 * lam * (delta * delta).sum(1))
    finite &= torch.isfinite(final) & torch.isfinite(phi_flat).all(1)
    metrics = log.metrics()
    metrics["loss_first"] = log.objective[0] if steps else final
    return InnerResult(phi, final, finite, metrics)


__all__ = ["InnerResult", "NewtonLog", "check_newton_args", "gd", "hessian_free", "objective",
           "batched_theta", "train_loss", "PROXIMAL"]
