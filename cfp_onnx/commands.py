"""What ``cfp explain``, ``cfp compare`` and ``cfp demo`` do, as Python functions a notebook can call too.

Each loads the model once, reads clips through ``ModelInput``, explains them through
``cfp_onnx.explanation`` and writes through ``cfp_onnx.outputs`` into a staged folder, so
the result appears whole or not at all. Printing is the caller's: these return what they
explained, and report progress through `progress` (a tqdm-like factory, or None).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from cfp_onnx import outputs
from cfp_onnx.api import Explainer
from cfp_onnx.compare import Agreement
from cfp_onnx.digest import file_digest
from cfp_onnx.errors import ModelError, OutputError
from cfp_onnx.explanation import Explanation, busy_after_pyramid, explain, prepare
from cfp_onnx.loading import LoadedModel, load_model, resolve_input_shape, static_input
from cfp_onnx.modelinfo import class_names
from cfp_onnx.modelinput import ModelInput
from cfp_onnx.options import ClipOptions, PyramidOptions, ViewOptions, as_options
from cfp_onnx.resources import MemoryLimit
from cfp_onnx.video import Clip

log = logging.getLogger(__name__)

Progress = Callable[..., Any]

DECODE_SWITCH_S = 2e-4
"""The interpreter's thread switch interval while a clip decodes beside the Explainer's
graph analysis (restored after): the decoder waits less for the GIL after each frame."""


@dataclass(frozen=True)
class Explained:
    """One explained clip (or window) and the folder its files are in.

    For windows the explanation is None once written (``on_result`` sees it whole): a long
    video's maps and links are not kept."""

    explanation: Explanation | None
    folder: Path


def checked_names(loaded: LoadedModel, explainer: Explainer) -> tuple[str, ...] | None:
    """The model's class names, refused when their count is not the classifier's."""
    names = class_names(loaded)
    if names is not None and len(names) != explainer.classes:
        raise ModelError(
            f"the model's metadata names {len(names)} classes but its classifier has {explainer.classes}"
        )
    return names


def explain_to(
    model: str | os.PathLike[str] | LoadedModel,
    clip: Any,
    out: str | os.PathLike[str],
    *,
    pyramid: PyramidOptions | None = None,
    clip_options: ClipOptions | None = None,
    view: ViewOptions | None = None,
    overwrite: bool = False,
    output: str | None = None,
    device: str = "cpu",
    max_memory: str | int | None = None,
    on_result: Callable[[Explanation, Path], None] | None = None,
    progress: Progress | None = None,
    extra: Callable[[Path], None] | None = None,
) -> list[Explained]:
    """Explain a clip (or, with ``clip_options.window``, each window of a video) into `out`.

    One clip writes into `out`; windows into ``out/window_000/`` ... plus ``out/index.html``
    (every window, and the predicted class and score over time). `on_result` is called
    as each is written (the CLI prints there); `extra(folder)` may add files before the
    folder is swapped in.
    """
    opts, copts, vopts = (
        as_options(pyramid, PyramidOptions, "pyramid"),
        as_options(clip_options, ClipOptions, "clip_options"),
        as_options(view, ViewOptions, "view"),
    )
    protect = [
        p for p in (getattr(model, "path", model), clip) if isinstance(p, (str, os.PathLike))
    ]
    outputs.check_target(out, overwrite=overwrite, protect=protect)
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    mark = _marker(loaded)
    model_input, limit = ModelInput.of(loaded, copts), MemoryLimit.of(max_memory)
    windowed = copts.window is not None

    def make(shape: tuple[int, ...] | None) -> Explainer:
        ex = Explainer(
            loaded, clip_shape=shape, output=output, device=device, max_memory=max_memory
        )
        prepare(ex, opts, vopts)
        return ex

    explainer: Explainer | None = None
    if windowed:
        count, clips = model_input.windows(clip, loaded, limit)
    elif static_input(loaded) and not isinstance(clip, (Clip, np.ndarray)):
        explainer, first = _while_decoding(make, lambda: model_input.clip(clip, loaded, limit))
        resolve_input_shape(loaded.proto, tuple(first.tensor.shape))  # the clip must fit
        count, clips = 1, iter([first])
    else:
        count, clips = 1, iter([model_input.clip(clip, loaded, limit)])
    done: list[Explained] = []
    rows: list[dict[str, Any]] = []
    with outputs.staged_dir(out, overwrite=overwrite, protect=protect, mark=mark) as tmp:
        names = checked_names(loaded, explainer) if explainer is not None else None
        bar = (
            progress(total=count, desc="windows", unit="window") if windowed and progress else None
        )
        for i, c in enumerate(clips):
            if explainer is None:
                explainer = make(tuple(c.tensor.shape))
                names = checked_names(loaded, explainer)
            folder = tmp / f"window_{i:03d}" if windowed else tmp
            folder.mkdir(exist_ok=True)
            # pyramid.json written meanwhile, on its own threads if nothing else runs then
            with outputs.early_pyramid(folder, parallel=not busy_after_pyramid(vopts)) as early:
                e = explain(
                    explainer,
                    c,
                    model_input,
                    opts,
                    vopts,
                    class_names=names,
                    on_pyramid=early.start,
                )
                outputs.write(e, folder, early=early)
            final = Path(out) / folder.relative_to(tmp)
            if on_result:
                on_result(e, final)
            if windowed:  # keep a row, not the window's maps and links: memory stays flat
                rows.append(_window_row(e, final))
                done.append(Explained(None, final))
            else:
                done.append(Explained(e, final))
            if bar is not None:
                bar.set_postfix_str(f"window {i + 1} of {count}")
                bar.update(1)
            if windowed and i == 0 and count > 1:
                _check_disk(tmp, folder, count)
            del e
        if bar is not None:
            bar.close()
        if windowed:
            from cfp_onnx import report

            (tmp / "index.html").write_text(report.render_index(rows, title=loaded.name), "utf-8")
        if extra is not None:
            extra(tmp)
    return done


