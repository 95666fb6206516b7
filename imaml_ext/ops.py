"""Typed wrappers of the compiled ops, their fake (meta) kernels for torch.compile and opcheck,
and the switch to the pure-PyTorch twins of imaml_ext.reference.

Every wrapper takes `use_ext`: None picks the compiled kernel when it is loaded for the inputs'
device, True insists on it, False runs the reference. Both paths raise the same ValueError-style
messages for bad arguments (the C++ checks raise RuntimeError subclasses with the same text).
The CG and Hessian-vector ops are not differentiable: the implicit-gradient layer differentiates
around them. The conv net's block wrappers (bn_relu_pool, conv1ch, conv1ch_bn_relu_pool and
its second-order form) carry autograd.
"""
from __future__ import annotations

import math
import numbers

import torch
from torch.nn.modules.utils import _pair

from imaml_ext import reference
from imaml_ext._ext import _C, use_ext_for

_FLOATS = (torch.float32, torch.float64)


# ---- argument checks of the reference path (the C++ kernels run csrc/checks.cpp) -------------

def _fail(op: str, msg: str):
    raise ValueError(f"{op}: {msg}")


def _check_float(op, name, t):
    if not isinstance(t, torch.Tensor):
        _fail(op, f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in _FLOATS:
        _fail(op, f"{name} must be float32 or float64, got {t.dtype}")


def _check_like(op, name, t, ref_name, ref):
    _check_float(op, name, t)
    if t.device != ref.device:
        _fail(op, f"{name} must be on {ref.device} like {ref_name}, got {t.device}")
    if t.dtype != ref.dtype:
        _fail(op, f"{name} must have dtype {ref.dtype} like {ref_name}, got {t.dtype}")


def _check_tols(op, rtol, atol):
    for name, v in (("rtol", rtol), ("atol", atol)):
        if not (math.isfinite(v) and v >= 0):
            _fail(op, f"{name} must be finite and >= 0, got {v}")


def _check_affine(op, shift, scale):
    if not (math.isfinite(shift) and math.isfinite(scale)):
        _fail(op, f"shift and scale must be finite, got {shift} and {scale}")


def check_solve(op, b, x0, max_iter, rtol, atol):
    _check_float(op, "b", b)
    if b.dim() != 2:
        _fail(op, f"b must be (B, P), got {tuple(b.shape)}")
    _check_like(op, "x0", x0, "b", b)
    if x0.shape != b.shape:
        _fail(op, f"x0 must be {tuple(b.shape)} like b, got {tuple(x0.shape)}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, numbers.Integral):
        _fail(op, f"max_iter must be an int, got {max_iter!r}")  # int() took 2.5 as 2
    if max_iter < 1:
        _fail(op, f"max_iter must be >= 1, got {max_iter}")
    _check_tols(op, rtol, atol)


def check_lstsq(op, X, v, v_name, shift, scale):
    """v_name: "b" for a solve (X is then checked against b), "v" for a product (v against X)."""
    if v_name == "b":
        _check_like(op, "X", X, "b", v)
    else:
        _check_float(op, "X", X)
        _check_like(op, v_name, v, "X", X)
    if X.dim() != 3:
        _fail(op, f"X must be (B, n, d), got {tuple(X.shape)}")
    if v.dim() != 2 or v.shape[0] != X.shape[0] or v.shape[1] != X.shape[2]:
        _fail(op, f"{v_name} must be ({X.shape[0]}, {X.shape[2]}) to match X "
                  f"{tuple(X.shape)}, got {tuple(v.shape)}")
    if not (math.isfinite(shift) and math.isfinite(scale)):
        _fail(op, f"shift and scale must be finite, got {shift} and {scale}")


def check_dense(op, A, b):
    _check_like(op, "A", A, "b", b)
    B, P = b.shape
    if A.shape != (B, P, P):
        _fail(op, f"A must be ({B}, {P}, {P}) to match b {tuple(b.shape)}, got {tuple(A.shape)}")


def check_step(op, x, r, p, Ap, rs, bnorm2, status, iters, rtol, atol):
    _check_float(op, "x", x)
    if x.dim() != 2:
        _fail(op, f"x must be (B, P), got {tuple(x.shape)}")
    for name, t in (("r", r), ("p", p), ("Ap", Ap)):
        _check_like(op, name, t, "x", x)
        if t.shape != x.shape:
            _fail(op, f"{name} must be {tuple(x.shape)} like x, got {tuple(t.shape)}")
    for name, t in (("rs", rs), ("bnorm2", bnorm2)):
        _check_like(op, name, t, "x", x)
        if t.shape != x.shape[:1]:
            _fail(op, f"{name} must be ({x.shape[0]},), got {tuple(t.shape)}")
    for name, t in (("status", status), ("iters", iters)):
        if t.dtype != torch.int32:
            _fail(op, f"{name} must be int32, got {t.dtype}")
        if t.shape != x.shape[:1]:
            _fail(op, f"{name} must be ({x.shape[0]},), got {tuple(t.shape)}")
    # updated in place: the kernels write through their memory, the reference through views
    for name, t in (("x", x), ("r", r), ("p", p), ("rs", rs), ("status", status),
                    ("iters", iters)):
        if not t.is_contiguous():
            _fail(op, f"{name} is written in place and must be contiguous (the compiled op's "
                      f"words), got strides {t.stride()}")
    # ... and through restrict pointers in the kernels: no two may share memory, except p and
    # Ap (both only read while the other is written: an operator may return its input)
    bufs = (("x", x), ("r", r), ("p", p), ("Ap", Ap), ("rs", rs), ("bnorm2", bnorm2))
    for i, (na, a) in enumerate(bufs):
        for nb, b in bufs[i + 1:]:
            if (na, nb) != ("p", "Ap") and _share_memory(a, b):
                _fail(op, f"{na} and {nb} must be separate buffers (they share memory)")
    _check_tols(op, rtol, atol)


def _share_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors' element ranges overlap in one storage (ranges from their first to
    their last element, so a conservative answer for strided views). Not asked while
    torch.compile traces: fake tensors have no addresses (the compiled op checks its own;
    the reference route, use_ext=False, then goes unchecked, writing through copy_)."""
    if torch.compiler.is_compiling():
        return False
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device or a.device.type == "meta":
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False

    def span(t):
        last = sum((n - 1) * st for n, st in zip(t.shape, t.stride()) if n > 0)
        lo = t.data_ptr() + min(0, last) * t.element_size()
        return lo, t.data_ptr() + (max(0, last) + 1) * t.element_size()
    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


# ---- the ops --------------------------------------------------------------------------------

def cg_step_(x, r, p, Ap, rs, bnorm2, status, iters, rtol: float, atol: float, *,
             shift: float = 0.0, scale: float = 1.0, use_ext: bool | None = None) -> None:
    """One fused CG iteration for B systems, in place. See csrc/cg_math.h for the arithmetic.

    Args:
        x, r, p: (B, P) float32/float64, contiguous; updated.
        Ap: (B, P), the operator applied to the current p (or, with shift and scale, the
            product M p of an affine operator A p = shift p + scale M p, applied in the step).
        rs: (B,) r.r, updated. bnorm2: (B,) ||b||^2.
        status, iters: (B,) int32, updated (status codes in imaml_ext.reference).
        shift, scale: finite; (0, 1), the default, is the plain operator.
    Not differentiable.
    """
    if use_ext_for(use_ext, x):
        torch.ops.imaml_ext.cg_step(x, r, p, Ap, rs, bnorm2, status, iters, rtol, atol, shift,
                                    scale)
    else:
        check_step("cg_step", x, r, p, Ap, rs, bnorm2, status, iters, rtol, atol)
        _check_affine("cg_step", shift, scale)
        reference.cg_step_(x, r, p, Ap, rs, bnorm2, status, iters, rtol, atol, shift, scale)


def cg_begin(b, rtol: float, atol: float, rescale: bool = True, *, use_ext: bool | None = None):
    """The state of B CG solves from x0 = 0 in one op: (x, r, p, rs, bnorm2, status, iters, s).

    x = 0; r = p = b / s (B, P); rs = bnorm2 = ||b / s||^2 (B,); status (B,) int32 (converged
    for a zero b, non-finite for NaN/Inf, else running); iters = 0; s (B,) the power-of-two scale
    of each system (reference.cg_rhs_scale) with rescale, else ones. Not differentiable.
    """
    if use_ext_for(use_ext, b):
        return torch.ops.imaml_ext.cg_begin(b, rtol, atol, rescale)
    _check_float("cg_begin", "b", b)
    if b.dim() != 2:
        _fail("cg_begin", f"b must be (B, P), got {tuple(b.shape)}")
    _check_tols("cg_begin", rtol, atol)
    if rescale and atol > 0:
        _fail("cg_begin", f"rescale needs atol = 0 (atol is absolute in b's units, the "
                          f"rescaled residual is not), got atol {atol}")
    return reference.cg_begin(b, rtol, atol, rescale)


def cg_end(x, rs, status, iters, scale, fallback=None, *, use_ext: bool | None = None):
    """The end of a cg_begin solve: (x s (B, P), sqrt(rs) s (B,)); with `fallback` (B, P) the
    systems that met negative curvature before their first step return its row. Not
    differentiable."""
    if use_ext_for(use_ext, x):
        return torch.ops.imaml_ext.cg_end(x, rs, status, iters, scale, fallback)
    _check_float("cg_end", "x", x)
    if x.dim() != 2:
        _fail("cg_end", f"x must be (B, P), got {tuple(x.shape)}")
    for name, t in (("rs", rs), ("scale", scale)):
        _check_like("cg_end", name, t, "x", x)
        if t.shape != x.shape[:1]:
            _fail("cg_end", f"{name} must be ({x.shape[0]},), got {tuple(t.shape)}")
    for name, t in (("status", status), ("iters", iters)):
        if t.dtype != torch.int32:
            _fail("cg_end", f"{name} must be int32, got {t.dtype}")
        if t.shape != x.shape[:1]:
            _fail("cg_end", f"{name} must be ({x.shape[0]},), got {tuple(t.shape)}")
    if fallback is not None:
        _check_like("cg_end", "fallback", fallback, "x", x)
        if fallback.shape != x.shape:
            _fail("cg_end", f"fallback must be {tuple(x.shape)} like x, got "
                            f"{tuple(fallback.shape)}")
    return reference.cg_end(x, rs, status, iters, scale, fallback)


def cg_solve_dense(A, b, x0, max_iter: int, rtol: float, atol: float, *,
                   use_ext: bool | None = None):
    """Whole-loop CG on dense symmetric A (B, P, P): returns (x, iters, residual_norm, status).

    Not differentiable.
    """
    if use_ext_for(use_ext, b):
        return torch.ops.imaml_ext.cg_solve_dense(A, b, x0, max_iter, rtol, atol)
    check_solve("cg_solve_dense", b, x0, max_iter, rtol, atol)
    check_dense("cg_solve_dense", A, b)
    return reference.cg_solve_dense(A, b, x0, max_iter, rtol, atol)


def cg_solve_lstsq(X, b, x0, shift: float, scale: float, max_iter: int, rtol: float, atol: float,
                   *, use_ext: bool | None = None):
    """Whole-loop CG on v -> shift v + scale X^T (X v), X (B, n, d), never forming X^T X.

    Returns (x, iters, residual_norm, status). Not differentiable.
    """
    if use_ext_for(use_ext, b):
        return torch.ops.imaml_ext.cg_solve_lstsq(X, b, x0, shift, scale, max_iter, rtol, atol)
    check_solve("cg_solve_lstsq", b, x0, max_iter, rtol, atol)
    check_lstsq("cg_solve_lstsq", X, b, "b", shift, scale)
    return reference.cg_solve_lstsq(X, b, x0, shift, scale, max_iter, rtol, atol)


def lstsq_apply(X, v, shift: float = 0.0, scale: float = 1.0, *, use_ext: bool | None = None):
    """shift v + scale X^T (X v) for X (B, n, d), v (B, d), in one pass over X.

    With shift=0, scale=1/n this is the least-squares Hessian-vector product. Not differentiable.
    """
    if use_ext_for(use_ext, v):
        return torch.ops.imaml_ext.lstsq_apply(X, v, shift, scale)
    check_lstsq("lstsq_apply", X, v, "v", shift, scale)
    return reference.lstsq_apply(X, v, shift, scale)


# ---- fake kernels: shapes only, for torch.compile, FakeTensor and opcheck --------------------

if _C is not None:
    @torch.library.register_fake("imaml_ext::cg_step")
    def _cg_step_fake(x, r, p, Ap, rs, bnorm2, status, iters, rtol, atol, shift=0.0, scale=1.0):
        return None

    @torch.library.register_fake("imaml_ext::cg_begin")
    def _cg_begin_fake(b, rtol, atol, rescale):
        B = b.shape[0]
        vec = (torch.empty_like(b, memory_format=torch.contiguous_format) for _ in range(3))
        i32 = (b.new_empty((B,), dtype=torch.int32) for _ in range(2))
        return (*vec, b.new_empty((B,)), b.new_empty((B,)), *i32, b.new_empty((B,)))

    @torch.library.register_fake("imaml_ext::cg_end")
    def _cg_end_fake(x, rs, status, iters, scale, fallback):
        return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(rs)

    def _solve_fake(b):
        B = b.shape[0]
        return (torch.empty_like(b), b.new_empty((B,), dtype=torch.int32), b.new_empty((B,)),
                b.new_empty((B,), dtype=torch.int32))

    @torch.library.register_fake("imaml_ext::cg_solve_dense")
    def _cg_solve_dense_fake(A, b, x0, max_iter, rtol, atol):
        return _solve_fake(b)

    @torch.library.register_fake("imaml_ext::cg_solve_lstsq")
    def _cg_solve_lstsq_fake(X, b, x0, shift, scale, max_iter, rtol, atol):
        return _solve_fake(b)

    @torch.library.register_fake("imaml_ext::lstsq_apply")
    def _lstsq_apply_fake(X, v, shift, scale):
        return torch.empty_like(v)


# ---- the softmax cross-entropy head (csrc/hvp_math.h) ----------------------------------------

def check_softmax_head(op, F, W, bias, shift, scale, names=("F", "W", "bias")):
    """F (B, n, f), W (B, c, f), bias (B, c) alike; `names` are the caller's for them."""
    fn, wn, bn = names
    _check_float(op, fn, F)
    if F.dim() != 3:
        _fail(op, f"{fn} must be (B, n, f), got {tuple(F.shape)}")
    B, _, f = F.shape
    _check_like(op, wn, W, fn, F)
    if W.dim() != 3 or W.shape[0] != B or W.shape[2] != f:
        _fail(op, f"{wn} must be ({B}, c, {f}) to match {fn} {tuple(F.shape)}, got "
                  f"{tuple(W.shape)}")
    _check_like(op, bn, bias, fn, F)
    if bias.dim() != 2 or bias.shape[0] != B or bias.shape[1] != W.shape[1]:
        _fail(op, f"{bn} must be ({B}, {W.shape[1]}) to match {wn} {tuple(W.shape)}, got "
                  f"{tuple(bias.shape)}")
    if not (math.isfinite(shift) and math.isfinite(scale)):
        _fail(op, f"shift and scale must be finite, got {shift} and {scale}")


def check_softmax_head_direction(op, W, bias, V, vb):
    _check_like(op, "V", V, "W", W)
    if V.shape != W.shape:
        _fail(op, f"V must be {tuple(W.shape)} like W, got {tuple(V.shape)}")
    _check_like(op, "vb", vb, "bias", bias)
    if vb.shape != bias.shape:
        _fail(op, f"vb must be {tuple(bias.shape)} like bias, got {tuple(vb.shape)}")


def check_softmax_head_flat(op, name, W, v):
    _check_like(op, name, v, "W", W)
    B, c, f = W.shape
    if v.dim() != 2 or v.shape[0] != B or v.shape[1] != c * (f + 1):
        _fail(op, f"{name} must be ({B}, {c * (f + 1)}) = (B, c*(f+1)) for W {tuple(W.shape)} "
                  f"(layout: W row-major, then bias), got {tuple(v.shape)}")


def softmax_head_hvp(F, W, bias, V, vb, shift: float = 0.0, scale: float = 1.0, *,
                     use_ext: bool | None = None):
    """shift (V, vb) + scale H (V, vb), H the Hessian of the mean softmax cross-entropy
    (1/n) sum_i CE(W f_i + bias, y_i) with respect to (W, bias); labels are not needed.

    One pass over the features: per sample, the logits and the direction's logits are taken
    together, then u = p * (z - p.z) and the outer product u f^T is accumulated.

    Args:
        F: (B, n, f) features, float32/float64. W: (B, c, f), bias: (B, c): the head.
        V: (B, c, f), vb: (B, c): the direction.
        shift, scale: (I + H/lam) is shift=1, scale=1/lam; H alone is shift=0, scale=1.

    Returns:
        (B, c, f) and (B, c), contiguous. With n = 0 the mean is taken as 0 (H = 0).
    Not differentiable.
    """
    if use_ext_for(use_ext, F):
        return torch.ops.imaml_ext.softmax_head_hvp(F, W, bias, V, vb, shift, scale)
    check_softmax_head("softmax_head_hvp", F, W, bias, shift, scale)
    check_softmax_head_direction("softmax_head_hvp", W, bias, V, vb)
    outW, outb = reference.softmax_head_hvp(F, W, bias, V, vb, shift, scale)
    return outW.contiguous(), outb.contiguous()  # as the kernels' (V's strides otherwise)


def cg_solve_softmax_head(F, W, bias, b, x0, shift: float, scale: float, max_iter: int,
                          rtol: float, atol: float, *, use_ext: bool | None = None):
    """Whole-loop CG on v -> shift v + scale H v, H the softmax head's Hessian at (W, bias).

    b, x0: (B, c*(f+1)) in the flat layout [W row-major (c*f), then bias (c)]; F (B, n, f),
    W (B, c, f), bias (B, c). Returns (x, iters, residual_norm, status). Not differentiable.
    """
    if use_ext_for(use_ext, b):
        return torch.ops.imaml_ext.cg_solve_softmax_head(F, W, bias, b, x0, shift, scale,
                                                         max_iter, rtol, atol)
    op = "cg_solve_softmax_head"
    check_solve(op, b, x0, max_iter, rtol, atol)
    check_softmax_head(op, F, W, bias, shift, scale)
    check_softmax_head_flat(op, "b", W, b)
    return reference.cg_solve_softmax_head(F, W, bias, b, x0, shift, scale, max_iter, rtol, atol)


if _C is not None:
    @torch.library.register_fake("imaml_ext::softmax_head_hvp")
    def _softmax_head_hvp_fake(F, W, bias, V, vb, shift, scale):
        return V.new_empty(V.shape), vb.new_empty(vb.shape)

    @torch.library.register_fake("imaml_ext::cg_solve_softmax_head")
    def _cg_solve_softmax_head_fake(F, W, bias, b, x0, shift, scale, max_iter, rtol, atol):
        B = b.shape[0]
        return (b.new_empty(b.shape), b.new_empty((B,), dtype=torch.int32), b.new_empty((B,)),
                b.new_empty((B,), dtype=torch.int32))


# ---- the fused batch-norm / ReLU / max-pool block (first-order) ----------------------------

def check_bn_relu_pool(op, h, weight, bias, eps):
    _check_float(op, "h", h)
    if h.dim() != 4:
        _fail(op, f"h must be 4-d (N, C, H, W), got shape {tuple(h.shape)}")
    C = h.shape[1]
    for name, t in (("weight", weight), ("bias", bias)):
        _check_like(op, name, t, "h", h)
        if t.dim() != 1 or t.shape[0] != C:
            _fail(op, f"{name} must be ({C},) = (C,) for h {tuple(h.shape)}, got {tuple(t.shape)}")
    if not (math.isfinite(eps) and eps >= 0):
        _fail(op, f"eps must be finite and >= 0, got {eps}")
    if h.shape[0] < 1 or h.shape[2] < 2 or h.shape[3] < 2:
        # (so every channel has at least 4 values, as batch norm needs more than 1)
        _fail(op, f"h must have a sample and be at least 2x2 for 2x2 max-pooling, got shape "
                  f"{tuple(h.shape)}")


class _FirstOrderOnly(torch.autograd.Function):
    """Passes a fused kernel's gradients through; differentiating them raises. Its inputs
    include the tensors the gradients depend on, so that any second derivative through the
    kernel reaches this node (a node without those edges, such as
    torch.autograd.function.once_differentiable's, would be skipped whenever the parameters are
    also reachable another way, and the second derivative would come out silently incomplete).
    apply(op, n, *tensors): the first n tensors are the gradients (returned as views), the rest
    their dependencies."""

    @staticmethod
    def forward(op, n, *tensors):
        return tuple(t.view_as(t) for t in tensors[:n])

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.op = inputs[0]

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(
            f"{ctx.op}: the fused kernel is first-order only and a second derivative was taken "
            f"through it; use {ctx.op}(..., use_ext=False), or TaskLoss(..., "
            f"fused_blocks=False) / mode='hvp' for second-order work")


def _first_order_only(op: str, grads: tuple, deps: tuple) -> tuple:
    """grads, guarded by _FirstOrderOnly when autograd is recording (a create_graph backward)
    and any of them or their dependencies needs a gradient; None entries stay None."""
    present = [g for g in grads if g is not None]
    if not (torch.is_grad_enabled() and
            any(t is not None and t.requires_grad for t in (*present, *deps))):
        return grads
    guarded = iter(_FirstOrderOnly.apply(op, len(present), *present,
                                         *(t for t in deps if t is not None)))
    return tuple(None if g is None else next(guarded) for g in grads)


class _BnReluPool(torch.autograd.Function):
    """The compiled block with its compiled backward; differentiating the backward raises
    (see _FirstOrderOnly)."""

    @staticmethod
    def forward(h, weight, bias, eps):
        return torch.ops.imaml_ext.bn_relu_pool(h, weight, bias, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        h, weight, bias, _ = inputs
        _, mean, invstd, hsel, idx = output
        ctx.save_for_backward(h, weight, bias, mean, invstd, hsel, idx)
        ctx.mark_non_differentiable(*output[1:])
        # no zero gradients for the saved outputs (pooled-size tensors: 4% of a gradient)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_out, *_):
        h, weight, bias, mean, invstd, hsel, idx = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(hsel)
        g = grad_out.contiguous(memory_format=torch.channels_last)
        gh, gw, gb = torch.ops.imaml_ext.bn_relu_pool_backward(g, h, weight, bias, mean, invstd,
                                                               hsel, idx)
        gh, gw, gb = _first_order_only("bn_relu_pool", (gh, gw, gb), (grad_out, h, weight, bias))
        return gh, gw, gb, None


def bn_relu_pool(h, weight, bias, eps: float = 1e-5, *, use_ext: bool | None = None):
    """relu(max_pool2d(batch_norm(h), 2)) with the batch's statistics (training-mode batch norm,
    no running buffers), 2x2 max-pooling with stride 2, floor mode.

    The compiled CPU kernel (csrc/cpu/blocks_cpu.cpp) reads the pre-pool map three times and
    writes only pooled-size tensors; its backward reads the map once and writes its gradient
    once. It is first-order: a second derivative through it raises (use_ext=False gives the
    reference, ATen's ops, differentiable to any order). The kernel is CPU only; on other
    devices, and when the extension is not loaded, use_ext=None runs the reference.

    Args:
        h: (N, C, H, W) float32/float64 (made channels-last for the kernel).
        weight, bias: (C,) batch-norm affine parameters.
        eps: added to the variance.
    Returns:
        (N, C, H // 2, W // 2).
    """
    check_bn_relu_pool("bn_relu_pool", h, weight, bias, eps)
    if use_ext is None:
        use_ext = _C is not None and h.device.type == "cpu"
    elif use_ext:
        if h.device.type != "cpu":
            raise RuntimeError(f"bn_relu_pool: use_ext=True but the fused kernel is CPU only; "
                               f"h is on {h.device}")
        use_ext_for(True, h)  # raises, saying why, when the extension is not loaded
    if not use_ext:
        return reference.bn_relu_pool(h, weight, bias, eps)
    h = h.contiguous(memory_format=torch.channels_last)
    return _BnReluPool.apply(h, weight, bias, float(eps))[0]


if _C is not None:
    @torch.library.register_fake("imaml_ext::bn_relu_pool")
    def _bn_relu_pool_fake(h, weight, bias, eps):
        N, C, H, W = h.shape
        cl = torch.channels_last
        pooled = (N, C, H // 2, W // 2)
        return (h.new_empty(pooled).contiguous(memory_format=cl), h.new_empty((C,)),
                h.new_empty((C,)), h.new_empty(pooled).contiguous(memory_format=cl),
                h.new_empty(pooled, dtype=torch.uint8).contiguous(memory_format=cl))

    @torch.library.register_fake("imaml_ext::bn_relu_pool_backward")
    def _bn_relu_pool_backward_fake(grad_out, h, weight, bias, mean, invstd, hsel, idx):
        return (h.new_empty(h.shape).contiguous(memory_format=torch.channels_last),
                h.new_empty(weight.shape), h.new_empty(weight.shape))


# ---- the block's derivatives in the HVP layout (csrc/cpu/pooled_bn_cpu.cpp, csrc/cuda/
# pooled_bn_cuda.cu; twins reference.pooled_bn_backward / pooled_bn_double_backward) ----------

def _pool_disjoint(pool) -> bool:
    """Whether the pooling windows are disjoint (stride >= the dilated kernel in both
    dimensions): then distinct windows never share an arg-max, which the kernels' scatter
    needs."""
    k, st, _, dil, _ = pool
    return all(int(st[i]) >= int(dil[i]) * (int(k[i]) - 1) + 1 for i in range(2))


def _map_format(h):
    """h's memory format for the kernels (NCHW first when both hold), or None."""
    if h.is_contiguous():
        return torch.contiguous_format
    if h.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return None


def _pooled_bn_ext(op, h, pool, use_ext):
    """Resolves use_ext for the pooled batch-norm ops: None takes the kernel where it applies
    (extension loaded for h's device, float32/float64, a dense NCHW or channels-last h,
    disjoint windows), True raises where it does not."""
    if use_ext is False:
        return False
    why = None
    if h.dtype not in _FLOATS:
        why = f"h is {h.dtype}, the kernels take float32 or float64"
    elif _map_format(h) is None:
        why = f"h is neither NCHW- nor channels-last-contiguous (strides {h.stride()})"
    elif not _pool_disjoint(pool):
        why = (f"the pooling windows overlap (kernel {pool[0]}, stride {pool[1]}, "
               f"dilation {pool[3]})")
    if use_ext is None:
        return why is None and use_ext_for(None, h)
    use_ext_for(True, h)  # raises, saying why, when the extension cannot run on h's device
    if why is not None:
        raise RuntimeError(f"{op}: use_ext=True but {why}")
    return True


def _as_format(fmt, *ts):
    return tuple(None if t is None else t.contiguous(memory_format=fmt) for t in ts)


def _pool_args(pool):
    k, st, pad, dil, ceil = pool
    return [int(v) for v in k], [int(v) for v in st], [int(v) for v in pad], \
        [int(v) for v in dil], bool(ceil)


def pooled_bn_forward(h, weight, bias, eps: float, pool, flip: bool, *,
                      use_ext: bool | None = None):
    """(y, xhat, idx, mean, r, rw, kb, kg): the conv net's pooled batch-norm block
    (imaml_ext.hvp._PooledBatchNorm) forward, in one kernel: per channel the mean and variance
    of the map (two passes), then each window's arg-max, xhat and y = relu(w xhat + b); and the
    backward's per-channel factors (reference.pooled_bn_forward has the definitions). The kernel
    takes windows inside the map (padding 0, dilation 1, floor mode, stride >= kernel); other
    geometries run the reference. Not differentiable (hvp._PooledBatchNorm writes out its
    derivatives).

    Args:
        h: (N, C, H, W); weight, bias: (C,); eps: added to the variance; pool: (kernel_size,
            stride, padding, dilation, ceil_mode); flip: pool s h with s = sign(weight).
    """
    k, st, pad, dil, ceil = pool
    simple = (all(int(v) == 0 for v in pad) and all(int(v) == 1 for v in dil) and not ceil
              and all(int(st[i]) >= int(k[i]) for i in range(2)) and h.dim() == 4
              and all(h.shape[2 + i] >= int(k[i]) for i in range(2)) and h.shape[0] >= 1)
    if use_ext is True and not simple:
        raise RuntimeError(f"pooled_bn_forward: use_ext=True but the kernel takes windows "
                           f"inside the map (padding 0, dilation 1, floor mode, stride >= "
                           f"kernel), got {pool} for h {tuple(h.shape)}")
    if not (simple and _pooled_bn_ext("pooled_bn_forward", h, pool, use_ext)):
        return reference.pooled_bn_forward(h, weight, bias, eps, pool, flip)
    weight, bias = _as_format(torch.contiguous_format, weight, bias)
    return tuple(torch.ops.imaml_ext.pooled_bn_forward(
        h, weight, bias, float(eps), [int(v) for v in k], [int(v) for v in st], bool(flip)))


def pooled_bn_backward(gy, y, xhat, h, idx, mean, rw, kb, kg, pool, *,
                       use_ext: bool | None = None):
    """(gh, gw, gb, gu): the backward of the conv net's pooled batch-norm block
    (imaml_ext.hvp._PooledBatchNorm) for output gradient gy, in one kernel: a pass over the
    pooled-size tensors for gu = gy [y > 0] and its two per-channel sums, one over the map for
    gh's dense part and a scatter of rw gu to the arg-max positions (the reference runs about a
    dozen ATen ops). Not differentiable (hvp._PooledBatchNormBackward writes out its
    derivative: pooled_bn_double_backward).

    Args:
        gy, y, xhat: (N, C, Ho, Wo); h: (N, C, H, W); idx: (N, C, Ho, Wo) int64 arg-max of the
            pooling (flat positions per plane; the forward's own: the CPU kernel raises on an
            index outside the plane, the CUDA kernel skips it, since checking would take a
            host read); mean, rw, kb, kg: (C,); pool: (kernel_size, stride, padding, dilation,
            ceil_mode) of that pooling.
    Returns:
        gh (N, C, H, W) in h's layout, gw and gb (C,), gu like gy.
    """
    if not _pooled_bn_ext("pooled_bn_backward", h, pool, use_ext):
        return reference.pooled_bn_backward(gy, y, xhat, h, idx, mean, rw, kb, kg, pool)
    gy, y, xhat, idx = _as_format(_map_format(h), gy, y, xhat, idx)
    mean, rw, kb, kg = _as_format(torch.contiguous_format, mean, rw, kb, kg)
    return tuple(torch.ops.imaml_ext.pooled_bn_backward(gy, y, xhat, h, idx, mean, rw, kb, kg,
                                                        *_pool_args(pool)))


def pooled_bn_coefficients(r, w, rw, kb, kg, gb, gw, n: int, *, use_ext: bool | None = None):
    """(coef (6, 5, C), a2 (C,)): pooled_bn_double_backward's per-channel factor table at the
    point (r, w, rw, kb, kg, gb, gw: (C,); n the values per channel of the pre-pool map), as one
    op (the reference takes about twenty). Not differentiable."""
    if use_ext is not False and r.dtype in _FLOATS and use_ext_for(use_ext, r):
        return tuple(torch.ops.imaml_ext.pooled_bn_coefficients(
            *_as_format(torch.contiguous_format, r, w, rw, kb, kg, gb, gw), int(n)))
    return reference.pooled_bn_coefficients(r, w, rw, kb, kg, gb, gw, n)


def pooled_bn_double_backward(ch, cw, cb, gu, h, xhat, idx, mean, y, rw, coef, a2, pool,
                              need_gy: bool, need_h: bool, *, use_ext: bool | None = None):
    """(d gy, d h, d w): the vector-Jacobian product of pooled_bn_backward for cotangents
    (ch, cw, cb), any of them None (zero), in one kernel: the per-channel sums of ch (map and
    arg-max passes), the six per-channel factors from coef (6, 5, C), then d gy (pooled) and
    d h (map, plus the scatter). d gy / d h are None unless needed. The kernel is not
    differentiable: use_ext=False (the reference, ATen's ops) where a graph is recorded.

    Args: as pooled_bn_backward, and gu its output, coef and a2 (C,) the factors of
        pooled_bn_coefficients.
    """
    if not _pooled_bn_ext("pooled_bn_double_backward", h, pool, use_ext):
        return reference.pooled_bn_double_backward(ch, cw, cb, gu, h, xhat, idx, mean, y, rw,
                                                   coef, a2, pool, need_gy, need_h)
    ch, gu, xhat, idx, y = _as_format(_map_format(h), ch, gu, xhat, idx, y)
    cw, cb, mean, rw, coef, a2 = _as_format(torch.contiguous_format, cw, cb, mean, rw, coef, a2)
    d_gy, d_h, d_w = torch.ops.imaml_ext.pooled_bn_double_backward(
        ch, cw, cb, gu, h, xhat, idx, mean, y, rw, coef, a2, *_pool_args(pool), bool(need_gy),
        bool(need_h))
    return d_gy if need_gy else None, d_h if need_h else None, d_w


if _C is not None:
    @torch.library.register_fake("imaml_ext::pooled_bn_forward")
    def _pooled_bn_forward_fake(h, weight, bias, eps, kernel_size, stride, flip):
        N, C, H, W = h.shape
        fmt = _map_format(h) or torch.contiguous_format
        pooled = (N, C, (H - kernel_size[0]) // stride[0] + 1,
                  (W - kernel_size[1]) // stride[1] + 1)
        maps = [h.new_empty(pooled).contiguous(memory_format=fmt) for _ in range(2)]
        idx = h.new_empty(pooled, dtype=torch.int64).contiguous(memory_format=fmt)
        return (*maps, idx, *(h.new_empty((C,)) for _ in range(5)))

    @torch.library.register_fake("imaml_ext::pooled_bn_backward")
    def _pooled_bn_backward_fake(gy, y, xhat, h, idx, mean, rw, kb, kg, kernel_size, stride,
                                 padding, dilation, ceil_mode):
        fmt = _map_format(h) or torch.contiguous_format
        return (torch.empty_like(h, memory_format=fmt), mean.new_empty(mean.shape),
                mean.new_empty(mean.shape), torch.empty_like(gy, memory_format=fmt))

    @torch.library.register_fake("imaml_ext::pooled_bn_coefficients")
    def _pooled_bn_coefficients_fake(r, w, rw, kb, kg, gb, gw, n):
        return r.new_empty((6, 5, r.shape[0])), r.new_empty(r.shape)

    @torch.library.register_fake("imaml_ext::pooled_bn_double_backward")
    def _pooled_bn_double_backward_fake(ch, cw, cb, gu, h, xhat, idx, mean, y, rw, coef, a2,
                                        kernel_size, stride, padding, dilation, ceil_mode,
                                        need_gy, need_h):
        fmt = _map_format(h) or torch.contiguous_format
        d_gy = torch.empty_like(gu, memory_format=fmt) if need_gy else gu.new_empty((0,))
        d_h = torch.empty_like(h, memory_format=fmt) if need_h else h.new_empty((0,))
        return d_gy, d_h, mean.new_empty(mean.shape)


# ---- the 3x3 convolution by Winograd's F(2x2, 3x3) (the conv net's layers 2-4) -----------------

def check_conv3x3(op, x, weight, bias, groups):
    _check_float(op, "x", x)
    if x.dim() != 4:
        _fail(op, f"x must be 4-d (N, C, H, W), got shape {tuple(x.shape)}")
    _check_like(op, "weight", weight, "x", x)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        _fail(op, f"groups must be an int >= 1, got {groups!r}")
    if weight.dim() != 4 or weight.shape[2:] != (3, 3) or weight.shape[0] % groups or \
            x.shape[1] != groups * weight.shape[1]:
        _fail(op, f"weight must be (groups*Co, Ci, 3, 3) with groups*Ci = x.shape[1] = "
                  f"{x.shape[1]} (groups = {groups}), got {tuple(weight.shape)}")
    if bias is not None:
        _check_like(op, "bias", bias, "x", x)
        if bias.shape != (weight.shape[0],):
            _fail(op, f"bias must be ({weight.shape[0]},) = (groups*Co,), got {tuple(bias.shape)}")


def conv3x3_ext_ok(x, weight, groups) -> bool:
    """Whether the Winograd kernel takes this convolution: the extension loaded, a CPU float
    tensor, and channels per group (in and out) multiples of one 64-byte vector."""
    if _C is None or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return False
    lanes = 64 // x.element_size()
    return (x.shape[1] // groups) % lanes == 0 and (weight.shape[0] // groups) % lanes == 0


def conv3x3_winograd_input_grad(grad_y, weight, groups: int):
    """The input gradient of conv3x3 (stride 1, padding 1) for output gradient grad_y, by the
    Winograd kernel: the convolution of grad_y with the filters flipped and their channel axes
    swapped (no checks: for the library's autograd Functions)."""
    Co, Ci = weight.shape[0] // groups, weight.shape[1]
    flipped = weight.reshape(groups, Co, Ci, 3, 3).transpose(1, 2).flip(-2, -1)
    return torch.ops.imaml_ext.conv3x3_winograd(grad_y, flipped.reshape(groups * Ci, Co, 3, 3),
                                                None, groups)


# The three bilinear maps of a convolution, by ATen or, where cfg[4] says so, by the Winograd
# kernel (stride 1, padding 1, 3x3). cfg: (stride, padding, dilation, groups, wino). The "hvp"
# layout of imaml_ext.hvp evaluates its convolutions with _Conv (wino from hvp._winograd_ok),
# and conv3x3 below is _Conv with the Winograd kernel.

def _conv_forward(x, w, b, cfg):
    stride, padding, dilation, groups, wino = cfg
    if wino:
        return torch.ops.imaml_ext.conv3x3_winograd(x, w, b, groups)
    return torch.convolution(x, w, b, stride, padding, dilation, False, [0, 0], groups)


def _conv_input_grad(gy, w, x, cfg):
    stride, padding, dilation, groups, wino = cfg
    if wino:
        return conv3x3_winograd_input_grad(gy.contiguous(memory_format=torch.channels_last),
                                               w, groups)
    return torch.ops.aten.convolution_backward(gy, x, w, None, stride, padding, dilation, False,
                                               [0, 0], groups, [True, False, False])[0]


def _conv_weight_grad(x, gy, w, cfg):
    stride, padding, dilation, groups, wino = cfg
    if wino:
        return torch.ops.imaml_ext.conv3x3_winograd_weight_grad(gy, x, groups)
    return torch.ops.aten.convolution_backward(gy, x, w, None, stride, padding, dilation, False,
                                               [0, 0], groups, [False, True, False])[1]


class _Conv(torch.autograd.Function):
    """y = conv2d(x, w, b) (any groups) with a backward made of the two other bilinear maps of a
    convolution, _ConvInputGrad and _ConvWeightGrad, each differentiable by the same three: a
    double backward then runs the library's forward, input-gradient and weight-gradient kernels
    only. ATen's own double backward computes one of its terms (the weight gradient of the
    input's tangent) as a convolution with batch and channels swapped, and with groups one such
    convolution per group and a cat: a per-task loop with tasks folded into the groups, and a
    slow oneDNN case even for one task (one 20-way 5-shot product 1.27x faster with this)."""

    @staticmethod
    def forward(x, w, b, cfg):
        return _conv_forward(x, w, b, cfg)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, b, cfg = inputs
        ctx.save_for_backward(x, w)
        ctx.cfg = cfg

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        need_x, need_w, need_b, _ = ctx.needs_input_grad
        gx = gw = None
        if need_x and need_w:
            gx, gw = _ConvBackward.apply(gy, w, x, ctx.cfg)
        elif need_x:
            gx = _ConvInputGrad.apply(gy, w, x, ctx.cfg)
        elif need_w:
            gw = _ConvWeightGrad.apply(x, gy, w, ctx.cfg)
        gb = gy.sum((0, 2, 3)) if need_b else None
        return gx, gw, gb, None


class _ConvBackward(torch.autograd.Function):
    """(gx, gw) of conv2d(x, w) for output gradient gy in one library call."""

    @staticmethod
    def forward(gy, w, x, cfg):
        stride, padding, dilation, groups, wino = cfg
        if wino:
            return _conv_input_grad(gy, w, x, cfg), _conv_weight_grad(x, gy, w, cfg)
        gx, gw, _ = torch.ops.aten.convolution_backward(gy, x, w, None, stride, padding,
                                                        dilation, False, [0, 0], groups,
                                                        [True, True, False])
        return gx, gw

    @staticmethod
    def setup_context(ctx, inputs, output):
        gy, w, x, cfg = inputs
        ctx.save_for_backward(gy, w, x)
        ctx.cfg = cfg
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, cx, cw):
        gy, w, x = ctx.saved_tensors
        need_gy, need_w, need_x, _ = ctx.needs_input_grad
        dgy = dw = dx = None
        if need_gy:
            if cx is not None:
                dgy = _Conv.apply(cx, w, None, ctx.cfg)
            if cw is not None:
                t = _Conv.apply(x, cw, None, ctx.cfg)
                dgy = t if dgy is None else dgy + t
        if need_w and cx is not None:
            dw = _ConvWeightGrad.apply(cx, gy, w, ctx.cfg)
        if need_x and cw is not None:
            dx = _ConvInputGrad.apply(gy, cw, x, ctx.cfg)
        return dgy, dw, dx, None


class _ConvInputGrad(torch.autograd.Function):
    """gx = the input gradient of conv2d(., w) for output gradient gy (x: shape and layout)."""

    @staticmethod
    def forward(gy, w, x, cfg):
        return _conv_input_grad(gy, w, x, cfg)

    @staticmethod
    def setup_context(ctx, inputs, output):
        gy, w, x, cfg = inputs
        ctx.save_for_backward(gy, w, x)
        ctx.cfg = cfg

    @staticmethod
    def backward(ctx, c):
        gy, w, x = ctx.saved_tensors
        need_gy, need_w, _, _ = ctx.needs_input_grad
        dgy = _Conv.apply(c, w, None, ctx.cfg) if need_gy else None
        dw = _ConvWeightGrad.apply(c, gy, w, ctx.cfg) if need_w else None
        return dgy, dw, None, None


class _ConvWeightGrad(torch.autograd.Function):
    """gw = the weight gradient of conv2d(x, .) for output gradient gy (w: shape)."""

    @staticmethod
    def forward(x, gy, w, cfg):
        return _conv_weight_grad(x, gy, w, cfg)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, gy, w, cfg = inputs
        ctx.save_for_backward(x, gy, w)
        ctx.cfg = cfg

    @staticmethod
    def backward(ctx, c):
        x, gy, w = ctx.saved_tensors
        need_x, need_gy, _, _ = ctx.needs_input_grad
        dx = _ConvInputGrad.apply(gy, c, x, ctx.cfg) if need_x else None
        dgy = _Conv.apply(x, c, None, ctx.cfg) if need_gy else None
        return dx, dgy, None, None


def conv3x3(x, weight, bias=None, groups: int = 1, *, use_ext: bool | None = None):
    """conv2d(x, weight, bias, stride=1, padding=1, groups=groups) for 3x3 filters.

    The compiled CPU kernel (csrc/cpu/winograd_cpu.cpp) uses Winograd's F(2x2, 3x3): 16 instead
    of 36 multiply-adds per 2x2 output tile and channel pair, as 16 matrix products, with the
    input and weight gradients from the same transforms; its output is channels-last. The
    convolution is differentiable to any order (_Conv: each derivative is one of the three
    bilinear maps, all on the kernel). use_ext=None picks it where it applies
    (conv3x3_ext_ok: CPU, float32/float64, channels per group multiples of 16 float32 / 8
    float64); True insists, raising where it cannot run.

    Args:
        x: (N, groups*Ci, H, W).
        weight: (groups*Co, Ci, 3, 3); bias: (groups*Co,) or None.
    Returns:
        (N, groups*Co, H, W).
    """
    check_conv3x3("conv3x3", x, weight, bias, groups)
    ok = conv3x3_ext_ok(x, weight, groups)
    if use_ext is None:
        use_ext = ok
    elif use_ext and not ok:
        use_ext_for(True, x)  # raises, saying why, when the extension is not loaded
        raise RuntimeError(
            f"conv3x3: use_ext=True but the Winograd kernel needs a CPU float32/float64 x with "
            f"channels per group multiples of {64 // x.element_size()}; got {x.dtype} on "
            f"{x.device}, {x.shape[1] // groups} in / {weight.shape[0] // groups} out")
    if not use_ext:
        return reference.conv3x3(x, weight, bias, groups)
    return _Conv.apply(x, weight, bias, ([1, 1], [1, 1], [1, 1], int(groups), True))


if _C is not None:
    @torch.library.register_fake("imaml_ext::conv3x3_winograd")
    def _conv3x3_winograd_fake(x, weight, bias, groups):
        N, _, H, W = x.shape
        return x.new_empty((N, weight.shape[0], H, W)).contiguous(
            memory_format=torch.channels_last)

    @torch.library.register_fake("imaml_ext::conv3x3_winograd_weight_grad")
    def _conv3x3_winograd_weight_grad_fake(grad_y, x, groups):
        return x.new_empty((grad_y.shape[1], x.shape[1] // groups, 3, 3))


# ---- the grouped convolution with one input channel per group (the first conv layer) ----------

def check_conv1ch(op, x, weight, bias, stride, padding):
    _check_float(op, "x", x)
    if x.dim() != 4:
        _fail(op, f"x must be 4-d (N, groups, H, W), got shape {tuple(x.shape)}")
    _check_like(op, "weight", weight, "x", x)
    G = x.shape[1]
    if weight.dim() != 4 or weight.shape[1] != 1 or G < 1 or weight.shape[0] % G or \
            weight.shape[0] < G:
        _fail(op, f"weight must be (groups*C, 1, kh, kw) with groups = x.shape[1] = {G}, got "
                  f"{tuple(weight.shape)}")
    if bias is not None:
        _check_like(op, "bias", bias, "x", x)
        if bias.shape != (weight.shape[0],):
            _fail(op, f"bias must be ({weight.shape[0]},) = (groups*C,), got {tuple(bias.shape)}")
    kh, kw = weight.shape[2:]
    st, pd = _pair(stride), _pair(padding)
    if min(st) < 1:
        _fail(op, f"stride must be >= 1, got {stride}")
    if min(pd) < 0 or pd[0] >= kh or pd[1] >= kw:
        _fail(op, f"padding must be >= 0 and smaller than the kernel ({kh}, {kw}), got {padding}")
    if x.shape[2] + 2 * pd[0] < kh or x.shape[3] + 2 * pd[1] < kw:
        _fail(op, f"the padded input {tuple(x.shape)} is smaller than the kernel ({kh}, {kw})")
    if kh * kw > 121:
        _fail(op, f"kernel size must have at most 121 taps, got ({kh}, {kw})")


def _first_layer_ext(op: str, x, use_ext: bool | None) -> bool:
    """Whether the first layer's CPU kernels run (they take no gradient for x): use_ext=None
    picks them for a CPU x that needs no gradient when the extension is loaded; True insists
    (raising, saying why, where they cannot run)."""
    if use_ext is None:
        return _C is not None and x.device.type == "cpu" and not x.requires_grad
    if use_ext:
        if x.device.type != "cpu":
            raise RuntimeError(f"{op}: use_ext=True but the kernel is CPU only; x is on "
                               f"{x.device}")
        if x.requires_grad:
            raise RuntimeError(f"{op}: use_ext=True but x requires a gradient, which the "
                               "kernel does not compute; use use_ext=None or False")
        use_ext_for(True, x)
    return bool(use_ext)


class _Conv1ch(torch.autograd.Function):
    """conv1ch with respect to (weight, bias); x is data (the wrapper sends an x that needs a
    gradient to ATen). Its backward is _Conv1chWeightGrad, whose backward is this forward: the
    pair is differentiable to any order."""

    @staticmethod
    def forward(x, weight, bias, stride, padding):
        return torch.ops.imaml_ext.conv1ch(x, weight, bias, stride, padding)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, stride, padding = inputs
        ctx.save_for_backward(x)
        ctx.geometry = (tuple(weight.shape[2:]), stride, padding)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, grad_y):
        (x,) = ctx.saved_tensors
        kernel, stride, padding = ctx.geometry
        g = grad_y.contiguous(memory_format=torch.channels_last)
        gw, gb = _Conv1chWeightGrad.apply(g, x, kernel, stride, padding)
        return None, gw, gb if ctx.has_bias else None, None, None


class _Conv1chWeightGrad(torch.autograd.Function):
    """(grad_weight, grad_bias) of conv1ch, linear in grad_y: its derivative is conv1ch."""

    @staticmethod
    def forward(grad_y, x, kernel, stride, padding):
        return torch.ops.imaml_ext.conv1ch_weight_grad(grad_y, x, kernel, stride, padding)

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad_y, x, kernel, stride, padding = inputs
        ctx.save_for_backward(x)
        ctx.geometry = (kernel, stride, padding, grad_y.shape[1])

    @staticmethod
    def backward(ctx, ggw, ggb):
        (x,) = ctx.saved_tensors
        kernel, stride, padding, GC = ctx.geometry
        if ggw is None:
            ggw = x.new_zeros((GC, 1, *kernel))
        return _Conv1ch.apply(x, ggw, ggb, stride, padding), None, None, None, None


def conv1ch(x, weight, bias=None, stride=1, padding=0, *, use_ext: bool | None = None):
    """conv2d(x, weight, bias, stride, padding, groups=x.shape[1]): a grouped convolution with
    one input channel per group (the conv net's first layer with tasks folded into channels, on
    a gray-scale data set), zero padding, dilation 1.

    The compiled CPU kernel (csrc/cpu/blocks_cpu.cpp) writes the output channels-last; its
    autograd covers weight and bias to any order (the weight gradient is linear in the output
    gradient, and its derivative is this convolution again). An x that needs a gradient, other
    devices, and use_ext=False (or no extension) take ATen's grouped convolution.

    Args:
        x: (N, G, H, W) float32/float64.
        weight: (G*C, 1, kh, kw); bias: (G*C,) or None.
        stride, padding: int or pair (padding smaller than the kernel).
    Returns:
        (N, G*C, Ho, Wo).
    """
    check_conv1ch("conv1ch", x, weight, bias, stride, padding)
    if not _first_layer_ext("conv1ch", x, use_ext):
        return reference.conv1ch(x, weight, bias, stride, padding)
    return _Conv1ch.apply(x.contiguous(), weight, bias, list(_pair(stride)),
                          list(_pair(padding)))


if _C is not None:
    @torch.library.register_fake("imaml_ext::conv1ch")
    def _conv1ch_fake(x, weight, bias, stride, padding):
        N, G, H, W = x.shape
        kh, kw = weight.shape[2:]
        Ho = (H + 2 * padding[0] - kh) // stride[0] + 1
        Wo = (W + 2 * padding[1] - kw) // stride[1] + 1
        return x.new_empty((N, weight.shape[0], Ho, Wo)).contiguous(
            memory_format=torch.channels_last)

    @torch.library.register_fake("imaml_ext::conv1ch_weight_grad")
    def _conv1ch_weight_grad_fake(grad_y, x, kernel_size, stride, padding):
        GC = grad_y.shape[1]
        return x.new_empty((GC, 1, *kernel_size)), x.new_empty((GC,))


# ---- the first layer's block, fused: conv1ch -> batch norm -> ReLU -> 2x2 max-pool -------------

class _Conv1chBnReluPool(torch.autograd.Function):
    """The compiled fused block with its compiled backward, first-order only (see
    _FirstOrderOnly); x is data."""

    @staticmethod
    def forward(x, conv_weight, conv_bias, weight, bias, stride, padding, eps):
        return torch.ops.imaml_ext.conv1ch_bn_relu_pool(x, conv_weight, conv_bias, weight, bias,
                                                        stride, padding, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, conv_weight, conv_bias, weight, bias, stride, padding, _ = inputs
        _, mean, invstd, hsel, idx, moments = output
        ctx.save_for_backward(x, conv_weight, weight, bias, mean, invstd, hsel, idx, moments)
        ctx.geometry = (stride, padding)
        ctx.deps = (conv_bias is not None,)
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)  # (as _BnReluPool)

    @staticmethod
    def backward(ctx, grad_out, *_):
        x, conv_weight, weight, bias, mean, invstd, hsel, idx, moments = ctx.saved_tensors
        stride, padding = ctx.geometry
        if grad_out is None:
            grad_out = torch.zeros_like(hsel)
        g = grad_out.contiguous(memory_format=torch.channels_last)
        gcw, gcb, gw, gb = torch.ops.imaml_ext.conv1ch_bn_relu_pool_backward(
            g, x, conv_weight, weight, bias, mean, invstd, hsel, idx, moments, stride, padding)
        gcw, gw, gb = _first_order_only("conv1ch_bn_relu_pool", (gcw, gw, gb),
                                        (grad_out, conv_weight, weight, bias))
        return None, gcw, gcb if ctx.deps[0] else None, gw, gb, None, None, None


def conv1ch_bn_relu_pool(x, conv_weight, conv_bias, weight, bias, stride=1, padding=0,
                         eps: float = 1e-5, *, use_ext: bool | None = None):
    """relu(max_pool2d(batch_norm(conv1ch(x, conv_weight, conv_bias)), 2)): the conv net's first
    block with one input channel per group (tasks folded into channels), batch statistics (no
    running buffers), 2x2 max-pooling with stride 2, floor mode.

    The compiled CPU kernel (csrc/cpu/blocks_cpu.cpp) never forms the full-size convolution
    output: the batch statistics are closed forms of x's patch moments, the convolution is
    evaluated only in the pooling windows, and the backward reads pooled-size tensors and x.
    First-order: a second derivative through it raises (use_ext=False gives ATen's ops,
    differentiable to any order). CPU only; x must not need a gradient. Elsewhere, and when
    the extension is not loaded, use_ext=None runs the reference.

    Args:
        x: (N, G, H, W) float32/float64.
        conv_weight: (G*C, 1, kh, kw); conv_bias: (G*C,) or None.
        weight, bias: (G*C,) batch-norm affine parameters.
        stride, padding: of the convolution. eps: added to the variance.
    Returns:
        (N, G*C, Ho // 2, Wo // 2) for the convolution's output (Ho, Wo).
    """
    op = "conv1ch_bn_relu_pool"
    check_conv1ch_block(op, x, conv_weight, conv_bias, weight, bias, stride, padding, eps)
    if not _first_layer_ext(op, x, use_ext):
        return reference.conv1ch_bn_relu_pool(x, conv_weight, conv_bias, weight, bias, stride,
                                              padding, eps)
    return _Conv1chBnReluPool.apply(x.contiguous(), conv_weight, conv_bias, weight, bias,
                                    list(_pair(stride)), list(_pair(padding)), float(eps))[0]


def check_conv1ch_block(op, x, conv_weight, conv_bias, weight, bias, stride, padding, eps):
    """check_conv1ch, plus the batch-norm parameters, eps and a poolable output."""
    check_conv1ch(op, x, conv_weight, conv_bias, stride, padding)
    GC = conv_weight.shape[0]
    for name, t in (("weight", weight), ("bias", bias)):
        _check_like(op, name, t, "x", x)
        if t.shape != (GC,):
            _fail(op, f"{name} must be ({GC},) = (groups*C,), got {tuple(t.shape)}")
    if not (math.isfinite(eps) and eps >= 0):
        _fail(op, f"eps must be finite and >= 0, got {eps}")
    (sh, sw), (ph, pw) = _pair(stride), _pair(padding)
    Ho = (x.shape[2] + 2 * ph - conv_weight.shape[2]) // sh + 1
    Wo = (x.shape[3] + 2 * pw - conv_weight.shape[3]) // sw + 1
    if Ho < 2 or Wo < 2:
        _fail(op, f"the convolution's output must be at least 2x2 for 2x2 max-pooling, got "
                  f"{Ho}x{Wo}")


if _C is not None:
    @torch.library.register_fake("imaml_ext::conv1ch_bn_relu_pool")
    def _conv1ch_bn_relu_pool_fake(x, conv_weight, conv_bias, weight, bias, stride, padding, eps):
        y = _conv1ch_fake(x, conv_weight, conv_bias, stride, padding)
        N, GC, Ho, Wo = y.shape
        cl = torch.channels_last
        pooled = (N, GC, Ho // 2, Wo // 2)
        T = conv_weight.shape[2] * conv_weight.shape[3]
        return (x.new_empty(pooled).contiguous(memory_format=cl), x.new_empty((GC,)),
                x.new_empty((GC,)), x.new_empty(pooled).contiguous(memory_format=cl),
                x.new_empty(pooled, dtype=torch.uint8).contiguous(memory_format=cl),
                x.new_empty((x.shape[1], T + T * T), dtype=torch.float64))

    @torch.library.register_fake("imaml_ext::conv1ch_bn_relu_pool_backward")
    def _conv1ch_bn_relu_pool_backward_fake(grad_out, x, conv_weight, weight, bias, mean, invstd,
                                            hsel, idx, moments, stride, padding):
        GC = conv_weight.shape[0]
        return (x.new_empty(conv_weight.shape), x.new_empty((GC,)), x.new_empty((GC,)),
                x.new_empty((GC,)))


# ---- the first layer's block, second-order: the pooled convolution in closed form --------------

class _Conv1chSelect(torch.autograd.Function):
    """u = conv1ch(x, conv_weight, conv_bias) at the selected position of each 2x2 window (idx),
    linear in (conv_weight, conv_bias); its backward is _Conv1chSelectWeightGrad, whose backward
    is this forward: differentiable to any order."""

    @staticmethod
    def forward(x, conv_weight, conv_bias, idx, stride, padding):
        return torch.ops.imaml_ext.conv1ch_select(x, conv_weight, conv_bias, idx, stride, padding)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, conv_weight, conv_bias, idx, stride, padding = inputs
        ctx.save_for_backward(x, idx)
        ctx.geometry = (tuple(conv_weight.shape[2:]), stride, padding)
        ctx.has_bias = conv_bias is not None

    @staticmethod
    def backward(ctx, grad_u):
        x, idx = ctx.saved_tensors
        kernel, stride, padding = ctx.geometry
        g = grad_u.contiguous(memory_format=torch.channels_last)
        gw, gb = _Conv1chSelectWeightGrad.apply(g, x, idx, kernel, stride, padding)
        return None, gw, gb if ctx.has_bias else None, None, None, None


class _Conv1chSelectWeightGrad(torch.autograd.Function):
    """(grad_weight, grad_bias) of _Conv1chSelect, linear in grad_u: its derivative is the
    selection convolution."""

    @staticmethod
    def forward(grad_u, x, idx, kernel, stride, padding):
        return torch.ops.imaml_ext.conv1ch_select_weight_grad(grad_u, x, idx, kernel, stride,
                                                              padding)

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad_u, x, idx, kernel, stride, padding = inputs
        ctx.save_for_backward(x, idx)
        ctx.geometry = (kernel, stride, padding, grad_u.shape[1])

    @staticmethod
    def backward(ctx, ggw, ggb):
        x, idx = ctx.saved_tensors
        kernel, stride, padding, GC = ctx.geometry
        if ggw is None:
            ggw = x.new_zeros((GC, 1, *kernel))
        return (_Conv1chSelect.apply(x, ggw, ggb, idx, stride, padding), None, None, None, None,
                None)


def conv1ch_bn_relu_pool_hvp(x, conv_weight, conv_bias, weight, bias, stride=1, padding=0,
                             eps: float = 1e-5):
    """conv1ch_bn_relu_pool (the same function) in a form whose first and second derivatives
    touch only pooled-size tensors, for Hessian-vector products by double backward on the CPU.

    The compiled forward gives each window's arg-max (piecewise constant, as max-pooling's
    indices are to autograd) and x's patch moments (m, S per group). Then, differentiably:
    u = the convolution at the arg-max (_Conv1chSelect), the batch statistics in closed form
    mean = w . m + bias, var = w^T S w, and relu((u - mean) weight / sqrt(var + eps) + bias).
    The full-size map, its statistics' derivatives and the pooling's scatter, which were most
    of the layer's share of a double-backward product, are gone. Arguments as
    conv1ch_bn_relu_pool; CPU, compiled extension, x data (no gradient)."""
    op = "conv1ch_bn_relu_pool_hvp"
    check_conv1ch_block(op, x, conv_weight, conv_bias, weight, bias, stride, padding, eps)
    _first_layer_ext(op, x, True)  # raises, saying why, where the kernels cannot run
    x = x.contiguous()
    (sh, sw), (ph, pw) = _pair(stride), _pair(padding)
    with torch.no_grad():
        idx, moments = torch.ops.imaml_ext.conv1ch_bn_relu_pool(
            x, conv_weight.detach(), None if conv_bias is None else conv_bias.detach(),
            weight.detach(), bias.detach(), [sh, sw], [ph, pw], float(eps))[4:]
    G, GC = x.shape[1], conv_weight.shape[0]
    T = conv_weight.shape[2] * conv_weight.shape[3]
    u = _Conv1chSelect.apply(x, conv_weight, conv_bias, idx, [sh, sw], [ph, pw])
    mom = moments.to(x.dtype)
    w = conv_weight.reshape(G, GC // G, T)
    mean = torch.einsum("gct,gt->gc", w, mom[:, :T]).reshape(GC)
    if conv_bias is not None:
        mean = mean + conv_bias
    var = (torch.matmul(w, mom[:, T:].reshape(G, T, T)) * w).sum(-1).reshape(GC)
    a = weight * torch.rsqrt(var + eps)
    return torch.relu((u - mean.view(1, -1, 1, 1)) * a.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1))


if _C is not None:
    @torch.library.register_fake("imaml_ext::conv1ch_select")
    def _conv1ch_select_fake(x, conv_weight, conv_bias, idx, stride, padding):
        return x.new_empty(idx.shape).contiguous(memory_format=torch.channels_last)

    @torch.library.register_fake("imaml_ext::conv1ch_select_weight_grad")
    def _conv1ch_select_weight_grad_fake(grad_u, x, idx, kernel_size, stride, padding):
        GC = grad_u.shape[1]
        return x.new_empty((GC, 1, *kernel_size)), x.new_empty((GC,))
