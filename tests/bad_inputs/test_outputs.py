"""Whole-or-nothing outputs under SIGINT/SIGTERM: a real ``cfp`` subprocess signalled mid-write
leaves the previous result or nothing, and no temporary folder."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.bad_inputs.conftest import CFP, INTERRUPTED, assert_one_line_error, cfp, snapshot


def _start(work: Path, *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, "CFP_TEST_SLOW_WRITE": "30"}
    args = [CFP, "explain", "m.onnx", "--clip", "clip.npy", "--out", "out", *extra]
    return subprocess.Popen(
        args, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_for_staged(work: Path, proc: subprocess.Popen[str]) -> None:
    """Until the staged folder holds the report: the run is mid-write, nothing renamed yet."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if any((p / "report.html").exists() for p in work.glob(".out.*.tmp")):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    pytest.fail("the run never staged its output")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_interrupted_first_run_leaves_nothing(work, sig):
    before = snapshot(work)
    proc = _start(work)
    _wait_for_staged(work, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == INTERRUPTED, err
    assert err.strip().splitlines() == ["cfp explain: interrupted"]
    assert snapshot(work) == before  # no out/, no .out.*.tmp


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_interrupted_overwrite_keeps_the_previous_result(work, sig):
    assert cfp("explain", "m.onnx", "--clip", "clip.npy", "--out", "out", cwd=work).returncode == 0
    before = snapshot(work)
    proc = _start(work, "--overwrite", "--theta", "0.1")
    _wait_for_staged(work, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == INTERRUPTED, err
    assert snapshot(work) == before  # the previous result, byte for byte, and no leftovers


@pytest.mark.parametrize("delay", [0.05, 0.2, 0.35, 0.5, 0.8])
def test_signal_at_any_moment_gives_old_or_new_never_partial(work, delay):
    """No hook: SIGTERM after `delay` seconds lands wherever the run is."""
    assert cfp("explain", "m.onnx", "--clip", "clip.npy", "--out", "out", cwd=work).returncode == 0
    old = snapshot(work / "out")
    args = [
        CFP,
        "explain",
        "m.onnx",
        "--clip",
        "clip.npy",
        "--out",
        "out",
        "--overwrite",
        "--theta",
        "0.1",
    ]
    proc = subprocess.Popen(
        args, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    time.sleep(delay)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    # -SIGTERM: the signal beat the interpreter to cfp's handler (nothing was started yet)
    assert proc.returncode in (0, INTERRUPTED, -signal.SIGTERM) and "Traceback" not in err, err
    assert sorted(p.name for p in work.iterdir()) == ["clip.npy", "m.onnx", "out"]
    now = snapshot(work / "out")
    if now != old:  # the new result, whole: written last, the report says the rename happened
        assert (work / "out" / "report.html").is_file() and (
            work / "out" / "pyramid.json"
        ).is_file()
        assert '"theta": 0.1' in (work / "out" / "pyramid.json").read_text()


@contextlib.contextmanager
def mounted(where: Path, options: str) -> Iterator[Path]:
    """A real tmpfs mounted with `options` at `where`, or a skip where mounting is not allowed."""
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                       capture_output=True, text=True)  # fmt: skip
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()})")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)


@pytest.fixture
def tiny_disk(tmp_path):  # type: ignore[no-untyped-def]
    """A real 20 KiB file system (tmpfs)."""
    with mounted(tmp_path / "tiny", "size=20k") as mnt:
        yield mnt


def test_full_disk_is_one_line_and_leaves_nothing(work, tiny_disk):
    r = cfp("explain", str(work / "m.onnx"), "--clip", str(work / "clip.npy"), "--out", "out",
            cwd=tiny_disk)  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert "No space left" in r.stderr and "'out'" in r.stderr and "--out" in r.stderr
    assert list(tiny_disk.iterdir()) == []  # no partial output, no staging folder


@pytest.mark.parametrize("kib", [24, 72, 88, 104, 120, 136])
def test_disk_filling_at_any_file_is_one_line_and_leaves_nothing(work, tmp_path, kib):
    """The disk fills part-way through the report, a GIF or a PNG (the whole output is
    ~135 KiB): our one line, never libpng's "Write Error", and nothing left behind."""
    with mounted(tmp_path / "disk", f"size={kib}k") as disk:
        r = cfp("explain", str(work / "m.onnx"), "--clip", str(work / "clip.npy"), "--out",
                "out", "--tubes", "strip,gif,stack", cwd=disk)  # fmt: skip
        if r.returncode == 0:  # it fitted: then whole
            assert (disk / "out" / "report.html").is_file(), r.stderr
            assert len(list((disk / "out" / "tubes").iterdir())) == 6
            return
        assert r.returncode == 2, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "No space left" in r.stderr, r.stderr
        assert list(disk.iterdir()) == []


def test_read_only_out_is_one_line_and_leaves_nothing(work, tmp_path):
    with mounted(tmp_path / "ro", "size=1m,ro") as ro:
        r = cfp("explain", str(work / "m.onnx"), "--clip", str(work / "clip.npy"), "--out",
                str(ro / "out"), cwd=work)  # fmt: skip
        assert r.returncode == 2, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "is not writable" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and list(ro.iterdir()) == []


