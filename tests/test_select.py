"""Channel selection (SPEC §3, §4): the partition-based top-n equals a stable sort's, a
step's kept pairs scored a block of rows at a time equal the whole matrix's, and a top-n
step selected on raw products (`top_pairs`) equals the one selected on normalised r', and
a row's k-th largest found a run at a time (`kth_largest`) equals the sorted row's, and the
entries at or above it found from group maxima (`top_candidates`) equal a direct scan's."""

from __future__ import annotations

import numpy as np
import pytest

from cfp_onnx import relevance
from cfp_onnx.relevance import (
    back_step,
    best_and_pairs,
    column_best,
    kept_pairs,
    kth_largest,
    nonzero_2d,
    scores,
    select,
    top_candidates,
    top_pairs,
)


def sorted_select(scores: np.ndarray, theta: float, top_n: int | None) -> np.ndarray:
    """Reference: per row, the kept scores in descending order, ties by lower index."""
    keep = scores >= theta
    if top_n is None:
        return keep
    out = np.zeros_like(keep)
    for r in range(len(scores)):
        kept = [c for c in range(scores.shape[1]) if keep[r, c]]
        kept.sort(key=lambda c: (-scores[r, c], c))
        out[r, kept[:top_n]] = True
    return out


@pytest.mark.parametrize("top_n", [None, 1, 2, 5, 9, 40])
@pytest.mark.parametrize("theta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("ties", [True, False])
def test_top_n_keeps_the_largest_and_breaks_ties_by_lower_index(top_n, theta, ties):
    rng = np.random.default_rng(top_n or 0)
    if ties:  # many ties, rows with few kept: the running count of ties decides
        scores = rng.integers(0, 5, size=(60, 12)) / 4.0
        scores[0] = 1.0  # a constant row
    else:  # distinct scores, as real back-steps give: no running count is needed
        scores = rng.random(size=(60, 12))
        scores[5, 3] = scores[5, 2]  # one pair of equal scores
    got = select(np, scores, theta, top_n)
    want = sorted_select(scores, theta, top_n)
    np.testing.assert_array_equal(got, want)
    if top_n is not None:
        assert (got.sum(axis=1) <= top_n).all()


@pytest.mark.parametrize(
    ("group", "c_out", "per_group", "rows", "top_n"),
    [
        (1, 64, 2048, 60, None),  # 32 rows a block: two blocks
        (1, 64, 512, 64, 5),
        (4, 64, 16, 30, None),  # grouped: each row reads its group's inputs
        (64, 64, 1, 64, None),  # depth-wise: one input, a flat row, every r' 1
        (2, 3000, 40, 2900, 3),  # 1638 rows a block: two blocks, uneven
    ],
)
def test_kept_pairs_by_blocks_equal_the_whole_score_matrix(
    group: int, c_out: int, per_group: int, rows: int, top_n: int | None, monkeypatch
) -> None:
    monkeypatch.setattr(relevance, "BLOCK", 1 << 16)  # the geometry the cases name
    rng = np.random.default_rng(group * 1000 + rows)
    kbar = rng.normal(size=(c_out, per_group))
    kbar[3] = 0.5  # a constant row normalises to ones (SPEC §3)
    js = np.sort(rng.choice(c_out, size=rows, replace=False))
    a = rng.random(per_group * group)
    want = back_step(np, kbar, group, js, a, 0.6, top_n).kept(np)
    got = kept_pairs(np, kbar, group, js, a, 0.6, top_n)
    assert len(want[0]) >= rows  # every row keeps one pair at least (its largest r' is 1)
    for w, g in zip(want, got, strict=True):
        assert w.dtype == g.dtype and np.array_equal(w, g)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])  # a 1x1x1 layer's weights, tap means
