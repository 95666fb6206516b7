"""implicit_root's backward pass, eager against cuda_graph=True (one CUDA graph replay).

A probe, not a benchmark: what the drop-in implicit-gradient API gains on a GPU from replaying
its backward (the optimality function at z*, max_iter adjoint CG steps through autograd, the
gradient for the outer variables) as one graph, where each eager step is a handful of small
kernels launched from Python. The problem is hyper-parameter learning for B independent
L2-regularised logistic regressions (X (B, n, d), labels y (B, n), one log-penalty each):

    F(w, X, y, log_alpha) = X^T (sigmoid(X w) - y) / n + exp(log_alpha) w     (dF/dw SPD)

X and y travel as arguments (the way a graph sees new data), log_alpha gets the gradient. Each
setting times one forward + backward both ways in interleaved rounds (medians) after a first
call that captures, checks that both give the same gradient, and reports the speed-up. On a
machine without CUDA only the eager backward is timed.

    python benchmarks/probes/root_graph.py [--device cuda] [--rounds 20] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from imaml_ext.implicit import implicit_root

SETTINGS = {"B32_n256_d64": (32, 256, 64), "B4_n2048_d512": (4, 2048, 512)}


def F(w, X, y, log_alpha):
    r = torch.sigmoid(torch.bmm(X, w.unsqueeze(-1)).squeeze(-1)) - y
    return torch.bmm(r.unsqueeze(1), X).squeeze(1) / X.shape[1] + log_alpha.exp().unsqueeze(1) * w


def problem(B, n, d, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(B, n, d, generator=g).div_(d ** 0.5).to(device)
    y = (torch.rand(B, n, generator=g) < 0.5).float().to(device)
    log_alpha = torch.full((B,), -2.0, device=device)
    w = torch.zeros(B, d, device=device)
    with torch.no_grad():  # an approximate root: the backward's cost does not depend on it
        for _ in range(30):
            w -= 2.0 * F(w, X, y, log_alpha)
    return w, X, y, log_alpha


def step(w, X, y, log_alpha, iters, graph):
    la = log_alpha.detach().requires_grad_(True)
    z = implicit_root(F, w, X, y, la, batched=True, max_iter=iters, rtol=0.0,
                      cuda_graph=graph, check=False)
    (g,) = torch.autograd.grad(z.pow(2).sum(), la)
    return g


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--iters", type=int, default=20, help="adjoint CG steps (max_iter)")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--out", default=None, help="JSON file to write")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    graphs = device.type == "cuda"
    report = {"probe": "root_graph", "device": str(device), "torch": torch.__version__,
              "iters": args.iters, "rounds": args.rounds, "settings": {}, "summary_lines": []}
    if graphs:
        report["card"] = torch.cuda.get_device_name(device)
    for name in args.settings.split(","):
        B, n, d = SETTINGS[name]
        data = problem(B, n, d, device)
        entry = {"B": B, "n": n, "d": d}
        modes = [False, True] if graphs else [False]
        for graph in modes:  # the first calls: warm-up, and the capture for cuda_graph=True
            t, g = timed(lambda: step(*data, args.iters, graph), device)
            entry["first_call_s" + ("_graph" if graph else "")] = t
        times = {m: [] for m in modes}
        grads = {}
        for _ in range(args.rounds):
            for graph in modes:
                t, grads[graph] = timed(lambda: step(*data, args.iters, graph), device)
                times[graph].append(t)
        med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
        entry["eager_s"] = med(times[False])
        line = (f"{name} ({args.iters} CG steps): eager forward + backward "
                f"{entry['eager_s'] * 1e3:.3f} ms")
        if graphs:
            entry["graph_s"] = med(times[True])
            entry["speedup"] = entry["eager_s"] / entry["graph_s"]
            diff = float((grads[True] - grads[False]).norm() / grads[False].norm())
            entry["rel_diff"] = diff
            line += (f", cuda_graph=True {entry['graph_s'] * 1e3:.3f} ms: {entry['speedup']:.2f}x "
                     f"(capture {entry['first_call_s_graph']:.2f} s once; gradients differ by "
                     f"{diff:.1e})")
        else:
            line += "; cuda_graph=True needs a CUDA device"
        line += f" (medians of {args.rounds} interleaved rounds)"
        print(line)
        report["summary_lines"].append(line)
        report["settings"][name] = entry
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
