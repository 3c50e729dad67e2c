"""What a user's whole `cfp explain` / `cfp compare` costs, against plain inference, same run.

Each figure is a median over interleaved runs of whole processes (start-up, imports,
decoding, analysis, forwards, writing), each ratio against a plain process measured in
the same rounds: decode the same video with OpenCV (every frame, as cfp's decoder does),
sample 16 frames, resize, one onnxruntime forward, print the class.

- explain: the zoo ResNet-50-3D (400 classes, 16x112x112, random seeded weights),
  defaults (report.html) and --no-report;
- the bytes written besides pyramid.json, and pyramid.json's write speed;
- compare: the trained torch ResNet-50-3D and its Keras twin (benchmarks/models);
- the report's first paint and readiness (every tube drawable) in headless Chromium.

    python benchmarks/bench_cli.py [--rounds 5]      # ~3 min; needs torch (model export)
    python benchmarks/bench_cli.py --against DIR     # and another version, same rounds
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
PLAIN = r"""
import sys, numpy as np, cv2, onnxruntime as ort
cap = cv2.VideoCapture(sys.argv[2]); frames = []
while True:
    ok, f = cap.read()
    if not ok: break
    frames.append(f)
idx = ((np.arange(16) + 0.5) * len(frames) / 16).astype(int)
x = np.stack([cv2.resize(cv2.cvtColor(frames[i], cv2.COLOR_BGR2RGB), (112, 112)) for i in idx])
s = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
x = x.astype(np.float32)[None] / 255  # NDHWC (Keras); NCDHW (PyTorch) below
x = x if s.get_inputs()[0].shape[-1] == 3 else x.transpose(0, 4, 1, 2, 3)
print(int(np.argmax(s.run(None, {s.get_inputs()[0].name: x})[0])))
"""


def make_video(path: Path, seconds: float = 10, fps: int = 25) -> None:
    """A 10 s 320x240 mp4 of the synthetic action dataset (an actor among distractors)."""
    from cfp_onnx.synthetic import make_clip
    from cfp_onnx.video import write_video

    clip = make_clip(
        0, np.random.default_rng(0), frames=int(seconds * fps), size=240, distractors=3
    )
    write_video(path, np.concatenate([clip.frames, clip.frames[:, :, :80]], axis=2), fps=fps)


def timed(cmd: list[str], cwd: Path, extra: dict[str, str] | None = None) -> float:
    env = {**os.environ, "XDG_CACHE_HOME": str(cwd / "cache"), **(extra or {})}  # our cache
    os.sync()  # each process starts with no writeback of the one before (120 MB of JSON)
    t = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, env=env)
    return time.perf_counter() - t


def sizes(folder: Path) -> tuple[int, int, int]:
    """(files, bytes besides pyramid*.json, bytes of pyramid*.json)."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    pyr = sum(p.stat().st_size for p in files if p.name.startswith("pyramid"))
    return len(files), sum(p.stat().st_size for p in files) - pyr, pyr


def json_speed(model: Path, video: Path) -> tuple[float, float]:
    """pyramid.json MB/s, to a file: our writer (links expanded as it goes) against
    json.dumps of the same document (its dicts built inside the timing)."""
    import json

    from cfp_onnx.api import Explainer
    from cfp_onnx.loading import load_model
    from cfp_onnx.modelinput import ModelInput

    loaded = load_model(model)
    mi = ModelInput.of(loaded)
    clip = mi.clip(video, loaded)
    ex = Explainer(loaded, clip_shape=clip.tensor.shape)
    p = ex.explain(clip.tensor)
    with tempfile.TemporaryFile() as f:  # a fresh pyramid: expanding its links counts too
        t = time.perf_counter()
        n = p.write_json(f)
        ours = n / 1e6 / (time.perf_counter() - t)
    t = time.perf_counter()
    text = json.dumps(p.to_dict())
    base = len(text) / 1e6 / (time.perf_counter() - t)
    return ours, base


