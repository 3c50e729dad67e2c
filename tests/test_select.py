"""Channel selection (SPEC §3, §4): the partition-based top-n equals a stable sort's, and a
step's kept pairs scored a block of rows at a time equal the whole matrix's."""

from __future__ import annotations

import numpy as np
import pytest

from cfp_onnx.relevance import back_step, kept_pairs, select


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
def test_top_n_keeps_the_largest_and_breaks_ties_by_lower_index(top_n, theta):
    rng = np.random.default_rng(top_n or 0)
    scores = rng.integers(0, 5, size=(60, 12)) / 4.0  # many ties, rows with few kept
    scores[0] = 1.0  # a constant row
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
    group: int, c_out: int, per_group: int, rows: int, top_n: int | None
) -> None:
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
