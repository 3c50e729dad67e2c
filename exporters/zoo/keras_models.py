"""Video 3D CNNs in Keras (channels last), width/depth configurable.

``i3d``, ``resnet50_3d`` and ``resnext101_3d`` are layer-for-layer twins of the
PyTorch models of the same name: each Keras layer is named after the torch
module it mirrors (``layer1.0.conv1`` -> ``layer1_0_conv1``), BatchNorm uses
torch's epsilon, and every padded conv or pool is an explicit symmetric
``ZeroPadding3D`` + ``valid`` op (Keras' ``same`` pads asymmetrically when
strided). So :func:`cfp_onnx.exporters.transfer.torch_to_keras` can copy weights
by name and the twins compute the same function. ``c3d`` exists only here.

Factories take ``num_classes``, ``width``, ``depth``, ``in_frames`` and ``size``
(Keras needs the spatial size when the model is built: pooling heads and
``Flatten`` depend on it).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
from cfp_onnx.exporters.zoo.torch_models import (
    I3D_MIXED,
    I3D_POOL_BEFORE,
    RESNET_BLOCKS,
    channels,
    check_frames,
    repeats,
    triple,
)
from keras import layers

Tensor: TypeAlias = Any
"""A symbolic Keras tensor (``keras.KerasTensor``); Keras' types do not check."""
BN_EPSILON = 1e-5
"""PyTorch's BatchNorm epsilon (Keras defaults to 1e-3), so twins agree."""


def keras_name(torch_qualname: str) -> str:
    """The Keras layer name mirroring a torch module: dots become underscores."""
    return torch_qualname.replace(".", "_")


