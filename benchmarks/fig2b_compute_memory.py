"""Paper Fig. 2b: compute and memory of one meta-gradient against the number of inner steps
(MAML, first-order MAML, iMAML-GD, iMAML-HF) and against CG steps (iMAML), on 20-way 5-shot
Omniglot with the 4-block conv net (random images of the right shape: cost does not depend on
pixel values).

Memory: on CUDA, torch.cuda.max_memory_allocated during the meta-gradient (reset before); on the
CPU, each point runs in a fresh process with a fixed glibc mmap threshold and reports the peak
resident-set growth during the meta-gradient (malloc_trim, then VmHWM reset through
/proc/self/clear_refs after a warm-up call), i.e. what the allocator took from the OS.

    python benchmarks/fig2b_compute_memory.py [--device cpu|cuda] [--quick] [--out PATH.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment  # noqa: E402

ALGOS = ("maml", "fomaml", "imaml-gd", "imaml-hf")


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def measure_point(algo: str, inner_steps: int, cg_steps: int, device: str, meta_batch: int,
                  ways: int, shots: int, repeats: int) -> dict:
    """One meta-gradient configuration: median time and peak memory (this process)."""
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
        grads, metrics = alg.meta_gradient(model, params, tasks)
        if device == "cuda":
            torch.cuda.synchronize()
        return grads

    once()  # warm-up: lazy initialisation, allocator growth of the first call
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        # Give the warm-up's freed memory back to the OS (the child runs with a fixed mmap
        # threshold, so large tensors are mapped and unmapped), then reset the high-water mark.
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        base = _rss_kib("VmRSS") * 1024
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _rss_kib("VmHWM") * 1024 - base
    return {"algo": algo, "inner_steps": inner_steps, "cg_steps": cg_steps,
            "time_s": statistics.median(times), "peak_bytes": int(peak)}


def run_in_fresh_process(args_list: list[str], timeout: float = 3600) -> dict:
    # A fixed mmap threshold: glibc would otherwise raise it after the warm-up frees large
    # blocks and then serve the measured run from memory it already holds (no RSS growth).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    out = subprocess.run([sys.executable, __file__, "--point", *args_list], capture_output=True,
                         text=True, timeout=timeout, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"point {args_list} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description="Paper Fig. 2b: compute and memory vs steps")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="fewer points and a smaller meta-batch")
    ap.add_argument("--meta-batch", type=int, default=None)
    ap.add_argument("--ways", type=int, default=20)
    ap.add_argument("--shots", type=int, default=5)
    ap.add_argument("--out", default=None)
    ap.add_argument("--point-timeout", type=float, default=3600,
                    help="seconds one CPU point may take before it is recorded as failed")
    ap.add_argument("--point", nargs=4, metavar=("ALGO", "INNER", "CG", "MB"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.point:  # child process: one configuration, JSON on the last stdout line
        algo, inner, cg, mb = args.point
        res = measure_point(algo, int(inner), int(cg), args.device, int(mb), args.ways, args.shots,
                            repeats=1 if args.device == "cpu" else 3)
        print(json.dumps(res))
        return

    on_gpu = args.device == "cuda"
    meta_batch = args.meta_batch or (4 if args.quick else (32 if on_gpu else 8))
    inner_grid = [1, 5, 25, 100] if args.quick else [1, 5, 10, 25, 50, 100]
    cg_grid = [1, 5, 20] if args.quick else [1, 2, 5, 10, 20]
    points = [(a, k, 5) for a in ALGOS for k in inner_grid]
    points += [("imaml-gd", 10, c) for c in cg_grid]
    out = Path(args.out or f"benchmarks/results/fig2b_{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    # Every measured point is written to a partial file at once, so an interrupted run (a
    # point can take many minutes on a CPU) is resumed by running the same command again.
    partial = out.with_suffix(".partial.json")
    setting = {"device": args.device, "ways": args.ways, "shots": args.shots,
               "meta_batch": meta_batch}
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
                res = measure_point(algo, k, c, args.device, meta_batch, args.ways, args.shots, 3)
            except torch.cuda.OutOfMemoryError as exc:
                res = {"algo": algo, "inner_steps": k, "cg_steps": c,
                       "error": f"CUDA out of memory: {str(exc)[:200]}"}
        else:
            try:
                res = run_in_fresh_process([algo, str(k), str(c), str(meta_batch),
                                            "--device", args.device, "--ways", str(args.ways),
                                            "--shots", str(args.shots)],
                                           timeout=args.point_timeout)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                res = {"algo": algo, "inner_steps": k, "cg_steps": c, "error": str(exc)[-500:]}
        rows.append(res)
        if "error" in res:
            failed.append(res)
            print(f"{algo:9s} inner={k:4d} cg={c:3d}  FAILED: {res['error'][-200:]}", flush=True)
        else:
            print(f"{algo:9s} inner={k:4d} cg={c:3d}  {res['time_s'] * 1e3:9.1f} ms  "
                  f"{res['peak_bytes'] / 2**20:9.1f} MiB", flush=True)
        if "error" not in res:
            done[(algo, k, c)] = res
        tmp = partial.with_suffix(".tmp")
        tmp.write_text(json.dumps({"setting": setting, "rows": list(done.values())}, indent=1))
        os.replace(tmp, partial)
    failed_rows = failed
    rows = [r for r in rows if "error" not in r]

    def series(algo, key="inner_steps", cg=5):
        pts = [r for r in rows if r["algo"] == algo and (key == "cg_steps" or r["cg_steps"] == cg)]
        if key == "cg_steps":
            pts = [r for r in rows if r["algo"] == algo and r["inner_steps"] == 10]
        return sorted(pts, key=lambda r: r[key])

    summary = {}
    for algo in ALGOS:
        s = series(algo)
        if not s:
            continue
        lo, hi = s[1] if len(s) > 1 else s[0], s[-1]
        summary[f"{algo}: memory at {hi['inner_steps']} / {lo['inner_steps']} inner steps"] = \
            round(hi["peak_bytes"] / max(lo["peak_bytes"], 1), 3)
    s = series("imaml-gd", "cg_steps")
    if s:
        summary[f"imaml-gd: memory at {s[-1]['cg_steps']} / {s[0]['cg_steps']} CG steps"] = \
            round(s[-1]["peak_bytes"] / max(s[0]["peak_bytes"], 1), 3)

    result = {"benchmark": "fig2b_compute_memory", "device": args.device,
              "gpu": torch.cuda.get_device_name() if on_gpu else None,
              "torch": torch.__version__, "ways": args.ways, "shots": args.shots,
              "meta_batch": meta_batch, "memory": "cuda max_memory_allocated" if on_gpu else
              "peak RSS growth during the meta-gradient, fresh process per point",
              "rows": rows, "failed": failed_rows, "summary": summary,
              "command": " ".join(["python"] + sys.argv),
              "environment": environment(args.device)}
    out.write_text(json.dumps(result, indent=2) + "\n")
    if not failed_rows:
        partial.unlink(missing_ok=True)
    plot(rows, out.with_suffix(".png"), args.device, meta_batch, args.ways, args.shots)
    print(json.dumps(summary, indent=2))
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
        s = sorted([r for r in rows if r["algo"] == algo and r["cg_steps"] == 5],
                   key=lambda r: r["inner_steps"])
        ks = [r["inner_steps"] for r in s]
        axes[0].plot(ks, [r["time_s"] for r in s], "o-", label=algo)
        axes[1].plot(ks, [r["peak_bytes"] / 2**20 for r in s], "o-", label=algo)
    s = sorted([r for r in rows if r["algo"] == "imaml-gd" and r["inner_steps"] == 10],
               key=lambda r: r["cg_steps"])
    axes[2].plot([r["cg_steps"] for r in s], [r["peak_bytes"] / 2**20 for r in s], "o-",
                 label="imaml-gd (10 inner steps)")
    axes[0].set(xlabel="inner steps", ylabel="seconds per meta-gradient", xscale="log",
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
