"""The first layer's kernels (csrc/cpu/blocks_cpu.cpp): the grouped convolution with one input
channel per group (imaml_ext.ops.conv1ch) and its weight gradient; the whole first block fused,
relu(max_pool2d(batch_norm(conv1ch(x)), 2)) (ops.conv1ch_bn_relu_pool, first-order); and its
second-order form (ops.conv1ch_bn_relu_pool_hvp, on the conv1ch_select ops). Each against its
reference twin (ATen's grouped conv2d, batch_norm, max_pool2d, relu) in float64 and float32, to
second order where it is differentiable; ties, NaN, thread counts, bad input, opcheck; and the
conv net's TaskLoss with and without the kernels."""
from __future__ import annotations

import pytest
import torch

import imaml_ext
from conftest import assert_within_reference_error
from imaml_ext import ops, reference
from imaml_ext.hvp import TaskLoss, expand_params, make_hvp
from imaml_ext.models import make_model

pytestmark = pytest.mark.skipif(not imaml_ext.extension_available(),
                                reason="compiled extension not built")

# (N, G, H, W, C, kernel, stride, padding): the 5-way 1-shot first layer with 8 tasks folded,
# odd maps (an odd last row or column is in the statistics, not pooled), C below / above one
# vector, 1x1 and 5x5 and non-square kernels, strides, one group.
GEOMETRIES = [(5, 8, 28, 28, 64, (3, 3), (1, 1), (1, 1)),
              (3, 2, 9, 7, 5, (3, 3), (2, 2), (1, 1)),
              (2, 3, 7, 9, 17, (5, 5), (1, 1), (2, 2)),
              (4, 1, 5, 5, 3, (1, 1), (1, 1), (0, 0)),
              (2, 2, 6, 9, 33, (3, 2), (1, 2), (1, 0)),
              (3, 2, 8, 8, 16, (3, 3), (1, 1), (0, 0))]
IDS = [f"N{g[0]}G{g[1]}H{g[2]}W{g[3]}C{g[4]}k{g[5][0]}{g[5][1]}s{g[6][0]}{g[6][1]}p{g[7][0]}{g[7][1]}"
       for g in GEOMETRIES]


def problem(geometry, dtype=torch.float64, seed=0, negative=True, offset=0.5):
    N, G, H, W, C, (kh, kw), stride, padding = geometry
    g = torch.Generator().manual_seed(seed * 7919 + N * 131 + G * 17 + H * 5 + C)
    x = torch.rand(N, G, H, W, dtype=torch.float64, generator=g) + offset
    cw = torch.randn(G * C, 1, kh, kw, dtype=torch.float64, generator=g)
    cb = torch.randn(G * C, dtype=torch.float64, generator=g)
    bw = torch.rand(G * C, dtype=torch.float64, generator=g) + 0.5
    if negative:  # both signs: the arg-max of a window flips for a negative scale
        bw = bw * torch.where(torch.rand(G * C, generator=g) < 0.3, -1.0, 1.0).double()
    bb = torch.randn(G * C, dtype=torch.float64, generator=g) * 0.5
    return ([t.to(dtype) for t in (x, cw, cb, bw, bb)], stride, padding)


def derivatives(fn, x, params, seed=1, order=2):
    """(output, first derivatives of <g, out> + |out|^2 / 2, and (order 2) the derivatives of
    <first derivatives, v>) with respect to params."""
    params = [p.detach().clone().requires_grad_(True) for p in params]
    out = fn(x, *params)
    g = torch.Generator().manual_seed(seed)
    g_out = torch.randn(out.shape, dtype=torch.float64, generator=g).to(out.dtype)
    loss = (out * g_out).sum() + 0.5 * (out * out).sum()
    first = torch.autograd.grad(loss, params, create_graph=order > 1)
    if order == 1:
        return [out, *first]
    v = [torch.randn(p.shape, dtype=torch.float64, generator=g).to(p.dtype) for p in params]
    second = torch.autograd.grad(first, params, v)
    return [out, *first, *second]


