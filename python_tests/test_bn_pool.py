"""The fused batch-norm / ReLU / max-pool block (imaml_ext.ops.bn_relu_pool, csrc/cpu/
blocks_cpu.cpp): forward and backward against its reference twin (ATen's batch_norm, max_pool2d
and relu) in float64 and float32, gradcheck, second derivatives refused, bad input, thread
counts, opcheck, and the conv net's first-order path (TaskLoss fused_blocks) against the
composite one."""
from __future__ import annotations

import pytest
import torch

import imaml_ext
from conftest import assert_within_reference_error
from imaml_ext import ops, reference
from imaml_ext.hvp import TaskLoss, expand_params
from imaml_ext.models import make_model

pytestmark = pytest.mark.skipif(not imaml_ext.extension_available(),
                                reason="compiled extension not built")

# (N, C, H, W): even and odd maps (an odd last row / column is in the statistics but not pooled),
# channel counts below, at and above one vector, the smallest poolable map, and the 5-way 1-shot
# conv net's first block (8 tasks folded: 512 channels).
SHAPES = [(2, 3, 2, 2), (1, 5, 3, 2), (3, 16, 7, 7), (2, 17, 6, 9), (4, 64, 3, 3),
          (5, 512, 28, 28)]


def block_problem(shape, dtype=torch.float64, seed=0, channels_last=True):
    g = torch.Generator().manual_seed(seed * 1009 + sum(d * 31 ** i for i, d in enumerate(shape)))
    N, C, H, W = shape
    h = torch.randn(N, C, H, W, dtype=torch.float64, generator=g) * 1.5 + 0.3
    w = torch.randn(C, dtype=torch.float64, generator=g)  # both signs: the arg-max flips for w < 0
    b = torch.randn(C, dtype=torch.float64, generator=g)
    h = h.to(dtype)
    if channels_last:
        h = h.contiguous(memory_format=torch.channels_last)
    return h, w.to(dtype), b.to(dtype)


def forward_backward(fn, h, w, b, g_out):
    h, w, b = (t.detach().clone().requires_grad_(True) for t in (h, w, b))
    out = fn(h, w, b)
    return (out, *torch.autograd.grad(out, (h, w, b), g_out))


def ext_block(h, w, b):
    return ops.bn_relu_pool(h, w, b, 1e-5, use_ext=True)


