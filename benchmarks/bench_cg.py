"""Batched CG on the least-squares operator A v = v + X^T X v / n, X: (B, n, d), 20 fixed
iterations, float32: imaml_ext's whole-loop op against, in the same run, a plain PyTorch batched
CG (in its fastest layout), scipy.sparse.linalg.cg per system, torchopt's solve_cg and
linear_operator's linear_cg. Before timing, every contender's x is checked against the float64
reference run for the same ITERS iterations from the same x0 (the iterate, not the exact
solution), to a bar (TOL) that float32 rounding passes and a run of 8 of the 20 iterations fails;
a contender that reports its iteration count and ran fewer is skipped too.
A probe timed in the same rounds, ITERS products torch.bmm(X, v) (one pass over X each), is a
reference point, not a bound: it gives the cost of ITERS bmm passes over X, against which our
iteration's cost is stated in passes and the two-bmm CG's in a speedup. A fused kernel can beat
it, since torch.bmm computing a matrix-vector product need not run at the memory's bandwidth
either: results/cg_cpu.json has our whole iteration at 0.87 and 0.20 such passes at the two
smaller sizes. A second probe, ITERS reads X.sum(), gives our iteration in reads of X and the
fastest peer's time over ITERS reads: about the most a CG reading X once per iteration could
beat that peer by on this host, where X overflows the caches (READ_PROBE; at B = 1 only).

    python benchmarks/bench_cg.py [--quick] [--device cpu|cuda] [--out benchmarks/results/cg_cpu.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

import imaml_ext
from imaml_ext import ops, reference
from imaml_ext.linalg import LstsqOperator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import git_commit  # noqa: E402

ITERS = 20
# The correctness bar: relative 2-norm error of x against the float64 reference's iterate after
# the same ITERS iterations from x0 = 0. Measured on the 2-core CPU (2026-11-28) at the sizes
# below and the tests' 2 x 40 x 30: float32 rounding errs 1.5e-7 to 8.0e-7 for imaml_ext and at
# most 1.6e-6 for any contender (torch's Gram-matrix CG at 8 x 500 x 2000; torchopt 0.7.3 and
# linear_operator 0.6.1 at most 8.4e-7); a run of 8 of the 20 iterations errs 3.8e-4 to 4.8e-4
# (1.2e-4 at 2 x 40 x 30), which the former bar of 1e-3 passed. 2e-5 leaves >= 12x either way;
# it catches a stop after 10 iterations or fewer (11 at the larger sizes), not after 12 (5e-6 to
# 1e-5) nor 19 (1e-8). An iteration count does, where a contender reports one (imaml_ext, its
# raw op and SciPy do; the plain PyTorch CG's loop is fixed, torchopt and linear_operator say
# nothing).
TOL = 2e-5
EARLY = 8  # each row records the float64 error of a run this short, to show the bar catches it
SIZES = [(32, 50, 200), (32, 500, 2000), (1, 4000, 4000)]
QUICK_SIZES = [(32, 50, 200), (8, 500, 2000)]
PROBE = "probe: one pass over X per product"
# A second probe, ITERS reductions X.sum() (one read of X each, torch's reduction, which streams
# at about the memory's read bandwidth): where X overflows the last-level cache, no CG that reads
# X once per iteration runs much faster than it, so the fastest peer's time over this probe's is
# about the most any one-pass CG can beat that peer by on this host (torch.sum need not reach
# the hardware's peak, so the ceiling is an estimate, not a bound). Timed at B = 1 only: with
# several systems the solver reads each system ITERS times before the next (so a system that fits
# in cache is read from cache), which ITERS reads of the whole batch are not comparable with.
READ_PROBE = "probe: one read of X (X.sum())"
# The same solve through the op alone (imaml_ext.ops.cg_solve_lstsq, no imaml_ext.cg wrapper),
# timed in the same rounds: what the public call adds. On an H100 (2026-11-27) the public call
# cost about 1 ms more per solve here than bench_kernels' back-to-back timing of the op.
RAW_OP = "diagnostic: imaml_ext op without the cg() wrapper"


def machine() -> dict:
    cpu = "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        cpu = next(line.split(":", 1)[1].strip() for line in out.splitlines()
                   if line.startswith("Model name"))
    except (OSError, StopIteration):
        pass
    info = {"platform": platform.platform(), "cpu": cpu, "threads": torch.get_num_threads(),
            "blas_thread_env": {k: os.environ.get(k) for k in BLAS_THREAD_VARS},
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "imaml_ext": imaml_ext.build_info(), "git_commit": git_commit(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


# Contenders whose threads are not torch's: SciPy's cg runs OpenBLAS, whose idle threads spin
# for 0.1-0.3 s after a call (and torch's OpenMP threads after torch's). Measured on the 2-core
# EPYC (2026-11-28, a 32 x 500 x 2000 solve): ours 25.8 ms alone, 66-71 ms right after OpenBLAS
# gemv calls (10-30 ms of sleep between them changed nothing, 100 ms left 39 ms, 300 ms 26.0 ms);
# OpenBLAS's calls 2.4 ms alone, 5.5 ms right after ours. In one process, rounds would time each
# contender partly against the other pool's spinning threads.
OTHER_POOL = {"scipy cg (per system)": "openblas"}
SETTLE_S = 0.3


def interleaved_times(fns: dict, device, min_time=1.0, max_rounds=50, pools=None) -> dict:
    """Seconds per call of each fn, in rounds: every round calls each fn once, in turn, so that a
    change of load on a shared machine affects all of them alike. One warm-up call each; at least
    5 rounds, then rounds until min_time has passed (or max_rounds). Each round starts one
    contender further on, so none always runs right after the same one.

    On a GPU each timed call follows an untimed call of the same fn, so that every contender is
    timed on a busy GPU: one left idle while a CPU-only peer runs drops its clocks (an H100
    reported 345 MHz idle), and a sub-millisecond solve timed from there would time the clocks'
    ramp. A suspect, not a finding: on an H100 (2026-11-27, before this warm call) our call
    measured 0.91 ms in these rounds against 0.10 ms for the op back to back in bench_kernels;
    the RAW_OP row and this warm call tell the wrapper's share from the clocks' next time.

    On the CPU, where a call's thread pool (pools[name], default torch's) differs from the last
    call's, the other pool's threads are given SETTLE_S to stop spinning and the fn one untimed
    call before its timed one (OTHER_POOL)."""
    pools = pools or {}
    for fn in fns.values():
        fn()
    sync(device)
    times = {k: [] for k in fns}
    order = list(fns.items())
    last_pool = pools.get(order[-1][0], "torch")  # the warm-up's last call
    start = time.perf_counter()
    while (len(times[order[0][0]]) < 5
           or (time.perf_counter() - start < min_time * len(fns)
               and len(times[order[0][0]]) < max_rounds)):
        k = len(times[order[0][0]]) % len(order)
        for name, fn in order[k:] + order[:k]:
            pool = pools.get(name, "torch")
            if device == "cuda":
                fn()
                sync(device)
            elif pool != last_pool:
                time.sleep(SETTLE_S)
                fn()
            last_pool = pool
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


# ---- the contenders: each returns x (B, d) after exactly ITERS iterations, or (x, the ------------
# iterations it reports having run per system) where it reports them --------------------------

def ours(X, b, n):
    # rtol = atol = 0: no early stop, exactly ITERS iterations.
    res = imaml_ext.cg(LstsqOperator(X, 1.0, 1.0 / n), b, batched=True, max_iter=ITERS,
                       rtol=0.0, atol=0.0)
    return res.x, res.iterations


def torch_cg(matvec, b):
    """Plain batched CG in PyTorch: fixed iterations, no host synchronisation."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = (r * r).sum(-1, keepdim=True)
    for _ in range(ITERS):
        Ap = matvec(p)
        alpha = rs / (p * Ap).sum(-1, keepdim=True)
        x = x + alpha * p
        r = r - alpha * Ap
        rs_new = (r * r).sum(-1, keepdim=True)
        p = r + (rs_new / rs) * p
        rs = rs_new
    return x


