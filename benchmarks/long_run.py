"""Long-run stability of meta-training (not a test): memory and step time over 1,000 meta-steps.

    python benchmarks/long_run.py                       # 1,000 steps of iMAML-GD on the CPU
    python benchmarks/long_run.py --steps 200 --json /tmp/x.json

Runs the real trainer (imaml_ext.train.Trainer: sampler, algorithm, masked Adam, metrics log,
a checkpoint every 100 steps) on Omniglot (IMAML_DATA, else the embedded subset) with a small
configuration: iMAML-GD 5-way 1-shot, 1 query per class, meta-batch 4, 5 inner GD steps, 5 CG
steps, one intra-op thread. At a set of steps it records:
- resident memory: VmRSS (and the high-water mark VmHWM) from /proc/self/status;
- the native allocator: bytes in use by glibc malloc (mallinfo2: arena + mmap'd blocks), which is
  where torch's CPU tensors live (torch has no CPU allocator statistics of its own);
- Python objects: pymalloc's allocated blocks and gc's object count at every mark, and tracemalloc
  over two windows of 20 steps ending at step 100 and at the last step (tracemalloc slows the
  trainer by ~40%, so it is not left on): the bytes allocated in the window and still alive at its
  end (a leak shows as a positive rate) and the window's allocation peak;
- open file descriptors and threads (leaks of log files, checkpoints or worker pools).
Verdicts: growth from step 100 to the last step under 5% for RSS, malloc in-use and tracemalloc;
step-time drift = median step time of steps 50-150 against the last 100 steps.

Writes the JSON (default benchmarks/results/long_run_cpu.json) and prints a summary. The load
average of the machine at the start and the end is recorded: on a shared machine step times move
with the neighbours' load, which the drift figure cannot tell apart from the trainer's own.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                               "usmblks", "fsmblks", "uordblks", "fordblks",
                                               "keepcost")]


def malloc_in_use() -> int | None:
    """Bytes allocated through glibc malloc and not freed (small blocks + mmap'd blocks)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _Mallinfo2
    except (OSError, AttributeError):
        return None
    m = libc.mallinfo2()
    return int(m.uordblks + m.hblkhd)


def proc_status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "Threads"):
                out[key] = int(rest.split()[0]) * (1024 if key != "Threads" else 1)
    return out


def sample(step: int) -> dict:
    st = proc_status()
    return {"step": step, "rss_bytes": st.get("VmRSS"), "rss_peak_bytes": st.get("VmHWM"),
            "malloc_in_use_bytes": malloc_in_use(), "pymalloc_blocks": sys.getallocatedblocks(),
            "gc_objects": len(gc.get_objects()), "open_fds": len(os.listdir("/proc/self/fd")),
            "threads": st.get("Threads")}


