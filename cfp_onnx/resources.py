"""The ``--max-memory`` guard: refuse an explain that would not fit in memory, before it runs.

A hostile or simply huge model (a 1x1x1 conv to a million channels on a full-HD clip) must
not take the machine down: the run is estimated from the graph's static shapes (fixed
from the clip) and refused with the estimate in the message when it exceeds the limit.

The estimate, in bytes (activations counted as float32; the graph keeps no dtypes):

- **weights**: every initializer's size (dims x item size), inline or on disk;
- **activations**: the clip plus the three largest intermediate tensors (a conv's input
  and output, and a residual stream kept alive beside them);
- **exposed maps**: every full feature map the run returns for tubes
  (``Explainer.run(full=...)``), plus ``tubes.CHUNK`` clip-sized float32 tubes when any
  map is exposed (the upsampling works on that many kernels at a time);
- **pyramid scratch**: three float64 ``C_out x C_in`` arrays of the largest layer the
  pyramid can expand (back-step scores, normalised scores, kept mask).

A clip is checked before it is read, by what the user controls: a ``.npy`` by its
header's shape and dtype (the array is memory-mapped, never read whole first), a video
or frame folder frame by frame before each resize, at ``CLIP_BYTES_PER_VALUE`` bytes per
value of the decoded clip (its uint8 frames and the float32 copies normalising makes).

onnxruntime's own workspaces (im2col buffers) are not counted, so this is an estimate of
what must be held, not a ceiling on the process. The default limit is 80% of the memory
available now (``MemAvailable`` in ``/proc/meminfo``; elsewhere physical pages x page
size from ``os.sysconf``), or no limit where neither can be read.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cfp_onnx.errors import OptionError, ResourceError

DEFAULT_FRACTION = 0.8
"""Share of the available memory an explain may plan to use by default."""
ACTIVATIONS_LIVE = 3
"""Intermediate tensors assumed alive at once (conv input, output, a residual stream)."""
SCRATCH_ARRAYS = 3
"""float64 C_out x C_in arrays a back-step holds at once."""
FLOAT32 = 4
UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)
NO_LIMIT = ("off", "none", "unlimited")
CLIP_BYTES_PER_VALUE = 1 + 3 * FLOAT32
"""Bytes a decoded clip holds per value: uint8 frames, and three float32 arrays at once
while it is normalised into the model's input (scaled, centred, transposed)."""


@dataclass(frozen=True, slots=True)
class Estimate:
    """Bytes an explain is expected to hold, by what holds them."""

    weights: int
    activations: int
    exposed: int
    scratch: int

    @property
    def total(self) -> int:
        return self.weights + self.activations + self.exposed + self.scratch

    def describe(self) -> str:
        return (
            f"weights {format_size(self.weights)}, activations {format_size(self.activations)}, "
            f"feature maps for tubes {format_size(self.exposed)}, pyramid scratch "
            f"{format_size(self.scratch)}"
        )


def parse_size(value: str | int | float | None) -> int | None:
    """Bytes from ``2G``, ``512M``, ``1.5GiB``, ``4096`` (binary units), or None for no limit.

    Raises:
        OptionError: not a size, or not positive.
    """
    if value is None or (isinstance(value, str) and value.strip().lower() in NO_LIMIT):
        return None
    if isinstance(value, bool):
        raise OptionError(f"max memory must be a size like 2G, 512M or bytes (got {value!r})")
    if isinstance(value, (int, float, np.integer, np.floating)):
        number, unit = float(value), ""
    else:
        match = _SIZE.match(str(value))
        if match is None:
            raise OptionError(
                f"max memory {value!r} is not a size; write bytes or a number with K, M, G or T "
                "(e.g. 2G, 512M), or 'off'"
            )
        number, unit = float(match.group(1)), match.group(2).upper()
    size = number * UNITS[unit]
    if not math.isfinite(size) or size < 1:
        raise OptionError(f"max memory must be at least 1 byte (got {value!r})")
    return int(size)


def format_size(n: float) -> str:
    """``1.5 GiB`` style, for messages."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def available_memory(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """Bytes of memory available now, or None where the system does not say."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, AttributeError):
        return None


