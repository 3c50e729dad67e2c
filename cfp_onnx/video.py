"""Clips in: decode videos and frame folders, sample frames, preprocess for the model.

Decisions (each one a place where a careful user could expect otherwise):

* **Colour**: frames are RGB uint8 everywhere; ``Preprocess.channel_order="BGR"``
  flips only the model tensor, never the display frames.
* **Spatial**: with ``size=(H, W)`` each frame is scaled (aspect kept) so it covers
  ``H x W`` -- or so its shorter side is ``short_side`` when that is given -- and
  then centre-cropped to ``H x W``. ``size=None`` keeps the native size.
* **Normalisation**: ``x * scale`` (``1/255`` by default, so ``[0, 1]``), then
  ``(x - mean) / std`` per channel.
* **Temporal**: ``uniform`` takes the centre frame of each of ``frames`` equal
  segments (TSN style); ``strided`` takes ``frames`` frames ``stride`` apart,
  centred in the video. A video too short for the clip is a ``ClipError`` unless
  ``loop=True``, which wraps around to the first frame (``i % n_frames``).
* **Windows**: windows start every ``stride`` frames from frame 0; when the last
  window stops short of the final frame one more window, aligned to the end, is
  added, so every frame lies in some window.
* **.npy**: the array is the model input as is (batch axis optional, added when
  missing). Display frames are the tensor min-max scaled to uint8 over the whole
  clip (one range for all frames, so brightness stays comparable over time).
* **Memory**: videos are decoded twice (count, then keep only sampled frames,
  already resized), so a long video never sits whole in memory.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import stat
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

from cfp_onnx.errors import ClipError, OptionError, OutputError
from cfp_onnx.options import LAYOUTS, SAMPLINGS, as_path
from cfp_onnx.outputs import permissions
from cfp_onnx.resources import CLIP_BYTES_PER_VALUE, MemoryLimit

log = logging.getLogger(__name__)

# OpenCV's own "[ WARN:0] ... imread_" / "[ERROR:0] ... readHeader" lines would be a second
# stderr line beside the ClipError that names the file (SPEC §7): silence them; every
# failure they describe comes back to us as an empty read or a False.
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)

VIDEO_EXTENSIONS = frozenset(
    {
        ".mp4",
        ".m4v",
        ".avi",
        ".mov",
        ".webm",
        ".mkv",
        ".mpg",
        ".mpeg",
        ".wmv",
        ".flv",
        ".3gp",
        ".ogv",
        ".gif",
    }
)
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
TENSOR_EXTENSIONS = frozenset({".npy"})

Layout = Literal["NCDHW", "NDHWC"]
Sampling = Literal["uniform", "strided"]
FrameTransform = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True, slots=True)
class Preprocess:
    """How the model wants its clip: length, size, normalisation and layout.

    Attributes:
        frames: clip length T the model takes.
        size: ``(H, W)`` after resize + centre crop, or None to keep the native size.
        mean: per-channel mean, in units after ``scale`` (one value broadcasts).
        std: per-channel std, same units as ``mean``.
        layout: ``NCDHW`` (PyTorch) or ``NDHWC`` (TensorFlow/Keras).
        scale: factor applied to uint8 values first (``1/255`` gives ``[0, 1]``).
        short_side: resize the shorter side to this before cropping (e.g. 128 for
            a 112 crop); None scales just enough to cover ``size``.
        stride: frame step for ``strided`` sampling.
        channel_order: ``RGB`` or ``BGR`` channel order of the model tensor.
    """

    frames: int = 16
    size: tuple[int, int] | None = (112, 112)
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    layout: Layout = "NCDHW"
    scale: float = 1.0 / 255.0
    short_side: int | None = None
    stride: int = 1
    channel_order: Literal["RGB", "BGR"] = "RGB"

    def __post_init__(self) -> None:
        if self.frames < 1 or self.stride < 1:
            raise OptionError(f"frames={self.frames} and stride={self.stride} must both be >= 1")
        if self.size is not None and (len(self.size) != 2 or min(self.size) < 1):
            raise OptionError(f"size={self.size} must be (height, width) with both >= 1, or None")
        if self.short_side is not None and (self.size is None or self.short_side < max(self.size)):
            raise OptionError(
                f"short_side={self.short_side} needs a size it can cover (size={self.size})"
            )
        if len(self.mean) not in (1, 3) or len(self.std) not in (1, 3):
            raise OptionError(f"mean {self.mean} and std {self.std} need 1 or 3 values (RGB)")
        if any(s == 0 for s in self.std):
            raise OptionError(f"std {self.std} has a zero; it divides the clip")
        if self.layout not in LAYOUTS:
            raise OptionError(f"layout {self.layout!r} is not one of {', '.join(LAYOUTS)}")
        if self.channel_order not in ("RGB", "BGR"):
            raise OptionError(f"channel_order {self.channel_order!r} is not RGB or BGR")


@dataclass(frozen=True, slots=True, eq=False)
class Clip:
    """One model input and the frames to show it on.

    Attributes:
        tensor: float32 model input with batch axis 1, in ``Preprocess.layout``.
        frames: uint8 RGB ``[T, H, W, 3]`` after sampling and resize/crop, before
            normalisation: what saliency tubes are blended on.
        indices: source frame index of each of the T frames (int64).
        source: the path the clip came from.
        fps: the source video's frame rate, when it has one.
    """

    tensor: np.ndarray
    frames: np.ndarray
    indices: np.ndarray
    source: Path
    fps: float | None = None


# ----------------------------------------------------------------- sampling


def sample_indices(
    n_frames: int,
    clip_len: int,
    mode: Sampling = "uniform",
    stride: int = 1,
    *,
    loop: bool = False,
) -> np.ndarray:
    """Frame indices for one clip of ``clip_len`` frames out of ``n_frames``.

    Returns:
        int64 array of length ``clip_len``.

    Raises:
        ClipError: the video is shorter than the clip needs and ``loop`` is False.
        OptionError: unknown mode, or a length/stride below 1.
    """
    if clip_len < 1 or stride < 1:
        raise OptionError(f"clip length {clip_len} and stride {stride} must both be >= 1")
    if mode not in SAMPLINGS:
        raise OptionError(f"sampling {mode!r} is not one of {', '.join(SAMPLINGS)}")
    step = stride if mode == "strided" else 1
    span = (clip_len - 1) * step + 1
    if n_frames < span:
        return _looped(n_frames, clip_len, step, loop=loop)
    if mode == "uniform":
        return ((np.arange(clip_len) + 0.5) * n_frames / clip_len).astype(np.int64)
    start = (n_frames - span) // 2
    return start + np.arange(clip_len, dtype=np.int64) * step


def _looped(n_frames: int, clip_len: int, step: int, *, loop: bool) -> np.ndarray:
    """Wrap-around indices for a video shorter than the clip, if the user allowed it."""
    need = (clip_len - 1) * step + 1
    if n_frames < 1:
        raise ClipError("video has no frames; pass a video or folder with at least one frame")
    if not loop:
        raise ClipError(
            f"video has {n_frames} frames; the model needs {need} "
            f"({clip_len} frames, stride {step}): use a longer video, a smaller stride, "
            "or (from Python) load_clip(..., loop=True) to repeat it from the start"
        )
    log.info("looping a %d-frame video to fill %d frames", n_frames, need)
    return (np.arange(clip_len, dtype=np.int64) * step) % n_frames


def sliding_windows(
    n_frames: int, clip_len: int, window_stride: int, *, loop: bool = False
) -> list[np.ndarray]:
    """Index arrays of consecutive ``clip_len``-frame windows covering the whole video.

    Windows start at 0, ``window_stride``, ...; if the last one ends before the final
    frame, a window aligned to the end is appended so no frame is left out.

    Raises:
        ClipError: the video is shorter than one window and ``loop`` is False.
        OptionError: a length or stride below 1.
    """
    if clip_len < 1 or window_stride < 1:
        raise OptionError(f"window {clip_len} and stride {window_stride} must both be >= 1")
    if n_frames < clip_len:
        return [_looped(n_frames, clip_len, 1, loop=loop)]
    starts = list(range(0, n_frames - clip_len + 1, window_stride))
    if starts[-1] + clip_len < n_frames:
        starts.append(n_frames - clip_len)
    return [np.arange(s, s + clip_len, dtype=np.int64) for s in starts]


# ----------------------------------------------------------------- sources


def natural_key(name: str) -> tuple[object, ...]:
    """Sort key putting ``frame2`` before ``frame10`` (digit runs compare as numbers)."""
    parts = re.split(r"(\d+)", name.lower())
    return (*(int(p) if p.isdigit() else p for p in parts), name)


def _check_path(path: Path) -> None:
    """Raise a ClipError that says why ``path`` cannot be opened, if it cannot."""
    try:
        st = os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ClipError(f"{path}: symbolic link loop; point the link at a real file") from None
        if os.path.islink(path):
            raise ClipError(
                f"{path}: broken symbolic link to {os.readlink(path)}; fix or remove it"
            ) from None
        if exc.errno == errno.ENOENT:
            raise ClipError(f"{path}: no such file or folder; check the path") from None
        raise ClipError(f"{path}: cannot open ({exc.strerror}); check permissions") from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        raise ClipError(
            f"{path}: not a regular file (a FIFO, socket or device); pass a video, a folder of "
            "frames or a .npy file"
        )
    if not os.access(path, os.R_OK):
        raise ClipError(f"{path}: not readable (permission denied); check permissions")


class _Source:
    """Frames on disk that can be counted, then read by index, one at a time."""

    path: Path
    fps: float | None = None

    def count(self) -> int:
        raise NotImplementedError

    def read(self, indices: np.ndarray, transform: FrameTransform | None = None) -> np.ndarray:
        """Read the frames at ``indices`` (any order, repeats allowed) as RGB uint8."""
        raise NotImplementedError

    def sampled(
        self, pick: Callable[[int], np.ndarray], transform: FrameTransform | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(indices, frames)`` for ``indices = pick(count())``."""
        indices = pick(self.count())
        return indices, self.read(indices, transform)

    def stream(
        self, picks: list[np.ndarray], transform: FrameTransform | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(indices, frames)`` of each pick in turn (random access: read one at a time)."""
        for idx in picks:
            yield idx, self.read(idx, transform)


class _FolderSource(_Source):
    """A folder of image files, one frame each, in natural sort order."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            entries = list(os.scandir(path))
        except OSError as exc:
            raise ClipError(
                f"{path}: cannot list folder ({exc.strerror}); check permissions"
            ) from None
        names = [e.name for e in entries if _is_image_name(e.name)]
        if not names:
            exts = ", ".join(sorted(IMAGE_EXTENSIONS))
            raise ClipError(
                f"{path}: folder has no frame images ({exts}); pass a video or a folder of frames"
            )
        self.files = [path / n for n in sorted(names, key=natural_key)]

    def count(self) -> int:
        return len(self.files)

    def read(self, indices: np.ndarray, transform: FrameTransform | None = None) -> np.ndarray:
        cache: dict[int, np.ndarray] = {}
        shape: tuple[int, ...] | None = None
        for i in dict.fromkeys(int(i) for i in indices):
            image = _read_image(self.files[i])
            if shape is not None and image.shape != shape:
                raise ClipError(
                    f"{self.files[i]}: size {image.shape[1]}x{image.shape[0]} differs from the "
                    f"first frame's {shape[1]}x{shape[0]}; all frames must be the same size"
                )
            shape = image.shape
            cache[i] = transform(image) if transform else image
        return np.stack([cache[int(i)] for i in indices])


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS


def _read_image(path: Path) -> np.ndarray:
    """Decode one image file to RGB uint8, or say which file is bad."""
    _check_path(path)
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise ClipError(f"{path}: cannot read image ({exc.strerror}); check permissions") from None
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise ClipError(f"{path}: not a readable image; replace or remove the file")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


class _VideoSource(_Source):
    """A video file decoded with OpenCV (FFmpeg backend)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with _capture(path) as cap:
            fps = float(cap.get(cv2.CAP_PROP_FPS))
            self.fps = fps if fps > 0 else None
            self._reported = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        self._count: int | None = None

    def count(self) -> int:
        if self._count is None:
            with _capture(self.path) as cap:
                n = 0
                while cap.grab():
                    n += 1
            self._counted(n)
        assert self._count is not None
        return self._count

    def _counted(self, n: int) -> None:
        if n == 0:
            raise ClipError(
                f"{self.path}: video decodes to zero frames; re-encode it or check it is complete"
            )
        if self._reported > 0 and n < self._reported:
            log.warning("%s: header says %d frames, only %d decode", self.path, self._reported, n)
        self._count = n

    def sampled(
        self, pick: Callable[[int], np.ndarray], transform: FrameTransform | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """One decoding pass where the header's frame count is right (the usual case): the
        frames `pick` wants of that count are kept as the stream is decoded to its end,
        which counts it. A header that is wrong costs a second pass, never a wrong pick."""
        if self._count is not None or self._reported <= 0:
            return super().sampled(pick, transform)
        try:
            guess = pick(self._reported)
        except ClipError:  # too short by the header: count it for real
            return super().sampled(pick, transform)
        wanted = set(guess.tolist())
        got: dict[int, np.ndarray] = {}
        with _capture(self.path) as cap:
            n = 0
            while cap.grab():
                if n in wanted:
                    ok, bgr = cap.retrieve()
                    if ok and bgr is not None:
                        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
                        got[n] = transform(rgb) if transform else rgb
                n += 1
        self._counted(n)
        indices = pick(n)
        if n != self._reported or len(got) < len(wanted) or not np.array_equal(indices, guess):
            return indices, self.read(indices, transform)
        return indices, np.stack([got[int(i)] for i in indices])

    def read(self, indices: np.ndarray, transform: FrameTransform | None = None) -> np.ndarray:
        wanted = set(int(i) for i in indices)
        got: dict[int, np.ndarray] = {}
        with _capture(self.path) as cap:
            for i, bgr in enumerate(_decode(cap, max(wanted) + 1)):
                if i in wanted:
                    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
                    got[i] = transform(rgb) if transform else rgb
        if len(got) < len(wanted):
            raise ClipError(
                f"{self.path}: frame {max(wanted - set(got))} did not decode; the video may be corrupt"
            )
        return np.stack([got[int(i)] for i in indices])

    def stream(
        self, picks: list[np.ndarray], transform: FrameTransform | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """One decoding pass; a pick is yielded as soon as its last frame is decoded, and a
        frame is dropped once no later pick needs it."""
        order = sorted(range(len(picks)), key=lambda k: int(picks[k].max()))
        need: dict[int, int] = {}  # frame -> picks still to yield that use it
        for idx in picks:
            for i in set(idx.tolist()):
                need[i] = need.get(i, 0) + 1
        held: dict[int, np.ndarray] = {}
        pending = iter(order)
        nxt = next(pending, None)
        with _capture(self.path) as cap:
            for i, bgr in enumerate(_decode(cap, int(max(p.max() for p in picks)) + 1)):
                if i in need:
                    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
                    held[i] = transform(rgb) if transform else rgb
                while nxt is not None and int(picks[nxt].max()) <= i:
                    idx = picks[nxt]
                    yield idx, np.stack([held[int(j)] for j in idx])
                    for j in set(idx.tolist()):
                        need[j] -= 1
                        if need[j] == 0:
                            held.pop(j, None)
                    nxt = next(pending, None)
        if nxt is not None:
            raise ClipError(
                f"{self.path}: frame {int(picks[nxt].max())} did not decode; the video may be corrupt"
            )


class _capture:
    """``cv2.VideoCapture`` as a context manager that raises ClipError if it cannot open."""

    def __init__(self, path: Path) -> None:
        self.cap = cv2.VideoCapture(str(path))
        if not self.cap.isOpened():
            self.cap.release()
            raise ClipError(
                f"{path}: cannot decode as video (corrupt, or not a video despite its "
                "extension); re-encode it (ffmpeg -i in -c:v libx264 out.mp4) or pass a folder of frames"
            )

    def __enter__(self) -> cv2.VideoCapture:
        return self.cap

    def __exit__(self, *exc: object) -> None:
        self.cap.release()


def _decode(cap: cv2.VideoCapture, limit: int) -> Iterator[np.ndarray]:
    """Yield BGR frames until ``limit`` frames or the end of the stream."""
    for _ in range(limit):
        ok, frame = cap.read()
        if not ok or frame is None:
            return
        yield frame


def _open_source(path: str | os.PathLike[str]) -> _Source:
    """Pick the reader for ``path``: a folder of frames, or a video file."""
    p = Path(path)
    _check_path(p)
    if p.is_dir():
        return _FolderSource(p)
    ext = p.suffix.lower()
    if ext in VIDEO_EXTENSIONS:
        return _VideoSource(p)
    if ext in IMAGE_EXTENSIONS:
        raise ClipError(
            f"{p}: is a single image; put the clip's frames in a folder and pass the folder"
        )
    if ext in TENSOR_EXTENSIONS:
        raise ClipError(f"{p}: a .npy tensor has no decodable frames; load it with load_clip")
    exts = ", ".join(sorted(VIDEO_EXTENSIONS))
    raise ClipError(
        f"{p}: unknown clip type {ext or '(no extension)'!r}; pass a video ({exts}), a frame folder or a .npy"
    )


def read_frames(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode every frame of a video file or a folder of frames.

    Returns:
        uint8 RGB array ``[T, H, W, 3]``.

    Raises:
        ClipError: missing/unreadable path, undecodable video, no frames, bad image.
    """
    source = _open_source(path)
    return source.read(np.arange(source.count()))


# ----------------------------------------------------------------- preprocessing


def resize_crop(
    frame: np.ndarray, size: tuple[int, int] | None, short_side: int | None = None
) -> np.ndarray:
    """Scale ``frame`` (aspect kept) to cover ``size`` (or to ``short_side``), then centre-crop."""
    if size is None:
        return frame
    h, w = frame.shape[:2]
    th, tw = size
    factor = short_side / min(h, w) if short_side else max(th / h, tw / w)
    nh, nw = max(th, round(h * factor)), max(tw, round(w * factor))
    if (nh, nw) != (h, w):
        interp = cv2.INTER_AREA if nh < h else cv2.INTER_LINEAR
        frame = cv2.resize(frame, (nw, nh), interpolation=interp)
    top, left = (nh - th) // 2, (nw - tw) // 2
    return np.ascontiguousarray(frame[top : top + th, left : left + tw])


def to_tensor(frames: np.ndarray, preprocess: Preprocess) -> np.ndarray:
    """Normalise uint8 RGB ``[T, H, W, 3]`` frames into the model's float32 input (batch 1)."""
    x = frames.astype(np.float32) * np.float32(preprocess.scale)
    if preprocess.channel_order == "BGR":
        x = x[..., ::-1]
    mean = np.asarray(preprocess.mean, dtype=np.float32)
    std = np.asarray(preprocess.std, dtype=np.float32)
    x = (x - mean) / std
    if preprocess.layout == "NCDHW":
        x = x.transpose(3, 0, 1, 2)
    return np.ascontiguousarray(x[None], dtype=np.float32)


def _spatial(preprocess: Preprocess, limit: MemoryLimit | None = None) -> FrameTransform:
    """Resize and crop each decoded frame, checking first (when `limit` is given) that the
    clip it belongs to, and the resized frame, fit: ``--size 40000,40000`` is refused
    after one small frame is decoded, before any large array exists."""

    def transform(frame: np.ndarray) -> np.ndarray:
        if limit is not None:
            h, w = frame.shape[:2]
            th, tw = preprocess.size or (h, w)
            clip = preprocess.frames * th * tw * 3 * CLIP_BYTES_PER_VALUE
            limit.check(
                clip + _resized_bytes(h, w, preprocess),
                f"a clip of {preprocess.frames} frames of {th}x{tw} (from {h}x{w})",
                "use a smaller --size or fewer --frames",
            )
        return resize_crop(frame, preprocess.size, preprocess.short_side)

    return transform


def _resized_bytes(h: int, w: int, preprocess: Preprocess) -> int:
    """uint8 bytes of one frame scaled by resize_crop, before its crop."""
    if preprocess.size is None:
        return 0
    th, tw = preprocess.size
    factor = preprocess.short_side / min(h, w) if preprocess.short_side else max(th / h, tw / w)
    return max(th, round(h * factor)) * max(tw, round(w * factor)) * 3


# ----------------------------------------------------------------- .npy tensors


def _load_tensor(path: Path, preprocess: Preprocess, limit: MemoryLimit | None = None) -> Clip:
    """Load a preprocessed ``.npy`` clip and derive display frames from it."""
    x = _read_npy(path, limit)
    check_tensor(x, path)
    if x.ndim == 4:
        x = x[None]
    if x.shape[0] != 1:
        raise ClipError(
            f"{path}: has batch {x.shape[0]} in shape {x.shape}; one clip per file (use cfp batch for more)"
        )
    x = np.ascontiguousarray(x, dtype=np.float32)
    frames = tensor_to_frames(x[0], preprocess.layout, preprocess.channel_order)
    return Clip(
        tensor=x, frames=frames, indices=np.arange(frames.shape[0], dtype=np.int64), source=path
    )


def _read_npy(path: Path, limit: MemoryLimit | None = None) -> np.ndarray:
    """The array, read only after its header's shape and dtype are checked against `limit`
    (memory-mapped first: a header that declares more than the file holds is refused too)."""
    try:
        mapped = np.load(path, allow_pickle=False, mmap_mode="r")
        if not isinstance(mapped, np.ndarray):
            raise ValueError("not a single array")
        if limit is not None:
            limit.check(
                mapped.nbytes + mapped.size * CLIP_BYTES_PER_VALUE,
                f"{path.name} (shape {mapped.shape}, {mapped.dtype})",
                "save a smaller clip",
            )
        return np.array(mapped)
    except ValueError as exc:
        if "greater than file size" in str(exc):
            raise ClipError(
                f"{path}: the file is shorter than its header's shape says; it is truncated "
                "(save it again with np.save)"
            ) from None
        raise ClipError(
            f"{path}: not a plain numeric .npy ({exc}); save it with np.save(arr)"
        ) from None
    except OSError as exc:
        raise ClipError(f"{path}: cannot read .npy ({exc}); check the file is complete") from None


def check_tensor(x: np.ndarray, path: Path) -> None:
    """Reject arrays no model could take: wrong rank, empty, non-numeric, NaN/Inf (also
    values that overflow float32, the dtype the model gets)."""
    if x.ndim not in (4, 5):
        raise ClipError(
            f"{path}: array has shape {x.shape} (rank {x.ndim}); a clip is rank 5 "
            "(1, C, T, H, W) / (1, T, H, W, C), or rank 4 without the batch axis"
        )
    if x.size == 0:
        raise ClipError(
            f"{path}: array has shape {x.shape} with a zero-size axis; it holds no data"
        )
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ClipError(f"{path}: array dtype {x.dtype} is not numeric; save a float32 array")
    with np.errstate(over="ignore", invalid="ignore"):
        finite = np.isfinite(x.astype(np.float32))
    if not finite.all():
        bad = int(np.size(x) - np.count_nonzero(finite))
        raise ClipError(
            f"{path}: array has {bad} NaN/Inf values (as float32); a clip must be finite"
        )


def tensor_to_frames(
    x: np.ndarray, layout: Layout = "NCDHW", channel_order: str = "RGB"
) -> np.ndarray:
    """Display frames for an already-normalised clip ``x`` (no batch axis).

    The tensor is min-max scaled to ``0..255`` over the whole clip (a constant clip
    gives black). One channel is shown grey; 3 channels as colour (BGR flipped to
    RGB); any other count as the grey mean of its channels.

    Returns:
        uint8 RGB ``[T, H, W, 3]``.
    """
    thwc = np.moveaxis(x, 0, -1) if layout == "NCDHW" else x
    thwc = thwc.astype(np.float32)
    lo, hi = float(thwc.min()), float(thwc.max())
    scaled = (thwc - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(thwc)
    channels = scaled.shape[-1]
    if channels == 3:
        rgb = scaled[..., ::-1] if channel_order == "BGR" else scaled
    else:
        grey = scaled if channels == 1 else scaled.mean(axis=-1, keepdims=True)
        rgb = np.repeat(grey, 3, axis=-1)
    return np.ascontiguousarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8))


