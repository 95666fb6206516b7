"""Pure-PyTorch twins of every compiled op: the fallback when the extension is not built, and
the oracle of the tests. Each mirrors the decisions of csrc/cg_math.h exactly, written with
functional torch ops so that it also runs under torch.func transforms and autograd.

Status codes (int32, per system): 0 running, 1 converged, 2 negative curvature (p^T A p <= 0:
the system keeps its last good iterate), 3 non-finite (NaN/Inf met: the system stops).
"""
from __future__ import annotations

import numpy as np
import torch

RUNNING, CONVERGED, NEGATIVE_CURVATURE, NONFINITE = 0, 1, 2, 3


def cg_tol2(bnorm2: torch.Tensor, rtol: float, atol: float) -> torch.Tensor:
    """max(rtol * ||b||, atol)^2 per system, rounded as the kernels round it (csrc/cg_math.h):
    rtol and atol cast to bnorm2's dtype and squared there, and a NaN rtol^2 ||b||^2 gives
    atol^2. (In float32, float(rtol^2) and float(rtol)^2 can differ by an ulp, and a residual on
    the threshold then got another status here than in the kernels.)"""
    def square(v: float) -> float:  # on the host, rounded as in the dtype: no extra launches
        if bnorm2.dtype == torch.float64:
            return v * v
        x = np.float32(v)
        return float(x * x)
    t1, t2 = bnorm2 * square(rtol), square(atol)
    return torch.where(t1 > t2, t1, t2)


def cg_initial_status(rs: torch.Tensor, tol2: torch.Tensor) -> torch.Tensor:
    """Status before the first iteration: converged when ||r0|| <= tol, non-finite on NaN/Inf."""
    finite = torch.isfinite(rs) & torch.isfinite(tol2)
    st = torch.where(rs <= tol2, CONVERGED, RUNNING)
    return torch.where(finite, st, NONFINITE).to(torch.int32)


def cg_affine(p, Ap, shift: float = 0.0, scale: float = 1.0):
    """The operator value a CG step uses: shift p + scale Ap (Ap itself for shift 0, scale 1)."""
    if shift == 0.0 and scale == 1.0:
        return Ap
    return shift * p + scale * Ap


def cg_step(x, r, p, Ap, rs, bnorm2, status, iters, rtol: float, atol: float,
            shift: float = 0.0, scale: float = 1.0):
    """One CG iteration for B systems, functional. Shapes: x, r, p, Ap (B, P); the rest (B,).
    With shift, scale other than (0, 1) the operator is affine: A p = shift p + scale Ap.

    Returns the new (x, r, p, rs, status, iters). Systems whose status is not RUNNING are
    returned unchanged.
    """
    Ap = cg_affine(p, Ap, shift, scale)
    tol2 = cg_tol2(bnorm2, rtol, atol)
    running = status == RUNNING
    pAp = (p * Ap).sum(-1)
    finite = torch.isfinite(pAp)
    nonfinite1 = running & ~finite
    negative = running & finite & (pAp <= 0)
    go = running & finite & (pAp > 0)
    alpha = torch.where(go, rs / torch.where(go, pAp, torch.ones_like(pAp)), torch.zeros_like(pAp))
    g = go.unsqueeze(-1)
    x = torch.where(g, x + alpha.unsqueeze(-1) * p, x)
    r = torch.where(g, r - alpha.unsqueeze(-1) * Ap, r)
    rs_new = torch.where(go, (r * r).sum(-1), rs)
    iters = iters + go.to(iters.dtype)
    nonfinite2 = go & ~torch.isfinite(rs_new)
    converged = go & torch.isfinite(rs_new) & (rs_new <= tol2)
    cont = go & ~nonfinite2 & ~converged
    beta = torch.where(cont, rs_new / torch.where(cont, rs, torch.ones_like(rs)),
                       torch.zeros_like(rs))
    p = torch.where(cont.unsqueeze(-1), r + beta.unsqueeze(-1) * p, p)
    status = torch.where(nonfinite1 | nonfinite2, NONFINITE,
                         torch.where(negative, NEGATIVE_CURVATURE,
                                     torch.where(converged, CONVERGED, status))).to(status.dtype)
    return x, r, p, rs_new, status, iters


def cg_step_(x, r, p, Ap, rs, bnorm2, status, iters, rtol: float, atol: float,
             shift: float = 0.0, scale: float = 1.0) -> None:
    """In-place form of cg_step, the twin of the op imaml_ext::cg_step."""
    out = cg_step(x, r, p, Ap, rs, bnorm2, status, iters, rtol, atol, shift, scale)
    for dst, src in zip((x, r, p, rs, status, iters), out):
        dst.copy_(src)


