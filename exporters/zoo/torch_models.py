"""Video 3D CNNs in PyTorch, written from their papers, width/depth configurable.

Every factory takes ``num_classes``, ``width`` (a multiplier on every channel
count), ``depth`` (a multiplier on the number of blocks per stage, at least one
block each) and ``in_frames`` (the clip length it is built for: SlowFast needs it
divisible by ``alpha``; the others only check it is long enough). With the
defaults a factory builds the full-size network of the paper. All forward
passes take one ``(N, 3, T, H, W)`` tensor and return ``(N, num_classes)``
logits, so every model exports with :func:`cfp_onnx.exporters.pytorch.export_torch`.

Names follow the paper's code where one exists (Hara et al.'s 3D ResNets,
Chen et al.'s MFNet, Carreira and Zisserman's I3D via piergiaj/pytorch-i3d).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

Triple = tuple[int, int, int]


# ---------------------------------------------------------------- helpers


def channels(base: float, width: float, divisor: int = 1) -> int:
    """``base * width`` rounded to a positive multiple of ``divisor`` (for groups)."""
    return max(divisor, round(base * width / divisor) * divisor)


def repeats(base: int, depth: float) -> int:
    """Blocks in a stage: ``base * depth`` rounded, at least one."""
    return max(1, round(base * depth))


def triple(k: int | Sequence[int]) -> Triple:
    if isinstance(k, int):
        return (k, k, k)
    a, b, c = k
    return (a, b, c)


def same_pad(kernel: Triple) -> Triple:
    """Symmetric padding that keeps size at stride 1 (odd kernels)."""
    return (kernel[0] // 2, kernel[1] // 2, kernel[2] // 2)


class ConvBN(nn.Sequential):
    """Conv3d (no bias) -> BatchNorm3d -> optional activation (ReLU by default)."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        *,
        groups: int = 1,
        act: type[nn.Module] | None = nn.ReLU,
    ) -> None:
        k = triple(kernel)
        layers: list[nn.Module] = [
            nn.Conv3d(c_in, c_out, k, triple(stride), same_pad(k), groups=groups, bias=False),
            nn.BatchNorm3d(c_out),
        ]
        if act is not None:
            layers.append(act())
        super().__init__(*layers)


class Head(nn.Module):
    """Global average pool -> dropout -> Linear: the classifier most papers use."""

    def __init__(self, c_in: int, num_classes: int, dropout: float = 0.5) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(x.mean(dim=(2, 3, 4))))


def check_frames(in_frames: int, divisor: int, name: str) -> None:
    """Refuse a clip length the architecture cannot take (early, with the reason)."""
    if in_frames < divisor or in_frames % divisor:
        raise ValueError(f"{name} needs in_frames divisible by {divisor}, got {in_frames}")


def run_stages(model: nn.Module, x: torch.Tensor, *names: str) -> torch.Tensor:
    """Apply the named submodules in order (stages registered with ``add_module``)."""
    for name in names:
        x = model.get_submodule(name)(x)
    return x


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm random statistics and affine terms, so tests are not
    fooled by the identity BatchNorm of a freshly built model. Returns ``model``."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm3d | nn.BatchNorm2d | nn.BatchNorm1d):
            n = module.num_features
            assert module.running_mean is not None and module.running_var is not None
            with torch.no_grad():
                module.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
                module.running_var.copy_(0.5 + torch.rand(n, generator=gen))
                module.weight.copy_(0.5 + torch.rand(n, generator=gen))
                module.bias.copy_(0.1 * torch.randn(n, generator=gen))
    return model


# ---------------------------------------------------------------- 3D ResNet / ResNeXt / CSN


