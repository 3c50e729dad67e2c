"""Engines: the local one's bounded queue, and Ray giving exactly the local results."""

from __future__ import annotations

import builtins
import itertools
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from cfp_onnx.batch import ClipFailure, ClipResult, ClipTask, ClipWorker, run_batch, tasks_from
from cfp_onnx.engines import OVERLAP_S, LocalEngine, RayEngine, make_engine
from cfp_onnx.errors import OptionError
from tests.test_batch import make_clips, spec, tiny_model, tree


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("engines")
    tiny_model(root / "tiny.onnx", seed=3)
    make_clips(root / "clips", 20, seed=3)
    return root


def test_make_engine() -> None:
    assert make_engine("local") == LocalEngine()
    assert make_engine("ray", address="auto", workers=3) == RayEngine(address="auto", workers=3)
    with pytest.raises(OptionError, match="--address needs --engine ray"):
        make_engine("local", address="auto")
    with pytest.raises(OptionError, match="unknown engine"):
        make_engine("spark")


def test_ray_missing_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, data: Path) -> None:
    real = builtins.__import__

    def no_ray(name: str, *a: object, **k: object) -> object:
        if name == "ray":
            raise ImportError("no ray")
        return real(name, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", no_ray)
    s = spec(data)
    with pytest.raises(OptionError, match=r"pip install 'cfp_onnx\[ray\]'"):
        list(RayEngine().results(s, tasks_from(data / "clips")[:1], ClipWorker(s)))


@pytest.mark.parametrize(("prefetch", "batch"), [(2, 1), (3, 4)])
def test_local_queue_is_bounded(data: Path, prefetch: int, batch: int) -> None:
    """The decoders never run more than max(`prefetch`, `batch`) clips ahead of the
    explainer (plus the batch being run and the one whose pyramids are being built)."""
    s = spec(data)
    worker = ClipWorker(s)
    decoded: list[str] = []
    real = worker.decode
    lock = threading.Lock()

    def decode(task: ClipTask):  # type: ignore[no-untyped-def]
        with lock:
            decoded.append(task.id)
        return real(task)

    worker.decode = decode  # type: ignore[method-assign]
    tasks = tasks_from(data / "clips")
    consumed = 0
    for _ in LocalEngine(prefetch=prefetch, batch=batch).results(s, tasks, worker):
        consumed += 1
        with lock:
            ahead = len(decoded) - consumed
        assert ahead <= max(prefetch, batch) + 2 * batch
    assert consumed == len(tasks)


def test_local_engine_reports_bad_clips(data: Path, tmp_path: Path) -> None:
    s = spec(data)
    bad = ClipTask("bad", str(tmp_path / "missing.npy"))
    out = list(LocalEngine().results(s, [bad, *tasks_from(data / "clips")[:2]], ClipWorker(s)))
    assert isinstance(out[0], ClipFailure) and "no such file or folder" in out[0].message
    assert len(out) == 3


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray", reason="Ray not installed (pip install 'cfp_onnx[ray]')")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_equals_local(data: Path, tmp_path: Path, ray_local) -> None:  # type: ignore[no-untyped-def]
    tasks = tasks_from(data / "clips")
    local = run_batch(spec(data), tasks, tmp_path / "local", engine=LocalEngine())
    bad = ClipTask("bad", str(tmp_path / "missing.npy"))
    remote = run_batch(
        spec(data), [*tasks, bad], tmp_path / "ray", engine=RayEngine(workers=2, in_flight=2)
    )
    assert (remote.done, local.done) == (len(tasks), len(tasks))
    assert [f.id for f in remote.failed] == ["bad"]
    assert tree(tmp_path / "ray") == tree(tmp_path / "local")  # byte-identical, aggregates too


def test_ray_resumes_a_local_run(data: Path, tmp_path: Path, ray_local) -> None:  # type: ignore[no-untyped-def]
    tasks = tasks_from(data / "clips")
    run_batch(spec(data), tasks[:7], tmp_path / "mixed", engine=LocalEngine())
    s = run_batch(spec(data), tasks, tmp_path / "mixed", engine=RayEngine(workers=2))
    assert (s.done, s.skipped) == (len(tasks) - 7, 7)
    run_batch(spec(data), tasks, tmp_path / "local", engine=LocalEngine())
    assert tree(tmp_path / "mixed") == tree(tmp_path / "local")


def test_a_ray_actor_explains_its_clips_as_one_batch(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The actor's own code, in this process: decode failures stay the clip's, the rest
    share one forward (dynamic batch), and every outcome equals the clip's alone."""
    from cfp_onnx.engines import _RayWorker
    from tests.test_batch import count_runs

    dynamic = tiny_model(tmp_path / "dynamic.onnx", seed=3, batch="N")
    s = replace(spec(data), model=str(dynamic))
    tasks = tasks_from(data / "clips")[:4]
    group = [tasks[0], ClipTask("bad", str(tmp_path / "missing.npy")), *tasks[1:]]
    sizes = count_runs(monkeypatch)
    actor = _RayWorker(s)
    first = actor.explain(group)  # the first batch is also run clip by clip (the check)
    again = actor.explain(group)
    assert sizes == [4, 1, 1, 1, 1, 4]
    alone = ClipWorker(s)
    for got in (first, again):
        assert [o.id for o in got] == ["bad", *(t.id for t in tasks)]
        assert isinstance(got[0], ClipFailure) and "no such file" in got[0].message
        for o, t in zip(got[1:], tasks):
            want = alone(t)
            assert isinstance(o, ClipResult) and isinstance(want, ClipResult)
            want = want.portable()
            assert (o.nodes.to_bytes(), o.pyramid) == (want.nodes.to_bytes(), want.pyramid)


def test_ray_batches_equal_local_clips_alone(data: Path, tmp_path: Path, ray_local) -> None:  # type: ignore[no-untyped-def]
    dynamic = tiny_model(tmp_path / "dynamic.onnx", seed=3, batch="N")
    s = replace(spec(data), model=str(dynamic))
    tasks = [*tasks_from(data / "clips"), ClipTask("bad", str(tmp_path / "missing.npy"))]
    local = run_batch(s, tasks, tmp_path / "local", engine=LocalEngine(batch=1))
    remote = run_batch(s, tasks, tmp_path / "ray", engine=RayEngine(workers=2, batch=3))
    assert remote.done == local.done == len(tasks) - 1 and [f.id for f in remote.failed] == ["bad"]
    assert tree(tmp_path / "ray") == tree(tmp_path / "local")


def test_local_engine_builds_slow_pyramids_while_the_next_forward_runs(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the CPU, once a clip's pyramid takes OVERLAP_S or more, each later clip's
    pyramid is made on a thread of its own beside the next clip's forward; a fast one
    stays on the caller's thread. The clip folders are the same either way."""
    events: list[tuple[str, str, float, str]] = []
    real_forward, real_finish = ClipWorker.forward, ClipWorker.finish
    delay = {"s": 0.0}

    def forward(self, items):  # type: ignore[no-untyped-def]
        events.append(("forward", items[0][0].id, time.perf_counter(), ""))
        return real_forward(self, items)

    def finish(self, task, clip, run):  # type: ignore[no-untyped-def]
        time.sleep(delay["s"])  # a slow back-step: the next forward must not wait for it
        out = real_finish(self, task, clip, run)
        events.append(("finished", task.id, time.perf_counter(), threading.current_thread().name))
        return out

    monkeypatch.setattr(ClipWorker, "forward", forward)
    monkeypatch.setattr(ClipWorker, "finish", finish)
    tasks = tasks_from(data / "clips")[:6]
    ids = [t.id for t in tasks]
    run_batch(spec(data), tasks, tmp_path / "fast", engine=LocalEngine())
    assert {e[3] for e in events if e[0] == "finished"} == {"MainThread"}
    events.clear()
    delay["s"] = 2 * OVERLAP_S
    run_batch(spec(data), tasks, tmp_path / "slow", engine=LocalEngine())
    at = {(kind, clip): t for kind, clip, t, _ in events}
    where = [name for kind, _, _, name in events if kind == "finished"]
    assert where[0] == "MainThread" and all(n.startswith("cfp-pyramid") for n in where[1:])
    assert all(at["forward", b] < at["finished", a] for a, b in itertools.pairwise(ids[1:]))
    assert at["finished", ids[0]] < at["forward", ids[1]]  # the first decides, inline

    def clips(folder: Path) -> dict[str, bytes]:
        return {k: v for k, v in tree(folder).items() if k.startswith("clips/")}

    assert len(clips(tmp_path / "slow")) >= 3 * len(tasks)
    assert clips(tmp_path / "slow") == clips(tmp_path / "fast")
