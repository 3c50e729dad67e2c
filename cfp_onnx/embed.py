"""The pyramid inside the model: extra graph outputs that explain each prediction.

The method needs no gradients (SPEC §3-4): head weights, pooled activations and a few
array ops per layer. So it can run in the graph, on any ONNX runtime, beside the logits.
`embed` adds to a model, as graph surgery and with standard ONNX ops only (opset >= 17):

* ``cfp_label`` ``[N]`` int64: the explained class, the prediction unless the optional
  input ``cfp_explain_label`` (a scalar, default -1) names one;
* per pyramid layer ``cfp_depth:<layer>`` ``[N, C_out]`` int64 (-1: not in the pyramid)
  and ``cfp_relevance:<layer>`` ``[N, C_out]`` float64 (0 where not in the pyramid);
* with a class tube, ``cfp_class_tube`` ``[N, T, H, W]`` float32 at clip size, signed.

What is dynamic in size on the host (kept kernels, links) is a dense mask over each
layer's kernels here. The back-step is the host's, op for op: tap means in float64 from
the float32 taps, ``(r - min) / (max - min)`` per kernel, ``>= theta``, TopK for top_n
(ONNX TopK breaks ties by the lower index, as ``relevance.select`` does). A kernel's
children are a static gather: the provenance of each input channel, inverted into a
padded index table per level, so a level is Gather + ReduceMax. Each level uses only the
rows of the kernels it expands (Compress by the batch's frontier), as the host does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from cfp_onnx.errors import ModelError, OptionError
from cfp_onnx.loading import LoadedModel, declared_shape, graph_input, load_model
from cfp_onnx.options import EMBED_TUBES, ClipOptions, PyramidOptions, as_options, as_path
from cfp_onnx.relevance import minmax, select
from cfp_onnx.tubes import linear_matrix
from cfp_onnx.xp import to_numpy

if TYPE_CHECKING:
    from cfp_onnx.api import Explainer

OPSET = 17
PRECISIONS = ("float64", "float32")
LABEL_INPUT = "cfp_explain_label"
LABEL = "cfp_label"
TUBE = "cfp_class_tube"
METADATA = "cfp.embedded"
NEG = -np.inf


def depth_name(layer: str) -> str:
    return f"cfp_depth:{layer}"


def relevance_name(layer: str) -> str:
    return f"cfp_relevance:{layer}"


@dataclass(frozen=True)
class EmbedInfo:
    """What an embedded model's extra outputs are (stored as ``cfp.embedded`` metadata)."""

    depth: int
    theta: float
    top_n: int | None
    head_mode: str
    class_tube: str | None
    clip_size: tuple[int, int, int]  # (T, H, W) of the class tube
    layers: tuple[str, ...]  # pyramid layers, topological order
    precision: str = "float64"  # the in-graph arithmetic

    def to_json(self) -> str:
        return json.dumps({**self.__dict__, "clip_size": list(self.clip_size)})

    @classmethod
    def of(cls, proto: onnx.ModelProto) -> EmbedInfo | None:
        """The model's embedding, or None when it has none."""
        text = next((p.value for p in proto.metadata_props if p.key == METADATA), None)
        if text is None:
            return None
        try:
            d = json.loads(text)
            return cls(
                int(d["depth"]), float(d["theta"]), d["top_n"], str(d["head_mode"]),
                d["class_tube"], tuple(int(s) for s in d["clip_size"]),  # type: ignore[arg-type]
                tuple(str(s) for s in d["layers"]), str(d.get("precision", "float64")),
            )  # fmt: skip
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelError(
                f"metadata {METADATA!r} is malformed ({exc}); re-run cfp embed"
            ) from None

    def lines(self) -> list[str]:
        """What `cfp inspect` prints about the embedding."""
        top = f", top-n {self.top_n}" if self.top_n is not None else ""
        tube = (
            f"  {TUBE} [N, {', '.join(map(str, self.clip_size))}] float32: the {self.class_tube} "
            "class tube"
        )
        return [
            f"embedded explanation (cfp embed): depth {self.depth}, theta {self.theta}, head "
            f"mode {self.head_mode}{top}",
            f"  input {LABEL_INPUT} int64 scalar: the class to explain (default -1: the prediction)",
            f"  {LABEL} [N] int64: the explained class",
            f"  {depth_name('LAYER')} [N, C_out] int64 (-1: not in the pyramid) and "
            f"{relevance_name('LAYER')} [N, C_out] {self.precision}, for {len(self.layers)} layers:",
            *[f"    {name}" for name in self.layers],
            *([tube] if self.class_tube else []),
        ]

    @property
    def outputs(self) -> tuple[str, ...]:
        names = [LABEL]
        for layer in self.layers:
            names += [depth_name(layer), relevance_name(layer)]
        return (*names, *([TUBE] if self.class_tube else []))


