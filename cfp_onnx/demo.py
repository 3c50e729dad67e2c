"""The demo's model and clip, shipped or generated in seconds (no torch needed).

``assets/demo.onnx`` is the smallest model ``benchmarks/train.py`` trains on the
generated action dataset (:mod:`cfp_onnx.synthetic`: nine classes told apart only by
motion), copied from ``benchmarks/models/``; ``assets/demo.json`` is its training record.
The clip (:func:`cfp_onnx.synthetic.demo_clip`) is a ``move_right`` clip drawn like the
training clips but never seen in training, so the explanation can be checked against
where the moving object really is.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np

from cfp_onnx.errors import ModelError
from cfp_onnx.loading import LoadedModel, load_model
from cfp_onnx.modelinfo import preprocess_for
from cfp_onnx.synthetic import demo_clip
from cfp_onnx.video import Clip, to_tensor

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
            "benchmarks/train.py (see benchmarks/README.md)"
        )
    return path


def clip(seed: int = 0, loaded: LoadedModel | None = None) -> Clip:
    """The demo clip as model input, preprocessed from the model's own metadata
    (`loaded`: the demo model, when the caller has it already)."""
    frames = demo_clip(seed, frames=FRAMES, size=SIZE).frames
    model = loaded if loaded is not None else load_model(model_path())
    return Clip(
        tensor=to_tensor(frames, preprocess_for(model)),
        frames=frames,
        indices=np.arange(FRAMES, dtype=np.int64),
        source=Path(f"demo_clip(seed={seed})"),
        fps=8.0,
    )
