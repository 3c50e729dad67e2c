"""Two models, the same clip: do they predict alike, look alike, use alike kernels?

* **class tube**: each explanation's class tube (``cfp_onnx.classtube``, one definition),
  resampled trilinearly to a common resolution (the smaller T, H and W of the two clips;
  unchanged when the clips match) and compared by Spearman rank correlation and the IoU
  of their top-10% voxels.
* **pyramid overlap**: the Jaccard index of the two pyramids' kernels at each depth, over
  conv layers paired by `match_layers` (an explicit mapping, equal weights, then graph
  position); not computed when no layer pairs.
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
    matching: tuple[tuple[str, ...], ...] = ()  # (layer of A, layer of B, how) per pair

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
            "layer_matching": [list(m) for m in self.matching],
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
            ("matched conv layers", self.matched_summary()),
            ("pyramid Jaccard overlap", jac),
        ]

    def matched_summary(self) -> str:
        if self.matched_layers is None:
            return "-"
        counts = [(sum(m[2] == h for m in self.matching), h) for h in MATCH_HOW]
        said = {"map": "from --map", "weights": "by equal weights", "position": "by graph position"}
        parts = [f"{n} {said[h]}" for n, h in counts if n]
        return f"{self.matched_layers} ({', '.join(parts)})" if parts else str(self.matched_layers)


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


MATCH_HOW = ("map", "weights", "position")
"""How a pair of layers was matched: the user's --map, equal weights, graph position."""
WEIGHT_TOL = 1e-4
"""Largest difference of per-channel signatures for two layers to hold the same weights."""


@dataclass(frozen=True)
class LayerMatch:
    """Layer index in B of each layer of A (-1: none), and how each pair was found."""

    b_of_a: np.ndarray
    how: tuple[str, ...]  # per layer of A: one of MATCH_HOW, or "" when unmatched

    def count(self, how: str) -> int:
        return sum(h == how for h in self.how)

    def pairs(self, ex_a: Explainer, ex_b: Explainer) -> list[list[str]]:
        """``[A layer, B layer, how]`` of every matched layer, in A's order."""
        return [
            [ex_a.layers[i].node, ex_b.layers[int(j)].node, self.how[i]]
            for i, j in enumerate(self.b_of_a.tolist())
            if j >= 0
        ]


def match_layers(
    ex_a: Explainer, ex_b: Explainer, mapping: Mapping[str, str] | None = None
) -> LayerMatch | None:
    """Pair the conv layers of two models; None when no layer pairs at all.

    First the pairs `mapping` names (it overrides the rest); then layers whose weights are
    equal (per output channel, up to the scale BatchNorm folding gives it: the twins that
    ``exporters/transfer`` makes, whatever each exporter's node order); then, when both
    models have the same conv layers (the same weight shapes, in any order), the layers of
    one shape still unpaired by graph position (the k-th such layer of A with the k-th of
    B). Two independently trained models of one architecture pair by position alone; two
    architectures pair only where weights are equal or the mapping says.

    Raises:
        OptionError: an explicit mapping names a layer a model does not have, or pairs
            layers of different weight shapes.
    """
    n_a = len(ex_a.layers)
    b_of_a = np.full(n_a, -1, dtype=np.int64)
    how = [""] * n_a
    for ia, ib in _explicit(ex_a, ex_b, mapping or {}).items():
        b_of_a[ia], how[ia] = ib, "map"
    taken = set(b_of_a[b_of_a >= 0].tolist())
    shape_a = [lay.weight_shape for lay in ex_a.layers]
    shape_b = [lay.weight_shape for lay in ex_b.layers]
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for ib, shp in enumerate(shape_b):
        by_shape.setdefault(tuple(shp), []).append(ib)
    sig_b: dict[int, np.ndarray] = {}
    for ia in range(n_a):
        if b_of_a[ia] >= 0:
            continue
        free = [ib for ib in by_shape.get(tuple(shape_a[ia]), []) if ib not in taken]
        if not free:
            continue
        sig = _signature(ex_a.layers[ia].weight)
        same = []
        for ib in free:
            if ib not in sig_b:
                sig_b[ib] = _signature(ex_b.layers[ib].weight)
            if np.allclose(sig, sig_b[ib], rtol=0, atol=WEIGHT_TOL):
                same.append(ib)
        if len(same) == 1:
            b_of_a[ia], how[ia] = same[0], "weights"
            taken.add(same[0])
    same_layers = sorted(map(tuple, shape_a)) == sorted(map(tuple, shape_b))
    for shp, members_b in by_shape.items() if same_layers else ():
        free_b = [ib for ib in members_b if ib not in taken]
        free_a = [ia for ia in range(n_a) if b_of_a[ia] < 0 and tuple(shape_a[ia]) == shp]
        if free_a and len(free_a) == len(free_b):
            for ia, ib in zip(free_a, free_b):
                b_of_a[ia], how[ia] = ib, "position"
    if not (b_of_a >= 0).any():
        return None
    return LayerMatch(b_of_a, tuple(how))


def _signature(weight: np.ndarray) -> np.ndarray:
    """Per output channel, ``|<w_j / |w_j|, r>|`` for a fixed random unit vector r: equal
    for equal weights whatever positive or negative scale each channel was folded with."""
    w = np.asarray(weight, dtype=np.float64).reshape(len(weight), -1)
    r = np.random.default_rng(0).standard_normal(w.shape[1])
    r /= np.linalg.norm(r)
    norm = np.linalg.norm(w, axis=1)
    return np.abs(w @ r) / np.where(norm > 0, norm, 1.0)


def _explicit(ex_a: Explainer, ex_b: Explainer, mapping: Mapping[str, str]) -> dict[int, int]:
    out: dict[int, int] = {}
    for a, b in mapping.items():
        for name, ex, side in ((a, ex_a, "A"), (b, ex_b, "B")):
            if name not in ex.layer_index:
                raise OptionError(f"layer mapping names {name!r}, not a conv layer of model {side}")
        ia, ib = ex_a.layer_index[a], ex_b.layer_index[b]
        if ex_a.layers[ia].weight_shape != ex_b.layers[ib].weight_shape:
            raise OptionError(
                f"layer mapping pairs {a!r} {ex_a.layers[ia].weight_shape} with "
                f"{b!r} {ex_b.layers[ib].weight_shape}: shapes differ"
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
    matched: LayerMatch | str | None = "auto",
) -> tuple[Agreement, tuple[np.ndarray, np.ndarray] | None]:
    """Agreement of two explanations of one clip (each with a class tube), and the
    counterpart of each side's nodes in the other when the layers can be matched.

    `matched`: the explainers' `match_layers` when the caller has it (it reads every
    weight, so a run over many clips matches once); ``"auto"`` computes it."""
    (ex_a, ea), (ex_b, eb) = a, b
    if ea.class_tube is None or eb.class_tube is None:
        raise OptionError("agreement needs both explanations to have a class tube")
    size = common_size(ea.class_tube.shape, eb.class_tube.shape)
    tube_a, tube_b = (upsample(np, t[None], size)[0] for t in (ea.class_tube, eb.class_tube))
    pa, pb = ea.pyramid, eb.pyramid
    if isinstance(matched, str):
        matched = match_layers(ex_a, ex_b, mapping)
    match = None if matched is None else matched.b_of_a
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
        matching=() if matched is None else tuple(map(tuple, matched.pairs(ex_a, ex_b))),
    )
    return figures, pairs
