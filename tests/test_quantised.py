"""Quantised models (SPEC §2-3): a QDQ model's pyramid is the float model's, computed from
the dequantised weights and activations; the QOperator format is refused by name."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from cfp_onnx.api import Explainer
from cfp_onnx.errors import UnsupportedOpError
from cfp_onnx.pyramid import Pyramid
from tests.bad_inputs.conftest import CFP, assert_one_line_error
from tests.graphs import G

quantization = pytest.importorskip("onnxruntime.quantization")
SHAPE = (1, 3, 4, 16, 16)


def _nodes(p: Pyramid) -> set[tuple[str, int]]:
    return {(p.layers[i], int(c)) for i, c in zip(p.node_layer, p.node_channel)}


def _float_model(path: Path) -> Path:
    """Conv -> Relu -> grouped Conv -> Relu -> GAP -> Gemm."""
    g = G(shape=SHAPE, seed=3)
    y = g.relu(g.conv(g.relu(g.conv("video", 3, 8)), 8, 16, group=2))
    return g.save(path, [g.gemm(g.pool_flatten(y), 16, 5)], opset=17)


Grid = dict[str, tuple[np.ndarray, np.ndarray]]


def _on_a_grid(path: Path) -> Grid:
    """Make every weight of rank >= 2 an int8 times a power of two per output channel
    (exact in float32 and in int8); returns each one's integers and scales."""
    m = onnx.load(str(path))
    rng = np.random.default_rng(0)
    grid: Grid = {}
    for t in m.graph.initializer:
        w = numpy_helper.to_array(t)
        if w.ndim >= 2:
            scale = (2.0 ** -rng.integers(4, 8, size=w.shape[0])).astype(np.float32)
            q = rng.integers(-127, 128, size=w.shape).astype(np.int8)
            w = q.astype(np.float32) * scale.reshape((-1,) + (1,) * (w.ndim - 1))
            t.CopyFrom(numpy_helper.from_array(w, t.name))
            grid[t.name] = (q, scale)
    onnx.save(m, str(path))
    return grid


def _weights_as_qdq(src: Path, dst: Path, grid: Grid) -> Path:
    """Each weight of `grid` stored as its int8 behind a per-channel DequantizeLinear."""
    m = onnx.load(str(src))
    keep = [t for t in m.graph.initializer if t.name not in grid]
    nodes = []
    for name, (q, scale) in grid.items():
        keep += [numpy_helper.from_array(q, name + "_q"),
                 numpy_helper.from_array(scale, name + "_s"),
                 numpy_helper.from_array(np.zeros(len(scale), np.int8), name + "_z")]  # fmt: skip
        nodes.append(onnx.helper.make_node(
            "DequantizeLinear", [name + "_q", name + "_s", name + "_z"], [name],
            name=name + "_dq", axis=0))  # fmt: skip
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    body = list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(nodes + body)
    onnx.save(m, str(dst))
    return dst


def test_weights_in_qdq_give_exactly_the_float_pyramid(tmp_path):
    f = _float_model(tmp_path / "f.onnx")
    q = _weights_as_qdq(f, tmp_path / "q.onnx", _on_a_grid(f))
    clip = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
    a = Explainer(f, clip_shape=SHAPE).explain(clip, theta=0.4)
    b = Explainer(q, clip_shape=SHAPE).explain(clip, theta=0.4)
    assert len(a.link_target) > 0 and a.label == b.label
    # the same kernels and links; values as close as onnxruntime's float32 convs allow
    # (it runs the two graphs with different kernels: logits differ in the last bit)
    assert _nodes(a) == _nodes(b)
    np.testing.assert_array_equal(a.node_depth, b.node_depth)
    np.testing.assert_array_equal(a.link_source, b.link_source)
    np.testing.assert_array_equal(a.link_target, b.link_target)
    np.testing.assert_allclose(a.node_relevance, b.node_relevance, rtol=1e-6)
    np.testing.assert_allclose(a.link_relevance, b.link_relevance, rtol=1e-6)
    np.testing.assert_allclose(a.logits, b.logits, rtol=1e-6)


