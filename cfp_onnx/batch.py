"""Many clips, one model: per-clip pyramids, class pyramids, a summary CSV (``cfp batch``).

The output folder is the run's state, so a run can be stopped and resumed:

- ``clips/<clip-id>/`` holds ``nodes.npz`` (the pyramid's kernels: layer, channel,
  depth, relevance), ``pyramid.json`` (SPEC §5; not with ``clip_pyramids="nodes"``,
  which a dataset of ResNets needs: theirs are ~100 MB a clip), with ``class_tube`` the
  clip's ``class_tube.npy`` (float32 ``[T, H, W]``, as ``cfp explain`` writes it) and
  ``clip.json`` (source,
  labels, score, link count, and the size and sha256 of each file); each folder appears
  whole (staged, then renamed), and a clip whose files are intact is done: a re-run skips
  it. A damaged clip (a file missing, truncated or changed since) is redone: by size when
  the run starts, by hash when the summary reads it.
- ``classes/<label>/`` holds ``class_pyramid.json`` and ``report.html``: for each kernel,
  the share of the class's clips whose pyramid holds it, its mean relevance over
  those clips and its smallest depth.
- ``summary.csv``: one row per finished clip.

Class pyramids and the summary are rebuilt at the end of every run by streaming over
the per-clip ``nodes.npz`` in clip order (one clip in memory at a time, running sums in
arrays keyed by kernel id): they equal an uninterrupted run's whatever was resumed, and
whichever engine computed the clips.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import re
import shutil
import zipfile
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from cfp_onnx import classtube, faithfulness
from cfp_onnx.api import Explainer, Run
from cfp_onnx.digest import file_digest
from cfp_onnx.errors import CfpError, OptionError, OutputError
from cfp_onnx.loading import LoadedModel, load_model
from cfp_onnx.modelinfo import class_names
from cfp_onnx.modelinput import ModelInput
from cfp_onnx.options import CLASS_TUBES, ClipOptions, PyramidOptions
from cfp_onnx.outputs import guard, staged_dir, write_file
from cfp_onnx.provenance import KernelSpace
from cfp_onnx.pyramid import Pyramid
from cfp_onnx.video import (
    IMAGE_EXTENSIONS,
    TENSOR_EXTENSIONS,
    VIDEO_EXTENSIONS,
    natural_key,
)
from cfp_onnx.xp import to_numpy

log = logging.getLogger(__name__)

MANIFEST = "batch.json"
LABEL_MODES = ("predicted", "true")
CLIP_PYRAMIDS = ("full", "nodes")
NODES = "nodes.npz"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True, slots=True)
class ClipTask:
    """One clip to explain: a file-system-safe id, its path, and its true label if known."""

    id: str
    path: str
    label: int | None = None


Decoding = ClipOptions
"""How clips are decoded: the model's metadata with these overrides (one definition)."""


@dataclass(frozen=True, slots=True)
class BatchOptions:
    """Pyramid options shared by every clip. ``label``: ``predicted``, ``true`` or a class."""

    depth: int = 3
    theta: float = 0.6
    top_n: int | None = None
    head_mode: str = "weights"
    label: str | int = "predicted"
    faithfulness: int = 0  # random draws of the faithfulness check; 0: no check
    clip_pyramids: str = "full"  # "full": each clip's pyramid.json too; "nodes": its kernels
    class_tube: str | None = None  # a class tube of this kind per clip (class_tube.npy)

    def check(self) -> None:
        """Raises OptionError for an option outside the method's range."""
        self.pyramid(None)
        if self.clip_pyramids not in CLIP_PYRAMIDS:
            raise OptionError(
                f"--clip-pyramids {self.clip_pyramids!r}: choose {' or '.join(CLIP_PYRAMIDS)}"
            )
        if self.class_tube is not None and self.class_tube not in CLASS_TUBES:
            raise OptionError(f"--class-tube {self.class_tube!r}: choose {', '.join(CLASS_TUBES)}")
        if not isinstance(self.faithfulness, int) or self.faithfulness < 0:
            raise OptionError(f"--faithfulness-draws must be >= 1 (got {self.faithfulness!r})")
        if isinstance(self.label, str) and self.label not in LABEL_MODES:
            raise OptionError(
                f"label {self.label!r}: expected a class index, 'predicted' or 'true'"
            )

    def pyramid(self, label: int | None) -> PyramidOptions:
        """The pyramid options of one clip (PyramidOptions checks them)."""
        return PyramidOptions(self.depth, self.theta, self.top_n, self.head_mode, label)

    def label_for(self, task: ClipTask) -> int | None:
        """The class to explain for `task` (None: the prediction)."""
        if self.label == "predicted":
            return None
        if self.label == "true":
            return task.label
        return int(self.label)

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "depth": self.depth, "theta": self.theta, "top_n": self.top_n,
            "head_mode": self.head_mode, "label": self.label,
        }  # fmt: skip
        if self.faithfulness:  # absent without the check: older batches resume as they were
            doc["faithfulness"] = self.faithfulness
        if self.clip_pyramids != "full":  # absent when full: what every older batch wrote
            doc["clip_pyramids"] = self.clip_pyramids
        if self.class_tube is not None:  # absent without one, as in older batches
            doc["class_tube"] = self.class_tube
        return doc


