"""`cfp explain` end to end on real encoded videos, through the installed console script."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

from cfp_onnx.outputs import MARKER
from tests.handmade import color_model, moving_square

CFP = shutil.which("cfp", path=str(Path(sys.executable).parent)) or shutil.which("cfp")


def cfp(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [CFP] if CFP else [sys.executable, "-m", "cfp_onnx.cli.main"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The hand-set colour model and a 24-frame MJPG .avi written with cv2.VideoWriter."""
    root = tmp_path_factory.mktemp("video")
    frames, _ = moving_square(24, 32, step=0.8)
    video = root / "square.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter.fourcc(*"MJPG"), 8.0, (32, 32))
    assert writer.isOpened()
    for f in frames:
        writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    writer.release()
    return {"model": color_model(root / "color.onnx"), "video": video, "root": root}


def test_explain_video_writes_pyramid_report_and_tubes(files: dict[str, Path]) -> None:
    out = files["root"] / "one"
    r = cfp("explain", str(files["model"]), "--clip", str(files["video"]), "--out", str(out),
            "--depth", "2", "--theta", "0.3", "--tubes", "strip,gif,stack")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "prediction: class 0 (red)" in r.stdout
    assert f"report: {out / 'report.html'}" in r.stdout
    pyramid = json.loads((out / "pyramid.json").read_text())
    assert pyramid["label_name"] == "red" and pyramid["nodes"]
    html = (out / "report.html").read_text()
    assert "square.avi (frames" in html and "data:image/jpeg;base64," in html
    pictures = sorted(p.name for p in (out / "tubes").iterdir())
    assert len(pictures) == 3 * len(pyramid["nodes"])  # strip, gif, stack per kernel shown
    strip = cv2.imread(str(out / "tubes" / pictures[-1]))
    assert strip is not None and strip.shape[0] == 32 and strip.shape[1] == 8 * 32 + 7 * 2


def test_sliding_windows_give_one_pyramid_per_window(files: dict[str, Path]) -> None:
    out = files["root"] / "windows"
    r = cfp("explain", str(files["model"]), "--clip", str(files["video"]), "--out", str(out),
            "--depth", "2", "--window", "10", "--stride", "6", "--no-shuffle")  # fmt: skip
    assert r.returncode == 0, r.stderr
    windows = sorted(p.name for p in out.iterdir() if p.name != MARKER)
    assert windows == [
        "index.html",
        "window_000",
        "window_001",
        "window_002",
        "window_003",
    ]  # 0, 6, 12, then 14 to reach the end
    assert "window window_003: frames 14..23" in r.stdout
    index = (out / "index.html").read_text()
    for w in windows[1:]:
        assert (out / w / "pyramid.json").is_file() and (out / w / "report.html").is_file()
        assert f'href="{w}/report.html"' in index  # the index links every window
        first = json.loads((out / w / "pyramid.json").read_text())
        assert f"{first['score']:.4g}" in index  # and lists its score


def test_no_report_no_tubes_writes_only_the_pyramid(files: dict[str, Path]) -> None:
    out = files["root"] / "bare"
    r = cfp("explain", str(files["model"]), "--clip", str(files["video"]), "--out", str(out),
            "--no-report", "--no-tubes")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "pyramid.json"]


@pytest.mark.parametrize(
    ("content", "extra", "message"),
    [
        (b"not a video at all", (), "cannot decode as video"),
        (None, ("--window", "40"), "video has 24 frames"),
        (None, ("--window", "0"), "--window must be >= 1"),
    ],
)
def test_bad_videos_and_options_fail_in_one_line(
    files: dict[str, Path], content: bytes | None, extra: tuple[str, ...], message: str
) -> None:
    video = files["video"]
    if content is not None:
        video = files["root"] / "broken.mp4"
        video.write_bytes(content)
    out = files["root"] / "never"
    r = cfp("explain", str(files["model"]), "--clip", str(video), "--out", str(out), *extra)
    assert r.returncode == 2
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_existing_output_needs_overwrite(files: dict[str, Path]) -> None:
    out = files["root"] / "taken"
    out.mkdir()  # empty: written into (SPEC §7)
    args = [str(files["model"]), "--clip", str(files["video"]), "--out", str(out), "--no-shuffle"]
    assert cfp("explain", *args).returncode == 0 and (out / "report.html").is_file()
    r = cfp("explain", *args)
    assert r.returncode == 2 and "--overwrite" in r.stderr
    assert cfp("explain", *args, "--overwrite").returncode == 0  # cfp's own output: replaced
    theirs = files["root"] / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    r = cfp("explain", *args[:-3], "--out", str(theirs), "--overwrite")
    assert r.returncode == 2 and "did not write" in r.stderr
    assert (theirs / "notes.txt").read_text() == "mine"
