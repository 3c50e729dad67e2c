"""Synthetic actions: determinism, masks that match the actor, motion that defines the class."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import numpy as np
import pytest

from cfp_onnx.errors import OptionError
from cfp_onnx.synthetic import CLASSES, SyntheticClip, demo_clip, make_clip, make_dataset


@pytest.fixture(scope="module")
def dataset() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return make_dataset(6 * len(CLASSES), seed=11)


def test_classes() -> None:
    assert len(CLASSES) >= 8
    assert len(set(CLASSES)) == len(CLASSES)


def test_shapes_and_dtypes() -> None:
    clip = make_clip("rotate", np.random.default_rng(0), frames=8, size=64, distractors=3)
    assert isinstance(clip, SyntheticClip)
    assert clip.frames.shape == (8, 64, 64, 3) and clip.frames.dtype == np.uint8
    assert clip.mask.shape == (8, 64, 64) and clip.mask.dtype == bool
    assert clip.label == CLASSES.index("rotate")
    frames, masks, labels = make_dataset(10, seed=0)
    assert frames.shape == (10, 16, 112, 112, 3) and frames.dtype == np.uint8
    assert masks.shape == (10, 16, 112, 112) and masks.dtype == bool
    assert labels.shape == (10,) and labels.dtype == np.int64


def test_every_class_balanced(dataset: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    labels = dataset[2]
    np.testing.assert_array_equal(np.bincount(labels, minlength=len(CLASSES)), 6)
    assert not np.array_equal(labels, np.sort(labels))  # shuffled


def test_deterministic_under_seed() -> None:
    a, b = make_dataset(12, seed=5), make_dataset(12, seed=5)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    c = make_dataset(12, seed=6)
    assert not np.array_equal(a[0], c[0])
    one = make_clip(3, np.random.default_rng(1))
    two = make_clip("move_down", np.random.default_rng(1))
    np.testing.assert_array_equal(one.frames, two.frames)


def test_bad_options() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(OptionError, match="unknown synthetic class 'jump'"):
        make_clip("jump", rng)
    with pytest.raises(OptionError, match="out of range"):
        make_clip(len(CLASSES), rng)
    with pytest.raises(OptionError, match="frames=1"):
        make_clip(0, rng, frames=1)
    with pytest.raises(OptionError):
        make_dataset(0, seed=0)


def test_mask_is_exactly_the_actor(dataset: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    """Inside the mask every pixel is the actor's solid colour plus 0..15 noise, and bright."""
    frames, masks, _ = dataset
    for clip, mask in zip(frames, masks, strict=True):
        assert mask.any()
        inside = clip[mask].astype(int)
        outside = clip[~mask].astype(int)
        assert inside.mean() > outside.mean() + 50
        for frame, m in zip(clip, mask, strict=True):
            if m.any():
                span = np.ptp(frame[m].astype(int), axis=0)
                assert span.max() <= 15  # one solid colour: nothing else leaks into the mask