def clip_id(path: Path) -> str:
    """A folder name for a clip: its file name without suffix, reduced to safe characters."""
    stem = path.name if path.is_dir() else path.stem
    return _UNSAFE.sub("_", stem).strip("._-") or "clip"


def is_clip(path: Path) -> bool:
    """A ``.npy``, a video file, or a folder holding images (a clip of frames)."""
    if path.name.startswith("."):
        return False
    if path.is_dir():
        return any(p.suffix.lower() in IMAGE_EXTENSIONS for p in path.iterdir())
    return path.suffix.lower() in TENSOR_EXTENSIONS | VIDEO_EXTENSIONS


def tasks_from(source: str | Path, names: Sequence[str] | None = None) -> list[ClipTask]:
    """Clips of a folder (natural name order) or of a CSV with ``clip`` and ``label`` columns.

    Raises:
        OptionError: a missing source, an empty one, a bad CSV, or two clips with one id.
    """
    src = Path(source)
    if src.is_dir():
        paths = sorted((p for p in src.iterdir() if is_clip(p)), key=lambda p: natural_key(p.name))
        tasks = [ClipTask(clip_id(p), str(p)) for p in paths]
    elif src.is_file() and src.suffix.lower() == ".csv":
        tasks = _read_list(src, names)
    else:
        raise OptionError(f"--clips {str(src)!r}: expected a folder of clips or a .csv list")
    if not tasks:
        raise OptionError(f"--clips {str(src)!r} holds no clips (.npy, videos, frame folders)")
    _check_unique(tasks)
    return tasks


def _read_list(path: Path, names: Sequence[str] | None) -> list[ClipTask]:
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "clip" not in rows[0]:
        raise OptionError(f"{path.name}: expected a header with a 'clip' column (and 'label')")
    out = []
    for i, row in enumerate(rows, start=2):
        clip = (path.parent / (row.get("clip") or "").strip()).resolve()
        label = _parse_label((row.get("label") or "").strip(), names, f"{path.name}:{i}")
        ident = _UNSAFE.sub("_", (row.get("id") or "").strip()).strip("._-") or clip_id(clip)
        out.append(ClipTask(ident, str(clip), label))
    return out


def _parse_label(text: str, names: Sequence[str] | None, where: str) -> int | None:
    if not text:
        return None
    if text.lstrip("-").isdigit():
        return int(text)
    if names and text in names:
        return list(names).index(text)
    raise OptionError(f"{where}: label {text!r} is neither a class index nor a class name")


def _check_unique(tasks: Sequence[ClipTask]) -> None:
    seen: dict[str, str] = {}
    for t in tasks:
        if t.id in seen:
            raise OptionError(
                f"clips {seen[t.id]!r} and {t.path!r} share the id {t.id!r}; "
                "rename one or give an 'id' column in a CSV list"
            )
        seen[t.id] = t.path


# --------------------------------------------------------------------------- one clip


@dataclass(frozen=True, slots=True)
class Nodes:
    """A clip pyramid's kernels as columns (lossless: what class pyramids are made of).

    ``layer`` indexes ``layers`` (every conv of the model, topological order); written
    as ``nodes.npz`` beside ``clip.json``.
    """

    layers: tuple[str, ...]
    layer: np.ndarray  # int32
    channel: np.ndarray  # int32
    depth: np.ndarray  # int8
    relevance: np.ndarray  # float64

    @classmethod
    def of(cls, pyr: Pyramid) -> Nodes:
        return cls(
            pyr.layers,
            pyr.node_layer.astype(np.int32),
            pyr.node_channel.astype(np.int32),
            pyr.node_depth.astype(np.int8),
            pyr.node_relevance.astype(np.float64),
        )

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(
            buf, layers=np.array(self.layers, dtype=str), layer=self.layer,
            channel=self.channel, depth=self.depth, relevance=self.relevance,
        )  # fmt: skip
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> Nodes:
        with np.load(io.BytesIO(data), allow_pickle=False) as f:
            return cls(
                tuple(f["layers"].tolist()), f["layer"], f["channel"], f["depth"],
                f["relevance"],
            )  # fmt: skip

    def kernel_ids(self, space: KernelSpace) -> np.ndarray:
        """Kernel ids in `space` (the model's: checked by name, not assumed)."""
        offsets = np.asarray(space.offsets, np.int64)
        if self.layers != space.layers:
            raise ValueError("nodes of another model's layers")
        layer = self.layer.astype(np.int64)
        width = offsets[1:] - offsets[:-1]
        if len(layer) and not (0 <= self.channel.min() and np.all(self.channel < width[layer])):
            raise ValueError("a node's channel is outside its layer")
        return offsets[layer] + self.channel


@dataclass(frozen=True, slots=True)
class ClipResult:
    """What one clip gave: its pyramid's kernels and labels for the summary and class
    pyramids, and with ``clip_pyramids="full"`` the pyramid for its SPEC §5 file (the
    `Pyramid` itself in this process, its JSON bytes from another)."""

    id: str
    source: str
    predicted: int
    true_label: int | None
    label: int
    score: float
    links: int | None  # None: count them from `pyramid` (on the writer's thread)
    nodes: Nodes
    pyramid: Pyramid | bytes | None = None
    faithfulness_json: str | None = None
    class_tube: np.ndarray | None = None  # float32 [T, H, W], with ``options.class_tube``

    def portable(self) -> ClipResult:
        """This result as plain data, to cross a process boundary (a Ray actor's)."""
        if isinstance(self.pyramid, Pyramid):
            data = self.pyramid.to_json().encode()
            return replace(self, pyramid=data, links=self.pyramid.n_links)
        return self


@dataclass(frozen=True, slots=True)
class ClipFailure:
    """A clip that could not be explained (a user error: unreadable, wrong shape...)."""

    id: str
    message: str


Outcome = ClipResult | ClipFailure


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """Everything a worker needs to build its own Explainer: picklable, sent to Ray actors."""

    model: str
    options: BatchOptions
    decoding: Decoding = field(default_factory=Decoding)
    output: str | None = None
    device: str = "cpu"
    threads: int | None = None


