"""Implicit differentiation: iMAML's meta-gradient, and a root-solve autograd op for any bilevel code.

1. `implicit_meta_gradient`: for M tasks at once, solves (paper, Algorithm 2)

       ((1 + damping) I + H_i / cg_lam) g_i = v_i,     v_i = grad L_test_i(phi_i)

   with H_i the Hessian of L_train_i at phi_i, by the batched CG of imaml_ext.cg. The defaults
   damping=0, cg_lam=lam give the paper's (I + H/lam). The iMAML authors' code solves
   (2 I + H/(lam + 10)): damping=1, cg_lam=lam + 10.
   `implicit_meta_gradient_lstsq` is the same solve for a least-squares inner loss
   (H = X^T X / n) with the whole CG loop in one compiled op (imaml_ext.linalg.LstsqOperator).

2. `implicit_root` / `custom_root`: given a solution z* of F(z*, args) = 0 computed any way (no
   graph), returns z* attached to autograd so that gradients reach `args`:
   dz*/dargs = -(dF/dz)^-1 dF/dargs, applied in the backward pass by solving (dF/dz)^T u = dL/dz*
   with CG (dF/dz symmetric positive definite, e.g. F = the gradient of a strongly convex inner
   objective) or CG on the normal equations (any invertible dF/dz). On a GPU, cuda_graph=True
   replays each backward pass from one CUDA graph per shape (a CapturedFunction).
"""
from __future__ import annotations

import functools
import warnings
import weakref
from dataclasses import dataclass
from typing import Callable, Mapping, MutableMapping

import torch
from torch.utils import _pytree as pytree

from imaml_ext import reference
from imaml_ext.hvp import HVP_KINDS, BatchedHVP, ParamSpec, Params, TaskLoss, make_hvp
from imaml_ext.linalg import (CGResult, LstsqOperator, ShiftedOperator, _capture_graph, _cg,
                              breakdown_counts, check_flag, check_leaves, finite_number, integer,
                              not_converged)


# ---- iMAML's meta-gradient -------------------------------------------------------------------

@dataclass
class ImplicitGradient:
    """What `implicit_meta_gradient` returns.

    Attributes:
        grad: dict of (M, ...) per-task meta-gradients g_i.
        flat: the same as one (M, P) buffer.
        cg: the CGResult, per task: iterations (int32), residual_norm, status (0 max_iter,
            1 converged, 2 negative curvature, 3 non-finite). With cg_steps=0: zeros, status 0.
    """

    grad: Params
    flat: torch.Tensor
    cg: CGResult


def _check_matrix_args(lam, cg_steps, damping, cg_lam, rtol=0.0, atol=0.0):
    for name, v in (("rtol", rtol), ("atol", atol)):  # checked even when cg_steps=0 runs no CG
        if not (finite_number(v) and v >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    if not (finite_number(lam) and lam > 0):
        raise ValueError(f"lam must be a finite number > 0, got {lam!r}")
    if not integer(cg_steps) or cg_steps < 0:
        raise ValueError(f"cg_steps must be an int >= 0, got {cg_steps!r}")
    if not (finite_number(damping) and damping >= 0):
        raise ValueError(f"damping must be a finite number >= 0, got {damping!r}")
    cg_lam = lam if cg_lam is None else cg_lam
    if not (finite_number(cg_lam) and cg_lam > 0):
        raise ValueError(f"cg_lam must be a finite number > 0, got {cg_lam!r}")
    return float(cg_lam)


def _no_solve(b: torch.Tensor) -> CGResult:
    """cg_steps=0: g = b, 0 iterations, status 0; a row of b with NaN/Inf is status 3 (as a
    solve would flag it), computed on b's device (no host read)."""
    M = b.shape[0]
    z = torch.zeros(M, dtype=torch.int32, device=b.device)
    finite = torch.isfinite(b).all(dim=1) if b.shape[1] else torch.ones_like(z, dtype=torch.bool)
    status = torch.where(finite, 0, reference.NONFINITE).to(torch.int32)
    return CGResult(b, z, b.new_zeros(M), status)


def _check_meta_inputs(phi, x_train, y_train, rhs) -> None:
    """implicit_meta_gradient's tensors, named, before anything runs on them."""
    if not isinstance(phi, Mapping) or not phi:
        raise ValueError(f"phi must be a non-empty dict of (M, ...) parameter tensors, got "
                         f"{phi!r:.80}")
    p0 = next(iter(phi.values()))
    for k, t in phi.items():
        if not isinstance(t, torch.Tensor) or t.dtype not in (torch.float32, torch.float64) or \
                t.dim() == 0:
            got = (f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor)
                   else type(t).__name__)
            raise ValueError(f"phi[{k!r}] must be a float32/float64 tensor (M, ...), got {got}")
        if t.dtype != p0.dtype or t.device != p0.device or t.shape[0] != p0.shape[0]:
            raise ValueError(f"phi's tensors must share dtype, device and M: phi[{k!r}] is "
                             f"{t.dtype} {tuple(t.shape)} on {t.device}, the first "
                             f"{p0.dtype} {tuple(p0.shape)} on {p0.device}")
    M = p0.shape[0]
    for name, t in (("x_train", x_train), ("y_train", y_train)):
        if not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[0] != M:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a tensor (M, N, ...) with phi's M = {M}, got {got}")
        if t.device != p0.device:
            raise ValueError(f"{name} must be on phi's device {p0.device}, got {t.device}")
    if x_train.is_floating_point() and x_train.dtype != p0.dtype:
        raise ValueError(f"x_train must have phi's dtype {p0.dtype}, got {x_train.dtype}")
    if not isinstance(rhs, (torch.Tensor, Mapping)):
        raise ValueError(f"rhs must be an (M, P) tensor or a dict like phi, got "
                         f"{type(rhs).__name__}")


