"""How far apart two correct float32 Hessian-vector products of the Omniglot conv net can be.

A probe, not a benchmark. The conv net is piecewise smooth (ReLU gates, max-pool choices), so its
Hessian jumps where an input crosses a kink; a float32 evaluation's rounding (1e-7 relative) can
land a near-tie on either side, and two exact products that round differently (eager double
backward, eager forward-over-reverse with the CPU's Winograd convolutions, torch.compile's
kernels) then differ by far more than float32 precision, in the few tasks that sit on a kink.
This prints, per task, the relative error of each float32 product against the float64 double
backward at the same point, and how much the float64 product itself moves when the support
images are perturbed by 1e-7..1e-5 relative (float32 rounding, and its growth through the
convolutions' sums).

    python benchmarks/probes/hvp_kinks.py [--tasks 32] [--seeds 0,1,2] [--compile] [--device cpu]

Printed on the 2-core dev machine, 2026-11-27 (`--compile --seeds 0,1 --perturbations 3`, saved in
benchmarks/results/hvp_kinks_cpu.txt;
5-way 1-shot, random images and init, M=32). Seed 0: float32 double backward 1.1e-6 overall and
at worst; forward-over-reverse 1.1e-3 overall, median task 1.4e-6, 6.1e-3 in task 31 alone;
torch.compile 1.2e-2 overall, median task 2.5e-6, 7.2e-2 in task 23. The float64 product itself,
inputs moved by 1e-6 relative: median task 4.2e-6, and task 23 moved by 7.2e-2 (two of three
draws), the compiled product's very difference. Seed 1: task 16 differs by 1.0e-1 in the float32
forward-over-reverse, the compiled product and the float64 product after 1e-7 and 1e-6
perturbations alike. So the two values are the exact Hessians on the two sides of a kink, and a
1e-3..1e-2 overall difference between float32 products of this net (bench_meta_gradient's "rel.
err. vs eager" of the compiled HVP) measures kinks, not a wrong product: compare median tasks.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_meta_gradient import make_tasks  # noqa: E402

from imaml_ext.hvp import TaskLoss, make_hvp  # noqa: E402
from imaml_ext.inner import batched_theta  # noqa: E402
from imaml_ext.models import make_model  # noqa: E402
from imaml_ext.types import TaskBatch  # noqa: E402


def per_task_error(a: dict, ref: dict) -> torch.Tensor:
    """(M,) relative error of each task's whole product."""
    num = sum((a[k] - ref[k]).flatten(1).pow(2).sum(1) for k in ref)
    den = sum(ref[k].flatten(1).pow(2).sum(1) for k in ref)
    return (num / den).sqrt()


def overall_error(a: dict, ref: dict) -> float:
    num = sum(float((a[k] - ref[k]).pow(2).sum()) for k in ref)
    return (num / sum(float(ref[k].pow(2).sum()) for k in ref)) ** 0.5


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=32)
    ap.add_argument("--ways", type=int, default=5)
    ap.add_argument("--shots", type=int, default=1)
    ap.add_argument("--seeds", default="0", help="comma-separated data seeds")
    ap.add_argument("--perturbations", type=int, default=4, help="per size")
    ap.add_argument("--eps", default="1e-7,1e-6,1e-5", help="relative input perturbation sizes")
    ap.add_argument("--compile", action="store_true", help="also torch.compile's product (slow)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model = make_model("omniglot", args.ways)
    M = args.tasks

    def product(tasks, dtype, kind, compile=False):
        m = copy.deepcopy(model).to(device=args.device, dtype=dtype)
        p = {k: t.detach() for k, t in m.named_parameters()}
        pb = {k: t.clone() for k, t in batched_theta(p, M).items()}
        g = torch.Generator().manual_seed(1)
        v = {k: torch.randn(t.shape, generator=g, dtype=torch.float64).to(t) for k, t in pb.items()}
        H = make_hvp(TaskLoss(m), pb, tasks.x_support.to(dtype), tasks.y_support, kind,
                     compile=compile)
        return {k: t.double() for k, t in H(v).items()}

    def line(name, e, overall):
        print(f"  {name:34s} overall {overall:.1e}  median task {e.median():.1e}  worst "
              f"{e.max():.1e} (task {int(e.argmax())}), tasks above 1e-4: "
              f"{int((e > 1e-4).sum())}", flush=True)

    for seed in [int(s) for s in args.seeds.split(",")]:
        tasks = make_tasks(args.ways, args.shots, 5, M, args.device, seed=seed)
        ref = product(tasks, torch.float64, "double_backward")
        print(f"{args.ways}-way {args.shots}-shot, {M} tasks, data seed {seed}: relative error "
              f"against the float64 double backward at the same point", flush=True)
        kinds = [("double_backward", False), ("forward_over_reverse", False)]
        if args.compile:
            kinds.append(("exact", True))
        for kind, comp in kinds:
            a = product(tasks, torch.float32, kind, comp)
            line(f"float32 {'torch.compile' if comp else kind}", per_task_error(a, ref),
                 overall_error(a, ref))
        g = torch.Generator().manual_seed(5)
        for eps in [float(e) for e in args.eps.split(",")]:
            for i in range(args.perturbations):
                xs = tasks.x_support.double()
                xs = xs * (1 + eps * torch.randn(xs.shape, generator=g, dtype=xs.dtype)
                           .to(xs.device))
                moved = TaskBatch(xs, tasks.y_support, tasks.x_query, tasks.y_query)
                a = product(moved, torch.float64, "double_backward")
                line(f"float64, inputs x (1 + {eps:.0e} N) #{i}", per_task_error(a, ref),
                     overall_error(a, ref))


if __name__ == "__main__":
    main()