def assert_close_at_scale(got, want, tol):
    """Each tensor at its own scale; one that is zero in exact arithmetic (the gradient of a
    conv bias before batch norm: rounding noise in both) must be below 1e-9 of the largest."""
    top = max(b.abs().max().item() for b in want)
    for a, b in zip(got, want):
        scale = b.abs().max().item()
        if scale <= 1e-9 * top:
            assert a.abs().max().item() <= 1e-9 * top, "a zero derivative is not zero"
            continue
        torch.testing.assert_close(a / scale, b / scale, rtol=tol, atol=tol)


# ---- conv1ch -----------------------------------------------------------------------------------

def conv_ext(x, w, b, stride, padding):
    return ops.conv1ch(x, w, b, stride, padding, use_ext=True)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=IDS)
def test_conv1ch_matches_reference_to_second_order(geometry):
    (x, cw, cb, _, _), stride, padding = problem(geometry)
    ext = derivatives(lambda x, w, b: conv_ext(x, w, b, stride, padding), x, (cw, cb))
    ref = derivatives(lambda x, w, b: reference.conv1ch(x, w, b, stride, padding), x, (cw, cb))
    assert ext[0].is_contiguous(memory_format=torch.channels_last)
    assert_close_at_scale(ext, ref, 1e-12)


@pytest.mark.parametrize("geometry", GEOMETRIES[:3], ids=IDS[:3])
def test_conv1ch_float32_within_reference_error(geometry):
    (x, cw, cb, _, _), stride, padding = problem(geometry)
    truth = derivatives(lambda x, w, b: reference.conv1ch(x, w, b, stride, padding), x,
                        (cw, cb), order=1)
    args = [t.float() for t in (cw, cb)]
    kern = derivatives(lambda x, w, b: conv_ext(x, w, b, stride, padding), x.float(), args,
                       order=1)
    ref = derivatives(lambda x, w, b: reference.conv1ch(x, w, b, stride, padding), x.float(),
                      args, order=1)
    for k, r, t in zip(kern, ref, truth):
        assert_within_reference_error(k, r, t)


def test_conv1ch_without_bias_and_weight_grad_op():
    (x, cw, _, _, _), stride, padding = problem(GEOMETRIES[1])
    torch.testing.assert_close(conv_ext(x, cw, None, stride, padding),
                               reference.conv1ch(x, cw, None, stride, padding),
                               rtol=1e-12, atol=1e-12)
    y = reference.conv1ch(x, cw, None, stride, padding)
    gy = torch.randn_like(y).contiguous(memory_format=torch.channels_last)
    got = torch.ops.imaml_ext.conv1ch_weight_grad(gy, x, list(cw.shape[2:]), list(stride),
                                                  list(padding))
    want = reference.conv1ch_weight_grad(gy, x, cw.shape[2:], stride, padding)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_conv1ch_input_gradient_goes_to_aten():
    # the kernel has no input gradient: an x that needs one takes ATen's convolution
    (x, cw, cb, _, _), stride, padding = problem(GEOMETRIES[1])
    x = x.clone().requires_grad_(True)
    gx = torch.autograd.grad(ops.conv1ch(x, cw, cb, stride, padding).sum(), x)[0]
    gx_ref = torch.autograd.grad(reference.conv1ch(x, cw, cb, stride, padding).sum(), x)[0]
    torch.testing.assert_close(gx, gx_ref)
    with pytest.raises(RuntimeError, match="x requires a gradient"):
        conv_ext(x, cw, cb, stride, padding)


# ---- the fused first block ----------------------------------------------------------------------

def block_ext(x, cw, cb, bw, bb, stride, padding):
    return ops.conv1ch_bn_relu_pool(x, cw, cb, bw, bb, stride, padding, 1e-5, use_ext=True)


def block_ref(x, cw, cb, bw, bb, stride, padding):
    return reference.conv1ch_bn_relu_pool(x, cw, cb, bw, bb, stride, padding, 1e-5)


def block_hvp_form(x, cw, cb, bw, bb, stride, padding):
    return ops.conv1ch_bn_relu_pool_hvp(x, cw, cb, bw, bb, stride, padding, 1e-5)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=IDS)
def test_fused_block_matches_reference_float64(geometry):
    (x, *params), stride, padding = problem(geometry)
    ext = derivatives(lambda x, *p: block_ext(x, *p, stride, padding), x, params, order=1)
    ref = derivatives(lambda x, *p: block_ref(x, *p, stride, padding), x, params, order=1)
    assert_close_at_scale(ext, ref, 1e-11)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=IDS)
