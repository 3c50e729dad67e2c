"""The Python API: ``Explainer`` (analyse a model once, explain many clips) and ``explain``.

model -> graph -> instrumented run -> relevance -> pyramid. The CLI is a thin layer
over this module.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from cfp_onnx import graph as graph_mod
from cfp_onnx import resources
from cfp_onnx.errors import ClipError, ModelError, OptionError
from cfp_onnx.loading import (
    LoadedModel,
    analysis_proto,
    declared_shape,
    graph_input,
    load_model,
    resolve_input_shape,
)
from cfp_onnx.modelinfo import class_names
from cfp_onnx.modelinput import clip_path
from cfp_onnx.ops import CONV
from cfp_onnx.options import PyramidOptions
from cfp_onnx.provenance import Csr, Provenance, trace
from cfp_onnx.pyramid import LayerStep, Pyramid, PyramidInputs, build, selected_heads
from cfp_onnx.relevance import minmax
from cfp_onnx.runtime import Session
from cfp_onnx.surgery import Tap, full_name, instrument, pooled_name
from cfp_onnx.xp import array_module, to_numpy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """What one run must return: the taps of a depth, and which full maps (for views)."""

    depth: int
    full: tuple[str, ...] = ()


@dataclass(frozen=True)
class Run:
    """What one instrumented forward returned, on the host, and the plan it was made for."""

    logits: np.ndarray  # [classes]
    features: np.ndarray  # [F] float64, pooled head input
    pooled: dict[str, np.ndarray]  # layer input tensor -> [C_in] float64
    full: dict[str, np.ndarray]  # tensor -> full map (batch axis dropped)
    plan: Plan


class Explainer:
    """A model analysed once for one clip shape; `explain` then costs one forward + array ops."""

    def __init__(
        self,
        model: str | os.PathLike[str] | LoadedModel,
        *,
        clip_shape: tuple[int, ...] | None = None,
        output: str | None = None,
        device: str = "cpu",
        threads: int | None = None,
        max_memory: str | int | None = None,
    ) -> None:
        """`max_memory`: bytes or ``"2G"``; None: 80% of the available memory; ``"off"``: no
        guard (see cfp_onnx.resources). A run estimated above it raises ResourceError."""
        self.memory_limit = resources.MemoryLimit.of(max_memory)
        self.xp = array_module(device)
        self.device = device
        self.threads = threads
        self.loaded = model if isinstance(model, LoadedModel) else load_model(model)
        self.input_shape = resolve_input_shape(self.loaded.proto, clip_shape)
        proto = analysis_proto(self.loaded, self.input_shape)
        self.graph = graph_mod.parse(proto, self.loaded.external)
        del proto
        self.head = graph_mod.find_head(self.graph, output or _own_output(self.loaded.proto))
        self.layers = graph_mod.find_layers(self.graph, self.head)
        self.layer_index = {layer.node: i for i, layer in enumerate(self.layers)}
        self.provenance: Provenance = trace(self.graph, self.layers, self.head)
        self._csr: dict[int, Csr] = {}
        self._levels: dict[int, tuple[np.ndarray, ...]] = {}
        self._steps: dict[int, LayerStep] = {}
        self._means: dict[int, Future[np.ndarray]] = {}  # tap means read ahead (prefetch)
        # prefetch (before a run) and step (in a pyramid) may run on two threads at once
        # (cfp batch builds one clip's pyramid while the next clip's forward runs)
        self._weights = threading.Lock()
        self._head_cache: dict[Any, Any] = {}  # pyramid.selected_heads
        self._sessions: dict[tuple[str, ...], Session] = {}
        self._estimates: dict[tuple[int, tuple[str, ...]], Any] = {}
        self.input_dtype = onnx.helper.tensor_dtype_to_np_dtype(
            graph_input(self.loaded.proto).type.tensor_type.elem_type
        )

    # ------------------------------------------------------------------ structure

    @property
    def classes(self) -> int:
        return int(self.head.weight.shape[0])

    @property
    def model_name(self) -> str:
        return self.loaded.name

    @cached_property
    def head_csr(self) -> Csr:
        f = int(self.head.weight.shape[1])
        shape = self.graph.shapes.get(self.head.input)
        if shape is not None and shape[self.head.feature_axis] != f:
            raise OptionError(
                f"classifier {self.head.node!r} reads {shape[self.head.feature_axis]} features "
                f"but its weight has {f}"
            )
        return self.provenance.rows_along(
            self.head.input, self.head.feature_axis, f, what=f"the classifier {self.head.node!r}"
        )

    @cached_property
    def head_normalised(self) -> Any:
        """The head weight min-max normalised over the whole matrix (SPEC §4, 'weights')."""
        return minmax(self.xp, self.xp.asarray(self.head.weight), axis=None)

    def input_csr(self, layer: int) -> Csr:
        """Provenance of each input channel of a layer (raises for an op with no rule)."""
        if layer not in self._csr:
            lay = self.layers[layer]
            self._csr[layer] = self.provenance.rows_along(
                lay.input, 1, lay.c_in, what=f"the input of conv {lay.node!r}"
            )
        return self._csr[layer]

    def levels(self, depth: int) -> list[np.ndarray]:
        """Layers each depth can reach, structurally (before any clip is seen): computed
        once per depth (every run asks), the arrays read-only."""
        if depth not in self._levels:
            offsets = self.provenance.offsets
            level = self.head_csr.layers_reached(offsets)
            out = [level]
            for _ in range(depth - 1):
                if len(level) == 0:  # the graph ran out of convs: deeper levels are empty too
                    break
                nxt = [self.input_csr(int(i)).layers_reached(offsets) for i in level]
                level = np.unique(np.concatenate(nxt)) if nxt else np.zeros(0, dtype=np.int64)
                out.append(level)
            for lv in out:
                lv.flags.writeable = False
            self._levels[depth] = tuple(out)
        return list(self._levels[depth])

    def expanded_layers(self, depth: int) -> np.ndarray:
        """Layers whose kernels a pyramid of `depth` may expand (levels 0..depth-2)."""
        levels = self.levels(depth)[: depth - 1]
        return np.unique(np.concatenate(levels)) if levels else np.zeros(0, dtype=np.int64)

    @cached_property
    def shapes(self) -> resources.Shapes:
        """The static shapes the memory estimate needs (computed once)."""
        g = self.graph

        def nbytes(t: str) -> int:
            return int(np.prod(g.shapes[t], dtype=np.float64)) * 4 if t in g.shapes else 0

        return resources.Shapes(
            input_shape=tuple(self.input_shape),
            weights=resources.weight_bytes(self.loaded.proto.graph.initializer),
            tensor_bytes={
                t: nbytes(t) for t in g.shapes if t in g.producer and t not in g.constants
            },
            widest={i: lay.c_out * lay.c_in for i, lay in enumerate(self.layers)},
            map_bytes={
                i: lay.c_out
                * max(
                    nbytes(lay.input) // max(lay.c_in, 1), nbytes(lay.output) // max(lay.c_out, 1)
                )
                for i, lay in enumerate(self.layers)
            },
        )

    def map_tensors(self, depth: int) -> tuple[str, ...]:
        """Full maps a run must return so any kernel of a depth-`depth` pyramid can be shown.

        Inputs of the layers a pyramid can expand (kernels with children), and outputs of
        the layers that can hold childless kernels: the deepest level, and layers whose
        input carries no conv (the first convs).
        """
        levels = self.levels(depth)
        names: dict[str, None] = {}
        for i in self.expanded_layers(depth).tolist():
            names[self.layers[i].input] = None
            if len(self.input_csr(i).kernels) == 0:
                names[self.layers[i].output] = None
        for i in levels[-1].tolist():
            names[self.layers[int(i)].output] = None
        return tuple(names)

    def plan(self, depth: int, *, maps: bool = False) -> Plan:
        """The run a pyramid of `depth` needs; with `maps`, every kernel's map too."""
        return Plan(depth, self.map_tensors(depth) if maps else ())

    # ------------------------------------------------------------------ running

    def taps(self, depth: int, full: tuple[str, ...] = ()) -> list[Tap]:
        """Pooled taps average over every axis but the batch (0) and the channel: a batched
        run gives each clip its own row (for one clip, the same elements in the same order)."""
        head_rank = len(self.graph.shape(self.head.input))
        head_axes = tuple(a for a in range(1, head_rank) if a != self.head.feature_axis)
        taps = [
            Tap(self.head.logits, self.head.logits),
            Tap(self.head.input, pooled_name(self.head.input), head_axes),
        ]
        for i in self.expanded_layers(depth).tolist():
            t = self.layers[i].input
            rank = len(self.graph.shape(t))
            taps.append(Tap(t, pooled_name(t), tuple(range(2, rank))))
        taps += [Tap(t, full_name(t)) for t in full]
        return taps

    def session(self, taps: list[Tap]) -> Session:
        key = tuple(sorted(t.name for t in taps))
        if key not in self._sessions:
            proto = instrument(self.loaded.proto, taps)
            self._sessions[key] = Session(
                proto,
                self.loaded.external,
                base=self.loaded.path.parent,
                device=self.device,
                threads=self.threads,
            )
        return self._sessions[key]

    def prepare_clip(self, clip: Any) -> np.ndarray:
        """The clip as the model's input: batch axis added, dtype matched, values checked."""
        arr = clip if isinstance(clip, np.ndarray) else load_array(clip_path(clip))
        if arr.size == 0:
            raise ClipError(f"clip is empty (shape {arr.shape})")
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise ClipError(f"clip has dtype {arr.dtype}; expected real numbers (float32)")
        shape = resolve_input_shape(self.loaded.proto, tuple(int(s) for s in arr.shape))
        if shape != self.input_shape:
            raise ClipError(
                f"clip has shape {shape}; this Explainer was built for {self.input_shape}"
            )
        with np.errstate(over="ignore", invalid="ignore"):  # overflow: the NaN/Inf check says so
            arr = arr.reshape(shape).astype(self.input_dtype, copy=False)
        if not np.all(np.isfinite(arr)):
            raise ClipError("clip holds NaN or Inf values; preprocess it to finite numbers")
        return arr

    def run(self, clip: Any, *, depth: int = 3, full: tuple[str, ...] = ()) -> Run:
        """One instrumented forward: logits, pooled head input and conv inputs, any full maps."""
        arr = self.prepare_clip(clip)
        taps = self._checked_taps(depth, full, 1)
        out = self.session(taps).run(arr, [t.name for t in taps])
        return self._run_of(out, taps, depth, full, 0)

    def run_many(
        self, clips: Sequence[np.ndarray], *, depth: int = 3, full: tuple[str, ...] = ()
    ) -> list[Run]:
        """The runs of several clips from one batched forward, where the model's batch axis
        is dynamic: each equals the clip's own `run` (the caller checks it, see
        ``cfp_onnx.batch``). Raises ModelError when the graph cannot run a batch (a
        reshape that fixes it to 1, say)."""
        if len(clips) == 1 or not self.batchable:
            return [self.run(c, depth=depth, full=full) for c in clips]
        arrs = [self.prepare_clip(c) for c in clips]
        taps = self._checked_taps(depth, full, len(arrs))
        out = self.session(taps).run(np.concatenate(arrs), [t.name for t in taps])
        if any(len(v) != len(arrs) for v in out.values()):
            raise ModelError(f"a batch of {len(arrs)} clips gives outputs of another batch")
        return [self._run_of(out, taps, depth, full, i) for i in range(len(arrs))]

    @cached_property
    def batchable(self) -> bool:
        """Whether the model declares a dynamic batch axis (clips can share a forward)."""
        return not isinstance(declared_shape(graph_input(self.loaded.proto))[0], int)

    def _checked_taps(self, depth: int, full: tuple[str, ...], clips: int) -> list[Tap]:
        """The taps of a run, after the memory guard (`clips` clips in one forward)."""
        key = (depth, full)
        if key not in self._estimates:  # static shapes: the same for every clip
            levels = self.levels(depth)
            reachable = np.unique(np.concatenate(levels)).tolist() if levels else []
            self._estimates[key] = resources.estimate(
                self.shapes, self.expanded_layers(depth).tolist(), reachable, full
            )
        est = self._estimates[key]
        if clips > 1:  # the activations and taps scale with the batch, the weights do not
            est = replace(est, activations=est.activations * clips, exposed=est.exposed * clips)
        resources.check(est, self.memory_limit)
        self.prefetch(depth)  # the back-step's weights read while the forward runs
        return self.taps(depth, full)

    def _run_of(
        self, out: dict[str, Any], taps: list[Tap], depth: int, full: tuple[str, ...], i: int
    ) -> Run:
        """Clip `i`'s run from a forward's outputs (its row of every output)."""
        logits = np.asarray(out[self.head.logits][i], dtype=np.float64).reshape(-1)
        if logits.size != self.classes:
            raise ModelError(
                f"logits tensor {self.head.logits!r} has {logits.size} values for {self.classes} classes"
            )
        pooled = {t.tensor: out[t.name][i].reshape(-1) for t in taps[2:] if t.pool_axes is not None}
        full_maps = {t.tensor: out[t.name][i] for t in taps if t.name.startswith("cfp_full::")}
        features = out[pooled_name(self.head.input)][i].reshape(-1)
        if not all(np.all(np.isfinite(v)) for v in (logits, features, *pooled.values())):
            raise ModelError(self._nonfinite_message())
        return Run(logits, features, pooled, full_maps, Plan(depth, tuple(full)))

    def _nonfinite_message(self) -> str:
        """Name the first constant holding NaN/Inf (read one at a time), else blame overflow."""
        for name in self.graph.constants:
            value = self.graph.constants[name]
            if np.issubdtype(value.dtype, np.floating) and not np.all(np.isfinite(value)):
                users = [self.graph.nodes[i] for i in self.graph.consumers.get(name, ())]
                convs = [n.name for n in users if n.op_type in CONV and n.inputs[1] == name]
                where = f" of conv {convs[0]!r}" if convs else ""
                return (
                    f"initializer {name!r}{where} holds NaN or Inf values, so the run gives "
                    "NaN/Inf activations; fix or re-export the model's weights"
                )
        return (
            "the model's activations overflow to NaN or Inf on this clip; check the clip's "
            "scale and normalisation (--mean/--std)"
        )

    # ------------------------------------------------------------------ explaining

    def explain(
        self,
        clip: Any,
        options: PyramidOptions | None = None,
        *,
        class_names: tuple[str, ...] | None = None,
        **kw: Any,
    ) -> Pyramid:
        """The class feature pyramid of `clip` (default: for the predicted class).

        `options`, or the same fields as keywords (``depth=3, theta=0.6, ...``).
        """
        opts = self.options(options, kw)
        run = self.run(clip, depth=opts.depth)
        return self.pyramid(run, opts, class_names=class_names)

    def pyramid(
        self,
        run: Run,
        options: PyramidOptions | None = None,
        *,
        class_names: tuple[str, ...] | None = None,
        union: Sequence[int] | None = None,
        count_links: bool = False,
        **kw: Any,
    ) -> Pyramid:
        """Build the pyramid from an existing run (no second forward); with `union`, the
        union of those classes' pyramids (``cfp_onnx.pyramid.build``). `count_links`:
        count each step's links while scoring it (~20% of the back-step), for a caller
        that needs ``n_links`` but will never expand the links."""
        opts = self.options(options, kw)
        if opts.depth > run.plan.depth:
            raise OptionError(
                f"this run was made for depth {run.plan.depth}; a depth-{opts.depth} pyramid "
                "needs its own run"
            )
        label = self.check_label(opts.label, run.logits, class_names)
        return build(
            self.xp, self._inputs(run), opts, label=label, model=self.model_name,
            logits=run.logits, label_name=class_names[label] if class_names else None,
            union=union, count_links=count_links,
        )  # fmt: skip

    def head_kernels(
        self, run: Run, options: PyramidOptions, labels: Sequence[int]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every label's depth-0 kernels from one run: ``(position in labels, kernel id,
        relevance)`` triples (what each label's pyramid starts from)."""
        row, kid, rel, _ = selected_heads(self.xp, self._inputs(run), options, labels)
        return to_numpy(row), to_numpy(kid), to_numpy(rel)

    def options(self, options: PyramidOptions | None, kw: dict[str, Any]) -> PyramidOptions:
        """`options` or one built from keywords, checked against this model."""
        if options is not None and kw:
            raise OptionError(f"pass either options or {', '.join(kw)}, not both")
        opts = options if options is not None else PyramidOptions(**kw)
        if opts.head_mode == "contrastive" and self.classes < 2:
            raise OptionError("head mode 'contrastive' needs at least two classes")
        return opts

    def check_label(
        self,
        label: int | str | None,
        logits: np.ndarray,
        class_names: tuple[str, ...] | None = None,
    ) -> int:
        """The class index to explain: the prediction, an index, or a class name."""
        if label is None:
            return int(np.argmax(logits))
        if isinstance(label, str):
            if not class_names:
                raise OptionError(
                    f"label {label!r} is a name, but the model has no class names; give the "
                    f"class index (0..{self.classes - 1})"
                )
            if label not in class_names:
                near = [n for n in class_names if n.lower() == label.lower()]
                hint = f"; did you mean {near[0]!r}?" if near else ""
                raise OptionError(
                    f"label {label!r} is not one of the model's {len(class_names)} class names"
                    f"{hint} (e.g. {', '.join(repr(n) for n in class_names[:3])})"
                )
            return class_names.index(label)
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)):
            raise OptionError(f"label must be an integer class index (got {label!r})")
        if not 0 <= label < self.classes:
            raise OptionError(
                f"label {label} is out of range: the model has {self.classes} classes (0..{self.classes - 1})"
            )
        return int(label)

    def _inputs(self, run: Run) -> PyramidInputs:
        xp = self.xp
        csr = self.head_csr
        return PyramidInputs(
            space=self.provenance.space,
            head_weight=xp.asarray(self.head.weight),
            head_normalised=self.head_normalised,
            head_indptr=xp.asarray(csr.indptr),
            head_kernels=xp.asarray(csr.kernels),
            features=xp.asarray(run.features, dtype=xp.float64),
            steps=self.step,
            pooled=lambda i: xp.asarray(run.pooled[self.layers[i].input], dtype=xp.float64),
            head_cache=self._head_cache,
        )

    def prefetch(self, depth: int) -> None:
        """Read and average the weights of every layer a depth-`depth` pyramid may expand,
        on a thread, while the clip decodes and the forward runs: in a fresh process that
        is ~0.07 s of a ResNet-50-3D pyramid's 0.1 s (file reads into new pages), and the
        back-step needs it only after the forward. `step` takes the result (or its error)."""
        with self._weights:
            for i in self.expanded_layers(depth).tolist():
                if i not in self._steps and i not in self._means:
                    self._means[i] = _weight_reader().submit(self.layers[i].tap_means)

    def step(self, layer: int) -> LayerStep:
        """Back-step data of a layer, computed once per Explainer."""
        with self._weights:
            if layer not in self._steps:
                lay, csr, xp = self.layers[layer], self.input_csr(layer), self.xp
                ahead = self._means.pop(layer, None)
                means = ahead.result() if ahead is not None else lay.tap_means()
                injective = len(np.unique(csr.kernels)) == len(csr.kernels)
                self._steps[layer] = LayerStep(
                    xp.asarray(means),
                    lay.group,
                    xp.asarray(csr.indptr),
                    xp.asarray(csr.kernels),
                    injective,
                )
            return self._steps[layer]


