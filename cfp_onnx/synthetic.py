"""A seeded, procedural action dataset whose classes differ only in motion.

Every clip shows one class-defining object (the *actor*) among distractor
shapes on a textured, noisy background. Actor and distractors are drawn from
the same shape family (bar, triangle, ellipse -- all elongated, so rotation
shows), the same sizes and the same colour distribution, whatever the class.
Only the actor's motion tells the class, so a model must use time; the
per-frame ground-truth mask of the actor lets benchmarks score saliency tubes.

Trajectories are centred on the middle frame: the actor's position, size and
orientation at frame ``T // 2`` follow the same distribution for every class.
Distractors are static or drift at most ``0.08 * size`` over the whole clip,
far slower than any moving actor (at least ``0.3 * size``). The actor is drawn
last, so it is never occluded and its mask is exactly the pixels it covers.

Polygon vertices for all frames are computed at once with NumPy; each polygon
is filled by OpenCV (about a microsecond), and noise comes from raw random
bytes, so a few thousand 16x112x112 clips take seconds.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from cfp_onnx.errors import OptionError

CLASSES: tuple[str, ...] = (
    "move_left",
    "move_right",
    "move_up",
    "move_down",
    "rotate",
    "grow",
    "shrink",
    "blink",
    "bounce",
)
SHAPES: tuple[str, ...] = ("bar", "triangle", "ellipse")

_SUBPIXEL = 4  # cv2 fixed-point bits: vertices at 1/16 pixel
_NOISE_MASK = np.uint8(15)  # per-frame sensor noise, uniform 0..15
_DRIFT_MAX = 0.08  # distractor travel over a whole clip, fraction of size
_MOVE_RANGE = (0.3, 0.5)  # actor travel for the move_* classes, fraction of size


@dataclass(frozen=True, slots=True, eq=False)
class SyntheticClip:
    """One generated clip.

    Attributes:
        frames: uint8 RGB ``[T, H, W, 3]``.
        mask: bool ``[T, H, W]``, True where the actor is visible.
        label: index into ``CLASSES``.
    """

    frames: np.ndarray
    mask: np.ndarray
    label: int


@dataclass(frozen=True, slots=True)
class _Motion:
    """Per-frame pose of one object; every array has length T."""

    cx: np.ndarray
    cy: np.ndarray
    angle: np.ndarray
    scale: np.ndarray
    visible: np.ndarray


@dataclass(frozen=True, slots=True)
class _Shape:
    """What an object looks like: outline (unit polygon), size and colour."""

    outline: np.ndarray  # [K, 2] float, long half-axis 1
    radius: float  # half-length in pixels at scale 1
    color: tuple[int, int, int]

    @property
    def reach(self) -> float:
        """Furthest any point gets from the centre (scale 1, any angle), plus two pixels of air."""
        return self.radius * float(np.hypot(*self.outline.T).max()) + 2.0


# ----------------------------------------------------------------- appearance


def _outline(kind: str, aspect: float) -> np.ndarray:
    """Unit polygon for a shape kind: long half-axis 1 along x, short ``aspect``."""
    if kind == "bar":
        return np.array([[1, aspect], [-1, aspect], [-1, -aspect], [1, -aspect]], dtype=np.float64)
    if kind == "triangle":
        return np.array([[1, 0], [-1, aspect], [-1, -aspect]], dtype=np.float64)
    theta = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    return np.stack([np.cos(theta), aspect * np.sin(theta)], axis=1)


def _random_shape(rng: np.random.Generator, size: int) -> _Shape:
    """Same family, sizes and colours for actor and distractors, whatever the class."""
    kind = SHAPES[int(rng.integers(len(SHAPES)))]
    outline = _outline(kind, float(rng.uniform(0.35, 0.55)))
    return _Shape(outline, float(rng.uniform(0.09, 0.13)) * size, _bright_color(rng))


def _bright_color(rng: np.random.Generator) -> tuple[int, int, int]:
    """A saturated, bright colour of random hue: it stands out on the dark background."""
    hsv = np.array(
        [[[rng.uniform(0, 180), rng.uniform(115, 190), rng.uniform(215, 255)]]], dtype=np.float32
    )
    rgb = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)[0, 0]
    return int(rgb[0]), int(rgb[1]), int(rgb[2])


def _background(rng: np.random.Generator, frames: int, size: int) -> np.ndarray:
    """Static texture (smooth blotches plus fine grain) in the dark range 10..95."""
    cells = int(rng.integers(3, 9))
    coarse = rng.random((cells, cells, 3), dtype=np.float32)
    smooth = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    grain = _noise(rng, (size, size, 3))
    image = np.clip(smooth * 70 + 10, 0, 255).astype(np.uint8) + grain
    return np.repeat(image[None], frames, axis=0)


def _noise(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Uniform 0..15 uint8 noise from raw bytes (4x cheaper than rng.integers)."""
    raw = np.frombuffer(rng.bytes(math.prod(shape)), dtype=np.uint8)
    return (raw & _NOISE_MASK).reshape(shape)


