"""Reduced-width zoo models for tests: small enough for two shared CPU cores.

Each model is built with random BatchNorm statistics (a fresh BatchNorm is the
identity and would hide layout or folding mistakes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

CLASSES = 5
FRAMES = 8
SIZE = 32
TORCH_SHAPE = (1, 3, FRAMES, SIZE, SIZE)

TORCH_REDUCED: dict[str, dict[str, Any]] = {
    "mfnet_3d": {"width": 1 / 6, "groups": 4},
    "i3d": {"width": 0.125},
    "resnet50_3d": {"width": 0.125},
    "resnet101_3d": {"width": 0.125},
    "resnet152_3d": {"width": 0.125},
    "resnext101_3d": {"width": 0.125, "cardinality": 4},
    "r2plus1d_18": {"width": 0.125},
    "x3d_m": {"width": 0.5},
    "csn_152": {"width": 0.125},
    "slowfast_r50": {"width": 0.25, "alpha": 4},
}
"""Keyword arguments (besides classes, frames, depth) of each torch zoo model in tests."""

KERAS_REDUCED: dict[str, dict[str, Any]] = {
    "i3d": {"width": 0.125},
    "resnet50_3d": {"width": 0.125},
    "resnext101_3d": {"width": 0.125, "cardinality": 4},
    "c3d": {"width": 1 / 16, "in_frames": 16},
}

TWINS = ("resnet50_3d", "i3d", "resnext101_3d")


def torch_model(name: str, seed: int = 0) -> Any:
    """A reduced torch zoo model in eval mode (one block per stage)."""
    import torch
    from cfp_onnx.exporters.zoo.torch_models import MODELS, randomize_batchnorm

    torch.manual_seed(seed)
    kwargs = {"num_classes": CLASSES, "depth": 0.01, "in_frames": FRAMES, **TORCH_REDUCED[name]}
    return randomize_batchnorm(MODELS[name](**kwargs), seed).eval()


def keras_model(name: str, seed: int = 0) -> Any:
    """A reduced Keras zoo model with random BatchNorm statistics."""
    import keras
    from cfp_onnx.exporters.zoo.keras_models import MODELS

    keras.utils.set_random_seed(seed)
    kwargs = {"num_classes": CLASSES, "depth": 0.01, "in_frames": FRAMES, "size": SIZE}
    model = MODELS[name](**{**kwargs, **KERAS_REDUCED[name]})
    randomize_keras_batchnorm(model, seed)
    return model


def randomize_keras_batchnorm(model: Any, seed: int) -> None:
    import keras

    rng = np.random.default_rng(seed)
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.set_weights(
                [
                    0.5 + rng.random(n, dtype=np.float32),
                    0.1 * rng.standard_normal(n, dtype=np.float32),
                    0.1 * rng.standard_normal(n, dtype=np.float32),
                    0.5 + rng.random(n, dtype=np.float32),
                ]
            )


def keras_shape(name: str) -> tuple[int, ...]:
    frames = KERAS_REDUCED[name].get("in_frames", FRAMES)
    return (1, frames, SIZE, SIZE, 3)


@dataclass(frozen=True)
class Twin:
    """A torch model, its Keras twin with the same weights, and the conv mapping."""

    torch_model: Any
    keras_model: Any
    conv_nodes: dict[str, str]


def twin(name: str, seed: int = 0) -> Twin:
    from cfp_onnx.exporters.transfer import torch_to_keras

    model = torch_model(name, seed)
    other = keras_model(name, seed)
    return Twin(model, other, torch_to_keras(model, other).conv_nodes)


def onnx_logits(path: Any, clip: np.ndarray) -> np.ndarray:
    """Run a file in onnxruntime, independently of the exporters' own check."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: clip})[0]


def clip(shape: tuple[int, ...], seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
