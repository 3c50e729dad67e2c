"""cfp batch against a plain inference loop over the same real-video clips: clips/s, peak memory.

The plain loop is what a user runs without cfp: decode each clip (the same ``ModelInput``
decoding cfp uses: OpenCV, sampling, resize, normalisation) and run one onnxruntime
forward (default session options, as cfp's). ``cfp batch`` is the command's ``main`` in the
child (options parsed and the process set up as the ``cfp`` script does: its BLAS
environment, one malloc arena), the local engine, depth 3, theta 0.6, writing its whole
output folder. Each measurement is a fresh
subprocess; plain and batch alternate (``--rounds``) and the medians are compared, so both
see the same machine. Peak memory is the process's VmHWM.

Clips: N mp4 files of the synthetic action dataset at 320x240, ``--seconds`` long at 25
fps (the size of a UCF-101 clip), sampled to the model's 16x112x112 when decoded.

Modes (``--modes``): ``full`` and ``nodes`` are ``--clip-pyramids``; ``recommended`` is
``nodes`` with the recommended selection (``--top-n 5 --theta 0``) and ``tube`` the same
plus ``--class-tube pyramid`` (each clip's class_tube.npy).

    python benchmarks/bench_throughput.py [--clips 200] [--models demo,r50] [--rounds 2]
    python benchmarks/bench_throughput.py --modes recommended,tube
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DEPTH, THETA = 3, 0.6


def generate(folder: Path, n: int, seconds: float) -> None:
    """N seeded 320x240 mp4 clips, classes balanced (made once, kept in `folder`)."""
    from cfp_onnx.synthetic import CLASSES, make_clip
    from cfp_onnx.video import write_video

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    frames = int(seconds * 25)
    for i in range(n):
        path = folder / f"clip_{i:05d}.mp4"
        if not path.exists():
            clip = make_clip(i % len(CLASSES), rng, frames=frames, size=240, distractors=2)
            wide = np.concatenate([clip.frames, clip.frames[:, :, :80]], axis=2)
            write_video(path, wide, fps=25)


def vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def plain(model: str, paths: list[Path]) -> dict[str, float]:
    """Decode + one forward per clip, nothing kept."""
    import onnxruntime as ort

    from cfp_onnx.loading import load_model
    from cfp_onnx.modelinput import ModelInput
    from cfp_onnx.options import ClipOptions

    loaded = load_model(model)
    mi = ModelInput.of(loaded, ClipOptions())
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    start = time.perf_counter()
    for p in paths:
        sess.run(None, {name: mi.clip(str(p), loaded).tensor})
    return {"seconds": time.perf_counter() - start, "clips": len(paths)}


MODES = {
    "full": ["--theta", str(THETA), "--clip-pyramids", "full"],
    "nodes": ["--theta", str(THETA), "--clip-pyramids", "nodes"],
    "recommended": ["--top-n", "5", "--theta", "0", "--clip-pyramids", "nodes"],
    "tube": ["--top-n", "5", "--theta", "0", "--clip-pyramids", "nodes", "--class-tube", "pyramid"],
}


def batch(model: str, clip_dir: Path, n: int, out: Path, mode: str) -> dict[str, float]:
    """`cfp batch` itself (its parsing, process setup and engine), in this process."""
    from cfp_onnx.cli.main import main

    args = [
        "batch", model, "--clips", str(clip_dir), "--limit", str(n), "--out", str(out),
        "--depth", str(DEPTH), *MODES[mode], "--no-progress",
    ]  # fmt: skip
    start = time.perf_counter()
    code = main(args)
    seconds = time.perf_counter() - start
    assert code == 0 and len(list((out / "clips").iterdir())) == n, code
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {"seconds": seconds, "clips": n, "out_mb": size / 2**20}


def child(args: argparse.Namespace) -> None:
    paths = sorted(args.clip_dir.glob("*.mp4"))[: args.limit]
    if args.what == "plain":
        r = plain(args.model, paths)
    else:
        shutil.rmtree(args.out, ignore_errors=True)
        r = batch(args.model, args.clip_dir, args.limit, args.out, args.what)
        shutil.rmtree(args.out, ignore_errors=True)
    print(json.dumps({**r, "peak_mb": vm_hwm_mb()}))


def measure(what: str, model: Path, clip_dir: Path, n: int, out: Path) -> dict[str, float]:
    cmd = [
        sys.executable, __file__, "--child", what, "--model", str(model), "--clip-dir",
        str(clip_dir), "--limit", str(n), "--out", str(out),
    ]  # fmt: skip
    from cfp_onnx.cli.main import BLAS_ENV

    env = os.environ if what == "plain" else {**BLAS_ENV, **os.environ}
    os.sync()
    res = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(res.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def model_path(name: str, root: Path) -> Path:
    if name == "demo":
        from cfp_onnx import demo

        return demo.model_path()
    path = root / "r50.onnx"
    if not path.exists():  # the zoo ResNet-50-3D, 400 classes, 16x112x112 (needs torch)
        sys.path.insert(0, str(Path(__file__).parent))
        from bench_explain import build_model

        build_model(path, 1.0, 16, 112)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clips", type=int, default=200)
    p.add_argument("--seconds", type=float, default=3.0, help="length of each generated clip")
    p.add_argument("--models", default="demo,r50")
    p.add_argument("--rounds", type=int, default=2, help="alternating plain/batch pairs")
    p.add_argument("--modes", default="full,nodes", help=f"modes to time: {','.join(MODES)}")
    p.add_argument("--full-clips", type=int, default=20, help="clips for r50 in full mode")
    p.add_argument("--keep", type=Path, help="keep clips and models in this folder")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--clip-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--limit", type=int, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.what = args.child
        child(args)
        return
    root = args.keep or Path(tempfile.mkdtemp(prefix="cfp-bench-throughput-"))
    clips = root / f"clips_{args.seconds:g}s"
    t = time.perf_counter()
    generate(clips, args.clips, args.seconds)
    print(
        f"{args.clips} mp4 clips, 320x240, {args.seconds:g} s: {clips} ({time.perf_counter() - t:.0f} s)"
    )
    print(f"{'model':6} {'run':12} {'clips':>5} {'clips/s':>8} {'x plain':>8} {'peak MB':>8} "
          f"{'x plain':>8} {'out MB':>8}")  # fmt: skip
    for name in args.models.split(","):
        model = model_path(name, root)
        for mode in args.modes.split(","):
            n = args.full_clips if (name != "demo" and mode == "full") else args.clips
            runs: dict[str, list[dict[str, float]]] = {"plain": [], mode: []}
            for _ in range(args.rounds):
                runs["plain"].append(measure("plain", model, clips, n, root / "out"))
                runs[mode].append(measure(mode, model, clips, n, root / "out"))
            rate = {
                k: statistics.median(r["clips"] / r["seconds"] for r in v) for k, v in runs.items()
            }
            peak = {k: max(r["peak_mb"] for r in v) for k, v in runs.items()}
            for k in ("plain", mode):
                label = "plain loop" if k == "plain" else f"batch {k}"
                out_mb = f"{runs[k][0]['out_mb']:8.1f}" if k != "plain" else f"{'':>8}"
                print(
                    f"{name:6} {label:12} {n:5d} {rate[k]:8.2f} {rate[k] / rate['plain']:8.2f} "
                    f"{peak[k]:8.0f} {peak[k] / peak['plain']:8.2f} {out_mb}"
                )


if __name__ == "__main__":
    main()