def test_second_order_form_matches_reference_float64(geometry):
    (x, *params), stride, padding = problem(geometry)
    ext = derivatives(lambda x, *p: block_hvp_form(x, *p, stride, padding), x, params)
    ref = derivatives(lambda x, *p: block_ref(x, *p, stride, padding), x, params)
    assert_close_at_scale(ext, ref, 1e-11)


@pytest.mark.parametrize("offset", [0.5, 100.0])
def test_fused_block_float32_within_reference_error(offset):
    # offset 100: the images' mean is 100x their spread, where a one-pass variance in float32
    # would lose every digit; the moments are centred and in double
    (x, *params), stride, padding = problem(GEOMETRIES[0], offset=offset)
    truth = derivatives(lambda x, *p: block_ref(x, *p, stride, padding), x, params, order=1)
    args = [t.float() for t in params]
    kern = derivatives(lambda x, *p: block_ext(x, *p, stride, padding), x.float(), args,
                       order=1)
    ref = derivatives(lambda x, *p: block_ref(x, *p, stride, padding), x.float(), args, order=1)
    for i, (k, r, t) in enumerate(zip(kern, ref, truth)):
        if i == 2:  # the conv bias: its gradient is rounding noise around 0 in both
            assert k.abs().max() <= 1e-3 * truth[1].abs().max()
            continue
        assert_within_reference_error(k, r, t)


def test_fused_block_ties_and_nan_follow_aten():
    # constant images: every window ties (the first entry wins, as in ATen's max_pool2d)
    (x, *params), stride, padding = problem((2, 2, 6, 6, 5, (3, 3), (1, 1), (1, 1)))
    x = x.clone()
    x[0, 1] = 0.25
    x[1, 0, :3, :3] = 0.0
    for fn in (block_ext, block_hvp_form):
        ext = derivatives(lambda x, *p: fn(x, *p, stride, padding), x, params, order=1)
        ref = derivatives(lambda x, *p: block_ref(x, *p, stride, padding), x, params, order=1)
        assert_close_at_scale(ext, ref, 1e-11)
    x[1, 1, 2, 3] = float("nan")
    out, ref = block_ext(x, *params, stride, padding), block_ref(x, *params, stride, padding)
    assert torch.equal(torch.isnan(out), torch.isnan(ref)) and torch.isnan(out).any()


def test_fused_block_second_derivative_raises():
    (x, cw, cb, bw, bb), stride, padding = problem(GEOMETRIES[1])
    cw = cw.clone().requires_grad_(True)
    g = torch.autograd.grad((block_ext(x, cw, cb, bw, bb, stride, padding) ** 2).sum(), cw,
                            create_graph=True)[0]
    with pytest.raises(RuntimeError, match="first-order only"):
        torch.autograd.grad(g.sum(), cw)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_thread_counts_agree(threads):
    (x, *params), stride, padding = problem((3, 3, 10, 12, 20, (3, 3), (1, 1), (1, 1)), seed=4)
    fns = [lambda x, *p, f=f: f(x, *p, stride, padding) for f in (block_ext, block_hvp_form)]
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = [derivatives(f, x, params) if i else derivatives(f, x, params, order=1)
               for i, f in enumerate(fns)]
        torch.set_num_threads(threads)
        many = [derivatives(f, x, params) if i else derivatives(f, x, params, order=1)
                for i, f in enumerate(fns)]
    finally:
        torch.set_num_threads(n)
    for a, b in zip(one, many):
        for s, t in zip(a, b):
            torch.testing.assert_close(s, t, rtol=1e-12, atol=1e-12)