def torch_two_bmm(X, b, n):
    Xt = X.transpose(1, 2)
    return torch_cg(lambda v: v + torch.bmm(Xt, torch.bmm(X, v.unsqueeze(-1))).squeeze(-1) / n, b)


def torch_gram(X, b, n):
    A = torch.eye(X.shape[2], dtype=X.dtype, device=X.device) + X.transpose(1, 2) @ X / n
    return torch_cg(lambda v: torch.bmm(A, v.unsqueeze(-1)).squeeze(-1), b)


def scipy_cg(Xn, bn, n, device):
    """(x (B, d) on device, iterations run per system: counted by cg's per-iteration callback)."""
    import numpy as np
    from scipy.sparse.linalg import LinearOperator, cg
    out, iters = [], []
    for Xi, bi in zip(Xn, bn):
        d = Xi.shape[1]
        op = LinearOperator((d, d), matvec=lambda v, Xi=Xi: v + Xi.T @ (Xi @ v) / n,
                            dtype=Xi.dtype)
        ran = [0]
        x, _ = cg(op, bi, rtol=0.0, atol=0.0, maxiter=ITERS,
                  callback=lambda _x, ran=ran: ran.__setitem__(0, ran[0] + 1))
        out.append(x)
        iters.append(ran[0])
    return torch.from_numpy(np.stack(out)).to(device), iters


