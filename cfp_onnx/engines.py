"""Where ``cfp batch`` computes: in this process (``local``) or on a Ray cluster (``ray``).

An engine turns clip tasks into outcomes; it never writes. The driver writes every
result and rebuilds the aggregates from the files, so engines can differ in order and
placement but not in results: every engine runs the same ``ClipWorker`` code.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from cfp_onnx.batch import ClipFailure, ClipTask, ClipWorker, Outcome, WorkerSpec
from cfp_onnx.errors import CfpError, OptionError

log = logging.getLogger(__name__)

_DONE = object()


class Engine(Protocol):
    """Turns tasks into outcomes, in any order, one outcome per task."""

    def results(
        self, spec: WorkerSpec, tasks: Sequence[ClipTask], first: ClipWorker
    ) -> Iterator[Outcome]: ...


@dataclass(frozen=True)
class LocalEngine:
    """This process: a decoder thread fills a bounded queue, the caller's thread explains.

    The queue bounds memory to ``prefetch`` decoded clips whatever the dataset's size,
    and decoding (OpenCV releases the GIL) overlaps the forward passes.
    """

    prefetch: int = 4

    def results(
        self, spec: WorkerSpec, tasks: Sequence[ClipTask], first: ClipWorker
    ) -> Iterator[Outcome]:
        q: queue.Queue[Any] = queue.Queue(maxsize=max(1, self.prefetch))
        stop = threading.Event()
        thread = threading.Thread(
            target=_decode_into, args=(first, tasks, q, stop), daemon=True, name="cfp-decode"
        )
        thread.start()
        try:
            while (item := q.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                task, clip = item
                if isinstance(clip, ClipFailure):
                    yield clip
                    continue
                try:
                    yield first.explain(task, clip)
                except CfpError as exc:
                    yield ClipFailure(task.id, str(exc))
        finally:
            # Wait for the decoder, never leave it running: a daemon thread inside OpenCV
            # when the interpreter exits is killed by a forced unwind through C++ frames,
            # which aborts the process ("FATAL: exception not rethrown", exit 134) instead
            # of the 130 an interrupt owes. It stops at its next clip boundary.
            stop.set()
            _drain(q)
            thread.join()


def _decode_into(
    worker: ClipWorker, tasks: Sequence[ClipTask], q: queue.Queue[Any], stop: threading.Event
) -> None:
    try:
        for task in tasks:
            if stop.is_set():
                return
            try:
                item: Any = (task, worker.decode(task))
            except CfpError as exc:
                item = (task, ClipFailure(task.id, str(exc)))
            _put(q, item, stop)
        _put(q, _DONE, stop)
    except BaseException as exc:  # a bug in decoding: hand it to the caller's thread
        _put(q, exc, stop)


def _put(q: queue.Queue[Any], item: Any, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return
        except queue.Full:
            continue


def _drain(q: queue.Queue[Any]) -> None:
    while True:
        try:
            q.get_nowait()
        except queue.Empty:
            return


@dataclass(frozen=True)
class RayEngine:
    """A Ray cluster: one actor per worker, each with its own Explainer, clips by path.

    Clips are decoded on the workers, so their paths must be readable there (a shared
    file system on a real cluster). At most ``in_flight`` clips per actor are pending:
    results stream back and memory stays flat on the driver.

    Args:
        address: an existing cluster (``ray://...`` or ``auto``); None starts a local one.
        workers: actors to start (default: the cluster's CPUs).
        in_flight: pending clips per actor.
    """

    address: str | None = None
    workers: int | None = None
    in_flight: int = 2
    num_cpus: int | None = None  # for a local cluster only

    def results(
        self, spec: WorkerSpec, tasks: Sequence[ClipTask], first: ClipWorker
    ) -> Iterator[Outcome]:
        ray = _import_ray()
        started = self._connect(ray)
        try:
            yield from self._run(ray, spec, tasks)
        finally:
            if started:
                ray.shutdown()

    def _connect(self, ray: Any) -> bool:
        if ray.is_initialized():
            return False
        kwargs: dict[str, Any] = {
            "log_to_driver": False,
            "include_dashboard": False,
            "logging_level": logging.ERROR,  # its INFO/WARNING lines are not the user's errors
        }
        if self.address:
            kwargs["address"] = self.address
        elif self.num_cpus:
            kwargs["num_cpus"] = self.num_cpus
        try:
            ray.init(**kwargs)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise OptionError(f"cannot reach the Ray cluster {self.address!r}: {exc}") from None
        return True

    def _run(self, ray: Any, spec: WorkerSpec, tasks: Sequence[ClipTask]) -> Iterator[Outcome]:
        if not tasks:
            return
        n = self.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        actor_cls = ray.remote(num_cpus=1)(_RayWorker)
        actors = [actor_cls.remote(spec) for _ in range(min(n, len(tasks)))]
        pending: dict[Any, Any] = {}
        todo = iter(tasks)
        for actor in actors:
            for _ in range(self.in_flight):
                _submit(pending, actor, todo)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            actor = pending.pop(ready[0])
            yield ray.get(ready[0])
            _submit(pending, actor, todo)


def _submit(pending: dict[Any, Any], actor: Any, todo: Iterator[ClipTask]) -> None:
    task = next(todo, None)
    if task is not None:
        pending[actor.explain.remote(task)] = actor


class _RayWorker:
    """A Ray actor holding one ClipWorker (the model analysed once per actor)."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.worker = ClipWorker(spec)

    def explain(self, task: ClipTask) -> Outcome:
        return self.worker(task)


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise OptionError(
            "--engine ray needs Ray, which is not installed: pip install 'cfp_onnx[ray]'"
        ) from None
    return ray


ENGINES = ("local", "ray")


def make_engine(
    name: str, *, address: str | None = None, workers: int | None = None
) -> LocalEngine | RayEngine:
    """An engine by name (the CLI's ``--engine``)."""
    if name == "local":
        if address:
            raise OptionError("--address needs --engine ray")
        return LocalEngine()
    if name == "ray":
        _import_ray()  # not installed: say so before any clip is decoded
        return RayEngine(address=address, workers=workers)
    raise OptionError(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}")