def implicit_meta_gradient(task_loss: TaskLoss, phi: Mapping[str, torch.Tensor],
                           x_train: torch.Tensor, y_train: torch.Tensor,
                           rhs: Mapping[str, torch.Tensor] | torch.Tensor, *, lam: float,
                           cg_steps: int = 5, damping: float = 0.0, cg_lam: float | None = None,
                           hvp: str | BatchedHVP = "exact", rtol: float = 1e-10,
                           atol: float = 0.0, use_ext: bool | None = None) -> ImplicitGradient:
    """iMAML's per-task meta-gradients, all tasks in one batched CG solve.

    Solves ((1 + damping) I + H_i / cg_lam) g_i = rhs_i for i < M, with H_i the Hessian of the
    training loss of task i at phi_i. Paper: damping=0, cg_lam=None (= lam), giving (I + H/lam).
    Authors' code: damping=1, cg_lam=lam + 10.

    Args:
        task_loss: the TaskLoss of the inner (training) loss.
        phi: dict of (M, ...) adapted parameters (the inner solution, no graph needed).
        x_train, y_train: the support sets (M, N, ...).
        rhs: grad L_test_i(phi_i), a dict like phi or an (M, P) buffer.
        lam: the inner regularization strength (> 0).
        cg_steps: CG iterations (exactly this many unless a system converges to rtol first);
            0 means no solve: g = rhs (the first-order meta-gradient).
        damping, cg_lam: the matrix variant (see above).
        hvp: "exact", "forward_over_reverse", "double_backward", "ggn" (see
            imaml_ext.hvp.BatchedHVP), or a BatchedHVP built at phi.
        rtol, atol: CG stopping tolerances per task.
        use_ext: the compiled CG step (None: when available) or the reference.

    Returns:
        ImplicitGradient. A task whose CG meets negative curvature keeps its last good iterate
        (or rhs when there is none) and is flagged status 2; one that meets NaN/Inf is status 3.
    """
    cg_lam = _check_matrix_args(lam, cg_steps, damping, cg_lam, rtol, atol)
    _check_meta_inputs(phi, x_train, y_train, rhs)
    spec = ParamSpec.of(phi)
    b = rhs if isinstance(rhs, torch.Tensor) else spec.flatten(rhs, "rhs")
    b = b.detach()
    p0 = next(iter(phi.values()))
    if b.dim() != 2 or b.shape != (p0.shape[0], spec.numel):
        raise ValueError(f"rhs must be (M, P) = ({p0.shape[0]}, {spec.numel}), got "
                         f"{tuple(b.shape)}")
    if b.dtype != p0.dtype or b.device != p0.device:
        raise ValueError(f"rhs must have phi's dtype and device ({p0.dtype}, {p0.device}), got "
                         f"({b.dtype}, {b.device})")
    if cg_steps == 0:
        return ImplicitGradient(spec.unflatten(b), b, _no_solve(b))
    H = hvp if isinstance(hvp, BatchedHVP) else make_hvp(task_loss, phi, x_train, y_train, hvp)
    # The shift and scale go into the fused CG step, and a task that meets negative curvature
    # before any step keeps b (its first-order gradient) by the solve's last op: the solve costs
    # its cg_steps products plus cg_steps + 2 ops (each a launch on a GPU).
    A = ShiftedOperator(H.flat, 1.0 + float(damping), 1.0 / cg_lam)
    res = _cg(A, b, max_iter=cg_steps, rtol=rtol, atol=atol, batched=True, use_ext=use_ext,
              fallback=b)
    return ImplicitGradient(spec.unflatten(res.x), res.x, res)


