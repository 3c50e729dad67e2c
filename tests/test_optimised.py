"""Graphs saved by onnxruntime at any optimisation level give the float graph's pyramid:
basic (folded BatchNorm and the like), extended (com.microsoft FusedConv: the activation
in an attribute, a residual Add as its sum input Z) and all."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from cfp_onnx.api import Explainer
from cfp_onnx.pyramid import Pyramid

LEVELS = {
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def saved_at(src: Path, level: str) -> Path:
    dst = src.with_name(f"{src.stem}_{level}.onnx")
    so = ort.SessionOptions()
    so.graph_optimization_level = LEVELS[level]
    so.optimized_model_filepath = str(dst)
    so.log_severity_level = 4
    ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    return dst


def _by_name(p: Pyramid) -> tuple[dict[str, tuple[int, float]], dict[tuple[str, str], float]]:
    """Nodes (depth, relevance) and links (relevance) keyed by kernel name: node ids follow
    the layers' topological order, which an optimised file may list differently."""
    name = [p.kernel_name(i) for i in range(len(p.node_layer))]
    nodes = {name[i]: (int(d), float(r)) for i, (d, r) in enumerate(zip(p.node_depth,
             p.node_relevance))}  # fmt: skip
    links = {(name[s], name[t]): float(r)
             for s, t, r in zip(p.link_source, p.link_target, p.link_relevance)}  # fmt: skip
    return nodes, links


def assert_same_pyramid(a: Pyramid, b: Pyramid) -> None:
    """Same kernels, depths and links; relevances as close as fused float32 kernels allow."""
    (na, la), (nb, lb) = _by_name(a), _by_name(b)
    assert a.label == b.label and na.keys() == nb.keys() and la.keys() == lb.keys()
    assert all(na[k][0] == nb[k][0] for k in na)
    for x, y in [([v[1] for v in na.values()], [nb[k][1] for k in na]),
                 (list(la.values()), [lb[k] for k in la])]:  # fmt: skip
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["resnet50_3d", "i3d", "mfnet_3d"])
def test_zoo_models_saved_at_every_level_keep_their_pyramid(tmp_path, name):
    pytest.importorskip("torch")
    from cfp_onnx.exporters.pytorch import export_torch

    from tests.zoo_helpers import TORCH_SHAPE, torch_model

    src = tmp_path / f"{name}.onnx"
    export_torch(torch_model(name), TORCH_SHAPE, src)
    clip = np.random.default_rng(4).standard_normal(TORCH_SHAPE).astype(np.float32)
    ref = Explainer(src, clip_shape=TORCH_SHAPE).explain(clip, theta=0.6)
    assert len(ref.link_target) > 100
    for level in LEVELS:
        path = saved_at(src, level)
        ops = {n.op_type for n in onnx.load(str(path)).graph.node}
        if level != "basic":
            assert "FusedConv" in ops, ops
        got = Explainer(path, clip_shape=TORCH_SHAPE).explain(clip, theta=0.6, label=ref.label)
        assert_same_pyramid(ref, got)


def _residual(path: Path, fused: bool) -> Path:
    """x -> conv0 -> relu = r; conv1(r) + r -> relu -> GAP -> Gemm; with `fused`, conv1, the
    Add and the Relu are one FusedConv(r, W, B, Z=r), as onnxruntime writes it."""
    rng = np.random.default_rng(0)
    w0, w1 = rng.standard_normal((4, 3, 3, 3, 3)), rng.standard_normal((4, 4, 1, 1, 1))
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for a, n in [
        (w0, "w0"), (np.zeros(4), "b0"), (w1, "w1"), (rng.standard_normal(4), "b1"),
        (rng.standard_normal((4, 3)), "fc")]]  # fmt: skip
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], name="conv0", pads=[1] * 6),
             helper.make_node("Relu", ["c0"], ["r"], name="relu0")]  # fmt: skip
    if fused:
        nodes.append(helper.make_node("FusedConv", ["r", "w1", "b1", "r"], ["y"], name="conv1",
                                      domain="com.microsoft", activation="Relu"))  # fmt: skip
    else:
        nodes += [helper.make_node("Conv", ["r", "w1", "b1"], ["c1"], name="conv1"),
                  helper.make_node("Add", ["c1", "r"], ["s"], name="add"),
                  helper.make_node("Relu", ["s"], ["y"], name="relu1")]  # fmt: skip
    nodes += [helper.make_node("GlobalAveragePool", ["y"], ["g"], name="gap"),
              helper.make_node("Flatten", ["g"], ["f"], name="flat"),
              helper.make_node("Gemm", ["f", "fc"], ["logits"], name="fc")]  # fmt: skip
    graph = helper.make_graph(
        nodes, "residual", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3])], inits,
    )  # fmt: skip
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid("com.microsoft", 1)] * fused)
    onnx.save(helper.make_model(graph, opset_imports=opsets), str(path))
    return path


def test_fused_conv_sum_input_carries_the_skip_channels(tmp_path):
    """Z is the Add it absorbed: the pyramid below conv1 reaches conv0 through the skip
    as well as through conv1's weights, exactly as in the unfused graph."""
    clip = np.random.default_rng(1).standard_normal((1, 3, 4, 8, 8)).astype(np.float32)
    plain = _residual(tmp_path / "plain.onnx", fused=False)
    fused = _residual(tmp_path / "fused.onnx", fused=True)
    a = Explainer(plain, clip_shape=clip.shape).explain(clip, theta=0.0)
    b = Explainer(fused, clip_shape=clip.shape).explain(clip, theta=0.0)
    # the skip puts conv0's kernels in the head's features beside conv1's: both at depth 0
    assert {a.layers[i] for i in a.node_layer[a.node_depth == 0]} == {"conv0", "conv1"}
    assert_same_pyramid(a, b)
    np.testing.assert_allclose(a.logits, b.logits, rtol=1e-5)