@lru_cache(maxsize=1)
def _weight_reader() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="cfp-weights")


def _own_output(proto: onnx.ModelProto) -> str | None:
    """In a model `cfp embed` wrote, the first of the model's own outputs (else None)."""
    from cfp_onnx.embed import EmbedInfo

    info = EmbedInfo.of(proto)
    if info is None:
        return None
    added = set(info.outputs)
    return next((o.name for o in proto.graph.output if o.name not in added), None)


def load_array(clip: Any) -> np.ndarray:
    """A clip given as a path to a ``.npy`` file (video files: see cfp_onnx.video)."""
    path = Path(clip)
    if path.suffix.lower() != ".npy":
        raise ClipError(f"clip {str(path)!r}: expected a .npy array or a video file")
    if not path.is_file():
        raise ClipError(f"clip {str(path)!r} does not exist")
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise ClipError(
            f"clip {path.name} is not a readable .npy array ({type(exc).__name__})"
        ) from None
    from cfp_onnx.video import check_tensor  # OpenCV only when a file clip is read

    check_tensor(arr, path)  # rank, size, dtype, finite: before anything draws frames from it
    return arr


def explain(
    model: str | os.PathLike[str],
    clip: Any,
    *,
    label: int | None = None,
    depth: int = 3,
    theta: float = 0.6,
    top_n: int | None = None,
    head_mode: str = "weights",
    output: str | None = None,
    device: str = "cpu",
    max_memory: str | int | None = None,
) -> Pyramid:
    """Explain one clip: ``cfp_onnx.explain("model.onnx", clip)``.

    `clip` is an array in the model's layout (batch axis optional), a ``.npy`` file, or a
    video file / frame folder, decoded and preprocessed as the model's metadata says.
    """
    opts = PyramidOptions(depth=depth, theta=theta, top_n=top_n, head_mode=head_mode, label=label)
    loaded = load_model(model)
    arr = clip if isinstance(clip, np.ndarray) else _read_clip(clip, loaded, max_memory)
    explainer = Explainer(
        loaded, clip_shape=tuple(arr.shape), output=output, device=device, max_memory=max_memory
    )
    return explainer.explain(arr, opts, class_names=class_names(loaded))


def _read_clip(
    clip: str | os.PathLike[str], loaded: LoadedModel, max_memory: str | int | None
) -> np.ndarray:
    from cfp_onnx.modelinput import ModelInput  # OpenCV only when a file clip is read

    limit = resources.MemoryLimit.of(max_memory)
    return ModelInput.of(loaded).clip(clip, loaded, limit).tensor