def _static(src: Path, dst: Path, shape: tuple[int, ...], fmt: str = "QDQ") -> Path:
    """onnxruntime's own static quantisation: int8, per channel, 8 calibration clips, in
    the QDQ or the QOperator format."""
    rng = np.random.default_rng(0)
    name = onnx.load(str(src)).graph.input[0].name
    feeds = iter([{name: rng.standard_normal(shape).astype(np.float32)} for _ in range(8)])

    class Reader(quantization.CalibrationDataReader):
        def get_next(self):  # type: ignore[no-untyped-def]
            return next(feeds, None)

    quant_format = getattr(quantization.QuantFormat, fmt)
    quantization.quantize_static(
        str(src), str(dst), Reader(), quant_format=quant_format, per_channel=True
    )
    return dst


@pytest.mark.parametrize("name", ["resnet50_3d", "mfnet_3d", "i3d"])
def test_zoo_models_quantised_by_onnxruntime_keep_their_pyramid(tmp_path, name):
    """Weights and activations in int8 (QDQ): node Jaccard against the float model >= 0.9
    on residual, multi-fiber (grouped) and branching (Inception) zoo models."""
    pytest.importorskip("torch")
    from cfp_onnx.exporters.pytorch import export_torch

    from tests.zoo_helpers import TORCH_SHAPE, torch_model

    f = tmp_path / "f.onnx"
    export_torch(torch_model(name), TORCH_SHAPE, f)
    q = _static(f, tmp_path / "q.onnx", TORCH_SHAPE)
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(q)).graph.node)
    clip = np.random.default_rng(5).standard_normal(TORCH_SHAPE).astype(np.float32)
    a = Explainer(f, clip_shape=TORCH_SHAPE).explain(clip, theta=0.6)
    b = Explainer(q, clip_shape=TORCH_SHAPE).explain(clip, theta=0.6, label=a.label)
    na, nb = _nodes(a), _nodes(b)
    assert len(na) > 10 and len(na & nb) / len(na | nb) >= 0.9
    assert a.max_depth_reached == b.max_depth_reached


def test_qdq_with_weights_on_disk_reads_them_through_their_dequantize(tmp_path):
    f = _float_model(tmp_path / "f.onnx")
    q = _static(f, tmp_path / "q.onnx", SHAPE)
    ext = tmp_path / "ext"
    ext.mkdir()
    onnx.save_model(onnx.load(str(q)), str(ext / "q.onnx"), save_as_external_data=True,
                    location="w.bin", size_threshold=0)  # fmt: skip
    clip = np.random.default_rng(2).standard_normal(SHAPE).astype(np.float32)
    a = Explainer(q, clip_shape=SHAPE).explain(clip, theta=0.5)
    b = Explainer(ext / "q.onnx", clip_shape=SHAPE).explain(clip, theta=0.5)
    assert {**a.to_dict(), "model": ""} == {**b.to_dict(), "model": ""}


@pytest.mark.parametrize("name", ["resnet50_3d", "mfnet_3d", "i3d"])
def test_qoperator_models_are_rewritten_as_the_qdq_graph_they_compute(tmp_path, name):
    """QLinearConv, QGemm, QLinearAdd, QLinearConcat, ... become DequantizeLinear -> float
    op -> QuantizeLinear: the logits equal onnxruntime's own run of the QOperator file (to
    its output's quantisation step), and the pyramid is the float model's (node Jaccard
    >= 0.9; onnxruntime names each layer ``<float name>_quant``)."""
    pytest.importorskip("torch")
    import onnxruntime as ort
    from cfp_onnx.exporters.pytorch import export_torch

    from tests.zoo_helpers import TORCH_SHAPE, torch_model

    f = tmp_path / "f.onnx"
    export_torch(torch_model(name), TORCH_SHAPE, f)
    q = _static(f, tmp_path / "q.onnx", TORCH_SHAPE, "QOperator")
    model = onnx.load(str(q))
    assert "QLinearConv" in {n.op_type for n in model.graph.node}
    clip = np.random.default_rng(5).standard_normal(TORCH_SHAPE).astype(np.float32)
    native = ort.InferenceSession(str(q), providers=["CPUExecutionProvider"]).run(
        None, {model.graph.input[0].name: clip}
    )[0][0]
    last = next(n for n in reversed(model.graph.node) if n.op_type == "DequantizeLinear")
    step = float(numpy_helper.to_array(
        next(t for t in model.graph.initializer if t.name == last.input[1])))  # fmt: skip
    a = Explainer(f, clip_shape=TORCH_SHAPE).explain(clip, theta=0.6)
    b = Explainer(q, clip_shape=TORCH_SHAPE).explain(clip, theta=0.6, label=a.label)
    assert np.abs(b.logits - native).max() <= 2 * step + 1e-7
    na = _nodes(a)
    nb = {(layer.removesuffix("_quant"), c) for layer, c in _nodes(b)}
    assert len(na) > 10 and len(na & nb) / len(na | nb) >= 0.9


