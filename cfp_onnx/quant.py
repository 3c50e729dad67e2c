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

The QOperator format (``QLinearConv``, ``QGemm``, ...) keeps activations as integers
between its fused ops; it is refused by name, with the way out.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from cfp_onnx.errors import UnsupportedOpError

QOPERATOR = frozenset(
    {"QLinearConv", "QLinearMatMul", "QLinearAdd", "QLinearMul", "QGemm", "ConvInteger",
     "MatMulInteger", "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearConcat",
     "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax", "QLinearReduceMean"}
)  # fmt: skip
"""Ops of the QOperator format (ai.onnx and com.microsoft)."""


def check_format(nodes: Sequence[Any]) -> None:
    """Raises UnsupportedOpError, naming the first QOperator op, for that format."""
    for n in nodes:
        if n.op_type in QOPERATOR:
            raise UnsupportedOpError(
                f"op {n.op_type} (node {n.name!r}) is QOperator-format quantisation, which keeps "
                "activations as integers inside fused ops; quantise in the QDQ format instead "
                "(onnxruntime.quantization: quant_format=QuantFormat.QDQ, its default), or "
                "explain the float model"
            )


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
