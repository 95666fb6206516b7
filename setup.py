"""Build of imaml_ext: the C++ CPU kernels always, the CUDA kernels when they can be built.

Build against the torch you will run with: `pip install --no-build-isolation .` (or -e .).
pip's default build isolation would compile against the newest torch it can fetch, and the
extension then refuses to load with yours: such a build stops here (IMAML_ALLOW_ISOLATED=1 lets
it go on).

Environment:
  USE_CUDA=0               CPU kernels only (also false / no / off).
  FORCE_CUDA=1             build the CUDA kernels even when no GPU is visible (CI does).
  CUDA_HOME                the toolkit; by default the one the `nvcc` on PATH really belongs to
                           (a wrapper script in /usr/local/bin is followed to its target).
  TORCH_CUDA_ARCH_LIST     defaults to the visible GPUs' archs, or 9.0 (H100/H200) when none.
  MAX_JOBS                 parallel compile jobs (torch's ninja build honours it).
  IMAML_DEBUG=1            -O0 -g, for sanitizers and debuggers.
  IMAML_NO_EXT=1           no compiled extension at all (no compiler needed): a pure-Python
                           package whose ops run their PyTorch reference twins.
"""
from __future__ import annotations

import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import find_namespace_packages, setup

ROOT = Path(__file__).resolve().parent


def _toolkit_of(nvcc: str) -> str | None:
    """The CUDA toolkit an nvcc executable belongs to, following wrapper scripts and links."""
    path = Path(nvcc).resolve()
    try:
        text = path.read_text(errors="ignore") if path.stat().st_size < 4096 else ""
    except OSError:
        text = ""
    m = re.search(r"exec\s+(\S+/bin/nvcc)", text)  # e.g. `exec /usr/local/cuda-13.0/bin/nvcc "$@"`
    if m:
        path = Path(m.group(1)).resolve()
    home = path.parent.parent
    return str(home) if (home / "include" / "cuda_runtime.h").exists() else None


def _find_cuda_home() -> str | None:
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = _toolkit_of(nvcc)
        if home:
            return home
    return "/usr/local/cuda" if Path("/usr/local/cuda/bin/nvcc").exists() else None


# torch.utils.cpp_extension reads CUDA_HOME when it is imported: settle it first.
_cuda_home = _find_cuda_home()
if _cuda_home:
    os.environ["CUDA_HOME"] = _cuda_home

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _off(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"0", "false", "no", "off"}


def check_not_isolated() -> None:
    """Stops a build whose torch is the temporary one of pip's (or `python -m build`'s) build
    isolation: the extension would belong to that torch, not to the one it will run with."""
    where = str(Path(torch.__file__).resolve())
    if ("pip-build-env-" in where or f"{os.sep}build-env-" in where) \
            and not _flag("IMAML_ALLOW_ISOLATED"):
        sys.exit(f"imaml_ext: this build would compile against torch {torch.__version__} from "
                 f"pip's temporary build environment ({where}), not the torch installed where "
                 f"it will run, and the extension would then refuse to load. Install torch "
                 f"first, then build without isolation: pip install --no-build-isolation . "
                 f"(IMAML_ALLOW_ISOLATED=1 builds anyway)")


