"""Speed and memory of the analyzer on the zoo's six full-size paper models (random weights).

For each model, at 16x112x112 (and ResNet-50-3D also at 16x224x224), at the theta the
paper's README lists for it, depth 3:

- plain forward (onnxruntime on the unmodified file), the baseline of every ratio;
- explain, pyramid only (instrumented forward + pyramid);
- explain with tubes of the depth-0 kernels (full maps requested, tubes upsampled): all
  of them, and the 64 most relevant (what the report shows);
- the back-step alone (pyramid from an existing run);
- peak memory (VmHWM) of a plain forward and of an explain, each in its own process;
- the naive per-kernel back-step at depth 2 (``bench_explain.naive_backstep``);
- a sweep over depth 1..4 and theta 0.5/0.6/0.7: kernels per depth and back-step time.

Results go to ``benchmarks/results/perf.json``; tables are printed as Markdown and the
plot is written to ``benchmarks/perf_depth.png``.

    python benchmarks/perf.py [--models resnet50_3d i3d ...] [--repeat 5]
    python benchmarks/perf.py --quick --repeat 9    # times only (results/perf_quick.json)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_explain import child_peak, naive_backstep, peak_rss_mb, timed

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "perf.json"
PLOT = HERE / "perf_depth.png"
DEPTH = 3
DEPTHS = (1, 2, 3, 4)
THETAS = (0.5, 0.6, 0.7)

# The paper README's table (2 x GTX1080Ti): GFLOPs (2 x MACs at 16x224x224), back-step
# ms, layers, theta. I3D's "1 + mixed5c" is its depth; we run every model at depth 3.
PAPER: dict[str, tuple[str, float, float, str, float]] = {
    "mfnet_3d": ("Multi-FiberNet", 22.70, 24.43, "3", 0.6),
    "i3d": ("I3D", 55.79, 23.21, "1 + mixed5c", 0.65),
    "resnet50_3d": ("ResNet50-3D", 80.32, 21.39, "3", 0.55),
    "resnet101_3d": ("ResNet101-3D", 110.98, 39.48, "3", 0.6),
    "resnet152_3d": ("ResNet152-3D", 148.91, 31.06, "3", 0.6),
    "resnext101_3d": ("ResNeXt101-3D", 76.96, 70.49, "3", 0.6),
}
CASES: tuple[tuple[str, int], ...] = (
    ("mfnet_3d", 112),
    ("i3d", 112),
    ("resnet50_3d", 112),
    ("resnet50_3d", 224),
    ("resnet101_3d", 112),
    ("resnet152_3d", 112),
    ("resnext101_3d", 112),
)


@dataclass
class Result:
    """Every figure of one (model, size) case; times in ms, memory in MB."""

    model: str
    size: int
    theta: float
    gflops: float  # 2 x MACs, as the paper counts
    layers: int
    kernels: int = 0
    per_depth: list[int] = field(default_factory=list)
    plain: float = 0.0
    explain: float = 0.0
    explain_tubes: float = 0.0  # + tubes of every depth-0 kernel
    explain_shown: float = 0.0  # + tubes of the 64 most relevant depth-0 kernels
    backstep: float = 0.0
    backstep_d2: float = 0.0
    naive_d2: float = 0.0
    mem_plain: float = 0.0
    mem_explain: float = 0.0
    sweep: list[dict[str, float]] = field(default_factory=list)


def export(name: str, size: int, path: Path) -> float:
    """Export the zoo model with random weights (BN statistics randomised); returns GFLOPs."""
    import torch
    from cfp_onnx.exporters.zoo.count import count_torch
    from cfp_onnx.exporters.zoo.torch_models import MODELS, randomize_batchnorm

    torch.set_num_threads(2)
    torch.manual_seed(0)
    shape = (1, 3, 16, size, size)
    gflops = 2 * count_torch(MODELS[name](num_classes=400), shape).macs / 1e9
    model = randomize_batchnorm(MODELS[name](num_classes=400)).eval()
    torch.onnx.export(
        model, (torch.zeros(shape),), str(path), dynamo=False, opset_version=17,
        input_names=["video"], output_names=["logits"],
    )  # fmt: skip
    return gflops


def clip_for(size: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((1, 3, 16, size, size)).astype(np.float32)


def depth0_tube_tensors(ex, depth: int) -> tuple[str, ...]:  # type: ignore[no-untyped-def]
    """Maps the depth-0 kernels' tubes read: inputs (and outputs) of the head's layers."""
    names: dict[str, None] = {}
    for i in ex.levels(depth)[0].tolist():
        names[ex.layers[int(i)].input] = None
        names[ex.layers[int(i)].output] = None
    return tuple(names)


def explain_with_tubes(  # type: ignore[no-untyped-def]
    ex, clip: np.ndarray, theta: float, full: tuple[str, ...], *, shown: bool
) -> int:
    """One explain that also draws depth-0 tubes: all of them (in chunks of 64, not kept:
    thousands of 16x112x112 tubes would not fit), or the 64 most relevant the report shows.
    Returns the number of tubes drawn."""
    from cfp_onnx.tubes import TubeMaker, shown_nodes

    run = ex.run(clip, depth=DEPTH, full=full)
    p = ex.pyramid(run, depth=DEPTH, theta=theta)
    nodes = np.flatnonzero(p.node_depth == 0)
    if shown:
        nodes = np.intersect1d(shown_nodes(p, 64), nodes)
    maker = TubeMaker(ex, p, run, clip.shape[2:])
    for start in range(0, len(nodes), 64):
        maker.tubes(nodes[start : start + 64])
    return len(nodes)


def sweep(ex, clip: np.ndarray, repeat: int) -> list[dict[str, float]]:  # type: ignore[no-untyped-def]
    """Kernels per depth and back-step time over depth 1..4 x theta 0.5/0.6/0.7."""
    run = ex.run(clip, depth=max(DEPTHS))
    rows = []
    for theta in THETAS:
        for depth in DEPTHS:
            p = ex.pyramid(run, depth=depth, theta=theta)
            ms = timed(lambda d=depth, t=theta: ex.pyramid(run, depth=d, theta=t), repeat) * 1e3
            counts = (
                np.bincount(p.node_depth, minlength=depth).tolist() if len(p.node_depth) else []
            )
            rows.append({"theta": theta, "depth": depth, "ms": ms, "kernels": len(p.node_depth),
                         "per_depth": counts})  # fmt: skip
    return rows


def measure(name: str, size: int, repeat: int, tmp: Path) -> Result:
    """All figures of one case (the model is exported to `tmp`)."""
    import onnxruntime as ort

    from cfp_onnx.api import Explainer

    path = tmp / f"{name}_{size}.onnx"
    theta = PAPER[name][4]
    gflops = export(name, size, path)
    clip = clip_for(size)
    ex = Explainer(path, clip_shape=clip.shape)
    res = Result(name, size, theta, gflops, len(ex.layers))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    res.plain = ms(lambda: sess.run(None, {"video": clip}), repeat)
    res.explain = ms(lambda: ex.explain(clip, depth=DEPTH, theta=theta), repeat)
    full = depth0_tube_tensors(ex, DEPTH)
    res.explain_tubes = ms(lambda: explain_with_tubes(ex, clip, theta, full, shown=False), 1)
    res.explain_shown = ms(lambda: explain_with_tubes(ex, clip, theta, full, shown=True), repeat)
    run = ex.run(clip, depth=DEPTH)
    p = ex.pyramid(run, depth=DEPTH, theta=theta)
    res.kernels = len(p.node_depth)
    res.per_depth = np.bincount(p.node_depth).tolist() if len(p.node_depth) else []
    res.backstep = ms(lambda: ex.pyramid(run, depth=DEPTH, theta=theta), repeat)
    res.backstep_d2 = ms(lambda: ex.pyramid(run, depth=2, theta=theta), repeat)
    t = time.perf_counter()
    naive_backstep(ex, run, p.label, 2, theta)
    res.naive_d2 = (time.perf_counter() - t) * 1e3
    res.sweep = sweep(ex, clip, max(2, repeat // 2))
    res.mem_plain = peak("plain", path, size, theta)
    res.mem_explain = peak("explain", path, size, theta)
    return res


def measure_quick(name: str, size: int, repeat: int, tmp: Path) -> dict[str, float]:
    """Times only (plain, explain, back-step at depth 3 and 2): a re-run for a quieter
    machine, minutes instead of the full run's half hour."""
    import onnxruntime as ort

    from cfp_onnx.api import Explainer

    path = tmp / f"{name}_{size}.onnx"
    theta = PAPER[name][4]
    export(name, size, path)
    clip = clip_for(size)
    ex = Explainer(path, clip_shape=clip.shape)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    run = ex.run(clip, depth=DEPTH)
    return {
        "plain": ms(lambda: sess.run(None, {"video": clip}), repeat),
        "explain": ms(lambda: ex.explain(clip, depth=DEPTH, theta=theta), repeat),
        "backstep": ms(lambda: ex.pyramid(run, depth=DEPTH, theta=theta), repeat),
        "backstep_d2": ms(lambda: ex.pyramid(run, depth=2, theta=theta), repeat),
        "kernels": float(len(ex.pyramid(run, depth=DEPTH, theta=theta).node_depth)),
    }


