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
        "explain", "m.onnx", "--clip", "clip.npy", "--out", "out", "--max-memory", "64K",
        fragments=("this explain would need about", "weights", "feature maps for tubes",
                   "the memory limit is 64.0 KiB (--max-memory)"),
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
