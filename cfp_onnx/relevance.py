"""The head (SPEC §4) and the back-step (SPEC §3) as array kernels.

Every function takes the array module ``xp`` (NumPy or CuPy) and works on all
selected kernels of one layer at once: a few array ops per layer, no Python loop
per kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

HEAD_MODES = ("weights", "contribution", "contrastive")

Array = Any  # numpy.ndarray or cupy.ndarray


def minmax(xp: ModuleType, r: Array, axis: int | None = -1) -> Array:
    """``(r - min) / (max - min)`` along `axis`; a constant slice normalises to ones."""
    lo = r.min(axis=axis, keepdims=True)
    span = r.max(axis=axis, keepdims=True) - lo
    flat = span == 0
    return xp.where(flat, 1.0, (r - lo) / xp.where(flat, 1.0, span))


def select(xp: ModuleType, scores: Array, theta: float, top_n: int | None) -> Array:
    """Mask of kept entries per row: ``>= theta``, then the ``top_n`` largest (ties: lower index)."""
    keep = scores >= theta
    if top_n is None or top_n >= scores.shape[-1]:
        return keep
    masked = xp.where(keep, scores, -xp.inf)
    order = xp.argsort(-masked, axis=-1, kind="stable")
    rank = xp.empty_like(order)
    xp.put_along_axis(rank, order, xp.arange(scores.shape[-1])[None, :].repeat(len(order), 0), -1)
    return keep & (rank < top_n)


def head_scores(xp: ModuleType, weight: Array, features: Array, label: int, mode: str) -> Array:
    """Normalised score of each feature for `label` (SPEC §4)."""
    if mode == "weights":
        return minmax(xp, weight, axis=None)[label]
    if mode == "contribution":
        return minmax(xp, weight[label] * features)
    others = xp.concatenate([weight[:label], weight[label + 1 :]])
    return minmax(xp, (weight[label] - others.mean(axis=0)) * features)


def tap_means(xp: ModuleType, weight: Array) -> Array:
    """``k[j, m]``: each kernel's weight for input m, averaged over its taps, in float64."""
    w = xp.asarray(weight, dtype=xp.float64)
    return w.reshape(w.shape[0], w.shape[1], -1).mean(axis=2)


@dataclass(frozen=True)
class Kept:
    """Input channels kept by a back-step: ``kernel[row]`` keeps ``channel`` with ``score``."""

    row: Array  # index into the selected kernels
    channel: Array  # input channel of the layer
    score: Array  # normalised relevance r'


def back_step(
    xp: ModuleType,
    kbar: Array,
    group: int,
    js: Array,
    a: Array,
    theta: float,
    top_n: int | None,
) -> Kept:
    """Score, normalise and keep the input channels of kernels `js` of one layer.

    Args:
        kbar: ``[C_out, C_in/g]`` tap-mean weights of the layer.
        js: selected output channels.
        a: ``[C_in]`` input activations pooled over time and space (float64).
    """
    c_out, per_group = kbar.shape
    q = js // (c_out // group)
    channels = q[:, None] * per_group + xp.arange(per_group)[None, :]
    r = minmax(xp, kbar[js] * a[channels])
    row, m = xp.nonzero(select(xp, r, theta, top_n))
    return Kept(row, channels[row, m], r[row, m])


def expand_csr(
    xp: ModuleType, indptr: Array, kernels: Array, channel: Array
) -> tuple[Array, Array]:
    """For each entry's channel, every kernel it carries: (entry index, kernel id) pairs."""
    start, stop = indptr[channel], indptr[channel + 1]
    counts = stop - start
    entry = xp.repeat(xp.arange(len(channel)), counts)
    first = xp.cumsum(counts) - counts
    offset = xp.arange(int(counts.sum())) - first[entry]
    return entry, kernels[start[entry] + offset]


def max_per_pair(
    xp: ModuleType, parent: Array, child: Array, score: Array, n_kernels: int
) -> tuple[Array, Array, Array]:
    """Deduplicate (parent, child) pairs, keeping the largest score."""
    if len(parent) == 0:
        return parent, child, score
    key = parent * n_kernels + child
    order = xp.lexsort(xp.stack([-score, key]))
    key, score = key[order], score[order]
    first = xp.ones(len(key), dtype=bool)
    first[1:] = key[1:] != key[:-1]
    key, score = key[first], score[first]
    return key // n_kernels, key % n_kernels, score
