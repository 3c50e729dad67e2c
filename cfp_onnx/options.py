"""Typed, frozen, self-checking options: built once (from the CLI or Python), then passed on.

* ``PyramidOptions``: what pyramid to build (SPEC §3-5).
* ``ClipOptions``: how a clip file becomes the model's input (overrides of the model's
  own metadata); ``preprocess(loaded)`` resolves them against the model once.
* ``ViewOptions``: what an explanation shows and what is written besides ``pyramid.json``.

Each checks itself in ``__post_init__`` and raises OptionError with the allowed range, so
an option object that exists is valid.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from cfp_onnx.errors import CfpError, OptionError

if TYPE_CHECKING:
    from cfp_onnx.loading import LoadedModel
    from cfp_onnx.video import Preprocess

HEAD_MODES = ("weights", "contribution", "contrastive")

FORMATS = ("json", "reference")
TUBE_FILES = ("strip", "gif", "stack")
CLASS_TUBES = ("weighted", "contrast", "pyramid")
EMBED_TUBES = ("weighted", "contrast")
"""Class tubes ``cfp embed`` can compute in the graph."""
DRAWS = 8
"""Random kernel sets the faithfulness check draws by default."""
LAYOUTS = ("NCDHW", "NDHWC")
SAMPLINGS = ("uniform", "strided")


_O = TypeVar("_O")


def as_path(value: Any, what: str, error: type[CfpError] = OptionError) -> Path:
    """`value` as a Path: from Python, anything but a str or os.PathLike is a user error
    (``"{what} must be ..."``), not a TypeError from deep inside."""
    if isinstance(value, (str, os.PathLike)):
        return Path(value)
    raise error(f"{what} (got {type(value).__name__})")


def as_options(value: _O | None, cls: type[_O], name: str) -> _O:
    """`value`, or the defaults for None; anything but a `cls` is an OptionError."""
    if value is None:
        return cls()
    if not isinstance(value, cls):
        raise OptionError(
            f"{name} must be a cfp_onnx.options.{cls.__name__} (got {type(value).__name__}); "
            f"build one with {cls.__name__}(...)"
        )
    return value


def _is_int(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, np.integer))


@dataclass(frozen=True, slots=True)
class PyramidOptions:
    """Depth, threshold, top-n, head mode and the class to explain (None: the prediction)."""

    depth: int = 3
    theta: float = 0.6
    top_n: int | None = None
    head_mode: str = "weights"
    label: int | str | None = None  # an index, or one of the model's class names

    def __post_init__(self) -> None:
        if not _is_int(self.depth) or self.depth < 1:
            raise OptionError(
                f"depth must be an integer >= 1 (got {self.depth!r}); depth=3 is the paper's"
            )
        t = self.theta
        if isinstance(t, bool) or not isinstance(t, (int, float, np.floating)) or math.isnan(t):
            raise OptionError(f"theta must be a number in [0, 1] (got {t!r}); the paper uses 0.6")
        if not 0 <= t <= 1:
            raise OptionError(f"theta must be a number in [0, 1] (got {t!r}); the paper uses 0.6")
        if self.top_n is not None and (not _is_int(self.top_n) or self.top_n < 1):
            raise OptionError(f"top-n must be an integer >= 1 or omitted (got {self.top_n!r})")
        if self.head_mode not in HEAD_MODES:
            raise OptionError(
                f"head mode {self.head_mode!r} unknown; choose one of {', '.join(HEAD_MODES)}"
            )
        if self.label is not None and not (
            _is_int(self.label) or (isinstance(self.label, str) and self.label.strip())
        ):
            raise OptionError(f"label must be a class index or a class name (got {self.label!r})")


@dataclass(frozen=True, slots=True)
class ClipOptions:
    """Overrides of the model's clip metadata, and windowing of long videos.

    None keeps what the model says (its metadata, else its declared input shape).
    """

    layout: str | None = None
    frames: int | None = None
    size: tuple[int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    sampling: str = "uniform"
    window: int | None = None
    stride: int | None = None

    def __post_init__(self) -> None:
        if self.layout is not None and self.layout not in LAYOUTS:
            raise OptionError(f"layout {self.layout!r} is not one of {', '.join(LAYOUTS)}")
        if self.sampling not in SAMPLINGS:
            raise OptionError(f"sampling {self.sampling!r} is not one of {', '.join(SAMPLINGS)}")
        for name in ("frames", "window", "stride"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                raise OptionError(f"--{name} must be >= 1 (got {value!r})")
        if self.stride is not None and self.window is None:
            raise OptionError("--stride needs --window")

    def preprocess(self, loaded: LoadedModel) -> Preprocess:
        """The model's preprocessing with these overrides (raises ModelError/OptionError)."""
        from cfp_onnx.modelinfo import preprocess_for

        return preprocess_for(
            loaded, layout=self.layout, frames=self.frames, size=self.size, mean=self.mean,
            std=self.std,
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class ViewOptions:
    """What an explanation shows, and what is written besides ``pyramid.json``.

    Attributes:
        report: write ``report.html``.
        maps: keep every kernel's map (the report's tubes); False gives a report without
            tubes and skips the maps' cost.
        tube_files: per-kernel pictures to write into ``tubes/`` (none by default).
        per_depth: kernels drawn in the graph (and given tube files) per depth.
        weighted: tube maps weighted by r' (SPEC §6 option).
        class_tube: also compute a class tube of this kind.
        shuffle: run the frame-shuffle test (one more forward).
        faithfulness: random kernel sets the faithfulness check ablates beside the
            pyramid's depth-0 kernels (``cfp_onnx.faithfulness``); 0 skips the check.
        fps: playback speed of tubes and GIFs.
        format: ``reference`` also writes the paper's nested tree.
        max_side: frames larger than this are scaled down for the page.
    """

    report: bool = True
    maps: bool = True
    tube_files: tuple[str, ...] = ()
    per_depth: int = 64
    weighted: bool = False
    class_tube: str | None = None
    shuffle: bool = True
    faithfulness: int = 0
    fps: float = 8.0
    format: str = "json"
    max_side: int = 192
    top_k: int = 5

    def __post_init__(self) -> None:
        if not _is_int(self.per_depth) or self.per_depth < 1:
            raise OptionError(f"--per-depth must be >= 1 (got {self.per_depth!r})")
        if not _is_int(self.faithfulness) or not 0 <= self.faithfulness <= 1000:
            raise OptionError(
                f"--faithfulness-draws must be between 1 and 1000 (got {self.faithfulness!r})"
            )
        if not (isinstance(self.fps, (int, float)) and math.isfinite(self.fps)):
            raise OptionError(f"--fps must be a number > 0 (got {self.fps!r})")
        if not self.fps > 0:
            raise OptionError(f"--fps must be > 0 (got {self.fps!r})")
        if not 0.01 <= self.fps <= 1000:
            raise OptionError(f"--fps must be between 0.01 and 1000 (got {self.fps!r})")
        bad = [f for f in self.tube_files if f not in TUBE_FILES]
        if bad:
            raise OptionError(
                f"--tubes {','.join(bad)}: choose from {', '.join(TUBE_FILES)} (comma-separated)"
            )
        if self.class_tube is not None and self.class_tube not in CLASS_TUBES:
            raise OptionError(
                f"class tube must be one of {', '.join(CLASS_TUBES)} (got {self.class_tube!r})"
            )
        if self.format not in FORMATS:
            raise OptionError(f"format {self.format!r} is not one of {', '.join(FORMATS)}")

    @property
    def needs_maps(self) -> bool:
        """Whether every kernel's map is kept (the report's tubes, tube files); the class
        tube says itself which full maps it reads (``classtube.tensors``)."""
        return (self.report and self.maps) or bool(self.tube_files)
