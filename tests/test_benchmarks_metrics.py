"""The benchmarks' quality metrics against hand computations (benchmarks/metrics.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import metrics


def test_dilate_grows_one_pixel_into_a_square() -> None:
    mask = np.zeros((1, 5, 5), bool)
    mask[0, 2, 2] = True
    grown = metrics.dilate_mask(mask, 1)
    assert grown.sum() == 9 and grown[0, 1:4, 1:4].all()


def test_pointing_game_with_and_without_tolerance() -> None:
    sal = np.zeros((2, 5, 5))
    sal[1, 2, 2] = 1.0  # the max: frame 1, row 2, column 2
    mask = np.zeros((2, 5, 5), bool)
    mask[1, 2, 4] = True  # two pixels to its right
    assert not metrics.pointing_game(sal, mask, tolerance=1)
    assert metrics.pointing_game(sal, mask, tolerance=2)
    mask[0, 2, 2] = True  # right place, wrong frame: still a miss at tolerance 0
    assert not metrics.pointing_game(sal, mask, tolerance=0)


def test_peak_of_a_plateau_is_its_centre() -> None:
    sal = np.zeros((1, 6, 6))
    sal[0, 2:5, 1:4] = 2.0  # a flat 3x3 maximum centred on (3, 2)
    sal[0, 0, 0] = 1.0
    assert metrics.peak_voxel(sal) == (0, 3, 2)
    single = np.zeros((2, 3, 3))
    single[1, 0, 2] = 5.0
    assert metrics.peak_voxel(single) == (1, 0, 2)
    mask = np.zeros((1, 6, 6), bool)
    mask[0, 3, 2] = True
    assert metrics.pointing_game(sal, mask, tolerance=0)  # argmax would say (0, 2, 1): a miss


def test_energy_inside_clips_negatives() -> None:
    sal = np.array([[[1.0, 3.0], [-2.0, 0.0]]])
    mask = np.array([[[True, False], [True, True]]])
    # positive energy 1 + 3 = 4; inside: 1 + 0 (the -2 counts as 0) + 0
    assert metrics.energy_inside(sal, mask) == pytest.approx(0.25)
    assert metrics.energy_inside(-np.ones((1, 2, 2)), mask) == 0.0


def test_mask_auc_is_the_pairwise_win_rate() -> None:
    rng = np.random.default_rng(0)
    sal = rng.integers(0, 4, size=(3, 5, 6)).astype(float)  # many ties
    mask = rng.random((3, 5, 6)) < 0.3
    ins, outs = sal[mask], sal[~mask]
    pairs = (ins[:, None] > outs[None, :]) + 0.5 * (ins[:, None] == outs[None, :])
    assert metrics.mask_auc(sal, mask) == pytest.approx(pairs.mean())
    assert metrics.mask_auc(mask.astype(float), mask) == 1.0
    assert np.isnan(metrics.mask_auc(sal, np.zeros_like(mask)))


def test_auc_trapezoid() -> None:
    assert metrics.auc(np.array([1.0, 0.5, 0.0])) == pytest.approx(0.5)
    assert metrics.auc(np.array([0.0, 1.0, 1.0])) == pytest.approx(0.75)  # (0.5 + 1) / 2
    assert metrics.auc(np.array([0.2, 0.2])) == pytest.approx(0.2)


def test_step_masks_take_most_salient_first() -> None:
    steps = metrics.step_masks(np.array([3.0, 1.0, 2.0, 0.0]), 2)
    assert steps.tolist() == [
        [False, False, False, False],
        [True, False, True, False],  # the two largest: 3 and 2
        [True, True, True, True],
    ]


def test_deletion_and_insertion_auc_by_hand() -> None:
    """A 'model' whose score is the kept mass; trapezoid = half the ends + the middle."""
    sal = np.array([4.0, 3.0, 2.0, 1.0])
    x = np.array([0.4, 0.3, 0.2, 0.1])  # score = sum of kept x
    steps = metrics.step_masks(sal, 4)
    deletion = [x[~s].sum() for s in steps]  # 1.0, 0.6, 0.3, 0.1, 0
    insertion = [x[s].sum() for s in steps]  # 0, 0.4, 0.7, 0.9, 1.0
    assert metrics.auc(np.array(deletion)) == pytest.approx((0.5 + 0.6 + 0.3 + 0.1 + 0.0) / 4)
    assert metrics.auc(np.array(insertion)) == pytest.approx((0.0 + 0.4 + 0.7 + 0.9 + 0.5) / 4)


def test_ranks_average_ties() -> None:
    assert metrics.ranks(np.array([10, 30, 10, 20])).tolist() == [1.5, 4.0, 1.5, 3.0]


def test_spearman_by_hand() -> None:
    # no ties: 1 - 6 * sum d^2 / (n (n^2 - 1)) = 1 - 6 * 2 / 60 = 0.8
    assert metrics.spearman(np.array([1, 2, 3, 4]), np.array([1, 3, 2, 4])) == pytest.approx(0.8)
    # ties: ranks [1.5, 1.5, 3] vs [1, 2, 3]; centred [-.5, -.5, 1] . [-1, 0, 1] = 1.5
    # norms sqrt(1.5) and sqrt(2): 1.5 / sqrt(3)
    got = metrics.spearman(np.array([1, 1, 2]), np.array([1, 2, 3]))
    assert got == pytest.approx(1.5 / np.sqrt(3))
    assert metrics.spearman(np.array([1, 2, 3]), np.array([3, 2, 1])) == pytest.approx(-1.0)
    assert metrics.spearman(np.ones(3), np.array([1, 2, 3])) == 0.0


def test_jaccard_by_hand() -> None:
    assert metrics.jaccard({1, 2, 3}, {2, 3, 4}) == pytest.approx(0.5)
    assert metrics.jaccard({(0, 1)}, {(0, 2)}) == 0.0
    assert metrics.jaccard(set(), set()) == 1.0


def test_bootstrap_ratio_point_and_interval() -> None:
    ratio, lo, hi = metrics.bootstrap_ratio(np.array([2.0, 2.0, 2.0]), np.ones(3))
    assert (ratio, lo, hi) == (2.0, 2.0, 2.0)
    # two clips, drops 1 and 3 against 1 and 1: resamples give 1 (p = 1/4), 2 (1/2), 3 (1/4)
    ratio, lo, hi = metrics.bootstrap_ratio(np.array([1.0, 3.0]), np.ones(2), n=4000, seed=1)
    assert ratio == 2.0 and lo == pytest.approx(1.0) and hi == pytest.approx(3.0)


def test_bootstrap_mean_contains_mean() -> None:
    x = np.random.default_rng(0).normal(5.0, 1.0, 200)
    m, lo, hi = metrics.bootstrap_mean(x)
    assert m == pytest.approx(x.mean()) and lo < m < hi
    assert hi - lo == pytest.approx(2 * 1.96 / np.sqrt(200), rel=0.25)


def test_goal_comparison_counts_overlapping_intervals_as_a_tie():
    import quality_report as qr

    assert qr.versus([0.9, 0.85, 0.95], [0.8, 0.7, 0.84], 1) == "better"
    assert qr.versus([0.9, 0.85, 0.95], [0.8, 0.7, 0.85], 1) == "tie"
    assert qr.versus([0.1, 0.05, 0.15], [0.3, 0.2, 0.4], -1) == "better"  # deletion: lower
    assert qr.versus([0.3, 0.2, 0.4], [0.1, 0.05, 0.15], -1) == "worse"
    gc = {"mask_auc": [0.9, 0.88, 0.92], "insertion": [0.9, 0.88, 0.92],
          "deletion": [0.2, 0.18, 0.22], "pointing": [0.3, 0.2, 0.4]}  # fmt: skip
    tube = {**gc, "mask_auc": [0.7, 0.6, 0.8], "specificity": [0.1, 0.0, 0.2],
            "sanity_spearman_all": [0.5, 0.4, 0.6], "sanity_jaccard_all": [0.2, 0.1, 0.3],
            "faith_ratio_d0": [4.0, 3.0, 5.0]}  # fmt: skip
    row = qr.goal_table({"m": {"summary": {"gradcam": gc, qr.RECOMMENDED: tube}}}).splitlines()[2]
    assert row.startswith("| m | worse (0.70") and row.endswith("| 6 of 8 |")
    assert "**no** (0.50" in row