# ---- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("use_ext", [True, False])
def test_bad_input(use_ext):
    (x, cw, cb, bw, bb), stride, padding = problem(GEOMETRIES[1])

    def block(*args, stride=stride, padding=padding, eps=1e-5):
        return ops.conv1ch_bn_relu_pool(*args, stride, padding, eps, use_ext=use_ext)

    def conv(*args, stride=stride, padding=padding):
        return ops.conv1ch(*args, stride, padding, use_ext=use_ext)

    err = (ValueError, RuntimeError)
    with pytest.raises(err, match="x must be 4-d"):
        conv(x[0], cw, cb)
    with pytest.raises(err, match=r"weight must be \(groups\*C, 1, kh, kw\)"):
        conv(x, cw[:, :, :, :, None], cb)
    with pytest.raises(err, match=r"weight must be \(groups\*C, 1, kh, kw\) with groups = "):
        conv(x, cw[:3], cb)
    with pytest.raises(err, match=r"bias must be \(10,\)"):
        conv(x, cw, cb[:4])
    with pytest.raises(err, match="weight must have dtype"):
        conv(x, cw.float(), cb)
    with pytest.raises(err, match="padding must be >= 0 and smaller than the kernel"):
        conv(x, cw, cb, padding=3)
    with pytest.raises(err, match="stride must be >= 1"):
        conv(x, cw, cb, stride=0)
    with pytest.raises(err, match="float32 or float64"):
        conv(x.half(), cw.half(), cb.half())
    with pytest.raises(err, match=r"weight must be \(10,\)"):
        block(x, cw, cb, bw[:2], bb)
    with pytest.raises(err, match="bias must have dtype"):
        block(x, cw, cb, bw, bb.float())
    with pytest.raises(err, match="at least 2x2"):
        block(x[:, :, :1], cw, cb, bw, bb)
    with pytest.raises(err, match="eps must be finite"):
        block(x, cw, cb, bw, bb, eps=float("nan"))


def test_cpp_checks_name_the_argument():
    (x, cw, cb, bw, bb), stride, padding = problem(GEOMETRIES[1])
    s, p = list(stride), list(padding)
    with pytest.raises(RuntimeError, match="x must be contiguous"):
        torch.ops.imaml_ext.conv1ch(x.transpose(2, 3), cw, cb, s, p)
    y = torch.ops.imaml_ext.conv1ch(x, cw, cb, s, p)
    with pytest.raises(RuntimeError, match="grad_y must be channels-last"):
        torch.ops.imaml_ext.conv1ch_weight_grad(y.contiguous(), x, [3, 3], s, p)
    with pytest.raises(RuntimeError, match=r"grad_y must be \(3, 10, 5, 4\)"):
        torch.ops.imaml_ext.conv1ch_weight_grad(y[:, :, :4], x, [3, 3], s, p)
    out, mean, invstd, hsel, idx, mom = torch.ops.imaml_ext.conv1ch_bn_relu_pool(
        x, cw, cb, bw, bb, s, p, 1e-5)
    g = torch.ones_like(out)
    with pytest.raises(RuntimeError, match="moments must be"):
        torch.ops.imaml_ext.conv1ch_bn_relu_pool_backward(g, x, cw, bw, bb, mean, invstd, hsel,
                                                          idx, mom.float(), s, p)
    with pytest.raises(RuntimeError, match="idx has dtype"):
        torch.ops.imaml_ext.conv1ch_bn_relu_pool_backward(g, x, cw, bw, bb, mean, invstd, hsel,
                                                          idx.double(), mom, s, p)
    with pytest.raises(RuntimeError, match="idx must have dtype"):
        torch.ops.imaml_ext.conv1ch_select(x, cw, cb, idx.double(), s, p)
    with pytest.raises(RuntimeError, match="idx must be in 0..3"):
        torch.ops.imaml_ext.conv1ch_select(x, cw, cb, idx + 4, s, p)
    with pytest.raises(RuntimeError, match="grad_u must be"):
        torch.ops.imaml_ext.conv1ch_select_weight_grad(g[:1], x, idx, [3, 3], s, p)
    # an entry past 3 read beyond the window's four patches (AddressSanitizer: heap overflow in
    # the channel tail) or dropped its gradient (the vector path): both backward ops check
    bad = idx.clone()
    bad[0, 0, 0, 0] = 200
    with pytest.raises(RuntimeError, match=r"conv1ch_bn_relu_pool_backward: idx must be in 0..3"):
        torch.ops.imaml_ext.conv1ch_bn_relu_pool_backward(g, x, cw, bw, bb, mean, invstd, hsel,
                                                          bad, mom, s, p)
    with pytest.raises(RuntimeError, match=r"conv1ch_select_weight_grad: idx must be in 0..3"):
        torch.ops.imaml_ext.conv1ch_select_weight_grad(g, x, bad, [3, 3], s, p)


