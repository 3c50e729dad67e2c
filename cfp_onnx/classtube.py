"""Class tubes: one spatio-temporal map per explained class, from its depth-0 kernels.

* ``weighted``: the sum over the pyramid's depth-0 kernels of their raw maps (SPEC §6,
  before the per-tube min-max) times their relevance, upsampled to the clip.
* ``contrast``: the weighted tube minus the mean of every class's weighted tube, all from
  the same run. What the weighted tube shares with every class (the paper's head picks
  nearly the same kernels whatever the class) cancels; what is specific to this class
  stays. Positive voxels speak for the class more than for the average class.

Our benchmarks (``benchmarks/README.md``, Quality) recommend ``contrast`` with ``top_n=5``
and ``theta=0``: class-specific and sensitive to the model's weights, where the paper's
mode is neither. Upsampling is linear, so maps are summed per feature resolution first
and upsampled once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from cfp_onnx.errors import OptionError
from cfp_onnx.options import CLASS_TUBES
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


def class_tube(
    ex: Explainer, run: Run, pyr: Pyramid, size: Sequence[int], kind: str = "weighted"
) -> np.ndarray:
    """The class tube of `pyr` at `size` ``(T, H, W)``, float32, not normalised.

    `run` must hold ``ex.map_tensors(pyr.depth)``. ``contrast`` builds every
    class's pyramid from the same run (one back-step level each), so its cost grows with
    the number of classes; with ``top_n`` each is a handful of kernels.

    Raises:
        OptionError: `kind` is not one of KINDS.
    """
    if kind not in KINDS:
        raise OptionError(f"class tube must be one of {', '.join(KINDS)} (got {kind!r})")
    own = _feature_sums(ex, pyr, run)
    if kind == "weighted":
        return _upsampled(own, size)
    total: dict[tuple[int, ...], np.ndarray] = {}
    for p in class_pyramids(ex, run, pyr):
        for shape, m in _feature_sums(ex, p, run).items():
            total[shape] = total.get(shape, 0.0) + m
    n = ex.classes
    diff = {s: own.get(s, 0.0) - total.get(s, 0.0) / n for s in dict.fromkeys([*own, *total])}
    return _upsampled({s: np.asarray(m, np.float64) for s, m in diff.items()}, size)