def ref_block(h, w, b):
    return reference.bn_relu_pool(h, w, b, 1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference_float64(shape):
    h, w, b = block_problem(shape)
    g_out = torch.randn(ref_block(h, w, b).shape, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(1))
    for got, want in zip(forward_backward(ext_block, h, w, b, g_out),
                         forward_backward(ref_block, h, w, b, g_out)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_float32_within_reference_error(shape):
    h, w, b = block_problem(shape)
    g_out = torch.randn(ref_block(h, w, b).shape, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(2))
    truth = forward_backward(ref_block, h, w, b, g_out)
    args32 = [t.float() for t in (h, w, b)]
    kern = forward_backward(ext_block, *args32, g_out.float())
    ref = forward_backward(ref_block, *args32, g_out.float())
    for k, r, t in zip(kern, ref, truth):
        assert_within_reference_error(k, r, t)


def test_nchw_input_and_output_layout():
    h, w, b = block_problem((2, 6, 8, 8), channels_last=False)
    out = ext_block(h, w, b)
    assert out.shape == (2, 6, 4, 4)
    torch.testing.assert_close(out, ref_block(h, w, b), rtol=1e-12, atol=1e-12)


def test_gradcheck():
    h, w, b = block_problem((2, 3, 4, 5), seed=3)
    h, w, b = (t.detach().requires_grad_(True) for t in (h, w, b))
    assert torch.autograd.gradcheck(ext_block, (h, w, b))


def test_ties_and_argmax_follow_aten():
    # constant windows: every entry ties, ATen takes the first; the gradient goes there
    h = torch.zeros(2, 3, 4, 4, dtype=torch.float64)
    h[:, :, ::2, ::2] = 1.0  # the window's first entry is its maximum for w > 0
    h[0, 0] = 0.5  # one channel of one sample constant: ties within its windows
    w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    b = torch.tensor([0.1, 0.2, -0.3], dtype=torch.float64)
    g_out = torch.ones(2, 3, 2, 2, dtype=torch.float64)
    for got, want in zip(forward_backward(ext_block, h, w, b, g_out),
                         forward_backward(ref_block, h, w, b, g_out)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_nan_propagates_like_reference():
    h, w, b = block_problem((2, 4, 4, 4))
    h = h.clone()
    h[1, 2, 3, 1] = float("nan")
    out, ref = ext_block(h, w, b), ref_block(h, w, b)
    assert torch.equal(torch.isnan(out), torch.isnan(ref)) and torch.isnan(out).any()
    torch.testing.assert_close(out.nan_to_num(), ref.nan_to_num(), rtol=1e-12, atol=1e-12)


def test_second_derivative_raises():
    h, w, b = block_problem((3, 4, 4, 4))
    w = w.clone().requires_grad_(True)
    gw = torch.autograd.grad((ext_block(h, w, b) ** 2).sum(), w, create_graph=True)[0]
    with pytest.raises(RuntimeError, match="first-order only"):
        torch.autograd.grad(gw.sum(), w)
    f = lambda w: (ext_block(h, w, b) ** 2).sum()  # noqa: E731
    with pytest.raises(RuntimeError, match="first-order only"):
        torch.func.grad(lambda w: torch.func.grad(f)(w).sum())(w.detach())
    # one derivative under torch.func.grad is fine and equals the reference's
    fr = lambda w: (ref_block(h, w, b) ** 2).sum()  # noqa: E731
    torch.testing.assert_close(torch.func.grad(f)(w.detach()), torch.func.grad(fr)(w.detach()),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_thread_counts_agree(threads):
    h, w, b = block_problem((3, 40, 10, 12), seed=5)
    g_out = torch.randn(3, 40, 5, 6, dtype=torch.float64)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = forward_backward(ext_block, h, w, b, g_out)
        torch.set_num_threads(threads)
        many = forward_backward(ext_block, h, w, b, g_out)
    finally:
        torch.set_num_threads(n)
    for a, c in zip(one, many):
        torch.testing.assert_close(a, c, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("use_ext", [True, False])
def test_bad_input(use_ext):
    h, w, b = block_problem((2, 3, 4, 4))

    def call(*args, eps=1e-5):
        return ops.bn_relu_pool(*args, eps, use_ext=use_ext)

    with pytest.raises((ValueError, RuntimeError), match="h must be 4-d"):
        call(h[0], w, b)
    with pytest.raises((ValueError, RuntimeError), match=r"weight must be \(3,\)"):
        call(h, w[:2], b)
    with pytest.raises((ValueError, RuntimeError), match="bias must have dtype"):
        call(h, w, b.float())
    with pytest.raises((ValueError, RuntimeError), match="at least 2x2"):
        call(h[:, :, :1], w, b)
    with pytest.raises((ValueError, RuntimeError), match="must have a sample"):
        call(h[:0], w, b)
    with pytest.raises((ValueError, RuntimeError), match="eps must be finite"):
        call(h, w, b, eps=-1.0)
    with pytest.raises((ValueError, RuntimeError), match="float32 or float64"):
        call(h.to(torch.float16), w, b)


def test_cpp_checks_name_the_argument():
    h, w, b = block_problem((2, 3, 4, 4), channels_last=False)
    with pytest.raises(RuntimeError, match="channels-last"):
        torch.ops.imaml_ext.bn_relu_pool(h.contiguous(), w, b, 1e-5)
    h = h.contiguous(memory_format=torch.channels_last)
    out, mean, invstd, hsel, idx = torch.ops.imaml_ext.bn_relu_pool(h, w, b, 1e-5)
    with pytest.raises(RuntimeError, match=r"grad_out must be \[2, 3, 2, 2\]"):
        torch.ops.imaml_ext.bn_relu_pool_backward(out[:1], h, w, b, mean, invstd, hsel, idx)
    with pytest.raises(RuntimeError, match="idx has dtype"):
        torch.ops.imaml_ext.bn_relu_pool_backward(out, h, w, b, mean, invstd, hsel,
                                                  idx.to(torch.float64))
    # an entry past 3 silently dropped its position's gradient
    with pytest.raises(RuntimeError, match=r"bn_relu_pool_backward: idx must be in 0..3"):
        torch.ops.imaml_ext.bn_relu_pool_backward(out, h, w, b, mean, invstd, hsel,
                                                  idx.index_fill(0, torch.tensor([1]), 7))


def test_opcheck():
    h, w, b = block_problem((2, 5, 6, 6))
    torch.library.opcheck(torch.ops.imaml_ext.bn_relu_pool.default, (h, w, b, 1e-5))
    out, mean, invstd, hsel, idx = torch.ops.imaml_ext.bn_relu_pool(h, w, b, 1e-5)
    torch.library.opcheck(torch.ops.imaml_ext.bn_relu_pool_backward.default,
                          (torch.randn_like(out), h, w, b, mean, invstd, hsel, idx))


# ---- the conv net's first-order path ------------------------------------------------------------

@pytest.mark.parametrize("ways,shots,M", [(5, 1, 6), (3, 2, 2)])
def test_task_loss_grad_fused_equals_composite(ways, shots, M):
    torch.manual_seed(0)
    model = make_model("omniglot", ways).double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    pb = {k: v + 0.05 * torch.randn_like(v) for k, v in expand_params(params, M).items()}
    x = torch.rand(M, ways * shots, 1, 28, 28, dtype=torch.float64)
    y = torch.arange(ways).repeat(shots).expand(M, -1).contiguous()
    fused = TaskLoss(model, fused_blocks=True, task_chunk=4)
    plain = TaskLoss(model, fused_blocks=False, task_chunk=4)
    g1, l1, o1 = fused.grad(pb, x, y)
    g2, l2, o2 = plain.grad(pb, x, y)
    torch.testing.assert_close(l1, l2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(o1, o2, rtol=1e-11, atol=1e-11)
    for k in g2:
        # conv biases before batch norm have a zero gradient: compare at the net's scale
        scale = max(g2[k].abs().max().item(), 1e-3)
        torch.testing.assert_close(g1[k] / scale, g2[k] / scale, rtol=1e-10, atol=1e-10)


def test_task_loss_hvp_mode_stays_second_order():
    # "hvp" mode never uses the first-order kernels (its first block is the second-order form
    # of python_tests/test_conv1ch.py), so second derivatives through it work with
    # fused_blocks on; a second derivative through "grad" mode raises
    model = make_model("omniglot", 3).double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    pb = {k: v.clone().requires_grad_(True) for k, v in expand_params(params, 2).items()}
    x = torch.rand(2, 3, 1, 28, 28, dtype=torch.float64)
    y = torch.arange(3).expand(2, -1).contiguous()
    tl = TaskLoss(model, fused_blocks=True)
    for mode, ok in (("hvp", True), ("grad", False)):
        g = torch.autograd.grad(tl(pb, x, y, mode=mode).sum(), list(pb.values()),
                                create_graph=True)
        if ok:
            torch.autograd.grad(sum(t.sum() for t in g), list(pb.values()), allow_unused=True)
        else:
            with pytest.raises(RuntimeError, match="first-order only"):
                torch.autograd.grad(sum(t.sum() for t in g), list(pb.values()),
                                    allow_unused=True)


def test_fused_blocks_default():
    model = make_model("omniglot", 3)
    assert TaskLoss(model).fused_blocks is True
    assert TaskLoss(model, fused_blocks=False).fused_blocks is False
