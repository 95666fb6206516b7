"""The public batched conjugate-gradient solver.

    res = imaml_ext.cg(A, b, max_iter=50, rtol=1e-6)
    res.x, res.iterations, res.residual_norm, res.converged, res.negative_curvature

`A` is a callable (the matrix-vector product, over the same pytree structure as b), a dense
tensor, an `LstsqOperator` (v -> shift v + scale X^T X v, never forming X^T X), or an
`imaml_ext.structured.SoftmaxHeadOperator` (shift v + scale H v for a softmax head's
cross-entropy Hessian H), or a `ShiftedOperator` (shift v + scale op(v) for a callable op, the
shift and scale applied inside the fused iteration op). `b` is a tensor
or a pytree (tuple/list/dict) of tensors. With `batched=True` the leading dimension of every leaf
holds independent systems, each with its own step sizes, stopping and flags.

Dense and structured operators run the whole loop inside one compiled op (per-system early
stop). Callables run one fused iteration op per step after the user's product, between one op
of set-up (cg_begin, from x0 = 0) and one of finish (cg_end); on a GPU that
loop never synchronises with the host (stopped systems are masked), on the CPU it stops as soon as
every system has stopped. Nothing returns NaN silently: a system that meets NaN/Inf stops and is
flagged `nonfinite`; one that meets p^T A p <= 0 keeps its last good iterate and is flagged
`negative_curvature`.
"""
from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import torch
from torch.utils import _pytree as pytree

from imaml_ext import ops, reference
from imaml_ext._ext import use_ext_for
from imaml_ext.structured import SoftmaxHeadOperator, as_number, check_coefficient


class CGError(RuntimeError):
    """Raised by CGResult.check() when systems did not converge."""


@dataclass
class CGResult:
    """What `cg` returns. With batched=False the per-system fields are 0-d tensors.

    Attributes:
        x: the solution, with b's structure.
        iterations: int32, iterations taken per system.
        residual_norm: ||r|| per system (the CG recursion's residual).
        status: int32 per system: 0 max_iter reached, 1 converged, 2 negative curvature,
            3 non-finite values met.
    """

    x: Any
    iterations: torch.Tensor
    residual_norm: torch.Tensor
    status: torch.Tensor

    @property
    def converged(self) -> torch.Tensor:
        return self.status == reference.CONVERGED

    @property
    def negative_curvature(self) -> torch.Tensor:
        return self.status == reference.NEGATIVE_CURVATURE

    @property
    def nonfinite(self) -> torch.Tensor:
        return self.status == reference.NONFINITE

    def check(self, *, allow_max_iter: bool = False) -> "CGResult":
        """Raises CGError naming the failed systems (synchronises with the device)."""
        bad = ~self.converged
        if allow_max_iter:
            bad &= self.status != reference.RUNNING
        if bool(bad.any()):
            idx = bad.reshape(-1).nonzero().flatten().tolist()[:10]
            names = {0: "max_iter reached", 2: "negative curvature", 3: "non-finite values"}
            st = self.status.reshape(-1)
            detail = ", ".join(f"system {i}: {names[int(st[i])]}" for i in idx)
            raise CGError(f"cg: {int(bad.sum())} system(s) did not converge ({detail})")
        return self


# A pytree node (its four fields), so that a CUDA-graph capture (implicit.CapturedFunction)
# hands it back with fresh tensors and torch.func transforms can return it.
pytree.register_dataclass(CGResult)


@dataclass(frozen=True)
class LstsqOperator:
    """The operator v -> shift * v + scale * X^T (X v), X of shape (B, n, d) (or (n, d)).

    With shift=1 and scale=1/(n*lam) it is iMAML's (I + H/lam) for a least-squares inner loss;
    with shift=lam and scale=1/n it is the Hessian of the ridge objective.
    """

    X: torch.Tensor
    shift: float | torch.Tensor = 1.0
    scale: float | torch.Tensor = 1.0

    def __post_init__(self):
        if not isinstance(self.X, torch.Tensor):
            raise ValueError(f"LstsqOperator: X must be a tensor (B, n, d) or (n, d), got "
                             f"{type(self.X).__name__}")
        for name in ("shift", "scale"):
            object.__setattr__(self, name, check_coefficient("LstsqOperator", name,
                                                             getattr(self, name)))

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        X = self.X if self.X.dim() == 3 else self.X.unsqueeze(0)
        out = reference.lstsq_apply(X, v.reshape(X.shape[0], -1), self.shift, self.scale)
        return out.reshape(v.shape)


@dataclass(frozen=True)
class ShiftedOperator:
    """The operator v -> shift * v + scale * op(v), for a callable op over b's structure.

    Equal to the callable `lambda v: shift * v + scale * op(v)`, but `cg` applies shift and scale
    inside its fused iteration op instead of as two more elementwise passes per iteration (two
    launches on a GPU, where a small solve is bound by launches). iMAML's matrix is
    ShiftedOperator(hvp, 1 + damping, 1 / cg_lam); a damped Newton system (H + lam I) is
    ShiftedOperator(hvp, lam, 1.0).
    """

    op: Callable
    shift: float = 0.0
    scale: float = 1.0

    def __post_init__(self):
        if not callable(self.op):
            raise ValueError(f"ShiftedOperator: op must be callable, got {type(self.op).__name__}")
        for name in ("shift", "scale"):
            v = getattr(self, name)
            if not finite_number(v):
                raise ValueError(f"ShiftedOperator: {name} must be a finite number, got {v!r}")

    def __call__(self, v):
        out = self.op(v)
        return pytree.tree_map(lambda o, x: self.scale * o + self.shift * x, out, v)


def integer(v) -> bool:
    """An integer, Python's or NumPy's (bool excluded); callers take int(v) after the check."""
    return not isinstance(v, bool) and isinstance(v, numbers.Integral)


