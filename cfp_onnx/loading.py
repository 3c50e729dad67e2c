"""Read an ONNX model safely and make its graph static and folded for analysis.

Two views of one model come out of here: the *runtime* proto (the user's graph,
external weights left on disk, nodes uniquely named) that gets instrumented and
run, and the *analysis* proto (dynamic dims fixed from the clip, shape subgraphs
folded to constants, shapes inferred) that the graph parser reads.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper
from onnx_graphsurgeon.logger import G_LOGGER

from cfp_onnx import quant
from cfp_onnx.errors import ClipError, ModelError
from cfp_onnx.graph import toposort
from cfp_onnx.ops import FUSED_CONV, MS
from cfp_onnx.options import as_path
from cfp_onnx.wire import MIN_BYTES, strip_weights

log = logging.getLogger(__name__)
# Folding is best effort (see _fold): onnx-graphsurgeon's own "[W] Inference failed" lines
# would be stderr lines beside ours (SPEC §7); what stays unresolved is named by parsing.
G_LOGGER.severity = G_LOGGER.CRITICAL

MAX_DIM = 1 << 20  # a declared dim beyond this is not a video model, it is an attack


@dataclass(frozen=True)
class ExternalTensor:
    """An initializer's bytes in a file: read one at a time, never all at once."""

    file: Path  # resolved
    offset: int
    dtype: np.dtype
    shape: tuple[int, ...]
    location: str  # as the model names it, relative to the model's folder

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def read(self) -> np.ndarray:
        count = int(np.prod(self.shape)) if self.shape else 1
        data = np.fromfile(self.file, dtype=self.dtype, count=count, offset=self.offset)
        return data.reshape(self.shape)

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of the first axis: a big conv's weights a slice at a time."""
        row = int(np.prod(self.shape[1:])) if len(self.shape) > 1 else 1
        stop = min(stop, self.shape[0])
        data = np.fromfile(
            self.file,
            dtype=self.dtype,
            count=(stop - start) * row,
            offset=self.offset + start * row * self.dtype.itemsize,
        )
        return data.reshape((stop - start, *self.shape[1:]))

    def map(self) -> np.ndarray:
        return np.memmap(
            self.file, dtype=self.dtype, mode="r", offset=self.offset, shape=self.shape
        )


@dataclass(frozen=True)
class LoadedModel:
    """A model read from disk, nodes named, weights left in their files.

    ``proto`` holds the graph; every large initializer in it is an external-data
    reference (to the model file itself for weights stored inline), so neither the
    analysis nor the instrumented run ever holds a second copy of the weights.
    """

    path: Path
    proto: onnx.ModelProto
    external: dict[str, ExternalTensor]  # initializer name -> where its bytes are

    @property
    def name(self) -> str:
        return self.path.name


def load_model(path: str | os.PathLike[str]) -> LoadedModel:
    """Read, check and name an ONNX model; weights stay on disk.

    Raises:
        ModelError: missing, unreadable or malformed file, or unsafe external data.
        OptionError: `path` is not a path at all.
    """
    p = as_path(path, "model must be a path to a .onnx file")
    if not p.is_file():
        raise ModelError(
            f"model {str(p)!r} does not exist or is not a file; pass a path to a .onnx model"
        )
    try:
        proto, own = strip_weights(p)
    except Exception as exc:
        raise ModelError(
            f"{p.name} is not a readable ONNX model ({type(exc).__name__}); export it with "
            "`cfp export` or torch.onnx.export / tf2onnx"
        ) from None
    if len(proto.graph.node) == 0:
        raise ModelError(f"{p.name} has an empty graph (no nodes); is it really an ONNX model?")
    _check_opset(proto, p.name)
    try:
        toposort(proto.graph)  # names a cycle or a dangling input; the checker only says "unsorted"
    except ModelError as exc:
        raise ModelError(f"{p.name}: {exc}") from None
    external = _inline_small(proto, _locate_external_data(proto, p, set(own)), set(own))
    try:
        onnx.checker.check_model(_checkable(proto))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{p.name} fails the ONNX checker: {first}") from None
    _check_dims(proto, p.name)
    name_nodes(proto)
    quant.to_qdq(proto, external)  # a QOperator model becomes the QDQ graph it computes
    return LoadedModel(p, proto, external)


