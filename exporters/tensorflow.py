"""Keras model (object, ``.keras``/``.h5`` file) or TF SavedModel -> verified ONNX.

We trace a ``tf.function`` and convert it with ``tf2onnx.convert.from_function``
(``from_keras`` breaks on Keras 3). Two things are done while tracing, by
temporarily replacing each Keras conv layer's ``convolution_op``:

- every conv runs under a name scope ``cfpconv.<layer name>.end`` so that the
  ONNX Conv it becomes can be renamed after its Keras layer (tf2onnx otherwise
  names a conv after the BatchNorm it folded into it);
- a grouped conv (``groups > 1``, which tf2onnx cannot convert: Keras runs it as
  an XLA call) is traced as one dense conv with a block-diagonal kernel — the
  same function — and the ONNX graph is then rewritten back into one Conv with
  ``group = g``, so the analyzer sees one grouped layer.

The ONNX input keeps the Keras layout (NDHWC for channels-last models); the
layout is recorded in the metadata and the analyzer follows the Transposes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import onnx
import tensorflow as tf
from cfp_onnx.exporters.verify import (
    VerifyResult,
    atomic_output,
    check_video_shape,
    compare,
    save_model,
    seeded_clip,
)
from onnx import numpy_helper

from cfp_onnx.errors import ModelError
from cfp_onnx.metadata import write_metadata

log = logging.getLogger(__name__)

CONV_LAYERS = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)
SCOPE_PATTERN = re.compile(r"cfpconv\.(.+?)\.end")


@dataclass(frozen=True, slots=True)
class _Grouped:
    """What the regrouping pass needs to know about one grouped Keras conv."""

    groups: int
    in_channels: int
    out_channels: int


def export_keras(
    source: keras.Model | str | Path,
    path: str | Path,
    *,
    input_shape: Sequence[int] | None = None,
    opset: int = 17,
    input_name: str = "video",
    output_name: str = "logits",
    metadata: Mapping[str, Any] | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> VerifyResult:
    """Export a Keras model, ``.keras``/``.h5`` file or SavedModel folder to ``path``.

    ``input_shape`` (batch included) is needed only when the model's own input has
    unknown time or space dims; the ONNX batch axis stays dynamic either way.

    Raises:
        ModelError: the model cannot be loaded, its input is not 5-D video, it has
            several inputs or outputs, conversion fails, or ONNX differs from TF.
        OutputError: ``path`` exists without ``overwrite``.
    """
    if opset < 17:
        raise ModelError(f"opset {opset} is too old; cfp_onnx needs opset >= 17")
    model = load_model(source)
    shape = check_video_shape(_input_shape(model, input_shape), "model input")
    layout = _layout(model)
    clip = seeded_clip(shape, seed)
    expected = framework_logits(model, clip)
    proto = _convert(model, shape, opset, input_name, output_name)
    frames, size = (shape[1], shape[2:4]) if layout == "NDHWC" else (shape[2], shape[3:])
    meta = {"layout": layout, "frames": frames, "size": size, **(metadata or {})}
    write_metadata(proto, exporter="tf2onnx", **meta)
    with atomic_output(path, overwrite=overwrite) as tmp:
        save_model(proto, tmp)
        result = compare(
            tmp, clip, expected, display_path=str(path), exporter="tf", seed=seed, layout=layout
        )
    log.info("%s", result.summary())
    return result


def load_model(source: keras.Model | tf.Module | str | Path) -> Any:
    """A Keras model as is; a ``.keras``/``.h5`` file via Keras; a folder as a SavedModel.

    Raises:
        ModelError: the file is missing or unreadable.
    """
    if not isinstance(source, str | Path):
        return source
    where = Path(source)
    if not where.exists():
        raise ModelError(f"{where} does not exist (expected a .keras file or SavedModel folder)")
    try:
        if where.is_dir():
            return tf.saved_model.load(str(where))
        return keras.models.load_model(str(where), compile=False)
    except Exception as exc:
        raise ModelError(f"cannot load {where}: {type(exc).__name__}: {_first_line(exc)}") from None


def framework_logits(model: Any, clip: np.ndarray) -> np.ndarray:
    """TF's output for ``clip`` (inference mode); refuse anything but one tensor."""
    try:
        out = _call(model, tf.constant(clip))
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(
            f"model fails on a clip of shape {list(clip.shape)}: {type(exc).__name__}: "
            f"{_first_line(exc)}"
        ) from None
    if isinstance(out, Mapping) and len(out) == 1:
        out = next(iter(out.values()))
    if not tf.is_tensor(out) and not isinstance(out, np.ndarray):
        raise ModelError(
            f"model returns a {type(out).__name__}; cfp_onnx needs one logits tensor "
            "(N, classes): build a model whose only output is the logits"
        )
    return np.asarray(out, dtype=np.float64)


