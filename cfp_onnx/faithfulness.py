"""Is the pyramid faithful to the model? Zero its depth-0 kernels and see the class score fall.

The check (``cfp explain --faithfulness``) compares two ablations of the same clip: the
pyramid's depth-0 kernels zeroed, and as many kernels drawn at random from the same layers
(``draws`` times, seeded). Kernels are zeroed by graph surgery: after each conv the check
needs, a ``Mul`` by a per-channel mask that is a graph input, so every ablation is one row
of one batched run (one row per run where the model's batch axis is fixed; several runs
where one batch's activations would pass BATCH_BYTES). The first row
masks nothing, so the drops are measured against the same session's own score.

``ratio`` is the pyramid's drop over the mean random drop: above 1, the pyramid's kernels
matter more to the class than kernels picked blindly. Its 95 % interval is a percentile
bootstrap over the random draws.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from cfp_onnx import resources
from cfp_onnx.errors import OptionError
from cfp_onnx.loading import declared_shape, graph_input
from cfp_onnx.options import DRAWS
from cfp_onnx.pyramid import Pyramid
from cfp_onnx.runtime import Session

if TYPE_CHECKING:
    from cfp_onnx.api import Explainer

BOOTSTRAP = 2000
BATCH_BYTES = 1 << 30
"""Activations one batched ablation run may hold."""
MASK = "cfp_mask::"


@dataclass(frozen=True)
class Faithfulness:
    """The ablation check of one explanation (class scores are the model's logits).

    Attributes:
        label: the class whose score is measured.
        kernels: how many depth-0 kernels were zeroed (per layer in ``layers``).
        layers: the layers they belong to, with their kernel counts.
        score: the class score with nothing zeroed.
        pyramid_drop: the score's fall with the pyramid's depth-0 kernels zeroed.
        random_drops: its fall with each random draw zeroed instead.
        ratio: ``pyramid_drop / mean(random_drops)``; None when the mean random drop is
            not positive (no ratio means anything then).
        interval: 95 % percentile-bootstrap interval of the ratio over the draws, or None.
        seed: the random draws' seed.
    """

    label: int
    kernels: int
    layers: tuple[tuple[str, int], ...]
    score: float
    pyramid_drop: float
    random_drops: tuple[float, ...]
    ratio: float | None
    interval: tuple[float, float] | None
    seed: int

    @property
    def random_mean(self) -> float:
        """The mean random drop."""
        return float(np.mean(self.random_drops))

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "kernels": self.kernels,
            "layers": [{"layer": name, "kernels": n} for name, n in self.layers],
            "score": self.score,
            "pyramid_drop": self.pyramid_drop,
            "random_drop_mean": self.random_mean,
            "random_drops": list(self.random_drops),
            "ratio": self.ratio,
            "interval": list(self.interval) if self.interval else None,
            "draws": len(self.random_drops),
            "seed": self.seed,
        }

    @property
    def summary(self) -> str:
        """One sentence for a person."""
        mean = self.random_mean
        head = (
            f"zeroing the pyramid's {self.kernels} depth-0 kernels drops the class score by "
            f"{self.pyramid_drop:.3g} (from {self.score:.3g}); as many random kernels of the "
            f"same layers drop it by {mean:.3g} on average ({len(self.random_drops)} draws)"
        )
        if self.ratio is None or self.interval is None:
            return head + ": no ratio, the random kernels do not lower the score"
        lo, hi = self.interval
        return f"{head}: ratio {self.ratio:.2f} [{lo:.2f}, {hi:.2f}]"


class Ablator:
    """The model with a per-channel mask after some convs: class scores with kernels zeroed."""

    def __init__(self, explainer: Explainer, layers: Sequence[int]) -> None:
        # What the runs need, not the explainer itself: the module's cache is keyed weakly
        # by the explainer, and a value holding its key would keep both alive for good.
        self.layers = tuple(sorted({int(i) for i in layers}))
        self._masked = [
            (lay.output, lay.c_out, len(explainer.graph.shape(lay.output)))
            for lay in (explainer.layers[i] for i in self.layers)
        ]
        self._logits = explainer.head.logits
        proto = masked(explainer.loaded.proto, [explainer.layers[i].output for i in self.layers])
        self.session = Session(
            proto,
            explainer.loaded.external,
            base=explainer.loaded.path.parent,
            device=explainer.device,
            threads=explainer.threads,
        )
        batch = declared_shape(graph_input(explainer.loaded.proto))[0]
        self.batched = not isinstance(batch, int)
        self._per_row = resources.estimate(explainer.shapes, [], []).activations

    def logits(self, clip: np.ndarray, rows: Sequence[Mapping[int, np.ndarray]]) -> np.ndarray:
        """``[len(rows), classes]`` logits of `clip` (the model's input, batch 1) with each
        row's kernels (layer index -> channels) zeroed."""
        masks = {}
        for i, (output, c_out, rank) in zip(self.layers, self._masked):
            m = np.ones((len(rows), c_out), np.float32)
            for r, row in enumerate(rows):
                if i in row:
                    m[r, np.asarray(row[i], np.int64)] = 0.0
            masks[MASK + output] = m.reshape(len(rows), c_out, *([1] * (rank - 2)))
        logits, step = self._logits, self.rows_per_run
        out = []
        for lo in range(0, len(rows), step):
            n = min(step, len(rows) - lo)
            feeds = {self.session.input_name: np.repeat(clip, n, axis=0)}
            feeds.update({k: v[lo : lo + n] for k, v in masks.items()})
            out.append(np.asarray(self.session.feed(feeds, [logits])[logits], np.float64))
        return np.concatenate(out).reshape(len(rows), -1)

    @property
    def rows_per_run(self) -> int:
        """Rows one run takes: 1 for a fixed batch axis, else as many as keep the batch's
        activations within BATCH_BYTES (a 224-px clip's are several times a 112-px one's)."""
        if not self.batched:
            return 1
        return max(1, BATCH_BYTES // max(1, self._per_row))


_ABLATORS: weakref.WeakKeyDictionary[Explainer, Ablator] = weakref.WeakKeyDictionary()


def _ablator(explainer: Explainer, layers: tuple[int, ...]) -> Ablator:
    """The explainer's last masked session, reused while the layer set repeats (batch and
    window runs check many clips, and the surgery and session cost more than a forward);
    one per explainer at most, since each holds a copy of the model."""
    ab = _ABLATORS.get(explainer)
    if ab is None or ab.layers != tuple(sorted(layers)):
        ab = _ABLATORS[explainer] = Ablator(explainer, layers)
    return ab


def masked(proto: onnx.ModelProto, tensors: Sequence[str]) -> onnx.ModelProto:
    """`proto` with ``y * mask`` after each tensor ``y`` of `tensors`: the mask is a graph
    input ``cfp_mask::<y>`` of shape ``[batch, C, 1, ...]``. The caller's model is untouched."""
    graph = gs.import_onnx(proto)
    known = graph.tensors()
    for name in tensors:
        y = known[name]
        if not isinstance(y, gs.Variable) or len(y.inputs) != 1:
            raise OptionError(f"cannot zero kernels of {name!r}: it is not a node's output")
        node = y.inputs[0]
        dtype = _float_type(y, node)
        before = gs.Variable(f"{name}/cfp_unmasked", dtype=dtype, shape=y.shape)
        node.outputs[node.outputs.index(y)] = before
        rank = len(y.shape) if y.shape is not None else 5
        channels = y.shape[1] if y.shape is not None else None
        mask = gs.Variable(
            MASK + name, dtype=dtype, shape=["cfp_rows", channels, *[1] * (rank - 2)]
        )
        graph.inputs.append(mask)
        graph.nodes.append(
            gs.Node("Mul", name=f"{name}/cfp_mask", inputs=[before, mask], outputs=[y])
        )
    graph.toposort()
    model = gs.export_onnx(graph, do_type_check=False)
    model.ir_version = proto.ir_version
    del model.opset_import[:]
    model.opset_import.extend(proto.opset_import)
    return model


def _float_type(y: gs.Variable, node: gs.Node) -> Any:
    """The conv output's float type: declared, else its weight's (a Conv computes in it;
    a dequantised weight in its scale's type)."""
    dtype = y.dtype
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    if dtype is None and isinstance(weight, gs.Variable) and len(weight.inputs) == 1:
        dq = weight.inputs[0]  # a quantised weight: DequantizeLinear computes in its scale's type
        if dq.op == "DequantizeLinear" and isinstance(dq.inputs[1], gs.Constant):
            weight = dq.inputs[1]
    if dtype is None and isinstance(weight, gs.Constant):
        dtype = weight.dtype
    if dtype not in (np.float32, np.float16, np.float64):
        raise OptionError(
            f"cannot zero the kernels of {y.name!r}: its values are {dtype}, not floats; "
            "the faithfulness check needs a float model (run it on the float export)"
        )
    return dtype


def depth0_kernels(pyr: Pyramid) -> dict[int, np.ndarray]:
    """The pyramid's depth-0 kernels as layer index -> channels."""
    at = pyr.node_depth == 0
    layers = pyr.node_layer[at]
    return {int(la): pyr.node_channel[at][layers == la] for la in np.unique(layers).tolist()}


def random_like(
    kernels: Mapping[int, np.ndarray], c_out: Mapping[int, int], rng: np.random.Generator
) -> dict[int, np.ndarray]:
    """As many kernels per layer as `kernels`, drawn uniformly from the layer's channels."""
    return {la: rng.choice(c_out[la], len(ch), replace=False) for la, ch in kernels.items()}


def ratio_interval(
    drop: float, random_drops: np.ndarray, rng: np.random.Generator, n: int = BOOTSTRAP
) -> tuple[float | None, tuple[float, float] | None]:
    """``drop / mean(random_drops)`` and its 95 % percentile-bootstrap interval over the
    draws; (None, None) when the mean random drop is not positive."""
    mean = float(np.mean(random_drops)) if len(random_drops) else 0.0
    if not mean > 0:
        return None, None
    means = random_drops[rng.integers(0, len(random_drops), (n, len(random_drops)))].mean(axis=1)
    with np.errstate(divide="ignore"):
        boot = np.where(means > 0, drop / np.where(means > 0, means, 1.0), np.inf)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return drop / mean, (float(lo), float(hi))


def check(
    explainer: Explainer,
    clip: np.ndarray,
    pyr: Pyramid,
    *,
    draws: int = DRAWS,
    seed: int = 0,
    ablator: Ablator | None = None,
) -> Faithfulness | None:
    """Ablate `pyr`'s depth-0 kernels and `draws` random sets like them, in one run.

    `clip` is the model input the pyramid was made from. None for an empty pyramid.

    Raises:
        OptionError: `draws` is below 1, or the model's conv outputs cannot be masked.
    """
    if draws < 1:
        raise OptionError(f"faithfulness draws must be >= 1 (got {draws})")
    kernels = depth0_kernels(pyr)
    if not kernels:
        return None
    rng = np.random.default_rng(seed)
    c_out = {la: explainer.layers[la].c_out for la in kernels}
    rows: list[Mapping[int, np.ndarray]] = [{}, kernels]
    rows += [random_like(kernels, c_out, rng) for _ in range(draws)]
    ab = ablator if ablator is not None else _ablator(explainer, tuple(kernels))
    scores = ab.logits(explainer.prepare_clip(clip), rows)[:, pyr.label]
    base = float(scores[0])
    drops = base - scores[2:]
    ratio, interval = ratio_interval(base - float(scores[1]), drops, rng)
    return Faithfulness(
        label=pyr.label,
        kernels=sum(len(ch) for ch in kernels.values()),
        layers=tuple((pyr.layers[la], len(ch)) for la, ch in kernels.items()),
        score=base,
        pyramid_drop=base - float(scores[1]),
        random_drops=tuple(float(v) for v in drops),
        ratio=ratio,
        interval=interval,
        seed=seed,
    )
