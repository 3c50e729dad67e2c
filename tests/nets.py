"""Tiny 3D CNNs covering every structure SPEC §2 names, written for the tests.

Each is small enough to export and check by autograd in a second or two on a CPU.
BatchNorm statistics are randomised so folding them into convs is a real change.
"""

from __future__ import annotations

import torch
from torch import nn

CLIP = (1, 3, 4, 16, 16)


def bn(c: int) -> nn.BatchNorm3d:
    b = nn.BatchNorm3d(c)
    with torch.no_grad():
        b.weight.uniform_(0.5, 1.5)  # positive: min-max is invariant to the folded scale
        b.bias.uniform_(-0.2, 0.2)
        b.running_mean.uniform_(-0.2, 0.2)
        b.running_var.uniform_(0.5, 1.5)
    return b


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(cin, cout, k, stride, k // 2, groups=groups, bias=False), bn(cout), nn.ReLU()
    )


class Head(nn.Module):
    def __init__(self, c: int, classes: int = 5) -> None:
        super().__init__()
        self.fc = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3, 4)))


class Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(3, 8), nn.MaxPool3d((1, 2, 2)), conv_bn(8, 12), conv_bn(12, 16, stride=2)
        )
        self.head = Head(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def shortcut(cin: int, cout: int, stride: int) -> nn.Module | None:
    """A strided 1x1x1 downsample conv where the block changes shape, else identity (None)."""
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv3d(cin, cout, 1, stride, bias=False), bn(cout))


class Basic(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = conv_bn(cin, cout, stride=stride)
        self.conv2 = nn.Sequential(nn.Conv3d(cout, cout, 3, 1, 1, bias=False), bn(cout))
        self.down = shortcut(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.down is None else self.down(x)
        return torch.relu(self.conv2(self.conv1(x)) + skip)


class Bottleneck(nn.Module):
    def __init__(self, cin: int, mid: int, cout: int, stride: int, groups: int = 1) -> None:
        super().__init__()
        self.a = conv_bn(cin, mid, k=1)
        self.b = conv_bn(mid, mid, stride=stride, groups=groups)
        self.c = nn.Sequential(nn.Conv3d(mid, cout, 1, bias=False), bn(cout))
        self.down = shortcut(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.down is None else self.down(x)
        return torch.relu(self.c(self.b(self.a(x))) + skip)


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.layer1 = nn.Sequential(Basic(8, 8, 1), Basic(8, 8, 1))
        self.layer2 = nn.Sequential(Bottleneck(8, 4, 16, 2), Bottleneck(16, 4, 16, 1))
        self.head = Head(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer2(self.layer1(self.stem(x))))


class ResNeXt(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.layer1 = nn.Sequential(
            Bottleneck(8, 8, 16, 2, groups=4), Bottleneck(16, 8, 16, 1, groups=4)
        )
        self.head = Head(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer1(self.stem(x)))


class Inception(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.b0 = conv_bn(8, 4, k=1)
        self.b1 = nn.Sequential(conv_bn(8, 4, k=1), conv_bn(4, 6))
        self.b2 = nn.Sequential(conv_bn(8, 2, k=1), conv_bn(2, 3))
        self.b3 = nn.Sequential(nn.MaxPool3d(3, 1, 1), conv_bn(8, 3, k=1))
        self.mix = conv_bn(16, 8)
        self.head = Head(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.cat([self.b0(x), self.b1(x), self.b2(x), self.b3(x)], dim=1)
        return self.head(self.mix(x))


class SqueezeExcite(nn.Module):
    """SE gate; `detach` cuts the gate from the main path for the autograd check (SPEC §2)."""

    detach = False

    def __init__(self, c: int, r: int = 2) -> None:
        super().__init__()
        self.fc1 = nn.Conv3d(c, c // r, 1)
        self.fc2 = nn.Conv3d(c // r, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean(dim=(2, 3, 4), keepdim=True)))))
        return x * (g.detach() if SqueezeExcite.detach else g)


class X3DBlock(nn.Module):
    def __init__(self, c: int, mid: int) -> None:
        super().__init__()
        self.a = conv_bn(c, mid, k=1)
        self.dw = nn.Sequential(nn.Conv3d(mid, mid, 3, 1, 1, groups=mid, bias=False), bn(mid))
        self.se = SqueezeExcite(mid)
        self.c = nn.Sequential(nn.Conv3d(mid, c, 1, bias=False), bn(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.se(self.dw(self.a(x)))
        y = y * torch.sigmoid(y)  # swish
        return torch.relu(self.c(y) + x)


class X3D(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.blocks = nn.Sequential(X3DBlock(8, 12), X3DBlock(8, 12))
        self.head = Head(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


class MultiFiber(nn.Module):
    """MFNet unit: a multiplexer (1x1 grouped mixing), then grouped fibre convs."""

    def __init__(self, c: int, fibres: int = 4) -> None:
        super().__init__()
        self.mux1 = conv_bn(c, c // 2, k=1)
        self.mux2 = conv_bn(c // 2, c, k=1)
        self.f1 = conv_bn(c, c, groups=fibres)
        self.f2 = nn.Sequential(nn.Conv3d(c, c, 3, 1, 1, groups=fibres, bias=False), bn(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.f2(self.f1(self.mux2(self.mux1(x)))) + x)


class MFNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.units = nn.Sequential(MultiFiber(16), MultiFiber(16))
        self.head = Head(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.units(self.stem(x)))


def shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    n, c, t, h, w = x.shape
    return x.reshape(n, groups, c // groups, t, h, w).transpose(1, 2).reshape(n, c, t, h, w)


class Shuffle(nn.Module):
    """ShuffleNet-style: grouped conv, channel shuffle, grouped conv, a strided channel slice."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 12)
        self.g1 = conv_bn(12, 12, k=1, groups=3)
        self.g2 = conv_bn(12, 12, groups=3)
        self.last = conv_bn(6, 8)
        self.head = Head(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.g2(shuffle(self.g1(self.stem(x)), 3))
        return self.head(self.last(y[:, ::2]))


MODELS = {
    "plain": Plain,
    "residual": Residual,
    "resnext": ResNeXt,
    "inception": Inception,
    "x3d": X3D,
    "mfnet": MFNet,
    "shuffle": Shuffle,
}


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[name]().eval()


def export(model: nn.Module, path: str, *, dynamo: bool = False, dynamic_batch: bool = True) -> str:
    x = torch.randn(*CLIP)
    kwargs: dict = {"input_names": ["video"], "output_names": ["logits"]}
    if dynamo:
        kwargs["dynamo"] = True
        kwargs["opset_version"] = 18
    else:
        kwargs["dynamo"] = False
        kwargs["opset_version"] = 17
        if dynamic_batch:
            kwargs["dynamic_axes"] = {"video": {0: "batch"}, "logits": {0: "batch"}}
    torch.onnx.export(model, (x,), path, **kwargs)
    return path
