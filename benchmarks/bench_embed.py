"""Cost of an embedded explanation (`cfp embed`): its forward against the plain model's.

For each of the six paper models (zoo, random weights, BatchNorm randomised, 400 classes,
16x112x112), at depth 3 and the paper's theta: the plain ONNX file and the embedded one
(pyramid outputs only, with the contrast class tube, and in float32) run in onnxruntime CPU sessions
with the same options and threads, in interleaved rounds; medians. Each embedded model
is also checked against ``Explainer.pyramid`` on the same clip (kernel sets and depths
equal, largest relevance difference printed), in float64 and in float32.

    .venv/bin/python benchmarks/bench_embed.py                 # ~10 min, exports cached
    .venv/bin/python benchmarks/bench_embed.py --models i3d --rounds 9
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from perf import PAPER, export  # noqa: E402

DEPTH = 3


def session(model: bytes | str, threads: int):  # type: ignore[no-untyped-def]
    from cfp_onnx.runtime import ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def check(ex, got: dict[str, np.ndarray], clip: np.ndarray, theta: float) -> tuple[bool, float]:  # type: ignore[no-untyped-def]
    """(kernel sets and depths equal, largest relevance difference) against the host."""
    from cfp_onnx.embed import depth_name, relevance_name

    pyr = ex.pyramid(ex.run(clip, depth=DEPTH), depth=DEPTH, theta=theta)
    same, worst = True, 0.0
    for li, name in enumerate(pyr.layers):
        at = pyr.node_layer == li
        if depth_name(name) not in got:
            same &= not bool(at.any())
            continue
        d, r = got[depth_name(name)][0], got[relevance_name(name)][0]
        ref_d = np.full(len(d), -1)
        ref_d[pyr.node_channel[at]] = pyr.node_depth[at]
        ref_r = np.zeros(len(d))
        ref_r[pyr.node_channel[at]] = pyr.node_relevance[at]
        same &= bool(np.array_equal(d, ref_d))
        worst = max(worst, float(np.abs(r - ref_r).max()))
    return same, worst


def one(name: str, cache: Path, rounds: int, threads: int) -> dict[str, object]:
    from cfp_onnx.api import Explainer
    from cfp_onnx.embed import embed
    from cfp_onnx.options import PyramidOptions

    path = cache / f"{name}_112.onnx"
    if not path.exists():
        export(name, 112, path)
    theta = PAPER[name][4]
    clip = np.random.default_rng(0).standard_normal((1, 3, 16, 112, 112)).astype(np.float32)
    ex = Explainer(path, threads=threads)
    opts = PyramidOptions(depth=DEPTH, theta=theta)
    t = time.perf_counter()
    plain_only, _ = embed(ex, opts)
    build_s = time.perf_counter() - t
    with_tube, _ = embed(ex, opts, class_tube="contrast", clip_size=(16, 112, 112))
    single, _ = embed(ex, opts, precision="float32")
    sessions = {
        "plain": session(str(path), threads),
        "embedded": session(plain_only.SerializeToString(), threads),
        "embedded+tube": session(with_tube.SerializeToString(), threads),
        "float32": session(single.SerializeToString(), threads),
    }
    feed = {"video": clip}
    out = sessions["embedded"].run(None, feed)
    got = dict(zip([o.name for o in sessions["embedded"].get_outputs()], out))
    same, worst = check(ex, got, clip, theta)
    out32 = sessions["float32"].run(None, feed)
    got32 = dict(zip([o.name for o in sessions["float32"].get_outputs()], out32))
    same32, worst32 = check(ex, got32, clip, theta)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for s in sessions.values():
        s.run(None, feed)  # warm-up
    for _ in range(rounds):
        for key, s in sessions.items():
            t = time.perf_counter()
            s.run(None, feed)
            times[key].append(time.perf_counter() - t)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return {
        "model": name,
        "theta": theta,
        "layers": len(ex.layers),
        "embed_build_s": round(build_s, 2),
        "plain_ms": round(med["plain"], 1),
        "embedded_ms": round(med["embedded"], 1),
        "embedded_tube_ms": round(med["embedded+tube"], 1),
        "ratio": round(med["embedded"] / med["plain"], 3),
        "ratio_tube": round(med["embedded+tube"] / med["plain"], 3),
        "same_kernels": same,
        "max_relevance_diff": worst,
        "float32_ms": round(med["float32"], 1),
        "ratio_float32": round(med["float32"] / med["plain"], 3),
        "float32_same_kernels": same32,
        "float32_max_relevance_diff": worst32,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=list(PAPER))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/cfp_bench_models"))
    ap.add_argument("--json", type=Path, default=HERE / "results" / "embed.json")
    args = ap.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    rows = []
    print(
        "model           plain ms  embedded ms  ratio  +tube ms  ratio  same  max|dr|"
        "  float32 ms  ratio  same  max|dr|"
    )
    for name in args.models:
        r = one(name, args.cache, args.rounds, args.threads)
        rows.append(r)
        print(
            f"{name:<15} {r['plain_ms']:>8} {r['embedded_ms']:>12} {r['ratio']:>6.2f}x"
            f" {r['embedded_tube_ms']:>8} {r['ratio_tube']:>5.2f}x  {r['same_kernels']!s:<5}"
            f" {r['max_relevance_diff']:.1e} {r['float32_ms']:>11} {r['ratio_float32']:>5.2f}x"
            f"  {r['float32_same_kernels']!s:<5} {r['float32_max_relevance_diff']:.1e}",
            flush=True,
        )
    args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
