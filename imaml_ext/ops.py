"""Typed wrappers of the compiled ops, their fake (meta) kernels for torch.compile and opcheck,
and the switch to the pure-PyTorch twins of imaml_ext.reference.

Every wrapper takes `use_ext`: None picks the compiled kernel when it is loaded for the inputs'
device, True insists on it, False runs the reference. Both paths raise the same ValueError-style
messages for bad arguments (the C++ checks raise RuntimeError subclasses with the same text).
None of these ops is differentiable: the implicit-gradient layer differentiates around them.
"""
from __future__ import annotations

import math

import torch

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


def check_solve(op, b, x0, max_iter, rtol, atol):
    _check_float(op, "b", b)
    if b.dim() != 2:
        _fail(op, f"b must be (B, P), got {tuple(b.shape)}")
    _check_like(op, "x0", x0, "b", b)
    if x0.shape != b.shape:
        _fail(op, f"x0 must be {tuple(b.shape)} like b, got {tuple(x0.shape)}")
    if int(max_iter) < 1:
        _fail(op, f"max_iter must be >= 1, got {max_iter}")
    _check_tols(op, rtol, atol)


def check_lstsq(op, X, v, shift, scale):
    _check_like(op, "X", X, "b", v)
    if X.dim() != 3:
        _fail(op, f"X must be (B, n, d), got {tuple(X.shape)}")
    if v.dim() != 2 or v.shape[0] != X.shape[0] or v.shape[1] != X.shape[2]:
        _fail(op, f"the vector must be ({X.shape[0]}, {X.shape[2]}) to match X "
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
    _check_tols(op, rtol, atol)


# ---- the ops --------------------------------------------------------------------------------

def cg_step_(x, r, p, Ap, rs, bnorm2, status, iters, rtol: float, atol: float, *,
             use_ext: bool | None = None) -> None:
    """One fused CG iteration for B systems, in place. See csrc/cg_math.h for the arithmetic.

    Args:
        x, r, p: (B, P) float32/float64, contiguous; updated.
        Ap: (B, P), the operator applied to the current p.
        rs: (B,) r.r, updated. bnorm2: (B,) ||b||^2.
        status, iters: (B,) int32, updated (status codes in imaml_ext.reference).
    Not differentiable.
    """
    if use_ext_for(use_ext, x):
        torch.ops.imaml_ext.cg_step(x, r, p, Ap, rs, bnorm2, status, iters, rtol, atol)
    else:
        check_step("cg_step", x, r, p, Ap, rs, bnorm2, status, iters, rtol, atol)
        reference.cg_step_(x, r, p, Ap, rs, bnorm2, status, iters, rtol, atol)


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
    check_lstsq("cg_solve_lstsq", X, b, shift, scale)
    return reference.cg_solve_lstsq(X, b, x0, shift, scale, max_iter, rtol, atol)


def lstsq_apply(X, v, shift: float = 0.0, scale: float = 1.0, *, use_ext: bool | None = None):
    """shift v + scale X^T (X v) for X (B, n, d), v (B, d), in one pass over X.

    With shift=0, scale=1/n this is the least-squares Hessian-vector product. Not differentiable.
    """
    if use_ext_for(use_ext, v):
        return torch.ops.imaml_ext.lstsq_apply(X, v, shift, scale)
    check_lstsq("lstsq_apply", X, v, shift, scale)
    return reference.lstsq_apply(X, v, shift, scale)


# ---- fake kernels: shapes only, for torch.compile, FakeTensor and opcheck --------------------

if _C is not None:
    @torch.library.register_fake("imaml_ext::cg_step")
    def _cg_step_fake(x, r, p, Ap, rs, bnorm2, status, iters, rtol, atol):
        return None

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

def check_softmax_head(op, F, W, bias, shift, scale):
    _check_float(op, "F", F)
    if F.dim() != 3:
        _fail(op, f"F must be (B, n, f), got {tuple(F.shape)}")
    B, _, f = F.shape
    _check_like(op, "W", W, "F", F)
    if W.dim() != 3 or W.shape[0] != B or W.shape[2] != f:
        _fail(op, f"W must be ({B}, c, {f}) to match F {tuple(F.shape)}, got {tuple(W.shape)}")
    _check_like(op, "bias", bias, "F", F)
    if bias.dim() != 2 or bias.shape[0] != B or bias.shape[1] != W.shape[1]:
        _fail(op, f"bias must be ({B}, {W.shape[1]}) to match W {tuple(W.shape)}, got "
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
    return reference.softmax_head_hvp(F, W, bias, V, vb, shift, scale)


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
    """Passes the block's gradients through; differentiating them raises. Its inputs include
    the tensors the gradients depend on, so that any second derivative through the block
    reaches this node (a node without those edges would be skipped, and the second derivative
    would come out silently incomplete)."""

    @staticmethod
    def forward(gh, gw, gb, *deps):
        return gh.view_as(gh), gw.view_as(gw), gb.view_as(gb)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(
            "bn_relu_pool: the fused batch-norm/ReLU/max-pool kernel is first-order only and a "
            "second derivative was taken through it; use bn_relu_pool(..., use_ext=False), or "
            "TaskLoss(..., fused_blocks=False) / mode='hvp' for second-order work")


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

    @staticmethod
    def backward(ctx, grad_out, *_):
        h, weight, bias, mean, invstd, hsel, idx = ctx.saved_tensors
        g = grad_out.contiguous(memory_format=torch.channels_last)
        gh, gw, gb = torch.ops.imaml_ext.bn_relu_pool_backward(g, h, weight, bias, mean, invstd,
                                                               hsel, idx)
        if torch.is_grad_enabled() and any(t.requires_grad for t in (grad_out, h, weight, bias)):
            gh, gw, gb = _FirstOrderOnly.apply(gh, gw, gb, grad_out, h, weight, bias)
        return gh, gw, gb, None


def bn_relu_pool(h, weight, bias, eps: float = 1e-5, *, use_ext: bool | None = None):
    """relu(max_pool2d(batch_norm(h), 2)) with the batch's statistics (training-mode batch norm,
    no running buffers), 2x2 max-pooling with stride 2, floor mode.

    The compiled CPU kernel (csrc/cpu/bn_pool_cpu.cpp) reads the pre-pool map three times and
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
