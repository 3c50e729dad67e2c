"""Speed and memory of `explain` on a ResNet-50-3D-sized model, against its own baselines.

One run prints, for a 1x3x16x112x112 clip at theta 0.55 and depth 3 (the paper
README's setting for ResNet-50-3D):

- the plain onnxruntime forward (the baseline every ratio is against);
- explain: the instrumented forward plus the whole pyramid, session already built;
- the back-step alone (pyramid from an existing run);
- the naive back-step, one kernel at a time over torch tensors, re-expanding a kernel
  once per parent as the paper's code does, at depth 2 (depth 3 takes minutes);
- peak memory (ru_maxrss) of a plain forward and of an explain, each in its own process.

    python benchmarks/bench_explain.py [--width 1.0] [--frames 16] [--size 112]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

THETA, DEPTH = 0.55, 3


def build_model(path: Path, width: float, frames: int, size: int) -> None:
    import torch
    from cfp_onnx.exporters.zoo.torch_models import randomize_batchnorm, resnet50_3d

    torch.manual_seed(0)
    model = randomize_batchnorm(resnet50_3d(num_classes=400, width=width, in_frames=frames)).eval()
    x = torch.zeros(1, 3, frames, size, size)
    torch.onnx.export(
        model, (x,), str(path), dynamo=False, opset_version=17,
        input_names=["video"], output_names=["logits"],
    )  # fmt: skip


def clip_for(frames: int, size: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((1, 3, frames, size, size)).astype(np.float32)


def timed(fn, repeat: int) -> float:  # type: ignore[no-untyped-def]
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def naive_backstep(ex, run, label: int, depth: int, theta: float) -> int:  # type: ignore[no-untyped-def]
    """The paper's algorithm as its code runs it: one kernel at a time, torch tensors,
    a kernel re-expanded once for every parent that reaches it. Returns expansions done."""
    import torch

    offsets = ex.provenance.offsets
    w = torch.from_numpy(ex.head.weight)
    wn = (w - w.min()) / (w.max() - w.min())
    feats = torch.nonzero(wn[label] >= theta).reshape(-1).tolist()
    head = ex.head_csr
    frontier = [int(k) for f in feats for k in head.kernels[head.indptr[f] : head.indptr[f + 1]]]
    weights = {i: torch.from_numpy(lay.weight).double() for i, lay in enumerate(ex.layers)}
    pooled = {
        i: torch.from_numpy(run.pooled[lay.input])
        for i, lay in enumerate(ex.layers)
        if lay.input in run.pooled
    }
    expansions = 0
    for _ in range(depth - 1):
        nxt = []
        for kid in frontier:
            layer = int(np.searchsorted(offsets, kid, side="right") - 1)
            j = kid - int(offsets[layer])
            lay, csr = ex.layers[layer], ex.input_csr(layer)
            per = lay.weight.shape[1]
            q = j // (lay.c_out // lay.group)
            r = []
            for m in range(per):  # one input channel at a time, as the reference code
                c = q * per + m
                r.append(weights[layer][j, m].mean() * pooled[layer][c])
            r_t = torch.stack(r)
            rn = (r_t - r_t.min()) / (r_t.max() - r_t.min())
            expansions += 1
            for m in torch.nonzero(rn >= theta).reshape(-1).tolist():
                c = q * per + m
                nxt += csr.kernels[csr.indptr[c] : csr.indptr[c + 1]].tolist()
        frontier = nxt
    return expansions


def child(mode: str, model: str, frames: int, size: int) -> None:
    """Run one forward (plain) or one explain in this process and print peak RSS."""
    clip = clip_for(frames, size)
    if mode == "plain":
        import onnxruntime as ort

        sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        sess.run(None, {"video": clip})
    else:
        from cfp_onnx.api import Explainer

        Explainer(model, clip_shape=clip.shape).explain(clip, depth=DEPTH, theta=THETA)
    print(json.dumps({"peak_mb": peak_rss_mb()}))


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: after fork+exec,
    ru_maxrss still counts the (large) parent that forked us."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_peak(script: str, *args: str) -> float:
    """Run `script --child ...` in a fresh process; the peak memory it prints."""
    out = subprocess.run(
        [sys.executable, script, "--child", *args], capture_output=True, text=True, check=True
    )
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"])


def peak(mode: str, model: Path, frames: int, size: int) -> float:
    return child_peak(
        __file__, mode, "--model", str(model), "--frames", str(frames), "--size", str(size)
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--child", choices=("plain", "explain"))
    ap.add_argument("--model")
    args = ap.parse_args()
    if args.child:
        child(args.child, args.model, args.frames, args.size)
        return

    import onnxruntime as ort

    from cfp_onnx.api import Explainer

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "r3d50.onnx"
        build_model(path, args.width, args.frames, args.size)
        clip = clip_for(args.frames, args.size)
        t = time.perf_counter()
        ex = Explainer(path, clip_shape=clip.shape)
        setup = time.perf_counter() - t
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        plain = timed(lambda: sess.run(None, {"video": clip}), args.repeat)
        explain = timed(lambda: ex.explain(clip, depth=DEPTH, theta=THETA), args.repeat)
        run = ex.run(clip, depth=DEPTH)
        p = ex.pyramid(run, depth=DEPTH, theta=THETA)
        back = timed(lambda: ex.pyramid(run, depth=DEPTH, theta=THETA), args.repeat)
        back2 = timed(lambda: ex.pyramid(run, depth=2, theta=THETA), args.repeat)
        t = time.perf_counter()
        expansions = naive_backstep(ex, run, p.label, 2, THETA)
        naive2 = time.perf_counter() - t
        mem_plain = peak("plain", path, args.frames, args.size)
        mem_explain = peak("explain", path, args.frames, args.size)

    print(
        f"model: ResNet-50-3D width {args.width}, {len(ex.layers)} conv layers, 400 classes; "
        f"clip 1x3x{args.frames}x{args.size}x{args.size}; theta {THETA}, depth {DEPTH}"
    )
    print(
        f"pyramid: {len(p.node_layer)} kernels, {len(p.link_source)} links; per depth "
        + ", ".join(f"d{d}={k}" for d, k, _, _ in p.summary())
    )
    print(f"analysis (once per model, not in explain): {setup * 1e3:.0f} ms")
    print(f"plain forward:            {plain * 1e3:9.1f} ms   (baseline)")
    print(
        f"explain (forward+pyramid):{explain * 1e3:9.1f} ms   {explain / plain:.3f}x plain forward  [target <= 1.2x]"
    )
    print(f"back-step, depth 3:       {back * 1e3:9.2f} ms   [target < 50 ms]")
    print(f"back-step, depth 2:       {back2 * 1e3:9.2f} ms")
    print(
        f"naive back-step, depth 2: {naive2 * 1e3:9.1f} ms   ({expansions} kernel expansions) "
        f"{naive2 / back2:.0f}x slower than ours at depth 2  [target >= 1000x]"
    )
    print(f"peak memory, plain:       {mem_plain:9.1f} MB")
    print(
        f"peak memory, explain:     {mem_explain:9.1f} MB   {mem_explain / mem_plain:.3f}x plain  [target <= 1.3x]"
    )


if __name__ == "__main__":
    main()