def test_opcheck():
    (x, cw, cb, bw, bb), stride, padding = problem((2, 2, 6, 7, 5, (3, 3), (1, 1), (1, 1)))
    s, p = [1, 1], [1, 1]
    ops_ = torch.ops.imaml_ext
    torch.library.opcheck(ops_.conv1ch.default, (x, cw, cb, s, p))
    y = ops_.conv1ch(x, cw, cb, s, p)
    torch.library.opcheck(ops_.conv1ch_weight_grad.default,
                          (torch.randn_like(y), x, [3, 3], s, p))
    torch.library.opcheck(ops_.conv1ch_bn_relu_pool.default, (x, cw, cb, bw, bb, s, p, 1e-5))
    out, mean, invstd, hsel, idx, mom = ops_.conv1ch_bn_relu_pool(x, cw, cb, bw, bb, s, p, 1e-5)
    torch.library.opcheck(ops_.conv1ch_bn_relu_pool_backward.default,
                          (torch.randn_like(out), x, cw, bw, bb, mean, invstd, hsel, idx, mom, s,
                           p))
    torch.library.opcheck(ops_.conv1ch_select.default, (x, cw, cb, idx, s, p))
    torch.library.opcheck(ops_.conv1ch_select_weight_grad.default,
                          (torch.randn_like(out), x, idx, [3, 3], s, p))


# ---- the conv net ------------------------------------------------------------------------------

def conv_net_problem(ways, shots, M, seed=0):
    torch.manual_seed(seed)
    model = make_model("omniglot", ways).double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    pb = {k: v + 0.05 * torch.randn_like(v) for k, v in expand_params(params, M).items()}
    # some negative first-block scales: the arg-max flips there
    w = pb["body.1.weight"].clone()
    w[:, ::3] = -w[:, ::3]
    pb["body.1.weight"] = w
    x = torch.rand(M, ways * shots, 1, 28, 28, dtype=torch.float64)
    y = torch.arange(ways).repeat(shots).expand(M, -1).contiguous()
    return model, pb, x, y


@pytest.mark.parametrize("kind", ["exact", "double_backward"])
def test_task_loss_hvp_with_kernels_equals_composite(kind):
    model, pb, x, y = conv_net_problem(4, 2, 5)
    v = {k: torch.randn_like(t) for k, t in pb.items()}
    fused = make_hvp(TaskLoss(model, fused_blocks=True, task_chunk=3), pb, x, y, kind)
    plain = make_hvp(TaskLoss(model, fused_blocks=False, task_chunk=3), pb, x, y, kind)
    got, want = fused(v), plain(v)
    assert_close_at_scale([got[k] for k in want], list(want.values()), 1e-10)
    l1, g1 = fused.value_and_grad()
    l2, g2 = plain.value_and_grad()
    torch.testing.assert_close(l1, l2, rtol=1e-12, atol=1e-12)
    assert_close_at_scale([g1[k] for k in g2], list(g2.values()), 1e-10)


def test_task_loss_grad_with_kernels_equals_composite():
    model, pb, x, y = conv_net_problem(5, 1, 6, seed=1)
    g1, l1, o1 = TaskLoss(model, fused_blocks=True).grad(pb, x, y)
    g2, l2, o2 = TaskLoss(model, fused_blocks=False).grad(pb, x, y)
    torch.testing.assert_close(l1, l2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(o1, o2, rtol=1e-11, atol=1e-11)
    assert_close_at_scale([g1[k] for k in g2], list(g2.values()), 1e-10)


def test_second_order_form_checks_its_arguments():
    (x, cw, cb, bw, bb), stride, padding = problem(GEOMETRIES[1])
    with pytest.raises(ValueError, match=r"conv1ch_bn_relu_pool_hvp: weight must be \(10,\)"):
        block_hvp_form(x, cw, cb, bw[:3], bb, stride, padding)
    with pytest.raises(RuntimeError, match="x requires a gradient"):
        block_hvp_form(x.clone().requires_grad_(True), cw, cb, bw, bb, stride, padding)
