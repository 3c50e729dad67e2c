"""The head (SPEC §4) and the back-step (SPEC §3) as array kernels.

Every function takes the array module ``xp`` (NumPy or CuPy) and works on all
selected kernels of one layer at once: a few array ops per layer, no Python loop
per kernel.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

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
    # The top_n-th largest kept score of each row (partitions, not a sort: O(C) a row),
    # then everything above it and, of the ties at it, the lowest indices.
    every = bool(keep.all())  # theta 0: normalised scores all reach it
    masked = scores if every else xp.where(keep, scores, -xp.inf)
    rows = masked.reshape(-1, masked.shape[-1])
    kth = kth_largest(xp, rows, top_n).reshape(*masked.shape[:-1], 1)
    # At most top_n entries of a row reach its kth unless it ties with others; then
    # those entries are the answer (the usual case, no running count of ties needed).
    reach = masked >= kth if every else keep & (masked >= kth)
    if bool((reach.sum(axis=-1) <= top_n).all()):
        return reach
    above = masked > kth
    tie = keep & (masked == kth)
    room = top_n - above.sum(axis=-1, keepdims=True)
    return keep & (above | (tie & (xp.cumsum(tie, axis=-1) <= room)))


def head_scores(
    xp: ModuleType,
    weight: Array,
    features: Array,
    label: int,
    mode: str,
    normalised: Array | None = None,
) -> Array:
    """Normalised score of each feature for `label` (SPEC §4).

    `normalised` is ``minmax(weight, axis=None)`` when the caller keeps it: in the paper's
    mode it does not depend on the clip, so an Explainer computes it once.
    """
    if mode == "weights":
        return (minmax(xp, weight, axis=None) if normalised is None else normalised)[label]
    if mode == "contribution":
        return minmax(xp, weight[label] * features)
    others = xp.concatenate([weight[:label], weight[label + 1 :]])
    return minmax(xp, (weight[label] - others.mean(axis=0)) * features)


@dataclass(frozen=True)
class Step:
    """One layer's back-step for its selected kernels, kept dense: row i is kernel ``js[i]``,
    column m its group's input channel ``q[i] * per_group + m``. The kept mask and pairs are
    derived on demand: node sets and relevances need only per-channel maxima."""

    js: Array  # selected output channels, ascending
    q: Array  # their group
    score: Array  # [len(js), C_in/g] normalised relevance r'
    theta: float
    top_n: int | None

    @property
    def per_group(self) -> int:
        return int(self.score.shape[1])

    def keep(self, xp: ModuleType) -> Array:
        return select(xp, self.score, self.theta, self.top_n)

    def kept(self, xp: ModuleType, keep: Array | None = None) -> tuple[Array, Array, Array]:
        """(row, input channel, r') of every kept pair (`keep`: the step's mask, if made)."""
        row, m = nonzero_2d(xp, self.keep(xp) if keep is None else keep)
        return row, self.q[row] * self.per_group + m, self.score[row, m]

    def column_max(
        self, xp: ModuleType, c_in: int, count: bool = False, keep: Array | None = None
    ) -> tuple[Array, Array | None]:
        """Per input channel, the largest kept r' over all selected kernels (-inf: none),
        and, with `count`, how many kernels keep it (what the step's link count is made of).

        Without top_n a kept entry is one >= theta, so the column maximum of r' is the
        largest kept value whenever it reaches theta: one reduction, no mask.
        """
        if keep is None and (count or self.top_n is not None):
            keep = self.keep(xp)
        if self.top_n is None:
            scores = self.score
        else:
            scores = xp.where(keep, self.score, -xp.inf)
        kept = None
        if count:
            rows, m = nonzero_2d(xp, keep)
            kept = xp.bincount(self.q[rows] * self.per_group + m, minlength=c_in)
        if self.per_group == c_in:  # group 1: every kernel sees every channel
            seg = scores.max(axis=0)[None, :]
            starts = xp.zeros(1, dtype=xp.int64)
        else:
            starts = xp.flatnonzero(
                xp.concatenate([xp.ones(1, dtype=bool), self.q[1:] != self.q[:-1]])
            )
            seg = _segment_max(xp, scores, starts)
        out = xp.full(c_in, -xp.inf)
        cols = self.q[starts][:, None] * self.per_group + xp.arange(self.per_group)[None, :]
        out[cols] = xp.where(seg >= self.theta, seg, -xp.inf)
        return out, kept


def nonzero_2d(xp: ModuleType, mask: Array) -> tuple[Array, Array]:
    """``xp.nonzero`` of a 2-D mask, from its flat indices (row-major, the same order):
    NumPy's 2-D nonzero is ~7x slower than a flat one and a division."""
    flat = xp.flatnonzero(mask)
    return flat // mask.shape[1], flat % mask.shape[1]


def _segment_max(xp: ModuleType, scores: Array, starts: Array) -> Array:
    if hasattr(xp.maximum, "reduceat"):
        return xp.maximum.reduceat(scores, starts, axis=0)
    bounds = [*to_host(starts).tolist(), len(scores)]  # CuPy: one reduction per group present
    return xp.stack([scores[a:b].max(axis=0) for a, b in itertools.pairwise(bounds)])


def products(
    xp: ModuleType, kbar: Array, group: int, js: Array, a: Array, out: Array | None = None
) -> Array:
    """``r = k * a`` in float64 for kernels `js`: each row its group's input channels.

    A 1x1x1 layer's tap means are its stored float32 weights. They are widened into the
    float64 block first and multiplied there in place: NumPy's mixed-dtype multiply casts
    through small buffers and costs 1.4x the copy and the product together (ResNeXt-101-
    3D's ungrouped steps, one thread: 16.4 -> 11.3 ms). Widening is exact: same values.
    """
    c_out, per_group = kbar.shape
    acts = a[None, :] if group == 1 else a.reshape(group, per_group)[js // (c_out // group)]
    rows = kbar[js] if not _is_run(js) else kbar[int(js[0]) : int(js[0]) + len(js)]
    if rows.dtype == xp.float64:
        with row_buffers(xp, per_group):
            return xp.multiply(rows, acts, out=out)
    r = xp.empty(rows.shape) if out is None else out
    r[...] = rows
    with row_buffers(xp, per_group):
        return xp.multiply(r, acts, out=r)


ROW_BUFFER, ROW_BUFFER_FROM = 256, 384
"""NumPy's ufunc buffer (elements) for the back-step's broadcast element-wise ops, and the
row length from which it is used. With the default 8192, a product, difference or
quotient of a ``[rows, C]`` block and a per-row or per-column vector runs through buffers
that span rows, ~2x slower than with a buffer no longer than a row, which leaves each
row's inner loop unbuffered: 1 << 17 float64 in rows of 1024, subtract 45 -> 21 us, divide
64 -> 48, multiply 42 -> 31. Rows shorter than ~384 are faster with the default, and so
are reductions (row min and max, column max: 10-20 % slower with the small buffer), which
keep it. The arithmetic is the same: the values are bit-equal."""


@contextmanager
def row_buffers(xp: ModuleType, width: int) -> Iterator[None]:
    """Run the block's broadcast element-wise ops with `ROW_BUFFER` (NumPy, rows of at least
    `ROW_BUFFER_FROM`). ``errstate`` scopes the buffer size to this thread and restores it."""
    if xp is not np or width < ROW_BUFFER_FROM:
        yield
        return
    with np.errstate():
        np.setbufsize(ROW_BUFFER)
        yield


def scores(
    xp: ModuleType, kbar: Array, group: int, js: Array, a: Array, out: Array | None = None
) -> Array:
    """``r'``: the normalised relevance of each input channel of kernels `js` (SPEC §3).

    Args:
        kbar: ``[C_out, C_in/g]`` tap-mean weights of the layer.
        group: the conv's ``group``: a kernel sees only its group's input channels.
        js: selected output channels, ascending.
        a: ``[C_in]`` input activations pooled over time and space (float64).
        out: ``[len(js), C_in/g]`` float64 to write into (a caller's reused block).
    """
    r = products(xp, kbar, group, js, a, out)  # normalised in place
    lo = r.min(axis=1, keepdims=True)
    span = r.max(axis=1, keepdims=True) - lo
    flat = span[:, 0] == 0
    with row_buffers(xp, r.shape[1]):
        r -= lo
        r /= xp.where(span == 0, 1.0, span)
    if bool(flat.any()):
        r[flat] = 1.0  # one input, or all equal: every channel is as relevant (SPEC §3)
    return r


def _is_run(js: Array) -> bool:
    """Ascending distinct ids forming one unbroken run (a whole layer, often): a slice."""
    return len(js) > 0 and int(js[-1]) - int(js[0]) == len(js) - 1


def back_step(
    xp: ModuleType,
    kbar: Array,
    group: int,
    js: Array,
    a: Array,
    theta: float,
    top_n: int | None,
) -> Step:
    """The back-step of kernels `js` of one layer, kept dense (see `scores`)."""
    q = js // (kbar.shape[0] // group)
    return Step(js, q, scores(xp, kbar, group, js, a), theta, top_n)


BLOCK = 1 << 18
"""Score entries per block of rows (`column_best`, `kept_pairs`): 2 MB of float64 a block.
A layer's steps run two at a time on the pool (`pyramid._level`), and there smaller blocks
pay more in per-call overhead and hand-offs of the GIL than they win in cache: explain's
pyramid right after a forward, medians of 25, 1 << 16 -> 1 << 18: ResNeXt-101-3D
34.8 -> 27.8 ms, ResNet-152-3D 34.0 -> 28.1, ResNet-50-3D 11.4 -> 10.8, MFNet 5.4 -> 4.9;
the top-n selection measured the same (union pyramid of 400 classes, in process:
ResNet-50-3D 18.5 -> 14.6 ms, ResNeXt-101-3D 31.9 -> 24.1); 1 << 20 is no faster."""


def column_best(
    xp: ModuleType,
    kbar: Array,
    group: int,
    js: Array,
    a: Array,
    theta: float,
    top_n: int | None,
    count: bool = False,
) -> tuple[Array, Array | None]:
    """``back_step(...).column_max(...)`` without holding the whole score matrix.

    All a pyramid's node set and relevances need of a step is, per input channel, the
    largest kept r' (with `count`, also how many kernels keep it: the step's link count
    without expanding its links; a pass that costs ~20% of the step). For ungrouped
    layers without top_n the rows are scored a block at a time, into one reused buffer,
    so the arithmetic runs in cache instead of streaming a matrix of millions of float64
    through memory several times, and no block faults in fresh pages (glibc returns a
    freed block of this size to the system: 28% of ResNeXt-101-3D's ungrouped steps, on
    one thread); the values are the same, element by element.
    """
    if group != 1 or top_n is not None:
        return back_step(xp, kbar, group, js, a, theta, top_n).column_max(xp, len(a), count)
    best = xp.full(len(a), -xp.inf)
    kept = xp.zeros(len(a), dtype=xp.int64) if count else None
    rows = max(1, BLOCK // kbar.shape[1])
    block = xp.empty((min(rows, len(js)), kbar.shape[1]))
    for start in range(0, len(js), rows):
        part = js[start : start + rows]
        r = scores(xp, kbar, 1, part, a, out=block[: len(part)])
        xp.maximum(best, r.max(axis=0), out=best)
        if kept is not None:
            kept += (r >= theta).sum(axis=0)
    return xp.where(best >= theta, best, -xp.inf), kept


def best_and_pairs(
    xp: ModuleType,
    kbar: Array,
    group: int,
    js: Array,
    a: Array,
    theta: float,
    top_n: int,
    count: bool = False,
) -> tuple[Array, Array | None, tuple[Array, Array, Array]]:
    """`column_best` and `kept_pairs` of a top_n step from one scoring and one selection,
    a block of rows at a time. The selection is most of a top_n step's cost, and its pairs
    (top_n a row at most) are few: the column maxima and counts are taken from them, not
    from the matrix, and they are small enough to hold until the links are written."""
    pairs = kept_pairs(xp, kbar, group, js, a, theta, top_n)
    _, channel, score = pairs
    best = xp.full(len(a), -xp.inf)
    if xp is np:
        np.maximum.at(best, channel, score)
    elif len(channel):  # CuPy has no ufunc.at
        at, val = max_per_key(xp, channel, score)
        best[at] = val
    kept = xp.bincount(channel, minlength=len(a)) if count else None
    return best, kept, pairs


def kept_pairs(
    xp: ModuleType,
    kbar: Array,
    group: int,
    js: Array,
    a: Array,
    theta: float,
    top_n: int | None,
) -> tuple[Array, Array, Array]:
    """``back_step(...).kept(xp)``, its rows scored a block at a time: (row, input
    channel, r') of every kept pair, rows ascending, channels ascending within a row.

    A step's dense score matrix is rows x inputs in float64 (a ResNet-50-3D's head step:
    843 x 2048, 14 MB, and its mask beside it); scoring and selecting are row by row, so
    blocks of rows give the same pairs, element by element, holding one block at a time.
    """
    fast = top_n is not None and top_n < kbar.shape[1]
    step = max(1, BLOCK // kbar.shape[1])
    parts = []
    for start in range(0, len(js), step):
        rows = js[start : start + step]
        if fast:
            row, channel, score = top_pairs(xp, kbar, group, rows, a, theta, int(top_n or 0))
        else:
            row, channel, score = back_step(xp, kbar, group, rows, a, theta, top_n).kept(xp)
        parts.append((row + start, channel, score))
    if not parts:
        return xp.zeros(0, xp.int64), xp.zeros(0, xp.int64), xp.zeros(0)
    row, channel, score = (xp.concatenate(x) for x in zip(*parts))
    return row, channel, score


def top_pairs(
    xp: ModuleType, kbar: Array, group: int, js: Array, a: Array, theta: float, top_n: int
) -> tuple[Array, Array, Array]:
    """``back_step(...).kept(xp)`` of a top_n step (top_n < inputs a row), normalising
    only what it keeps: 2-4x faster than the dense step, and the same pairs and values.

    Normalising a row, ``(r - lo) / span`` in float64, is monotone, so a row's n-th
    largest r' is the n-th largest raw product's image. Take the (n+1)-th largest raw
    product R; if its image is below the n-th's (or the n-th is below theta), the kept
    pairs are exactly the raw products above R whose r' reaches theta, with no tie at the
    cut for the index rule to settle. The top n+1 are found on float32 images (below).
    Rows where rounding makes the cut a tie (in float32, or once normalised), and flat
    rows, go through the dense step (`select`), as do all rows of a kernel that keeps
    every input.
    """
    c_out, per_group = kbar.shape
    r = products(xp, kbar, group, js, a)
    lo = r.min(axis=1)
    # Rounding to float32 is monotone, so the (n+1)-th largest float32 image is the image
    # of the (n+1)-th largest product, and every product at or above that one has an image
    # at or above it: the candidates hold the top n+1. Rows with exactly n+1 candidates
    # (no float32 tie at the cut) are settled from them; float32 partitions ~3x faster.
    with np.errstate(over="ignore"):  # an image of +-inf still keeps the order
        r32 = r.astype(xp.float32)
    c_row, c_m = top_candidates(xp, r32, top_n + 1)
    exact = xp.bincount(c_row, minlength=len(r)) == top_n + 1
    on = exact[c_row]
    c_row, c_m = c_row[on], c_m[on]
    top = xp.sort(r[c_row, c_m].reshape(-1, top_n + 1), axis=1)  # each exact row's top n+1
    below = xp.full(len(r), xp.inf)
    nth, high = xp.zeros(len(r)), xp.zeros(len(r))
    below[exact], nth[exact], high[exact] = top[:, 0], top[:, 1], top[:, -1]
    span = high - lo
    flat = span <= 0
    span = xp.where(flat, 1.0, span)
    cut = (nth - lo) / span
    fast = exact & ~flat & (((below - lo) / span < cut) | (cut < theta))
    pick = fast[c_row] & (r[c_row, c_m] > below[c_row])
    row, m = c_row[pick], c_m[pick]
    score = (r[row, m] - lo[row]) / span[row]
    keep = score >= theta
    row, m, score = row[keep], m[keep], score[keep]
    q = js // (c_out // group)
    pairs = (row, q[row] * per_group + m, score)
    if bool(fast.all()):
        return pairs
    slow = xp.flatnonzero(~fast)
    s_row, s_channel, s_score = back_step(xp, kbar, group, js[slow], a, theta, top_n).kept(xp)
    row = xp.concatenate([row, slow[s_row]])
    order = xp.argsort(row, kind="stable")  # rows ascending; each part's rows keep order
    return (
        row[order],
        xp.concatenate([pairs[1], s_channel])[order],
        xp.concatenate([score, s_score])[order],
    )


SELECT_BYTES = 2048
"""Longest run of a row `kth_largest` partitions at once: NumPy's SIMD selection takes
~1.8 ns an entry up to 512 float32 (2.6 up to 256 float64) and 5.5-8 beyond (AVX-512,
NumPy 2.4)."""


def kth_largest(xp: ModuleType, x: Array, k: int) -> Array:
    """Each row's k-th largest entry (counting repeats), 1 <= k <= row length. Long rows
    are cut into runs of at most `SELECT_BYTES` (padded with -inf): a row's top k are among
    its runs' top k, so one more selection over those gives the same value."""
    n = x.shape[1]
    runs = -(-n // max(1, SELECT_BYTES // x.dtype.itemsize))
    if runs > 1 and k * runs * 4 <= n:
        width = -(-n // runs)
        if runs * width != n:
            padded = xp.full((len(x), runs * width), -xp.inf, dtype=x.dtype)
            padded[:, :n] = x
            x = padded
        tops = xp.partition(x.reshape(len(x), runs, width), width - k, axis=2)
        x, n = tops[:, :, width - k :].reshape(len(x), runs * k), runs * k
    return xp.partition(x, n - k, axis=1)[:, n - k]


GROUPS = 64
"""Fewest groups a row is folded into by `top_candidates` (rows of 128 or more, halved
while even): the k-th largest group maximum bounds the row's k-th largest from below."""


def top_candidates(xp: ModuleType, x: Array, k: int) -> tuple[Array, Array]:
    """``nonzero_2d(x >= kth_largest(x, k)[:, None])``, the same pairs in the same order,
    without selecting over every entry (the selection is ~2 ns an entry, most of a top-n
    step; this is ~1 on rows of 1024, ResNeXt-101-3D's head step).

    Each row is folded in halves into ``g >= GROUPS`` group maxima (element-wise maxima of
    contiguous halves: fast passes). The k largest group maxima are k distinct entries, so
    the k-th largest of them, ``tau``, is at most the row's k-th largest: every entry the
    answer holds is a candidate ``>= tau``. The candidates (a few per row) are packed into
    a small padded block where the exact k-th largest is selected. Rows with too many
    candidates (ties, flat rows) and rows too short to fold take `kth_largest` directly.
    """
    rows, n = x.shape
    m = x
    while m.shape[1] >= 2 * GROUPS and m.shape[1] % 2 == 0:
        half = m.shape[1] // 2
        m = xp.maximum(m[:, :half], m[:, half:])
    g = m.shape[1]
    if g == n or 4 * k > g:
        return nonzero_2d(xp, x >= kth_largest(xp, x, k)[:, None])
    tau = xp.partition(m, g - k, axis=1)[:, g - k]
    row, col = nonzero_2d(xp, x >= tau[:, None])
    count = xp.bincount(row, minlength=rows)
    cap = max(4 * k, n // 16)
    many = count > cap
    if bool(many.any()):  # those rows directly; the rest from their candidates
        few = ~many[row]
        row, col, count = row[few], col[few], xp.where(many, 0, count)
    vals = x[row, col]
    width = max(k, int(count.max()) if rows else k)
    packed = xp.full((rows, width), -xp.inf, dtype=x.dtype)
    start = xp.cumsum(count) - count
    packed[row, xp.arange(len(row)) - start[row]] = vals
    kth = xp.partition(packed, width - k, axis=1)[:, width - k]
    keep = vals >= kth[row]
    row, col = row[keep], col[keep]
    if not bool(many.any()):
        return row, col
    hard = xp.flatnonzero(many)
    h_row, h_col = nonzero_2d(xp, x[hard] >= kth_largest(xp, x[hard], k)[:, None])
    flat = xp.sort(xp.concatenate([row * n + col, hard[h_row] * n + h_col]))
    return flat // n, flat % n


def to_host(a: Array) -> Any:
    get = getattr(a, "get", None)
    return get() if callable(get) else a


def expand_csr(
    xp: ModuleType, indptr: Array, kernels: Array, channel: Array
) -> tuple[Array, Array]:
    """For each entry's channel, every kernel it carries: (entry index, kernel id) pairs."""
    start, stop = indptr[channel], indptr[channel + 1]
    counts = stop - start
    ends = xp.cumsum(counts)
    if xp is np:
        entry = np.repeat(np.arange(len(counts)), counts)
    else:  # CuPy's repeat takes no array of counts
        entry = xp.searchsorted(ends, xp.arange(int(ends[-1]) if len(ends) else 0), side="right")
    offset = xp.arange(len(entry)) - (ends - counts)[entry]
    return entry, kernels[start[entry] + offset]


def max_per_key(xp: ModuleType, key: Array, values: Array) -> tuple[Array, Array]:
    """Distinct keys and the largest value of each (a sort, not ufunc.at: CuPy has none)."""
    order = xp.lexsort(xp.stack([-values, key]))
    key, values = key[order], values[order]
    first = xp.ones(len(key), dtype=bool)
    first[1:] = key[1:] != key[:-1]
    return key[first], values[first]


def max_per_pair(
    xp: ModuleType, parent: Array, child: Array, score: Array, n_kernels: int
) -> tuple[Array, Array, Array]:
    """Deduplicate (parent, child) pairs, keeping the largest score."""
    if len(parent) == 0:
        return parent, child, score
    key, score = max_per_key(xp, parent * n_kernels + child, score)
    return key // n_kernels, key % n_kernels, score