def _check_opset(proto: onnx.ModelProto, name: str) -> None:
    """Refuse an opset newer than this onnx knows: onnxruntime would fail with a long trace."""
    known = onnx.defs.onnx_opset_version()
    for o in proto.opset_import:
        if o.domain in ("", "ai.onnx") and o.version > known:
            raise ModelError(
                f"{name} uses ai.onnx opset {o.version}; this onnx {onnx.__version__} knows opsets "
                f"up to {known}: re-export it with opset <= {known}, or upgrade onnx and onnxruntime"
            )


def _checkable(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy the checker can read without the weights: external initializers become graph
    inputs of the same type, and outputs of unknown shape (after a custom op) get one."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    for out in copy.graph.output:
        if out.type.HasField("tensor_type") and not out.type.tensor_type.HasField("shape"):
            out.type.tensor_type.shape.SetInParent()
    inline = []
    for t in copy.graph.initializer:
        if _is_external(t):
            copy.graph.input.append(
                onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
            )
        else:
            inline.append(t)
    del copy.graph.initializer[:]
    copy.graph.initializer.extend(inline)
    return copy


def _is_external(t: onnx.TensorProto) -> bool:
    return t.data_location == onnx.TensorProto.EXTERNAL


def _locate_external_data(
    proto: onnx.ModelProto, model: Path, own: set[str]
) -> dict[str, ExternalTensor]:
    """Where each external tensor's bytes are, refusing paths that leave the model's folder.

    `own` are the initializers stored inside the model file itself (see wire.strip_weights):
    they point at the file the user named, wherever a symlink to it leads.
    """
    out: dict[str, ExternalTensor] = {}
    root = model.parent.resolve()
    for t in proto.graph.initializer:
        if not _is_external(t):
            continue
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        target = model.resolve() if t.name in own else (root / loc).resolve()
        if t.name not in own and (not loc or os.path.isabs(loc) or root not in target.parents):
            raise ModelError(
                f"initializer {t.name!r} points to external data {loc!r} outside the model's "
                "folder; refusing to read it (keep weight files next to the model)"
            )
        if not target.is_file():
            raise ModelError(f"external data file {loc!r} of initializer {t.name!r} is missing")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
        shape = tuple(int(d) for d in t.dims)
        count = int(np.prod(shape)) if shape else 1
        offset = int(info.get("offset", 0))
        if offset + count * dtype.itemsize > target.stat().st_size:
            raise ModelError(f"external data file {loc!r} is too short for initializer {t.name!r}")
        out[t.name] = ExternalTensor(target, offset, dtype, shape, loc)
    return out


SMALL_CONSTANT_BYTES = 1 << 16
"""int32/int64 external tensors up to this size (and any up to wire.MIN_BYTES) are read
into the proto when the model is loaded: shape and axes constants (of a Reshape, Squeeze,
Slice, ...) saved with ``size_threshold=0`` must be seen by folding, shape inference and
onnxruntime's own checks, which cannot read external data. Weights stay on disk."""


def _small(ext: ExternalTensor) -> bool:
    if ext.nbytes <= MIN_BYTES:
        return True
    return ext.dtype in (np.dtype(np.int64), np.dtype(np.int32)) and (
        ext.nbytes <= SMALL_CONSTANT_BYTES
    )


def _inline_small(
    proto: onnx.ModelProto, external: dict[str, ExternalTensor], own: set[str]
) -> dict[str, ExternalTensor]:
    """Read external tensors of at most SMALL_CONSTANT_BYTES inline (already confined to
    the model's folder and checked for size); returns the ones left on disk. Tensors of
    the model file itself under wire.MIN_BYTES were never stripped; larger ones stay
    referenced in place."""
    for t in proto.graph.initializer:
        ext = external.get(t.name)
        if ext is not None and t.name not in own and _small(ext):
            t.CopyFrom(numpy_helper.from_array(ext.read(), t.name))
            del external[t.name]
    return external


def _check_dims(proto: onnx.ModelProto, name: str) -> None:
    for vi in list(proto.graph.input) + list(proto.graph.output):
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_value") and not 0 <= d.dim_value <= MAX_DIM:
                raise ModelError(
                    f"{name}: tensor {vi.name!r} declares dim {d.dim_value}, beyond any video model "
                    f"(limit {MAX_DIM})"
                )


def name_nodes(proto: onnx.ModelProto) -> None:
    """Give every node a unique name: empty or duplicated ones become ``<op>_<topo index>``."""
    counts = Counter(n.name for n in proto.graph.node)
    for i, n in enumerate(proto.graph.node):
        if not n.name or counts[n.name] > 1:
            n.name = f"{n.op_type}_{i}"
    # A generated name can collide with a user's; make the rare clash unique too.
    seen: set[str] = set()
    for i, n in enumerate(proto.graph.node):
        while n.name in seen:
            n.name = f"{n.op_type}_{i}_"
        seen.add(n.name)


def graph_input(proto: onnx.ModelProto) -> onnx.ValueInfoProto:
    """The one non-initializer graph input: the clip."""
    inits = {t.name for t in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in inits]
    if len(inputs) != 1:
        names = ", ".join(repr(i.name) for i in inputs) or "none"
        raise ModelError(f"the model must take exactly one input (the clip); it takes {names}")
    return inputs[0]


def declared_shape(vi: onnx.ValueInfoProto) -> tuple[int | str | None, ...]:
    """Declared dims: ints where fixed, the symbol (or None) where dynamic."""
    dims = vi.type.tensor_type.shape.dim
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in dims)