@pytest.mark.parametrize("count", [False, True])
@pytest.mark.parametrize("flat", [False, True])
def test_column_best_by_blocks_in_one_buffer_equals_the_dense_step(dtype, count, flat) -> None:
    """An ungrouped step without top_n, scored a block of rows at a time into one reused
    buffer (3 blocks of 128 rows, the last one short), gives the dense step's column maxima
    and counts, bit for bit; with `flat`, a row of zero weights in a later block, whose
    r' are all 1 (SPEC §3), written into the reused buffer."""
    rng = np.random.default_rng(7)
    per_group = relevance.BLOCK // 128
    kbar = rng.normal(size=(400, per_group)).astype(dtype)
    js = np.sort(rng.choice(400, size=300, replace=False))
    if flat:
        kbar[js[200]] = 0.0
    a = rng.random(per_group)
    want = back_step(np, kbar, 1, js, a, 0.9, None).column_max(np, per_group, count)
    got = column_best(np, kbar, 1, js, a, 0.9, None, count)
    assert len(js) > 2 * 128 and len(js) % 128
    assert np.array_equal(got[0], want[0]) and got[0].dtype == np.float64
    assert (got[1] is None) == (not count) and (not count or np.array_equal(got[1], want[1]))
    if flat:
        assert (got[0] == 1.0).all()
    else:
        assert np.isinf(got[0]).any() and np.isfinite(got[0]).any() and (got[0] < 1).any()


