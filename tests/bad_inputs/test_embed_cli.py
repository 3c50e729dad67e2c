"""`cfp embed` as a user runs it: one line on success or failure, and the output file
whole or absent (a signal, a full disk, an existing file, the model itself)."""

from __future__ import annotations

import signal
import subprocess
import time

import onnx
import pytest

from cfp_onnx.embed import METADATA, EmbedInfo
from tests.bad_inputs.conftest import CFP, INTERRUPTED, assert_one_line_error, cfp, snapshot
from tests.bad_inputs.test_outputs import mounted


def test_embed_writes_one_model_and_says_so(work):
    before = snapshot(work)
    r = cfp("embed", "m.onnx", "-o", "e.onnx", "--class-tube", "weighted", cwd=work)
    assert r.returncode == 0, r.stderr
    assert r.stderr == "" and len(r.stdout.strip().splitlines()) == 1
    assert r.stdout.startswith("wrote ") and "cfp_class_tube" in r.stdout
    info = EmbedInfo.of(onnx.load(str(work / "e.onnx")))
    assert info is not None and info.class_tube == "weighted" and info.theta == 0.6
    after = snapshot(work)
    assert set(after) - set(before) == {"e.onnx"}
    assert {k: v for k, v in after.items() if k in before} == before


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["-o", "m.onnx", "--overwrite"], "must not replace"),
        (["-o", "e.onnx", "--theta", "2"], "theta must be a number in [0, 1]"),
        (["-o", "e.onnx", "--depth", "0"], "depth"),
        (["-o", "e.onnx", "--class-tube", "gradcam"], "invalid choice"),
        (["-o", "missing/e.onnx"], "does not exist"),
        (["-o", "e.onnx", "--label", "1"], "unrecognized arguments"),
    ],
)
def test_bad_requests_are_one_line_and_change_nothing(work, args, fragment):
    before = snapshot(work)
    assert_one_line_error(cfp("embed", "m.onnx", *args, cwd=work), fragment)
    assert snapshot(work) == before


def test_an_existing_output_needs_overwrite(work):
    (work / "e.onnx").write_bytes(b"the user's file")
    before = snapshot(work)
    assert_one_line_error(cfp("embed", "m.onnx", "-o", "e.onnx", cwd=work), "--overwrite")
    assert snapshot(work) == before


def test_a_model_that_is_not_onnx_is_one_line(work):
    (work / "x.onnx").write_bytes(b"not a model")
    assert_one_line_error(cfp("embed", "x.onnx", "-o", "e.onnx", cwd=work))
    assert not (work / "e.onnx").exists()


def test_a_full_disk_leaves_nothing(work, tmp_path):
    assert cfp("embed", "m.onnx", "-o", "e.onnx", cwd=work).returncode == 0
    assert (work / "e.onnx").stat().st_size > 4096  # does not fit the one-page disk below
    with mounted(tmp_path / "disk", "size=4k") as disk:
        r = cfp("embed", str(work / "m.onnx"), "-o", "e.onnx", cwd=disk)
        assert_one_line_error(r, "No space left")
        assert list(disk.iterdir()) == []


@pytest.mark.parametrize("delay", [0.1, 0.4, 0.7, 1.0])
def test_a_signal_leaves_the_old_file_or_the_new_one(work, delay):
    assert cfp("embed", "m.onnx", "-o", "e.onnx", cwd=work).returncode == 0
    old = (work / "e.onnx").read_bytes()
    proc = subprocess.Popen(
        [CFP, "embed", "m.onnx", "-o", "e.onnx", "--overwrite", "--theta", "0.2"],
        cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(delay)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode in (0, INTERRUPTED, -signal.SIGTERM) and "Traceback" not in err, err
    assert sorted(p.name for p in work.iterdir()) == ["clip.npy", "e.onnx", "m.onnx"]
    now = (work / "e.onnx").read_bytes()
    if now != old:  # the new model, whole
        meta = {p.key: p.value for p in onnx.load_from_string(now).metadata_props}
        assert '"theta": 0.2' in meta[METADATA]