def finite_number(v) -> bool:
    """A finite real Python number (bool excluded: True is not a tolerance or a strength)."""
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


def _fail(msg: str):
    raise ValueError(f"cg: {msg}")


def check_leaves(leaves, batched: bool, what: str, caller: str = "cg") -> None:
    """The leaves of a right-hand side or solution: tensors, float32/float64, one dtype and
    device, and with batched=True a common leading batch size; else a ValueError from `caller`
    naming `what`."""
    def fail(msg):
        raise ValueError(f"{caller}: {msg}")
    if not leaves:
        fail(f"{what} has no tensors")
    for i, leaf in enumerate(leaves):
        if not isinstance(leaf, torch.Tensor):
            fail(f"{what} leaf {i} must be a tensor, got {type(leaf).__name__}")
        if not leaf.is_floating_point() or leaf.dtype not in (torch.float32, torch.float64):
            fail(f"{what} leaf {i} must be float32 or float64, got {leaf.dtype}")
        if leaf.dtype != leaves[0].dtype or leaf.device != leaves[0].device:
            fail(f"{what} leaves must share dtype and device: leaf 0 is {leaves[0].dtype} on "
                 f"{leaves[0].device}, leaf {i} is {leaf.dtype} on {leaf.device}")
    if batched:
        if any(leaf.dim() == 0 for leaf in leaves):
            fail(f"batched=True needs a leading batch dimension on every leaf of {what}")
        B = leaves[0].shape[0]
        for i, leaf in enumerate(leaves):
            if leaf.shape[0] != B:
                fail(f"batched=True: every leaf of {what} must have the batch size {B} of leaf "
                     f"0, leaf {i} has {leaf.shape[0]}")


def _flatten(tree, batched: bool, what: str, copy: bool = True):
    """Leaves of a pytree -> one contiguous (B, P) buffer, with what is needed to undo it.

    copy=False: a single batched leaf comes back as a view of itself where it is contiguous (no
    copy), for what the caller only reads: b, x0 and an operator's output A(v)."""
    leaves, spec = pytree.tree_flatten(tree)
    check_leaves(leaves, batched, what)
    if batched:
        B = leaves[0].shape[0]
        shapes = [leaf.shape[1:] for leaf in leaves]
        if len(leaves) == 1 and not copy:
            flat = leaves[0].reshape(B, math.prod(shapes[0])).contiguous()
        else:
            flat = torch.cat([leaf.reshape(B, math.prod(s)) for leaf, s in zip(leaves, shapes)],
                             dim=1)
    else:
        shapes = [leaf.shape for leaf in leaves]
        flat = torch.cat([leaf.reshape(1, -1) for leaf in leaves], dim=1) if len(leaves) > 1 \
            else leaves[0].reshape(1, -1)
    return flat, spec, shapes


def _unflatten(flat: torch.Tensor, spec, shapes, batched: bool):
    sizes = [math.prod(s) for s in shapes]
    parts = flat.split(sizes, dim=1) if len(sizes) > 1 else [flat]
    if batched:
        leaves = [p.reshape(flat.shape[0], *s) for p, s in zip(parts, shapes)]
    else:
        leaves = [p.reshape(s) for p, s in zip(parts, shapes)]
    return pytree.tree_unflatten(leaves, spec)


def _needs_reference(*tensors) -> bool:
    """torch.func transforms and autograd through the solve need the functional twin."""
    compiling = torch.compiler.is_compiling()  # dynamo cannot trace the functorch query...
    if compiling and torch._C._functorch.maybe_current_level() is not None:
        return True  # ... but this one: inside a vmap/grad being compiled
    for t in tensors:
        if t is None:
            continue
        if not compiling and torch._C._functorch.is_functorch_wrapped_tensor(t):
            return True
        if torch.is_grad_enabled() and t.requires_grad:
            return True
    return False


def cg(A: Callable | torch.Tensor | LstsqOperator, b, x0=None, *, max_iter: int | None = None,
       rtol: float = 1e-5, atol: float = 0.0, batched: bool = False,
       use_ext: bool | None = None, cuda_graph: bool = False) -> CGResult:
    """Solves A x = b by conjugate gradients, for one system or a batch of independent ones.

    Args:
        A: a callable v -> A v over b's pytree structure (with batched=True it gets and returns
            leaves with the leading batch dimension; v is the solve's own direction buffer,
            overwritten at the next step: clone it to keep it), or a ShiftedOperator around
            one; or a dense
            tensor (P, P), or (B, P, P) with batched=True (a sparse one, COO or CSR, runs as the
            callable v -> A v; batched, COO); or an LstsqOperator. A must be symmetric; CG
            needs it positive definite and flags each system where it is not.
        b: right-hand side, a tensor or a pytree of tensors (float32/float64, one device).
        x0: initial guess with b's structure; zeros by default.
        max_iter: iterations per system (>= 1); default 10 * P as in scipy.sparse.linalg.cg.
            For a callable A on a GPU the loop runs exactly max_iter iterations (converged
            systems are masked: no host synchronisation), so give max_iter there; the default
            warns (RuntimeWarning), as it then makes 10 P products whatever the convergence.
        rtol, atol: a system has converged when ||r|| <= max(rtol * ||b||, atol). With
            atol = 0 each system is rescaled by a power of two first, so ||b||^2 neither
            overflows nor underflows; with atol > 0 it is not (atol is an absolute bound), and
            a float32 b beyond about 1e19 in norm is then flagged non-finite (status 3), one
            below about 1e-19 can read as converged at x = 0: use atol = 0, or scale b, there.
        batched: the leading dimension of every leaf of b indexes independent systems.
        use_ext: None picks the compiled kernels when available; False forces the reference.
            Under autograd (b or a tensor A reads requires grad) the solve runs detached and x
            carries the implicit derivative of A^{-1} b (first order; one more product A x,
            recorded, where A reads a tensor that requires grad, and one adjoint solve per
            backward with the same max_iter and rtol, no atol; x0 gets no gradient). Inside
            torch.func transforms and torch.compile the functional reference runs and is
            differentiated through its iterations.
        cuda_graph: for a callable A on a CUDA device, capture the whole loop (the products and
            the fused iteration ops) as one CUDA graph and replay it; needs max_iter (the graph
            holds exactly that many iterations). To reuse one capture across many right-hand
            sides, use `CapturedCG`.

    Returns:
        CGResult. A system whose right-hand side is zero returns zeros after 0 iterations,
        converged, whatever its x0.

    Raises:
        ValueError naming the argument for wrong shapes, dtypes, devices, batch sizes, max_iter,
        tolerances.
    """
    kw = dict(max_iter=max_iter, rtol=rtol, atol=atol, batched=batched, use_ext=use_ext,
              cuda_graph=cuda_graph)
    if torch.is_grad_enabled() and not _traced():
        return _cg_implicit(A, b, x0, **kw)
    return _cg(A, b, x0, **kw)