class CapturedMetaGradient:
    """`implicit_meta_gradient` on a GPU as one CUDA graph, for a training loop's fixed shapes.

    The capture records everything the solve launches: the HVP's set-up at phi (for the
    double-backward product, the forward and the create_graph backward whose graph the products
    reuse) and cg_steps iterations of (HVP, fused CG step), on static copies of phi, the support
    set and rhs (a CapturedFunction). A call copies its arguments into them and replays the
    graph: one launch for the whole solve, with no per-kernel launch or Python overhead and no
    host synchronisation. The math is implicit_meta_gradient's own (the capture runs it), so
    results match the eager solve up to float rounding. The graph keeps its buffers (about one
    eager solve's peak memory) while the solver lives; building it runs the solve `warmup` + 1
    times.

        solver = CapturedMetaGradient(task_loss, phi, x, y, rhs, lam=2.0, cg_steps=5)
        out, train_losses = solver(phi, x, y, rhs)   # any phi, x, y, rhs of the same shapes

    Args:
        task_loss, phi, x_train, y_train, rhs: as implicit_meta_gradient, on one CUDA device;
            their shapes and dtypes are fixed by the capture (`matches` tells).
        lam, cg_steps (>= 1), damping, cg_lam, rtol, atol, use_ext: as implicit_meta_gradient.
        hvp: the product's kind name ("exact", "double_backward", "forward_over_reverse",
            "ggn"); it is built inside the graph at each replay's phi.
        warmup: eager runs on a side stream before the capture (lazy initialisation, cuDNN and
            cuBLAS workspaces must not happen while capturing).

    Returns (from a call): (ImplicitGradient, (M,) training losses at phi when the product's
    graph has them (BatchedHVP.losses: double-backward and Gauss-Newton), else None); all fresh
    tensors, not the graph's buffers.

    Raises:
        ValueError for non-CUDA tensors or arguments implicit_meta_gradient refuses; RuntimeError
        from CUDA when the capture fails (an operation that synchronises with the host, say).
    """

    def __init__(self, task_loss: TaskLoss, phi: Mapping[str, torch.Tensor],
                 x_train: torch.Tensor, y_train: torch.Tensor,
                 rhs: Mapping[str, torch.Tensor] | torch.Tensor, *, lam: float,
                 cg_steps: int = 5, damping: float = 0.0, cg_lam: float | None = None,
                 hvp: str = "exact", rtol: float = 1e-10, atol: float = 0.0,
                 use_ext: bool | None = None, warmup: int = 2):
        _check_matrix_args(lam, cg_steps, damping, cg_lam, rtol, atol)
        if cg_steps < 1:
            raise ValueError("cg_steps must be >= 1 for a captured solve (0 is no solve), got 0")
        if not isinstance(hvp, str) or hvp not in HVP_KINDS:
            raise ValueError(f"hvp must be one of {HVP_KINDS} (the product is built inside the "
                             f"graph), got {hvp!r}")
        self.spec = ParamSpec.of(phi)
        b = self._flat_rhs(rhs)
        for name, t in (("phi", next(iter(phi.values()))), ("x_train", x_train),
                        ("y_train", y_train)):
            if t.device != b.device:
                raise ValueError(f"CapturedMetaGradient needs every tensor on rhs's device "
                                 f"{b.device}; {name} is on {t.device}")
        self.task_loss = task_loss
        self._shapes = (tuple(x_train.shape), tuple(b.shape), b.dtype, b.device)
        kw = dict(lam=lam, cg_steps=cg_steps, damping=damping, cg_lam=cg_lam, rtol=rtol,
                  atol=atol, use_ext=use_ext)

        def run(phi_s, x, y, b_s):
            H = make_hvp(task_loss, phi_s, x, y, hvp)
            losses = H.losses()
            out = implicit_meta_gradient(task_loss, phi_s, x, y, b_s, hvp=H, **kw)
            return out.flat, out.cg, losses

        self._step = CapturedFunction(run, self._args(phi, x_train, y_train, b), warmup=warmup)

    def _flat_rhs(self, rhs) -> torch.Tensor:
        b = rhs if isinstance(rhs, torch.Tensor) else self.spec.flatten(rhs, "rhs")
        return b.detach()

    def _args(self, phi, x_train, y_train, b) -> tuple:
        """The captured function's arguments, phi in the capture's key order."""
        if set(phi) == set(self.spec.names):
            phi = {k: phi[k] for k in self.spec.names}
        return dict(phi), x_train, y_train, b

    def matches(self, task_loss: TaskLoss, phi: Mapping[str, torch.Tensor],
                x_train: torch.Tensor, y_train: torch.Tensor, rhs) -> bool:
        """Whether a call with these arguments can replay this capture."""
        return task_loss is self.task_loss and self._step.matches(
            self._args(phi, x_train, y_train, self._flat_rhs(rhs)))

    def __call__(self, phi: Mapping[str, torch.Tensor], x_train: torch.Tensor,
                 y_train: torch.Tensor, rhs) -> tuple[ImplicitGradient, torch.Tensor | None]:
        b = self._flat_rhs(rhs)
        args = self._args(phi, x_train, y_train, b)
        if not self._step.matches(args):
            xs, bs, dt, dev = self._shapes
            raise ValueError(f"phi, x_train, y_train and rhs must have the captured shapes, dtypes "
                             f"and device (x_train {xs}, rhs {bs}, {dt}, {dev}); got x_train "
                             f"{tuple(x_train.shape)}, rhs {tuple(b.shape)}, {b.dtype}, "
                             f"{b.device}: capture a new solver")
        flat, res, losses = self._step(args)
        return ImplicitGradient(self.spec.unflatten(flat), flat, res), losses


def _equal(a, b) -> bool:
    """a == b for a captured function's constant arguments (False where == is not a bool)."""
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - an elementwise or failing ==: not the same constant
        return False


class CapturedFunction:
    """fn(*args) on a GPU as one CUDA graph, for arguments of fixed shapes: a training step.

    args is a pytree (tuples, lists, dicts, named tuples) of tensors and constants. The capture
    runs fn on static copies of the tensors and records every kernel it launches, autograd's
    backward passes included; a call copies its arguments' tensors into the copies and replays
    the graph: one launch, no per-kernel launch or Python overhead, no host synchronisation.
    Results match an eager call up to float rounding (the capture runs fn itself), and come back
    as fresh tensors in fn's output structure. fn must make no host read-back (a capture fails
    on it) and take the same path for every input of these shapes. Building it runs fn
    `warmup` + 1 times; the graph keeps about one eager call's peak memory while it lives.

        step = CapturedFunction(lambda p, t: per_task(p, t), (params, tasks))
        out = step((params2, tasks2))       # same structure, shapes, dtypes, device

    Raises:
        ValueError when args hold no tensor, tensors on several devices or a non-CUDA device;
        RuntimeError from CUDA when the capture fails.
    """

    def __init__(self, fn: Callable, args: tuple, *, warmup: int = 2):
        leaves, self._spec = pytree.tree_flatten(args)
        tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
        if not tensors:
            raise ValueError("CapturedFunction: args hold no tensor")
        device = tensors[0].device
        if any(t.device != device for t in tensors):
            raise ValueError(f"CapturedFunction: every tensor must be on one device, got "
                             f"{sorted({str(t.device) for t in tensors})}")
        self._static = [t.detach().clone() if isinstance(t, torch.Tensor) else t for t in leaves]

        def run():
            return fn(*pytree.tree_unflatten(self._static, self._spec))

        self._replay, self._out = _capture_graph(run, device, warmup)

    def matches(self, args: tuple) -> bool:
        """Whether a call with these arguments can replay this capture."""
        leaves, spec = pytree.tree_flatten(args)
        if spec != self._spec:
            return False
        for a, s in zip(leaves, self._static):
            if isinstance(s, torch.Tensor):
                if not (isinstance(a, torch.Tensor) and a.shape == s.shape and
                        a.dtype == s.dtype and a.device == s.device):
                    return False
            elif a is not s and (type(a) is not type(s) or not _equal(a, s)):
                return False
        return True

    def __call__(self, args: tuple):
        if not self.matches(args):
            shapes = [tuple(t.shape) for t in self._static if isinstance(t, torch.Tensor)]
            raise ValueError(f"CapturedFunction: the arguments must have the captured structure, "
                             f"shapes, dtypes and device (tensor shapes {shapes[:6]}...); got "
                             f"others: capture a new one")
        with torch.no_grad():  # a tensor that requires grad must not make the copy part of a graph
            for s, a in zip(self._static, pytree.tree_leaves(args)):
                if isinstance(s, torch.Tensor):
                    s.copy_(a)
        self._replay()
        return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t,
                               self._out)


