"""Write a model that explains its own predictions: the pyramid as extra ONNX outputs.

  cfp embed model.onnx -o explained.onnx [--depth 3 --theta 0.6 --class-tube contrast]

The written model returns, after its own outputs (unchanged): cfp_label (the explained
class: the prediction, or the optional input cfp_explain_label when it is >= 0), and per
pyramid layer cfp_depth:LAYER and cfp_relevance:LAYER over its kernels (-1 / 0: not in the
pyramid); with --class-tube, cfp_class_tube at clip size. Standard ONNX ops only (opset
17): it runs wherever the model runs. `cfp inspect` lists an embedded model's outputs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cfp_onnx.cli.common import _float, _int, _pair
from cfp_onnx.embed import LABEL_INPUT, PRECISIONS, embed_to
from cfp_onnx.options import EMBED_TUBES, HEAD_MODES, LAYOUTS, ClipOptions, PyramidOptions


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="ONNX model file")
    p.add_argument("-o", "--output", required=True, type=Path, help="ONNX file to write")
    p.add_argument("--logits", metavar="NAME", help="graph output holding the logits, if several")
    g = p.add_argument_group("pyramid")
    g.add_argument("--depth", type=_int("depth"), default=3, help="pyramid depth (default 3)")
    g.add_argument(
        "--theta", type=_float("theta"), default=0.6, help="threshold in [0,1] (default 0.6)"
    )
    g.add_argument("--top-n", type=_int("top-n"), help="keep at most N children per kernel")
    g.add_argument("--head-mode", choices=HEAD_MODES, default="weights", help="depth-0 scoring")
    g.add_argument("--class-tube", choices=EMBED_TUBES, help="also output this class tube")
    g.add_argument(
        "--precision", choices=PRECISIONS, default="float64",
        help="in-graph arithmetic: float64 gives the host's kernel sets exactly (default); "
        "float32 for runtimes without doubles (TensorRT, WebGL/WebGPU)",
    )  # fmt: skip
    c = p.add_argument_group("clip (only where the model's input dims are dynamic)")
    c.add_argument("--layout", choices=LAYOUTS, help="model input layout (default: from the model)")
    c.add_argument("--frames", type=int, help="clip length")
    c.add_argument("--size", type=_pair, metavar="H,W", help="frame size")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")


def run(args: argparse.Namespace) -> int:
    pyramid = PyramidOptions(
        depth=args.depth, theta=args.theta, top_n=args.top_n, head_mode=args.head_mode
    )
    clips = ClipOptions(layout=args.layout, frames=args.frames, size=args.size)
    path, info = embed_to(
        args.model, args.output, pyramid, class_tube=args.class_tube, clip_options=clips,
        logits=args.logits, precision=args.precision, overwrite=args.overwrite,
    )  # fmt: skip
    tube = f", cfp_class_tube {'x'.join(map(str, info.clip_size))}" if info.class_tube else ""
    print(
        f"wrote {path}: cfp_label, depth and relevance of {len(info.layers)} pyramid layers"
        f"{tube}; input {LABEL_INPUT} (default -1: the prediction)"
    )
    return 0
