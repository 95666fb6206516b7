"""What was built, the fallback to the reference ops, and the torch-version guard."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

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
    assert "0.0.1" in proc.stderr and "pip install --no-build-isolation ." in proc.stderr


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


# An op's argument error: the message formats numbers, which a private (static) copy of the C++
# runtime inside _C breaks (see setup.py's shared_libstdcxx): on the lent H100 every such error
# ended the process with a segfault, here (LDFLAGS=-static-libstdc++) it came out cut at "[".
BAD_POOL = ("import sys, torch, imaml_ext\n"
            "f = dict(dtype=torch.float64, device=sys.argv[1])\n"
            "h, w, b = torch.randn(2, 3, 4, 4, **f), torch.ones(3, **f), torch.zeros(3, **f)\n"
            "try:\n"
            "    torch.ops.imaml_ext.pooled_bn_forward(h, w, b, 1e-5, [3, 3], [2, 2], False)\n"
            "except ValueError as e:\n"
            "    print(str(e).splitlines()[0])\n")


@pytest.mark.skipif(not imaml_ext.extension_available(), reason="compiled extension not built")
def test_op_errors_reach_python_whole(device):
    # in a process of its own, so that a crash fails this test instead of ending the session
    r = subprocess.run([sys.executable, "-c", BAD_POOL, device], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, f"the process died ({r.returncode}): {r.stderr[-3000:]}"
    assert r.stdout.strip() == (
        "pooled_bn_forward: kernel_size must be >= 1 and stride >= kernel_size (disjoint "
        "windows), got kernel_size [3, 3], stride [2, 2]"), r.stdout


def setup_functions(*names: str) -> dict:
    """Functions of setup.py, without running its setup()."""
    import ast
    import re
    import shlex
    import sysconfig
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "setup.py"
    ns = dict(os=os, re=re, shlex=shlex, shutil=shutil, subprocess=subprocess, sys=sys,
              sysconfig=sysconfig, Path=Path)
    for node in ast.parse(path.read_text()).body:
        name = getattr(node, "name", None) or (
            isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
            and node.targets[0].id)
        if name in names:
            exec(compile(ast.Module([node], []), str(path), "exec"), ns)
    return ns


@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("nm") is None
                    or shutil.which("c++") is None, reason="needs Linux, nm and a C++ compiler")
def test_build_refuses_a_private_cxx_runtime(tmp_path):
    ns = setup_functions("CXX_RUNTIME_SYMBOLS", "shared_libstdcxx", "check_cxx_runtime")
    from pathlib import Path
    shared = ns["shared_libstdcxx"]()
    assert shared and Path(shared[0]).exists() and "libstdc++.so.6" in shared[0]
    src = tmp_path / "t.cpp"
    src.write_text('#include <sstream>\n#include <string>\n'
                   'std::string f(long x) { std::ostringstream s; s << x; return s.str(); }\n')
    for name, extra in (("static.so", []), ("fixed.so", shared)):
        subprocess.run(["c++", "-shared", "-fPIC", "-static-libstdc++", str(src), "-o",
                        str(tmp_path / name), *extra], check=True, timeout=120)
    with pytest.raises(RuntimeError, match="holds a private copy of the C.. runtime"):
        ns["check_cxx_runtime"](tmp_path / "static.so")
    # the shared library named first: refused no more
    assert ns["check_cxx_runtime"](tmp_path / "fixed.so") is False
    if imaml_ext.extension_available():  # and this build passes it
        assert ns["check_cxx_runtime"](Path(imaml_ext._ext._C.__file__)) is False
    # the GPU suite's build warns instead (a refused build would cost a whole lease)
    os.environ["IMAML_PRIVATE_CXX_RUNTIME"] = "warn"
    try:
        assert ns["check_cxx_runtime"](tmp_path / "static.so") is True
    finally:
        del os.environ["IMAML_PRIVATE_CXX_RUNTIME"]


class _FakeTorch:
    """What setup.py's checks read of torch."""

    def __init__(self, file, version="2.14.1+cu130", cuda="13.0"):
        self.__file__ = file
        self.__version__ = version
        self.version = type("v", (), {"cuda": cuda})()
        self.cuda = type("c", (), {"is_available": staticmethod(lambda: False)})()


def test_setup_stops_a_build_against_pip_isolations_torch(tmp_path, monkeypatch):
    # pip's default build isolation compiled against the newest torch it could fetch; the
    # installed package then refused to import with the user's torch
    ns = setup_functions("_flag", "check_not_isolated")
    ns["torch"] = _FakeTorch("/tmp/pip-build-env-abc123/overlay/lib/python3.11/site-packages/"
                             "torch/__init__.py")
    monkeypatch.delenv("IMAML_ALLOW_ISOLATED", raising=False)
    with pytest.raises(SystemExit, match="pip install --no-build-isolation"):
        ns["check_not_isolated"]()
    monkeypatch.setenv("IMAML_ALLOW_ISOLATED", "1")
    ns["check_not_isolated"]()
    monkeypatch.delenv("IMAML_ALLOW_ISOLATED")
    ns["torch"] = _FakeTorch(str(tmp_path / "venv/lib/site-packages/torch/__init__.py"))
    ns["check_not_isolated"]()  # an ordinary environment