# ----------------------------------------------------------------- motion


def _still(frames: int, x: float, y: float, angle: float) -> _Motion:
    ones = np.ones(frames)
    return _Motion(x * ones, y * ones, angle * ones, ones.copy(), np.ones(frames, dtype=bool))


def _centred_time(frames: int) -> np.ndarray:
    """Time in [-0.5, 0.5] over the clip (0 at the middle frame)."""
    return np.arange(frames) / max(frames - 1, 1) - 0.5


def _linear(dx: float, dy: float) -> Callable[..., _Motion]:
    """A move_* trajectory in direction (dx, dy), travelling 30-50% of the frame."""

    def motion(rng: np.random.Generator, frames: int, size: int, reach: float) -> _Motion:
        travel = rng.uniform(*_MOVE_RANGE) * size
        x = _place(rng, size, reach + abs(dx) * travel / 2)
        y = _place(rng, size, reach + abs(dy) * travel / 2)
        t = _centred_time(frames)
        still = _still(frames, x, y, rng.uniform(0, np.pi))
        return _Motion(
            x + dx * travel * t, y + dy * travel * t, still.angle, still.scale, still.visible
        )

    return motion


def _place(rng: np.random.Generator, size: int, margin: float) -> float:
    """A centre coordinate keeping ``margin`` pixels clear of both edges."""
    margin = min(margin, size / 2)
    return float(rng.uniform(margin, size - margin))


def _rotate(rng: np.random.Generator, frames: int, size: int, reach: float) -> _Motion:
    turn = rng.uniform(0.5, 1.0) * np.pi * rng.choice([-1.0, 1.0])
    still = _still(
        frames, _place(rng, size, reach), _place(rng, size, reach), rng.uniform(0, np.pi)
    )
    angle = still.angle + turn * _centred_time(frames)
    return _Motion(still.cx, still.cy, angle, still.scale, still.visible)


def _zoom(direction: float) -> Callable[..., _Motion]:
    """grow (+1) or shrink (-1): size changes by a factor of 2-2.5 over the clip."""

    def motion(rng: np.random.Generator, frames: int, size: int, reach: float) -> _Motion:
        factor = rng.uniform(2.0, 2.5)
        scale = factor ** (direction * _centred_time(frames))
        margin = reach * math.sqrt(factor)
        still = _still(
            frames, _place(rng, size, margin), _place(rng, size, margin), rng.uniform(0, np.pi)
        )
        return _Motion(still.cx, still.cy, still.angle, scale, still.visible)

    return motion


