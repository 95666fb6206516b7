"""imaml_ext.hvp: flat views, the batched task loss (folded and vmap backends) and the HVPs,
each against an independent per-task computation in float64."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

import imaml_ext
from imaml_ext.hvp import (ParamSpec, TaskLoss, expand_params, flatten_params, hvp_single,
                           make_hvp, shifted_operator, unflatten_params)
from imaml_ext.models import ConvNet

DT = torch.float64


# Tiny tensors: one intra-op thread (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def conv_setup(M=3, ways=3, shots=2, downsample="pool", seed=0):
    torch.manual_seed(seed)
    model = ConvNet(1, ways, hidden=4, image_size=16, downsample=downsample).to(DT)
    base = {k: v.detach() for k, v in model.named_parameters()}
    params_b = {k: v + 0.05 * torch.randn(M, *v.shape, dtype=DT) for k, v in base.items()}
    x = torch.randn(M, ways * shots, 1, 16, 16, dtype=DT)
    y = torch.randint(0, ways, (M, ways * shots))
    return model, params_b, x, y


def mlp_setup(M=3, n=7, d=4, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    params_b = {k: v.detach() + 0.1 * torch.randn(M, *v.shape, dtype=DT)
                for k, v in model.named_parameters()}
    x = torch.randn(M, n, d, dtype=DT)
    y = torch.randint(0, 3, (M, n))
    return model, params_b, x, y


def loop_loss(model, p, x, y, loss="cross_entropy"):
    out = functional_call(model, p, (x,))
    return F.cross_entropy(out, y) if loss == "cross_entropy" else F.mse_loss(out.squeeze(-1), y)


def loop_hvp(model, params_b, x, y, v):
    """Per task: double backward with torch.autograd (independent of torch.func)."""
    outs = {k: [] for k in params_b}
    for i in range(x.shape[0]):
        p = {k: t[i].clone().requires_grad_(True) for k, t in params_b.items()}
        g = torch.autograd.grad(loop_loss(model, p, x[i], y[i]), list(p.values()),
                                create_graph=True)
        hv = torch.autograd.grad(g, list(p.values()), grad_outputs=[v[k][i] for k in p])
        for k, h in zip(p, hv):
            outs[k].append(h)
    return {k: torch.stack(t) for k, t in outs.items()}


def assert_close_dict(a, b, rtol=1e-9, atol=1e-11):
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=k)


def test_param_spec_roundtrip_and_views():
    params = {"a": torch.randn(4, 2, 3), "b": torch.randn(4, 5)}
    flat, spec = flatten_params(params)
    assert flat.shape == (4, 11) and spec.numel == 11
    back = unflatten_params(flat, spec)
    assert_close_dict(back, params, rtol=0, atol=0)
    back["b"].zero_()  # views into the buffer
    assert flat[:, 6:].abs().sum() == 0
    one = spec.unflatten_one(spec.flatten_one({"a": params["a"][0], "b": params["b"][0]}))
    torch.testing.assert_close(one["a"], params["a"][0])


def test_param_spec_unflatten_copy():
    params = {"a": torch.randn(4, 2, 3), "b": torch.randn(4, 5)}
    flat, spec = flatten_params(params)
    back = spec.unflatten_copy(flat)
    assert_close_dict(back, params, rtol=0, atol=0)
    assert all(t.is_contiguous() for t in back.values())
    back["b"].zero_()  # copies, not views
    assert flat[:, 6:].abs().sum() > 0
    with pytest.raises(ValueError, match=r"unflatten_copy: expected \(M, 11\), got \(4, 10\)"):
        spec.unflatten_copy(flat[:, :10])


def test_param_spec_flatten_names_the_bad_leaf():
    """A list, a 0-d tensor first or a leaf with another task count or shape: a ValueError that
    names the leaf, never an AttributeError or a silent reshape into the wrong coordinates."""
    params = {"a": torch.randn(4, 2, 3), "b": torch.randn(4, 5)}
    _, spec = flatten_params(params)
    with pytest.raises(ValueError, match=r"params\['a'\] must be a tensor \(M, 2, 3\).*got list"):
        spec.flatten({"a": [1.0], "b": params["b"]})
    with pytest.raises(ValueError, match=r"params\['a'\] must be a tensor .*got \(\)"):
        spec.flatten({"a": torch.tensor(1.0), "b": params["b"]})
    with pytest.raises(ValueError, match=r"v\['b'\] must be \(M, 5\) with M = 4 .*got \(3, 5\)"):
        spec.flatten({"a": params["a"], "b": params["b"][:3]}, what="v")
    with pytest.raises(ValueError, match=r"params\['a'\] must be \(M, 2, 3\).*got \(4, 3, 2\)"):
        spec.flatten({"a": params["a"].transpose(1, 2), "b": params["b"]})


def test_flat_product_with_and_without_autograd():
    """BatchedHVP.flat gives the dict product's values, also for a v that requires grad (then
    it takes views: the one-op copies are out= ops, which autograd refuses)."""
    model, params_b, x, y = conv_setup()
    H = make_hvp(TaskLoss(model), params_b, x, y, "exact")
    v = {k: torch.randn_like(t) for k, t in params_b.items()}
    vf = H.spec.flatten(v)
    want = H.spec.flatten(H(v))
    torch.testing.assert_close(H.flat(vf), want)
    vg = vf.clone().requires_grad_(True)
    torch.testing.assert_close(H.flat(vg), want)
    # ops: the copy of v's pieces and the concatenation of H v's, nothing per parameter (the
    # graph cloned each strided view it reshaped: one launch each on a GPU)
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.__name__.split(".")[0]
            if not func.is_view and name not in ("detach", "empty", "new_empty", "empty_like",
                                                 "empty_strided", "new_empty_strided"):
                Count.n += 1
            return func(*args, **(kwargs or {}))

    counts = []
    for call in (lambda: H(v), lambda: H.flat(vf)):
        call()
        Count.n = 0
        with Count():
            call()
        counts.append(Count.n)
    # + the split copy, the cat, and a copy of each product output that is not contiguous in
    # (M, ...) (channels-last weight gradients here: clone + _unsafe_view)
    strided = sum(not t.is_contiguous() for t in H(v).values())
    assert counts[1] <= counts[0] + 2 + 2 * strided, (counts, strided)


def test_param_spec_names_mismatch_error():
    spec = ParamSpec.of({"a": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="v does not match.*missing \\['a'\\]"):
        spec.flatten({"b": torch.zeros(2, 3)}, "v")


@pytest.mark.parametrize("downsample", ["pool", "stride"])
def test_folded_forward_equals_vmap(downsample):
    model, params_b, x, y = conv_setup(downsample=downsample)
    folded, vm = TaskLoss(model), TaskLoss(model, backend="vmap")
    assert folded.backend == "folded" and vm.backend == "vmap"
    torch.testing.assert_close(folded.outputs(params_b, x), vm.outputs(params_b, x))
    per_task = torch.stack([loop_loss(model, {k: v[i] for k, v in params_b.items()}, x[i], y[i])
                            for i in range(x.shape[0])])
    torch.testing.assert_close(folded(params_b, x, y), per_task)


def test_folded_sequential_mlp_and_linear():
    model, params_b, x, y = mlp_setup()
    tl = TaskLoss(model)
    assert tl.backend == "folded"
    torch.testing.assert_close(tl.outputs(params_b, x), TaskLoss(model, backend="vmap")
                               .outputs(params_b, x))
    lin = nn.Linear(4, 1, bias=False).to(DT)
    tl2 = TaskLoss(lin, "half_mse")
    w = torch.randn(3, 1, 4, dtype=DT)
    yr = torch.randn(3, 7, dtype=DT)
    want = 0.5 * ((x @ w.transpose(1, 2)).squeeze(-1) - yr).pow(2).mean(1)
    torch.testing.assert_close(tl2({"weight": w}, x, yr), want)


def test_unsupported_model_falls_back_to_vmap():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            return self.lin(x).sin()

    model = Custom().to(DT)
    tl = TaskLoss(model)
    assert tl.backend == "vmap"
    with pytest.raises(ValueError, match="folded"):
        TaskLoss(model, backend="folded")


def _shared_models():
    """Models that reach a module or a tensor under two names, each with what it is."""
    act = nn.ReLU()
    lin = nn.Linear(4, 4)
    a, b = nn.Linear(4, 4), nn.Linear(4, 3)
    b.weight = nn.Parameter(torch.randn(3, 4))
    tied_a, tied_b = nn.Linear(4, 4), nn.Linear(4, 4)
    tied_b.weight = tied_a.weight
    return {
        "activation twice": nn.Sequential(nn.Linear(4, 5), act, nn.Linear(5, 5), act,
                                          nn.Linear(5, 3)),
        "linear twice": nn.Sequential(lin, nn.Tanh(), lin, nn.Tanh(), nn.Linear(4, 3)),
        "tied weights": nn.Sequential(tied_a, nn.Tanh(), tied_b, nn.Tanh(), nn.Linear(4, 3)),
    }


@pytest.mark.parametrize("case", ["activation twice", "linear twice", "tied weights"])
def test_modules_and_tensors_reached_twice(case):
    """Each use of a shared layer runs (named_children() lists it once), tied tensors stay tied,
    and the model keeps its own Parameters (torch.func.functional_call loses them on a module
    at two paths): outputs and gradients against the real model, one task at a time."""
    import copy
    torch.manual_seed(0)
    model = _shared_models()[case].to(DT)
    own = {k: (v, v.detach().clone()) for k, v in model.named_parameters()}
    M, n = 3, 6
    params_b = {k: v.detach() + 0.1 * torch.randn(M, *v.shape, dtype=DT)
                for k, v in model.named_parameters()}
    x = torch.randn(M, n, 4, dtype=DT)
    y = torch.randint(0, 3, (M, n))
    tl = TaskLoss(model)
    out = tl.outputs(params_b, x)
    g, losses, _ = tl.grad(params_b, x, y)
    for i in range(M):
        twin = copy.deepcopy(model)  # keeps the sharing
        with torch.no_grad():
            for k, v in twin.named_parameters():
                v.copy_(params_b[k][i])
        torch.testing.assert_close(out[i], twin(x[i]))
        loss = F.cross_entropy(twin(x[i]), y[i])
        torch.testing.assert_close(losses[i], loss)
        named = dict(twin.named_parameters())
        gi = torch.autograd.grad(loss, list(named.values()))
        for k, gk in zip(named, gi):
            torch.testing.assert_close(g[k][i], gk, msg=k)
    for k, (param, value) in own.items():
        now = dict(model.named_parameters())[k]
        assert now is param and type(now) is nn.Parameter, k
        assert torch.equal(now, value), k
    torch.testing.assert_close(model(x[0]), copy.deepcopy(model)(x[0]))


def test_batched_grad_equals_per_task_loop():
    model, params_b, x, y = conv_setup()
    g, losses, out = TaskLoss(model).grad(params_b, x, y)
    for i in range(x.shape[0]):
        p = {k: v[i].clone().requires_grad_(True) for k, v in params_b.items()}
        gi = torch.autograd.grad(loop_loss(model, p, x[i], y[i]), list(p.values()))
        for k, gk in zip(p, gi):
            torch.testing.assert_close(g[k][i], gk)
    assert out.shape == (3, 6, 3) and losses.shape == (3,)


@pytest.mark.parametrize("kind", ["exact", "forward_over_reverse", "double_backward"])
@pytest.mark.parametrize("backend", ["folded", "vmap"])
def test_hvp_equals_per_task_double_backward(kind, backend):
    model, params_b, x, y = conv_setup()
    v = {k: torch.randn_like(t) for k, t in params_b.items()}
    H = make_hvp(TaskLoss(model, backend=backend), params_b, x, y, kind)
    assert_close_dict(H(v), loop_hvp(model, params_b, x, y, v))
    # the flat form used by CG
    flat_v, spec = flatten_params(v)
    torch.testing.assert_close(H.flat(flat_v), spec.flatten(H(v)))


@pytest.mark.parametrize("flip", ["all", "some"])
def test_hvp_with_negative_batchnorm_scales(flip):
    # the HVP layout pools s * h with s = sign of each channel's scale; with every scale >= 0 it
    # skips the flip (the test above), here some or all scales are negative
    model, params_b, x, y = conv_setup()
    w = params_b["body.1.weight"].clone()
    if flip == "all":
        w = -w
    else:
        w[:, ::2] = -w[:, ::2]
    params_b = dict(params_b, **{"body.1.weight": w})
    v = {k: torch.randn_like(t) for k, t in params_b.items()}
    H = make_hvp(TaskLoss(model), params_b, x, y, "exact")
    assert_close_dict(H(v), loop_hvp(model, params_b, x, y, v))


def test_value_and_grad_from_the_hvp_graph():
    model, params_b, x, y = conv_setup()
    tl = TaskLoss(model)
    g, losses, _ = tl.grad(params_b, x, y)
    for kind in ("exact", "ggn"):
        lv, gv = make_hvp(tl, params_b, x, y, kind).value_and_grad()
        torch.testing.assert_close(lv, losses)
        assert_close_dict(gv, g)


def test_losses_from_the_hvp_graph():
    """BatchedHVP.losses: the training losses from the product's own graph, or None where it
    has none (then the caller evaluates them)."""
    model, params_b, x, y = conv_setup()
    tl = TaskLoss(model)
    losses = tl.grad(params_b, x, y)[1]
    for kind in ("exact", "double_backward", "ggn"):
        torch.testing.assert_close(make_hvp(tl, params_b, x, y, kind).losses(), losses)
    assert make_hvp(tl, params_b, x, y, "forward_over_reverse").losses() is None
    # In chunks (one BatchedHVP per slice of the tasks) too.
    H = make_hvp(tl, params_b, x, y, "ggn")
    H._parts = [(s, make_hvp(tl, {k: t[s] for k, t in params_b.items()}, x[s], y[s], "ggn"))
                for s in (slice(0, 1), slice(1, None))]
    torch.testing.assert_close(H.losses(), losses)


def test_double_backward_graph_aliases_the_params():
    """The product's graph is built on the caller's parameters, not a copy: changing them in
    place after the graph exists is an autograd error, never a product at stale values."""
    model, params_b, x, y = conv_setup()
    v = {k: torch.randn_like(t) for k, t in params_b.items()}
    H = make_hvp(TaskLoss(model), params_b, x, y, "double_backward")
    H(v)
    p = H._db[0]
    assert all(p[k].data_ptr() == params_b[k].data_ptr() for k in params_b)
    params_b["head.weight"].add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        H(v)


@pytest.mark.parametrize("channels_last", [False, True])
def test_layouts_and_fused_block_are_the_same_function(channels_last):
    model, params_b, x, y = conv_setup()
    ref = TaskLoss(model, backend="vmap")
    tl = TaskLoss(model, channels_last=channels_last)
    out = ref.outputs(params_b, x)
    torch.testing.assert_close(tl.outputs(params_b, x, mode="grad"), out)
    torch.testing.assert_close(tl.outputs(params_b, x, mode="hvp"), out)
    # negative BatchNorm scales flip max-pooling into min-pooling inside the fused block
    neg = dict(params_b, **{"body.1.weight": -params_b["body.1.weight"]})
    torch.testing.assert_close(tl.outputs(neg, x, mode="hvp"), ref.outputs(neg, x))
    g1, _, _ = tl.grad(neg, x, y)
    g2, _, _ = ref.grad(neg, x, y)
    assert_close_dict(g1, g2)


def test_hvp_single_vmapped_matches_batched():
    model, params_b, x, y = mlp_setup()
    v = {k: torch.randn_like(t) for k, t in params_b.items()}
    tl = TaskLoss(model)
    fn = lambda p, xx, yy: tl.single(p, xx, yy)  # noqa: E731
    got = vmap(lambda p, vv, xx, yy: hvp_single(fn, p, vv, xx, yy))(params_b, v, x, y)
    assert_close_dict(got, make_hvp(tl, params_b, x, y)(v))


def _ggn_dense(model, p, x, y):
    """J^T H_out J for one task of the MLP, from explicit Jacobians."""
    names = list(p)
    flat = torch.cat([p[k].reshape(-1) for k in names])
    sizes = [p[k].numel() for k in names]

    def out_of(f):
        parts = dict(zip(names, [t.reshape(p[k].shape) for t, k in
                                 zip(f.split(sizes), names)]))
        return functional_call(model, parts, (x,)).reshape(-1)

    J = torch.autograd.functional.jacobian(out_of, flat)
    o = out_of(flat).detach()
    Hout = torch.autograd.functional.hessian(
        lambda oo: F.cross_entropy(oo.reshape(x.shape[0], -1), y), o)
    return J.T @ Hout @ J


@pytest.mark.parametrize("setup", [mlp_setup, conv_setup], ids=["mlp", "conv"])
def test_ggn_equals_explicit_and_is_psd(setup):
    model, params_b, x, y = setup(M=2)
    v = {k: torch.randn_like(t) for k, t in params_b.items()}
    H = make_hvp(TaskLoss(model), params_b, x, y, "ggn")
    got = H(v)
    torch.testing.assert_close(spec_flat(H(v)), spec_flat(got), rtol=0, atol=0)  # graph reused
    flat_v, spec = flatten_params(v)
    got_flat = spec.flatten(got)
    for i in range(2):
        G = _ggn_dense(model, {k: t[i] for k, t in params_b.items()}, x[i], y[i])
        torch.testing.assert_close(got_flat[i], G @ flat_v[i])
        assert torch.linalg.eigvalsh((G + G.T) / 2).min() > -1e-10
    assert ((got_flat * flat_v).sum(1) >= 0).all()


def spec_flat(d):
    return torch.cat([t.reshape(t.shape[0], -1) for t in d.values()], 1)


def _one(p):
    return {k: t[None] for k, t in p.items()}


@pytest.mark.parametrize("kind", ["exact", "ggn"])
@pytest.mark.parametrize("setup", [mlp_setup, conv_setup], ids=["mlp", "conv"])
def test_batched_hvp_inside_vmap(setup, kind):
    # inside torch.func transforms the products take their functional paths, and the conv
    # net's folded layout must not ask for a memory format the vmapped tensor cannot have
    model, params_b, x, y = setup(M=2)
    v = {k: torch.randn_like(t) for k, t in params_b.items()}
    inside = vmap(lambda p, xx, yy, vv: make_hvp(TaskLoss(model), _one(p), xx[None], yy[None],
                                                 kind)(_one(vv)))(params_b, x, y, v)
    want = make_hvp(TaskLoss(model), params_b, x, y, kind)(v)
    assert_close_dict({k: t.squeeze(1) for k, t in inside.items()}, want)


def test_vmapped_tells_vmap_from_other_transforms():
    # only vmap changes the physical shape (so the folded layout drops channels-last there);
    # grad and jvp keep it, and keep the layout
    from torch.func import grad as fgrad, jvp as fjvp
    from imaml_ext.hvp import _vmapped
    seen = []

    def f(t):
        seen.append(_vmapped(t))
        return t.sum()
    x = torch.randn(3, 4, dtype=DT)
    fgrad(f)(x)
    fjvp(f, (x,), (x,))
    vmap(f)(x)
    vmap(fgrad(f))(x)
    fgrad(lambda t: vmap(f)(t).sum())(x)
    assert seen == [False, False, True, True, True]


def test_ggn_equals_hessian_for_linear_least_squares():
    lin = nn.Linear(4, 1, bias=False).to(DT)
    tl = TaskLoss(lin, "half_mse")
    w = {"weight": torch.randn(3, 1, 4, dtype=DT)}
    x, yr = torch.randn(3, 9, 4, dtype=DT), torch.randn(3, 9, dtype=DT)
    v = {"weight": torch.randn(3, 1, 4, dtype=DT)}
    want = (x.transpose(1, 2) @ (x @ v["weight"].transpose(1, 2))).transpose(1, 2) / 9
    for kind in ("exact", "forward_over_reverse", "double_backward", "ggn"):
        torch.testing.assert_close(make_hvp(tl, w, x, yr, kind)(v)["weight"], want)


def test_batch_of_one_and_expand_params():
    model, params_b, x, y = conv_setup(M=1)
    base = {k: v[0] for k, v in params_b.items()}
    pb = expand_params(base, 1)
    v = {k: torch.randn_like(t) for k, t in pb.items()}
    assert_close_dict(make_hvp(TaskLoss(model), pb, x, y)(v), loop_hvp(model, pb, x, y, v))


def test_bad_arguments():
    model, params_b, x, y = conv_setup()
    with pytest.raises(ValueError, match="hvp kind"):
        make_hvp(TaskLoss(model), params_b, x, y, "bogus")
    with pytest.raises(ValueError, match="loss must be"):
        TaskLoss(model, "hinge")
    with pytest.raises(ValueError, match="model must be an nn.Module"):
        TaskLoss(lambda x: x)
    M = x.shape[0]
    first = next(iter(params_b))
    with pytest.raises(ValueError, match=rf"params_b\['{first}'\] must be .* for x_b's M=1 "
                                         rf"tasks, got \({M}, "):
        make_hvp(TaskLoss(model), params_b, x[:1], y[:1])
    for kind in ("double_backward", "ggn", "forward_over_reverse"):
        H = make_hvp(TaskLoss(model, task_chunk=1), params_b, x, y, kind)  # chunked: parts
        v = {k: torch.randn_like(t) for k, t in params_b.items()}
        first = next(iter(v))
        with pytest.raises(ValueError, match=rf"H\(v\): v lacks \['{first}'\]"):
            H({k: t for k, t in v.items() if k != first})
        with pytest.raises(ValueError, match=rf"v\['{first}'\] must have the parameter's shape"):
            H(dict(v, **{first: v[first][:1]}))
        with pytest.raises(ValueError, match="v must be a dict like the params"):
            H(torch.zeros(M, H.spec.numel))
        for bad in ((M + 1, H.spec.numel), (M, H.spec.numel - 1), (H.spec.numel,)):
            with pytest.raises(ValueError, match=rf"H.flat\(v\): v must be \(M, P\) = "
                                                 rf"\({M}, {H.spec.numel}\)"):
                H.flat(torch.zeros(bad))


@pytest.mark.parametrize("case", ["misspelt key", "one task's leaf", "y_b samples",
                                  "x_b dtype", "outputs"])
def test_make_hvp_names_the_argument_at_fault(case):
    # each was accepted: the folded layout ran a misspelt key's layer without it (vmap with the
    # module's own), an M=1 leaf broadcast over the tasks (one product block for all), and the
    # other two failed deep inside with messages about internal ops
    model, params_b, x, y = conv_setup()
    tl = TaskLoss(model)
    bad = dict(params_b)
    bad["head.bais"] = bad.pop("head.bias")
    if case == "outputs":
        with pytest.raises(ValueError, match=r"params_b does not match .* missing \['head.bias'\], "
                                             r"unexpected \['head.bais'\]"):
            tl.outputs(bad, x)
        return
    args, match = {
        "misspelt key": ((bad, x, y), r"make_hvp: params_b does not match .*head.bais"),
        "one task's leaf": (({**params_b, "head.bias": params_b["head.bias"][:1]}, x, y),
                            r"params_b\['head.bias'\] must be \(M, \*\(3,\)\) = \(3, 3\) .* "
                            r"got \(1, 3\)"),
        "y_b samples": ((params_b, x, y[:, :2]), r"y_b must have x_b's \(M, N\) = \(3, 6\)"),
        "x_b dtype": ((params_b, x.float(), y), r"x_b must have the params' dtype torch.float64"),
    }[case]
    with pytest.raises(ValueError, match=match):
        make_hvp(tl, *args)


@pytest.mark.parametrize("kind", ["exact", "double_backward", "ggn", "forward_over_reverse"])
def test_products_are_differentiable_in_v(kind):
    # The double-backward and Gauss-Newton products are backward passes through a graph v is not
    # part of: they handed back a constant, so autograd through v (cg over a b that requires
    # grad, say) silently lost every H term.
    model, params_b, x, y = conv_setup(M=2)
    H = make_hvp(TaskLoss(model), params_b, x, y, kind)
    g = torch.Generator().manual_seed(1)
    v = torch.randn(2, H.spec.numel, dtype=DT, generator=g).requires_grad_(True)
    w = torch.randn(2, H.spec.numel, dtype=DT, generator=g)
    Hw = H.flat(w)
    out = H.flat(v)
    (gv,) = torch.autograd.grad((out * w).sum(), v)
    torch.testing.assert_close(gv, Hw, rtol=1e-9, atol=1e-12)  # H symmetric: d<Hv, w>/dv = H w
    (g2,) = torch.autograd.grad((H.flat(v) * v).sum(), v, create_graph=True)  # 2 H v
    (g3,) = torch.autograd.grad((g2 * w).sum(), v)
    torch.testing.assert_close(g3, 2 * Hw, rtol=1e-9, atol=1e-12)


def test_cg_through_b_over_the_exact_product():
    # x = A^-1 b: the gradient of <x, c> in b is A^-1 c (was 7% off, with every system converged)
    model, params_b, x, y = conv_setup(M=2)
    H = make_hvp(TaskLoss(model), params_b, x, y, "exact")
    A = shifted_operator(H, 1.0, 0.01)
    g = torch.Generator().manual_seed(2)
    b = torch.randn(2, H.spec.numel, dtype=DT, generator=g).requires_grad_(True)
    c = torch.randn(2, H.spec.numel, dtype=DT, generator=g)
    res = imaml_ext.cg(A, b, max_iter=300, rtol=1e-12)
    assert (res.status == 1).all()
    (gb,) = torch.autograd.grad((res.x * c).sum(), b)
    torch.testing.assert_close(gb, imaml_ext.cg(A, c, max_iter=300, rtol=1e-12).x,
                               rtol=1e-8, atol=1e-10)


def test_vmap_over_v_with_the_exact_kind():
    # built outside any transform, the exact kind is the double backward, whose cached graph's
    # ops have no batching rules: vmap over v failed
    model, params_b, x, y = conv_setup(M=2)
    H = make_hvp(TaskLoss(model), params_b, x, y, "exact")
    V = torch.randn(3, 2, H.spec.numel, dtype=DT)
    torch.testing.assert_close(vmap(H.flat)(V), torch.stack([H.flat(u) for u in V]),
                               rtol=1e-9, atol=1e-12)


# ---- task chunks (the CPU evaluates a chunk of tasks at a time) ------------------------------------

@pytest.mark.parametrize("chunk", [1, 2])
def test_task_chunks_same_losses_gradients_and_outputs(chunk):
    model, params_b, x, y = conv_setup(M=3)  # chunk 2: uneven chunks of 2 and 1 tasks
    whole, part = TaskLoss(model, task_chunk=3), TaskLoss(model, task_chunk=chunk)
    assert [s.stop - s.start for s in part.chunks(x)] == ([1, 1, 1] if chunk == 1 else [2, 1])
    assert whole.chunks(x) == [slice(0, 3)]
    for mode in ("grad", "hvp"):
        torch.testing.assert_close(part.outputs(params_b, x, mode=mode),
                                   whole.outputs(params_b, x, mode=mode))
    g1, l1, o1 = part.grad(params_b, x, y)
    g2, l2, o2 = whole.grad(params_b, x, y)
    assert_close_dict(g1, g2)
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(o1, o2)
    # inside torch.func transforms (split + cat): the gradient of the chunked summed loss
    gf = torch.func.grad(lambda p: part(p, x, y, mode="hvp").sum())(params_b)
    assert_close_dict(gf, g2)


@pytest.mark.parametrize("kind", ["exact", "forward_over_reverse", "double_backward", "ggn"])
def test_task_chunks_same_hvp(kind):
    model, params_b, x, y = conv_setup(M=3)
    v = {k: torch.randn_like(t) for k, t in params_b.items()}
    Hc = make_hvp(TaskLoss(model, task_chunk=2), params_b, x, y, kind)
    Hw = make_hvp(TaskLoss(model, task_chunk=3), params_b, x, y, kind)
    assert Hc._parts is not None and Hw._parts is None
    assert_close_dict(Hc(v), Hw(v))
    flat_v, spec = flatten_params(v)
    torch.testing.assert_close(Hc.flat(flat_v), Hw.flat(flat_v))
    lc, gc = Hc.value_and_grad()
    lw, gw = Hw.value_and_grad()
    torch.testing.assert_close(lc, lw)
    assert_close_dict(gc, gw)
    if kind != "ggn":
        assert_close_dict(Hc(v), loop_hvp(model, params_b, x, y, v))


def test_task_chunk_default_follows_the_activation_budget(monkeypatch):
    import imaml_ext.hvp as hvp_mod
    model, params_b, x, y = conv_setup(M=5)  # largest activation: 6 x 4 x 16 x 16 per task
    per_task = 6 * 4 * 16 * 16 * x.element_size()
    tl = TaskLoss(model, fused_blocks=False)
    assert tl.chunk_size(x) == 5  # far under the default budget: one chunk
    monkeypatch.setattr(hvp_mod, "CHUNK_BYTES", 2 * per_task)
    tl = TaskLoss(model, fused_blocks=False)
    assert [s.stop - s.start for s in tl.chunks(x)] == [2, 2, 1]
    if imaml_ext.extension_available():
        # the first block's kernels never form its 16x16 maps: the largest activation is then
        # its pooled output, 6 x 4 x 8 x 8, a quarter: all 5 tasks fit the same budget
        assert TaskLoss(model).chunk_size(x) == 5
        monkeypatch.setattr(hvp_mod, "CHUNK_BYTES", 2 * 6 * 4 * 8 * 8 * x.element_size())
        assert [s.stop - s.start for s in TaskLoss(model).chunks(x)] == [2, 2, 1]
    monkeypatch.setattr(hvp_mod, "CHUNK_BYTES", 1)
    assert TaskLoss(model).chunk_size(x) == 1
    assert TaskLoss(model, task_chunk=4).chunks(x) == [slice(0, 3), slice(3, 5)]  # balanced
    mlp, pm, xm, _ = mlp_setup()
    assert TaskLoss(mlp, backend="vmap").chunk_size(xm) == 3  # vmap backend: never chunked
    with pytest.raises(ValueError, match="task_chunk"):
        TaskLoss(model, task_chunk=0)


def test_one_task_chunk_runs_channels_last():
    # One task of a 1-channel input: both layouts are "contiguous"; the conv stage must still
    # run channels-last (oneDNN's NCHW max-pooling is several times slower).
    from imaml_ext.hvp import _folded_forward
    model, params_b, x, y = conv_setup(M=1)
    tl = TaskLoss(model, channels_last=True)
    first_conv = _folded_forward(tl._plan[:1], params_b, x, channels_last=True)  # (1, N, C, H, W)
    assert first_conv.shape == (1, 6, 4, 16, 16) and first_conv.stride(2) == 1
    torch.testing.assert_close(tl.outputs(params_b, x),
                               TaskLoss(model, backend="vmap").outputs(params_b, x))


# ---- torch.compile of the HVP (opt-in) -------------------------------------------------------------

def _inductor_cpu_reason() -> str | None:
    """Why torch.compile cannot run on the CPU here, or None."""
    import shutil
    if not hasattr(torch, "compile"):
        return "torch.compile is unavailable in this torch"
    try:
        from torch._inductor import cpp_builder
        cxx = cpp_builder.get_cpp_compiler()
    except Exception as exc:  # noqa: BLE001 - any failure to find a compiler means "skip"
        return f"no C++ compiler for Inductor: {type(exc).__name__}: {exc}"
    if shutil.which(cxx) is None and not __import__("os").path.exists(cxx):
        return f"Inductor's C++ compiler {cxx!r} is not on PATH"
    return None


@pytest.mark.slow
@pytest.mark.skipif(_inductor_cpu_reason() is not None, reason=str(_inductor_cpu_reason()))
def test_compiled_hvp_equals_eager_float64():
    # One conv block (conv, BatchNorm, ReLU, max-pool) and a head: the layers whose tangent work
    # Inductor fuses, in a graph small enough to compile in seconds.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1),
                          nn.BatchNorm2d(3, track_running_stats=False), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Flatten(), nn.Linear(3 * 4 * 4, 3)).to(DT)
    params_b = {k: t.detach() + 0.1 * torch.randn(2, *t.shape, dtype=DT)
                for k, t in model.named_parameters()}
    x, y = torch.randn(2, 6, 1, 8, 8, dtype=DT), torch.randint(0, 3, (2, 6))
    v = {k: torch.randn_like(t) for k, t in params_b.items()}
    tl = TaskLoss(model)
    Hc = make_hvp(tl, params_b, x, y, "exact", compile=True)
    assert Hc.kind == "forward_over_reverse" and Hc.compiled
    want = make_hvp(tl, params_b, x, y, "double_backward")(v)
    assert_close_dict(Hc(v), want)
    # a new point reuses the compiled code (same shapes): still the right product
    p2 = {k: t + 0.01 for k, t in params_b.items()}
    H2 = make_hvp(tl, p2, x, y, compile=True)
    flat_v, spec = flatten_params(v)
    torch.testing.assert_close(H2.flat(flat_v),
                               spec.flatten(make_hvp(tl, p2, x, y, "double_backward")(v)))
    with pytest.raises(ValueError, match="compile=True"):
        make_hvp(tl, params_b, x, y, "ggn", compile=True)


@pytest.mark.parametrize("groups,stride,padding", [(1, 1, 1), (3, 2, 1), (2, 1, 0)])
def test_grouped_conv_function_to_second_order(groups, stride, padding):
    # the "hvp" layout's convolution (ops._Conv: its backward and double backward built from
    # three grouped library calls) against finite differences, to second order
    from imaml_ext.ops import _Conv
    g = torch.Generator().manual_seed(groups * 10 + stride)
    x = torch.randn(2, 2 * groups, 5, 6, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(3 * groups, 2, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(3 * groups, dtype=torch.float64, generator=g, requires_grad=True)
    cfg = ([stride, stride], [padding, padding], [1, 1], groups, False)
    f = lambda x, w, b: _Conv.apply(x, w, b, cfg)  # noqa: E731
    torch.testing.assert_close(f(x, w, b), F.conv2d(x, w, b, stride, padding, 1, groups))
    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


@pytest.mark.skipif(not imaml_ext.extension_available(), reason="compiled extension not built")
@pytest.mark.parametrize("groups", [1, 2])
def test_winograd_conv_function_to_second_order(groups):
    # ops._Conv with its three bilinear maps by the Winograd kernel (3x3, stride 1, padding 1;
    # 8 float64 channels per group: one vector) against ATen's convolution and finite
    # differences, to second order
    from imaml_ext.ops import _Conv
    g = torch.Generator().manual_seed(groups)
    x = torch.randn(1, 8 * groups, 4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(8 * groups, 8, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(8 * groups, dtype=torch.float64, generator=g, requires_grad=True)
    f = lambda x, w, b: _Conv.apply(x, w, b, ([1, 1], [1, 1], [1, 1], groups, True))  # noqa
    torch.testing.assert_close(f(x, w, b), F.conv2d(x, w, b, 1, 1, 1, groups))
    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


def _conv_ops_of_one_product(M, device):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Convs(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "convolution" in str(func):
                self.n += 1
            return func(*args, **(kwargs or {}))

    model, params_b, x, y = conv_setup(M=M)
    model = model.to(device)
    params_b = {k: t.to(device) for k, t in params_b.items()}
    x, y = x.to(device), y.to(device)
    v = {k: torch.randn_like(t) for k, t in params_b.items()}
    # the layout a GPU runs: no CPU-only kernels, all tasks in one fold
    H = make_hvp(TaskLoss(model, fused_blocks=False, task_chunk=M), params_b, x, y,
                 "double_backward")
    H._build()
    with Convs() as convs:
        hv = H(v)
    ref = loop_hvp(model, params_b, x, y, v)
    return convs.n, hv, ref


def test_hvp_layout_convolutions_do_not_loop_over_tasks(device, monkeypatch):
    # "hvp" mode runs every convolution through ops._Conv on every device (hvp.OWN_CONV_HVP): its
    # double backward is one library call per bilinear map with all M tasks as groups, where
    # ATen's computes one term per group (per task). Both give the per-task products.
    import imaml_ext.hvp as hvp_mod
    own = {M: _conv_ops_of_one_product(M, device) for M in (2, 5)}
    monkeypatch.setattr(hvp_mod, "OWN_CONV_HVP", False)
    aten = {M: _conv_ops_of_one_product(M, device) for M in (2, 5)}
    for n, hv, ref in (*own.values(), *aten.values()):
        assert_close_dict(hv, ref)
    assert own[2][0] == own[5][0] > 0
    assert aten[5][0] > aten[2][0]  # ATen's loop over groups: the count the option removes


@pytest.mark.parametrize("case", ["pool2", "flip", "overlap_pad", "no_affine", "channels_last"])
def test_pooled_batch_norm_to_second_order(case, device):
    # hvp._bn_relu_pool outside transforms: one autograd Function with its first and second
    # derivatives written out (_PooledBatchNorm), against finite differences to second order and
    # against the composite of torch ops (values, gradients, a double-backward product); on a
    # GPU the block always takes the sign-flip path (no read-back of the signs)
    from imaml_ext.hvp import _bn_relu_pool, _bn_relu_pool_composite
    g = torch.Generator().manual_seed(len(case))
    C = 3
    h = torch.randn(2, C, 6, 5, dtype=DT, generator=g).to(device)
    if case == "channels_last":
        h = h.to(memory_format=torch.channels_last)
    h.requires_grad_(True)
    w = (torch.rand(C, dtype=DT, generator=g) + 0.5).to(device).requires_grad_(True)
    b = torch.randn(C, dtype=DT, generator=g).to(device).requires_grad_(True)
    if case == "flip":
        w = (w.detach() * torch.tensor([1.0, -1.0, -1.0], dtype=DT, device=device)
             ).requires_grad_(True)
    pool = nn.MaxPool2d(3, 2, padding=1) if case == "overlap_pad" else nn.MaxPool2d(2)
    args = (h, None, None) if case == "no_affine" else (h, w, b)
    f = lambda *a: _bn_relu_pool(*a, 1e-5, pool)  # noqa: E731
    ref = lambda *a: _bn_relu_pool_composite(*a, 1e-5, pool)  # noqa: E731
    inputs = tuple(t for t in args if t is not None)
    call = (lambda h: f(h, None, None)) if case == "no_affine" else f
    call_ref = (lambda h: ref(h, None, None)) if case == "no_affine" else ref
    y, y_ref = call(*inputs), call_ref(*inputs)
    torch.testing.assert_close(y, y_ref)
    assert (y > 0).any() and (y == 0).any()  # both sides of the ReLU are exercised
    assert torch.autograd.gradcheck(call, inputs)
    assert torch.autograd.gradgradcheck(call, inputs)
    # a double-backward product, as BatchedHVP computes it
    gy = torch.randn(y.shape, dtype=DT, generator=g).to(device)
    vs = [torch.randn(t.shape, dtype=DT, generator=g).to(device) for t in inputs]
    hv = []
    for fn in (call, call_ref):
        grads = torch.autograd.grad((fn(*inputs) * gy).sum().tanh(), inputs, create_graph=True)
        hv.append(torch.autograd.grad(grads, inputs, vs))
    for a, r in zip(*hv):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-11)
