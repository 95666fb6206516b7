"""The fused kernels (lstsq_apply, softmax_head_hvp) and the whole-loop CG ops (dense, least
squares, softmax head) against, in the same run: their pure-PyTorch reference twins
(imaml_ext.reference), torch.compile of the reference, the plain torch.func route for the HVPs
(jvp of grad of the loss, vmapped over systems), and for CG the peers torchopt's solve_cg,
linear_operator's linear_cg and scipy's cg per system. Every contender's answer is checked
against a float64 reference before it is timed (for CG: the reference's iterate after the same
ITERS iterations from the same x0, to CG_TOL, and the iterations it ran: its own count, or for
torchopt and linear_operator, which report none, its operator calls less the set-up one); times are medians of
torch.utils.benchmark.Timer.blocked_autorange (which synchronises CUDA). float32 throughout.

Also reported: the achieved bandwidth of the least-squares product and CG (bytes of X read per
product x products / time) against a copy's bandwidth measured in the same run, and each HVP's
cost relative to one gradient of the same loss (torch.func, vmapped). On CUDA the least-squares
rows also time each path forced beside the default's choice: the register-tiled product
(IMAML_CUDA_XTXV=tiles), the same fed by the copy engine (=bulk, opt-in) or prefetching its next
tile into L2 (=prefetch, opt-in), or the row kernel (=rows), and the CG step in the product kernel's
epilogue (IMAML_CUDA_CG_STEP=epilogue) or as launches of its own (=separate).

    python benchmarks/bench_kernels.py [--device cpu|cuda] [--quick] [--out results.json]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.utils.benchmark as tbench

import imaml_ext
from imaml_ext import ops, reference

ITERS = 20  # CG iterations, fixed (rtol = atol = 0) so every contender does the same work
LAM = 0.5   # (I + H / lam)

# The whole-loop CG rows' correctness bar: relative 2-norm error of x against the float64
# reference's iterate after the same ITERS iterations from x0 = 0. Measured on the 2-core CPU
# (2026-11-28) at every CG size below (and the quick ones): float32 rounding errs 8.7e-8 to 1.2e-6
# for imaml_ext, at most 1.2e-6 for the float32 reference and SciPy (and at the quick sizes at
# most 6.2e-7 for torchopt, linear_operator and the compiled reference); a run of 8 of the 20
# iterations errs 8.7e-4 to 4.9e-3 (the former bar of 1e-3 passed it at both dense sizes), except
# at the softmax head 32 x 100 x 64 x 20, which converges so fast that 8 iterations err 8.7e-7:
# there no bar tells a short run from rounding, only an iteration count does (the row says so;
# every CG contender's is checked, see counted()).
# 2e-5 leaves >= 16x either way elsewhere; it catches a stop after 11 iterations or fewer at the
# dense and least-squares sizes (after 15 at 1 x 4000 x 4000, 19 at the head 32 x 25 x 800 x 5).
CG_TOL = 2e-5
EARLY = 8  # each CG row records the float64 error of a run this short against the bar
# The single-pass ops (HVPs, the conv net's blocks): nothing to stop early; the former bar.
OP_TOL = 1e-3

LSTSQ = [(32, 50, 200), (32, 500, 2000), (1, 4000, 4000)]
HEAD = [(32, 100, 64, 20), (32, 25, 800, 5)]   # 20-way 5-shot Omniglot, 5-way 5-shot Mini-ImageNet
DENSE = [(32, 200), (4, 2000)]
QUICK_LSTSQ = [(32, 50, 200), (8, 250, 1000)]
QUICK_DENSE = [(32, 200)]


# ---- helpers ------------------------------------------------------------------------------------

sys.path.insert(0, str(Path(__file__).resolve().parent))
try:  # the shared machine description of benchmarks/common.py
    from common import environment as _environment
except ImportError:  # pragma: no cover - an older checkout without common.py
    _environment = None


def machine(device: str) -> dict:
    if _environment is not None:
        info = _environment(device)
        if device == "cuda":
            p = torch.cuda.get_device_properties(0)
            info["gpu"]["l2_MiB"] = round(getattr(p, "L2_cache_size", 0) / 2**20, 1)
        return info
    return _machine(device)


def _machine(device: str) -> dict:
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError, StopIteration, subprocess.SubprocessError):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        cpu = next(line.split(":", 1)[1].strip() for line in out.splitlines()
                   if line.startswith("Model name"))
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
            "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
            "cuda_runtime": torch.version.cuda, "imaml_ext": imaml_ext.build_info()}
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_sms=p.multi_processor_count,
                    gpu_memory_GiB=round(p.total_memory / 2**30, 1),
                    gpu_l2_MiB=round(getattr(p, "L2_cache_size", 0) / 2**20, 1),
                    cuda_driver=_driver_version())
    return info


def _driver_version() -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError, IndexError):
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout
        return out.strip().splitlines()[0]
    return None


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# On the CPU, idle threads of the pool the last contender used spin for 0.1-0.3 s (OpenBLAS's
# after SciPy's calls, torch's OpenMP after torch's; bench_cg.OTHER_POOL has the measurements):
# each contender's timing starts after they have stopped.
SETTLE_S = 0.3


def median_s(fn, device: str, min_run_time: float) -> float:
    """Median seconds per call after a settle (CPU) and a warm-up call (blocked_autorange, all
    CPU threads)."""
    if device != "cuda":
        time.sleep(SETTLE_S)
    fn()
    sync(device)
    timer = tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def copy_bandwidth(device: str) -> float:
    """Bytes read plus bytes written per second of a large same-device copy."""
    n = (1 << 28) if device == "cuda" else (1 << 25)  # 1 GiB / 128 MiB of float32
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    t = median_s(lambda: dst.copy_(src), device, 0.5)
    return 2 * src.numel() * src.element_size() / t


# The CUDA least-squares paths, each forced by its switch beside the default's choice: the product
# that holds rows in registers (xtxv_tiles_kernel, IMAML_CUDA_XTXV=tiles) or the row kernel
# (=rows), and the multi-launch CG step in the product kernel's epilogue (IMAML_CUDA_CG_STEP=
# epilogue) or as launches of its own (=separate). Until the H100 run of 2026-11-28 rows and
# separate were the defaults; now tiles (in the CG loop, and for a lone product above L2) and the
# epilogue are (csrc/cuda/cg_cuda.cu says why).
TILES = "imaml_ext register tiles"
BULK = "imaml_ext bulk copies"  # the tiles fed by the copy engine (IMAML_CUDA_XTXV=bulk, opt-in)
PREFETCH = "imaml_ext tiles, L2 prefetch"  # the tiles asking L2 for the next (=prefetch, opt-in)
ROWS = "imaml_ext row kernel"
STEP_EPILOGUE = "imaml_ext multi-launch, step epilogue"
ROWS_SEPARATE = "imaml_ext multi-launch, row kernel, separate step"
# gpu_suite.sh sets IMAML_BENCH_TILES=0 (IMAML_BENCH_STEP_EPILOGUE=0, ..._TILES=0) when the
# path's CUDA tests failed in the same run: a faulting kernel would end this process (a CUDA
# error poisons its context) and every row with it (the suite then also moves the defaults off
# it: IMAML_CUDA_XTXV=rows, IMAML_CUDA_CG_STEP=separate).
def gated(var: str, fn):
    """fn, or the reason its row is skipped when gpu_suite.sh's gate `var` is 0."""
    if os.environ.get(var, "1") != "0":
        return fn
    return f"skipped: {var}=0 (this path failed its CUDA tests in this run)"


def rel_err(x: torch.Tensor, truth: torch.Tensor) -> float:
    return ((x.double() - truth.double()).norm() / truth.double().norm().clamp_min(1e-300)).item()


class Solved:
    """A CG contender's answer: x and the iterations it reports having run (per system)."""

    def __init__(self, x: torch.Tensor, iterations):
        self.x, self.iterations = x, iterations


def solved(out) -> Solved:
    """Solved from an op's (x, iterations, residual norm, status)."""
    return Solved(out[0], out[1])


@contextlib.contextmanager
def env(name: str, value: str | None):
    old = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def run_contenders(row: dict, contenders: dict, truth, device: str, min_run_time: float) -> None:
    """Checks then times each contender into row['times_s'] / ['errors'] / ['skipped'].
    A contender given as a string is skipped with that string as the reason. The bar is
    row['tolerance'] (cg_check sets CG_TOL on the CG rows; OP_TOL where a row has none yet); a
    contender that returns a Solved is also skipped where it ran fewer than row['iterations']."""
    tol = row.setdefault("tolerance", OP_TOL)
    for name, fn in contenders.items():
        if isinstance(fn, str):
            row["skipped"][name] = fn
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t0 = time.perf_counter()
                out = fn()
                sync(device)
                first = time.perf_counter() - t0
                ran = None
                if isinstance(out, Solved):
                    out, ran = out.x, int(torch.as_tensor(out.iterations).min())
                    row.setdefault("iterations_run", {})[name] = ran
                err = max(rel_err(o, t) for o, t in zip(out, truth)) if isinstance(out, tuple) \
                    else rel_err(out, truth)
                row["errors"][name] = err
                if ran is not None and ran < row["iterations"]:
                    row["skipped"][name] = (f"ran {ran} of {row['iterations']} iterations (its "
                                            f"own count)")
                    continue
                if not err < tol:
                    row["skipped"][name] = (f"wrong answer: relative error {err:.2e} vs float64 "
                                            f"(bar {tol:.0e})")
                    continue
                if "compile" in name:
                    row.setdefault("first_call_s", {})[name] = first
                slow = max(0.3, 2 * min_run_time)
                second = None
                if first > slow and "compile" not in name:
                    # A slow contender: one more call is enough (and keeps --quick quick),
                    # unless the first was slow only for one-time set-up (torch.func's first
                    # call): then the median of many, as for the others
                    t0 = time.perf_counter()
                    fn()
                    sync(device)
                    second = time.perf_counter() - t0
                if second is not None and second > slow:
                    row["times_s"][name] = second
                    row.setdefault("single_call", []).append(name)
                else:
                    row["times_s"][name] = median_s(fn, device, min_run_time)
        except Exception as exc:  # a peer that fails to import or run is recorded, not fatal
            row["skipped"][name] = f"{type(exc).__name__}: {exc}"[:300]
    base = row["times_s"].get("imaml_ext")
    if base:
        row["ratio_to_imaml_ext"] = {k: v / base for k, v in row["times_s"].items()}


def try_compile(fn, device: str, quick: bool):
    """torch.compile(fn), or the reason it is skipped."""
    if quick and device == "cpu":
        return "skipped in --quick: inductor takes ~5-20 s per shape on CPU"
    # AOTAutograd donates the saved buffers of a compiled graph to its backward by default, which
    # forbids the second backward that the double-backward HVP rows take through it.
    import torch._functorch.config as functorch_config  # noqa: PLC0415
    functorch_config.donated_buffer = False
    try:
        return torch.compile(fn)
    except Exception as exc:
        return f"torch.compile failed: {type(exc).__name__}: {exc}"[:300]


# ---- the HVPs ---------------------------------------------------------------------------------

def lstsq_loss(w, X, y):
    return 0.5 * ((X @ w - y) ** 2).mean()


def func_lstsq_hvp(X, y, w, v):
    def one(X, y, w, v):
        return torch.func.jvp(lambda w: torch.func.grad(lstsq_loss)(w, X, y), (w,), (v,))[1]
    return torch.func.vmap(one)(X, y, w, v)


def func_lstsq_grad(X, y, w):
    return torch.func.vmap(torch.func.grad(lstsq_loss))(w, X, y)


def head_loss(W, b, F, y):
    return torch.nn.functional.cross_entropy(F @ W.T + b, y)


def func_head_hvp(F, y, W, b, V, vb):
    def one(F, y, W, b, V, vb):
        g = torch.func.grad(head_loss, argnums=(0, 1))
        return torch.func.jvp(lambda W, b: g(W, b, F, y), (W, b), (V, vb))[1]
    return torch.func.vmap(one)(F, y, W, b, V, vb)


def func_head_grad(F, y, W, b):
    return torch.func.vmap(torch.func.grad(head_loss, argnums=(0, 1)))(W, b, F, y)


def bench_hvps(device, quick, min_run_time, bandwidth):
    rows = []
    compiled_lstsq = try_compile(reference.lstsq_apply, device, quick)
    for B, n, d in (QUICK_LSTSQ if quick else LSTSQ):
        g = torch.Generator().manual_seed(B * n + d)
        X = torch.randn(B, n, d, generator=g).to(device)
        v = torch.randn(B, d, generator=g).to(device)
        w = torch.randn(B, d, generator=g).to(device)
        y = torch.randn(B, n, generator=g).to(device)
        truth = reference.lstsq_apply(X.double(), v.double(), 0.0, 1.0 / n)
        row = {"op": "lstsq_apply", "B": B, "n": n, "d": d, "times_s": {}, "errors": {},
               "skipped": {}}
        run_contenders(row, {
            "imaml_ext": lambda: ops.lstsq_apply(X, v, 0.0, 1.0 / n, use_ext=True),
            "reference": lambda: reference.lstsq_apply(X, v, 0.0, 1.0 / n),
            "torch.compile(reference)": compiled_lstsq if isinstance(compiled_lstsq, str)
            else (lambda: compiled_lstsq(X, v, 0.0, 1.0 / n)),
            "torch.func jvp(grad)": lambda: func_lstsq_hvp(X, y, w, v),
        }, truth, device, min_run_time)
        if device == "cuda":
            lone = lambda: ops.lstsq_apply(X, v, 0.0, 1.0 / n, use_ext=True)  # noqa: E731
            with env("IMAML_CUDA_XTXV", "tiles"):
                run_contenders(row, {TILES: gated("IMAML_BENCH_TILES", lone)}, truth, device,
                               min_run_time)
            with env("IMAML_CUDA_XTXV", "rows"):
                run_contenders(row, {ROWS: lone}, truth, device, min_run_time)
            with env("IMAML_CUDA_XTXV", "bulk"):
                run_contenders(row, {BULK: gated("IMAML_BENCH_BULK", lone)}, truth, device,
                               min_run_time)
            with env("IMAML_CUDA_XTXV", "prefetch"):
                run_contenders(row, {PREFETCH: gated("IMAML_BENCH_PREFETCH", lone)}, truth,
                               device, min_run_time)
        t_grad = median_s(lambda: func_lstsq_grad(X, y, w), device, min_run_time)
        hvp_vs_grad(row, t_grad)
        row["bytes_read"] = X.numel() * X.element_size()
        add_bandwidth(row, bandwidth, row["bytes_read"], device)
        rows.append(row)
        print_row(row, f"lstsq_apply  B={B} n={n} d={d}")
    compiled_head = try_compile(reference.softmax_head_hvp, device, quick)
    for B, n, f, c in HEAD:
        g = torch.Generator().manual_seed(B * n + f + c)
        F = torch.randn(B, n, f, generator=g).to(device)
        W = (torch.randn(B, c, f, generator=g) / f ** 0.5).to(device)
        b = torch.randn(B, c, generator=g).to(device)
        V = torch.randn(B, c, f, generator=g).to(device)
        vb = torch.randn(B, c, generator=g).to(device)
        y = torch.randint(0, c, (B, n), generator=g).to(device)
        truth = reference.softmax_head_hvp(F.double(), W.double(), b.double(), V.double(),
                                           vb.double(), 0.0, 1.0)
        row = {"op": "softmax_head_hvp", "B": B, "n": n, "f": f, "c": c, "times_s": {},
               "errors": {}, "skipped": {}}
        run_contenders(row, {
            "imaml_ext": lambda: ops.softmax_head_hvp(F, W, b, V, vb, 0.0, 1.0, use_ext=True),
            "reference": lambda: reference.softmax_head_hvp(F, W, b, V, vb, 0.0, 1.0),
            "torch.compile(reference)": compiled_head if isinstance(compiled_head, str)
            else (lambda: compiled_head(F, W, b, V, vb, 0.0, 1.0)),
            "torch.func jvp(grad)": lambda: func_head_hvp(F, y, W, b, V, vb),
        }, truth, device, min_run_time)
        t_grad = median_s(lambda: func_head_grad(F, y, W, b), device, min_run_time)
        hvp_vs_grad(row, t_grad)
        row["bytes_read"] = F.numel() * F.element_size()
        rows.append(row)
        print_row(row, f"softmax_head_hvp  B={B} n={n} f={f} c={c}")
    return rows


# The conv net's batch-norm / ReLU / max-pool block as a 5-way 1-shot chunk folds it (8 tasks x 64
# channels, 5 images) at its first two blocks, and as a 20-way 5-shot task (100 images).
BLOCKS = [(5, 512, 28, 28), (5, 512, 14, 14), (100, 64, 28, 28)]


def bench_blocks(device, quick, min_run_time):
    """bn_relu_pool forward + backward (the first-order path of the conv net on the CPU) against
    its reference twin (ATen's batch_norm, max_pool2d, relu) and torch.compile of that twin."""
    rows = []
    if device != "cpu":
        print("\nbn_relu_pool: CPU only (on a GPU the conv net uses cuDNN's kernels)")
        return rows

    def fwd_bwd(block):
        def run(h, w, b, g):
            h, w, b = (t.detach().requires_grad_(True) for t in (h, w, b))
            out = block(h, w, b)
            return (out.detach(), *torch.autograd.grad(out, (h, w, b), g))
        return run

    ref = lambda h, w, b: reference.bn_relu_pool(h, w, b, 1e-5)  # noqa: E731
    compiled = try_compile(ref, device, quick)
    for N, C, H, W in BLOCKS[:2] if quick else BLOCKS:
        g = torch.Generator().manual_seed(N * C + H)
        h = torch.randn(N, C, H, W, generator=g).contiguous(memory_format=torch.channels_last)
        w, b = torch.randn(C, generator=g), torch.randn(C, generator=g)
        go = torch.randn(N, C, H // 2, W // 2, generator=g).contiguous(
            memory_format=torch.channels_last)
        truth = fwd_bwd(ref)(h.double(), w.double(), b.double(), go.double())
        row = {"op": "bn_relu_pool fwd+bwd", "N": N, "C": C, "H": H, "W": W, "times_s": {},
               "errors": {}, "skipped": {}}
        run_contenders(row, {
            "imaml_ext": lambda: fwd_bwd(
                lambda h, w, b: ops.bn_relu_pool(h, w, b, 1e-5, use_ext=True))(h, w, b, go),
            "reference": lambda: fwd_bwd(ref)(h, w, b, go),
            "torch.compile(reference)": compiled if isinstance(compiled, str)
            else (lambda: fwd_bwd(compiled)(h, w, b, go)),
        }, truth, device, min_run_time)
        row["bytes"] = h.numel() * h.element_size()
        rows.append(row)
        print_row(row, f"bn_relu_pool fwd+bwd  N={N} C={C} H={H} W={W}")
    return rows


# The first block with the tasks folded into channels: 5-way 1-shot support sets (32 tasks,
# 5 images) and one 20-way 5-shot task (100 images), 64 filters, 28x28 gray-scale images.
FIRST_BLOCKS = [(5, 32, 64), (100, 1, 64)]


def bench_first_block(device, quick, min_run_time):
    """The first block relu(max_pool2d(batch_norm(conv1ch(x)), 2)): forward + backward of the
    fused first-order kernel, and one double-backward product through the second-order form,
    each against the reference twin (ATen's grouped conv2d, batch_norm, max_pool2d, relu) and
    torch.compile of it."""
    rows = []
    if device != "cpu":
        print("\nconv1ch_bn_relu_pool: CPU only (on a GPU the conv net uses cuDNN's kernels)")
        return rows

    def first_order(block):
        def run(x, cb, p, g):
            p = [t.detach().requires_grad_(True) for t in p]
            out = block(x, p[0], cb, p[1], p[2])
            return (out.detach(), *torch.autograd.grad(out, p, g))
        return run

    def second_order(block):
        def run(x, cb, p, g, v):
            p = [t.detach().requires_grad_(True) for t in p]
            first = torch.autograd.grad((block(x, p[0], cb, p[1], p[2]) * g).sum(), p,
                                        create_graph=True)
            return torch.autograd.grad(first, p, v)
        return run

    # differentiated with respect to (conv weight, batch-norm weight and bias); the conv bias,
    # whose gradient is 0 before batch norm (rounding noise), is held fixed
    s, pd = (1, 1), (1, 1)
    ref = lambda x, cw, cb, bw, bb: reference.conv1ch_bn_relu_pool(  # noqa: E731
        x, cw, cb, bw, bb, s, pd, 1e-5)
    compiled = try_compile(ref, device, quick)
    for N, G, C in FIRST_BLOCKS[:1] if quick else FIRST_BLOCKS:
        gen = torch.Generator().manual_seed(N * G + C)
        x = torch.rand(N, G, 28, 28, generator=gen)
        cb = torch.randn(G * C, generator=gen)
        p = [torch.randn(G * C, 1, 3, 3, generator=gen) / 3,
             torch.rand(G * C, generator=gen) + 0.5, torch.randn(G * C, generator=gen)]
        go = torch.randn(N, G * C, 14, 14, generator=gen).contiguous(
            memory_format=torch.channels_last)
        v = [torch.randn(t.shape, generator=gen) for t in p]
        pdbl, vdbl = [t.double() for t in p], [t.double() for t in v]
        for kind, run, args, truth_args in (
                ("fwd+bwd", first_order, (x, cb, p, go),
                 (x.double(), cb.double(), pdbl, go.double())),
                ("one double-backward HVP", second_order, (x, cb, p, go, v),
                 (x.double(), cb.double(), pdbl, go.double(), vdbl))):
            ext = (lambda *a: ops.conv1ch_bn_relu_pool(*a, s, pd, 1e-5, use_ext=True)) \
                if kind == "fwd+bwd" else \
                (lambda *a: ops.conv1ch_bn_relu_pool_hvp(*a, s, pd, 1e-5))
            truth = run(ref)(*truth_args)
            row = {"op": f"conv1ch_bn_relu_pool {kind}", "N": N, "C": G * C, "H": 28, "W": 28,
                   "times_s": {}, "errors": {}, "skipped": {}}
            run_contenders(row, {
                "imaml_ext": lambda run=run, ext=ext, args=args: run(ext)(*args),
                "reference": lambda run=run, args=args: run(ref)(*args),
                "torch.compile(reference)": compiled if isinstance(compiled, str)
                else (lambda run=run, args=args: run(compiled)(*args)),
            }, truth, device, min_run_time)
            rows.append(row)
            print_row(row, f"conv1ch_bn_relu_pool {kind}  N={N} groups={G} C={C} 28x28")
    return rows


# The conv net's 3x3 layers on the CPU: one 20-way 5-shot task at the 14x14 and 7x7 layers, and
# 32 folded 5-way 1-shot tasks (groups) at the 14x14 layer; 64 -> 64 channels.
CONV3X3 = [(100, 1, 14), (100, 1, 7), (5, 32, 14)]


def bench_conv3x3(device, quick, min_run_time):
    """The Winograd convolution (ops.conv3x3): forward + input and weight gradients against the
    reference twin (ATen's convolution, channels-last, as the conv net runs it) and
    torch.compile of the twin."""
    rows = []
    if device != "cpu":
        print("\nconv3x3 (Winograd): CPU only (on a GPU the conv net uses cuDNN's kernels)")
        return rows

    def fwd_bwd(conv):
        def run(x, w, b, g, groups):
            x, w, b = (t.detach().requires_grad_(True) for t in (x, w, b))
            out = conv(x, w, b, groups)
            return (out.detach(), *torch.autograd.grad(out, (x, w, b), g))
        return run

    ref = reference.conv3x3
    compiled = try_compile(ref, device, quick)
    for N, G, H in CONV3X3[:1] if quick else CONV3X3:
        gen = torch.Generator().manual_seed(N * G + H)
        cl = torch.channels_last
        x = torch.randn(N, G * 64, H, H, generator=gen).contiguous(memory_format=cl)
        w = torch.randn(G * 64, 64, 3, 3, generator=gen) / 24
        b = torch.randn(G * 64, generator=gen)
        go = torch.randn(N, G * 64, H, H, generator=gen).contiguous(memory_format=cl)
        truth = fwd_bwd(ref)(x.double(), w.double(), b.double(), go.double(), G)
        row = {"op": "conv3x3 (Winograd) fwd+bwd", "N": N, "C": G * 64, "H": H, "W": H,
               "times_s": {}, "errors": {}, "skipped": {}}
        run_contenders(row, {
            "imaml_ext": lambda: fwd_bwd(
                lambda *a: ops.conv3x3(*a, use_ext=True))(x, w, b, go, G),
            "reference": lambda: fwd_bwd(ref)(x, w, b, go, G),
            "torch.compile(reference)": compiled if isinstance(compiled, str)
            else (lambda: fwd_bwd(compiled)(x, w, b, go, G)),
        }, truth, device, min_run_time)
        rows.append(row)
        print_row(row, f"conv3x3 (Winograd) fwd+bwd  N={N} groups={G} 64->64 {H}x{H}")
    return rows


def hvp_vs_grad(row, t_grad):
    row["gradient_s"] = t_grad
    row["hvp_over_gradient"] = {k: v / t_grad for k, v in row["times_s"].items()}


# ---- whole-loop CG ----------------------------------------------------------------------------

def counted(fn):
    """fn, and a list whose item counts its calls (a peer that reports no iteration count: both
    torchopt's solve_cg and linear_operator's linear_cg apply the operator once to set up,
    r0 = b - A x0, then once an iteration; checked against their max_iter when this was written)."""
    calls = [0]

    def wrapped(*args):
        calls[0] += 1
        return fn(*args)
    return wrapped, calls


def torchopt_cg(matvec1, b):
    """torchopt's solve_cg, one system at a time (its dot products span the whole pytree)."""
    from torchopt.linear_solve import solve_cg
    solve = solve_cg(maxiter=ITERS, rtol=0.0, atol=0.0)
    out, iters = [], []
    for i in range(b.shape[0]):
        mv, calls = counted(lambda v, i=i: matvec1(i, v))
        out.append(solve(mv, b[i]))
        iters.append(calls[0] - 1)
    return Solved(torch.stack(out), iters)


def linear_operator_cg(matvec, b):
    from linear_operator.utils import linear_cg
    mv, calls = counted(lambda V: matvec(V.squeeze(-1)).unsqueeze(-1))
    x = linear_cg(mv, b.unsqueeze(-1), max_iter=ITERS, tolerance=0.0, eps=0.0,
                  stop_updating_after=0.0, max_tridiag_iter=0)
    return Solved(x.squeeze(-1), [calls[0] - 1])


def scipy_cg(matvec1, b, device):
    import numpy as np
    from scipy.sparse.linalg import LinearOperator, cg
    out, iters = [], []
    for i in range(b.shape[0]):
        P = b.shape[1]

        def mv(v, i=i):
            t = torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)).to(device)
            return matvec1(i, t).cpu().numpy()
        op = LinearOperator((P, P), matvec=mv, dtype=np.float32)
        ran = [0]  # counted by cg's per-iteration callback
        x, _ = cg(op, b[i].cpu().numpy(), rtol=0.0, atol=0.0, maxiter=ITERS,
                  callback=lambda _x, ran=ran: ran.__setitem__(0, ran[0] + 1))
        out.append(torch.from_numpy(x))
        iters.append(ran[0])
    return Solved(torch.stack(out).to(device), iters)


def cg_peers(matvec, matvec1, b, device, skip_scipy: str | None = None):
    return {
        "torchopt solve_cg (per system)": lambda: torchopt_cg(matvec1, b),
        "linear_operator linear_cg": lambda: linear_operator_cg(matvec, b),
        "scipy cg (per system)": skip_scipy or (lambda: scipy_cg(matvec1, b, device)),
    }


# --no-compile-cg (gpu_suite.sh): the whole-loop CG references are not compiled. On a GPU
# nothing breaks their graph, so Inductor takes all ITERS iterations at once, per shape: too long
# for a lent card's few minutes.
COMPILE_CG = {"on": True}


def compiled_call(fn, device, quick, *args):
    """A contender that calls torch.compile(fn)(*args), or the reason it is skipped. For the
    whole-loop CG references: Dynamo traces their ITERS iterations (on the CPU the reference's
    early-exit test breaks the graph at each, and the iteration function compiles once:
    1-4 s on the 2-core CPU at the small sizes, 2026-11-27)."""
    if not COMPILE_CG["on"]:
        return "not compiled: --no-compile-cg"
    compiled = try_compile(fn, device, quick)
    return compiled if isinstance(compiled, str) else (lambda: solved(compiled(*args)))


def cg_check(row: dict, solve64) -> torch.Tensor:
    """The truth for a CG row, solve64(ITERS): the float64 reference's x after ITERS iterations
    from the contenders' x0. Sets row's bar (CG_TOL) and records how far solve64(EARLY) lands
    from it, and whether the bar catches a run that short."""
    truth = solve64(ITERS)
    early = rel_err(solve64(EARLY), truth)
    row["tolerance"] = CG_TOL
    row["check"] = {"truth": f"float64 reference, the same {ITERS} iterations from x0 = 0",
                    f"error_after_{EARLY}_iterations": early,
                    f"bar_catches_{EARLY}_iterations": early >= CG_TOL}
    return truth


def bench_cg(device, quick, min_run_time, bandwidth):
    rows = []
    x0s = {}

    def zeros(b):
        return x0s.setdefault(tuple(b.shape), torch.zeros_like(b))

    for B, P in (QUICK_DENSE if quick else DENSE):
        g = torch.Generator().manual_seed(B + P)
        Xg = torch.randn(B, 2 * P, P, generator=g)
        A = (torch.eye(P) + Xg.transpose(1, 2) @ Xg / (2 * P * LAM)).to(device)
        b = torch.randn(B, P, generator=g).to(device)
        row = {"op": "cg_solve_dense", "B": B, "P": P, "iterations": ITERS, "times_s": {},
               "errors": {}, "skipped": {}}
        truth = cg_check(row, lambda k, A=A, b=b: reference.cg_solve_dense(
            A.double(), b.double(), zeros(b).double(), k, 0.0, 0.0)[0])

        def mv(v, A=A):
            return torch.bmm(A, v.unsqueeze(-1)).squeeze(-1)

        def mv1(i, v, A=A):
            return A[i] @ v
        run_contenders(row, {
            "imaml_ext": lambda: solved(ops.cg_solve_dense(A, b, zeros(b), ITERS, 0.0, 0.0,
                                                           use_ext=True)),
            "reference": lambda: solved(reference.cg_solve_dense(A, b, zeros(b), ITERS, 0.0,
                                                                 0.0)),
            "torch.compile(reference)": compiled_call(
                lambda A, b, x0: reference.cg_solve_dense(A, b, x0, ITERS, 0.0, 0.0),
                device, quick, A, b, zeros(b)),
            **cg_peers(mv, mv1, b, device),
        }, truth, device, min_run_time)
        add_paths(row, device, truth, min_run_time,
                  lambda: solved(ops.cg_solve_dense(A, b, zeros(b), ITERS, 0.0, 0.0,
                                                    use_ext=True)))
        row["bytes_read_per_iteration"] = A.numel() * A.element_size()
        add_bandwidth(row, bandwidth, row["bytes_read_per_iteration"] * ITERS, device)
        rows.append(row)
        print_row(row, f"cg_solve_dense  B={B} P={P}  ({ITERS} iterations)")

    for B, n, d in (QUICK_LSTSQ if quick else LSTSQ):
        g = torch.Generator().manual_seed(B * n + d)
        X = torch.randn(B, n, d, generator=g).to(device)
        b = torch.randn(B, d, generator=g).to(device)
        scale = 1.0 / (n * LAM)
        row = {"op": "cg_solve_lstsq", "B": B, "n": n, "d": d, "iterations": ITERS,
               "times_s": {}, "errors": {}, "skipped": {}}
        truth = cg_check(row, lambda k, X=X, b=b, scale=scale: reference.cg_solve_lstsq(
            X.double(), b.double(), zeros(b).double(), 1.0, scale, k, 0.0, 0.0)[0])
        Xt = X.transpose(1, 2)

        def mv(v, X=X, Xt=Xt, scale=scale):
            return v + scale * torch.bmm(Xt, torch.bmm(X, v.unsqueeze(-1))).squeeze(-1)

        def mv1(i, v, X=X, scale=scale):
            return v + scale * (X[i].T @ (X[i] @ v))
        big = B * n * d > 4_000_000 and device == "cpu"
        run_contenders(row, {
            "imaml_ext": lambda: solved(ops.cg_solve_lstsq(X, b, zeros(b), 1.0, scale, ITERS,
                                                           0.0, 0.0, use_ext=True)),
            "reference": lambda: solved(reference.cg_solve_lstsq(X, b, zeros(b), 1.0, scale,
                                                                 ITERS, 0.0, 0.0)),
            "torch.compile(reference)": compiled_call(
                lambda X, b, x0, scale: reference.cg_solve_lstsq(X, b, x0, 1.0, scale, ITERS, 0.0,
                                                                 0.0),
                device, quick, X, b, zeros(b), scale),
            **cg_peers(mv, mv1, b, device),
        }, truth, device, 0.3 if big else min_run_time)
        add_paths(row, device, truth, min_run_time,
                  lambda: solved(ops.cg_solve_lstsq(X, b, zeros(b), 1.0, scale, ITERS, 0.0, 0.0,
                                                    use_ext=True)))
        if device == "cuda":
            solve = (lambda: solved(ops.cg_solve_lstsq(X, b, zeros(b), 1.0, scale, ITERS, 0.0,
                                                       0.0, use_ext=True)))
            # The multi-launch loop with each product kernel and step placement forced: the row
            # kernel with separate steps (the defaults before 2026-11-28), tiles alone, the
            # epilogue (one launch per iteration: the CG step in the product kernel's last block
            # per system) alone, and both (today's default there).
            with env("IMAML_CG_FUSED", "0"), env("IMAML_CUDA_XTXV", "rows"), \
                    env("IMAML_CUDA_CG_STEP", "separate"):
                run_contenders(row, {ROWS_SEPARATE: solve}, truth, device, min_run_time)
            with env("IMAML_CG_FUSED", "0"), env("IMAML_CUDA_XTXV", "tiles"), \
                    env("IMAML_CUDA_CG_STEP", "separate"):
                run_contenders(row, {"imaml_ext multi-launch, " + TILES:
                                     gated("IMAML_BENCH_TILES", solve)},
                               truth, device, min_run_time)
            with env("IMAML_CG_FUSED", "0"), env("IMAML_CUDA_CG_STEP", "epilogue"):
                with env("IMAML_CUDA_XTXV", "rows"):
                    run_contenders(row, {STEP_EPILOGUE: gated("IMAML_BENCH_STEP_EPILOGUE",
                                                              solve)},
                                   truth, device, min_run_time)
                with env("IMAML_CUDA_XTXV", "tiles"):
                    run_contenders(row, {STEP_EPILOGUE + ", " + TILES:
                                         gated("IMAML_BENCH_STEP_EPILOGUE_TILES", solve)},
                                   truth, device, min_run_time)
                with env("IMAML_CUDA_XTXV", "bulk"):
                    run_contenders(row, {STEP_EPILOGUE + ", " + BULK:
                                         gated("IMAML_BENCH_BULK", solve)},
                                   truth, device, min_run_time)
                with env("IMAML_CUDA_XTXV", "prefetch"):
                    run_contenders(row, {STEP_EPILOGUE + ", " + PREFETCH:
                                         gated("IMAML_BENCH_PREFETCH", solve)},
                                   truth, device, min_run_time)
        row["bytes_read_per_iteration"] = X.numel() * X.element_size()
        add_bandwidth(row, bandwidth, row["bytes_read_per_iteration"] * ITERS, device)
        rows.append(row)
        print_row(row, f"cg_solve_lstsq  B={B} n={n} d={d}  ({ITERS} iterations)")

    for B, n, f, c in HEAD:
        g = torch.Generator().manual_seed(B * n + f + c)
        F = torch.randn(B, n, f, generator=g).to(device)
        W = (torch.randn(B, c, f, generator=g) / f ** 0.5).to(device)
        bias = torch.randn(B, c, generator=g).to(device)
        b = torch.randn(B, c * (f + 1), generator=g).to(device)
        scale = 1.0 / LAM
        row = {"op": "cg_solve_softmax_head", "B": B, "n": n, "f": f, "c": c,
               "iterations": ITERS, "times_s": {}, "errors": {}, "skipped": {}}
        truth = cg_check(row, lambda k, F=F, W=W, bias=bias, b=b, scale=scale:
                         reference.cg_solve_softmax_head(F.double(), W.double(), bias.double(),
                                                         b.double(), zeros(b).double(), 1.0,
                                                         scale, k, 0.0, 0.0)[0])
        probs = reference.softmax_head_probs(F, W, bias)
        factor = scale / n

        def mv(v, F=F, probs=probs, c=c, f=f, factor=factor):
            sW, sb = reference._softmax_head_sums(F, probs, *reference.softmax_head_split(v, c, f))
            return v + factor * reference.softmax_head_join(sW, sb)

        def mv1(i, v, mv=mv, F=F, probs=probs, c=c, f=f, factor=factor):
            sW, sb = reference._softmax_head_sums(F[i:i + 1], probs[i:i + 1],
                                                  *reference.softmax_head_split(v[None], c, f))
            return v + factor * reference.softmax_head_join(sW, sb)[0]
        run_contenders(row, {
            "imaml_ext": lambda: solved(ops.cg_solve_softmax_head(
                F, W, bias, b, zeros(b), 1.0, scale, ITERS, 0.0, 0.0, use_ext=True)),
            "reference": lambda: solved(reference.cg_solve_softmax_head(
                F, W, bias, b, zeros(b), 1.0, scale, ITERS, 0.0, 0.0)),
            "torch.compile(reference)": compiled_call(
                lambda F, W, bias, b, x0: reference.cg_solve_softmax_head(
                    F, W, bias, b, x0, 1.0, scale, ITERS, 0.0, 0.0),
                device, quick, F, W, bias, b, zeros(b)),
            **cg_peers(mv, mv1, b, device),
        }, truth, device, min_run_time)
        add_paths(row, device, truth, min_run_time,
                  lambda: solved(ops.cg_solve_softmax_head(F, W, bias, b, zeros(b), 1.0, scale,
                                                           ITERS, 0.0, 0.0, use_ext=True)))
        row["bytes_read_per_iteration"] = F.numel() * F.element_size()
        add_bandwidth(row, bandwidth, row["bytes_read_per_iteration"] * ITERS, device)
        rows.append(row)
        print_row(row, f"cg_solve_softmax_head  B={B} n={n} f={f} c={c}  ({ITERS} iterations)")
    return rows


