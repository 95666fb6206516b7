"""The pooled batch-norm block's derivative kernels (imaml_ext.ops.pooled_bn_backward and
pooled_bn_double_backward; csrc/cpu/pooled_bn_cpu.cpp, csrc/cuda/pooled_bn_cuda.cu) against
their pure-PyTorch twins in float64 (and float32), in both layouts, for several pooling
geometries, with absent cotangents and unneeded outputs; bad input; opcheck; and the conv net's
double-backward product with and without them."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import imaml_ext
from imaml_ext import hvp as hvp_mod
from imaml_ext import ops, reference

pytestmark = [pytest.mark.skipif(not imaml_ext.extension_available(),
                                 reason="compiled extension not built"),
              pytest.mark.usefixtures("one_thread")]

# (N, C, H, W, pool (kernel, stride, padding, dilation, ceil_mode)): the conv net's 2x2 pool
# on even and odd maps, a 1x1 pooled map, disjoint 3x3 / stride-3 windows with padding and ceil
# mode, a dilated kernel, rectangular windows, and many channels.
CASES = [
    (2, 3, 6, 6, ((2, 2), (2, 2), (0, 0), (1, 1), False)),
    (3, 4, 7, 5, ((2, 2), (2, 2), (0, 0), (1, 1), False)),
    (5, 6, 3, 3, ((2, 2), (2, 2), (0, 0), (1, 1), False)),
    (2, 3, 8, 7, ((3, 3), (3, 3), (1, 1), (1, 1), True)),
    (2, 2, 9, 9, ((2, 2), (3, 3), (0, 0), (2, 2), False)),
    (1, 5, 6, 8, ((2, 1), (2, 1), (0, 0), (1, 1), False)),
    (3, 70, 4, 4, ((2, 2), (2, 2), (0, 0), (1, 1), False)),
]
IDS = ["2x2", "odd", "1x1", "pad_ceil", "dilated", "rect", "wide"]
SIMPLE_OUT = ("pad_ceil", "dilated")  # geometries the forward kernel leaves to the reference


def problem(case, dtype, device, channels_last, seed=0):
    """The block's saved tensors at a random point, as _PooledBatchNorm makes them."""
    N, C, H, W, pool = case
    g = torch.Generator().manual_seed(seed * 7919 + N * 131 + C * 17 + H * 5 + W)

    def rnd(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=g)

    h = rnd(N, C, H, W)
    k, st, pad, dil, ceil = pool
    z, idx = F.max_pool2d(h, k, st, pad, dil, ceil, return_indices=True)
    mean, r = rnd(C), rnd(C).abs() + 0.5
    xhat = (z - mean.view(1, -1, 1, 1)) * r.view(1, -1, 1, 1)
    y = torch.relu(xhat * rnd(C).view(1, -1, 1, 1) + 0.1)  # zeros and positives
    t = dict(gy=rnd(*z.shape), y=y, xhat=xhat, h=h, idx=idx, mean=mean, rw=rnd(C), kb=rnd(C),
             kg=rnd(C), ch=rnd(N, C, H, W), cw=rnd(C), cb=rnd(C), gu=rnd(*z.shape) * (y > 0),
             coef=rnd(6, 5, C), a2=rnd(C))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return {k_: (v.to(device) if v.dtype == torch.int64 else v.to(device, dtype)).contiguous(
        memory_format=fmt if v.dim() == 4 else torch.contiguous_format)
        for k_, v in t.items()}, pool


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("case", [c for c, i in zip(CASES, IDS) if i not in SIMPLE_OUT],
                         ids=[i for i in IDS if i not in SIMPLE_OUT])
