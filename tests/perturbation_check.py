"""A framework-free oracle for provenance: cut the ONNX graph at every conv output, perturb
one output channel at a time through onnxruntime, and see which channels downstream move.

It reports every real dependency, including the influence of a gate's own convs that
SPEC §2 excludes (a squeeze-excitation or attention gate): for gated models the analyzer's
sets must be subsets of these, for gate-free models equal. Works on any exported model,
Keras ones included.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort

from cfp_onnx.api import Explainer
from cfp_onnx.loading import name_nodes

Kernel = tuple[str, int]


def perturbation_truth(
    ex: Explainer, clip: np.ndarray, *, trials: int = 2, seed: int = 0
) -> tuple[dict[str, list[set[Kernel]]], list[set[Kernel]]]:
    """(layer -> per input channel, the kernels it carries), (per head feature, same)."""
    proto = onnx.load(str(ex.loaded.path))  # weights inline: this oracle runs from bytes
    name_nodes(proto)
    layers = ex.layers
    watch = [lay.input for lay in layers] + [ex.head.input]
    watch = list(dict.fromkeys(watch))
    cuts = [lay.output for lay in layers]
    base = _Runner(proto, watch + cuts)(clip, {})
    run = _Runner(_cut(proto, cuts, base), watch)
    feed = {c: base[c] for c in cuts}
    ref = run(clip, feed)
    rng = np.random.default_rng(seed)
    prov = {t: [set() for _ in range(_channels(ex, t))] for t in watch}
    for lay in layers:
        for i in range(lay.c_out):
            for _ in range(trials):
                delta = np.zeros_like(base[lay.output])
                delta[:, i] = rng.standard_normal(delta[:, i].shape) * 5
                moved = run(clip, {**feed, lay.output: base[lay.output] + delta})
                for t in watch:
                    axis = ex.head.feature_axis if t == ex.head.input else 1
                    diff = np.abs(moved[t] - ref[t]) > 1e-6 * (1 + np.abs(ref[t]))
                    hit = np.any(np.moveaxis(diff, axis, 0).reshape(diff.shape[axis], -1), axis=1)
                    for c in np.flatnonzero(hit).tolist():
                        prov[t][c].add((lay.node, i))
    by_layer = {lay.node: prov[lay.input] for lay in layers}
    return by_layer, prov[ex.head.input]


def _channels(ex: Explainer, tensor: str) -> int:
    shape = ex.graph.shape(tensor)
    return shape[ex.head.feature_axis] if tensor == ex.head.input else shape[1]


def _cut(proto: onnx.ModelProto, cuts: list[str], values: dict[str, np.ndarray]) -> onnx.ModelProto:
    """Conv outputs become graph inputs; the convs write to dead tensors instead."""
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    for node in m.graph.node:
        for k, o in enumerate(node.output):
            if o in cuts:
                node.output[k] = o + "__cut"
    for c in cuts:
        m.graph.input.append(
            onnx.helper.make_tensor_value_info(c, onnx.TensorProto.FLOAT, values[c].shape)
        )
    return m


class _Runner:
    """One session with extra outputs; runs with any subset of inputs fed."""

    def __init__(self, proto: onnx.ModelProto, outputs: list[str]) -> None:
        m = onnx.ModelProto()
        m.CopyFrom(proto)
        have = {o.name for o in m.graph.output}
        m.graph.output.extend(onnx.ValueInfoProto(name=t) for t in outputs if t not in have)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.log_severity_level = 3
        self.sess = ort.InferenceSession(m.SerializeToString(), opts)
        self.outputs = outputs
        self.names = [i.name for i in self.sess.get_inputs()]

    def __call__(self, clip: np.ndarray, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        inputs = {self.names[0]: clip, **feed}
        out = self.sess.run(self.outputs, {k: inputs[k] for k in self.names})
        return dict(zip(self.outputs, out))