def cg_rhs_scale(b):
    """(B,) the power of two s per system with max|b_i| / s in [1, 2) (csrc/cg_math.h
    cg_rhs_scale): ||b / s||^2 neither underflows nor overflows, and s itself stays finite for
    entries near the largest float. 1 where max|b_i| is 0 or an entry is NaN/Inf."""
    amax = b.detach().abs().amax(dim=1) if b.shape[1] else b.new_zeros(b.shape[0])
    amax = amax.nan_to_num(0.0, 0.0, 0.0)
    return torch.where(amax > 0, torch.ldexp(torch.ones_like(amax), torch.frexp(amax)[1] - 1),
                       torch.ones_like(amax))


def cg_begin(b, rtol: float, atol: float, rescale: bool):
    """The state of B CG solves from x0 = 0, the twin of imaml_ext::cg_begin: (x = 0, r = b / s,
    p = b / s, rs = ||b / s||^2, bnorm2 = rs, status, iters = 0, s), s = cg_rhs_scale(b) with
    rescale, else ones."""
    s = cg_rhs_scale(b) if rescale else torch.ones(b.shape[0], dtype=b.dtype, device=b.device)
    r = b / s.unsqueeze(1)
    rs = (r * r).sum(-1)
    status = cg_initial_status(rs, cg_tol2(rs, rtol, atol))
    return (torch.zeros_like(b), r, r.clone(), rs, rs.clone(), status,
            torch.zeros_like(status), s)


def cg_end(x, rs, status, iters, scale, fallback=None):
    """(x s, sqrt(rs) s), the twin of imaml_ext::cg_end; with a fallback, the systems that met
    negative curvature before any step (status 2, iters 0) return its row instead of x s."""
    out = x * scale.unsqueeze(1)
    if fallback is not None:
        out = first_order_fallback(out, fallback, status, iters)
    return out, rs.sqrt() * scale


def first_order_fallback(x, fallback, status, iters):
    """x with the rows of the systems that met negative curvature before their first step
    (status 2, iters 0) taken from `fallback` (iMAML's first-order meta-gradient b)."""
    fall = (status == NEGATIVE_CURVATURE) & (iters == 0)
    return torch.where(fall.unsqueeze(-1), fallback, x)


def _solve(matvec, b, x0, max_iter: int, rtol: float, atol: float):
    x = x0.clone()
    # r0 = b where x0 = 0, as the kernels: an operator with a non-finite entry is then met at
    # the first iteration's product, so status, count and residual norm (||b||, the last finite
    # one) agree with them. On the CPU an all-zero start makes no product at all (max_iter
    # products in all, as the kernels; the test is free there); elsewhere it is masked.
    zero = (x == 0).all(-1, keepdim=True)
    if b.device.type == "cpu" and not _in_transform(zero) and bool(zero.all()):
        r = b.clone()
    else:
        r = b - torch.where(zero, torch.zeros_like(b), matvec(x))
    p = r.clone()
    rs = (r * r).sum(-1)
    bnorm2 = (b * b).sum(-1)
    status = cg_initial_status(rs, cg_tol2(bnorm2, rtol, atol))
    iters = torch.zeros_like(status)
    for _ in range(max_iter):
        # On the CPU this test costs no device synchronisation; elsewhere all max_iter run
        # (stopped systems are masked), so the loop never waits on the device.
        if b.device.type == "cpu" and not _in_transform(status) and \
                not bool((status == 0).any()):
            break
        x, r, p, rs, status, iters = cg_step(x, r, p, matvec(p), rs, bnorm2, status, iters,
                                             rtol, atol)
    return x, iters, rs.sqrt(), status


def _in_transform(t: torch.Tensor) -> bool:
    """Inside a torch.func transform or a torch.compile trace, where the CPU loop's host reads
    (free in eager mode) would fail or break the graph: every iteration runs, masked."""
    return torch.compiler.is_compiling() or torch._C._functorch.is_functorch_wrapped_tensor(t)


def cg_solve_dense(A, b, x0, max_iter: int, rtol: float, atol: float):
    """Whole-loop CG on dense A (B, P, P); returns (x, iters, residual norm, status)."""
    return _solve(lambda v: torch.bmm(A, v.unsqueeze(-1)).squeeze(-1), b, x0, max_iter, rtol, atol)


