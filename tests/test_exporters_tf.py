"""Keras/TF -> ONNX: zoo models, grouped Conv3D restored as one grouped Conv, errors."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
keras = pytest.importorskip("keras")
pytest.importorskip("tf2onnx")

from cfp_onnx.exporters.tensorflow import export_keras  # noqa: E402

from cfp_onnx.errors import ModelError, OutputError  # noqa: E402
from cfp_onnx.metadata import read_metadata  # noqa: E402
from tests.zoo_helpers import (  # noqa: E402
    CLASSES,
    KERAS_REDUCED,
    clip,
    keras_model,
    keras_shape,
    onnx_logits,
)


def _groups(path: Path) -> dict[str, int]:
    return {
        n.name: next((a.i for a in n.attribute if a.name == "group"), 1)
        for n in onnx.load(str(path)).graph.node
        if n.op_type == "Conv"
    }


@pytest.mark.parametrize("name", sorted(KERAS_REDUCED))
def test_keras_zoo_model_exports_and_matches_tf(name: str, tmp_path: Path) -> None:
    model = keras_model(name)
    path = tmp_path / f"{name}.onnx"
    result = export_keras(model, path)
    assert result.passed and result.output_shape == (1, CLASSES)
    assert result.layout == "NDHWC" and result.input_shape == keras_shape(name)
    x = clip((2, *keras_shape(name)[1:]), seed=11)
    expected = np.asarray(model(x, training=False))
    np.testing.assert_allclose(onnx_logits(path, x), expected, rtol=0, atol=1e-4)
    meta = read_metadata(onnx.load(str(path)))
    assert meta["layout"] == "NDHWC" and meta["frames"] == keras_shape(name)[1]
    # every Keras conv became one ONNX Conv named after its layer
    convs = {
        layer.name
        for layer in model._flatten_layers(include_self=False)
        if isinstance(layer, keras.layers.Conv3D)
    }
    assert set(_groups(path)) == convs


def test_grouped_conv3d_becomes_one_grouped_conv(tmp_path: Path) -> None:
    model = keras_model("resnext101_3d")
    path = tmp_path / "rx.onnx"
    export_keras(model, path)
    groups = _groups(path)
    assert groups["layer1_0_conv2"] == 4 and groups["layer4_0_conv2"] == 4
    assert groups["layer1_0_conv1"] == 1
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert not ops & {"Split", "StatefulPartitionedCall"}
    proto = onnx.load(str(path))
    node = next(n for n in proto.graph.node if n.name == "layer1_0_conv2")
    weight = next(i for i in proto.graph.initializer if i.name == node.input[1])
    assert list(weight.dims) == [16, 4, 3, 3, 3]  # [C_out, C_in / group, k, k, k]
    x = clip(keras_shape("resnext101_3d"), seed=2)
    np.testing.assert_allclose(
        onnx_logits(path, x), np.asarray(model(x, training=False)), atol=1e-4
    )


def _depthwise_model() -> keras.Model:
    """A depth-wise Conv3D (groups == channels) after a dense one, channels last."""
    inputs = keras.Input((4, 8, 8, 3), name="video")
    x = keras.layers.Conv3D(6, 3, padding="same", name="dense_conv")(inputs)
    x = keras.layers.Conv3D(6, 3, padding="same", groups=6, name="dw_conv")(x)
    x = keras.layers.GlobalAveragePooling3D()(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="fc")(x))


def test_depthwise_conv3d_exports(tmp_path: Path) -> None:
    keras.utils.set_random_seed(3)
    model = _depthwise_model()
    export_keras(model, tmp_path / "dw.onnx")
    assert _groups(tmp_path / "dw.onnx") == {"dense_conv": 1, "dw_conv": 6}


def test_keras_file_and_savedmodel(tmp_path: Path) -> None:
    model = keras_model("resnet50_3d")
    model.save(tmp_path / "r50.keras")
    from_file = export_keras(str(tmp_path / "r50.keras"), tmp_path / "a.onnx")
    model.export(str(tmp_path / "saved"), verbose=False)
    from_saved = export_keras(tmp_path / "saved", tmp_path / "b.onnx")
    assert from_file.passed and from_saved.passed
    x = clip(keras_shape("resnet50_3d"), seed=4)
    np.testing.assert_allclose(
        onnx_logits(tmp_path / "a.onnx", x), onnx_logits(tmp_path / "b.onnx", x), atol=1e-5
    )


def test_grouped_conv_in_savedmodel_is_named(tmp_path: Path) -> None:
    keras.utils.set_random_seed(3)
    _depthwise_model().export(str(tmp_path / "saved"), verbose=False)
    with pytest.raises(ModelError, match=r"could not convert TF op.*export from the \.keras model"):
        export_keras(tmp_path / "saved", tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_two_outputs_are_refused(tmp_path: Path) -> None:
    inputs = keras.Input((4, 8, 8, 3))
    x = keras.layers.GlobalAveragePooling3D()(keras.layers.Conv3D(4, 3)(inputs))
    model = keras.Model(inputs, [keras.layers.Dense(2)(x), keras.layers.Dense(3)(x)])
    with pytest.raises(ModelError, match="model returns a list; cfp_onnx needs one logits tensor"):
        export_keras(model, tmp_path / "m.onnx")


def test_image_model_is_refused(tmp_path: Path) -> None:
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3)(inputs))
    model = keras.Model(inputs, keras.layers.Dense(2)(x))
    with pytest.raises(ModelError, match=r"\(4-D\); a video model takes a 5-D clip"):
        export_keras(model, tmp_path / "m.onnx")


def test_unknown_dims_need_an_input_shape(tmp_path: Path) -> None:
    inputs = keras.Input((None, None, None, 3))
    x = keras.layers.GlobalAveragePooling3D()(keras.layers.Conv3D(4, 3)(inputs))
    model = keras.Model(inputs, keras.layers.Dense(2)(x))
    with pytest.raises(ModelError, match="unknown or empty dims"):
        export_keras(model, tmp_path / "m.onnx")
    result = export_keras(model, tmp_path / "m.onnx", input_shape=(1, 4, 8, 8, 3))
    assert result.input_shape == (1, 4, 8, 8, 3)


def test_missing_file_and_existing_output(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        export_keras(tmp_path / "nope.keras", tmp_path / "m.onnx")
    (tmp_path / "m.onnx").write_text("x")
    with pytest.raises(OutputError, match="exists; pass --overwrite"):
        export_keras(_depthwise_model(), tmp_path / "m.onnx")
