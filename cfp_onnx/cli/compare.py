"""Compare two models on the same clips: predictions, pyramids, tubes, agreement figures.

Each model gets its own preprocessing (its metadata says its layout, size and
normalisation; --frames/--size/--mean/--std override both). A .npy clip is taken as
model A's input and transposed for B when their layouts differ. Writes, per clip,
report.html (side by side; selecting a kernel selects its counterpart), pyramid_a.json,
pyramid_b.json and agreement.json: class-tube Spearman correlation and top-10% IoU,
and the pyramids' Jaccard overlap per depth over conv layers paired automatically (equal
weights, then graph position when both have the same layers; the pairs are listed), or
as --map FILE says (a JSON object from A's conv node names to B's, overriding the
automatic pairs it names). One clip writes into DIR; several into DIR/clip_000/, ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cfp_onnx.cli.common import (
    _floats,
    _pair,
    add_pyramid_args,
    add_view_args,
    pyramid_options,
    view_options,
)
from cfp_onnx.cli.explain import print_prediction, quiet_decoders
from cfp_onnx.commands import Compared, compare_to
from cfp_onnx.errors import OptionError
from cfp_onnx.options import SAMPLINGS, ClipOptions


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
    g.add_argument(
        "--map",
        metavar="FILE",
        help="JSON {conv of A: conv of B}: pairs overriding the automatic ones",
    )
    add_pyramid_args(p)
    o = p.add_argument_group("output")
    o.add_argument("--out", default="cfp_compare", help="output folder (default ./cfp_compare)")
    o.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    add_view_args(o)


def run(args: argparse.Namespace) -> int:
    quiet_decoders()
    clips = ClipOptions(
        frames=args.frames, size=args.size, mean=args.mean, std=args.std, sampling=args.sampling
    )

    def report(x: Compared) -> None:
        print(f"clip {x.clip}")
        for key, e in zip("AB", x.explanations):
            print(f"  model {key} ({e.pyramid.model}):")
            print_prediction(e.pyramid, e.class_names)
        for name, value in x.agreement.rows():
            print(f"  {name}: {value}")

    view = view_options(args)
    done = compare_to(
        args.model_a, args.model_b, args.clip, args.out, pyramid=pyramid_options(args),
        clip_options=clips, view=view, mapping=read_mapping(args.map),
        overwrite=args.overwrite, device=args.device, on_result=report,
    )  # fmt: skip
    if view.report:
        for x in done:
            print(f"report: {x.folder / 'report.html'}")
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