class _Ops:
    """Appends nodes to a graphsurgeon graph: ``ops("Mul", a, b)`` returns the output."""

    def __init__(self, graph: gs.Graph, real: Any, opset: int) -> None:
        self.graph = graph
        self.count = 0
        self.opset = opset
        self.real = np.dtype(real)  # the arithmetic's float type: float64, as on the host
        self.real_onnx = onnx.helper.np_dtype_to_tensor_dtype(self.real)

    def _name(self, what: str) -> str:
        self.count += 1
        return f"cfp/{what}_{self.count}"

    def const(self, value: Any, dtype: Any = None) -> gs.Constant:
        return gs.Constant(self._name("c"), np.asarray(value, dtype=dtype))

    def __call__(self, op: str, *inputs: Any, dtype: Any = None, **attrs: Any) -> gs.Variable:
        ins = [x if isinstance(x, gs.Tensor) else self.const(self.as_real(x)) for x in inputs]
        out = gs.Variable(self._name(op), dtype=dtype)
        self.graph.nodes.append(
            gs.Node(op, name=self._name(op), attrs=attrs, inputs=ins, outputs=[out])
        )
        return out

    def as_real(self, x: Any) -> Any:
        """Float constants in the arithmetic's type (the host's tables are float64)."""
        arr = np.asarray(x)
        return arr.astype(self.real) if arr.dtype == np.float64 else arr

    def reduce(self, op: str, x: Any, axes: Sequence[int], keepdims: bool = False) -> gs.Variable:
        """ReduceMax/Min/Mean/Sum over `axes` (before opset 18 an attribute but for Sum)."""
        if op == "ReduceSum" or self.opset >= 18:
            return self(op, x, np.asarray(axes, np.int64), keepdims=int(keepdims))
        return self(op, x, axes=list(axes), keepdims=int(keepdims))

    def unsqueeze(self, x: Any, axes: Sequence[int]) -> gs.Variable:
        return self("Unsqueeze", x, np.asarray(axes, np.int64))

    def reshape(self, x: Any, shape: Sequence[int]) -> gs.Variable:
        return self("Reshape", x, np.asarray(shape, np.int64))

    def minmax(self, r: Any, axis: int) -> gs.Variable:
        """``relevance.minmax`` along `axis`: a constant row normalises to ones."""
        scaled, flat = self.minmax_parts(r, axis)
        # a flat row is all zeros in `scaled` (r == lo): adding 1 there, 0 elsewhere, is exact
        return self("Add", scaled, self("Cast", flat, to=self.real_onnx))

    def minmax_parts(self, r: Any, axis: int) -> tuple[gs.Variable, gs.Variable]:
        """``(r - lo) / span`` with flat rows left at 0, and the flat-row mask (keepdims):
        callers fold the flat rows' 1 into a later pass instead of a pass of their own."""
        lo = self.reduce("ReduceMin", r, [axis], keepdims=True)
        span = self("Sub", self.reduce("ReduceMax", r, [axis], keepdims=True), lo)
        flat = self("Equal", span, np.float64(0))
        return self("Div", self("Sub", r, lo), self("Where", flat, np.float64(1), span)), flat

    def select(
        self, scores: Any, width: int, theta: float, top_n: int | None, keep: Any = None
    ) -> gs.Variable:
        """``relevance.select`` along the last axis: ``>= theta`` (or `keep`, that mask
        given), then the top_n largest."""
        if keep is None:
            keep = self("GreaterOrEqual", scores, np.float64(theta))
        if top_n is None or top_n >= width:
            return keep
        masked = self("Where", keep, scores, np.float64(NEG))
        top = gs.Variable(self._name("TopK"), dtype=self.real)
        idx = gs.Variable(self._name("TopKi"), dtype=np.int64)
        self.graph.nodes.append(
            gs.Node(
                "TopK", name=self._name("TopK"), attrs={"axis": -1, "largest": 1, "sorted": 1},
                inputs=[masked, self.const([top_n], np.int64)], outputs=[top, idx],
            )
        )  # fmt: skip
        zeros = self("ConstantOfShape", self("Shape", scores), value=_scalar_tensor(0.0, self.real))
        ones = self("ConstantOfShape", self("Shape", idx), value=_scalar_tensor(1.0, self.real))
        chosen = self("ScatterElements", zeros, idx, ones, axis=-1)
        return self("And", keep, self("Greater", chosen, np.float64(0)))


def _scalar_tensor(v: float, dtype: Any) -> onnx.TensorProto:
    return onnx.numpy_helper.from_array(np.asarray([v], dtype))


