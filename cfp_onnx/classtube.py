"""Class tubes: one spatio-temporal map per explained class, from its depth-0 kernels.

* ``weighted``: the sum over the pyramid's depth-0 kernels of their raw maps (SPEC §6,
  before the per-tube min-max) times their relevance, upsampled to the clip.
* ``contrast``: the weighted tube minus the mean of every class's weighted tube, all from
  the same run. What the weighted tube shares with every class (the paper's head picks
  nearly the same kernels whatever the class) cancels; what is specific to this class
  stays. Positive voxels speak for the class more than for the average class.
* ``pyramid``: the whole pyramid, every depth. Relevance flows from the head down the
  links: a depth-0 kernel carries its head score, and each parent shares what it carries
  among its children in proportion to the links' relevance,
  ``f[c] = sum over links (p, c) of f[p] * r(p, c) / sum over c' of r(p, c')``. Each
  kernel's own output map ``y_L[j]`` (what that kernel responds to), divided by its
  largest magnitude, is weighted by its flow and summed:
  ``P(label) = sum over kernels n of f[n] * y_n / max|y_n|``. The tube is ``P(label)``
  minus the mean of ``P`` over every class, each class's pyramid built from the same run
  with the same options.

Our benchmarks (``benchmarks/README.md``, Quality) recommend ``pyramid`` with ``top_n=5``
and ``theta=0``: class-specific, sensitive to the model's weights, and localising the
actor about as well as 3D Grad-CAM (``contrast`` is as specific but localises worse; the
paper's ``weighted`` tube is neither specific nor sensitive). Upsampling is linear, so maps are summed per feature resolution first
and upsampled once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from cfp_onnx.errors import OptionError
from cfp_onnx.options import CLASS_TUBES, PyramidOptions
from cfp_onnx.pyramid import Pyramid
from cfp_onnx.tubes import TubeMaker, upsample
from cfp_onnx.xp import to_numpy

if TYPE_CHECKING:
    from cfp_onnx.api import Explainer, Run

KINDS = CLASS_TUBES
CAPTIONS = {
    "weighted": "class tube: relevance-weighted depth-0 maps",
    "contrast": "class tube, contrast: this class's weighted depth-0 maps minus the mean "
    "over all classes (red: more than the average class)",
    "pyramid": "class tube, pyramid: every pyramid kernel's response weighted by the "
    "relevance flowing to it from the head, minus the mean over all classes (red: more "
    "than the average class)",
}


def _feature_sums(
    ex: Explainer, pyr: Pyramid, run: Run, weighted: bool = True
) -> dict[tuple[int, ...], np.ndarray]:
    """Sum of the depth-0 raw maps (times relevance if `weighted`), float64 per resolution."""
    nodes = np.flatnonzero(pyr.node_depth == 0)
    sums: dict[tuple[int, ...], np.ndarray] = {}
    if len(nodes) == 0:
        return sums
    raw = TubeMaker(ex, pyr, run, (1, 1, 1)).raw(nodes)
    weights = pyr.node_relevance[nodes] if weighted else np.ones(len(nodes))
    for r, m in zip(weights.tolist(), raw):
        m = np.asarray(to_numpy(m), np.float64)
        m = m.reshape(-1, *m.shape[-3:]).sum(0)
        sums[m.shape] = sums.get(m.shape, 0.0) + r * m
    return sums


def _upsampled(sums: dict[tuple[int, ...], np.ndarray], size: Sequence[int]) -> np.ndarray:
    out = np.zeros(tuple(int(s) for s in size), np.float32)
    for m in sums.values():
        out += upsample(np, m[None].astype(np.float32), size)[0]
    return out


def class_tubes(
    ex: Explainer,
    run: Run,
    pyramids: Sequence[Pyramid],
    size: Sequence[int],
    *,
    weighted: bool = True,
) -> np.ndarray:
    """``[len(pyramids), T, H, W]`` class tubes of pyramids built from `run`; with
    ``weighted=False`` the depth-0 maps are summed as they are (benchmarks compare both)."""
    return np.stack([_upsampled(_feature_sums(ex, p, run, weighted), size) for p in pyramids])


def pyramid_tubes(
    ex: Explainer, run: Run, pyramids: Sequence[Pyramid], size: Sequence[int]
) -> np.ndarray:
    """``[len(pyramids), T, H, W]``: ``P`` of each pyramid (the ``pyramid`` tube before the
    mean over classes is taken away; benchmarks build every label's from one run)."""
    return np.stack([_upsampled(_pyramid_sums(ex, p, run), size) for p in pyramids])


def class_pyramids(ex: Explainer, run: Run, pyr: Pyramid) -> list[Pyramid]:
    """Every class's pyramid with `pyr`'s settings, only as deep as depth-0 maps need.

    A depth-0 kernel's kept input channels come from its own back-step alone, so depth 2
    gives the same depth-0 maps as any deeper pyramid.
    """
    return [
        ex.pyramid(
            run,
            label=k,
            depth=min(pyr.depth, 2),
            theta=pyr.theta,
            top_n=pyr.top_n,
            head_mode=pyr.head_mode,
        )
        for k in range(ex.classes)
    ]


def flow(pyr: Pyramid) -> np.ndarray:
    """Per node, the head relevance that reaches it down the links (see the module doc):
    one vectorised pass per parent layer, nearest the head first (a child's layer always
    comes before its parent's, so a parent has received all it carries when it shares)."""
    n = len(pyr.node_layer)
    f = np.where(pyr.node_depth == 0, pyr.node_relevance, 0.0).astype(np.float64)
    src, dst, rel = pyr.link_source, pyr.link_target, pyr.link_relevance
    if len(src) == 0:
        return f
    share = _shares(src, rel, n)
    layer = pyr.node_layer[src]
    order = np.argsort(-layer, kind="stable")
    src, dst, share, layer = src[order], dst[order], share[order], layer[order]
    bounds = np.flatnonzero(np.diff(layer)) + 1
    for lo, hi in zip([0, *bounds.tolist()], [*bounds.tolist(), len(src)]):
        f += np.bincount(dst[lo:hi], weights=f[src[lo:hi]] * share[lo:hi], minlength=n)
    return f


def _shares(src: np.ndarray, rel: np.ndarray, n: int) -> np.ndarray:
    """Each link's share of its parent's flow: its relevance over the parent's total."""
    out_sum = np.bincount(src, weights=rel, minlength=n)[src]
    return np.where(out_sum > 0, rel / np.where(out_sum > 0, out_sum, 1.0), 0.0)


def output_tensors(ex: Explainer, depth: int) -> tuple[str, ...]:
    """The conv outputs the ``pyramid`` tube reads: every layer a depth-`depth` pyramid
    can reach."""
    levels = ex.levels(depth)
    return tuple(dict.fromkeys(ex.layers[int(i)].output for lv in levels for i in lv.tolist()))


def tensors(ex: Explainer, kind: str | None, depth: int) -> tuple[str, ...]:
    """Full maps a run needs for a class tube of `kind`: every reachable layer's output
    for ``pyramid``, the SPEC §6 maps' tensors (``ex.map_tensors``) for the others."""
    if kind is None:
        return ()
    return output_tensors(ex, depth) if kind == "pyramid" else ex.map_tensors(depth)


def _pyramid_sums(ex: Explainer, pyr: Pyramid, run: Run) -> dict[tuple[int, ...], np.ndarray]:
    """``P`` of one pyramid per feature resolution, float64 (before upsampling)."""
    return _response_sums(ex, pyr, run, flow(pyr))


def _response_sums(
    ex: Explainer, pyr: Pyramid, run: Run, f: np.ndarray
) -> dict[tuple[int, ...], np.ndarray]:
    """``sum over nodes n of f[n] * y_n / max|y_n|`` per feature resolution (`f` per node
    of `pyr`): one gather and one contraction per layer."""
    nodes = np.flatnonzero(f != 0)
    sums: dict[tuple[int, ...], np.ndarray] = {}
    layers = pyr.node_layer[nodes]
    for la in np.unique(layers).tolist():
        name = ex.layers[la].output
        if name not in run.full:
            raise OptionError(
                f"the pyramid class tube needs the output of {ex.layers[la].node!r}: run the "
                "clip with full=classtube.tensors(explainer, 'pyramid', depth) too"
            )
        members = nodes[layers == la]
        y = np.asarray(to_numpy(run.full[name]), np.float32)
        y = y.reshape(y.shape[0], *(1,) * max(0, 4 - y.ndim), *y.shape[1:])
        maps = y[pyr.node_channel[members]].astype(np.float64)
        peak = np.abs(maps).reshape(len(members), -1).max(axis=1)
        w = np.where(peak > 0, f[members] / np.where(peak > 0, peak, 1.0), 0.0)
        m = np.tensordot(w, maps, axes=1)
        sums[m.shape] = sums.get(m.shape, 0.0) + m
    return sums


FLOW_BLOCK = 1 << 19
"""Class x node entries handled at once by `mean_flow`: it bounds the memory, and a block
this small stays in cache (ResNet-152-3D, 400 classes: 84 ms and 22 MB traced, against
112 ms and 78 MB at 1 << 22; 1 << 17 is slower again, from the per-block passes)."""


def mean_flow(ex: Explainer, run: Run, pyr: Pyramid) -> tuple[Pyramid, np.ndarray]:
    """The mean over every class of its pyramid's `flow` (with `pyr`'s settings, same run),
    on the union of their pyramids: ``(union pyramid, mean flow per union node)``.

    Exact without building K pyramids: a back-step depends on the kernel alone, so each
    class's pyramid is the part of the union that its own depth-0 kernels reach within
    its depth, and its links are the union's links of the kernels it expands. A flow is
    linear: a node's flow summed over classes is the head's share plus, over every link
    (p, c), ``r(p, c) / sum r(p, .)`` times ``G[p]``, the flow p carries summed over the
    classes that expand it. Per class, only the flow of the kernels it expands (depth at
    most D-2) is needed, so only links into nodes within depth D-2 of the union are
    followed per (class, kernel) pair, sparse (with ``top_n`` a class reaches a few
    hundred kernels of the union's thousands), a wave at a time (`_waves`); every other
    link is one pass over the union's links, for all classes at once.
    """
    labels = list(range(ex.classes))
    opts = PyramidOptions(depth=pyr.depth, theta=pyr.theta, top_n=pyr.top_n,
                          head_mode=pyr.head_mode, label=pyr.label)  # fmt: skip
    union = ex.pyramid(run, opts, union=labels)
    row, kid, rel = ex.head_kernels(run, opts, labels)
    node = union.node_of[kid]
    n = len(union.node_layer)
    src, dst, lrel = union.links_unordered()
    share = _shares(src, lrel, n)
    # A class expands a kernel only within depth D-2 of its head, and its depth is never
    # below the union's: only links into such kernels can carry what a class expands.
    inner = np.flatnonzero(union.node_depth[dst] <= pyr.depth - 2)
    inner = inner[np.argsort(src[inner], kind="stable")]  # by source
    i_dst, i_share = dst[inner], share[inner]
    indptr = np.searchsorted(src[inner], np.arange(n + 1))

    def children(k: np.ndarray, parent: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(class, inner link index) of every inner link out of each (class, parent)
        pair, and how many each pair has."""
        counts = indptr[parent + 1] - indptr[parent]
        first = np.repeat(indptr[parent] - (np.cumsum(counts) - counts), counts)
        return np.repeat(k, counts), first + np.arange(len(first)), counts

    wave = _waves(union.node_layer, src[inner], i_dst, n)
    step = max(1, FLOW_BLOCK // max(1, n))

    def block(lo: int) -> np.ndarray:
        """G of classes ``lo:lo+step``: per node, the flow it carries summed over those
        of them that expand it."""
        pick = (row >= lo) & (row < lo + step)
        c = min(step, len(labels) - lo)
        k, at = row[pick] - lo, node[pick]
        f = np.zeros((c, n))
        f[k, at] = rel[pick]
        # Which (class, kernel) pairs each class expands (depth <= D-2), found from the
        # depth-0 pairs one level at a time, never by scanning a class x kernel array.
        seen = np.zeros((c, n), bool)
        seen[k, at] = True
        expand_k, expand_at = [k], [at]
        for _ in range(pyr.depth - 2):
            k_link, link, _ = children(k, at)
            fresh = np.zeros(c * n, bool)  # a mask, not a sort: many links share a child
            fresh[k_link * n + i_dst[link]] = True
            key = np.flatnonzero(fresh & ~seen.reshape(-1))
            seen.reshape(-1)[key] = True
            k, at = key // n, key % n
            expand_k.append(k)
            expand_at.append(at)
        k, at = np.concatenate(expand_k), np.concatenate(expand_at)
        order = np.argsort(wave[at], kind="stable")
        k, at = k[order], at[order]
        bounds = np.flatnonzero(np.diff(wave[at])) + 1
        for a, b in zip([0, *bounds.tolist()], [*bounds.tolist(), len(at)]):
            kk, parent = k[a:b], at[a:b]
            carried = f[kk, parent]
            k_link, link, counts = children(kk, parent)
            flows = np.repeat(carried, counts) * i_share[link]
            np.add.at(f.reshape(-1), k_link * n + i_dst[link], flows)
        return np.bincount(at, weights=f[k, at], minlength=n)  # every pair's flow is final

    # Blocks are independent, but on the CPU's thread pool they ran no faster (their
    # arrays are small: the GIL and memory bound them).
    carried_by = np.sum([block(lo) for lo in range(0, len(labels), step)], axis=0)
    total = np.bincount(node, weights=rel, minlength=n)  # the head's share, every class
    total += np.bincount(dst, weights=carried_by[src] * share, minlength=n)
    return union, total / len(labels)


def _waves(layer: np.ndarray, src: np.ndarray, dst: np.ndarray, n: int) -> np.ndarray:
    """Per node, its longest path from a link-less node along the links ``src -> dst``,
    as small unsigned keys (NumPy radix-sorts them): a node's parents all come in earlier
    waves, and no link joins two nodes of one wave, so a flow can be passed on a wave at
    a time (a few) instead of a parent layer at a time (up to hundreds). Found a parent
    layer at a time, nearest the head first: a child's layer comes before its parent's.
    """
    wave = np.zeros(n, np.int64)
    if len(src) == 0:
        return wave.astype(np.uint8)
    parent = layer[src]
    top = int(parent.max())
    key = (top - parent).astype(np.min_scalar_type(top))  # nearest the head first, radix
    order = np.argsort(key, kind="stable")
    src, dst, key = src[order], dst[order], key[order]
    bounds = np.flatnonzero(np.diff(key)) + 1
    for a, b in zip([0, *bounds.tolist()], [*bounds.tolist(), len(src)]):
        np.maximum.at(wave, dst[a:b], wave[src[a:b]] + 1)
    return wave.astype(np.min_scalar_type(int(wave.max())))


def class_tube(
    ex: Explainer, run: Run, pyr: Pyramid, size: Sequence[int], kind: str = "weighted"
) -> np.ndarray:
    """The class tube of `pyr` at `size` ``(T, H, W)``, float32, not normalised.

    `run` must hold ``tensors(ex, kind, pyr.depth)``.
    ``contrast`` builds every class's pyramid from the same run (one back-step level
    each), ``pyramid`` every class's whole pyramid, so their cost grows with the number
    of classes; with ``top_n`` each is a handful of kernels.

    Raises:
        OptionError: `kind` is not one of KINDS.
    """
    if kind not in KINDS:
        raise OptionError(f"class tube must be one of {', '.join(KINDS)} (got {kind!r})")
    if kind == "pyramid":
        own = _pyramid_sums(ex, pyr, run)
        union, mean = mean_flow(ex, run, pyr)
        avg = _response_sums(ex, union, run, mean)
    else:
        own = _feature_sums(ex, pyr, run)
        if kind == "weighted":
            return _upsampled(own, size)
        total: dict[tuple[int, ...], np.ndarray] = {}
        for p in class_pyramids(ex, run, pyr):
            for shape, m in _feature_sums(ex, p, run).items():
                total[shape] = total.get(shape, 0.0) + m
        avg = {shape: m / ex.classes for shape, m in total.items()}
    diff = {s: own.get(s, 0.0) - avg.get(s, 0.0) for s in dict.fromkeys([*own, *avg])}
    return _upsampled({s: np.asarray(m, np.float64) for s, m in diff.items()}, size)