def _traced() -> bool:
    """Inside a torch.func transform or torch.compile: the solve is differentiated (and vmapped)
    through its iterations, by the functional twins of the ops."""
    return torch.compiler.is_compiling() or torch._C._functorch.maybe_current_level() is not None


def _detached(tree):
    return None if tree is None else pytree.tree_map(
        lambda t: t.detach() if isinstance(t, torch.Tensor) else t, tree)


def _operator_tensors(A) -> list | None:
    """The tensors a dense or structured operator reads; None for a callable (what it reads is
    known only from its output)."""
    if isinstance(A, torch.Tensor):
        return [A]
    if isinstance(A, LstsqOperator):
        return [t for t in (A.X, A.shift, A.scale) if isinstance(t, torch.Tensor)]
    if isinstance(A, SoftmaxHeadOperator):
        return [t for t in (A.F, A.W, A.bias, A.shift, A.scale) if isinstance(t, torch.Tensor)]
    return None


def _apply_flat(A, z: torch.Tensor, b, batched: bool) -> torch.Tensor:
    """A z for the flat (B, P) z of a solve of A x = b, as a flat (B, P) tensor (autograd
    records through A's tensors)."""
    bflat, spec, shapes = _flatten(b, batched, "b", copy=False)
    if isinstance(A, torch.Tensor) and A.layout != torch.strided:
        A = _sparse_operator(A, b, batched, *bflat.shape)
    if isinstance(A, torch.Tensor):
        return torch.matmul(A, z.unsqueeze(-1)).squeeze(-1)
    if isinstance(A, LstsqOperator):
        X = A.X if A.X.dim() == 3 else A.X.unsqueeze(0)
        return reference.lstsq_apply(X, z, A.shift, A.scale)
    if isinstance(A, SoftmaxHeadOperator):
        return A(z)
    out, _, _ = _flatten(A(_unflatten(z, spec, shapes, batched)), batched, "A(v)", copy=False)
    return out


class _AdjointSolve(torch.autograd.Function):
    """The implicit derivative of a solve: forward zeros (x = z + this, z the solution), backward
    g -> A^{-1} g (A symmetric) by `solve`. Applied to r = b - A z, recorded by autograd with z
    held fixed, it gives dx = A^{-1} (db - dA z), the derivative of A^{-1} b in b and in every
    tensor A reads."""

    @staticmethod
    def forward(ctx, r, solve):
        ctx.solve = solve
        return torch.zeros_like(r)

    @staticmethod
    def backward(ctx, g):
        return ctx.solve(g), None