class ClipWorker:
    """Decodes and explains clips; the model is analysed on the first clip, then reused."""

    def __init__(self, spec: WorkerSpec, explainer: Explainer | None = None) -> None:
        self.spec = spec
        self.loaded: LoadedModel = explainer.loaded if explainer else load_model(spec.model)
        self.explainer = explainer
        self.names = class_names(self.loaded)
        self.model_input: ModelInput | None = None
        self.batching: bool | None = None  # None: not yet checked on a batch

    def decode(self, task: ClipTask) -> np.ndarray:
        """The clip as a model input tensor, through ModelInput (raises ClipError).
        Safe from several threads at once (a pool of decoders)."""
        return self.input().clip(task.path, self.loaded).tensor

    def input(self) -> ModelInput:
        """The model's input layout and preprocessing, worked out on first use."""
        if self.model_input is None:
            self.model_input = ModelInput.of(self.loaded, self.spec.decoding)
        return self.model_input

    def explain(self, task: ClipTask, clip: np.ndarray) -> ClipResult:
        """One forward and the pyramid: its kernels, and the pyramid itself if kept."""
        ex = self.explainer_for(clip)
        return self._result(ex, task, clip, ex.run(clip, depth=self.depth, full=self.full(ex)))

    @property
    def depth(self) -> int:
        return self.spec.options.depth

    def full(self, ex: Explainer) -> tuple[str, ...]:
        """The full maps each run keeps: what the class tube reads, if one is asked for."""
        return classtube.tensors(ex, self.spec.options.class_tube, self.depth)

    def explain_many(self, items: Sequence[tuple[ClipTask, np.ndarray]]) -> list[Outcome]:
        """Several clips through one batched forward where the model's batch is dynamic,
        each giving exactly what `explain` gives it alone (see `forward`)."""
        return [o if isinstance(o, ClipFailure) else self.finish(*o) for o in self.forward(items)]

    def forward(
        self, items: Sequence[tuple[ClipTask, np.ndarray]]
    ) -> list[tuple[ClipTask, np.ndarray, Run] | ClipFailure]:
        """The runs of several clips (one batched forward where the model's batch is
        dynamic), each exactly what the clip's own run gives; `finish` makes their results.

        That is checked, not assumed: the first batch is also run clip by clip, and unless
        every run matches bit for bit (a graph that fixes its batch, or a kernel whose
        results depend on it) batching is off for this worker. A batch holding a bad clip
        is redone clip by clip, so the error is that clip's alone.
        """
        ex = self.explainer_for(items[0][1])
        depth, full = self.depth, self.full(ex)
        if len(items) == 1 or not ex.batchable or self.batching is False:
            return [self._run(ex, task, clip) for task, clip in items]
        try:
            runs = ex.run_many([clip for _, clip in items], depth=depth, full=full)
            if self.batching is None:  # the first batch: checked against single runs
                alone = [ex.run(clip, depth=depth, full=full) for _, clip in items]
                self.batching = all(map(_same_run, runs, alone))
                if not self.batching:
                    log.info("batched forwards differ from single ones here: clips run alone")
                    runs = alone
        except CfpError:
            return [self._run(ex, task, clip) for task, clip in items]
        return [(task, clip, run) for (task, clip), run in zip(items, runs)]

    def finish(self, task: ClipTask, clip: np.ndarray, run: Run) -> Outcome:
        """A clip's result from its run (its pyramid, any faithfulness check); a user error
        on this clip is reported, not raised. Safe beside the next clip's `forward`."""
        try:
            return self._result(self.explainer_for(clip), task, clip, run)
        except CfpError as exc:
            return ClipFailure(task.id, str(exc))

    def _run(
        self, ex: Explainer, task: ClipTask, clip: np.ndarray
    ) -> tuple[ClipTask, np.ndarray, Run] | ClipFailure:
        try:
            return task, clip, ex.run(clip, depth=self.depth, full=self.full(ex))
        except CfpError as exc:
            return ClipFailure(task.id, str(exc))

    def _result(self, ex: Explainer, task: ClipTask, clip: np.ndarray, run: Run) -> ClipResult:
        opts = self.spec.options
        full = opts.clip_pyramids == "full"  # the links are expanded anyway to write them
        pyr = ex.pyramid(
            run, opts.pyramid(opts.label_for(task)), class_names=self.names, count_links=not full
        )
        faith = tube = None
        if opts.faithfulness:
            f = faithfulness.check(ex, clip, pyr, draws=opts.faithfulness)
            faith = json.dumps(f.to_dict()) if f is not None else None
        if opts.class_tube is not None:
            size = self.input().clip_size(clip)
            tube = classtube.class_tube(ex, run, pyr, size, opts.class_tube)
        return ClipResult(
            task.id, task.path, int(np.argmax(run.logits)), task.label, pyr.label, pyr.score,
            None if full else pyr.n_links, Nodes.of(pyr), pyr if full else None, faith, tube,
        )  # fmt: skip

    def __call__(self, task: ClipTask) -> Outcome:
        """Decode + explain; a user error on this clip is reported, not raised."""
        try:
            return self.explain(task, self.decode(task))
        except CfpError as exc:
            return ClipFailure(task.id, str(exc))

    def explainer_for(self, clip: np.ndarray) -> Explainer:
        if self.explainer is None:
            s = self.spec
            self.explainer = Explainer(
                self.loaded, clip_shape=tuple(clip.shape), output=s.output, device=s.device,
                threads=s.threads,
            )  # fmt: skip
        return self.explainer


def _same(a: Any, b: Any) -> bool:
    return bool(a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b))


def _same_run(a: Run, b: Run) -> bool:
    """Bit for bit: a pyramid is a function of its run, so equal runs give equal pyramids."""
    return (
        _same(a.logits, b.logits)
        and _same(a.features, b.features)
        and a.pooled.keys() == b.pooled.keys()
        and all(_same(to_numpy(a.pooled[k]), to_numpy(b.pooled[k])) for k in a.pooled)
        and a.full.keys() == b.full.keys()
        and all(_same(to_numpy(a.full[k]), to_numpy(b.full[k])) for k in a.full)
    )


