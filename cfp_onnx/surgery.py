"""Graph surgery: expose what the back-step needs as extra outputs of one run.

Pooled taps are computed in-graph (Cast to double, ReduceMean over time and space)
so a full feature map only leaves the runtime when tubes need it. A pass returns a
new model; the caller's is never mutated. External weights stay external.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs


@dataclass(frozen=True)
class Tap:
    """Expose `tensor` as output `name`: whole, or averaged over `pool_axes` in float64."""

    tensor: str
    name: str
    pool_axes: tuple[int, ...] | None = None


def pooled_name(tensor: str) -> str:
    return f"cfp_pooled::{tensor}"


def full_name(tensor: str) -> str:
    return f"cfp_full::{tensor}"


def instrument(proto: onnx.ModelProto, taps: Sequence[Tap]) -> onnx.ModelProto:
    """Add `taps` as graph outputs; the original outputs stay first and unchanged."""
    graph = gs.import_onnx(proto)
    tensors = graph.tensors()
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 13)
    present = {o.name for o in graph.outputs}
    for tap in taps:
        if tap.name in present:
            continue
        src = tensors[tap.tensor]
        if tap.pool_axes is None:
            out = src if tap.name == tap.tensor else _identity(graph, src, tap.name)
        else:
            out = _pool(graph, src, tap, opset)
        graph.outputs.append(out)
        present.add(tap.name)
    model = gs.export_onnx(graph, do_type_check=False)
    model.ir_version = proto.ir_version
    del model.opset_import[:]
    model.opset_import.extend(proto.opset_import)
    model.metadata_props.extend(proto.metadata_props)
    return model


def _identity(graph: gs.Graph, src: gs.Variable, name: str) -> gs.Variable:
    out = gs.Variable(name, dtype=src.dtype)
    graph.nodes.append(gs.Node("Identity", name=f"{name}/Identity", inputs=[src], outputs=[out]))
    return out


def _pool(graph: gs.Graph, src: gs.Variable, tap: Tap, opset: int) -> gs.Variable:
    axes = list(tap.pool_axes or ())
    as_double = gs.Variable(tap.name if not axes else f"{tap.name}/double", dtype=np.float64)
    graph.nodes.append(
        gs.Node(
            "Cast",
            name=f"{tap.name}/Cast",
            attrs={"to": onnx.TensorProto.DOUBLE},
            inputs=[src],
            outputs=[as_double],
        )
    )
    if not axes:  # nothing to average (a head reading [batch, features]): the cast is it
        return as_double
    out = gs.Variable(tap.name, dtype=np.float64)
    if opset >= 18:
        const = gs.Constant(f"{tap.name}/axes", np.asarray(axes, dtype=np.int64))
        node = gs.Node(
            "ReduceMean", name=f"{tap.name}/ReduceMean", attrs={"keepdims": 0},
            inputs=[as_double, const], outputs=[out],
        )  # fmt: skip
    else:
        node = gs.Node(
            "ReduceMean", name=f"{tap.name}/ReduceMean", attrs={"keepdims": 0, "axes": axes},
            inputs=[as_double], outputs=[out],
        )  # fmt: skip
    graph.nodes.append(node)
    return out
