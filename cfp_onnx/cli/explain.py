"""Explain one clip: the predicted class, its class feature pyramid, written to DIR.

Writes DIR/pyramid.json (SPEC §5); with --format reference also DIR/reference.json
(the paper's nested dict) and DIR/tree.json (its D3 page's {name, children} tree).
DIR/report.html (one offline file: clip, top classes, the pyramid as an interactive
graph, each shown kernel's saliency tube, temporal profile and motion/appearance
label) and DIR/tubes/ (strip PNG, GIF and stacked tube image per shown kernel) are
written unless --no-report / --no-tubes. With --window N [--stride S] a long video is
explained window by window, one pyramid per window in DIR/window_000/, ...
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np

from cfp_onnx import classtube, resources, tubes
from cfp_onnx.api import Explainer, Run, check_options
from cfp_onnx.cli.common import add_clip_args, add_model_args, add_pyramid_args, open_clip
from cfp_onnx.errors import CfpError, ModelError, OptionError
from cfp_onnx.loading import LoadedModel, declared_shape, graph_input, load_model
from cfp_onnx.modelinfo import class_names, guess_layout, preprocess_for
from cfp_onnx.outputs import check_target, staged_dir
from cfp_onnx.pyramid import Pyramid
from cfp_onnx.report import ViewOptions, build_view, display, render, write_report
from cfp_onnx.video import Clip, load_windows, tensor_to_frames

FORMATS = ("json", "reference")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    add_clip_args(p)
    add_pyramid_args(p)
    g = p.add_argument_group("output")
    g.add_argument("--out", default="cfp_out", help="output folder (default ./cfp_out)")
    g.add_argument("--format", choices=FORMATS, default="json", help="also write the paper's tree")
    g.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    add_report_args(g)
    w = p.add_argument_group("windows")
    w.add_argument(
        "--window", type=int, metavar="N", help="explain N-frame windows of a long video"
    )
    w.add_argument("--stride", type=int, metavar="S", help="frames between windows (default N)")
    p.add_argument(
        "--max-memory", metavar="SIZE",
        help="refuse a run estimated above SIZE (2G, 512M, bytes, or off; default 80%% of the "
        "available memory)",
    )  # fmt: skip


def add_report_args(g: argparse._ArgumentGroup) -> None:
    """Report and tube options, shared with ``cfp demo``."""
    g.add_argument("--no-report", action="store_true", help="do not write report.html")
    g.add_argument("--no-tubes", action="store_true", help="do not write tubes/ pictures")
    g.add_argument(
        "--per-depth", type=int, default=64, metavar="K",
        help="kernels shown (graph, tubes) per depth, the most relevant (default 64)",
    )  # fmt: skip
    g.add_argument("--weighted", action="store_true", help="tube maps weighted by relevance r'")
    g.add_argument(
        "--class-tube", choices=classtube.KINDS, metavar="KIND",
        help="also draw the class tube: 'weighted' (relevance-weighted depth-0 maps) or "
        "'contrast' (minus the mean over all classes; recommended with --top-n 5 --theta 0)",
    )  # fmt: skip
    g.add_argument("--no-shuffle", action="store_true", help="skip the frame-shuffle test")
    g.add_argument("--fps", type=float, default=8.0, help="tube playback speed (default 8)")


def quiet_decoders() -> None:
    """Silence FFmpeg's own stderr log (read at the first VideoCapture): a bad video must
    give our one-line error, not FFmpeg's lines before it. An explicit setting wins."""
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")


def run(args: argparse.Namespace) -> int:
    quiet_decoders()
    check_options(depth=args.depth, theta=args.theta, top_n=args.top_n, head_mode=args.head_mode)
    check_view_args(args)
    resources.parse_size(args.max_memory)  # a bad size fails before any work
    check_target(args.out, overwrite=args.overwrite)
    loaded = load_model(args.model)
    clips, layout = load_clips(args, loaded)
    explainer = Explainer(
        loaded, clip_shape=tuple(clips[0].tensor.shape), output=args.output, device=args.device,
        max_memory=args.max_memory,
    )  # fmt: skip
    names = checked_names(loaded, explainer)
    windows = args.window is not None
    with staged_dir(args.out, overwrite=args.overwrite) as tmp:
        for i, clip in enumerate(clips):
            if windows:
                print(f"window {i}: frames {int(clip.indices[0])}..{int(clip.indices[-1])}")
            folder = tmp / f"window_{i:03d}" if windows else tmp
            folder.mkdir(exist_ok=True)
            explain_clip(explainer, clip, folder, args, names=names, layout=layout)
    out = Path(args.out)
    for i in range(len(clips)):
        folder = out / f"window_{i:03d}" if windows else out
        print(f"wrote {folder / 'pyramid.json'}")
        if not args.no_report:
            print(f"report: {folder / 'report.html'}")
    return 0


