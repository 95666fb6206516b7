"""The few-shot conv nets of MAML and iMAML.

``ConvNet``: 4 blocks of [conv 3x3 (padding 1), ``hidden`` filters, BatchNorm, ReLU, 2x2
downsampling], then a linear head on the flattened features.

BatchNorm convention: ``BatchNorm2d(track_running_stats=False, affine=True)``, so every forward
pass, in training and in evaluation alike, normalises with the statistics of the batch it is given
(the support set when adapting, the query set when testing), as MAML's and the iMAML authors' code
do. There are no running buffers: the model's state is its parameters only, which is what
``torch.func.functional_call`` and ``vmap`` over tasks need.
"""
from __future__ import annotations

import torch
from torch import nn

_PAPER = {
    # dataset: (in_channels, hidden filters, image side)
    "omniglot": (1, 64, 28),
    "miniimagenet": (3, 32, 84),
}


def _out_side(side: int, downsample: str) -> int:
    # max-pool 2x2 floors; a stride-2 3x3 conv with padding 1 rounds up.
    return side // 2 if downsample == "pool" else (side + 1) // 2


class ConvNet(nn.Module):
    """MAML's 4-block conv net.

    Args:
        in_channels: 1 (Omniglot) or 3 (Mini-ImageNet).
        num_classes: output logits (the task's N ways).
        hidden: filters per conv (64 for Omniglot, 32 for Mini-ImageNet in the paper).
        image_size: input side, used to size the head (28 -> 1x1 features, 84 -> 5x5 with pooling).
        downsample: ``"pool"`` (2x2 max-pool after each block, the default) or ``"stride"``
            (each conv has stride 2 instead, MAML's pool-free Omniglot variant).

    BatchNorm uses batch statistics in every forward pass (``track_running_stats=False``); see the
    module docstring.

    Shapes: input (B, C, H, W) float; ``features(x)`` (B, feature_dim); output (B, num_classes).
    """

    def __init__(self, in_channels: int, num_classes: int, hidden: int = 64,
                 image_size: int = 28, downsample: str = "pool"):
        super().__init__()
        if downsample not in ("pool", "stride"):
            raise ValueError(f"downsample must be 'pool' or 'stride', got {downsample!r}")
        for arg, v in (("in_channels", in_channels), ("num_classes", num_classes),
                       ("hidden", hidden), ("image_size", image_size)):
            if v <= 0:
                raise ValueError(f"ConvNet: {arg} must be positive, got {v}")
        self.in_channels, self.num_classes, self.hidden = in_channels, num_classes, hidden
        self.image_size, self.downsample = image_size, downsample
        layers: list[nn.Module] = []
        side, c_in = image_size, in_channels
        for _ in range(4):
            stride = 2 if downsample == "stride" else 1
            layers += [nn.Conv2d(c_in, hidden, 3, stride=stride, padding=1),
                       nn.BatchNorm2d(hidden, track_running_stats=False, affine=True),
                       nn.ReLU()]
            if downsample == "pool":
                layers.append(nn.MaxPool2d(2))
            side = _out_side(side, downsample)
            if side < 1:
                raise ValueError(f"ConvNet: image_size={image_size} is too small for 4 blocks")
            c_in = hidden
        layers.append(nn.Flatten())
        self.body = nn.Sequential(*layers)
        self.feature_side = side
        self.feature_dim = hidden * side * side
        self.head = nn.Linear(self.feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, feature_dim): everything but the head."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> logits (B, num_classes)."""
        return self.head(self.features(x))

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, num_classes={self.num_classes}, "
                f"hidden={self.hidden}, image_size={self.image_size}, "
                f"downsample={self.downsample!r}, feature_dim={self.feature_dim}")


def make_model(dataset: str, ways: int, downsample: str = "pool") -> ConvNet:
    """The paper's network for ``dataset`` (``"omniglot"`` or ``"miniimagenet"``) and N ways.

    Omniglot: 64 filters on 1x28x28 (features 64x1x1); Mini-ImageNet: 32 filters on 3x84x84
    (features 32x5x5 = 800).
    """
    key = dataset.lower().replace("-", "").replace("_", "")
    if key not in _PAPER:
        raise ValueError(f"make_model: unknown data set {dataset!r}; expected one of "
                         f"{tuple(_PAPER)}")
    if isinstance(ways, bool) or not isinstance(ways, int) or ways < 1:
        raise ValueError(f"make_model: ways must be an int >= 1, got {ways!r}")
    c, hidden, side = _PAPER[key]
    return ConvNet(c, ways, hidden=hidden, image_size=side, downsample=downsample)
