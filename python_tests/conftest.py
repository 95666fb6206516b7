"""Shared fixtures: devices and dtypes of the op tests, STYLE.md's tolerance rule, and a loader
for the benchmark scripts that tests run."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

import imaml_ext

CUDA = torch.cuda.is_available()
# what times or counts the compiled ops themselves (a pure install, IMAML_NO_EXT=1, has none)
needs_ext = pytest.mark.skipif(not imaml_ext.extension_available(),
                               reason="compiled extension not built")

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="no CUDA device"))]
DTYPES = [torch.float32, torch.float64]

DATA_ROOT = os.environ.get("IMAML_DATA")
BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load_benchmark(name: str):
    """benchmarks/<name>.py as a module (benchmarks/ on sys.path while it imports its helpers)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return mod


def write_junit(path, cases) -> None:
    """A pytest junit file with one testcase per (module, name, inner XML) in `cases` (inner:
    "" for a pass, '<failure message="x"/>', '<skipped message="x"/>')."""
    body = "".join(f'<testcase classname="python_tests.{mod}" name="{name}">{inner}</testcase>'
                   for mod, name, inner in cases)
    Path(path).write_text(f'<testsuites><testsuite name="pytest">{body}</testsuite></testsuites>')


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-tensor tests (``pytestmark =
    pytest.mark.usefixtures("one_thread")``): on a shared 2-core machine a thread pool only adds
    contention to them."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(params=DTYPES, ids=["f32", "f64"])
def dtype(request):
    return request.param


def max_err(a: torch.Tensor, truth: torch.Tensor) -> float:
    return (a.double() - truth.double()).abs().max().item() if a.numel() else 0.0


def assert_within_reference_error(kernel: torch.Tensor, reference: torch.Tensor,
                                  truth: torch.Tensor, factor: float = 2.0) -> None:
    """STYLE.md's rule: the kernel's error against a float64 truth is at most `factor` times the
    reference's error in the same dtype, plus 32 ulps of the truth's scale: on one small instance
    the reference can be exact by luck (test_properties.py holds the kernel to 1.25x the
    reference's error averaged over many systems, where luck evens out)."""
    ek, er = max_err(kernel, truth), max_err(reference, truth)
    scale = truth.double().abs().max().item() if truth.numel() else 0.0
    slack = 32 * torch.finfo(kernel.dtype).eps * max(scale, 1.0)
    assert ek <= factor * er + slack, f"kernel error {ek:.3e} > {factor} x reference error {er:.3e}"


def random_spd(B: int, P: int, dtype=torch.float64, device="cpu", cond: float = 100.0,
               generator=None):
    """(B, P, P) symmetric positive definite matrices with eigenvalues in [1, cond]."""
    q, _ = torch.linalg.qr(torch.randn(B, P, P, dtype=torch.float64, generator=generator))
    ev = torch.logspace(0, float(torch.log10(torch.tensor(cond))), P, dtype=torch.float64)
    A = q @ torch.diag_embed(ev.expand(B, P)) @ q.transpose(1, 2)
    A = (A + A.transpose(1, 2)) / 2
    return A.to(device=device, dtype=dtype)
