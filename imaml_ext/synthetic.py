"""Synthetic linear-regression tasks with a closed-form iMAML meta-gradient (the paper's Fig. 2a).

Task i: inputs X_i (n, d), targets y_i = X_i w_i + noise; a bias-free linear model w in R^d
(nn.Linear(d, 1, bias=False), parameter "weight" of shape (1, d)) with

    L_train_i(w) = ||X_i w - y_i||^2 / (2 n),        H_i = X_i^T X_i / n   (loss "half_mse")
    G_i(w) = L_train_i(w) + lam/2 ||w - theta||^2
    phi_i* = (H_i + lam I)^-1 (X_i^T y_i / n + lam theta)
    d phi_i* / d theta = lam (H_i + lam I)^-1 = (I + H_i/lam)^-1
    g_i = (I + H_i/lam)^-1 grad L_test_i(phi_i*)     (the exact meta-gradient of task i)

The support inputs are built so that H_i = Q_i diag(s) Q_i^T exactly, with a random rotation Q_i
per task and a chosen spectrum s (default: 5 distinct eigenvalues from 10 to 1e-3, each twice,
condition number 1e4). CG on a matrix with k distinct eigenvalues is exact after k iterations, so
5 CG steps solve (I + H/lam) g = v exactly and 2 do not.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from imaml_ext.types import TaskBatch

DEFAULT_SPECTRUM = (10.0, 3.0, 1.0, 0.1, 1e-3)


@dataclass
class LinearTasks:
    """A batch of linear-regression tasks and what their closed forms need.

    Attributes:
        tasks: TaskBatch (x: (M, n, d), y: (M, n) float).
        spectrum: (d,) eigenvalues of every H_i (sorted descending).
        w_true: (M, d) the tasks' generating weights.
    """

    tasks: TaskBatch
    spectrum: torch.Tensor
    w_true: torch.Tensor

    @property
    def d(self) -> int:
        return self.tasks.x_support.shape[2]


def linear_model(d: int, dtype=torch.float64) -> nn.Linear:
    """The bias-free linear model nn.Linear(d, 1) (its one parameter: "weight", (1, d))."""
    return nn.Linear(d, 1, bias=False, dtype=dtype)


def make_linear_tasks(num_tasks: int, d: int = 10, n_train: int = 20, n_test: int = 40, *,
                      spectrum=DEFAULT_SPECTRUM, noise: float = 0.1, task_spread: float = 1.0,
                      seed: int = 0, dtype=torch.float64, device=None) -> LinearTasks:
    """M tasks whose support Hessians X^T X / n have exactly the eigenvalues `spectrum`.

    Args:
        num_tasks: M. d: input dimension; len(spectrum) must divide d (each eigenvalue is
            repeated d / len(spectrum) times). n_train (>= d), n_test: samples per task.
        spectrum: distinct eigenvalues of H_i. noise: target noise std.
        task_spread: std of the task weights around a shared mean.
    """
    if n_train < d:
        raise ValueError(f"n_train must be >= d to fix the spectrum, got {n_train} < {d}")
    k = len(spectrum)
    if d % k:
        raise ValueError(f"len(spectrum)={k} must divide d={d}")
    g = torch.Generator().manual_seed(seed)
    s = torch.tensor(spectrum, dtype=torch.float64).repeat_interleave(d // k)
    s = s.sort(descending=True).values
    M = num_tasks
    U = torch.linalg.qr(torch.randn(M, n_train, d, generator=g, dtype=torch.float64)).Q
    Q = torch.linalg.qr(torch.randn(M, d, d, generator=g, dtype=torch.float64)).Q
    X = math.sqrt(n_train) * (U * s.sqrt()) @ Q.transpose(1, 2)   # X^T X / n = Q diag(s) Q^T
    w_mean = torch.randn(d, generator=g, dtype=torch.float64)
    w = w_mean + task_spread * torch.randn(M, d, generator=g, dtype=torch.float64)
    y = (X @ w.unsqueeze(-1)).squeeze(-1) + noise * torch.randn(M, n_train, generator=g,
                                                                dtype=torch.float64)
    Xq = torch.randn(M, n_test, d, generator=g, dtype=torch.float64)
    yq = (Xq @ w.unsqueeze(-1)).squeeze(-1) + noise * torch.randn(M, n_test, generator=g,
                                                                 dtype=torch.float64)
    tasks = TaskBatch(X, y, Xq, yq).to(device=device, dtype=dtype)
    return LinearTasks(tasks, s.to(device=device, dtype=dtype), w.to(device=device, dtype=dtype))


def _hessian(X: torch.Tensor) -> torch.Tensor:
    return X.transpose(1, 2) @ X / X.shape[1]


def inner_solution(tasks: TaskBatch, theta: torch.Tensor, lam: float) -> torch.Tensor:
    """(M, d) phi_i* = argmin G_i, by a dense solve."""
    X, y = tasks.x_support, tasks.y_support
    d = X.shape[2]
    A = _hessian(X) + lam * torch.eye(d, dtype=X.dtype, device=X.device)
    rhs = (X.transpose(1, 2) @ y.unsqueeze(-1)).squeeze(-1) / X.shape[1] + lam * theta
    return torch.linalg.solve(A, rhs)


def query_gradient(tasks: TaskBatch, w: torch.Tensor) -> torch.Tensor:
    """(M, d) grad L_test_i(w_i) = X_q^T (X_q w_i - y_q) / n_q."""
    Xq, yq = tasks.x_query, tasks.y_query
    r = (Xq @ w.unsqueeze(-1)).squeeze(-1) - yq
    return (Xq.transpose(1, 2) @ r.unsqueeze(-1)).squeeze(-1) / Xq.shape[1]


def exact_meta_gradient(tasks: TaskBatch, theta: torch.Tensor, lam: float) -> torch.Tensor:
    """(M, d) per-task exact meta-gradients g_i = (I + H_i/lam)^-1 grad L_test_i(phi_i*).

    Their mean over tasks is d/dtheta of mean_i L_test_i(phi_i*(theta)).
    """
    X = tasks.x_support
    d = X.shape[2]
    phi = inner_solution(tasks, theta, lam)
    A = torch.eye(d, dtype=X.dtype, device=X.device) + _hessian(X) / lam
    return torch.linalg.solve(A, query_gradient(tasks, phi))


def safe_lr(spectrum: torch.Tensor, lam: float, fraction: float = 1.0) -> float:
    """fraction / L with L = max eig(H) + lam the smoothness of G (GD is stable below 2/L)."""
    return fraction / (float(spectrum.max()) + lam)


def relative_error(g: torch.Tensor, g_exact: torch.Tensor) -> float:
    """||g - g_exact|| / ||g_exact|| (over all entries)."""
    return float((g - g_exact).norm() / g_exact.norm())


__all__ = ["LinearTasks", "linear_model", "make_linear_tasks", "inner_solution",
           "query_gradient", "exact_meta_gradient", "safe_lr", "relative_error",
           "DEFAULT_SPECTRUM"]