def implicit_meta_gradient_lstsq(X: torch.Tensor, rhs: torch.Tensor, *, lam: float,
                                 cg_steps: int = 5, damping: float = 0.0,
                                 cg_lam: float | None = None, rtol: float = 1e-10,
                                 atol: float = 0.0, use_ext: bool | None = None):
    """The same solve for L_train_i(w) = ||X_i w - y_i||^2 / (2 n), H_i = X_i^T X_i / n.

    The whole CG loop runs in one op on v -> (1 + damping) v + X^T X v / (n cg_lam), never
    forming X^T X.

    Args:
        X: (M, n, d) support inputs. rhs: (M, d). Other arguments as implicit_meta_gradient.

    Returns:
        (g (M, d), CGResult).
    """
    cg_lam = _check_matrix_args(lam, cg_steps, damping, cg_lam, rtol, atol)
    for name, t in (("X", X), ("rhs", rhs)):
        if not isinstance(t, torch.Tensor) or t.dtype not in (torch.float32, torch.float64):
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a float32/float64 tensor, got {got}")
    if X.dim() != 3 or rhs.shape != (X.shape[0], X.shape[2]):
        raise ValueError(f"X must be (M, n, d) and rhs (M, d); got X {tuple(X.shape)}, rhs "
                         f"{tuple(rhs.shape)}")
    if X.shape[1] == 0:
        raise ValueError("X must hold at least one sample per task (n >= 1): H = X^T X / n, "
                         f"got X {tuple(X.shape)}")
    if rhs.dtype != X.dtype or rhs.device != X.device:
        raise ValueError(f"rhs must have X's dtype and device ({X.dtype}, {X.device}), got "
                         f"({rhs.dtype}, {rhs.device})")
    b = rhs.detach()
    if cg_steps == 0:
        return b, _no_solve(b)
    op = LstsqOperator(X.detach(), shift=1.0 + float(damping), scale=1.0 / (X.shape[1] * cg_lam))
    res = _cg(op, b, max_iter=cg_steps, rtol=rtol, atol=atol, batched=True, use_ext=use_ext,
              fallback=b)
    return res.x, res


# ---- a root-solve autograd op for any bilevel code ----------------------------------------------

class _RootFn(torch.autograd.Function):
    """Inputs: the solution's leaves, then the tensor leaves of args. Outputs: the solution."""

    @staticmethod
    def forward(ctx, cfg, *tensors):
        ctx.cfg = cfg
        ctx.save_for_backward(*tensors)
        n = cfg["n_sol"]
        return tuple(t.detach().clone() for t in tensors[:n])

    @staticmethod
    def backward(ctx, *cotangents):
        cfg = ctx.cfg
        tensors = ctx.saved_tensors
        n = cfg["n_sol"]
        need = tuple(ctx.needs_input_grad[1 + n:])
        if not any(need):
            return (None,) * (1 + len(tensors))
        z, a = list(tensors[:n]), list(tensors[n:])
        v = [torch.zeros_like(t) if c is None else c for t, c in zip(z, cotangents)]
        graph = None
        if torch.is_grad_enabled():  # backward(create_graph=True)
            warnings.warn("implicit_root: a backward with create_graph=True gives first-order "
                          "gradients for args: the root's own second derivatives are not "
                          "recorded (their gradients carry no graph)", RuntimeWarning,
                          stacklevel=2)
        if cfg["cuda_graph"] and not torch.is_grad_enabled():  # not under create_graph
            args = (z, a, v, _root_key(cfg, need))
            graph = _root_graph(cfg, args)
        if graph is not None:
            ga, res = graph(args)
        else:
            ga, res = _adjoint_grads(cfg, need, z, a, v)
        if cfg["diagnostics"] is not None:
            cfg["diagnostics"]["cg"] = res
        _report_breakdown(res, ga, cfg)
        return (None,) + (None,) * n + tuple(ga)


