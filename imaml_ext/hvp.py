"""Task losses over a functional model, and their Hessian-vector products, batched over tasks.

    task_loss = TaskLoss(model, "cross_entropy")        # backend "auto": folded or vmap
    losses = task_loss(params_b, x_b, y_b)              # (M,) one loss per task
    grads, losses, out = task_loss.grad(params_b, x_b, y_b)
    H = make_hvp(task_loss, params_b, x_b, y_b, kind="exact")   # or "forward_over_reverse",
                                                                # "double_backward", "ggn"
    Hv = H(v_b)                                         # dict of (M, ...) -> dict of (M, ...)
    Hv_flat = H.flat(v_flat)                            # (M, P) -> (M, P), for imaml_ext.cg

Parameters are a dict name -> Tensor, the names of `model.named_parameters()`; batched parameters
("params_b") carry a leading task dimension M on every leaf. The model is only ever called through
`torch.func.functional_call` semantics: its own parameters are not used.

Two ways to run M tasks at once (`backend`):
- "vmap": `torch.func.vmap(functional_call(model, ...))`, for any model.
- "folded": for models built from Conv2d / BatchNorm2d (track_running_stats=False) / Linear and
  parameter-free layers (ReLU, MaxPool2d, Flatten, ...), the tasks are folded into the channel
  dimension: activations are (N, M*C, H, W), each conv is one grouped conv (groups=M), each
  BatchNorm one batch_norm over M*C channels, each Linear one bmm. Numerically the same function as
  vmap; on the CPU it avoids vmap's per-op batching rules (max-pool, batch-norm, the copies between
  them), which made a vmapped conv net's gradient several times slower than the folded one.
"auto" (default) picks "folded" when every layer is supported, else "vmap".

Task chunks (folded backend): on the CPU the tasks are evaluated a chunk at a time, each chunk's
forward and backward finishing before the next starts, so that one chunk's activations stay in
the cache and every tensor stays small. Folding all M tasks makes each activation M times a
task's (32 MB for the first conv of 5-way 1-shot at M=32): glibc serves such blocks by mmap,
so every one is page-faulted and zeroed anew (130 MiB of page faults per gradient there).
`task_chunk` sets the chunk; by default it is the largest number of tasks whose biggest
activation fits `CHUNK_BYTES` on the CPU, and all M tasks on a GPU. Same arithmetic per task.

Fused blocks (folded backend, "grad" mode, CPU): each BatchNorm -> ReLU -> 2x2 MaxPool block runs
as the extension's fused kernel (imaml_ext.ops.bn_relu_pool): the pre-pool map is read three
times forward and twice backward, against about a dozen full-size passes of ATen's separate
kernels. First-order only (a second derivative through it raises), which is all "grad" mode
serves: the inner GD steps, query gradients, first-order MAML and Reptile. Measured on the
2-core Xeon, float32, one batched gradient with the same task chunks, interleaved rounds:
5-way 1-shot M=32 1.32x, 20-way 5-shot M=8 1.24x faster than the composite blocks
(`fused_blocks=False`); outside torch.func transforms TaskLoss.grad also runs plain
autograd instead of torch.func.grad.

The first layer (fused_blocks, CPU): on a gray-scale data set the first conv has one input
channel per task, and its BatchNorm statistics are closed forms of the images' patch moments
(mean w.m + b, variance w^T S w; see csrc/cpu/blocks_cpu.cpp). In "grad" mode the whole first
block, conv -> BatchNorm -> ReLU -> 2x2 MaxPool, is one first-order kernel
(imaml_ext.ops.conv1ch_bn_relu_pool) that never forms the full-size conv output; measured like
the above, one gradient 1.14x (5-way 1-shot, M=32) and 1.19x (20-way 5-shot, M=8) faster than
with the conv and fused block separate. In "hvp" mode the block is evaluated in a
second-order form (imaml_ext.ops.conv1ch_bn_relu_pool_hvp: the conv at each window's arg-max
plus the closed-form statistics), whose derivatives touch pooled-size tensors only: one
double-backward product 1.28x (5-way 1-shot) and 1.38x (20-way 5-shot) faster, building its
graph 1.7x faster. The same functions, to rounding (python_tests/test_conv1ch.py).
Also in "hvp" mode, on every device, the convolutions run through a custom autograd function
(`imaml_ext.ops._Conv`) whose double backward is the convolution's three bilinear maps (the
library's kernels on the CPU, ATen's elsewhere), where ATen's computes one term with batch and
channels swapped, per group (a loop over the tasks): on the CPU one 5-way 1-shot product (M=32)
1.09x faster, its graph build 0.98x; one 20-way 5-shot product (one task a chunk) 1.27x faster,
its graph build 0.95x. In the GPU layout (all 32 tasks in one fold) it takes one product's
convolutions from 111 to 17 (benchmarks/probes/hvp_op_count.py).

Tasks are independent, so the gradient of sum_i L_i with respect to the batched parameters is
the stack of the per-task gradients, and the same holds for Hessian-vector products: every
builder below differentiates the summed loss once and gets all M tasks.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair
from torch.func import functional_call, grad, jvp, vjp, vmap

from imaml_ext import ops
from imaml_ext._ext import _C

Params = dict[str, torch.Tensor]

LOSSES = ("cross_entropy", "mse", "half_mse")
HVP_KINDS = ("exact", "forward_over_reverse", "double_backward", "ggn")
BACKENDS = ("auto", "folded", "vmap")  # batched model execution (TaskLoss)
# CPU task chunks: the largest activation of a chunk stays under this. Measured on the Omniglot
# conv net, 5-way 1-shot, M=32 (CPU seconds of one iMAML-GD meta-gradient, one thread, against
# all 32 tasks in one fold): 4 MiB 0.83x, 8 MiB 0.76x, 12 MiB 0.81x; 20-way 5-shot tasks
# (20 MB each) run one at a time under any of these. With the first block's kernels
# (fused_blocks) the largest activation is the pooled 14x14 map: then 5-way 1-shot support sets
# run in one chunk of 32 (one HVP with its graph build 1.12x, one gradient 1.03x faster than
# chunks of 8), query sets (25 images a task) in chunks of 6 (a gradient 1.27x faster than one
# task at a time), and 20-way 5-shot still one task at a time (chunks of 2: 0.96-1.0x).
CHUNK_BYTES = 8 * 2**20


# ---- flat (M, P) views -------------------------------------------------------------------------

@dataclass(frozen=True)
class ParamSpec:
    """Names and per-task shapes of a params dict, to go between dicts and flat (M, P) buffers.

    Attributes:
        names: parameter names, in order.
        shapes: per-task shape of each (without the task dimension).
        numel: P, the total number of parameters per task.
    """

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    @classmethod
    def of(cls, params: Mapping[str, torch.Tensor], *, batched: bool = True) -> "ParamSpec":
        """The spec of a dict of (M, ...) leaves (batched) or of unbatched leaves."""
        names = tuple(params)
        shapes = tuple(params[k].shape[1:] if batched else params[k].shape for k in names)
        return cls(names, shapes)

    def flatten(self, params: Mapping[str, torch.Tensor], what: str = "params") -> torch.Tensor:
        """dict of (M, ...) -> (M, P) (one copy, in the order of `names`)."""
        check_same_keys(params, self.names, what)
        leaves = [params[k] for k in self.names]
        # Each leaf's own shape, not just its size: a transposed or re-shaped leaf of the same
        # size would flatten into the wrong coordinates without a word.
        for k, t, s in zip(self.names, leaves, self.shapes):
            if not isinstance(t, torch.Tensor) or t.dim() != len(s) + 1:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{what}[{k!r}] must be a tensor (M, {', '.join(map(str, s))}) "
                                 f"with a leading task dimension M, got {got}")
        M = leaves[0].shape[0]
        for k, t, s in zip(self.names, leaves, self.shapes):
            if t.shape[1:] != s or t.shape[0] != M:
                raise ValueError(f"{what}[{k!r}] must be (M, {', '.join(map(str, s))}) with M = "
                                 f"{M} (the first leaf's), got {tuple(t.shape)}")
        return torch.cat([t.reshape(M, -1) for t in leaves], dim=1)

    def unflatten(self, flat: torch.Tensor) -> Params:
        """(M, P) -> dict of (M, ...) views into `flat`."""
        if flat.dim() != 2 or flat.shape[1] != self.numel:
            raise ValueError(f"unflatten: expected (M, {self.numel}), got {tuple(flat.shape)}")
        parts = flat.split(self.sizes, dim=1)
        return {k: p.view(flat.shape[0], *s) if p.is_contiguous() else
                p.reshape(flat.shape[0], *s) for k, p, s in zip(self.names, parts, self.shapes)}

    def unflatten_copy(self, flat: torch.Tensor) -> Params:
        """(M, P) -> dict of contiguous (M, ...) copies of its pieces, made by one op
        (split_with_sizes_copy). Not differentiable (out= copies): use unflatten under autograd
        or torch.func transforms."""
        if flat.dim() != 2 or flat.shape[1] != self.numel:
            raise ValueError(f"unflatten_copy: expected (M, {self.numel}), got "
                             f"{tuple(flat.shape)}")
        M = flat.shape[0]
        outs = [flat.new_empty((M, *s)) for s in self.shapes]
        torch.split_with_sizes_copy(flat, list(self.sizes), dim=1,
                                    out=[o.view(M, -1) for o in outs])
        return dict(zip(self.names, outs))

    def flatten_one(self, params: Mapping[str, torch.Tensor], what: str = "params") -> torch.Tensor:
        """dict of unbatched leaves -> (P,)."""
        check_same_keys(params, self.names, what)
        return torch.cat([params[k].reshape(-1) for k in self.names])

    def unflatten_one(self, flat: torch.Tensor) -> Params:
        """(P,) -> dict of unbatched views."""
        return {k: p.reshape(s) for k, p, s in
                zip(self.names, flat.split(self.sizes), self.shapes)}


def flatten_params(params: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, ParamSpec]:
    """dict of (M, ...) leaves -> ((M, P) buffer, spec to undo it)."""
    spec = ParamSpec.of(params, batched=True)
    return spec.flatten(params), spec


def unflatten_params(flat: torch.Tensor, spec: ParamSpec) -> Params:
    """(M, P) -> dict of (M, ...) views."""
    return spec.unflatten(flat)


def check_same_keys(params: Mapping[str, torch.Tensor], names, what: str) -> None:
    """ValueError naming `what` when the dict's keys differ from `names`."""
    if not isinstance(params, Mapping):
        raise ValueError(f"{what} must be a dict name -> Tensor, got {type(params).__name__}")
    got, want = set(params), set(names)
    if got != want:
        missing, extra = sorted(want - got), sorted(got - want)
        raise ValueError(f"{what} does not match the parameters: missing {missing[:5]}, "
                         f"unexpected {extra[:5]}")


