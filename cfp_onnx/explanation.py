"""An explanation: everything the views of one clip need, computed from one run.

``explain(explainer, clip, ...)`` makes the instrumented forward once and returns an
``Explanation``: the pyramid, the feature-resolution map of *every* pyramid kernel
(SPEC §6 before upsampling), the frame-shuffle test, the class tube and the top classes.
Views (``cfp_onnx.report``, ``cfp_onnx.outputs``, a notebook) only format it: none of
them runs the model again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from cfp_onnx import classtube, faithfulness
from cfp_onnx import tubes as tubes_mod
from cfp_onnx.errors import OptionError
from cfp_onnx.faithfulness import Faithfulness
from cfp_onnx.options import PyramidOptions, ViewOptions, as_options
from cfp_onnx.pyramid import Pyramid
from cfp_onnx.xp import to_numpy

if TYPE_CHECKING:
    from cfp_onnx.api import Explainer, Plan
    from cfp_onnx.modelinput import ModelInput
    from cfp_onnx.video import Clip


@dataclass(frozen=True)
class KernelMaps:
    """Each pyramid kernel's raw map, grouped by resolution: node ``n`` is
    ``data[group[n]][slot[n]]``, a float32 ``[t, h, w]`` map (SPEC §6, not yet upsampled)."""

    shapes: tuple[tuple[int, int, int], ...]
    group: np.ndarray  # per node
    slot: np.ndarray  # per node
    data: tuple[np.ndarray, ...]  # per group [k, t, h, w] float32

    @classmethod
    def build(cls, maker: tubes_mod.TubeMaker, n_nodes: int) -> KernelMaps:
        """The maps of nodes ``0 .. n_nodes-1`` from the maker's run: one block per source
        tensor, regrouped by resolution (groups in order of their first node)."""
        parts = []
        for rows, maps in maker.blocks(np.arange(n_nodes)):
            m = np.asarray(to_numpy(maps), np.float32)
            parts.append((rows, m.reshape(len(m), *m.shape[-3:])))
        by_shape: dict[tuple[int, int, int], list[tuple[np.ndarray, np.ndarray]]] = {}
        for rows, m in sorted(parts, key=lambda p: int(p[0].min(initial=n_nodes))):
            by_shape.setdefault(m.shape[1:], []).append((rows, m))  # type: ignore[arg-type]
        group = np.full(n_nodes, -1, dtype=np.int64)
        slot = np.zeros(n_nodes, dtype=np.int64)
        data = []
        for g, members in enumerate(by_shape.values()):
            rows = np.concatenate([r for r, _ in members])
            order = np.argsort(rows, kind="stable")  # a group's maps in node order
            group[rows], slot[rows[order]] = g, np.arange(len(rows))
            data.append(np.concatenate([m for _, m in members])[order])
        if n_nodes and group.min() < 0:
            raise AssertionError("a pyramid kernel got no map")
        return cls(tuple(by_shape), group, slot, tuple(data))

    def raw(self, node: int) -> np.ndarray:
        return self.data[int(self.group[node])][int(self.slot[node])]

    def tubes(self, nodes: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
        """Normalised tubes ``[K, T, H, W]`` of `nodes` at `size`: exactly SPEC §6."""
        out = np.zeros((len(nodes), *size), np.float32)
        for i, node in enumerate(np.asarray(nodes).tolist()):
            out[i] = tubes_mod.normalise(np, tubes_mod.upsample(np, self.raw(node)[None], size))[0]
        return out

    def responses(self) -> np.ndarray:
        """Each node's pooled rectified response (what the shuffle test compares)."""
        out = np.zeros(len(self.group), np.float64)
        for g, block in enumerate(self.data):
            members = np.flatnonzero(self.group == g)
            out[members] = (
                np.maximum(block, 0).reshape(len(block), -1).mean(axis=1)[self.slot[members]]
            )
        return out

    def quantised(self, group: int) -> np.ndarray:
        """A group's maps as uint8, each min-max scaled to 0..255 (a constant map: zeros).

        The tube is min-max normalised after upsampling, which ignores any affine scaling
        of the map, so the page needs no per-kernel scale to draw it."""
        data = self.data[group].reshape(len(self.data[group]), -1)
        out = np.empty(data.shape, np.uint8)
        step = max(1, (1 << 16) // max(1, data.shape[1]))  # kernels a block: it stays in cache
        for i in range(0, len(data), step):
            block = data[i : i + step].astype(np.float64)
            lo = block.min(axis=1, keepdims=True)
            span = block.max(axis=1, keepdims=True) - lo
            q = np.where(span > 0, (block - lo) / np.where(span > 0, span, 1.0), 0.0)
            out[i : i + step] = np.rint(q * 255)
        return out.reshape(self.data[group].shape)


@dataclass(frozen=True)
class Explanation:
    """One clip explained for one class: what every view of it shows.

    Attributes:
        pyramid: the class feature pyramid (SPEC §5).
        clip: the model input and its frames (uint8 RGB, what tubes are blended on).
        maps: every pyramid kernel's raw map, or None when maps were not asked for.
        motion_ratio: per node, its response with the frames shuffled over without (NaN:
            inactive), or None when the shuffle test did not run.
        class_tube: the signed class tube at clip size, or None.
        class_tube_kind: its kind (``weighted``, ``contrast`` or ``pyramid``).
        faithfulness: the depth-0 ablation check, or None when it was not asked for.
        class_names: the model's class names, if it has them.
        options: the view options it was made with.
    """

    pyramid: Pyramid
    clip: Clip
    maps: KernelMaps | None
    motion_ratio: np.ndarray | None
    class_tube: np.ndarray | None
    class_tube_kind: str | None
    class_names: tuple[str, ...] | None
    options: ViewOptions
    faithfulness: Faithfulness | None = None

    @property
    def shown(self) -> np.ndarray:
        """The nodes drawn in the graph: the most relevant ``per_depth`` of each depth."""
        if self.pyramid.empty:
            return np.zeros(0, np.int64)
        return tubes_mod.shown_nodes(self.pyramid, self.options.per_depth)

    def top(self, k: int | None = None) -> list[tuple[int, str | None, float, float]]:
        """The k largest logits: (class, name, logit, softmax probability)."""
        z = np.asarray(self.pyramid.logits, dtype=np.float64)
        p = np.exp(z - z.max())
        p /= p.sum()
        order = np.argsort(-z, kind="stable")[: k or self.options.top_k]
        names = self.class_names
        return [(int(i), names[int(i)] if names else None, float(z[i]), float(p[i])) for i in order]


def explain(
    explainer: Explainer,
    clip: Clip,
    model_input: ModelInput,
    options: PyramidOptions | None = None,
    view: ViewOptions | None = None,
    *,
    class_names: tuple[str, ...] | None = None,
    on_pyramid: Callable[[Pyramid], None] | None = None,
) -> Explanation:
    """Explain `clip` (a Clip, an array or a file, read through `model_input`): one forward
    (two with the shuffle test), then array code only. `on_pyramid` is called with the
    pyramid as soon as it exists (``cfp explain`` starts writing ``pyramid.json`` there,
    while the maps, the shuffle run and the class tube are computed)."""
    from cfp_onnx.api import Explainer
    from cfp_onnx.modelinput import ModelInput

    if not isinstance(explainer, Explainer) or not isinstance(model_input, ModelInput):
        raise OptionError(
            "explain_clip(explainer, clip, model_input) takes a cfp_onnx.Explainer and a "
            f"cfp_onnx.ModelInput (got {type(explainer).__name__}, {type(model_input).__name__})"
        )
    clip = model_input.clip(clip, explainer.loaded)
    opts = as_options(options, PyramidOptions, "options")
    view = as_options(view, ViewOptions, "view")
    plan = _plan(explainer, opts, view)
    run = explainer.run(clip.tensor, depth=plan.depth, full=plan.full)
    pyr = explainer.pyramid(run, opts, class_names=class_names)
    pyr.score_pairs()  # what the writer and the maps read first, scored on both cores
    if on_pyramid is not None:
        on_pyramid(pyr)
    size = clip.frames.shape[:3]
    maps = motion = None
    if view.needs_maps and view.maps and not pyr.empty:
        maker = tubes_mod.TubeMaker(explainer, pyr, run, size, weighted=view.weighted)
        maps = KernelMaps.build(maker, len(pyr.node_layer))
        if view.shuffle:
            motion = _shuffle_ratio(explainer, maker, maps, clip, model_input, plan.full)
    tube = (
        classtube.class_tube(explainer, run, pyr, size, view.class_tube)
        if view.class_tube
        else None
    )
    faith = (
        faithfulness.check(explainer, clip.tensor, pyr, draws=view.faithfulness)
        if view.faithfulness and not pyr.empty
        else None
    )
    return Explanation(pyr, clip, maps, motion, tube, view.class_tube, class_names, view, faith)


def busy_after_pyramid(view: ViewOptions) -> bool:
    """Whether `explain` has more to compute once the pyramid exists (maps, the shuffle
    run, a class tube, the faithfulness check): a writer started then (``on_pyramid``)
    shares the cores with it, so it is better kept to one thread."""
    return view.needs_maps or view.class_tube is not None or bool(view.faithfulness)


def prepare(
    explainer: Explainer, options: PyramidOptions | None = None, view: ViewOptions | None = None
) -> None:
    """Build the instrumented session `explain` will run, ahead (while a clip decodes)."""
    opts = as_options(options, PyramidOptions, "options")
    plan = _plan(explainer, opts, as_options(view, ViewOptions, "view"))
    explainer.prefetch(plan.depth)
    explainer.session(explainer.taps(plan.depth, plan.full))


def _plan(explainer: Explainer, opts: PyramidOptions, view: ViewOptions) -> Plan:
    """The run `explain` makes: the pyramid's taps, every kernel's map if the views need
    them, and what the class tube reads besides."""
    plan = explainer.plan(opts.depth, maps=view.needs_maps)
    extra = classtube.tensors(explainer, view.class_tube, opts.depth)
    return replace(plan, full=tuple(dict.fromkeys((*plan.full, *extra))))


def _shuffle_ratio(
    explainer: Explainer,
    maker: tubes_mod.TubeMaker,
    maps: KernelMaps,
    clip: Clip,
    model_input: ModelInput,
    full: tuple[str, ...],
) -> np.ndarray:
    """The frame-shuffle test for every kernel: one more forward, on the shuffled clip."""
    axis = model_input.time_axis
    perm = tubes_mod.shuffle_order(clip.tensor.shape[axis])
    shuffled = explainer.run(
        tubes_mod.shuffle_frames(clip.tensor, axis, perm), depth=maker.pyr.depth, full=full
    )
    original = maps.responses()
    nodes = np.arange(len(original))
    return tubes_mod.motion_test(maker, nodes, shuffled, perm, original).ratio
