"""Cross-framework twins: same weights, same logits (framework and ONNX), mapped convs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

pytest.importorskip("tf2onnx")

from cfp_onnx.exporters.pytorch import export_torch
from cfp_onnx.exporters.tensorflow import export_keras
from cfp_onnx.exporters.transfer import torch_to_keras

from cfp_onnx.errors import ModelError
from tests.zoo_helpers import (
    TORCH_SHAPE,
    TWINS,
    clip,
    keras_model,
    onnx_logits,
    torch_model,
    twin,
)


def _convs(path: Path) -> set[str]:
    return {n.name for n in onnx.load(str(path)).graph.node if n.op_type == "Conv"}


@pytest.mark.parametrize("name", TWINS)
def test_twins_give_the_same_logits(name: str, tmp_path: Path) -> None:
    pair = twin(name)
    x = clip(TORCH_SHAPE, seed=21)
    x_last = np.ascontiguousarray(x.transpose(0, 2, 3, 4, 1))
    with torch.no_grad():
        torch_out = pair.torch_model(torch.from_numpy(x)).numpy()
    keras_out = np.asarray(pair.keras_model(x_last, training=False))
    np.testing.assert_allclose(keras_out, torch_out, rtol=0, atol=1e-4)
    assert np.abs(torch_out).max() > 1e-3  # not trivially zero

    export_torch(pair.torch_model, TORCH_SHAPE, tmp_path / "t.onnx")
    export_keras(pair.keras_model, tmp_path / "k.onnx")
    np.testing.assert_allclose(
        onnx_logits(tmp_path / "k.onnx", x_last), onnx_logits(tmp_path / "t.onnx", x), atol=1e-4
    )
    # the mapping pairs every conv of one graph with one conv of the other
    assert set(pair.conv_nodes) == _convs(tmp_path / "t.onnx")
    assert set(pair.conv_nodes.values()) == _convs(tmp_path / "k.onnx")


def test_mapping_names() -> None:
    pair = twin("resnet50_3d")
    assert pair.conv_nodes["/conv1/Conv"] == "conv1"
    assert pair.conv_nodes["/layer2/layer2.0/downsample/downsample.0/Conv"] == (
        "layer2_0_downsample_0"
    )


def test_mismatched_twin_is_refused() -> None:
    with pytest.raises(ModelError, match="has no Keras twin layer"):
        torch_to_keras(torch_model("resnet50_3d"), keras_model("i3d"))


def test_mismatched_width_is_refused() -> None:
    from cfp_onnx.exporters.zoo.keras_models import resnet50_3d

    wide = resnet50_3d(num_classes=5, width=0.25, depth=0.01, in_frames=8, size=32)
    with pytest.raises(ModelError, match="do not fit Keras layer"):
        torch_to_keras(torch_model("resnet50_3d"), wide)
