"""cfp batch: per-clip pyramids, class aggregates, summary CSV, resuming after a kill.

A tiny random 3-conv model (8x32x32 clips, 4 classes) built with onnx.helper keeps
every run well under a second per few dozen clips.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from cfp_onnx.api import Explainer
from cfp_onnx.batch import (
    BatchOptions,
    ClipTask,
    WorkerSpec,
    class_report,
    run_batch,
    summary_header,
    tasks_from,
)
from cfp_onnx.engines import LocalEngine, batch_for
from cfp_onnx.errors import OptionError, OutputError
from cfp_onnx.metadata import write_metadata

CFP = str(Path(sys.executable).with_name("cfp"))
FRAMES, SIZE, CLASSES = 8, 32, 4
NAMES = ("left", "right", "up", "down")


def tiny_model(path: Path, seed: int = 0, batch: int | str = 1) -> Path:
    """Conv(3->6) Relu MaxPool Conv(6->8, group 2) Relu Conv(8->8) Relu GAP Gemm(4)."""
    rng = np.random.default_rng(seed)
    w = {
        "w1": rng.standard_normal((6, 3, 3, 3, 3)).astype(np.float32) * 0.3,
        "w2": rng.standard_normal((8, 3, 3, 3, 3)).astype(np.float32) * 0.3,
        "w3": rng.standard_normal((8, 8, 1, 3, 3)).astype(np.float32) * 0.3,
        "fc": rng.standard_normal((CLASSES, 8)).astype(np.float32),
        "b": rng.standard_normal(CLASSES).astype(np.float32) * 0.1,
    }
    n = helper.make_node
    nodes = [
        n("Conv", ["video", "w1"], ["c1"], name="conv1", pads=[1] * 6),
        n("Relu", ["c1"], ["r1"]),
        n("MaxPool", ["r1"], ["p1"], kernel_shape=[1, 2, 2], strides=[1, 2, 2]),
        n("Conv", ["p1", "w2"], ["c2"], name="conv2", pads=[1] * 6, group=2),
        n("Relu", ["c2"], ["r2"]),
        n("Conv", ["r2", "w3"], ["c3"], name="conv3", pads=[0, 1, 1, 0, 1, 1]),
        n("Relu", ["c3"], ["r3"]),
        n("GlobalAveragePool", ["r3"], ["g"]),
        n("Flatten", ["g"], ["f"]),
        n("Gemm", ["f", "fc", "b"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("video", TensorProto.FLOAT, [batch, 3, FRAMES, SIZE, SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, CLASSES])],
        [numpy_helper.from_array(v, k) for k, v in w.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    write_metadata(model, layout="NCDHW", frames=FRAMES, size=(SIZE, SIZE), class_names=NAMES)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def make_clips(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """`n` random clips as .npy files, names clip_0 .. clip_{n-1}, plus a labelled CSV."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = folder / f"clip_{i}.npy"
        np.save(p, rng.random((1, 3, FRAMES, SIZE, SIZE), dtype=np.float32))
        paths.append(p)
    with (folder.parent / "list.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["clip", "label"])
        for i, p in enumerate(paths):
            w.writerow([f"{folder.name}/{p.name}", NAMES[i % CLASSES] if i % 2 else i % CLASSES])
    return paths


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("batch")
    tiny_model(root / "tiny.onnx")
    make_clips(root / "clips", 24)
    return root


def spec(root: Path, **kw: object) -> WorkerSpec:
    return WorkerSpec(model=str(root / "tiny.onnx"), options=BatchOptions(theta=0.5, **kw))  # type: ignore[arg-type]


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` by relative path (the batch manifest included)."""
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def reference(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted local run over the folder."""
    out = tmp_path_factory.mktemp("ref") / "out"
    run_batch(spec(data), tasks_from(data / "clips"), out, engine=LocalEngine())
    return out


# --------------------------------------------------------------------------- per clip


def test_each_clip_equals_explain(data: Path, reference: Path) -> None:
    ex = None
    for task in tasks_from(data / "clips"):
        clip = np.load(task.path)
        ex = ex or Explainer(data / "tiny.onnx", clip_shape=clip.shape)
        expected = ex.explain(clip, theta=0.5, class_names=NAMES).to_json()
        assert (reference / "clips" / task.id / "pyramid.json").read_text() == expected
        meta = json.loads((reference / "clips" / task.id / "clip.json").read_text())
        assert meta["predicted"] == int(np.argmax(ex.run(clip).logits))


def test_summary_csv_matches_the_pyramids(data: Path, reference: Path) -> None:
    with (reference / "summary.csv").open() as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == summary_header(3)
    assert [r[0] for r in rows[1:]] == [f"clip_{i}" for i in range(24)]  # natural order
    for r in rows[1:]:
        pyr = json.loads((reference / "clips" / r[0] / "pyramid.json").read_text())
        meta = json.loads((reference / "clips" / r[0] / "clip.json").read_text())
        depths = [n["depth"] for n in pyr["nodes"]]
        assert int(r[1]) == meta["predicted"] and r[2] == ""
        assert int(r[3]) == pyr["label"] == meta["predicted"]  # default: the prediction
        assert float(r[4]) == pyr["score"]
        assert [int(x) for x in r[5:8]] == [depths.count(d) for d in range(3)]
        assert int(r[8]) == len(pyr["links"])


def direct_aggregate(reference: Path) -> dict[int, dict[tuple[str, int], tuple[float, float, int]]]:
    """The class pyramids computed the slow, obvious way from the per-clip JSON files."""
    per_class: dict[int, list[dict]] = {}
    for folder in sorted((reference / "clips").iterdir()):
        pyr = json.loads((folder / "pyramid.json").read_text())
        per_class.setdefault(pyr["label"], []).append(pyr)
    out = {}
    for label, pyrs in per_class.items():
        seen: dict[tuple[str, int], list[tuple[float, int]]] = {}
        for p in pyrs:
            for n in p["nodes"]:
                seen.setdefault((n["layer"], n["channel"]), []).append((n["relevance"], n["depth"]))
        out[label] = {
            k: (len(v) / len(pyrs), sum(r for r, _ in v) / len(v), min(d for _, d in v))
            for k, v in seen.items()
        }
    return out


def test_class_pyramids_equal_a_direct_computation(reference: Path) -> None:
    direct = direct_aggregate(reference)
    assert sorted(int(p.name) for p in (reference / "classes").iterdir() if p.is_dir()) == sorted(
        direct
    )
    for label, kernels in direct.items():
        doc = json.loads((reference / "classes" / str(label) / "class_pyramid.json").read_text())
        assert doc["label"] == label and doc["label_name"] == NAMES[label]
        got = {(n["layer"], n["channel"]): n for n in doc["nodes"]}
        assert set(got) == set(kernels)
        for k, (frac, rel, depth) in kernels.items():
            assert got[k]["fraction"] == pytest.approx(frac, rel=1e-12)
            assert got[k]["relevance"] == pytest.approx(rel, rel=1e-12)
            assert got[k]["depth"] == depth
        assert [n["id"] for n in doc["nodes"]] == list(range(len(doc["nodes"])))
        assert [n["depth"] for n in doc["nodes"]] == sorted(n["depth"] for n in doc["nodes"])
        assert doc["clips"] == sum(
            1
            for f in (reference / "clips").iterdir()
            if json.loads((f / "pyramid.json").read_text())["label"] == label
        )
        html = (reference / "classes" / str(label) / "report.html").read_text()
        assert "<table>" in html and f"class {label}" in html


def test_class_report_escapes_names() -> None:
    doc = {
        "model": "<m>.onnx", "label": 0, "label_name": "<script>x</script>", "clips": 1,
        "theta": 0.5, "depth": 3, "head_mode": "weights", "top_n": None,
        "nodes": [{"id": 0, "layer": "<b>", "channel": 0, "depth": 0, "fraction": 1.0,
                   "relevance": 1.0}],
    }  # fmt: skip
    html = class_report(doc)
    assert "<script>x" not in html and "&lt;script&gt;" in html and "<b>" not in html


# --------------------------------------------------------------------------- resume


def test_resume_skips_done_clips_and_equals_one_run(
    data: Path, reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    tasks = tasks_from(data / "clips")
    first = run_batch(spec(data), tasks[:10], out, engine=LocalEngine())
    assert (first.done, first.skipped) == (10, 0)
    mtime = (out / "clips" / "clip_3" / "pyramid.json").stat().st_mtime_ns
    again = run_batch(spec(data), tasks, out, engine=LocalEngine())
    assert (again.done, again.skipped) == (14, 10)
    assert (out / "clips" / "clip_3" / "pyramid.json").stat().st_mtime_ns == mtime
    assert tree(out) == tree(reference)


def test_damaged_clips_are_redone_and_the_result_equals_one_run(
    data: Path, reference: Path, tmp_path: Path
) -> None:
    """Truncated, emptied, deleted or edited (same size) per-clip files are found and redone:
    by size when the run starts, by hash when the summary reads them. The rest stay."""
    out = tmp_path / "out"
    tasks = tasks_from(data / "clips")
    run_batch(spec(data), tasks, out, engine=LocalEngine())
    clips = out / "clips"
    kept = (clips / "clip_9" / "pyramid.json").stat().st_mtime_ns
    body = (clips / "clip_1" / "pyramid.json").read_bytes()
    (clips / "clip_1" / "pyramid.json").write_bytes(body[: len(body) // 2])  # truncated
    (clips / "clip_2" / "pyramid.json").write_bytes(b"")  # emptied
    (clips / "clip_3" / "clip.json").unlink()  # lost
    edited = bytearray((clips / "clip_4" / "pyramid.json").read_bytes())
    edited[-3] = ord("7") if edited[-3] != ord("7") else ord("8")  # same size, other bytes
    (clips / "clip_4" / "pyramid.json").write_bytes(bytes(edited))
    again = run_batch(spec(data), tasks, out, engine=LocalEngine())
    assert (again.done, again.skipped) == (4, len(tasks) - 4)
    assert (clips / "clip_9" / "pyramid.json").stat().st_mtime_ns == kept
    assert tree(out) == tree(reference)


def test_other_options_refuse_to_resume(data: Path, tmp_path: Path) -> None:
    tasks = tasks_from(data / "clips")[:2]
    run_batch(spec(data), tasks, tmp_path / "o", engine=LocalEngine())
    with pytest.raises(OutputError, match="theta"):
        run_batch(
            WorkerSpec(str(data / "tiny.onnx"), BatchOptions(theta=0.7)),
            tasks,
            tmp_path / "o",
            engine=LocalEngine(),
        )
    s = run_batch(
        WorkerSpec(str(data / "tiny.onnx"), BatchOptions(theta=0.7)),
        tasks,
        tmp_path / "o",
        engine=LocalEngine(),
        overwrite=True,
    )
    assert (s.done, s.skipped) == (2, 0)


def test_true_labels_from_csv(data: Path, tmp_path: Path) -> None:
    tasks = tasks_from(data / "list.csv", NAMES)
    assert [t.label for t in tasks[:4]] == [0, 1, 2, 3]  # indices and names both read
    s = run_batch(spec(data, label="true"), tasks[:8], tmp_path / "o", engine=LocalEngine())
    assert s.done == 8
    for t in tasks[:8]:
        doc = json.loads((tmp_path / "o" / "clips" / t.id / "pyramid.json").read_text())
        assert doc["label"] == t.label and doc["label_name"] == NAMES[t.label]
    assert sorted(s.classes) == [0, 1, 2, 3]


def test_bad_sources_are_one_line_errors(data: Path, tmp_path: Path) -> None:
    with pytest.raises(OptionError, match="no clips"):
        tasks_from(tmp_path)
    with pytest.raises(OptionError, match="folder of clips"):
        tasks_from(tmp_path / "missing")
    with pytest.raises(OptionError, match="needs a label"):
        run_batch(spec(data, label="true"), tasks_from(data / "clips")[:2], tmp_path / "o",
                  engine=LocalEngine())  # fmt: skip
    (tmp_path / "dup").mkdir()
    np.save(tmp_path / "dup" / "a.npy", np.zeros(1))
    (tmp_path / "dup" / "a.mp4").write_bytes(b"")
    with pytest.raises(OptionError, match="share the id"):
        tasks_from(tmp_path / "dup")


def test_a_bad_clip_fails_alone(data: Path, tmp_path: Path) -> None:
    tasks = [*tasks_from(data / "clips")[:3], ClipTask("broken", str(tmp_path / "broken.npy"))]
    np.save(tmp_path / "broken.npy", np.zeros((1, 3, 4, 8, 8), np.float32))
    s = run_batch(spec(data), tasks, tmp_path / "o", engine=LocalEngine())
    assert s.done == 3 and [f.id for f in s.failed] == ["broken"]
    assert not (tmp_path / "o" / "clips" / "broken").exists()


# --------------------------------------------------------------------------- the CLI


def cfp(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CFP, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def finished(clips: Path) -> int:
    """Clip folders swapped in (pathlib's glob also matches the hidden staging folders)."""
    return sum(1 for p in clips.glob("*/pyramid.json") if not p.parent.name.startswith("."))


def test_cli_killed_halfway_then_resumed_equals_one_run(data: Path, tmp_path: Path) -> None:
    """SIGTERM once some clips are written; the re-run finishes and matches a clean run."""
    many = make_clips(tmp_path / "many", 160, seed=1)
    args = [str(data / "tiny.onnx"), "--clips", "many", "--theta", "0.5", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [CFP, "batch", *args, "--out", "out"], cwd=tmp_path, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    clips = tmp_path / "out" / "clips"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done = finished(clips) if clips.is_dir() else 0
        if done >= 5 or proc.poll() is not None:
            break
        time.sleep(0.002)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    partial = finished(clips)
    assert 5 <= partial < len(many), partial
    assert not (tmp_path / "out" / "summary.csv").exists()
    again = cfp("batch", *args, "--out", "out", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert f"{len(many) - partial} clips explained, {partial} already done" in again.stdout
    clean = cfp("batch", *args, "--out", "clean", cwd=tmp_path)
    assert clean.returncode == 0, clean.stderr
    assert tree(tmp_path / "out") == tree(tmp_path / "clean")


def test_cli_errors_are_one_line(data: Path, tmp_path: Path) -> None:
    model = str(data / "tiny.onnx")
    for args, needle in [
        (["--clips", str(tmp_path / "none")], "expected a folder of clips"),
        (["--clips", str(data / "clips"), "--label", "x"], "--label 'x'"),
        (["--clips", str(data / "clips"), "--theta", "2"], "theta"),
        (["--clips", str(data / "clips"), "--address", "auto"], "--address needs --engine ray"),
        (["--clips", str(data / "clips"), "--batch-size", "0"], "--batch-size must be >= 1"),
        (["--clips", str(data / "clips"), "--clip-pyramids", "all"], "--clip-pyramids"),
    ]:
        r = cfp("batch", model, *args, "--out", "o", cwd=tmp_path)
        assert r.returncode == 2, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr, r.stderr
    r = cfp("batch", model, "--clips", str(data / "clips"), "--limit", "3", "--out", "o",
            "--no-progress", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "3 clips explained, 0 already done, 0 failed, of 3" in r.stdout
    assert len(list((tmp_path / "o" / "clips").iterdir())) == 3
    r = cfp("batch", model, "--clips", str(data / "clips"), "--limit", "3", "--out", "n",
            "--no-progress", "--clip-pyramids", "nodes", "--batch-size", "2", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert not list((tmp_path / "n").glob("clips/*/pyramid.json"))
    assert (tmp_path / "n" / "summary.csv").read_bytes() == (
        tmp_path / "o" / "summary.csv"
    ).read_bytes()


def test_resume_after_the_model_changed_or_the_manifest_broke_is_refused(
    data: Path, tmp_path: Path
) -> None:
    """Same file name, other weights: refused by content, naming model_sha256; a damaged
    batch.json is one line that says how to recover. Nothing in the folder changes."""
    tiny_model(tmp_path / "m.onnx", seed=0)
    args = ["m.onnx", "--clips", str(data / "clips"), "--theta", "0.5", "--no-progress"]
    assert cfp("batch", *args, "--limit", "3", "--out", "out", cwd=tmp_path).returncode == 0
    before = {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    tiny_model(tmp_path / "m.onnx", seed=1)  # replaced in place
    r = cfp("batch", *args, "--out", "out", cwd=tmp_path)
    assert r.returncode == 2 and "model_sha256" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    (tmp_path / "out" / "batch.json").write_text("{ not json")
    r = cfp("batch", *args, "--out", "out", cwd=tmp_path)
    assert r.returncode == 2 and "damaged" in r.stderr and "--overwrite" in r.stderr, r.stderr
    after = {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert {p for p in after} == set(before)


def test_faithfulness_per_clip_equals_the_single_clip_check(data: Path, tmp_path: Path) -> None:
    from cfp_onnx import faithfulness

    out = tmp_path / "out"
    tasks = tasks_from(data / "clips")[:3]
    run_batch(spec(data, faithfulness=3), tasks, out, engine=LocalEngine())
    ex = None
    for task in tasks:
        clip = np.load(task.path)
        ex = ex or Explainer(data / "tiny.onnx", clip_shape=clip.shape)
        pyr = ex.explain(clip, theta=0.5, class_names=NAMES)
        want = faithfulness.check(ex, clip, pyr, draws=3)
        assert want is not None
        got = json.loads((out / "clips" / task.id / "faithfulness.json").read_text())
        assert got == json.loads(json.dumps(want.to_dict()))
    manifest = json.loads((out / "batch.json").read_text())
    assert manifest["faithfulness"] == 3
    assert "faithfulness" not in BatchOptions().to_dict()  # older batches resume unchanged


@pytest.mark.parametrize("kind", ["pyramid", "contrast"])
def test_class_tube_per_clip_equals_explains(data: Path, tmp_path: Path, kind: str) -> None:
    """Each clip's class_tube.npy is the tube `cfp explain`'s API gives the clip alone
    (float32, T x H x W, bit for bit), recorded with its hash; a batch without a tube, or
    with another kind, does not resume this one."""
    import hashlib

    from cfp_onnx.explanation import explain
    from cfp_onnx.modelinput import ModelInput
    from cfp_onnx.options import PyramidOptions, ViewOptions

    out = tmp_path / "out"
    tasks = tasks_from(data / "clips")[:3]
    opts = BatchOptions(theta=0.0, top_n=2, class_tube=kind)
    model = str(data / "tiny.onnx")
    run_batch(WorkerSpec(model, opts), tasks, out, engine=LocalEngine())
    ex = Explainer(model, clip_shape=(1, 3, FRAMES, SIZE, SIZE))
    mi = ModelInput.of(ex.loaded)
    view = ViewOptions(report=False, class_tube=kind)
    for task in tasks:
        want = explain(ex, task.path, mi, PyramidOptions(theta=0.0, top_n=2), view).class_tube
        folder = out / "clips" / task.id
        got = np.load(folder / "class_tube.npy")
        assert want is not None and got.dtype == np.float32 and got.shape == (FRAMES, SIZE, SIZE)
        assert np.array_equal(got, want) and np.abs(got).max() > 0
        record = json.loads((folder / "clip.json").read_text())["files"]["class_tube.npy"]
        body = (folder / "class_tube.npy").read_bytes()
        assert record == {"bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    assert json.loads((out / "batch.json").read_text())["class_tube"] == kind
    assert "class_tube" not in BatchOptions().to_dict()  # older batches resume unchanged
    for other in (None, "weighted"):  # the option named whether it is absent or differs
        with pytest.raises(OutputError, match="holds a run with other class_tube;"):
            opts = BatchOptions(theta=0.0, top_n=2, class_tube=other)
            run_batch(WorkerSpec(model, opts), tasks, out, engine=LocalEngine())


def test_an_unknown_class_tube_is_an_option_error() -> None:
    with pytest.raises(OptionError, match="--class-tube 'sharp': choose weighted"):
        BatchOptions(class_tube="sharp").check()


# --------------------------------------------------------------------------- kernels only


def test_nodes_mode_keeps_the_kernels_and_gives_the_same_aggregates(
    data: Path, reference: Path, tmp_path: Path
) -> None:
    """--clip-pyramids nodes: no pyramid.json, each clip's nodes.npz holds exactly its
    pyramid.json's nodes (same floats), and summary.csv and every class pyramid are
    byte-identical to a full run's."""
    out = tmp_path / "out"
    run_batch(
        spec(data, clip_pyramids="nodes"), tasks_from(data / "clips"), out, engine=LocalEngine()
    )
    for folder in sorted((reference / "clips").iterdir()):
        mine = out / "clips" / folder.name
        assert sorted(p.name for p in mine.iterdir()) == [
            ".cfp-output.json",
            "clip.json",
            "nodes.npz",
        ]
        doc = json.loads((folder / "pyramid.json").read_text())
        with np.load(mine / "nodes.npz") as f:
            layers = f["layers"].tolist()
            got = [
                {"id": i, "layer": layers[la], "channel": ch, "depth": d, "relevance": r}
                for i, (la, ch, d, r) in enumerate(
                    zip(f["layer"].tolist(), f["channel"].tolist(), f["depth"].tolist(),
                        f["relevance"].tolist())
                )
            ]  # fmt: skip
        assert got == doc["nodes"]
        meta = json.loads((mine / "clip.json").read_text())
        assert (meta["label"], meta["score"], meta["links"]) == (
            doc["label"], doc["score"], len(doc["links"]),
        )  # fmt: skip
        assert (folder / "nodes.npz").read_bytes() == (mine / "nodes.npz").read_bytes()
    assert (out / "summary.csv").read_bytes() == (reference / "summary.csv").read_bytes()
    assert tree(out / "classes") == tree(reference / "classes")
    assert json.loads((out / "batch.json").read_text())["clip_pyramids"] == "nodes"
    assert "clip_pyramids" not in BatchOptions().to_dict()  # older (full) batches resume


def test_a_nodes_run_and_a_full_run_do_not_mix(data: Path, tmp_path: Path) -> None:
    tasks = tasks_from(data / "clips")[:2]
    run_batch(spec(data), tasks, tmp_path / "o", engine=LocalEngine())
    with pytest.raises(OutputError, match="clip_pyramids"):
        run_batch(spec(data, clip_pyramids="nodes"), tasks, tmp_path / "o", engine=LocalEngine())
    with pytest.raises(OptionError, match="--clip-pyramids"):
        run_batch(spec(data, clip_pyramids="links"), tasks, tmp_path / "p", engine=LocalEngine())


def test_damaged_kernel_files_are_redone(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    tasks = tasks_from(data / "clips")[:6]
    s = spec(data, clip_pyramids="nodes")
    run_batch(s, tasks, out, engine=LocalEngine())
    want = tree(out)
    nodes = out / "clips" / "clip_2" / "nodes.npz"
    body = bytearray(nodes.read_bytes())
    body[len(body) // 2] ^= 0xFF  # same size, other bytes: found by hash
    nodes.write_bytes(bytes(body))
    (out / "clips" / "clip_4" / "nodes.npz").unlink()  # found by stat
    again = run_batch(s, tasks, out, engine=LocalEngine())
    assert (again.done, again.skipped) == (2, 4)
    assert tree(out) == want


def test_a_failed_write_stops_the_run_and_leaves_no_partial_clip(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writes run on their own thread; the third one fails (a full disk, say): the run
    raises it, every clip folder present is whole, and a re-run completes the batch."""
    from cfp_onnx import batch

    real, calls = batch.Nodes.to_bytes, []

    def failing(self):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 3:
            raise OutputError("--out: no space left on the device")
        return real(self)

    monkeypatch.setattr(batch.Nodes, "to_bytes", failing)
    out = tmp_path / "out"
    tasks = tasks_from(data / "clips")[:8]
    with pytest.raises(OutputError, match="no space"):
        run_batch(spec(data), tasks, out, engine=LocalEngine())
    folders = sorted(p.name for p in (out / "clips").iterdir())
    assert all(not n.startswith(".") for n in folders)  # no staging folder left
    assert all(batch.is_done(out, n) for n in folders) and len(folders) < len(tasks)
    monkeypatch.setattr(batch.Nodes, "to_bytes", real)
    again = run_batch(spec(data), tasks, out, engine=LocalEngine())
    assert again.done + again.skipped == len(tasks) and again.skipped == len(folders)


# --------------------------------------------------------------------------- batched forwards


@pytest.fixture(scope="module")
def dynamic(data: Path) -> Path:
    """The tiny model with a dynamic batch axis (same weights)."""
    return tiny_model(data / "tiny_dynamic.onnx", batch="N")


def count_runs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Batch sizes of every instrumented forward."""
    from cfp_onnx import runtime

    sizes: list[int] = []
    real = runtime.Session.run

    def run(self, clip, outputs=None):  # type: ignore[no-untyped-def]
        sizes.append(len(clip))
        return real(self, clip, outputs)

    monkeypatch.setattr(runtime.Session, "run", run)
    return sizes


@pytest.mark.parametrize(("mode", "tube"), [("full", None), ("nodes", None), ("nodes", "pyramid")])
def test_batched_forwards_give_each_clip_its_own_pyramid(
    data: Path, dynamic: Path, reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    mode: str, tube: str | None,
) -> None:  # fmt: skip
    """Clips of a dynamic-batch model share forwards of 4 (checked once against single
    runs), and every file equals the one-clip-at-a-time run's, byte for byte (a class
    tube's full maps too)."""
    sizes = count_runs(monkeypatch)
    tasks = tasks_from(data / "clips")
    opts = BatchOptions(theta=0.5, clip_pyramids=mode, class_tube=tube)
    batched = run_batch(
        WorkerSpec(str(dynamic), opts), tasks, tmp_path / "b", engine=LocalEngine(batch=4)
    )
    assert batched.done == len(tasks) and sizes.count(4) == len(tasks) // 4
    alone = run_batch(
        WorkerSpec(str(dynamic), opts), tasks, tmp_path / "one", engine=LocalEngine(batch=1)
    )
    assert alone.done == len(tasks)
    got, want = tree(tmp_path / "b"), tree(tmp_path / "one")
    assert got.keys() == want.keys()
    assert any(k.endswith("class_tube.npy") for k in got) == (tube is not None)
    assert {k: v for k, v in got.items() if k != "batch.json"} == {
        k: v for k, v in want.items() if k != "batch.json"
    }
    if mode == "full":  # and the same pyramids as the static model's explain
        for task in tasks:
            rel = f"clips/{task.id}/pyramid.json"
            assert (
                json.loads(got[rel])["nodes"] == json.loads((reference / rel).read_bytes())["nodes"]
            )


@pytest.mark.parametrize("tube", [None, "pyramid"])
def test_batching_that_changes_a_run_is_turned_off(
    data: Path, dynamic: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tube: str | None
) -> None:
    """A graph whose batched results differ (faked: one logit nudged or, with a class
    tube, one value of a full map it reads) is found on the first batch; from then on
    clips run alone and the results are the single runs'."""
    real = Explainer.run_many

    def drifting(self, clips, *, depth=3, full=()):  # type: ignore[no-untyped-def]
        runs = real(self, clips, depth=depth, full=full)
        if tube is None:
            runs[1].logits[0] += 1e-9
        else:
            m = next(iter(runs[1].full.values()))
            m.flat[0] = np.nextafter(m.flat[0], np.inf)
        return runs

    monkeypatch.setattr(Explainer, "run_many", drifting)
    tasks = tasks_from(data / "clips")[:12]
    worker = None

    class Spy(LocalEngine):
        def results(self, spec, tasks, first):  # type: ignore[no-untyped-def]
            nonlocal worker
            worker = first
            yield from super().results(spec, tasks, first)

    opts = BatchOptions(theta=0.5, class_tube=tube)
    run_batch(WorkerSpec(str(dynamic), opts), tasks, tmp_path / "b", engine=Spy(batch=4))
    assert worker is not None and worker.batching is False
    run_batch(WorkerSpec(str(dynamic), opts), tasks, tmp_path / "one", engine=LocalEngine(batch=1))
    assert tree(tmp_path / "b") == tree(tmp_path / "one")


def test_a_bad_clip_in_a_batch_fails_alone(data: Path, dynamic: Path, tmp_path: Path) -> None:
    clips = tmp_path / "clips"
    clips.mkdir()
    for p in sorted((data / "clips").glob("*.npy"))[:6]:
        (clips / p.name).write_bytes(p.read_bytes())
    np.save(
        clips / "clip_2.npy", np.full((1, 3, FRAMES, SIZE, SIZE), 3e38, np.float32)
    )  # overflows
    tasks = tasks_from(clips)
    s = run_batch(
        WorkerSpec(str(dynamic), BatchOptions(theta=0.5)), tasks, tmp_path / "o",
        engine=LocalEngine(batch=4),
    )  # fmt: skip
    assert (s.done, [f.id for f in s.failed]) == (len(tasks) - 1, ["clip_2"]) and len(tasks) == 7
    assert "overflow" in s.failed[0].message


def test_the_default_batch_is_one_clip_on_the_cpu_and_four_on_a_gpu(
    data: Path, dynamic: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the CPU a batch buys no throughput and holds its clips' activations: by default
    every forward there is one clip's, even where the model's batch axis is dynamic."""
    default, three = LocalEngine().batch, LocalEngine(batch=3).batch
    assert (batch_for(default, "cpu"), batch_for(default, "cuda")) == (1, 4)
    assert batch_for(three, "cpu") == batch_for(three, "cuda") == 3
    sizes = count_runs(monkeypatch)
    tasks = tasks_from(data / "clips")[:6]
    s = run_batch(WorkerSpec(str(dynamic), BatchOptions(theta=0.5)), tasks, tmp_path / "o",
                  engine=LocalEngine())  # fmt: skip
    assert s.done == len(tasks) and sizes and set(sizes) == {1}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's arenas")
@pytest.mark.parametrize("user", [None, "3"])
def test_cfp_batch_makes_its_threads_share_one_malloc_arena(
    user: str | None, tmp_path: Path
) -> None:
    """Threads that allocate get glibc heaps of their own, which keep what they freed; in
    `cfp batch` they share one (never over the user's MALLOC_ARENA_MAX). glibc's
    malloc_stats names every arena."""
    code = (
        "import ctypes, sys, threading\n"
        "from cfp_onnx.cli.batch import one_malloc_arena\n"
        "print(one_malloc_arena())\n"
        "def work(): keep = [bytearray(2000) for _ in range(2000)]\n"
        "threads = [threading.Thread(target=work) for _ in range(4)]\n"
        "[t.start() for t in threads]; [t.join() for t in threads]\n"
        "ctypes.CDLL(None).malloc_stats()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    if user:
        env["MALLOC_ARENA_MAX"] = user
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    arenas = sum(line.startswith("Arena ") for line in out.stderr.splitlines())
    assert (out.stdout.split(), arenas > 1) == ((["False"], True) if user else (["True"], False))


def test_cfp_batch_asks_for_one_arena_before_it_starts(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cfp_onnx.cli import batch as cli_batch
    from cfp_onnx.cli.main import main

    calls: list[int] = []
    monkeypatch.setattr(cli_batch, "one_malloc_arena", lambda: calls.append(len(calls)))
    args = ["batch", str(data / "tiny.onnx"), "--clips", str(data / "clips"), "--limit", "2"]
    assert main([*args, "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    assert calls == [0]