# --------------------------------------------------------------------------- the output folder


def clip_dir(out: Path, cid: str) -> Path:
    return out / "clips" / cid


def is_done(out: Path, cid: str) -> bool:
    """A clip is done when its folder holds a readable ``clip.json`` and files of the sizes
    it records (folders appear whole: staged, then renamed). A cheap check, by ``stat``;
    ``read_clip`` checks the hashes."""
    folder = clip_dir(out, cid)
    try:
        meta = json.loads((folder / "clip.json").read_bytes())
        files = meta["files"]
        return NODES in files and all(
            (folder / name).stat().st_size == files[name]["bytes"] for name in files
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


class _Hashing:
    """A binary file that hashes what passes through it (a 100 MB pyramid.json hashed as
    it is written, not read back)."""

    def __init__(self, fh: BinaryIO) -> None:
        self.fh, self.sha, self.size = fh, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.fh.write(data)

    def record(self) -> dict[str, Any]:
        return {"bytes": self.size, "sha256": self.sha.hexdigest()}


def write_clip(out: Path, result: ClipResult) -> None:
    """Write one clip's folder atomically: ``nodes.npz``, ``pyramid.json`` if kept, any
    ``faithfulness.json`` and ``class_tube.npy``, then ``clip.json`` recording every file's
    size and sha256."""
    with staged_dir(clip_dir(out, result.id), overwrite=True, mark={"clip": result.id}) as tmp:
        files = {}
        for name, body in (
            (NODES, result.nodes.to_bytes()),
            ("pyramid.json", result.pyramid),
            ("faithfulness.json", result.faithfulness_json),
            ("class_tube.npy", result.class_tube),
        ):
            if body is None:
                continue
            with (tmp / name).open("wb") as fh:
                h = _Hashing(fh)
                if isinstance(body, Pyramid):
                    body.write_json(h)  # type: ignore[arg-type]
                elif isinstance(body, np.ndarray):
                    np.save(h, body, allow_pickle=False)  # type: ignore[arg-type]
                else:
                    h.write(body.encode() if isinstance(body, str) else body)
            files[name] = h.record()
        links = result.links
        if links is None and isinstance(result.pyramid, Pyramid):
            links = result.pyramid.n_links  # its steps' kept pairs: cached by the writing
        meta = {
            "clip": result.id, "source": result.source, "predicted": result.predicted,
            "true_label": result.true_label, "label": result.label, "score": result.score,
            "links": links, "files": files,
        }  # fmt: skip
        (tmp / "clip.json").write_text(json.dumps(meta))


def prepare_out(out: Path, manifest: dict[str, Any], *, overwrite: bool) -> None:
    """Create the folder, or check that an existing one holds a run with the same options.

    Raises:
        OutputError: a folder that is not a batch output, or one made with other options,
            without --overwrite.
    """
    mpath = out / MANIFEST
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {str(out)!r} is a file; choose a folder")
    if overwrite and out.exists():
        if not mpath.is_file():
            raise OutputError(
                f"--out {str(out)!r} is not a cfp batch folder (no {MANIFEST}); --overwrite "
                "replaces only cfp's own results: move it or choose another --out"
            )
        shutil.rmtree(out)
    if out.is_dir() and any(out.iterdir()):
        if not mpath.is_file():
            raise OutputError(
                f"--out {str(out)!r} exists and is not a cfp batch folder; pass --overwrite to replace it"
            )
        try:
            old = json.loads(mpath.read_text())
        except (OSError, ValueError):
            raise OutputError(
                f"{str(mpath)!r} is damaged (not readable JSON); pass --overwrite to start the "
                "batch again"
            ) from None
        if old != manifest:
            diff = sorted(k for k in {*old, *manifest} if old.get(k) != manifest.get(k))
            raise OutputError(
                f"--out {str(out)!r} holds a run with other {', '.join(diff)}; "
                "pass --overwrite to start again, or use the same options to resume"
            )
    (out / "clips").mkdir(parents=True, exist_ok=True)
    _remove_stale(out / "clips")
    write_file(mpath, lambda p: p.write_text(json.dumps(manifest)), overwrite=True)


def _remove_stale(folder: Path) -> None:
    """Staging folders left by a killed run (``.name.xxx.tmp``) are garbage."""
    for p in folder.glob(".*.tmp"):
        shutil.rmtree(p, ignore_errors=True)


# --------------------------------------------------------------------------- aggregation


class ClassAggregate:
    """Running sums over one class's clips, one slot per kernel id (flat in the clip count)."""

    def __init__(self, n_kernels: int) -> None:
        self.clips = 0
        self.count = np.zeros(n_kernels, dtype=np.int64)
        self.relevance = np.zeros(n_kernels, dtype=np.float64)
        self.depth = np.full(n_kernels, np.iinfo(np.int64).max, dtype=np.int64)

    def add(self, kernels: np.ndarray, depths: np.ndarray, relevance: np.ndarray) -> None:
        """One clip's pyramid (kernel ids are unique within a pyramid)."""
        self.clips += 1
        self.count[kernels] += 1
        self.relevance[kernels] += relevance
        self.depth[kernels] = np.minimum(self.depth[kernels], depths)


class Aggregates:
    """Class aggregates keyed by explained label, created when a class is first seen."""

    def __init__(self, space: KernelSpace) -> None:
        self.space = space
        self.classes: dict[int, ClassAggregate] = {}

    def add(self, label: int, nodes: Nodes) -> None:
        agg = self.classes.setdefault(int(label), ClassAggregate(self.space.size))
        agg.add(nodes.kernel_ids(self.space), nodes.depth.astype(np.int64), nodes.relevance)


def class_pyramid(
    agg: ClassAggregate,
    space: KernelSpace,
    *,
    label: int,
    label_name: str | None,
    model: str,
    options: BatchOptions,
) -> dict[str, Any]:
    """The class pyramid object; nodes in (depth, layer, channel) order like a clip's."""
    kids = np.flatnonzero(agg.count > 0)
    kids = kids[np.argsort(agg.depth[kids], kind="stable")]
    layer, channel = space.split(kids)
    nodes = [
        {
            "id": i,
            "layer": space.layers[la],
            "channel": ch,
            "depth": d,
            "fraction": c / agg.clips,
            "relevance": r / c,
        }
        for i, (la, ch, d, c, r) in enumerate(
            zip(
                layer.tolist(),
                channel.tolist(),
                agg.depth[kids].tolist(),
                agg.count[kids].tolist(),
                agg.relevance[kids].tolist(),
            )
        )
    ]
    return {
        "model": model, "label": label, "label_name": label_name, "clips": agg.clips,
        "theta": options.theta, "depth": options.depth, "head_mode": options.head_mode,
        "top_n": options.top_n, "nodes": nodes,
    }  # fmt: skip


# --------------------------------------------------------------------------- summary


@dataclass(frozen=True)
class BatchSummary:
    """What a run did: clips done now, skipped (already done), failed, and the files."""

    done: int
    skipped: int
    failed: tuple[ClipFailure, ...]
    total: int
    classes: tuple[int, ...]
    summary_csv: Path


def summary_header(depth: int) -> list[str]:
    kernels = [f"kernels_d{d}" for d in range(depth)]
    return ["clip", "predicted", "true_label", "label", "score", *kernels, "links"]


def summary_row(meta: dict[str, Any], nodes: Nodes, depth: int) -> list[Any]:
    """One CSV row: labels, the explained class's score, kernels per depth, links."""
    per_depth = np.bincount(nodes.depth.astype(np.int64), minlength=depth)[:depth].tolist()
    true = meta["true_label"]
    return [
        meta["clip"], meta["predicted"], "" if true is None else true, meta["label"],
        repr(float(meta["score"])), *per_depth, meta["links"],
    ]  # fmt: skip


def read_clip(out: Path, cid: str) -> tuple[dict[str, Any], Nodes] | None:
    """A finished clip's metadata and kernels, or None when its files are damaged (any
    file not the bytes ``clip.json`` recorded, or unreadable)."""
    folder = clip_dir(out, cid)
    try:
        meta = json.loads((folder / "clip.json").read_bytes())
        nodes = None
        for name, want in meta["files"].items():
            sha = hashlib.sha256()
            with (folder / name).open("rb") as fh:
                if name == NODES:
                    data = fh.read()
                    sha.update(data)
                    nodes = Nodes.from_bytes(data)
                else:
                    sha = hashlib.file_digest(fh, "sha256")
            if sha.hexdigest() != want["sha256"]:
                return None
        return (meta, nodes) if nodes is not None else None
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile):
        return None