def lstsq_apply(X, v, shift: float, scale: float):
    """shift v + scale X^T (X v) for X (B, n, d), v (B, d)."""
    Xv = torch.bmm(X, v.unsqueeze(-1))
    return shift * v + scale * torch.bmm(X.transpose(1, 2), Xv).squeeze(-1)


def cg_solve_lstsq(X, b, x0, shift: float, scale: float, max_iter: int, rtol: float, atol: float):
    """Whole-loop CG on v -> shift v + scale X^T X v; returns (x, iters, residual norm, status)."""
    return _solve(lambda v: lstsq_apply(X, v, shift, scale), b, x0, max_iter, rtol, atol)


# ---- the softmax cross-entropy head (csrc/hvp_math.h) ----------------------------------------

def softmax_head_probs(F, W, bias):
    """p_i = softmax(W f_i + bias) for F (B, n, f), W (B, c, f), bias (B, c): (B, n, c)."""
    return torch.softmax(torch.baddbmm(bias.unsqueeze(1), F, W.transpose(1, 2)), dim=-1)


def softmax_head_factor(scale: float, n: int) -> float:
    """scale / n, with the mean over no samples taken as 0 (then H = 0)."""
    return scale / n if n > 0 else 0.0


def _softmax_head_sums(F, probs, V, vb):
    """(sum_i u_i f_i^T (B, c, f), sum_i u_i (B, c)), u_i = p_i * (z_i - p_i . z_i)."""
    z = torch.baddbmm(vb.unsqueeze(1), F, V.transpose(1, 2))
    u = probs * (z - (probs * z).sum(-1, keepdim=True))
    return torch.bmm(u.transpose(1, 2), F), u.sum(1)


def softmax_head_hvp(F, W, bias, V, vb, shift: float, scale: float):
    """shift (V, vb) + scale H (V, vb), H the Hessian of the mean softmax cross-entropy of the
    head (W, bias) over the features F (B, n, f); V (B, c, f), vb (B, c). Labels drop out."""
    sW, sb = _softmax_head_sums(F, softmax_head_probs(F, W, bias), V, vb)
    factor = softmax_head_factor(scale, F.shape[1])
    return shift * V + factor * sW, shift * vb + factor * sb


def softmax_head_split(v, c: int, f: int):
    """Flat (B, c*(f+1)) [W row-major, then bias] -> (V (B, c, f), vb (B, c)), as views."""
    return v[:, :c * f].reshape(v.shape[0], c, f), v[:, c * f:]


def softmax_head_join(V, vb):
    """(V (B, c, f), vb (B, c)) -> flat (B, c*(f+1)) [W row-major, then bias]."""
    return torch.cat([V.reshape(V.shape[0], V.shape[1] * V.shape[2]), vb], dim=1)


def cg_solve_softmax_head(F, W, bias, b, x0, shift: float, scale: float, max_iter: int,
                          rtol: float, atol: float):
    """Whole-loop CG on v -> shift v + scale H v over the flat layout [W row-major, then bias]
    (b, x0: (B, c*(f+1))); returns (x, iters, residual norm, status). The probabilities are
    computed once, as the kernels do."""
    c, f = W.shape[1], W.shape[2]
    probs = softmax_head_probs(F, W, bias)
    factor = softmax_head_factor(scale, F.shape[1])

    def matvec(v):
        sW, sb = _softmax_head_sums(F, probs, *softmax_head_split(v, c, f))
        return shift * v + factor * softmax_head_join(sW, sb)

    return _solve(matvec, b, x0, max_iter, rtol, atol)


# ---- the conv net's batch-norm / ReLU / max-pool block (csrc/cpu/blocks_cpu.cpp) ------------

def bn_relu_pool(h, weight, bias, eps: float):
    """relu(max_pool2d(batch_norm(h, batch statistics), 2)) for h (N, C, H, W), weight and bias
    (C,): the block the fused kernel computes, by ATen's own ops (differentiable to any order)."""
    z = torch.nn.functional.batch_norm(h, None, None, weight, bias, True, 0.0, eps)
    return torch.relu(torch.nn.functional.max_pool2d(z, 2))


# ---- the block's derivatives in the HVP layout (imaml_ext.hvp._PooledBatchNorm; csrc/cpu/
# pooled_bn_cpu.cpp, csrc/cuda/pooled_bn_cuda.cu) ---------------------------------------------
# h (N, C, H, W) is the pre-pool map, idx (N, C, Ho, Wo) the pooling's arg-max (flat H*W
# positions per plane, as F.max_pool2d returns them), `pool` its geometry (kernel_size, stride,
# padding, dilation, ceil_mode); the other map-sized tensors are pooled-size, the rest (C,).

