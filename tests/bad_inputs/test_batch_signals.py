"""Ctrl-C and SIGTERM during ``cfp batch`` on real videos: exit 130, one line, the finished
clips whole, no staging left. The decode thread is inside OpenCV when the signal lands;
left running at exit, it used to abort the process ("FATAL: exception not rethrown", 134)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from cfp_onnx.video import write_video
from tests.bad_inputs.conftest import CFP, INTERRUPTED


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    folder = tmp_path_factory.mktemp("videos")
    rng = np.random.default_rng(0)
    for i in range(150):
        write_video(folder / f"c{i:03d}.mp4", rng.integers(0, 255, (40, 64, 64, 3), np.uint8))
    return folder


def _finished(clips: Path) -> list[Path]:
    return [p for p in clips.glob("*/pyramid.json") if not p.parent.name.startswith(".")]


def _interrupt(work: Path, videos: Path, sig: int, *extra: str, after: int = 3) -> str:
    proc = subprocess.Popen(
        [CFP, "batch", "m.onnx", "--clips", str(videos), "--out", "out", "--no-progress", *extra],
        cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    clips, deadline = work / "out" / "clips", time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if clips.is_dir() and len(_finished(clips)) >= after:
            break
        time.sleep(0.01)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == INTERRUPTED, (proc.returncode, err)
    return err


def _assert_intact(work: Path, videos: Path) -> None:
    clips = work / "out" / "clips"
    done = _finished(clips)
    assert 3 <= len(done) < len(list(videos.iterdir()))
    for p in done:  # every finished clip is whole
        assert json.loads(p.read_text())["nodes"] is not None
    leftovers = [p for p in (work / "out").rglob(".*") if p.name != ".cfp-output.json"]
    assert leftovers == [], leftovers


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_local_batch_interrupted_exits_130_with_finished_clips_whole(work, videos, sig):
    err = _interrupt(work, videos, sig)
    assert err.strip().splitlines() == ["cfp batch: interrupted"], err
    _assert_intact(work, videos)


def test_ray_batch_interrupted_exits_130_with_finished_clips_whole(work, videos):
    pytest.importorskip("ray")
    env_cpus = os.environ.get("CFP_TEST_RAY_CPUS", "2")
    err = _interrupt(work, videos, signal.SIGINT, "--engine", "ray", "--workers", env_cpus)
    assert err.strip().splitlines() == ["cfp batch: interrupted"], err
    _assert_intact(work, videos)