def test_setup_cuda_requests_that_cannot_be_met_say_why(tmp_path, monkeypatch):
    ns = setup_functions("_flag", "_off", "want_cuda", "LIBRARY_HEADERS",
                         "nvidia_wheel_includes")
    ns["_cuda_home"] = str(tmp_path / "cuda")
    ns["torch"] = _FakeTorch(str(tmp_path / "site/torch/__init__.py"), "2.13.0+cpu", None)
    monkeypatch.setenv("FORCE_CUDA", "1")
    # a CPU-only torch: was torch's "CUDA_HOME environment variable is not set" with it set
    with pytest.raises(SystemExit, match=r"torch 2.13.0\+cpu is a CPU-only build"):
        ns["want_cuda"]()
    monkeypatch.setenv("USE_CUDA", "off")
    assert ns["want_cuda"]() is False
    monkeypatch.delenv("USE_CUDA")
    # the library headers torch's CUDA headers include: found in the wheels, or a clear stop
    # (nvcc failed on cusparse.h after every CPU file before)
    ns["torch"] = _FakeTorch(str(tmp_path / "site/torch/__init__.py"))
    (tmp_path / "cuda/include").mkdir(parents=True)
    with pytest.raises(SystemExit, match=r"cusparse.h \(which torch's CUDA headers include\)"):
        ns["nvidia_wheel_includes"]()
    inc = tmp_path / "site/nvidia/cu13/include"
    inc.mkdir(parents=True)
    for h in ns["LIBRARY_HEADERS"]:
        (inc / h).write_text("")
    (tmp_path / "site/nvidia/cudnn/include").mkdir(parents=True)
    assert ns["nvidia_wheel_includes"]() == [str(inc)]  # that one only, not cuDNN's
    for h in ns["LIBRARY_HEADERS"]:
        (tmp_path / "cuda/include" / h).write_text("")
    assert ns["nvidia_wheel_includes"]() == []  # the toolkit has them


def test_a_build_record_without_its_extension_is_ignored(tmp_path):
    # a non-editable install wrote _build_meta.json into the source tree too, where no _C is:
    # importing from that tree with another torch then failed instead of falling back
    import ast
    import json
    src = Path(imaml_ext._ext.__file__)
    fn = next(n for n in ast.parse(src.read_text()).body
              if getattr(n, "name", None) == "_built_torch_version")
    (tmp_path / "_build_meta.json").write_text('{"torch_version": "0.0.1"}')
    ns = {"Path": Path, "json": json, "__file__": str(tmp_path / "_ext.py")}
    exec(compile(ast.Module([fn], []), str(src), "exec"), ns)
    assert ns["_built_torch_version"]() is None  # no _C beside it
    (tmp_path / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    assert ns["_built_torch_version"]() == "0.0.1"


def test_cuda_tensors_on_a_build_without_cuda_kernels_warn_once(monkeypatch, caplog):
    # they ran the PyTorch twins silently (a GPU machine whose build found no toolkit)
    import logging
    from imaml_ext import _ext

    class FakeCuda:
        device = torch.device("cuda")
    if _ext._C is None:
        pytest.skip("compiled extension not built")
    monkeypatch.setattr(_ext, "build_info", lambda: {"cuda": False})
    monkeypatch.setattr(_ext, "_warned_no_cuda", False)
    with caplog.at_level(logging.WARNING, logger="imaml_ext"):
        assert _ext.use_ext_for(None, FakeCuda()) is False
        assert _ext.use_ext_for(None, FakeCuda()) is False
        assert _ext.use_ext_for(None, torch.zeros(1, device="meta")) is False
    assert caplog.text.count("has no CUDA kernels") == 1


@pytest.mark.parametrize("archs,cap,want", [
    ("9.0", (9, 0), True), ("9.0", (8, 0), False), ("9.0", (10, 0), False),
    ("8.0", (8, 6), True), ("8.6", (8, 0), False), ("8.0;9.0", (9, 0), True),
    ("9.0+PTX", (10, 0), True), ("9.0+PTX", (8, 9), False), ("9.0a", (9, 0), True),
    ("9.0a", (9, 1), False), ("10.0f", (10, 3), True), ("7.5 8.0", (8, 0), True),
    ("", (9, 0), None), ("Hopper", (9, 0), None), ("9.0a+PTX", (10, 0), False),
    ("8.0;9.0+PTX", (12, 0), True)])
def test_archs_run_on(archs, cap, want):
    from imaml_ext import _ext
    assert _ext.archs_run_on(archs, cap) is want


def test_the_recorded_arch_list_is_what_torch_compiles(monkeypatch):
    # with TORCH_CUDA_ARCH_LIST unset and GPUs visible, torch compiles their capabilities capped
    # at its newest arch, with PTX of the highest; the build recorded the bare capabilities, so
    # a build on an H100 would have sent a B200 (10.0, which can JIT that PTX) to the twins
    ns = setup_functions("visible_arch_list")
    ns["torch"] = torch
    caps = [(9, 0), (8, 0), (9, 0), (12, 1)]
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_80", "sm_90", "sm_100",
                                                              "sm_90a", "compute_90"])
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(caps))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: caps[i])
    assert ns["visible_arch_list"]() == "8.0;9.0;10.0+PTX"
    from imaml_ext import _ext
    assert _ext.archs_run_on("9.0+PTX", (10, 0)) and not _ext.archs_run_on("9.0", (10, 0))


