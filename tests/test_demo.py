"""`cfp demo`: runs without torch, writes a report, its tubes follow the moving bar."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from cfp_onnx import demo, tubes
from cfp_onnx.api import Explainer
from cfp_onnx.synthetic import CLASSES, demo_clip

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
    for name in ("report.html", "pyramid.json", "demo_clip.mp4"):
        assert (out / name).is_file()
    assert any((out / "tubes").glob("*.gif"))
    again = subprocess.run([sys.executable, "-c", NO_TORCH, str(out)], capture_output=True,
                           text=True, timeout=120)  # fmt: skip
    assert again.returncode == 2 and "--overwrite" in again.stderr


def test_demo_tubes_follow_the_moving_bar() -> None:
    clip, truth = demo.clip(0), demo_clip(0)
    ex = Explainer(demo.model_path(), clip_shape=clip.tensor.shape)
    run = ex.run(clip.tensor, depth=3, full=tubes.map_tensors(ex, 3))
    assert CLASSES[int(np.argmax(run.logits))] == "move_right"
    pyr = ex.pyramid(run, depth=3)
    assert pyr.max_depth_reached == 2
    nodes = np.arange(len(pyr.node_layer))
    maps = tubes.TubeMaker(ex, pyr, run, clip.frames.shape[:3]).tubes(nodes).maps
    for k in nodes.tolist():
        peaks = [truth.mask[t].flat[np.argmax(f)] for t, f in enumerate(maps[k])]
        assert all(peaks), (pyr.kernel_name(k), peaks)
        cols = [np.unravel_index(np.argmax(f), f.shape)[1] for f in maps[k]]
        assert cols[-1] - cols[0] > 40  # the peak crosses the frame with the bar


def test_shipped_model_is_small_and_rebuilds_identically(tmp_path: Path) -> None:
    from cfp_onnx.exporters import demo_model

    shipped = demo.model_path()
    assert shipped.stat().st_size < 5 * 2**20
    rebuilt = demo_model.export(tmp_path / "demo.onnx")

    def weights(p: Path) -> dict[str, np.ndarray]:
        return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(p)).graph.initializer}

    a, b = weights(shipped), weights(rebuilt)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
