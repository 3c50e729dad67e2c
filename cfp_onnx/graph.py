"""A small read-only model of an ONNX graph: nodes, shapes, constants, layers, head.

Built once from the analysis proto (static, folded); everything downstream reads it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from types import MappingProxyType
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from cfp_onnx import quant
from cfp_onnx.errors import ModelError, UnsupportedOpError
from cfp_onnx.ops import CONV, DENSE, HEAD_TRANSPARENT, POST_LOGITS, SOFTMAX


@dataclass(frozen=True, slots=True)
class Node:
    index: int
    name: str
    op_type: str
    domain: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: Mapping[str, Any]


@dataclass(frozen=True)
class Graph:
    """Nodes in topological order, with producer/consumer indexes built once."""

    nodes: tuple[Node, ...]
    shapes: Mapping[str, tuple[int, ...]]
    constants: Constants
    input_name: str
    output_names: tuple[str, ...]
    opset: int
    producer: Mapping[str, int] = field(init=False)
    consumers: Mapping[str, tuple[int, ...]] = field(init=False)

    def __post_init__(self) -> None:
        prod: dict[str, int] = {}
        cons: dict[str, list[int]] = {}
        for n in self.nodes:
            for o in n.outputs:
                prod[o] = n.index
            for i in n.inputs:
                cons.setdefault(i, []).append(n.index)
        object.__setattr__(self, "producer", MappingProxyType(prod))
        object.__setattr__(
            self, "consumers", MappingProxyType({k: tuple(v) for k, v in cons.items()})
        )

    def producer_of(self, tensor: str) -> Node | None:
        i = self.producer.get(tensor)
        return None if i is None else self.nodes[i]

    def is_const(self, tensor: str) -> bool:
        return tensor in self.constants

    def const(self, tensor: str) -> np.ndarray:
        return self.constants[tensor]

    def shape(self, tensor: str) -> tuple[int, ...]:
        if tensor not in self.shapes:
            node = self._unshaped_source(tensor)
            if node is None:
                raise ModelError(f"the shape of tensor {tensor!r} could not be inferred")
            attention = self.attention_above(tensor)
            if attention is not None:
                raise UnsupportedOpError(attention_message(attention))
            op = f"{node.domain}.{node.op_type}" if node.domain else node.op_type
            why = (
                "a custom or unknown op cannot lie on the pyramid's path (cfp inspect lists "
                "the ops)"
                if node.domain not in ("", "ai.onnx")
                else "its shape depends on values only the run computes"
            )
            raise UnsupportedOpError(
                f"the shape of tensor {tensor!r} could not be inferred: op {op} (node "
                f"{node.name!r}) gives its output no shape; {why}"
            )
        return self.shapes[tensor]

    def attention_above(self, tensor: str) -> Node | None:
        """A MatMul of two activations (attention) among the nodes `tensor` comes from."""
        stack, seen = [tensor], set()
        while stack:
            t = stack.pop()
            node = self.producer_of(t)
            if node is None or node.index in seen:
                continue
            seen.add(node.index)
            live = [i for i in node.inputs if i and not self.is_const(i)]
            if node.op_type == "MatMul" and len(live) == 2:
                return node
            stack += live
        return None

    def _unshaped_source(self, tensor: str) -> Node | None:
        """The node where shapes stop: its inputs have shapes, its output has none."""
        found, stack, seen = None, [tensor], set()
        while stack:
            node = self.producer_of(stack.pop())
            if node is None or node.index in seen:
                continue
            seen.add(node.index)
            missing = [i for i in node.inputs if i and i not in self.shapes]
            if not missing and (found is None or node.index < found.index):
                found = node
            stack.extend(missing)
        return found


class Constants(Mapping[str, np.ndarray]):
    """Constant values by name; weights left on disk are read when asked, never kept, and
    dequantised weights (cfp_onnx.quant) are computed when asked."""

    def __init__(
        self,
        inline: dict[str, np.ndarray],
        external: Mapping[str, Any],
        derived: Mapping[str, tuple[Callable[[], np.ndarray], tuple[int, ...]]] | None = None,
    ) -> None:
        self.inline = inline
        self.external = external
        self.derived = dict(derived or {})

    def __getitem__(self, name: str) -> np.ndarray:
        if name in self.inline:
            return self.inline[name]
        if name in self.derived:
            return self.derived[name][0]()
        return self.external[name].read()  # type: ignore[no-any-return]

    def __contains__(self, name: object) -> bool:
        return name in self.inline or name in self.external or name in self.derived

    def shape_of(self, name: str) -> tuple[int, ...]:
        """A constant's shape, from its declaration when it is on disk (nothing is read)."""
        if name in self.inline:
            return tuple(int(d) for d in self.inline[name].shape)
        if name in self.derived:
            return self.derived[name][1]
        return tuple(int(d) for d in self.external[name].shape)

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of a constant's first axis, reading no more from disk."""
        if name in self.inline:
            return self.inline[name][start:stop]
        if name in self.derived:
            return self[name][start:stop]
        return self.external[name].read_rows(start, stop)  # type: ignore[no-any-return]

    def __iter__(self) -> Iterator[str]:
        yield from self.inline
        yield from (k for k in self.derived if k not in self.inline)
        yield from (k for k in self.external if k not in self.inline and k not in self.derived)

    def __len__(self) -> int:
        return len(set(self.inline) | set(self.external) | set(self.derived))


def parse(proto: onnx.ModelProto, external: Mapping[str, Any] | None = None) -> Graph:
    """Build the Graph of a static, folded proto (see loading.analysis_proto).

    `external` maps initializers whose bytes stay on disk to readers (loading.ExternalTensor).
    """
    g = proto.graph
    ext = {
        t.name: external[t.name]
        for t in g.initializer
        if t.data_location == onnx.TensorProto.EXTERNAL and external and t.name in external
    }
    inline: dict[str, np.ndarray] = {
        t.name: numpy_helper.to_array(t) for t in g.initializer if t.name not in ext
    }
    nodes: list[Node] = []
    for n in toposort(g):
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
            inline[n.output[0]] = _constant_value(n)
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        nodes.append(
            Node(len(nodes), n.name, n.op_type, n.domain, tuple(n.input), tuple(n.output), attrs)
        )
    shapes: dict[str, tuple[int, ...]] = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        dims = vi.type.tensor_type.shape.dim
        if vi.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            shapes[vi.name] = tuple(int(d.dim_value) for d in dims)
    for k, v in inline.items():
        shapes[k] = tuple(v.shape)
    for k, e in ext.items():
        shapes[k] = tuple(e.shape)
    quant.check_format(nodes)
    plain = Constants(inline, ext)
    kept, derived = quant.dequantised_constants(
        nodes, plain.__contains__, plain.__getitem__, plain.shape_of
    )
    if len(kept) != len(nodes):  # indexes follow the node list
        nodes = [replace(n, index=i) for i, n in enumerate(kept)]
    shapes.update({k: shape for k, (_, shape) in derived.items()})
    constants = Constants(inline, ext, derived)
    inits = {t.name for t in g.initializer}
    inputs = [i.name for i in g.input if i.name not in inits]
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    return Graph(tuple(nodes), shapes, constants, inputs[0], tuple(o.name for o in g.output), opset)


def _constant_value(n: onnx.NodeProto) -> np.ndarray:
    a = n.attribute[0]
    if a.name == "value":
        return numpy_helper.to_array(a.t)
    return np.asarray(onnx.helper.get_attribute_value(a))