def finalize(
    out: Path,
    tasks: Sequence[ClipTask],
    space: KernelSpace,
    *,
    options: BatchOptions,
    model: str,
    names: Sequence[str] | None,
) -> tuple[int, ...] | list[ClipTask]:
    """Rebuild summary.csv and classes/ from the per-clip files, streaming in task order;
    returns the classes seen, or, writing nothing, the finished clips found damaged."""
    aggs = Aggregates(space)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(summary_header(options.depth))
    damaged = []
    for task in tasks:
        if not is_done(out, task.id):
            continue
        found = read_clip(out, task.id)
        if found is None:
            damaged.append(task)
            continue
        meta, nodes = found
        try:
            aggs.add(meta["label"], nodes)
        except (ValueError, IndexError):  # another model's layers, or ids out of range
            damaged.append(task)
            continue
        writer.writerow(summary_row(meta, nodes, options.depth))
    if damaged:
        return damaged
    write_file(out / "summary.csv", lambda p: p.write_text(text.getvalue()), overwrite=True)
    write_classes(out, aggs, options=options, model=model, names=names)
    return tuple(sorted(aggs.classes))


def write_classes(
    out: Path,
    aggs: Aggregates,
    *,
    options: BatchOptions,
    model: str,
    names: Sequence[str] | None,
) -> None:
    """``classes/<label>/class_pyramid.json`` and ``report.html``, the folder replaced whole."""
    with staged_dir(out / "classes", overwrite=True, mark={"classes": True}) as tmp:
        for label in sorted(aggs.classes):
            name = names[label] if names and 0 <= label < len(names) else None
            doc = class_pyramid(
                aggs.classes[label], aggs.space, label=label, label_name=name, model=model,
                options=options,
            )  # fmt: skip
            folder = tmp / str(label)
            folder.mkdir()
            (folder / "class_pyramid.json").write_text(json.dumps(doc, allow_nan=False))
            (folder / "report.html").write_text(class_report(doc))


