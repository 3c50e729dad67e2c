"""Bad models, each written by a small builder into a folder (no binaries checked in)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests.graphs import G

CLIP_SHAPE = (1, 3, 4, 8, 8)  # tests.graphs.G's input


def good(path: Path, *, opset: int = 18) -> Path:
    """Conv -> Relu -> Conv -> Relu -> GAP -> Flatten -> Gemm: explains fine."""
    g = G()
    y = g.relu(g.conv(g.relu(g.conv("video", 3, 6)), 6, 6))
    return g.save(path, [g.gemm(g.pool_flatten(y), 6, 3)], opset=opset)


def _edit(path: Path, change: Callable[[onnx.ModelProto], None]) -> Path:
    good(path)
    m = onnx.load(str(path))
    change(m)
    onnx.save(m, str(path))
    return path


def _init(m: onnx.ModelProto, index: int, value: np.ndarray) -> None:
    t = m.graph.initializer[index]
    t.CopyFrom(numpy_helper.from_array(value.astype(np.float32), t.name))


def empty(p: Path) -> None:
    p.write_bytes(b"")


def tensor_not_model(p: Path) -> None:
    p.write_bytes(numpy_helper.from_array(np.zeros((4, 4), np.float32), "t").SerializeToString())


def graph_without_nodes(p: Path) -> None:
    p.write_bytes(helper.make_model(helper.make_graph([], "g", [], [])).SerializeToString())


def cycle(p: Path) -> None:
    def change(m: onnx.ModelProto) -> None:
        m.graph.node[0].input[0] = m.graph.node[1].output[0]  # conv1 reads relu1's output

    _edit(p, change)


def dangling(p: Path) -> None:
    _edit(p, lambda m: m.graph.node[1].input.__setitem__(0, "ghost"))


def no_conv(p: Path) -> None:
    g = G()
    g.save(p, [g.gemm(g.pool_flatten("video"), 3, 3)])


def no_classifier(p: Path) -> None:
    g = G()
    g.save(p, [g.pool_flatten(g.relu(g.conv("video", 3, 6)))])


def two_logits(p: Path) -> None:
    g = G()
    f = g.pool_flatten(g.relu(g.conv("video", 3, 6)))
    g.save(p, [g.gemm(f, 6, 3), g.gemm(f, 6, 4)])


def _with_op(p: Path, op: str, domain: str = "", **attrs: object) -> None:
    g = G()
    y = g.op(op, g.relu(g.conv("video", 3, 6)), domain=domain, **attrs)
    g.save(p, [g.gemm(g.pool_flatten(g.relu(g.conv(y, 6, 6))), 6, 3)])


def ort_rejects_at_run(p: Path) -> None:
    """Valid ONNX whose first conv onnxruntime refuses on the clip (dilated past its size):
    its own ``[E:onnxruntime ...]`` log line must not reach stderr beside ours."""

    def dilate(m: onnx.ModelProto) -> None:
        conv = next(n for n in m.graph.node if n.op_type == "Conv")
        conv.attribute.append(helper.make_attribute("dilations", [1, 40, 40]))

    _edit(p, dilate)


def unknown_op(p: Path) -> None:
    _with_op(p, "LpNormalization", axis=1)


def custom_op(p: Path) -> None:
    _with_op(p, "Evil", domain="com.evil")


def future_opset(p: Path) -> None:
    _edit(p, lambda m: m.opset_import[0].__setattr__("version", 40))


def huge_input_dim(p: Path) -> None:
    _edit(
        p,
        lambda m: m.graph.input[0].type.tensor_type.shape.dim[2].__setattr__("dim_value", 1 << 40),
    )


def huge_initializer_dims(p: Path) -> None:
    _edit(p, lambda m: m.graph.initializer[1].dims.__setitem__(0, 1 << 40))


def nan_conv_weight(p: Path) -> None:
    _edit(p, lambda m: _init(m, 0, np.full((6, 3, 3, 3, 3), np.nan)))


def inf_classifier_weight(p: Path) -> None:
    def change(m: onnx.ModelProto) -> None:
        w = numpy_helper.to_array(m.graph.initializer[4]).copy()
        w[1, 2] = np.inf
        _init(m, 4, w)

    _edit(p, change)


def nan_bias(p: Path) -> None:
    _edit(p, lambda m: _init(m, 1, np.array([0, np.nan, 0, 0, 0, 0])))


def two_inputs(p: Path) -> None:
    _edit(
        p,
        lambda m: m.graph.input.append(helper.make_tensor_value_info("x2", TensorProto.FLOAT, [1])),
    )


def dynamic_input(p: Path) -> None:
    def change(m: onnx.ModelProto) -> None:
        d = m.graph.input[0].type.tensor_type.shape.dim[2]
        d.Clear()
        d.dim_param = "T"

    _edit(p, change)


def external(p: Path, location: str) -> Path:
    """The good model with its weights in `location` (relative to the model's folder)."""
    good(p)
    m = onnx.load(str(p))
    onnx.save_model(
        m, str(p), save_as_external_data=True, all_tensors_to_one_file=True,
        location="weights.bin", size_threshold=0,
    )  # fmt: skip
    return point_weights_at(p, location)


def point_weights_at(p: Path, location: str) -> Path:
    """Rewrite every external-data reference of the model at `p` to `location`."""
    m = onnx.load(str(p), load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    onnx.save(m, str(p))
    return p


def external_escape(p: Path, location: str) -> tuple[Path, Path]:
    """Weights pointing at `location` outside the folder, where a readable copy of the real
    weights lies: reading it would *work*, so only the path check can refuse it."""
    external(p, location)
    real = p.parent / "weights.bin"
    target = Path(location) if os.path.isabs(location) else (p.parent / location).resolve()
    return real, target
