"""The explanation layer: one pyramid.json whatever the entry point, one report from an
Explanation, lean outputs within their size bound, every kernel's map from one run."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest

from cfp_onnx import report
from cfp_onnx.api import Explainer
from cfp_onnx.batch import BatchOptions, ClipTask, WorkerSpec, run_batch
from cfp_onnx.commands import explain_to
from cfp_onnx.engines import LocalEngine
from cfp_onnx.explanation import explain
from cfp_onnx.loading import load_model
from cfp_onnx.modelinput import ModelInput
from cfp_onnx.options import PyramidOptions, ViewOptions
from tests import nets
from tests.bad_inputs.conftest import cfp

OPTIONS = ("--theta", "0.4", "--depth", "3", "--top-n", "4")


@pytest.fixture(scope="module")
def case(exported, tmp_path_factory):  # type: ignore[no-untyped-def]
    _, path = exported("residual")
    root = tmp_path_factory.mktemp("explanation")
    clip = np.random.default_rng(3).standard_normal(nets.CLIP).astype(np.float32)
    np.save(root / "clip.npy", clip)
    return path, root, clip


def test_cli_api_and_batch_write_byte_identical_pyramids(case) -> None:  # type: ignore[no-untyped-def]
    path, root, clip = case
    r = cfp("explain", str(path), "--clip", "clip.npy", "--out", "cli", *OPTIONS, cwd=root)
    assert r.returncode == 0, r.stderr
    opts = PyramidOptions(depth=3, theta=0.4, top_n=4)
    explain_to(path, root / "clip.npy", root / "api", pyramid=opts)
    run_batch(
        WorkerSpec(str(path), BatchOptions(depth=3, theta=0.4, top_n=4)),
        [ClipTask("clip", str(root / "clip.npy"), None)], root / "batch", engine=LocalEngine(),
    )  # fmt: skip
    cli = (root / "cli" / "pyramid.json").read_bytes()
    assert cli == (root / "api" / "pyramid.json").read_bytes()
    assert cli == (root / "batch" / "clips" / "clip" / "pyramid.json").read_bytes()
    assert Explainer(path, clip_shape=clip.shape).explain(clip, opts).to_json().encode() == cli


def test_the_report_of_an_explanation_is_the_one_the_cli_writes(case) -> None:  # type: ignore[no-untyped-def]
    path, root, clip = case
    r = cfp("explain", str(path), "--clip", "clip.npy", "--out", "page", *OPTIONS, cwd=root)
    assert r.returncode == 0, r.stderr
    loaded = load_model(path)
    mi = ModelInput.of(loaded)
    e = explain(Explainer(loaded, clip_shape=clip.shape), mi.clip(root / "clip.npy", loaded), mi,
                PyramidOptions(depth=3, theta=0.4, top_n=4), ViewOptions())  # fmt: skip
    nonce = re.compile(r"nonce-[^']+'|nonce=\"[^\"]+\"")
    cli = nonce.sub("N", (root / "page" / "report.html").read_text())
    assert nonce.sub("N", report.render([e])) == cli


def test_every_kernel_has_its_map_and_tubes_follow_spec_6(case) -> None:  # type: ignore[no-untyped-def]
    """The maps kept for the page give SPEC §6 tubes: checked against TubeMaker (the
    per-kernel selection path) for every node."""
    from cfp_onnx.tubes import TubeMaker

    path, root, clip = case
    loaded = load_model(path)
    ex, mi = Explainer(loaded, clip_shape=clip.shape), ModelInput.of(loaded)
    c = mi.clip(clip, loaded)
    e = explain(ex, c, mi, PyramidOptions(theta=0.4, top_n=4), ViewOptions(shuffle=False))
    assert e.maps is not None
    n = len(e.pyramid.node_layer)
    assert len(e.maps.group) == n and n > 10
    run = ex.run(clip, depth=3, full=ex.map_tensors(3))
    maker = TubeMaker(ex, e.pyramid, run, c.frames.shape[:3])
    nodes = np.arange(n)
    np.testing.assert_allclose(e.maps.tubes(nodes, c.frames.shape[:3]), maker.tubes(nodes).maps,
                               atol=1e-5)  # fmt: skip
    for node in (0, n // 2, n - 1):  # quantised: the same tube within a grey level
        q = e.maps.quantised(int(e.maps.group[node]))[int(e.maps.slot[node])]
        raw = e.maps.raw(node)
        span = float(raw.max() - raw.min())
        if span > 0:
            np.testing.assert_allclose(q / 255.0, (raw - raw.min()) / span, atol=0.5 / 255 + 1e-6)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="zoo export timing")
def test_default_outputs_besides_the_pyramid_fit_15_mb(tmp_path: Path) -> None:
    """The zoo's ResNet-50-3D (400 classes, 16x112x112): report and everything but
    pyramid.json within 15 MB, every kernel's map included."""
    torch = pytest.importorskip("torch")
    from cfp_onnx.exporters.zoo.torch_models import randomize_batchnorm, resnet50_3d

    torch.manual_seed(0)
    model = randomize_batchnorm(resnet50_3d(num_classes=400, width=1.0, in_frames=16)).eval()
    torch.onnx.export(model, (torch.zeros(1, 3, 16, 112, 112),), str(tmp_path / "r50.onnx"),
                      dynamo=False, opset_version=17, input_names=["video"],
                      output_names=["logits"])  # fmt: skip
    rng = np.random.default_rng(0)
    np.save(tmp_path / "clip.npy", rng.standard_normal((1, 3, 16, 112, 112)).astype(np.float32))
    r = cfp("explain", "r50.onnx", "--clip", "clip.npy", "--out", "o", cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    files = [p for p in (tmp_path / "o").rglob("*") if p.is_file()]
    rest = sum(p.stat().st_size for p in files if p.name != "pyramid.json")
    assert {p.name for p in files} == {"pyramid.json", "report.html", ".cfp-output.json"}
    assert rest <= 15 * 2**20, rest
    data = re.search(r'id="cfp-data">(.*?)</script>', (tmp_path / "o" / "report.html").read_text())
    assert data is not None
    import json

    view = json.loads(data.group(1))["views"][0]
    nodes = len(json.loads((tmp_path / "o" / "pyramid.json").read_text())["nodes"])
    assert len(view["maps"]["group"]) == len(view["nodes"]["layer"]) == nodes > 10_000


def _staged(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".") and "cfp" in p.name)


