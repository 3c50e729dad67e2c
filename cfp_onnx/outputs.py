"""Whole-or-nothing outputs: everything is written under a temporary name, then renamed.

An interrupted run leaves the previous result or nothing, never a partial one: the staged
folder is removed on any exception (Ctrl-C and SIGTERM arrive as KeyboardInterrupt), and
the renames that swap it in run with SIGINT/SIGTERM deferred.

``CFP_TEST_SLOW_WRITE=SECONDS`` (tests only, harmless): sleep that long with the output
fully staged but not yet renamed into place, so a test can signal a run mid-write.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from cfp_onnx.errors import OutputError
from cfp_onnx.options import as_path

if TYPE_CHECKING:
    from cfp_onnx.explanation import Explanation
    from cfp_onnx.pyramid import Pyramid


MARKER = ".cfp-output.json"
"""Written into every output folder: what made it. --overwrite replaces only such folders."""
_STAGE = re.compile(r"^\.(?P<name>.+)\.cfp(?P<pid>\d+)\.[^.]*\.(tmp|old)$")


def check_target(
    path: str | os.PathLike[str], *, overwrite: bool, protect: Iterable[Any] = ()
) -> Path:
    """Validate an output path before any work is done; returns it resolved (a symlinked
    --out is followed once, here, and never renamed away).

    An existing *empty* folder is written into. An existing output is replaced only with
    `overwrite`, and only when cfp wrote it (it holds MARKER). An --out that is, or holds,
    the current folder, ``/`` or any path in `protect` (the model, clips, input folders)
    is refused whatever the flags.

    Raises:
        OutputError: any of the above, or a missing or unwritable parent.
        OptionError: `path` is not a path.
    """
    p = as_path(path, "out must be a path to a folder")
    dest = guard(p, protect)
    parent = dest.parent
    if not parent.is_dir():
        raise OutputError(f"cannot write {str(p)!r}: folder {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {str(p)!r}: folder {str(parent)!r} is not writable")
    # A link to a path not made yet is followed (``ln -s /mnt/big/results out``); a link
    # that leads nowhere (a loop) exists in its own right and is not written through.
    if os.path.lexists(dest):
        if dest.is_dir() and not any(dest.iterdir()):
            return dest  # empty: not an output, written into
        if not overwrite:
            raise OutputError(f"{str(p)!r} already exists; pass --overwrite to replace it")
        if dest.is_dir() and not (dest / MARKER).is_file():
            raise OutputError(
                f"{str(p)!r} holds files cfp did not write (no {MARKER}); --overwrite replaces "
                "only cfp's own results: move them or choose another --out"
            )
    return dest


def guard(path: Path, protect: Iterable[Any] = (), flag: str = "--out") -> Path:
    """`path` resolved, unless it is or holds the current folder, ``/`` or a protected path.

    Raises:
        OutputError: naming what the output would have replaced.
    """
    dest = Path(os.path.realpath(path))  # realpath: a symlink loop is the clip's error, later
    here = Path(os.path.realpath(os.getcwd()))
    for q in (here, Path("/"), *protect):
        held = Path(os.path.realpath(q))
        if held == dest or dest in held.parents:
            what = "the current folder" if held == here else f"{str(q)!r}"
            raise OutputError(
                f"{flag} {str(path)!r} is or holds {what}, which cfp must not replace; choose "
                "another path for the results"
            )
    return dest


def marker(**fields: Any) -> dict[str, Any]:
    """The MARKER document: the command line and what the caller adds (model, its hash)."""
    from cfp_onnx import __version__

    return {"tool": "cfp_onnx", "version": __version__, "command": sys.argv, **fields}


@contextmanager
def staged_dir(
    target: str | os.PathLike[str],
    *,
    overwrite: bool,
    protect: Iterable[Any] = (),
    mark: dict[str, Any] | Callable[[], dict[str, Any]] | None = None,
) -> Iterator[Path]:
    """Yield a fresh temporary folder next to `target`; on success it replaces `target`.

    The swap never replaces another run's result: a new or empty target is taken with one
    rename (which fails on a folder someone else filled meanwhile), and a replaced one must
    still be cfp's. Staging folders of killed runs (their process gone) are removed first.
    """
    dest = check_target(target, overwrite=overwrite, protect=protect)
    if os.path.lexists(dest) and not dest.is_dir():
        what = "a link that leads nowhere" if dest.is_symlink() else "a file"
        raise OutputError(f"output {str(target)!r} is {what}, not a folder; choose another --out")
    clean_stale(dest)
    tmp = Path(
        tempfile.mkdtemp(prefix=f".{dest.name}.cfp{os.getpid()}.", suffix=".tmp", dir=dest.parent)
    )
    try:
        permissions(tmp, folder=True)
        yield tmp
        if mark is not None:
            doc = mark() if callable(mark) else mark
            (tmp / MARKER).write_text(json.dumps(doc, indent=1, default=str))
        _test_pause()
        with _deferred_signals():
            _swap_in(tmp, dest, str(target), overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def permissions(path: str | os.PathLike[str], *, folder: bool) -> None:
    """Give a staged file or folder the mode a plain create would (mkstemp/mkdtemp make
    them private): 0o666 or 0o777 less the umask."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if folder else 0o666) & ~mask)


