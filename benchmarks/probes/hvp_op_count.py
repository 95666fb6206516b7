"""How many ATen ops (on a GPU: kernel launches) one conv-net gradient and one exact HVP take.

A probe, not a benchmark. On an H100 at meta-batch 32 the Omniglot conv net's eager exact HVP
(double backward through a graph built once) cost 4.5x (5-way 1-shot) and 3.7x (20-way 5-shot) a
gradient, where the CPU's costs 2.6x: small kernels, each launched from Python, so the GPU's cost
follows the number of ops more than their work. This counts, by a TorchDispatchMode, the ops of
one gradient ("grad" layout), one graph build and one product ("hvp" layout), in the layout the
library uses on a GPU: all M tasks in one fold (no CPU chunks), NCHW, ATen's convolutions (no
CPU-only kernels), and the pooling block's sign flip that a GPU evaluates because it does not
read the batch-norm signs back to the host (on the CPU the probe makes one weight negative per
block so that the same path runs; the host read that decides it is counted apart).

Two "hvp" layouts are counted, and timed in interleaved rounds on the probe's device (on a GPU
also the second with torch.backends.cudnn.benchmark on):
- aten_conv: F.conv2d, whose double backward is ATen's: the weight gradient of the input's
  tangent as one convolution per group, and the tasks are the groups;
- own_conv (hvp.OWN_CONV_HVP, the default): ops._Conv, whose derivatives of every order are the
  convolution's three bilinear maps, each one call over all groups.

    python benchmarks/probes/hvp_op_count.py [--device cpu|cuda] [--tasks 32] [--rounds 5]
                                             [--no-profile]

It also profiles one gradient and one product (torch.profiler's top ops, and on a GPU the
kernels' device time against the wall time: near 100% means the GPU's work bounds the phase,
far below it that launching it does).

On the 2-core dev CPU (2026-11-27, `--rounds 3`, benchmarks/results/hvp_op_count_cpu.json), in
that GPU layout, the same counts at 5-way 1-shot and 20-way 5-shot (M=32): one gradient 45 ops;
one graph build 221 with ATen's convolution double backward and 225 with _Conv (239 / 243
before BatchedHVP stopped copying the parameters it differentiates); one product 278 (111 of
them convolutions) against 185 (17), the products agreeing to 1.4e-7 / 5.6e-7 (float32, 5-way
1-shot / 20-way 5-shot). Before the batch-norm block became one Function with written-out
derivatives (hvp._PooledBatchNorm) the product took 458 / 365 and the graph build 207 / 211.
CPU time of a product there 1.11x / 1.06x faster with _Conv (3 rounds, commit e228a36;
earlier runs of the same comparison 1.14x / 1.06x, 1.14x / 1.15x and 1.09x / 0.98x): the CPU
is compute-bound; the counts are what matters on a GPU, where each op is a launch.

With the block's forward, its two derivatives and their factor table as one op each
(ops.pooled_bn_forward, pooled_bn_backward, pooled_bn_double_backward, pooled_bn_coefficients:
the "own_conv+bn_kernels" variant, hvp.POOLED_BN_KERNELS), on the same CPU (commit a3ee125,
`--rounds 3`): one product 74 ops (1.64x a gradient's 45; 4.11x before), the graph build 45
(225 before); a product 1.17x / 1.40x a gradient's CPU time against 1.71x / 2.02x with own_conv
alone, 1.42x / 1.47x faster, the graph build 1.35x / 1.40x (the product's speed-up varies by
run on this CPU: 1.22x-1.27x / 1.58x-1.61x in two earlier runs of the same product code).

It also counts the ops of an iMAML solve outside its products (solve_overhead): on the dev CPU
(2026-11-28, M=32, 5 CG steps, 5-way 1-shot) 66 before the solve's set-up, scaling and finish
became one op each (cg_begin, cg_end) and the matrix's shift and scale moved into cg_step: 41 of
set-up and finish plus, per step, a scale, an add and the step; now 7 (cg_begin, 5 cg_step,
cg_end). With the product's 76 ops on the flat buffer against one HVP's 74, the CG phase is then
1.046x five HVPs in ops, against 1.18x before (the H100 measured 1.20x in time at 5-way 1-shot,
where launches bound the phase).

Kernel launches per op: views, detach and the like launch none (counted apart); a cuDNN
convolution can launch more than one kernel, so on a GPU the counts are a lower bound.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_meta_gradient import make_tasks  # noqa: E402

from imaml_ext import hvp as hvp_mod  # noqa: E402
from imaml_ext.hvp import TaskLoss, make_hvp  # noqa: E402
from imaml_ext.inner import batched_theta  # noqa: E402
from imaml_ext.models import make_model  # noqa: E402

# ops that launch no kernel: metadata, views, the autograd detach
NO_KERNEL = {"aten.detach.default", "aten.alias.default", "aten.lift_fresh.default",
             "aten.empty.memory_format", "aten.empty_strided.default", "aten.empty_like.default",
             "aten.new_empty.default", "aten.new_empty_strided.default", "aten.sym_size.int",
             "aten.sym_stride.int", "aten.sym_numel.default", "aten.sym_storage_offset.default",
             "aten.is_same_size.default", "aten._unsafe_view.default"}
HOST_READS = {"aten._local_scalar_dense.default", "aten.item.default"}


# (label, ops._Conv for the "hvp" layout's convolutions, the pooled block's derivative kernels)
VARIANTS = (("aten_conv", False, False), ("own_conv", True, False),
            ("own_conv+bn_kernels", True, True))


class OpCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))

    def summary(self) -> dict:
        return self.summarize(self.ops)

    @staticmethod
    def summarize(ops) -> dict:
        kernel, views, host = collections.Counter(), 0, 0
        for name, n in ops.items():
            op = eval("torch.ops." + name.split(".", 1)[0] + "." + name.split(".", 1)[1]) \
                if name.startswith("aten.") else None
            if name in HOST_READS:
                host += n
            elif name in NO_KERNEL or (op is not None and getattr(op, "is_view", False)):
                views += n
            else:
                kernel[name] += n
        conv = sum(n for k, n in kernel.items() if "convolution" in k)
        return {"kernel_ops": sum(kernel.values()), "no_kernel_ops": views, "host_reads": host,
                "convolution_ops": conv, "top": kernel.most_common(8)}


def setup(args, setting, device):
    ways, shots = setting
    torch.manual_seed(0)
    model = make_model("omniglot", ways).to(device)
    if device.type == "cpu":
        with torch.no_grad():  # take the sign-flip path a GPU always takes (see the docstring)
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.weight[0] = -1.0
    p = {k: t.detach() for k, t in model.named_parameters()}
    M = args.tasks
    pb = {k: t.clone() for k, t in batched_theta(p, M).items()}
    tasks = make_tasks(ways, shots, 1, M, device)
    tl = TaskLoss(model, fused_blocks=False, task_chunk=M, channels_last=False)
    g = torch.Generator().manual_seed(1)
    v = {k: torch.randn(t.shape, generator=g).to(t) for k, t in pb.items()}
    return tl, pb, tasks.x_support, tasks.y_support, v


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bn_kernels(on: bool, device) -> tuple:
    """hvp.POOLED_BN_KERNELS for the block's derivative kernels on (the device) or off."""
    return (device.type,) if on else ()


def measure(tl, pb, x, y, v, own_conv: bool, bn: bool):
    hvp_mod.OWN_CONV_HVP = own_conv
    before = hvp_mod.POOLED_BN_KERNELS
    hvp_mod.POOLED_BN_KERNELS = bn_kernels(bn, x.device)
    try:
        with OpCount() as c_grad:
            tl.grad(pb, x, y)
        H = make_hvp(tl, pb, x, y, "double_backward")
        with OpCount() as c_build:
            H._build()
        with OpCount() as c_prod:
            out = H(v)
        return {"grad": c_grad.summary(), "graph_build": c_build.summary(),
                "product": c_prod.summary()}, out
    finally:
        hvp_mod.OWN_CONV_HVP = True
        hvp_mod.POOLED_BN_KERNELS = before


def solve_overhead(tl, pb, x, y, v, steps: int = 5) -> dict:
    """The ops of an iMAML solve (implicit_meta_gradient with the product built once, `steps` CG
    steps, all of them run) outside its products, by name: what the CG phase costs beyond
    `steps` HVPs, which on a GPU is launches (the CPU's early-stop status reads, 3 a step, are
    counted apart: a GPU runs every step masked instead)."""
    from imaml_ext.hvp import ParamSpec
    from imaml_ext.implicit import implicit_meta_gradient
    before = hvp_mod.POOLED_BN_KERNELS
    hvp_mod.POOLED_BN_KERNELS = bn_kernels(True, x.device)
    try:
        H = make_hvp(tl, pb, x, y, "double_backward")
        H.value_and_grad()
        counter = OpCount()
        inner, flat = collections.Counter(), H.flat

        def product(w):  # the product's own ops are moved out of the solve's count
            before = collections.Counter(counter.ops)
            out = flat(w)
            inner.update(counter.ops - before)
            counter.ops.subtract(counter.ops - before)
            return out

        H.flat = product
        b = ParamSpec.of(pb).flatten(v)
        with counter:  # cg_lam large and rtol 0: every step runs (no early stop on the CPU)
            implicit_meta_gradient(tl, pb, x, y, b, lam=2.0, cg_lam=1e3, cg_steps=steps, hvp=H,
                                   rtol=0.0)
    finally:
        hvp_mod.POOLED_BN_KERNELS = before
    counter.ops = +counter.ops
    early = {"aten.eq.Scalar", "aten.any.default"}
    s = counter.summary()
    cpu_reads = sum(n for k, n in counter.ops.items() if k in early) + s["host_reads"]
    return {"steps": steps, "kernel_ops": s["kernel_ops"], "cpu_early_stop_ops": cpu_reads,
            "solver_ops": s["kernel_ops"] - sum(n for k, n in counter.ops.items() if k in early),
            "ops": dict(counter.ops), "product_kernel_ops": OpCount.summarize(inner)["kernel_ops"]
            / steps}


def timed(tl, pb, x, y, v, own_conv, bn, cudnn_benchmark, device, products=3):
    """(gradient, graph build, one product) seconds with the given layout, block kernels and
    cuDNN setting."""
    hvp_mod.OWN_CONV_HVP = own_conv
    before, before_bn = torch.backends.cudnn.benchmark, hvp_mod.POOLED_BN_KERNELS
    torch.backends.cudnn.benchmark = cudnn_benchmark
    hvp_mod.POOLED_BN_KERNELS = bn_kernels(bn, device)
    try:
        sync(device)
        t0 = time.perf_counter()
        tl.grad(pb, x, y)
        sync(device)
        t1 = time.perf_counter()
        H = make_hvp(tl, pb, x, y, "double_backward")
        H._build()
        sync(device)
        t2 = time.perf_counter()
        for _ in range(products):
            H(v)
        sync(device)
        t3 = time.perf_counter()
        return t1 - t0, t2 - t1, (t3 - t2) / products
    finally:
        hvp_mod.OWN_CONV_HVP = True
        torch.backends.cudnn.benchmark = before
        hvp_mod.POOLED_BN_KERNELS = before_bn


def busy_us(events, cuda: bool) -> float:
    """Microseconds the device (the kernels: events of the GPU's device type) or, on the CPU, the
    ops themselves (self time) were busy, as torch's table totals them. Summing every event's
    self device time counts each kernel twice, once as the op that launched it (2026-11-28 H100
    run: "kernel time" 2.03 ms where the table said 1.015 ms)."""
    from torch.autograd import DeviceType
    if not cuda:
        return float(sum(e.self_cpu_time_total for e in events))
    return float(sum(e.self_device_time_total for e in events
                     if e.device_type == DeviceType.CUDA and not e.is_user_annotation))


def profile_phases(tl, pb, x, y, v, device, top=12):
    """torch.profiler of one gradient and one product (default layout): where the time goes.
    On a GPU the sum of the kernels' device time against the wall time says whether the
    phase is bound by the GPU's work or by launching it (the rest of the wall time)."""
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    before = hvp_mod.POOLED_BN_KERNELS
    hvp_mod.POOLED_BN_KERNELS = bn_kernels(True, device)  # the fastest layout
    H = make_hvp(tl, pb, x, y, "double_backward")
    H._build()
    out = {}
    for phase, fn in (("grad", lambda: tl.grad(pb, x, y)), ("product", lambda: H(v))):
        fn()
        sync(device)
        with profile(activities=acts) as prof:
            fn()
            sync(device)
        ka = prof.key_averages()
        out[phase] = {"busy_ms": busy_us(ka, cuda) / 1e3, "busy_of": key,
                      "table": ka.table(sort_by=key, row_limit=top)}
    hvp_mod.POOLED_BN_KERNELS = before
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tasks", type=int, default=32)
    ap.add_argument("--settings", default="5w1s,20w5s")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (0: none)")
    ap.add_argument("--out", default=None, help="JSON file to write")
    ap.add_argument("--no-profile", action="store_true",
                    help="skip torch.profiler's tables of one gradient and one product")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    known = {"5w1s": (5, 1), "20w5s": (20, 5)}
    report = {"probe": "hvp_op_count", "device": str(device), "tasks": args.tasks,
              "torch": torch.__version__, "settings": {}, "summary_lines": []}
    summary = report["summary_lines"]
    if device.type == "cuda":
        report["card"] = torch.cuda.get_device_name(device)
    for name in args.settings.split(","):
        tl, pb, x, y, v = setup(args, known[name], device)
        counts, res = {}, {}
        for label, own, bn in VARIANTS:
            counts[label], res[label] = measure(tl, pb, x, y, v, own, bn)
        aten = res["aten_conv"]
        den = sum(float(aten[k].pow(2).sum()) for k in aten)
        rel = {label: (sum(float((r[k] - aten[k]).pow(2).sum()) for k in aten) / den) ** 0.5
               for label, r in res.items() if label != "aten_conv"}
        entry = {"counts": counts, "rel_diff_own_vs_aten": rel["own_conv"],
                 "rel_diff_vs_aten": rel}
        print(f"[{name}] M={args.tasks} on {device}: ops that launch kernels "
              f"(convolutions among them), no-kernel ops, host reads")
        for label in counts:
            for phase, s in counts[label].items():
                print(f"  {label:9s} {phase:11s} {s['kernel_ops']:5d} "
                      f"({s['convolution_ops']:3d} conv)"
                      f"  {s['no_kernel_ops']:5d}  {s['host_reads']}")
        ops_ = {label: counts[label]["product"]["kernel_ops"] for label, _, _ in VARIANTS}
        grad_ops = counts["own_conv"]["grad"]["kernel_ops"]
        line = (f"{name} M={args.tasks}: one product: "
                + " -> ".join(f"{n} ({label})" for label, n in ops_.items())
                + f" ops, i.e. {ops_['own_conv+bn_kernels'] / grad_ops:.2f}x the gradient's "
                f"{grad_ops} (was {ops_['own_conv'] / grad_ops:.2f}x, "
                f"{ops_['aten_conv'] / grad_ops:.2f}x); relative differences of the products "
                + ", ".join(f"{label} {r:.1e}" for label, r in rel.items()))
        print("  " + line)
        summary.append(line)
        so = solve_overhead(tl, pb, x, y, v)
        entry["solve_overhead"] = so
        k, one = so["steps"], ops_["own_conv+bn_kernels"]
        so["cg_phase_over_hvps_in_ops"] = (k * so["product_kernel_ops"] + so["solver_ops"]) / (
            k * one)
        line = (f"{name} M={args.tasks}: an iMAML solve of {k} CG steps: {so['solver_ops']} ops "
                f"beyond its products, each product {so['product_kernel_ops']:.0f} ops on the "
                f"flat (M, P) buffer (one HVP on parameter dicts: {one}), so the CG phase is "
                f"{so['cg_phase_over_hvps_in_ops']:.3f}x {k} HVPs in ops (the target's ratio, "
                f"where launches bound it); the CPU's early stop adds "
                f"{so['cpu_early_stop_ops']} (none on a GPU)")
        print("  " + line)
        summary.append(line)
        if args.rounds:
            # (layout, cuDNN autotuning): torch.backends.cudnn.benchmark picks each
            # convolution's algorithm by timing them once per shape (meta-learning's shapes are
            # fixed); it is off by default, so the library's numbers so far are without it
            variants = [(label, own, bn, False) for label, own, bn in VARIANTS]
            if device.type == "cuda":
                variants.append(("own_conv+bn_kernels+cudnn_benchmark", True, True, True))
            for _, own, bn, cb in variants:  # warm-up (cuDNN plans and autotuning, allocator)
                timed(tl, pb, x, y, v, own, bn, cb, device, 1)
            t = {label: [] for label, _, _, _ in variants}
            for _ in range(args.rounds):
                for label, own, bn, cb in variants:
                    t[label].append(timed(tl, pb, x, y, v, own, bn, cb, device))
            med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
            entry["timing"] = {"rounds": args.rounds}
            for label, *_ in variants:
                g, build, prod = (med([r[i] for r in t[label]]) for i in range(3))
                entry["timing"][label] = {"grad_s": g, "graph_build_s": build,
                                          "product_s": prod, "product_per_grad": prod / g}
                print(f"  {label:25s} gradient {g * 1e3:8.2f} ms, graph build "
                      f"{build * 1e3:8.2f} ms, one product {prod * 1e3:8.2f} ms "
                      f"= {prod / g:.2f}x the gradient")
            base = entry["timing"]["aten_conv"]
            for label, *_ in variants[1:]:
                r = entry["timing"][label]
                line = (f"{name} M={args.tasks}: {label} vs aten_conv: gradient "
                        f"{base['grad_s'] / r['grad_s']:.2f}x, product "
                        f"{base['product_s'] / r['product_s']:.2f}x, graph build "
                        f"{base['graph_build_s'] / r['graph_build_s']:.2f}x faster; product "
                        f"{r['product_per_grad']:.2f}x its gradient (aten_conv "
                        f"{base['product_per_grad']:.2f}x; medians of {args.rounds} "
                        f"interleaved rounds)")
                print("  " + line)
                summary.append(line)
        if not args.no_profile:
            prof = profile_phases(tl, pb, x, y, v, device)
            entry["profile"] = prof
            what = "kernel time" if device.type == "cuda" else "op CPU time"
            for phase in ("grad", "product"):
                print(f"  profile of one {phase} ({what} {prof[phase]['busy_ms']:.2f} ms):")
                print(prof[phase]["table"])
            if "timing" in entry and device.type == "cuda":
                # (on the CPU the ops run where they are called: their time is the wall time,
                # summed over threads, so the ratio says nothing)
                t = entry["timing"]["own_conv+bn_kernels"]
                g, pr = prof["grad"]["busy_ms"] / 1e3, prof["product"]["busy_ms"] / 1e3
                line = (f"{name} M={args.tasks}: {what} / wall time: gradient "
                        f"{g * 1e3:.2f} / {t['grad_s'] * 1e3:.2f} ms ({g / t['grad_s']:.0%}), "
                        f"product {pr * 1e3:.2f} / {t['product_s'] * 1e3:.2f} ms "
                        f"({pr / t['product_s']:.0%})")
                print("  " + line)
                summary.append(line)
        report["settings"][name] = entry
        if args.out:  # after every setting, so a run cut short by the suite's limit keeps it
            tmp = Path(args.out).with_suffix(".tmp")
            tmp.write_text(json.dumps(report, indent=1))
            tmp.replace(args.out)
            print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