def expand_params(params: Mapping[str, torch.Tensor], M: int) -> Params:
    """Unbatched dict -> dict of (M, ...) broadcast views (no copy)."""
    return {k: v.unsqueeze(0).expand(M, *v.shape) for k, v in params.items()}


# ---- losses on outputs ---------------------------------------------------------------------------

def _per_sample(loss: str | Callable, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample losses, shape y.shape[:sample dims] (one value per sample)."""
    if callable(loss):
        per = loss(out, y)
        if not isinstance(per, torch.Tensor) or per.dim() < 2 or per.shape[:2] != y.shape[:2]:
            got = tuple(per.shape) if isinstance(per, torch.Tensor) else type(per).__name__
            raise ValueError(f"loss: a callable loss(outputs, targets) must return per-sample "
                             f"losses of shape {tuple(y.shape[:2])} (tasks, samples; "
                             f"reduction='none'), got {got}")
        return per
    if loss == "cross_entropy":
        K = out.shape[-1]
        return F.cross_entropy(out.reshape(-1, K), y.reshape(-1), reduction="none").view(y.shape)
    if out.dim() == y.dim() + 1 and out.shape[-1] == 1:
        out = out.squeeze(-1)
    if out.shape != y.shape:
        # broadcasting would pair outputs with other samples' (or other tasks') targets
        raise ValueError(f"loss {loss!r}: the model's outputs {tuple(out.shape)} do not match "
                         f"the targets {tuple(y.shape)} (tasks, samples, ...; a single output "
                         f"may also be matched by targets without its last axis)")
    sq = (out - y) ** 2
    return 0.5 * sq if loss == "half_mse" else sq


def _param_slots(model: nn.Module) -> dict[str, str] | None:
    """Where functional_call must put each parameter when a module or a tensor is reached under
    several names, else None (the plain call is right).

    torch.func.functional_call (torch 2.14) goes wrong on such models: with a module at two
    paths (nn.Sequential(lin, act, lin)) and tie_weights=True it runs the model with stale
    weights and leaves the module holding the substituted tensors (its own Parameters lost);
    with tie_weights=False a tensor shared by two modules (b.weight = a.weight) is substituted
    in one of them only. Called with tie_weights=False and every (module, attribute) slot named
    once, each module counted once, it is right in both cases. Returns slot name -> the
    named_parameters() name of the tensor in it."""
    canon = {id(t): k for k, t in model.named_parameters()}
    if len(list(model.named_parameters(remove_duplicate=False))) == len(canon):
        return None  # every tensor under one name
    slots = {}
    for mname, m in model.named_modules():  # each module once
        for pname, t in m._parameters.items():
            if t is not None:
                slots[f"{mname}.{pname}" if mname else pname] = canon[id(t)]
    return slots


def functional_forward(model: nn.Module, params: Mapping[str, torch.Tensor], x: torch.Tensor,
                       slots: dict[str, str] | None = None) -> torch.Tensor:
    """model(x) with `params` (named_parameters() names) in place of its parameters: torch.func's
    functional_call, made right for modules and tensors reached under several names (slots:
    _param_slots(model), computed once by the caller)."""
    if slots is None:
        return functional_call(model, params, (x,))
    return functional_call(model, {k: params[c] for k, c in slots.items()}, (x,),
                           tie_weights=False)


def grad_of_params(total: torch.Tensor, params: Mapping[str, torch.Tensor], **kwargs):
    """torch.autograd.grad(total, params' values, **kwargs), with a ValueError naming the
    parameters the loss does not depend on (a parameter the model's forward never reads), where
    autograd would raise its generic "appears to not have been used in the graph"."""
    gs = torch.autograd.grad(total, list(params.values()), allow_unused=True, **kwargs)
    unused = [k for k, g in zip(params, gs) if g is None]
    if unused:
        raise ValueError(f"params: the loss does not depend on {unused} (the model's forward "
                         f"never uses them), so they have no meta-gradient; remove them from "
                         f"the model or use them in its forward")
    return gs


def check_no_dropout(model: nn.Module) -> None:
    """ValueError when a dropout layer with p > 0 is in training mode: every forward would draw
    a new mask, so the inner problem, the Hessian inside CG and the meta-gradient would each see
    a different network (and repeated calls give different results)."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0:
            raise ValueError(f"model.{name or 'self'} is {type(m).__name__}(p={m.p}) in training "
                             f"mode: each forward would draw a new mask, so the inner problem and "
                             f"the Hessian in CG would not be one function; call model.eval() "
                             f"(dropout off) or remove it")


# ---- the folded (tasks-in-channels) forward -------------------------------------------------------

_FREE_LAYERS = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Identity,
                nn.MaxPool2d, nn.AvgPool2d, nn.ZeroPad2d, nn.Dropout)


def _plan(model: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """The layers of `model` in call order with their parameter prefixes, or None if the folded
    forward cannot reproduce the model (unknown structure or layer)."""
    try:
        from imaml_ext.models import ConvNet  # noqa: PLC0415 (models is a sibling layer)
    except ImportError:  # pragma: no cover - models.py absent
        ConvNet = None  # noqa: N806
    if ConvNet is not None and type(model) is ConvNet:
        body = _plan_seq(model.body, "body.")
        plan = None if body is None else body + [("head.", model.head)]
    elif type(model) in (nn.Sequential,):
        plan = _plan_seq(model, "")
    elif type(model) is nn.Linear:
        plan = [("", model)]
    else:
        return None
    # A parameter reached under a second name (one module twice in the Sequential, or two
    # modules holding one tensor: tied weights) is not in named_parameters(), which lists each
    # tensor once; the folded forward would look it up by that name. The vmap route places
    # such names itself (functional_forward).
    return None if plan is None or _param_slots(model) is not None else plan


def _plan_seq(seq: nn.Sequential, prefix: str):
    out = []
    # _modules, not named_children(): that skips a module met before, so a layer used twice
    # (nn.Sequential(lin, act, lin2, act)) would run once
    for name, m in seq._modules.items():
        if type(m) is nn.Sequential:
            sub = _plan_seq(m, f"{prefix}{name}.")
            if sub is None:
                return None
            out += sub
        elif type(m) is nn.Conv2d:
            if m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str):
                return None
            out.append((f"{prefix}{name}.", m))
        elif type(m) is nn.BatchNorm2d:  # running statistics: refused by TaskLoss
            out.append((f"{prefix}{name}.", m))
        elif type(m) is nn.Linear:
            out.append((f"{prefix}{name}.", m))
        elif type(m) is nn.Flatten:
            if m.start_dim != 1 or m.end_dim != -1:
                return None
            out.append((f"{prefix}{name}.", m))
        elif type(m) in _FREE_LAYERS:
            if isinstance(m, nn.Dropout) and m.p > 0 and m.training:
                return None
            out.append((f"{prefix}{name}.", m))
        else:
            return None
    return out


def _bn_pool_block(plan, i):
    """The length (3) of a BatchNorm2d -> {ReLU, MaxPool2d} pair starting at plan[i], else 0."""
    if i + 2 >= len(plan) or not isinstance(plan[i][1], nn.BatchNorm2d):
        return 0
    kinds = {type(plan[i + 1][1]), type(plan[i + 2][1])}
    return 3 if kinds == {nn.ReLU, nn.MaxPool2d} else 0


def _block_pool(plan, i) -> nn.MaxPool2d:
    """The max-pooling layer of the BatchNorm -> {ReLU, MaxPool2d} block starting at plan[i]."""
    return plan[i + 1][1] if isinstance(plan[i + 1][1], nn.MaxPool2d) else plan[i + 2][1]


def _bn_relu_pool(h, w, b, eps, pool):
    """relu(maxpool(batch_norm(h))) for per-channel batch statistics, pooling first.

    batch_norm is the per-channel affine map a_c * h + c_c (a_c = w_c / sqrt(var_c + eps),
    c_c = b_c - a_c mean_c, statistics of the whole pre-pool map), and max-pooling commutes with
    a per-channel monotone map: maxpool(a h + c) = a maxpool(h) + c for a >= 0 and
    = a (-maxpool(-h)) + c for a < 0, i.e. |a| maxpool(s h) + c with s = sign(a); ReLU commutes
    with max-pooling. So only the statistics, one sign flip and the pooling touch the full-size
    map; the affine map and ReLU run on the pooled one, and so do their first and second
    derivatives (the batch-norm double-backward formula is most of a Hessian-vector product's
    cost otherwise). The same function up to rounding and ties.

    Outside torch.func transforms the block is one autograd Function, _PooledBatchNorm, whose
    first and second derivatives are written out: a few full-size ops each and fewer per-channel
    ones than autograd's derivatives of the composite (one 5-way 1-shot double-backward product,
    M=32, in the GPU's layout: 365 -> 185 ATen ops, i.e. kernel launches on a GPU, its graph
    build 211 -> 243, 225 without BatchedHVP's parameter copy; CPU time the same, a product
    1.03x / 1.02x and a graph build 1.01x / 0.98x at 5-way 1-shot M=32 / 20-way 5-shot M=8,
    where the work is the convolutions'). The forward and each of the two derivatives are then
    one op of the extension (ops.pooled_bn_forward / pooled_bn_backward /
    pooled_bn_double_backward, on the devices in POOLED_BN_KERNELS; the build's factor table
    too, ops.pooled_bn_coefficients): a product 185 -> 74 ops, the graph build 225 -> 45
    (benchmarks/probes/hvp_op_count.py).
    Derivatives to second order: a third (a create_graph backward through the second) raises;
    _bn_relu_pool_composite (TaskLoss(fuse_bn_pool=False)) has all.
    Inside transforms, _bn_relu_pool_composite (it has forward-mode rules too).
    """
    if not _in_transform(h):
        C = h.shape[1]
        w = h.new_ones(C) if w is None else w
        b = h.new_zeros(C) if b is None else b
        # s = sign(w) (a = w r with r > 0). On the CPU, read it back once per evaluation and
        # skip the full-size flip in the usual case (scales start at 1); elsewhere always flip,
        # since a read-back would synchronise the device.
        flip = h.device.type != "cpu" or not bool((w >= 0).all())
        cfg = (_pair(pool.kernel_size), _pair(pool.stride), _pair(pool.padding),
               _pair(pool.dilation), bool(pool.ceil_mode), float(eps), flip)
        return _PooledBatchNorm.apply(h, w, b, cfg)
    return _bn_relu_pool_composite(h, w, b, eps, pool)


def _bn_relu_pool_composite(h, w, b, eps, pool):
    """_bn_relu_pool by autograd-differentiable torch ops (any order, forward mode too)."""
    var, mean = torch.var_mean(h, dim=(0, 2, 3), unbiased=False)
    a = torch.rsqrt(var + eps)
    if w is not None:
        a = a * w
    c = -mean * a
    if b is not None:
        c = c + b
    s = torch.where(a < 0, -1.0, 1.0).to(h.dtype).detach()
    z = pool(h * s.view(1, -1, 1, 1))
    return F.relu(z * (a * s).view(1, -1, 1, 1) + c.view(1, -1, 1, 1))


class _PooledBatchNorm(torch.autograd.Function):
    """y = relu(w * xhat + b), xhat = r (g - mean): g = h at the arg-max of max-pooling s * h
    (s = sign(w) when cfg says flip, else 1), mean and r = 1 / sqrt(var + eps) per channel over
    the whole pre-pool map h (N, C, H, W); w, b (C,). _bn_relu_pool's function (pool first).

    Its backward is _PooledBatchNormBackward, whose own backward is written out too, so a
    double-backward Hessian-vector product runs a few ops per block instead of autograd's
    derivative of a composite. The pooling's arg-max indices and the ReLU's mask are constant
    (the function is piecewise smooth; like autograd's, these are the derivatives of the piece).
    cfg: (kernel, stride, padding, dilation, ceil_mode, eps, flip).
    """

    @staticmethod
    def forward(ctx, h, w, b, cfg):
        eps, flip = cfg[5], cfg[6]
        y, xhat, idx, mean, r, rw, kb, kg = ops.pooled_bn_forward(
            h, w, b, eps, cfg[:5], flip, use_ext=_pooled_bn_kernels(h))
        ctx.save_for_backward(h, w, xhat, idx, mean, r, y, rw, kb, kg)
        ctx.cfg = cfg
        return y

    @staticmethod
    def backward(ctx, gy):
        h, w, xhat, idx, mean, r, y, rw, kb, kg = ctx.saved_tensors
        # with create_graph (grad mode on here), the backward keeps what its own backward needs
        gh, gw, gb = _PooledBatchNormBackward.apply(gy, h, w, xhat, idx, mean, r, y, rw, kb, kg,
                                                    ctx.cfg, torch.is_grad_enabled())
        need_h, need_w, need_b, _ = ctx.needs_input_grad
        return gh if need_h else None, gw if need_w else None, gb if need_b else None, None


class _PooledBatchNormBackward(torch.autograd.Function):
    """(gh, gw, gb) of _PooledBatchNorm for output gradient gy; differentiable once in
    (gy, h, w), with xhat, mean and r (and rw = r w, kb = -rw / n, kg = kb r) recomputed as
    functions of h and w by the formulas, not taken as constants (a create_graph backward,
    which would take them as constants, raises).

    Per channel, with n = N*H*W, gu = gy * [y > 0], gb = sum gu, gw = sum gu xhat (pooled sums):
        gh = r w (unpool(gu) - (gb + hhat gw) / n),   hhat = r (h - mean),
    whose vector-Jacobian product for cotangents (Ch, Cw, Cb), with K0 = sum Ch, K1 = sum Ch hhat,
    Cg = Ch at the arg-max indices, P = sum Cg gu (sums per channel), is
        d gy = [y > 0] (r w Cg + (Cw - r w K1 / n) xhat + Cb - r w K0 / n)
        d w  = r (P - (gb K0 + gw K1) / n)
        d h  = A1 unpool(gu) + A2 Ch + A3 (h - mean) + A4
    with A1 = Cw r - w r^2 K1 / n, A2 = -w r^2 gw / n,
    A3 = -(r^3 / n) (w P - w gb K0 / n - 3 w gw K1 / n + Cw gw / r), and
    A4 = (w r^2 (gb K1 + gw K0) / n - Cw r gb) / n: the derivative of <Ch, gh> + <Cw, gw> +
    <Cb, gb> through mean, r (var), the gathered values and hhat. Checked against finite
    differences and the composite (python_tests/test_hvp.py).

    Every per-channel factor there (the two of d gy, d w, A1, A3, A4) is linear in
    (K0, K1 / r, P, Cw, Cb), with coefficients fixed by the point (r, w, gb, gw): they are built
    once, when the backward runs with create_graph (`keep`), as a (6, 5, C) tensor. Both
    directions run as one op each (imaml_ext.ops.pooled_bn_backward and
    pooled_bn_double_backward; their reference twins are the ATen formulas above).
    """

    @staticmethod
    def forward(ctx, gy, h, w, xhat, idx, mean, r, y, rw, kb, kg, cfg, keep):
        # gh = rw unpool(gu) + gamma (h - mean) + beta, gamma = -rw r gw / n, beta = -rw gb / n
        gh, gw, gb, gu = ops.pooled_bn_backward(gy, y, xhat, h, idx, mean, rw, kb, kg, cfg[:5],
                                                use_ext=_pooled_bn_kernels(h))
        if keep:
            n = h.numel() // h.shape[1]
            ctx.save_for_backward(gu, h, xhat, idx, mean, y, rw,
                                  *ops.pooled_bn_coefficients(r, w, rw, kb, kg, gb, gw, n,
                                                              use_ext=_pooled_bn_kernels(h)))
            ctx.cfg = cfg
        ctx.set_materialize_grads(False)
        return gh, gw, gb

    @staticmethod
    def backward(ctx, ch, cw, cb):
        gu, h, xhat, idx, mean, y, rw, coef, a2 = ctx.saved_tensors
        need_gy, need_h, need_w = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled() and (need_gy or need_h or need_w):
            # gu, coef, a2, xhat, mean and r were computed without a graph: a graph recorded
            # here would differentiate them as constants, a silently wrong third derivative.
            raise RuntimeError(
                "the conv net's pooled batch-norm block (imaml_ext.hvp._PooledBatchNorm) has "
                "derivatives to second order: a create_graph backward through its second "
                "derivative (a third derivative) is not available; use "
                "TaskLoss(..., fuse_bn_pool=False), whose ATen ops differentiate to any order")
        d_gy, d_h, d_w = ops.pooled_bn_double_backward(
            ch, cw, cb, gu, h, xhat, idx, mean, y, rw, coef, a2, ctx.cfg[:5], need_gy, need_h,
            use_ext=_pooled_bn_kernels(h))
        return (d_gy, d_h, d_w if need_w else None) + (None,) * 10


# The pooled block's forward and two derivatives (_PooledBatchNorm's forward,
# _PooledBatchNormBackward's forward and backward) run as the extension's kernels
# (imaml_ext.ops.pooled_bn_forward / pooled_bn_backward / pooled_bn_double_backward, and
# pooled_bn_coefficients: one op each instead of ~16, ~13, ~19 and ~20) on these devices. On
# CUDA since the H100 run of 2026-11-28 (their CUDA tests passed; hvp_op_count: one 5-way 1-shot /
# 20-way 5-shot product at M=32 1.34x / 1.48x faster, the graph build 1.37x / 1.44x);
# IMAML_CUDA_POOLED_BN=reference keeps CUDA on the composite ATen ops.
_POOLED_BN_ENV = os.environ.get("IMAML_CUDA_POOLED_BN", "fused") or "fused"
if _POOLED_BN_ENV not in ("fused", "reference"):
    raise ValueError("IMAML_CUDA_POOLED_BN must be fused or reference (or unset), got "
                     f"{_POOLED_BN_ENV!r}")
POOLED_BN_KERNELS = ("cpu", "cuda") if _POOLED_BN_ENV == "fused" else ("cpu",)


def _pooled_bn_kernels(h: torch.Tensor) -> bool | None:
    """use_ext for the pooled block's derivatives on h's device: None (where they apply) or
    False (the reference)."""
    return None if h.device.type in POOLED_BN_KERNELS else False


def _pool2(m: nn.Module) -> bool:
    """Whether m is the 2x2, stride-2, floor-mode max-pooling of the fused block kernel."""
    return (type(m) is nn.MaxPool2d and _pair(m.kernel_size) == (2, 2)
            and _pair(m.stride) == (2, 2) and _pair(m.padding) == (0, 0)
            and _pair(m.dilation) == (1, 1) and not m.ceil_mode and not m.return_indices)


def _conv1ch_geometry(m: nn.Conv2d) -> bool:
    """Whether the extension's first-layer kernels (imaml_ext.ops.conv1ch and its block) take
    conv m's geometry: dilation 1, zero padding smaller than the kernel, at most 121 taps."""
    kh, kw = m.kernel_size
    ph, pw = _pair(m.padding)
    return (_pair(m.dilation) == (1, 1) and ph < kh and pw < kw and kh * kw <= 121
            and m.padding_mode == "zeros")


def _conv1ch_ok(m: nn.Conv2d, h: torch.Tensor) -> bool:
    """Whether those kernels compute conv layer m on h: its geometry, on the CPU, h data (no
    gradient, not a functorch wrapper); one input channel per task is the caller's check."""
    return (_conv1ch_geometry(m) and h.device.type == "cpu" and not h.requires_grad
            and not _in_transform(h))


# Smallest map side on which "grad" mode runs a 3x3 convolution by the Winograd kernel
# (imaml_ext.ops.conv3x3): it needs 2x2 output tiles to pay for its transforms.
WINOGRAD_MIN_SIZE = 14
WINOGRAD_HVP = True
# "hvp" mode evaluates every convolution (outside torch.func transforms) with ops._Conv, whose
# double backward is the convolution's three bilinear maps, each one library call with all the
# groups (tasks) at once. ATen's own double backward of a grouped convolution computes the
# weight gradient of the input's tangent as one convolution per group and a cat: with M tasks
# folded into the groups, M convolutions per layer per product (on the CPU one 5-way 1-shot
# product, M=32, 1.09x faster with _Conv; on a GPU, where each of those convolutions is a
# launch, see benchmarks/probes/hvp_op_count.py for the ops it saves). False: ATen's (for A/B).
OWN_CONV_HVP = True


def _winograd_ok(m: nn.Conv2d, h: torch.Tensor, wf: torch.Tensor, groups: int) -> bool:
    """Whether conv layer m (weights wf folded over `groups` tasks) runs on h by the Winograd
    kernel: 3x3, stride 1, zero padding 1, dilation 1, a map of at least WINOGRAD_MIN_SIZE,
    outside torch.func transforms, and the kernel's own conditions (ops.conv3x3_ext_ok)."""
    return (tuple(m.kernel_size) == (3, 3) and _pair(m.stride) == (1, 1)
            and _pair(m.padding) == (1, 1) and _pair(m.dilation) == (1, 1)
            and m.padding_mode == "zeros" and min(h.shape[2], h.shape[3]) >= WINOGRAD_MIN_SIZE
            and not _in_transform(h, wf) and ops.conv3x3_ext_ok(h, wf, groups))


def _winograd_hvp(m: nn.Conv2d, h: torch.Tensor, wf: torch.Tensor, groups: int) -> bool:
    """Whether the "hvp" layout's convolution (ops._Conv) computes its three bilinear maps by the
    Winograd kernel: for a channels-last chunk (the kernel works channels-last; converting NCHW
    maps costs what it saves: a grouped 5-way 1-shot product 0.97x), which TaskLoss makes every
    CPU chunk when the kernel is on (WINOGRAD_HVP and fused_blocks)."""
    return (WINOGRAD_HVP and h.is_contiguous(memory_format=torch.channels_last)
            and _winograd_ok(m, h, wf, groups))


def _folded_forward(plan, params: Mapping[str, torch.Tensor], x: torch.Tensor, *,
                    channels_last: bool = False, fuse: bool = False,
                    ext_blocks: bool = False, ext_conv1: bool = False,
                    own_conv: bool = False) -> torch.Tensor:
    """Outputs (M, N, ...) for batched params and x (M, N, ...), tasks folded into channels.

    channels_last: run the conv stage in channels-last memory format. fuse: evaluate
    BatchNorm -> ReLU -> MaxPool blocks by `_bn_relu_pool` (pool before the affine map).
    ext_blocks: evaluate BatchNorm -> ReLU -> 2x2 MaxPool blocks by the extension's fused CPU
    kernel (imaml_ext.ops.bn_relu_pool; first-order only), and a first conv layer with one input
    channel per task by imaml_ext.ops.conv1ch, fused with the block after it when there is one
    (imaml_ext.ops.conv1ch_bn_relu_pool; first-order only). ext_conv1: evaluate such a first
    block in its second-order form (imaml_ext.ops.conv1ch_bn_relu_pool_hvp). own_conv: evaluate
    convolutions (outside torch.func transforms) with ops._Conv, whose derivatives of every
    order are the convolution's three bilinear maps over all groups at once (see OWN_CONV_HVP).
    """
    M, N = x.shape[0], x.shape[1]
    # a memory format is the physical layout: under vmap the physical tensor has the batch
    # dimension too, and a rank-5 tensor has no channels-last format (grad and jvp wrappers
    # keep the logical shape, so they keep the layout; so does the compiled HVP, which Dynamo
    # traces without vmap and whose wrapper checks it could not trace)
    channels_last = channels_last and (torch.compiler.is_compiling() or not _vmapped(x))
    if x.dim() == 5:  # images: (M, N, C, H, W) -> (N, M*C, H, W)
        h = x.transpose(0, 1).reshape(N, M * x.shape[2], x.shape[3], x.shape[4])
        if channels_last:
            # .to, not .contiguous: with one input channel (one task of a 1-channel data set)
            # both layouts are "contiguous", .contiguous keeps NCHW strides, and oneDNN then
            # picks NCHW for the whole net, where max-pooling is several times slower.
            h = h.to(memory_format=torch.channels_last)
        spatial = True
    else:  # features: (M, N, F)
        h = x
        spatial = False
    i = 0
    while i < len(plan):
        prefix, m = plan[i]
        if (ext_blocks or fuse) and spatial and _bn_pool_block(plan, i):
            w = params.get(prefix + "weight")
            b = params.get(prefix + "bias")
            pool = _block_pool(plan, i)
            if ext_blocks and _pool2(pool):
                C = h.shape[1]
                h = ops.bn_relu_pool(h, h.new_ones(C) if w is None else w.reshape(-1),
                                     h.new_zeros(C) if b is None else b.reshape(-1), m.eps)
                i += 3
                continue
            if fuse:
                h = _bn_relu_pool(h, None if w is None else w.reshape(-1),
                                  None if b is None else b.reshape(-1), m.eps, pool)
                i += 3
                continue
        if spatial and isinstance(m, nn.ReLU) and i + 1 < len(plan) and \
                isinstance(plan[i + 1][1], nn.MaxPool2d):
            # max-pooling commutes with ReLU (both monotone): pool first, ReLU on a 4x smaller map
            h = F.relu(plan[i + 1][1](h))
            i += 2
            continue
        if isinstance(m, nn.Conv2d):
            w = params[prefix + "weight"]
            b = params.get(prefix + "bias")
            if (ext_blocks or ext_conv1) and w.shape[2] == 1 and _conv1ch_ok(m, h):
                # the first layer of a gray-scale net: one input channel per task
                cw = w.reshape(M * w.shape[1], *w.shape[2:])
                cb = None if b is None else b.reshape(-1)
                if _bn_pool_block(plan, i + 1) and _pool2(_block_pool(plan, i + 1)):
                    bn_prefix, bn = plan[i + 1]
                    bw, bb = params.get(bn_prefix + "weight"), params.get(bn_prefix + "bias")
                    C = cw.shape[0]
                    args = (h, cw, cb, h.new_ones(C) if bw is None else bw.reshape(-1),
                            h.new_zeros(C) if bb is None else bb.reshape(-1), m.stride,
                            m.padding, bn.eps)
                    if ext_conv1:  # second-order form: pooled-size derivatives only
                        h = ops.conv1ch_bn_relu_pool_hvp(*args).contiguous(
                            memory_format=torch.channels_last if channels_last
                            else torch.contiguous_format)
                    else:
                        h = ops.conv1ch_bn_relu_pool(*args)
                    i += 4
                    continue
                if ext_blocks:
                    h = ops.conv1ch(h, cw, cb, m.stride, m.padding)
                    i += 1
                    continue
            wf = w.reshape(M * w.shape[1], *w.shape[2:])
            bf = None if b is None else b.reshape(-1)
            wino = (ext_blocks and _winograd_ok(m, h, wf, M)) or \
                (fuse and _winograd_hvp(m, h, wf, M))
            if wino or (own_conv and not _in_transform(h, wf)):
                # the library's three convolution kernels, on the Winograd kernel where it runs;
                # in the "hvp" layout its double backward is those kernels again
                h = ops._Conv.apply(h, wf, bf, (list(_pair(m.stride)), list(_pair(m.padding)),
                                                list(_pair(m.dilation)), M, wino))
            else:
                h = F.conv2d(h, wf, bf, m.stride, m.padding, m.dilation, groups=M)
        elif isinstance(m, nn.BatchNorm2d):
            w = params.get(prefix + "weight")
            b = params.get(prefix + "bias")
            h = F.batch_norm(h, None, None, None if w is None else w.reshape(-1),
                             None if b is None else b.reshape(-1), True, 0.0, m.eps)
        elif isinstance(m, nn.Flatten):
            if spatial:  # (N, M*C, H, W) -> (M, N, C*H*W): each task's block is contiguous
                h = h.reshape(N, M, -1).transpose(0, 1)
                spatial = False
        elif isinstance(m, nn.Linear):
            if spatial:
                raise RuntimeError("folded forward: Linear applied to a 4-d activation")
            w = params[prefix + "weight"]  # (M, out, in)
            b = params.get(prefix + "bias")
            h = torch.bmm(h, w.transpose(1, 2)) if b is None else \
                torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
        else:
            h = m(h)
        i += 1
    if spatial:  # no Flatten at the end: (N, M*C, H, W) -> (M, N, C, H, W)
        h = h.reshape(N, M, -1, *h.shape[2:]).transpose(0, 1)
    return h


# ---- TaskLoss --------------------------------------------------------------------------------------

class TaskLoss:
    """The per-task loss L_i(params_i) = mean over the task's samples of loss(model(x_i), y_i).

    Args:
        model: an nn.Module used through functional_call semantics only.
        loss: "cross_entropy" (int64 labels), "mse" (mean squared error, float targets),
            "half_mse" (0.5 * mse, so that a linear model's Hessian is X^T X / n), or a callable
            (outputs (M, N, ...), targets (M, N, ...)) -> per-sample losses (M, N).
        backend: "auto", "folded" or "vmap" (see the module docstring).
        channels_last: folded backend, "grad" mode: channels-last memory format for the conv
            stage (None: on the CPU, where oneDNN's pooling and batch-norm are several times
            faster in it). "hvp" mode picks its own: channels-last for a chunk of one task on
            the CPU, NCHW otherwise (see `_folded`).
        fuse_bn_pool: folded backend, Hessian-vector products: evaluate BatchNorm -> ReLU ->
            MaxPool blocks with pooling first (see `_bn_relu_pool`; the same function), which
            makes their second derivatives cheap (None: True).
        task_chunk: folded backend: tasks per evaluation (see the module docstring). None: on
            the CPU the most tasks whose largest activation fits CHUNK_BYTES, on a GPU all.
        fused_blocks: folded backend on the CPU: in "grad" mode evaluate each BatchNorm ->
            ReLU -> 2x2 MaxPool block with the extension's fused kernel
            (imaml_ext.ops.bn_relu_pool), and a first conv with one input channel per task
            together with its block (ops.conv1ch_bn_relu_pool); these are first-order only: a
            second derivative taken through a "grad"-mode evaluation then raises (the
            library's second-order work uses mode "hvp"). In "hvp" mode evaluate that first
            block in its second-order form (ops.conv1ch_bn_relu_pool_hvp). None: True when the
            extension is loaded.

    Every evaluation takes `mode`: "grad" (losses and gradients: the fastest first-order
    layout; with fused_blocks, first-order only) or "hvp" (second-order products: the layout
    whose double backward is cheapest, differentiable to any order).
    Measured on the Omniglot conv net, 2-core Xeon, float32, CPU seconds of 1 thread, 20-way
    5-shot, M=8: one gradient 2.0 s plain / 1.35 s channels-last; one exact HVP by double
    backward 6.8 s plain / 3.7 s fused; by forward-over-reverse 9.1 s plain / 6.5 s fused.
    In both modes a ReLU followed by max-pooling is evaluated pool-first (they commute).
    """

    def __init__(self, model: nn.Module, loss: str | Callable = "cross_entropy",
                 backend: str = "auto", channels_last: bool | None = None,
                 fuse_bn_pool: bool | None = None, task_chunk: int | None = None,
                 fused_blocks: bool | None = None):
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
        if not callable(loss) and loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES} or a callable, got {loss!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be 'auto', 'folded' or 'vmap', got {backend!r}")
        for mname, m in model.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                # train mode: vmap cannot update the shared running buffers per task; eval mode:
                # every task would silently use those fixed buffers instead of its own batch
                raise ValueError(f"model.{mname}: {type(m).__name__} must have "
                                 f"track_running_stats=False (batch statistics in every "
                                 f"forward pass, the MAML / iMAML convention), got True")
        check_no_dropout(model)
        if task_chunk is not None and (isinstance(task_chunk, bool) or
                                       not isinstance(task_chunk, int) or task_chunk < 1):
            raise ValueError(f"task_chunk must be None or an int >= 1, got {task_chunk!r}")
        self.model = model
        self.loss = loss
        plan = _plan(model) if backend in ("auto", "folded") else None
        if backend == "folded" and plan is None:
            raise ValueError(f"backend='folded' does not support {type(model).__name__}; "
                             "use backend='vmap'")
        self._plan = plan
        self._conv = plan is not None and any(isinstance(m, nn.Conv2d) for _, m in plan)
        self.backend = "folded" if plan is not None else "vmap"
        self.param_shapes = {k: v.shape for k, v in model.named_parameters()}
        self._slots = _param_slots(model)
        self.channels_last = channels_last
        self.fuse_bn_pool = True if fuse_bn_pool is None else bool(fuse_bn_pool)
        self.task_chunk = task_chunk
        if fused_blocks and _C is None:
            raise RuntimeError("fused_blocks=True needs the compiled extension, which is not "
                               "loaded (imaml_ext.build_info() says why)")
        self.fused_blocks = (_C is not None) if fused_blocks is None else bool(fused_blocks)
        self._vmapped = vmap(self._single_outputs, in_dims=(0, 0), randomness="different")
        self._peak_cache: dict[tuple, int] = {}
        self._compiled_hvp = None

    @property
    def classification(self) -> bool:
        return self.loss == "cross_entropy"

    def _single_outputs(self, params, x):
        return functional_forward(self.model, params, x, self._slots)

    def _folds(self, x_b: torch.Tensor) -> bool:
        return self._plan is not None and (x_b.dim() == 5 or (x_b.dim() == 3 and not self._conv))

    def chunk_size(self, x_b: torch.Tensor) -> int:
        """Tasks per evaluation for inputs x_b (M, N, ...): M unless the folded CPU path chunks.

        The default keeps a chunk's largest activation (the plan's shapes, one task's samples)
        under CHUNK_BYTES, not counting a first block that the extension's kernels evaluate
        without its full-size maps (fused_blocks); chunks are balanced (M=32 by at most 12:
        11, 11, 10).
        """
        M = x_b.shape[0]
        if not self._folds(x_b) or M <= 1:
            return max(M, 1)
        c = self.task_chunk
        if c is None:
            if x_b.device.type != "cpu":
                return M
            # (inside torch.func transforms the first block falls back to ATen's full-size
            # maps, in these larger chunks: the transforms are the non-default HVP kinds)
            fused = bool(self.fused_blocks) and x_b.dim() == 5 and x_b.shape[2] == 1 and \
                _first_block_fused(self._plan)
            key = (tuple(x_b.shape[1:]), fused)
            if key not in self._peak_cache:
                self._peak_cache[key] = _peak_activation(self._plan, x_b.shape[1:], fused)
            per_task = self._peak_cache[key] * x_b.element_size()
            c = max(1, CHUNK_BYTES // max(per_task, 1))
        if c >= M:
            return M
        n = -(-M // c)
        return -(-M // n)

    def outputs(self, params_b: Mapping[str, torch.Tensor], x_b: torch.Tensor, *,
                mode: str = "grad") -> torch.Tensor:
        """Model outputs (M, N, ...) for batched params and inputs x_b (M, N, ...).

        mode: "grad" or "hvp", the layout to evaluate in (the same function either way).
        Chunked (see the module docstring) by torch.split and torch.cat, so that autograd
        and torch.func see one function of all M tasks.
        """
        # the folded layout reads a missing key as "no such parameter", vmap's functional_call
        # as the module's own: either is a different function, silently
        check_same_keys(params_b, self.param_shapes, "params_b")
        if not self._folds(x_b):
            return self._vmapped(dict(params_b), x_b)
        c = self.chunk_size(x_b)
        if c >= x_b.shape[0]:
            return self._folded(params_b, x_b, mode)
        parts = {k: v.split(c) for k, v in params_b.items()}
        return torch.cat([self._folded({k: parts[k][j] for k in parts}, xj, mode)
                          for j, xj in enumerate(x_b.split(c))])

    def _folded(self, params_b, x_b, mode):
        cpu = x_b.device.type == "cpu"
        if mode == "hvp":
            # channels-last for a chunk of one task (its convolutions are not grouped): one
            # 20-way 5-shot product 1.13x faster, its graph 1.23x. With several tasks folded
            # (the grouped _Conv) channels-last measured 0.95x / 1.14x at 5-way 1-shot with
            # ATen's convolutions, so NCHW there unless the Winograd kernel runs them
            # (channels-last: a 5-way 1-shot iMAML-GD meta-gradient 1.085x faster).
            cl = cpu and (x_b.shape[0] == 1 or (self.fused_blocks and WINOGRAD_HVP))
            return _folded_forward(self._plan, params_b, x_b, fuse=self.fuse_bn_pool,
                                   ext_conv1=self.fused_blocks and cpu, channels_last=cl,
                                   own_conv=OWN_CONV_HVP)
        cl = self.channels_last
        if cl is None:
            cl = cpu
        return _folded_forward(self._plan, params_b, x_b, channels_last=cl,
                               ext_blocks=self.fused_blocks and cpu)

    def compiled_hvp(self) -> Callable:
        """torch.compile of (params_b, x_b, y_b, v) -> H v, forward-over-reverse over all M
        tasks in one graph (no task chunks: Inductor would compile every chunk's copy of the
        graph), built once per TaskLoss so that new points reuse the compiled code (it
        recompiles for new shapes). Inductor fuses the elementwise tangent work of batch-norm,
        ReLU and pooling around the convolutions and matmuls, which stay library calls."""
        if self._compiled_hvp is None:
            self._compiled_hvp = torch.compile(self._hvp_all, dynamic=False)
        return self._compiled_hvp

    def _hvp_all(self, params_b, x_b, y_b, v):
        def summed(p):
            out = self._folded(p, x_b, "hvp") if self._folds(x_b) else self._vmapped(p, x_b)
            return self.per_task(out, y_b).sum()
        return jvp(grad(summed), (params_b,), (v,))[1]

    def chunks(self, x_b: torch.Tensor) -> list[slice]:
        """The task slices of x_b's evaluation, in order (one slice when not chunked)."""
        M, c = x_b.shape[0], self.chunk_size(x_b)
        return [slice(i, min(i + c, M)) for i in range(0, M, c)]

    def per_task(self, out: torch.Tensor, y_b: torch.Tensor) -> torch.Tensor:
        """(M,) mean loss per task from outputs (M, N, ...) and targets (M, N, ...)."""
        return _per_sample(self.loss, out, y_b).reshape(y_b.shape[0], -1).mean(1)

    def __call__(self, params_b, x_b, y_b, *, mode: str = "grad") -> torch.Tensor:
        """(M,) losses."""
        return self.per_task(self.outputs(params_b, x_b, mode=mode), y_b)

    def single(self, params: Mapping[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor):
        """The loss of one task (unbatched params, x (N, ...), y (N,)): a 0-d tensor."""
        out = functional_forward(self.model, dict(params), x, self._slots)
        return _per_sample(self.loss, out.unsqueeze(0), y.unsqueeze(0)).mean()

    def accuracy(self, out: torch.Tensor, y_b: torch.Tensor) -> torch.Tensor | None:
        """(M,) fraction of correct argmax predictions (classification), else None."""
        if not self.classification:
            return None
        return (out.argmax(-1) == y_b).to(out.dtype).reshape(y_b.shape[0], -1).mean(1)

    def grad(self, params_b, x_b, y_b):
        """(grads dict of (M, ...), losses (M,), outputs (M, N, ...)), outputs detached.

        Chunked: each chunk's forward and backward run before the next chunk's forward.
        """
        parts = [self._grad(_slice(params_b, s), x_b[s], y_b[s]) for s in self.chunks(x_b)]
        if len(parts) == 1:
            return parts[0]
        g = {k: torch.cat([p[0][k] for p in parts]) for k in parts[0][0]}
        return g, torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts])

    def _grad(self, params_b, x_b, y_b):
        def f(p):
            out = self.outputs(p, x_b)
            losses = self.per_task(out, y_b)
            return losses.sum(), (losses, out)
        if _in_transform(x_b, *params_b.values()):
            g, (losses, out) = grad(f, has_aux=True)(dict(params_b))
            return g, losses, out
        # plain autograd outside torch.func transforms: the same gradient without functorch's
        # per-op wrapping, and a first-order backward (no graph of the gradient is built)
        with torch.enable_grad():
            p = {k: v.detach().requires_grad_(True) for k, v in params_b.items()}
            total, (losses, out) = f(p)
            gs = grad_of_params(total, p)
        return dict(zip(p, gs)), losses.detach(), out.detach()


def _vmapped(t: torch.Tensor) -> bool:
    """Whether t is batched by torch.func.vmap at some level of its transform wrappers."""
    f = torch._C._functorch
    while f.is_functorch_wrapped_tensor(t):
        if f.is_batchedtensor(t):
            return True
        t = f.get_unwrapped(t)
    return False


def _in_transform(*tensors: torch.Tensor) -> bool:
    """Whether a torch.func transform is active or any tensor is one of its wrappers."""
    return (torch._C._functorch.peek_interpreter_stack() is not None
            or any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors))


def _slice(params: Mapping[str, torch.Tensor], s: slice) -> Params:
    return {k: v[s] for k, v in params.items()}


def _first_block_fused(plan) -> bool:
    """Whether the plan starts with a conv of one input channel and a BatchNorm -> ReLU -> 2x2
    MaxPool block, which the extension's kernels evaluate without forming the conv's output
    (on the CPU with fused_blocks; see `_folded_forward`)."""
    if not plan or not isinstance(plan[0][1], nn.Conv2d) or not _bn_pool_block(plan, 1):
        return False
    m = plan[0][1]
    return (m.in_channels == 1 and m.groups == 1 and _conv1ch_geometry(m)
            and _pool2(_block_pool(plan, 1)))


def _peak_activation(plan, sample_shape, first_block_fused: bool = False) -> int:
    """Elements of the largest activation of one task (samples x features), from the plan's
    shapes on the meta device (no compute). first_block_fused: the first block's full-size maps
    are never formed (only its pooled output counts)."""
    h = torch.empty(tuple(sample_shape), device="meta")
    peak = h.numel()
    for j, (_, m) in enumerate(plan):
        if isinstance(m, nn.Conv2d):
            w = torch.empty(m.weight.shape, device="meta")
            h = F.conv2d(h, w, None, m.stride, m.padding, m.dilation)
        elif isinstance(m, nn.Linear):
            h = h.new_empty(*h.shape[:-1], m.out_features)
        elif isinstance(m, nn.Flatten):
            h = h.flatten(1) if h.dim() > 2 else h
        elif isinstance(m, (nn.MaxPool2d, nn.AvgPool2d, nn.ZeroPad2d)):
            h = m(h)
        if not (first_block_fused and j < 3):
            peak = max(peak, h.numel())
    return peak


# ---- Hessian-vector products -----------------------------------------------------------------

class BatchedHVP:
    """v -> H v for the M tasks' losses at fixed params, H block-diagonal over tasks.

    Call it on a dict of (M, ...) tangents, or use `flat` on an (M, P) buffer (the form the CG ops
    take). `kind` says how the product is computed:
    - "forward_over_reverse": torch.func.jvp of torch.func.grad (recomputes the forward and
      backward with every product; nothing kept between products);
    - "double_backward": the gradient graph is built once (create_graph) and each product is one
      backward pass through it (retain_graph); `value_and_grad()` then comes for free. The
      graph is built on the parameters themselves (no copy), so changing them in place while
      the object is in use makes autograd raise;
    - "exact": the exact Hessian by the method that is fastest here, double_backward (on the
      Omniglot conv net, CPU: 3.7 s against 6.5 s per product for 20-way 5-shot, M=8; see
      TaskLoss), falling back to forward_over_reverse inside torch.func transforms;
    - "ggn": Gauss-Newton J^T H_out J (H_out = Hessian of the loss in the outputs), positive
      semi-definite for convex losses (cross-entropy, mse). Like double_backward, a graph is
      built once (the outputs and J^T u for a symbolic u) and each product is two backward
      passes through it; `value_and_grad()` reuses its forward.
    Where the TaskLoss chunks the tasks (on the CPU), one BatchedHVP per chunk does the work,
    each with its own graph, and the products are concatenated.
    Every kind is differentiable in v (autograd through a v that requires grad: cg over a b
    that does, say; the double-backward and Gauss-Newton products by a backward that applies H
    again, H being symmetric), not in the params, which it holds detached. make_hvp checks its
    arguments against the model: params_b's keys, each leaf (M, *shape) for x_b's M tasks, y_b
    with x_b's tasks and samples, x_b in the params' dtype.

    compile=True (kinds "exact" and "forward_over_reverse"): each product is one call of
    `TaskLoss.compiled_hvp()`, torch.compile (Inductor) of the forward-over-reverse product over
    all M tasks. The first call compiles (about a minute on the 2-core CPU; again for new
    shapes). Opt-in: on that CPU (benchmarks/results/hvp_compiled_cpu.json, Omniglot conv net) it
    is 1.2x / 1.8x faster than eager forward-over-reverse on the same single fold (5-way 1-shot
    M=32 / 20-way 5-shot M=8) but no faster than the eager product on task chunks, and 0.6-0.7x
    the speed of the reused double-backward product "exact" picks. float32 accuracy: at 5-way
    1-shot its relative error against float64 was 1.2%, eager's 0.2% (this Hessian is
    ill-conditioned at the random initialisation); at 20-way 5-shot it agreed with eager to 4e-6.
    float64 agrees with eager to rounding (python_tests/test_hvp.py).
    """

    def __init__(self, task_loss: TaskLoss, params_b: Mapping[str, torch.Tensor],
                 x_b: torch.Tensor, y_b: torch.Tensor, kind: str = "exact",
                 compile: bool = False):
        if kind not in HVP_KINDS:
            raise ValueError(f"hvp kind must be one of {HVP_KINDS}, got {kind!r}")
        if compile and kind not in ("exact", "forward_over_reverse"):
            raise ValueError(f"compile=True computes forward-over-reverse products: kind must be "
                             f"'exact' or 'forward_over_reverse', got {kind!r}")
        self.task_loss = task_loss
        _check_hvp_inputs(task_loss, params_b, x_b, y_b)
        # contiguous: phi straight from batched_theta (zero inner steps) is a stride-0 broadcast
        # view, from which torch.func.jvp cannot make a forward-mode input (a copy only there)
        self.params = {k: v.detach().contiguous() for k, v in params_b.items()}
        self.spec = ParamSpec.of(self.params)
        self.M = x_b.shape[0]
        self.x, self.y = x_b, y_b
        if kind == "exact":
            wrapped = any(torch._C._functorch.is_functorch_wrapped_tensor(t)
                          for t in (*self.params.values(), x_b))
            kind = "forward_over_reverse" if wrapped or compile else "double_backward"
        self.kind = kind
        self.compiled = bool(compile)
        self._db = None
        self._ggn = None
        slices = [slice(None)] if compile else task_loss.chunks(x_b)
        self._parts = None if len(slices) == 1 else [
            (s, BatchedHVP(task_loss, _slice(self.params, s), x_b[s], y_b[s], kind))
            for s in slices]

    def __call__(self, v: Mapping[str, torch.Tensor]) -> Params:
        if not isinstance(v, Mapping):
            raise ValueError(f"H(v): v must be a dict like the params, got {type(v).__name__} "
                             f"(H.flat takes an (M, P) tensor)")
        missing = [k for k in self.spec.names if k not in v]
        if missing:
            raise ValueError(f"H(v): v lacks {missing[:5]} (it needs every parameter's key)")
        for k in self.spec.names:
            if not isinstance(v[k], torch.Tensor) or v[k].shape != self.params[k].shape:
                got = tuple(v[k].shape) if isinstance(v[k], torch.Tensor) else type(v[k]).__name__
                raise ValueError(f"H(v): v[{k!r}] must have the parameter's shape "
                                 f"{tuple(self.params[k].shape)}, got {got}")
        v = {k: v[k] for k in self.spec.names}
        if self._parts is not None:
            outs = [H(_slice(v, s)) for s, H in self._parts]
            return {k: torch.cat([o[k] for o in outs]) for k in self.spec.names}
        if self.kind == "forward_over_reverse":
            return self._forward_over_reverse(v)
        vs = list(v.values())
        if self.kind == "double_backward" and _in_transform(*vs):
            # v from a torch.func transform (vmap over v): the cached graph's ops have no
            # batching rules, forward-over-reverse does
            return self._forward_over_reverse(v)
        product = self._double_backward if self.kind == "double_backward" else self._gauss_newton
        if torch.is_grad_enabled() and any(t.requires_grad for t in vs) and \
                not _in_transform(*vs):
            # Both products are backward passes through a graph that v is not part of: with
            # autograd recording v (cg through b, say) they would hand back a constant. H is
            # symmetric, so its backward is H again (to v; the params are held detached).
            return dict(zip(self.spec.names,
                            _SymmetricProduct.apply(product, self.spec.names, *vs)))
        return product(v)

    def flat(self, v: torch.Tensor) -> torch.Tensor:
        """(M, P) -> (M, P). For the double-backward and Gauss-Newton products the pieces of v
        go in as contiguous copies made by one op (ParamSpec.unflatten_copy): as views of v
        (strided by P) the product's graph cloned each one it reshapes, ~12 ops per product
        (each a launch on a GPU)."""
        if v.dim() != 2 or tuple(v.shape) != (self.M, self.spec.numel):
            raise ValueError(f"H.flat(v): v must be (M, P) = ({self.M}, {self.spec.numel}), got "
                             f"{tuple(v.shape)}")
        if self._parts is not None:
            return torch.cat([H.flat(v[s]) for s, H in self._parts])
        # (forward-mode AD wants tangents laid out like the primals, which may be such views)
        copy = self.kind in ("double_backward", "ggn") and not (v.requires_grad or
                                                                 _in_transform(v))
        vs = self.spec.unflatten_copy(v) if copy else self.spec.unflatten(v)
        return self.spec.flatten(self(vs), "H v")

    def value_and_grad(self) -> tuple[torch.Tensor, Params]:
        """((M,) losses, dict of (M, ...) gradients) at the params, detached; free (from the
        cached graph) for the double-backward kind."""
        if self._parts is not None:
            outs = [H.value_and_grad() for _, H in self._parts]
            return (torch.cat([o[0] for o in outs]),
                    {k: torch.cat([o[1][k] for o in outs]) for k in self.spec.names})
        if self.kind == "double_backward":
            self._build()
            p, losses, g = self._db
            return losses.detach(), {k: t.detach() for k, t in zip(self.spec.names, g)}
        if self.kind == "ggn" and not _in_transform(*self.params.values(), self.x):
            p, out = self._ggn_build()[:2]  # the products' forward: no second one
            with torch.enable_grad():
                losses = self.task_loss.per_task(out, self.y)
                g = grad_of_params(losses.sum(), {k: p[k] for k in self.spec.names},
                                   retain_graph=True)
            return losses.detach(), dict(zip(self.spec.names, g))
        g, losses, _ = self.task_loss.grad(self.params, self.x, self.y)
        return losses, g

    def losses(self) -> torch.Tensor | None:
        """(M,) training losses at the params, detached, where the product's own graph has them
        (the double-backward and, outside torch.func transforms, the Gauss-Newton kinds: no
        forward of their own); else None."""
        if self._parts is not None:
            outs = [H.losses() for _, H in self._parts]
            return None if any(o is None for o in outs) else torch.cat(outs)
        if self.kind == "double_backward":
            self._build()
            return self._db[1].detach()
        if self.kind == "ggn" and not _in_transform(*self.params.values(), self.x):
            out = self._ggn_build()[1]
            with torch.no_grad():
                return self.task_loss.per_task(out.detach(), self.y)
        return None

    def _summed(self, p):
        return self.task_loss(p, self.x, self.y, mode="hvp").sum()

    def _forward_over_reverse(self, v):
        if self.compiled:
            return self.task_loss.compiled_hvp()(self.params, self.x, self.y, v)
        return jvp(grad(self._summed), (self.params,), (v,))[1]

    def _build(self):
        if self._db is None:
            with torch.enable_grad():
                p = {k: t.detach().requires_grad_(True) for k, t in self.params.items()}
                losses = self.task_loss(p, self.x, self.y, mode="hvp")
                g = grad_of_params(losses.sum(), {k: p[k] for k in self.spec.names},
                                   create_graph=True)
            self._db = (p, losses, g)

    def _double_backward(self, v):
        self._build()
        p, _, g = self._db
        with torch.enable_grad():
            hv = torch.autograd.grad(g, [p[k] for k in self.spec.names],
                                     grad_outputs=[v[k] for k in self.spec.names],
                                     retain_graph=True)
        return dict(zip(self.spec.names, hv))

    def _gauss_newton(self, v):
        """J^T H_out J v. Outside torch.func transforms the network's part reuses one graph,
        built once: the outputs' forward and J^T u for a symbolic u (create_graph), so that
        J v is one backward through the latter (the double-vjp trick: J^T u is linear in u)
        and J^T w one backward through the former; nothing is recomputed and no forward-mode
        AD runs over the network. H_out (the loss's Hessian in the outputs, a small tensor) is
        a double backward of the loss in the outputs, likewise built once. Inside transforms:
        jvp and vjp of the outputs (recomputed), H_out forward-over-reverse."""
        tl = self.task_loss
        if _in_transform(*self.params.values(), self.x, *v.values()):
            loss_grad = grad(lambda o: tl.per_task(o, self.y).sum())
            out_fn = lambda p: tl.outputs(p, self.x, mode="hvp")  # noqa: E731
            out, vjp_fn = vjp(out_fn, self.params)
            _, jv = jvp(out_fn, (self.params,), (v,))
            return vjp_fn(jvp(loss_grad, (out.detach(),), (jv,))[1])[0]
        p, out, u, jtu, o, lg = self._ggn_build()
        names = self.spec.names
        with torch.enable_grad():
            (jv,) = torch.autograd.grad(jtu, [u], grad_outputs=[v[k] for k in names],
                                        retain_graph=True)
            (hjv,) = torch.autograd.grad(lg, [o], grad_outputs=[jv], retain_graph=True)
            res = torch.autograd.grad(out, [p[k] for k in names], grad_outputs=hjv,
                                      retain_graph=True)
        return dict(zip(names, res))

    def _ggn_build(self):
        """(params as graph leaves, outputs, u, J^T u with its graph, the outputs as a leaf o,
        the loss's gradient in o with its graph), built once."""
        if self._ggn is None:
            with torch.enable_grad():
                p = {k: t.detach().requires_grad_(True) for k, t in self.params.items()}
                out = self.task_loss.outputs(p, self.x, mode="hvp")
                u = torch.zeros_like(out, requires_grad=True)
                jtu = torch.autograd.grad(out, [p[k] for k in self.spec.names], grad_outputs=u,
                                          create_graph=True)
                o = out.detach().requires_grad_(True)
                (lg,) = torch.autograd.grad(self.task_loss.per_task(o, self.y).sum(), [o],
                                            create_graph=True)
            self._ggn = (p, out, u, jtu, o, lg)
        return self._ggn


class _SymmetricProduct(torch.autograd.Function):
    """v -> H v for a symmetric H computed by `product` (a dict -> dict map that autograd cannot
    see through): the backward of a cotangent g is H g, itself differentiable in g."""

    @staticmethod
    def forward(ctx, product, names, *vs):
        ctx.product, ctx.names = product, names
        out = product(dict(zip(names, vs)))
        return tuple(out[k] for k in names)

    @staticmethod
    def backward(ctx, *gs):
        if torch.is_grad_enabled() and any(g.requires_grad for g in gs):
            hg = _SymmetricProduct.apply(ctx.product, ctx.names, *gs)
        else:
            out = ctx.product(dict(zip(ctx.names, gs)))
            hg = tuple(out[k] for k in ctx.names)
        return (None, None, *hg)


def _check_hvp_inputs(task_loss: TaskLoss, params_b, x_b, y_b) -> None:
    """make_hvp's arguments, each error naming the one at fault: params_b's keys are the model's,
    each leaf (M, *the parameter's shape) for x_b's M tasks, y_b with x_b's tasks and samples,
    x_b in the params' dtype."""
    if not isinstance(task_loss, TaskLoss):
        raise ValueError(f"make_hvp: task_loss must be a TaskLoss, got {type(task_loss).__name__}")
    for name, t in (("x_b", x_b), ("y_b", y_b)):
        if not isinstance(t, torch.Tensor) or t.dim() < 2:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"make_hvp: {name} must be a tensor (M, N, ...) of M tasks' N "
                             f"samples, got {got}")
    check_same_keys(params_b, task_loss.param_shapes, "make_hvp: params_b")
    M = x_b.shape[0]
    for k, shape in task_loss.param_shapes.items():
        t = params_b[k]
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (M, *shape):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"make_hvp: params_b[{k!r}] must be (M, *{tuple(shape)}) = "
                             f"{(M, *shape)} for x_b's M={M} tasks, got {got}")
        if x_b.is_floating_point() and t.dtype != x_b.dtype:
            raise ValueError(f"make_hvp: x_b must have the params' dtype {t.dtype} "
                             f"(params_b[{k!r}]), got {x_b.dtype}")
    if tuple(y_b.shape[:2]) != tuple(x_b.shape[:2]):
        raise ValueError(f"make_hvp: y_b must have x_b's (M, N) = {tuple(x_b.shape[:2])} tasks and "
                         f"samples first, got {tuple(y_b.shape)}")


def make_hvp(task_loss: TaskLoss, params_b: Mapping[str, torch.Tensor], x_b: torch.Tensor,
             y_b: torch.Tensor, kind: str = "exact", compile: bool = False) -> BatchedHVP:
    """The batched Hessian-vector product of `task_loss` at `params_b` on (x_b, y_b).

    Args:
        task_loss: the TaskLoss.
        params_b: dict of (M, ...) parameters (detached internally).
        x_b, y_b: the tasks' inputs (M, N, ...) and targets (M, N, ...).
        kind: "exact", "forward_over_reverse", "double_backward" or "ggn" (see BatchedHVP).
        compile: torch.compile the product (forward-over-reverse; see BatchedHVP).
    """
    return BatchedHVP(task_loss, params_b, x_b, y_b, kind, compile)


def hvp_single(loss_fn: Callable, params: Mapping[str, torch.Tensor], v: Mapping[str, torch.Tensor],
               *args) -> Params:
    """H v for one unbatched loss_fn(params, *args) -> scalar, by forward-over-reverse.

    vmap it over tasks with torch.func.vmap(partial(hvp_single, loss_fn), in_dims=(0, 0, 0, 0)).
    """
    return jvp(lambda p: grad(loss_fn)(p, *args), (dict(params),), (dict(v),))[1]


def shifted_operator(hvp: BatchedHVP, shift: float, scale: float) -> Callable:
    """The flat operator v -> shift * v + scale * H v on (M, P) buffers, for imaml_ext.cg."""
    def matvec(v: torch.Tensor) -> torch.Tensor:
        return hvp.flat(v).mul_(scale).add_(v, alpha=shift)
    return matvec
