"""cfp.* metadata: written by exporters, read back by the analyzer, validated on write."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from cfp_onnx.errors import ModelError
from cfp_onnx.metadata import read_metadata, write_metadata


def _model() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 2, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 2, 4, 4])],
    )
    model = helper.make_model(graph)
    helper.set_model_props(model, {"author": "someone"})
    return model


def test_round_trip_through_a_file(tmp_path) -> None:
    model = write_metadata(
        _model(),
        layout="NDHWC",
        mean=np.array([0.43, 0.4, 0.37]),
        std=(0.22, 0.22, 0.22),
        frames=16,
        size=(112, 112),
        class_names=["run", "jump", "caf\u00e9"],
    )
    onnx.save(model, tmp_path / "m.onnx")
    got = read_metadata(onnx.load(tmp_path / "m.onnx"))
    assert got == {
        "layout": "NDHWC",
        "mean": [0.43, 0.4, 0.37],
        "std": [0.22, 0.22, 0.22],
        "frames": 16,
        "size": [112, 112],
        "class_names": ["run", "jump", "caf\u00e9"],
    }
    props = {p.key: p.value for p in onnx.load(tmp_path / "m.onnx").metadata_props}
    assert props["author"] == "someone"  # foreign keys survive
    assert all(k.startswith("cfp.") for k in props if k != "author")


def test_rewrite_replaces_only_given_values() -> None:
    model = write_metadata(_model(), layout="NCDHW", frames=8)
    write_metadata(model, frames=16)
    assert read_metadata(model) == {"layout": "NCDHW", "frames": 16}
    assert len(model.metadata_props) == 3


def test_no_metadata_reads_empty() -> None:
    assert read_metadata(_model()) == {}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"layout": "NHWC"}, "layout 'NHWC' is not one of NCDHW, NDHWC"),
        ({"mean": [0.1, 0.2]}, "mean must have 1 or 3 values"),
        ({"std": [0.2, 0.0, 0.2]}, "std must be positive"),
        ({"frames": 0}, "frames must be a positive integer"),
        ({"size": [112]}, r"size must be \(height, width\)"),
        ({"mean": "abc"}, "mean must be a list of numbers"),
    ],
)
def test_bad_values_are_refused(kwargs, message) -> None:
    with pytest.raises(ModelError, match=message):
        write_metadata(_model(), **kwargs)


def test_corrupt_value_is_a_model_error() -> None:
    model = _model()
    helper.set_model_props(model, {"cfp.mean": "[0.4, "})
    with pytest.raises(ModelError, match=r"model metadata 'cfp\.mean' is not valid JSON"):
        read_metadata(model)
