"""Compare two models on the same clips: predictions, pyramids, tubes, agreement figures.

Each model gets its own preprocessing (its metadata says its layout, size and
normalisation; --frames/--size/--mean/--std override both). A .npy clip is taken as
model A's input and transposed for B when their layouts differ. Writes, per clip,
report.html (side by side, tubes playing frame by frame in sync), pyramid_a.json,
pyramid_b.json and agreement.json: class-tube Spearman correlation and top-10% IoU,
and the pyramids' Jaccard overlap per depth when the architectures match (same conv
shapes in topological order, or --map FILE: a JSON object from A's conv node names
to B's). One clip writes into DIR; several into DIR/clip_000/, ...
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from cfp_onnx import classtube, tubes
from cfp_onnx import compare as cmp
from cfp_onnx.api import Explainer, Run, check_options, load_array
from cfp_onnx.cli.common import _floats, _pair, add_pyramid_args
from cfp_onnx.cli.explain import (
    add_report_args,
    check_view_args,
    checked_names,
    clip_layout,
    print_prediction,
    quiet_decoders,
    view_options,
)
from cfp_onnx.errors import ClipError, OptionError
from cfp_onnx.loading import LoadedModel, load_model
from cfp_onnx.modelinfo import preprocess_for
from cfp_onnx.outputs import check_target, staged_dir
from cfp_onnx.pyramid import Pyramid
from cfp_onnx.report import ModelView, build_view, display, render, write_report
from cfp_onnx.video import SAMPLINGS, Clip, load_clip, tensor_to_frames


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_a", help="first ONNX model")
    p.add_argument("model_b", help="second ONNX model")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to compute")
    g = p.add_argument_group("clips")
    g.add_argument(
        "--clip", action="append", required=True, help="video, frame folder or .npy (repeatable)"
    )
    g.add_argument("--frames", type=int, help="clip length (default: each model's)")
    g.add_argument("--size", type=_pair, metavar="H,W", help="frame size (default: each model's)")
    g.add_argument("--mean", type=_floats, metavar="R,G,B", help="normalisation mean, on [0,1]")
    g.add_argument("--std", type=_floats, metavar="R,G,B", help="normalisation std, on [0,1]")
    g.add_argument("--sampling", choices=SAMPLINGS, default="uniform", help="frame sampling")
    g.add_argument("--map", metavar="FILE", help="JSON {conv of A: conv of B} to pair layers")
    add_pyramid_args(p)
    o = p.add_argument_group("output")
    o.add_argument("--out", default="cfp_compare", help="output folder (default ./cfp_compare)")
    o.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    add_report_args(o)


@dataclass
class _Side:
    """One model: loaded once, an Explainer per clip shape."""

    key: str
    loaded: LoadedModel
    device: str
    names: tuple[str, ...] | None = None
    explainers: dict[tuple[int, ...], Explainer] = field(default_factory=dict)

    def explainer(self, shape: tuple[int, ...]) -> Explainer:
        if shape not in self.explainers:
            ex = Explainer(self.loaded, clip_shape=shape, device=self.device)
            self.names = checked_names(self.loaded, ex)
            self.explainers[shape] = ex
        return self.explainers[shape]


def run(args: argparse.Namespace) -> int:
    quiet_decoders()
    check_options(depth=args.depth, theta=args.theta, top_n=args.top_n, head_mode=args.head_mode)
    check_view_args(args)
    check_target(args.out, overwrite=args.overwrite)
    mapping = read_mapping(args.map)
    sides = [
        _Side(k, load_model(m), args.device) for k, m in (("a", args.model_a), ("b", args.model_b))
    ]
    several = len(args.clip) > 1
    results = []
    with staged_dir(args.out, overwrite=args.overwrite) as tmp:
        for i, path in enumerate(args.clip):
            folder = tmp / f"clip_{i:03d}" if several else tmp
            folder.mkdir(exist_ok=True)
            print(f"clip {path}")
            results.append(compare_clip(sides, path, folder, args, mapping))
        if several:
            (tmp / "agreement.json").write_text(json.dumps(results, allow_nan=False))
    out = Path(args.out)
    for i in range(len(args.clip)):
        print(f"report: {(out / f'clip_{i:03d}' if several else out) / 'report.html'}")
    return 0


def read_mapping(path: str | None) -> dict[str, str] | None:
    """The --map file: a JSON object of conv node names, A's to B's."""
    if path is None:
        return None
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise OptionError(f"--map {path!r}: not a readable JSON file ({exc})") from None
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in data.items()
    ):
        raise OptionError(f"--map {path!r}: expected a JSON object of layer names to layer names")
    return data


def compare_clip(
    sides: list[_Side],
    path: str,
    folder: Path,
    args: argparse.Namespace,
    mapping: dict[str, str] | None,
) -> dict[str, Any]:
    """Explain one clip with both models, write both pyramids, the report and the figures."""
    clips = clips_for(sides, path, args)
    explained = [explain_side(s, c, args) for s, c in zip(sides, clips)]
    figures = cmp.agreement(
        *[(ex, pyr, r, c.frames.shape[:3]) for (ex, pyr, r), c in zip(explained, clips)],
        mapping=mapping,
    )
    for side, (_, pyr, _) in zip(sides, explained):
        with (folder / f"pyramid_{side.key}.json").open("wb") as f:
            pyr.write_json(f)
    data = {"clip": str(path), **figures.to_dict()}
    (folder / "agreement.json").write_text(json.dumps(data, allow_nan=False))
    for name, value in figures.rows():
        print(f"  {name}: {value}")
    if not (args.no_report and args.no_tubes):
        views = [side_view(s, e, c, folder, args) for s, e, c in zip(sides, explained, clips)]
        if not args.no_report:
            title = f"{views[0].model} vs {views[1].model}"
            html = render(views, title=title, agreement=figures.rows(), fps=args.fps)
            write_report(folder / "report.html", html)
    return data


def clips_for(sides: list[_Side], path: str, args: argparse.Namespace) -> list[Clip]:
    """The clip preprocessed for each model (its own layout, size and normalisation)."""
    if Path(path).suffix.lower() == ".npy":
        return npy_clips(sides, path, args)
    return [
        load_clip(
            path,
            preprocess_for(
                side.loaded, frames=args.frames, size=args.size, mean=args.mean, std=args.std
            ),
            sampling=args.sampling,
        )
        for side in sides
    ]


def npy_clips(sides: list[_Side], path: str, args: argparse.Namespace) -> list[Clip]:
    """A .npy is model A's input as is; B gets it transposed if its layout differs."""
    arr = np.asarray(load_array(path))
    if arr.ndim not in (4, 5):
        raise ClipError(f"{path}: array has shape {arr.shape}; a clip is rank 5 or 4")
    arr = arr[None] if arr.ndim == 4 else arr
    layouts = [clip_layout(arr, s.loaded, None) for s in sides]
    out = []
    for layout in layouts:
        x = arr if layout == layouts[0] else _relayout(arr, layouts[0])
        frames = tensor_to_frames(x[0], layout)  # type: ignore[arg-type]
        out.append(Clip(x, frames, np.arange(frames.shape[0], dtype=np.int64), Path(path)))
    return out


