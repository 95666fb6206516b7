"""The conv nets: shapes for both data sets, the BatchNorm convention, functional use and vmap."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, stack_module_state, vmap

from imaml_ext.models import ConvNet, make_model


@pytest.mark.parametrize("dataset, ways, shape, feat", [
    ("omniglot", 5, (1, 28, 28), 64),
    ("omniglot", 20, (1, 28, 28), 64),
    ("miniimagenet", 5, (3, 84, 84), 800),
    ("mini-imagenet", 5, (3, 84, 84), 800),
])
def test_paper_shapes(dataset, ways, shape, feat):
    torch.manual_seed(0)
    model = make_model(dataset, ways)
    x = torch.randn(4, *shape)
    assert model.feature_dim == feat and model.features(x).shape == (4, feat)
    assert isinstance(model.head, nn.Linear) and model.head.in_features == feat
    assert model(x).shape == (4, ways)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 4 and all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    assert {c.out_channels for c in convs} == {64 if shape[0] == 1 else 32}


def test_stride_variant_and_sizes():
    m = ConvNet(1, 5, hidden=8, image_size=28, downsample="stride")
    assert m.feature_side == 2 and m(torch.randn(3, 1, 28, 28)).shape == (3, 5)
    assert not any(isinstance(x, nn.MaxPool2d) for x in m.modules())
    assert ConvNet(3, 5, hidden=32, image_size=84).feature_side == 5
    with pytest.raises(ValueError, match="downsample"):
        ConvNet(1, 5, downsample="avg")
    with pytest.raises(ValueError, match="too small"):
        ConvNet(1, 5, image_size=8)
    with pytest.raises(ValueError, match="unknown data set"):
        make_model("cifar", 5)
    for ways in (0, 2.0, True):  # was "ConvNet: num_classes must be positive", or a TypeError
        with pytest.raises(ValueError, match=rf"make_model: ways must be an int >= 1, got "
                                             rf"{ways!r}"):
            make_model("omniglot", ways)


def test_batchnorm_uses_batch_statistics_always():
    torch.manual_seed(0)
    m = make_model("omniglot", 5)
    bns = [x for x in m.modules() if isinstance(x, nn.BatchNorm2d)]
    assert len(bns) == 4 and all(not b.track_running_stats and b.affine for b in bns)
    assert list(m.buffers()) == []  # the state is the parameters only
    x = torch.randn(6, 1, 28, 28)
    y_train = m.train()(x)
    y_eval = m.eval()(x)
    torch.testing.assert_close(y_train, y_eval)
    # batch statistics: an item's output depends on the other items of the batch
    assert not torch.allclose(m(x)[:3], m(x[:3]))


def test_features_plus_head_is_forward():
    torch.manual_seed(0)
    m = make_model("miniimagenet", 5)
    x = torch.randn(3, 3, 84, 84)
    torch.testing.assert_close(m.head(m.features(x)), m(x))


def test_functional_call_matches_module():
    torch.manual_seed(0)
    m = make_model("omniglot", 5)
    x = torch.randn(5, 1, 28, 28)
    params = {k: v.detach() + 0.01 * torch.randn_like(v) for k, v in m.named_parameters()}
    out = functional_call(m, params, (x,))
    with torch.no_grad():
        for k, v in m.named_parameters():
            v.copy_(params[k])
    torch.testing.assert_close(out, m(x))


def test_vmap_over_tasks_equals_loop():
    torch.manual_seed(0)
    tasks = 3
    base = ConvNet(1, 5, hidden=8, image_size=28)
    models = [ConvNet(1, 5, hidden=8, image_size=28) for _ in range(tasks)]
    params, buffers = stack_module_state(models)
    assert buffers == {}
    x = torch.randn(tasks, 6, 1, 28, 28)
    y = torch.randint(0, 5, (tasks, 6))

    def logits(p, xi):
        return functional_call(base, p, (xi,))

    def loss(p, xi, yi):
        return nn.functional.cross_entropy(logits(p, xi), yi)

    batched = vmap(logits)(params, x)
    looped = torch.stack([models[i](x[i]) for i in range(tasks)])
    torch.testing.assert_close(batched, looped, rtol=1e-5, atol=1e-5)
    # per-task gradients under vmap equal a loop of autograd calls
    grads = vmap(grad(loss))(params, x, y)
    for i in range(tasks):
        g = torch.autograd.grad(nn.functional.cross_entropy(models[i](x[i]), y[i]),
                                list(models[i].parameters()))
        for (name, _), gi in zip(models[i].named_parameters(), g):
            torch.testing.assert_close(grads[name][i], gi, rtol=1e-4, atol=1e-5)