# ----------------------------------------------------------------- clips


def load_clip(
    path: str | os.PathLike[str],
    preprocess: Preprocess,
    *,
    sampling: Sampling = "uniform",
    loop: bool = False,
    limit: MemoryLimit | None = None,
) -> Clip:
    """Load one model-ready clip from a video, a frame folder or a ``.npy`` tensor.

    `limit` bounds what reading it may hold (see cfp_onnx.resources); None: no guard.

    Raises:
        ClipError: the input is unreadable, too short (without ``loop``), or a bad tensor.
        ResourceError: the clip would not fit in `limit`.
    """
    p = as_path(path, "clip must be a path to a .npy / video / frame folder", ClipError)
    if p.suffix.lower() in TENSOR_EXTENSIONS and not p.is_dir():
        _check_path(p)
        return _load_tensor(p, preprocess, limit)
    source = _open_source(p)
    indices, frames = source.sampled(
        lambda n: sample_indices(n, preprocess.frames, sampling, preprocess.stride, loop=loop),
        _spatial(preprocess, limit),
    )
    return _make_clip(source, indices, frames, preprocess)


def window_spans(
    path: str | os.PathLike[str],
    preprocess: Preprocess,
    window: int | None = None,
    stride: int | None = None,
    *,
    loop: bool = False,
) -> tuple[_Source, list[np.ndarray]]:
    """The source and each window's sampled frame indices (counting frames, decoding none).

    Raises:
        ClipError: unreadable input, a ``.npy`` (already one clip), or a video
            shorter than one window without ``loop``.
        OptionError: ``window`` shorter than ``preprocess.frames``.
    """
    p = Path(path)
    if p.suffix.lower() in TENSOR_EXTENSIONS:
        raise ClipError(
            f"{p}: a .npy is one preprocessed clip; use load_clip, or pass the video for windows"
        )
    window = window or preprocess.frames
    if window < preprocess.frames:
        raise OptionError(f"window {window} is shorter than the model's {preprocess.frames} frames")
    source = _open_source(p)
    spans = sliding_windows(source.count(), window, stride or window, loop=loop)
    return source, [span[sample_indices(window, preprocess.frames)] for span in spans]


