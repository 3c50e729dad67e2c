"""`cfp demo`: runs without torch, writes a report, its class tube follows the actor."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cfp_onnx import classtube, demo
from cfp_onnx.api import Explainer
from cfp_onnx.synthetic import CLASSES, demo_clip

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"

NO_TORCH = """
import sys
from cfp_onnx.cli.main import main
code = main(["demo", "--out", sys.argv[1], "--per-depth", "8"])
heavy = sorted(m for m in ("torch", "tensorflow", "keras") if m in sys.modules)
print("heavy:", heavy)
sys.exit(code)
"""


def test_cfp_demo_writes_a_report_without_torch(tmp_path: Path) -> None:
    out = tmp_path / "cfp_demo"
    r = subprocess.run([sys.executable, "-c", NO_TORCH, str(out)], capture_output=True, text=True,
                       timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "heavy: []" in r.stdout
    assert f"report: {out.resolve() / 'report.html'}" in r.stdout
    assert "prediction: class 1 (move_right)" in r.stdout
    for name in ("report.html", "pyramid.json", "demo_clip.mp4", "class_tube.npy"):
        assert (out / name).is_file()
    assert not (out / "tubes").exists()  # pictures only on request (--tubes)
    again = subprocess.run([sys.executable, "-c", NO_TORCH, str(out)], capture_output=True,
                           text=True, timeout=120)  # fmt: skip
    assert again.returncode == 2 and "--overwrite" in again.stderr


@pytest.mark.parametrize("kind", ["pyramid", "contrast"])
def test_demo_class_tube_follows_the_actor(kind: str) -> None:
    """The recommended class tube (top-5, pyramid; and contrast) of the trained demo model is hotter on
    the moving object than off it in most frames, and its evidence moves right with it.
    (Its depth-0 maps are 4x4 cells of 28 px at 112 px: a per-frame peak is too coarse.)"""
    clip, truth = demo.clip(0), demo_clip(0)
    ex = Explainer(demo.model_path(), clip_shape=clip.tensor.shape)
    run = ex.run(clip.tensor, depth=3, full=(*ex.map_tensors(3), *classtube.tensors(ex, kind, 3)))
    assert CLASSES[int(np.argmax(run.logits))] == "move_right"
    pyr = ex.pyramid(run, depth=3, theta=0.0, top_n=5)
    assert pyr.max_depth_reached == 2
    tube = classtube.class_tube(ex, run, pyr, clip.frames.shape[:3], kind)
    mask = truth.mask.astype(bool)
    hotter = [tube[t][mask[t]].mean() > tube[t][~mask[t]].mean() for t in range(len(tube))]
    assert sum(hotter) >= 0.75 * len(hotter), hotter
    pos = np.maximum(tube, 0).sum(axis=1)  # [T, W]: positive evidence per column
    centre = (pos * np.arange(pos.shape[1])).sum(axis=1) / pos.sum(axis=1)
    assert centre[-1] - centre[0] > 10, centre  # the actor travels 34-56 px to the right


def test_shipped_model_is_a_trained_benchmark_model() -> None:
    """assets/demo.onnx is benchmarks/models/<name>.onnx byte for byte, small, and its
    training record (shipped beside it) shows >= 90 % validation accuracy."""
    shipped = demo.model_path()
    assert shipped.stat().st_size < 5 * 2**20
    record = json.loads(shipped.with_suffix(".json").read_text())
    assert record["val_accuracy"] >= 0.9 and record["val_clips"] >= 100
    source = BENCH / "models" / f"{record['config']['name']}.onnx"
    assert source.read_bytes() == shipped.read_bytes()
    assert json.loads(source.with_suffix(".json").read_text()) == record