def _report_breakdown(res: CGResult, grads, cfg) -> None:
    """A RuntimeWarning when the backward's solve broke down in some system (negative
    curvature, non-finite values), ran out of iterations short of the tolerance, or the gradient
    it gives is not finite, so that a zero, approximate or NaN gradient does not pass unremarked.
    check None: where it costs nothing, i.e. on the CPU (on a GPU the read would synchronise
    with the host every backward: check=True asks for it, diagnostics gives the statuses)."""
    solver = cfg["solver"]
    counts = breakdown_counts(res, cfg["check"])
    if counts is None:
        return
    neg, bad, stopped, total = counts
    if stopped:
        hint = ("; CG needs dF/dz symmetric positive definite: if it is not, "
                "solver='normal_cg'" if solver == "cg" else "")
        warnings.warn(f"implicit_root: the backward's CG did not converge in {stopped} of "
                      f"{total} system(s), so their gradients are approximate: "
                      f"{not_converged(res, stopped, cfg['rtol'], cfg['atol'])}{hint}",
                      RuntimeWarning, stacklevel=3)
    if neg:
        fix = ("solver='normal_cg' takes any invertible dF/dz" if solver == "cg" else
               "J J^T lost definiteness to rounding: dF/dz is singular or nearly so there")
        warnings.warn(f"implicit_root: the backward's CG met negative curvature in {neg} of "
                      f"{total} system(s): dF/dz is not positive definite there ({fix}); their "
                      f"gradients come from the iterate before it (zero when it was the first)",
                      RuntimeWarning, stacklevel=3)
    if bad:
        warnings.warn(f"implicit_root: non-finite values in the backward's CG in {bad} of "
                      f"{total} system(s) (NaN or Inf in the solution, the cotangent or "
                      f"optimality_fn's derivatives): their gradients are not finite",
                      RuntimeWarning, stacklevel=3)
        return
    for g in grads:
        if g is not None and not bool(torch.isfinite(g).all()):
            warnings.warn("implicit_root: the gradient for args is not finite, though the "
                          "backward's CG was (NaN or Inf in the solution or in optimality_fn's "
                          "derivative in args)", RuntimeWarning, stacklevel=3)
            return


def _nan_where_nonfinite(u_leaves, status):
    """The adjoint with NaN in the systems whose solve met NaN/Inf (status 3). CG stops such a
    system at its last finite iterate (zero when b itself, here the cotangent, is not finite), so
    a NaN cotangent gave a zero gradient, where autograd through the solver gives NaN and
    GradScaler's or anomaly mode's check relies on seeing it. On the device: no host read."""
    bad = status == reference.NONFINITE
    out = []
    for t in u_leaves:
        mask = bad.reshape(bad.shape + (1,) * (t.dim() - bad.dim()))
        out.append(t.masked_fill(mask, float("nan")))
    return out


def _adjoint_grads(cfg, need, z_leaves, a_leaves, v):
    """The backward's work from the saved solution and argument leaves and the cotangents v:
    (a gradient or None per argument leaf, the adjoint solve's CGResult)."""
    with torch.enable_grad():
        z = [t.detach().requires_grad_(True) for t in z_leaves]
        a = [t.detach().requires_grad_(r) if t.is_floating_point() else t.detach()
             for t, r in zip(a_leaves, need)]
        zs = pytree.tree_unflatten(z, cfg["sol_spec"])
        args = _rebuild_args(cfg, a)
        Fz = cfg["fn"](zs, *args)
        F_leaves, F_spec = pytree.tree_flatten(Fz)
        if F_spec != cfg["sol_spec"] or [f.shape for f in F_leaves] != \
                [t.shape for t in z]:
            raise ValueError("implicit_root: optimality_fn must return a residual with the "
                             "solution's structure and shapes")
        odd = [(f.dtype, t.dtype) for f, t in zip(F_leaves, z) if f.dtype != t.dtype]
        if odd:  # the adjoint would be solved in the residual's precision, silently
            raise ValueError(f"implicit_root: optimality_fn must return a residual in the "
                             f"solution's dtype, got {odd[0][0]} for a {odd[0][1]} solution")
        u, res = _solve_adjoint(cfg, F_leaves, z, v)
        u = _nan_where_nonfinite(u, res.status)
        a_req = [t for t, r in zip(a, need) if r]
        ga = torch.autograd.grad(F_leaves, a_req, grad_outputs=u, allow_unused=True)
    out, it = [], iter(ga)
    for r in need:
        g = next(it) if r else None
        out.append(None if g is None else -g)
    return out, res


# Devices whose tensors implicit_root(cuda_graph=True) accepts (the CPU tests add "cpu" beside
# an eager stand-in for _capture_graph)
_CAPTURE_DEVICES = ("cuda",)

# optimality_fn -> its captured backward passes (cuda_graph=True); weak, so a function that
# goes away takes its graphs with it
_ROOT_GRAPHS: "weakref.WeakKeyDictionary[Callable, _RootGraphs]" = weakref.WeakKeyDictionary()


class _RootGraphs:
    """One optimality function's captures, newest last, at most `keep`; `failed` after a
    capture raised (its backward passes then run eagerly)."""
    keep = 4

    def __init__(self):
        self.graphs: list[CapturedFunction] = []
        self.failed = False
        self.evicted = False


def _root_key(cfg, need) -> tuple:
    """What a capture of the backward fixes besides tensor shapes: the pytree structures, the
    non-tensor arguments, the solve's settings, which arguments need gradients, and the
    identity of tensors the function reads from its closure (a graph reads them at the
    addresses of the capture: rebinding one needs a new capture)."""
    tensor_idx = set(cfg["tensor_idx"])
    consts = tuple(x for i, x in enumerate(cfg["arg_leaves"]) if i not in tensor_idx)
    cells = getattr(cfg["fn"], "__closure__", None) or ()
    closure = []
    for c in cells:
        try:
            x = c.cell_contents
        except ValueError:  # an empty cell
            continue
        if isinstance(x, torch.Tensor):
            closure.append((id(x), x.data_ptr()))
    return (need, cfg["sol_spec"], cfg["arg_spec"], tuple(cfg["tensor_idx"]), consts,
            cfg["solver"], cfg["max_iter"], cfg["rtol"], cfg["atol"], cfg["batched"],
            cfg["use_ext"], tuple(closure))