def test_forward_matches_reference(case, channels_last, flip, device, dtype):
    t, pool = problem(case, dtype, device, channels_last)
    g = torch.Generator().manual_seed(11)
    w = torch.randn(case[1], dtype=torch.float64, generator=g).to(device, dtype)
    b = torch.randn(case[1], dtype=torch.float64, generator=g).to(device, dtype)
    h = t["h"]
    if dtype == torch.float64:  # ties: the first maximum of the window wins in both
        h = h.clone()
        h[..., 0, :2] = 1.5
    got = ops.pooled_bn_forward(h, w, b, 1e-5, pool, flip, use_ext=True)
    want = reference.pooled_bn_forward(h, w, b, 1e-5, pool, flip)
    assert torch.equal(got[2], want[2])  # the arg-max indices
    assert_same(got[:2] + got[3:], want[:2] + want[3:], dtype)
    fmt = torch.channels_last if channels_last and case[1] > 1 else torch.contiguous_format
    assert got[0].is_contiguous(memory_format=fmt) and got[2].dtype == torch.int64


def test_forward_takes_the_reference_outside_simple_windows(device):
    t, pool = problem(CASES[3], torch.float64, device, False)  # padding and ceil mode
    w, b = t["rw"], t["kb"]
    with pytest.raises(RuntimeError, match="use_ext=True but the kernel takes windows inside"):
        ops.pooled_bn_forward(t["h"], w, b, 1e-5, pool, True, use_ext=True)
    got = ops.pooled_bn_forward(t["h"], w, b, 1e-5, pool, True)
    want = reference.pooled_bn_forward(t["h"], w, b, 1e-5, pool, True)
    assert_same(got, want, torch.float64)
    h = t["h"].clone()
    h[0, 0, 0, 0] = float("nan")  # a NaN is the window's maximum, as in ATen
    simple = ((2, 2), (2, 2), (0, 0), (1, 1), False)
    got = ops.pooled_bn_forward(h, w, b, 1e-5, simple, False, use_ext=True)
    assert int(got[2][0, 0, 0, 0]) == 0 and torch.isnan(got[0][0, 0, 0, 0])
    torch.testing.assert_close(got[2], reference.pooled_bn_forward(h, w, b, 1e-5, simple,
                                                                   False)[2])
    with pytest.raises(ValueError, match="stride >= kernel_size"):
        torch.ops.imaml_ext.pooled_bn_forward(h, w, b, 1e-5, [3, 3], [2, 2], False)
    with pytest.raises(ValueError, match=r"bias must be a contiguous \(3,\) = \(C,\) tensor"):
        torch.ops.imaml_ext.pooled_bn_forward(h, w, b[:2], 1e-5, [2, 2], [2, 2], False)
    torch.library.opcheck(torch.ops.imaml_ext.pooled_bn_forward.default,
                          (t["h"], w, b, 1e-5, [2, 2], [2, 2], True))


def backward(t, pool, use_ext):
    return ops.pooled_bn_backward(t["gy"], t["y"], t["xhat"], t["h"], t["idx"], t["mean"],
                                  t["rw"], t["kb"], t["kg"], pool, use_ext=use_ext)


def double_backward(t, pool, use_ext, drop=(), need_gy=True, need_h=True):
    ch, cw, cb = (None if k in drop else t[k] for k in ("ch", "cw", "cb"))
    return ops.pooled_bn_double_backward(ch, cw, cb, t["gu"], t["h"], t["xhat"], t["idx"],
                                         t["mean"], t["y"], t["rw"], t["coef"], t["a2"], pool,
                                         need_gy, need_h, use_ext=use_ext)


def assert_same(got, want, dtype):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        if b is None:
            assert a is None
            continue
        tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5,
                                                                                atol=2e-5)
        torch.testing.assert_close(a, b, **tol)
        assert a.shape == b.shape


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_backward_matches_reference(case, channels_last, device, dtype):
    t, pool = problem(case, dtype, device, channels_last)
    got = backward(t, pool, True)
    assert_same(got, backward(t, pool, False), dtype)
    fmt = torch.channels_last if channels_last and case[1] > 1 else torch.contiguous_format
    assert got[0].is_contiguous(memory_format=fmt)  # gh in h's layout


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_double_backward_matches_reference(case, channels_last, device, dtype):
    t, pool = problem(case, dtype, device, channels_last)
    assert_same(double_backward(t, pool, True), double_backward(t, pool, False), dtype)


@pytest.mark.parametrize("drop", [("ch",), ("cw",), ("cb",), ("ch", "cw", "cb")],
                         ids=["no_ch", "no_cw", "no_cb", "none"])
