"""The demo's model and clip, shipped or generated in seconds (no torch needed).

``assets/demo.onnx`` is built by ``exporters/demo_model.py``: a tiny 3D CNN with
hand-set kernels for yellow, temporal edges and "moving yellow", so its tubes must
follow the bar of :func:`cfp_onnx.synthetic.demo_clip`.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np

from cfp_onnx.errors import ModelError
from cfp_onnx.synthetic import demo_clip
from cfp_onnx.video import Clip

FRAMES, SIZE = 16, 112


def model_path() -> Path:
    """The shipped demo model.

    Raises:
        ModelError: the package was installed without its assets.
    """
    path = Path(str(resources.files("cfp_onnx").joinpath("assets", "demo.onnx")))
    if not path.is_file():
        raise ModelError(
            f"the demo model {path} is missing; reinstall cfp_onnx or rebuild it with "
            "python -m cfp_onnx.exporters.demo_model"
        )
    return path


def clip(seed: int = 0) -> Clip:
    """The demo clip: a yellow bar crossing a dark noisy background, as model input."""
    frames = demo_clip(seed, frames=FRAMES, size=SIZE).frames
    tensor = np.ascontiguousarray(frames.transpose(3, 0, 1, 2)[None], dtype=np.float32) / 255.0
    return Clip(
        tensor=tensor,
        frames=frames,
        indices=np.arange(FRAMES, dtype=np.int64),
        source=Path(f"demo_clip(seed={seed})"),
        fps=8.0,
    )
