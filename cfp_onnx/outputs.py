"""Whole-or-nothing outputs: everything is written under a temporary name, then renamed.

An interrupted run leaves the previous result or nothing, never a partial one: the staged
folder is removed on any exception (Ctrl-C and SIGTERM arrive as KeyboardInterrupt), and
the renames that swap it in run with SIGINT/SIGTERM deferred.

``CFP_TEST_SLOW_WRITE=SECONDS`` (tests only, harmless): sleep that long with the output
fully staged but not yet renamed into place, so a test can signal a run mid-write.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
import time
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
        _test_pause()
        with _deferred_signals():
            _swap_in(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _test_pause() -> None:
    """The CFP_TEST_SLOW_WRITE hook (see the module doc)."""
    try:
        seconds = float(os.environ.get("CFP_TEST_SLOW_WRITE", "0"))
    except ValueError:
        return
    if seconds > 0:
        time.sleep(seconds)


@contextmanager
def _deferred_signals() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block ends, then act on them: renames are not split."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[signal.Signals] = []
    wanted = (signal.SIGINT, signal.SIGTERM)
    old = {
        s: signal.signal(s, lambda num, frame: caught.append(signal.Signals(num))) for s in wanted
    }
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        if caught:
            handler = old[caught[0]]
            if callable(handler):
                handler(caught[0], None)
            elif handler == signal.SIG_DFL:
                raise KeyboardInterrupt


def _swap_in(tmp: Path, dest: Path) -> None:
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old.{os.getpid()}")
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)


def write_file(
    target: str | os.PathLike[str], write: Callable[[Path], object], *, overwrite: bool
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
        _test_pause()
        with _deferred_signals():
            os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest
