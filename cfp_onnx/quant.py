"""Quantised graphs read as the float graph they encode (SPEC §2-3).

A QDQ model (``QuantizeLinear`` / ``DequantizeLinear`` around weights and activations,
onnxruntime's default format and TensorRT's) is the float model with each weight stored
as integers and each activation rounded on a grid. Its pyramid is the float model's
pyramid computed from the dequantised weights and activations:

- a ``DequantizeLinear`` of a constant is a constant, ``(x - zero_point) * scale`` in
  float64, per tensor or per channel along ``axis``; it is computed when read (weights
  left on disk stay there until a back-step needs them);
- a ``QuantizeLinear`` -> ``DequantizeLinear`` pair on an activation changes values, not
  channels: both pass provenance through (ops.UNARY), and the run taps the dequantised
  float tensors the convs read.

The QOperator format (``QLinearConv``, ``QGemm``, ``QLinearGlobalAveragePool``, ...) fuses
each float op with the (de)quantisation around it. ``to_qdq`` rewrites such a model, when
it is loaded, into the QDQ graph it computes (``DequantizeLinear`` -> the float op ->
``QuantizeLinear``, node names kept), which the rest of cfp reads as above; the run uses
the rewritten graph too, so its taps are the dequantised activations. Ops with no such
rewrite here (``ConvInteger``, ``MatMulInteger``, channels-last pools) are refused by name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from cfp_onnx.errors import UnsupportedOpError

QOPERATOR = frozenset(
    {"QLinearConv", "QLinearMatMul", "QLinearAdd", "QLinearMul", "QGemm", "ConvInteger",
     "MatMulInteger", "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearConcat",
     "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax", "QLinearReduceMean"}
)  # fmt: skip
"""Ops of the QOperator format (ai.onnx and com.microsoft)."""


def check_format(nodes: Sequence[Any]) -> None:
    """Raises UnsupportedOpError, naming the first QOperator op ``to_qdq`` left."""
    for n in nodes:
        if n.op_type in QOPERATOR:
            raise UnsupportedOpError(
                f"op {n.op_type} (node {n.name!r}) is QOperator-format quantisation that cfp "
                "cannot rewrite as QDQ; quantise in the QDQ format instead "
                "(onnxruntime.quantization: quant_format=QuantFormat.QDQ, its default), or "
                "explain the float model"
            )


# ----------------------------------------------------------------- QOperator -> QDQ

_UNARY_Q = {"QLinearSigmoid": "Sigmoid", "QLinearLeakyRelu": "LeakyRelu"}
_BINARY_Q = {"QLinearAdd": "Add", "QLinearMul": "Mul"}


def to_qdq(model: onnx.ModelProto, external: Mapping[str, Any] | None = None) -> bool:
    """Rewrite QOperator nodes of `model` in place as DequantizeLinear -> float op ->
    QuantizeLinear; returns whether anything changed. Node names are kept, so a
    ``QLinearConv`` named ``conv3_quant`` becomes the layer ``conv3_quant``. `external`
    reads initializers whose bytes stay on disk (loading.ExternalTensor): a bias's scale
    is computed from the input's and the weight's."""
    g = model.graph
    if not any(n.op_type in QOPERATOR for n in g.node):
        return False
    consts = _Constants(g, dict(external or {}))
    out: list[onnx.NodeProto] = []
    for n in g.node:
        rewrite = _REWRITES.get(n.op_type)
        out.extend(rewrite(n, consts) if rewrite is not None else [n])
    del g.node[:]
    g.node.extend(out)
    if not any(o.domain in ("", "ai.onnx") and o.version >= 13 for o in model.opset_import):
        raise UnsupportedOpError(
            "a QOperator model below opset 13 (no per-channel DequantizeLinear)"
        )
    return True


def _dq(
    x: str, scale: str, zp: str, out: str, name: str, axis: int | None = None
) -> onnx.NodeProto:
    inputs = [x, scale] + ([zp] if zp else [])
    extra: dict[str, Any] = {} if axis is None else {"axis": axis}
    return helper.make_node("DequantizeLinear", inputs, [out], name=name, **extra)


def _q(x: str, scale: str, zp: str, out: str, name: str) -> onnx.NodeProto:
    return helper.make_node("QuantizeLinear", [x, scale] + ([zp] if zp else []), [out], name=name)


def _attrs(n: onnx.NodeProto, drop: Sequence[str] = ()) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in n.attribute if a.name not in drop}


def _inp(n: onnx.NodeProto, i: int) -> str:
    return n.input[i] if len(n.input) > i else ""


class _Constants:
    """The graph's initializers being rewritten: read (inline or on disk) and added to."""

    def __init__(self, graph: onnx.GraphProto, external: Mapping[str, Any]) -> None:
        self.graph, self.external = graph, external
        self.tensors = {t.name: t for t in graph.initializer}

    def read(self, name: str, node: onnx.NodeProto) -> np.ndarray:
        if name in self.external:
            return np.asarray(self.external[name].read(), dtype=np.float64)
        t = self.tensors.get(name)
        if t is None or t.data_location == onnx.TensorProto.EXTERNAL:
            raise UnsupportedOpError(
                f"op {node.op_type} (node {node.name!r}): its scale {name!r} is not a stored "
                "constant, so its bias cannot be dequantised"
            )
        return np.asarray(numpy_helper.to_array(t), dtype=np.float64)

    def add(self, value: np.ndarray, name: str) -> str:
        self.graph.initializer.append(numpy_helper.from_array(value, name))
        self.tensors[name] = self.graph.initializer[-1]
        return name

    def rank(self, name: str) -> int:
        t = self.tensors.get(name)
        return len(t.dims) if t is not None else 0

    def size(self, name: str) -> int:
        t = self.tensors.get(name)
        return int(np.prod(t.dims)) if t is not None else 0


