"""The HTML report: one self-contained file (no network), built from one run per model.

A ``ModelView`` holds what one model's side of a report shows: the clip, top-k
classes, the pyramid's most relevant kernels per depth with their tubes (frames as
``data:`` JPEGs), temporal profiles and frame-shuffle labels. ``render`` turns one
view (``cfp explain``) or two (``cfp compare``) into HTML with jinja2, autoescape on.

Every model-supplied string reaches the page escaped: as HTML text by jinja2, or
inside the embedded JSON with ``<``, ``>`` and ``&`` written as ``\\u003c``-style
escapes, read by the page's script with ``JSON.parse`` and shown via ``textContent``.
A Content-Security-Policy with a per-report nonce allows only the page's own
script and no network at all.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import jinja2
import numpy as np
from markupsafe import Markup

from cfp_onnx import tubes as tubes_mod
from cfp_onnx.pyramid import Pyramid

if TYPE_CHECKING:
    from cfp_onnx.api import Explainer, Run

log = logging.getLogger(__name__)

MAX_NAME = 200
"""Names longer than this are shortened on the page (the full name stays in a tooltip)."""
MAX_LINKS = 4000
"""Links drawn in the graph at most (the most relevant ones)."""


@dataclass(frozen=True)
class ViewOptions:
    """How much of a pyramid a report shows, and whether the shuffle test runs.

    Attributes:
        per_depth: kernels shown per depth (the most relevant).
        top_k: classes listed.
        shuffle: run the frame-shuffle test (one more forward).
        weighted: tube maps weighted by r' (SPEC §6 option).
        tube_dir: also write strip/GIF/stack pictures of each shown kernel here.
        fps: playback speed of tubes and GIFs.
        max_side: frames larger than this are scaled down for the page.
    """

    per_depth: int = 64
    top_k: int = 5
    shuffle: bool = True
    weighted: bool = False
    tube_dir: Path | None = None
    fps: float = 8.0
    max_side: int = 192


@dataclass(frozen=True)
class KernelView:
    """One shown kernel: identity, relevance, tube frames, profile and shuffle label."""

    node: int
    layer: str
    channel: int
    depth: int
    relevance: float
    profile: tuple[float, ...]
    motion: str
    ratio: float | None
    frames: tuple[str, ...]
    files: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelView:
    """One model's side of a report."""

    model: str
    source: str
    frames: tuple[str, ...]
    label: int
    label_name: str | None
    score: float
    top: tuple[tuple[int, str | None, float, float], ...]  # index, name, logit, probability
    theta: float
    depth: int
    head_mode: str
    max_depth_reached: int
    head_best: float
    summary: tuple[tuple[int, int, int, int], ...]
    kernels: tuple[KernelView, ...]
    links: tuple[tuple[int, int, float], ...]  # (parent node, child node, relevance), shown only
    totals: tuple[int, ...]  # kernels per depth in the whole pyramid
    per_depth: int
    class_tube: tuple[str, ...] = field(default=())
    class_tube_caption: str = "class tube (relevance-weighted depth-0 tubes)"

    @property
    def truncated(self) -> bool:
        return any(n > self.per_depth for n in self.totals)


# ----------------------------------------------------------------- building a view


