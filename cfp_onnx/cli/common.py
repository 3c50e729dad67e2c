"""Option groups shared by subcommands, and the clip loading they share."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from cfp_onnx.loading import LoadedModel
from cfp_onnx.modelinfo import preprocess_for
from cfp_onnx.relevance import HEAD_MODES
from cfp_onnx.video import LAYOUTS, SAMPLINGS, Clip, load_clip


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="ONNX model file")
    p.add_argument("--output", metavar="NAME", help="graph output holding the logits, if several")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to compute")


def add_clip_args(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    g = p.add_argument_group("clip")
    g.add_argument(
        "--clip",
        required=required,
        help="video file, folder of frames, or .npy in the model's layout",
    )
    g.add_argument("--layout", choices=LAYOUTS, help="model input layout (default: from the model)")
    g.add_argument("--frames", type=int, help="clip length (default: from the model)")
    g.add_argument("--size", type=_pair, metavar="H,W", help="frame size (default: from the model)")
    g.add_argument(
        "--mean", type=_floats, metavar="R,G,B", help="normalisation mean, on [0,1] values"
    )
    g.add_argument(
        "--std", type=_floats, metavar="R,G,B", help="normalisation std, on [0,1] values"
    )
    g.add_argument("--sampling", choices=SAMPLINGS, default="uniform", help="frame sampling")


def add_pyramid_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("pyramid")
    g.add_argument("--label", type=_int("label"), help="class to explain (default: the prediction)")
    g.add_argument("--depth", type=_int("depth"), default=3, help="pyramid depth (default 3)")
    g.add_argument(
        "--theta", type=_float("theta"), default=0.6, help="threshold in [0,1] (default 0.6)"
    )
    g.add_argument("--top-n", type=_int("top-n"), help="keep at most N children per kernel")
    g.add_argument("--head-mode", choices=HEAD_MODES, default="weights", help="depth-0 scoring")


def open_clip(args: argparse.Namespace, loaded: LoadedModel) -> Clip | np.ndarray:
    """A ``.npy`` is used as is; anything else is decoded and preprocessed for the model."""
    if Path(args.clip).suffix.lower() == ".npy":
        from cfp_onnx.api import load_array

        return load_array(args.clip)
    pre = preprocess_for(
        loaded, layout=args.layout, frames=args.frames, size=args.size, mean=args.mean, std=args.std
    )
    return load_clip(args.clip, pre, sampling=args.sampling)


def _int(name: str):  # type: ignore[no-untyped-def]
    def parse(text: str) -> int:
        try:
            return int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer (got {text!r})") from None

    return parse


def _float(name: str):  # type: ignore[no-untyped-def]
    def parse(text: str) -> float:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number (got {text!r})") from None

    return parse


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def _pair(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be H,W (got {text!r})") from None
    return h, w