def add_paths(row, device, truth, min_run_time, fn):
    """On CUDA, both whole-loop paths forced (IMAML_CG_FUSED), to check solve.cuh's choice."""
    if device != "cuda":
        return
    for mode, name in (("1", "imaml_ext single-launch"), ("0", "imaml_ext multi-launch")):
        with env("IMAML_CG_FUSED", mode):
            run_contenders(row, {name: fn}, truth, device, min_run_time)
    base = row["times_s"].get("imaml_ext")
    if base:
        row["ratio_to_imaml_ext"] = {k: v / base for k, v in row["times_s"].items()}


def cpu_llc_bytes() -> int | None:
    """The CPU's last-level cache size (Linux sysfs), or None."""
    import glob
    best = None
    for f in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            text = open(f).read().strip()
            n = int(text.rstrip("KMG")) * {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1], 1)
        except (OSError, ValueError):
            continue
        best = n if best is None else max(best, n)
    return best


def add_bandwidth(row, bandwidth, bytes_per_call, device: str):
    """Bytes of the operator's data read per call / time, against the copy. On the CPU only for
    data larger than the last-level cache: back-to-back calls read smaller data from the cache,
    against a copy bandwidth that is the memory's (fractions over 100% said nothing)."""
    row["achieved_GBps"] = {}
    for name, t in row["times_s"].items():
        if name.startswith("imaml_ext") and t:
            gbps = bytes_per_call / t / 1e9
            row["achieved_GBps"][name] = gbps
    row["copy_GBps"] = bandwidth / 1e9
    llc = cpu_llc_bytes() if device == "cpu" else None
    per_pass = row.get("bytes_read_per_iteration") or row.get("bytes_read") or bytes_per_call
    if llc is not None and per_pass <= llc:
        row["fraction_of_copy_note"] = (f"not given: {per_pass / 2**20:.1f} MiB read per pass "
                                        f"fits the {llc / 2**20:.0f} MiB last-level cache")
        return
    row["fraction_of_copy"] = {k: v / row["copy_GBps"] for k, v in row["achieved_GBps"].items()}


