"""The GPU backend: what runs on CPU machines, and the GPU tests proper (marker ``gpu``).

On a CPU machine this checks provider selection, the IO-binding plumbing (with fakes),
the array-module switch (the pyramid and tube code run through a NumPy stand-in that
only offers what CuPy offers, and records what is called), the fused blend's NumPy twin
against ``tubes.overlay``, and the one-line error for ``--device cuda``. The tests
marked ``gpu`` compare CuPy and NumPy backends and are skipped here with the reason.
"""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cfp_onnx import gpu, runtime, tubes
from cfp_onnx.api import Explainer
from cfp_onnx.errors import OptionError
from tests.test_batch import make_clips, tiny_model

CFP = str(Path(sys.executable).with_name("cfp"))


def _gpu_ready() -> bool:
    try:
        import cupy
        import onnxruntime as ort

        return cupy.cuda.runtime.getDeviceCount() > 0 and (
            "CUDAExecutionProvider" in ort.get_available_providers()
        )
    except Exception:
        return False


GPU_REASON = "no CUDA GPU here (needs CuPy and onnxruntime-gpu: pip install '.[gpu]')"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[np.ndarray]]:
    root = tmp_path_factory.mktemp("gpu")
    model = tiny_model(root / "tiny.onnx", seed=5)
    clips = [np.load(p) for p in make_clips(root / "clips", 4, seed=5)]
    return model, clips


# --------------------------------------------------------------------------- providers


def test_providers_for() -> None:
    cpu_only = ["CPUExecutionProvider"]
    both = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert runtime.providers_for("cpu", cpu_only) == ["CPUExecutionProvider"]
    assert runtime.providers_for("cpu", both) == ["CPUExecutionProvider"]
    assert runtime.providers_for("cuda", both) == both  # CPU as fallback for the odd op
    with pytest.raises(OptionError, match="onnxruntime-gpu"):
        runtime.providers_for("cuda", cpu_only)
    with pytest.raises(OptionError, match="unknown device 'tpu'"):
        runtime.providers_for("tpu", both)


def test_cuda_provider_has_tf32_off() -> None:
    assert runtime._provider_options("cuda")[0]["use_tf32"] == "0"
    assert runtime._provider_options("cpu") == [{}]


# --------------------------------------------------------------------------- IO binding


class FakeValue:
    def __init__(self, name: str, device: str) -> None:
        self.name, self.device = name, device

    def numpy(self) -> np.ndarray:
        assert self.device == "cpu", "a device output was copied to the host"
        return np.full(2, len(self.name), dtype=np.float32)


class FakeBinding:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.outputs: list[tuple[str, str]] = []

    def bind_cpu_input(self, name: str, arr: np.ndarray) -> None:
        assert arr.flags.c_contiguous
        self.calls.append(("input", name, arr.shape))

    def bind_output(self, name: str, device_type: str = "cpu") -> None:
        self.outputs.append((name, device_type))

    def get_outputs(self) -> list[FakeValue]:
        return [FakeValue(n, d) for n, d in self.outputs]


class FakeSession:
    def __init__(self) -> None:
        self.binding = FakeBinding()
        self.ran = 0

    def io_binding(self) -> FakeBinding:
        return self.binding

    def run_with_iobinding(self, io: FakeBinding) -> None:
        assert io is self.binding
        self.ran += 1


def test_bound_run_keeps_taps_on_the_device() -> None:
    sess = FakeSession()
    names = ["logits", "cfp_pooled::x", "cfp_full::y"]
    clip = np.zeros((1, 3, 4, 8, 8), np.float32)[..., ::-1]  # not contiguous: must be made so
    out = runtime.bound_run(sess, "video", clip, names, lambda v: ("device", v.name, v.device))
    assert sess.ran == 1 and sess.binding.calls == [("input", "video", (1, 3, 4, 8, 8))]
    assert sess.binding.outputs == [
        ("logits", "cpu"), ("cfp_pooled::x", "cuda"), ("cfp_full::y", "cuda"),
    ]  # fmt: skip
    assert isinstance(out["logits"], np.ndarray)
    assert out["cfp_pooled::x"] == ("device", "cfp_pooled::x", "cuda")
    assert out["cfp_full::y"] == ("device", "cfp_full::y", "cuda")


def test_session_run_on_cuda_goes_through_binding(monkeypatch: pytest.MonkeyPatch) -> None:
    sess = object.__new__(runtime.Session)
    sess._device, sess._session, sess.input_name = "cuda", FakeSession(), "video"
    monkeypatch.setattr(runtime, "_to_device", lambda v: ("gpu", v.name))
    out = sess.run(np.zeros((1, 3, 2, 2, 2), np.float32), ["logits", "cfp_full::t"])
    assert out["cfp_full::t"] == ("gpu", "cfp_full::t") and out["logits"].shape == (2,)