@pytest.mark.parametrize("need", [(True, True), (True, False), (False, True), (False, False)],
                         ids=["both", "gy", "h", "w_only"])
def test_double_backward_absent_cotangents_and_outputs(drop, need, device):
    t, pool = problem(CASES[1], torch.float64, device, False, seed=3)
    got = double_backward(t, pool, True, drop, *need)
    assert_same(got, double_backward(t, pool, False, drop, *need), torch.float64)
    assert (got[0] is None) != need[0] and (got[1] is None) != need[1]


def coefficient_inputs(C, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    r, w, gb, gw = (torch.randn(C, dtype=torch.float64, generator=g) for _ in range(4))
    r = r.abs() + 0.5
    n = 36
    rw = r * w
    kb = rw / -n
    return [t.to(device, dtype) for t in (r, w, rw, kb, kb * r, gb, gw)], n


@pytest.mark.parametrize("C", [1, 7, 300])
def test_coefficients_match_reference(C, device, dtype):
    args, n = coefficient_inputs(C, dtype, device)
    got = ops.pooled_bn_coefficients(*args, n, use_ext=True)
    want = reference.pooled_bn_coefficients(*args, n)
    assert got[0].shape == (6, 5, C) and got[1].shape == (C,)
    assert_same(got, want, dtype)


def test_coefficients_bad_input(device):
    args, n = coefficient_inputs(4, torch.float64, device)
    op = torch.ops.imaml_ext.pooled_bn_coefficients
    with pytest.raises(ValueError, match="pooled_bn_coefficients: n must be >= 1, got 0"):
        op(*args, 0)
    bad = list(args)
    bad[5] = bad[5][:3]
    with pytest.raises(ValueError, match=r"gb must be a contiguous \[4\] tensor like r, got \[3\]"):
        op(*bad, n)
    bad = list(args)
    bad[2] = bad[2].float()
    with pytest.raises(ValueError, match="rw must have dtype Double like r, got Float"):
        op(*bad, n)
    torch.library.opcheck(op.default, (*args, n))


def test_mixed_layouts_are_converted(device):
    """The wrappers bring pooled tensors and ch to h's layout (the kernels need one layout)."""
    t, pool = problem(CASES[0], torch.float64, device, True)
    want_b = backward(t, pool, False)
    t["gy"] = t["gy"].contiguous()
    t["ch"] = t["ch"].contiguous()
    t["cw"] = torch.randn(2 * t["cw"].numel(), dtype=torch.float64, device=device)[::2]
    want_d = double_backward(t, pool, False)
    assert_same(backward(t, pool, True), want_b, torch.float64)
    assert_same(double_backward(t, pool, True), want_d, torch.float64)


def test_use_ext_none_picks_the_kernel_only_where_it_applies():
    t, pool = problem(CASES[0], torch.float64, "cpu", False)
    assert ops._pooled_bn_ext("op", t["h"], pool, None)
    overlap = ((3, 3), (2, 2), (1, 1), (1, 1), False)
    assert not ops._pooled_bn_ext("op", t["h"], overlap, None)
    with pytest.raises(RuntimeError, match="op: use_ext=True but the pooling windows overlap"):
        ops._pooled_bn_ext("op", t["h"], overlap, True)
    strided = t["h"][:, :, :, ::2]
    assert not ops._pooled_bn_ext("op", strided, pool, None)
    with pytest.raises(RuntimeError, match="neither NCHW- nor channels-last"):
        ops._pooled_bn_ext("op", strided, pool, True)
    # overlapping windows run the reference: the same numbers as ATen's unpooling
    z, idx = F.max_pool2d(t["h"], 3, 2, 1, return_indices=True)
    ones = torch.ones(t["h"].shape[1], dtype=torch.float64)
    gh = ops.pooled_bn_backward(torch.ones_like(z), z.abs() + 1, z, t["h"], idx, ones * 0,
                                ones, ones * 0, ones * 0, overlap)[0]
    torch.testing.assert_close(gh, torch.ops.aten.max_pool2d_with_indices_backward(
        torch.ones_like(z), t["h"], [3, 3], [2, 2], [1, 1], [1, 1], False, idx))


def test_bad_input_is_named(device):
    t, pool = problem(CASES[0], torch.float64, device, False)
    op = torch.ops.imaml_ext.pooled_bn_backward
    args = [t[k] for k in ("gy", "y", "xhat", "h", "idx", "mean", "rw", "kb", "kg")]
    geo = [[2, 2], [2, 2], [0, 0], [1, 1], False]

    def call(i=None, value=None, geometry=geo):
        a = list(args)
        if i is not None:
            a[i] = value
        return op(*a, *geometry)

    with pytest.raises(ValueError, match="idx must be int64"):
        call(4, t["idx"].int())
    with pytest.raises(ValueError, match=r"gy must be \[2, 3, 3, 3\] \(h .* pooled\), got"):
        call(0, t["gy"][:, :, :2])
    with pytest.raises(ValueError, match="xhat must be dense NCHW like h"):
        call(2, t["xhat"].contiguous(memory_format=torch.channels_last))
    with pytest.raises(ValueError, match=r"kb must be a contiguous \(3,\) = \(C,\) tensor"):
        call(7, t["kb"][:2])
    with pytest.raises(ValueError, match="mean must have dtype Double like h, got Float"):
        call(5, t["mean"].float())
    with pytest.raises(ValueError, match="h must be 4-d"):
        call(3, t["h"][0])
    with pytest.raises(ValueError, match="pooling windows must be disjoint"):
        call(geometry=[[3, 3], [2, 2], [1, 1], [1, 1], False])
    with pytest.raises(ValueError, match=r"coef must be a contiguous \(6, 5, 3\) tensor"):
        torch.ops.imaml_ext.pooled_bn_double_backward(
            t["ch"], t["cw"], t["cb"], t["gu"], t["h"], t["xhat"], t["idx"], t["mean"], t["y"],
            t["rw"], t["coef"][:, :4], t["a2"], *geo, True, True)
    with pytest.raises(ValueError, match=r"ch must be \[2, 3, 6, 6\] like h"):
        torch.ops.imaml_ext.pooled_bn_double_backward(
            t["ch"][:, :, :5], t["cw"], t["cb"], t["gu"], t["h"], t["xhat"], t["idx"],
            t["mean"], t["y"], t["rw"], t["coef"], t["a2"], *geo, True, True)


def test_out_of_range_index_raises_on_cpu():
    t, pool = problem(CASES[0], torch.float64, "cpu", False)
    t["idx"] = t["idx"].clone()
    t["idx"][0, 0, 0, 0] = 36  # a 6x6 plane has positions 0..35
    with pytest.raises(ValueError, match="idx holds a position outside the H x W plane"):
        backward(t, pool, True)
    with pytest.raises(ValueError, match="idx holds a position outside the H x W plane"):
        double_backward(t, pool, True)


def test_opcheck(device):
    t, pool = problem(CASES[1], torch.float64, device, True)
    geo = [[2, 2], [2, 2], [0, 0], [1, 1], False]
    torch.library.opcheck(torch.ops.imaml_ext.pooled_bn_backward.default,
                          (*(t[k] for k in ("gy", "y", "xhat", "h", "idx", "mean", "rw", "kb",
                                            "kg")), *geo))
    for ch, need in ((t["ch"], (True, True)), (None, (False, True))):
        torch.library.opcheck(torch.ops.imaml_ext.pooled_bn_double_backward.default,
                              (ch, t["cw"], None, t["gu"], t["h"], t["xhat"], t["idx"],
                               t["mean"], t["y"], t["rw"], t["coef"], t["a2"], *geo, *need))


@pytest.mark.parametrize("layout", ["cpu_default", "gpu_layout"])
def test_conv_net_product_with_and_without_the_kernels(layout, device, monkeypatch):
    """The conv net's exact double-backward product (5-way, 2 tasks) is the same with the
    kernels and with the reference ops, in float64."""
    from imaml_ext.hvp import TaskLoss, make_hvp
    from imaml_ext.models import make_model
    torch.manual_seed(0)
    model = make_model("omniglot", 5).double().to(device)
    with torch.no_grad():  # one negative scale per block: the sign-flip path too
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight[0] = -1.0
    M = 2
    pb = {k: t.detach().unsqueeze(0).repeat(M, *[1] * t.dim()) for k, t in
          model.named_parameters()}
    x = torch.randn(M, 5, 1, 28, 28, dtype=torch.float64, device=device)
    y = torch.arange(5, device=device).repeat(M, 1)
    tl = TaskLoss(model) if layout == "cpu_default" else \
        TaskLoss(model, fused_blocks=False, task_chunk=M, channels_last=False)
    v = {k: torch.randn_like(t) for k, t in pb.items()}
    out = {}
    for name, devices in (("kernels", (device,)), ("reference", ())):
        monkeypatch.setattr(hvp_mod, "POOLED_BN_KERNELS", devices)
        calls = []
        real = torch.ops.imaml_ext.pooled_bn_double_backward
        monkeypatch.setattr(ops.torch.ops.imaml_ext, "pooled_bn_double_backward",
                            lambda *a: calls.append(1) or real(*a), raising=False)
        out[name] = make_hvp(tl, pb, x, y, "exact")(v)
        assert bool(calls) == (name == "kernels")
    for k in out["reference"]:
        torch.testing.assert_close(out["kernels"][k], out["reference"][k], rtol=1e-10,
                                   atol=1e-12)


@pytest.mark.parametrize("fuse", [True, False])
def test_third_order_raises_or_is_right(fuse):
    """A derivative of a Hessian-vector product through the block: the written-out block
    (fuse_bn_pool) has derivatives to second order and refuses a create_graph backward through
    the second (it gave a silently wrong third derivative before); the composite block
    differentiates to any order (checked against finite differences)."""
    from imaml_ext.hvp import _bn_relu_pool, _bn_relu_pool_composite
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 3, 6, 6, dtype=torch.float64, generator=g).requires_grad_(True)
    w = (torch.rand(3, dtype=torch.float64, generator=g) + 0.5).requires_grad_(True)
    b = torch.randn(3, dtype=torch.float64, generator=g).requires_grad_(True)
    pool = torch.nn.MaxPool2d(2)
    v = torch.randn(2, 3, 6, 6, dtype=torch.float64, generator=g)
    block = _bn_relu_pool if fuse else _bn_relu_pool_composite

    def hv(h):
        (gh,) = torch.autograd.grad(block(h, w, b, 1e-5, pool).pow(2).sum(), h,
                                    create_graph=True)
        (out,) = torch.autograd.grad((gh * v).sum(), h, create_graph=True)
        return out

    if fuse:
        with pytest.raises(RuntimeError, match=r"a third derivative\) is not available; use "
                                               r"TaskLoss\(..., fuse_bn_pool=False\)"):
            hv(h)
    else:
        assert torch.autograd.gradcheck(hv, (h,))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_ops_make_no_host_sync():
    t, pool = problem(CASES[0], torch.float32, "cuda", False)
    args, n = coefficient_inputs(t["h"].shape[1], torch.float32, "cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        backward(t, pool, True)
        double_backward(t, pool, True)
        ops.pooled_bn_coefficients(*args, n, use_ext=True)
        ops.pooled_bn_forward(t["h"], t["rw"], t["kb"], 1e-5, pool, True, use_ext=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("value,expect", [(None, "('cpu', 'cuda')"), ("fused", "('cpu', 'cuda')"),
                                          ("reference", "('cpu',)"),
                                          ("on", "IMAML_CUDA_POOLED_BN must be fused or "
                                                 "reference (or unset), got 'on'")])
def test_cuda_default_and_its_switch(value, expect):
    # the kernels are the CUDA default since the H100 run of 2026-11-28; the switch turns them off
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "IMAML_CUDA_POOLED_BN"}
    if value is not None:
        env["IMAML_CUDA_POOLED_BN"] = value
    r = subprocess.run([sys.executable, "-c", "import imaml_ext.hvp as h; "
                        "print(h.POOLED_BN_KERNELS)"], capture_output=True, text=True, env=env,
                       timeout=120)
    assert expect in (r.stdout if r.returncode == 0 else r.stderr), (r.stdout, r.stderr[-2000:])
    assert (r.returncode == 0) == (value != "on")
