"""Saliency tubes (SPEC §6): where each pyramid kernel looks, over space and time.

A kernel ``(L, j)`` that has children shows the sum of the input channels its
back-step kept (the activations ``L`` reads; optionally weighted by ``r'``); a
kernel without children shows its own output map ``y_L[j]``. Maps come from the
run that gave the prediction (``Explainer.plan(depth, maps=True)``),
are upsampled trilinearly (``align_corners=False``) to the clip, min-max
normalised over the whole tube, coloured with OpenCV's JET and blended half and
half with the display frames.

The maps of all kernels reading one tensor are one matrix product (selection
``[kernels, C]`` x features ``[C, T*H*W]``) and upsampling is three small matrix
products, all on ``xp`` (NumPy or CuPy). Only the kernels asked for are computed.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from cfp_onnx.errors import OptionError, OutputError
from cfp_onnx.pyramid import Pyramid
from cfp_onnx.xp import to_numpy

if TYPE_CHECKING:
    from cfp_onnx.api import Explainer, Run

Array = Any  # numpy.ndarray or cupy.ndarray
MOTION_DROP = 0.5
"""A kernel whose pooled response keeps at most this share under frame shuffling is 'motion'."""
CHUNK = 16
"""Kernels upsampled at once: bounds memory to CHUNK full-resolution tubes."""


# ----------------------------------------------------------------- which maps a run must return


def shown_nodes(pyr: Pyramid, per_depth: int = 64) -> np.ndarray:
    """The `per_depth` most relevant kernels of each depth (ties: lower id), in id order."""
    if per_depth < 1:
        raise OptionError(f"kernels per depth must be >= 1 (got {per_depth})")
    keep = []
    for d in np.unique(pyr.node_depth).tolist():
        ids = np.flatnonzero(pyr.node_depth == d)
        order = np.lexsort((ids, -pyr.node_relevance[ids]))
        keep.append(ids[order[:per_depth]])
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)


# ----------------------------------------------------------------- raw maps


@dataclass(frozen=True)
class Selection:
    """Kernels that read one tensor: ``maps = weights @ full[tensor]`` (channels x space)."""

    tensor: str
    rows: np.ndarray  # positions in the caller's node list
    weights: np.ndarray  # [len(rows), C] float32


def selections(
    ex: Explainer,
    pyr: Pyramid,
    nodes: np.ndarray,
    available: Mapping[str, Any],
    *,
    weighted: bool = False,
) -> list[Selection]:
    """Group kernels by the tensor their map is read from, with their selection rows.

    A kernel with children reads the input channels its back-step kept; so does one with
    kept channels whose output map was not returned; any other kernel shows its own output
    channel. Vectorised over kernels: the loops run over layers and tensors only.

    Raises:
        OptionError: a kernel's map is not among `available` (the run did not request it).
    """
    nodes = np.asarray(nodes, dtype=np.int64)
    n_all = len(pyr.node_layer)
    parents = pyr.parents
    has_kept = np.zeros(n_all, dtype=bool)
    has_kept[pyr.kept_node] = True
    ins = np.array([lay.input in available for lay in ex.layers], dtype=bool)
    outs = np.array([lay.output in available for lay in ex.layers], dtype=bool)
    layer = pyr.node_layer[nodes]
    use_in = (parents[nodes] | (has_kept[nodes] & ~outs[layer])) & ins[layer]
    use_out = ~use_in & outs[layer]
    missing = np.flatnonzero(~(use_in | use_out))
    if len(missing):
        raise OptionError(
            f"no feature map for kernel {pyr.kernel_name(int(nodes[missing[0]]))!r}: run the "
            "clip with full=explainer.map_tensors(depth) to show its tube"
        )
    users: dict[str, list[tuple[int, bool]]] = {}  # tensor -> (layer, reads it as input)
    for li in np.unique(layer).tolist():
        lay = ex.layers[li]
        users.setdefault(lay.input, []).append((li, True))
        users.setdefault(lay.output, []).append((li, False))
    kept_layer = pyr.node_layer[pyr.kept_node]
    by_layer = np.argsort(kept_layer, kind="stable")  # kept pairs, grouped by layer
    bounds = np.searchsorted(kept_layer[by_layer], np.arange(len(ex.layers) + 1))
    out = []
    for name, readers in users.items():
        mask = np.zeros(len(nodes), dtype=bool)
        for li, reads_input in readers:
            mask |= (layer == li) & (use_in if reads_input else use_out)
        rows = np.flatnonzero(mask)
        if len(rows):
            parts = [by_layer[bounds[li] : bounds[li + 1]] for li, reads in readers if reads]
            pairs = np.concatenate(parts) if parts else np.zeros(0, np.int64)
            w = _weights(ex, pyr, nodes[rows], use_in[rows], readers, pairs, weighted)
            out.append(Selection(name, rows, w))
    return out


def _weights(
    ex: Explainer,
    pyr: Pyramid,
    nodes: np.ndarray,
    from_input: np.ndarray,
    readers: list[tuple[int, bool]],
    pairs: np.ndarray,
    weighted: bool,
) -> np.ndarray:
    """Selection rows ``[len(nodes), C]`` over one tensor: kept input channels (1 or r'),
    or the kernel's own output channel. `pairs`: the kept pairs of the layers that read
    this tensor as input (the only ones that can land here)."""
    lay = ex.layers[readers[0][0]]
    weights = np.zeros((len(nodes), lay.c_in if readers[0][1] else lay.c_out), np.float32)
    row_of = np.full(len(pyr.node_layer), -1, dtype=np.int64)
    row_of[nodes[from_input]] = np.flatnonzero(from_input)
    row = row_of[pyr.kept_node[pairs]]
    take = row >= 0
    chans, scores = pyr.kept_channel[pairs][take], pyr.kept_score[pairs][take]
    weights[row[take], chans] = scores if weighted else 1.0
    own = np.flatnonzero(~from_input)
    weights[own, pyr.node_channel[nodes[own]]] = 1.0
    return weights


def raw_maps(xp: ModuleType, full: Mapping[str, Any], sel: Selection) -> Array:
    """``[k, T', H', W']`` maps at feature resolution: one matrix product per tensor."""
    x = xp.asarray(full[sel.tensor], dtype=xp.float32)
    x = x.reshape(x.shape[0], *(1,) * max(0, 4 - x.ndim), *x.shape[1:])  # (C, T, H, W)
    maps = xp.asarray(sel.weights) @ x.reshape(x.shape[0], -1)
    return maps.reshape(len(sel.rows), *x.shape[1:])


# ----------------------------------------------------------------- upsampling


def linear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``[n_out, n_in]`` 1-D linear interpolation, half-pixel centres (align_corners=False).

    Matches ``torch.nn.functional.interpolate(mode='linear', align_corners=False)``:
    source coordinates below zero are clamped to zero, the upper neighbour to the edge.
    """
    src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    src = np.maximum(src, 0.0)
    lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    m = np.zeros((n_out, n_in), dtype=np.float64)
    np.add.at(m, (np.arange(n_out), lo), 1.0 - frac)
    np.add.at(m, (np.arange(n_out), hi), frac)
    return m.astype(np.float32)


def upsample(xp: ModuleType, maps: Array, size: Sequence[int]) -> Array:
    """Trilinear resize of ``[k, t, h, w]`` to ``[k, *size]``: three matrix products."""
    k, t, h, w = maps.shape
    big_t, big_h, big_w = (int(s) for s in size)
    x = maps @ xp.asarray(linear_matrix(w, big_w).T)  # [k, t, h, W]
    x = xp.asarray(linear_matrix(h, big_h)) @ x  # [k, t, H, W]
    x = xp.asarray(linear_matrix(t, big_t)) @ x.reshape(k, t, big_h * big_w)
    return x.reshape(k, big_t, big_h, big_w)


def normalise(xp: ModuleType, tubes: Array) -> Array:
    """Min-max over each whole tube; a constant tube becomes zeros."""
    flat = tubes.reshape(len(tubes), -1)
    lo = flat.min(axis=1)[:, None]
    span = flat.max(axis=1)[:, None] - lo
    out = xp.where(span > 0, (flat - lo) / xp.where(span > 0, span, 1), 0)
    return out.reshape(tubes.shape).astype(xp.float32)


# ----------------------------------------------------------------- the tube maker


@dataclass(frozen=True)
class Tubes:
    """Normalised tubes of some kernels: ``maps[i]`` is node ``nodes[i]``, values in [0, 1]."""

    nodes: np.ndarray
    maps: np.ndarray  # [K, T, H, W] float32

    @property
    def profiles(self) -> np.ndarray:
        """Temporal profile of each kernel: its tube's mean per frame, ``[K, T]``."""
        return self.maps.mean(axis=(2, 3))


class TubeMaker:
    """Tubes of one pyramid from one run, computed only for the kernels asked for."""

    def __init__(
        self,
        ex: Explainer,
        pyr: Pyramid,
        run: Run,
        size: Sequence[int],
        *,
        weighted: bool = False,
    ) -> None:
        self.ex, self.pyr, self.run = ex, pyr, run
        self.size = tuple(int(s) for s in size)
        self.weighted = weighted
        self._made: dict[tuple[bytes, frozenset[str]], list[Selection]] = {}

    def raw(self, nodes: np.ndarray, full: Mapping[str, Any] | None = None) -> list[Array]:
        """Feature-resolution maps of `nodes` (from `full`, default this run's maps)."""
        out: list[Array] = [None] * len(nodes)
        for rows, maps in self.blocks(nodes, full):
            for i, pos in enumerate(rows.tolist()):
                out[pos] = maps[i]
        return out

    def blocks(
        self, nodes: np.ndarray, full: Mapping[str, Any] | None = None
    ) -> Iterator[tuple[np.ndarray, Array]]:
        """The maps of `nodes` a source tensor at a time: ``(rows, maps)``, where
        ``maps[i]`` (``[T', H', W']``) is the map of ``nodes[rows[i]]``."""
        full = self.run.full if full is None else full
        for sel in self._selections(nodes, full):
            yield sel.rows, raw_maps(self.ex.xp, full, sel)

    def _selections(self, nodes: np.ndarray, full: Mapping[str, Any]) -> list[Selection]:
        """`selections`, made once per node list and set of maps (the frame-shuffle run
        reads the same kernels from maps of the same tensors)."""
        nodes = np.asarray(nodes, dtype=np.int64)
        key = (nodes.tobytes(), frozenset(full))
        if key not in self._made:
            self._made.clear()  # keep one: a maker is asked for one node list at a time
            self._made[key] = selections(self.ex, self.pyr, nodes, full, weighted=self.weighted)
        return self._made[key]

    def tubes(self, nodes: Sequence[int] | np.ndarray) -> Tubes:
        """Upsampled, normalised tubes of `nodes`, on the host."""
        nodes = np.asarray(nodes, dtype=np.int64)
        parts = [to_numpy(t) for t in self._chunks(nodes)]
        maps = np.concatenate(parts) if parts else np.zeros((0, *self.size), np.float32)
        return Tubes(nodes, maps)

    def _chunks(self, nodes: np.ndarray) -> Iterator[Array]:
        xp = self.ex.xp
        raw = self.raw(nodes)
        for start in range(0, len(nodes), CHUNK):
            part = raw[start : start + CHUNK]
            yield normalise(xp, _upsample_mixed(xp, part, self.size))

    def responses(self, nodes: np.ndarray, full: Mapping[str, Any] | None = None) -> np.ndarray:
        """Pooled (rectified, averaged) response of each kernel's map, float64: one
        reduction per source tensor."""
        full = self.run.full if full is None else full
        out = np.zeros(len(nodes), dtype=np.float64)
        for sel in self._selections(nodes, full):
            maps = raw_maps(self.ex.xp, full, sel)
            pooled = self.ex.xp.maximum(maps, 0).reshape(len(sel.rows), -1).mean(axis=1)
            out[sel.rows] = to_numpy(pooled)
        return out


def _upsample_mixed(xp: ModuleType, part: list[Array], size: tuple[int, ...]) -> Array:
    """Upsample maps of several resolutions, one batched resize per resolution, in order."""
    out: list[Array] = [None] * len(part)
    for shape in dict.fromkeys(m.shape for m in part):
        idx = [i for i, m in enumerate(part) if m.shape == shape]
        block = upsample(xp, xp.stack([part[i] for i in idx]), size)
        for k, i in enumerate(idx):
            out[i] = block[k]
    return xp.stack(out)


# ----------------------------------------------------------------- motion vs appearance


@dataclass(frozen=True)
class MotionTest:
    """Frame-shuffle test: ``ratio`` = shuffled / original pooled response per kernel."""

    nodes: np.ndarray
    original: np.ndarray
    shuffled: np.ndarray
    permutation: np.ndarray  # the frame order used

    @property
    def ratio(self) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.original > 0, self.shuffled / self.original, np.nan)

    @property
    def labels(self) -> tuple[str, ...]:
        """``motion`` when the response falls by at least half, ``appearance`` otherwise,
        ``inactive`` for a kernel with no positive response to the clip."""
        return tuple(
            "inactive" if not np.isfinite(r) else "motion" if r <= MOTION_DROP else "appearance"
            for r in self.ratio.tolist()
        )


def shuffle_order(frames: int, seed: int = 0) -> np.ndarray:
    """A seeded frame permutation that moves every frame it can (no identity for T >= 2)."""
    rng = np.random.default_rng(seed)
    for _ in range(100):
        perm = rng.permutation(frames)
        if frames < 2 or not np.any(perm == np.arange(frames)):
            return perm
    return np.roll(np.arange(frames), 1)


def shuffle_frames(tensor: np.ndarray, time_axis: int, perm: np.ndarray) -> np.ndarray:
    """The clip with its frames reordered along `time_axis`."""
    return np.ascontiguousarray(np.take(tensor, perm, axis=time_axis))


def motion_test(
    maker: TubeMaker,
    nodes: np.ndarray,
    shuffled: Run,
    perm: np.ndarray,
    original: np.ndarray | None = None,
) -> MotionTest:
    """Compare each kernel's pooled response on the clip (`original`, if already known) and
    on its shuffled twin."""
    return MotionTest(
        nodes=np.asarray(nodes, dtype=np.int64),
        original=maker.responses(nodes) if original is None else original,
        shuffled=maker.responses(nodes, shuffled.full),
        permutation=np.asarray(perm),
    )


# ----------------------------------------------------------------- pictures


def overlay(frames: np.ndarray, tube: np.ndarray) -> np.ndarray:
    """JET-coloured tube ``[T, H, W]`` in [0, 1] blended 50/50 on RGB frames ``[T, H, W, 3]``."""
    if frames.shape[:3] != tube.shape:
        raise OptionError(f"tube shape {tube.shape} does not fit frames {frames.shape[:3]}")
    grey = np.clip(np.rint(tube * 255), 0, 255).astype(np.uint8)
    heat = cv2.applyColorMap(grey.reshape(-1, grey.shape[-1]), cv2.COLORMAP_JET)
    heat = cv2.cvtColor(heat, cv2.COLOR_BGR2RGB).reshape(frames.shape)
    return blend(frames, heat)


def blend(frames: np.ndarray, rgb: np.ndarray) -> np.ndarray:
    """Colours laid half and half on the frames (SPEC §6), uint8 RGB."""
    return cv2.addWeighted(frames, 0.5, rgb, 0.5, 0)


def strip(frames: np.ndarray, gap: int = 2) -> np.ndarray:
    """All frames side by side, `gap` white pixels apart: one RGB image."""
    t, h, w, _ = frames.shape
    out = np.full((h, t * w + (t - 1) * gap, 3), 255, dtype=np.uint8)
    for i, f in enumerate(frames):
        out[:, i * (w + gap) : i * (w + gap) + w] = f
    return out


def stack(frames: np.ndarray, shift: int | None = None) -> np.ndarray:
    """The paper's tube picture: frames stacked in depth, each drawn up-right of the last."""
    t, h, w, _ = frames.shape
    shift = shift if shift is not None else max(2, min(h, w) // 8)
    out = np.full((h + (t - 1) * shift + 2, w + (t - 1) * shift + 2, 3), 255, dtype=np.uint8)
    for i in range(t - 1, -1, -1):  # first frame in front, bottom left
        y, x = (t - 1 - i) * shift, i * shift
        out[y : y + h + 2, x : x + w + 2] = 40
        out[y + 1 : y + 1 + h, x + 1 : x + 1 + w] = frames[i]
    return out


def write_image(path: Path, rgb: np.ndarray) -> None:
    """Write an RGB image (format from the suffix)."""
    ok, buf = cv2.imencode(path.suffix, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    _write_encoded(path, ok, buf)


def write_animation(path: Path, frames: np.ndarray, fps: float = 8.0) -> None:
    """Animated GIF or WebP (from the suffix), looping forever."""
    anim = cv2.Animation()
    anim.frames = [cv2.cvtColor(f, cv2.COLOR_RGB2BGR) for f in frames]
    anim.durations = [round(1000 / fps)] * len(frames)
    anim.loop_count = 0
    ok, buf = cv2.imencodeanimation(path.suffix, anim)
    _write_encoded(path, ok, buf)


def _write_encoded(path: Path, ok: bool, buf: np.ndarray) -> None:
    """Encoded in memory, written by Python: a full disk is our OSError (then one line),
    never libpng's own "Write Error" on stderr."""
    if not ok:
        raise OutputError(f"cannot encode {path.name} as {path.suffix}")
    path.write_bytes(buf.tobytes())


def write_kernel_files(
    folder: Path,
    stem: str,
    frames: np.ndarray,
    fps: float = 8.0,
    kinds: Sequence[str] = ("strip", "gif", "stack"),
) -> list[str]:
    """Strip PNG, animated GIF and/or stacked tube PNG of one blended tube; returns names."""
    names = []
    if "strip" in kinds:
        names.append(f"{stem}_strip.png")
        write_image(folder / names[-1], strip(frames))
    if "gif" in kinds:
        names.append(f"{stem}.gif")
        write_animation(folder / names[-1], frames, fps)
    if "stack" in kinds:
        names.append(f"{stem}_stack.png")
        write_image(folder / names[-1], stack(frames))
    return names


def encode_frames(frames: np.ndarray, *, fmt: str = ".jpg", quality: int = 85) -> list[str]:
    """Frames as ``data:`` URLs for an HTML page (JPEG by default, PNG with ``.png``)."""
    mime = "image/png" if fmt == ".png" else "image/jpeg"
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if mime == "image/jpeg" else []
    out = []
    for f in frames:
        ok, buf = cv2.imencode(fmt, cv2.cvtColor(f, cv2.COLOR_RGB2BGR), params)
        if not ok:
            raise OutputError(f"cannot encode a frame as {fmt}")
        out.append(f"data:{mime};base64," + base64.b64encode(buf.tobytes()).decode("ascii"))
    return out


def safe_stem(node: int, layer: str, channel: int, limit: int = 60) -> str:
    """A file name for a kernel: node id, then the layer name reduced to safe characters."""
    clean = "".join(c if c.isalnum() or c in "-_." else "_" for c in layer).strip("._")
    return f"n{node:05d}_{clean[:limit] or 'layer'}_c{channel}"