def test_pyramid_json_written_during_the_rest_equals_the_pyramid(case, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """`cfp explain` starts pyramid.json as soon as the pyramid exists: the file is the
    pyramid's own document, and it was started before the maps were made."""
    from cfp_onnx import explanation, outputs

    path, root, clip = case
    events: list[str] = []
    start, build = outputs.EarlyPyramid.start, explanation.KernelMaps.build
    monkeypatch.setattr(outputs.EarlyPyramid, "start",
                        lambda self, p: events.append("json") or start(self, p))  # fmt: skip
    monkeypatch.setattr(explanation.KernelMaps, "build",
                        classmethod(lambda cls, *a: events.append("maps") or build(*a)))  # fmt: skip
    done = explain_to(path, root / "clip.npy", root / "early", pyramid=PyramidOptions(depth=3))
    assert events == ["json", "maps"]
    assert done[0].explanation is not None
    assert (root / "early" / "pyramid.json").read_bytes() == done[
        0
    ].explanation.pyramid.to_json().encode()


@pytest.mark.parametrize("fault", ["maps fail", "json fails", "interrupted"])
def test_a_fault_while_pyramid_json_is_written_leaves_nothing(case, monkeypatch, fault) -> None:  # type: ignore[no-untyped-def]
    """The early writer is stopped and joined before the staging folder goes: a failure
    in the rest of the run, the writer's own (a full disk) or Ctrl-C leaves no output,
    no staging folder and no writer still running."""
    import errno
    import threading

    from cfp_onnx import explanation, outputs, pyramid
    from cfp_onnx.errors import OutputError

    path, root, _ = case
    out = root / f"fault-{fault.split()[0]}"
    futures: list[object] = []
    start = outputs.EarlyPyramid.start

    def spy(self, p):  # type: ignore[no-untyped-def]
        start(self, p)
        futures.append(self._future)

    monkeypatch.setattr(outputs.EarlyPyramid, "start", spy)
    if fault == "json fails":

        def full(self, fp, *a, **k):  # type: ignore[no-untyped-def]
            fp.write(b"{")
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(pyramid.Pyramid, "write_json", full)
        expected: type[BaseException] = OutputError
    else:
        slow_write = pyramid.Pyramid.write_json
        gate = threading.Event()

        def slow(self, fp, *a, **k):  # type: ignore[no-untyped-def]
            gate.wait(10)  # still writing when the main thread fails
            return slow_write(self, fp, *a, **k)

        monkeypatch.setattr(pyramid.Pyramid, "write_json", slow)
        error = RuntimeError("maps broke") if fault == "maps fail" else KeyboardInterrupt()

        def broken(cls, *a):  # type: ignore[no-untyped-def]
            gate.set()
            raise error

        monkeypatch.setattr(explanation.KernelMaps, "build", classmethod(broken))
        expected = type(error)
    with pytest.raises(expected):
        explain_to(path, root / "clip.npy", out, pyramid=PyramidOptions(depth=3))
    assert not out.exists() and _staged(root) == []
    assert len(futures) == 1 and futures[0].done()  # type: ignore[attr-defined]


def test_a_stopped_early_writer_stops_between_blocks(tmp_path: Path) -> None:
    """stop() ends a write in progress at its next block, not after the whole file."""
    import threading

    from cfp_onnx import outputs

    writes: list[int] = []
    begun = threading.Event()

    class Endless:
        def write_json(self, fp, parallel=True):  # type: ignore[no-untyped-def]
            for i in range(10_000):
                fp.write(b"x" * 1000)
                writes.append(i)
                begun.set()
                threading.Event().wait(0.001)

    with outputs.early_pyramid(tmp_path) as early:
        early.start(Endless())  # type: ignore[arg-type]
        assert begun.wait(10)
    assert early._future is not None and early._future.done()
    assert 0 < len(writes) < 10_000


def test_weights_read_ahead_give_the_same_pyramid_and_their_errors(case, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """prefetch() averages the expandable layers' weights on a thread: the pyramid is the
    one computed without it, and a read that failed there fails the back-step."""
    path, _, clip = case
    opts = PyramidOptions(depth=3, theta=0.4, top_n=4)
    plain = Explainer(path, clip_shape=clip.shape).explain(clip, opts).to_json()
    ahead = Explainer(path, clip_shape=clip.shape)
    ahead.prefetch(3)
    assert len(ahead._means) == len(ahead.expanded_layers(3)) > 0
    assert ahead.explain(clip, opts).to_json() == plain
    assert ahead._means == {}  # every read-ahead taken by its step

    broken = Explainer(path, clip_shape=clip.shape)
    first = int(broken.expanded_layers(3)[0])
    layer = broken.layers[first]

    def unreadable() -> np.ndarray:
        raise OSError(5, "Input/output error")

    object.__setattr__(layer, "tap_means", unreadable)
    broken.prefetch(3)
    with pytest.raises(OSError, match="Input/output"):
        broken.explain(clip, opts)
