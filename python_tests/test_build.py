"""What was built, the fallback to the reference ops, and the torch-version guard."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import imaml_ext


def run_py(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)


def test_build_info_fields():
    info = imaml_ext.build_info()
    assert set(info) >= {"extension", "cpu", "cuda", "cuda_archs", "torch_version", "cpu_simd",
                         "cpu_parallel"}
    assert info["torch_version"] == torch.__version__
    if info["extension"]:
        assert info["cpu"] is True
        # Without OpenMP at::parallel_for silently runs every CPU kernel on one thread.
        assert info["cpu_parallel"] == "openmp"
        assert info["cpu_simd"] in ("avx512 (x86-64-v4)", "avx2+fma (x86-64-v3)", "baseline")
        if info["cuda"]:
            assert info["cuda_archs"]


def test_disable_env_forces_reference():
    proc = run_py("import imaml_ext, torch;"
                  "print(imaml_ext.build_info()['extension']);"
                  "r = imaml_ext.cg(lambda v: 2 * v, torch.ones(3, dtype=torch.float64));"
                  "print(r.x.tolist())", IMAML_EXT_DISABLE="1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["False", "[0.5, 0.5, 0.5]"]


def test_use_ext_true_without_extension_says_why():
    proc = run_py("import imaml_ext, torch;"
                  "imaml_ext.cg(lambda v: v, torch.ones(2), use_ext=True)", IMAML_EXT_DISABLE="1")
    assert proc.returncode != 0 and "IMAML_EXT_DISABLE is set" in proc.stderr


@pytest.mark.skipif(not imaml_ext.extension_available(), reason="compiled extension not built")
def test_other_torch_version_is_refused():
    proc = run_py("import torch; torch.__version__ = '0.0.1'; import imaml_ext")
    assert proc.returncode != 0
    assert "ImportError" in proc.stderr
    assert "0.0.1" in proc.stderr and "pip install --no-build-isolation -e ." in proc.stderr


def test_missing_extension_warns_once_and_falls_back():
    code = """
import importlib.abc, logging, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == 'imaml_ext._C':
            raise ImportError('No module named imaml_ext._C')
sys.meta_path.insert(0, Block())
logging.basicConfig(level=logging.WARNING)
import imaml_ext, torch
import imaml_ext.ops
print(imaml_ext.build_info()['extension'])
print(imaml_ext.cg(lambda v: 4 * v, torch.ones(2, dtype=torch.float64)).x.tolist())
"""
    proc = run_py(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["False", "[0.25, 0.25]"]
    assert proc.stderr.count("using the pure-PyTorch reference ops") == 1
