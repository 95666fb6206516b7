"""Shared benchmark helpers: the machine description, timing, peak memory and JSON output.

    from common import environment, time_call, peak_memory, write_json, sync

- `environment(device)`: torch / CUDA / cuDNN versions, the GPU or the CPU model (lscpu's
  "Model name"), cores and threads, the imaml_ext build, git commit, date: stored in every JSON.
- `time_call(fn, ...)` / `time_once(fn, device)`: wall-clock of calls that take milliseconds to
  minutes; synchronises the device around each call (CUDA events on a GPU); `summarize(times)`
  gives median, min, max and every repeat (for benchmarks that interleave their contenders).
- `autorange(fn, ...)`: torch.utils.benchmark's blocked_autorange, for microsecond-scale calls.
- `peak_memory(fn, device)`: the peak extra memory of one call: torch.cuda.max_memory_allocated
  on a GPU; on the CPU the resident-set high-water mark (VmHWM, reset through
  /proc/self/clear_refs after returning freed heap to the OS with malloc_trim), falling back to
  sampling VmRSS every millisecond where the reset is not permitted.
- `write_json(path, payload, device)`: payload plus {"environment": environment(device)}.

Run from the repository root or from benchmarks/; scripts put benchmarks/ on sys.path.
"""
from __future__ import annotations

import ctypes
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"


# ---- the machine -----------------------------------------------------------------------------

def _lscpu() -> dict[str, str]:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    info = {}
    for line in out.splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            info[k.strip()] = v.strip()
    return info


def cpu_description() -> dict[str, Any]:
    """CPU model, sockets/cores/threads (lscpu), logical CPUs usable by this process."""
    info = _lscpu()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count()
    return {"model": info.get("Model name", platform.processor() or "unknown"),
            "architecture": info.get("Architecture", platform.machine()),
            "sockets": info.get("Socket(s)"), "cores_per_socket": info.get("Core(s) per socket"),
            "threads_per_core": info.get("Thread(s) per core"),
            "logical_cpus": os.cpu_count(), "usable_cpus": usable,
            "flags_avx512": "avx512f" in info.get("Flags", ""),
            "torch_threads": torch.get_num_threads()}


def git_commit() -> str | None:
    """The tree's short commit, with "+dirty" when tracked files have uncommitted changes, so a
    result names the code that produced it."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + ("+dirty" if dirty else "")) if commit else None


def environment(device: str | torch.device = "cpu") -> dict[str, Any]:
    """Everything needed to interpret a number: versions, device, CPU, build, commit, date."""
    import imaml_ext  # noqa: PLC0415

    dev = torch.device(device)
    env = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "device": str(dev), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "python": platform.python_version(), "platform": platform.platform(),
           "cpu": cpu_description(), "imaml_ext": imaml_ext.build_info(),
           "git_commit": git_commit()}
    try:
        env["load_average"] = os.getloadavg()
    except OSError:  # pragma: no cover
        pass
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        env["gpu"] = {"name": p.name, "memory_bytes": p.total_memory,
                      "capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
                      "driver": _nvidia_driver()}
    return env


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def machine_line(env: dict[str, Any]) -> str:
    """One human line: the device the numbers come from."""
    if "gpu" in env:
        return f"{env['gpu']['name']} (torch {env['torch']}, CUDA {env['cuda']})"
    c = env["cpu"]
    return (f"{c['model']}, {c['usable_cpus']} usable CPU(s), {c['torch_threads']} torch "
            f"thread(s) (torch {env['torch']})")


# ---- timing -----------------------------------------------------------------------------------

def sync(device: str | torch.device) -> None:
    """Waits for the device's queued work (a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], Any], device: str | torch.device = "cpu") -> float:
    """Seconds of one call: CUDA events on a GPU (after a synchronisation, so queued work of
    earlier calls is not billed), time.perf_counter on the CPU."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(dev)
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def summarize(times: list[float]) -> dict[str, Any]:
    """{"median_s", "min_s", "max_s", "times_s", "repeats"} of a list of timings."""
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "times_s": list(times), "repeats": len(times)}


def time_call(fn: Callable[[], Any], *, device: str | torch.device = "cpu", repeats: int = 3,
              warmup: int = 1) -> dict[str, Any]:
    """Times `fn()` `repeats` times after `warmup` untimed calls (see time_once).

    Returns:
        {"median_s", "min_s", "max_s", "times_s", "repeats", "warmup"}.
    """
    for _ in range(warmup):
        fn()
    sync(device)
    out = summarize([time_once(fn, device) for _ in range(repeats)])
    out["warmup"] = warmup
    return out


def autorange(fn: Callable[[], Any], *, min_run_time: float = 0.2, label: str = "",
              num_threads: int | None = None) -> dict[str, Any]:
    """torch.utils.benchmark.Timer(...).blocked_autorange for short calls; median and IQR."""
    from torch.utils import benchmark  # noqa: PLC0415

    t = benchmark.Timer(stmt="fn()", globals={"fn": fn}, label=label,
                        num_threads=num_threads or torch.get_num_threads())
    m = t.blocked_autorange(min_run_time=min_run_time)
    return {"median_s": m.median, "iqr_s": m.iqr, "runs": len(m.times),
            "number_per_run": m.number_per_run}


# ---- memory -----------------------------------------------------------------------------------

def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory(fn: Callable[[], Any], device: str | torch.device = "cpu") -> dict[str, Any]:
    """Peak extra memory (bytes) of one call of fn, and how it was measured.

    GPU: torch.cuda.max_memory_allocated above the memory allocated before the call.
    CPU: VmHWM - VmRSS before the call, after resetting the high-water mark; where the reset
    is not permitted, the maximum of VmRSS sampled every millisecond on a side thread.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        sync(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        fn()
        sync(dev)
        return {"peak_bytes": int(torch.cuda.max_memory_allocated(dev) - base),
                "method": "torch.cuda.max_memory_allocated"}
    _malloc_trim()
    base = _status_kib("VmRSS")
    if base is None:
        fn()
        return {"peak_bytes": None, "method": "unavailable (no /proc)"}
    try:
        Path("/proc/self/clear_refs").write_text("5")
        reset = _status_kib("VmHWM") is not None and _status_kib("VmHWM") <= base + 1024
    except OSError:
        reset = False
    if reset:
        fn()
        return {"peak_bytes": int((_status_kib("VmHWM") - base) * 1024),
                "method": "VmHWM - VmRSS (high-water mark reset via /proc/self/clear_refs)"}
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            v = _status_kib("VmRSS")
            if v is not None and v > peak[0]:
                peak[0] = v
            time.sleep(0.001)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        fn()
    finally:
        stop.set()
        th.join()
    return {"peak_bytes": int((peak[0] - base) * 1024), "method": "VmRSS sampled every 1 ms"}


# ---- output -----------------------------------------------------------------------------------

def write_json(path: str | Path, payload: dict[str, Any],
               device: str | torch.device = "cpu") -> Path:
    """Writes payload + {"environment": ...} as indented JSON; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = dict(payload)
    data.setdefault("environment", environment(device))
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=_jsonable) + "\n")
    return path


def _jsonable(obj):
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, (torch.dtype, torch.device, Path)):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def pick_device(name: str | None) -> torch.device:
    """--device: 'cpu', 'cuda' (error if absent) or None/'auto' (cuda when available)."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is available")
    return dev


def fmt_table(header: list[str], rows: list[list[Any]]) -> str:
    """A plain-text table (numbers in %.3g)."""
    def cell(v):
        if isinstance(v, float):
            return f"{v:.3g}"
        return "-" if v is None else str(v)
    cells = [[cell(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)