def test_integer_ops_without_a_rewrite_are_refused_by_name(tmp_path):
    """Dynamic quantisation writes ConvInteger (int32 out, scales computed at run time)."""
    f = _float_model(tmp_path / "f.onnx")
    q = tmp_path / "dyn.onnx"
    quantization.quantize_dynamic(str(f), str(q), op_types_to_quantize=["Conv"])
    assert "ConvInteger" in {n.op_type for n in onnx.load(str(q)).graph.node}
    with pytest.raises(UnsupportedOpError, match="ConvInteger"):
        Explainer(q, clip_shape=SHAPE)
    np.save(tmp_path / "clip.npy", np.zeros(SHAPE, np.float32))
    r = subprocess.run([CFP, "explain", "dyn.onnx", "--clip", "clip.npy", "--out", "out"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert_one_line_error(r, "ConvInteger", "QuantFormat.QDQ")
    assert not (tmp_path / "out").exists()


def _zeroed_qdq(path: Path, out: Path, ex: Explainer, kernels: dict[int, np.ndarray]) -> Path:
    """Reference: a QDQ model whose kernels' int8 weight rows and biases are set to zero (so
    their conv outputs are exactly zero), another mechanism than the check's masks."""
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    for layer, channels in kernels.items():
        conv = next(n for n in model.graph.node if n.name == ex.layers[layer].node)
        for name in conv.input[1:]:
            src = producer[name].input[0] if name in producer else name  # through Dequantize
            value = numpy_helper.to_array(inits[src]).copy()
            value[np.asarray(channels)] = 0
            inits[src].CopyFrom(numpy_helper.from_array(value, src))
    onnx.save(model, str(out))
    return out


@pytest.mark.parametrize("fmt", ["QDQ", "QOperator"])
def test_faithfulness_check_runs_on_quantised_models(tmp_path, fmt):
    """The check masks the float conv outputs of the QDQ graph (QOperator files are read as
    that graph): the unmasked score is onnxruntime's own, and for QDQ the masked score is
    the one of the model with those kernels' quantised weights zeroed."""
    pytest.importorskip("torch")
    from cfp_onnx.exporters.pytorch import export_torch

    from cfp_onnx.faithfulness import check, depth0_kernels
    from tests.zoo_helpers import TORCH_SHAPE, torch_model

    f = tmp_path / "f.onnx"
    export_torch(torch_model("resnet50_3d"), TORCH_SHAPE, f)
    q = _static(f, tmp_path / "q.onnx", TORCH_SHAPE, fmt)
    clip = np.random.default_rng(5).standard_normal(TORCH_SHAPE).astype(np.float32)
    ex = Explainer(q, clip_shape=TORCH_SHAPE)
    pyr = ex.explain(clip, theta=0.6)
    got = check(ex, clip, pyr, draws=3)
    assert got is not None and np.isfinite([got.pyramid_drop, *got.random_drops]).all()

    def score(path: Path) -> float:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        out = sess.run(None, {sess.get_inputs()[0].name: clip})[0]
        return float(out.reshape(-1)[pyr.label])

    assert got.score == pytest.approx(score(q), rel=1e-4, abs=1e-5)
    if fmt == "QDQ":
        zeroed = _zeroed_qdq(q, tmp_path / "z.onnx", ex, depth0_kernels(pyr))
        assert got.pyramid_drop == pytest.approx(got.score - score(zeroed), rel=1e-3, abs=1e-4)