def _ch(t: torch.Tensor) -> torch.Tensor:
    return t.view(1, -1, 1, 1)


def unpool(vals, h, idx, pool):
    """The adjoint of gathering h at idx: vals (pooled shape) added into a zero map of h's shape
    and layout."""
    k, st, pad, dil, ceil = pool
    return torch.ops.aten.max_pool2d_with_indices_backward(vals, h, k, st, pad, dil, ceil, idx)


def gather_pooled(t, idx):
    """t (N, C, H, W) at the pooling's arg-max indices idx (N, C, Ho, Wo). Gathers through the
    channels-last view when both are channels-last (no copy)."""
    N, C = idx.shape[:2]
    cl = torch.channels_last
    if C > 1 and t.is_contiguous(memory_format=cl) and idx.is_contiguous(memory_format=cl) and \
            not idx.is_contiguous():
        g = t.permute(0, 2, 3, 1).reshape(N, -1, C).gather(
            1, idx.permute(0, 2, 3, 1).reshape(N, -1, C))
        return g.view(N, idx.shape[2], idx.shape[3], C).permute(0, 3, 1, 2)
    return t.reshape(N, C, -1).gather(2, idx.reshape(N, C, -1)).view(idx.shape)


def pooled_bn_forward(h, w, b, eps: float, pool, flip: bool):
    """(y, xhat, idx, mean, r, rw, kb, kg) of the block y = relu(w xhat + b): mean and
    r = 1 / sqrt(var + eps) per channel over the whole pre-pool map h, xhat = r (z - mean) with
    z = h at the arg-max idx of max-pooling s h (s = sign(w) with flip, else 1; pool its
    geometry), and the backward's per-channel factors rw = r w, kb = -rw / n, kg = kb r."""
    k, st, pad, dil, ceil = pool
    var, mean = torch.var_mean(h, dim=(0, 2, 3), unbiased=False)
    r = torch.rsqrt(var + eps)
    if flip:
        s = _ch(torch.where(w < 0, -1.0, 1.0).to(h.dtype))
        z, idx = torch.nn.functional.max_pool2d(h * s, k, st, pad, dil, ceil, return_indices=True)
        z = z * s
    else:
        z, idx = torch.nn.functional.max_pool2d(h, k, st, pad, dil, ceil, return_indices=True)
    xhat = (z - _ch(mean)) * _ch(r)
    y = torch.relu(torch.addcmul(_ch(b), xhat, _ch(w)))
    rw = r * w
    kb = rw / -(h.numel() // h.shape[1])
    return y, xhat, idx, mean, r, rw, kb, kb * r


def pooled_bn_backward(gy, y, xhat, h, idx, mean, rw, kb, kg, pool):
    """(gh, gw, gb, gu) of the block y = relu(w xhat + b) for output gradient gy: per channel
    gu = gy [y > 0], gb = sum gu, gw = sum gu xhat, gh = rw unpool(gu) + kb gb + kg gw (h - mean)
    (imaml_ext.hvp._PooledBatchNormBackward has the derivation)."""
    gu = torch.ops.aten.threshold_backward(gy, y, 0)
    dims = (0, 2, 3)
    gb = gu.sum(dims)
    gw = (gu * xhat).sum(dims)
    gh = unpool(gu * _ch(rw), h, idx, pool)
    gh.add_(torch.addcmul(_ch(kb * gb), h - _ch(mean), _ch(kg * gw)))
    return gh, gw, gb, gu


def pooled_bn_coefficients(r, w, rw, kb, kg, gb, gw, n: int):
    """(coef (6, 5, C), a2 (C,)): the factor table of pooled_bn_double_backward: rows c0, c1
    (d gy = [y > 0] (c0 + c1 xhat + rw Cg)), d w, A1, A3, A4 as combinations of
    (K0, K1, P, Cw, Cb), and a2 = A2 (hvp._PooledBatchNormBackward has the formulas), from the
    point's per-channel r, w, rw = r w, kb = -rw / n, kg = kb r, gb, gw and n (values per
    channel), with u0 = rw / n = -kb, q = r / n (kg = -u0 r, nq = -q, nm = -r q)."""
    nq = r / -n
    nqgb, nqgw, nm = nq * gb, nq * gw, nq * r
    zero, one = torch.zeros_like(r), torch.ones_like(r)
    coef = torch.stack([
        kb, zero, zero, zero, one,                                          # c0
        zero, kg, zero, one, zero,                                          # c1
        nqgb, nqgw * r, r, zero, zero,                                      # d w
        zero, kg * r, zero, r, zero,                                        # A1
        nm * w * nqgb, torch.addcmul(w * nqgw, gw, kb, value=2) * (nm * r),  # A3
        nm * rw, nm * gw, zero,
        nqgw * kb, nqgb * kg, zero, nqgb, zero,                             # A4
    ]).view(6, 5, -1)
    return coef, kg * gw


def pooled_bn_double_backward(ch, cw, cb, gu, h, xhat, idx, mean, y, rw, coef, a2, pool,
                              need_gy: bool, need_h: bool):
    """(d gy, d h, d w): the vector-Jacobian product of pooled_bn_backward's (gh, gw, gb) in
    (gy, h, w) for cotangents (ch, cw, cb) (each may be None: zero), from its saved gu and the
    per-channel coefficients coef (6, 5, C) and a2 (C,) of hvp._PooledBatchNormBackward. d gy
    and d h are None unless needed. Differentiable (ATen's ops)."""
    dims = (0, 2, 3)
    zero = rw.new_zeros(())
    hc = h - _ch(mean) if need_h or ch is not None else None
    if ch is not None:
        cg = gather_pooled(ch, idx)
        k = [ch.sum(dims), (ch * hc).sum(dims), (cg * gu).sum(dims)]
    else:
        k = [zero.expand_as(rw)] * 3
    k += [zero.expand_as(rw) if c is None else c for c in (cw, cb)]
    c0, c1, d_w, a1, a3, a4 = (coef * torch.stack(k)).sum(1).unbind(0)
    d_gy = d_h = None
    if need_gy:
        t = torch.addcmul(_ch(c0), xhat, _ch(c1))
        if ch is not None:
            t = t.addcmul_(cg, _ch(rw))
        d_gy = torch.ops.aten.threshold_backward(t, y, 0)
    if need_h:
        d_h = unpool(gu * _ch(a1), h, idx, pool)
        d_h.add_(torch.addcmul(_ch(a4), hc, _ch(a3)))
        if ch is not None:
            d_h.addcmul_(ch, _ch(a2))
    return d_gy, d_h, d_w


# ---- the grouped convolution with one input channel per group (csrc/cpu/blocks_cpu.cpp) ------

def conv1ch(x, weight, bias, stride, padding):
    """y = conv2d(x, weight, bias, stride, padding, groups=x.shape[1]) for x (N, G, H, W) and
    weight (G*C, 1, kh, kw): ATen's grouped convolution (output in its own layout)."""
    return torch.nn.functional.conv2d(x, weight, bias, stride, padding, 1, x.shape[1])


def conv3x3(x, weight, bias, groups):
    """y = conv2d(x, weight, bias, stride=1, padding=1, groups=groups) for 3x3 filters: ATen's
    convolution (the twin of the Winograd kernel, imaml_ext.ops.conv3x3)."""
    return torch.nn.functional.conv2d(x, weight, bias, 1, 1, 1, groups)


def conv3x3_weight_grad(grad_y, x, groups):
    """grad_weight (groups*Co, Ci, 3, 3) of conv3x3 at x for output gradient grad_y, by ATen's
    convolution backward."""
    w = x.new_empty((grad_y.shape[1], x.shape[1] // groups, 3, 3))
    return torch.ops.aten.convolution_backward(
        grad_y, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], groups,
        [False, True, False])[1]


def conv1ch_weight_grad(grad_y, x, kernel_size, stride, padding):
    """(grad_weight (G*C, 1, kh, kw), grad_bias (G*C,)) of conv1ch at x for output gradient
    grad_y, by ATen's convolution backward."""
    G, GC = x.shape[1], grad_y.shape[1]
    w = x.new_empty((GC, 1, *kernel_size))
    _, gw, gb = torch.ops.aten.convolution_backward(
        grad_y, x, w, [GC], list(stride), list(padding), [1, 1], False, [0, 0], G,
        [False, True, True])
    return gw, gb


def conv1ch_bn_relu_pool(x, conv_weight, conv_bias, weight, bias, stride, padding, eps: float):
    """relu(max_pool2d(batch_norm(conv1ch(x)), 2)) with batch statistics: the fused kernel's
    block by ATen's own ops (differentiable to any order)."""
    return bn_relu_pool(conv1ch(x, conv_weight, conv_bias, stride, padding), weight, bias, eps)
