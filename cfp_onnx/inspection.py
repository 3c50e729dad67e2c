"""What cfp sees in a model: input, classes, layers, merges, classifier, unsupported ops."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from cfp_onnx.api import Explainer
from cfp_onnx.embed import EmbedInfo
from cfp_onnx.errors import UnsupportedOpError
from cfp_onnx.loading import LoadedModel, declared_shape, graph_input, load_model
from cfp_onnx.modelinfo import class_names, guess_layout
from cfp_onnx.ops import ELEMENTWISE
from cfp_onnx.provenance import ChannelMap, Unresolved


@dataclass(frozen=True)
class LayerInfo:
    name: str
    c_in: int
    c_out: int
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    groups: int
    input_from: tuple[str, ...]  # producing layers of its input channels


@dataclass(frozen=True)
class ModelReport:
    model: str
    input_name: str
    input_shape: tuple[int | str | None, ...]
    layout: str
    classes: int
    class_names: tuple[str, ...] | None
    classifier: tuple[str, ...]
    head_input: str
    layers: tuple[LayerInfo, ...]
    merges: tuple[tuple[str, str, int], ...]  # (op, node, number of conv-carrying inputs)
    unsupported: tuple[str, ...] = field(default=())
    embedded: EmbedInfo | None = None  # what `cfp embed` added, if it made this file

    def lines(self) -> list[str]:
        out = [
            f"model: {self.model}",
            f"input: {self.input_name} {self.input_shape} layout {self.layout}",
            f"classes: {self.classes}"
            + (
                f" ({', '.join(self.class_names[:5])}{', ...' if self.classes > 5 else ''})"
                if self.class_names
                else ""
            ),
            f"classifier: {' <- '.join(self.classifier)} (features from {self.head_input!r})",
            f"layers: {len(self.layers)}",
        ]
        for lay in self.layers:
            out.append(
                f"  {lay.name}: {lay.c_in}->{lay.c_out} kernel {'x'.join(map(str, lay.kernel))} "
                f"stride {'x'.join(map(str, lay.stride))} groups {lay.groups}"
                + (f" <- {', '.join(lay.input_from)}" if lay.input_from else " <- input")
            )
        residual = [m for m in self.merges if m[0] != "Concat"]
        concat = [m for m in self.merges if m[0] == "Concat"]
        out.append(f"residual/element-wise merges: {len(residual)}; branch concats: {len(concat)}")
        for op, node, n in self.merges:
            out.append(f"  {op} {node}: joins {n} conv paths")
        if self.embedded is not None:
            out += self.embedded.lines()
        if self.unsupported:
            out.append("unsupported ops on the pyramid's paths:")
            out += [f"  {u}" for u in self.unsupported]
        else:
            out.append("unsupported ops: none")
        return out


def inspect_model(
    model: str | os.PathLike[str] | LoadedModel, *, output: str | None = None
) -> ModelReport:
    """Analyse a model at batch 1 without running it."""
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    embedded = EmbedInfo.of(loaded.proto)
    ex = Explainer(loaded, output=output)
    vi = graph_input(loaded.proto)
    shape = declared_shape(vi)
    names = [lay.node for lay in ex.layers]
    unsupported: list[str] = []
    layers = []
    for i, lay in enumerate(ex.layers):
        try:
            csr = ex.input_csr(i)
            src = tuple(names[j] for j in csr.layers_reached(ex.provenance.offsets).tolist())
        except UnsupportedOpError as exc:
            unsupported.append(str(exc))
            src = ()
        layers.append(
            LayerInfo(lay.node, lay.c_in, lay.c_out, lay.kernel_shape, lay.strides, lay.group, src)
        )
    try:
        ex.head_csr  # noqa: B018  (raises if the classifier's input is untraceable)
    except UnsupportedOpError as exc:
        unsupported.append(str(exc))
    return ModelReport(
        model=loaded.name,
        input_name=vi.name,
        input_shape=shape,
        layout=guess_layout(shape),
        classes=ex.classes,
        class_names=class_names(loaded),
        classifier=ex.head.nodes,
        head_input=ex.head.input,
        layers=tuple(layers),
        merges=tuple(_merges(ex)),
        unsupported=tuple(dict.fromkeys(unsupported)),
        embedded=embedded,
    )


def _merges(ex: Explainer) -> list[tuple[str, str, int]]:
    found = []
    for node in ex.graph.nodes:
        if node.op_type not in ELEMENTWISE | {"Concat"}:
            continue
        carrying = 0
        for t in node.inputs:
            m = ex.provenance.maps.get(t)
            if isinstance(m, ChannelMap) and any(m.rows):
                carrying += 1
            elif isinstance(m, Unresolved):
                carrying += 0
        if carrying >= 2 and not _same_source(ex, node.inputs):
            found.append((node.op_type, node.name, carrying))
    return found


def _same_source(ex: Explainer, inputs: tuple[str, ...]) -> bool:
    """x * sigmoid(x) and friends are not merges of paths."""
    maps = [ex.provenance.maps.get(t) for t in inputs]
    rows = [frozenset().union(*m.rows) for m in maps if isinstance(m, ChannelMap)]
    return len(rows) >= 2 and all(np.array_equal(sorted(r), sorted(rows[0])) for r in rows)
