"""The class feature pyramid (SPEC §5): built from head scores and back-steps, kept as arrays.

A ResNet-50-3D at depth 3 can hold 10^5-10^6 links, so nodes and links are
columns of arrays, never one Python object each.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from cfp_onnx.relevance import Array, back_step, expand_csr, head_scores, max_per_pair, select
from cfp_onnx.xp import to_numpy


@dataclass(frozen=True)
class Pyramid:
    """One clip's pyramid for one class. Node ids run in (depth, layer, channel) order."""

    model: str
    label: int
    label_name: str | None
    score: float
    logits: np.ndarray
    theta: float
    depth: int
    max_depth_reached: int
    head_mode: str
    top_n: int | None
    layers: tuple[str, ...]  # layer names, topological order
    node_layer: np.ndarray  # index into `layers`
    node_channel: np.ndarray
    node_depth: np.ndarray
    node_relevance: np.ndarray
    link_source: np.ndarray  # node ids (parent, nearer the head)
    link_target: np.ndarray  # node ids (child)
    link_relevance: np.ndarray
    kept_node: np.ndarray  # per expanded node: the input channels its back-step kept
    kept_channel: np.ndarray
    kept_score: np.ndarray
    head_best: float  # largest normalised head score (for the empty-pyramid message)

    @property
    def empty(self) -> bool:
        return len(self.node_layer) == 0

    def summary(self) -> list[tuple[int, int, int, int]]:
        """Per depth: (depth, kernels, layers, links out of that depth)."""
        rows = []
        src_depth = self.node_depth[self.link_source]
        for d in range(self.max_depth_reached + 1):
            at = self.node_depth == d
            rows.append(
                (d, int(at.sum()), len(np.unique(self.node_layer[at])), int((src_depth == d).sum()))
            )
        return rows

    def to_dict(self) -> dict[str, Any]:
        """The SPEC §5 ``pyramid.json`` object."""
        names = self.layers
        nodes = [
            {"id": i, "layer": names[la], "channel": ch, "depth": d, "relevance": r}
            for i, (la, ch, d, r) in enumerate(
                zip(
                    self.node_layer.tolist(),
                    self.node_channel.tolist(),
                    self.node_depth.tolist(),
                    self.node_relevance.tolist(),
                )
            )
        ]
        links = [
            {"source": s, "target": t, "relevance": r}
            for s, t, r in zip(
                self.link_source.tolist(), self.link_target.tolist(), self.link_relevance.tolist()
            )
        ]
        return {
            "model": self.model,
            "label": self.label,
            "label_name": self.label_name,
            "score": self.score,
            "theta": self.theta,
            "depth": self.depth,
            "max_depth_reached": self.max_depth_reached,
            "head_mode": self.head_mode,
            "top_n": self.top_n,
            "nodes": nodes,
            "links": links,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), allow_nan=False)

    def kernel_name(self, node: int) -> str:
        return f"{self.layers[int(self.node_layer[node])]}:{int(self.node_channel[node])}"

    def to_reference(self) -> dict[str, Any]:
        """The paper's nested ``{label: {kernel: {child: ...}}}``; a kernel reached again is a leaf."""
        children = _children(self)
        seen: set[int] = set()

        def nest(n: int) -> dict[str, Any]:
            if n in seen:
                return {}
            seen.add(n)
            return {self.kernel_name(c): nest(c) for c, _ in children.get(n, ())}

        roots = np.flatnonzero(self.node_depth == 0).tolist()
        top = {self.kernel_name(r): nest(r) for r in roots}
        return {self.label_name if self.label_name is not None else str(self.label): top}

    def to_tree(self) -> dict[str, Any]:
        """The ``{name, children}`` tree the paper's D3 page reads (same expansion as reference)."""
        children = _children(self)
        seen: set[int] = set()

        def nest(n: int, rel: float) -> dict[str, Any]:
            item: dict[str, Any] = {"name": self.kernel_name(n), "relevance": rel}
            if n not in seen:
                seen.add(n)
                kids = [nest(c, r) for c, r in children.get(n, ())]
                if kids:
                    item["children"] = kids
            return item

        roots = np.flatnonzero(self.node_depth == 0).tolist()
        label = self.label_name if self.label_name is not None else str(self.label)
        return {
            "name": label,
            "children": [nest(r, float(self.node_relevance[r])) for r in roots],
        }


def _children(p: Pyramid) -> dict[int, list[Any]]:
    out: dict[int, list[Any]] = {}
    for s, t, r in zip(p.link_source.tolist(), p.link_target.tolist(), p.link_relevance.tolist()):
        out.setdefault(s, []).append((t, r))
    return out


# --------------------------------------------------------------------------- building


@dataclass(frozen=True)
class LayerStep:
    """What the back-step needs of one layer, on the backend."""

    kbar: Array  # [C_out, C_in/g] float64
    group: int
    indptr: Array  # input provenance CSR
    kernels: Array


@dataclass(frozen=True)
class PyramidInputs:
    """Everything `build` reads, already on the backend (NumPy or CuPy)."""

    offsets: np.ndarray  # kernel id space of the layers
    head_weight: Array  # [classes, F] float64
    head_indptr: Array
    head_kernels: Array
    features: Array  # [F] float64, pooled head input
    steps: Callable[[int], LayerStep]  # layer index -> its back-step data
    pooled: Callable[[int], Array]  # layer index -> [C_in] float64 pooled input