def iter_windows(
    path: str | os.PathLike[str],
    preprocess: Preprocess,
    window: int | None = None,
    stride: int | None = None,
    *,
    loop: bool = False,
    limit: MemoryLimit | None = None,
) -> Iterator[Clip]:
    """Clips for sliding windows over a whole video, one at a time, in order.

    The video is decoded once; only the frames of windows not yet yielded are held, so
    memory does not grow with the video's length.

    Args:
        window: window length in source frames (default ``preprocess.frames``); a
            longer window is sampled uniformly down to ``preprocess.frames``.
        stride: frames between window starts (default ``window``: no overlap).
    """
    source, picks = window_spans(path, preprocess, window, stride, loop=loop)
    for idx, frames in source.stream(picks, _spatial(preprocess, limit)):
        yield _make_clip(source, idx, frames, preprocess)


def _make_clip(
    source: _Source, indices: np.ndarray, frames: np.ndarray, preprocess: Preprocess
) -> Clip:
    return Clip(
        tensor=to_tensor(frames, preprocess),
        frames=frames,
        indices=np.asarray(indices, dtype=np.int64),
        source=source.path,
        fps=source.fps,
    )


# ----------------------------------------------------------------- writing


def write_video(
    path: str | os.PathLike[str], frames: np.ndarray | Sequence[np.ndarray], fps: float = 8
) -> Path:
    """Encode uint8 RGB frames ``[T, H, W, 3]`` to a video (mp4v; MJPG for .avi).

    Written to a temporary file in the same folder and renamed, so the video
    appears whole or not at all.

    Raises:
        ClipError: frames that are not uint8 ``[T, H, W, 3]`` or are empty.
        OutputError: OpenCV cannot open a writer for ``path``.
    """
    arr = np.asarray(frames)
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8 or arr.shape[0] == 0:
        raise ClipError(
            f"write_video needs non-empty uint8 frames [T, H, W, 3]; got {arr.dtype} {arr.shape}"
        )
    out = Path(path)
    fourcc = cv2.VideoWriter.fourcc(*("MJPG" if out.suffix.lower() == ".avi" else "mp4v"))
    try:
        fd, tmp = tempfile.mkstemp(suffix=out.suffix, prefix=f".{out.stem}.", dir=out.parent)
    except OSError as exc:
        raise OutputError(
            f"{out}: cannot write here ({exc.strerror}); check the folder exists and is writable"
        ) from None
    os.close(fd)
    try:
        permissions(tmp, folder=False)
        _encode(Path(tmp), arr, fourcc, fps)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _encode(path: Path, frames: np.ndarray, fourcc: int, fps: float) -> None:
    height, width = frames.shape[1:3]
    writer = cv2.VideoWriter(str(path), fourcc, float(fps), (width, height))
    if not writer.isOpened():
        raise OutputError(f"{path}: OpenCV cannot write this video; use a .mp4 or .avi path")
    try:
        for frame in frames:
            writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    finally:
        writer.release()