# --------------------------------------------------------------------------- never lose data


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_batch_out_onto_its_own_clips_is_refused(work):
    clips = work / "clips"
    clips.mkdir()
    for i in range(2):
        (clips / f"c{i}.npy").write_bytes((work / "clip.npy").read_bytes())
    before = tree(work)
    r = cfp("batch", "m.onnx", "--clips", "clips", "--out", "clips", "--overwrite", cwd=work)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "must not replace" in r.stderr
    assert tree(work) == before


@pytest.mark.parametrize("out", ["../{here}", ".", "/"])
def test_out_holding_the_model_the_clip_or_the_cwd_is_refused(work, out):
    before = tree(work)
    r = cfp("explain", "m.onnx", "--clip", "clip.npy", "--out", out.format(here=work.name),
            "--overwrite", cwd=work)  # fmt: skip
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "must not replace" in r.stderr and "Traceback" not in r.stderr
    assert tree(work) == before


def test_two_runs_racing_for_one_new_out_never_replace_each_other(work):
    slow = subprocess.Popen(
        [CFP, "explain", "m.onnx", "--clip", "clip.npy", "--out", "out", "--theta", "0.1"],
        cwd=work, env={**os.environ, "CFP_TEST_SLOW_WRITE": "4"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(1.5)  # the slow run has staged its result and waits before its rename
    fast = cfp("explain", "m.onnx", "--clip", "clip.npy", "--out", "out", cwd=work)
    assert fast.returncode == 0, fast.stderr
    kept = tree(work / "out")
    _, err = slow.communicate(timeout=60)
    assert slow.returncode == 2 and "another run wrote" in err, err
    assert len(err.strip().splitlines()) == 1
    assert tree(work / "out") == kept  # the first result, untouched
    assert not [p for p in work.iterdir() if p.name.startswith(".out.")]  # no staging left


def test_killed_run_leaves_staging_that_the_next_run_removes(work):
    proc = subprocess.Popen(
        [CFP, "explain", "m.onnx", "--clip", "clip.npy", "--out", "out"], cwd=work,
        env={**os.environ, "CFP_TEST_SLOW_WRITE": "30"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    staged: list[Path] = []
    while time.monotonic() < deadline and not staged:
        staged = [
            p
            for p in work.iterdir()
            if p.name.startswith(".out.") and (p / "pyramid.json").exists()
        ]
        time.sleep(0.05)
    proc.kill()  # SIGKILL: no handler runs
    proc.wait(timeout=10)
    assert staged and staged[0].exists() and not (work / "out").exists()
    r = cfp("explain", "m.onnx", "--clip", "clip.npy", "--out", "out", cwd=work)
    assert r.returncode == 0, r.stderr
    assert not staged[0].exists() and (work / "out" / "pyramid.json").is_file()


def test_symlinked_out_is_followed_once_and_never_renamed_away(work, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("elsewhere") / "results"
    assert cfp("explain", "m.onnx", "--clip", "clip.npy", "--out", str(elsewhere),
               cwd=work).returncode == 0  # fmt: skip
    (work / "link").symlink_to(elsewhere)
    r = cfp("explain", "m.onnx", "--clip", "clip.npy", "--out", "link", "--overwrite",
            "--theta", "0.2", cwd=work)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert (work / "link").is_symlink() and (work / "link").resolve() == elsewhere.resolve()
    assert '"theta": 0.2' in (elsewhere / "pyramid.json").read_text()
    assert not [p for p in elsewhere.parent.iterdir() if p.name.startswith(".results.")]


def test_outputs_respect_the_umask(work):
    """Files and folders come out as a plain create would make them, not private."""
    r = cfp("explain", "m.onnx", "--clip", "clip.npy", "--out", "out", cwd=work)
    assert r.returncode == 0, r.stderr
    mask = os.umask(0)
    os.umask(mask)
    assert (work / "out").stat().st_mode & 0o777 == 0o777 & ~mask
    assert (work / "out" / "pyramid.json").stat().st_mode & 0o777 == 0o666 & ~mask


def test_batch_redoes_a_truncated_clip_of_a_finished_run(work):
    """The console script on a batch whose finished clip was truncated since: it is redone
    (one warning line), and the folder ends as a clean run's."""
    clips = work / "clips"
    clips.mkdir()
    for i in range(3):
        (clips / f"c{i}.npy").write_bytes((work / "clip.npy").read_bytes())
    args = ("batch", "m.onnx", "--clips", "clips", "--no-progress")
    assert cfp(*args, "--out", "out", cwd=work).returncode == 0
    assert cfp(*args, "--out", "clean", cwd=work).returncode == 0
    pyr = work / "out" / "clips" / "c1" / "pyramid.json"
    pyr.write_bytes(pyr.read_bytes()[:10])
    r = cfp(*args, "--out", "out", cwd=work)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip().splitlines() == [
        "WARNING cfp_onnx.batch: 1 finished clips are damaged and will be redone"
    ]
    assert "1 clips explained, 2 already done" in r.stdout
    strip = {"batch.json", ".cfp-output.json"}  # they name the --out folder
    assert {k: v for k, v in tree(work / "out").items() if Path(k).name not in strip} == {
        k: v for k, v in tree(work / "clean").items() if Path(k).name not in strip
    }


def test_symlinked_out_onto_another_file_system(work, tmp_path):
    """``--out`` a link into another file system (EXDEV for any rename across): staged
    beside the link's target, swapped there, the link kept; the old result replaced whole."""
    with mounted(tmp_path / "other", "size=4m") as other:
        (work / "link").symlink_to(other / "results")
        first = cfp("explain", "m.onnx", "--clip", "clip.npy", "--out", "link", cwd=work)
        assert first.returncode == 0, first.stderr
        r = cfp("explain", "m.onnx", "--clip", "clip.npy", "--out", "link", "--overwrite",
                "--theta", "0.2", cwd=work)  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert (work / "link").is_symlink()
        assert '"theta": 0.2' in (other / "results" / "pyramid.json").read_text()
        assert sorted(p.name for p in other.iterdir()) == ["results"]  # no staging left
        assert sorted(p.name for p in work.iterdir()) == ["clip.npy", "link", "m.onnx", "other"]


@pytest.mark.parametrize("kind", ["file", "loop"])
def test_out_that_is_not_a_folder_is_refused_even_with_overwrite(work, refused, kind):
    out = work / "out"
    if kind == "file":
        out.write_text("a user's notes")
    else:
        out.symlink_to("out")  # a link to itself
    refused("explain", "m.onnx", "--clip", "clip.npy", "--out", "out",
            fragments=("already exists",))  # fmt: skip
    refused("explain", "m.onnx", "--clip", "clip.npy", "--out", "out", "--overwrite",
            fragments=("not a folder",))  # fmt: skip
    assert out.is_symlink() if kind == "loop" else out.read_text() == "a user's notes"


def test_unwritable_out_for_a_user_is_one_line(work):
    """EACCES, as a real unprivileged user (root writes anywhere): run cfp as `nobody`
    through setpriv on a model and clip it can read, with --out in a folder it can't write."""
    import shutil
    import tempfile

    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        pytest.skip("needs root and setpriv to run cfp as an unprivileged user")
    shared = Path(tempfile.mkdtemp(prefix="cfp-eacces-"))
    try:
        shared.chmod(0o755)
        for name in ("m.onnx", "clip.npy"):
            shutil.copy(work / name, shared / name)
            (shared / name).chmod(0o644)
        (shared / "locked").mkdir(mode=0o755)  # root's: read-only for nobody
        r = subprocess.run(
            [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", CFP, "explain",
             "m.onnx", "--clip", "clip.npy", "--out", "locked/out"],
            cwd=shared, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        if "Permission denied" in r.stderr and "cfp" not in r.stderr:
            pytest.skip(f"nobody cannot run this interpreter here ({r.stderr.strip()})")
        # one line: also no onnxruntime telemetry warning about an unwritable HOME
        assert_one_line_error(r, "cannot write 'locked/out'", "locked' is not writable")
        assert list((shared / "locked").iterdir()) == []
    finally:
        shutil.rmtree(shared)


@pytest.mark.parametrize(
    "argv",
    [
        ["compare", "m.onnx", "m.onnx", "--clip", "clip.npy", "--out", "out"],
        ["demo", "--out", "out"],
        ["explain", "m.onnx", "--clip", "clip.npy", "--out", "out", "--window", "8"],
    ],
    ids=["compare", "demo", "explain-window"],
)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_every_command_interrupted_mid_write_exits_130_leaving_nothing(work, argv, sig):
    """Not only explain: compare, demo and windows too, signalled while their output is
    staged (held there by the CFP_TEST_SLOW_WRITE hook)."""
    if "--window" in argv:
        from cfp_onnx.video import write_video

        frames = np.random.default_rng(0).integers(0, 255, (24, 32, 32, 3), np.uint8)
        write_video(work / "v.mp4", frames)
        argv = [a if a != "clip.npy" else "v.mp4" for a in argv]
    before = snapshot(work)
    proc = subprocess.Popen(
        [CFP, *argv], cwd=work, env={**os.environ, "CFP_TEST_SLOW_WRITE": "30"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if any(any(p.iterdir()) for p in work.glob(".out.*.tmp")):
            break
        time.sleep(0.05)
    time.sleep(0.3)  # into the write
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == INTERRUPTED, err
    assert err.strip().splitlines() == [f"cfp {argv[0]}: interrupted"], err
    assert snapshot(work) == before


def test_a_reader_that_leaves_does_not_discard_the_results(work):
    """``cfp explain ... | head -1``: stdout's reader goes after one line; the run still
    writes its whole output and exits 0 (before: a quiet exit 0 that had thrown it away)."""
    proc = subprocess.Popen(
        [CFP, "explain", "m.onnx", "--clip", "clip.npy", "--out", "out"], cwd=work,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline().startswith("prediction:")
    proc.stdout.close()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and err == "", err
    assert (work / "out" / "pyramid.json").is_file() and (work / "out" / "report.html").is_file()