def pad_conv(
    x: Tensor,
    c_out: int,
    kernel: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    *,
    name: str,
    groups: int = 1,
    use_bias: bool = False,
) -> Tensor:
    """Symmetric zero padding (``k // 2``) then a ``valid`` Conv3D named ``name``."""
    k = triple(kernel)
    pad = tuple(d // 2 for d in k)
    if any(pad):
        x = layers.ZeroPadding3D(pad, name=f"{name}_pad")(x)
    conv = layers.Conv3D(
        c_out, k, triple(stride), "valid", groups=groups, use_bias=use_bias, name=name
    )
    return conv(x)


def batch_norm(x: Tensor, name: str) -> Tensor:
    return layers.BatchNormalization(epsilon=BN_EPSILON, name=name)(x)


def relu(x: Tensor) -> Tensor:
    return layers.ReLU()(x)


def max_pool(x: Tensor, kernel: Sequence[int], stride: Sequence[int], pad: Sequence[int]) -> Tensor:
    """Max pool with symmetric zero padding: equal to torch's -inf padding on ReLU outputs."""
    if any(pad):
        x = layers.ZeroPadding3D(tuple(pad))(x)
    return layers.MaxPooling3D(tuple(kernel), tuple(stride), "valid")(x)


def conv_bn(
    x: Tensor,
    c_out: int,
    kernel: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    *,
    name: str,
    act: bool = True,
) -> Tensor:
    """Twin of torch ``ConvBN`` (a Sequential: conv is ``<name>.0``, BN ``<name>.1``)."""
    x = batch_norm(pad_conv(x, c_out, kernel, stride, name=f"{name}_0"), f"{name}_1")
    return relu(x) if act else x


def video_input(in_frames: int, size: int) -> Tensor:
    return keras.Input((in_frames, size, size, 3), name="video")


# ---------------------------------------------------------------- ResNet-3D / ResNeXt-3D


def bottleneck(x: Tensor, mid: int, c_out: int, stride: int, groups: int, name: str) -> Tensor:
    """Twin of torch ``Bottleneck`` (conv1/bn1, conv2/bn2 grouped, conv3/bn3, downsample)."""
    c_in = x.shape[-1]
    out = relu(batch_norm(pad_conv(x, mid, 1, name=f"{name}_conv1"), f"{name}_bn1"))
    out = pad_conv(out, mid, 3, stride, groups=groups, name=f"{name}_conv2")
    out = relu(batch_norm(out, f"{name}_bn2"))
    out = batch_norm(pad_conv(out, c_out, 1, name=f"{name}_conv3"), f"{name}_bn3")
    if stride != 1 or c_in != c_out:
        x = pad_conv(x, c_out, 1, stride, name=f"{name}_downsample_0")
        x = batch_norm(x, f"{name}_downsample_1")
    return relu(layers.Add()([out, x]))


def _resnet(
    name: str,
    blocks: Sequence[int],
    *,
    num_classes: int,
    width: float,
    in_frames: int,
    size: int,
    mid_of: Callable[[int], int],
    out_of: Callable[[int], int],
    groups: int,
) -> keras.Model:
    inputs = video_input(in_frames, size)
    x = pad_conv(inputs, channels(64, width), 7, (1, 2, 2), name="conv1")
    x = max_pool(relu(batch_norm(x, "bn1")), (3, 3, 3), (2, 2, 2), (1, 1, 1))
    for i, (planes, n) in enumerate(zip((64, 128, 256, 512), blocks, strict=True)):
        for b in range(n):
            stride = 2 if (i > 0 and b == 0) else 1
            x = bottleneck(x, mid_of(planes), out_of(planes), stride, groups, f"layer{i + 1}_{b}")
    x = layers.Dropout(0.5)(layers.GlobalAveragePooling3D()(x))
    return keras.Model(inputs, layers.Dense(num_classes, name="head_fc")(x), name=name)


def resnet50_3d(
    num_classes: int = 400,
    width: float = 1.0,
    depth: float = 1.0,
    in_frames: int = 16,
    size: int = 224,
) -> keras.Model:
    """3D ResNet-50 (Hara et al.), twin of the torch model of the same name."""
    check_frames(in_frames, 8, "ResNet-50-3D")
    return _resnet(
        "resnet50_3d",
        [repeats(b, depth) for b in RESNET_BLOCKS[50]],
        num_classes=num_classes,
        width=width,
        in_frames=in_frames,
        size=size,
        mid_of=lambda p: channels(p, width),
        out_of=lambda p: channels(4 * p, width),
        groups=1,
    )


def resnext101_3d(
    num_classes: int = 400,
    width: float = 1.0,
    depth: float = 1.0,
    in_frames: int = 16,
    size: int = 224,
    cardinality: int = 32,
) -> keras.Model:
    """3D ResNeXt-101 32x4d with grouped ``Conv3D(groups=cardinality)``: the case
    tf2onnx cannot convert on its own (see :mod:`cfp_onnx.exporters.tensorflow`)."""
    check_frames(in_frames, 8, "ResNeXt-101-3D")
    return _resnet(
        "resnext101_3d",
        [repeats(b, depth) for b in RESNET_BLOCKS[101]],
        num_classes=num_classes,
        width=width,
        in_frames=in_frames,
        size=size,
        mid_of=lambda p: channels(2 * p, width, cardinality),
        out_of=lambda p: channels(4 * p, width),
        groups=cardinality,
    )


# ---------------------------------------------------------------- I3D


def inception(x: Tensor, widths: Sequence[int], name: str) -> Tensor:
    """Twin of torch ``InceptionBlock``: branches b0..b3 concatenated on channels."""
    b0, b1a, b1b, b2a, b2b, b3 = widths
    y0 = conv_bn(x, b0, 1, name=f"{name}_b0")
    y1 = conv_bn(conv_bn(x, b1a, 1, name=f"{name}_b1_0"), b1b, 3, name=f"{name}_b1_1")
    y2 = conv_bn(conv_bn(x, b2a, 1, name=f"{name}_b2_0"), b2b, 3, name=f"{name}_b2_1")
    y3 = conv_bn(max_pool(x, (3, 3, 3), (1, 1, 1), (1, 1, 1)), b3, 1, name=f"{name}_b3_1")
    return layers.Concatenate(axis=-1)([y0, y1, y2, y3])


def i3d(
    num_classes: int = 400,
    width: float = 1.0,
    depth: float = 1.0,
    in_frames: int = 16,
    size: int = 224,
) -> keras.Model:
    """I3D, twin of the torch model: a 1x1x1 logits conv on spatially pooled
    features, then the mean over time."""
    del depth  # the Inception stack has no repeated stage to shorten
    check_frames(in_frames, 8, "I3D")
    inputs = video_input(in_frames, size)
    x = conv_bn(inputs, channels(64, width), 7, 2, name="Conv3d_1a_7x7")
    x = max_pool(x, (1, 3, 3), (1, 2, 2), (0, 1, 1))
    x = conv_bn(x, channels(64, width), 1, name="Conv3d_2b_1x1")
    x = conv_bn(x, channels(192, width), 3, name="Conv3d_2c_3x3")
    index = 0
    for block, widths in I3D_MIXED.items():
        if block in I3D_POOL_BEFORE:
            x = max_pool(x, *I3D_POOL_BEFORE[block])
            index += 1
        x = inception(x, [channels(w, width) for w in widths], f"mixed_{index}")
        index += 1
    x = layers.AveragePooling3D((1, x.shape[2], x.shape[3]))(x)
    x = layers.Conv3D(num_classes, 1, name="logits")(layers.Dropout(0.5)(x))
    return keras.Model(inputs, layers.GlobalAveragePooling3D()(x), name="i3d")


# ---------------------------------------------------------------- C3D

C3D_CONVS = (
    ("conv1a", 64, (1, 2, 2)),
    ("conv2a", 128, (2, 2, 2)),
    ("conv3a", 256, None),
    ("conv3b", 256, (2, 2, 2)),
    ("conv4a", 512, None),
    ("conv4b", 512, (2, 2, 2)),
    ("conv5a", 512, None),
    ("conv5b", 512, (2, 2, 2)),
)
"""C3D (Tran et al., ICCV 2015): conv name, filters, max pool after it (or None)."""


def c3d(
    num_classes: int = 487,
    width: float = 1.0,
    depth: float = 1.0,
    in_frames: int = 16,
    size: int = 112,
) -> keras.Model:
    """C3D: eight 3x3x3 convs, five pools, then fc6 -> fc7 -> fc8 on the flattened
    map (the head the analyzer multiplies into one ``W[classes, F]``)."""
    del depth  # C3D has no repeated stage
    check_frames(in_frames, 16, "C3D")
    inputs = video_input(in_frames, size)
    x = inputs
    for name, filters, pool in C3D_CONVS:
        x = relu(pad_conv(x, channels(filters, width), 3, name=name, use_bias=True))
        if pool is not None:
            pad = (0, 1, 1) if name == "conv5b" else (0, 0, 0)
            x = max_pool(x, pool, pool, pad)
    x = layers.Flatten()(x)
    hidden = channels(4096, width)
    x = layers.Dropout(0.5)(layers.Dense(hidden, activation="relu", name="fc6")(x))
    x = layers.Dropout(0.5)(layers.Dense(hidden, activation="relu", name="fc7")(x))
    return keras.Model(inputs, layers.Dense(num_classes, name="fc8")(x), name="c3d")


MODELS: dict[str, Callable[..., keras.Model]] = {
    "i3d": i3d,
    "resnet50_3d": resnet50_3d,
    "resnext101_3d": resnext101_3d,
    "c3d": c3d,
}
"""Name -> factory; names shared with :mod:`.torch_models` where both exist."""