_CLASS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>{{ title }}</title>
<style>body{font:14px system-ui,sans-serif;margin:2em}table{border-collapse:collapse}
td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:right}td.l{text-align:left}
.bar{display:inline-block;height:10px;background:#3b7dd8}</style></head>
<body><h1>{{ title }}</h1>
<p>{{ doc.clips }} clips; theta {{ doc.theta }}, depth {{ doc.depth }},
head mode {{ doc.head_mode }}{% if doc.top_n %}, top-n {{ doc.top_n }}{% endif %}.
Share: fraction of the class's clips whose pyramid holds the kernel;
relevance: its mean over those clips.</p>
{% for d, rows in depths %}<h2>Depth {{ d }} ({{ rows|length }} kernels)</h2>
<table><tr><th>layer</th><th>channel</th><th>share</th><th></th><th>relevance</th></tr>
{% for n in rows %}<tr><td class="l">{{ n.layer }}</td><td>{{ n.channel }}</td>
<td>{{ "%.3f"|format(n.fraction) }}</td>
<td class="l"><span class="bar" style="width:{{ (n.fraction * 100)|round|int }}px"></span></td>
<td>{{ "%.3f"|format(n.relevance) }}</td></tr>
{% endfor %}</table>{% endfor %}
</body></html>
"""


def class_report(doc: dict[str, Any], limit: int = 200) -> str:
    """A self-contained, autoescaped page: per depth, the kernels most shared by the class."""
    import jinja2  # here, not at import: ``cfp explain`` loads this module with the parser

    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    by_depth: dict[int, list[dict[str, Any]]] = {}
    for n in doc["nodes"]:
        by_depth.setdefault(n["depth"], []).append(n)
    depths = [
        (d, sorted(rows, key=lambda n: (-n["fraction"], -n["relevance"], n["id"]))[:limit])
        for d, rows in sorted(by_depth.items())
    ]
    name = f" ({doc['label_name']})" if doc["label_name"] else ""
    title = f"{doc['model']}: class {doc['label']}{name}"
    return env.from_string(_CLASS_PAGE).render(title=title, doc=doc, depths=depths)


# --------------------------------------------------------------------------- the run


Progress = Callable[[int], Any]


def run_batch(
    spec: WorkerSpec,
    tasks: Sequence[ClipTask],
    out: str | Path,
    *,
    engine: Any,
    overwrite: bool = False,
    progress: Callable[[int], Any] | None = None,
) -> BatchSummary:
    """Explain every task not done yet, then rebuild the summary and class pyramids.

    Args:
        engine: an object with ``results(spec, tasks, first) -> Iterator[Outcome]``
            (``cfp_onnx.engines.LocalEngine`` or ``RayEngine``).
        progress: called with the total of clips to do, returns ``update(n)``-able bar.
    """
    spec.options.check()
    out = Path(out)
    guard(out, [spec.model, *(t.path for t in tasks)])  # never a folder of inputs or the model
    first = ClipWorker(spec)
    ex = first.explainer_for(first.decode(tasks[0]))
    _check_labels(spec.options, tasks, ex.classes)
    prepare_out(out, manifest(spec, ex), overwrite=overwrite)
    todo = [t for t in tasks if not is_done(out, t.id)]
    damaged = sum(clip_dir(out, t.id).exists() for t in todo)  # a folder, but not intact
    if damaged:
        log.warning("%d finished clips are damaged and will be redone", damaged)
    failed = _explain_into(out, spec, todo, engine, first, progress)

    def final() -> tuple[int, ...] | list[ClipTask]:
        space, names = ex.provenance.space, first.names
        return finalize(out, tasks, space, options=spec.options, model=ex.model_name, names=names)

    classes = final()
    if isinstance(classes, list):  # changed since the run started: redo them, once
        log.warning("%d finished clips are damaged and will be redone", len(classes))
        failed += _explain_into(out, spec, classes, engine, first, progress)
        todo += classes
        classes = final()
        if isinstance(classes, list):
            raise OutputError(
                f"clips keep changing under {str(out)!r} while cfp batch runs (e.g. "
                f"{classes[0].id!r}); stop whatever writes there, then run again"
            )
    return BatchSummary(
        len(todo) - len(failed), len(tasks) - len(todo), tuple(failed), len(tasks), classes,
        out / "summary.csv",
    )  # fmt: skip


def _explain_into(
    out: Path,
    spec: WorkerSpec,
    todo: list[ClipTask],
    engine: Any,
    first: ClipWorker,
    progress: Callable[[int], Any] | None,
) -> list[ClipFailure]:
    """Explain `todo` through `engine`, writing each clip as it comes; returns the failures.

    Clips are written on one thread while the next are explained; at most `WRITES_AHEAD`
    wait, so memory stays bounded. Every write is a staged folder renamed whole, and any
    way out of here (a failure, Ctrl-C) first waits for the writes under way, so a clip
    is either finished or absent, never half written; a write's error is raised here.
    """
    bar = progress(len(todo)) if progress else None
    failed = []
    pending: deque[Future[None]] = deque()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cfp-batch-write") as writer:
        try:
            for outcome in engine.results(spec, todo, first):
                if isinstance(outcome, ClipFailure):
                    log.warning("clip %s: %s", outcome.id, outcome.message)
                    failed.append(outcome)
                else:
                    pending.append(writer.submit(write_clip, out, outcome))
                while pending and (pending[0].done() or len(pending) > WRITES_AHEAD):
                    pending.popleft().result()
                if bar is not None:
                    bar.update(1)
            while pending:
                pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()  # not started: the clip stays to do; started: it finishes whole
    if bar is not None and hasattr(bar, "close"):
        bar.close()
    return failed


WRITES_AHEAD = 2


def manifest(spec: WorkerSpec, ex: Explainer) -> dict[str, Any]:
    """What must match for a resumed run to continue an earlier one: the model by content
    (its file's sha256, weights stored inline included), its input and every option."""
    doc = {
        "model": ex.model_name,
        "model_sha256": file_digest(ex.loaded.path).result(),
        "input_shape": list(ex.input_shape),
        **spec.options.to_dict(),
        "decoding": {k: getattr(spec.decoding, k) for k in spec.decoding.__slots__},
    }
    return json.loads(json.dumps(doc))  # as it reads back from batch.json (tuples as lists)


def _check_labels(options: BatchOptions, tasks: Sequence[ClipTask], classes: int) -> None:
    if options.label == "true":
        missing = [t.id for t in tasks if t.label is None]
        if missing:
            raise OptionError(
                f"--label true needs a label for every clip (a CSV list with a 'label' column); "
                f"{len(missing)} have none, e.g. {missing[0]!r}"
            )
    labels = [t.label for t in tasks if t.label is not None]
    if not isinstance(options.label, str):
        labels.append(int(options.label))
    bad = [la for la in labels if not 0 <= la < classes]
    if bad:
        raise OptionError(f"label {bad[0]} is out of range: the model has {classes} classes")
