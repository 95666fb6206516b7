"""README.md's Python examples run as written, and do what their comments say.

Each ```python block of the README is executed in a namespace holding the names it takes as
given (A, b, X, ... ; built here, small), then checked. A README edit that breaks an example,
renames an API it uses or adds a block this file does not know fails here."""
from __future__ import annotations

import pathlib
import re

import pytest
import torch

import imaml_ext
from imaml_ext.models import ConvNet
from imaml_ext.types import TaskBatch

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
DT = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def block(first_line: str) -> str:
    """The README's Python block whose first line starts with `first_line`."""
    found = [b for b in python_blocks() if b.startswith(first_line)]
    assert len(found) == 1, f"README: {len(found)} python blocks start with {first_line!r}"
    return found[0]


def spd(B: int, P: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q = torch.randn(B, P, P, dtype=DT, generator=g)
    return Q @ Q.transpose(1, 2) / P + torch.eye(P, dtype=DT)


KNOWN = ("import torch, imaml_ext", "# x, info = scipy", "from imaml_ext.algorithms import",
         "from imaml_ext.implicit import implicit_root")


def test_every_block_is_checked():
    blocks = python_blocks()
    assert blocks, "README.md has no python blocks"
    unknown = [b.splitlines()[0] for b in blocks if not b.startswith(KNOWN)]
    assert not unknown, f"README python blocks with no test here: {unknown}"


def test_cg_api_block():
    B, P, n, lam = 3, 6, 10, 0.5
    A = spd(1, P, 7)[0]
    b = torch.randn(P, dtype=DT, generator=torch.Generator().manual_seed(8))
    As = spd(B, P, 0)
    bs = torch.randn(B, P, dtype=DT, generator=torch.Generator().manual_seed(1))
    # hvp_on_param_dicts / grads_dict: an operator on dicts of batched tensors.
    A2 = spd(B, 2, 2)

    def hvp_on_param_dicts(v):
        return {"w": torch.bmm(As, v["w"].unsqueeze(-1)).squeeze(-1),
                "b": torch.bmm(A2, v["b"].unsqueeze(-1)).squeeze(-1)}

    grads_dict = {"w": bs.clone(), "b": torch.ones(B, 2, dtype=DT)}
    X = torch.randn(B, n, P, dtype=DT, generator=torch.Generator().manual_seed(3))
    def hvp(v):  # a batched Hessian-vector product on (B, P) tensors
        return torch.bmm(As, v.unsqueeze(-1)).squeeze(-1)

    ns = {"A": A, "b": b, "As": As, "bs": bs, "hvp_on_param_dicts": hvp_on_param_dicts,
          "grads_dict": grads_dict, "X": X, "n": n, "lam": lam, "hvp": hvp}
    # Run it one paragraph at a time, checking each result against a dense solve.
    parts = block("import torch, imaml_ext").split("\n\n")
    assert len(parts) == 6, "README's CG block changed: update this test"
    exec(parts[0] + "\n" + parts[1], ns)
    assert bool(ns["res"].converged)
    torch.testing.assert_close(ns["res"].x, torch.linalg.solve(A, b), rtol=1e-5, atol=1e-6)
    solved = torch.linalg.solve(As, bs)
    exec(parts[2], ns)
    assert ns["res"].x.shape == (B, P) and bool(ns["res"].converged.all())
    torch.testing.assert_close(ns["res"].x, solved, rtol=1e-5, atol=1e-6)
    exec(parts[3], ns)
    x = ns["res"].x
    assert set(x) == {"w", "b"} and ns["res"].iterations.shape == (B,)
    # 5 iterations on 8 unknowns: not solved, but the residual it reports is x's true one.
    Ax = hvp_on_param_dicts(x)
    r = torch.cat([grads_dict[k] - Ax[k] for k in ("w", "b")], 1).norm(dim=1)
    torch.testing.assert_close(ns["res"].residual_norm, r, rtol=1e-6, atol=1e-10)
    assert bool((r < torch.cat([grads_dict["w"], grads_dict["b"]], 1).norm(dim=1)).all())
    exec(parts[4], ns)
    H = torch.eye(P, dtype=DT) + X.transpose(1, 2) @ X / (n * lam)
    torch.testing.assert_close(ns["res"].x, torch.linalg.solve(H, bs), rtol=1e-5, atol=1e-6)
    # 5 iterations on P = 6 unknowns of (I + As / lam): not solved, the reported residual true
    exec(parts[5], ns)
    x = ns["res"].x
    r = (bs - x - hvp(x) / lam).norm(dim=1)
    torch.testing.assert_close(ns["res"].residual_norm, r, rtol=1e-6, atol=1e-10)
    assert bool((r < 1e-2 * bs.norm(dim=1)).all())


def test_dropin_block():
    A = spd(1, 5, 4)[0]
    b = torch.randn(5, dtype=DT, generator=torch.Generator().manual_seed(5))
    ns = {"A": A, "b": b, "imaml_ext": imaml_ext}
    exec(block("# x, info = scipy"), ns)
    torch.testing.assert_close(ns["x"], torch.linalg.solve(A, b), rtol=1e-4, atol=1e-6)
    # solve_cg(maxiter=10) on a 5 x 5 SPD system: exact after 5 iterations.
    x = ns["solver"](lambda v: A @ v, b)
    torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=1e-6, atol=1e-8)


