"""Where ``cfp batch`` computes: in this process (``local``) or on a Ray cluster (``ray``).

An engine turns clip tasks into outcomes; it never writes. The driver writes every
result and rebuilds the aggregates from the files, so engines can differ in order and
placement but not in results: every engine runs the same ``ClipWorker`` code.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from cfp_onnx.batch import ClipFailure, ClipResult, ClipTask, ClipWorker, Outcome, WorkerSpec
from cfp_onnx.errors import CfpError, OptionError

log = logging.getLogger(__name__)


class Engine(Protocol):
    """Turns tasks into outcomes, in any order, one outcome per task."""

    def results(
        self, spec: WorkerSpec, tasks: Sequence[ClipTask], first: ClipWorker
    ) -> Iterator[Outcome]: ...


def batch_for(batch: int | None, device: str) -> int:
    """Clips per forward where the model's batch is dynamic: `batch`, else 4 on a GPU and
    1 on the CPU.

    On the CPU a batch of 4 bought no throughput (the demo model: 35.1 against 35.2
    clips/s) and held 4 clips' activations (+70 MB, 1.8x a plain loop's peak), since
    onnxruntime already spreads one clip's convolutions over every core.
    """
    return max(1, batch) if batch is not None else (4 if device == "cuda" else 1)


@dataclass(frozen=True)
class LocalEngine:
    """This process: a pool of decoder threads keeps `prefetch` clips ahead, in order; the
    caller's thread runs the forwards, and on the CPU a second thread builds each clip's
    pyramid while the next clip's forward runs.

    Memory is bounded by ``prefetch`` decoded clips and one finished forward whatever the
    dataset's size. Decoding (OpenCV releases the GIL) overlaps the forwards, and so does
    the back-step, whose NumPy passes keep only ~1.3 of 2 cores busy: +4-10 % clips/s on
    ResNet-50-3D (benchmarks/README.md, Throughput).
    """

    prefetch: int = 4  # two per decoder: the same throughput as 8 (measured), half the clips held
    decoders: int = 2
    batch: int | None = None  # clips per forward where the batch is dynamic; None: batch_for
    overlap: bool = True  # on the CPU, build each pyramid beside the next forward

    def results(
        self, spec: WorkerSpec, tasks: Sequence[ClipTask], first: ClipWorker
    ) -> Iterator[Outcome]:
        ahead: deque[Future[Any]] = deque()
        todo = iter(tasks)
        batch = batch_for(self.batch, spec.device)
        pool = ThreadPoolExecutor(
            max_workers=max(1, self.decoders), thread_name_prefix="cfp-decode"
        )
        # On a GPU the back-step runs there, beside nothing to fill: not overlapped (and
        # CuPy across threads is untested here). On the CPU, from the first clip whose
        # pyramid shows it is worth a thread (see OVERLAP_S).
        overlap = self.overlap and spec.device == "cpu"
        finisher: ThreadPoolExecutor | None = None

        def refill() -> None:
            while len(ahead) < max(self.prefetch, batch):
                task = next(todo, None)
                if task is None:
                    return
                ahead.append(pool.submit(_decode, first, task))

        def finishing(run: Any) -> Any:
            nonlocal finisher
            if isinstance(run, ClipFailure):
                return run
            if finisher is not None:
                return finisher.submit(first.finish, *run)
            start = time.perf_counter()
            out = first.finish(*run)
            if overlap and time.perf_counter() - start >= OVERLAP_S:
                finisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cfp-pyramid")
            return out

        waiting: list[Any] = []  # the last forwards' outcomes (futures while finishing)
        try:
            refill()
            while ahead:
                group: list[tuple[ClipTask, Any]] = []
                failed: list[Outcome] = []
                while ahead and len(group) < batch:
                    task, clip = ahead.popleft().result()
                    if isinstance(clip, ClipFailure):
                        failed.append(clip)
                    else:
                        group.append((task, clip))
                refill()
                yield from failed
                if group:
                    runs = [finishing(r) for r in first.forward(group)]
                    yield from _outcomes(waiting)  # the clip before, finished meanwhile
                    waiting = runs
            yield from _outcomes(waiting)
        finally:
            # Wait for the decoders, never leave one running: a thread inside OpenCV when
            # the interpreter exits is killed by a forced unwind through C++ frames, which
            # aborts the process ("FATAL: exception not rethrown", exit 134) instead of
            # the 130 an interrupt owes. Queued clips are dropped; running ones finish.
            for f in ahead:
                f.cancel()
            pool.shutdown(wait=True)
            if finisher:
                finisher.shutdown(wait=True, cancel_futures=True)


OVERLAP_S = 0.01
"""Once a clip's pyramid (the first one's includes its weight reads) takes this long, every
later clip's is built on a thread of its own, beside the next forward: ResNet-50-3D's 30-70 ms gained
4-10 % clips/s; the demo model's 2-3 ms lost 3 % to the thread hops."""