def _while_decoding(
    make: Callable[[None], Explainer], decode: Callable[[], Clip]
) -> tuple[Explainer, Clip]:
    """The Explainer (graph analysis, session) built while a thread decodes the clip.

    OpenCV releases the GIL while it decodes, so the two overlap. The decoder needs the GIL
    back after every frame, and the graph analysis is pure Python: at the interpreter's
    5 ms switch interval a 10 s clip took 0.17-0.30 s to decode beside it (0.05-0.08 s
    alone), so the interval is `DECODE_SWITCH_S` meanwhile. A bad clip is reported before
    a bad model, as when the clip is read first. The thread is always joined, Ctrl-C
    included: a thread left inside OpenCV at exit aborts the interpreter."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(min(interval, DECODE_SWITCH_S))
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cfp-decode") as pool:
            clip = pool.submit(decode)
            try:
                explainer = make(None)
            except Exception:  # not Ctrl-C: leaving the block joins the thread, then it goes on
                clip.result()  # raises the clip's error, if it has one
                raise
            return explainer, clip.result()
    finally:
        sys.setswitchinterval(interval)


def _marker(loaded: LoadedModel) -> Callable[[], dict[str, Any]]:
    """The output marker, its model hash computed on a thread meanwhile."""
    digest = file_digest(loaded.path)

    def mark() -> dict[str, Any]:
        return outputs.marker(model={"name": loaded.name, "sha256": digest.result()})

    return mark


def _window_row(e: Explanation, folder: Path) -> dict[str, Any]:
    p, c = e.pyramid, e.clip
    pred = int(np.argmax(p.logits))
    names = e.class_names
    return {
        "folder": folder.name,
        "first": int(c.indices[0]),
        "last": int(c.indices[-1]),
        "seconds": (float(c.indices[0]) / c.fps) if c.fps else None,
        "predicted": pred,
        "predicted_name": names[pred] if names else None,
        "label": p.label,
        "score": float(p.score),
        "kernels": len(p.node_layer),
    }


def _check_disk(tmp: Path, first: Path, count: int) -> None:
    """After the first window, refuse to go on when the rest would not fit on the disk."""
    used = sum(f.stat().st_size for f in first.rglob("*") if f.is_file())
    need = used * (count - 1)
    free = shutil.disk_usage(tmp).free
    if need > free:
        raise OutputError(
            f"{count} windows need about {need / 2**20:.0f} MiB more and the disk has "
            f"{free / 2**20:.0f} MiB free; use a larger --stride, --no-report or another --out"
        )


def demo_to(
    out: str | os.PathLike[str],
    *,
    seed: int = 0,
    pyramid: PyramidOptions | None = None,
    view: ViewOptions | None = None,
    overwrite: bool = False,
) -> Explanation:
    """The shipped model on a generated clip, with the clip as ``demo_clip.mp4`` beside it."""
    from cfp_onnx import demo
    from cfp_onnx.video import write_video

    loaded = load_model(demo.model_path())
    c: Clip = demo.clip(seed, loaded)

    def save_clip(folder: Path) -> None:
        write_video(folder / "demo_clip.mp4", c.frames, fps=c.fps or 8.0)

    x = explain_to(
        loaded, c, out, pyramid=pyramid, view=view, overwrite=overwrite,
        extra=save_clip, clip_options=ClipOptions(),
    )[0]  # fmt: skip
    assert x.explanation is not None  # one clip, not windows
    return x.explanation


@dataclass
class Side:
    """One model of a comparison: loaded once, an Explainer per clip shape."""

    key: str
    loaded: LoadedModel
    model_input: ModelInput
    device: str = "cpu"
    explainers: dict[tuple[int, ...], Explainer] = field(default_factory=dict)

    def explainer(self, shape: tuple[int, ...]) -> tuple[Explainer, tuple[str, ...] | None]:
        if shape not in self.explainers:
            self.explainers[shape] = Explainer(self.loaded, clip_shape=shape, device=self.device)
        ex = self.explainers[shape]
        return ex, checked_names(self.loaded, ex)


@dataclass(frozen=True)
class Compared:
    """Both explanations of one clip and their agreement figures."""

    clip: str
    explanations: tuple[Explanation, Explanation]
    agreement: Agreement
    folder: Path


def compare_to(
    model_a: str | os.PathLike[str],
    model_b: str | os.PathLike[str],
    clips: list[str],
    out: str | os.PathLike[str],
    *,
    pyramid: PyramidOptions | None = None,
    clip_options: ClipOptions | None = None,
    view: ViewOptions | None = None,
    mapping: dict[str, str] | None = None,
    overwrite: bool = False,
    device: str = "cpu",
    on_result: Callable[[Compared], None] | None = None,
) -> list[Compared]:
    """Explain each clip with both models into `out` (``out/clip_000/``... for several):
    ``pyramid_a.json``, ``pyramid_b.json``, ``agreement.json`` (``faithfulness_a.json``
    and ``_b`` with the faithfulness check) and a side-by-side report
    in which selecting a kernel selects its counterpart."""
    from cfp_onnx import compare, report

    opts = as_options(pyramid, PyramidOptions, "pyramid")
    copts = as_options(clip_options, ClipOptions, "clip_options")
    base = as_options(view, ViewOptions, "view")
    # The page's kernel tubes need every map (report and maps); compare writes no tube files.
    view = replace(base, class_tube=base.class_tube or "weighted", tube_files=())
    protect = [model_a, model_b, *clips]
    outputs.check_target(out, overwrite=overwrite, protect=protect)
    sides = []
    for key, path in (("a", model_a), ("b", model_b)):
        loaded = load_model(path)
        sides.append(Side(key, loaded, ModelInput.of(loaded, copts), device))
    several = len(clips) > 1
    done: list[Compared] = []
    matches: dict[tuple[int, int], compare.LayerMatch | None] = {}
    marks = [_marker(s.loaded) for s in sides]

    def mark() -> dict[str, Any]:
        return {**marks[0](), "models": [m()["model"] for m in marks]}

    with outputs.staged_dir(out, overwrite=overwrite, protect=protect, mark=mark) as tmp:
        for i, path in enumerate(clips):
            folder = tmp / f"clip_{i:03d}" if several else tmp
            folder.mkdir(exist_ok=True)
            pair = []
            for side, c in zip(sides, _side_clips(sides, path)):
                ex, names = side.explainer(tuple(c.tensor.shape))
                pair.append((ex, explain(ex, c, side.model_input, opts, view, class_names=names)))
            ids = (id(pair[0][0]), id(pair[1][0]))  # the sides keep their explainers alive
            if ids not in matches:
                matches[ids] = compare.match_layers(pair[0][0], pair[1][0], mapping)
            figures, twins = compare.agreement(pair[0], pair[1], matched=matches[ids])
            for side, (_, e) in zip(sides, pair):
                with (folder / f"pyramid_{side.key}.json").open("wb") as f:
                    e.pyramid.write_json(f)
                if e.faithfulness is not None:
                    doc_f = json.dumps(e.faithfulness.to_dict())
                    (folder / f"faithfulness_{side.key}.json").write_text(doc_f)
            doc = {"clip": str(path), **figures.to_dict()}
            (folder / "agreement.json").write_text(json.dumps(doc, allow_nan=False))
            explanations = (pair[0][1], pair[1][1])
            if view.report:
                title = f"{explanations[0].pyramid.model} vs {explanations[1].pyramid.model}"
                html = report.render(explanations, title=title, agreement=figures.rows(),
                                     counterparts=twins)  # fmt: skip
                (folder / "report.html").write_text(html, encoding="utf-8")
            done.append(
                Compared(str(path), explanations, figures, Path(out) / folder.relative_to(tmp))
            )
            if on_result:
                on_result(done[-1])
        if several:
            docs = [{"clip": x.clip, **x.agreement.to_dict()} for x in done]
            (tmp / "agreement.json").write_text(json.dumps(docs, allow_nan=False))
    return done


def _side_clips(sides: list[Side], path: str) -> list[Clip]:
    """The clip preprocessed for each model; a .npy is A's input, transposed for B if
    B's layout differs."""
    from cfp_onnx.video import TENSOR_EXTENSIONS

    if Path(path).suffix.lower() not in TENSOR_EXTENSIONS:
        return [s.model_input.clip(path, s.loaded) for s in sides]
    first = sides[0].model_input.clip(path, sides[0].loaded)
    out = [first]
    for s in sides[1:]:
        x = first.tensor
        if s.model_input.layout != sides[0].model_input.layout:
            perm = (0, 2, 3, 4, 1) if sides[0].model_input.layout == "NCDHW" else (0, 4, 1, 2, 3)
            x = np.ascontiguousarray(x.transpose(perm))
        c = s.model_input.clip(x, s.loaded)
        out.append(replace(c, source=first.source))
    return out