@pytest.mark.parametrize(
    ("group", "per_group", "theta"), [(1, 300, 0.0), (1, 300, 0.6), (4, 16, 0.0), (64, 1, 0.6)]
)
def test_a_top_n_step_from_its_pairs_equals_the_dense_step(
    group: int, per_group: int, theta: float
) -> None:
    """The column maxima and counts `best_and_pairs` takes from a top_n step's kept pairs
    equal the dense matrix's (`column_best`), and its pairs equal `kept_pairs`."""
    rng = np.random.default_rng(group)
    kbar = rng.normal(size=(64, per_group))
    kbar[3] = 0.5
    js = np.sort(rng.choice(64, size=40, replace=False))
    a = rng.random(per_group * group)
    a[: per_group * group // 3] = 0.0  # channels no kernel keeps (-inf, count 0)
    best, count, pairs = best_and_pairs(np, kbar, group, js, a, theta, 5, count=True)
    want_best, want_count = column_best(np, kbar, group, js, a, theta, 5, count=True)
    assert np.array_equal(best, want_best) and np.array_equal(count, want_count)
    assert np.isinf(best).any() and np.isfinite(best).any()
    for w, g in zip(kept_pairs(np, kbar, group, js, a, theta, 5), pairs, strict=True):
        assert w.dtype == g.dtype and np.array_equal(w, g)


def sorted_pairs(
    kbar: np.ndarray, group: int, js: np.ndarray, a: np.ndarray, theta: float, top_n: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reference: every r' normalised (SPEC §3), kept by the stable sort, row by row."""
    r = scores(np, kbar, group, js, a)
    row, m = np.nonzero(sorted_select(r, theta, top_n))
    q = js // (kbar.shape[0] // group)
    return row, q[row] * kbar.shape[1] + m, r[row, m]


def rounding_tie_row() -> np.ndarray:
    """Distinct raw products whose r' round to one value: far above a large negative
    minimum, adjacent doubles collapse when the minimum is subtracted. The largest raw
    values sit at the highest indices, so selecting on raw values would pick them and the
    index rule the lowest."""
    close = [1.0]
    for _ in range(12):
        close.append(float(np.nextafter(close[-1], 2.0)))
    return np.array([-1000.0, 5.0, *close])


def test_a_rounding_tie_is_settled_by_the_lower_index() -> None:
    kbar = rounding_tie_row()[None, :]
    a = np.ones(kbar.shape[1])
    r = scores(np, kbar, 1, np.array([0]), a)
    assert len(np.unique(kbar)) == kbar.shape[1] and len(np.unique(r)) < 4  # the premise
    for top_n in (2, 3, 5):
        raw_top = np.sort(np.argsort(-kbar[0], kind="stable")[:top_n])
        row, channel, score = top_pairs(np, kbar, 1, np.array([0]), a, 0.0, top_n)
        assert channel.tolist() == list(range(1, top_n + 1)) != raw_top.tolist()
        assert np.array_equal(score, r[0, 1 : top_n + 1])


def float32_tie_rows(rng: np.random.Generator, c_out: int, per_group: int) -> np.ndarray:
    """Every other row holds a cluster of distinct doubles (distinct once normalised too)
    that round to one float32, where the top-n cut falls; the others are plain."""
    out = rng.normal(size=(c_out, per_group))
    cluster = 0.9 + 1e-12 * np.arange(per_group // 2 + 2)
    assert len(np.unique(cluster.astype(np.float32))) == 1  # the premise
    for i in range(0, c_out, 2):
        row = np.concatenate([rng.random(per_group - len(cluster)) * 0.5, cluster])
        out[i] = rng.permutation(row)
    return out


@pytest.mark.parametrize("kind", ["distinct", "raw ties", "rounding ties", "float32 ties", "flat"])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_top_pairs_equal_the_sorted_selection_of_normalised_scores(kind, group, dtype) -> None:
    rng = np.random.default_rng(len(kind) * 10 + group)
    c_out, per_group = 48, 15
    if kind == "distinct":
        kbar = rng.normal(size=(c_out, per_group))
    elif kind == "raw ties":
        kbar = rng.integers(-2, 3, size=(c_out, per_group)).astype(float)
    elif kind == "rounding ties":
        kbar = np.stack([rng.permutation(rounding_tie_row()[:per_group]) for _ in range(c_out)])
    elif kind == "float32 ties":
        kbar = float32_tie_rows(rng, c_out, per_group)
    else:
        kbar = np.full((c_out, per_group), 0.25)
    kbar = kbar.astype(dtype)
    ones = kind in ("rounding ties", "float32 ties")
    a = rng.random(per_group * group) if not ones else np.ones(per_group * group)
    a[:2] = 0.0  # inputs no kernel can prefer
    js = np.sort(rng.choice(c_out, size=30, replace=False))
    for theta in (0.0, 0.3, 0.6, 1.0):
        for top_n in (1, 2, 5, per_group - 1):
            want = sorted_pairs(kbar, group, js, a, theta, top_n)
            got = top_pairs(np, kbar, group, js, a, theta, top_n)
            for w, g in zip(want, got, strict=True):
                assert w.dtype == g.dtype and np.array_equal(w, g), (theta, top_n)


@pytest.mark.parametrize("n", [15, 512, 513, 1024, 1100, 2048])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kth_largest_equals_the_sorted_rows(n, dtype) -> None:
    rng = np.random.default_rng(n)
    x = rng.normal(size=(9, n)).astype(dtype)
    x[3] = rng.integers(-2, 3, size=n)  # repeats at every cut
    x[4] = 0.5
    x[5, : n // 2] = -np.inf
    x[6] = -np.abs(x[6])  # a padding that is not -inf would top it
    for k in [k for k in (1, 2, 6, 33, 200) if k <= n]:
        want = np.sort(x, axis=1)[:, n - k]
        got = kth_largest(np, x, k)
        assert got.dtype == x.dtype and np.array_equal(got, want), k


@pytest.mark.parametrize("n", [3, 127, 128, 200, 512, 832, 1024, 2048])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_top_candidates_equal_a_direct_scan(n, dtype) -> None:
    """Every entry at or above its row's k-th largest (the sorted row's), in row-major
    order, on rows that fold into groups and rows that do not, with ties at the cut,
    flat rows, infinities and rows whose large values share one group."""
    rng = np.random.default_rng(n)
    x = rng.normal(size=(14, n)).astype(dtype)
    x[1] = rng.integers(-2, 3, size=n)  # repeats at every cut: too many candidates
    x[2] = 0.5  # flat
    x[3, : n // 2] = -np.inf
    x[4] = -np.inf
    x[5, ::7] = np.inf
    x[6] = -np.abs(x[6])  # a padding that is not -inf would top it
    x[7] = np.linspace(0, 1, n)  # the largest all in the last group
    x[8, -1] = x[8].max() + 1  # one outlier: its group's maximum
    x[9] = rng.exponential(size=n) ** 4  # heavy-tailed, like pooled activations
    x[10, n // 3 :: max(1, n // 9)] = 3.0  # ties at the top, spread over groups
    x[11] = np.round(x[11], 1)  # a few tied values everywhere
    for k in [k for k in (1, 2, 6, 16, 33) if k <= n]:
        kth = np.sort(x, axis=1)[:, n - k]
        want = np.nonzero(x >= kth[:, None])
        got = top_candidates(np, x, k)
        assert all(g.dtype == np.int64 for g in got)
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1]), k
    empty = top_candidates(np, x[:0], 2)
    assert all(len(e) == 0 for e in empty)
    assert np.array_equal(empty[0], nonzero_2d(np, x[:0] > 0)[0])


@pytest.mark.parametrize("kind", ["distinct", "float32 ties"])
def test_top_pairs_on_rows_longer_than_one_selection_run(kind) -> None:
    """Rows of 1,100 inputs: their float32 images are selected in three runs
    (`SELECT_BYTES`)."""
    rng = np.random.default_rng(7)
    c_out, per_group = 24, 1100
    kbar = rng.normal(size=(c_out, per_group))
    if kind == "float32 ties":
        kbar = float32_tie_rows(rng, c_out, per_group)
        # odd rows: 15 values, each 80 times over (raw ties at every cut)
        kbar[1::2] = rng.normal(size=(c_out // 2, 15)).repeat(80, axis=1)[:, :per_group]
    a = np.ones(per_group) if kind == "float32 ties" else rng.random(per_group)
    js = np.arange(3, 21)
    for theta in (0.0, 0.6):
        for top_n in (1, 5, 40):
            want = sorted_pairs(kbar, 1, js, a, theta, top_n)
            got = top_pairs(np, kbar, 1, js, a, theta, top_n)
            for w, g in zip(want, got, strict=True):
                assert w.dtype == g.dtype and np.array_equal(w, g), (theta, top_n)


@pytest.mark.parametrize(("group", "per_group"), [(1, 1024), (1, 384), (2, 512), (4, 100)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_scores_with_row_buffers_equal_a_row_by_row_reference(group, per_group, dtype) -> None:
    """`scores` runs its broadcast ops with a small ufunc buffer on long rows
    (`row_buffers`); every r' equals SPEC §3 written out one kernel at a time, bit for bit,
    and the thread's buffer size is back to what it was."""
    rng = np.random.default_rng(per_group)
    c_out = 8 * group
    kbar = rng.normal(size=(c_out, per_group)).astype(dtype)
    kbar[5] = 0.0  # its products all equal: every r' = 1
    js = np.array([0, 1, 2, 5, 6, c_out - 1])
    a = rng.random(per_group * group)
    before = np.getbufsize()
    got = scores(np, kbar, group, js, a)
    assert np.getbufsize() == before
    for row, j in enumerate(js):
        q = j // (c_out // group)
        r = kbar[j].astype(np.float64) * a[q * per_group : (q + 1) * per_group]
        span = r.max() - r.min()
        want = np.ones(per_group) if span == 0 else (r - r.min()) / span
        assert np.array_equal(got[row], want), (j, np.abs(got[row] - want).max())
    assert (got[3] == 1.0).all() and got.min() == 0.0


def test_row_buffers_are_scoped_to_the_block_and_the_thread() -> None:
    """The small buffer is set only inside the block, only on the calling thread, only for
    NumPy rows long enough, and restored when the block raises."""
    import threading

    from cfp_onnx.relevance import ROW_BUFFER, ROW_BUFFER_FROM, row_buffers

    default = np.getbufsize()
    seen: list[int] = []
    with row_buffers(np, ROW_BUFFER_FROM):
        assert np.getbufsize() == ROW_BUFFER != default
        other = threading.Thread(target=lambda: seen.append(np.getbufsize()))
        other.start()
        other.join()
    assert seen == [default] and np.getbufsize() == default
    with row_buffers(np, ROW_BUFFER_FROM - 1):
        assert np.getbufsize() == default
    with pytest.raises(ZeroDivisionError), row_buffers(np, 4096):
        _ = 1 // 0
    assert np.getbufsize() == default