def test_cuda_kernels_for_other_archs_fall_back_with_one_warning(monkeypatch, caplog):
    # the default build without a visible GPU is for 9.0 only: on an A100 every launch failed
    # with "no kernel image is available"; now its ops run the twins, said once per GPU
    import logging
    from imaml_ext import _ext

    class FakeCuda:
        device = torch.device("cuda", 0)
    if _ext._C is None:
        pytest.skip("compiled extension not built")
    cap = {"cap": (8, 0)}
    monkeypatch.setattr(_ext, "build_info", lambda: {"cuda": True, "cuda_archs": "9.0"})
    monkeypatch.setattr(_ext, "_cuda_ok", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: cap["cap"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: "Fake A100")
    with caplog.at_level(logging.WARNING, logger="imaml_ext"):
        assert _ext.use_ext_for(None, FakeCuda()) is False
        assert _ext.use_ext_for(None, torch.zeros(1), FakeCuda()) is False
        with pytest.raises(RuntimeError, match=r"built for 9.0, which .*capability 8.0"):
            _ext.use_ext_for(True, FakeCuda())
    assert caplog.text.count("cannot run") == 1
    assert "Fake A100" in caplog.text and "TORCH_CUDA_ARCH_LIST=8.0" in caplog.text
    monkeypatch.setattr(_ext, "_cuda_ok", {})
    cap["cap"] = (9, 0)
    assert _ext.use_ext_for(None, FakeCuda()) is True
    assert _ext.use_ext_for(None, torch.zeros(1)) is True
    with pytest.raises(RuntimeError, match="no kernels for meta"):
        _ext.use_ext_for(True, torch.zeros(1, device="meta"))


@pytest.mark.slow
def test_no_ext_build_is_a_pure_python_wheel_that_runs(tmp_path):
    """IMAML_NO_EXT=1, for a machine without a compiler: a py3-none-any wheel without _C, whose
    import falls back to the reference ops and solves."""
    root = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md", "LICENSE", "MANIFEST.in"):
        shutil.copy(root / name, src / name)
    shutil.copytree(root / "imaml_ext", src / "imaml_ext",
                    ignore=shutil.ignore_patterns("__pycache__", "_C*", "_build_meta.json"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation",
                        "--no-deps", str(src), "-w", str(tmp_path / "whl")], capture_output=True,
                       text=True, env={**os.environ, "IMAML_NO_EXT": "1"}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = (tmp_path / "whl").iterdir()
    assert wheel.name.endswith("-py3-none-any.whl"), wheel.name
    import zipfile
    names = zipfile.ZipFile(wheel).namelist()
    assert "imaml_ext/linalg/__init__.py" in names or "imaml_ext/linalg.py" in names, names
    assert not [n for n in names if n.startswith("imaml_ext/_C")], names
    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                        str(site), str(wheel)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    # -I -S: the checkout's editable install (a .pth hook) must not supply its _C; torch comes
    # by path
    paths = [str(site)] + [p for p in sys.path if p.endswith("-packages")]
    code = ("import sys; sys.path[:0] = %r\n"
            "import torch, imaml_ext\n"
            "assert imaml_ext.__file__.startswith(%r), imaml_ext.__file__\n"
            "info = imaml_ext.build_info(); assert info['extension'] is False, info\n"
            "A = 2 * torch.eye(4, dtype=torch.float64).expand(3, 4, 4)\n"
            "r = imaml_ext.cg(lambda v: torch.einsum('bij,bj->bi', A, v), torch.ones(3, 4, "
            "dtype=torch.float64))\n"
            "assert torch.allclose(r.x, torch.full((3, 4), 0.5, dtype=torch.float64))\n"
            "print('ok')\n") % (paths, str(site))
    r = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True,
                       timeout=300, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]
    assert "using the pure-PyTorch reference ops" in r.stderr