def build_view(
    ex: Explainer,
    pyr: Pyramid,
    run: Run,
    tensor: np.ndarray,
    frames: np.ndarray,
    *,
    time_axis: int,
    source: str,
    class_names: Sequence[str] | None = None,
    options: ViewOptions | None = None,
) -> ModelView:
    """Tubes, profiles and shuffle labels of the shown kernels of `pyr`, as a ModelView.

    `run` must hold ``tubes.map_tensors(ex, pyr.depth)``; `frames` are the uint8 RGB
    display frames ``[T, H, W, 3]`` of `tensor` (the model input, batch axis first).
    """
    opts = options or ViewOptions()
    shown = tubes_mod.shown_nodes(pyr, opts.per_depth) if not pyr.empty else np.zeros(0, int)
    maker = tubes_mod.TubeMaker(ex, pyr, run, frames.shape[:3], weighted=opts.weighted)
    motion = _motion(ex, maker, shown, tensor, time_axis, pyr.depth) if opts.shuffle else None
    kernels = _kernel_views(pyr, maker, shown, frames, motion, opts)
    return ModelView(
        model=pyr.model,
        source=source,
        frames=tuple(tubes_mod.encode_frames(display(frames, opts.max_side))),
        label=pyr.label,
        label_name=pyr.label_name,
        score=pyr.score,
        top=top_classes(pyr.logits, class_names, opts.top_k),
        theta=pyr.theta,
        depth=pyr.depth,
        head_mode=pyr.head_mode,
        max_depth_reached=pyr.max_depth_reached,
        head_best=pyr.head_best,
        summary=tuple(pyr.summary()),
        kernels=kernels,
        links=shown_links(pyr, shown),
        totals=tuple(int((pyr.node_depth == d).sum()) for d in range(pyr.max_depth_reached + 1)),
        per_depth=opts.per_depth,
    )


def _motion(
    ex: Explainer,
    maker: tubes_mod.TubeMaker,
    shown: np.ndarray,
    tensor: np.ndarray,
    time_axis: int,
    depth: int,
) -> tubes_mod.MotionTest | None:
    """The frame-shuffle test: a second forward on the clip with its frames shuffled."""
    if len(shown) == 0:
        return None
    perm = tubes_mod.shuffle_order(tensor.shape[time_axis])
    shuffled = ex.run(
        tubes_mod.shuffle_frames(tensor, time_axis, perm),
        depth=depth,
        full=tubes_mod.map_tensors(ex, depth),
    )
    return tubes_mod.motion_test(maker, shown, shuffled, perm)


def _kernel_views(
    pyr: Pyramid,
    maker: tubes_mod.TubeMaker,
    shown: np.ndarray,
    frames: np.ndarray,
    motion: tubes_mod.MotionTest | None,
    opts: ViewOptions,
) -> tuple[KernelView, ...]:
    """Render the shown kernels' tubes chunk by chunk (bounded memory)."""
    out: list[KernelView] = []
    for start in range(0, len(shown), tubes_mod.CHUNK):
        part = maker.tubes(shown[start : start + tubes_mod.CHUNK])
        for i, node in enumerate(part.nodes.tolist()):
            at = start + i
            out.append(_kernel_view(pyr, node, part.maps[i], frames, motion, at, opts))
    return tuple(out)


def _kernel_view(
    pyr: Pyramid,
    node: int,
    tube: np.ndarray,
    frames: np.ndarray,
    motion: tubes_mod.MotionTest | None,
    at: int,
    opts: ViewOptions,
) -> KernelView:
    layer, channel = pyr.layers[int(pyr.node_layer[node])], int(pyr.node_channel[node])
    blended = tubes_mod.overlay(frames, tube)
    files: tuple[str, ...] = ()
    if opts.tube_dir is not None:
        stem = tubes_mod.safe_stem(node, layer, channel)
        names = tubes_mod.write_kernel_files(opts.tube_dir, stem, blended, opts.fps)
        files = tuple(f"{opts.tube_dir.name}/{n}" for n in names)
    ratio = float(motion.ratio[at]) if motion is not None else math.nan
    return KernelView(
        node=node,
        layer=layer,
        channel=channel,
        depth=int(pyr.node_depth[node]),
        relevance=float(pyr.node_relevance[node]),
        profile=tuple(float(v) for v in tube.mean(axis=(1, 2))),
        motion=motion.labels[at] if motion is not None else "untested",
        ratio=ratio if math.isfinite(ratio) else None,
        frames=tuple(tubes_mod.encode_frames(display(blended, opts.max_side))),
        files=files,
    )


