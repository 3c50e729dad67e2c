"""Clip loading: real encoded files, frame folders, sampling, preprocessing, errors."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from cfp_onnx.errors import ClipError, OptionError
from cfp_onnx.video import (
    Preprocess,
    iter_windows,
    load_clip,
    natural_key,
    read_frames,
    resize_crop,
    sample_indices,
    sliding_windows,
    tensor_to_frames,
    to_tensor,
    write_video,
)

# Solid colours survive lossy codecs; a ramp in one channel tells frames apart.
T, H, W = 12, 48, 64


def ramp_frames(n: int = T, h: int = H, w: int = W) -> np.ndarray:
    """Frame i is solid (200, 20 * i, 40): its green channel encodes its index."""
    frames = np.empty((n, h, w, 3), dtype=np.uint8)
    frames[..., 0] = 200
    frames[..., 1] = (np.arange(n) * 20)[:, None, None]
    frames[..., 2] = 40
    return frames


def write_folder(folder: Path, frames: np.ndarray, names: list[str]) -> None:
    folder.mkdir(exist_ok=True)
    for frame, name in zip(frames, names, strict=True):
        cv2.imwrite(str(folder / name), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))


@pytest.fixture(scope="module")
def mp4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_video(tmp_path_factory.mktemp("v") / "ramp.mp4", ramp_frames())


@pytest.fixture(scope="module")
def avi(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_video(tmp_path_factory.mktemp("v") / "ramp.avi", ramp_frames())


# ----------------------------------------------------------------- decoding


@pytest.mark.parametrize("name", ["mp4", "avi"])
def test_encoded_video_decodes_to_its_frames(name: str, request: pytest.FixtureRequest) -> None:
    frames = read_frames(request.getfixturevalue(name))
    assert frames.shape == (T, H, W, 3)
    assert frames.dtype == np.uint8
    # lossy codec: each frame's mean colour within a few levels of what was written
    means = frames.reshape(T, -1, 3).mean(axis=1)
    np.testing.assert_allclose(means, ramp_frames().reshape(T, -1, 3).mean(axis=1), atol=6)


def test_write_video_leaves_no_temporary_files(tmp_path: Path) -> None:
    write_video(tmp_path / "a.mp4", ramp_frames(4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4"]


def test_write_video_rejects_non_frames(tmp_path: Path) -> None:
    with pytest.raises(ClipError, match="uint8 frames"):
        write_video(tmp_path / "a.mp4", np.zeros((4, 8, 8), dtype=np.uint8))
    assert not list(tmp_path.iterdir())


def test_folder_loads_in_natural_order(tmp_path: Path) -> None:
    frames = ramp_frames(11, 16, 16)
    names = [f"frame{i}.png" for i in range(11)]  # frame10 sorts after frame9
    write_folder(tmp_path / "f", frames[::-1], names[::-1])  # creation order must not matter
    (tmp_path / "f" / "notes.txt").write_text("not a frame")
    (tmp_path / "f" / ".hidden.png").write_bytes(b"junk")
    np.testing.assert_array_equal(read_frames(tmp_path / "f"), frames)  # png is lossless


def test_natural_key_orders_digit_runs_as_numbers() -> None:
    names = ["img_10.jpg", "img_2.jpg", "img_1.jpg", "IMG_3.jpg", "img_02b.jpg"]
    assert sorted(names, key=natural_key) == [
        "img_1.jpg",
        "img_2.jpg",
        "img_02b.jpg",
        "IMG_3.jpg",
        "img_10.jpg",
    ]


def test_clip_from_folder_reads_only_sampled_frames(tmp_path: Path) -> None:
    write_folder(tmp_path / "f", ramp_frames(8, 16, 16), [f"{i}.png" for i in range(8)])
    (tmp_path / "f" / "3.png").write_bytes(b"corrupt, but never sampled")
    clip = load_clip(tmp_path / "f", Preprocess(frames=2, size=None))
    np.testing.assert_array_equal(clip.indices, [2, 6])
    np.testing.assert_array_equal(clip.frames[:, 0, 0, 1], [40, 120])


# ----------------------------------------------------------------- sampling


def test_uniform_sampling_takes_segment_centres() -> None:
    np.testing.assert_array_equal(sample_indices(32, 16), np.arange(1, 32, 2))
    np.testing.assert_array_equal(sample_indices(16, 16), np.arange(16))
    np.testing.assert_array_equal(sample_indices(10, 4), [1, 3, 6, 8])  # floor((i + .5) * 2.5)
    np.testing.assert_array_equal(sample_indices(100, 1), [50])


def test_strided_sampling_is_centred() -> None:
    np.testing.assert_array_equal(sample_indices(20, 4, "strided", 2), [6, 8, 10, 12])
    np.testing.assert_array_equal(sample_indices(7, 4, "strided", 2), [0, 2, 4, 6])
    np.testing.assert_array_equal(sample_indices(8, 4, "strided", 1), [2, 3, 4, 5])


def test_short_video_is_an_error_unless_looped() -> None:
    with pytest.raises(ClipError, match="video has 5 frames; the model needs 16"):
        sample_indices(5, 16)
    with pytest.raises(ClipError, match="needs 7"):
        sample_indices(6, 4, "strided", 2)
    np.testing.assert_array_equal(sample_indices(5, 8, loop=True), [0, 1, 2, 3, 4, 0, 1, 2])
    np.testing.assert_array_equal(sample_indices(5, 4, "strided", 2, loop=True), [0, 2, 4, 1])


def test_sampling_options_are_checked() -> None:
    with pytest.raises(OptionError, match="sampling 'random'"):
        sample_indices(10, 4, "random")  # type: ignore[arg-type]
    with pytest.raises(OptionError):
        sample_indices(10, 0)


def test_sliding_windows_cover_every_frame() -> None:
    got = sliding_windows(10, 4, 3)
    want = [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    assert [w.tolist() for w in got] == want
    got = sliding_windows(11, 4, 4)  # 0-3, 4-7, then end-aligned 7-10
    assert [w.tolist() for w in got] == [[0, 1, 2, 3], [4, 5, 6, 7], [7, 8, 9, 10]]
    assert [w.tolist() for w in sliding_windows(4, 4, 2)] == [[0, 1, 2, 3]]
    with pytest.raises(ClipError, match="video has 3 frames"):
        sliding_windows(3, 4, 1)


def test_windows_of_a_video(mp4: Path) -> None:
    clips = list(iter_windows(mp4, Preprocess(frames=4, size=(16, 16)), window=8, stride=4))
    # windows 0-7 and 4-11, each sampled uniformly down to 4 frames
    assert [c.indices.tolist() for c in clips] == [[1, 3, 5, 7], [5, 7, 9, 11]]
    for clip in clips:
        assert clip.tensor.shape == (1, 3, 4, 16, 16)
        np.testing.assert_allclose(clip.frames[:, 8, 8, 1], clip.indices * 20, atol=6)


# ----------------------------------------------------------------- preprocessing


def test_to_tensor_matches_hand_computation() -> None:
    frames = np.zeros((2, 1, 2, 3), dtype=np.uint8)
    frames[0, 0, 0] = [255, 0, 51]
    frames[1, 0, 1] = [0, 255, 102]
    pre = Preprocess(frames=2, size=None, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 2.0))
    x = to_tensor(frames, pre)
    assert x.shape == (1, 3, 2, 1, 2) and x.dtype == np.float32
    # channel R: (v/255 - .5) / .5 ; G: (v/255 - .25) / .25 ; B: v/255 / 2
    np.testing.assert_allclose(x[0, 0, :, 0, :], [[1, -1], [-1, -1]], atol=1e-6)
    np.testing.assert_allclose(x[0, 1, :, 0, :], [[-1, -1], [-1, 3]], atol=1e-6)
    np.testing.assert_allclose(x[0, 2, :, 0, :], [[0.1, 0], [0, 0.2]], atol=1e-6)
    nd = to_tensor(
        frames, Preprocess(frames=2, size=None, mean=pre.mean, std=pre.std, layout="NDHWC")
    )
    assert nd.shape == (1, 2, 1, 2, 3)
    np.testing.assert_array_equal(nd[0], x[0].transpose(1, 2, 3, 0))


def test_bgr_and_raw_scale() -> None:
    frames = np.array([[[[10, 20, 30]]]], dtype=np.uint8)
    pre = Preprocess(frames=1, size=None, mean=(1.0,), std=(1.0,), scale=1.0, channel_order="BGR")
    np.testing.assert_allclose(to_tensor(frames, pre)[0, :, 0, 0, 0], [29, 19, 9])


def test_resize_crop_covers_then_centre_crops() -> None:
    frame = np.zeros((60, 100, 3), dtype=np.uint8)
    frame[:, 45:55] = 255  # a vertical stripe in the middle
    out = resize_crop(frame, (30, 30))  # scale 0.5 to 30x50, crop columns 10..39
    assert out.shape == (30, 30, 3)
    assert out[:, 15].min() > 200 and out[:, 0].max() == 0
    assert resize_crop(frame, (30, 30), short_side=40).shape == (30, 30, 3)
    assert resize_crop(frame, None) is frame


def test_load_clip_from_video(mp4: Path) -> None:
    pre = Preprocess(frames=4, size=(24, 24), mean=(0.5,), std=(0.5,))
    clip = load_clip(mp4, pre)
    np.testing.assert_array_equal(clip.indices, [1, 4, 7, 10])
    assert clip.tensor.shape == (1, 3, 4, 24, 24) and clip.tensor.dtype == np.float32
    assert clip.frames.shape == (4, 24, 24, 3) and clip.frames.dtype == np.uint8
    np.testing.assert_allclose(clip.frames[:, 12, 12, 1], clip.indices * 20, atol=6)
    np.testing.assert_allclose(clip.tensor[0, 0].mean(), 200 / 255 * 2 - 1, atol=0.05)
    assert clip.source == mp4 and clip.fps == pytest.approx(8)
    strided = load_clip(mp4, Preprocess(frames=4, size=None, stride=3), sampling="strided")
    np.testing.assert_array_equal(strided.indices, [1, 4, 7, 10])


def test_npy_clip_is_used_as_is(tmp_path: Path) -> None:
    x = np.random.default_rng(0).normal(size=(3, 4, 8, 8)).astype(np.float32)
    np.save(tmp_path / "c.npy", x)
    clip = load_clip(tmp_path / "c.npy", Preprocess(frames=4, size=(112, 112)))
    np.testing.assert_array_equal(clip.tensor, x[None])
    assert clip.frames.shape == (4, 8, 8, 3)
    assert clip.frames.min() == 0 and clip.frames.max() == 255  # min-max over the clip
    expected = np.rint((x - x.min()) / (x.max() - x.min()) * 255).astype(np.uint8)
    np.testing.assert_array_equal(clip.frames, expected.transpose(1, 2, 3, 0))


def test_tensor_to_frames_channel_counts() -> None:
    x = np.arange(2 * 2 * 2 * 1, dtype=np.float32).reshape(2, 2, 2, 1)  # NDHWC-style, 1 channel
    frames = tensor_to_frames(x, "NDHWC")
    assert frames.shape == (2, 2, 2, 3)
    np.testing.assert_array_equal(frames[..., 0], frames[..., 2])
    assert tensor_to_frames(np.zeros((3, 2, 2, 2)), "NCDHW").max() == 0  # constant clip: black


# ----------------------------------------------------------------- errors


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ClipError, match="no such file or folder"):
        load_clip(tmp_path / "nope.mp4", Preprocess())


def test_symlink_loop(tmp_path: Path) -> None:
    os.symlink(tmp_path / "b.mp4", tmp_path / "a.mp4")
    os.symlink(tmp_path / "a.mp4", tmp_path / "b.mp4")
    with pytest.raises(ClipError, match="symbolic link loop"):
        read_frames(tmp_path / "a.mp4")


def test_broken_symlink(tmp_path: Path) -> None:
    os.symlink(tmp_path / "gone.mp4", tmp_path / "a.mp4")
    with pytest.raises(ClipError, match="broken symbolic link"):
        read_frames(tmp_path / "a.mp4")


def test_text_file_with_video_extension(tmp_path: Path) -> None:
    (tmp_path / "fake.mp4").write_text("this is not a video\n")
    with pytest.raises(ClipError, match="cannot decode as video"):
        read_frames(tmp_path / "fake.mp4")


def test_truncated_video(tmp_path: Path, mp4: Path) -> None:
    data = mp4.read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])  # mp4 index (moov) is at the end
    with pytest.raises(ClipError, match="cannot decode as video"):
        read_frames(tmp_path / "cut.mp4")


def test_video_with_zero_frames(tmp_path: Path, avi: Path) -> None:
    data = avi.read_bytes()
    # keep the AVI header, cut every frame: it opens but decodes nothing
    (tmp_path / "empty.avi").write_bytes(data[: data.index(b"movi") + 4])
    with pytest.raises(ClipError, match="zero frames"):
        read_frames(tmp_path / "empty.avi")


def test_folder_without_images(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("no frames here")
    with pytest.raises(ClipError, match="folder has no frame images"):
        read_frames(tmp_path)


def test_unreadable_image_in_folder(tmp_path: Path) -> None:
    write_folder(tmp_path, ramp_frames(2, 8, 8), ["0.png", "1.png"])
    (tmp_path / "2.png").write_bytes(b"\x89PNG but not really")
    with pytest.raises(ClipError, match=r"2\.png: not a readable image"):
        read_frames(tmp_path)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads any file")
def test_permission_denied_image(tmp_path: Path) -> None:
    write_folder(tmp_path, ramp_frames(2, 8, 8), ["0.png", "1.png"])
    (tmp_path / "1.png").chmod(0)
    with pytest.raises(ClipError, match="not readable"):
        read_frames(tmp_path)


def test_frames_of_different_sizes(tmp_path: Path) -> None:
    write_folder(tmp_path, ramp_frames(1, 8, 8), ["0.png"])
    write_folder(tmp_path, ramp_frames(1, 8, 10), ["1.png"])
    with pytest.raises(ClipError, match="differs from the first frame"):
        read_frames(tmp_path)


def test_unknown_extension_and_single_image(tmp_path: Path) -> None:
    (tmp_path / "clip.xyz").write_text("?")
    with pytest.raises(ClipError, match=r"unknown clip type '\.xyz'"):
        read_frames(tmp_path / "clip.xyz")
    write_folder(tmp_path, ramp_frames(1, 8, 8), ["one.png"])
    with pytest.raises(ClipError, match="single image"):
        read_frames(tmp_path / "one.png")


def test_too_short_video_names_both_lengths(mp4: Path) -> None:
    with pytest.raises(ClipError, match="video has 12 frames; the model needs 16"):
        load_clip(mp4, Preprocess(frames=16))
    looped = load_clip(mp4, Preprocess(frames=16, size=(8, 8)), loop=True)
    np.testing.assert_array_equal(looped.indices, np.arange(16) % 12)


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.full((3, 4, 8, 8), np.nan, dtype=np.float32), "NaN/Inf"),
        (np.array([[[[np.inf]]]], dtype=np.float32), "NaN/Inf"),
        (np.zeros((1, 3, 0, 8, 8), dtype=np.float32), r"shape \(1, 3, 0, 8, 8\) with a zero-size"),
        (np.zeros((3, 8, 8), dtype=np.float32), r"shape \(3, 8, 8\) \(rank 3\)"),
        (np.zeros((2, 3, 4, 8, 8), dtype=np.float32), "has batch 2"),
        (np.array([[[["a"]]]]), "not numeric"),
    ],
)
def test_bad_npy_clips(tmp_path: Path, array: np.ndarray, message: str) -> None:
    np.save(tmp_path / "c.npy", array)
    with pytest.raises(ClipError, match=message):
        load_clip(tmp_path / "c.npy", Preprocess())


def test_pickled_npy_is_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "c.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ClipError, match=r"not a plain numeric \.npy"):
        load_clip(tmp_path / "c.npy", Preprocess())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"frames": 0},
        {"size": (0, 4)},
        {"std": (1.0, 0.0, 1.0)},
        {"mean": (0.0, 0.0)},
        {"layout": "NCHW"},
        {"short_side": 50},
    ],
)
def test_preprocess_options_are_checked(kwargs: dict[str, object]) -> None:
    with pytest.raises(OptionError):
        Preprocess(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("header", ["right", "too many", "too few", "none"])
def test_sampled_frames_equal_counting_then_reading(
    mp4: Path, header: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One pass when the header's frame count is right; a wrong header (a second pass)
    or none still gives exactly the frames that counting and then reading gives."""
    from cfp_onnx import video

    opened: list[Path] = []
    real = video._capture

    class Counting(real):  # type: ignore[misc, valid-type]
        def __init__(self, path: Path) -> None:
            opened.append(path)
            super().__init__(path)

    source = video._open_source(mp4)
    assert isinstance(source, video._VideoSource) and source._reported == T
    source._reported = {"right": T, "too many": T + 5, "too few": T - 4, "none": 0}[header]
    monkeypatch.setattr(video, "_capture", Counting)
    indices, frames = source.sampled(lambda n: sample_indices(n, 5))
    assert len(opened) == (1 if header == "right" else 2)
    assert indices.tolist() == sample_indices(T, 5).tolist()
    np.testing.assert_array_equal(frames, read_frames(mp4)[indices])
