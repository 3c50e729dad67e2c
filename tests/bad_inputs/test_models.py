"""Bad models: refused with the right error class and a one-line message, exit 2, nothing written."""

from __future__ import annotations

import builtins
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cfp_onnx
from cfp_onnx.errors import CfpError, ModelError, UnsupportedOpError
from tests.bad_inputs import models
from tests.bad_inputs.conftest import assert_one_line_error, cfp, snapshot

CASES: list[tuple[str, Callable[[Path], object], type[CfpError], tuple[str, ...]]] = [
    ("empty", models.empty, ModelError, ("is not a readable ONNX model",)),
    ("tensor", models.tensor_not_model, ModelError, ("is not a readable ONNX model",)),
    ("no-nodes", models.graph_without_nodes, ModelError, ("has an empty graph",)),
    ("cycle", models.cycle, ModelError, ("the graph has a cycle (through node 'conv3')",)),
    ("dangling", models.dangling, ModelError, ("tensor 'ghost' is read by a node but nothing",)),
    ("no-conv", models.no_conv, ModelError, ("has no Conv layer",)),
    ("no-classifier", models.no_classifier, ModelError, ("no classifier found behind outputs",)),
    ("two-logits", models.two_logits, ModelError, ("could each be the logits", "--output NAME")),
    ("unknown-op", models.unknown_op, UnsupportedOpError, ("op LpNormalization (node",)),
    ("custom-op", models.custom_op, UnsupportedOpError, ("Evil (node 'evil5')",)),
    ("opset-40", models.future_opset, ModelError, ("uses ai.onnx opset 40", "opset <= ")),
    ("huge-dim", models.huge_input_dim, ModelError, ("declares dim 1099511627776",)),
    ("huge-init", models.huge_initializer_dims, ModelError, ("too small for the declared shape",)),
    (
        "nan-weight",
        models.nan_conv_weight,
        ModelError,
        ("initializer 'c1' of conv 'conv3' holds NaN",),
    ),
    ("inf-head", models.inf_classifier_weight, ModelError, ("classifier 'gemm", "NaN or Inf")),
    ("nan-bias", models.nan_bias, ModelError, ("initializer 'c2' holds NaN or Inf",)),
    (
        "ort-rejects",
        models.ort_rejects_at_run,
        ModelError,
        ("onnxruntime failed to run the model on this clip", "Invalid input shape"),
    ),
    ("two-inputs", models.two_inputs, ModelError, ("exactly one input", "'video', 'x2'")),
]


