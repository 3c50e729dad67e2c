"""Bad options and output paths: OptionError/OutputError, one line, exit 2, nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cfp_onnx import outputs
from cfp_onnx.api import Explainer
from cfp_onnx.errors import OptionError, OutputError
from tests.bad_inputs.conftest import assert_one_line_error, cfp, snapshot
from tests.handmade import color_model

OPTIONS = [
    (["--label", "3"], "label 3 is out of range: the model has 3 classes (0..2)"),
    (["--label", "-1"], "label -1 is out of range"),
    (["--label", "1.5"], "label '1.5' is not one of the model's 3 class names"),
    (["--theta", "1.01"], "theta must be a number in [0, 1]"),
    (["--theta", "-0.1"], "theta must be a number in [0, 1]"),
    (["--theta", "nan"], "theta must be a number in [0, 1]"),
    (["--theta", "inf"], "theta must be a number in [0, 1]"),
    (["--depth", "0"], "depth must be an integer >= 1"),
    (["--depth", "-3"], "depth must be an integer >= 1"),
    (["--top-n", "0"], "top-n must be an integer >= 1"),
    (["--head-mode", "magic"], "invalid choice: 'magic'"),
    (["--class-tube", "summed"], "invalid choice: 'summed'"),
    (["--per-depth", "0"], "--per-depth must be >= 1"),
    (["--fps", "0"], "--fps must be > 0"),
    (["--stride", "2"], "--stride needs --window"),
    (["--device", "cuda"], "--device cuda needs"),
    (["--max-memory", "lots"], "max memory 'lots' is not a size"),
    (["--max-memory", "0"], "max memory must be at least 1 byte"),
]


@pytest.mark.parametrize(("args", "fragment"), OPTIONS, ids=[" ".join(a) for a, _ in OPTIONS])
def test_bad_option(work, refused, args, fragment):
    refused("explain", "m.onnx", "--clip", "clip.npy", "--out", "out", *args, fragments=(fragment,))


@pytest.mark.parametrize(
    ("kw", "fragment"),
    [
        ({"label": 3}, "label 3 is out of range"),
        ({"label": "zero"}, "label 'zero'"),
        ({"label": 1.0}, "label must be a class index or a class name"),
        ({"depth": True}, "depth must be an integer"),
        ({"theta": float("nan")}, "theta must be a number in [0, 1]"),
        ({"theta": "0.5"}, "theta must be a number in [0, 1]"),
        ({"top_n": 0}, "top-n must be an integer >= 1"),
    ],
)
def test_bad_option_api(work, kw, fragment):
    clip = np.load(work / "clip.npy")
    with pytest.raises(OptionError) as info:
        Explainer(work / "m.onnx", clip_shape=clip.shape).explain(clip, **kw)
    assert info.type is OptionError and fragment in str(info.value)


def test_output_path_is_a_file(work, refused):
    (work / "out").write_text("keep me")
    refused(
        "explain", "m.onnx", "--clip", "clip.npy", "--out", "out", fragments=("already exists",)
    )
    r = refused(
        "explain", "m.onnx", "--clip", "clip.npy", "--out", "out", "--overwrite",
        fragments=("is a file, not a folder",),
    )  # fmt: skip
    assert (work / "out").read_text() == "keep me" and r.stdout == ""


def test_output_under_a_file(work, refused):
    (work / "file").write_text("x")
    refused(
        "explain", "m.onnx", "--clip", "clip.npy", "--out", "file/out",
        fragments=("does not exist",),
    )  # fmt: skip


def test_output_in_a_missing_folder(work, refused):
    refused(
        "explain", "m.onnx", "--clip", "clip.npy", "--out", "no/such/out",
        fragments=("does not exist",),
    )  # fmt: skip


def test_unwritable_folder(work, monkeypatch):
    """Root ignores permission bits, so the check is driven through os.access at API level."""
    locked = work / "locked"
    locked.mkdir()
    os.chmod(locked, 0o500)
    if os.access(locked, os.W_OK):  # running as root: simulate what a user would see
        real = os.access
        monkeypatch.setattr(
            outputs.os, "access", lambda p, mode: False if str(p) == str(locked) else real(p, mode)
        )
    with pytest.raises(OutputError, match="is not writable") as info:
        with outputs.staged_dir(locked / "out", overwrite=False):
            pytest.fail("must not get here")
    assert info.type is OutputError and list(locked.iterdir()) == []


def test_second_run_into_the_same_folder_needs_overwrite(work):
    from tests.bad_inputs.conftest import assert_one_line_error, cfp, snapshot

    assert cfp("explain", "m.onnx", "--clip", "clip.npy", "--out", "out", cwd=work).returncode == 0
    before = snapshot(work)
    r = cfp("explain", "m.onnx", "--clip", "clip.npy", "--out", "out", "--theta", "0.2", cwd=work)
    assert_one_line_error(r, "'out' already exists; pass --overwrite to replace it")
    assert snapshot(work) == before
    r = cfp("explain", "m.onnx", "--clip", "clip.npy", "--out", "out", "--overwrite", cwd=work)
    assert r.returncode == 0 and sorted(p.name for p in work.iterdir()) == [
        "clip.npy",
        "m.onnx",
        "out",
    ]


def test_model_folder_left_clean(tmp_path):
    """A refused run leaves no session scratch (.cfp-*) next to the model."""
    color_model(tmp_path / "m.onnx")
    with pytest.raises(OptionError):
        Explainer(tmp_path / "m.onnx", clip_shape=(1, 3, 8, 32, 32)).explain(
            np.zeros((1, 3, 8, 32, 32), np.float32), label=9
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_a_model_that_is_not_a_path_is_an_option_error():
    import cfp_onnx

    with pytest.raises(OptionError, match="model must be a path"):
        cfp_onnx.explain(123, np.zeros((1, 3, 8, 32, 32), np.float32))  # type: ignore[arg-type]


def test_a_huge_depth_ends_where_the_network_does(work):
    from tests.bad_inputs.conftest import cfp

    r = cfp("explain", "m.onnx", "--clip", "clip.npy", "--out", "o", "--depth", "2147483647",
            "--theta", "0", cwd=work, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "ran out of layers" in r.stdout


@pytest.mark.parametrize(
    ("blocked", "argv", "fragment"),
    [
        ("onnxruntime", ["explain", "m.onnx", "--clip", "clip.npy", "--out", "out"], "[cpu]"),
        ("onnxruntime", ["export", "tf", "m.keras", "-o", "x.onnx"], "[cpu]"),
        ("ray", ["batch", "m.onnx", "--clips", ".", "--out", "b", "--engine", "ray"], "[ray]"),
    ],
    ids=["explain-no-runtime", "export-no-runtime", "batch-no-ray"],
)
def test_a_missing_extra_is_one_line_naming_it(work, blocked, argv, fragment):
    """Installed without an extra (``pip install -e '.[tf]'``): the one line says which to
    install. The module is hidden from a real interpreter running cfp's own main()."""
    code = (
        f"import sys; sys.modules[{blocked!r}] = None\n"
        "from cfp_onnx.cli.main import main\n"
        f"sys.exit(main({argv!r}))\n"
    )
    before = snapshot(work)
    r = subprocess.run([sys.executable, "-c", code], cwd=work, capture_output=True, text=True,
                       timeout=120)  # fmt: skip
    assert_one_line_error(r, blocked, "is not installed", fragment)
    assert snapshot(work) == before


def test_label_by_class_name(work):
    """--label takes a class name as well as an index (SPEC's label stays the index)."""
    r = cfp("explain", "m.onnx", "--clip", "clip.npy", "--label", "green", "--out", "o", cwd=work)
    assert r.returncode == 0, r.stderr
    doc = json.loads((work / "o" / "pyramid.json").read_text())
    assert doc["label"] == 1 and doc["label_name"] == "green"
    clip = np.load(work / "clip.npy")
    ex = Explainer(work / "m.onnx", clip_shape=clip.shape)
    names = ("red", "green", "moving")
    assert ex.pyramid(ex.run(clip), label="moving", class_names=names).label == 2


@pytest.mark.parametrize(
    ("label", "fragment"),
    [("Green", "did you mean 'green'"), ("blue", "not one of the model's 3 class names")],
)
def test_an_unknown_class_name_is_one_line(work, refused, label, fragment):
    refused("explain", "m.onnx", "--clip", "clip.npy", "--label", label, "--out", "o",
            fragments=(fragment,))  # fmt: skip
