"""Explain one clip: the predicted class, its class feature pyramid, written to DIR.

Writes DIR/pyramid.json (SPEC §5); with --format reference also DIR/reference.json
(the paper's nested dict) and DIR/tree.json (its D3 page's {name, children} tree).
DIR/report.html (one offline file: the clip, top classes, the pyramid as a graph, a
sortable table of every kernel, and any kernel's saliency tube drawn in the page) is
written unless --no-report. Per-kernel pictures only with --tubes strip,gif,stack. With
--window N [--stride S] a long video is explained window by window, one folder each
(DIR/window_000/, ...), and DIR/index.html links them and plots the score over time.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from cfp_onnx import resources
from cfp_onnx.cli.common import (
    add_clip_args,
    add_model_args,
    add_pyramid_args,
    add_view_args,
    clip_options,
    pyramid_options,
    view_options,
)
from cfp_onnx.commands import explain_to
from cfp_onnx.explanation import Explanation
from cfp_onnx.options import FORMATS
from cfp_onnx.pyramid import Pyramid


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    add_clip_args(p)
    add_pyramid_args(p)
    g = p.add_argument_group("output")
    g.add_argument("--out", default="cfp_out", help="output folder (default ./cfp_out)")
    g.add_argument("--format", choices=FORMATS, default="json", help="also write the paper's tree")
    g.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    add_view_args(g)
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


def quiet_decoders() -> None:
    """Silence FFmpeg's own stderr log (read at the first VideoCapture): a bad video must
    give our one-line error, not FFmpeg's lines before it. An explicit setting wins."""
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")


def run(args: argparse.Namespace) -> int:
    quiet_decoders()
    pyramid, clips, view = pyramid_options(args), clip_options(args), view_options(args)
    resources.parse_size(args.max_memory)  # a bad size fails before any work
    windowed = clips.window is not None

    def report(e: Explanation, folder: Path) -> None:
        if windowed:
            c = e.clip
            print(f"window {folder.name}: frames {int(c.indices[0])}..{int(c.indices[-1])}")
        print_prediction(e.pyramid, e.class_names)
        print_summary(e.pyramid)
        if e.faithfulness is not None:
            print(f"faithfulness: {e.faithfulness.summary}")
        elif view.faithfulness:
            print("faithfulness: not checked, the pyramid is empty (no kernel to zero)")

    from tqdm import tqdm

    done = explain_to(
        args.model, args.clip, args.out, pyramid=pyramid, clip_options=clips, view=view,
        overwrite=args.overwrite, output=args.output, device=args.device,
        max_memory=args.max_memory, on_result=report,
        progress=lambda **kw: tqdm(file=sys.stderr, disable=None, **kw),
    )  # fmt: skip
    for x in done:
        print(f"wrote {x.folder / 'pyramid.json'}")
        if view.report:
            print(f"report: {x.folder / 'report.html'}")
    if windowed:
        print(f"index: {os.path.join(args.out, 'index.html')}")
    return 0


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
