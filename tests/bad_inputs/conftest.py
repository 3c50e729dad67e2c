"""Helpers for the bad-input suite: the real console script, and a folder snapshot.

Every case runs ``cfp`` as a user would (a subprocess of the installed console script)
and checks SPEC §7: the exit code, one line on stderr with no traceback, and that the
working folder -- where ``--out`` points -- is exactly as it was before.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests.handmade import color_model, moving_square, to_tensor

CFP = str(Path(sys.executable).with_name("cfp"))
USER_ERROR, INTERRUPTED = 2, 130


def cfp(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run the installed ``cfp`` script in `cwd`."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [CFP, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env
    )


Snapshot = dict[str, tuple[str, int, int]]


def snapshot(root: Path) -> Snapshot:
    """Every entry under `root` (hidden ones included): kind, size, mtime_ns."""
    out: Snapshot = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            kind = "link" if p.is_symlink() else "dir" if p.is_dir() else "file"
            size = 0 if kind == "dir" else st.st_size
            out[str(p.relative_to(root))] = (kind, size, st.st_mtime_ns)
    return out


def assert_one_line_error(
    r: subprocess.CompletedProcess[str], *fragments: str, code: int = USER_ERROR
) -> None:
    """Exit `code`, exactly one stderr line, no traceback, every fragment in it."""
    assert r.returncode == code, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A folder with a good tiny model (m.onnx, 3 classes, clip (1, 3, 8, 32, 32)) and clip."""
    color_model(tmp_path / "m.onnx")
    frames, _ = moving_square()
    np.save(tmp_path / "clip.npy", to_tensor(frames))
    return tmp_path


@pytest.fixture
def refused(work: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """``refused(*args, fragments=(...), code=2)``: run cfp in `work`, check it refuses
    with one line and leaves the folder untouched (no --out folder, no temp files)."""

    def check(
        *args: str, fragments: tuple[str, ...] = (), code: int = USER_ERROR, cwd: Path = work
    ) -> subprocess.CompletedProcess[str]:
        before = snapshot(cwd)
        r = cfp(*args, cwd=cwd)
        assert_one_line_error(r, *fragments, code=code)
        assert snapshot(cwd) == before, "the folder changed"
        return r

    return check
