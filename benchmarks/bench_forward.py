"""Explain against a plain forward, for the six paper models, on a real decoded video clip.

For each zoo model (random weights, BatchNorm randomised, 400 classes, 16x112x112): one
clip decoded from an mp4 of the synthetic action dataset through ``ModelInput`` (what
``cfp explain`` does), then, interleaved (plain, explain, plain, explain...), medians of
``--repeat`` runs, both onnxruntime CPU sessions with the same options and threads:

- plain: the unmodified file, one forward;
- explain: ``Explainer.explain`` at depth 3, theta 0.6: the instrumented forward and the
  pyramid (what ``cfp explain --no-report`` computes before writing);
- and its two parts: the instrumented forward alone (``Explainer.run``) and the pyramid
  from an existing run (the back-step);
- with ``--embedded``, also the back-step run inside the graph: the forward of the model
  ``cfp embed`` writes (float64, the same options), its session's build time, and whether
  its kernel sets and depths equal the host's (the direction for issue 16's 1.15x).

Each timed call starts after a 50 ms pause: onnxruntime's pool threads spin for a while
after a run, and on a small machine a plain session still spinning would slow the explain
timed after it (measured: +20-40 ms on these models), which is not a cost of explaining.

    python benchmarks/bench_forward.py [--models resnet50_3d,...] [--repeat 15] [--keep DIR]
                                       [--embedded]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

MODELS = ("mfnet_3d", "i3d", "resnet50_3d", "resnet101_3d", "resnet152_3d", "resnext101_3d")
DEPTH, THETA, THREADS = 3, 0.6, 2


def real_clip(root: Path, path: Path) -> np.ndarray:
    """The model's input decoded from a 10 s 320x240 mp4 (made once)."""
    from bench_cli import make_video

    from cfp_onnx.loading import load_model
    from cfp_onnx.modelinput import ModelInput
    from cfp_onnx.options import ClipOptions

    video = root / "video.mp4"
    if not video.exists():
        make_video(video)
    loaded = load_model(path)
    return ModelInput.of(loaded, ClipOptions()).clip(str(video), loaded).tensor


def model(name: str, root: Path) -> Path:
    path = root / f"{name}_112.onnx"
    if not path.exists():
        from perf import export

        export(name, 112, path)
    return path


def measure(path: Path, clip: np.ndarray, repeat: int, embedded: bool) -> dict[str, float]:
    import onnxruntime as ort

    from cfp_onnx.api import Explainer

    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = THREADS
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    ex = Explainer(path, clip_shape=clip.shape, threads=THREADS)
    name = sess.get_inputs()[0].name
    fns = {
        "plain": lambda: sess.run(None, {name: clip}),
        "explain": lambda: ex.explain(clip, depth=DEPTH, theta=THETA),
        "run": lambda: ex.run(clip, depth=DEPTH),
    }
    run = ex.run(clip, depth=DEPTH)
    fns["backstep"] = lambda: ex.pyramid(run, depth=DEPTH, theta=THETA)
    extra: dict[str, float] = {}
    if embedded:
        from bench_embed import check

        from cfp_onnx.embed import embed
        from cfp_onnx.options import PyramidOptions

        blob = embed(ex, PyramidOptions(depth=DEPTH, theta=THETA))[0].SerializeToString()
        t = time.perf_counter()
        emb = ort.InferenceSession(blob, so, providers=["CPUExecutionProvider"])
        extra["build_s"] = time.perf_counter() - t
        names = [o.name for o in emb.get_outputs()]
        got = dict(zip(names, emb.run(None, {name: clip}), strict=True))
        same, worst = check(ex, got, clip, THETA)
        extra["same"], extra["worst"] = float(same), worst
        fns["embedded"] = lambda: emb.run(None, {name: clip})
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(repeat):
        for k, fn in fns.items():
            time.sleep(0.05)  # the other session's threads stop spinning: each run alone
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    out = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    out["kernels"] = float(len(ex.explain(clip, depth=DEPTH, theta=THETA).node_depth))
    return {**out, **extra}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--repeat", type=int, default=15)
    p.add_argument("--keep", type=Path, help="keep exported models and the video here")
    p.add_argument("--embedded", action="store_true", help="also time the in-graph back-step")
    args = p.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="cfp-bench-forward-"))
    root.mkdir(parents=True, exist_ok=True)
    head = "| model | kernels | plain ms | explain ms | explain / plain | instrumented run ms "
    head += "| run / plain | back-step ms |"
    rule = "|---|---:|---:|---:|---:|---:|---:|---:|"
    if args.embedded:
        head += " embedded ms | embedded / plain | same | max \\|dr\\| | its session s |"
        rule += "---:|---:|---|---:|---:|"
    print(head)
    print(rule)
    for name in args.models.split(","):
        path = model(name, root)
        r = measure(path, real_clip(root, path), args.repeat, args.embedded)
        row = (
            f"| {name} | {r['kernels']:,.0f} | {r['plain']:.1f} | {r['explain']:.1f} "
            f"| {r['explain'] / r['plain']:.2f}x | {r['run']:.1f} | {r['run'] / r['plain']:.2f}x "
            f"| {r['backstep']:.1f} |"
        )
        if args.embedded:
            row += (
                f" {r['embedded']:.1f} | {r['embedded'] / r['plain']:.2f}x "
                f"| {'yes' if r['same'] else 'NO'} | {r['worst']:.1g} | {r['build_s']:.1f} |"
            )
        print(row, flush=True)


if __name__ == "__main__":
    main()