def counted(fn):
    """fn, and a list whose item counts its calls: the peers report no iteration count, and both
    TorchOpt's solve_cg and linear_operator's linear_cg apply the operator once to set up
    (r0 = b - A x0), then once an iteration (as in bench_kernels.counted), so calls - 1 is the
    iterations run; the 2e-5 error bar alone cannot tell a stop after 12-19 iterations."""
    calls = [0]

    def wrapped(*args):
        calls[0] += 1
        return fn(*args)
    return wrapped, calls


def torchopt_cg(X, b, n):
    from torchopt.linear_solve import solve_cg
    solve = solve_cg(maxiter=ITERS, rtol=0.0, atol=0.0)
    out, iters = [], []
    for Xi, bi in zip(X, b):
        mv, calls = counted(lambda v, Xi=Xi: v + Xi.T @ (Xi @ v) / n)
        out.append(solve(mv, bi))
        iters.append(calls[0] - 1)
    return torch.stack(out), iters


def linear_operator_cg(X, b, n):
    from linear_operator.utils import linear_cg
    Xt = X.transpose(1, 2)
    mv, calls = counted(lambda V: V + torch.bmm(Xt, torch.bmm(X, V)) / n)
    x = linear_cg(mv, b.unsqueeze(-1), max_iter=ITERS, tolerance=0.0, eps=0.0,
                  stop_updating_after=0.0, max_tridiag_iter=0)
    return x.squeeze(-1), [calls[0] - 1] * X.shape[0]


def check(row, name, out, truth) -> bool:
    """Records out's error against truth (and its iteration count where out reports one) in row;
    False, with the reason in row['skipped'], where it ran fewer than ITERS iterations or errs
    TOL or more."""
    x, iters = out if isinstance(out, tuple) else (out, None)
    err = ((x.double() - truth).norm() / truth.norm()).item()
    row["errors"][name] = err
    if iters is not None:
        ran = int(torch.as_tensor(iters).min())
        row["iterations_run"][name] = ran
        if ran < ITERS:
            row["skipped"][name] = f"ran {ran} of {ITERS} iterations (its own count)"
            return False
    if not err < TOL:
        row["skipped"][name] = (f"wrong answer: relative error {err:.2e} vs the float64 "
                                f"{ITERS}-iteration reference (bar {TOL:.0e})")
        return False
    return True