def growth(a, b):
    return None if a in (None, 0) or b is None else b / a - 1.0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--algo", default="imaml-gd")
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--queries", type=int, default=1)
    p.add_argument("--meta-batch", type=int, default=4)
    p.add_argument("--inner-steps", type=int, default=5)
    p.add_argument("--cg-steps", type=int, default=5)
    p.add_argument("--hvp", default="exact")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (shared machine: 1)")
    p.add_argument("--ckpt-every", type=int, default=100)
    p.add_argument("--data-root", default=os.environ.get("IMAML_DATA"),
                   help="Omniglot root (default $IMAML_DATA; without it the embedded subset)")
    p.add_argument("--window", type=int, default=20,
                   help="steps of each tracemalloc window (0: none)")
    p.add_argument("--out", default=None, help="run directory (default: a temp dir)")
    p.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "long_run_cpu.json"))
    args = p.parse_args(argv)

    sys.path.insert(0, str(REPO))
    from imaml_ext import build_info, train as tr
    from imaml_ext.config import TrainConfig

    torch.set_num_threads(args.threads)
    out = args.out or tempfile.mkdtemp(prefix="imaml-long-run-")
    cfg = TrainConfig(dataset="omniglot", ways=args.ways, shots=args.shots, queries=args.queries,
                      algo=args.algo, steps=args.steps, meta_batch=args.meta_batch,
                      inner_steps=args.inner_steps, cg_steps=args.cg_steps, hvp=args.hvp,
                      data_root=args.data_root, val_every=0, ckpt_every=args.ckpt_every,
                      log_every=1, quiet=True, out=out)
    load_start = os.getloadavg()
    t_build = time.perf_counter()
    trainer = tr.Trainer(cfg, dist_info=tr.DistInfo())
    build_s = time.perf_counter() - t_build
    marks = sorted({1, 10, 50, 100, args.steps} | set(range(100, args.steps + 1, 100)))
    ref_step = min(100, args.steps)
    windows = {}   # end step -> tracemalloc figures of the window ending there
    starts = {max(e - args.window, 0): e for e in (ref_step, args.steps)} if args.window else {}
    times, samples = [time.perf_counter()], []

    def on_log(row):
        if row.get("kind") != "train":
            return
        times.append(time.perf_counter())
        step = int(row["step"])
        if tracemalloc.is_tracing() and step in starts.values():
            cur, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            w = next(s for s, e in starts.items() if e == step)
            windows[step] = {"steps": f"{w + 1}-{step}", "retained_bytes": cur,
                             "retained_bytes_per_step": cur / max(step - w, 1),
                             "peak_bytes": peak}
        if step in marks:
            samples.append(sample(step))
            s = samples[-1]
            print(f"step {step:5d}  {1e3 * (times[-1] - times[-2]):7.1f} ms  "
                  f"RSS {s['rss_bytes'] / 2**20:7.1f} MiB  malloc "
                  f"{(s['malloc_in_use_bytes'] or 0) / 2**20:7.1f} MiB  "
                  f"pymalloc blocks {s['pymalloc_blocks']}  fds {s['open_fds']}", flush=True)
        if step in starts:
            tracemalloc.start()

    t0 = time.perf_counter()
    if 0 in starts:
        tracemalloc.start()
    summary = trainer.run(on_log=on_log)
    wall = time.perf_counter() - t0
    load_end = os.getloadavg()
    step_s = [b - a for a, b in zip(times, times[1:])]   # step_s[i] = step i + 1
    n = len(step_s)
    early = step_s[49:150] if n >= 150 else step_s[: max(n // 10, 1)]
    late = step_s[-100:] if n >= 200 else step_s[-max(n // 10, 1):]
    at = {s["step"]: s for s in samples}
    first, last = at.get(100, samples[0]), at[max(at)]
    rss_from = [x for x in samples if x["step"] >= first["step"]]
    res = {
        "what": "long-run stability of imaml_ext.train.Trainer on the CPU",
        "config": {k: getattr(cfg, k) for k in ("algo", "ways", "shots", "queries", "meta_batch",
                                                "inner_steps", "cg_steps", "hvp", "steps",
                                                "ckpt_every")},
        "data": trainer.train_data.source, "threads": args.threads,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "load_average_start": load_start, "load_average_end": load_end,
                    "python": platform.python_version(), "torch": torch.__version__,
                    "extension": build_info()},
        "wall_s": wall, "build_s": build_s, "steps_done": summary["step"],
        "skipped_tasks": summary["skipped_tasks"], "bad_steps": summary["bad_steps"],
        "samples": samples, "tracemalloc_windows": windows,
        "step_time_s": {"median_50_150": statistics.median(early),
                        "median_last_100": statistics.median(late),
                        "drift": statistics.median(late) / statistics.median(early) - 1.0,
                        "p10_all": sorted(step_s)[n // 10], "p90_all": sorted(step_s)[9 * n // 10]},
        "growth_from_step_100": {
            "rss": growth(first["rss_bytes"], last["rss_bytes"]),
            # the resident set moves by several % between samples (the allocator's pools): the
            # median of three samples from step 100 on against that of the last three
            "rss_median3": growth(*(statistics.median(x["rss_bytes"] for x in part)
                                    for part in (rss_from[:3], rss_from[-3:]))),
            "malloc_in_use": growth(first["malloc_in_use_bytes"], last["malloc_in_use_bytes"]),
            "pymalloc_blocks": growth(first["pymalloc_blocks"], last["pymalloc_blocks"]),
            "tracemalloc_window_peak": growth(windows.get(ref_step, {}).get("peak_bytes"),
                                              windows.get(args.steps, {}).get("peak_bytes")),
            "gc_objects": growth(first["gc_objects"], last["gc_objects"]),
            "open_fds": last["open_fds"] - first["open_fds"],
            "threads": last["threads"] - first["threads"]},
    }
    g = res["growth_from_step_100"]
    res["verdict"] = {
        "rss_growth_under_5pct": g["rss_median3"] is not None and g["rss_median3"] < 0.05,
        "malloc_growth_under_5pct": g["malloc_in_use"] is None or g["malloc_in_use"] < 0.05,
        "python_growth_under_5pct": (g["pymalloc_blocks"] < 0.05 and (
            g["tracemalloc_window_peak"] is None or g["tracemalloc_window_peak"] < 0.05)),
        "no_fd_or_thread_leak": g["open_fds"] <= 0 and g["threads"] <= 0,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(res, indent=2) + "\n")

    st = res["step_time_s"]
    pct = lambda v: "n/a" if v is None else f"{100 * v:+.2f}%"  # noqa: E731
    print(f"\n{summary['step']} meta-steps of {cfg.algo} {cfg.ways}-way {cfg.shots}-shot "
          f"(meta-batch {cfg.meta_batch}, {cfg.inner_steps} inner, {cfg.cg_steps} CG) in "
          f"{wall / 60:.1f} min on {args.threads} thread(s); load average {load_start[0]:.1f} -> "
          f"{load_end[0]:.1f}")
    print(f"step 100 -> {last['step']}: RSS {first['rss_bytes'] / 2**20:.1f} -> "
          f"{last['rss_bytes'] / 2**20:.1f} MiB ({pct(g['rss'])}; medians of 3 samples "
          f"{pct(g['rss_median3'])}); malloc in use "
          f"{pct(g['malloc_in_use'])}; pymalloc blocks {pct(g['pymalloc_blocks'])}; gc objects "
          f"{pct(g['gc_objects'])}; fds {g['open_fds']:+d}, threads {g['threads']:+d}")
    for end, w in sorted(windows.items()):
        print(f"tracemalloc steps {w['steps']}: peak {w['peak_bytes'] / 2**20:.2f} MiB, still "
              f"alive at the end {w['retained_bytes'] / 2**10:.1f} KiB "
              f"({w['retained_bytes_per_step'] / 2**10:.2f} KiB/step)")
    print(f"step time: median 50-150 {1e3 * st['median_50_150']:.1f} ms, last 100 "
          f"{1e3 * st['median_last_100']:.1f} ms, drift {pct(st['drift'])}")
    print("verdict:", ", ".join(f"{k}={v}" for k, v in res["verdict"].items()))
    print(f"wrote {args.json}")
    return 0 if all(res["verdict"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
