"""Whole-or-nothing outputs under SIGINT/SIGTERM: a real ``cfp`` subprocess signalled mid-write
leaves the previous result or nothing, and no temporary folder."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.bad_inputs.conftest import CFP, INTERRUPTED, cfp, snapshot


def _start(work: Path, *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, "CFP_TEST_SLOW_WRITE": "30"}
    args = [CFP, "explain", "m.onnx", "--clip", "clip.npy", "--out", "out", *extra]
    return subprocess.Popen(
        args, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_for_staged(work: Path, proc: subprocess.Popen[str]) -> None:
    """Until the staged folder holds the report: the run is mid-write, nothing renamed yet."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if any((p / "report.html").exists() for p in work.glob(".out.*.tmp")):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    pytest.fail("the run never staged its output")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_interrupted_first_run_leaves_nothing(work, sig):
    before = snapshot(work)
    proc = _start(work)
    _wait_for_staged(work, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == INTERRUPTED, err
    assert err.strip().splitlines() == ["cfp explain: interrupted"]
    assert snapshot(work) == before  # no out/, no .out.*.tmp


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_interrupted_overwrite_keeps_the_previous_result(work, sig):
    assert cfp("explain", "m.onnx", "--clip", "clip.npy", "--out", "out", cwd=work).returncode == 0
    before = snapshot(work)
    proc = _start(work, "--overwrite", "--theta", "0.1")
    _wait_for_staged(work, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == INTERRUPTED, err
    assert snapshot(work) == before  # the previous result, byte for byte, and no leftovers


@pytest.mark.parametrize("delay", [0.05, 0.2, 0.35, 0.5, 0.8])
def test_signal_at_any_moment_gives_old_or_new_never_partial(work, delay):
    """No hook: SIGTERM after `delay` seconds lands wherever the run is."""
    assert cfp("explain", "m.onnx", "--clip", "clip.npy", "--out", "out", cwd=work).returncode == 0
    old = snapshot(work / "out")
    args = [
        CFP,
        "explain",
        "m.onnx",
        "--clip",
        "clip.npy",
        "--out",
        "out",
        "--overwrite",
        "--theta",
        "0.1",
    ]
    proc = subprocess.Popen(
        args, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    time.sleep(delay)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    # -SIGTERM: the signal beat the interpreter to cfp's handler (nothing was started yet)
    assert proc.returncode in (0, INTERRUPTED, -signal.SIGTERM) and "Traceback" not in err, err
    assert sorted(p.name for p in work.iterdir()) == ["clip.npy", "m.onnx", "out"]
    now = snapshot(work / "out")
    if now != old:  # the new result, whole: written last, the report says the rename happened
        assert (work / "out" / "report.html").is_file() and (
            work / "out" / "pyramid.json"
        ).is_file()
        assert '"theta": 0.1' in (work / "out" / "pyramid.json").read_text()


@pytest.fixture
def tiny_disk(tmp_path):  # type: ignore[no-untyped-def]
    """A real 20 KiB file system (tmpfs), or a skip where mounting is not allowed."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20k", "tmpfs", str(mnt)],
                       capture_output=True, text=True)  # fmt: skip
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()})")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def test_full_disk_is_one_line_and_leaves_nothing(work, tiny_disk):
    r = cfp("explain", str(work / "m.onnx"), "--clip", str(work / "clip.npy"), "--out", "out",
            cwd=tiny_disk)  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert "No space left" in r.stderr and "'out'" in r.stderr and "--out" in r.stderr
    assert list(tiny_disk.iterdir()) == []  # no partial output, no staging folder