def _cg_implicit(A, b, x0, *, max_iter, rtol, atol, batched, use_ext, cuda_graph) -> CGResult:
    """cg under autograd: the solve runs on detached tensors (the compiled kernels, no graph of
    its iterations), then x = z + S(b - A z) attaches the implicit derivative of A^{-1} b (one
    more product A z, recorded, where A reads something that requires grad; the backward one
    adjoint solve)."""
    kw = dict(max_iter=max_iter, batched=batched, use_ext=use_ext)
    tensors = _operator_tensors(A)
    probe = {"grad": False}

    def detaching(op):
        # Each product under the caller's grad mode (an operator may build a graph of its own,
        # e.g. a hand-written HVP calling autograd.grad(..., create_graph=True)), its output
        # detached: nothing of the iterations is recorded. Whether autograd records through
        # what a callable reads shows in its outputs only: any product that did says so.
        def run(v):
            out = op(v)
            if any(isinstance(t, torch.Tensor) and t.requires_grad
                   for t in pytree.tree_leaves(out)):
                probe["grad"] = True
            return _detached(out)
        return run

    def plain(op):  # the callable with every product detached (the adjoint's too)
        if isinstance(op, ShiftedOperator):
            return ShiftedOperator(detaching(op.op), op.shift, op.scale)
        return detaching(op)

    if tensors is None and callable(A):
        res = _cg(plain(A), _detached(b), _detached(x0), rtol=rtol, atol=atol,
                  cuda_graph=cuda_graph, **kw)
        op_grad = probe["grad"]  # no product at all: b = 0, x = 0, no dependence on A
    else:
        with torch.no_grad():
            res = _cg(A, _detached(b), _detached(x0), rtol=rtol, atol=atol,
                      cuda_graph=cuda_graph, **kw)
        op_grad = tensors is not None and any(t.requires_grad for t in tensors)
    b_grad = any(t.requires_grad for t in pytree.tree_leaves(b) if isinstance(t, torch.Tensor))
    if not (b_grad or op_grad):
        return res  # nothing recorded reaches x: no extra product
    bflat, spec, shapes = _flatten(b, batched, "b", copy=False)
    z, _, _ = _flatten(res.x, batched, "x", copy=False)
    # r = b - A z recorded; with only b to differentiate, b - b (A z is constant): no product
    r = bflat - (_apply_flat(A, z, b, batched) if op_grad else bflat.detach())
    if not r.requires_grad:
        return res
    # The adjoint's right-hand side is the cotangent, on any scale: atol (in b's units) would
    # call a small one converged at u = 0, a zero gradient. Relative only: the forward's rtol,
    # or for an absolute-only forward (rtol 0) the relative accuracy atol / ||b|| it asked of
    # the largest system (one host read, in that configuration only).
    rtol_adj = rtol
    if rtol == 0 and atol > 0:
        bmax = float(bflat.detach().norm(dim=1).max()) if bflat.numel() else 0.0
        rtol_adj = atol / bmax if bmax > 0 else 1e-5
    adjoint_op = plain(A) if tensors is None and callable(A) else _detached_operator(A)

    def solve(g: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            warnings.warn("imaml_ext.cg: a backward with create_graph=True gets cg's first-order "
                          "implicit derivative, carrying no graph; for higher derivatives run "
                          "the solve inside torch.func transforms (differentiated through its "
                          "iterations)", RuntimeWarning, stacklevel=2)
        with torch.enable_grad():  # an operator that builds its own graph needs grad mode
            adj = _cg(adjoint_op, _unflatten(g.detach(), spec, shapes, batched),
                      rtol=rtol_adj, atol=0.0, **kw)
        u, _, _ = _flatten(adj.x, batched, "x")
        st = adj.status.reshape(-1, 1)
        u = u.masked_fill(st == reference.NONFINITE, float("nan"))  # on the device: no read
        _report_adjoint(adj, rtol_adj, 0.0)
        return u

    x = z + _AdjointSolve.apply(r, solve)
    return CGResult(_unflatten(x, spec, shapes, batched), res.iterations, res.residual_norm,
                    res.status)


def _detached_operator(A):
    """A dense or structured A with its own tensors detached."""
    if isinstance(A, torch.Tensor):
        return A.detach()
    if isinstance(A, LstsqOperator):
        return LstsqOperator(A.X.detach(), *_detached((A.shift, A.scale)))
    if isinstance(A, SoftmaxHeadOperator):
        return SoftmaxHeadOperator(A.F.detach(), A.W.detach(), A.bias.detach(),
                                   *_detached((A.shift, A.scale)))
    return A


def _report_adjoint(adj: CGResult, rtol: float, atol: float) -> None:
    """A RuntimeWarning when the backward's solve broke down or stopped short (on the CPU; on a
    GPU the read would synchronise every backward: non-finite systems still get NaN)."""
    counts = breakdown_counts(adj, None)
    if counts is None:
        return
    neg, bad, stopped, total = counts
    if stopped:
        warnings.warn(f"imaml_ext.cg: the backward's adjoint solve did not converge in "
                      f"{stopped} of {total} system(s), so their gradients are approximate: "
                      f"{not_converged(adj, stopped, rtol, atol)}", RuntimeWarning, stacklevel=3)
    if neg:
        warnings.warn(f"imaml_ext.cg: the backward's adjoint solve met negative curvature in "
                      f"{neg} of {total} system(s): A is not positive definite there; their "
                      f"gradients come from the iterate before it", RuntimeWarning, stacklevel=3)
    if bad:
        warnings.warn(f"imaml_ext.cg: non-finite values in the backward's adjoint solve in {bad} "
                      f"of {total} system(s) (NaN or Inf in the cotangent or A): their gradients "
                      f"are NaN", RuntimeWarning, stacklevel=3)


def _sparse_operator(A: torch.Tensor, b, batched: bool, B: int, P: int) -> Callable:
    """A sparse matrix (COO or CSR, (P, P); COO (B, P, P) with batched=True) as the callable
    v -> A v, for b a single tensor ((P,), or (B, P) with batched=True)."""
    want = f"({B}, {P}, {P})" if batched else f"({P}, {P})"
    if not isinstance(b, torch.Tensor) or b.dim() != (2 if batched else 1):
        got = f"a tensor {tuple(b.shape)}" if isinstance(b, torch.Tensor) else type(b).__name__
        _fail(f"a sparse A takes b as one tensor of shape {'(B, P)' if batched else '(P,)'}, "
              f"got {got}")
    if tuple(A.shape) != ((B, P, P) if batched else (P, P)):
        _fail(f"A must be {want} for b with {B} system(s) of {P} unknowns, got {tuple(A.shape)}")
    if A.dtype != b.dtype or A.device != b.device:
        _fail(f"A must have b's dtype and device ({b.dtype}, {b.device}), got ({A.dtype}, "
              f"{A.device})")
    if not batched:
        return lambda v: A @ v
    if A.layout != torch.sparse_coo:
        _fail(f"a batched sparse A must be COO (torch.bmm has no {A.layout} kernel): pass "
              f"A.to_sparse(), got {A.layout}")
    return lambda v: torch.bmm(A, v.unsqueeze(-1)).squeeze(-1)


def _cg(A, b, x0=None, *, max_iter: int | None = None, rtol: float = 1e-5, atol: float = 0.0,
        batched: bool = False, use_ext: bool | None = None, cuda_graph: bool = False,
        fallback: torch.Tensor | None = None) -> CGResult:
    """cg, plus `fallback`: a flat (B, P) tensor (b flattened, with batched=True) whose row a
    system returns instead of its iterate when it met negative curvature before any step
    (status 2 after 0 iterations), as iMAML's first-order fallback; fused into the solve's last
    op where the solve is step by step."""
    for name, v in (("rtol", rtol), ("atol", atol)):
        if not (finite_number(v) and v >= 0):
            _fail(f"{name} must be a finite number >= 0, got {v!r}")
    for name, v in (("batched", batched), ("cuda_graph", cuda_graph)):
        if not isinstance(v, bool):
            _fail(f"{name} must be True or False, got {v!r}")
    bflat, spec, shapes = _flatten(b, batched, "b", copy=False)
    B, P = bflat.shape
    if fallback is not None and (fallback.shape != bflat.shape or fallback.dtype != bflat.dtype
                                 or fallback.device != bflat.device):
        _fail(f"fallback must be like b flattened: {tuple(bflat.shape)} {bflat.dtype} on "
              f"{bflat.device}, got {tuple(fallback.shape)} {fallback.dtype} on {fallback.device}")
    default_iters = max_iter is None
    if max_iter is None:
        max_iter = max(10 * P, 1)
    if not integer(max_iter) or max_iter < 1:
        _fail(f"max_iter must be an int >= 1, got {max_iter!r}")
    max_iter = int(max_iter)
    if x0 is None:
        xflat = None  # zeros
    else:
        xflat, xspec, xshapes = _flatten(x0, batched, "x0", copy=False)
        if xspec != spec:
            _fail(f"x0 must have b's structure {spec}, got {xspec}")
        if xshapes != shapes:
            _fail(f"x0 must have b's shapes {shapes}, got {xshapes}")
        if xflat.shape[0] != B:
            _fail(f"x0 must have b's {B} system(s) along the batch dimension, got "
                  f"{xflat.shape[0]}")
        if xflat.dtype != bflat.dtype or xflat.device != bflat.device:
            _fail(f"x0 must have b's dtype and device ({bflat.dtype}, {bflat.device}), got "
                  f"({xflat.dtype}, {xflat.device})")
        # A system whose b is zero has the exact solution 0: start it there. From any other x0
        # its residual could only meet ||r|| <= rtol ||b|| = 0 by being exactly zero, so it
        # would run every iteration and end reported as not converged.
        if P > 0:
            xflat = torch.where((bflat == 0).all(dim=1, keepdim=True), 0.0, xflat)
    reference_only = _needs_reference(bflat, xflat)
    ext = False if reference_only else use_ext_for(use_ext, bflat)
    if isinstance(A, torch.Tensor) and A.layout != torch.strided:
        A = _sparse_operator(A, b, batched, B, P)
    structured = isinstance(A, (SoftmaxHeadOperator, LstsqOperator, torch.Tensor))
    if not structured and not callable(A):
        _fail(f"A must be a callable, a tensor or an LstsqOperator, got {type(A).__name__}")
    if B == 0:
        empty = torch.zeros(0, dtype=torch.int32, device=bflat.device)
        x = torch.zeros_like(bflat) if xflat is None else xflat.clone()
        return CGResult(_unflatten(x, spec, shapes, batched), empty, bflat.new_zeros(0),
                        empty.clone())

    if structured and cuda_graph:
        _fail(f"cuda_graph=True captures a callable operator's loop; a "
              f"{type(A).__name__} A runs its whole solve as one op already (no graph to make)")
    if not structured:
        if cuda_graph:
            if default_iters:  # 10 P unrolled iterations would make a graph as large as P allows
                _fail("cuda_graph=True records exactly max_iter iterations: give max_iter (an "
                      "int >= 1), got None")
            if bflat.device.type != "cuda" or reference_only:
                _fail("cuda_graph=True needs a CUDA right-hand side outside autograd and "
                      f"torch.func transforms, got a {bflat.device.type} tensor")
            solver = CapturedCG(A, b, x0, max_iter=max_iter, rtol=rtol, atol=atol,
                                batched=batched, use_ext=use_ext)
            res = solver()
            if fallback is not None:
                res = _with_fallback(res, fallback, spec, shapes, batched)
            return res
        compiling = torch.compiler.is_compiling()
        if default_iters and (bflat.device.type != "cpu" or compiling):
            where = ("under torch.compile (the loop is unrolled into the graph)" if compiling
                     else f"on {bflat.device.type}")
            warnings.warn(f"imaml_ext.cg: a callable operator {where} runs exactly max_iter "
                          f"iterations (stopped systems are masked, the loop never reads back "
                          f"to the host); the default max_iter = 10 P = {max_iter} products "
                          f"whatever the convergence: pass max_iter", RuntimeWarning,
                          stacklevel=3)
        x, iters, rnorm, status = _cg_callable(A, bflat, xflat, spec, shapes, batched, max_iter,
                                               rtol, atol, ext, reference_only, fallback)
    else:
        # Scale each system by a power of two near max|b| (exact in floating point: the iterates
        # are the unscaled ones times that power), so that ||b||^2 can neither underflow to 0
        # (which would read as converged at x = 0) nor overflow. With atol > 0 the absolute
        # test is kept as given, unscaled. (_cg_callable does the same, in cg_begin.)
        scale = None
        if atol == 0.0 and P > 0:
            scale = reference.cg_rhs_scale(bflat)
            bflat = bflat / scale.unsqueeze(1)
            if xflat is not None:
                xflat = xflat / scale.unsqueeze(1)
        if xflat is None:
            xflat = torch.zeros_like(bflat)
        x, iters, rnorm, status = _solve_structured(A, bflat, xflat, B, P, batched, max_iter,
                                                    rtol, atol, ext, reference_only)
        if scale is not None:
            x = x * scale.unsqueeze(1)
            rnorm = rnorm * scale
            # A solution beyond the dtype's range (the scaled solve was finite, its unscaling
            # is not: float32 b = 3e38 with A = I / 2) is flagged, not returned as converged.
            # On the device. (A callable's solve unscales inside cg_end, which does not flag
            # it: its x is Inf there, the status as the scaled solve left it.)
            status = torch.where(torch.isfinite(x).all(dim=1), status,
                                 torch.full_like(status, reference.NONFINITE))
        if fallback is not None:
            x = reference.first_order_fallback(x, fallback, status, iters)
    xs = _unflatten(x, spec, shapes, batched)
    if not batched:
        iters, rnorm, status = iters[0], rnorm[0], status[0]
    return CGResult(xs, iters, rnorm, status)


def _with_fallback(res: CGResult, fallback, spec, shapes, batched) -> CGResult:
    x, _, _ = _flatten(res.x, batched, "x")
    x = reference.first_order_fallback(x, fallback, res.status.reshape(-1),
                                       res.iterations.reshape(-1))
    return CGResult(_unflatten(x, spec, shapes, batched), res.iterations, res.residual_norm,
                    res.status)


def _solve_structured(A, bflat, xflat, B, P, batched, max_iter, rtol, atol, ext, reference_only):
    """The whole-loop solvers of the dense and structured operators (b, x0 scaled)."""
    if isinstance(A, SoftmaxHeadOperator):
        return A.solve_flat(bflat, xflat, max_iter=max_iter, rtol=rtol, atol=atol, use_ext=ext,
                            reference_only=reference_only)
    if isinstance(A, LstsqOperator):
        X = A.X if A.X.dim() == 3 else A.X.unsqueeze(0)
        if X.dim() != 3 or X.shape[0] != B or X.shape[2] != P:
            _fail(f"A.X must be ({B}, n, {P}) for b of {B} system(s) of size {P}, got "
                  f"{tuple(A.X.shape)}")
        if X.dtype != bflat.dtype or X.device != bflat.device:
            _fail(f"A.X must have b's dtype and device ({bflat.dtype}, {bflat.device}), got "
                  f"({X.dtype}, {X.device})")
        coeffs = [t for t in (A.shift, A.scale) if isinstance(t, torch.Tensor)]
        if reference_only or _needs_reference(X, *coeffs):
            return reference.cg_solve_lstsq(X, bflat, xflat, A.shift, A.scale, max_iter, rtol,
                                            atol)
        return ops.cg_solve_lstsq(X, bflat, xflat, as_number(A.shift), as_number(A.scale),
                                  max_iter, rtol, atol, use_ext=ext)
    Ab = A if batched else A.unsqueeze(0)
    if Ab.shape != (B, P, P):
        want = f"({B}, {P}, {P})" if batched else f"({P}, {P})"
        n = A.shape[-1] if A.dim() >= 2 else 0
        hint = (f" (b's {P} = {P // n} x {n} entries are one system here; several right-hand "
                f"sides of one A are rows of b with batched=True: b (k, {n}), A expanded to "
                f"(k, {n}, {n}))" if not batched and A.dim() == 2 and n and P % n == 0
                and P > n else "")
        _fail(f"A must be {want} for b with {B} system(s) of {P} unknowns, got "
              f"{tuple(A.shape)}{hint}")
    if A.dtype != bflat.dtype or A.device != bflat.device:
        _fail(f"A must have b's dtype and device ({bflat.dtype}, {bflat.device}), got "
              f"({A.dtype}, {A.device})")
    if reference_only or _needs_reference(A):
        return reference.cg_solve_dense(Ab, bflat, xflat, max_iter, rtol, atol)
    return ops.cg_solve_dense(Ab, bflat, xflat, max_iter, rtol, atol, use_ext=ext)


def _cg_callable(A, bflat, xflat, spec, shapes, batched, max_iter, rtol, atol, ext,
                 functional, fallback=None):
    """A solve over a callable operator, from the unscaled b (B, P) and x0 (None: zeros).
    Returns the unscaled (x, iters, residual norm, status).

    From zero the solve is cg_begin (x = 0, r0 = b, no product A x0, as SciPy's cg and the
    compiled whole-loop solvers: for iMAML's HVP one product fewer, 1/6 of a 5-step solve; an
    operator that returns NaN/Inf is then flagged at A p0 instead of A x0), then one cg_step per
    iteration after the product, then cg_end (unscaling and the fallback rows): a solve costs
    its products plus max_iter + 2 ops. A ShiftedOperator's shift and scale are applied inside
    cg_step. Each system is scaled by cg_rhs_scale when atol == 0 (see cg)."""
    shift, scale_op, inner = 0.0, 1.0, A
    if isinstance(A, ShiftedOperator):
        shift, scale_op, inner = float(A.shift), float(A.scale), A.op
    rescale = atol == 0.0

    def product(v: torch.Tensor) -> torch.Tensor:
        out = inner(_unflatten(v, spec, shapes, batched))
        # A one-tensor output is used without a copy (3% of a 5-step iMAML solve on the CPU),
        # even when it is v = p itself (A = identity): the step kernels read Ap before they
        # rewrite p (test_operator_returning_its_input_or_a_view_of_it holds them to it).
        oflat, ospec, oshapes = _flatten(out, batched, "A(v)", copy=False)
        if ospec != spec or oshapes != shapes:
            _fail(f"A(v) must return b's structure {spec} and shapes {shapes}, got {ospec} "
                  f"and {oshapes}")
        if oflat.shape != bflat.shape:
            _fail(f"A(v) must keep b's {bflat.shape[0]} system(s) along the batch dimension, "
                  f"got {oflat.shape[0]}")
        if oflat.dtype != bflat.dtype or oflat.device != bflat.device:
            _fail(f"A(v) must return b's dtype and device ({bflat.dtype}, {bflat.device}), "
                  f"got ({oflat.dtype}, {oflat.device})")
        return oflat

    # Under torch.func transforms or autograd through the solve (functional) the same loop runs
    # on the functional twins of the ops.
    if xflat is None:
        begin = reference.cg_begin if functional else partial(ops.cg_begin, use_ext=ext)
        x, r, p, rs, bnorm2, status, iters, s = begin(bflat, rtol, atol, rescale)
    else:
        s = reference.cg_rhs_scale(bflat) if rescale else bflat.new_ones(bflat.shape[0])
        b = bflat / s.unsqueeze(1)
        x = (xflat / s.unsqueeze(1)).contiguous()
        ax = product(x)
        functional = functional or _needs_reference(ax)
        # a system started at zero has r0 = b, as from cg_begin and in the whole-loop solvers
        # (an operator with a NaN/Inf is then met at A p0, with ||r|| = ||b||, not NaN)
        ax = torch.where((x == 0).all(-1, keepdim=True), torch.zeros_like(ax), ax)
        r = (b - reference.cg_affine(x, ax, shift, scale_op)).contiguous()
        p = r.clone()
        rs = (r * r).sum(-1)
        bnorm2 = (b * b).sum(-1)
        status = reference.cg_initial_status(rs, reference.cg_tol2(bnorm2, rtol, atol))
        iters = torch.zeros_like(status)
    # the early stop reads the status: free on the CPU (not inside a transform, which a status
    # computed from a vmapped operator's output is); on a GPU stopped systems are masked instead
    cpu = bflat.device.type == "cpu"
    for _ in range(max_iter):
        if cpu and not reference._in_transform(status) and \
                not bool((status == reference.RUNNING).any()):
            break
        ap = product(p)
        # An operator that reads tensors under autograd or a torch.func transform (vmap over the
        # matrix a closure holds) makes an output the in-place ops cannot carry: the loop goes on
        # with the functional twins, from the state so far (plain tensors until then).
        functional = functional or _needs_reference(ap)
        if functional:
            x, r, p, rs, status, iters = reference.cg_step(x, r, p, ap, rs, bnorm2, status,
                                                           iters, rtol, atol, shift, scale_op)
        else:
            ops.cg_step_(x, r, p, ap, rs, bnorm2, status, iters, rtol, atol,
                         shift=shift, scale=scale_op, use_ext=ext)
    end = reference.cg_end if functional else partial(ops.cg_end, use_ext=ext)
    x, rnorm = end(x, rs, status, iters, s, fallback)
    return x, iters, rnorm, status


class CapturedCG:
    """A CG solve over a callable operator, captured once as a CUDA graph and replayed.

    The capture records `max_iter` iterations of (A(p), fused CG step) plus the set-up, on static
    buffers; `solver(b)` copies b into its buffer and replays the graph: one launch, no host
    synchronisation. Tensors that A reads must stay at the same addresses between replays (update
    them in place, e.g. `phi.copy_(new_phi)`), as with any CUDA graph.

        solver = CapturedCG(matvec, b_example, max_iter=5, batched=True)
        x = solver(b).x

    Built without x0, the capture starts every solve from zero with r0 = b and no product A x0
    (one product fewer; an iMAML solve of 5 steps then makes 5 HVPs, not 6), and a later call
    cannot pass x0. Built with x0, each call may pass a new x0. A may be a ShiftedOperator (its
    shift and scale then go into the captured step ops), and b a pytree, as for `cg`.
    """

    def __init__(self, A: Callable, b, x0=None, *, max_iter: int = 10, rtol: float = 1e-5,
                 atol: float = 0.0, batched: bool = False, use_ext: bool | None = None):
        bflat, self._spec, self._shapes = _flatten(b, batched, "b")
        if bflat.device.type != "cuda":
            _fail(f"CapturedCG needs CUDA tensors, got {bflat.device}")
        if not integer(max_iter) or max_iter < 1:
            _fail(f"max_iter must be an int >= 1, got {max_iter!r}")
        max_iter = int(max_iter)
        self._batched = batched
        self._b = bflat.clone()
        self._zero_start = x0 is None
        self._x0 = _flatten(x0, batched, "x0")[0].clone() if x0 is not None \
            else torch.zeros_like(bflat)
        ext = use_ext_for(use_ext, bflat)
        spec, shapes = self._spec, self._shapes

        def run():
            return _cg_callable(A, self._b, None if self._zero_start else self._x0, spec, shapes,
                                batched, max_iter, rtol, atol, ext, False)

        self._replay, self._out = _capture_graph(run, bflat.device, warmup=1)

    def __call__(self, b=None, x0=None) -> CGResult:
        """Solves for a new right-hand side (b's structure and shapes as at capture)."""
        if b is not None:
            bflat, spec, shapes = _flatten(b, self._batched, "b")
            if spec != self._spec or shapes != self._shapes:
                _fail(f"b must have the captured structure and shapes {self._shapes}, got {shapes}")
            self._b.copy_(bflat)
        if x0 is not None:
            if self._zero_start:
                _fail("x0: this solver was captured for a zero start (built without x0, so it "
                      "makes no product A x0); build it with an x0 to solve from other starts")
            self._x0.copy_(_flatten(x0, self._batched, "x0")[0])
        self._replay()
        return self.result()

    def result(self) -> CGResult:
        """The last solve's result (views of the graph's static output buffers: clone to keep)."""
        x, iters, rnorm, status = self._out
        xs = _unflatten(x, self._spec, self._shapes, self._batched)
        if not self._batched:
            iters, rnorm, status = iters[0], rnorm[0], status[0]
        return CGResult(xs, iters, rnorm, status)


def _capture_graph(run: Callable, device: torch.device, warmup: int):
    """Captures run() as a CUDA graph: (replay, run's outputs as the graph's static tensors).
    `warmup` eager runs on a side stream come first (lazy initialisation, cuDNN and cuBLAS
    workspaces must not happen while capturing). Used by CapturedCG and
    imaml_ext.implicit.CapturedFunction (which CapturedMetaGradient is built on)."""
    if device.type != "cuda":
        raise ValueError(f"CUDA graph capture needs CUDA tensors, got {device}")
    stream = torch.cuda.Stream(device=device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(max(int(warmup), 1)):
            run()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    return graph.replay, out


def check_flag(check) -> bool | None:
    """`check` of solve_cg / implicit_root: None, True or False, else a ValueError."""
    if check is not None and not isinstance(check, bool):
        _fail(f"check must be None, True or False, got {check!r}")
    return check


def breakdown_counts(res: CGResult, check: bool | None) -> tuple[int, int, int, int] | None:
    """(systems that met negative curvature, systems with non-finite values, systems that
    stopped at max_iter short of the tolerance, all systems) of a solve, for a caller that warns
    about them; None when `check` says not to look: False, or None on a device other than the
    CPU (the read would synchronise with the host); None too inside torch.func transforms and
    torch.compile, where the statuses have no values to read."""
    st = res.status
    if check is False or (check is None and st.device.type != "cpu"):
        return None
    if reference._in_transform(st):
        return None  # a vmapped / traced status has no values to read
    neg, nonfinite, running = torch.stack([(st == reference.NEGATIVE_CURVATURE).sum(),
                                           (st == reference.NONFINITE).sum(),
                                           (st == reference.RUNNING).sum()]).tolist()  # 1 read
    return neg, nonfinite, running, st.numel()


def not_converged(res: CGResult, stopped: int, rtol: float, atol: float) -> str:
    """The words of a warning about `stopped` systems that ran out of iterations (host reads:
    for a warning already decided on)."""
    mask = res.status == reference.RUNNING
    worst, iters = torch.stack([torch.where(mask, res.residual_norm, 0).max().double(),
                                res.iterations.max().double()]).tolist()
    return (f"no convergence in {stopped}: stopped after max_iter = "
            f"{int(iters)} iterations with residual norm up to {worst:.3g} "
            f"(rtol={rtol:g}, atol={atol:g}; raise max_iter, or check=False where a truncated "
            f"solve is meant)")


_SOLVE_CG_KEYS = ("max_iter", "rtol", "atol", "batched", "use_ext", "cuda_graph")


def _solve_cg_keywords(kwargs: dict, where: str) -> dict:
    """solve_cg's keywords with TorchOpt's maxiter renamed max_iter; unknown ones (TorchOpt's
    preconditioner M among them) are a ValueError naming ``where``."""
    kwargs = dict(kwargs)
    if "maxiter" in kwargs:
        if "max_iter" in kwargs:
            raise ValueError(f"{where}: give maxiter or max_iter, not both")
        kwargs["max_iter"] = kwargs.pop("maxiter")
    unknown = sorted(set(kwargs) - set(_SOLVE_CG_KEYS) - {"ridge", "init", "check"})
    if unknown:
        raise ValueError(f"{where}: unknown keyword(s) {unknown}; it takes maxiter, ridge, "
                         f"init, check and {', '.join(_SOLVE_CG_KEYS)}"
                         + (" (no preconditioner M)" if "M" in unknown else ""))
    return kwargs


def solve_cg(**kwargs) -> Callable:
    """torchopt-style factory: `solve_cg(max_iter=...)(matvec, b)` returns x.

    A one-line switch from `torchopt.linear_solve.solve_cg(maxiter=...)`, with its keywords and
    its solve's signature, `solve(matvec, b, ridge=None, init=None, **kwargs)`: `maxiter` (=
    max_iter), `ridge` (solve (matvec + ridge I) x = b, applied inside the fused step) and
    `init` (the start; `x0` is taken as its alias), given to the factory or to the solve (the
    solve's win); and cg's own (max_iter, rtol, atol, batched, use_ext, cuda_graph). Any other
    keyword is a ValueError at once (torchopt's preconditioner M is not supported). It returns
    x alone, so a system that met negative curvature (matvec not positive definite: x is the
    iterate before it) or NaN/Inf warns (RuntimeWarning), and so does one that stopped at
    max_iter short of the tolerance (x is then CG's approximation after max_iter iterations:
    raise max_iter, or pass check=False where a truncated solve is meant); check=None (default)
    looks on the CPU only, where it is free, check=True on a GPU too (one host read per solve),
    check=False never.
    """
    defaults = _solve_cg_keywords(kwargs, "solve_cg")
    check_flag(defaults.get("check"))

    def solve(matvec, b, ridge=None, init=None, **solve_kwargs):
        if "x0" in solve_kwargs:
            if init is not None:
                raise ValueError("solve_cg: give the start as init or x0, not both")
            init = solve_kwargs.pop("x0")
        kw = {**defaults, **_solve_cg_keywords(solve_kwargs, "solve_cg's solve")}
        check = check_flag(kw.pop("check", None))
        ridge_kw, init_kw = kw.pop("ridge", None), kw.pop("init", None)
        ridge = ridge_kw if ridge is None else ridge
        x0 = init_kw if init is None else init
        if ridge is not None:
            if not finite_number(ridge):
                raise ValueError(f"solve_cg: ridge must be a finite number, got {ridge!r}")
            matvec = ShiftedOperator(matvec, float(ridge), 1.0)
        res = cg(matvec, b, x0, **kw)
        counts = breakdown_counts(res, check)
        if counts is not None and any(counts[:3]):
            neg, bad, stopped, total = counts
            what = "; ".join(m for m in (
                f"negative curvature in {neg} (matvec is not positive definite there; x is the "
                f"iterate before it)" if neg else "",
                f"non-finite values in {bad}" if bad else "",
                not_converged(res, stopped, kw.get("rtol", 1e-5), kw.get("atol", 0.0))
                if stopped else "") if m)
            warnings.warn(f"solve_cg: of {total} system(s), {what}", RuntimeWarning,
                          stacklevel=2)
        return res.x

    return solve