def read_sources() -> tuple[list[str], list[str]]:
    """csrc/sources.txt: the one list of sources (CMakeLists.txt reads it too)."""
    cpu, cuda = [], []
    for line in (ROOT / "csrc" / "sources.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        target = cpu
        if line.startswith("cuda:"):
            target, line = cuda, line[len("cuda:"):].strip()
        matches = sorted(glob.glob(str(ROOT / line)))
        target += [os.path.relpath(p, ROOT) for p in matches]
    return cpu, cuda


def want_cuda() -> bool:
    if _off("USE_CUDA"):
        return False
    if torch.version.cuda is None:  # a CPU-only torch has no CUDA headers or libraries
        if _flag("FORCE_CUDA"):
            sys.exit(f"FORCE_CUDA=1 but torch {torch.__version__} is a CPU-only build: install a "
                     f"CUDA build of torch, or build the CPU kernels alone (USE_CUDA=0)")
        return False
    if _cuda_home is None:
        if _flag("FORCE_CUDA"):
            sys.exit("FORCE_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME (e.g. /usr/local/cuda)")
        if torch.cuda.is_available():
            print("WARNING: a GPU is visible but no CUDA toolkit (nvcc) was found: building the "
                  "CPU kernels only; CUDA tensors will use the PyTorch reference ops (set "
                  "CUDA_HOME to build the CUDA kernels)", file=sys.stderr)
        return False
    return torch.cuda.is_available() or _flag("FORCE_CUDA")


# Headers torch's CUDA headers include that a toolkit may not hold (they ship in the nvidia-*
# wheels torch depends on).
LIBRARY_HEADERS = ("cusparse.h", "cublas_v2.h", "cublasLt.h", "cusolverDn.h")


def nvidia_wheel_includes() -> list[str]:
    """The include folders that hold LIBRARY_HEADERS when the toolkit lacks them: the nvidia-*
    wheels' (nvidia/cu<major>/include for CUDA 13's, nvidia/<library>/include before), and only
    those (no cuDNN, NCCL, ... folders); exits naming what is missing when neither has them
    (nvcc failed deep into the build, after every CPU file, before)."""
    toolkit = Path(_cuda_home or "/usr/local/cuda") / "include"
    site = Path(torch.__file__).resolve().parent.parent
    major = (torch.version.cuda or "").split(".")[0]
    candidates = [site / "nvidia" / f"cu{major}" / "include"] + \
        sorted(p for p in site.glob("nvidia/*/include") if p.is_dir())
    dirs = []
    for header in LIBRARY_HEADERS:
        if (toolkit / header).exists():
            continue
        where = next((p for p in candidates if (p / header).exists()), None)
        if where is None:
            sys.exit(f"imaml_ext: {header} (which torch's CUDA headers include) is neither in the "
                     f"toolkit's {toolkit} nor in the nvidia wheels under {site / 'nvidia'}: "
                     f"install the CUDA {major} cuBLAS / cuSPARSE development headers (the "
                     f"nvidia-cublas / nvidia-cusparse wheels torch lists), or build the CPU "
                     f"kernels alone (USE_CUDA=0)")
        dirs.append(str(where))
    return list(dict.fromkeys(dirs))


# Symbols only the C++ runtime itself defines: in _C they mean a private, static copy of it.
CXX_RUNTIME_SYMBOLS = ("_ZNSt6locale7classicEv", "_ZNSt8ios_base4InitC1Ev")


def shared_libstdcxx() -> list[str]:
    """The shared C++ runtime (libstdc++.so.6), to be named on the link line before the rest.

    torch's libraries use the shared libstdc++. A second, static copy inside _C (which a
    toolchain or Python build can bring: -static-libstdc++ in LDFLAGS or in the interpreter's
    LDSHARED, a compiler without the shared library's link name) has its own locale tables, and
    formatting any error message then breaks: on the lent H100 machine (torch 2.11, Python 3.12)
    every argument error of an op ended the process with a segfault; here, with LDFLAGS=
    -static-libstdc++, the messages came out cut at their first number. Named first, the shared
    library resolves every runtime symbol _C uses, so no archive member is pulled in;
    `Build.run` checks the result."""
    if not sys.platform.startswith("linux"):
        return []
    try:
        cxx = shlex.split(os.environ.get("CXX") or "c++")
        path = subprocess.run(cxx + ["-print-file-name=libstdc++.so.6"], capture_output=True,
                              text=True, timeout=60).stdout.strip()
    except (OSError, ValueError, subprocess.SubprocessError):
        path = ""
    if not (os.path.isabs(path) and os.path.exists(path)):
        # the one this process (torch) has loaded
        maps = Path("/proc/self/maps")
        found = re.findall(r"(/\S*/libstdc\+\+\.so\.6[\d.]*)$", maps.read_text(), re.M) \
            if maps.exists() else []
        path = found[0] if found else ""
    return [os.path.normpath(path)] if path else []


def check_cxx_runtime(so: Path) -> bool:
    """Refuses an extension that defines the C++ runtime's own symbols (see shared_libstdcxx);
    with IMAML_PRIVATE_CXX_RUNTIME=warn (the GPU suite's build, where a refused build would cost
    a whole lease) warns instead and returns True. False: no private copy found."""
    nm = shutil.which("nm")
    if nm is None or not so.exists():
        return False
    defined = set()
    for flags in (["--defined-only"], ["-D", "--defined-only"]):  # .symtab, or .dynsym if stripped
        out = subprocess.run([nm, *flags, str(so)], capture_output=True, text=True)
        defined |= {ln.split()[-1] for ln in out.stdout.splitlines() if ln.strip()}
    bad = [s for s in CXX_RUNTIME_SYMBOLS if s in defined]
    if not bad:
        return False
    env = {k: os.environ.get(k) for k in ("LDFLAGS", "CXX", "LDSHARED") if os.environ.get(k)}
    msg = (f"{so.name} holds a private copy of the C++ runtime (libstdc++ linked statically: it "
           f"defines {bad[0]}); with torch's shared one in the same process its error messages "
           f"would crash or come out garbled. Link flags from the environment {env or '(none)'}, "
           f"the interpreter's LDSHARED {sysconfig.get_config_var('LDSHARED')!r} and "
           f"LDCXXSHARED {sysconfig.get_config_var('LDCXXSHARED')!r}: drop -static-libstdc++, "
           f"or install the compiler's libstdc++ development files (libstdc++.so).")
    if os.environ.get("IMAML_PRIVATE_CXX_RUNTIME") != "warn":
        raise RuntimeError(msg)
    print(f"WARNING: {msg}", file=sys.stderr)
    return True


def visible_arch_list() -> str:
    """The arch list torch.utils.cpp_extension compiles for when TORCH_CUDA_ARCH_LIST is unset:
    the visible GPUs' capabilities, each capped at the newest this torch has kernels for, and
    PTX of the highest (so that newer GPUs can JIT it)."""
    newest = max(((int(a[3:]) // 10, int(a[3:]) % 10) for a in torch.cuda.get_arch_list()
                  if a.startswith("sm_") and a[3:].isdigit()), default=None)
    caps = set()
    for i in range(torch.cuda.device_count()):
        cap = tuple(torch.cuda.get_device_capability(i))
        caps.add(min(cap, newest) if newest else cap)
    return ";".join("%d.%d" % c for c in sorted(caps)) + "+PTX"


def make_extension():
    cpu_sources, cuda_sources = read_sources()
    with_cuda = want_cuda()
    debug = _flag("IMAML_DEBUG")
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # No -march=native: the CPU kernels pick AVX2/FMA at run time (csrc/cpu/simd.h).
    # No -std: torch.utils.cpp_extension adds the standard its headers need (C++17 or C++20).
    # -fopenmp: at::parallel_for is an inline template that runs in parallel only when the
    # including translation unit is compiled with OpenMP (ATen/ParallelOpenMP.h defines
    # INTRA_OP_PARALLEL under _OPENMP); without it every CPU kernel runs on one thread. Linking
    # with -fopenmp records libgomp.so.1, the soname torch's own bundled libgomp carries, so the
    # process keeps one OpenMP runtime.
    # (Apple's clang has no -fopenmp: there the kernels run on one thread)
    omp = [] if sys.platform == "darwin" else ["-fopenmp"]
    cxx = opt + ["-fno-math-errno"] + omp
    link = omp + shared_libstdcxx()
    macros = [("IMAML_TORCH_VERSION", f'"{torch.__version__}"')]
    if not with_cuda:
        return CppExtension(
            "imaml_ext._C", cpu_sources, extra_compile_args={"cxx": cxx}, define_macros=macros,
            include_dirs=[str(ROOT / "csrc")], extra_link_args=link,
        ), False, ""
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    if not archs:
        # set, so that what is compiled and what build_info records (which decides at run time
        # whether a GPU can run the kernels) are one list
        archs = os.environ["TORCH_CUDA_ARCH_LIST"] = visible_arch_list()
    macros += [("IMAML_WITH_CUDA", None), ("IMAML_CUDA_ARCHS", f'"{archs}"')]
    nvcc = opt + ["-lineinfo", "--expt-relaxed-constexpr"]
    return CUDAExtension(
        "imaml_ext._C", cpu_sources + cuda_sources,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc}, define_macros=macros,
        include_dirs=[str(ROOT / "csrc")] + nvidia_wheel_includes(), extra_link_args=link,
    ), True, archs


class Build(BuildExtension):
    """Keeps objects in build/temp-<mode>/ across pip runs (ninja then recompiles only what
    changed), and writes imaml_ext/_build_meta.json so an import against another torch can say
    which torch the extension was built for."""

    def finalize_options(self):
        super().finalize_options()
        tag = f"{'cuda' if WITH_CUDA else 'cpu'}-torch{torch.__version__}".replace("+", "_")
        self.build_temp = str(ROOT / "build" / f"temp-{tag}")

    def run(self):
        check_not_isolated()  # here, not at import: an sdist compiles nothing
        super().run()
        private = any([check_cxx_runtime(Path(self.get_ext_fullpath(ext.name)))
                       for ext in self.extensions])
        meta = {"torch_version": torch.__version__, "cuda": WITH_CUDA, "cuda_archs": ARCHS,
                "cxx_runtime": "private" if private else "shared"}
        # beside the extension it describes (the source tree for -e, the build folder for a
        # wheel): one in a source tree without its _C would claim a build that is not there
        for ext in self.extensions:
            target = Path(self.get_ext_fullpath(ext.name)).parent
            if target.is_dir():
                (target / "_build_meta.json").write_text(json.dumps(meta) + "\n")


if _flag("IMAML_NO_EXT"):
    # For a machine without a C++ compiler: a pure-Python wheel whose ops all run their
    # PyTorch twins (imaml_ext.build_info()["extension"] is False; the import says so once).
    print("IMAML_NO_EXT=1: building no compiled extension; every op runs its pure-PyTorch "
          "reference twin (correct, slower)", file=sys.stderr)
    EXT, WITH_CUDA, ARCHS = None, False, ""
else:
    EXT, WITH_CUDA, ARCHS = make_extension()

setup(
    packages=find_namespace_packages(include=["imaml_ext", "imaml_ext.*"],
                                     exclude=["*__pycache__*"]),
    package_data={"imaml_ext": ["_build_meta.json"],
                  "imaml_ext.data": ["embedded/*.npz", "embedded/LICENSE", "embedded/README.md"]},
    ext_modules=[EXT] if EXT is not None else [],
    cmdclass={"build_ext": Build.with_options(use_ninja=True)},
)
