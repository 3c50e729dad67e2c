"""Whole-or-nothing outputs: everything is written under a temporary name, then renamed.

An interrupted run leaves the previous result or nothing, never a partial one: the staged
folder is removed on any exception (Ctrl-C and SIGTERM arrive as KeyboardInterrupt), and
the renames that swap it in run with SIGINT/SIGTERM deferred.

``CFP_TEST_SLOW_WRITE=SECONDS`` (tests only, harmless): sleep that long with the output
fully staged but not yet renamed into place, so a test can signal a run mid-write.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cfp_onnx.errors import OutputError

if TYPE_CHECKING:
    from cfp_onnx.explanation import Explanation


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


# --------------------------------------------------------------------------- an explanation's files


def write(explanation: Explanation, folder: Path, *, html: str | None = None) -> list[Path]:
    """Write what `explanation.options` asks for into `folder` (staged by the caller).

    ``pyramid.json`` always (SPEC §5), ``reference.json`` + ``tree.json`` with
    ``format="reference"``, ``class_tube.npy`` (signed, clip size) with a class tube,
    ``tubes/`` pictures of the graph's kernels only when ``tube_files`` names some, and
    ``report.html`` (`html`, or rendered here) unless ``report=False``.

    Raises:
        OutputError: the disk is full, read-only, or the folder vanished.
    """
    e, opts = explanation, explanation.options
    written = [folder / "pyramid.json"]
    try:
        with written[0].open("wb") as f:
            e.pyramid.write_json(f)
        if opts.format == "reference":
            for name, doc in (
                ("reference.json", e.pyramid.to_reference()),
                ("tree.json", e.pyramid.to_tree()),
            ):
                (folder / name).write_text(json.dumps(doc))
                written.append(folder / name)
        if e.class_tube is not None:
            np.save(folder / "class_tube.npy", e.class_tube)
            written.append(folder / "class_tube.npy")
        if opts.tube_files and e.maps is not None:
            written += _tube_files(e, folder / "tubes")
        if opts.report:
            from cfp_onnx import report

            page = html if html is not None else report.render([e])
            (folder / "report.html").write_text(page, encoding="utf-8")
            written.append(folder / "report.html")
    except OSError as exc:
        where = folder.name.split(".")[1] if folder.name.startswith(".") else folder.name
        raise OutputError(
            f"cannot write the results into {where!r} ({exc.strerror or exc}); free some space "
            "or choose another --out"
        ) from None
    return written


def _tube_files(e: Explanation, folder: Path) -> list[Path]:
    """Strip/GIF/stack pictures of the graph's kernels (and the class tube), as asked."""
    from cfp_onnx import report, tubes

    assert e.maps is not None
    folder.mkdir(exist_ok=True)
    kinds, fps, size = e.options.tube_files, e.options.fps, e.clip.frames.shape[:3]
    out: list[Path] = []
    shown = e.shown
    for start in range(0, len(shown), tubes.CHUNK):
        part = shown[start : start + tubes.CHUNK]
        for node, tube in zip(part.tolist(), e.maps.tubes(part, size)):
            stem = tubes.safe_stem(node, e.pyramid.layers[int(e.pyramid.node_layer[node])],
                                   int(e.pyramid.node_channel[node]))  # fmt: skip
            blended = tubes.overlay(e.clip.frames, tube)
            out += [folder / n for n in tubes.write_kernel_files(folder, stem, blended, fps, kinds)]
    if e.class_tube is not None:
        rgb, _ = report.diverging(e.class_tube)
        blended = tubes.blend(e.clip.frames, rgb)
        out += [
            folder / n for n in tubes.write_kernel_files(folder, "class_tube", blended, fps, kinds)
        ]
    return out
