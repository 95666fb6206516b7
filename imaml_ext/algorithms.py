"""iMAML (GD and Hessian-free inner solvers), MAML, first-order MAML and Reptile behind one
interface, every task of a meta-batch processed at once.

    algo = make_algorithm("imaml-gd", lam=2.0, inner_steps=16, inner_lr=0.1, cg_steps=5)
    grads, metrics = algo.meta_gradient(model, params, tasks)   # grads: dict like params
    adapted = algo.adapt(model, params, x_support, y_support)    # dict of (M, ...) params
    loss, acc = algo.evaluate(model, params, tasks)              # (M,) each

`model` is only used through functional_call semantics (its own parameters are ignored);
`params` is a dict name -> Tensor with the names and shapes of model.named_parameters().

Meta-gradients (the average over the ok tasks of the per-task g_i):
- imaml-gd / imaml-hf: g_i = ((1 + cg_damping) I + H_i / cg_lam)^-1 grad L_test_i(phi_i), phi_i
  from K GD steps on G_i (imaml-gd) or Newton-CG on G_i (imaml-hf), solved by `cg_steps` CG
  iterations. Defaults (cg_damping=0, cg_lam=lam): the paper's (I + H/lam). The authors' code:
  cg_damping=1, cg_lam=lam + 10. cg_steps=0: no solve, g_i = grad L_test_i(phi_i) (with
  adapt="head" the matrix is taken as I: the body still gets the support term
  -(1/lam) u^T dC/dtheta with u the head's query gradient, see imaml_ext.head_only).
- maml: d L_test_i(phi_K(theta)) / d theta by backpropagation through the K inner steps.
- fomaml: grad L_test_i(phi_K).
- reptile: theta - phi_K (plain SGD on L_train), so that an optimizer step with learning rate
  eps moves theta toward the adapted parameters: theta <- theta + eps * mean(phi_i - theta).

Head-only adaptation (adapt="head", imaml-gd and imaml-hf): the body's features are computed
once per meta-batch with the meta-parameters and only the linear softmax head is adapted, its
inner steps, Hessian products and CG on closed forms and the fused softmax-head kernels; the
body's meta-gradient comes from the implicit function theorem through the support features and
from the query features (imaml_ext.head_only states the math).

Inner objective: the iMAML variants minimise G_i = L_train_i + lam/2 ||phi - theta||^2. MAML,
first-order MAML and Reptile run plain GD on L_train unless `regularized=True`, which gives them
the same G (as in the paper's Fig. 2a, where MAML and iMAML share the exact meta-gradient).

Failure policy: a task whose inner or query loss, parameters or meta-gradient is non-finite, or
whose CG met NaN/Inf, is excluded from the average (metrics["task_ok"] False) and counted; if no
task is ok the meta-gradient is zero. A CG system meeting negative curvature keeps its last good
iterate (flagged in "cg_status" = 2 and "cg_negative_curvature") and stays in the average.
on_nonfinite="raise" raises FloatingPointError instead, naming the tasks. Cross-entropy labels
outside the head's classes are a ValueError where they are read on the host (CPU tensors, and
adapt / evaluate anywhere); meta_gradient on a GPU does not read them (a synchronisation per
step): it masks them, and such a task is excluded and counted the same way (metrics
"bad_labels"), instead of the device-side assert that would end the CUDA context.
"""
from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch import nn

from imaml_ext import reference
from imaml_ext.config import HEAD_ALGORITHMS, unused_fields
from imaml_ext.head_only import (ADAPT, HEAD_HVP, HeadModel, head_adapt, head_evaluate, head_gd,
                                 head_hessian_free, head_meta_gradient)
from imaml_ext.hvp import (BACKENDS, HVP_KINDS, LOSSES, ParamSpec, Params, TaskLoss,
                          check_no_dropout, grad_of_params, make_hvp)
from imaml_ext.linalg import finite_number, integer
from imaml_ext.implicit import (CapturedFunction, CapturedMetaGradient, implicit_meta_gradient,
                                implicit_meta_gradient_lstsq)
from imaml_ext.inner import PROXIMAL, batched_theta, gd, hessian_free, train_loss
from imaml_ext.types import TaskBatch

ALGORITHMS = ("imaml-gd", "imaml-hf", "maml", "fomaml", "reptile")
NO_CG = -1  # "cg_status" of algorithms that run no CG

_DEFAULT_STEPS = {"imaml-hf": 4}
_GD_DEFAULT_STEPS = 16


@dataclass(frozen=True)
class AlgorithmConfig:
    """Every setting of a MetaAlgorithm; see make_algorithm for their meaning."""

    name: str
    loss: str | Callable = "cross_entropy"
    lam: float = 2.0
    inner_steps: int | None = None  # make_algorithm's default for the name
    inner_lr: float = 0.1
    cg_steps: int = 5
    cg_damping: float = 0.0
    cg_lam: float | None = None
    hf_cg_steps: int = 5
    hvp: str = "exact"
    proximal: str = "paper"
    regularized: bool | None = None  # make_algorithm's default for the name
    use_ext: bool | None = None
    on_nonfinite: str = "skip"
    cg_rtol: float = 1e-10
    backend: str = "auto"
    adapt: str = "all"
    compile_hvp: bool = False
    cuda_graph: bool | str = False  # False, "solve" or "step"


CUDA_GRAPH = (False, True, "solve", "step")


def unused_options(name: str) -> tuple[str, ...]:
    """make_algorithm's options that `name` does not use: the implicit meta-gradient's (and the
    CG tolerance) for the baselines, the Newton-CG solver's for imaml-gd, the GD step size
    (inner_lr) for imaml-hf."""
    return unused_fields(name) + (() if name in HEAD_ALGORITHMS else ("cg_rtol",))