def view_options(args: argparse.Namespace, tube_dir: Path) -> ViewOptions:
    """The report/tube options of `add_report_args`, creating `tube_dir` unless --no-tubes."""
    if not args.no_tubes:
        tube_dir.mkdir(exist_ok=True)
    return ViewOptions(
        per_depth=args.per_depth, shuffle=not args.no_shuffle, weighted=args.weighted,
        tube_dir=None if args.no_tubes else tube_dir, fps=args.fps,
    )  # fmt: skip


def check_view_args(args: argparse.Namespace) -> None:
    if args.per_depth < 1:
        raise OptionError(f"--per-depth must be >= 1 (got {args.per_depth})")
    if not args.fps > 0:
        raise OptionError(f"--fps must be > 0 (got {args.fps})")
    for name in ("window", "stride"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise OptionError(f"--{name} must be >= 1 (got {value})")
    if getattr(args, "stride", None) is not None and getattr(args, "window", None) is None:
        raise OptionError("--stride needs --window")


def checked_names(loaded: LoadedModel, explainer: Explainer) -> tuple[str, ...] | None:
    names = class_names(loaded)
    if names is not None and len(names) != explainer.classes:
        raise ModelError(
            f"the model's metadata names {len(names)} classes but its classifier has {explainer.classes}"
        )
    return names


def load_clips(args: argparse.Namespace, loaded: LoadedModel) -> tuple[list[Clip], str]:
    """The clip (or one clip per window) with display frames, and the input layout."""
    if getattr(args, "window", None) is not None:
        pre = preprocess_for(
            loaded, layout=args.layout, frames=args.frames, size=args.size, mean=args.mean,
            std=args.std,
        )  # fmt: skip
        return load_windows(args.clip, pre, args.window, args.stride), pre.layout
    clip = open_clip(args, loaded)
    if isinstance(clip, Clip):
        return [clip], clip_layout(clip.tensor, loaded, args.layout)
    tensor = np.asarray(clip)[None] if np.ndim(clip) == 4 else np.asarray(clip)
    layout = clip_layout(tensor, loaded, args.layout)
    frames = tensor_to_frames(tensor[0], layout)  # type: ignore[arg-type]
    indices = np.arange(frames.shape[0], dtype=np.int64)
    return [Clip(tensor=tensor, frames=frames, indices=indices, source=Path(args.clip))], layout


def clip_layout(tensor: np.ndarray, loaded: LoadedModel, override: str | None) -> str:
    """The clip's layout: the flag, else the model's metadata, else guessed from shapes."""
    if override:
        return override
    try:
        return preprocess_for(loaded).layout
    except CfpError:
        shape = declared_shape(graph_input(loaded.proto))
        return guess_layout(shape if len(shape) == 5 else np.shape(tensor))


def explain_clip(
    explainer: Explainer,
    clip: Clip,
    folder: Path,
    args: argparse.Namespace,
    *,
    names: tuple[str, ...] | None,
    layout: str,
) -> Pyramid:
    """One forward, the pyramid, and everything written into `folder`."""
    want_maps = not (args.no_report and args.no_tubes) or bool(args.class_tube)
    full = tubes.map_tensors(explainer, args.depth) if want_maps else ()
    run = explainer.run(clip.tensor, depth=args.depth, full=full)
    pyramid = explainer.pyramid(
        run, label=args.label, depth=args.depth, theta=args.theta, top_n=args.top_n,
        head_mode=args.head_mode, class_names=names,
    )  # fmt: skip
    print_prediction(pyramid, names)
    print_summary(pyramid)
    write_pyramid(pyramid, folder, fmt=args.format)
    if want_maps:
        write_views(explainer, pyramid, run, clip, folder, args, names=names, layout=layout)
    return pyramid


def write_views(
    explainer: Explainer,
    pyramid: Pyramid,
    run: Run,
    clip: Clip,
    folder: Path,
    args: argparse.Namespace,
    *,
    names: tuple[str, ...] | None,
    layout: str,
) -> None:
    """Tubes for the shown kernels (DIR/tubes/), the class tube and the HTML report."""
    options = view_options(args, folder / "tubes")
    class_frames = (
        write_class_tube(explainer, pyramid, run, clip, folder, args.class_tube, options)
        if args.class_tube
        else None
    )
    if args.no_report and args.no_tubes:
        return
    view = build_view(
        explainer, pyramid, run, clip.tensor, clip.frames, time_axis=2 if layout == "NCDHW" else 1,
        source=_describe(clip), class_names=names, options=options,
    )  # fmt: skip
    if args.no_report:
        return
    if class_frames is not None:
        view = replace(view, class_tube=class_frames,
                       class_tube_caption=classtube.CAPTIONS[args.class_tube])  # fmt: skip
    title = f"{pyramid.model}: class {pyramid.label}" + (
        f" ({pyramid.label_name})" if pyramid.label_name else ""
    )
    write_report(folder / "report.html", render([view], title=title, fps=args.fps))


def write_class_tube(
    explainer: Explainer,
    pyramid: Pyramid,
    run: Run,
    clip: Clip,
    folder: Path,
    kind: str,
    options: ViewOptions,
) -> tuple[str, ...]:
    """DIR/class_tube.npy (the signed tube at clip size) and, unless --no-tubes, its
    pictures in DIR/tubes/; returns the page's frames."""
    tube = classtube.class_tube(explainer, run, pyramid, clip.frames.shape[:3], kind)
    np.save(folder / "class_tube.npy", tube)
    blended = tubes.overlay(clip.frames, tubes.normalise(np, tube[None])[0])
    if options.tube_dir is not None:
        tubes.write_kernel_files(options.tube_dir, "class_tube", blended, options.fps)
    return tuple(tubes.encode_frames(display(blended, options.max_side)))


def _describe(clip: Clip) -> str:
    first, last = int(clip.indices[0]), int(clip.indices[-1])
    return f"{clip.source.name} (frames {first}..{last}, {len(clip.indices)} sampled)"


def write_pyramid(pyramid: Pyramid, folder: Path, *, fmt: str = "json") -> None:
    with (folder / "pyramid.json").open("wb") as f:
        pyramid.write_json(f)
    if fmt == "reference":
        (folder / "reference.json").write_text(json.dumps(pyramid.to_reference()))
        (folder / "tree.json").write_text(json.dumps(pyramid.to_tree()))


def print_prediction(p: Pyramid, names: tuple[str, ...] | None, k: int = 5) -> None:
    top = np.argsort(-p.logits, kind="stable")[:k]
    pred = int(top[0])

    def label(i: int) -> str:
        return f"{i} ({names[i]})" if names else str(i)

    print(f"prediction: class {label(pred)}, logit {p.logits[pred]:.4g}")
    print(
        "top-{}: {}".format(len(top), ", ".join(f"{label(int(i))}={p.logits[i]:.4g}" for i in top))
    )
    if p.label != pred:
        print(f"explaining class {label(p.label)} (logit {p.score:.4g})")


def print_summary(p: Pyramid) -> None:
    print(
        f"pyramid: theta {p.theta}, depth {p.depth}, head mode {p.head_mode}"
        + (f", top-n {p.top_n}" if p.top_n else "")
    )
    if p.empty:
        print(
            f"the pyramid is empty: no kept feature leads to a conv kernel (largest normalised "
            f"head score {p.head_best:.4g}; theta <= {p.head_best:.4g} would keep it)"
        )
        return
    for depth, kernels, layers, links in p.summary():
        print(
            f"  depth {depth}: {kernels} kernels in {layers} layers, {links} links to depth below"
        )
    if p.max_depth_reached < p.depth - 1:
        print(f"  (the network ran out of layers at depth {p.max_depth_reached})")
