"""Why iMAML-GD with the paper's recipe stalls on the Omniglot conv net, and the authors' does not.

A probe, not a benchmark: one meta-batch of real 5-way 1-shot Omniglot tasks at the random
initialisation (seed 0, float64, CPU), and for each recipe

  - the inner solution's stationarity: |grad G| and |grad L_train| after the inner loop
    (G = L_train + lam/2 |phi - theta|^2, whose minimum the implicit gradient assumes);
  - the share of tasks whose CG (5 steps) meets negative curvature, and CG's final residual;
  - with --eigen, for task 0: the Hessian's largest-magnitude and smallest eigenvalues at phi
    (power iteration on autograd's HVP, which imaml_ext's HVP matches to 1e-13 here, printed).

    IMAML_DATA=../shared/data python benchmarks/probes/imaml_recipe.py [--tasks 8] [--eigen]

Printed on the 2-core dev machine, 2026-11-27 (commit 084ddf7), --tasks 8 --eigen:
see benchmarks/results/imaml_recipe_cpu.md, which also holds the training curves.
"""
from __future__ import annotations

import argparse
import sys
import tempfile

import torch
import torch.nn.functional as F
from torch.func import functional_call

from imaml_ext.algorithms import make_algorithm
from imaml_ext.config import TrainConfig
from imaml_ext.hvp import ParamSpec, TaskLoss, make_hvp
from imaml_ext.inner import batched_theta, gd
from imaml_ext.train import Trainer

RECIPES = {
    # name: (make_algorithm keywords, inner-loop keywords for imaml_ext.inner.gd)
    "paper": (dict(proximal="paper"), dict(proximal="paper")),
    "paper, damped CG (2I + H/12)": (dict(proximal="paper", cg_damping=1.0, cg_lam=12.0),
                                     dict(proximal="paper")),
    "authors' proximal step, paper CG": (dict(proximal="authors"), dict(proximal="authors")),
    "authors (both)": (dict(proximal="authors", cg_damping=1.0, cg_lam=12.0),
                       dict(proximal="authors")),
}


def eigen_extremes(model, spec, phi_i, x, y, iters=(60, 200)):
    """(largest |eigenvalue|, smallest eigenvalue) of task i's training-loss Hessian at phi_i."""
    p0 = phi_i.clone().requires_grad_(True)
    loss = F.cross_entropy(functional_call(model, spec.unflatten_one(p0), (x,)), y)
    g = torch.autograd.grad(loss, p0, create_graph=True)[0]

    def hv(v):
        return torch.autograd.grad(g, p0, v, retain_graph=True)[0]

    gen = torch.Generator().manual_seed(0)
    v = torch.randn(p0.numel(), dtype=p0.dtype, generator=gen)
    big = 0.0
    for _ in range(iters[0]):
        w = hv(v / v.norm())
        big = float((v / v.norm()) @ w)
        v = w
    shift = abs(big)
    v = torch.randn(p0.numel(), dtype=p0.dtype, generator=gen)
    for _ in range(iters[1]):
        v = v / v.norm()
        w = shift * v - hv(v)
        mu = float(v @ w)
        v = w
    return big, shift - mu, hv


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--lam", type=float, default=2.0)
    ap.add_argument("--inner-lr", type=float, default=0.1)
    ap.add_argument("--inner-steps", type=int, default=16)
    ap.add_argument("--eigen", action="store_true", help="also the Hessian's extreme eigenvalues")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    cfg = TrainConfig(dataset="omniglot", ways=5, shots=1, algo="imaml-gd",
                      meta_batch=args.tasks, val_every=0,
                      out=tempfile.mkdtemp(prefix="imaml-recipe-probe-"),
                      dtype="float64", quiet=True)
    tr = Trainer(cfg)
    t = tr.sampler.batch(5).to("cpu", torch.float64)
    model, theta = tr.model, tr.params
    tl = TaskLoss(model)
    M = t.num_tasks
    print(f"{M} tasks of Omniglot 5-way 1-shot at the random initialisation; lam {args.lam}, "
          f"{args.inner_steps} inner steps at lr {args.inner_lr}, 5 CG steps")
    for name, (algo_kw, inner_kw) in RECIPES.items():
        algo = make_algorithm("imaml-gd", lam=args.lam, inner_lr=args.inner_lr,
                              inner_steps=args.inner_steps, cg_steps=5, **algo_kw)
        _, m = algo.meta_gradient(model, theta, t)
        res = gd(tl, batched_theta(theta, M), t.x_support, t.y_support, steps=args.inner_steps,
                 lr=args.inner_lr, lam=args.lam, final_loss=False, **inner_kw)
        phi = res.params
        spec = ParamSpec.of(phi)
        gL, loss, _ = tl.grad(phi, t.x_support, t.y_support)
        gL = spec.flatten(gL)
        gG = gL + args.lam * (spec.flatten(phi) - spec.flatten(batched_theta(theta, M)))
        print(f"\n{name}:\n  inner loss {loss.mean():.3f}; |grad G| median "
              f"{gG.norm(dim=1).median():.2f}, |grad L_train| median {gL.norm(dim=1).median():.2f}"
              f"\n  CG: negative curvature in {m['cg_negative_curvature'].double().mean():.0%} of "
              f"the tasks, residual {m['cg_residual'].mean():.2e} (mean), "
              f"{m['cg_iterations'].double().mean():.2f} iterations (mean)")
        if args.eigen:
            phi0 = spec.flatten(phi)[0]
            big, small, hv = eigen_extremes(model, spec, phi0, t.x_support[0], t.y_support[0])
            v = torch.randn(M, spec.numel, dtype=torch.float64)
            ours = make_hvp(tl, phi, t.x_support, t.y_support, "exact").flat(v.clone())[0]
            err = float((ours - hv(v[0])).norm() / hv(v[0]).norm())
            print(f"  task 0 Hessian: largest |eigenvalue| {big:.1f}, smallest {small:.1f} "
                  f"(CG's matrix (I + H/lam) is indefinite when the smallest is below "
                  f"-{args.lam:g}); imaml_ext's HVP vs autograd: relative error {err:.1e}")


if __name__ == "__main__":
    sys.exit(main())