def _outcomes(items: list[Any]) -> Iterator[Outcome]:
    for item in items:
        yield item.result() if isinstance(item, Future) else item


def _decode(worker: ClipWorker, task: ClipTask) -> tuple[ClipTask, Any]:
    """One clip decoded, or its user error as a failure (a bug propagates to the caller)."""
    try:
        return task, worker.decode(task)
    except CfpError as exc:
        return task, ClipFailure(task.id, str(exc))


@dataclass(frozen=True)
class RayEngine:
    """A Ray cluster: one actor per worker, each with its own Explainer, clips by path.

    Clips are decoded on the workers, so their paths must be readable there (a shared
    file system on a real cluster). An actor takes `batch` clips a call and explains them
    as the local engine does (one batched forward where the model's batch is dynamic,
    checked against single runs on its first batch). At most ``in_flight`` calls per actor
    are pending: results stream back and memory stays flat on the driver.

    Args:
        address: an existing cluster (``ray://...`` or ``auto``); None starts a local one.
        workers: actors to start (default: the cluster's CPUs).
        in_flight: pending calls per actor.
        batch: clips per call (None: `batch_for` the spec's device).
    """

    address: str | None = None
    workers: int | None = None
    in_flight: int = 2
    num_cpus: int | None = None  # for a local cluster only
    batch: int | None = None

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
        batch = batch_for(self.batch, spec.device)
        for actor in actors:
            for _ in range(self.in_flight):
                _submit(pending, actor, todo, batch)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            actor = pending.pop(ready[0])
            yield from ray.get(ready[0])
            _submit(pending, actor, todo, batch)


def _submit(pending: dict[Any, Any], actor: Any, todo: Iterator[ClipTask], batch: int) -> None:
    group = list(itertools.islice(todo, batch))
    if group:
        pending[actor.explain.remote(group)] = actor


class _RayWorker:
    """A Ray actor holding one ClipWorker (the model analysed once per actor)."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.worker = ClipWorker(spec)

    def explain(self, tasks: list[ClipTask]) -> list[Outcome]:
        """Outcomes of `tasks`, in order: decoded here, then explained as one batch."""
        out: list[Outcome] = []
        group: list[tuple[ClipTask, Any]] = []
        for task, clip in (_decode(self.worker, t) for t in tasks):
            if isinstance(clip, ClipFailure):
                out.append(clip)
            else:
                group.append((task, clip))
        if group:
            out += self.worker.explain_many(group)
        return [o.portable() if isinstance(o, ClipResult) else o for o in out]


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
    name: str,
    *,
    address: str | None = None,
    workers: int | None = None,
    batch: int | None = None,
) -> LocalEngine | RayEngine:
    """An engine by name (the CLI's ``--engine``)."""
    if name == "local":
        if address:
            raise OptionError("--address needs --engine ray")
        return LocalEngine(batch=batch)
    if name == "ray":
        _import_ray()  # not installed: say so before any clip is decoded
        return RayEngine(address=address, workers=workers, batch=batch)
    raise OptionError(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}")
