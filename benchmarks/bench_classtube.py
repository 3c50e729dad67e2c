"""What the pyramid class tube and the faithfulness check add to a whole `cfp explain`.

For each of the zoo's six paper models (random seeded weights, 400 classes, 16x112x112),
on a real 10 s mp4, whole processes, interleaved rounds, medians, every ratio against
the same command without the addition measured in the same rounds:

- base: ``cfp explain M --clip V --top-n 5 --theta 0 --no-report`` (the recommended
  selection; tubes are not drawn, so the addition's cost is not hidden by the page's);
- ``--class-tube pyramid`` (target: <= 1.1x base);
- ``--faithfulness`` (8 random draws: 10 masked forwards, one per row for these
  fixed-batch exports).

    python benchmarks/bench_classtube.py [--rounds 3] [--models i3d resnet50_3d]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cli import BIN, make_video, timed
from perf import PAPER, export

BASE = ["--top-n", "5", "--theta", "0", "--no-report"]
ADDED = {"pyramid tube": ["--class-tube", "pyramid"], "faithfulness": ["--faithfulness"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--models", nargs="*", default=list(PAPER))
    args = ap.parse_args()
    import compileall

    compileall.compile_dir(str(Path(__file__).resolve().parents[1] / "cfp_onnx"), quiet=1)
    cfp = str(BIN / "cfp")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        video = work / "video.mp4"
        make_video(video)
        for name in args.models:
            model = work / f"{name}.onnx"
            export(name, 112, model)
            runs = {"base": BASE, **{k: BASE + v for k, v in ADDED.items()}}
            times: dict[str, list[float]] = {k: [] for k in runs}
            cmd = [cfp, "explain", str(model), "--clip", str(video), "--overwrite"]
            timed([*cmd, "--out", "warm", *BASE], work)  # page cache, digest cache
            for _ in range(args.rounds):
                for key, extra in runs.items():
                    times[key].append(timed([*cmd, "--out", "o", *extra], work))
            base = statistics.median(times["base"])
            row = {"model": name, "base": base}
            for key in ADDED:
                row[key] = statistics.median(times[key])
                row[f"{key} ratio"] = statistics.median(
                    t / b for t, b in zip(times[key], times["base"])
                )
            print(
                f"{name}: base {base:.2f} s; "
                + "; ".join(
                    f"{k} {row[k]:.2f} s = {row[k + ' ratio']:.2f}x (per-round median)"
                    for k in ADDED
                ),
                flush=True,
            )
            rows.append(row)
            model.unlink()
    print("\n| model | explain, top-5 (s) | + `--class-tube pyramid` | + `--faithfulness` |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['model']} | {r['base']:.2f} | {r['pyramid tube']:.2f} s = "
            f"**{r['pyramid tube ratio']:.2f}x** | {r['faithfulness']:.2f} s = "
            f"{r['faithfulness ratio']:.2f}x |"
        )


if __name__ == "__main__":
    main()