def _blink(rng: np.random.Generator, frames: int, size: int, reach: float) -> _Motion:
    period = int(rng.integers(2, 5))
    period = max(1, min(period, frames // 4))
    phase = int(rng.integers(2 * period))
    still = _still(
        frames, _place(rng, size, reach), _place(rng, size, reach), rng.uniform(0, np.pi)
    )
    visible = ((np.arange(frames) + phase) // period) % 2 == 0
    return _Motion(still.cx, still.cy, still.angle, still.scale, visible)


def _bounce(rng: np.random.Generator, frames: int, size: int, reach: float) -> _Motion:
    """A ball bouncing on a floor: |sin| height, 1.5-3 bounces per clip."""
    height = rng.uniform(0.25, 0.4) * size
    floor = _place(rng, size, reach + height / 2) + height / 2
    bounces = rng.uniform(1.5, 3.0)
    phase = rng.uniform(0, np.pi)
    t = np.arange(frames) / max(frames - 1, 1)
    y = floor - height * np.abs(np.sin(np.pi * bounces * t + phase))
    still = _still(frames, _place(rng, size, reach), 0.0, rng.uniform(0, np.pi))
    return _Motion(still.cx, y, still.angle, still.scale, still.visible)


_MOTIONS: dict[str, Callable[..., _Motion]] = {
    "move_left": _linear(-1, 0),
    "move_right": _linear(1, 0),
    "move_up": _linear(0, -1),
    "move_down": _linear(0, 1),
    "rotate": _rotate,
    "grow": _zoom(1.0),
    "shrink": _zoom(-1.0),
    "blink": _blink,
    "bounce": _bounce,
}
assert tuple(_MOTIONS) == CLASSES


def _distractor_motion(rng: np.random.Generator, frames: int, size: int, reach: float) -> _Motion:
    """Static (half the time) or a slow drift in a random direction."""
    still = _still(
        frames, _place(rng, size, reach), _place(rng, size, reach), rng.uniform(0, np.pi)
    )
    if rng.random() < 0.5:
        return still
    travel = rng.uniform(0, _DRIFT_MAX) * size
    heading = rng.uniform(0, 2 * np.pi)
    t = _centred_time(frames)
    cx = still.cx + math.cos(heading) * travel * t
    cy = still.cy + math.sin(heading) * travel * t
    return _Motion(cx, cy, still.angle, still.scale, still.visible)


# ----------------------------------------------------------------- drawing


def _polygons(shape: _Shape, motion: _Motion) -> np.ndarray:
    """Fixed-point vertices ``[T, K, 2]`` for every frame at once."""
    cos, sin = np.cos(motion.angle)[:, None], np.sin(motion.angle)[:, None]
    r = (shape.radius * motion.scale)[:, None]
    u, v = shape.outline[None, :, 0] * r, shape.outline[None, :, 1] * r
    x = motion.cx[:, None] + u * cos - v * sin
    y = motion.cy[:, None] + u * sin + v * cos
    return np.rint(np.stack([x, y], axis=-1) * (1 << _SUBPIXEL)).astype(np.int32)


def _draw(
    frames: np.ndarray, shape: _Shape, motion: _Motion, mask: np.ndarray | None = None
) -> None:
    """Fill the object into ``frames`` (and ``mask``) in place, frame by frame."""
    for t, poly in enumerate(_polygons(shape, motion)):
        if not motion.visible[t]:
            continue
        cv2.fillConvexPoly(frames[t], poly, shape.color, lineType=cv2.LINE_8, shift=_SUBPIXEL)
        if mask is not None:
            cv2.fillConvexPoly(mask[t], poly, 1, lineType=cv2.LINE_8, shift=_SUBPIXEL)


def _finish(
    frames: np.ndarray, mask: np.ndarray, label: int, rng: np.random.Generator
) -> SyntheticClip:
    """Add per-frame sensor noise (saturating) and package the clip."""
    noisy = cv2.add(
        frames.reshape(-1, frames.shape[-2] * 3),
        _noise(rng, frames.shape).reshape(-1, frames.shape[-2] * 3),
    )
    return SyntheticClip(noisy.reshape(frames.shape), mask.astype(bool), label)


# ----------------------------------------------------------------- public API


def class_index(label: int | str) -> int:
    """Index of a class given by index or name.

    Raises:
        OptionError: unknown class.
    """
    if isinstance(label, str):
        if label not in CLASSES:
            raise OptionError(
                f"unknown synthetic class {label!r}; choose one of {', '.join(CLASSES)}"
            )
        return CLASSES.index(label)
    if not 0 <= int(label) < len(CLASSES):
        raise OptionError(f"class index {label} is out of range 0..{len(CLASSES) - 1}")
    return int(label)


def make_clip(
    label: int | str,
    rng: np.random.Generator,
    *,
    frames: int = 16,
    size: int = 112,
    distractors: int = 2,
) -> SyntheticClip:
    """Generate one clip of class ``label`` (index or name into ``CLASSES``).

    Raises:
        OptionError: unknown class, fewer than 2 frames, a size below 32, or
            negative ``distractors``.
    """
    index = class_index(label)
    _check_options(frames, size, distractors)
    video = _background(rng, frames, size)
    mask = np.zeros((frames, size, size), dtype=np.uint8)
    for _ in range(distractors):
        shape = _random_shape(rng, size)
        _draw(video, shape, _distractor_motion(rng, frames, size, shape.reach))
    actor = _random_shape(rng, size)
    _draw(video, actor, _MOTIONS[CLASSES[index]](rng, frames, size, actor.reach), mask)
    return _finish(video, mask, index, rng)


def _check_options(frames: int, size: int, distractors: int) -> None:
    if frames < 2 or size < 32 or distractors < 0:
        raise OptionError(
            f"frames={frames}, size={size}, distractors={distractors}: "
            "need frames >= 2 (motion needs time), size >= 32 and distractors >= 0"
        )


def make_dataset(n: int, seed: int, **kw: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Generate ``n`` clips with balanced, shuffled classes, reproducibly from ``seed``.

    Args:
        **kw: ``frames``, ``size``, ``distractors`` as for ``make_clip``.

    Returns:
        ``(frames uint8 [N, T, H, W, 3], masks bool [N, T, H, W], labels int64 [N])``.
    """
    if n < 1:
        raise OptionError(f"n={n}: a dataset needs at least one clip")
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % len(CLASSES)).astype(np.int64)
    frames, size = kw.get("frames", 16), kw.get("size", 112)
    video = np.empty((n, frames, size, size, 3), dtype=np.uint8)
    masks = np.empty((n, frames, size, size), dtype=bool)
    for i, label in enumerate(labels):
        clip = make_clip(int(label), rng, **kw)
        video[i], masks[i] = clip.frames, clip.mask
    return video, masks, labels


DEMO_SEED = 30_000
"""The demo's clips: ``make_clip`` seeded from here, away from every training, validation
and quality seed the benchmarks use (0..99, 10,000, 20,000)."""


def demo_clip(seed: int = 0, *, frames: int = 16, size: int = 112) -> SyntheticClip:
    """The demo's clip: an actor moving right among two static or drifting distractors,
    drawn like every training clip but never seen in training."""
    return make_clip(
        "move_right", np.random.default_rng(DEMO_SEED + seed), frames=frames, size=size
    )