def test_from_ortvalue_without_dlpack_wraps_the_pointer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fallback for builds without DLPack: UnownedMemory over data_ptr, owner kept alive."""
    made: dict[str, Any] = {}

    class Cuda:
        @staticmethod
        def UnownedMemory(ptr: int, size: int, owner: Any) -> tuple[int, int, Any]:
            made["mem"] = (ptr, size, owner)
            return (ptr, size, owner)

        @staticmethod
        def MemoryPointer(mem: Any, offset: int) -> tuple[Any, int]:
            return (mem, offset)

    fake_cp = types.SimpleNamespace(
        cuda=Cuda, ndarray=lambda shape, dtype, memptr: (shape, dtype, memptr)
    )
    monkeypatch.setattr(gpu, "_cupy", lambda: fake_cp)

    class Value:
        def data_type(self) -> str:
            return "tensor(float)"

        def shape(self) -> list[int]:
            return [2, 3]

        def data_ptr(self) -> int:
            return 4096

    v = Value()
    shape, dtype, memptr = gpu.from_ortvalue(v)
    assert shape == (2, 3) and dtype == np.float32 and made["mem"] == (4096, 24, v)


# --------------------------------------------------------------------------- array-module switch

CUPY_API = frozenset(
    "asarray where argsort empty empty_like put_along_axis arange concatenate nonzero flatnonzero "
    "full zeros ones stack maximum minimum searchsorted cumsum lexsort unique float64 float32 "
    "int64 int32 inf float16 take multiply partition diff bincount sort".split()
)
"""Names the pyramid and tube code may use: all exist in CuPy 13 with the NumPy meaning."""


class UfuncProxy:
    """A ufunc without ``reduceat`` / ``at`` (CuPy's lack them for most ops)."""

    def __init__(self, f: np.ufunc) -> None:
        self._f = f

    def __call__(self, *a: Any, **k: Any) -> Any:
        return self._f(*a, **k)

    def reduce(self, *a: Any, **k: Any) -> Any:
        return self._f.reduce(*a, **k)


class CupyLikeNumpy(types.ModuleType):
    """NumPy behind CuPy's surface: records calls, refuses names CuPy lacks."""

    def __init__(self) -> None:
        super().__init__("cupy_like_numpy")
        self.called: set[str] = set()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        self.called.add(name)
        assert name in CUPY_API, f"xp.{name} is not in the CuPy subset the backend may use"
        attr = getattr(np, name)
        if isinstance(attr, np.ufunc):
            return UfuncProxy(attr)
        if name == "argsort":
            return _argsort
        return attr


def _argsort(a: Any, axis: int = -1, kind: str | None = None) -> Any:
    assert kind in (None, "stable"), "CuPy sorts are stable and accept no other kind"
    return np.argsort(a, axis=axis, kind="stable")


@pytest.mark.parametrize("head_mode", ["weights", "contrastive"])
@pytest.mark.parametrize("top_n", [None, 2])
def test_pyramid_through_the_array_switch(tiny, head_mode: str, top_n: int | None) -> None:
    model, clips = tiny
    ref = Explainer(model, clip_shape=clips[0].shape)
    ex = Explainer(model, clip_shape=clips[0].shape)
    fake = CupyLikeNumpy()
    ex.xp = fake
    for clip in clips:
        kw = {"theta": 0.4, "head_mode": head_mode, "top_n": top_n}
        a, b = ref.explain(clip, **kw), ex.explain(clip, **kw)  # type: ignore[arg-type]
        assert a.to_json() == b.to_json()
        assert len(a.node_layer) > 0 and a.n_links > 0
    assert {"searchsorted", "argsort"} <= fake.called


def test_tubes_through_the_array_switch(tiny) -> None:
    model, clips = tiny
    ref = Explainer(model, clip_shape=clips[0].shape)
    ex = Explainer(model, clip_shape=clips[0].shape)
    ex.xp = CupyLikeNumpy()
    full = ref.map_tensors(3)
    for e in (ref, ex):
        run = e.run(clips[0], full=full)
        pyr = e.pyramid(run, theta=0.4)
        maker = tubes.TubeMaker(e, pyr, run, clips[0].shape[2:])
        got = maker.tubes(np.arange(len(pyr.node_layer)))
        if e is ref:
            expected = got
    assert np.array_equal(got.maps, expected.maps) and got.maps.shape[0] > 0


def test_blend_twin_equals_overlay(rng: np.random.Generator) -> None:
    frames = rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    tube = rng.random((3, 4, 16, 16), dtype=np.float32)
    tube[0, 0, 0, :4] = [0.0, 1.0, 0.5 / 255, 1.5 / 255]  # edges and rounding ties
    twin = gpu.blend_reference(frames, tube)
    for k in range(3):
        assert np.array_equal(twin[k], tubes.overlay(frames, tube[k]))


def test_jet_lut_is_opencvs() -> None:
    lut = gpu.jet_lut()
    assert lut.shape == (256, 3) and lut.dtype == np.uint8
    assert tuple(lut[0]) == (0, 0, 128) and tuple(lut[255]) == (128, 0, 0)  # RGB


def test_device_cuda_without_gpu_is_one_line(tiny, tmp_path: Path) -> None:
    if _gpu_ready():
        pytest.skip("this machine has a GPU: the error path is for CPU machines")
    model, _ = tiny
    for cmd in (
        ["batch", str(model), "--clips", str(model.parent / "clips"), "--device", "cuda"],
        ["explain", str(model), "--clip", str(model.parent / "clips" / "clip_0.npy"),
         "--device", "cuda"],
    ):  # fmt: skip
        r = subprocess.run(
            [CFP, *cmd, "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120
        )
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "--device cuda" in lines[0] and "gpu" in lines[0], lines


# --------------------------------------------------------------------------- on a GPU


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_ready(), reason=GPU_REASON)
@pytest.mark.parametrize("head_mode", ["weights", "contribution", "contrastive"])
def test_cupy_equals_numpy_on_models(tiny, exported, head_mode: str) -> None:
    from cfp_onnx import demo
    from tests import nets

    model, clips = tiny
    cases = [(model, clips[0]), (demo.model_path(), demo.clip().tensor)]
    for name in ("residual", "resnext", "inception", "x3d", "mfnet", "shuffle"):
        try:
            _, path = exported(name)
        except (KeyError, ValueError):
            continue
        cases.append((path, np.random.default_rng(0).standard_normal(nets.CLIP).astype("f4")))
    for path, clip in cases:
        cpu = Explainer(path, clip_shape=clip.shape)
        cuda = Explainer(path, clip_shape=clip.shape, device="cuda")
        a = cpu.explain(clip, theta=0.5, head_mode=head_mode)
        b = cuda.explain(clip, theta=0.5, head_mode=head_mode)
        assert a.label == b.label
        assert np.array_equal(a.node_layer, b.node_layer)
        assert np.array_equal(a.node_channel, b.node_channel)
        assert np.array_equal(a.node_depth, b.node_depth)
        np.testing.assert_allclose(a.node_relevance, b.node_relevance, atol=1e-5)
        assert np.array_equal(a.link_source, b.link_source)
        assert np.array_equal(a.link_target, b.link_target)
        np.testing.assert_allclose(a.link_relevance, b.link_relevance, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_ready(), reason=GPU_REASON)
def test_cuda_run_keeps_maps_on_the_gpu(tiny) -> None:
    import cupy

    model, clips = tiny
    ex = Explainer(model, clip_shape=clips[0].shape, device="cuda")
    run = ex.run(clips[0], full=ex.map_tensors(3))
    assert isinstance(run.logits, np.ndarray)
    assert all(isinstance(v, cupy.ndarray) for v in run.full.values())
    assert all(isinstance(v, cupy.ndarray) for v in run.pooled.values())
    cpu = Explainer(model, clip_shape=clips[0].shape)
    host = cpu.run(clips[0], full=cpu.map_tensors(3))
    for k, v in host.full.items():
        np.testing.assert_allclose(cupy.asnumpy(run.full[k]), v, atol=1e-5)
    pa, pb = cpu.pyramid(host, theta=0.4), ex.pyramid(run, theta=0.4)
    ta = tubes.TubeMaker(cpu, pa, host, clips[0].shape[2:]).tubes(np.arange(len(pa.node_layer)))
    tb = tubes.TubeMaker(ex, pb, run, clips[0].shape[2:]).tubes(np.arange(len(pb.node_layer)))
    np.testing.assert_allclose(ta.maps, tb.maps, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_ready(), reason=GPU_REASON)
def test_fused_blend_equals_twin(rng: np.random.Generator) -> None:
    import cupy

    frames = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    tube = rng.random((5, 8, 32, 32), dtype=np.float32)
    got = cupy.asnumpy(gpu.blend(cupy.asarray(frames), cupy.asarray(tube)))
    assert np.array_equal(got, gpu.blend_reference(frames, tube))
