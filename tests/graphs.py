"""A tiny builder for hand-made ONNX graphs, for rules no exporter produces on demand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class G:
    """Accumulates nodes and seeded random weights; `save` writes a checked model."""

    def __init__(self, shape: tuple[int, ...] = (1, 3, 4, 8, 8), seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.shape = shape
        self.n = 0

    def name(self, op: str) -> str:
        self.n += 1
        return f"{op.lower()}{self.n}"

    def const(self, value: np.ndarray, dtype: type = np.float32) -> str:
        name = self.name("c")
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op: str, *inputs: str, n_out: int = 1, domain: str = "", **attrs) -> str:
        name = self.name(op)
        outs = [f"{name}_out{i}" if n_out > 1 else f"{name}_out" for i in range(n_out)]
        self.nodes.append(
            helper.make_node(op, list(inputs), outs, name=name, domain=domain, **attrs)
        )
        return outs[0] if n_out == 1 else outs  # type: ignore[return-value]

    def conv(self, x: str, cin: int, cout: int, k: int = 3, group: int = 1, rank: int = 3) -> str:
        w = self.const(self.rng.standard_normal((cout, cin // group, *(k,) * rank)) * 0.5)
        b = self.const(self.rng.standard_normal(cout) * 0.1)
        return self.op("Conv", x, w, b, pads=[k // 2] * (2 * rank), group=group)

    def relu(self, x: str) -> str:
        return self.op("Relu", x)

    def gemm(self, x: str, f: int, classes: int) -> str:
        w = self.const(self.rng.standard_normal((classes, f)))
        b = self.const(self.rng.standard_normal(classes) * 0.1)
        return self.op("Gemm", x, w, b, transB=1)

    def pool_flatten(self, x: str) -> str:
        return self.op("Flatten", self.op("GlobalAveragePool", x))

    def save(self, path: Path, outputs: list[str], opset: int = 18) -> Path:
        graph = helper.make_graph(
            self.nodes,
            "g",
            [helper.make_tensor_value_info("video", TensorProto.FLOAT, list(self.shape))],
            [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
            self.inits,
        )
        domains = sorted({n.domain for n in self.nodes if n.domain})
        opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
        model = helper.make_model(graph, opset_imports=opsets)
        model.ir_version = 9
        inferred = onnx.shape_inference.infer_shapes(model)
        del model.graph.output[:]
        model.graph.output.extend(inferred.graph.output)
        onnx.save(model, str(path))
        return path
