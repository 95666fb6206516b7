"""imaml_ext: implicit MAML with fused batched conjugate-gradient and HVP kernels.

The public surface:
- `cg`, `CGResult`: batched conjugate gradients over tensors or pytrees (imaml_ext.linalg), and
  `ShiftedOperator` (v -> shift v + scale op(v), applied inside cg's fused iteration);
- `build_info()`: what the compiled extension was built with;
- submodules hvp, implicit, inner, algorithms, models, data, train (imported on first use).
"""
from __future__ import annotations

import importlib

from imaml_ext._ext import available as extension_available
from imaml_ext._ext import build_info
from imaml_ext.linalg import CGResult, ShiftedOperator, cg

__version__ = "0.1.0"

__all__ = ["cg", "CGResult", "ShiftedOperator", "build_info", "extension_available", "__version__"]

_SUBMODULES = {"ops", "reference", "linalg", "hvp", "implicit", "inner", "algorithms", "models",
               "data", "train", "cli", "types", "config", "checkpoint", "evaluate", "demo",
               "structured", "synthetic"}


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"imaml_ext.{name}")
    raise AttributeError(f"module 'imaml_ext' has no attribute {name!r}")