@pytest.mark.parametrize(
    ("builder", "cls", "fragments"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_model(work, refused, builder, cls, fragments):
    path = work / "bad.onnx"
    builder(path)
    np.save(work / "g.npy", np.ones(models.CLIP_SHAPE, np.float32))
    with pytest.raises(CfpError) as info:
        cfp_onnx.explain(path, np.ones(models.CLIP_SHAPE, np.float32))
    assert info.type is cls, info.value
    for f in fragments:
        assert f in str(info.value)
    r = refused("explain", "bad.onnx", "--clip", "g.npy", "--out", "out", fragments=fragments)
    assert "NaN" not in r.stdout or "relevance" not in r.stdout


def test_missing_model_and_folder_as_model(work, refused):
    (work / "dir.onnx").mkdir()
    for name in ("missing.onnx", "dir.onnx"):
        refused("explain", name, "--clip", "clip.npy", "--out", "out", fragments=("is not a file",))


def test_output_name_that_is_not_a_graph_output(work, refused):
    models.two_logits(work / "two.onnx")
    np.save(work / "g.npy", np.ones(models.CLIP_SHAPE, np.float32))
    refused(
        "explain", "two.onnx", "--clip", "g.npy", "--output", "nope", "--out", "out",
        fragments=("--output 'nope' is not a graph output",),
    )  # fmt: skip


def test_dynamic_dims_without_a_clip_inspect(work, refused):
    models.dynamic_input(work / "dyn.onnx")
    refused("inspect", "dyn.onnx", fragments=("dynamic dims (1, 3, T, 8, 8)", "give a clip"))


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.binary(min_size=1, max_size=300))
def test_random_bytes_are_a_model_error(tmp_path, data):
    path = tmp_path / "random.onnx"
    path.write_bytes(data)
    with pytest.raises(ModelError):
        cfp_onnx.explain(path, np.ones(models.CLIP_SHAPE, np.float32))


@pytest.fixture(scope="module")
def good_bytes(tmp_path_factory) -> bytes:
    return models.good(tmp_path_factory.mktemp("good") / "m.onnx").read_bytes()


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(cut=st.floats(0.0, 0.999))
def test_truncated_model_is_a_model_error(tmp_path, good_bytes, cut):
    path = tmp_path / "cut.onnx"
    path.write_bytes(good_bytes[: int(len(good_bytes) * cut)])
    with pytest.raises(ModelError):
        cfp_onnx.explain(path, np.ones(models.CLIP_SHAPE, np.float32))


@pytest.mark.parametrize("cut", [0.1, 0.5, 0.97])
def test_truncated_model_cli(work, refused, cut):
    data = models.good(work / "m2.onnx").read_bytes()
    (work / "m2.onnx").write_bytes(data[: int(len(data) * cut)])
    np.save(work / "g.npy", np.ones(models.CLIP_SHAPE, np.float32))
    r = refused("explain", "m2.onnx", "--clip", "g.npy", "--out", "out")
    assert "m2.onnx" in r.stderr


# ----------------------------------------------------------------- external data


class Reads:
    """Records every path opened while loading, to prove a refused file is never read."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.paths: list[str] = []
        for owner, name in ((builtins, "open"), (os, "open"), (np, "fromfile")):
            real = getattr(owner, name)
            monkeypatch.setattr(owner, name, self._wrap(real))
        real_memmap = np.memmap.__new__
        monkeypatch.setattr(np.memmap, "__new__", self._wrap(real_memmap, arg=1))

    def _wrap(self, real, arg: int = 0):  # type: ignore[no-untyped-def]
        def wrapper(*a, **kw):  # type: ignore[no-untyped-def]
            if len(a) > arg and isinstance(a[arg], (str, os.PathLike)):
                self.paths.append(os.path.realpath(a[arg]))
            return real(*a, **kw)

        return wrapper


@pytest.mark.parametrize("where", ["parent", "absolute", "symlink"])
def test_external_data_outside_the_folder_is_refused_and_never_read(tmp_path, monkeypatch, where):
    folder = tmp_path / "model"
    folder.mkdir()
    secret = tmp_path / "secret.bin"
    location = {"parent": "../secret.bin", "absolute": str(secret), "symlink": "link.bin"}[where]
    models.external(folder / "m.onnx", location)
    shutil.move(folder / "weights.bin", secret)  # readable, and the right size: it would work
    if where == "symlink":
        (folder / "link.bin").symlink_to(secret)
    np.save(tmp_path / "g.npy", np.ones(models.CLIP_SHAPE, np.float32))
    before = snapshot(tmp_path)
    r = cfp("explain", "model/m.onnx", "--clip", "g.npy", "--out", "out", cwd=tmp_path)
    assert_one_line_error(r, "outside the model's folder; refusing to read it")
    assert snapshot(tmp_path) == before
    reads = Reads(monkeypatch)
    with pytest.raises(ModelError, match="refusing to read it") as info:
        cfp_onnx.explain(folder / "m.onnx", np.ones(models.CLIP_SHAPE, np.float32))
    assert info.type is ModelError
    assert str(secret.resolve()) not in reads.paths


def test_external_data_etc_passwd(work, refused):
    models.external(work / "e.onnx", "../../../../../../etc/passwd")
    np.save(work / "g.npy", np.ones(models.CLIP_SHAPE, np.float32))
    refused("explain", "e.onnx", "--clip", "g.npy", "--out", "out", fragments=("'../../",))
    refused("inspect", "e.onnx", fragments=("refusing to read it",))


def test_external_data_missing_or_short(work, refused):
    models.external(work / "e.onnx", "weights.bin")
    np.save(work / "g.npy", np.ones(models.CLIP_SHAPE, np.float32))
    data = (work / "weights.bin").read_bytes()
    (work / "weights.bin").write_bytes(data[:100])
    refused("explain", "e.onnx", "--clip", "g.npy", "--out", "out", fragments=("is too short",))
    (work / "weights.bin").unlink()
    refused("explain", "e.onnx", "--clip", "g.npy", "--out", "out", fragments=("is missing",))


METADATA = [
    ("class_names", '"abc"', "must be a list of strings"),
    ("class_names", "[1, 2, 3]", "got an item 1"),
    ("mean", '["a", 1, 2]', "must be a list of numbers"),
    ("mean", "[NaN, 1, 1]", "must be finite"),
    ("std", "[0, 1, 1]", "std must be positive"),
    ("frames", '"8"', "frames must be a positive integer"),
    ("frames", "true", "frames must be a positive integer"),
    ("size", "5", "size must be a list of two integers"),
    ("layout", "[1]", "is not one of NCDHW, NDHWC"),
]


@pytest.mark.parametrize(("key", "value", "fragment"), METADATA)
def test_malformed_metadata_is_a_model_error_naming_the_key(work, refused, key, value, fragment):
    """A hand-edited or foreign ``cfp.`` value: one line naming the key, never a traceback
    from deep in preprocessing."""
    import onnx

    from cfp_onnx.video import write_video

    m = onnx.load(str(work / "m.onnx"))
    onnx.helper.set_model_props(m, {f"cfp.{key}": value})
    onnx.save(m, str(work / "meta.onnx"))
    write_video(work / "v.mp4", np.zeros((12, 32, 32, 3), np.uint8))
    refused("explain", "meta.onnx", "--clip", "v.mp4", "--out", "out",
            fragments=(f"model metadata 'cfp.{key}'", fragment))  # fmt: skip
    with pytest.raises(ModelError, match=f"cfp.{key}"):
        cfp_onnx.explain(work / "meta.onnx", work / "v.mp4")
