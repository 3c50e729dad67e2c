"""Explanation-quality metrics, plain NumPy (no model, no framework): each is checked
against a hand computation in ``tests/test_benchmarks_metrics.py``."""

from __future__ import annotations

import cv2
import numpy as np


def dilate_mask(mask: np.ndarray, pixels: int) -> np.ndarray:
    """Grow a ``[T, H, W]`` mask by `pixels` in every frame (square neighbourhood)."""
    if pixels <= 0:
        return mask.astype(bool)
    kernel = np.ones((2 * pixels + 1, 2 * pixels + 1), np.uint8)
    return np.stack([cv2.dilate(m.astype(np.uint8), kernel) > 0 for m in mask])


def peak_voxel(saliency: np.ndarray, rtol: float = 1e-6) -> tuple[int, ...]:
    """The saliency's peak: the voxel nearest the centroid of the top plateau (voxels within
    `rtol` of the range below the max). An upsampled coarse map has a flat maximum over a
    whole cell; ``argmax`` would pick the cell's first corner, often the frame's corner."""
    span = float(saliency.max() - saliency.min())
    top = np.argwhere(saliency >= saliency.max() - rtol * span)
    centre = top.mean(axis=0)
    return tuple(int(v) for v in top[np.argmin(((top - centre) ** 2).sum(axis=1))])


def pointing_game(saliency: np.ndarray, mask: np.ndarray, tolerance: int = 3) -> bool:
    """Whether the saliency's peak (:func:`peak_voxel`) falls inside the mask dilated by
    `tolerance` pixels."""
    return bool(dilate_mask(mask, tolerance)[peak_voxel(saliency)])


def energy_inside(saliency: np.ndarray, mask: np.ndarray) -> float:
    """Share of the (negative values clipped) saliency that lies inside the mask; 0 if none."""
    pos = np.maximum(saliency, 0).astype(np.float64)
    total = pos.sum()
    return float(pos[mask.astype(bool)].sum() / total) if total > 0 else 0.0


def mask_auc(saliency: np.ndarray, mask: np.ndarray) -> float:
    """Probability that a voxel inside the mask is more salient than one outside (ties
    count half; 0.5 is chance, 1 perfect): the Mann-Whitney U over average ranks. Unlike
    the pointing game it is fair to coarse maps, whose upsampled peak always sits on a
    cell's centre; NaN when the mask is empty or full."""
    inside = np.asarray(mask, dtype=bool).reshape(-1)
    n_in = int(inside.sum())
    n_out = inside.size - n_in
    if n_in == 0 or n_out == 0:
        return float("nan")
    r = ranks(saliency)  # 1-based, ties averaged
    return float((r[inside].sum() - n_in * (n_in + 1) / 2) / (n_in * n_out))


def auc(curve: np.ndarray) -> float:
    """Area under a curve sampled at evenly spaced fractions 0..1 (trapezoid rule)."""
    y = np.asarray(curve, dtype=np.float64)
    if len(y) < 2:
        raise ValueError("a curve needs at least two points")
    return float(((y[:-1] + y[1:]) / 2).sum() / (len(y) - 1))


def voxel_order(saliency: np.ndarray) -> np.ndarray:
    """Flat voxel indices, most salient first (ties: lower index first)."""
    flat = saliency.reshape(-1)
    return np.lexsort((np.arange(flat.size), -flat))


def step_masks(saliency: np.ndarray, steps: int) -> np.ndarray:
    """``[steps + 1, *shape]`` bool: at step ``s`` the ``round(s / steps * N)`` most
    salient voxels are True (deletion removes them; insertion keeps only them)."""
    order = voxel_order(saliency)
    n = order.size
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    counts = np.round(np.arange(steps + 1) / steps * n).astype(np.int64)
    return (rank[None, :] < counts[:, None]).reshape(steps + 1, *saliency.shape)


def ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank (as scipy.stats.rankdata)."""
    flat = np.asarray(x, dtype=np.float64).reshape(-1)
    _, inverse, counts = np.unique(flat, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    average = ends - (counts - 1) / 2.0
    return average[inverse]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two equally sized arrays; 0 when either is constant."""
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / den) if den > 0 else 0.0


def jaccard(a: set[tuple[int, int]] | set[int], b: set[tuple[int, int]] | set[int]) -> float:
    """|a & b| / |a | b|; two empty sets are identical (1.0)."""
    union = len(a | b)
    return len(a & b) / union if union else 1.0


def bootstrap_ratio(
    num: np.ndarray, den: np.ndarray, *, n: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """``mean(num) / mean(den)`` over paired samples and its percentile bootstrap interval
    (clips resampled with replacement, the pairs kept together)."""
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    idx = np.random.default_rng(seed).integers(0, len(num), size=(n, len(num)))
    with np.errstate(divide="ignore", invalid="ignore"):
        boot = num[idx].mean(axis=1) / den[idx].mean(axis=1)
    lo, hi = np.nanpercentile(boot, [(1 - level) / 2 * 100, (1 + level) / 2 * 100])
    return float(num.mean() / den.mean()), float(lo), float(hi)


def bootstrap_mean(x: np.ndarray, *, n: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean and its 95 % percentile bootstrap interval."""
    x = np.asarray(x, np.float64)
    idx = np.random.default_rng(seed).integers(0, len(x), size=(n, len(x)))
    lo, hi = np.percentile(x[idx].mean(axis=1), [2.5, 97.5])
    return float(x.mean()), float(lo), float(hi)