def run_quick(models: list[str] | None, repeat: int) -> None:
    out = {}
    print("| model | kernels | plain ms | explain ms | ratio | back-step d3 ms | d2 ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, size in CASES:
        if size != 112 or (models and name not in models):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            r = measure_quick(name, size, repeat, Path(tmp))
        out[name] = r
        print(f"| {name} | {r['kernels']:,.0f} | {r['plain']:.0f} | {r['explain']:.0f} "
              f"| {r['explain'] / r['plain']:.2f}x | {r['backstep']:.1f} | {r['backstep_d2']:.1f} |",
              flush=True)  # fmt: skip
    (RESULTS.parent / "perf_quick.json").write_text(json.dumps(out, indent=1))


def ms(fn: Callable[[], object], repeat: int) -> float:
    return timed(fn, repeat) * 1e3


def child(mode: str, model: str, size: int, theta: float) -> None:
    """One plain forward or one explain in this process; prints the peak RSS."""
    clip = clip_for(size)
    if mode == "plain":
        import onnxruntime as ort

        ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {"video": clip})
    else:
        from cfp_onnx.api import Explainer

        Explainer(model, clip_shape=clip.shape).explain(clip, depth=DEPTH, theta=theta)
    print(json.dumps({"peak_mb": peak_rss_mb()}))