def default_limit() -> int | None:
    """80% of the available memory, or None (no guard) where it cannot be read."""
    free = available_memory()
    return int(free * DEFAULT_FRACTION) if free else None


@dataclass(frozen=True, slots=True)
class MemoryLimit:
    """The guard's limit in bytes (None: no guard) and where it came from, for messages."""

    bytes: int | None
    source: str

    @classmethod
    def of(cls, max_memory: str | int | float | None = None) -> MemoryLimit:
        """``None``: the default (from the memory available now); ``"off"``: no guard."""
        if max_memory is None:
            return cls(default_limit(), f"default: {DEFAULT_FRACTION:.0%} of the available memory")
        return cls(parse_size(max_memory), "--max-memory")

    def check(self, need: int, what: str, advice: str, detail: str = "") -> None:
        """Raises ResourceError when `need` bytes (`detail`: what they are) exceed the limit."""
        if self.bytes is not None and need > self.bytes:
            raise ResourceError(
                f"{what} would need about {format_size(need)}{detail}; the memory limit is "
                f"{format_size(self.bytes)} ({self.source}): {advice}, or raise --max-memory "
                "(e.g. --max-memory 64G, or off)"
            )


def weight_bytes(initializers: Iterable[Any]) -> int:
    """Every initializer's size from its declared dims (nothing is read)."""
    total = 0
    for t in initializers:
        itemsize = np.dtype(_np_dtype(t.data_type)).itemsize
        total += int(np.prod([int(d) for d in t.dims], dtype=np.float64)) * itemsize
    return total


def _np_dtype(data_type: int) -> np.dtype:
    import onnx

    try:
        return onnx.helper.tensor_dtype_to_np_dtype(data_type)
    except (KeyError, ValueError, TypeError):
        return np.dtype(np.float32)


def _bytes(shape: tuple[int, ...], itemsize: int = FLOAT32) -> int:
    return int(np.prod(shape, dtype=np.float64)) * itemsize


@dataclass(frozen=True)
class Shapes:
    """What an estimate reads of an analysed model: static shapes, never the model itself."""

    input_shape: tuple[int, ...]
    weights: int  # bytes of every initializer
    tensor_bytes: dict[str, int]  # float32 bytes of each produced, non-constant tensor
    widest: dict[int, int]  # layer -> c_out * c_in (back-step scratch)
    map_bytes: dict[int, int]  # layer -> float32 bytes of all its kernels' maps (worst case)


def estimate(shapes: Shapes, expanded: Sequence[int], reachable: Sequence[int],
             full: Sequence[str] = ()) -> Estimate:  # fmt: skip
    """What a run at the depth whose layers are `expanded` / `reachable`, returning the
    full maps `full`, would hold (see module doc). With maps, every kernel's map of every
    reachable layer is counted (the report keeps them all) as a worst case."""
    sizes = sorted(shapes.tensor_bytes.values(), reverse=True)
    activations = _bytes(shapes.input_shape) + sum(sizes[:ACTIVATIONS_LIVE])
    exposed = sum(shapes.tensor_bytes.get(t, 0) for t in full)
    if full:
        exposed += _tube_chunk(shapes.input_shape)
        exposed += sum(shapes.map_bytes.get(i, 0) for i in reachable)
    return Estimate(
        weights=shapes.weights,
        activations=activations,
        exposed=exposed,
        scratch=SCRATCH_ARRAYS * 8 * max((shapes.widest[i] for i in expanded), default=0),
    )


def _tube_chunk(input_shape: tuple[int, ...]) -> int:
    from cfp_onnx.tubes import CHUNK

    spatial = sorted(input_shape[1:])[-3:]  # frames and size, whatever the layout
    return CHUNK * _bytes(tuple(spatial))


def check(est: Estimate, limit: MemoryLimit) -> None:
    """Raises ResourceError when `est` exceeds `limit`."""
    advice = "use a smaller clip or depth, skip tubes and report (--no-tubes --no-report)"
    limit.check(est.total, "this explain", advice, detail=f": {est.describe()}")