def test_actor_stays_inside_the_frame(dataset: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    masks = dataset[1]
    border = (
        masks[:, :, 0].sum()
        + masks[:, :, -1].sum()
        + masks[:, :, :, 0].sum()
        + masks[:, :, :, -1].sum()
    )
    assert border == 0


# ----------------------------------------------------------------- motion statistics


def motion_stats(mask: np.ndarray) -> dict[str, float]:
    """Summary of the actor's motion computed from its mask alone."""
    area = mask.sum(axis=(1, 2)).astype(float)
    shown = np.flatnonzero(area > 0)
    ys, xs = np.mgrid[: mask.shape[1], : mask.shape[2]]
    cx = (mask * xs).sum(axis=(1, 2))[shown] / area[shown]
    cy = (mask * ys).sum(axis=(1, 2))[shown] / area[shown]
    mu20 = (mask * xs**2).sum(axis=(1, 2))[shown] / area[shown] - cx**2
    mu02 = (mask * ys**2).sum(axis=(1, 2))[shown] / area[shown] - cy**2
    mu11 = (mask * xs * ys).sum(axis=(1, 2))[shown] / area[shown] - cx * cy
    theta = 0.5 * np.arctan2(2 * mu11, mu20 - mu02)
    turn = np.abs((np.diff(theta) + np.pi / 2) % np.pi - np.pi / 2).sum()
    steps = np.diff(cy)
    steps = steps[np.abs(steps) > 0.5]
    size = mask.shape[1]
    return {
        "dx": (cx[-1] - cx[0]) / size,
        "dy": (cy[-1] - cy[0]) / size,
        "growth": area[shown[-1]] / area[shown[0]],
        "hidden": 1 - len(shown) / len(area),
        "turn": float(turn),
        "reversals": float((np.diff(np.sign(steps)) != 0).sum()),
        "spread": float(np.hypot(np.ptp(cx), np.ptp(cy)) / size),
        "rise": float(np.ptp(cy) / size),
    }


def classify(s: dict[str, float]) -> str:
    """Hand-written rules on mask statistics: each class has its own signature."""
    if s["hidden"] > 0:
        return "blink"
    if s["reversals"] > 0 and s["rise"] > 0.1 and abs(s["dx"]) < 0.05:
        return "bounce"
    if s["growth"] > 2.5 or s["growth"] < 0.4:
        return "grow" if s["growth"] > 1 else "shrink"
    if s["spread"] > 0.2:
        if abs(s["dx"]) > abs(s["dy"]):
            return "move_right" if s["dx"] > 0 else "move_left"
        return "move_down" if s["dy"] > 0 else "move_up"
    return "rotate" if s["turn"] > 1.0 else "unknown"


def test_motion_statistics_identify_every_class(
    dataset: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    _, masks, labels = dataset
    got = [classify(motion_stats(m)) for m in masks]
    assert got == [CLASSES[i] for i in labels]


@pytest.mark.parametrize("name", CLASSES)
def test_class_signature(name: str) -> None:
    for seed in range(4):
        s = motion_stats(make_clip(name, np.random.default_rng(seed)).mask)
        checks = {
            "move_left": s["dx"] < -0.25 and abs(s["dy"]) < 0.02,
            "move_right": s["dx"] > 0.25 and abs(s["dy"]) < 0.02,
            "move_up": s["dy"] < -0.25 and abs(s["dx"]) < 0.02,
            "move_down": s["dy"] > 0.25 and abs(s["dx"]) < 0.02,
            "rotate": s["turn"] > 1.2
            and s["spread"] < 0.1,  # a triangle turns about its box centre
            "grow": s["growth"] > 3.0,
            "shrink": s["growth"] < 1 / 3.0,
            "blink": 0.2 < s["hidden"] < 0.8,
            "bounce": s["reversals"] >= 1 and abs(s["dx"]) < 0.02,
        }
        assert checks[name], (seed, s)


def test_demo_clip() -> None:
    clip = demo_clip(seed=0)
    assert clip.label == CLASSES.index("move_right")
    s = motion_stats(clip.mask)
    assert s["dx"] > 0.25 and s["hidden"] == 0
    assert not np.array_equal(demo_clip(seed=1).frames, clip.frames)
    np.testing.assert_array_equal(demo_clip(seed=0).frames, clip.frames)


def test_generation_is_fast() -> None:
    start = time.perf_counter()
    make_dataset(200, seed=0)
    assert time.perf_counter() - start < 10  # ~0.3 s on one free core; generous for shared CI


def test_generate_script_writes_npz(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "generate.py"
    spec = importlib.util.spec_from_file_location("generate", script)
    assert spec is not None and spec.loader is not None
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    out = tmp_path / "d.npz"
    assert (
        generate.main(
            ["--n", "9", "--seed", "2", "--frames", "8", "--size", "48", "--out", str(out)]
        )
        == 0
    )
    assert "9 clips of 8x48x48" in capsys.readouterr().out
    with np.load(out) as data:
        frames, masks, labels = make_dataset(9, 2, frames=8, size=48)
        np.testing.assert_array_equal(data["frames"], frames)
        np.testing.assert_array_equal(data["masks"], masks)
        np.testing.assert_array_equal(data["labels"], labels)
        assert tuple(data["classes"]) == CLASSES
    assert [p.name for p in tmp_path.iterdir()] == ["d.npz"]
