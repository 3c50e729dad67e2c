"""Count parameters and multiply-adds of a model, from its ONNX graph or torch module.

Convention: one multiply-add (MAC) per weight tap per output element, for Conv
(``C_in/group x prod(kernel)`` per output value), Gemm and MatMul; bias adds,
BatchNorm, activations, pools and element-wise ops are not counted. "GFLOPs" in
the video literature (and in the CFP paper's code) is mostly this MAC count, but
some papers double it; the README says which each figure is.

    python -m cfp_onnx.exporters.zoo.count model.onnx
    python -m cfp_onnx.exporters.zoo.count --zoo resnet50_3d --input-shape 1,3,16,224,224
    python -m cfp_onnx.exporters.zoo.count --all     # the README table
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference

COUNTED_OPS = ("Conv", "Gemm", "MatMul")


@dataclass(frozen=True, slots=True)
class Count:
    """Parameters (weights and biases of every initializer) and multiply-adds."""

    params: int
    macs: int

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9

    @property
    def mparams(self) -> float:
        return self.params / 1e6


def count_onnx(model: onnx.ModelProto | str | Path, batch: int = 1) -> Count:
    """Count a graph after fixing its dynamic batch axis to ``batch``."""
    proto = onnx.load(str(model)) if isinstance(model, str | Path) else model
    proto = _fix_batch(proto, batch)
    inferred = shape_inference.infer_shapes(proto, data_prop=True)
    shapes = _value_shapes(inferred)
    inits = {i.name: tuple(i.dims) for i in inferred.graph.initializer}
    macs = sum(_node_macs(node, shapes, inits) for node in inferred.graph.node)
    params = sum(int(np.prod(d)) for d in inits.values() if len(d) > 0)
    return Count(params=params, macs=macs)


def _fix_batch(proto: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    fixed = onnx.ModelProto()
    fixed.CopyFrom(proto)
    for value in (*fixed.graph.input, *fixed.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].dim_param:
            dims[0].dim_value = batch
    return fixed


def _value_shapes(proto: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    shapes = {}
    graph = proto.graph
    for value in (*graph.input, *graph.value_info, *graph.output):
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = tuple(d.dim_value for d in dims)
    for init in graph.initializer:
        shapes[init.name] = tuple(init.dims)
    for node in graph.node:
        if node.op_type == "Constant":
            shapes[node.output[0]] = tuple(numpy_helper.to_array(node.attribute[0].t).shape)
    return shapes


def _node_macs(
    node: onnx.NodeProto, shapes: dict[str, tuple[int, ...]], inits: dict[str, Any]
) -> int:
    if node.op_type not in COUNTED_OPS:
        return 0
    out = shapes.get(node.output[0])
    weight = shapes.get(node.input[1])
    if not out or not weight or 0 in out:
        raise ValueError(
            f"{node.op_type} {node.name!r}: unknown shapes (out {out}, weight {weight})"
        )
    if node.op_type == "Conv":
        return math.prod(out) * math.prod(weight[1:])  # weight is [C_out, C_in/g, k...]
    if node.op_type == "Gemm":
        a = shapes[node.input[0]]
        trans_a = any(at.name == "transA" and at.i for at in node.attribute)
        return math.prod(out) * (a[0] if trans_a else a[-1])
    a = shapes[node.input[0]]
    return math.prod(out) * a[-1]  # MatMul: every output sums over A's last axis


def count_torch(model: Any, input_shape: Sequence[int]) -> Count:
    """Count a torch module without computing anything: a forward on the ``meta``
    device records each conv's and linear's output shape."""
    import copy

    import torch
    from torch import nn

    meta = copy.deepcopy(model).to("meta").eval()
    macs = [0]

    def hook(module: nn.Module, _inputs: Any, out: torch.Tensor) -> None:
        if isinstance(module, nn.Conv3d | nn.Conv2d | nn.Conv1d):
            macs[0] += out.numel() * module.weight[0].numel()
        elif isinstance(module, nn.Linear):
            macs[0] += out.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in meta.modules()]
    with torch.no_grad():
        meta(torch.empty(tuple(input_shape), device="meta"))
    for h in handles:
        h.remove()
    params = sum(p.numel() for p in model.parameters())
    return Count(params=params, macs=macs[0])


def count_keras(model: Any) -> Count:
    """Count a built Keras model from its layers' static output shapes."""
    import keras

    macs = 0
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, keras.layers.Conv1D | keras.layers.Conv2D | keras.layers.Conv3D):
            per_out = math.prod(layer.kernel.shape[:-1])
            macs += math.prod(layer.output.shape[1:]) * per_out
        elif isinstance(layer, keras.layers.Dense):
            macs += math.prod(layer.output.shape[1:]) * layer.kernel.shape[0]
    return Count(params=int(model.count_params()), macs=macs)


FULL_SIZE = {
    "mfnet_3d": (1, 3, 16, 224, 224),
    "i3d": (1, 3, 16, 224, 224),
    "resnet50_3d": (1, 3, 16, 224, 224),
    "resnet101_3d": (1, 3, 16, 224, 224),
    "resnet152_3d": (1, 3, 16, 224, 224),
    "resnext101_3d": (1, 3, 16, 224, 224),
    "r2plus1d_18": (1, 3, 16, 224, 224),
    "x3d_m": (1, 3, 16, 224, 224),
    "csn_152": (1, 3, 16, 224, 224),
    "slowfast_r50": (1, 3, 32, 224, 224),
}
"""The input each torch zoo model is counted at for the README (SlowFast: 32 frames)."""


def _table() -> None:
    from cfp_onnx.exporters.zoo import keras_models, torch_models

    print("| model | framework | input | params (M) | GMACs | 2 x GMACs |")
    print("|---|---|---|---|---|---|")
    for name, shape in FULL_SIZE.items():
        model = torch_models.MODELS[name](in_frames=shape[2])
        c = count_torch(model, shape)
        print(
            f"| {name} | torch | {'x'.join(map(str, shape[2:]))} | {c.mparams:.2f} | {c.gmacs:.2f} | {2 * c.gmacs:.2f} |"
        )
    for name, factory in keras_models.MODELS.items():
        model = factory() if name != "c3d" else factory(size=112)
        c = count_keras(model)
        size = "16x112x112" if name == "c3d" else "16x224x224"
        print(f"| {name} | keras | {size} | {c.mparams:.2f} | {c.gmacs:.2f} | {2 * c.gmacs:.2f} |")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", type=Path, help="an ONNX file")
    parser.add_argument("--zoo", help="a torch zoo model name instead of a file")
    parser.add_argument("--input-shape", default="1,3,16,224,224")
    parser.add_argument("--all", action="store_true", help="print the README table")
    args = parser.parse_args(argv)
    if args.all:
        _table()
        return 0
    if args.zoo:
        from cfp_onnx.exporters.zoo import torch_models

        shape = tuple(int(d) for d in args.input_shape.split(","))
        c = count_torch(torch_models.MODELS[args.zoo](in_frames=shape[2]), shape)
    elif args.model:
        c = count_onnx(args.model)
    else:
        parser.error("give an ONNX file, --zoo NAME or --all")
    print(f"params {c.mparams:.3f} M, {c.gmacs:.3f} GMACs ({2 * c.gmacs:.3f} GFLOPs at 2 per MAC)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
