"""The --max-memory guard: a run that would not fit is refused before it runs, with the estimate."""

from __future__ import annotations

import numpy as np
import pytest

import cfp_onnx
from cfp_onnx import resources
from cfp_onnx.errors import OptionError, ResourceError
from tests.graphs import G


@pytest.mark.parametrize(
    ("text", "size"),
    [("2G", 2 << 30), ("512M", 512 << 20), ("1.5GiB", 3 << 29), ("4096", 4096), ("8kb", 8192)],
)
def test_sizes_parse(text, size):
    assert resources.parse_size(text) == size
    assert resources.parse_size("off") is None


@pytest.mark.parametrize("text", ["", "lots", "2X", "-1G", "0", "nan", "1e999"])
def test_bad_sizes_are_option_errors(text):
    with pytest.raises(OptionError):
        resources.parse_size(text)


def test_default_limit_is_a_share_of_available_memory(tmp_path):
    (tmp_path / "meminfo").write_text("MemTotal: 100 kB\nMemAvailable:   1000 kB\n")
    assert resources.available_memory(tmp_path / "meminfo") == 1000 * 1024
    assert resources.available_memory(tmp_path / "missing") is not None  # sysconf fallback


def test_small_limit_refuses_before_running_with_the_estimate(work, refused):
    r = refused(
        "explain", "m.onnx", "--clip", "clip.npy", "--out", "out", "--max-memory", "1M",
        fragments=("this explain would need about", "weights", "feature maps for tubes",
                   "the memory limit is 1.0 MiB (--max-memory)"),
    )  # fmt: skip
    assert r.stdout == ""  # refused before the forward: no prediction printed
    ok = refused.__globals__["cfp"](
        "explain", "m.onnx", "--clip", "clip.npy", "--out", "out", "--max-memory", "1G", cwd=work
    )
    assert ok.returncode == 0, ok.stderr


def wide_model(path, channels: int = 1 << 20):
    """A 1x1x1 conv to a million channels: ~12 MB of weights, a 4 GiB activation per clip."""
    g = G(shape=(1, 3, 8, 8, 16))
    y = g.relu(g.conv("video", 3, 8))
    w = g.const(np.full((channels, 8, 1, 1, 1), 1e-3))
    y = g.op("Conv", y, w)
    g.save(path, [g.gemm(g.pool_flatten(y), channels, 2)])
    return path


def test_huge_activations_refused_by_the_default_limit(tmp_path, monkeypatch):
    wide = wide_model(tmp_path / "wide.onnx")
    monkeypatch.setattr(resources, "available_memory", lambda: 2 << 30)  # a 2 GiB machine
    clip = np.zeros((1, 3, 8, 8, 16), np.float32)
    with pytest.raises(ResourceError, match=r"default: 80% of the available memory") as info:
        cfp_onnx.explain(wide, clip, depth=1)
    assert "activations 1" in str(info.value) or "GiB" in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wide.onnx"]


# ----------------------------------------------------------------- clips, before they are read


def _declared_npy(path, shape, payload: int = 0):
    """A .npy whose header declares `shape` (float32) followed by `payload` bytes."""
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": "<f4", "fortran_order": False, "shape": shape}
        )
        f.write(b"\0" * payload)


def test_npy_header_is_checked_before_the_array_is_read(work, refused):
    """A sparse 1.5 GB file that holds what it declares: refused by its header (the file is
    memory-mapped for the check, never read)."""
    np.lib.format.open_memmap(
        work / "big.npy", mode="w+", dtype=np.float32, shape=(1, 3, 8, 4000, 4000)
    ).flush()
    r = refused(
        "explain", "m.onnx", "--clip", "big.npy", "--out", "out", "--max-memory", "1G",
        fragments=("big.npy (shape (1, 3, 8, 4000, 4000), float32)", "would need about",
                   "the memory limit is 1.0 GiB (--max-memory)"),
    )  # fmt: skip
    assert r.stdout == ""


def test_npy_that_declares_more_than_it_holds_is_truncated(work, refused):
    _declared_npy(work / "lie.npy", (1, 3, 16, 20000, 20000), payload=1000)
    refused(
        "explain", "m.onnx", "--clip", "lie.npy", "--out", "out",
        fragments=("lie.npy: the file is shorter than its header's shape says", "truncated"),
    )  # fmt: skip


def test_npy_memory_is_checked_from_python_too(work):
    shape = (1, 3, 8, 4000, 4000)
    np.lib.format.open_memmap(work / "big.npy", mode="w+", dtype=np.float32, shape=shape).flush()
    with pytest.raises(ResourceError, match=r"shape \(1, 3, 8, 4000, 4000\)"):
        cfp_onnx.explain(work / "m.onnx", work / "big.npy", max_memory="1G")


@pytest.fixture
def video_clip(work):
    from cfp_onnx.video import write_video

    frames = np.random.default_rng(0).integers(0, 255, (24, 48, 64, 3), dtype=np.uint8)
    return write_video(work / "v.mp4", frames).name


@pytest.mark.parametrize("extra", [(), ("--window", "8", "--stride", "1")], ids=["clip", "windows"])
def test_huge_size_is_refused_before_any_frame_is_resized(work, refused, video_clip, extra):
    """``--size 40000,40000`` would resize each frame to 4.8 GB: refused on the first small
    frame, by the default limit, with the sizes named."""
    refused(
        "explain", "m.onnx", "--clip", video_clip, "--out", "out", "--size", "40000,40000",
        *extra,
        fragments=("a clip of 8 frames of 40000x40000 (from 48x64) would need about",
                   "default: 80% of the available memory", "--size"),
    )  # fmt: skip


def test_clip_limit_is_the_explains_limit(work, refused, video_clip):
    """The same clip fits by default but not under a small --max-memory."""
    refused(
        "explain", "m.onnx", "--clip", video_clip, "--out", "out", "--size", "256,256",
        "--max-memory", "10M",
        fragments=("a clip of 8 frames of 256x256", "(--max-memory)"),
    )  # fmt: skip