def first_paint(report: Path) -> tuple[float, float]:
    sys.path.insert(0, str(HERE.parent))
    from tests.browser import chromium

    with chromium() as d:
        d.set_window_size(1920, 1080)
        t = time.perf_counter()
        d.get(report.resolve().as_uri())
        while not d.execute_script("return !!(window.cfpReport && window.cfpReport.ready)"):
            time.sleep(0.02)
        ready = time.perf_counter() - t
        paint = d.execute_script(
            "return performance.getEntriesByName('first-contentful-paint')[0].startTime"
        )
    return float(paint) / 1000, ready


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--against", type=Path, default=None,
                    help="a checkout of another version (git worktree add DIR REV): its explain "
                         "and --no-report are timed in the same rounds")  # fmt: skip
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    from bench_explain import build_model

    # The package's bytecode, as `pip install` compiles it: an editable install under
    # PYTHONDONTWRITEBYTECODE (this machine sets it) would compile every module every run.
    for root in (HERE.parent, *([args.against] if args.against else [])):
        subprocess.run(
            [sys.executable, "-m", "compileall", "-q", str(root / "cfp_onnx")], check=True
        )
    work = Path(tempfile.mkdtemp(prefix="cfp-bench-cli-"))
    model, video = work / "r50.onnx", work / "video.mp4"
    build_model(model, 1.0, 16, 112)
    make_video(video)
    twins = (HERE / "models" / "r3d.onnx", HERE / "models" / "keras_r3d.onnx")
    py, cfp = str(BIN / "python"), str(BIN / "cfp")
    keys = ["plain", "explain", "no_report", "plain2", "compare"]
    if args.against:
        keys += ["explain_other", "no_report_other"]
    runs: dict[str, list[float]] = {k: [] for k in keys}
    other = [py, "-c", "from cfp_onnx.cli.main import console; console()"]
    for r in range(args.rounds + 1):  # round 0 warms the page cache, not counted
        explain = [cfp, "explain", str(model), "--clip", str(video)]
        t = {
            "plain": timed([py, "-c", PLAIN, str(model), str(video)], work),
            "explain": timed([*explain, "--out", f"e{r}"], work),
            "no_report": timed([*explain, "--out", f"n{r}", "--no-report"], work),
            "plain2": sum(timed([py, "-c", PLAIN, str(m), str(video)], work) for m in twins),
            "compare": timed(
                [cfp, "compare", *map(str, twins), "--clip", str(video), "--out", f"c{r}"], work
            ),
        }
        if args.against:
            env = {"PYTHONPATH": str(args.against.resolve())}
            base = [*other, "explain", str(model), "--clip", str(video)]
            t["explain_other"] = timed([*base, "--out", f"eo{r}"], work, env)
            t["no_report_other"] = timed([*base, "--out", f"no{r}", "--no-report"], work, env)
        if r:
            for k, v in t.items():
                runs[k].append(v)
    med = {k: statistics.median(v) for k, v in runs.items()}
    for k, v in runs.items():
        print(f"{k:10s} runs: " + " ".join(f"{x:.2f}" for x in v))
    pairs = [("explain", "plain"), ("no_report", "plain"), ("compare", "plain2")]
    if args.against:
        pairs += [("explain_other", "plain"), ("no_report_other", "plain")]
    for k, base in pairs:
        per = [a / b for a, b in zip(runs[k], runs[base])]  # robust to a drifting machine
        print(f"{k:10s} / {base:6s} per round: " + " ".join(f"{x:.2f}" for x in per)
              + f"  median {statistics.median(per):.2f}x")  # fmt: skip
    files, rest, pyr = sizes(work / "e1")
    cfiles, crest, cpyr = sizes(work / "c1")
    ours, base = json_speed(model, video)
    paint, ready = first_paint(work / "e1" / "report.html")
    print(f"{args.rounds} interleaved rounds, medians; model ResNet-50-3D 400 classes 16x112x112; "
          "video 10 s 320x240 mp4")  # fmt: skip
    print(f"plain process (decode + forward)        {med['plain']:6.2f} s  1.00x")
    print(
        f"cfp explain (defaults)                  {med['explain']:6.2f} s  {med['explain'] / med['plain']:.2f}x  (target <= 2.0x)"
    )
    print(
        f"cfp explain --no-report                 {med['no_report']:6.2f} s  {med['no_report'] / med['plain']:.2f}x  (target <= 1.5x)"
    )
    print(
        f"explain writes {files} files: {rest / 2**20:.1f} MiB besides pyramid.json ({pyr / 2**20:.0f} MiB)  (target <= 15 MB)"
    )
    print(
        f"pyramid.json written at {ours:.0f} MB/s; json.dumps of the same document {base:.0f} MB/s ({ours / base:.1f}x)  (target >= 100 MB/s)"
    )
    if args.against:
        for k, what in (("explain_other", "defaults"), ("no_report_other", "--no-report")):
            print(f"{args.against.name} explain {what:12s}      {med[k]:6.2f} s  "
                  f"{med[k] / med['plain']:.2f}x")  # fmt: skip
    print(f"two plain processes (r3d, keras_r3d)    {med['plain2']:6.2f} s  1.00x")
    print(
        f"cfp compare r3d keras_r3d               {med['compare']:6.2f} s  {med['compare'] / med['plain2']:.2f}x  (target <= 2.0x)"
    )
    print(
        f"compare writes {cfiles} files: {crest / 2**20:.1f} MiB besides the pyramids ({cpyr / 2**20:.1f} MiB)"
    )
    print(f"report in headless Chromium (1920x1080): first contentful paint {paint * 1000:.0f} ms, "
          f"every tube drawable after {ready * 1000:.0f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