def run(sizes, device, min_time):
    rows = []
    for B, n, d in sizes:
        g = torch.Generator().manual_seed(B * n + d)
        X = torch.randn(B, n, d, generator=g).to(device)
        b = torch.randn(B, d, generator=g).to(device)
        X64, b64 = X.double(), b.double()
        truth = reference.cg_solve_lstsq(X64, b64, torch.zeros_like(b64), 1.0, 1.0 / n, ITERS,
                                         0.0, 0.0)[0]
        early = reference.cg_solve_lstsq(X64, b64, torch.zeros_like(b64), 1.0, 1.0 / n, EARLY,
                                         0.0, 0.0)[0]
        early_err = ((early - truth).norm() / truth.norm()).item()
        del X64, b64, early
        contenders = {
            "imaml_ext": lambda: ours(X, b, n),
            "torch (two bmm)": lambda: torch_two_bmm(X, b, n),
        }
        if B * d * d * 4 < 2e9:
            contenders["torch (Gram matrix)"] = lambda: torch_gram(X, b, n)
        Xn, bn = X.cpu().numpy(), b.cpu().numpy()
        peers = {
            "scipy cg (per system)": lambda: scipy_cg(Xn, bn, n, device),
            "torchopt solve_cg": lambda: torchopt_cg(X, b, n),
            "linear_operator linear_cg": lambda: linear_operator_cg(X, b, n),
        }
        row = {"B": B, "n": n, "d": d, "iterations": ITERS, "dtype": "float32", "times_s": {},
               "tolerance": TOL,
               "check": {"truth": f"float64 reference, the same {ITERS} iterations from x0 = 0",
                         "what": "relative 2-norm error of x; a contender passes below tolerance "
                                 "and, where it reports iterations, having run all of them",
                         f"error_after_{EARLY}_iterations": early_err,
                         f"bar_catches_{EARLY}_iterations": early_err >= TOL},
               "errors": {}, "iterations_run": {}, "skipped": {}}
        timed = {}
        # RAW_OP is timed in the same rounds (for the wrapper's share), so it is checked too.
        raw_op = (lambda: ops.cg_solve_lstsq(X, b, torch.zeros_like(b), 1.0, 1.0 / n, ITERS,
                                             0.0, 0.0)[:2])
        for name, fn in {**contenders, **peers, RAW_OP: raw_op}.items():
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    out = fn()
            except Exception as exc:  # a peer that fails to import or run is recorded, not fatal
                row["skipped"][name] = f"{type(exc).__name__}: {exc}"[:300]
                continue
            if check(row, name, out, truth):
                timed[name] = fn
        if "imaml_ext" not in timed:
            raise RuntimeError(f"bench_cg B={B} n={n} d={d}: imaml_ext failed its check, nothing "
                               f"to time against: {row['skipped'].get('imaml_ext')}")
        # The probe: ITERS matrix-vector products X v (torch.bmm, one pass over X each), timed in
        # the same rounds. A reference point, not a bound: it states our iteration's cost in bmm
        # passes over X (the two-bmm CG makes two), but a fused kernel can take less than one
        # (torch.bmm computing a matrix-vector product need not run at bandwidth either:
        # results/cg_cpu.json has our iteration at 0.87 and 0.20 passes at the smaller sizes).
        v1 = b.unsqueeze(-1)
        timed[PROBE] = lambda: [torch.bmm(X, v1) for _ in range(ITERS)]
        if B == 1:  # see READ_PROBE
            timed[READ_PROBE] = lambda: [X.sum() for _ in range(ITERS)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rounds = interleaved_times(timed, device, min_time=min_time, pools=OTHER_POOL)
        probe = rounds.pop(PROBE)
        reads = rounds.pop(READ_PROBE, None)
        raw = rounds.pop(RAW_OP, None)
        row["rounds"] = len(rounds["imaml_ext"])
        if device != "cuda":
            row["pool_switch"] = {"settle_s": SETTLE_S, "other_pools": OTHER_POOL,
                                  "what": "on a change of thread pool between calls: a sleep, "
                                          "then one untimed call of the next contender"}
        row["times_s"] = {k: statistics.median(v) for k, v in rounds.items()}
        row["min_times_s"] = {k: min(v) for k, v in rounds.items()}
        # Each round times every contender once, back to back, so a load change on a shared
        # machine hits all of them; the speedup is the median of the per-round ratios.
        row["speedups"] = {k: statistics.median(o / t for o, t in zip(v, rounds["imaml_ext"]))
                           for k, v in rounds.items() if k != "imaml_ext"}
        def ratio(a, b):  # median of per-round ratios
            return statistics.median(x / y for x, y in zip(a, b))

        # None when no other contender gave a finite answer (printed as such, not a crash)
        fastest = min(row["speedups"], key=row["speedups"].get) if row["speedups"] else None
        row["fastest_other"] = fastest
        row["speedup_vs_fastest_other"] = row["speedups"].get(fastest)
        row["one_pass_probe"] = {
            "what": f"{ITERS} x torch.bmm(X, v): one pass over X per product",
            "meaning": "a reference point, not a bound: imaml_ext's iteration in such passes "
                       "(below 1 where the fused loop beats torch.bmm's pass), and the two-bmm "
                       "CG's time over the probe's (the speedup of a CG costing exactly one such "
                       "pass per iteration)",
            "time_s": statistics.median(probe),
            "imaml_ext_passes_per_iteration": ratio(rounds["imaml_ext"], probe)}
        if "torch (two bmm)" in rounds:
            row["one_pass_probe"]["two_bmm_speedup_at_one_pass"] = ratio(
                rounds["torch (two bmm)"], probe)
        if reads is not None:  # one system: the probe reads X in the solver's order
            row["read_probe"] = {
                "what": f"{ITERS} x X.sum(): one read of X each",
                "meaning": "imaml_ext's iteration in reads of X (about 1 where X overflows the "
                           "last-level cache and the loop runs at the memory's read rate), and "
                           "the fastest other's time over the probe's: an estimate of the most a "
                           "CG reading X once per iteration could beat it by on this host",
                "time_s": statistics.median(reads),
                "imaml_ext_reads_per_iteration": ratio(rounds["imaml_ext"], reads)}
            if fastest is not None:
                row["read_probe"]["one_read_ceiling_vs_fastest_other"] = ratio(rounds[fastest],
                                                                               reads)
        if raw is not None:
            row["raw_op"] = {"what": RAW_OP, "time_s": statistics.median(raw),
                             "wrapper_s": statistics.median(
                                 t - r for t, r in zip(rounds["imaml_ext"], raw))}
        rows.append(row)
        print_row(row)
    return rows


def print_row(row):
    print(f"\nB={row['B']} n={row['n']} d={row['d']} ({row['iterations']} iterations, float32)")
    early = row["check"][f"error_after_{EARLY}_iterations"]
    print(f"  check: relative error < {row['tolerance']:.0e} against the float64 "
          f"{row['iterations']}-iteration reference (a run of {EARLY} iterations errs {early:.1e}"
          + ("" if row["check"][f"bar_catches_{EARLY}_iterations"] else
             ": NOT caught by the bar here; only reported iteration counts catch a short run")
          + ")")
    for name, t in sorted(row["times_s"].items(), key=lambda kv: kv[1]):
        ratio = row["speedups"].get(name, 1.0)
        print(f"  {name:28s} {t * 1e3:10.2f} ms (median of {row['rounds']})   {ratio:6.2f}x "
              f"imaml_ext's time   rel.err {row['errors'][name]:.1e}")
    for name, why in row["skipped"].items():
        print(f"  {name:28s} skipped: {why}")
    if row["fastest_other"] is None:
        print("  -> no other contender ran (all skipped above)")
    else:
        print(f"  -> imaml_ext is {row['speedup_vs_fastest_other']:.2f}x faster than the fastest "
              f"other ({row['fastest_other']})")
    for key, unit, cost, at_one, what in (
            ("one_pass_probe", "passes", "imaml_ext_passes_per_iteration",
             "two_bmm_speedup_at_one_pass", "pass per iteration would be {:.2f}x the two-bmm CG"),
            ("read_probe", "reads", "imaml_ext_reads_per_iteration",
             "one_read_ceiling_vs_fastest_other",
             "read per iteration would be {:.2f}x the fastest other")):
        probe = row.get(key)
        if probe:
            line = (f"  probe: {probe['what']}: {probe['time_s'] * 1e3:.2f} ms; imaml_ext's "
                    f"iteration costs {probe[cost]:.2f} such {unit}")
            if at_one in probe:
                line += "; a CG at exactly one such " + what.format(probe[at_one])
            print(line)
    raw = row.get("raw_op")
    if raw:
        print(f"  {raw['what']}: {raw['time_s'] * 1e3:.3f} ms; the wrapper adds "
              f"{raw['wrapper_s'] * 1e3:+.3f} ms per call (median of per-round differences)")


BLAS_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def limit_blas_threads(threads: int, argv: list) -> None:
    """Gives SciPy's BLAS (numpy's OpenBLAS, sized when numpy is first imported, which importing
    imaml_ext already did) the same thread count as torch: the process restarts itself once with
    the BLAS thread variables set. Without this a --threads 1 run pitted one torch thread against
    a two-thread SciPy."""
    want = str(threads)
    if all(os.environ.get(k) == want for k in BLAS_THREAD_VARS):
        return
    env = dict(os.environ, **{k: want for k in BLAS_THREAD_VARS})
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, str(Path(__file__).resolve())] + argv, env)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--min-time", type=float, default=2.0)
    ap.add_argument("--out", default=None,
                    help="JSON path (default: benchmarks/results/cg_<device>.json for a full "
                    "run; a --quick or --sizes run writes only where --out says, so that it "
                    "never replaces the committed results)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--sizes", default=None,
                    help="B,n,d triples separated by ';' (default: the three target sizes)")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = ap.parse_args(argv)
    if args.threads:
        limit_blas_threads(args.threads, argv)
        torch.set_num_threads(args.threads)
    sizes = QUICK_SIZES if args.quick else SIZES
    if args.sizes:
        try:
            sizes = [tuple(int(v) for v in t.split(",")) for t in args.sizes.split(";")]
            assert all(len(t) == 3 and min(t) > 0 for t in sizes)
        except (ValueError, AssertionError):
            ap.error(f"--sizes: expected positive B,n,d triples separated by ';', got {args.sizes!r}")
    if not imaml_ext.extension_available():
        # imaml_ext.cg would run the PyTorch twin under the name "imaml_ext"
        sys.exit("bench_cg: the compiled extension is not loaded ("
                 + imaml_ext.build_info()["reason"] + "); build it first: make build")
    rows = run(sizes, args.device, 0.3 if args.quick else args.min_time)
    result = {"benchmark": "bench_cg", "machine": machine(), "device": args.device,
              "command": " ".join([Path(sys.executable).name] + sys.argv),
              "load_average": list(os.getloadavg()), "results": rows}
    partial = args.quick or args.sizes
    if args.out or not partial:
        out = Path(args.out or f"benchmarks/results/cg_{args.device}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {out}")
    else:
        print("\n(a --quick / --sizes run: no JSON written; --out PATH writes one)")
    ran = [r["speedup_vs_fastest_other"] for r in rows if r["fastest_other"] is not None]
    if ran:
        targets = [r for r in rows if (r["B"], r["n"], r["d"]) in SIZES
                   and r["fastest_other"] is not None]
        note = ("(issue 5's target at its three sizes: >= 2x)" if len(targets) == len(SIZES)
                else "(not the target's three sizes: no verdict)")
        print(f"smallest speedup over the fastest other: {min(ran):.2f}x {note}")


if __name__ == "__main__":
    main()