# ---- output -------------------------------------------------------------------------------------

def print_row(row, title):
    print(f"\n{title}")
    if "check" in row:
        early = row["check"][f"error_after_{EARLY}_iterations"]
        print(f"  check: relative error < {row['tolerance']:.0e} against the float64 "
              f"{row['iterations']}-iteration reference (a run of {EARLY} iterations errs "
              f"{early:.1e}" + ("" if row["check"][f"bar_catches_{EARLY}_iterations"] else
                                ": NOT caught by the bar here; only reported iteration counts "
                                "catch a short run") + ")")
    base = row["times_s"].get("imaml_ext")
    for name, t in sorted(row["times_s"].items(), key=lambda kv: kv[1]):
        ratio = f"{t / base:7.2f}x" if base else "    n/a"
        extra = ""
        if "hvp_over_gradient" in row:
            extra = f"   {row['hvp_over_gradient'][name]:5.2f} gradients"
        if name in row.get("achieved_GBps", {}):
            extra += f"   {row['achieved_GBps'][name]:7.1f} GB/s"
            if name in row.get("fraction_of_copy", {}):
                extra += f" ({100 * row['fraction_of_copy'][name]:.0f}% of copy)"
        print(f"  {name:34s} {t * 1e3:10.3f} ms  {ratio} imaml_ext's time   "
              f"rel.err {row['errors'][name]:.1e}{extra}")
    for name, why in row["skipped"].items():
        print(f"  {name:34s} skipped: {why}")


def summary_table(rows) -> str:
    lines = ["| op | size | imaml_ext ms | reference | torch.compile | torch.func | torchopt | "
             "linear_operator | scipy |", "|---|---|---|---|---|---|---|---|---|"]
    cols = ["reference", "torch.compile(reference)", "torch.func jvp(grad)",
            "torchopt solve_cg (per system)", "linear_operator linear_cg",
            "scipy cg (per system)"]
    for row in rows:
        size = " ".join(f"{k}={row[k]}" for k in ("B", "n", "d", "f", "c", "P", "N", "C", "H",
                                                   "W") if k in row)
        base = row["times_s"].get("imaml_ext")
        cells = []
        for c in cols:
            t = row["times_s"].get(c)
            cells.append(f"{t / base:.2f}x" if t and base else "-")
        if base:
            lines.append(f"| {row['op']} | {size} | {base * 1e3:.3f} | " + " | ".join(cells)
                         + " |")
        else:
            lines.append(f"| {row['op']} | {size} | - |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="fewer sizes, shorter timing")
    ap.add_argument("--min-run-time", type=float, default=None,
                    help="seconds per blocked_autorange (default 0.5, 0.1 with --quick)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's); 1 gives steadier numbers on a "
                         "machine shared with other jobs")
    ap.add_argument("--sections", default="cg,hvp,blocks",
                    help="comma-separated: cg (whole-loop solvers), hvp (the fused HVPs), blocks "
                         "(the conv net's fused batch-norm/ReLU/max-pool block, CPU)")
    ap.add_argument("--no-compile-cg", action="store_true",
                    help="do not torch.compile the whole-loop CG references (gpu_suite.sh: on a "
                         "GPU Inductor compiles all iterations per shape)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    COMPILE_CG["on"] = not args.no_compile_cg
    sections = [x.strip() for x in args.sections.split(",") if x.strip()]
    bad = sorted(set(sections) - {"cg", "hvp", "blocks"})
    if bad or not sections:
        ap.error(f"--sections: expected a comma-separated subset of cg,hvp,blocks, got "
                 f"{args.sections!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device")
    if not imaml_ext.extension_available():
        sys.exit("the compiled extension is not loaded: " + imaml_ext.build_info()["reason"])
    min_run_time = args.min_run_time or (0.1 if args.quick else 0.5)
    start = time.perf_counter()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    bandwidth = copy_bandwidth(args.device)
    print(f"{args.device} copy bandwidth (read + write): {bandwidth / 1e9:.1f} GB/s")
    result = {"benchmark": "bench_kernels", "device": args.device, "quick": args.quick,
              "dtype": "float32", "cg_iterations": ITERS, "lam": LAM,
              "threads": torch.get_num_threads(), "argv": sys.argv[1:] if argv is None else argv,
              "machine": machine(args.device), "load_average_at_start": load,
              "copy_GBps": bandwidth / 1e9, "sections": sections, "hvp": [], "cg": [],
              "blocks": []}

    def save():
        # Written after every section, so a run cut short still leaves its numbers.
        result["summary_markdown"] = summary_table(result["hvp"] + result["cg"]
                                                   + result["blocks"])
        result["wall_s"] = time.perf_counter() - start
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=1) + "\n")

    if "cg" in sections:
        result["cg"] = bench_cg(args.device, args.quick, min_run_time, bandwidth)
        save()
    if "hvp" in sections:
        result["hvp"] = bench_hvps(args.device, args.quick, min_run_time, bandwidth)
        save()
    if "blocks" in sections:
        result["blocks"] = (bench_blocks(args.device, args.quick, min_run_time)
                            + bench_first_block(args.device, args.quick, min_run_time)
                            + bench_conv3x3(args.device, args.quick, min_run_time))
    result["load_average_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    save()
    print("\nTimes as multiples of imaml_ext's time (higher: imaml_ext is faster)\n"
          + result["summary_markdown"])
    print(f"\nwall time {result['wall_s']:.0f} s")
    if args.out:
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