def _call(model: Any, clip: tf.Tensor) -> Any:
    if isinstance(model, keras.Model):
        return model(clip, training=False)
    return _signature(model)(clip)


def _signature(saved: Any) -> Any:
    """The SavedModel's serving function, called with one positional tensor."""
    signatures = getattr(saved, "signatures", {})
    if "serving_default" not in signatures:
        raise ModelError("SavedModel has no 'serving_default' signature")
    fn = signatures["serving_default"]
    keys = list(fn.structured_input_signature[1].keys())
    if len(keys) != 1:
        raise ModelError(
            f"SavedModel's serving signature takes {len(keys)} named inputs {keys}; "
            "cfp_onnx needs one video input"
        )
    key = keys[0]

    def call(clip: tf.Tensor) -> Any:
        out = fn(**{key: clip})
        if isinstance(out, Mapping) and len(out) == 1:
            return next(iter(out.values()))
        return out

    call.input_spec = fn.structured_input_signature[1][key]  # type: ignore[attr-defined]
    return call


def _input_shape(model: Any, override: Sequence[int] | None) -> Sequence[int | None]:
    """The shape to export for: ``override`` if given, else the model's, batch 1.

    Raises:
        ModelError: the model has several inputs.
    """
    if override is not None:
        return tuple(override)
    if isinstance(model, keras.Model):
        if len(model.inputs) != 1:
            raise ModelError(
                f"model has {len(model.inputs)} inputs; cfp_onnx needs one video input"
            )
        dims = tuple(model.inputs[0].shape)
    else:
        dims = tuple(_signature(model).input_spec.shape)
    return (1, *dims[1:]) if dims else dims


def _layout(model: Any) -> str:
    """NCDHW when the model's convs are channels_first, else NDHWC (Keras' default)."""
    if isinstance(model, keras.Model):
        convs = [layer for layer in _all_layers(model) if isinstance(layer, CONV_LAYERS)]
        if convs and all(c.data_format == "channels_first" for c in convs):
            return "NCDHW"
    return "NDHWC"


def _all_layers(model: keras.Model) -> list[Any]:
    return list(model._flatten_layers(include_self=False, recursive=True))


def _convert(
    model: Any, shape: tuple[int, ...], opset: int, input_name: str, output_name: str
) -> onnx.ModelProto:
    """Trace and convert; then rename convs and restore grouped convs."""
    import tf2onnx

    spec = (tf.TensorSpec((None, *shape[1:]), tf.float32, name=input_name),)
    call = _call

    @tf.function(input_signature=spec)
    def forward(video: tf.Tensor) -> dict[str, tf.Tensor]:
        return {output_name: call(model, video)}

    grouped: dict[str, _Grouped] = {}
    with _traceable_convs(model, grouped):
        try:
            proto, _ = tf2onnx.convert.from_function(forward, input_signature=spec, opset=opset)
        except Exception as exc:
            raise ModelError(f"tf2onnx failed: {type(exc).__name__}: {_first_line(exc)}") from None
    _refuse_unconverted(proto)
    return regroup_convs(rename_convs(proto), grouped)


@contextlib.contextmanager
def _traceable_convs(model: Any, grouped: dict[str, _Grouped]) -> Iterator[None]:
    """Patch every Keras conv for the trace (see module doc); always restore them."""
    layers = _all_layers(model) if isinstance(model, keras.Model) else []
    convs = [layer for layer in layers if isinstance(layer, CONV_LAYERS)]
    for layer in convs:
        if layer.groups > 1:
            kernel_shape = tuple(layer.kernel.shape)
            grouped[layer.name] = _Grouped(
                layer.groups, kernel_shape[-2] * layer.groups, kernel_shape[-1]
            )
        layer.convolution_op = _scoped_conv(layer)
    try:
        yield
    finally:
        for layer in convs:
            del layer.convolution_op


