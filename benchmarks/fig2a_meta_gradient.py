"""Paper Fig. 2a: accuracy of the meta-gradient against the number of inner steps.

Synthetic linear regression (imaml_ext.synthetic): M tasks whose support Hessians H_i = X_i^T X_i/n
have 5 distinct eigenvalues from 10 to 1e-3 (condition number 1e4), lam = 1, float64. The exact
meta-gradient d/dtheta mean_i L_test_i(phi_i*(theta)), phi_i* the exact minimiser of
G_i = L_train_i + lam/2 ||phi - theta||^2, has a closed form; every curve is the relative error
||g - g_exact|| / ||g_exact|| of:

- MAML: back-propagation through K GD steps on the same G (so it targets the same g_exact);
- iMAML-GD with 2 and 5 CG steps, phi_K from the same K GD steps (5 CG steps through the generic
  batched-HVP path and through the fused least-squares kernel, `hvp="lstsq"`);
- first-order MAML on G (no Jacobian at all), for scale;
- iMAML-HF with K Newton-CG iterations (5 CG steps each), for K <= 16 (exact from K = 1 on).

GD step size 1/L with L = max eig(H) + lam, safely below the 2/L stability limit.

    python benchmarks/fig2a_meta_gradient.py [--quick] [--device cpu|cuda] [--out-dir DIR]

Writes fig2a_meta_gradient.png and .json to benchmarks/results/ and prints the table.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import RESULTS, fmt_table, machine_line, pick_device, write_json  # noqa: E402

from imaml_ext import synthetic as syn  # noqa: E402
from imaml_ext.algorithms import make_algorithm, options_for  # noqa: E402

STEPS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
QUICK_STEPS = (1, 4, 16, 64, 256)
HF_MAX_STEPS = 16  # HF is exact after one Newton step here; more iterations only cost time

# curve name -> (algorithm, options)
CURVES = {
    "maml": ("maml", dict(regularized=True)),
    "imaml_cg2": ("imaml-gd", dict(cg_steps=2)),
    "imaml_cg5": ("imaml-gd", dict(cg_steps=5)),
    "imaml_cg5_lstsq_kernel": ("imaml-gd", dict(cg_steps=5, hvp="lstsq")),
    "fomaml": ("fomaml", dict(regularized=True)),
    "imaml_hf": ("imaml-hf", dict(cg_steps=5, hf_cg_steps=5)),
}
LABELS = {
    "maml": "MAML (backprop through GD on G)",
    "imaml_cg2": "iMAML-GD, 2 CG steps",
    "imaml_cg5": "iMAML-GD, 5 CG steps",
    "imaml_cg5_lstsq_kernel": "iMAML-GD, 5 CG steps (fused lstsq kernel)",
    "fomaml": "first-order MAML",
    "imaml_hf": f"iMAML-HF (K Newton-CG steps, K <= {HF_MAX_STEPS})",
}


def compute(steps=STEPS, *, num_tasks: int = 16, d: int = 10, n_train: int = 20,
            n_test: int = 40, lam: float = 1.0, seed: int = 0, device="cpu",
            curves=tuple(CURVES)) -> dict:
    """Relative meta-gradient errors for every curve at every K in `steps` (float64).

    Returns:
        {"steps": [...], "errors": {curve: [...]}, "config": {...}, "lr": float}.
    """
    lt = syn.make_linear_tasks(num_tasks, d=d, n_train=n_train, n_test=n_test, seed=seed,
                               device=device)
    model = syn.linear_model(d).to(device)
    g = torch.Generator().manual_seed(seed + 1)
    theta = torch.randn(1, d, generator=g, dtype=torch.float64).to(device)
    exact = syn.exact_meta_gradient(lt.tasks, theta.expand(num_tasks, -1), lam).mean(0)
    lr = syn.safe_lr(lt.spectrum, lam)
    errors = {c: [] for c in curves}
    for K in steps:
        for c in curves:
            name, opts = CURVES[c]
            if name == "imaml-hf" and K > HF_MAX_STEPS:
                errors[c].append(None)
                continue
            # options_for: imaml-hf line-searches, so it takes no inner_lr
            algo = make_algorithm(name, **options_for(name, loss="half_mse", lam=lam,
                                                      inner_steps=K, inner_lr=lr, **opts))
            grads, metrics = algo.meta_gradient(model, {"weight": theta}, lt.tasks)
            errors[c].append(syn.relative_error(grads["weight"].reshape(-1), exact))
    return {"steps": list(steps), "errors": errors, "lr": lr,
            "config": {"num_tasks": num_tasks, "d": d, "n_train": n_train, "n_test": n_test,
                       "lam": lam, "seed": seed, "dtype": "float64",
                       "spectrum_of_H": [float(s) for s in lt.spectrum.unique().flip(0)],
                       "condition_number_of_H": float(lt.spectrum.max() / lt.spectrum.min())}}


def plot(result: dict, path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    styles = {"maml": ("tab:red", "o", "-"), "imaml_cg2": ("tab:orange", "s", "-"),
              "imaml_cg5": ("tab:blue", "^", "-"), "imaml_cg5_lstsq_kernel": ("tab:cyan", "x", ":"),
              "fomaml": ("tab:gray", "v", "--"), "imaml_hf": ("tab:green", "d", "-")}
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=130)
    floor = 1e-16
    for c, errs in result["errors"].items():
        color, marker, ls = styles.get(c, (None, "o", "-"))
        pts = [(K, max(e, floor)) for K, e in zip(result["steps"], errs) if e is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], ls, color=color, marker=marker,
                label=LABELS.get(c, c), markersize=5)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("inner steps K (GD steps; Newton iterations for HF)")
    ax.set_ylabel(r"$\|g - g_{exact}\| / \|g_{exact}\|$")
    cfg = result["config"]
    ax.set_title(f"Fig. 2a: meta-gradient accuracy, linear regression (d={cfg['d']}, "
                 f"kappa(H)={cfg['condition_number_of_H']:.0e}, lam={cfg['lam']})", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(0.0, 0.42))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def table(result: dict) -> str:
    curves = list(result["errors"])
    rows = [[K] + [result["errors"][c][i] for c in curves] for i, K in enumerate(result["steps"])]
    return fmt_table(["K"] + curves, rows)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer K values (a few seconds)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    ap.add_argument("--tasks", type=int, default=16, help="tasks M")
    ap.add_argument("--steps", default=None, help="comma-separated K values (default: "
                    f"{','.join(map(str, STEPS))}; --quick: {','.join(map(str, QUICK_STEPS))})")
    ap.add_argument("--lam", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default=str(RESULTS))
    ap.add_argument("--name", default="fig2a_meta_gradient", help="output file stem")
    args = ap.parse_args(argv)
    dev = pick_device(args.device)
    t0 = time.perf_counter()
    steps = tuple(int(k) for k in args.steps.split(",")) if args.steps else \
        (QUICK_STEPS if args.quick else STEPS)
    result = compute(steps, num_tasks=args.tasks, lam=args.lam,
                     seed=args.seed, device=dev)
    result["seconds"] = time.perf_counter() - t0
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        plot(result, out / f"{args.name}.png")
    except ImportError as exc:  # matplotlib missing: the JSON and the table still come out
        result["plot_error"] = str(exc)
    result["labels"] = LABELS
    path = write_json(out / f"{args.name}.json", result, dev)
    print(table(result))
    print(f"\nwrote {path} and {path.with_suffix('.png')} ({result['seconds']:.1f} s; "
          f"{machine_line(__import__('json').loads(path.read_text())['environment'])})")
    return result


if __name__ == "__main__":
    main()