def _padded(n_rows: int, row: np.ndarray, pos: np.ndarray, sentinel: int) -> np.ndarray:
    """``[n_rows, k]`` table: row r lists the positions paired with it, padded by `sentinel`."""
    order = np.argsort(row, kind="stable")
    row, pos = row[order], pos[order]
    counts = np.bincount(row, minlength=n_rows)
    width = int(counts.max()) if len(row) else 0
    out = np.full((n_rows, width), sentinel, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    out[row, np.arange(len(row)) - starts[row]] = pos
    return out


def _pairs(indptr: np.ndarray, kernels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(channel, kernel id) of every entry of a provenance CSR."""
    return np.repeat(np.arange(len(indptr) - 1), np.diff(indptr)), np.asarray(kernels, np.int64)


@dataclass
class _Scores:
    """One layer's r' for some of its kernels, kernel-major, and its kept mask once asked."""

    layer: int
    r: gs.Variable  # flat rows at 0
    flat: gs.Variable  # [rows, N, 1] (grouped: [g, C_out/g, N, 1]) bool
    rows: gs.Variable | None  # the kernels' ids in the layer (None: every kernel, in order)
    keep: gs.Variable | None = None


class _Builder:
    """One embedding: the explainer's analysis, turned into nodes."""

    def __init__(
        self, ex: Explainer, graph: gs.Graph, opts: PyramidOptions, real: Any, opset: int
    ) -> None:
        self.ex, self.opts = ex, opts
        self.ops = _Ops(graph, real, opset)
        self.all_head_rows = False  # set when a class tube needs every head kernel's row
        self.head_frontier: gs.Variable | None = None
        self.tensors = graph.tensors()
        levels = ex.levels(opts.depth)
        self.levels = [lv.tolist() for lv in levels]
        self.layers = sorted({int(i) for lv in self.levels for i in lv})
        offsets = ex.provenance.offsets
        sizes = [ex.layers[i].c_out for i in self.layers]
        self.local = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.n = int(self.local[-1])
        self.to_local = np.full(ex.provenance.space.size, -1, dtype=np.int64)
        for k, li in enumerate(self.layers):
            self.to_local[offsets[li] : offsets[li + 1]] = np.arange(
                self.local[k], self.local[k + 1]
            )
        self.slot = {li: k for k, li in enumerate(self.layers)}
        self._scores: dict[tuple[int, str | None], _Scores] = {}
        self._slices: dict[tuple[str, int], gs.Variable] = {}
        self._pooled: dict[str, gs.Variable] = {}

    # ----------------------------------------------------------------- inputs

    def pooled(self, tensor: str, keep: Sequence[int]) -> gs.Variable:
        """Mean in float64 over every axis but `keep` (the taps the host reads)."""
        key = f"{tensor}|{list(keep)}"
        if key not in self._pooled:
            x = self.tensors[tensor]
            rank = len(self.ex.graph.shape(tensor))
            axes = [a for a in range(rank) if a not in keep]
            d = self.ops("Cast", x, to=self.ops.real_onnx, dtype=self.ops.real)
            self._pooled[key] = self.ops.reduce("ReduceMean", d, axes) if axes else d
        return self._pooled[key]

    def label(self) -> tuple[gs.Variable, gs.Variable]:
        """(label [N], logits [N, classes]) and the optional label input."""
        ops = self.ops
        logits = ops("Flatten", self.tensors[self.ex.head.logits], axis=1)
        pred = ops("ArgMax", logits, axis=1, keepdims=0, dtype=np.int64)
        given = gs.Variable(LABEL_INPUT, dtype=np.int64, shape=[])
        ops.graph.inputs.append(given)  # its default (-1) is an initializer of that name
        label = ops("Where", ops("Less", given, np.int64(0)), pred, given, dtype=np.int64)
        return label, logits

    # ----------------------------------------------------------------- head

    def head(self, label: gs.Variable) -> tuple[gs.Variable, gs.Variable]:
        """(scores [N, F], kept mask [N, F]) for `label` (SPEC §4)."""
        ex, ops, o = self.ex, self.ops, self.opts
        w = np.asarray(ex.head.weight, np.float64)
        if o.head_mode == "weights":
            scores = ops("Gather", minmax(np, w, axis=None), label, axis=0)
        else:
            feats = self.features()
            table = w if o.head_mode == "contribution" else _contrastive(w)
            scores = ops.minmax(ops("Mul", ops("Gather", table, label, axis=0), feats), 1)
        return scores, ops.select(scores, w.shape[1], o.theta, o.top_n)

    def features(self) -> gs.Variable:
        h = self.ex.head
        if h.feature_axis == 0:
            raise ModelError(
                f"the classifier {h.node!r} reads features along axis 0 (no batch axis); "
                "cfp embed needs the batch axis first"
            )
        return self.pooled(h.input, [0, h.feature_axis])

    def of_layer(self, x: gs.Variable, li: int, dtype: Any = None) -> gs.Variable:
        """``x[:, kernels of layer li]`` for ``[N, K]`` state over the pyramid's kernels
        (one Slice per tensor and layer, however often asked)."""
        key = (x.name, li)
        if key not in self._slices:
            k = self.slot[li]
            lo, hi = self.local[k : k + 1], self.local[k + 1 : k + 2]
            self._slices[key] = self.ops("Slice", x, lo, hi, np.ones(1, np.int64), dtype=dtype)
        return self._slices[key]

    @cached_property
    def head_index(self) -> np.ndarray:
        """Per pyramid kernel, the classifier features it feeds (padded)."""
        csr = self.ex.head_csr
        f, k = _pairs(csr.indptr, csr.kernels)
        k = self.to_local[k]
        return _padded(self.n, k[k >= 0], f[k >= 0], len(csr.indptr) - 1)

    def gather_max(self, values: gs.Variable, table: np.ndarray, axis: int) -> gs.Variable:
        """Per row of `table`, the largest of ``values`` at its positions (-inf padded)."""
        ops = self.ops
        pad_shape = [1] * (axis + 1)
        pad = ops(
            "Expand",
            np.full(pad_shape, NEG),
            ops("Concat", ops("Shape", values, end=axis), np.ones(1, np.int64), axis=0),
        )
        padded = ops("Concat", values, pad, axis=axis)
        return ops.reduce("ReduceMax", ops("Gather", padded, table, axis=axis), [axis + 1])

    # ----------------------------------------------------------------- back-step

    # Scores live kernel-major, ``[C_out, N, C_in]`` (grouped: ``[g, C_out/g, N, C_in/g]``):
    # a kernel's row is contiguous for its min-max, and the column maximum over kernels is
    # a reduction over a leading axis, which onnxruntime runs 3-4x faster than over a
    # middle one.

    def _kernel_major(self, li: int, x: Any) -> gs.Variable:
        """``[N, C_out]`` -> the scores' layout with a trailing axis of 1."""
        ops, lay = self.ops, self.ex.layers[li]
        t = ops("Transpose", x, perm=[1, 0])
        if lay.group == 1:
            return ops.unsqueeze(t, [2])
        return ops.reshape(t, [lay.group, lay.c_out // lay.group, -1, 1])

    def _over_kernels(self, li: int, op: str, x: Any) -> gs.Variable:
        """Reduce the scores' layout over kernels (within each group): ``[N, C_in]``."""
        ops, lay = self.ops, self.ex.layers[li]
        if lay.group == 1:
            return ops.reduce(op, x, [0])
        per_group = ops("Transpose", ops.reduce(op, x, [1]), perm=[1, 0, 2])  # [N, g, C_in/g]
        return ops.reshape(per_group, [0, lay.c_in])

    def rows_of(self, li: int, frontier: gs.Variable | None) -> gs.Variable | None:
        """Kernel ids of `li` that `frontier` holds for any clip of the batch (None: all).

        An ungrouped layer's scores are then computed for those rows only, as the host's
        back-step does: a level expands its frontier, often half the layer or less.
        Grouped layers keep every row (their score matrices are small)."""
        if frontier is None or self.ex.layers[li].group != 1:
            return None
        if frontier is self.head_frontier and self.all_head_rows:
            return None  # the contrast tube scores every head kernel anyway: share them
        ops = self.ops
        mask = self.of_layer(frontier, li)
        anyone = ops.reduce("ReduceMax", ops("Cast", mask, to=onnx.TensorProto.INT32), [0])
        return ops("Squeeze", ops("NonZero", anyone), np.zeros(1, np.int64))  # [R]

    def scores(self, li: int, rows: gs.Variable | None = None) -> _Scores:
        """r' of the kernels `rows` of layer `li` (None: all), kernel-major (SPEC §3, as
        relevance.scores), flat rows (one input, or all equal: every r' is 1) left at 0."""
        key = (li, None if rows is None else rows.name)
        if key not in self._scores:
            ops, lay = self.ops, self.ex.layers[li]
            kbar = np.asarray(to_numpy(self.ex.step(li).kbar), np.float64)
            c_out, per_group = kbar.shape
            a = self.pooled(lay.input, [0, 1])  # [N, C_in]
            if lay.group == 1:
                k = kbar[:, None, :] if rows is None else ops("Gather", kbar[:, None, :], rows)
                r = ops("Mul", k, a)
            else:
                g = lay.group
                acts = ops.unsqueeze(
                    ops("Transpose", ops.reshape(a, [0, g, per_group]), perm=[1, 0, 2]), [1]
                )  # [g, 1, N, C_in/g]
                r = ops("Mul", kbar.reshape(g, c_out // g, 1, per_group), acts)
            scaled, flat = ops.minmax_parts(r, -1)
            self._scores[key] = _Scores(li, scaled, flat, rows)
        return self._scores[key]

    def keep(self, s: _Scores) -> gs.Variable:
        """The kept mask of the rows of `s` (same layout)."""
        if s.keep is None:
            lay, ops = self.ex.layers[s.layer], self.ops
            # a flat row keeps every channel that its 1s would (theta <= 1); its top_n are
            # the lowest channels either way, as all its entries tie
            above = ops("Or", ops("GreaterOrEqual", s.r, np.float64(self.opts.theta)), s.flat)
            s.keep = ops.select(
                s.r, lay.c_in // lay.group, self.opts.theta, self.opts.top_n, keep=above
            )
        return s.keep

    def kernel_major(self, s: _Scores, x: Any) -> gs.Variable:
        """``[N, C_out]`` over layer `s.layer` -> the layout of `s` (trailing axis of 1)."""
        t = self._kernel_major(s.layer, x)
        return t if s.rows is None else self.ops("Gather", t, s.rows)

    def column_best(self, li: int, frontier: gs.Variable) -> gs.Variable:
        """``[N, C_in]``: per input channel, the largest kept r' over the frontier's kernels."""
        ops = self.ops
        rows = self.of_layer(frontier, li)
        s = self.scores(li, self.rows_of(li, frontier))
        # r' lies in [0, 1]: lowering entries that do not count by 2 puts them below every
        # kept one, with small masks instead of a Where over the score matrix (the values
        # that count are added 0: unchanged). Without top_n a kept entry is one >= theta,
        # so the column maximum is thresholded once afterwards, as on the host.
        off = ops("Mul", ops("Cast", ops("Not", rows), to=ops.real_onnx), np.float64(-2))
        adjust = ops("Add", self.kernel_major(s, off), ops("Cast", s.flat, to=ops.real_onnx))
        vals = ops("Add", s.r, adjust)  # + 1 on flat rows: their r' (exact, from 0)
        if self.opts.top_n is not None:
            dropped = ops("Cast", ops("Not", self.keep(s)), to=ops.real_onnx)
            vals = ops("Add", vals, ops("Mul", dropped, np.float64(-2)))
        # no row in the batch's frontier: the maximum of nothing is -inf (ONNX's rule since
        # opset 18, and onnxruntime's at any opset), below theta like any lowest value
        best = self._over_kernels(li, "ReduceMax", vals)
        keep = ops("GreaterOrEqual", best, np.float64(self.opts.theta))
        return ops("Where", keep, best, np.float64(NEG))

    def level_index(self, layers: list[int]) -> np.ndarray:
        """The children table of one level: local kernel -> positions in its channel vector."""
        rows, pos, base = [], [], 0
        for li in layers:
            csr = self.ex.input_csr(li)
            c, k = _pairs(csr.indptr, csr.kernels)
            k = self.to_local[k]
            rows.append(k[k >= 0])
            pos.append(c[k >= 0] + base)
            base += self.ex.layers[li].c_in
        row = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        p = np.concatenate(pos) if pos else np.zeros(0, np.int64)
        return _padded(self.n, row, p, base)

    def build(self) -> dict[str, gs.Variable]:
        ops, o = self.ops, self.opts
        label, _ = self.label()
        scores, keep = self.head(label)
        head_rel = self.gather_max(ops("Where", keep, scores, np.float64(NEG)), self.head_index, 1)
        in_head = ops("Greater", head_rel, np.float64(NEG))
        self.head_frontier = in_head
        depth = ops("Where", in_head, np.int64(0), np.int64(-1), dtype=np.int64)
        frontier, incoming = in_head, None
        for d in range(o.depth - 1):
            layers = [li for li in self.levels[d] if li in self.slot]
            table = self.level_index(layers)
            if table.shape[1] == 0 or not layers:
                break
            best = [self.column_best(li, frontier) for li in layers]
            values = best[0] if len(best) == 1 else ops("Concat", *best, axis=1)
            cand = self.gather_max(values, table, 1)
            incoming = cand if incoming is None else ops("Max", incoming, cand)
            fresh = ops(
                "And", ops("Greater", cand, np.float64(NEG)), ops("Less", depth, np.int64(0))
            )
            depth = ops("Where", fresh, np.int64(d + 1), depth, dtype=np.int64)
            frontier = fresh
        rel = (
            head_rel
            if incoming is None
            else ops("Where", ops("Equal", depth, np.int64(0)), head_rel, incoming)
        )
        rel = ops("Where", ops("Less", depth, np.int64(0)), np.float64(0), rel, dtype=ops.real)
        outs = {LABEL: ops("Identity", label, dtype=np.int64)}
        for li in self.layers:
            name = self.ex.layers[li].node
            outs[depth_name(name)] = self.of_layer(depth, li, np.int64)
            outs[relevance_name(name)] = self.of_layer(rel, li, ops.real)
        self.depth, self.head_rel = depth, head_rel
        return outs


def _contrastive(w: np.ndarray) -> np.ndarray:
    """``W[k] - mean over j != k of W[j]`` for every class k, as ``head_scores`` computes it."""
    out = np.empty_like(w)
    for k in range(len(w)):
        out[k] = w[k] - np.concatenate([w[:k], w[k + 1 :]]).mean(axis=0)
    return out


def embed(
    explainer: Explainer,
    options: PyramidOptions | None = None,
    *,
    class_tube: str | None = None,
    clip_size: tuple[int, int, int] | None = None,
    precision: str = "float64",
) -> tuple[onnx.ModelProto, EmbedInfo]:
    """The explainer's model with the pyramid (and class tube) as extra outputs.

    The model's own outputs come first and are computed by the same nodes as before.
    Weights are copied into the returned model (it stands alone). `precision` is the
    in-graph arithmetic: ``float64`` as on the host (the same kernel sets; the default),
    or ``float32`` for runtimes without doubles (TensorRT, WebGL/WebGPU): a kernel whose
    score lies within float32 rounding of theta may then be kept where the host drops it,
    or the reverse (tests/test_embed.py measures the bound).

    Raises:
        OptionError: a label in `options` (the label is an input of the embedded model),
            an unknown class tube, or a class tube without `clip_size`.
        ModelError: the model cannot carry the embedding (see the message).
    """
    ex = explainer
    opts = options or PyramidOptions()
    if opts.label is not None:
        raise OptionError(
            "cfp embed explains the prediction, or the class fed to the input "
            f"{LABEL_INPUT!r} at run time; drop --label"
        )
    if class_tube is not None and class_tube not in EMBED_TUBES:
        raise OptionError(
            f"class tube must be one of {', '.join(EMBED_TUBES)} (got {class_tube!r})"
        )
    if class_tube is not None and clip_size is None:
        raise OptionError("a class tube needs the clip size (T, H, W)")
    if precision not in PRECISIONS:
        raise OptionError(f"precision must be one of {', '.join(PRECISIONS)} (got {precision!r})")
    proto = _at_opset(ex.loaded.proto)
    graph = gs.import_onnx(proto)
    b = _Builder(ex, graph, ex.options(opts, {}), np.dtype(precision), _opset(proto))
    b.all_head_rows = class_tube == "contrast"
    outs = b.build()
    if class_tube is not None and clip_size is not None:
        outs[TUBE] = _ClassTube(b, class_tube, clip_size).build()
    batch = declared_shape(graph_input(proto))[0]
    n = batch if isinstance(batch, (int, str)) and batch not in (0, "") else "N"
    shapes = {LABEL: [n], TUBE: [n, *(clip_size or ())]}
    for li in b.layers:
        lay = ex.layers[li]
        shapes[depth_name(lay.node)] = shapes[relevance_name(lay.node)] = [n, lay.c_out]
    for name, var in outs.items():
        var.name, var.shape = name, shapes[name]
        graph.outputs.append(var)
    model = gs.export_onnx(graph, do_type_check=False)
    # an initializer named like a graph input is that input's default (IR >= 4)
    model.graph.initializer.append(
        onnx.numpy_helper.from_array(np.asarray(-1, np.int64), LABEL_INPUT)
    )
    model.ir_version = max(proto.ir_version, 8)
    del model.opset_import[:]
    model.opset_import.extend(proto.opset_import)
    _inline_weights(model, ex)
    info = EmbedInfo(
        opts.depth, float(opts.theta), opts.top_n, opts.head_mode, class_tube,
        tuple(clip_size or (0, 0, 0)),  # type: ignore[arg-type]
        tuple(ex.layers[i].node for i in b.layers), precision,
    )  # fmt: skip
    onnx.helper.set_model_props(
        model, {**{p.key: p.value for p in proto.metadata_props}, METADATA: info.to_json()}
    )
    return model, info


def _opset(proto: onnx.ModelProto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def _at_opset(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The model at opset >= 17 (older ones converted by onnx's version converter)."""
    opset = _opset(proto)
    if opset >= OPSET:
        return proto
    try:
        from onnx import version_converter

        return version_converter.convert_version(proto, OPSET)
    except Exception as exc:
        raise ModelError(
            f"could not convert the model from opset {opset} to {OPSET} ({type(exc).__name__}); "
            f"re-export it at opset {OPSET}"
        ) from None


def _inline_weights(model: onnx.ModelProto, ex: Explainer) -> None:
    """Copy every external initializer's bytes into `model` (the output stands alone)."""
    for t in model.graph.initializer:
        ext = ex.loaded.external.get(t.name)
        if ext is None:
            continue
        del t.external_data[:]
        t.data_location = onnx.TensorProto.DEFAULT
        t.raw_data = np.ascontiguousarray(ext.read()).tobytes()


class _ClassTube:
    """The class tube (cfp_onnx.classtube) from the depth-0 kernels' maps, in the graph."""

    def __init__(self, b: _Builder, kind: str, size: tuple[int, int, int]) -> None:
        self.b, self.kind, self.size = b, kind, tuple(int(s) for s in size)

    def weights(self) -> gs.Variable:
        """``[N, K]`` float64: each kernel's weight in the tube (its depth-0 relevance)."""
        b = self.b
        ops = b.ops
        own = ops("Where", ops("Equal", b.depth, np.int64(0)), b.head_rel, np.float64(0))
        if self.kind == "weighted":
            return own
        return ops("Sub", own, self.class_mean())

    def class_mean(self) -> gs.Variable:
        """Mean over every class k of its depth-0 relevances (0 outside its depth-0 set)."""
        b, ops, o = self.b, self.b.ops, self.b.opts
        w = np.asarray(b.ex.head.weight, np.float64)
        table = b.head_index
        classes, f = w.shape
        if o.head_mode == "weights":  # does not depend on the clip: a constant
            scores = minmax(np, w, axis=None)
            vals = np.where(select(np, scores, o.theta, o.top_n), scores, NEG)
            padded = np.concatenate([vals, np.full((classes, 1), NEG)], axis=1)
            rel = padded[:, table].max(axis=2) if table.shape[1] else np.full((classes, b.n), NEG)
            return ops.const(ops.as_real(np.where(rel > NEG, rel, 0.0).mean(axis=0)[None, :]))
        base = w if o.head_mode == "contribution" else _contrastive(w)
        scores = ops.minmax(ops("Mul", base[None], ops.unsqueeze(b.features(), [1])), 2)
        keep = ops.select(scores, f, o.theta, o.top_n)
        rel = b.gather_max(ops("Where", keep, scores, np.float64(NEG)), table, 2)
        rel = ops("Where", ops("Greater", rel, np.float64(NEG)), rel, np.float64(0))
        return ops.reduce("ReduceMean", rel, [1])

    def build(self) -> gs.Variable:
        b, ops = self.b, self.b.ops
        ex = b.ex
        weight = self.weights()
        expanded = b.opts.depth >= 2
        map_out = set(ex.map_tensors(b.opts.depth))
        parts: dict[tuple[int, int, int], list[gs.Variable]] = {}
        for li in b.levels[0]:
            lay = ex.layers[li]
            w = b.of_layer(weight, li)
            if expanded:
                parents = self.parent_channels(li, map_out)
                # the weighted tube weighs only this clip's depth-0 kernels: the level-0
                # rows suffice; the contrast tube weighs every class's
                frontier = b.head_frontier if self.kind == "weighted" and parents is None else None
                s = b.scores(li, b.rows_of(li, frontier))
                keep = b.keep(s)
                use_in = None if parents is None else self.reads_input(li, keep, parents)
                w_in = w if use_in is None else ops("Where", use_in, w, np.float64(0))
                kept = ops("Cast", keep, to=ops.real_onnx)
                u = b._over_kernels(li, "ReduceSum", ops("Mul", kept, b.kernel_major(s, w_in)))
                self.add(parts, lay.input, u)
                if use_in is not None:
                    self.add(parts, lay.output, ops("Where", use_in, np.float64(0), w))
            else:
                self.add(parts, lay.output, w)
        size = self.size
        total = None
        for shape, maps in parts.items():
            m = maps[0]
            for extra in maps[1:]:
                m = ops("Add", m, extra)
            up = self.upsample(m, shape, size)
            total = up if total is None else ops("Add", total, up)
        if total is None:  # an empty head: a zero tube
            return ops(
                "ConstantOfShape",
                ops("Concat", ops("Shape", b.depth, end=1), np.asarray(size, np.int64), axis=0),
                value=onnx.numpy_helper.from_array(np.zeros(1, np.float32)),
                dtype=np.float32,
            )
        return ops("Identity", total, dtype=np.float32)

    def parent_channels(self, li: int, map_out: set[str]) -> np.ndarray | None:
        """Where some depth-0 kernel may show its own output (`tubes.selections`): the
        ``[C_out, C_in/g]`` mask of kept channels that carry a kernel; None where every
        kernel shows its kept inputs (no output map, or every channel carries one)."""
        lay = self.b.ex.layers[li]
        if lay.output not in map_out:
            return None
        carries = np.diff(self.b.ex.input_csr(li).indptr) > 0
        per_group = lay.c_in // lay.group
        q = np.arange(lay.c_out) // (lay.c_out // lay.group)
        hp = carries[q[:, None] * per_group + np.arange(per_group)[None, :]]
        return None if hp.all() else hp

    def reads_input(self, li: int, keep: gs.Variable, parents: np.ndarray) -> gs.Variable:
        """``[N, C_out]``: the kernels with children (a kept channel that carries a kernel)."""
        ops, lay = self.b.ops, self.b.ex.layers[li]
        per_group = lay.c_in // lay.group
        layout = (lay.c_out, 1, per_group) if lay.group == 1 else (lay.group, -1, 1, per_group)
        parent = ops("Cast", ops("And", keep, parents.reshape(layout)), to=ops.real_onnx)
        rows = ops.reshape(ops.reduce("ReduceMax", parent, [-1]), [lay.c_out, -1])  # [C_out, N]
        return ops("Greater", ops("Transpose", rows, perm=[1, 0]), np.float64(0))

    def add(
        self, parts: dict[tuple[int, int, int], list[gs.Variable]], tensor: str, weight: gs.Variable
    ) -> None:
        """Add ``weight @ tensor`` (``[N, t, h, w]``) to the maps of its resolution."""
        ops = self.b.ops
        shape = self.b.ex.graph.shape(tensor)
        c = int(shape[1])
        thw = tuple(int(s) for s in shape[2:])
        thw = (1,) * (3 - len(thw)) + thw
        x = ops.reshape(self.b.tensors[tensor], [0, c, -1])
        w32 = ops.unsqueeze(ops("Cast", weight, to=onnx.TensorProto.FLOAT), [1])
        m = ops.reshape(ops("MatMul", w32, x), [0, *thw])
        parts.setdefault(thw, []).append(m)  # type: ignore[arg-type]

    def upsample(
        self, m: gs.Variable, shape: tuple[int, int, int], size: tuple[int, ...]
    ) -> gs.Variable:
        """``tubes.upsample``: three matrix products with the same interpolation matrices."""
        ops = self.b.ops
        (t, h, w), (big_t, big_h, big_w) = shape, size
        x = ops("MatMul", m, linear_matrix(w, big_w).T.copy())
        x = ops("MatMul", linear_matrix(h, big_h), x)
        x = ops("MatMul", linear_matrix(t, big_t), ops.reshape(x, [0, t, big_h * big_w]))
        return ops.reshape(x, [0, big_t, big_h, big_w])


def clip_geometry(
    loaded: LoadedModel, clips: ClipOptions | None = None
) -> tuple[tuple[int, ...], tuple[int, int, int]]:
    """(model input shape with batch 1, clip size (T, H, W)): from the declared input, or
    the clip options and metadata where the model's own dims are dynamic.

    Raises:
        OptionError: a dynamic dim nothing gives (say which options fix it).
    """
    from cfp_onnx.modelinput import ModelInput

    mi = ModelInput.of(loaded, clips)
    declared = declared_shape(graph_input(loaded.proto))
    rank5 = len(declared) == 5
    if not rank5:
        raise ModelError(
            f"the model's input has rank {len(declared)}; cfp embed needs a video clip input (rank 5)"
        )
    c_axis, axes = (1, (2, 3, 4)) if mi.layout == "NCDHW" else (4, (1, 2, 3))
    dims = [d if isinstance(d, int) and d > 0 else None for d in declared]
    dims[0] = 1
    pre = mi.preprocess
    if pre is not None:
        dims[axes[0]] = pre.frames
        if pre.size is not None:
            dims[axes[1]], dims[axes[2]] = pre.size
    if dims[c_axis] is None:
        dims[c_axis] = 3
    missing = [name for name, a in zip(("--frames", "--size", "--size"), axes) if dims[a] is None]
    if missing:
        raise OptionError(
            f"the model's input {tuple(declared)} has dynamic dims; give {missing[0]} so the "
            "class tube and the analysis have a clip size"
        )
    shape = tuple(int(d) for d in dims)  # type: ignore[arg-type]
    return shape, (shape[axes[0]], shape[axes[1]], shape[axes[2]])


def embed_to(
    model: str | os.PathLike[str],
    output: str | os.PathLike[str],
    options: PyramidOptions | None = None,
    *,
    class_tube: str | None = None,
    clip_options: ClipOptions | None = None,
    logits: str | None = None,
    precision: str = "float64",
    overwrite: bool = False,
) -> tuple[Path, EmbedInfo]:
    """What ``cfp embed`` does: analyse `model`, write the embedded model to `output`.

    The file appears whole or not at all; the model and its external data files are never
    replaced, ``--overwrite`` or not.
    """
    from cfp_onnx.api import Explainer
    from cfp_onnx.outputs import guard, write_file

    opts = as_options(options, PyramidOptions, "options")
    loaded = load_model(model)
    protect = [loaded.path, *{e.file for e in loaded.external.values()}]
    guard(as_path(output, "output must be a path to a .onnx file"), protect, flag="-o")
    shape, size = clip_geometry(loaded, clip_options)
    ex = Explainer(loaded, clip_shape=shape, output=logits)
    proto, info = embed(ex, opts, class_tube=class_tube, clip_size=size, precision=precision)
    try:
        data = proto.SerializeToString()
    except ValueError:  # protobuf's 2 GB message limit
        raise ModelError(
            "the embedded model would exceed protobuf's 2 GB limit for one ONNX file; "
            "cfp embed writes one self-contained file, so it cannot embed a model this large"
        ) from None
    return write_file(output, lambda p: p.write_bytes(data), overwrite=overwrite), info
