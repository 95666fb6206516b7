"""Loads the compiled extension once, or falls back to the pure-PyTorch reference.

- The extension missing (not built, or IMAML_EXT_DISABLE=1): one warning, then every op runs its
  reference twin from imaml_ext/reference.py.
- The extension built against another torch: ImportError naming both versions and the command
  that rebuilds it (a .so belongs to the torch it was compiled with).
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import re
from pathlib import Path

import torch

log = logging.getLogger("imaml_ext")

REBUILD = ("pip install --no-build-isolation . in the source tree (-e . for a checkout; "
           "or: make build)")

_C = None
_reason = ""


def _built_torch_version() -> str | None:
    """The torch the extension beside this file was built against (None without one: a
    _build_meta.json left in a source tree whose _C was installed elsewhere says nothing)."""
    here = Path(__file__).parent
    if not any(here.glob("_C*")):
        return None
    meta = here / "_build_meta.json"
    try:
        return json.loads(meta.read_text())["torch_version"]
    except (OSError, ValueError, KeyError):
        return None


def _load():
    global _C, _reason
    if os.environ.get("IMAML_EXT_DISABLE", "").strip() not in ("", "0"):
        _reason = "IMAML_EXT_DISABLE is set"
        return
    built = _built_torch_version()
    if built is not None and built != torch.__version__:
        raise ImportError(
            f"imaml_ext's compiled extension was built against torch {built}, but torch "
            f"{torch.__version__} is installed; rebuild it with: {REBUILD}")
    try:
        # (importlib, not `from imaml_ext import _C`: a missing _C then reads "No module named
        # 'imaml_ext._C'", not a message about a circular import)
        mod = importlib.import_module("imaml_ext._C")
    except ImportError as exc:
        if "undefined symbol" in str(exc) and built != torch.__version__:
            raise ImportError(
                f"imaml_ext's compiled extension does not match torch {torch.__version__} "
                f"(built against {built or 'an unknown version'}): {exc}; rebuild it with: "
                f"{REBUILD}") from exc
        if "undefined symbol" in str(exc):
            raise ImportError(f"imaml_ext's compiled extension failed to load: {exc}; rebuild it "
                              f"with: {REBUILD}") from exc
        _reason = f"the compiled extension is missing ({exc})"
        log.warning("imaml_ext: %s; using the pure-PyTorch reference ops. Build it with: %s",
                    _reason, REBUILD)
        return
    info = mod.build_info()
    if info["torch_version"] != torch.__version__:
        raise ImportError(
            f"imaml_ext's compiled extension was built against torch {info['torch_version']}, "
            f"but torch {torch.__version__} is installed; rebuild it with: {REBUILD}")
    _C = mod


_load()


def available() -> bool:
    """True when the compiled ops are loaded (False means the reference fallback is used)."""
    return _C is not None


def build_info() -> dict:
    """What was built: {'extension', 'cpu', 'cuda', 'cuda_archs', 'torch_version', 'cpu_simd',
    'cpu_parallel'} ('cpu_parallel': "openmp" when the CPU kernels use torch's threads).

    With no extension loaded, 'extension' is False and 'reason' says why.
    """
    if _C is None:
        return {"extension": False, "reason": _reason, "cpu": False, "cuda": False,
                "cuda_archs": "", "torch_version": torch.__version__, "cpu_simd": None,
                "cpu_parallel": None}
    return {"extension": True, **_C.build_info()}


_warned_no_cuda = False


def _warn_no_cuda_kernels() -> None:
    """Once per process: CUDA tensors met a build without CUDA kernels (USE_CUDA=0, or no
    toolkit at build time), so every op runs its PyTorch twin there, silently slower."""
    global _warned_no_cuda
    if not _warned_no_cuda:
        _warned_no_cuda = True
        log.warning("imaml_ext: the compiled extension has no CUDA kernels (built without a CUDA "
                    "toolkit, or with USE_CUDA=0): ops on CUDA tensors run their PyTorch twins. "
                    "Rebuild with the toolkit present: %s", REBUILD)


def archs_run_on(archs: str, capability: tuple[int, int]) -> bool | None:
    """Whether kernels compiled for ``archs`` (TORCH_CUDA_ARCH_LIST's syntax, as recorded in
    build_info()["cuda_archs"]: "9.0", "8.0;8.6+PTX", "9.0a") run on a GPU of compute
    ``capability`` (major, minor). None when it cannot tell (an empty list, or an arch given by
    name such as "Hopper").

    A cubin for X.Y runs on X.Z for Z >= Y (X.Ya only on X.Y itself, X.Yf on X.Z, Z >= Y); PTX
    for X.Y is compiled by the driver for any GPU of capability >= X.Y (not arch-specific PTX,
    X.Ya or X.Yf).
    """
    tokens = [t for t in re.split(r"[;,\s]+", archs.strip()) if t]
    if not tokens:
        return None
    major, minor = capability
    for token in tokens:
        ptx = token.upper().endswith("+PTX")
        m = re.fullmatch(r"(\d+)\.(\d+)([af]?)", token[:-4] if ptx else token)
        if m is None:
            return None
        x, y, suffix = int(m.group(1)), int(m.group(2)), m.group(3)
        if x == major and (y == minor if suffix == "a" else y <= minor):
            return True
        if ptx and not suffix and (x, y) <= (major, minor):  # X.Ya / X.Yf PTX: not forward
            return True
    return False


_cuda_ok: dict[int, bool] = {}


def _cuda_kernels_run_on(device: torch.device) -> bool:
    """Whether this build's CUDA kernels can run on ``device`` (cached per GPU). A build for
    other archs (e.g. 9.0, the default when no GPU is visible at build time, on an A100) logs
    one warning per GPU and its ops run their PyTorch twins there, instead of failing with
    "no kernel image is available" at the first launch."""
    if not build_info()["cuda"]:
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    ok = _cuda_ok.get(index)
    if ok is None:
        archs = build_info()["cuda_archs"]
        cap = torch.cuda.get_device_capability(index)
        ok = _cuda_ok[index] = archs_run_on(archs, cap) is not False
        if not ok:
            log.warning("imaml_ext: the CUDA kernels were built for %s, which %s (compute "
                        "capability %d.%d) cannot run: ops on it run their PyTorch twins. "
                        "Rebuild for it: TORCH_CUDA_ARCH_LIST=%d.%d %s", archs,
                        torch.cuda.get_device_name(index), cap[0], cap[1], cap[0], cap[1],
                        REBUILD)
    return ok


def use_ext_for(use_ext: bool | None, *tensors: torch.Tensor) -> bool:
    """Resolves a public function's `use_ext` argument.

    None picks the compiled kernel when it is loaded and has a kernel for the tensors' device;
    True insists (an error says why it cannot); False forces the reference.
    """
    if use_ext is not None and not isinstance(use_ext, bool):
        # `is False` below would take 0 or "no" for True
        raise ValueError(f"use_ext must be None, True or False, got {use_ext!r}")
    if use_ext is False:
        return False
    if _C is None:
        if use_ext:
            raise RuntimeError(f"use_ext=True but the compiled extension is not loaded: {_reason}")
        return False
    cuda = [t.device for t in tensors if t.device.type == "cuda"]
    if cuda and not build_info()["cuda"]:
        if use_ext:
            raise RuntimeError("use_ext=True but the extension was built without CUDA kernels; "
                               f"rebuild on a machine with CUDA: {REBUILD}")
        _warn_no_cuda_kernels()
        return False
    bad = next((d for d in cuda if not _cuda_kernels_run_on(d)), None)
    if bad is not None:
        if use_ext:
            cap = torch.cuda.get_device_capability(bad)
            raise RuntimeError(f"use_ext=True but the CUDA kernels were built for "
                               f"{build_info()['cuda_archs']}, which {bad} (compute capability "
                               f"{cap[0]}.{cap[1]}) cannot run; rebuild with "
                               f"TORCH_CUDA_ARCH_LIST={cap[0]}.{cap[1]}: {REBUILD}")
        return False
    other = next((t.device for t in tensors if t.device.type not in ("cpu", "cuda")), None)
    if other is not None:
        if use_ext:
            raise RuntimeError(f"use_ext=True but the compiled ops have no kernels for "
                               f"{other.type} tensors")
        return False
    return True
