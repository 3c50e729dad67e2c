"""Explain a shipped demo model on a generated clip and write the HTML report.

The clip (an object moving right among distractors) is generated in a second; the model
is a small 3D CNN trained on such clips (benchmarks/train.py). Writes DIR/report.html,
DIR/pyramid.json, the contrast class tube (DIR/class_tube.npy, shown in the report),
DIR/tubes/ and DIR/demo_clip.mp4 (try `cfp explain` on it), and prints the report's path.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cfp_onnx import demo
from cfp_onnx.api import Explainer, check_options
from cfp_onnx.cli.common import add_pyramid_args
from cfp_onnx.cli.explain import (
    add_report_args,
    check_view_args,
    checked_names,
    explain_clip,
    quiet_decoders,
)
from cfp_onnx.loading import load_model
from cfp_onnx.outputs import check_target, staged_dir
from cfp_onnx.video import write_video


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="cfp_demo", help="output folder (default ./cfp_demo)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated clip (default 0)")
    add_pyramid_args(p)
    add_report_args(p.add_argument_group("report"))
    p.set_defaults(format="json", output=None, device="cpu", class_tube="contrast")


def run(args: argparse.Namespace) -> int:
    quiet_decoders()
    check_options(depth=args.depth, theta=args.theta, top_n=args.top_n, head_mode=args.head_mode)
    check_view_args(args)
    check_target(args.out, overwrite=args.overwrite)
    args.no_report = False
    loaded = load_model(demo.model_path())
    clip = demo.clip(args.seed, loaded)
    explainer = Explainer(loaded, clip_shape=tuple(clip.tensor.shape))
    names = checked_names(loaded, explainer)
    with staged_dir(args.out, overwrite=args.overwrite) as tmp:
        explain_clip(explainer, clip, tmp, args, names=names, layout="NCDHW")
        write_video(tmp / "demo_clip.mp4", clip.frames, fps=clip.fps or 8.0)
    report = Path(args.out).resolve() / "report.html"
    print(f"report: {report}")
    return 0