def options_for(name: str, **kwargs) -> dict:
    """kwargs less the options `name` does not use (unused_options), for code that builds
    several algorithms from one set of options: make_algorithm(name, **options_for(name, **kw))."""
    if name not in ALGORITHMS:
        raise ValueError(f"name must be one of {ALGORITHMS}, got {name!r}")
    drop = unused_options(name)
    if name not in HEAD_ALGORITHMS and not kwargs.get("regularized"):
        drop += ("lam",)  # plain GD on L_train: no proximal term
    return {k: v for k, v in kwargs.items() if k not in drop}


def make_algorithm(name: str, *, loss: str | Callable = "cross_entropy", lam: float = 2.0,
                   inner_steps: int | None = None, inner_lr: float = 0.1, cg_steps: int = 5,
                   cg_damping: float = 0.0, cg_lam: float | None = None, hf_cg_steps: int = 5,
                   hvp: str = "exact", proximal: str = "paper", regularized: bool | None = None,
                   use_ext: bool | None = None, on_nonfinite: str = "skip",
                   cg_rtol: float = 1e-10, backend: str = "auto",
                   adapt: str = "all", compile_hvp: bool = False,
                   cuda_graph: bool | str = False) -> "MetaAlgorithm":
    """Builds one of ALGORITHMS.

    Args:
        name: "imaml-gd", "imaml-hf", "maml", "fomaml" or "reptile".
        loss: "cross_entropy" (int64 labels), "mse", "half_mse" or a callable
            (outputs (M, N, ...), targets) -> per-sample losses (M, N).
        lam: proximal strength lam > 0 of G = L_train + lam/2 ||phi - theta||^2.
        inner_steps: GD steps K (default 16), or Newton iterations for imaml-hf (default 4).
        inner_lr: GD step size alpha (imaml-hf line-searches and takes none: a value other
            than the default is refused). With
            adapt="head", task i steps by min(inner_lr, 1 / (lam + L_i)), L_i a bound on its
            head Hessian's norm (imaml_ext.head_only.head_gd), so that G always decreases.
        cg_steps: CG iterations of the meta-gradient solve (iMAML; 0: no solve).
        cg_damping, cg_lam: solve ((1 + cg_damping) I + H / cg_lam) g = grad L_test; defaults
            0 and lam (the paper). The iMAML authors' code: cg_damping=1, cg_lam=lam + 10.
        hf_cg_steps: CG iterations per Newton direction (imaml-hf).
        hvp: Hessian products: "exact" (the exact Hessian by the fastest method, a reused
            double-backward graph; see imaml_ext.hvp.BatchedHVP), "forward_over_reverse",
            "double_backward", "ggn" (Gauss-Newton, PSD), or "lstsq" (imaml-gd with a bias-free
            nn.Linear(d, 1) and loss "half_mse": the fused least-squares CG op).
        proximal: "paper" (proximal term in every GD step) or "authors" (plain steps then one
            proximal step), for the regularized GD inner loops (imaml-gd, and maml / fomaml /
            reptile with regularized=True; elsewhere "authors" is a ValueError).
        regularized: whether maml/fomaml/reptile run GD on G (True) or on L_train (False, the
            default for them; iMAML always uses G).
        use_ext: compiled CG kernels (None: when available; False: the reference).
        on_nonfinite: "skip" (exclude and count bad tasks) or "raise".
        cg_rtol: CG relative tolerance; small so that exactly cg_steps iterations run.
        backend: batched model execution, "auto", "folded" or "vmap" (see imaml_ext.hvp).
        adapt: "all" (every parameter is adapted, the paper) or "head" (imaml-gd / imaml-hf
            only: the linear head alone is adapted on the body's features, ANIL-style; needs
            loss "cross_entropy", hvp "exact" or "ggn" (the same for a linear softmax head) and
            a ConvNet or an nn.Sequential ending in nn.Linear; see imaml_ext.head_only).
        compile_hvp: imaml-gd / imaml-hf, hvp "exact": the meta-gradient's CG products are
            torch.compile's forward-over-reverse HVP over all tasks (make_hvp(compile=True)),
            compiled on the first meta-step (35 s on an H100, about a minute on a 2-core CPU;
            again for new shapes). Measured on an H100 (Omniglot conv net, meta-batch 32,
            2026-11-28): 1.99x (5-way 1-shot) and 1.15x (20-way 5-shot) faster per CG product
            than the default, iMAML-GD 1.42x / 1.03x the tasks per second (before the pooled
            batch-norm kernels became CUDA's default); on the 2-core CPU 0.6-0.7x, so off by
            default. iMAML-HF's Newton steps keep "exact".
        cuda_graph: imaml-gd / imaml-hf on a GPU, adapt="all", hvp other than "lstsq".
            True or "solve": the meta-gradient's solve (the HVP's set-up at phi and the cg_steps
            CG iterations) runs as one CUDA graph, captured on the first meta-step and replayed
            after (again when the meta-batch's shapes change):
            imaml_ext.implicit.CapturedMetaGradient. "step": the whole per-task meta-gradient
            (inner solver, query gradient and solve, every task at once) as one CUDA graph
            (imaml_ext.implicit.CapturedFunction), so a meta-step is one launch and the mean
            over tasks. Needs CUDA tensors (ValueError otherwise). If a capture fails, a
            RuntimeWarning says why and the work runs eagerly from then on. On an H100
            (meta-batch 32) 1.41x / 4.20x ("solve" / "step") the default's tasks per second at
            5-way 1-shot, 1.01x / 1.02x at 20-way 5-shot; off by default until a GPU training
            run has used it.

    Raises:
        ValueError naming the argument; also for an option that `name` does not use (see
        unused_options; options_for(name, **kw) keeps the ones that apply).
    """
    if name not in ALGORITHMS:
        raise ValueError(f"name must be one of {ALGORITHMS}, got {name!r}")
    if not callable(loss) and loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES} or a callable, got {loss!r}")
    if not (finite_number(lam) and lam > 0):
        raise ValueError(f"lam must be a finite number > 0, got {lam!r}")
    if inner_steps is None:
        inner_steps = _DEFAULT_STEPS.get(name, _GD_DEFAULT_STEPS)
    if not integer(inner_steps) or inner_steps < 0:
        raise ValueError(f"inner_steps must be an int >= 0, got {inner_steps!r}")
    if not (finite_number(inner_lr) and inner_lr > 0):
        raise ValueError(f"inner_lr must be a finite number > 0, got {inner_lr!r}")
    if not integer(cg_steps) or cg_steps < 0:
        raise ValueError(f"cg_steps must be an int >= 0, got {cg_steps!r}")
    if not integer(hf_cg_steps) or hf_cg_steps < 1:
        raise ValueError(f"hf_cg_steps must be an int >= 1, got {hf_cg_steps!r}")
    inner_steps, cg_steps, hf_cg_steps = int(inner_steps), int(cg_steps), int(hf_cg_steps)
    if not (finite_number(cg_damping) and cg_damping >= 0):
        raise ValueError(f"cg_damping must be a finite number >= 0, got {cg_damping!r}")
    if cg_lam is not None and not (finite_number(cg_lam) and cg_lam > 0):
        raise ValueError(f"cg_lam must be None or a finite number > 0, got {cg_lam!r}")
    if not (finite_number(cg_rtol) and cg_rtol >= 0):
        raise ValueError(f"cg_rtol must be a finite number >= 0, got {cg_rtol!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if use_ext is not None and not isinstance(use_ext, bool):
        raise ValueError(f"use_ext must be None, True or False, got {use_ext!r}")
    if hvp not in HVP_KINDS + ("lstsq",):
        raise ValueError(f"hvp must be one of {HVP_KINDS + ('lstsq',)}, got {hvp!r}")
    if hvp == "lstsq" and name != "imaml-gd":
        raise ValueError("hvp='lstsq' is only for imaml-gd (a least-squares inner loss)")
    if hvp == "lstsq" and loss != "half_mse":
        raise ValueError(f"hvp='lstsq' is the Hessian of loss 'half_mse' (X^T X / n, a bias-free "
                         f"nn.Linear(d, 1)): it needs loss='half_mse', got {loss!r}")
    if proximal not in PROXIMAL:
        raise ValueError(f"proximal must be one of {PROXIMAL}, got {proximal!r}")
    if on_nonfinite not in ("skip", "raise"):
        raise ValueError(f"on_nonfinite must be 'skip' or 'raise', got {on_nonfinite!r}")
    if adapt not in ADAPT:
        raise ValueError(f"adapt must be one of {ADAPT}, got {adapt!r}")
    if adapt == "head":
        if name not in ("imaml-gd", "imaml-hf"):
            raise ValueError(f"adapt='head' is implemented for imaml-gd and imaml-hf, not {name!r}")
        if loss != "cross_entropy":
            raise ValueError(f"adapt='head' needs loss='cross_entropy' (a softmax head), got "
                             f"{loss!r}")
        if hvp not in HEAD_HVP:
            raise ValueError(f"adapt='head' takes hvp in {HEAD_HVP} (the head's Hessian comes "
                             f"from the fused softmax-head kernel), got {hvp!r}")
    if not isinstance(compile_hvp, bool):
        raise ValueError(f"compile_hvp must be a bool, got {compile_hvp!r}")
    if compile_hvp and (name not in ("imaml-gd", "imaml-hf") or adapt != "all"
                        or hvp not in ("exact", "forward_over_reverse")):
        raise ValueError("compile_hvp=True compiles the full network's forward-over-reverse "
                         "HVP: it needs name 'imaml-gd' or 'imaml-hf', adapt='all' and hvp "
                         f"'exact' or 'forward_over_reverse', got name={name!r}, "
                         f"adapt={adapt!r}, hvp={hvp!r}")
    if not any(cuda_graph is v or (isinstance(v, str) and cuda_graph == v) for v in CUDA_GRAPH):
        raise ValueError(f"cuda_graph must be False, True, 'solve' or 'step', got {cuda_graph!r}")
    cuda_graph = "solve" if cuda_graph is True else cuda_graph
    if cuda_graph and (name not in ("imaml-gd", "imaml-hf") or adapt != "all" or hvp == "lstsq"
                       or compile_hvp):
        raise ValueError(f"cuda_graph={cuda_graph!r} captures the full network's meta-gradient "
                         "work: it needs name 'imaml-gd' or 'imaml-hf', adapt='all', an hvp "
                         "other than 'lstsq' (whose whole solve is one op already) and "
                         f"compile_hvp=False, got name={name!r}, adapt={adapt!r}, hvp={hvp!r}, "
                         f"compile_hvp={compile_hvp!r}")
    if regularized is not None and not isinstance(regularized, bool):
        raise ValueError(f"regularized must be None, True or False, got {regularized!r}")
    if regularized is None:
        regularized = name.startswith("imaml")
    elif not regularized and name.startswith("imaml"):
        raise ValueError("regularized=False is not iMAML: its inner problem is G")
    if proximal != "paper" and (name == "imaml-hf" or not regularized):
        # an option that would change nothing: say so rather than run the same thing
        raise ValueError(f"proximal={proximal!r} changes where a GD inner loop applies the "
                         "proximal term, so it needs a regularized GD inner loop (imaml-gd, or "
                         "maml / fomaml / reptile with regularized=True); imaml-hf's Newton-CG "
                         f"minimises G itself. Got name={name!r}, regularized={regularized!r}")
    unused = {k: v for k, v in (("hvp", hvp), ("cg_steps", cg_steps), ("cg_damping", cg_damping),
                                ("cg_lam", cg_lam), ("hf_cg_steps", hf_cg_steps),
                                ("cg_rtol", cg_rtol), ("inner_lr", inner_lr))
              if k in unused_options(name) and v != _DEFAULTS[k]}
    if not regularized and lam != _DEFAULTS["lam"]:
        unused["lam"] = lam  # a plain GD inner loop on L_train has no proximal term
    if unused:
        # as the CLI: an option the algorithm would ignore is refused, not silently dropped
        what = "lam is the strength of the proximal term, which only regularized=True adds" \
            if list(unused) == ["lam"] else None
        what = what or {"imaml-gd": "the Newton-CG inner solver of imaml-hf",
                "imaml-hf": "the GD inner loop's step size; imaml-hf line-searches its Newton "
                            "steps"}.get(name, "the implicit meta-gradient of imaml-gd / imaml-hf")
        raise ValueError(
            f"{name} does not use {', '.join(f'{k}={v!r}' for k, v in unused.items())} ({what}): "
            "leave them at their defaults, or pass options_for(name, **kwargs), which keeps the "
            "options an algorithm takes")
    if regularized and name != "imaml-hf" and adapt == "all" and inner_steps > 0 \
            and inner_lr * lam >= 2:
        # the proximal term alone scales phi - theta by (1 - inner_lr lam) per step (the paper's
        # loop) or in the final step (the authors'): |1 - inner_lr lam| >= 1, no contraction
        raise ValueError(f"inner_lr * lam must be < 2 for a GD inner loop with the proximal "
                         f"term, got inner_lr={inner_lr!r} * lam={lam!r} = {inner_lr * lam:g}: "
                         f"each {'step' if proximal == 'paper' else 'final proximal step'} "
                         f"would scale phi - theta by 1 - inner_lr lam = {1 - inner_lr * lam:g} "
                         f"(the inner loop diverges or overshoots theta); lower inner_lr or lam")
    cfg = AlgorithmConfig(name=name, loss=loss, lam=float(lam), inner_steps=inner_steps,
                          inner_lr=float(inner_lr), cg_steps=cg_steps,
                          cg_damping=float(cg_damping),
                          cg_lam=None if cg_lam is None else float(cg_lam),
                          hf_cg_steps=hf_cg_steps, hvp=hvp, proximal=proximal,
                          regularized=bool(regularized), use_ext=use_ext,
                          on_nonfinite=on_nonfinite, cg_rtol=float(cg_rtol), backend=backend,
                          adapt=adapt, compile_hvp=compile_hvp, cuda_graph=cuda_graph)
    return _CLASSES[name](cfg, _checked=True)


_DEFAULTS = {k: p.default for k, p in inspect.signature(make_algorithm).parameters.items()}


# ---- input checks --------------------------------------------------------------------------------

def _stack(field, what: str) -> torch.Tensor:
    if isinstance(field, torch.Tensor):
        return field
    if isinstance(field, (list, tuple)) and field and all(isinstance(t, torch.Tensor)
                                                          for t in field):
        s0 = field[0].shape
        for i, t in enumerate(field):
            if t.shape != s0:
                raise ValueError(f"{what}: tasks of one batch must have equal shapes; task 0 is "
                                 f"{tuple(s0)}, task {i} is {tuple(t.shape)}")
        return torch.stack(list(field))
    raise ValueError(f"{what} must be a tensor (M, N, ...) or a list of per-task tensors")


def _first_last(model: nn.Module | None):
    """The model's first Conv2d, and its last leaf module if that is a Linear (the output
    layer whose out_features the labels index); None where there is none."""
    if model is None:
        return None, None
    mods = list(model.modules())
    conv = next((m for m in mods if isinstance(m, nn.Conv2d)), None)
    leaves = [m for m in mods if not any(True for _ in m.children())]
    head = leaves[-1] if leaves and isinstance(leaves[-1], nn.Linear) else None
    return conv, head


def _first_layer(model: nn.Module | None) -> nn.Module | None:
    """The first layer data meets where that is certain: an nn.Sequential's first module (a
    module's registration order need not be its call order); else None."""
    if isinstance(model, nn.Sequential) and len(model):
        return model[0]
    return None


def check_tasks(tasks, params: Mapping[str, torch.Tensor], loss,
                model: nn.Module | None = None, read_labels: bool = False) -> TaskBatch:
    """Validates a TaskBatch (or 4 per-task lists) against params (and, given the model, the
    images' channels against its first convolution and cross-entropy labels against its head's
    outputs: on the CPU, where reading them costs no device synchronisation, or anywhere with
    read_labels, one host read; meta_gradient masks them on a GPU instead, mask_bad_labels);
    returns a stacked TaskBatch."""
    if not isinstance(tasks, (TaskBatch, tuple, list)) or len(tasks) != 4:
        raise ValueError("tasks must be a TaskBatch(x_support, y_support, x_query, y_query)")
    names = ("x_support", "y_support", "x_query", "y_query")
    t = TaskBatch(*(_stack(f, f"tasks.{n}") for f, n in zip(tasks, names)))
    ref = next(iter(params.values()))
    M = t.x_support.shape[0] if t.x_support.dim() else 0
    if M == 0:
        raise ValueError("tasks.x_support must hold at least one task")
    for f, n in zip(t, names):
        if f.dim() < 2 or f.shape[0] != M:
            raise ValueError(f"tasks.{n} must be (M={M}, N, ...), got {tuple(f.shape)}")
        if f.device != ref.device:
            raise ValueError(f"tasks.{n} is on {f.device} but params are on {ref.device}")
    conv, head = _first_last(model)
    first = _first_layer(model)
    for xn, yn, x, y in (("x_support", "y_support", t.x_support, t.y_support),
                         ("x_query", "y_query", t.x_query, t.y_query)):
        if x.shape[1] != y.shape[1]:
            raise ValueError(f"tasks.{xn} has {x.shape[1]} samples per task but tasks.{yn} has "
                             f"{y.shape[1]}")
        if x.shape[1] == 0:
            raise ValueError(f"tasks.{xn} holds no samples (shape {tuple(x.shape)}): every task "
                             f"needs at least one support and one query sample")
        if isinstance(first, nn.Linear) and x.dim() == 2:
            raise ValueError(f"tasks.{xn} must be (M, N, features) for the model's first layer "
                             f"nn.Linear({first.in_features}, ...), got {tuple(x.shape)} (one "
                             f"feature per sample: add the last axis, x.unsqueeze(-1))")
        if loss == "cross_entropy" and y.dim() != 2:
            raise ValueError(f"tasks.{yn} must be (M, N) class labels for cross_entropy, got "
                             f"{tuple(y.shape)}")
        if isinstance(first, nn.Linear) and x.dim() == 3 and x.shape[-1] != first.in_features:
            raise ValueError(f"tasks.{xn} has {x.shape[-1]} features per sample (shape "
                             f"{tuple(x.shape)}), the model's first layer takes "
                             f"{first.in_features}")
        if x.dtype != ref.dtype:
            raise ValueError(f"tasks.{xn} is {x.dtype} but params are {ref.dtype}")
        if loss == "cross_entropy" and y.dtype != torch.int64:
            raise ValueError(f"tasks.{yn} must be int64 class labels for cross_entropy, got "
                             f"{y.dtype}")
        if loss in ("mse", "half_mse") and y.dtype != ref.dtype:
            # float64 targets with float32 params would make the losses float64
            raise ValueError(f"tasks.{yn} must be float targets of the params' dtype "
                             f"{ref.dtype} for {loss}, got {y.dtype}")
        if conv is not None and x.dim() == 5 and x.shape[2] != conv.in_channels:
            raise ValueError(f"tasks.{xn} has {x.shape[2]} channels per image (shape "
                             f"{tuple(x.shape)}), the model's first convolution takes "
                             f"{conv.in_channels}")
        if (head is not None and loss == "cross_entropy" and (y.device.type in HOST_LABELS
                                                              or read_labels)
                and y.numel() and not bool(((y >= 0) & (y < head.out_features)).all())):
            raise ValueError(f"tasks.{yn} holds labels in [{int(y.min())}, {int(y.max())}]; the "
                             f"model's head has {head.out_features} outputs, so labels must be "
                             f"in [0, {head.out_features - 1}]")
    return t


# Devices whose labels check_tasks reads on the host (free there); elsewhere meta_gradient masks
# out-of-range labels without a synchronisation (mask_bad_labels).
HOST_LABELS = ("cpu",)


def mask_bad_labels(t: TaskBatch, model: nn.Module, loss) -> tuple[TaskBatch, torch.Tensor | None]:
    """For cross-entropy on a device whose labels check_tasks did not read: (t with every label
    outside [0, classes) replaced by 0, (M,) bool: the tasks that had one), with no host
    synchronisation; (t, None) where there is nothing to mask. A GPU's cross-entropy kernel
    meets an out-of-range label with a device-side assert, which ends the process's CUDA
    context; masked, such a task is left out of the average and counted instead (metrics
    "bad_labels"), as a non-finite one is."""
    _, head = _first_last(model)
    if head is None or loss != "cross_entropy" or t.y_support.device.type in HOST_LABELS:
        return t, None
    C = head.out_features
    ok_s = (t.y_support >= 0) & (t.y_support < C)
    ok_q = (t.y_query >= 0) & (t.y_query < C)
    bad = ~(ok_s.reshape(ok_s.shape[0], -1).all(1) & ok_q.reshape(ok_q.shape[0], -1).all(1))
    t = t._replace(y_support=torch.where(ok_s, t.y_support, torch.zeros_like(t.y_support)),
                   y_query=torch.where(ok_q, t.y_query, torch.zeros_like(t.y_query)))
    return t, bad


def check_params(model: nn.Module, params: Mapping[str, torch.Tensor]) -> Params:
    """Validates params against model.named_parameters(); returns them detached."""
    if not isinstance(params, Mapping):
        raise ValueError(f"params must be a dict name -> Tensor, got {type(params).__name__}")
    want = {k: v.shape for k, v in model.named_parameters()}
    got = set(params)
    if got != set(want):
        raise ValueError(f"params does not match model.named_parameters(): missing "
                         f"{sorted(set(want) - got)[:5]}, unexpected {sorted(got - set(want))[:5]}")
    ref = None
    for k, v in params.items():
        if not isinstance(v, torch.Tensor) or not v.is_floating_point():
            raise ValueError(f"params[{k!r}] must be a floating-point tensor")
        if v.shape != want[k]:
            raise ValueError(f"params[{k!r}] has shape {tuple(v.shape)}, the model's parameter "
                             f"has {tuple(want[k])}")
        ref = ref if ref is not None else v
        if v.dtype != ref.dtype or v.device != ref.device:
            raise ValueError(f"params must share dtype and device; params[{k!r}] is {v.dtype} on "
                             f"{v.device}, others {ref.dtype} on {ref.device}")
    return {k: params[k].detach() for k in want}


# ---- the algorithms ------------------------------------------------------------------------------

class MetaAlgorithm:
    """Base class: meta_gradient, adapt, evaluate (see the module docstring)."""

    def __init__(self, config: AlgorithmConfig, *, _checked: bool = False):
        """Built by make_algorithm; a config made by hand is checked (and normalised) by
        make_algorithm's rules too, so that no setting an algorithm would refuse or ignore gets
        through this door."""
        if not _checked:
            if not isinstance(config, AlgorithmConfig):
                raise ValueError(f"config must be an AlgorithmConfig, got "
                                 f"{type(config).__name__}")
            d = {k: getattr(config, k) for k in AlgorithmConfig.__dataclass_fields__}
            name = d.pop("name")
            if name in _CLASSES and not isinstance(self, _CLASSES[name]):
                raise ValueError(f"{type(self).__name__} cannot run config.name {name!r} (that is "
                                 f"{_CLASSES[name].__name__}); use make_algorithm({name!r}, ...)")
            config = make_algorithm(name, **d).config
        self.config = config
        self._tl_cache: tuple[nn.Module, TaskLoss] | None = None
        self._hm_cache: tuple[nn.Module, HeadModel] | None = None
        # cuda_graph: the last capture (a CapturedMetaGradient for "solve", a CapturedFunction
        # and its TaskLoss for "step"), and whether a capture failed (then all runs eagerly)
        self._graph: CapturedMetaGradient | CapturedFunction | None = None
        self._graph_tl: TaskLoss | None = None
        self._graph_failed = False

    @property
    def name(self) -> str:
        return self.config.name

    def with_options(self, **changes) -> "MetaAlgorithm":
        """A copy with some settings changed (validated by make_algorithm)."""
        d = {k: getattr(self.config, k) for k in AlgorithmConfig.__dataclass_fields__}
        if changes.get("name", self.config.name) != self.config.name:
            # another algorithm: its own defaults for the settings whose default depends on it
            for k in ("inner_steps", "regularized"):
                d.pop(k)
            if changes["name"] not in HEAD_ALGORITHMS and not changes.get("regularized"):
                d.pop("lam")  # a plain baseline has no proximal term
        d.update(changes)
        name = d.pop("name")
        return make_algorithm(name, **d)

    def task_loss(self, model: nn.Module) -> TaskLoss:
        check_no_dropout(model)
        if self._tl_cache is None or self._tl_cache[0] is not model:
            self._tl_cache = (model, TaskLoss(model, self.config.loss, self.config.backend))
        return self._tl_cache[1]

    def head_model(self, model: nn.Module) -> HeadModel:
        """The model split into body and head (adapt="head"), cached per model."""
        check_no_dropout(model)
        if self._hm_cache is None or self._hm_cache[0] is not model:
            self._hm_cache = (model, HeadModel(model, self.config.backend))
        return self._hm_cache[1]

    def _head_inner(self, F, y, W0, b0):
        """adapt="head": the inner solver on the heads, (F (M, n, f), y (M, n), W0 (M, c, f),
        b0 (M, c)) -> imaml_ext.head_only.HeadInner."""
        raise NotImplementedError

    # -- the inner problem
    def _inner(self, tl: TaskLoss, theta_b, x, y, create_graph: bool = False,
               final_loss: bool = True):
        c = self.config
        lam = c.lam if c.regularized else 0.0
        return gd(tl, theta_b, x, y, steps=c.inner_steps, lr=c.inner_lr, lam=lam,
                  proximal=c.proximal, create_graph=create_graph, final_loss=final_loss)

    def adapt(self, model: nn.Module, params: Mapping[str, torch.Tensor],
              x_support: torch.Tensor, y_support: torch.Tensor) -> Params:
        """Test-time adaptation of every task: dict of (M, ...) adapted params (no graph)."""
        params = check_params(model, params)
        t = check_tasks(TaskBatch(x_support, y_support, x_support, y_support), params,
                        self.config.loss, model, read_labels=True)
        if self.config.adapt == "head":
            return head_adapt(self.head_model(model), params, t.x_support, t.y_support,
                              self._head_inner)
        tl = self.task_loss(model)
        theta_b = batched_theta(params, t.num_tasks)
        return {k: v.detach() for k, v in self._inner(tl, theta_b, t.x_support,
                                                       t.y_support).params.items()}

    def evaluate(self, model: nn.Module, params: Mapping[str, torch.Tensor], tasks):
        """Adapts on the support sets, then (query loss (M,), query accuracy (M,) or None for
        regression losses)."""
        params = check_params(model, params)
        t = check_tasks(tasks, params, self.config.loss, model, read_labels=True)
        if self.config.adapt == "head":
            return head_evaluate(self.head_model(model), params, t, self._head_inner)
        tl = self.task_loss(model)
        phi = self._inner(tl, batched_theta(params, t.num_tasks), t.x_support,
                          t.y_support).params
        with torch.no_grad():
            out = tl.outputs(phi, t.x_query)
            return tl.per_task(out, t.y_query), tl.accuracy(out, t.y_query)

    def meta_gradient(self, model: nn.Module, params: Mapping[str, torch.Tensor], tasks):
        """(grads dict like params, metrics dict of tensors); see the module docstring."""
        params = check_params(model, params)
        dtype = next(iter(params.values())).dtype if params else None
        if self.name in HEAD_ALGORITHMS and dtype not in (torch.float32, torch.float64, None):
            # the implicit solve's kernels (CG, the fused HVPs) take these two; said here, not
            # after the inner loop has run, by an op naming its internal arguments
            raise ValueError(f"params: {self.name} needs float32 or float64 parameters (its "
                             f"CG and HVP kernels), got {dtype}; maml / fomaml / reptile run "
                             f"in other floating dtypes")
        if dtype is not None and self.config.lam > torch.finfo(dtype).max:
            raise ValueError(f"lam={self.config.lam!r} is beyond {dtype}'s range (max "
                             f"{torch.finfo(dtype).max:.3g}), the dtype of params")
        t = check_tasks(tasks, params, self.config.loss, model)
        t, bad_labels = mask_bad_labels(t, model, self.config.loss)
        spec = ParamSpec.of(params, batched=False)
        if self.config.adapt == "head":
            c = self.config
            grads, finite, metrics = head_meta_gradient(
                self.head_model(model), params, t, self._head_inner, lam=c.lam,
                cg_steps=c.cg_steps, damping=c.cg_damping, cg_lam=c.cg_lam, rtol=c.cg_rtol,
                use_ext=c.use_ext)
            flat = spec.flatten(grads, "meta-gradient")
        else:
            tl = self.task_loss(model)
            if self.config.cuda_graph == "step":
                flat, finite, metrics = self._graph_step(tl, params, t, spec)
            else:
                flat, finite, metrics = self._per_task(tl, params, t, spec)
        if bad_labels is not None:
            finite = finite & ~bad_labels
            metrics["bad_labels"] = bad_labels
        return self._reduce(flat, finite, metrics, spec)

    def _graph_step(self, tl, params, t, spec):
        """cuda_graph="step": _per_task replayed from the capture for these shapes (made on
        first use), or run eagerly after a failed capture."""
        args = (dict(params), t)
        step = self._captured(
            lambda g: self._graph_tl is tl and g.matches(args),
            lambda: CapturedFunction(lambda p, tasks: self._per_task(tl, p, tasks, spec), args),
            "the meta-gradient")
        if step is None:
            return self._per_task(tl, params, t, spec)
        self._graph_tl = tl
        return step(args)

    def _captured(self, matches, build, what: str):
        """The capture of cuda_graph's work: the last one when matches(it), else a new one from
        build() (the old one's memory goes back first); None, with one RuntimeWarning, once a
        capture has failed (the work then runs eagerly)."""
        if self._graph_failed:
            return None
        if self._graph is not None and matches(self._graph):
            return self._graph
        self._graph = None
        try:
            self._graph = build()
        except RuntimeError as exc:
            self._graph_failed = True
            warnings.warn(f"{self.name}: cuda_graph={self.config.cuda_graph!r}: capturing {what} "
                          f"failed ({type(exc).__name__}: {str(exc)[:300]}); it runs eagerly "
                          "from now on", RuntimeWarning, stacklevel=4)
        return self._graph

    def _per_task(self, tl, params, t, spec):
        raise NotImplementedError

    # -- shared pieces
    def _query(self, tl, phi, t, metrics, with_grad: bool):
        """Query loss/accuracy into metrics; returns the query gradient dict when asked."""
        if with_grad:
            g, lq, out = tl.grad(phi, t.x_query, t.y_query)
        else:
            with torch.no_grad():
                out = tl.outputs(phi, t.x_query)
                lq = tl.per_task(out, t.y_query)
            g = None
        metrics["query_loss"] = lq.detach()
        acc = tl.accuracy(out.detach(), t.y_query)
        if acc is not None:
            metrics["query_acc"] = acc
        return g, lq

    def _reduce(self, flat: torch.Tensor, finite: torch.Tensor, metrics: dict, spec: ParamSpec):
        M = flat.shape[0]
        ok = finite & torch.isfinite(flat).all(1)
        if "cg_status" in metrics:
            ok &= metrics["cg_status"] != reference.NONFINITE
        n_ok = ok.sum()
        metrics["task_ok"] = ok
        metrics["num_ok"] = n_ok
        metrics["nonfinite"] = ~ok
        dev = flat.device
        metrics.setdefault("cg_residual", flat.new_zeros(M))
        metrics.setdefault("cg_iterations", torch.zeros(M, dtype=torch.int32, device=dev))
        metrics.setdefault("cg_status", torch.full((M,), NO_CG, dtype=torch.int32, device=dev))
        metrics.setdefault("cg_negative_curvature",
                           metrics["cg_status"] == reference.NEGATIVE_CURVATURE)
        if self.config.on_nonfinite == "raise" and not bool(ok.all()):
            bad = (~ok).nonzero().flatten().tolist()
            labels = ""
            if "bad_labels" in metrics and bool(metrics["bad_labels"].any()):
                lb = metrics["bad_labels"].nonzero().flatten().tolist()
                labels = (f"; tasks {lb[:10]} hold labels outside the head's classes (masked "
                          "on the device, never read by the loss)")
            raise FloatingPointError(f"{self.name}: {len(bad)} of {M} tasks non-finite "
                                     f"(tasks {bad[:10]}): inner loss, query loss, parameters or "
                                     f"CG met NaN/Inf{labels}")
        summed = torch.where(ok.unsqueeze(1), flat, torch.zeros_like(flat)).sum(0)
        mean = summed / n_ok.clamp(min=1).to(flat.dtype)
        return spec.unflatten_one(mean), metrics


class IMAMLGD(MetaAlgorithm):
    """iMAML with K GD steps on G as inner solver."""

    def _per_task(self, tl, params, t, spec):
        # L_train at phi_K comes from the HVP's graph below when it has one
        inner = self._inner(tl, batched_theta(params, t.num_tasks), t.x_support, t.y_support,
                            final_loss=not self._hvp_has_loss())
        return self._implicit(tl, inner, t, spec)

    def _head_inner(self, F, y, W0, b0):
        c = self.config
        return head_gd(F, y, W0, b0, lam=c.lam, steps=c.inner_steps, lr=c.inner_lr,
                       proximal=c.proximal)

    def _hvp_has_loss(self) -> bool:
        c = self.config
        return c.cg_steps > 0 and c.hvp in ("exact", "double_backward", "ggn")

    def _implicit(self, tl, inner, t, spec):
        c = self.config
        phi = inner.params
        finite = inner.finite
        loss_first = inner.metrics["loss_first"]
        metrics = {"inner_loss": inner.loss, "inner_loss_before": loss_first}
        metrics.update({k: v for k, v in inner.metrics.items() if k.startswith("hf_")})
        gq, lq = self._query(tl, phi, t, metrics, with_grad=True)
        b = ParamSpec.of(phi).flatten(gq)
        losses = None  # L_train at phi, from the double-backward product's graph
        if c.hvp == "lstsq":
            X = _lstsq_inputs(tl, t.x_support)
            x, res = implicit_meta_gradient_lstsq(X, b, lam=c.lam, cg_steps=c.cg_steps,
                                                  damping=c.cg_damping, cg_lam=c.cg_lam,
                                                  rtol=c.cg_rtol, use_ext=c.use_ext)
        else:
            solver = self._graph_solver(tl, phi, t, b) \
                if c.cuda_graph == "solve" and c.cg_steps > 0 else None
            if solver is not None:
                out, losses = solver(phi, t.x_support, t.y_support, b)
            else:
                H = None
                if c.cg_steps > 0:
                    H = make_hvp(tl, phi, t.x_support, t.y_support, c.hvp,
                                 compile=c.compile_hvp)
                    losses = H.losses()
                out = implicit_meta_gradient(tl, phi, t.x_support, t.y_support, b, lam=c.lam,
                                             cg_steps=c.cg_steps, damping=c.cg_damping,
                                             cg_lam=c.cg_lam, hvp=c.hvp if H is None else H,
                                             rtol=c.cg_rtol, use_ext=c.use_ext)
            x, res = out.flat, out.cg
        if inner.loss is None:
            inner_loss = losses if losses is not None else \
                train_loss(tl, phi, t.x_support, t.y_support)
            finite = finite & torch.isfinite(inner_loss)
            metrics["inner_loss"] = inner_loss
        if loss_first is None:
            metrics["inner_loss_before"] = metrics["inner_loss"]
        metrics["cg_residual"] = res.residual_norm
        metrics["cg_iterations"] = res.iterations
        metrics["cg_status"] = res.status
        metrics["cg_negative_curvature"] = res.status == reference.NEGATIVE_CURVATURE
        return x, finite & torch.isfinite(lq), metrics

    def _graph_solver(self, tl, phi, t, b) -> CapturedMetaGradient | None:
        """cuda_graph="solve": the capture for these shapes (made on first use), or None after
        a failed capture (then the solve runs eagerly)."""
        c = self.config
        return self._captured(
            lambda g: g.matches(tl, phi, t.x_support, t.y_support, b),
            lambda: CapturedMetaGradient(
                tl, phi, t.x_support, t.y_support, b, lam=c.lam, cg_steps=c.cg_steps,
                damping=c.cg_damping, cg_lam=c.cg_lam, hvp=c.hvp, rtol=c.cg_rtol,
                use_ext=c.use_ext),
            "the meta-gradient solve")


def _lstsq_inputs(tl: TaskLoss, x: torch.Tensor) -> torch.Tensor:
    m = tl.model
    if not (type(m) is nn.Linear and m.bias is None and m.out_features == 1
            and tl.loss == "half_mse" and x.dim() == 3):
        raise ValueError("hvp='lstsq' needs model = nn.Linear(d, 1, bias=False), loss='half_mse' "
                         "and x_support of shape (M, n, d)")
    return x


class IMAMLHF(IMAMLGD):
    """iMAML with Newton-CG (Hessian-free) as inner solver."""

    def _inner(self, tl, theta_b, x, y, create_graph: bool = False, final_loss: bool = True):
        c = self.config
        return hessian_free(tl, theta_b, x, y, lam=c.lam, steps=c.inner_steps,
                            cg_steps=c.hf_cg_steps, hvp=c.hvp, cg_rtol=c.cg_rtol,
                            use_ext=c.use_ext)

    def _per_task(self, tl, params, t, spec):
        inner = self._inner(tl, batched_theta(params, t.num_tasks), t.x_support, t.y_support)
        return self._implicit(tl, inner, t, spec)

    def _head_inner(self, F, y, W0, b0):
        c = self.config
        return head_hessian_free(F, y, W0, b0, lam=c.lam, steps=c.inner_steps,
                                 cg_steps=c.hf_cg_steps, cg_rtol=c.cg_rtol, use_ext=c.use_ext)


class MAML(MetaAlgorithm):
    """Backpropagation through the K inner GD steps (create_graph)."""

    def _per_task(self, tl, params, t, spec):
        M = t.num_tasks
        with torch.enable_grad():
            # A real (M, ...) leaf, so that each task's meta-gradient is its own block.
            theta_b = {k: v.unsqueeze(0).expand(M, *v.shape).clone().requires_grad_(True)
                       for k, v in params.items()}
            inner = self._inner(tl, theta_b, t.x_support, t.y_support, create_graph=True)
            out = tl.outputs(inner.params, t.x_query, mode="hvp")
            lq = tl.per_task(out, t.y_query)
            gs = grad_of_params(lq.sum(), {k: theta_b[k] for k in spec.names})
        metrics = {"inner_loss": inner.loss, "inner_loss_before": inner.metrics["loss_first"],
                   "query_loss": lq.detach()}
        acc = tl.accuracy(out.detach(), t.y_query)
        if acc is not None:
            metrics["query_acc"] = acc
        flat = torch.cat([g.reshape(M, -1) for g in gs], dim=1)
        return flat, inner.finite & torch.isfinite(lq.detach()), metrics


class FOMAML(MetaAlgorithm):
    """First-order MAML: grad L_test at phi_K."""

    def _per_task(self, tl, params, t, spec):
        inner = self._inner(tl, batched_theta(params, t.num_tasks), t.x_support, t.y_support)
        metrics = {"inner_loss": inner.loss, "inner_loss_before": inner.metrics["loss_first"]}
        gq, lq = self._query(tl, inner.params, t, metrics, with_grad=True)
        flat = ParamSpec.of(inner.params).flatten(gq)
        return flat, inner.finite & torch.isfinite(lq), metrics


class Reptile(MetaAlgorithm):
    """Reptile: direction theta - phi_K with phi_K from K plain SGD steps on L_train."""

    def _per_task(self, tl, params, t, spec):
        theta_b = batched_theta(params, t.num_tasks)
        inner = self._inner(tl, theta_b, t.x_support, t.y_support)
        metrics = {"inner_loss": inner.loss, "inner_loss_before": inner.metrics["loss_first"]}
        _, lq = self._query(tl, inner.params, t, metrics, with_grad=False)
        bspec = ParamSpec.of(theta_b)
        flat = bspec.flatten(theta_b) - bspec.flatten(inner.params)
        return flat, inner.finite & torch.isfinite(lq), metrics


_CLASSES = {"imaml-gd": IMAMLGD, "imaml-hf": IMAMLHF, "maml": MAML, "fomaml": FOMAML,
            "reptile": Reptile}

__all__ = ["ALGORITHMS", "AlgorithmConfig", "MetaAlgorithm", "make_algorithm", "check_params",
           "check_tasks", "NO_CG", "options_for", "unused_options"]
