"""The HTML report: a pure formatter, ``Explanation``s in, one self-contained page out.

The page draws tubes itself. It embeds the sampled frames once (JPEG) and every pyramid
kernel's feature-resolution map (uint8, each min-max scaled; SPEC §6 normalises after
upsampling, which any affine scale leaves unchanged), and upsamples trilinearly
(half-pixel centres, edge-clamped, as ``tubes.upsample``), min-max normalises the whole
tube, colours it with OpenCV's JET table (embedded) and blends it 50/50 on the frames
in a canvas. So every kernel of the pyramid can be viewed at a few bytes each.

Every model-supplied string reaches the page escaped: as HTML text by jinja2, or inside
the embedded JSON with ``<``, ``>`` and ``&`` written as ``\\u003c``-style escapes, read
with ``JSON.parse`` and shown via ``textContent``. A Content-Security-Policy with a
per-report nonce allows only the page's own script and no network at all.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Sequence
from functools import lru_cache
from importlib import resources
from typing import Any

import cv2
import jinja2
import numpy as np
import orjson
from markupsafe import Markup

from cfp_onnx import classtube
from cfp_onnx import tubes as tubes_mod
from cfp_onnx.explanation import Explanation

MAX_NAME = 200
"""Names longer than this are shortened on the page (the full name stays in a tooltip)."""
MAX_LINKS = 4000
"""Links embedded for the graph at most (the most relevant ones among its nodes)."""


def display(frames: np.ndarray, max_side: int) -> np.ndarray:
    """Frames scaled down (area interpolation) so neither side exceeds `max_side`."""
    h, w = frames.shape[1:3]
    scale = max_side / max(h, w)
    if scale >= 1:
        return frames
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.stack([cv2.resize(f, size, interpolation=cv2.INTER_AREA) for f in frames])


def shorten(name: str, limit: int = MAX_NAME) -> str:
    """A display name of at most `limit` characters: head ... tail."""
    if len(name) <= limit:
        return name
    head = (limit - 1) * 2 // 3
    return name[:head] + "…" + name[-(limit - 1 - head) :]


def script_json(obj: Any) -> Markup:
    """JSON safe inside a ``<script>`` element: no ``<``, ``>``, ``&`` or line separators.

    orjson: a ResNet-50-3D page's data in ~3 ms (the standard library's encoder: ~25 ms).
    Its numbers come through `_round` or are finite by construction (orjson would write a
    NaN as null)."""
    text = orjson.dumps(obj).decode()
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                    ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):  # fmt: skip
        text = text.replace(ch, esc)
    return Markup(text)  # escaped just above


@lru_cache(maxsize=1)
def jet_table() -> list[int]:
    """OpenCV's COLORMAP_JET as 256 RGB triples, flattened: the page colours with it."""
    grey = np.arange(256, dtype=np.uint8).reshape(1, 256)
    rgb = cv2.cvtColor(cv2.applyColorMap(grey, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    return [int(v) for v in rgb.reshape(-1)]


def diverging(tube: np.ndarray) -> tuple[np.ndarray, float]:
    """A signed tube as RGB on blue-white-red, zero white; returns it and the scale |max|."""
    scale = float(np.abs(tube).max()) if tube.size else 0.0
    v = np.clip(tube / scale, -1, 1) if scale > 0 else np.zeros_like(tube)
    pos, neg = np.clip(v, 0, 1)[..., None], np.clip(-v, 0, 1)[..., None]
    white = np.array([255.0, 255.0, 255.0])
    red, blue = np.array([200.0, 20.0, 20.0]), np.array([20.0, 60.0, 200.0])
    rgb = white * (1 - pos - neg) + red * pos + blue * neg
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8), scale


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode("ascii")


def _round(values: np.ndarray, digits: int = 5) -> list[float | None]:
    """For display: `digits` decimals (NumPy's rounding, vectorised), non-finite as None."""
    v = np.asarray(values, dtype=np.float64)
    out: list[float | None] = np.round(v, digits).tolist()
    for i in np.flatnonzero(~np.isfinite(v)).tolist():
        out[i] = None
    return out


def view_data(e: Explanation, *, counterpart: np.ndarray | None = None) -> dict[str, Any]:
    """What the page's script needs of one explanation (names in full; the script shortens)."""
    p = e.pyramid
    frames = display(e.clip.frames, e.options.max_side)
    shown = e.shown
    data: dict[str, Any] = {
        "model": p.model,
        "classLabel": f"class {p.label}" + (f" ({p.label_name})" if p.label_name else ""),
        "size": list(frames.shape[:3]),
        "frames": tubes_mod.encode_frames(frames, quality=90),
        "layers": list(p.layers),
        "nodes": {
            "layer": p.node_layer.tolist(),
            "channel": p.node_channel.tolist(),
            "depth": p.node_depth.tolist(),
            "relevance": _round(p.node_relevance),
            "shuffle": _round(e.motion_ratio, 3) if e.motion_ratio is not None else None,
        },
        "shown": shown.tolist(),
        "links": _links(e, shown),
        "maps": None,
        "classTube": None,
        "counterpart": counterpart.tolist() if counterpart is not None else None,
    }
    if e.maps is not None:
        data["maps"] = {
            "group": e.maps.group.tolist(),
            "slot": e.maps.slot.tolist(),
            "shapes": [list(s) for s in e.maps.shapes],
            "data": [_b64(e.maps.quantised(g)) for g in range(len(e.maps.shapes))],
        }
    if e.class_tube is not None:
        rgb, scale = diverging(e.class_tube)
        blended = tubes_mod.blend(e.clip.frames, rgb)
        data["classTube"] = {
            "frames": tubes_mod.encode_frames(display(blended, e.options.max_side), quality=90),
            "scale": scale,
            "caption": classtube.CAPTIONS[e.class_tube_kind or "weighted"],
        }
    return data


def _links(e: Explanation, shown: np.ndarray) -> list[list[float]]:
    """Links between shown kernels, strongest first, at most MAX_LINKS."""
    p = e.pyramid
    if len(shown) == 0:
        return []
    source, target, rel = p.links_among(shown)
    idx = np.argsort(-rel, kind="stable")[:MAX_LINKS]
    return [
        [int(s), int(t), round(float(r), 4)] for s, t, r in zip(source[idx], target[idx], rel[idx])
    ]


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("cfp_onnx", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["short"] = shorten
    return env


def _asset(name: str) -> Markup:
    """A static file of ours (JS, CSS) inlined as is."""
    text = resources.files("cfp_onnx").joinpath("templates", name).read_text(encoding="utf-8")
    return Markup(text)  # our own file, no user data


def _side(e: Explanation, label: str) -> dict[str, Any]:
    """The server-rendered text of one side: prediction, settings, summary."""
    p = e.pyramid
    return {
        "label": label,
        "model": p.model,
        "source": f"{e.clip.source.name} (frames {int(e.clip.indices[0])}..{int(e.clip.indices[-1])}, "
        f"{len(e.clip.indices)} sampled)",
        "pyramid": p,
        "top": e.top(),
        "summary": p.summary(),
        "total": len(p.node_layer),
        "shown": len(e.shown),
        "maps": e.maps is not None,
        "faithfulness": e.faithfulness,
    }


def render(
    explanations: Sequence[Explanation],
    *,
    title: str | None = None,
    agreement: Sequence[tuple[str, str]] = (),
    counterparts: Sequence[np.ndarray | None] | None = None,
) -> str:
    """The report's HTML: one explanation (explain) or two side by side (compare).

    `counterparts[i][n]`: the node of the other side that matches node `n` of side `i`
    (-1: none), so selecting a kernel selects its twin.
    """
    if not explanations:
        raise ValueError("render needs at least one explanation")
    first = explanations[0]
    if title is None:
        p = first.pyramid
        title = f"{p.model}: class {p.label}" + (f" ({p.label_name})" if p.label_name else "")
    pairs = counterparts or [None] * len(explanations)
    labels = ["A", "B"] if len(explanations) > 1 else [""]
    data = {
        "fps": first.options.fps,
        "maxName": MAX_NAME,
        "jet": jet_table(),
        "motionDrop": tubes_mod.MOTION_DROP,
        "views": [view_data(e, counterpart=c) for e, c in zip(explanations, pairs)],
    }
    return (
        _environment()
        .get_template("report.html.j2")
        .render(
            title=title,
            sides=[_side(e, lab) for e, lab in zip(explanations, labels)],
            agreement=agreement,
            data=script_json(data),
            script=_asset("report.js"),
            style=_asset("report.css"),
            nonce=base64.urlsafe_b64encode(os.urandom(16))
            .rstrip(b"=")
            .decode(),  # as secrets.token_urlsafe
            compare=len(explanations) > 1,
        )
    )


def render_index(rows: Sequence[dict[str, Any]], *, title: str) -> str:
    """The window index of ``cfp explain --window``: a link per window and the predicted
    class and explained score over time (an SVG drawn here: numbers only)."""
    scores = [r["score"] for r in rows]
    lo, hi = (min(scores), max(scores)) if scores else (0.0, 1.0)
    span = hi - lo or 1.0
    n = max(len(rows) - 1, 1)
    points = " ".join(
        f"{40 + 900 * i / n:.1f},{190 - 160 * (s - lo) / span:.1f}" for i, s in enumerate(scores)
    )
    classes = sorted({r["predicted"] for r in rows})
    names = {r["predicted"]: r["predicted_name"] for r in rows}
    band = {c: k for k, c in enumerate(classes)}
    return (
        _environment()
        .get_template("index.html.j2")
        .render(
            title=title,
            rows=rows,
            points=points,
            lo=lo,
            hi=hi,
            n=n,
            band=band,
            classes=classes,
            names=names,
            style=_asset("report.css"),
        )
    )
