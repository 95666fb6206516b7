"""Paper Fig. 2b: compute and memory of one meta-gradient against the number of inner steps
(MAML, first-order MAML, iMAML-GD, iMAML-HF) and against CG steps (iMAML), on 20-way 5-shot
Omniglot with the 4-block conv net (random images of the right shape: cost does not depend on
pixel values).

Each point: one untimed warm-up call, then --repeats timed calls (default 3); the JSON keeps every
call's seconds and peak memory, the median and the minimum; time_s is the median, peak_bytes the
largest of the calls' peaks. Memory of each timed call (common.peak_memory, reset before every
call): on CUDA torch.cuda.max_memory_allocated above what was allocated before it; on the CPU
each point runs in a fresh process with a fixed glibc mmap threshold and reports the resident-set
high-water mark above the RSS before the call (malloc_trim, then VmHWM reset through
/proc/self/clear_refs), i.e. what the allocator took from the OS.

The point (iMAML-GD, 10 inner steps, 5 CG steps) lies on both the inner-steps curve (when 10 is
in the grid) and the CG-steps curve: it is measured once and its row names both curves.

    python benchmarks/fig2b_compute_memory.py [--device cpu|cuda] [--quick] [--repeats N]
        [--algos A,B] [--inner-steps 1,5,...] [--cg-steps 1,5,...] [--out PATH.json]
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, peak_memory, summarize, sync, time_once  # noqa: E402

ALGOS = ("maml", "fomaml", "imaml-gd", "imaml-hf")
INNER_CG = 5    # CG steps of the iMAML points on the inner-steps curve
CG_INNER = 10   # inner steps of the CG-steps curve (iMAML-GD)
FLAT_TOL = 0.05  # "flat": largest / smallest peak memory - 1, from 5 steps on


def grid(algos, inner_grid, cg_grid) -> list[tuple[str, int, int]]:
    """The (algo, inner steps, CG steps) points of both curves, each once, in measuring order."""
    points = [(a, k, INNER_CG) for a in algos for k in inner_grid]
    if "imaml-gd" in algos:
        points += [("imaml-gd", CG_INNER, c) for c in cg_grid]
    return list(dict.fromkeys(points))


def curves(row) -> list[str]:
    """The curves a row belongs to ("inner_steps", "cg_steps" or both)."""
    out = ["inner_steps"] if row["cg_steps"] == INNER_CG else []
    if row["algo"] == "imaml-gd" and row["inner_steps"] == CG_INNER:
        out.append("cg_steps")
    return out


def measure_point(algo: str, inner_steps: int, cg_steps: int, device: str, meta_batch: int,
                  ways: int, shots: int, repeats: int, warmup: int = 1) -> dict:
    """One meta-gradient configuration in this process: `warmup` untimed calls, then `repeats`
    timed ones, each with its own peak memory (the peak is reset before every call)."""
    from imaml_ext.algorithms import make_algorithm
    from imaml_ext.models import make_model
    from imaml_ext.types import TaskBatch

    torch.manual_seed(0)
    model = make_model("omniglot", ways).to(device)
    params = {k: v.detach() for k, v in model.named_parameters()}
    M, n = meta_batch, ways * shots
    tasks = TaskBatch(torch.rand(M, n, 1, 28, 28, device=device),
                      torch.arange(ways, device=device).repeat_interleave(shots).expand(M, n).contiguous(),
                      torch.rand(M, n, 1, 28, 28, device=device),
                      torch.arange(ways, device=device).repeat_interleave(shots).expand(M, n).contiguous())
    kw = dict(lam=2.0, inner_steps=inner_steps, inner_lr=0.1)
    if algo.startswith("imaml"):
        kw["cg_steps"] = cg_steps
    alg = make_algorithm(algo, **kw)

    def once():
        alg.meta_gradient(model, params, tasks)  # the result is dropped: freed before the next

    for _ in range(warmup):  # lazy initialisation, allocator growth of the first call
        once()
    sync(device)
    times, peaks, methods = [], [], []
    for _ in range(repeats):
        # peak_memory returns the warm-up's / the previous call's freed memory to the OS (the
        # CPU child runs with a fixed mmap threshold) and resets the high-water mark first;
        # time_once inside it leaves that reset out of the time.
        t = []
        mem = peak_memory(lambda: t.append(time_once(once, device)), device)
        times.append(t[0])
        peaks.append(mem["peak_bytes"])
        methods.append(mem["method"])
    timing = summarize(times)
    return {"algo": algo, "inner_steps": inner_steps, "cg_steps": cg_steps,
            "time_s": timing["median_s"], "min_s": timing["min_s"], "max_s": timing["max_s"],
            "times_s": timing["times_s"], "repeats": repeats, "warmup": warmup,
            "peak_bytes": None if None in peaks else int(max(peaks)),
            "peak_bytes_per_call": peaks, "memory_method": sorted(set(methods))}


def run_in_fresh_process(args_list: list[str], timeout: float = 3600) -> dict:
    # A fixed mmap threshold: glibc would otherwise raise it after the warm-up frees large
    # blocks and then serve the measured run from memory it already holds (no RSS growth).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    out = subprocess.run([sys.executable, __file__, "--point", *args_list], capture_output=True,
                         text=True, timeout=timeout, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"point {args_list} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _algos(text: str) -> list[str]:
    algos = [a for a in text.split(",") if a]
    bad = [a for a in algos if a not in ALGOS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown algorithm(s) {bad}; choose from {ALGOS}")
    return algos


def _series(rows, algo, key):
    """The rows of one curve ("inner_steps": CG steps INNER_CG; "cg_steps": iMAML-GD at CG_INNER
    inner steps), sorted by its x value."""
    return sorted([r for r in rows if r["algo"] == algo and key in curves(r)], key=lambda r: r[key])


def shape_checks(rows) -> dict:
    """The expected shape: MAML's memory grows with inner steps; iMAML's (and first-order
    MAML's) is flat within FLAT_TOL from 5 inner steps on, and iMAML-GD's from 5 CG steps on
    (the summary gives the whole range's ratio too)."""
    checks = {}
    s = _series(rows, "maml", "inner_steps")
    if len(s) > 1:
        mem = [r["peak_bytes"] for r in s]
        checks["maml: memory grows with inner steps"] = {
            "ok": all(b > a for a, b in zip(mem, mem[1:])),
            "peak_bytes": mem, "inner_steps": [r["inner_steps"] for r in s]}
    flat = [(a, "inner_steps") for a in ("fomaml", "imaml-gd", "imaml-hf")]
    for algo, key in flat + [("imaml-gd", "cg_steps")]:
        # the criterion: flat "from 5 to 100 steps", in inner and in CG steps alike
        s = [r for r in _series(rows, algo, key) if r[key] >= 5]
        if len(s) > 1:
            mem = [r["peak_bytes"] for r in s]
            spread = max(mem) / max(min(mem), 1) - 1
            checks[f"{algo}: memory flat in {key.replace('_', ' ')} (within {FLAT_TOL:.0%})"] = {
                "ok": spread <= FLAT_TOL, "spread": round(spread, 4),
                key: [r[key] for r in s]}
    return checks


def main(argv=None):
    ap = argparse.ArgumentParser(description="Paper Fig. 2b: compute and memory vs steps")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="fewer points and a smaller meta-batch")
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed calls per point after one untimed warm-up (median and min kept)")
    ap.add_argument("--algos", type=_algos, default=list(ALGOS),
                    help=f"comma-separated subset of {','.join(ALGOS)}")
    ap.add_argument("--inner-steps", type=_ints, default=None,
                    help="inner-steps grid (default 1,5,10,25,50,100; --quick 1,5,25,100)")
    ap.add_argument("--cg-steps", type=_ints, default=None,
                    help=f"CG-steps grid at {CG_INNER} inner steps (default 1,2,5,10,20; "
                         "--quick 1,5,20)")
    ap.add_argument("--meta-batch", type=int, default=None)
    ap.add_argument("--ways", type=int, default=20)
    ap.add_argument("--shots", type=int, default=5)
    ap.add_argument("--out", default=None)
    ap.add_argument("--point-timeout", type=float, default=None,
                    help="seconds one CPU point may take before it is recorded as failed "
                         "(default 1800 per call: 1800 x (1 + --repeats))")
    ap.add_argument("--point", nargs=4, metavar=("ALGO", "INNER", "CG", "MB"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")

    if args.point:  # child process: one configuration, JSON on the last stdout line
        algo, inner, cg, mb = args.point
        res = measure_point(algo, int(inner), int(cg), args.device, int(mb), args.ways, args.shots,
                            repeats=args.repeats)
        print(json.dumps(res))
        return

    command = shlex.join(["python", "benchmarks/fig2b_compute_memory.py",
                          *(sys.argv[1:] if argv is None else argv)])
    env = environment(args.device)  # at the start: the commit and tree state that ran

    on_gpu = args.device == "cuda"
    meta_batch = args.meta_batch or (4 if args.quick else (32 if on_gpu else 8))
    inner_grid = args.inner_steps or ([1, 5, 25, 100] if args.quick else [1, 5, 10, 25, 50, 100])
    cg_grid = args.cg_steps or ([1, 5, 20] if args.quick else [1, 2, 5, 10, 20])
    points = grid(args.algos, inner_grid, cg_grid)
    out = Path(args.out or f"benchmarks/results/fig2b_{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    # Every measured point is written to a partial file at once, so an interrupted run (a
    # point can take many minutes on a CPU) is resumed by running the same command again.
    partial = out.with_suffix(".partial.json")
    setting = {"device": args.device, "ways": args.ways, "shots": args.shots,
               "meta_batch": meta_batch, "repeats": args.repeats, "warmup": 1}
    done = {}
    if partial.exists():
        try:
            prev = json.loads(partial.read_text())
            if prev.get("setting") == setting:
                done = {(r["algo"], r["inner_steps"], r["cg_steps"]): r for r in prev["rows"]}
                print(f"resuming from {partial}: {len(done)} points measured", flush=True)
        except (ValueError, KeyError, TypeError) as exc:
            print(f"ignoring unreadable {partial}: {exc}", flush=True)
    rows, failed = [], []
    for algo, k, c in points:
        if (algo, k, c) in done:
            res = done[(algo, k, c)]
        elif on_gpu:
            torch.cuda.empty_cache()
            try:
                res = measure_point(algo, k, c, args.device, meta_batch, args.ways, args.shots,
                                    args.repeats)
            except torch.cuda.OutOfMemoryError as exc:
                res = {"algo": algo, "inner_steps": k, "cg_steps": c,
                       "error": f"CUDA out of memory: {str(exc)[:200]}"}
        else:
            try:
                res = run_in_fresh_process([algo, str(k), str(c), str(meta_batch),
                                            "--device", args.device, "--ways", str(args.ways),
                                            "--shots", str(args.shots),
                                            "--repeats", str(args.repeats)],
                                           timeout=args.point_timeout
                                           or 1800.0 * (1 + args.repeats))
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                res = {"algo": algo, "inner_steps": k, "cg_steps": c, "error": str(exc)[-500:]}
        if (algo, k, c) not in done and "error" not in res:
            res["git_commit"] = env["git_commit"]  # a resumed row keeps the commit it ran at
        res["curves"] = curves(res)
        rows.append(res)
        if "error" in res:
            failed.append(res)
            print(f"{algo:9s} inner={k:4d} cg={c:3d}  FAILED: {res['error'][-200:]}", flush=True)
        else:
            print(f"{algo:9s} inner={k:4d} cg={c:3d}  {res['time_s'] * 1e3:9.1f} ms median "
                  f"(min {res['min_s'] * 1e3:.1f}, {res['repeats']} calls)  "
                  f"{res['peak_bytes'] / 2**20:9.1f} MiB", flush=True)
        if "error" not in res:
            done[(algo, k, c)] = res
        tmp = partial.with_suffix(".tmp")
        tmp.write_text(json.dumps({"setting": setting, "rows": list(done.values())}, indent=1))
        os.replace(tmp, partial)
    failed_rows = failed
    rows = [r for r in rows if "error" not in r]

    summary = {}
    for algo in ALGOS:
        s = _series(rows, algo, "inner_steps")
        if not s:
            continue
        lo, hi = s[1] if len(s) > 1 else s[0], s[-1]
        summary[f"{algo}: memory at {hi['inner_steps']} / {lo['inner_steps']} inner steps"] = \
            round(hi["peak_bytes"] / max(lo["peak_bytes"], 1), 3)
    s = _series(rows, "imaml-gd", "cg_steps")
    if s:
        summary[f"imaml-gd: memory at {s[-1]['cg_steps']} / {s[0]['cg_steps']} CG steps"] = \
            round(s[-1]["peak_bytes"] / max(s[0]["peak_bytes"], 1), 3)

    shape = shape_checks(rows)
    commit = env["git_commit"]
    result = {"benchmark": "fig2b_compute_memory", "device": args.device,
              "gpu": torch.cuda.get_device_name() if on_gpu else None,
              "cpu": env["cpu"]["model"], "torch": torch.__version__,
              "git_commit": commit,
              "git_dirty": None if commit is None else commit.endswith("+dirty"),
              "date": env["date"],
              "ways": args.ways, "shots": args.shots, "meta_batch": meta_batch,
              "repeats": args.repeats, "warmup": 1,
              "timing": "time_s: median of the timed calls after the warm-up; min_s, max_s and "
                        "every call in times_s",
              "memory": ("cuda max_memory_allocated" if on_gpu else
                         "peak RSS growth during the meta-gradient, fresh process per point")
                        + ", reset before each timed call; peak_bytes: the largest",
              "shared_point": (f"(imaml-gd, {CG_INNER}, {INNER_CG}) is measured once; its row "
                               "lists every curve it belongs to under 'curves'"),
              "rows": rows, "failed": failed_rows, "summary": summary, "shape": shape,
              "command": command, "environment": env}
    out.write_text(json.dumps(result, indent=2) + "\n")
    if not failed_rows:
        partial.unlink(missing_ok=True)
    plot(rows, out.with_suffix(".png"), args.device, meta_batch, args.ways, args.shots)
    print(json.dumps(summary, indent=2))
    for name, c in shape.items():
        print(f"{'ok  ' if c['ok'] else 'FAIL'}  {name}")
    print(f"wrote {out} and {out.with_suffix('.png')}")
    if failed_rows:
        print(f"{len(failed_rows)} point(s) failed (listed under 'failed'); run the same command "
              f"again to retry only them ({partial} keeps the measured ones)")
        sys.exit(1)


def plot(rows, path, device, meta_batch, ways, shots):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG")
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for algo in ALGOS:
        s = _series(rows, algo, "inner_steps")
        if not s:
            continue
        ks = [r["inner_steps"] for r in s]
        axes[0].plot(ks, [r["time_s"] for r in s], "o-", label=algo)
        axes[1].plot(ks, [r["peak_bytes"] / 2**20 for r in s], "o-", label=algo)
    s = _series(rows, "imaml-gd", "cg_steps")
    axes[2].plot([r["cg_steps"] for r in s], [r["peak_bytes"] / 2**20 for r in s], "o-",
                 label=f"imaml-gd ({CG_INNER} inner steps)")
    axes[0].set(xlabel="inner steps", ylabel="median seconds per meta-gradient", xscale="log",
                yscale="log", title="compute")
    axes[1].set(xlabel="inner steps", ylabel="peak memory (MiB)", xscale="log",
                title="memory vs inner steps")
    axes[2].set(xlabel="CG steps", ylabel="peak memory (MiB)", title="memory vs CG steps")
    for a in axes[1:]:  # from zero, no offset: a flat curve must look flat
        a.set_ylim(bottom=0, top=max(a.get_ylim()[1], 1.0) * 1.05)
        a.ticklabel_format(axis="y", useOffset=False, style="plain")
    for a in axes:
        a.legend()
        a.grid(alpha=0.3)
    fig.suptitle(f"Fig. 2b: {ways}-way {shots}-shot Omniglot conv net, meta-batch {meta_batch}, "
                 f"{device}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