def _root_graph(cfg, args) -> CapturedFunction | None:
    """The capture of implicit_root's backward for these arguments: a kept one that matches,
    else a new one; None (the backward runs eagerly) when the function cannot key a weak cache
    or once a capture has failed, each with one RuntimeWarning."""
    fn = cfg["fn"]
    try:
        entry = _ROOT_GRAPHS.get(fn)
        if entry is None:
            entry = _ROOT_GRAPHS[fn] = _RootGraphs()
    except TypeError:
        warnings.warn(f"implicit_root(cuda_graph=True): optimality_fn {fn!r} cannot be weakly "
                      "referenced, so its captures cannot be kept; the backward runs eagerly",
                      RuntimeWarning, stacklevel=4)
        return None
    if entry.failed:
        return None
    for graph in entry.graphs:
        if graph.matches(args):
            return graph
    if len(entry.graphs) >= entry.keep:
        entry.graphs.pop(0)
        if not entry.evicted:
            entry.evicted = True
            warnings.warn(f"implicit_root(cuda_graph=True): more than {entry.keep} shapes or "
                          "constant arguments for one optimality_fn; each new one costs a "
                          "capture (pass values that change as tensors, and define the function "
                          "once, outside the loop)", RuntimeWarning, stacklevel=4)
    need, tensor_idx = args[3][0], set(cfg["tensor_idx"])
    # the capture's own cfg: no reference to this call's tensors or diagnostics dict
    base = dict(cfg, diagnostics=None, arg_leaves=[
        None if i in tensor_idx else x for i, x in enumerate(cfg["arg_leaves"])])
    try:
        graph = CapturedFunction(lambda z, a, v, key: _adjoint_grads(base, need, z, a, v), args)
    except RuntimeError as exc:
        entry.failed = True
        warnings.warn(f"implicit_root(cuda_graph=True): capturing the backward failed "
                      f"({type(exc).__name__}: {str(exc)[:300]}); it runs eagerly from now on",
                      RuntimeWarning, stacklevel=4)
        return None
    entry.graphs.append(graph)
    return graph


def _rebuild_args(cfg, tensor_leaves):
    leaves = list(cfg["arg_leaves"])
    for i, t in zip(cfg["tensor_idx"], tensor_leaves):
        leaves[i] = t
    return pytree.tree_unflatten(leaves, cfg["arg_spec"])


def _solve_adjoint(cfg, F_leaves, z, v):
    """(u, CGResult) with (dF/dz)^T u = v: CG on it (cg), or on (dF/dz)(dF/dz)^T u = (dF/dz) v
    (normal_cg)."""
    batched = cfg["batched"]

    def JT(u_leaves):  # (dF/dz)^T u by reverse mode through the retained graph
        return list(torch.autograd.grad(F_leaves, z, grad_outputs=list(u_leaves),
                                        retain_graph=True, allow_unused=True))

    def J(w_leaves):  # (dF/dz) w by the double-vjp trick (no forward-mode AD needed)
        dummy = [torch.zeros_like(f, requires_grad=True) for f in F_leaves]
        g = torch.autograd.grad(F_leaves, z, grad_outputs=dummy, create_graph=True,
                                retain_graph=True, allow_unused=True)
        g = [torch.zeros_like(t) if gi is None else gi for gi, t in zip(g, z)]
        return list(torch.autograd.grad(g, dummy, grad_outputs=list(w_leaves),
                                        retain_graph=True, allow_unused=True))

    def fill(vals, like):
        return [torch.zeros_like(t) if x is None else x for x, t in zip(vals, like)]

    kw = dict(max_iter=cfg["max_iter"], rtol=cfg["rtol"], atol=cfg["atol"], batched=batched,
              use_ext=cfg["use_ext"])
    with torch.no_grad():
        vt = tuple(t.detach() for t in v)
    if cfg["solver"] == "cg":
        def A(u):
            with torch.enable_grad():
                return tuple(t.detach() for t in fill(JT(pytree.tree_leaves(u)), z))
        res = _cg(A, vt, **kw)  # detached operands: nothing for cg's autograd route to record
        u = list(res.x)
    else:
        with torch.enable_grad():
            Jv = tuple(t.detach() for t in fill(J(list(vt)), F_leaves))

        def A(w):
            with torch.enable_grad():
                jt = fill(JT(pytree.tree_leaves(w)), z)
                return tuple(t.detach() for t in fill(J([t.detach() for t in jt]), F_leaves))
        res = _cg(A, Jv, **kw)  # J J^T u = J v  <=>  J^T u = v for invertible J
        u = list(res.x)
    return u, res


