"""What a model takes as input, worked out once: layout, time axis, preprocessing.

``ModelInput.of(loaded, ClipOptions)`` reads the model's declared shape and metadata
with the user's overrides; ``clip`` and ``windows`` then turn a file (video, frame folder
or ``.npy``) or an array into ``Clip``s through ``cfp_onnx.video``, the one way a clip
comes in.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cfp_onnx.errors import CfpError, ClipError
from cfp_onnx.loading import LoadedModel, declared_shape, graph_input
from cfp_onnx.modelinfo import guess_layout
from cfp_onnx.options import ClipOptions, as_path
from cfp_onnx.resources import MemoryLimit

if TYPE_CHECKING:
    from cfp_onnx.video import Clip, Preprocess


@dataclass(frozen=True)
class ModelInput:
    """The model's clip layout and preprocessing (None: a dynamic size nobody gave)."""

    layout: str
    preprocess: Preprocess | None
    options: ClipOptions

    @classmethod
    def of(cls, loaded: LoadedModel, options: ClipOptions | None = None) -> ModelInput:
        opts = options or ClipOptions()
        try:
            pre: Preprocess | None = opts.preprocess(loaded)
        except CfpError:
            pre = None  # a .npy clip needs no preprocessing; a video says why when read
        layout: str
        if pre is not None:
            layout = pre.layout
        else:
            shape = declared_shape(graph_input(loaded.proto))
            layout = opts.layout or guess_layout(shape)
        return cls(layout, pre, opts)

    @property
    def time_axis(self) -> int:
        """The time axis of the model input (batch axis first)."""
        return 2 if self.layout == "NCDHW" else 1

    def clip_size(self, tensor: np.ndarray) -> tuple[int, int, int]:
        """``(T, H, W)`` of a model input tensor (batch axis first): a tube's size."""
        t = self.time_axis
        return int(tensor.shape[t]), int(tensor.shape[t + 1]), int(tensor.shape[t + 2])

    def clip(self, source: Any, loaded: LoadedModel, limit: MemoryLimit | None = None) -> Clip:
        """One clip from a Clip, an array (the model's layout, batch axis optional) or a file.

        A file is checked against `limit` (None: the default limit) before it is read."""
        from cfp_onnx import video

        if isinstance(source, video.Clip):
            return source
        if isinstance(source, np.ndarray):
            return self._array_clip(source)
        path, limit = clip_path(source), limit or MemoryLimit.of()
        if path.suffix.lower() in video.TENSOR_EXTENSIONS and not path.is_dir():
            return video.load_clip(path, self._npy_preprocess(), limit=limit)
        pre, sampling = self._video_preprocess(loaded), self.options.sampling
        return video.load_clip(path, pre, sampling=sampling, limit=limit)  # type: ignore[arg-type]

    def windows(
        self, source: Any, loaded: LoadedModel, limit: MemoryLimit | None = None
    ) -> tuple[int, Iterator[Clip]]:
        """How many windows of ``options.window`` frames every ``options.stride`` a video
        gives, and the clips one at a time (decoded in one pass, streamed, each checked
        against `limit`)."""
        from cfp_onnx import video

        pre = self._video_preprocess(loaded)
        path, size, step = clip_path(source), self.options.window, self.options.stride
        count = len(video.window_spans(path, pre, size, step)[1])
        limit = limit or MemoryLimit.of()
        return count, video.iter_windows(path, pre, size, step, limit=limit)

    def _video_preprocess(self, loaded: LoadedModel) -> Preprocess:
        return self.preprocess if self.preprocess is not None else self.options.preprocess(loaded)

    def _npy_preprocess(self) -> Preprocess:
        from cfp_onnx.video import Preprocess

        return self.preprocess or Preprocess(layout=self.layout)  # type: ignore[arg-type]

    def _array_clip(self, arr: np.ndarray) -> Clip:
        from cfp_onnx.video import Clip, check_tensor, tensor_to_frames

        check_tensor(arr, Path("<array>"))
        tensor = np.ascontiguousarray(arr[None] if arr.ndim == 4 else arr)
        frames = tensor_to_frames(tensor[0], self.layout)  # type: ignore[arg-type]
        indices = np.arange(frames.shape[0], dtype=np.int64)
        return Clip(tensor=tensor, frames=frames, indices=indices, source=Path("<array>"))


def clip_path(source: Any) -> Path:
    """A clip that is not an array must be a path; anything else is a user error."""
    what = "clip must be a numpy array or a path to a .npy / video / frame folder"
    return as_path(source, what, ClipError)
