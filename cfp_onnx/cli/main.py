"""The ``cfp`` console script: subcommands built from small modules.

User errors (``CfpError``) print one line and exit 2; anything else is a bug and keeps
its traceback (exit 1); Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any, NoReturn, TextIO

from cfp_onnx import __version__
from cfp_onnx.errors import CfpError

SUBCOMMANDS = ("explain", "inspect", "export", "compare", "demo", "batch", "embed")
INSTALL = {
    "onnxruntime": "pip install 'cfp_onnx[cpu]' (or 'cfp_onnx[gpu]' on a CUDA machine)",
    "torch": "pip install 'cfp_onnx[torch]'",
    "onnxscript": "pip install 'cfp_onnx[torch]'",
    "tensorflow": "pip install 'cfp_onnx[tf]'",
    "tf2onnx": "pip install 'cfp_onnx[tf]'",
    "ray": "pip install 'cfp_onnx[ray]'",
}
"""What to install for a package that lives in an extra, for the one-line error."""


def _modules(names: Sequence[str] = SUBCOMMANDS) -> dict[str, ModuleType]:
    found = {}
    for name in names:
        try:
            found[name] = importlib.import_module(f"cfp_onnx.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"cfp_onnx.cli.{name}":
                raise
    return found


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, exit 2, like every other user error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The ``cfp`` parser; with `only`, the parser of that subcommand alone (the other
    subcommands' own modules are not loaded: ~10-20 ms of a 1 s ``cfp explain``)."""
    parser = _Parser(prog="cfp", description="Class Feature Pyramids for ONNX video models.")
    parser.add_argument("--version", action="version", version=f"cfp_onnx {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    parser.add_argument("-q", "--quiet", action="store_true", help="only errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    if only in SUBCOMMANDS:
        # What every subcommand runs on (onnxruntime's C extension among it) is imported
        # here, while `main` holds signals back, not later inside the command.
        importlib.import_module("cfp_onnx.commands")
    for name, module in _modules([only] if only in SUBCOMMANDS else SUBCOMMANDS).items():
        doc = (module.__doc__ or "").strip()
        p = sub.add_parser(name, help=doc.splitlines()[0] if doc else None, description=doc)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


LEAVE_AT_ONCE = frozenset({"explain", "inspect", "compare", "demo", "embed"})
"""Commands whose work is finished, every file closed and renamed into place, when they
return: the ``cfp`` script then skips the interpreter's teardown (freeing hundreds of MB
of arrays and onnxruntime sessions one object at a time: ~0.1 s of a 1 s explain).
``batch`` (Ray's shutdown) and ``export`` (torch, TensorFlow) exit normally."""


BLAS_ENV = {"OPENBLAS_THREAD_TIMEOUT": "4"}
"""Set (unless the user set them) before NumPy loads. NumPy's OpenBLAS threads busy-wait
for ~2^28 cycles after every matrix product, on the cores onnxruntime and the pyramid
need next: measured, 0.2-0.35 s of CPU in a 1.7 s ``cfp explain`` on 2 cores. 2^4
cycles: they sleep at once, and large products still use every core."""


def console() -> NoReturn:
    """The ``cfp`` script: `main`, then the exit (see `LEAVE_AT_ONCE`)."""
    for key, value in BLAS_ENV.items():
        os.environ.setdefault(key, value)
    code = main()
    if _command in LEAVE_AT_ONCE:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


_command: str | None = None


def main(argv: Sequence[str] | None = None) -> int:
    # A signal while the subcommands import (onnxruntime's C extension among them) is only
    # noted: raised inside an extension's initialisation it would surface as an ImportError.
    pending: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: pending.append(signum))
    try:
        parser = build_parser(_chosen(sys.argv[1:] if argv is None else argv))
    except ModuleNotFoundError as exc:
        return _missing(exc, "cfp")
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, _raise_interrupt)
    if pending:
        print("cfp: interrupted", file=sys.stderr)
        return 130
    args = parser.parse_args(argv)
    global _command
    _command = args.command
    stdout, sys.stdout = sys.stdout, _Stdout(sys.stdout)  # type: ignore[assignment]
    try:
        return _run(args)
    finally:
        sys.stdout.flush()  # a reader gone by now: /dev/null, not an error at exit
        sys.stdout = stdout


def _chosen(argv: Sequence[str]) -> str | None:
    """The subcommand `argv` names (its first word; the global options are flags), or None
    for ``cfp --help`` and anything else the whole parser must answer."""
    for word in argv:
        if word.startswith("-"):
            if word in ("-h", "--help"):
                return None
            continue
        return word if word in SUBCOMMANDS else None
    return None


def _run(args: argparse.Namespace) -> int:
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(
        level=logging.ERROR if args.quiet else level, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args._run(args))
    except CfpError as exc:
        print(f"cfp {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cfp {args.command}: interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as exc:
        return _missing(exc, f"cfp {args.command}")
    except BrokenPipeError:  # the reader left, seen outside the wrapper: exit quietly
        _to_devnull(sys.stdout)
        return 0


class _Stdout:
    """stdout whose reader may leave (``cfp explain ... | head -1``): later writes go to
    /dev/null and the run goes on, so its results are still written; a BrokenPipeError
    would have discarded them behind a quiet exit 0."""

    def __init__(self, stream: TextIO) -> None:
        self._stream, self._gone = stream, False

    def write(self, text: str) -> int:
        if not self._gone:
            try:
                return self._stream.write(text)
            except BrokenPipeError:
                self._leave()
        return len(text)

    def flush(self) -> None:
        if not self._gone:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._leave()

    def _leave(self) -> None:
        self._gone = True
        _to_devnull(self._stream)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _to_devnull(stream: TextIO) -> None:
    """Point `stream`'s file descriptor at /dev/null: no second error when Python flushes."""
    with contextlib.suppress(OSError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())


def _missing(exc: ModuleNotFoundError, prog: str) -> int:
    """An extra that is not installed is the user's to fix: one line, exit 2. Any other
    missing module is a broken install (a bug): the traceback stays."""
    top = (exc.name or "").split(".")[0]
    if top not in INSTALL:
        raise exc
    print(f"{prog}: error: {top} is not installed; {INSTALL[top]}", file=sys.stderr)
    return 2


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