def _relayout(x: np.ndarray, source: str) -> np.ndarray:
    perm = (0, 2, 3, 4, 1) if source == "NCDHW" else (0, 4, 1, 2, 3)
    return np.ascontiguousarray(x.transpose(perm))


def explain_side(
    side: _Side, clip: Clip, args: argparse.Namespace
) -> tuple[Explainer, Pyramid, Run]:
    ex = side.explainer(tuple(clip.tensor.shape))
    run = ex.run(clip.tensor, depth=args.depth, full=tubes.map_tensors(ex, args.depth))
    pyr = ex.pyramid(
        run, label=args.label, depth=args.depth, theta=args.theta, top_n=args.top_n,
        head_mode=args.head_mode, class_names=side.names,
    )  # fmt: skip
    print(f"  model {side.key.upper()} ({pyr.model}):")
    print_prediction(pyr, side.names)
    return ex, pyr, run


def side_view(
    side: _Side,
    explained: tuple[Explainer, Pyramid, Run],
    clip: Clip,
    folder: Path,
    args: argparse.Namespace,
) -> ModelView:
    """One side of the report, with its class tube (for display, at its own clip size)."""
    ex, pyr, run = explained
    layout = clip_layout(clip.tensor, side.loaded, None)
    options = view_options(args, folder / f"tubes_{side.key}")
    view = build_view(
        ex, pyr, run, clip.tensor, clip.frames, time_axis=2 if layout == "NCDHW" else 1,
        source=f"{clip.source.name} ({layout})", class_names=side.names, options=options,
    )  # fmt: skip
    size = clip.frames.shape[:3]
    if args.class_tube:
        tube = classtube.class_tube(ex, run, pyr, size, args.class_tube)
        caption = classtube.CAPTIONS[args.class_tube]
    else:
        tube, caption = cmp.class_tube(ex, pyr, run, size), view.class_tube_caption
    tube = tubes.normalise(np, tube[None])[0]
    frames = tubes.encode_frames(display(tubes.overlay(clip.frames, tube), options.max_side))
    return replace(view, model=f"{side.key.upper()}: {pyr.model}", class_tube=tuple(frames),
                   class_tube_caption=caption)  # fmt: skip