def peak(mode: str, model: Path, size: int, theta: float) -> float:
    return child_peak(
        __file__, mode, "--model", str(model), "--size", str(size), "--theta", str(theta)
    )


# ----------------------------------------------------------------------------- reporting


def main_table(results: list[Result]) -> str:
    """Every case: times, ratios and memory."""
    lines = [
        "| model | clip | theta | layers | kernels (d0/d1/d2) | plain ms | explain ms | ratio "
        "| + all d0 tubes ms | + 64 d0 tubes ms | back-step d3 ms | back-step d2 ms | naive d2 ms | naive / ours "
        "| peak MB plain | peak MB explain | ratio |",
        "|" + "---|" * 17,
    ]
    for r in results:
        lines.append(
            f"| {r.model} | 16x{r.size}x{r.size} | {r.theta} | {r.layers} "
            f"| {r.kernels:,} ({'/'.join(f'{k:,}' for k in r.per_depth)}) "
            f"| {r.plain:.0f} | {r.explain:.0f} | {r.explain / r.plain:.2f}x "
            f"| {r.explain_tubes:,.0f} | {r.explain_shown:.0f} | {r.backstep:.1f} | {r.backstep_d2:.1f} "
            f"| {r.naive_d2:,.0f} | {r.naive_d2 / r.backstep_d2:,.0f}x "
            f"| {r.mem_plain:.0f} | {r.mem_explain:.0f} | {r.mem_explain / r.mem_plain:.2f}x |"
        )
    return "\n".join(lines)


def paper_table(results: list[Result]) -> str:
    """The paper README's columns, ours beside theirs (16x112x112 cases)."""
    lines = [
        "| Network | GFLOPS (paper, 224) | GFLOPS (ours, 112) | Back-step ms (paper, 2 GPUs) "
        "| Back-step ms (ours, 2-core CPU, depth 3) | # layers (paper) | theta |",
        "|:---|---:|---:|---:|---:|:---:|:---:|",
    ]
    for r in results:
        if r.size != 112:
            continue
        label, gf, bs, layers, theta = PAPER[r.model]
        lines.append(
            f"| {label} | {gf:.2f} | {r.gflops:.2f} | {bs:.2f} | {r.backstep:.2f} | {layers} | {theta} |"
        )
    return "\n".join(lines)


def sweep_table(results: list[Result]) -> str:
    """Kernels and back-step time per (theta, depth), one row per model."""
    head = " | ".join(f"t{t} d{d}" for t in THETAS for d in DEPTHS)
    lines = [f"| model | {head} |", "|---|" + "---:|" * (len(THETAS) * len(DEPTHS))]
    for r in results:
        if r.size != 112:
            continue
        cells = " | ".join(f"{int(s['kernels']):,} / {s['ms']:.1f}" for s in r.sweep)
        lines.append(f"| {r.model} | {cells} |")
    return "\n".join(lines)


def plot(results: list[Result], out: Path) -> None:
    """Back-step time and kernel count against depth at theta 0.6 (one line per model)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_k) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in results:
        if r.size != 112:
            continue
        rows = [s for s in r.sweep if s["theta"] == 0.6]
        depths = [s["depth"] for s in rows]
        ax_t.plot(depths, [s["ms"] for s in rows], marker="o", label=r.model)
        ax_k.plot(depths, [s["kernels"] for s in rows], marker="o", label=r.model)
    ax_t.axhline(50, color="grey", linestyle="--", linewidth=1, label="50 ms target (depth 3)")
    ax_t.set(xlabel="depth", ylabel="back-step time (ms)", yscale="log", xticks=list(DEPTHS))
    ax_k.set(xlabel="depth", ylabel="kernels in the pyramid", yscale="log", xticks=list(DEPTHS))
    ax_t.set_title("Back-step time, theta 0.6, 16x112x112, 2-core CPU")
    ax_k.set_title("Pyramid size, theta 0.6")
    ax_t.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def report(results: list[Result]) -> None:
    print(main_table(results), end="\n\n")
    print(paper_table(results), end="\n\n")
    print("kernels / back-step ms per theta (t) and depth (d):\n")
    print(sweep_table(results))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--models", nargs="*", default=None, help="subset of model names")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--report-only", action="store_true", help="reprint tables from perf.json")
    ap.add_argument("--quick", action="store_true", help="times only, 16x112x112 cases")
    ap.add_argument("--child", choices=("plain", "explain"))
    ap.add_argument("--model")
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--theta", type=float, default=0.6)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.model, args.size, args.theta)
        return
    if args.quick:
        run_quick(args.models, args.repeat)
        return
    if args.report_only:
        results = [Result(**r) for r in json.loads(RESULTS.read_text())]
    else:
        results = run_cases(args.models, args.repeat)
    report(results)
    plot(results, PLOT)


def run_cases(models: list[str] | None, repeat: int) -> list[Result]:
    """Measure each case, saving perf.json after every one (a long run keeps its progress)."""
    results = []
    RESULTS.parent.mkdir(exist_ok=True)
    for name, size in CASES:
        if models and name not in models:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            results.append(measure(name, size, repeat, Path(tmp)))
            print(f"{name} 16x{size}x{size}: {time.perf_counter() - t:.0f} s", flush=True)
        RESULTS.write_text(json.dumps([asdict(r) for r in results], indent=1))
    return results


if __name__ == "__main__":
    main()