class Bottleneck(nn.Module):
    """1x1x1 -> 3x3x3 (strided, optionally grouped) -> 1x1x1, plus the shortcut.

    ``groups=mid`` gives CSN's interaction-reduced (depth-wise) block; ``groups=32``
    ResNeXt's. A shortcut whose shape changes is a strided 1x1x1 conv + BN
    (Hara et al.'s shortcut type B).
    """

    def __init__(self, c_in: int, mid: int, c_out: int, stride: int, groups: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(c_in, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(mid)
        self.conv2 = nn.Conv3d(mid, mid, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm3d(mid)
        self.conv3 = nn.Conv3d(mid, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(c_out)
        self.relu = nn.ReLU()
        self.downsample: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv3d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm3d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        residual = x if self.downsample is None else self.downsample(x)
        return self.relu(out + residual)


class ResNet3D(nn.Module):
    """Hara et al.'s 3D ResNet: 7x7x7 stem, max pool, four bottleneck stages.

    ``mid_of(planes)`` gives a block's middle width and ``out_of(planes)`` its
    output width, so the same skeleton builds ResNet, ResNeXt and CSN.
    """

    def __init__(
        self,
        blocks: Sequence[int],
        *,
        num_classes: int,
        width: float,
        mid_of: Callable[[int], int],
        out_of: Callable[[int], int],
        groups_of: Callable[[int], int],
        stem_kernel: Triple = (7, 7, 7),
        stem_stride: Triple = (1, 2, 2),
        pool_kernel: Triple = (3, 3, 3),
        pool_stride: Triple = (2, 2, 2),
    ) -> None:
        super().__init__()
        stem = channels(64, width)
        self.conv1 = nn.Conv3d(3, stem, stem_kernel, stem_stride, same_pad(stem_kernel), bias=False)
        self.bn1 = nn.BatchNorm3d(stem)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool3d(pool_kernel, pool_stride, same_pad(pool_kernel))
        c_in = stem
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), blocks, strict=True)):
            mid = mid_of(planes)
            c_out = out_of(planes)
            stage = []
            for b in range(n):
                stride = 2 if (i > 0 and b == 0) else 1
                stage.append(Bottleneck(c_in, mid, c_out, stride, groups_of(mid)))
                c_in = c_out
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
        self.head = Head(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = run_stages(self, x, "layer1", "layer2", "layer3", "layer4")
        return self.head(x)


RESNET_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


def _resnet(layers: int, num_classes: int, width: float, depth: float, in_frames: int) -> ResNet3D:
    check_frames(in_frames, 8, f"ResNet-{layers}-3D")
    return ResNet3D(
        [repeats(b, depth) for b in RESNET_BLOCKS[layers]],
        num_classes=num_classes,
        width=width,
        mid_of=lambda p: channels(p, width),
        out_of=lambda p: channels(4 * p, width),
        groups_of=lambda mid: 1,
    )


def resnet50_3d(
    num_classes: int = 400, width: float = 1.0, depth: float = 1.0, in_frames: int = 16
) -> ResNet3D:
    """3D ResNet-50 (Hara et al., CVPR 2018), shortcut B."""
    return _resnet(50, num_classes, width, depth, in_frames)


def resnet101_3d(
    num_classes: int = 400, width: float = 1.0, depth: float = 1.0, in_frames: int = 16
) -> ResNet3D:
    """3D ResNet-101 (Hara et al., CVPR 2018), shortcut B."""
    return _resnet(101, num_classes, width, depth, in_frames)


def resnet152_3d(
    num_classes: int = 400, width: float = 1.0, depth: float = 1.0, in_frames: int = 16
) -> ResNet3D:
    """3D ResNet-152 (Hara et al., CVPR 2018), shortcut B."""
    return _resnet(152, num_classes, width, depth, in_frames)


def resnext101_3d(
    num_classes: int = 400,
    width: float = 1.0,
    depth: float = 1.0,
    in_frames: int = 16,
    cardinality: int = 32,
) -> ResNet3D:
    """3D ResNeXt-101 32x4d as in Hara et al.: grouped 3x3x3, blocks expand by 2.

    Stage widths 128..1024 (``mid = cardinality * planes / 32``); reduced widths keep
    the middle a multiple of ``cardinality`` so every group has a channel.
    """
    check_frames(in_frames, 8, "ResNeXt-101-3D")
    return ResNet3D(
        [repeats(b, depth) for b in RESNET_BLOCKS[101]],
        num_classes=num_classes,
        width=width,
        mid_of=lambda p: channels(2 * p, width, cardinality),
        out_of=lambda p: channels(4 * p, width),
        groups_of=lambda mid: cardinality,
    )


def csn_152(
    num_classes: int = 400, width: float = 1.0, depth: float = 1.0, in_frames: int = 16
) -> ResNet3D:
    """ir-CSN-152 (Tran et al., ICCV 2019): the 3x3x3 conv of each bottleneck is
    depth-wise (channel-separated); stem 3x7x7 and a spatial-only max pool, as in VMZ."""
    check_frames(in_frames, 8, "CSN")
    return ResNet3D(
        [repeats(b, depth) for b in RESNET_BLOCKS[152]],
        num_classes=num_classes,
        width=width,
        mid_of=lambda p: channels(p, width),
        out_of=lambda p: channels(4 * p, width),
        groups_of=lambda mid: mid,
        stem_kernel=(3, 7, 7),
        pool_kernel=(1, 3, 3),
        pool_stride=(1, 2, 2),
    )


# ---------------------------------------------------------------- MFNet-3D


class BNActConv(nn.Sequential):
    """MFNet's pre-activation unit: BN -> ReLU -> Conv3d."""

    def __init__(
        self, c_in: int, c_out: int, kernel: Triple, stride: Triple = (1, 1, 1), groups: int = 1
    ) -> None:
        super().__init__(
            nn.BatchNorm3d(c_in),
            nn.ReLU(),
            nn.Conv3d(c_in, c_out, kernel, stride, same_pad(kernel), groups=groups, bias=False),
        )


class MFUnit(nn.Module):
    """Multi-fiber unit (Chen et al., ECCV 2018).

    A 1x1x1 multiplexer pair routes information across fibers (``conv_i1`` ->
    ``conv_i2``, added to the input); the fibers themselves are grouped 3x3x3 and
    1x3x3 convs. The first unit of a stage adapts the shortcut with ``conv_w1``.
    """

    def __init__(
        self, c_in: int, mid: int, c_out: int, groups: int, stride: Triple, first: bool
    ) -> None:
        super().__init__()
        self.conv_i1 = BNActConv(c_in, max(1, mid // 4), (1, 1, 1))
        self.conv_i2 = BNActConv(max(1, mid // 4), c_in, (1, 1, 1))
        self.conv_m1 = BNActConv(c_in, mid, (3, 3, 3), stride, groups)
        if first:
            self.conv_m2 = BNActConv(mid, c_out, (1, 1, 1))
            self.conv_w1: nn.Module | None = BNActConv(c_in, c_out, (1, 1, 1), stride)
        else:
            self.conv_m2 = BNActConv(mid, c_out, (1, 3, 3), groups=groups)
            self.conv_w1 = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_m2(self.conv_m1(x + self.conv_i2(self.conv_i1(x))))
        return h + (x if self.conv_w1 is None else self.conv_w1(x))


class MFNet3D(nn.Module):
    """MFNet-3D: 3x5x5 stem, four stages of multi-fiber units (16 fibers)."""

    def __init__(self, num_classes: int, width: float, depth: float, groups: int = 16) -> None:
        super().__init__()
        stem = channels(16, width, groups)
        self.conv1 = ConvBN(3, stem, (3, 5, 5), (1, 2, 2))
        self.maxpool = nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1))
        c_in = stem
        stages = {2: 3, 3: 4, 4: 6, 5: 3}
        for i, (stage, n) in enumerate(stages.items()):
            c_out = channels(96 * 2**i, width, groups)
            stride = (2, 1, 1) if stage == 2 else (1, 2, 2)
            units = [
                MFUnit(
                    c_in if b == 0 else c_out,
                    c_out,
                    c_out,
                    groups,
                    stride if b == 0 else (1, 1, 1),
                    b == 0,
                )
                for b in range(repeats(n, depth))
            ]
            self.add_module(f"conv{stage}", nn.Sequential(*units))
            c_in = c_out
        self.tail = nn.Sequential(nn.BatchNorm3d(c_in), nn.ReLU())
        self.head = Head(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.conv1(x))
        x = run_stages(self, x, "conv2", "conv3", "conv4", "conv5")
        return self.head(self.tail(x))


def mfnet_3d(
    num_classes: int = 400,
    width: float = 1.0,
    depth: float = 1.0,
    in_frames: int = 16,
    groups: int = 16,
) -> MFNet3D:
    """MFNet-3D (Chen et al., ECCV 2018), as in cypw/PyTorch-MFNet."""
    check_frames(in_frames, 2, "MFNet-3D")
    return MFNet3D(num_classes, width, depth, groups)


# ---------------------------------------------------------------- I3D

I3D_MIXED = {
    "Mixed_3b": (64, 96, 128, 16, 32, 32),
    "Mixed_3c": (128, 128, 192, 32, 96, 64),
    "Mixed_4b": (192, 96, 208, 16, 48, 64),
    "Mixed_4c": (160, 112, 224, 24, 64, 64),
    "Mixed_4d": (128, 128, 256, 24, 64, 64),
    "Mixed_4e": (112, 144, 288, 32, 64, 64),
    "Mixed_4f": (256, 160, 320, 32, 128, 128),
    "Mixed_5b": (256, 160, 320, 32, 128, 128),
    "Mixed_5c": (384, 192, 384, 48, 128, 128),
}
"""Inception branch widths: 1x1 | 1x1 -> 3x3 | 1x1 -> 3x3 | pool -> 1x1."""

I3D_POOL_BEFORE = {
    "Mixed_3b": ((1, 3, 3), (1, 2, 2), (0, 1, 1)),
    "Mixed_4b": ((3, 3, 3), (2, 2, 2), (1, 1, 1)),
    "Mixed_5b": ((2, 2, 2), (2, 2, 2), (0, 0, 0)),
}
"""Max pools (kernel, stride, padding) placed before these mixed blocks."""


class InceptionBlock(nn.Module):
    """Four branches concatenated on channels (GoogLeNet's module, inflated)."""

    def __init__(self, c_in: int, widths: Sequence[int]) -> None:
        super().__init__()
        b0, b1a, b1b, b2a, b2b, b3 = widths
        self.b0 = ConvBN(c_in, b0, 1)
        self.b1 = nn.Sequential(ConvBN(c_in, b1a, 1), ConvBN(b1a, b1b, 3))
        self.b2 = nn.Sequential(ConvBN(c_in, b2a, 1), ConvBN(b2a, b2b, 3))
        self.b3 = nn.Sequential(nn.MaxPool3d(3, 1, 1), ConvBN(c_in, b3, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b0(x), self.b1(x), self.b2(x), self.b3(x)], dim=1)


class I3D(nn.Module):
    """Inflated Inception-V1. The classifier is a 1x1x1 logits conv on the
    spatially pooled features, then a mean over time, as in the original."""

    def __init__(self, num_classes: int, width: float, depth: float) -> None:
        super().__init__()
        del depth  # the Inception stack has no repeated stage to shorten
        c1, c2, c3 = channels(64, width), channels(64, width), channels(192, width)
        self.Conv3d_1a_7x7 = ConvBN(3, c1, 7, 2)
        self.MaxPool3d_2a_3x3 = nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1))
        self.Conv3d_2b_1x1 = ConvBN(c1, c2, 1)
        self.Conv3d_2c_3x3 = ConvBN(c2, c3, 3)
        c_in = c3
        blocks: list[nn.Module] = []
        for name, widths in I3D_MIXED.items():
            if name in I3D_POOL_BEFORE:
                blocks.append(nn.MaxPool3d(*I3D_POOL_BEFORE[name]))
            width_c = [channels(w, width) for w in widths]
            blocks.append(InceptionBlock(c_in, width_c))
            c_in = width_c[0] + width_c[2] + width_c[4] + width_c[5]
        self.mixed = nn.Sequential(*blocks)
        self.dropout = nn.Dropout(0.5)
        self.logits = nn.Conv3d(c_in, num_classes, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.Conv3d_2c_3x3(self.Conv3d_2b_1x1(self.MaxPool3d_2a_3x3(self.Conv3d_1a_7x7(x))))
        x = self.mixed(x).mean(dim=(3, 4), keepdim=True)
        return self.logits(self.dropout(x)).mean(dim=(2, 3, 4))


def i3d(num_classes: int = 400, width: float = 1.0, depth: float = 1.0, in_frames: int = 16) -> I3D:
    """I3D (Carreira and Zisserman, CVPR 2017), RGB stream."""
    check_frames(in_frames, 8, "I3D")
    return I3D(num_classes, width, depth)


# ---------------------------------------------------------------- R(2+1)D


class Conv2Plus1D(nn.Sequential):
    """A t x d x d conv factorised into 1 x d x d (spatial) -> BN -> ReLU -> t x 1 x 1.

    The middle width keeps the parameter count of the full 3D conv (Tran et al.).
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1, mid: int | None = None) -> None:
        mid = mid or max(1, (3 * 3 * 3 * c_in * c_out) // (3 * 3 * c_in + 3 * c_out))
        super().__init__(
            nn.Conv3d(c_in, mid, (1, 3, 3), (1, stride, stride), (0, 1, 1), bias=False),
            nn.BatchNorm3d(mid),
            nn.ReLU(),
            nn.Conv3d(mid, c_out, (3, 1, 1), (stride, 1, 1), (1, 0, 0), bias=False),
        )


class BasicBlock2Plus1D(nn.Module):
    """Two (2+1)D convs with a residual (strided 1x1x1 conv when the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = Conv2Plus1D(c_in, c_out, stride)
        self.bn1 = nn.BatchNorm3d(c_out)
        self.conv2 = Conv2Plus1D(c_out, c_out)
        self.bn2 = nn.BatchNorm3d(c_out)
        self.relu = nn.ReLU()
        self.downsample: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv3d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm3d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class R2Plus1D(nn.Module):
    """R(2+1)D-18: (2+1)D stem (45 mid channels), four stages of basic blocks."""

    def __init__(self, num_classes: int, width: float, depth: float) -> None:
        super().__init__()
        stem = channels(64, width)
        self.stem = nn.Sequential(
            nn.Conv3d(3, channels(45, width), (1, 7, 7), (1, 2, 2), (0, 3, 3), bias=False),
            nn.BatchNorm3d(channels(45, width)),
            nn.ReLU(),
            nn.Conv3d(channels(45, width), stem, (3, 1, 1), 1, (1, 0, 0), bias=False),
            nn.BatchNorm3d(stem),
            nn.ReLU(),
        )
        c_in = stem
        for i, planes in enumerate((64, 128, 256, 512)):
            c_out = channels(planes, width)
            blocks = [
                BasicBlock2Plus1D(c_in if b == 0 else c_out, c_out, 2 if (i and not b) else 1)
                for b in range(repeats(2, depth))
            ]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            c_in = c_out
        self.head = Head(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = run_stages(self, x, "stem", "layer1", "layer2", "layer3", "layer4")
        return self.head(x)


def r2plus1d_18(
    num_classes: int = 400, width: float = 1.0, depth: float = 1.0, in_frames: int = 16
) -> R2Plus1D:
    """R(2+1)D-18 (Tran et al., CVPR 2018)."""
    check_frames(in_frames, 8, "R(2+1)D")
    return R2Plus1D(num_classes, width, depth)


# ---------------------------------------------------------------- X3D


class SqueezeExcite(nn.Module):
    """Channel gate: global pool -> 1x1x1 -> ReLU -> 1x1x1 -> Sigmoid, times the input."""

    def __init__(self, c: int, ratio: float = 1 / 16) -> None:
        super().__init__()
        mid = channels(c, ratio, 8)
        self.fc1 = nn.Conv3d(c, mid, 1)
        self.fc2 = nn.Conv3d(mid, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.fc2(torch.relu(self.fc1(x.mean(dim=(2, 3, 4), keepdim=True))))
        return x * torch.sigmoid(gate)


class X3DBlock(nn.Module):
    """X3D bottleneck: 1x1x1 -> depth-wise 3x3x3 (+ SE) -> swish -> 1x1x1, residual."""

    def __init__(self, c_in: int, mid: int, c_out: int, stride: int, se: bool) -> None:
        super().__init__()
        self.a = ConvBN(c_in, mid, 1)
        self.b = ConvBN(mid, mid, 3, (1, stride, stride), groups=mid, act=None)
        self.se = SqueezeExcite(mid) if se else nn.Identity()
        self.swish = nn.SiLU()
        self.c = ConvBN(mid, c_out, 1, act=None)
        self.relu = nn.ReLU()
        self.branch1: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.branch1 = ConvBN(c_in, c_out, 1, (1, stride, stride), act=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.c(self.swish(self.se(self.b(self.a(x)))))
        return self.relu(out + (x if self.branch1 is None else self.branch1(x)))


class X3D(nn.Module):
    """X3D-M: (2+1)D depth-wise stem, four stages, 1x1x1 conv5, two dense layers."""

    def __init__(self, num_classes: int, width: float, depth: float) -> None:
        super().__init__()
        stem = channels(24, width)
        self.stem = nn.Sequential(
            nn.Conv3d(3, stem, (1, 3, 3), (1, 2, 2), (0, 1, 1), bias=False),
            nn.Conv3d(stem, stem, (5, 1, 1), 1, (2, 0, 0), groups=stem, bias=False),
            nn.BatchNorm3d(stem),
            nn.ReLU(),
        )
        c_in = stem
        for i, (planes, n) in enumerate(zip((24, 48, 96, 192), (3, 5, 11, 7), strict=True)):
            c_out = channels(planes, width)
            mid = channels(planes * 2.25, width)
            blocks = [
                X3DBlock(c_in if b == 0 else c_out, mid, c_out, 2 if b == 0 else 1, b % 2 == 0)
                for b in range(repeats(n, depth))
            ]
            self.add_module(f"s{i + 2}", nn.Sequential(*blocks))
            c_in = c_out
        conv5 = channels(432, width)
        self.conv5 = ConvBN(c_in, conv5, 1)
        self.lin5 = nn.Linear(conv5, channels(2048, width))
        self.dropout = nn.Dropout(0.5)
        self.fc = nn.Linear(channels(2048, width), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = run_stages(self, x, "stem", "s2", "s3", "s4", "s5")
        x = self.conv5(x).mean(dim=(2, 3, 4))
        return self.fc(self.dropout(torch.relu(self.lin5(x))))


def x3d_m(
    num_classes: int = 400, width: float = 1.0, depth: float = 1.0, in_frames: int = 16
) -> X3D:
    """X3D-M (Feichtenhofer, CVPR 2020): 16 frames, 224 pixels as built here."""
    check_frames(in_frames, 1, "X3D")
    return X3D(num_classes, width, depth)


# ---------------------------------------------------------------- SlowFast


class SlowFastBlock(nn.Module):
    """Bottleneck with a configurable temporal kernel on its first conv (1 or 3)."""

    def __init__(self, c_in: int, mid: int, c_out: int, stride: int, t_kernel: int) -> None:
        super().__init__()
        self.conv1 = ConvBN(c_in, mid, (t_kernel, 1, 1))
        self.conv2 = ConvBN(mid, mid, (1, 3, 3), (1, stride, stride))
        self.conv3 = ConvBN(mid, c_out, 1, act=None)
        self.relu = nn.ReLU()
        self.downsample: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.downsample = ConvBN(c_in, c_out, 1, (1, stride, stride), act=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv3(self.conv2(self.conv1(x)))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class SlowFast(nn.Module):
    """SlowFast-R50 (Feichtenhofer et al., ICCV 2019), one clip in.

    The slow pathway sees every ``alpha``-th frame (a strided Slice on time); the
    fast one every frame with ``beta`` of the channels. After the stem and res2..res4
    a lateral (5x1x1 conv, temporal stride ``alpha``) from fast is concatenated onto
    slow. The head pools both pathways and concatenates them before the classifier.
    """

    def __init__(self, num_classes: int, width: float, depth: float, alpha: int, beta: int) -> None:
        super().__init__()
        self.alpha = alpha
        slow, fast = channels(64, width), channels(64, width / beta)
        self.slow_stem = ConvBN(3, slow, (1, 7, 7), (1, 2, 2))
        self.fast_stem = ConvBN(3, fast, (5, 7, 7), (1, 2, 2))
        self.pool = nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1))
        self.lateral0 = self._lateral(fast)
        c_slow, c_fast = slow + 2 * fast, fast
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3), strict=True)):
            stride = 2 if i else 1
            n = repeats(n, depth)
            s_out, f_out = channels(4 * planes, width), channels(4 * planes, width / beta)
            self.add_module(
                f"slow{i + 2}",
                self._stage(c_slow, channels(planes, width), s_out, stride, 3 if i >= 2 else 1, n),
            )
            self.add_module(
                f"fast{i + 2}",
                self._stage(c_fast, channels(planes, width / beta), f_out, stride, 3, n),
            )
            c_slow, c_fast = s_out, f_out
            if i < 3:
                self.add_module(f"lateral{i + 1}", self._lateral(f_out))
                c_slow += 2 * f_out
        self.dropout = nn.Dropout(0.5)
        self.fc = nn.Linear(c_slow + c_fast, num_classes)

    def _lateral(self, c_fast: int) -> nn.Module:
        return ConvBN(c_fast, 2 * c_fast, (5, 1, 1), (self.alpha, 1, 1))

    @staticmethod
    def _stage(c_in: int, mid: int, c_out: int, stride: int, t_kernel: int, n: int) -> nn.Module:
        return nn.Sequential(
            *(
                SlowFastBlock(
                    c_in if b == 0 else c_out, mid, c_out, stride if b == 0 else 1, t_kernel
                )
                for b in range(n)
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        slow = self.pool(self.slow_stem(x[:, :, :: self.alpha]))
        fast = self.pool(self.fast_stem(x))
        slow = torch.cat([slow, self.lateral0(fast)], dim=1)
        for i in range(2, 6):
            slow = self.get_submodule(f"slow{i}")(slow)
            fast = self.get_submodule(f"fast{i}")(fast)
            if i < 5:
                slow = torch.cat([slow, self.get_submodule(f"lateral{i - 1}")(fast)], dim=1)
        pooled = torch.cat([slow.mean(dim=(2, 3, 4)), fast.mean(dim=(2, 3, 4))], dim=1)
        return self.fc(self.dropout(pooled))


def slowfast_r50(
    num_classes: int = 400,
    width: float = 1.0,
    depth: float = 1.0,
    in_frames: int = 32,
    alpha: int = 8,
    beta: int = 8,
) -> SlowFast:
    """SlowFast-R50 4x16 (alpha 8, beta 1/8): 32 input frames, the slow path sees 4."""
    check_frames(in_frames, alpha, "SlowFast")
    return SlowFast(num_classes, width, depth, alpha, beta)


# ---------------------------------------------------------------- registry

MODELS: dict[str, Callable[..., nn.Module]] = {
    "mfnet_3d": mfnet_3d,
    "i3d": i3d,
    "resnet50_3d": resnet50_3d,
    "resnet101_3d": resnet101_3d,
    "resnet152_3d": resnet152_3d,
    "resnext101_3d": resnext101_3d,
    "r2plus1d_18": r2plus1d_18,
    "x3d_m": x3d_m,
    "csn_152": csn_152,
    "slowfast_r50": slowfast_r50,
}
"""Name -> factory; the names are shared with :mod:`.keras_models` where both exist."""