def _check_root_options(*, solver, max_iter, rtol, atol, batched, use_ext, diagnostics,
                        cuda_graph, check) -> None:
    """implicit_root's settings (the backward's solve among them), checked at the call or at
    custom_root's decoration rather than at the first backward."""
    if solver not in ("cg", "normal_cg"):
        raise ValueError(f"solver must be 'cg' or 'normal_cg', got {solver!r}")
    if not isinstance(cuda_graph, bool):
        raise ValueError(f"cuda_graph must be True or False, got {cuda_graph!r}")
    check_flag(check)
    if cuda_graph and max_iter is None:
        raise ValueError("cuda_graph=True records a fixed number of CG iterations: give max_iter "
                         "(an int >= 1), got None")
    if max_iter is not None and (not integer(max_iter) or max_iter < 1):
        raise ValueError(f"max_iter must be None or an int >= 1, got {max_iter!r}")
    for name, v in (("rtol", rtol), ("atol", atol)):
        if not (finite_number(v) and v >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    if not isinstance(batched, bool):
        raise ValueError(f"batched must be True or False, got {batched!r}")
    if use_ext is not None and not isinstance(use_ext, bool):
        raise ValueError(f"use_ext must be None, True or False, got {use_ext!r}")
    if diagnostics is not None and not isinstance(diagnostics, MutableMapping):
        raise ValueError(f"diagnostics must be None or a dict (it receives 'cg'), got "
                         f"{type(diagnostics).__name__}")


def implicit_root(optimality_fn: Callable, solution, *args, solver: str = "cg",
                  max_iter: int | None = None, rtol: float = 1e-8, atol: float = 0.0,
                  batched: bool = False, use_ext: bool | None = None,
                  diagnostics: dict | None = None, cuda_graph: bool = False,
                  check: bool | None = None):
    """Attaches a root z* of optimality_fn(z, *args) = 0 to autograd, as a function of args.

    The forward returns `solution` unchanged (a tensor or a pytree of tensors, computed any way,
    e.g. by an iterative solver under torch.no_grad). Backpropagating a cotangent v through it
    solves (dF/dz)^T u = v at z* and gives args the gradient -(dF/dargs)^T u (the implicit function
    theorem), so nothing of the solver's iterations is stored.

    Args:
        optimality_fn: F(z, *args) -> residual with z's structure; F(z*, *args) = 0.
        solution: z*, a tensor or pytree of tensors.
        *args: the outer variables (tensors or pytrees; tensors requiring grad get gradients;
            non-tensor leaves are passed through).
        solver: "cg" when dF/dz is symmetric positive definite (F the gradient of a strongly
            convex objective); "normal_cg" (CG on the normal equations) for any invertible dF/dz.
        max_iter, rtol, atol, use_ext: passed to imaml_ext.cg for the backward solve (on a GPU
            give max_iter: the solve runs exactly that many iterations without host reads).
        batched: the leading dimension of z's leaves indexes independent problems.
        diagnostics: a dict that receives "cg" (the backward solve's CGResult).
        check: warn (RuntimeWarning) when the backward's CG breaks down in some system:
            negative curvature (its gradient is then from the iterate before it, zero if none)
            or non-finite values, or stops at max_iter short of rtol / atol (its gradient is
            then approximate). None (default): on the CPU only, where reading the statuses
            is free; True: on a GPU too (one host read per backward); False: never (read
            diagnostics instead).
        cuda_graph: on a GPU, run each backward pass (optimality_fn's forward at z*, the
            adjoint CG solve, the gradient for args) as one CUDA graph: captured the first time
            for given shapes and constants and replayed after, so the backward makes one
            launch and no host synchronisation. Needs max_iter (the capture records exactly
            max_iter iterations; converged systems are masked). Captures are kept per
            optimality_fn (up to 4 shape/constant combinations; define the function once,
            outside the training loop). optimality_fn must take the same path for every input
            and read no values back to the host; tensors it reads from its closure or globals
            instead of its arguments are read at their addresses at capture time (change them
            in place, or pass them as args). A capture that fails warns once and that
            function's backward runs eagerly from then on; a backward with create_graph=True
            always runs eagerly. Needs a solution on a CUDA device (a ValueError otherwise).

    Returns:
        z* with z's structure, differentiable with respect to args (first order: a backward
        with create_graph=True warns that the gradient it gives carries no graph).

    Raises:
        ValueError for a bad solver, max_iter, rtol, atol, batched, use_ext, check,
        diagnostics or cuda_graph, or a solution the backward's CG cannot take (leaves of mixed
        dtypes or devices, not float32/float64, or with batched=True without a common leading
        batch size), at the call (not at the first backward).
    """
    _check_root_options(solver=solver, max_iter=max_iter, rtol=rtol, atol=atol, batched=batched,
                        use_ext=use_ext, diagnostics=diagnostics, cuda_graph=cuda_graph,
                        check=check)
    if not torch.compiler.is_compiling() and \
            torch._C._functorch.maybe_current_level() is not None:
        # (autograd.Function without setup_context: torch's own error names no way out)
        raise ValueError("implicit_root cannot run inside torch.func transforms (vmap, grad, "
                         "jacrev, ...): call it outside them, with batched=True for a batch of "
                         "roots, and differentiate with torch.autograd")
    sol_leaves, sol_spec = pytree.tree_flatten(solution)
    if not sol_leaves or not all(isinstance(t, torch.Tensor) and t.is_floating_point()
                                 for t in sol_leaves):
        raise ValueError("solution must be a floating-point tensor or a pytree of them")
    # what the backward's solve will ask of its right-hand side (the solution's structure)
    check_leaves(sol_leaves, batched, "solution", caller="implicit_root")
    if cuda_graph and sol_leaves[0].device.type not in _CAPTURE_DEVICES:
        raise ValueError(f"cuda_graph=True captures the backward as a CUDA graph: it needs a "
                         f"solution on a CUDA device, got {sol_leaves[0].device}")
    arg_leaves, arg_spec = pytree.tree_flatten(args)
    tensor_idx = [i for i, t in enumerate(arg_leaves) if isinstance(t, torch.Tensor)]
    cfg = {"fn": optimality_fn, "n_sol": len(sol_leaves), "sol_spec": sol_spec,
           "arg_leaves": arg_leaves, "arg_spec": arg_spec, "tensor_idx": tensor_idx,
           "solver": solver, "max_iter": max_iter, "rtol": rtol, "atol": atol,
           "batched": batched, "use_ext": use_ext, "diagnostics": diagnostics,
           "cuda_graph": cuda_graph, "check": check}
    if torch.is_grad_enabled():
        _warn_closure_grads(optimality_fn, solution, args, [arg_leaves[i] for i in tensor_idx])
    out = _RootFn.apply(cfg, *[t.detach() for t in sol_leaves],
                        *[arg_leaves[i] for i in tensor_idx])
    return pytree.tree_unflatten(list(out), sol_spec)


def _closure_tensors(fn) -> list:
    """Tensors optimality_fn reads other than through its arguments, as far as they can be seen:
    its closure cells (and one level of lists, tuples, dicts and modules in them), the module-level
    tensors and modules it names, a functools.partial's bound arguments, a bound method's
    module."""
    found, seen = [], set()

    def visit(x, depth=0):
        if id(x) in seen:
            return
        seen.add(id(x))
        if isinstance(x, torch.Tensor):
            found.append(x)
        elif isinstance(x, torch.nn.Module):
            found.extend(x.parameters())
        elif depth < 1 and isinstance(x, (list, tuple)):
            for y in x:
                visit(y, depth + 1)
        elif depth < 1 and isinstance(x, dict):
            for y in x.values():
                visit(y, depth + 1)
        elif callable(x) and depth < 1:
            visit_fn(x, depth + 1)

    def visit_fn(f, depth):
        if isinstance(f, functools.partial):
            for y in (*f.args, *f.keywords.values()):
                visit(y, depth)
            visit_fn(f.func, depth)
            return
        if getattr(f, "__self__", None) is not None:
            visit(f.__self__, depth)
        for c in getattr(f, "__closure__", None) or ():
            try:
                visit(c.cell_contents, depth)
            except ValueError:  # an empty cell
                pass
        code, glob = getattr(f, "__code__", None), getattr(f, "__globals__", None)
        if code is not None and glob is not None:  # module-level names the function reads
            for name in code.co_names:
                x = glob.get(name)
                if isinstance(x, (torch.Tensor, torch.nn.Module)):
                    visit(x, depth)
    visit_fn(fn, 0)
    return found


def _warn_closure_grads(fn, solution, args, arg_tensors) -> None:
    """A RuntimeWarning when optimality_fn depends on a tensor that requires grad other than
    through its arguments: implicit_root gives gradients to args only, so that tensor would
    silently get none through the root. Candidates come from _closure_tensors (none, the usual
    case: nothing is run); with some, one F(z*, args) is evaluated as the backward evaluates it
    (z* requiring grad, for an F that differentiates in z) to see which it really depends on. An
    F that fails there is left to fail, or not, in the backward."""
    given = {id(t) for t in arg_tensors}
    hidden = [t for t in _closure_tensors(fn) if t.requires_grad and id(t) not in given]
    if not hidden:
        return
    try:
        z = pytree.tree_map(lambda t: t.detach().requires_grad_(True), solution)
        with torch.enable_grad():
            out = [t for t in pytree.tree_leaves(fn(z, *args))
                   if isinstance(t, torch.Tensor) and t.requires_grad]
            used = torch.autograd.grad([t.sum() for t in out], hidden, allow_unused=True) \
                if out else [None] * len(hidden)
    except Exception:  # noqa: BLE001 - a check only: the backward reports F's own errors
        return
    hidden = [t for t, g in zip(hidden, used) if g is not None]
    if hidden:
        shapes = ", ".join(str(tuple(t.shape)) for t in hidden[:5])
        warnings.warn(f"implicit_root: optimality_fn depends on {len(hidden)} tensor(s) that "
                      f"require grad from outside its arguments (shapes {shapes}): they get no "
                      f"gradient through the root; pass them in args", RuntimeWarning,
                      stacklevel=3)


def custom_root(optimality_fn: Callable, **solve_kwargs) -> Callable:
    """Decorator form: `@custom_root(F)` on `solver(*args) -> z*` makes z* differentiable in args.

        @custom_root(lambda w, alpha: X.T @ (X @ w - y) / n + alpha * w)
        def ridge(alpha):
            return torch.linalg.solve(X.T @ X / n + alpha * I, X.T @ y / n)

    The solver runs under torch.no_grad; keyword arguments go to `implicit_root` (checked here:
    an unknown one is a TypeError, a bad value a ValueError). The decorated function may be
    called with keyword arguments where the solver names them: they are passed to
    optimality_fn by position, in the solver's order.
    """
    import inspect
    try:
        bound = inspect.signature(implicit_root).bind(optimality_fn, None, **solve_kwargs)
    except TypeError as exc:
        raise TypeError(f"custom_root: {exc} (its keywords go to implicit_root)") from None
    bound.apply_defaults()  # implicit_root's own defaults for what is not given
    _check_root_options(**{k: v for k, v in bound.arguments.items()
                           if k not in ("optimality_fn", "solution", "args")})

    def deco(solver: Callable) -> Callable:
        try:
            sig = inspect.signature(solver)
        except (TypeError, ValueError):  # a builtin without one: positional calls only
            sig = None

        def wrapped(*args, **kwargs):
            if kwargs:
                if sig is None:
                    raise TypeError(f"custom_root: {getattr(solver, '__name__', 'the solver')} "
                                    f"has no signature to place keyword arguments by: pass "
                                    f"them positionally")
                bound = sig.bind(*args, **kwargs)
                if bound.kwargs:
                    raise TypeError(f"custom_root: {sorted(bound.kwargs)} cannot be passed to "
                                    f"optimality_fn by position (keyword-only, or after a "
                                    f"skipped parameter): pass them positionally")
                args = bound.args
            with torch.no_grad():
                z = solver(*args)
            return implicit_root(optimality_fn, z, *args, **solve_kwargs)
        wrapped.__name__ = getattr(solver, "__name__", "solver")
        wrapped.__doc__ = solver.__doc__
        return wrapped
    return deco


__all__ = ["CapturedFunction", "ImplicitGradient", "implicit_meta_gradient",
           "implicit_meta_gradient_lstsq", "implicit_root", "custom_root"]