def toposort(g: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Kahn's order, stable w.r.t. the file.

    Raises:
        ModelError: a tensor read but never produced, or a cycle (both named).
    """
    known = {i.name for i in g.input} | {t.name for t in g.initializer} | {""}
    produced_by: dict[str, int] = {}
    for i, n in enumerate(g.node):
        for o in n.output:
            produced_by[o] = i
    deps = [
        {produced_by[x] for x in n.input if x not in known and x in produced_by} for n in g.node
    ]
    users: dict[int, list[int]] = {}
    for i, d in enumerate(deps):
        for j in d:
            users.setdefault(j, []).append(i)
    missing = [x for n in g.node for x in n.input if x not in known and x not in produced_by]
    if missing:
        raise ModelError(f"tensor {missing[0]!r} is read by a node but nothing produces it")
    pending = [len(d) for d in deps]
    ready = [i for i, p in enumerate(pending) if p == 0]
    order: list[int] = []
    import heapq

    heapq.heapify(ready)
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users.get(i, ()):
            pending[u] -= 1
            if pending[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(g.node):
        stuck = next(g.node[i].name for i, p in enumerate(pending) if p > 0)
        raise ModelError(
            f"the graph has a cycle (through node {stuck!r}); ONNX graphs must be acyclic"
        )
    return [g.node[i] for i in order]


# --------------------------------------------------------------------------- head


@dataclass(frozen=True)
class Head:
    """The classifier: its weight as ``W[classes, F]`` and where its features come from."""

    node: str  # the classifier node (the last dense or logits conv)
    nodes: tuple[str, ...]  # every dense node folded into W (fc6..fc8), head first
    weight: np.ndarray  # float64 [classes, F]
    input: str  # tensor holding the features
    feature_axis: int  # axis of `input` along which features run
    logits: str  # tensor holding the logits (before any softmax)


def attention_message(node: Node) -> str:
    return (
        f"the model holds attention (MatMul {node.name!r} of two activations): class feature "
        "pyramids follow conv kernels through channel provenance, and attention mixes "
        "positions by weights computed from the clip; transformers (MViT, Swin, ...) are not "
        "supported"
    )


def find_head(graph: Graph, output: str | None = None) -> Head:
    """Walk back from the logits output to the classifier and the dense layers below it.

    Raises:
        ModelError: no output, several candidate outputs, or no classifier on the way.
    """
    outputs = _logit_outputs(graph, output)
    name = outputs[0]
    logits, node = _walk_to_classifier(graph, name)
    if node is None:
        raise ModelError(
            f"no classifier found behind output {name!r}: expected Gemm, MatMul with a constant "
            "weight, or a 1x1x1 logits Conv"
        )
    weight, feat_in, axis = _dense_weight(graph, node)
    chain = [node.name]
    tensor = feat_in
    while True:
        below = _dense_below(graph, tensor)
        if below is None:
            break
        w2, feat_in2, axis2 = _dense_weight(graph, below)
        if w2.shape[0] != weight.shape[1]:
            break
        weight, tensor, axis = weight @ w2, feat_in2, axis2
        chain.append(below.name)
    return Head(node.name, tuple(chain), weight, tensor, axis, logits)


def _logit_outputs(graph: Graph, output: str | None) -> list[str]:
    if output is not None:
        if output not in graph.output_names:
            raise ModelError(
                f"--output {output!r} is not a graph output; outputs: {', '.join(graph.output_names)}"
            )
        return [output]
    candidates = [o for o in graph.output_names if _walk_to_classifier(graph, o)[1] is not None]
    if not candidates:
        outs = ", ".join(graph.output_names)
        raise ModelError(
            f"no classifier found behind outputs {outs}: expected Gemm, MatMul with a constant "
            "weight, or a 1x1x1 logits Conv feeding the logits"
        )
    if len(candidates) > 1:
        raise ModelError(
            f"outputs {', '.join(candidates)} could each be the logits; choose one with --output NAME"
        )
    return candidates


def _walk_to_classifier(graph: Graph, tensor: str) -> tuple[str, Node | None]:
    """Follow post-logit ops back to the classifier; return (logits tensor, classifier)."""
    logits = tensor
    while True:
        node = graph.producer_of(tensor)
        if node is None:
            return logits, None
        if node.op_type in SOFTMAX:
            logits = node.inputs[0]
        if _is_dense(graph, node) or _is_logits_conv(graph, node):
            return logits, node
        if node.op_type not in POST_LOGITS and not _identity_gather(graph, node):
            return logits, None
        feats = [i for i in node.inputs if i and not graph.is_const(i)]
        if len(feats) != 1:
            return logits, None
        tensor = feats[0]


def _identity_gather(graph: Graph, node: Node) -> bool:
    """A Gather that takes every element along its axis, in order: torch.export writes a
    ``view`` after a permute as ``as_strided``, a Gather whose folded indices are
    ``arange(n)``, between the classifier and the logits. It moves nothing."""
    if node.op_type != "Gather" or len(node.inputs) < 2 or not graph.is_const(node.inputs[1]):
        return False
    if graph.is_const(node.inputs[0]) or node.inputs[0] not in graph.shapes:
        return False
    shape = graph.shape(node.inputs[0])
    axis = int(node.attrs.get("axis", 0)) % max(1, len(shape))
    idx = np.asarray(graph.const(node.inputs[1])).reshape(-1)
    return len(shape) > 0 and np.array_equal(idx, np.arange(shape[axis]))


def _is_dense(graph: Graph, node: Node) -> bool:
    if node.op_type not in DENSE or len(node.inputs) < 2:
        return False
    if node.op_type == "Gemm":
        return graph.is_const(node.inputs[1]) and not node.attrs.get("transA", 0)
    return graph.is_const(node.inputs[1]) and len(graph.shape(node.inputs[1])) == 2


def _is_logits_conv(graph: Graph, node: Node) -> bool:
    if node.op_type not in CONV or not graph.is_const(node.inputs[1]):
        return False
    shape = graph.shape(node.inputs[1])
    return all(k == 1 for k in shape[2:]) and int(node.attrs.get("group", 1)) == 1


def _dense_weight(graph: Graph, node: Node) -> tuple[np.ndarray, str, int]:
    """(W[out, in] in float64, the feature tensor, its feature axis)."""
    w = graph.const(node.inputs[1]).astype(np.float64)
    if node.op_type in CONV:
        return w.reshape(w.shape[0], w.shape[1]), node.inputs[0], 1
    if node.op_type == "Gemm":
        w = w if node.attrs.get("transB", 0) else w.T
        return w, node.inputs[0], 1
    rank = len(graph.shape(node.inputs[0])) if node.inputs[0] in graph.shapes else 2
    return w.T, node.inputs[0], rank - 1


def _dense_below(graph: Graph, tensor: str) -> Node | None:
    """The dense layer feeding `tensor` through ReLUs, dropouts, biases and reshapes (C3D's fc6, fc7)."""
    while True:
        node = graph.producer_of(tensor)
        if node is None:
            return None
        if _is_dense(graph, node):
            return node
        if node.op_type not in HEAD_TRANSPARENT:
            return None
        feats = [i for i in node.inputs if i and not graph.is_const(i)]
        if len(feats) != 1:
            return None
        tensor = feats[0]


# --------------------------------------------------------------------------- layers


TAP_CHUNK = 1 << 20  # weight elements read at once when averaging a conv's taps


@dataclass(frozen=True)
class Layer:
    """A conv whose kernels can appear in a pyramid."""

    index: int  # position among layers (topological)
    node: str
    input: str  # the activation it reads, looking through Pad
    output: str
    weight_shape: tuple[int, ...]  # as stored: [C_out, C_in/g, *taps]
    group: int
    kernel_shape: tuple[int, ...]
    strides: tuple[int, ...]
    load: Callable[[], np.ndarray] = field(repr=False, compare=False)
    load_rows: Callable[[int, int], np.ndarray] = field(repr=False, compare=False)

    @property
    def weight(self) -> np.ndarray:
        """The stored weight, read from its file on each call (weights are not kept)."""
        return self.load()

    def tap_means(self) -> np.ndarray:
        """``k[j, m]``: kernel j's weight for input m averaged over its taps (SPEC §3).

        Several taps: averaged in float64. One tap (1x1x1): the stored weight itself, kept
        in its own dtype (exact, half the memory); the back-step widens it per use.
        """
        c_out, per_group, *taps = self.weight_shape
        if int(np.prod(taps)) == 1:
            return self.weight.reshape(c_out, per_group)
        out = np.empty((c_out, per_group))
        step = max(1, TAP_CHUNK // (per_group * int(np.prod(taps))))
        for start in range(0, c_out, step):  # a slice of the weights in memory at a time
            w = self.load_rows(start, start + step)
            out[start : start + len(w)] = w.reshape(len(w), per_group, -1).mean(
                axis=2, dtype=np.float64
            )
        return out

    @property
    def c_out(self) -> int:
        return int(self.weight_shape[0])

    @property
    def c_in(self) -> int:
        return int(self.weight_shape[1]) * self.group


def find_layers(graph: Graph, head: Head) -> tuple[Layer, ...]:
    """Every Conv except the classifier, in topological order.

    Raises:
        ModelError: no conv, or a conv whose weight is not a constant.
    """
    layers: list[Layer] = []
    for n in graph.nodes:
        if n.op_type not in CONV or n.name in head.nodes:
            continue
        if not graph.is_const(n.inputs[1]):
            raise ModelError(f"conv {n.name!r} has a non-constant weight; cfp needs stored weights")
        shape = graph.constants.shape_of(n.inputs[1])
        # Weights on disk are not read here (a ResNet's are 100s of MB): a NaN in them makes
        # the run's outputs NaN, and Explainer.run then names the initializer.
        if n.inputs[1] in graph.constants.inline and not np.all(
            np.isfinite(graph.const(n.inputs[1]))
        ):
            raise ModelError(
                f"initializer {n.inputs[1]!r} of conv {n.name!r} holds NaN or Inf values"
            )
        layers.append(
            Layer(
                len(layers),
                n.name,
                _through_pad(graph, n.inputs[0]),
                n.outputs[0],
                shape,
                int(n.attrs.get("group", 1)),
                shape[2:],
                tuple(int(s) for s in n.attrs.get("strides", [1] * (len(shape) - 2))),
                partial(graph.const, n.inputs[1]),
                partial(graph.constants.rows, n.inputs[1]),
            )
        )
    if not layers:
        raise ModelError("the model has no Conv layer below its classifier; cfp explains conv nets")
    if not np.all(np.isfinite(head.weight)):
        raise ModelError(f"the classifier {head.node!r} has NaN or Inf weights")
    return tuple(layers)


def _through_pad(graph: Graph, tensor: str) -> str:
    node = graph.producer_of(tensor)
    if node is not None and node.op_type == "Pad" and not _pads_channels(graph, node):
        return node.inputs[0]
    return tensor


def _pads_channels(graph: Graph, node: Node) -> bool:
    pads = node.attrs.get("pads")
    if pads is None and len(node.inputs) > 1 and graph.is_const(node.inputs[1]):
        pads = graph.const(node.inputs[1]).tolist()
    if pads is None:
        return True
    rank = len(pads) // 2
    return bool(pads[1] or pads[1 + rank]) if rank > 1 else True
