"""What a model says about its input: layout, clip length, size, normalisation, class names.

Read from the declared input shape and the ``cfp.`` metadata the exporters write;
explicit user options override both.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from cfp_onnx.errors import ModelError, OptionError
from cfp_onnx.loading import LoadedModel, declared_shape, graph_input
from cfp_onnx.metadata import read_metadata

if TYPE_CHECKING:  # OpenCV (via video) is imported only when a video is decoded
    from cfp_onnx.video import Preprocess


def guess_layout(shape: tuple[Any, ...]) -> str:
    """``NDHWC`` when only the last axis looks like RGB, else ``NCDHW``."""
    if len(shape) == 5 and shape[-1] == 3 and shape[1] != 3:
        return "NDHWC"
    return "NCDHW"


def class_names(loaded: LoadedModel) -> tuple[str, ...] | None:
    names = read_metadata(loaded.proto).get("class_names")
    return tuple(str(n) for n in names) if names else None


def preprocess_for(loaded: LoadedModel, **overrides: Any) -> Preprocess:
    """The model's preprocessing: declared input shape + metadata, then user overrides.

    Raises:
        ModelError: the input is not a 5-D video tensor.
        OptionError: the clip length or size is dynamic and not given.
    """
    from cfp_onnx.video import Preprocess

    shape = declared_shape(graph_input(loaded.proto))
    if len(shape) != 5:
        raise ModelError(
            f"model input has {len(shape)} dims {shape}; a video model takes 5 (N, C, T, H, W or N, T, H, W, C)"
        )
    meta = read_metadata(loaded.proto)
    layout = overrides.get("layout") or meta.get("layout") or guess_layout(shape)
    t_ax, h_ax, w_ax = (2, 3, 4) if layout == "NCDHW" else (1, 2, 3)
    frames = overrides.get("frames") or meta.get("frames") or shape[t_ax]
    size = overrides.get("size") or meta.get("size") or (shape[h_ax], shape[w_ax])
    if not isinstance(frames, int) or not all(isinstance(s, int) for s in size):
        raise OptionError(
            f"the model's input {shape} has a dynamic clip length or size; pass --frames and --size"
        )
    base = Preprocess(frames=frames, size=(int(size[0]), int(size[1])), layout=layout)  # type: ignore[arg-type]
    mean = overrides.get("mean") or meta.get("mean")
    std = overrides.get("std") or meta.get("std")
    return replace(
        base,
        mean=tuple(mean) if mean else base.mean,
        std=tuple(std) if std else base.std,
    )
