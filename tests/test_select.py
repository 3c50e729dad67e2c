"""Channel selection (SPEC §3, §4): the partition-based top-n equals a stable sort's."""

from __future__ import annotations

import numpy as np
import pytest

from cfp_onnx.relevance import select


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