def _bias(
    n: onnx.NodeProto, b: str, x_scale: str, w_scale: str, consts: _Constants
) -> tuple[list[onnx.NodeProto], str]:
    """An int32 bias quantised at x_scale * w_scale (per output channel)."""
    if not b:
        return [], ""
    scale = consts.read(x_scale, n) * consts.read(w_scale, n)
    name = consts.add(scale.astype(np.float32).reshape(-1), f"{n.name}__cfp_bias_scale")
    out = f"{n.name}__cfp_bias"
    return [_dq(b, name, "", out, f"{n.name}__cfp_dq_bias", axis=0)], out


def _conv(n: onnx.NodeProto, consts: _Constants) -> list[onnx.NodeProto]:
    x, xs, xz, w, ws, wz, ys, yz = (_inp(n, i) for i in range(8))
    pre = [_dq(x, xs, xz, f"{n.name}__cfp_x", f"{n.name}__cfp_dq_x"),
           _dq(w, ws, wz, f"{n.name}__cfp_w", f"{n.name}__cfp_dq_w", axis=0)]  # fmt: skip
    bias, b = _bias(n, _inp(n, 8), xs, ws, consts)
    ins = [f"{n.name}__cfp_x", f"{n.name}__cfp_w"] + ([b] if b else [])
    conv = helper.make_node("Conv", ins, [f"{n.name}__cfp_y"], name=n.name, **_attrs(n))
    return [*pre, *bias, conv, _q(f"{n.name}__cfp_y", ys, yz, n.output[0], f"{n.name}__cfp_q")]


def _gemm(n: onnx.NodeProto, consts: _Constants) -> list[onnx.NodeProto]:
    a, as_, az, b, bs, bz, c, ys, yz = (_inp(n, i) for i in range(9))
    attrs = _attrs(n)
    if float(attrs.get("alpha", 1.0)) != 1.0 or attrs.get("transA", 0):
        raise UnsupportedOpError(f"op QGemm (node {n.name!r}) with alpha != 1 or transA")
    axis = 0 if attrs.get("transB", 0) else 1  # per output column of B
    pre = [_dq(a, as_, az, f"{n.name}__cfp_a", f"{n.name}__cfp_dq_a"),
           _dq(b, bs, bz, f"{n.name}__cfp_b", f"{n.name}__cfp_dq_b", axis=axis)]  # fmt: skip
    bias, cf = _bias(n, c, as_, bs, consts)
    ins = [f"{n.name}__cfp_a", f"{n.name}__cfp_b"] + ([cf] if cf else [])
    keep = {k: v for k, v in attrs.items() if k in ("transB",)}
    y = f"{n.name}__cfp_y" if ys else n.output[0]
    nodes = [*pre, *bias, helper.make_node("Gemm", ins, [y], name=n.name, **keep)]
    return nodes + ([_q(y, ys, yz, n.output[0], f"{n.name}__cfp_q")] if ys else [])


def _matmul(n: onnx.NodeProto, consts: _Constants) -> list[onnx.NodeProto]:
    a, as_, az, b, bs, bz, ys, yz = (_inp(n, i) for i in range(8))
    per_column = consts.rank(bs) == 1 and consts.size(bs) > 1
    pre = [_dq(a, as_, az, f"{n.name}__cfp_a", f"{n.name}__cfp_dq_a"),
           _dq(b, bs, bz, f"{n.name}__cfp_b", f"{n.name}__cfp_dq_b",
               axis=-1 if per_column else None)]  # fmt: skip
    mm = helper.make_node("MatMul", [f"{n.name}__cfp_a", f"{n.name}__cfp_b"],
                          [f"{n.name}__cfp_y"], name=n.name)  # fmt: skip
    return [*pre, mm, _q(f"{n.name}__cfp_y", ys, yz, n.output[0], f"{n.name}__cfp_q")]