def build(
    xp: ModuleType,
    inp: PyramidInputs,
    *,
    label: int,
    depth: int,
    theta: float,
    top_n: int | None,
    head_mode: str,
) -> dict[str, Any]:
    """Head, then one back-step per depth level; returns the columns of a Pyramid."""
    n_kernels = int(inp.offsets[-1])
    offsets = xp.asarray(inp.offsets)
    scores = head_scores(xp, inp.head_weight, inp.features, label, head_mode)
    kept_f = xp.flatnonzero(select(xp, scores[None, :], theta, top_n)[0])
    entry, kid = expand_csr(xp, inp.head_indptr, inp.head_kernels, kept_f)
    depth_of = xp.full(n_kernels, -1, dtype=xp.int64)
    relevance = xp.full(n_kernels, -xp.inf)
    _scatter_max(xp, relevance, kid, scores[kept_f][entry])
    frontier = xp.unique(kid)
    depth_of[frontier] = 0
    links: list[tuple[Array, Array, Array]] = []
    kept: list[tuple[Array, Array, Array]] = []
    for d in range(depth - 1):
        if len(frontier) == 0:
            break
        parent, child, score = _level(xp, inp, frontier, offsets, theta, top_n, kept)
        parent, child, score = max_per_pair(xp, parent, child, score, n_kernels)
        links.append((parent, child, score))
        fresh = xp.unique(child[depth_of[child] < 0])
        depth_of[fresh] = d + 1
        frontier = fresh
    return _columns(xp, depth_of, relevance, links, kept, float(scores.max()))


def _scatter_max(xp: ModuleType, target: Array, index: Array, values: Array) -> None:
    """``maximum.at`` for backends without ufunc.at (CuPy)."""
    order = xp.lexsort(xp.stack([-values, index]))
    index, values = index[order], values[order]
    first = xp.ones(len(index), dtype=bool)
    first[1:] = index[1:] != index[:-1]
    idx, val = index[first], values[first]
    target[idx] = xp.maximum(target[idx], val)


def _level(
    xp: ModuleType,
    inp: PyramidInputs,
    frontier: Array,
    offsets: Array,
    theta: float,
    top_n: int | None,
    kept: list[tuple[Array, Array, Array]],
) -> tuple[Array, Array, Array]:
    """Expand every frontier kernel, one vectorised back-step per layer."""
    layer_of = xp.searchsorted(offsets, frontier, side="right") - 1
    parents, children, scores = [], [], []
    for layer in to_numpy(xp.unique(layer_of)).tolist():
        kids = frontier[layer_of == layer]
        step = inp.steps(layer)
        k = back_step(
            xp, step.kbar, step.group, kids - offsets[layer], inp.pooled(layer), theta, top_n
        )
        kept.append((kids[k.row], k.channel, k.score))
        entry, child = expand_csr(xp, step.indptr, step.kernels, k.channel)
        parents.append(kids[k.row][entry])
        children.append(child)
        scores.append(k.score[entry])
    return _cat(xp, parents, xp.int64), _cat(xp, children, xp.int64), _cat(xp, scores, xp.float64)


def _cat(xp: ModuleType, parts: Sequence[Array], dtype: Any) -> Array:
    return xp.concatenate(parts) if parts else xp.zeros(0, dtype=dtype)


def _columns(
    xp: ModuleType,
    depth_of: Array,
    relevance: Array,
    links: list[tuple[Array, Array, Array]],
    kept: list[tuple[Array, Array, Array]],
    head_best: float,
) -> dict[str, Any]:
    parent = _cat(xp, [p for p, _, _ in links], xp.int64)
    child = _cat(xp, [c for _, c, _ in links], xp.int64)
    score = _cat(xp, [s for _, _, s in links], xp.float64)
    incoming = xp.full(len(depth_of), -xp.inf)
    if len(child):
        _scatter_max(xp, incoming, child, score)
    relevance = xp.where(depth_of == 0, relevance, incoming)
    kids = xp.flatnonzero(depth_of >= 0)
    order = xp.lexsort(xp.stack([kids, depth_of[kids]]))
    kids = kids[order]
    node_of = xp.full(len(depth_of), -1, dtype=xp.int64)
    node_of[kids] = xp.arange(len(kids))
    src, dst = node_of[parent], node_of[child]
    link_order = xp.lexsort(xp.stack([dst, src]))
    kept_kid = _cat(xp, [k for k, _, _ in kept], xp.int64)
    kept_order = xp.lexsort(
        xp.stack([_cat(xp, [c for _, c, _ in kept], xp.int64), node_of[kept_kid]])
    )
    return {
        "kernels": to_numpy(kids),
        "node_depth": to_numpy(depth_of[kids]),
        "node_relevance": to_numpy(relevance[kids]),
        "link_source": to_numpy(src[link_order]),
        "link_target": to_numpy(dst[link_order]),
        "link_relevance": to_numpy(score[link_order]),
        "kept_node": to_numpy(node_of[kept_kid][kept_order]),
        "kept_channel": to_numpy(_cat(xp, [c for _, c, _ in kept], xp.int64)[kept_order]),
        "kept_score": to_numpy(_cat(xp, [s for _, _, s in kept], xp.float64)[kept_order]),
        "head_best": head_best,
    }