def static_input(loaded: LoadedModel) -> bool:
    """Whether every input dim but the batch is fixed: the clip cannot change the shape."""
    dims = declared_shape(graph_input(loaded.proto))[1:]
    return all(isinstance(d, int) and d > 0 for d in dims)


def resolve_input_shape(
    proto: onnx.ModelProto, clip_shape: tuple[int, ...] | None
) -> tuple[int, ...]:
    """Fix the input's dims: batch 1, others from the clip (or the declared ones).

    Raises:
        ClipError: the clip's shape does not fit the declared input.
        ModelError: dims are dynamic and there is no clip to fix them.
    """
    vi = graph_input(proto)
    declared = declared_shape(vi)
    if clip_shape is None:
        fixed = tuple(1 if i == 0 and not isinstance(d, int) else d for i, d in enumerate(declared))
        if not all(isinstance(d, int) and d > 0 for d in fixed):
            raise ModelError(
                f"input {vi.name!r} has dynamic dims {_fmt(declared)}; give a clip to fix them"
            )
        return tuple(int(d) for d in fixed)  # type: ignore[arg-type]
    if len(clip_shape) == len(declared) - 1:
        clip_shape = (1, *clip_shape)
    ok = len(clip_shape) == len(declared) and clip_shape[0] == 1
    ok = ok and all(not isinstance(d, int) or d in (0, c) for d, c in zip(declared, clip_shape))
    if not ok:
        raise ClipError(
            f"clip has shape {tuple(clip_shape)}; model input {vi.name!r} expects {_fmt(declared)} "
            "with batch 1 (check frame count, size and layout)"
        )
    return tuple(int(c) for c in clip_shape)


def _fmt(dims: tuple[int | str | None, ...]) -> str:
    return "(" + ", ".join(str(d) if d is not None else "?" for d in dims) + ")"


def analysis_proto(loaded: LoadedModel, input_shape: tuple[int, ...]) -> onnx.ModelProto:
    """A static, folded, shape-inferred copy of the model for the graph parser."""
    proto = onnx.ModelProto()
    proto.CopyFrom(loaded.proto)
    inline = _foldable_inputs(proto, loaded.external)
    for t in proto.graph.initializer:
        if t.name in inline:
            t.CopyFrom(numpy_helper.from_array(loaded.external[t.name].read(), t.name))
    vi = graph_input(proto)
    shape = vi.type.tensor_type.shape
    for d, v in zip(shape.dim, input_shape):
        d.Clear()
        d.dim_value = v
    del proto.graph.value_info[:]
    for out in proto.graph.output:
        out.type.tensor_type.ClearField("shape")
    proto = _infer(proto)
    proto = _fold(proto)
    return _infer(proto)


FOLD_INT_BYTES = 1 << 20
"""Integer initializers up to this size are read for the analysis: shape and index data
that folding may evaluate once a shape upstream becomes known (torch.export's as_strided)."""


