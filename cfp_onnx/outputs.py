"""Whole-or-nothing outputs: everything is written under a temporary name, then renamed.

An interrupted run leaves the previous result or nothing, never a partial one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from cfp_onnx.errors import OutputError


def check_target(path: str | os.PathLike[str], *, overwrite: bool) -> Path:
    """Validate an output path before any work is done.

    Raises:
        OutputError: it exists without --overwrite, its parent is missing or unwritable,
            or a directory was expected and a file is there (or the reverse).
    """
    p = Path(path)
    parent = p.resolve().parent
    if not parent.is_dir():
        raise OutputError(f"cannot write {str(p)!r}: folder {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {str(p)!r}: folder {str(parent)!r} is not writable")
    if p.exists() or p.is_symlink():
        if not overwrite:
            raise OutputError(f"{str(p)!r} already exists; pass --overwrite to replace it")
    return p


@contextmanager
def staged_dir(target: str | os.PathLike[str], *, overwrite: bool) -> Iterator[Path]:
    """Yield a fresh temporary folder next to `target`; on success it replaces `target`."""
    dest = check_target(target, overwrite=overwrite)
    if dest.exists() and not dest.is_dir():
        raise OutputError(f"output {str(dest)!r} is a file, not a folder; choose another --out")
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.resolve().parent))
    try:
        yield tmp
        _swap_in(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(tmp: Path, dest: Path) -> None:
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old.{os.getpid()}")
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)


def write_file(
    target: str | os.PathLike[str], write: Callable[[Path], None], *, overwrite: bool
) -> Path:
    """Call ``write(tmp_path)`` then rename the temporary file onto `target`."""
    dest = check_target(target, overwrite=overwrite)
    if dest.is_dir():
        raise OutputError(f"output {str(dest)!r} is a folder, not a file")
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.resolve().parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest
