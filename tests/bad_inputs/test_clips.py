"""Bad clips: arrays, videos and folders a model cannot take -- ClipError, exit 2, nothing written."""

from __future__ import annotations

import os

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cfp_onnx.api import Explainer
from cfp_onnx.errors import ClipError
from cfp_onnx.video import write_video
from tests.handmade import moving_square

GOOD = (1, 3, 8, 32, 32)

ARRAYS = [
    ("rank-3", np.zeros((8, 32, 32), np.float32), ("rank 3",)),
    ("rank-6", np.zeros((1, 1, 3, 8, 32, 32), np.float32), ("rank 6",)),
    (
        "layout-ndhwc",
        np.zeros((1, 8, 32, 32, 3), np.float32),
        ("clip has shape (1, 8, 32, 32, 3)",),
    ),
    ("too-few-frames", np.zeros((1, 3, 4, 32, 32), np.float32), ("expects (1, 3, 8, 32, 32)",)),
    ("zero-size", np.zeros((1, 3, 0, 32, 32), np.float32), ("zero-size axis",)),
    ("batch-2", np.zeros((2, 3, 8, 32, 32), np.float32), ("has batch 2", "one clip per file")),
    ("nan", np.full(GOOD, np.nan, np.float32), ("NaN/Inf values",)),
    ("inf", np.full(GOOD, np.inf, np.float32), ("NaN/Inf values",)),
    ("overflow", np.full(GOOD, 1e300, np.float64), ("NaN/Inf",)),
    ("strings", np.full(GOOD, "x"), ("not numeric",)),
    ("complex", np.ones(GOOD, np.complex64), ("not numeric",)),
    ("bool", np.ones(GOOD, bool), ("not numeric",)),
]


@pytest.mark.parametrize(
    ("array", "fragments"), [a[1:] for a in ARRAYS], ids=[a[0] for a in ARRAYS]
)
def test_bad_npy(work, refused, array, fragments):
    np.save(work / "bad.npy", array)
    refused("explain", "m.onnx", "--clip", "bad.npy", "--out", "out", fragments=fragments)


def test_pickled_object_array_is_not_loaded(work, refused):
    np.save(work / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    refused(
        "explain",
        "m.onnx",
        "--clip",
        "obj.npy",
        "--out",
        "out",
        fragments=("not a plain numeric .npy",),
    )


def test_npy_that_is_not_npy(work, refused):
    (work / "fake.npy").write_bytes(b"\x93NUMPY garbage")
    refused("explain", "m.onnx", "--clip", "fake.npy", "--out", "out", fragments=("fake.npy",))


@pytest.fixture(scope="module")
def explainer(tmp_path_factory):
    from tests.handmade import color_model

    path = color_model(tmp_path_factory.mktemp("m") / "m.onnx")
    return Explainer(path, clip_shape=GOOD, max_memory="off")


DTYPES = st.sampled_from(
    [np.float32, np.float64, np.float16, np.int8, np.uint8, np.int64, bool, np.complex64]
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(shape=st.lists(st.integers(0, 9), min_size=0, max_size=6).map(tuple), dtype=DTYPES)
def test_random_shapes_and_dtypes(explainer, shape, dtype):
    """Any array that is not exactly the model's input raises ClipError, never anything else."""
    arr = np.ones(shape, dtype=dtype)
    if shape in (GOOD, GOOD[1:]) and dtype not in (bool, np.complex64):
        assert explainer.run(arr, depth=2).logits.shape == (3,)
        return
    with pytest.raises(ClipError):
        explainer.run(arr, depth=2)


@pytest.mark.parametrize("bad", [[1.0, 2.0], 3.0, None, {"clip": 1}])
def test_api_clip_that_is_not_an_array_or_path(explainer, bad):
    with pytest.raises(ClipError, match="clip must be a numpy array or a path") as info:
        explainer.run(bad)
    assert info.type is ClipError


# ----------------------------------------------------------------- videos and folders


def test_text_file_with_a_video_extension(work, refused):
    (work / "notes.mp4").write_text("this is not a video\n" * 50)
    refused(
        "explain",
        "m.onnx",
        "--clip",
        "notes.mp4",
        "--out",
        "out",
        fragments=("cannot decode as video",),
    )


def test_corrupt_mp4(work, refused):
    frames, _ = moving_square(frames=24)
    write_video(work / "ok.mp4", frames)
    data = (work / "ok.mp4").read_bytes()
    (work / "corrupt.mp4").write_bytes(data[: len(data) // 3])
    (work / "ok.mp4").unlink()
    r = refused("explain", "m.onnx", "--clip", "corrupt.mp4", "--out", "out")
    assert "corrupt.mp4" in r.stderr


def test_too_short_video(work, refused):
    frames, _ = moving_square(frames=3)
    write_video(work / "short.avi", frames)
    refused(
        "explain",
        "m.onnx",
        "--clip",
        "short.avi",
        "--out",
        "out",
        fragments=("video has 3 frames; the model needs 8",),
    )


def test_folder_without_images(work, refused):
    (work / "frames").mkdir()
    (work / "frames" / "readme.txt").write_text("no frames here")
    refused(
        "explain",
        "m.onnx",
        "--clip",
        "frames",
        "--out",
        "out",
        fragments=("folder has no frame images",),
    )


@pytest.mark.parametrize(
    "data", [b"\x89PNG broken", b"\x89PNG\r\n\x1a\n broken"], ids=["bad-magic", "bad-header"]
)
def test_folder_with_a_broken_image(work, refused, data):
    """A full PNG signature makes OpenCV log "[ WARN]" / "[ERROR]" lines of its own: silenced."""
    (work / "frames").mkdir()
    for i in range(8):
        (work / "frames" / f"{i:04d}.png").write_bytes(data)
    refused(
        "explain", "m.onnx", "--clip", "frames", "--out", "out", fragments=("not a readable image",)
    )


def test_symlink_loop(work, refused):
    os.symlink("loop_b.mp4", work / "loop_a.mp4")
    os.symlink("loop_a.mp4", work / "loop_b.mp4")
    refused(
        "explain",
        "m.onnx",
        "--clip",
        "loop_a.mp4",
        "--out",
        "out",
        fragments=("symbolic link loop",),
    )


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("nothing.mp4", "no such file"),
        ("clip.txt", "unknown clip type '.txt'"),
        ("one.png", "single image"),
    ],
)
def test_missing_or_unknown_clip(work, refused, name, fragment):
    if name != "nothing.mp4":
        (work / name).write_bytes(b"x")
    refused("explain", "m.onnx", "--clip", name, "--out", "out", fragments=(fragment,))


@pytest.mark.parametrize("where", ["clip", "frame"])
def test_a_fifo_is_refused_not_waited_on(work, where):
    """A named pipe as the clip, or among a folder's frames: one line, never a hang."""
    from tests.bad_inputs.conftest import cfp

    if where == "clip":
        os.mkfifo(work / "pipe.mp4")
        clip = "pipe.mp4"
    else:
        (work / "frames").mkdir()
        for i, f in enumerate(moving_square()[0]):
            cv2.imwrite(str(work / "frames" / f"{i:03d}.png"), f)
        os.mkfifo(work / "frames" / "004b.png")
        clip = "frames"
    r = cfp("explain", "m.onnx", "--clip", clip, "--out", "o", cwd=work, timeout=60)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "not a regular file" in r.stderr and not (work / "o").exists()