def clean_stale(dest: Path) -> None:
    """Remove staging folders next to `dest` left by cfp runs whose process is gone."""
    try:
        entries = list(os.scandir(dest.parent))
    except OSError:
        return
    for e in entries:
        m = _STAGE.match(e.name)
        if m is None or m["name"] != dest.name or _alive(int(m["pid"])):
            continue
        if e.is_dir(follow_symlinks=False):
            shutil.rmtree(e.path, ignore_errors=True)
        else:
            with suppress(OSError):
                os.unlink(e.path)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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


def _swap_in(tmp: Path, dest: Path, shown: str, overwrite: bool) -> None:
    """Rename `tmp` onto `dest` without ever replacing another run's result."""
    if overwrite and dest.is_dir() and any(dest.iterdir()):  # checked: cfp's own output
        if not (dest / MARKER).is_file():
            raise OutputError(f"{shown!r} was filled by files cfp did not write; kept them")
        old = dest.with_name(f".{dest.name}.cfp{os.getpid()}.x.old")
        os.rename(dest, old)
        try:
            os.rename(tmp, dest)
        except OSError:
            with suppress(OSError):
                os.rename(old, dest)
            raise OutputError(f"another run wrote {shown!r} meanwhile; it was kept") from None
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        os.rename(tmp, dest)  # an empty folder is replaced; a filled one makes this fail
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise OutputError(
                f"another run wrote {shown!r} while this one ran; its result was kept and "
                "this one discarded: run again with another --out (or --overwrite)"
            ) from None
        raise


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
        permissions(tmp, folder=False)
        try:
            write(tmp)
        except OSError as exc:
            raise OutputError(
                f"cannot write {str(target)!r} ({exc.strerror or exc}); free some space or "
                "choose another output"
            ) from None
        _test_pause()
        with _deferred_signals():
            os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest


# --------------------------------------------------------------------------- an explanation's files


class _Abandoned(Exception):
    """The early pyramid.json writer was told to stop (the run failed or was interrupted)."""


class _Stoppable:
    """A binary file whose writes stop once `stop` is set."""

    def __init__(self, f: BinaryIO, stop: threading.Event) -> None:
        self._f, self._stop = f, stop

    def write(self, data: bytes) -> int:
        if self._stop.is_set():
            raise _Abandoned
        return self._f.write(data)


class EarlyPyramid:
    """``pyramid.json`` written on a thread from the moment the pyramid exists.

    The file of a ResNet-50-3D pyramid is 124 MB and takes ~0.4 s to format and write;
    the rest of an explanation (every kernel's map, the frame-shuffle run, the class tube,
    the page) does not need it, so the two overlap. `write` waits for it and raises its
    error; a failed or interrupted run stops it before its staging folder is removed.

    `parallel`: format it on threads of its own; leave it False when the explanation has
    more to compute meanwhile (``explanation.busy_after_pyramid``)."""

    def __init__(self, folder: Path, *, parallel: bool = True) -> None:
        self.path = folder / "pyramid.json"
        self.parallel = parallel
        self._stop = threading.Event()
        self._future: Future[None] | None = None

    def start(self, pyramid: Pyramid) -> None:
        if self._future is None:
            self._future = _early_pool().submit(self._write, pyramid)

    def _write(self, pyramid: Pyramid) -> None:
        with self.path.open("wb") as f:
            pyramid.write_json(_Stoppable(f, self._stop), parallel=self.parallel)  # type: ignore[arg-type]

    def wait(self) -> bool:
        """Block until the file is written (raising the writer's error); False if it
        was never started."""
        if self._future is None:
            return False
        self._future.result()
        return True

    def stop(self) -> None:
        """Stop the writer, if it still runs, and wait for it to leave the file."""
        self._stop.set()
        if self._future is not None:
            with suppress(Exception):
                self._future.result()


@contextmanager
def early_pyramid(folder: Path, *, parallel: bool = True) -> Iterator[EarlyPyramid]:
    """An `EarlyPyramid` for `folder`, always stopped and joined on leaving."""
    early = EarlyPyramid(folder, parallel=parallel)
    try:
        yield early
    finally:
        early.stop()


@lru_cache(maxsize=1)
def _early_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="cfp-pyramid-json")


def write(
    explanation: Explanation,
    folder: Path,
    *,
    html: str | None = None,
    early: EarlyPyramid | None = None,
) -> list[Path]:
    """Write what `explanation.options` asks for into `folder` (staged by the caller).

    ``pyramid.json`` always (SPEC §5), ``reference.json`` + ``tree.json`` with
    ``format="reference"``, ``class_tube.npy`` (signed, clip size) with a class tube,
    ``faithfulness.json`` with the faithfulness check,
    ``tubes/`` pictures of the graph's kernels only when ``tube_files`` names some, and
    ``report.html`` (`html`, or rendered here) unless ``report=False``. With `early`
    started on this explanation's pyramid, ``pyramid.json`` is the file it writes.

    Raises:
        OutputError: the disk is full, read-only, or the folder vanished.
    """
    e, opts = explanation, explanation.options
    written = [folder / "pyramid.json"]
    try:
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
        if e.faithfulness is not None:
            (folder / "faithfulness.json").write_text(json.dumps(e.faithfulness.to_dict()))
            written.append(folder / "faithfulness.json")
        if opts.tube_files and e.maps is not None:
            written += _tube_files(e, folder / "tubes")
        if opts.report:
            from cfp_onnx import report

            page = html if html is not None else report.render([e])
            (folder / "report.html").write_text(page, encoding="utf-8")
            written.append(folder / "report.html")
        if early is None or not early.wait():
            with written[0].open("wb") as f:
                e.pyramid.write_json(f)
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
