"""cfp batch at dataset scale: clips per second (local vs Ray-local) and flat peak memory.

Generates N synthetic clips (mp4, 16x112x112, the synthetic action dataset) once, then
runs the batch on the shipped demo model, each measurement in a fresh subprocess:

- local engine over the first 100 clips, then over all N: clips/s and the process's
  peak resident memory (VmHWM from /proc/self/status, read by the process itself);
  the ratio of the two peaks shows memory is flat in the number of clips;
- Ray engine on a local cluster (``ray.init(num_cpus=CPUS)``) over all N: clips/s and
  the driver's VmHWM (each Ray worker is its own process, not counted there).

    python benchmarks/bench_batch.py [--clips 1000] [--cpus 2] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DEPTH, THETA = 3, 0.6


def generate(folder: Path, n: int) -> None:
    """N mp4 clips of the synthetic dataset, classes balanced, seeded."""
    from cfp_onnx.synthetic import CLASSES, make_clip
    from cfp_onnx.video import write_video

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        path = folder / f"clip_{i:05d}.mp4"
        if not path.exists():
            write_video(path, make_clip(i % len(CLASSES), rng, frames=16, size=112).frames)


def vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(args: argparse.Namespace) -> None:
    """One batch run in this (fresh) process; prints a JSON line of figures."""
    from cfp_onnx import demo
    from cfp_onnx.batch import BatchOptions, WorkerSpec, run_batch, tasks_from
    from cfp_onnx.engines import LocalEngine, RayEngine

    tasks = tasks_from(args.clip_dir)[: args.limit]
    spec = WorkerSpec(str(demo.model_path()), BatchOptions(depth=DEPTH, theta=THETA))
    engine: LocalEngine | RayEngine = LocalEngine()
    if args.engine == "ray":
        import ray

        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        engine = RayEngine(workers=args.cpus)
        ray.get([ray.remote(lambda: 0).remote() for _ in range(args.cpus)])  # workers up
    start = time.perf_counter()
    summary = run_batch(spec, tasks, args.out, engine=engine)
    seconds = time.perf_counter() - start
    print(
        json.dumps(
            {"clips": summary.done, "seconds": seconds, "peak_mb": vm_hwm_mb(),
             "failed": len(summary.failed)}
        )
    )  # fmt: skip


def measure(clip_dir: Path, out: Path, engine: str, limit: int, cpus: int) -> dict[str, float]:
    cmd = [
        sys.executable, __file__, "--child", "--clip-dir", str(clip_dir), "--out", str(out),
        "--engine", engine, "--limit", str(limit), "--cpus", str(cpus),
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clips", type=int, default=1000)
    p.add_argument("--cpus", type=int, default=2, help="Ray-local CPUs (workers)")
    p.add_argument("--keep", type=Path, help="keep clips and outputs in this folder")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--clip-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--engine", default="local", help=argparse.SUPPRESS)
    p.add_argument("--limit", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    root = args.keep or Path(tempfile.mkdtemp(prefix="cfp-bench-batch-"))
    clips = root / "clips"
    t = time.perf_counter()
    generate(clips, args.clips)
    print(f"{args.clips} clips (mp4, 16x112x112) in {clips}: {time.perf_counter() - t:.1f} s")
    rows = [
        ("local", 100, measure(clips, root / "local100", "local", 100, args.cpus)),
        ("local", args.clips, measure(clips, root / "local", "local", args.clips, args.cpus)),
        ("ray", args.clips, measure(clips, root / "ray", "ray", args.clips, args.cpus)),
    ]
    print(f"{'engine':8} {'clips':>6} {'seconds':>8} {'clips/s':>8} {'peak MB':>8}")
    for engine, n, r in rows:
        print(
            f"{engine:8} {n:6d} {r['seconds']:8.1f} {r['clips'] / r['seconds']:8.1f} "
            f"{r['peak_mb']:8.0f}"
        )
    print(
        f"peak after {args.clips} / after 100 (local): {rows[1][2]['peak_mb'] / rows[0][2]['peak_mb']:.3f}"
    )
    same = _same(root / "local", root / "ray")
    print(f"ray output identical to local: {same}")


def _same(a: Path, b: Path) -> bool:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    return files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()) and all(
        (a / f).read_bytes() == (b / f).read_bytes() for f in files
    )


if __name__ == "__main__":
    main()
