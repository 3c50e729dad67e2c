"""Write a synthetic action dataset (frames, masks, labels) to one .npz file.

Usage:
    python benchmarks/data/generate.py --n 2000 --seed 0 --out benchmarks/data/generated/train.npz
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cfp_onnx.synthetic import CLASSES, make_dataset

DEFAULT_OUT = Path(__file__).resolve().parent / "generated" / "synthetic.npz"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="number of clips (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--frames", type=int, default=16, help="frames per clip (default 16)")
    parser.add_argument("--size", type=int, default=112, help="frame height = width (default 112)")
    parser.add_argument("--distractors", type=int, default=2, help="distractor shapes per clip")
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"output .npz (default {DEFAULT_OUT})"
    )
    parser.add_argument(
        "--compress", action="store_true", help="np.savez_compressed (smaller, slower)"
    )
    return parser.parse_args(argv)


def save(out: Path, compress: bool, **arrays: np.ndarray) -> None:
    """Write to a temporary file beside ``out``, then rename: the file appears whole or not at all."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".npz", prefix=f".{out.stem}.", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            (np.savez_compressed if compress else np.savez)(f, **arrays)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a dataset is for everyone
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    frames, masks, labels = make_dataset(
        args.n, args.seed, frames=args.frames, size=args.size, distractors=args.distractors
    )
    generated = time.perf_counter() - start
    save(
        args.out,
        args.compress,
        frames=frames,
        masks=masks,
        labels=labels,
        classes=np.array(CLASSES),
    )
    total = time.perf_counter() - start
    print(
        f"{args.n} clips of {args.frames}x{args.size}x{args.size} -> {args.out}: "
        f"generated in {generated:.1f} s ({1000 * generated / args.n:.2f} ms/clip), "
        f"written in {total - generated:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
