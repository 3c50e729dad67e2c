"""Two models, the same clip: do they predict alike, look alike, use alike kernels?

* **class tube**: each explanation's class tube (``cfp_onnx.classtube``, one definition),
  resampled trilinearly to a common resolution (the smaller T, H and W of the two clips;
  unchanged when the clips match) and compared by Spearman rank correlation and the IoU
  of their top-10% voxels.
* **pyramid overlap**: when the architectures match (same number of conv layers with
  the same weight shapes, paired in topological order, or paired by an explicit
  mapping of node names), the Jaccard index of the two pyramids' kernels at each depth.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from cfp_onnx.errors import OptionError
from cfp_onnx.provenance import KernelSpace
from cfp_onnx.pyramid import Pyramid
from cfp_onnx.tubes import upsample

if TYPE_CHECKING:
    from cfp_onnx.api import Explainer
    from cfp_onnx.explanation import Explanation

TOP_FRACTION = 0.1


@dataclass(frozen=True)
class Agreement:
    """Agreement figures of two models on one clip."""

    labels: tuple[int, int]  # the class each model explains
    predictions: tuple[int, int]
    spearman: float
    top_iou: float
    resolution: tuple[int, int, int]
    jaccard: tuple[float, ...] | None  # per depth, None when the layers do not match
    matched_layers: int | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "labels": list(self.labels),
            "predictions": list(self.predictions),
            "same_prediction": self.predictions[0] == self.predictions[1],
            "spearman": _finite(self.spearman),
            "top10_iou": _finite(self.top_iou),
            "resolution": list(self.resolution),
            "jaccard_per_depth": None
            if self.jaccard is None
            else [_finite(j) for j in self.jaccard],
            "matched_layers": self.matched_layers,
        }

    def rows(self) -> list[tuple[str, str]]:
        """Label/value pairs for the report."""
        jac = (
            "architectures differ: not computed"
            if self.jaccard is None
            else ", ".join(f"depth {d}: {_fmt(j)}" for d, j in enumerate(self.jaccard))
        )
        t, h, w = self.resolution
        return [
            ("same prediction", "yes" if self.predictions[0] == self.predictions[1] else "no"),
            ("class tubes, Spearman rank correlation", _fmt(self.spearman)),
            (f"class tubes, IoU of top {TOP_FRACTION:.0%} voxels", _fmt(self.top_iou)),
            ("common resolution (T x H x W)", f"{t} x {h} x {w}"),
            (
                "matched conv layers",
                "-" if self.matched_layers is None else str(self.matched_layers),
            ),
            ("pyramid Jaccard overlap", jac),
        ]


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _fmt(x: float) -> str:
    return f"{x:.4f}" if math.isfinite(x) else "n/a"


# ----------------------------------------------------------------- class tubes


def common_size(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, int, int]:
    """The smaller of each of T, H, W."""
    return (min(a[0], b[0]), min(a[1], b[1]), min(a[2], b[2]))


def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 of a flat array, ties given their average rank."""
    x = np.asarray(x).ravel()
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    avg = (starts + ends - 1) / 2.0
    out = np.empty(len(x), dtype=np.float64)
    out[order] = np.repeat(avg, ends - starts)
    return out


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two equally shaped arrays (NaN if one is constant)."""
    ra, rb = ranks(a), ranks(b)
    ra -= ra.mean()
    rb -= rb.mean()
    denom = math.sqrt(float(ra @ ra) * float(rb @ rb))
    return float(ra @ rb) / denom if denom > 0 else math.nan


def top_iou(a: np.ndarray, b: np.ndarray, fraction: float = TOP_FRACTION) -> float:
    """IoU of the `fraction` highest voxels of each (exactly that many; ties by index)."""
    n = max(1, math.ceil(fraction * a.size))
    top_a = np.argsort(-a.ravel(), kind="stable")[:n]
    top_b = np.argsort(-b.ravel(), kind="stable")[:n]
    inter = len(np.intersect1d(top_a, top_b))
    return inter / (2 * n - inter)


# ----------------------------------------------------------------- matching layers


def match_layers(
    ex_a: Explainer, ex_b: Explainer, mapping: Mapping[str, str] | None = None
) -> np.ndarray | None:
    """Layer index in B of each layer of A (-1: none), or None when they cannot be matched.

    Raises:
        OptionError: an explicit mapping names a layer a model does not have, or pairs
            layers of different weight shapes.
    """
    if mapping:
        return _explicit(ex_a, ex_b, mapping)
    shapes_a = [lay.weight.shape for lay in ex_a.layers]
    shapes_b = [lay.weight.shape for lay in ex_b.layers]
    if shapes_a != shapes_b:
        return None
    return np.arange(len(shapes_a), dtype=np.int64)


def _explicit(ex_a: Explainer, ex_b: Explainer, mapping: Mapping[str, str]) -> np.ndarray:
    out = np.full(len(ex_a.layers), -1, dtype=np.int64)
    for a, b in mapping.items():
        for name, ex, side in ((a, ex_a, "A"), (b, ex_b, "B")):
            if name not in ex.layer_index:
                raise OptionError(f"layer mapping names {name!r}, not a conv layer of model {side}")
        ia, ib = ex_a.layer_index[a], ex_b.layer_index[b]
        if ex_a.layers[ia].weight.shape != ex_b.layers[ib].weight.shape:
            raise OptionError(
                f"layer mapping pairs {a!r} {ex_a.layers[ia].weight.shape} with "
                f"{b!r} {ex_b.layers[ib].weight.shape}: shapes differ"
            )
        out[ia] = ib
    return out


def jaccard_per_depth(pa: Pyramid, pb: Pyramid, match: np.ndarray) -> tuple[float, ...]:
    """Jaccard index of the kernels at each depth, A's layers renamed into B's.

    An unmatched layer of A keeps kernels no B kernel can equal. NaN where both are empty.
    """
    depths = max(pa.max_depth_reached, pb.max_depth_reached) + 1
    out = []
    for d in range(depths):
        at_a, at_b = pa.node_depth == d, pb.node_depth == d
        mapped = match[pa.node_layer[at_a]]
        layer_a = np.where(mapped >= 0, mapped, -1 - pa.node_layer[at_a])
        set_a = set(zip(layer_a.tolist(), pa.node_channel[at_a].tolist()))
        set_b = set(zip(pb.node_layer[at_b].tolist(), pb.node_channel[at_b].tolist()))
        union = set_a | set_b
        out.append(len(set_a & set_b) / len(union) if union else math.nan)
    return tuple(out)


# ----------------------------------------------------------------- everything


def counterparts(pa: Pyramid, pb: Pyramid, match: np.ndarray, space_b: KernelSpace) -> np.ndarray:
    """Per node of A, the node of B with the matched layer and the same channel (-1: none)."""
    layer_b = match[pa.node_layer]
    ok = layer_b >= 0
    kernel = np.where(ok, space_b.ids(np.maximum(layer_b, 0), pa.node_channel), 0)
    ok &= kernel < space_b.size
    out = np.full(len(pa.node_layer), -1, dtype=np.int64)
    out[ok] = pb.node_of[kernel[ok]]
    return out


def agreement(
    a: tuple[Explainer, Explanation],
    b: tuple[Explainer, Explanation],
    *,
    mapping: Mapping[str, str] | None = None,
) -> tuple[Agreement, tuple[np.ndarray, np.ndarray] | None]:
    """Agreement of two explanations of one clip (each with a class tube), and the
    counterpart of each side's nodes in the other when the layers can be matched."""
    (ex_a, ea), (ex_b, eb) = a, b
    if ea.class_tube is None or eb.class_tube is None:
        raise OptionError("agreement needs both explanations to have a class tube")
    size = common_size(ea.class_tube.shape, eb.class_tube.shape)
    tube_a, tube_b = (upsample(np, t[None], size)[0] for t in (ea.class_tube, eb.class_tube))
    pa, pb = ea.pyramid, eb.pyramid
    match = match_layers(ex_a, ex_b, mapping)
    pairs = None
    if match is not None:
        back = np.full(len(ex_b.layers), -1, dtype=np.int64)
        back[match[match >= 0]] = np.flatnonzero(match >= 0)
        pairs = (
            counterparts(pa, pb, match, ex_b.provenance.space),
            counterparts(pb, pa, back, ex_a.provenance.space),
        )
    figures = Agreement(
        labels=(pa.label, pb.label),
        predictions=(int(np.argmax(pa.logits)), int(np.argmax(pb.logits))),
        spearman=spearman(tube_a, tube_b),
        top_iou=top_iou(tube_a, tube_b),
        resolution=size,
        jaccard=None if match is None else jaccard_per_depth(pa, pb, match),
        matched_layers=None if match is None else int((match >= 0).sum()),
    )
    return figures, pairs