def _scoped_conv(layer: Any) -> Any:
    def convolution_op(inputs: tf.Tensor, kernel: tf.Tensor) -> tf.Tensor:
        with tf.name_scope(f"cfpconv.{layer.name}.end"):
            if layer.groups > 1:
                kernel = _block_diagonal(kernel, layer.groups)
            return keras.ops.conv(
                inputs,
                kernel,
                strides=layer.strides,
                padding=layer.padding,
                data_format=layer.data_format,
                dilation_rate=layer.dilation_rate,
            )

    return convolution_op


def _block_diagonal(kernel: tf.Tensor, groups: int) -> tf.Tensor:
    """Keras grouped kernel ``[..., C_in/g, C_out]`` -> dense ``[..., C_in, C_out]``.

    Output block ``q`` reads only input block ``q``: a dense conv with this kernel
    computes exactly the grouped conv.
    """
    per_group = kernel.shape[-2]
    taps = [[0, 0]] * (len(kernel.shape) - 2)
    blocks = tf.split(kernel, groups, axis=-1)
    padded = [
        tf.pad(block, [*taps, [q * per_group, (groups - 1 - q) * per_group], [0, 0]])
        for q, block in enumerate(blocks)
    ]
    return tf.concat(padded, axis=-1)


def _refuse_unconverted(proto: onnx.ModelProto) -> None:
    """tf2onnx leaves ops it cannot convert in the graph: name them."""
    unknown = sorted(
        {n.op_type for n in proto.graph.node if not onnx.defs.has(n.op_type, n.domain or "")}
    )
    if unknown:
        raise ModelError(
            f"tf2onnx could not convert TF op(s) {', '.join(unknown)} (a grouped conv in a "
            "SavedModel is one: export from the .keras model instead)"
        )


def rename_convs(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Name each Conv after its Keras layer (found from the trace's name scope)."""
    taken = {n.name for n in proto.graph.node}
    for node in proto.graph.node:
        if node.op_type != "Conv" or len(node.input) < 2:
            continue
        match = SCOPE_PATTERN.search(node.input[1])
        if match and match.group(1) not in taken:
            taken.discard(node.name)
            node.name = match.group(1)
            taken.add(node.name)
    return proto


def regroup_convs(proto: onnx.ModelProto, grouped: Mapping[str, _Grouped]) -> onnx.ModelProto:
    """Turn each block-diagonal Conv traced for a grouped layer into one grouped Conv.

    Raises:
        ModelError: a grouped layer's Conv is missing or its kernel is not block-diagonal.
    """
    weights = {init.name: init for init in proto.graph.initializer}
    done = set()
    for node in proto.graph.node:
        match = SCOPE_PATTERN.search(node.input[1]) if node.op_type == "Conv" else None
        if match is None or match.group(1) not in grouped or node.input[1] not in weights:
            continue
        init = weights[node.input[1]]
        dense = numpy_helper.to_array(init)
        kernel = _grouped_kernel(dense, grouped[match.group(1)], match.group(1))
        init.CopyFrom(numpy_helper.from_array(kernel, init.name))
        _set_group(node, grouped[match.group(1)].groups)
        done.add(match.group(1))
    missing = sorted(set(grouped) - done)
    if missing:
        raise ModelError(
            f"grouped conv layer(s) {missing} not found as a Conv with a constant kernel"
        )
    return proto


def _grouped_kernel(dense: np.ndarray, info: _Grouped, name: str) -> np.ndarray:
    """Dense ONNX kernel ``[C_out, C_in, k...]`` -> grouped ``[C_out, C_in/g, k...]``."""
    g = info.groups
    if dense.shape[:2] != (info.out_channels, info.in_channels):
        raise ModelError(
            f"conv {name!r}: kernel shape {list(dense.shape)} does not match "
            f"{info.out_channels} outputs x {info.in_channels} inputs"
        )
    out_g, in_g = dense.shape[0] // g, dense.shape[1] // g
    blocks, rest = [], dense.copy()
    for q in range(g):
        rows, cols = slice(q * out_g, (q + 1) * out_g), slice(q * in_g, (q + 1) * in_g)
        blocks.append(dense[rows, cols])
        rest[rows, cols] = 0
    if np.any(rest != 0):
        raise ModelError(f"conv {name!r}: kernel is not block-diagonal over {g} groups")
    return np.ascontiguousarray(np.concatenate(blocks, axis=0))


def _set_group(node: onnx.NodeProto, groups: int) -> None:
    for attr in node.attribute:
        if attr.name == "group":
            node.attribute.remove(attr)
            break
    node.attribute.append(onnx.helper.make_attribute("group", groups))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