def _pointwise(op: str, operands: int, drop: Sequence[str] = ()) -> Callable[..., list[Any]]:
    """QLinear ops laid out as (x, scale, zp) per operand, then the output's (scale, zp)."""

    def rewrite(n: onnx.NodeProto, consts: _Constants) -> list[onnx.NodeProto]:
        attrs = _attrs(n, drop)
        if attrs.pop("channels_last", 0):
            raise UnsupportedOpError(f"op {n.op_type} (node {n.name!r}) with channels_last=1")
        pre, ins = [], []
        for k in range(operands):
            x, s, z = (_inp(n, 3 * k + i) for i in range(3))
            pre.append(_dq(x, s, z, f"{n.name}__cfp_in{k}", f"{n.name}__cfp_dq{k}"))
            ins.append(f"{n.name}__cfp_in{k}")
        ys, yz = _inp(n, 3 * operands), _inp(n, 3 * operands + 1)
        body = helper.make_node(op, ins, [f"{n.name}__cfp_y"], name=n.name, **attrs)
        return [*pre, body, _q(f"{n.name}__cfp_y", ys, yz, n.output[0], f"{n.name}__cfp_q")]

    return rewrite


def _concat(n: onnx.NodeProto, consts: _Constants) -> list[onnx.NodeProto]:
    ys, yz = _inp(n, 0), _inp(n, 1)
    pre, ins = [], []
    for k in range((len(n.input) - 2) // 3):
        x, s, z = (_inp(n, 2 + 3 * k + i) for i in range(3))
        pre.append(_dq(x, s, z, f"{n.name}__cfp_in{k}", f"{n.name}__cfp_dq{k}"))
        ins.append(f"{n.name}__cfp_in{k}")
    body = helper.make_node("Concat", ins, [f"{n.name}__cfp_y"], name=n.name, **_attrs(n))
    return [*pre, body, _q(f"{n.name}__cfp_y", ys, yz, n.output[0], f"{n.name}__cfp_q")]


_REWRITES: dict[str, Callable[..., list[onnx.NodeProto]]] = {
    "QLinearConv": _conv,
    "QGemm": _gemm,
    "QLinearMatMul": _matmul,
    "QLinearGlobalAveragePool": _pointwise("GlobalAveragePool", 1),
    "QLinearAveragePool": _pointwise("AveragePool", 1),
    "QLinearConcat": _concat,
    **{q: _pointwise(op, 2) for q, op in _BINARY_Q.items()},
    **{q: _pointwise(op, 1) for q, op in _UNARY_Q.items()},
}


def dequantised_constants(
    nodes: Sequence[Any], is_const: Callable[[str], bool], read: Callable[[str], np.ndarray],
    shape_of: Callable[[str], tuple[int, ...]],
) -> tuple[list[Any], dict[str, tuple[Callable[[], np.ndarray], tuple[int, ...]]]]:  # fmt: skip
    """The nodes without each ``DequantizeLinear`` of constants, and for each of their
    outputs a reader of its float64 value (computed when called) with its shape."""
    kept: list[Any] = []
    derived: dict[str, tuple[Callable[[], np.ndarray], tuple[int, ...]]] = {}
    for n in nodes:
        if n.op_type == "DequantizeLinear" and n.domain in ("", "ai.onnx", "com.microsoft"):
            operands = [i for i in n.inputs if i]
            if all(is_const(i) or i in derived for i in operands):
                value = _reader(n, read, derived)
                derived[n.outputs[0]] = (value, shape_of(n.inputs[0]))
                continue
        kept.append(n)
    return kept, derived


def _reader(
    node: Any, read: Callable[[str], np.ndarray], derived: Mapping[str, Any]
) -> Callable[[], np.ndarray]:
    def get(name: str) -> np.ndarray:
        return derived[name][0]() if name in derived else np.asarray(read(name))

    attrs = node.attrs
    if int(attrs.get("block_size", 0) or 0) > 0:
        raise UnsupportedOpError(
            f"DequantizeLinear (node {node.name!r}) uses blocked quantisation (block_size); "
            "re-quantise per tensor or per channel"
        )
    names = [*node.inputs, "", ""]
    x_name, scale_name, zp_name = names[0], names[1], names[2]
    axis = int(attrs.get("axis", 1))

    def value() -> np.ndarray:
        x = get(x_name).astype(np.float64)
        scale = get(scale_name).astype(np.float64)
        zp = get(zp_name).astype(np.float64) if zp_name else np.zeros_like(scale)
        if scale.ndim == 1 and x.ndim > 1 and scale.size > 1:  # per channel along axis
            shape = [1] * x.ndim
            shape[axis % x.ndim] = scale.size
            scale, zp = scale.reshape(shape), zp.reshape(shape)
        return (x - zp) * scale

    return value