def test_algorithms_block():
    M, ways, shots, query = 2, 3, 1, 2
    g = torch.Generator().manual_seed(0)
    model = ConvNet(1, ways, hidden=4, image_size=16).to(DT)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    tasks = TaskBatch(torch.randn(M, ways * shots, 1, 16, 16, dtype=DT, generator=g),
                      torch.arange(ways).repeat(M, shots),
                      torch.randn(M, ways * query, 1, 16, 16, dtype=DT, generator=g),
                      torch.arange(ways).repeat(M, query))
    ns = {"model": model, "params": params, "tasks": tasks}
    src = block("from imaml_ext.algorithms import")
    exec(src.replace("inner_steps=16", "inner_steps=2"), ns)  # same call, fewer steps
    grads, metrics = ns["grads"], ns["metrics"]
    assert set(grads) == set(params)
    assert all(grads[k].shape == params[k].shape and torch.isfinite(grads[k]).all()
               for k in params)
    # The comment's list of metrics is true.
    listed = re.search(r"# metrics: (.*) \(M,\)", src).group(1).split(", ")
    for name in listed:
        assert name in metrics, f"README lists metric {name!r}, meta_gradient has {sorted(metrics)}"
        assert metrics[name].shape == (M,), name


def test_implicit_root_block():
    n, d = 40, 5
    g = torch.Generator().manual_seed(6)
    X = torch.randn(n, d, dtype=DT, generator=g)
    y = torch.randn(n, dtype=DT, generator=g)
    Xv = torch.randn(n, d, dtype=DT, generator=g)
    yv = torch.randn(n, dtype=DT, generator=g)
    ns = {"torch": torch, "X": X, "y": y, "Xv": Xv, "yv": yv, "n": n, "d": d}
    exec(block("from imaml_ext.implicit import implicit_root"), ns)
    la = ns["log_alpha"]
    assert la.grad is not None

    def val(log_alpha):  # the validation loss at the closed-form solution, autograd through it
        w = torch.linalg.solve(X.T @ X / n + log_alpha.exp() * torch.eye(d, dtype=DT),
                               X.T @ y / n)
        return 0.5 * ((Xv @ w - yv) ** 2).mean()

    t = torch.tensor(-1.0, dtype=DT, requires_grad=True)
    (expected,) = torch.autograd.grad(val(t), t)
    torch.testing.assert_close(la.grad, expected, rtol=1e-6, atol=1e-10)
