"""Option groups shared by subcommands, and the clip loading they share."""

from __future__ import annotations

import argparse

from cfp_onnx.errors import OptionError
from cfp_onnx.options import (
    CLASS_TUBES,
    DRAWS,
    HEAD_MODES,
    LAYOUTS,
    SAMPLINGS,
    TUBE_FILES,
    ClipOptions,
    PyramidOptions,
    ViewOptions,
)


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
    g.add_argument(
        "--label",
        type=_label,
        help="class to explain: an index or a class name (default: the prediction)",
    )
    g.add_argument("--depth", type=_int("depth"), default=3, help="pyramid depth (default 3)")
    g.add_argument(
        "--theta", type=_float("theta"), default=0.6, help="threshold in [0,1] (default 0.6)"
    )
    g.add_argument("--top-n", type=_int("top-n"), help="keep at most N children per kernel")
    g.add_argument("--head-mode", choices=HEAD_MODES, default="weights", help="depth-0 scoring")


def add_view_args(g: argparse._ArgumentGroup) -> None:
    """Report and tube options (explain, compare, demo)."""
    g.add_argument("--no-report", action="store_true", help="do not write report.html")
    g.add_argument(
        "--no-tubes", action="store_true",
        help="a report without tubes (skips every kernel's map) and no tube files",
    )  # fmt: skip
    g.add_argument(
        "--tubes", type=_names, metavar="KINDS", default=(),
        help=f"also write per-kernel pictures into tubes/: {','.join(TUBE_FILES)} "
        "(comma-separated; for the kernels the graph shows)",
    )  # fmt: skip
    g.add_argument(
        "--per-depth", type=int, default=64, metavar="K",
        help="kernels drawn in the graph (and given tube files) per depth (default 64)",
    )  # fmt: skip
    g.add_argument("--weighted", action="store_true", help="tube maps weighted by relevance r'")
    g.add_argument(
        "--class-tube", choices=CLASS_TUBES, metavar="KIND",
        help="also draw the class tube: 'weighted' (relevance-weighted depth-0 maps), "
        "'contrast' (minus the mean over all classes) or 'pyramid' (every kernel's response "
        "weighted by the relevance flowing to it, minus the mean over all classes; "
        "recommended, with --top-n 5 --theta 0)",
    )  # fmt: skip
    g.add_argument("--no-shuffle", action="store_true", help="skip the frame-shuffle test")
    g.add_argument(
        "--faithfulness", action="store_true",
        help="zero the depth-0 kernels, and as many random kernels of the same layers, and "
        "compare the class score's drops (faithfulness.json, and in the report)",
    )  # fmt: skip
    g.add_argument(
        "--faithfulness-draws", type=_int("faithfulness-draws"), metavar="N",
        help=f"random kernel sets the faithfulness check draws (default {DRAWS}; implies "
        "--faithfulness)",
    )  # fmt: skip
    g.add_argument("--fps", type=float, default=8.0, help="tube playback speed (default 8)")


def pyramid_options(args: argparse.Namespace) -> PyramidOptions:
    return PyramidOptions(
        depth=args.depth, theta=args.theta, top_n=args.top_n, head_mode=args.head_mode,
        label=args.label,
    )  # fmt: skip


def clip_options(args: argparse.Namespace) -> ClipOptions:
    return ClipOptions(
        layout=getattr(args, "layout", None), frames=args.frames, size=args.size,
        mean=args.mean, std=args.std, sampling=args.sampling,
        window=getattr(args, "window", None), stride=getattr(args, "stride", None),
    )  # fmt: skip


def view_options(args: argparse.Namespace) -> ViewOptions:
    return ViewOptions(
        report=not args.no_report, maps=not args.no_tubes,
        tube_files=() if args.no_tubes else args.tubes, per_depth=args.per_depth,
        weighted=args.weighted, class_tube=args.class_tube, shuffle=not args.no_shuffle,
        faithfulness=faithfulness_draws(args), fps=args.fps, format=getattr(args, "format", "json"),
    )  # fmt: skip


def faithfulness_draws(args: argparse.Namespace) -> int:
    """Random draws of the faithfulness check: 0 without it."""
    n = args.faithfulness_draws
    if n is not None and n < 1:
        raise OptionError(f"--faithfulness-draws must be >= 1 (got {n})")
    return n if n is not None else DRAWS if args.faithfulness else 0


def _names(text: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in text.split(",") if n.strip())


def _label(text: str) -> int | str:
    """A class index, or a class name (resolved against the model's names later)."""
    try:
        return int(text)
    except ValueError:
        return text


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
