"""Explain one clip: the predicted class, its class feature pyramid, written to DIR.

Writes DIR/pyramid.json (SPEC §5); with --format reference also DIR/reference.json
(the paper's nested dict) and DIR/tree.json (its D3 page's {name, children} tree).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from cfp_onnx.api import Explainer, check_options
from cfp_onnx.cli.common import add_clip_args, add_model_args, add_pyramid_args, open_clip
from cfp_onnx.errors import ModelError
from cfp_onnx.loading import load_model
from cfp_onnx.modelinfo import class_names
from cfp_onnx.outputs import check_target, staged_dir
from cfp_onnx.pyramid import Pyramid
from cfp_onnx.video import Clip

FORMATS = ("json", "reference")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    add_clip_args(p)
    add_pyramid_args(p)
    g = p.add_argument_group("output")
    g.add_argument("--out", default="cfp_out", help="output folder (default ./cfp_out)")
    g.add_argument("--format", choices=FORMATS, default="json", help="also write the paper's tree")
    g.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def run(args: argparse.Namespace) -> int:
    check_options(depth=args.depth, theta=args.theta, top_n=args.top_n, head_mode=args.head_mode)
    check_target(args.out, overwrite=args.overwrite)
    loaded = load_model(args.model)
    clip = open_clip(args, loaded)
    tensor = clip.tensor if isinstance(clip, Clip) else clip
    explainer = Explainer(
        loaded, clip_shape=tuple(np.shape(tensor)), output=args.output, device=args.device
    )
    names = class_names(loaded)
    if names is not None and len(names) != explainer.classes:
        raise ModelError(
            f"the model's metadata names {len(names)} classes but its classifier has {explainer.classes}"
        )
    pyramid = explainer.explain(
        tensor, label=args.label, depth=args.depth, theta=args.theta, top_n=args.top_n,
        head_mode=args.head_mode, class_names=names,
    )  # fmt: skip
    print_prediction(pyramid, names)
    print_summary(pyramid)
    with staged_dir(args.out, overwrite=args.overwrite) as tmp:
        write_pyramid(pyramid, tmp, fmt=args.format)
    print(f"wrote {Path(args.out) / 'pyramid.json'}")
    return 0


def write_pyramid(pyramid: Pyramid, folder: Path, *, fmt: str = "json") -> None:
    (folder / "pyramid.json").write_text(pyramid.to_json())
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
