"""Explain a shipped demo model on a generated clip and write the HTML report.

The clip (an object moving right among distractors) is generated in a second; the model
is a small 3D CNN trained on such clips (benchmarks/train.py). Writes DIR/report.html,
DIR/pyramid.json, the pyramid class tube (DIR/class_tube.npy, shown in the report) and
DIR/demo_clip.mp4 (try `cfp explain` on it), and prints the report's path.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cfp_onnx.cli.common import add_pyramid_args, add_view_args, pyramid_options, view_options
from cfp_onnx.cli.explain import print_prediction, print_summary, quiet_decoders
from cfp_onnx.commands import demo_to


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="cfp_demo", help="output folder (default ./cfp_demo)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated clip (default 0)")
    add_pyramid_args(p)
    add_view_args(p.add_argument_group("report"))
    p.set_defaults(format="json", class_tube="pyramid")


def run(args: argparse.Namespace) -> int:
    quiet_decoders()
    args.no_report = False
    e = demo_to(
        args.out, seed=args.seed, pyramid=pyramid_options(args), view=view_options(args),
        overwrite=args.overwrite,
    )  # fmt: skip
    print_prediction(e.pyramid, e.class_names)
    print_summary(e.pyramid)
    print(f"report: {Path(args.out).resolve() / 'report.html'}")
    return 0