def _foldable_inputs(proto: onnx.ModelProto, external: dict[str, ExternalTensor]) -> set[str]:
    """External tensors read by a node whose inputs are all constants: folding evaluates
    those (a transposed weight in a TF graph, say), so they must be inline. Weights read by
    convs and dense layers next to activations are not folded and stay on disk."""
    consts = {t.name for t in proto.graph.initializer}
    indices = {  # integer tensors are shapes and indices, read by folding wherever they sit
        name for name, e in external.items() if e.dtype.kind in "iub" and e.nbytes <= FOLD_INT_BYTES
    }
    return indices | {
        i
        for n in proto.graph.node
        if all(not x or x in consts for x in n.input)
        for i in n.input
        if i in external
    }


def _infer(proto: onnx.ModelProto) -> onnx.ModelProto:
    try:
        if not any(n.op_type in FUSED_CONV and n.domain == MS for n in proto.graph.node):
            return onnx.shape_inference.infer_shapes(proto, strict_mode=False, data_prop=True)
        return _infer_fused(proto)
    except Exception as exc:
        log.debug("shape inference failed: %s", exc)
        return proto


def _infer_fused(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Shapes of a graph holding onnxruntime's FusedConv, which onnx's inference does not
    know: inferred on a copy where each is the plain Conv it is (same output shape: its
    activation and sum input change values only), then given to the original."""
    plain = onnx.ModelProto()
    plain.CopyFrom(proto)
    for n in plain.graph.node:
        if n.op_type in FUSED_CONV and n.domain == MS:
            n.op_type, n.domain = "Conv", ""
            del n.input[3:]
            keep = [a for a in n.attribute if not a.name.startswith("activation")]
            del n.attribute[:]
            n.attribute.extend(keep)
    inferred = onnx.shape_inference.infer_shapes(plain, strict_mode=False, data_prop=True)
    del proto.graph.value_info[:]
    proto.graph.value_info.extend(inferred.graph.value_info)
    return proto


def _fold(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Fold shape subgraphs (Shape, Gather, Concat, ConstantOfShape ...) into constants."""
    try:
        graph = gs.import_onnx(_shape_ranges_sliced(proto))
        graph.fold_constants(fold_shapes=True, error_ok=True)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        folded = gs.export_onnx(graph, do_type_check=False)
    except Exception as exc:  # folding is best effort; parsing reports what stays unresolved
        log.debug("constant folding failed: %s", exc)
        return proto
    folded.ir_version = proto.ir_version
    del folded.opset_import[:]
    folded.opset_import.extend(proto.opset_import)
    return folded


def _shape_ranges_sliced(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``Shape(x, start, end)`` (opset 15) as ``Slice(Shape(x), start, end)``.

    graphsurgeon 0.6's shape folding ignores Shape's start/end and folds the whole shape
    in: torch.export graphs read ``x.size(0)`` that way, and the wrong constant broke
    their Range, Reshape and as_strided index subgraphs. Slice has the same clamping
    rules, and graphsurgeon folds Shape -> Slice correctly.
    """
    if not any(n.op_type == "Shape" and n.attribute for n in proto.graph.node):
        return proto
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    nodes = []
    for i, n in enumerate(out.graph.node):
        attrs = {a.name: a.i for a in n.attribute}
        if n.op_type != "Shape" or n.domain not in ("", "ai.onnx") or not attrs:
            nodes.append(n)
            continue
        stem = f"cfp_shape_range_{i}"
        full = onnx.helper.make_node("Shape", [n.input[0]], [f"{stem}/shape"], name=f"{stem}/Shape")
        bounds = [(attrs.get("start", 0), "starts"), (attrs.get("end", 2**62), "ends")]
        for value, what in bounds:
            out.graph.initializer.append(
                numpy_helper.from_array(np.asarray([value], np.int64), f"{stem}/{what}")
            )
        cut = onnx.helper.make_node(
            "Slice", [f"{stem}/shape", f"{stem}/starts", f"{stem}/ends"], list(n.output),
            name=n.name or f"{stem}/Slice",
        )  # fmt: skip
        nodes += [full, cut]
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out
