"""The 3x3 convolution by Winograd's F(2x2, 3x3) (csrc/cpu/winograd_cpu.cpp, imaml_ext.ops.conv3x3)
and its weight gradient, against the reference twin (ATen's convolution) in float64 and float32:
forward, input and weight gradients over geometries (odd and tiny maps, groups, channel counts),
thread counts, bad input from Python and C++, opcheck, second derivatives, and the conv net's
TaskLoss gradient and HVP with and without the kernel (hvp.WINOGRAD_MIN_SIZE)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import imaml_ext
import imaml_ext.hvp as hvp
from conftest import assert_within_reference_error
from imaml_ext import ops, reference
from imaml_ext.hvp import TaskLoss, expand_params, make_hvp
from imaml_ext.models import make_model

pytestmark = pytest.mark.skipif(not imaml_ext.extension_available(),
                                reason="compiled extension not built")

# (N, groups, Ci, Co, H, W) in units of one vector of channels (16 float32 / 8 float64): the conv
# net's 14x14 layer (64 channels), odd and non-square maps, maps smaller than a tile, groups with
# unequal in/out channel counts, one image.
GEOMETRIES = [(3, 1, 4, 4, 14, 14), (2, 3, 1, 2, 7, 5), (2, 2, 2, 1, 1, 1), (1, 1, 1, 1, 2, 3),
              (4, 2, 1, 1, 6, 9)]
IDS = [f"N{g[0]}G{g[1]}Ci{g[2]}Co{g[3]}H{g[4]}W{g[5]}" for g in GEOMETRIES]


def problem(geometry, dtype, seed=0, bias=True):
    N, G, ci, co, H, W = geometry
    lanes = 64 // torch.finfo(dtype).bits * 8
    Ci, Co = ci * lanes, co * lanes
    g = torch.Generator().manual_seed(seed * 101 + N * 13 + G * 7 + H)
    x = torch.randn(N, G * Ci, H, W, dtype=torch.float64, generator=g)
    w = torch.randn(G * Co, Ci, 3, 3, dtype=torch.float64, generator=g) / (3 * Ci ** 0.5)
    b = torch.randn(G * Co, dtype=torch.float64, generator=g) if bias else None
    gy = torch.randn(N, G * Co, H, W, dtype=torch.float64, generator=g)
    cast = (lambda t: None if t is None else t.to(dtype))
    return cast(x), cast(w), cast(b), cast(gy), G


def grads(x, w, b, gy, G, use_ext):
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    b = None if b is None else b.detach().requires_grad_()
    y = ops.conv3x3(x, w, b, G, use_ext=use_ext)
    inputs = (x, w) if b is None else (x, w, b)
    return (y, *torch.autograd.grad(y, inputs, gy))


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=IDS)
@pytest.mark.parametrize("bias", [True, False])
def test_matches_reference_float64(geometry, bias):
    x, w, b, gy, G = problem(geometry, torch.float64, bias=bias)
    got, want = grads(x, w, b, gy, G, True), grads(x, w, b, gy, G, False)
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    for a, c in zip(got, want):
        torch.testing.assert_close(a, c, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(torch.ops.imaml_ext.conv3x3_winograd_weight_grad(gy, x, G),
                               reference.conv3x3_weight_grad(gy, x, G), rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=IDS)
def test_float32_within_reference_error(geometry):
    x, w, b, gy, G = problem(geometry, torch.float32, seed=1)
    truth = grads(x.double(), w.double(), b.double(), gy.double(), G, False)
    got, want = grads(x, w, b, gy, G, True), grads(x, w, b, gy, G, False)
    # the transforms add a few roundings per value: within 3x ATen's direct convolution
    for a, c, t in zip(got, want, truth):
        assert_within_reference_error(a, c, t, factor=3.0)


def test_narrow_register_tiles(tmp_path):
    # the AVX2-sized register tiles (4 x 1 vectors), forced on this machine in a fresh process
    script = (
        "import torch, imaml_ext\n"
        "from imaml_ext import ops, reference\n"
        "g = torch.Generator().manual_seed(0)\n"
        "x = torch.randn(3, 2 * 16, 7, 6, dtype=torch.float64, generator=g)\n"
        "w = torch.randn(2 * 24, 16, 3, 3, dtype=torch.float64, generator=g)\n"
        "gy = torch.randn(3, 2 * 24, 7, 6, dtype=torch.float64, generator=g)\n"
        "y = torch.ops.imaml_ext.conv3x3_winograd(x, w, None, 2)\n"
        "gw = torch.ops.imaml_ext.conv3x3_winograd_weight_grad(gy, x, 2)\n"
        "e1 = ((y - reference.conv3x3(x, w, None, 2)).abs().max() / y.abs().max()).item()\n"
        "e2 = ((gw - reference.conv3x3_weight_grad(gy, x, 2)).abs().max() / gw.abs().max())\n"
        "assert e1 < 1e-12 and e2.item() < 1e-12, (e1, e2)\n"
        "print('ok')\n")
    env = dict(os.environ, IMAML_WINOGRAD_NARROW="1")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_channels_last_and_nchw_inputs_agree():
    x, w, b, gy, G = problem(GEOMETRIES[0], torch.float64)
    y1 = ops.conv3x3(x, w, b, G)
    y2 = ops.conv3x3(x.contiguous(memory_format=torch.channels_last), w, b, G)
    y3 = ops.conv3x3(x[:, :, :, :].transpose(2, 3).contiguous().transpose(2, 3), w, b, G)
    assert torch.equal(y1, y2) and torch.equal(y1, y3)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_thread_counts_agree(threads):
    x, w, b, gy, G = problem((5, 1, 4, 4, 14, 14), torch.float32)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = (ops.conv3x3(x, w, b, G), torch.ops.imaml_ext.conv3x3_winograd_weight_grad(gy, x, G))
        torch.set_num_threads(threads)
        many = (ops.conv3x3(x, w, b, G),
                torch.ops.imaml_ext.conv3x3_winograd_weight_grad(gy, x, G))
    finally:
        torch.set_num_threads(n)
    assert torch.equal(one[0], many[0])  # each output tile is computed by one thread
    # the weight gradient sums tiles in per-thread partial sums: float32 rounding of sums of
    # 980 products, compared at the gradient's scale
    scale = one[1].abs().max().item()
    torch.testing.assert_close(one[1], many[1], rtol=0, atol=1e-5 * scale)


def test_empty_batch():
    x, w, b, gy, G = problem((1, 1, 1, 1, 5, 5), torch.float32)
    y = ops.conv3x3(x[:0], w, b, G)
    assert y.shape == (0, w.shape[0], 5, 5)
    assert torch.equal(torch.ops.imaml_ext.conv3x3_winograd_weight_grad(gy[:0], x[:0], G),
                       torch.zeros_like(w))


@pytest.mark.parametrize("second_path", [False, True])
def test_second_derivatives_match_reference(second_path):
    # ops.conv3x3 is differentiable to any order (each derivative one of the kernel's bilinear
    # maps); also when w reaches the loss another way too (second_path)
    x, w, b, gy, G = problem(GEOMETRIES[1], torch.float64)
    v = torch.randn_like(w)

    def hvp_w(use_ext):
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = ops.conv3x3(xx, ww, b, G, use_ext=use_ext)
        loss = (y * y).sum() + ((ww ** 3).sum() if second_path else 0)
        gw, gx = torch.autograd.grad(loss, (ww, xx), create_graph=True)
        return torch.autograd.grad((gw * v).sum() + gx.sum(), (ww, xx))

    for a, c in zip(hvp_w(True), hvp_w(False)):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-10)


def test_falls_back_where_the_kernel_does_not_apply():
    # 12 float32 channels: not a multiple of 16. use_ext=None takes ATen; True raises.
    x = torch.randn(2, 12, 6, 6)
    w = torch.randn(12, 12, 3, 3)
    torch.testing.assert_close(ops.conv3x3(x, w), reference.conv3x3(x, w, None, 1))
    assert not ops.conv3x3_ext_ok(x, w, 1)
    with pytest.raises(RuntimeError, match="multiples of 16"):
        ops.conv3x3(x, w, use_ext=True)


@pytest.mark.parametrize("call,match", [
    (lambda x, w: ops.conv3x3(x, w[:, :, :2]), r"weight must be \(groups\*Co, Ci, 3, 3\)"),
    (lambda x, w: ops.conv3x3(x, w, groups=3), r"weight must be .*groups = 3"),
    (lambda x, w: ops.conv3x3(x, w, groups=0), "groups must be an int >= 1"),
    (lambda x, w: ops.conv3x3(x, w.double()), "weight must have"),
    (lambda x, w: ops.conv3x3(x[0], w), "x must be 4-d"),
    (lambda x, w: ops.conv3x3(x, w, torch.zeros(3)), r"bias must be \(16,\)"),
])
def test_bad_input_from_python(call, match):
    x, w = torch.randn(2, 16, 5, 5), torch.randn(16, 16, 3, 3)
    with pytest.raises(ValueError, match=match):
        call(x, w)


@pytest.mark.parametrize("call,match", [
    (lambda o, x, w: o.conv3x3_winograd(x, w[:, :8], None, 1), "x has 16 channels"),
    (lambda o, x, w: o.conv3x3_winograd(x[:, :8], w[:, :8], None, 1),
     "multiples of 16"),
    (lambda o, x, w: o.conv3x3_winograd(x.int(), w, None, 1), "float32 or float64"),
    (lambda o, x, w: o.conv3x3_winograd(x, w.double(), None, 1), "weight must have x's dtype"),
    (lambda o, x, w: o.conv3x3_winograd(x, w[..., :2], None, 1), "weight must be"),
    (lambda o, x, w: o.conv3x3_winograd(x, w, torch.zeros(3), 1), r"bias must be \(16,\)"),
    (lambda o, x, w: o.conv3x3_winograd_weight_grad(x[:, :, :4], x, 1), "grad_y must be"),
    (lambda o, x, w: o.conv3x3_winograd_weight_grad(x, x, 3), "groups = 3 must divide"),
])
def test_bad_input_from_cpp(call, match):
    x, w = torch.randn(2, 16, 5, 5), torch.randn(16, 16, 3, 3)
    with pytest.raises((ValueError, RuntimeError), match=match):
        call(torch.ops.imaml_ext, x, w)


def test_opcheck():
    x, w, b, gy, G = problem(GEOMETRIES[1], torch.float64)
    torch.library.opcheck(torch.ops.imaml_ext.conv3x3_winograd.default, (x, w, b, G))
    torch.library.opcheck(torch.ops.imaml_ext.conv3x3_winograd_weight_grad.default, (gy, x, G))


# ---- the conv net ------------------------------------------------------------------------------

def conv_net_problem(ways, shots, M, seed=0):
    torch.manual_seed(seed)
    model = make_model("omniglot", ways).double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    pb = {k: v + 0.05 * torch.randn_like(v) for k, v in expand_params(params, M).items()}
    x = torch.rand(M, ways * shots, 1, 28, 28, dtype=torch.float64)
    y = torch.arange(ways).repeat(shots).expand(M, -1).contiguous()
    return model, pb, x, y


def with_and_without(monkeypatch, fn):
    """fn() with the Winograd kernel on the 14x14 layer (the default), then with it off."""
    assert hvp.WINOGRAD_MIN_SIZE <= 14
    on = fn()
    monkeypatch.setattr(hvp, "WINOGRAD_MIN_SIZE", 10 ** 9)
    return on, fn()


@pytest.mark.parametrize("chunk", [1, 3])
def test_task_loss_grad_with_and_without_winograd(monkeypatch, chunk):
    model, pb, x, y = conv_net_problem(4, 2, 3)
    tl = TaskLoss(model, task_chunk=chunk)
    (g1, l1, _), (g2, l2, _) = with_and_without(monkeypatch, lambda: tl.grad(pb, x, y))
    torch.testing.assert_close(l1, l2, rtol=1e-12, atol=1e-12)
    for k in g2:  # conv biases before batch norm: gradient 0 up to rounding, hence the atol
        torch.testing.assert_close(g1[k], g2[k], rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("chunk", [1, 3])
def test_task_loss_hvp_with_and_without_winograd(monkeypatch, chunk):
    # "hvp" mode's convolutions (one task, or grouped over 3) run channels-last, where the
    # Winograd kernel computes their three bilinear maps (hvp._winograd_hvp)
    model, pb, x, y = conv_net_problem(4, 2, 3, seed=1)
    v = {k: torch.randn_like(t) for k, t in pb.items()}
    tl = TaskLoss(model, task_chunk=chunk)
    on, off = with_and_without(monkeypatch, lambda: make_hvp(tl, pb, x, y, "double_backward")(v))
    for k in off:
        scale = off[k].abs().max().item()
        torch.testing.assert_close(on[k], off[k], rtol=1e-9, atol=1e-10 * max(scale, 1.0))
