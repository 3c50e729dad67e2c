"""Explain many clips: per-clip pyramids, class pyramids and a summary CSV, resumable.

--clips is a folder (every .npy, video and frame folder in it, natural name order) or a
CSV list with a 'clip' column (paths relative to the CSV), an optional 'label' column
(class index or name; needed by --label true) and an optional 'id' column. Writes
OUT/clips/<clip-id>/nodes.npz, pyramid.json (SPEC §5; not with --clip-pyramids nodes),
class_tube.npy (with --class-tube) and clip.json, OUT/classes/<label>/
class_pyramid.json and report.html (per kernel: share of the class's clips holding it,
mean relevance over those, smallest depth), and OUT/summary.csv. Each clip's folder
appears whole; a re-run skips finished clips, then rebuilds the class pyramids and the
summary. --engine ray runs the clips on a Ray cluster (--address for an existing one)
with the same results.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
from typing import Any

from cfp_onnx.batch import (
    CLIP_PYRAMIDS,
    BatchOptions,
    Decoding,
    WorkerSpec,
    run_batch,
    tasks_from,
)
from cfp_onnx.cli.common import (
    _float,
    _floats,
    _int,
    _pair,
    add_model_args,
    faithfulness_draws,
)
from cfp_onnx.cli.explain import quiet_decoders
from cfp_onnx.engines import ENGINES, make_engine
from cfp_onnx.errors import OptionError
from cfp_onnx.loading import load_model
from cfp_onnx.modelinfo import class_names
from cfp_onnx.options import CLASS_TUBES, DRAWS, HEAD_MODES, LAYOUTS, SAMPLINGS


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    g = p.add_argument_group("clips")
    g.add_argument("--clips", required=True, metavar="DIR|LIST.csv", help="folder or CSV list")
    g.add_argument("--limit", type=_int("limit"), metavar="N", help="only the first N clips")
    g.add_argument("--layout", choices=LAYOUTS, help="model input layout (default: from the model)")
    g.add_argument("--frames", type=int, help="clip length (default: from the model)")
    g.add_argument("--size", type=_pair, metavar="H,W", help="frame size (default: from the model)")
    g.add_argument("--mean", type=_floats, metavar="R,G,B", help="normalisation mean")
    g.add_argument("--std", type=_floats, metavar="R,G,B", help="normalisation std")
    g.add_argument("--sampling", choices=SAMPLINGS, default="uniform", help="frame sampling")
    y = p.add_argument_group("pyramid")
    y.add_argument(
        "--label", default="predicted", metavar="predicted|true|N",
        help="class to explain: the prediction (default), the CSV's true label, or class N",
    )  # fmt: skip
    y.add_argument("--depth", type=_int("depth"), default=3, help="pyramid depth (default 3)")
    y.add_argument("--theta", type=_float("theta"), default=0.6, help="threshold (default 0.6)")
    y.add_argument("--top-n", type=_int("top-n"), help="keep at most N children per kernel")
    y.add_argument("--head-mode", choices=HEAD_MODES, default="weights", help="depth-0 scoring")
    y.add_argument(
        "--faithfulness", action="store_true",
        help="each clip's depth-0 kernels ablated against random ones (faithfulness.json)",
    )  # fmt: skip
    y.add_argument(
        "--faithfulness-draws", type=_int("faithfulness-draws"), metavar="N",
        help=f"random kernel sets per clip (default {DRAWS}; implies --faithfulness)",
    )  # fmt: skip
    y.add_argument(
        "--class-tube", choices=CLASS_TUBES, metavar="KIND",
        help="each clip's class tube too (class_tube.npy: signed, T x H x W): 'weighted', "
        "'contrast' or 'pyramid' (recommended, with --top-n 5 --theta 0)",
    )  # fmt: skip
    o = p.add_argument_group("output and engine")
    o.add_argument("--out", default="cfp_batch", help="output folder (default ./cfp_batch)")
    o.add_argument("--overwrite", action="store_true", help="start again instead of resuming")
    o.add_argument(
        "--clip-pyramids", choices=CLIP_PYRAMIDS, default="full",
        help="per clip: its whole pyramid.json and nodes.npz (full, default), or only the "
        "kernels, nodes.npz (nodes: a ResNet's pyramid.json is ~100 MB a clip)",
    )  # fmt: skip
    o.add_argument("--engine", choices=ENGINES, default="local", help="where to compute")
    o.add_argument("--address", help="Ray cluster address (default: start a local one)")
    o.add_argument("--workers", type=_int("workers"), help="Ray actors (default: cluster CPUs)")
    o.add_argument(
        "--batch-size", type=_int("batch-size"), metavar="N",
        help="clips per forward where the model's batch axis is dynamic (default 1 on the "
        "CPU, 4 with --device cuda; checked against single runs; with Ray, per actor call)",
    )  # fmt: skip
    o.add_argument("--no-progress", action="store_true", help="no progress bar")


def parse_label(text: str) -> str | int:
    if text in ("predicted", "true"):
        return text
    try:
        return int(text)
    except ValueError:
        raise OptionError(
            f"--label {text!r}: expected 'predicted', 'true' or a class index"
        ) from None


M_ARENA_MAX = -8  # glibc's mallopt parameter (malloc.h)


def one_malloc_arena() -> bool:
    """Have every thread of this process allocate from one glibc heap; True if it did.

    glibc gives each thread that allocates its own heap (an "arena"), which keeps what that
    thread freed. A batch's decoders, clip writer and JSON formatters each hold blocks
    there, so the process grows by what they freed: with one arena, a ResNet-50-3D batch
    writing whole pyramids peaks at 446 MB instead of 518 MB, no slower (benchmarks/README,
    Throughput). Left alone where the user set ``MALLOC_ARENA_MAX`` or libc is not glibc.
    Called before the batch starts any thread; arenas made earlier stay.
    """
    if "MALLOC_ARENA_MAX" in os.environ or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # no C library symbols: nothing to tune
        return False
    return bool(mallopt(M_ARENA_MAX, 1))


def run(args: argparse.Namespace) -> int:
    one_malloc_arena()
    quiet_decoders()
    options = BatchOptions(
        depth=args.depth, theta=args.theta, top_n=args.top_n, head_mode=args.head_mode,
        label=parse_label(args.label), faithfulness=faithfulness_draws(args),
        clip_pyramids=args.clip_pyramids, class_tube=args.class_tube,
    )  # fmt: skip
    options.check()
    if args.limit is not None and args.limit < 1:
        raise OptionError(f"--limit must be >= 1 (got {args.limit})")
    if args.batch_size is not None and args.batch_size < 1:
        raise OptionError(f"--batch-size must be >= 1 (got {args.batch_size})")
    engine = make_engine(
        args.engine, address=args.address, workers=args.workers, batch=args.batch_size
    )
    tasks = tasks_from(args.clips, class_names(load_model(args.model)))[: args.limit]
    decoding = Decoding(
        layout=args.layout, frames=args.frames, size=args.size, mean=args.mean, std=args.std,
        sampling=args.sampling,
    )  # fmt: skip
    spec = WorkerSpec(
        model=str(args.model), options=options, decoding=decoding, output=args.output,
        device=args.device,
    )  # fmt: skip
    summary = run_batch(
        spec, tasks, args.out, engine=engine, overwrite=args.overwrite,
        progress=None if args.no_progress else _bar,
    )  # fmt: skip
    print(
        f"{summary.done} clips explained, {summary.skipped} already done, "
        f"{len(summary.failed)} failed, of {summary.total}"
    )
    print(f"summary: {summary.summary_csv}")
    print(f"class pyramids: {len(summary.classes)} in {args.out}/classes/")
    for f in summary.failed[:10]:
        print(f"failed: {f.id}: {f.message}", file=sys.stderr)
    return 2 if summary.failed else 0


def _bar(total: int) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="clip", desc="cfp batch", file=sys.stderr, disable=None)