def top_classes(
    logits: np.ndarray, names: Sequence[str] | None, k: int
) -> tuple[tuple[int, str | None, float, float], ...]:
    """The k largest logits with their softmax probabilities."""
    z = np.asarray(logits, dtype=np.float64)
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-z, kind="stable")[:k]
    return tuple(
        (int(i), names[int(i)] if names else None, float(z[i]), float(p[i])) for i in order
    )


def shown_links(pyr: Pyramid, shown: np.ndarray) -> tuple[tuple[int, int, float], ...]:
    """Links whose both ends are shown, the most relevant MAX_LINKS of them."""
    both = np.isin(pyr.link_source, shown) & np.isin(pyr.link_target, shown)
    idx = np.flatnonzero(both)
    idx = idx[np.argsort(-pyr.link_relevance[idx], kind="stable")[:MAX_LINKS]]
    return tuple(
        (int(pyr.link_source[i]), int(pyr.link_target[i]), float(pyr.link_relevance[i]))
        for i in np.sort(idx)
    )


def display(frames: np.ndarray, max_side: int) -> np.ndarray:
    """Frames scaled down (area interpolation) so neither side exceeds `max_side`."""
    h, w = frames.shape[1:3]
    scale = max_side / max(h, w)
    if scale >= 1:
        return frames
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.stack([cv2.resize(f, size, interpolation=cv2.INTER_AREA) for f in frames])


# ----------------------------------------------------------------- rendering


def shorten(name: str, limit: int = MAX_NAME) -> str:
    """A display name of at most `limit` characters: head ... tail."""
    if len(name) <= limit:
        return name
    head = (limit - 1) * 2 // 3
    return name[:head] + "…" + name[-(limit - 1 - head) :]


def script_json(obj: Any) -> Markup:
    """JSON safe inside a ``<script>`` element: no ``<``, ``>``, ``&`` or line separators."""
    text = json.dumps(obj, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return Markup(text)  # escaped just above


def _view_data(v: ModelView) -> dict[str, Any]:
    """What the page's script needs of a view (names in full; the script shortens)."""
    return {
        "model": v.model,
        "frames": list(v.frames),
        "classTube": list(v.class_tube),
        "kernels": [
            {
                "node": k.node,
                "layer": k.layer,
                "channel": k.channel,
                "depth": k.depth,
                "relevance": k.relevance,
                "profile": list(k.profile),
                "motion": k.motion,
                "ratio": k.ratio,
                "frames": list(k.frames),
            }
            for k in v.kernels
        ],
        "links": [list(link) for link in v.links],
    }


def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("cfp_onnx", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def _asset(name: str) -> Markup:
    """A static file of ours (JS, CSS) inlined as is."""
    text = resources.files("cfp_onnx").joinpath("templates", name).read_text(encoding="utf-8")
    return Markup(text)  # our own file, no user data


def sparkline(values: Sequence[float], width: int = 120, height: int = 24) -> str:
    """SVG polyline points of a profile (numbers only), y up, 0..1 scaled to the height."""
    if not values:
        return ""
    n = len(values)
    xs = [width * i / max(n - 1, 1) for i in range(n)]
    return " ".join(
        f"{x:.1f},{height - height * min(max(v, 0.0), 1.0):.1f}" for x, v in zip(xs, values)
    )


def render(
    views: Sequence[ModelView],
    *,
    title: str,
    agreement: Sequence[tuple[str, str]] = (),
    fps: float = 8.0,
) -> str:
    """The report's HTML: one view (explain) or two side by side (compare)."""
    env = _environment()
    env.filters["short"] = shorten
    env.globals["sparkline"] = sparkline
    data = {"fps": fps, "views": [_view_data(v) for v in views], "maxName": MAX_NAME}
    return env.get_template("report.html.j2").render(
        title=title,
        views=views,
        agreement=agreement,
        data=script_json(data),
        script=_asset("report.js"),
        style=_asset("report.css"),
        nonce=secrets.token_urlsafe(16),
        compare=len(views) > 1,
    )


def write_report(path: Path, html: str) -> Path:
    """Write the report (callers stage the folder, so it appears whole)."""
    path.write_text(html, encoding="utf-8")
    return path
