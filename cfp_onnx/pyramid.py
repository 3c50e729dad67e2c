"""The class feature pyramid (SPEC §5): built from head scores and back-steps, kept as arrays.

A ResNet-50-3D at depth 3 can hold 10^5-10^6 links, so nodes and links are columns of
arrays, never one Python object each. Links are kept *factored* as the back-step made
them (kept (kernel, input channel) pairs x the channel's provenance): node sets, depths and
relevances never need the flat link list, which is expanded only when asked for.
"""

from __future__ import annotations

import io
import itertools
import json
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property, lru_cache, partial
from types import ModuleType
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from cfp_onnx import jsonrows
from cfp_onnx.relevance import (
    Array,
    best_and_pairs,
    column_best,
    expand_csr,
    head_scores,
    kept_pairs,
    max_per_key,
    max_per_pair,
    nonzero_2d,
    select,
)
from cfp_onnx.xp import to_numpy

if TYPE_CHECKING:
    from cfp_onnx.options import PyramidOptions
    from cfp_onnx.provenance import KernelSpace


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
    space: KernelSpace  # the layers (topological order) and their kernel ids
    node_layer: np.ndarray  # index into `layers`
    node_channel: np.ndarray
    node_depth: np.ndarray
    node_relevance: np.ndarray
    node_of: np.ndarray  # kernel id -> node id (-1: not in the pyramid)
    blocks: tuple[LinkBlock, ...]  # the back-steps, factored
    head_best: float  # largest normalised head score (for the empty-pyramid message)

    @property
    def layers(self) -> tuple[str, ...]:
        """Layer names, topological order (``node_layer`` indexes them)."""
        return self.space.layers

    @cached_property
    def _links(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._steps_in_order():  # the runs are in (source, target) order: no global sort
            runs = list(self._ordered_runs())
            if not runs:
                return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
            return (
                np.concatenate([s for s, _, _, _ in runs]),
                np.concatenate([t for _, t, _, _ in runs]),
                np.concatenate([scores[pick] for _, _, scores, pick in runs]),
            )
        src, dst, rel = [], [], []
        for b in self.blocks:
            s, t, r = b.expand()
            src.append(self.node_of[s])
            dst.append(self.node_of[t])
            rel.append(r)
        if not src:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
        s, t, r = np.concatenate(src), np.concatenate(dst), np.concatenate(rel)
        # (source, target) pairs are unique: one int64 key sorts them (3x a 2-key lexsort)
        order = np.argsort(s * np.int64(len(self.node_layer)) + t)
        return s[order], t[order], r[order]

    def links_unordered(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(source, target, relevance) of every link, a step at a time in no set order:
        for sums over links, which need no (source, target) sort (on a union pyramid of
        400 classes the sort and its pieces are most of the links' cost)."""
        if "_links" in self.__dict__:
            return self._links
        parts = [
            (self.node_of[s], self.node_of[t], r) for s, t, r in (b.expand() for b in self.blocks)
        ]
        if not parts:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
        src, dst, rel = (np.concatenate(x) for x in zip(*parts))
        return src, dst, rel

    @property
    def link_source(self) -> np.ndarray:
        """Node id of each link's parent (nearer the head); links sorted by (source, target)."""
        return self._links[0]

    @property
    def link_target(self) -> np.ndarray:
        return self._links[1]

    @property
    def link_relevance(self) -> np.ndarray:
        return self._links[2]

    @cached_property
    def parents(self) -> np.ndarray:
        """Per node, whether it is the source of a link (found without expanding them)."""
        out = np.zeros(len(self.node_layer), dtype=bool)
        for b in self.blocks:
            source, count = b.link_counts()
            out[self.node_of[source[count > 0]]] = True
        return out

    def links_among(self, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The links whose source and target are both in `nodes`, in (source, target)
        order: only those parents' steps are expanded."""
        inside = np.zeros(len(self.node_layer), dtype=bool)
        inside[np.asarray(nodes, dtype=np.int64)] = True
        parts = []
        for b in self.blocks:
            s, t, r = b.expand(inside[self.node_of[b.parent]])
            s, t = self.node_of[s], self.node_of[t]
            keep = inside[t]
            parts.append((s[keep], t[keep], r[keep]))
        if not parts:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
        s, t, r = (np.concatenate(x) for x in zip(*parts))
        order = np.lexsort((t, s))
        return s[order], t[order], r[order]

    @cached_property
    def _kept(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        parts = [(self.node_of[b.parent[b.row]], b.channel, b.score) for b in self.blocks]
        if not parts:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
        node, chan, score = (np.concatenate(x) for x in zip(*parts))
        key = node * (np.int64(chan.max(initial=0)) + 1) + chan
        if np.all(key[1:] > key[:-1]):  # steps in node order, rows and channels ascending
            return node, chan, score
        order = np.lexsort((chan, node))
        return node[order], chan[order], score[order]

    def score_pairs(self) -> None:
        """Score every step's kept pairs now, the steps side by side on the pool (NumPy
        releases the GIL in their passes): the maps, the links and the writer all read
        them first, and each step would otherwise be scored on first use, one at a time
        (ResNet-50-3D: ~45 ms on one core)."""
        todo = [b for b in self.blocks if "_kept" not in b.__dict__]
        if len(todo) < 2 or todo[0].xp is not np:
            return
        for b, kept in zip(todo, _pool().map(LinkBlock.scored, todo)):
            b.__dict__.setdefault("_kept", kept)  # not through the property: in Python
            # 3.11 its lock is one for the whole class, and would score them one at a time

    @property
    def kept_node(self) -> np.ndarray:
        """Per expanded node, the input channels its back-step kept (what its tube sums)."""
        return self._kept[0]

    @property
    def kept_channel(self) -> np.ndarray:
        return self._kept[1]

    @property
    def kept_score(self) -> np.ndarray:
        return self._kept[2]

    @property
    def n_links(self) -> int:
        if "_links" in self.__dict__:
            return len(self.link_source)
        return sum(b.n_links for b in self.blocks)

    @property
    def empty(self) -> bool:
        return len(self.node_layer) == 0

    def summary(self) -> list[tuple[int, int, int, int]]:
        """Per depth: (depth, kernels, layers, links out of that depth)."""
        rows = []
        out_of = np.zeros(max(self.max_depth_reached + 1, 0), np.int64)
        for b in self.blocks:  # counted from the factored steps: no flat link list
            if len(b.parent):  # a step expands one depth level: its parents share a depth
                out_of[self.node_depth[self.node_of[b.parent[0]]]] += b.n_links
        for d in range(self.max_depth_reached + 1):
            at = self.node_depth == d
            rows.append((d, int(at.sum()), len(np.unique(self.node_layer[at])), int(out_of[d])))
        return rows

    def to_dict_header(self) -> dict[str, Any]:
        """The scalar fields of ``pyramid.json``, in the SPEC's order."""
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
        }

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
        return {**self.to_dict_header(), "nodes": nodes, "links": links}

    def to_json(self) -> str:
        """The ``pyramid.json`` text (what :meth:`write_json` writes)."""
        out = io.BytesIO()
        self.write_json(out)
        return out.getvalue().decode("utf-8")

    def write_json(
        self, fp: BinaryIO, chunk: int = jsonrows.CHUNK, *, parallel: bool = True
    ) -> int:
        """Stream ``pyramid.json`` (SPEC §5) to a binary file; returns the bytes written.

        The same document as ``json.dumps(to_dict())``: same keys in the same order, every
        number exactly the same value (floats as their shortest round-trip text). Nodes and
        links are formatted column by column (cfp_onnx.jsonrows), never one Python call
        per link: a ResNet-50-3D pyramid has millions. `parallel`: format on threads
        of their own (``jsonrows.write_rows``); pass False when other work keeps the cores
        busy meanwhile.
        """
        head = json.dumps(self.to_dict_header(), allow_nan=False)[:-1].encode()
        ids = jsonrows.counting(len(self.node_layer))  # node ids: texts looked up, not formatted
        n = fp.write(head + b', "nodes": [')
        n += jsonrows.write_rows(
            fp,
            [
                b'{"id": ',
                b', "layer": ',
                b', "channel": ',
                b', "depth": ',
                b', "relevance": ',
                b"}",
            ],
            [[
                jsonrows.Table(ids, np.arange(len(self.node_layer))),
                jsonrows.strings(self.layers, self.node_layer),
                jsonrows.numbers(self.node_channel),
                jsonrows.numbers(self.node_depth),
                _finite(self.node_relevance),
            ]],
            chunk,
            parallel=parallel,
        )  # fmt: skip
        n += fp.write(b'], "links": [')
        n += jsonrows.write_rows(
            fp,
            [b'{"source": ', b', "target": ', b', "relevance": ', b"}"],
            (
                [jsonrows.Table(ids, s), jsonrows.Table(ids, t), _finite(r, pick)]
                for s, t, r, pick in self._link_runs()
            ),
            chunk,
            parallel=parallel,
        )
        return n + fp.write(b"]}")

    def _link_runs(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        """The links in (source, target) order, in runs: one per back-step when each
        step's parents come after the one before's (they do: a step expands one layer's
        kernels of one depth, and node ids run in (depth, layer) order), so a writer can
        format one step while the next is expanded, and the whole list is never held.

        A run is ``(source, target, scores, pick)``: link ``i``'s relevance is
        ``scores[pick[i]]``, its kept pair's score (a channel carrying several kernels
        gives them all one score: formatted once, looked up for each)."""
        if "_links" in self.__dict__ or not self._steps_in_order():
            if len(self.link_source):
                s, t, r = self._links
                yield s, t, r, np.arange(len(r))
            return
        yield from self._ordered_runs()

    def _ordered_runs(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        """`_link_runs` when the steps are in order: each piece of a step expanded, sorted
        by target within its parents only where it is not already."""
        n = np.int64(len(self.node_layer))
        for b in self.blocks:
            for lo, hi in b.pieces(RUN_LINKS):
                s, t, scores, pick = b.expand_indexed(lo, hi)
                s, t = self.node_of[s], self.node_of[t]
                key = s * n + t
                if len(key) and bool(np.any(key[1:] < key[:-1])):  # parents ascend already
                    order = np.argsort(key, kind="stable")
                    s, t, pick = s[order], t[order], pick[order]
                yield s, t, scores, pick

    def _steps_in_order(self) -> bool:
        bounds = [self.node_of[to_numpy(b.parents)] for b in self.blocks if len(b.parents)]
        return all(a.max() < b.min() for a, b in itertools.pairwise(bounds))

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


def _finite(values: np.ndarray, pick: np.ndarray | None = None) -> jsonrows.Column:
    """The relevances' column: `values`, or ``values[pick]`` looked up (each formatted once)."""
    if not np.all(np.isfinite(values)):
        raise ValueError("pyramid relevances must be finite")
    return jsonrows.numbers(values) if pick is None else jsonrows.looked_up(values, pick)


def _children(p: Pyramid) -> dict[int, list[Any]]:
    out: dict[int, list[Any]] = {}
    for s, t, r in zip(p.link_source.tolist(), p.link_target.tolist(), p.link_relevance.tolist()):
        out.setdefault(s, []).append((t, r))
    return out


# --------------------------------------------------------------------------- building


RUN_LINKS = 1 << 16
"""Links expanded at once while ``pyramid.json`` is written: the writer formats one run
while the next is made, and the first is ready soon (a ResNet-50's head step alone
has 1 M links)."""


@dataclass(frozen=True)
class LinkBlock:
    """The links out of one layer's back-step, factored: parent ``parent[row]`` keeps input
    ``channel`` with ``score``; its children are the kernels that channel carries.

    The dense score matrix is not kept (tens of MB on a ResNet-50): the kept pairs are
    recomputed, identically and a block of rows at a time, the first time its links or
    kept channels are asked for.
    """

    xp: ModuleType
    parents: Array  # kernel ids of the step's rows
    pairs: Callable[[], tuple[Array, Array, Array]]  # relevance.kept_pairs of the step
    indptr: Array  # the layer's input provenance
    kernels: Array
    injective: bool  # no kernel feeds two channels: (parent, child) pairs are unique
    links: int | None = None  # counted while the step was scored (None: count by expanding)

    @cached_property
    def _kept(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.scored()

    def scored(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The step's kept pairs, scored again (what `row`, `channel` and `score` hold)."""
        row, channel, score = self.pairs()
        return to_numpy(row), to_numpy(channel), to_numpy(score)

    @property
    def parent(self) -> np.ndarray:
        return to_numpy(self.parents)

    @property
    def row(self) -> np.ndarray:
        return self._kept[0]

    @property
    def channel(self) -> np.ndarray:
        return self._kept[1]

    @property
    def score(self) -> np.ndarray:
        return self._kept[2]

    @property
    def n_links(self) -> int:
        """Links out of this step (counted while scoring, when it could be)."""
        if self.links is not None:
            return self.links
        return int(self.link_counts()[1].sum())

    def link_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """(parent kernel, links) per kept pair, without expanding the links."""
        if not self.injective:
            parent = self.expand()[0]
            return parent, np.ones(len(parent), np.int64)
        return self.parent[self.row], np.diff(to_numpy(self.indptr))[self.channel]

    def expand(self, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Flat (parent kernel, child kernel, r') triples, one per link (of the parents
        where the mask `rows` is set, if given)."""
        row, channel, score = self.row, self.channel, self.score
        if rows is not None:
            pick = rows[row]
            row, channel, score = row[pick], channel[pick], score[pick]
        parent, child, scores, which = self._expand(row, channel, score)
        return parent, child, scores[which]

    def pieces(self, links: int) -> list[tuple[int, int]]:
        """Ranges of kept pairs, each of whole parents and about `links` links: a step
        expanded a piece at a time (the kept pairs run in parent order)."""
        n = len(self.row)
        starts = np.flatnonzero(np.diff(self.row)) + 1  # where each later parent begins
        if n == 0 or len(starts) == 0:
            return [(0, n)]
        cum = np.cumsum(np.diff(to_numpy(self.indptr))[self.channel])
        want = np.searchsorted(cum, np.arange(links, int(cum[-1]), links))
        cuts = np.unique(starts[np.minimum(np.searchsorted(starts, want), len(starts) - 1)])
        edges = [0, *cuts.tolist(), n]
        return list(itertools.pairwise(edges))

    def expand_indexed(
        self, lo: int, hi: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """`expand` of the kept pairs ``lo:hi`` (whole parents: see `pieces`) as (parent
        kernel, child kernel, scores, pick): link ``i``'s r' is ``scores[pick[i]]``."""
        return self._expand(self.row[lo:hi], self.channel[lo:hi], self.score[lo:hi])

    def _expand(
        self, row: np.ndarray, channel: np.ndarray, score: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        entry, child = expand_csr(np, to_numpy(self.indptr), to_numpy(self.kernels), channel)
        parent = self.parent[row][entry]
        if self.injective:  # every link of a kept pair has its score
            return parent, child, score, entry
        n = int(max(parent.max(initial=0), child.max(initial=0))) + 1
        parent, child, r = max_per_pair(np, parent, child, score[entry], n)
        return parent, child, r, np.arange(len(r))


@dataclass(frozen=True)
class LayerStep:
    """What the back-step needs of one layer, on the backend."""

    kbar: Array  # [C_out, C_in/g]: float64, or a 1x1x1 layer's stored weights (float32)
    group: int
    indptr: Array  # input provenance CSR
    kernels: Array
    injective: bool  # every kernel appears in at most one channel's row


@dataclass(frozen=True)
class PyramidInputs:
    """Everything `build` reads, already on the backend (NumPy or CuPy)."""

    space: KernelSpace  # kernel ids of the layers
    head_weight: Array  # [classes, F] float64
    head_normalised: Array | None  # minmax of head_weight over the whole matrix, if kept
    head_indptr: Array
    head_kernels: Array
    features: Array  # [F] float64, pooled head input
    steps: Callable[[int], LayerStep]  # layer index -> its back-step data
    pooled: Callable[[int], Array]  # layer index -> [C_in] float64 pooled input
    head_cache: dict[Any, Any] | None = (
        None  # the Explainer's kept head selections (`selected_heads`)
    )


def build(
    xp: ModuleType,
    inp: PyramidInputs,
    options: PyramidOptions,
    *,
    label: int,
    model: str,
    logits: np.ndarray,
    label_name: str | None = None,
    union: Sequence[int] | None = None,
    count_links: bool = False,
) -> Pyramid:
    """Head, then one back-step per depth level, for class `label` of a run whose
    `logits` are given.

    With `union`, the head keeps what any of those classes keeps: the pyramid holds every
    kernel their pyramids hold, each at its smallest depth among them, and expands a
    kernel exactly as each of them does (a back-step depends on the kernel alone), so
    every link of theirs is one of its links.

    With `count_links`, each step's link count is taken while it is scored, so
    ``n_links`` never needs the links expanded (``cfp batch --clip-pyramids nodes``).

    Node sets and relevances come from per-channel maxima (a kernel's relevance is the
    largest r' over the channels that carry it), so the cost grows with kernels and
    channels, not with the number of links.
    """
    depth, theta, top_n, head_mode = (
        options.depth, options.theta, options.top_n, options.head_mode,
    )  # fmt: skip
    n_kernels = inp.space.size
    offsets = xp.asarray(inp.space.offsets)
    heads = sorted({label, *(int(k) for k in (union or ()))})
    _, kid, rel, bests = selected_heads(xp, inp, options, heads)
    best = float(bests[heads.index(label)])
    depth_of = xp.full(n_kernels, -1, dtype=xp.int64)
    head_rel = xp.full(n_kernels, -xp.inf)
    _scatter_max(xp, head_rel, kid, rel)
    incoming = xp.full(n_kernels, -xp.inf)
    frontier = _distinct(xp, kid, n_kernels)
    depth_of[frontier] = 0
    blocks: list[LinkBlock] = []
    for d in range(depth - 1):
        if len(frontier) == 0:
            break
        reached = _level(xp, inp, frontier, offsets, theta, top_n, incoming, blocks, count_links)
        fresh = reached[depth_of[reached] < 0]
        depth_of[fresh] = d + 1
        frontier = fresh
    relevance = xp.where(depth_of == 0, head_rel, incoming)
    kids = xp.flatnonzero(depth_of >= 0)  # ascending kernel id = (layer, channel) order
    order = xp.argsort(depth_of[kids], kind="stable")
    kids = kids[order]
    node_of = xp.full(n_kernels, -1, dtype=xp.int64)
    node_of[kids] = xp.arange(len(kids))
    layer, channel = inp.space.split(to_numpy(kids))
    depths = to_numpy(depth_of[kids])
    return Pyramid(
        model=model,
        label=label,
        label_name=label_name,
        score=float(logits[label]),
        logits=logits,
        theta=float(theta),
        depth=int(depth),
        max_depth_reached=int(depths.max()) if len(depths) else -1,
        head_mode=head_mode,
        top_n=top_n,
        space=inp.space,
        node_layer=layer,
        node_channel=channel,
        node_depth=depths,
        node_relevance=to_numpy(relevance[kids]),
        node_of=to_numpy(node_of),
        blocks=tuple(blocks),
        head_best=best,
    )


def head_kernels(
    xp: ModuleType, inp: PyramidInputs, options: PyramidOptions, labels: Sequence[int]
) -> tuple[Array, Array, Array, Array]:
    """The depth-0 kernels of each of `labels` (SPEC §4): ``(row, kernel id, relevance)``
    triples, one per (label, kernel) (a kernel's relevance is the largest score of the kept
    features leading to it), and each label's largest normalised score."""
    w, f, norm = inp.head_weight, inp.features, inp.head_normalised
    if options.head_mode == "weights" and norm is not None:
        scores = norm[xp.asarray(labels, dtype=xp.int64)]
    else:
        scores = xp.stack([head_scores(xp, w, f, int(k), options.head_mode, norm) for k in labels])
    rows, feats = nonzero_2d(xp, select(xp, scores, options.theta, options.top_n))
    entry, kid = expand_csr(xp, inp.head_indptr, inp.head_kernels, feats)
    key, rel = max_per_key(xp, rows[entry] * inp.space.size + kid, scores[rows, feats][entry])
    return key // inp.space.size, key % inp.space.size, rel, scores.max(axis=1)


HEAD_CACHE = 8
"""Head selections an Explainer keeps (`selected_heads`): the paper's head does not depend
on the clip, and a pyramid class tube asks for every class's twice."""


def selected_heads(
    xp: ModuleType, inp: PyramidInputs, options: PyramidOptions, labels: Sequence[int]
) -> tuple[Array, Array, Array, Array]:
    """`head_kernels`, kept in `inp.head_cache` in the ``weights`` mode (the same for every
    clip); the kept arrays are read-only on the CPU, so no caller can change them."""
    cache = inp.head_cache
    if options.head_mode != "weights" or inp.head_normalised is None or cache is None:
        return head_kernels(xp, inp, options, labels)
    key = (options.theta, options.top_n, tuple(int(k) for k in labels))
    got = cache.get(key)
    if got is None:
        got = head_kernels(xp, inp, options, labels)
        for a in got:
            if isinstance(a, np.ndarray):
                a.flags.writeable = False
        if len(cache) >= HEAD_CACHE:
            cache.clear()
        cache[key] = got
    return got


@lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="cfp")


def _distinct(xp: ModuleType, ids: Array, size: int) -> Array:
    """``xp.unique(ids)`` of ids in ``[0, size)``, through a mask over them: a level's
    children are tens of thousands of ids, often repeated, of a kernel space of ~10^5,
    where NumPy's hashing unique is 40x slower (ResNeXt-101-3D: 2.8 against 0.07 ms)."""
    mark = xp.zeros(size, dtype=bool)
    mark[ids] = True
    return xp.flatnonzero(mark)


def _scatter_max(xp: ModuleType, target: Array, index: Array, values: Array) -> None:
    """``target[index] = max(target[index], values)`` with repeated indices (no ufunc.at on CuPy)."""
    if len(index) == 0:
        return
    idx, val = max_per_key(xp, index, values)
    target[idx] = xp.maximum(target[idx], val)


def _level(
    xp: ModuleType,
    inp: PyramidInputs,
    frontier: Array,
    offsets: Array,
    theta: float,
    top_n: int | None,
    incoming: Array,
    blocks: list[LinkBlock],
    count_links: bool = False,
) -> Array:
    """Expand every frontier kernel, one vectorised back-step per layer; return the children.

    The layers' steps are independent and NumPy releases the GIL in their large array
    ops, so on the CPU they run on a small thread pool; merging stays sequential.
    """
    layer_of = xp.searchsorted(offsets, frontier, side="right") - 1

    def one(
        task: tuple[int, Array],
    ) -> tuple[Array, Callable[[], tuple[Array, Array, Array]], LayerStep, Array, Array | None]:
        layer, kids = task
        step = inp.steps(layer)
        pooled = inp.pooled(layer)
        args = (xp, step.kbar, step.group, kids - offsets[layer], pooled, theta)
        if top_n is None:
            return (
                kids,
                partial(kept_pairs, *args, None),
                step,
                *column_best(*args, None, count_links),
            )
        best, count, pairs = best_and_pairs(*args, top_n, count_links)
        return kids, lambda: pairs, step, best, count

    layers = to_numpy(_distinct(xp, layer_of, len(offsets))).tolist()
    tasks = [(la, frontier[layer_of == la]) for la in layers]
    for layer, _ in tasks:  # read weights here, one layer at a time, not in the workers
        inp.steps(layer)
    if xp is np and len(tasks) > 1:
        results = list(_pool().map(one, tasks))
    else:
        results = [one(task) for task in tasks]
    reached = []
    for kids, redo, step, best, count in results:
        chans = xp.flatnonzero(best > -xp.inf)
        entry, child = expand_csr(xp, step.indptr, step.kernels, chans)
        links = None
        if step.injective:
            incoming[child] = xp.maximum(incoming[child], best[chans][entry])
            if count is not None:  # every kept pair x the kernels its channel carries
                links = int((count * xp.diff(step.indptr)).sum())
        else:
            _scatter_max(xp, incoming, child, best[chans][entry])
        reached.append(child)
        blocks.append(LinkBlock(xp, kids, redo, step.indptr, step.kernels, step.injective, links))
    if not reached:
        return xp.zeros(0, dtype=xp.int64)
    return _distinct(xp, xp.concatenate(reached), len(incoming))
