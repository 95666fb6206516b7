"""Structured operators that `imaml_ext.cg` hands to a whole-loop compiled solver.

    op = SoftmaxHeadOperator(F, W, bias, shift=1.0, scale=1.0 / lam)   # (I + H/lam)
    res = imaml_ext.cg(op, (g_W, g_bias), batched=True, max_iter=5)
    res.x  # (x_W (B, c, f), x_bias (B, c))

`SoftmaxHeadOperator` is v -> shift v + scale H v with H the Hessian of the mean softmax
cross-entropy (1/n) sum_i CE(W f_i + bias, y_i) of a linear head with respect to (W, bias)
(head-only adaptation, or the last layer of a network); H never exists as a matrix. The unknown
of one system is the pair (V (c, f), vb (c)), or flat, c*(f+1) numbers laid out as [W row-major,
then bias]: exactly what `cg` makes of the right-hand side `(g_W, g_bias)` when it flattens it.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from imaml_ext import ops, reference


def _fail(msg: str):
    raise ValueError(f"cg: {msg}")


def check_coefficient(owner: str, name: str, v):
    """v as a Python float (any finite real number, NumPy's too) or as the 0-d floating tensor
    it is (one that may require grad: cg differentiates through it; on a GPU the compiled
    solvers read it to the host once per solve); ValueError otherwise."""
    if isinstance(v, torch.Tensor):
        if v.dim() != 0 or not v.is_floating_point():
            raise ValueError(f"{owner}: {name} must be a finite number or a 0-d floating tensor, "
                             f"got a {v.dtype} tensor of shape {tuple(v.shape)}")
        return v
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
        raise ValueError(f"{owner}: {name} must be a finite number or a 0-d floating tensor, "
                         f"got {v!r}")
    return float(v)  # a NumPy scalar times a tensor would go through NumPy


def as_number(v) -> float:
    """A coefficient (number or 0-d tensor) as a Python float for the compiled ops."""
    return float(v.detach()) if isinstance(v, torch.Tensor) else float(v)


@dataclass(frozen=True)
class SoftmaxHeadOperator:
    """v -> shift * v + scale * H v, H the softmax head's cross-entropy Hessian at (W, bias).

    Attributes:
        F: features, (B, n, f) for B systems or (n, f) for one.
        W: head weights, (B, c, f) or (c, f). bias: (B, c) or (c,).
        shift, scale: (I + H/lam) is shift=1, scale=1/lam (the paper's matrix); the authors'
            code's ((1 + damping) I + H/(lam + 10)) is shift=1+damping, scale=1/(lam+10).

    Called on a direction, it takes and returns the same structure: a flat tensor (B, P) or
    (P,) with P = c*(f+1) in the layout [W row-major, then bias], or a pair (V, vb) with W's and
    bias's shapes. The call runs the pure-PyTorch reference (differentiable, usable under
    torch.func); `imaml_ext.cg` runs the compiled whole-loop solver on it instead.
    """

    F: torch.Tensor
    W: torch.Tensor
    bias: torch.Tensor
    shift: float | torch.Tensor = 1.0
    scale: float | torch.Tensor = 1.0

    def __post_init__(self):
        for name in ("shift", "scale"):
            object.__setattr__(self, name, check_coefficient("SoftmaxHeadOperator", name,
                                                             getattr(self, name)))

    def batched(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(F (B, n, f), W (B, c, f), bias (B, c)), adding the batch dimension of one system."""
        if self.F.dim() == 2:
            return self.F.unsqueeze(0), self.W.unsqueeze(0), self.bias.unsqueeze(0)
        return self.F, self.W, self.bias

    @property
    def num_params(self) -> int:
        """P = c*(f+1), the unknowns of one system."""
        return self.W.shape[-2] * (self.W.shape[-1] + 1)

    def split(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat (B, P) -> (V (B, c, f), vb (B, c)) views."""
        c, f = self.W.shape[-2:]
        return reference.softmax_head_split(v, c, f)

    def __call__(self, v):
        F, W, bias = self.batched()
        single = self.F.dim() == 2
        if isinstance(v, (tuple, list)):
            V, vb = v
            if single:
                V, vb = V.unsqueeze(0), vb.unsqueeze(0)
            oV, ob = reference.softmax_head_hvp(F, W, bias, V, vb, self.shift, self.scale)
            out = (oV[0], ob[0]) if single else (oV, ob)
            return type(v)(out)
        flat = v.reshape(F.shape[0], -1)
        oV, ob = reference.softmax_head_hvp(F, W, bias, *self.split(flat), self.shift, self.scale)
        return reference.softmax_head_join(oV, ob).reshape(v.shape)

    def check(self, B: int, P: int, dtype: torch.dtype, device: torch.device) -> None:
        """ValueError('cg: ...') unless the operator fits B systems of P unknowns."""
        for name in ("F", "W", "bias"):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor):
                _fail(f"A.{name} must be a tensor, got {type(t).__name__}")
            if t.dtype != dtype or t.device != device:
                _fail(f"A.{name} must have b's dtype and device ({dtype}, {device}), got "
                      f"({t.dtype}, {t.device})")
        F, W, bias = self.batched()
        if F.dim() != 3 or W.dim() != 3 or bias.dim() != 2:
            _fail(f"A.F, A.W, A.bias must be (B, n, f), (B, c, f), (B, c) or (n, f), (c, f), "
                  f"(c,), got {tuple(self.F.shape)}, {tuple(self.W.shape)}, "
                  f"{tuple(self.bias.shape)}")
        c, f = W.shape[1], W.shape[2]
        if F.shape[0] != B or W.shape[0] != B or bias.shape != (B, c) or F.shape[2] != f:
            _fail(f"A.F, A.W, A.bias must be ({B}, n, f), ({B}, c, f), ({B}, c) for b of {B} "
                  f"system(s), got {tuple(F.shape)}, {tuple(W.shape)}, {tuple(bias.shape)}")
        if c * (f + 1) != P:
            _fail(f"b must have c*(f+1) = {c * (f + 1)} unknowns per system for A.W "
                  f"{tuple(W.shape)} (layout: W row-major, then bias), got {P}")

    def solve_flat(self, b: torch.Tensor, x0: torch.Tensor, *, max_iter: int, rtol: float,
                   atol: float, use_ext: bool | None, reference_only: bool):
        """The whole-loop solve on flat (B, P) b and x0: (x, iters, residual_norm, status).

        `imaml_ext.cg` calls this; reference_only selects the functional twin (torch.func
        transforms, autograd through the solve).
        """
        self.check(b.shape[0], b.shape[1], b.dtype, b.device)
        F, W, bias = self.batched()
        ts = (F, W, bias) + tuple(t for t in (self.shift, self.scale)
                                  if isinstance(t, torch.Tensor))
        if reference_only or any(t.requires_grad and torch.is_grad_enabled() for t in ts) \
                or any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in ts):
            return reference.cg_solve_softmax_head(F, W, bias, b, x0, self.shift, self.scale,
                                                   max_iter, rtol, atol)
        return ops.cg_solve_softmax_head(F, W, bias, b, x0, as_number(self.shift),
                                         as_number(self.scale), max_iter, rtol, atol,
                                         use_ext=use_ext)
