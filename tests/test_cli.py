"""The real `cfp` console script: outputs, exit codes, one-line errors, nothing half written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cfp_onnx.api import Explainer
from tests import nets

CFP = str(Path(sys.executable).with_name("cfp"))


def cfp(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CFP, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture
def setup(exported, tmp_path):
    _, path = exported("residual")
    clip = np.random.default_rng(0).standard_normal(nets.CLIP).astype(np.float32)
    np.save(tmp_path / "clip.npy", clip)
    return path, tmp_path


def test_explain_writes_the_spec_json(setup):
    model, tmp = setup
    r = cfp("explain", str(model), "--clip", "clip.npy", "--out", "out", "--theta", "0.5", cwd=tmp)
    assert r.returncode == 0, r.stderr
    doc = json.loads((tmp / "out" / "pyramid.json").read_text())
    assert list(doc) == [
        "model", "label", "label_name", "score", "theta", "depth", "max_depth_reached",
        "head_mode", "top_n", "nodes", "links",
    ]  # fmt: skip
    assert doc["model"] == model.name and doc["theta"] == 0.5 and doc["depth"] == 3
    assert doc["max_depth_reached"] == 2 and doc["label_name"] is None and doc["top_n"] is None
    clip = np.load(tmp / "clip.npy")
    p = Explainer(model, clip_shape=clip.shape).explain(clip, theta=0.5)
    assert doc == json.loads(p.to_json())
    keys = [(n["depth"], n["layer"], n["channel"]) for n in doc["nodes"]]
    order = [p.layers.index(k[1]) for k in keys]
    assert [(d, o, c) for (d, _, c), o in zip(keys, order)] == sorted(
        (d, o, c) for (d, _, c), o in zip(keys, order)
    )
    assert [n["id"] for n in doc["nodes"]] == list(range(len(doc["nodes"])))
    assert f"prediction: class {doc['label']}" in r.stdout
    assert "depth 0:" in r.stdout and "depth 2:" in r.stdout


def test_reference_format_writes_the_papers_tree(setup):
    model, tmp = setup
    r = cfp(
        "explain", str(model), "--clip", "clip.npy", "--out", "o", "--format", "reference", cwd=tmp
    )
    assert r.returncode == 0, r.stderr
    doc = json.loads((tmp / "o" / "pyramid.json").read_text())
    ref = json.loads((tmp / "o" / "reference.json").read_text())
    tree = json.loads((tmp / "o" / "tree.json").read_text())
    roots = {f"{n['layer']}:{n['channel']}" for n in doc["nodes"] if n["depth"] == 0}
    assert list(ref) == [str(doc["label"])] and set(ref[str(doc["label"])]) == roots
    assert {c["name"] for c in tree["children"]} == roots


@pytest.mark.parametrize(
    ("args", "msg"),
    [
        (["--label", "99"], "label 99 is out of range: the model has 5 classes"),
        (["--label", "x"], "label 'x' is a name, but the model has no class names"),
        (["--theta", "1.5"], "theta must be a number in [0, 1]"),
        (["--theta", "nan"], "theta must be a number in [0, 1]"),
        (["--depth", "0"], "depth must be an integer >= 1"),
        (["--top-n", "0"], "top-n must be an integer >= 1"),
        (["--head-mode", "magic"], "invalid choice"),
    ],
)
def test_bad_options_one_line_exit_2_nothing_written(setup, args, msg):
    model, tmp = setup
    r = cfp("explain", str(model), "--clip", "clip.npy", "--out", "o", *args, cwd=tmp)
    assert r.returncode == 2
    assert msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp / "o").exists()
    assert [p.name for p in tmp.iterdir()] == ["clip.npy"]


def test_bad_model_and_clip(setup):
    model, tmp = setup
    (tmp / "junk.onnx").write_bytes(b"\x00not a model" * 10)
    np.save(tmp / "bad.npy", np.zeros((1, 3, 9, 16, 16), np.float32))
    np.save(tmp / "nan.npy", np.full(nets.CLIP, np.nan, np.float32))
    cases = [
        (["junk.onnx", "--clip", "clip.npy"], "is not a readable ONNX model"),
        (["missing.onnx", "--clip", "clip.npy"], "does not exist"),
        ([str(model), "--clip", "bad.npy"], "expects (batch, 3, 4, 16, 16)"),
        ([str(model), "--clip", "nan.npy"], "NaN"),
        ([str(model), "--clip", "nothing.npy"], "no such file or folder"),
    ]
    for args, msg in cases:
        r = cfp("explain", *args, "--out", "o", cwd=tmp)
        assert r.returncode == 2 and msg in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and not (tmp / "o").exists()


def test_existing_output_needs_overwrite(setup):
    model, tmp = setup
    assert cfp("explain", str(model), "--clip", "clip.npy", "--out", "o", cwd=tmp).returncode == 0
    before = (tmp / "o" / "pyramid.json").read_text()
    r = cfp("explain", str(model), "--clip", "clip.npy", "--out", "o", "--theta", "0.3", cwd=tmp)
    assert r.returncode == 2 and "--overwrite" in r.stderr
    assert (tmp / "o" / "pyramid.json").read_text() == before
    r = cfp(
        "explain",
        str(model),
        "--clip",
        "clip.npy",
        "--out",
        "o",
        "--theta",
        "0.3",
        "--overwrite",
        cwd=tmp,
    )
    assert (
        r.returncode == 0 and json.loads((tmp / "o" / "pyramid.json").read_text())["theta"] == 0.3
    )
    assert sorted(p.name for p in tmp.iterdir()) == ["clip.npy", "o"]


def test_inspect_reports_structure(exported, tmp_path):
    _, path = exported("inception")
    r = cfp("inspect", str(path), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "classes: 5" in r.stdout and "unsupported ops: none" in r.stdout
    assert "branch concats: 1" in r.stdout and "groups 1" in r.stdout
    _, path = exported("residual")
    r = cfp("inspect", str(path), cwd=tmp_path)
    assert "residual/element-wise merges: 4" in r.stdout, r.stdout


def test_inspect_names_unsupported_ops(tmp_path):
    from tests.graphs import G

    g = G()
    y = g.op("LpNormalization", g.relu(g.conv("video", 3, 6)), axis=1)
    logits = g.gemm(g.pool_flatten(g.relu(g.conv(y, 6, 6))), 6, 3)
    g.save(tmp_path / "m.onnx", [logits])
    r = cfp("inspect", "m.onnx", cwd=tmp_path)
    assert r.returncode == 2
    assert (
        "unsupported ops on the pyramid's paths:" in r.stdout and "op LpNormalization" in r.stdout
    )


def test_python_api_reads_videos_with_the_models_preprocessing(tmp_path):
    """cfp_onnx.explain on a video path decodes and preprocesses from model metadata, and
    gives the pyramid of the same clip passed as an array."""
    import cfp_onnx
    from cfp_onnx.loading import load_model
    from cfp_onnx.modelinfo import preprocess_for
    from cfp_onnx.synthetic import demo_clip
    from cfp_onnx.video import load_clip, write_video

    model = Path(cfp_onnx.__file__).parent / "assets" / "demo.onnx"
    write_video(tmp_path / "c.avi", demo_clip(0).frames)
    a = cfp_onnx.explain(model, tmp_path / "c.avi")
    tensor = load_clip(tmp_path / "c.avi", preprocess_for(load_model(model))).tensor
    b = cfp_onnx.explain(model, tensor)
    assert a.label_name == "move_right" and a.to_dict()["nodes"] == b.to_dict()["nodes"]


@pytest.mark.parametrize("user", [None, "20"])
def test_the_cfp_script_sets_blas_threads_to_sleep_before_numpy_loads(user):
    """OpenBLAS reads its environment once, when NumPy loads: the script must set it first,
    and never over a value the user chose."""
    code = (
        "import os, sys\n"
        f"user = {user!r}\n"
        "os.environ.pop('OPENBLAS_THREAD_TIMEOUT', None)\n"
        "if user: os.environ['OPENBLAS_THREAD_TIMEOUT'] = user\n"
        "import cfp_onnx.cli.main as m\n"
        "assert 'numpy' not in sys.modules\n"
        "m.main = lambda: print(os.environ['OPENBLAS_THREAD_TIMEOUT'], 'numpy' in sys.modules) or 0\n"
        "m.console()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == [user or "4", "False"]


def test_a_subcommand_loads_only_its_own_modules() -> None:
    """`cfp explain ...` builds the explain parser alone: the other subcommands' backends
    (batch, embed, inspection) are not imported; `cfp --help` and unknown words get all."""
    from cfp_onnx.cli.main import SUBCOMMANDS, _chosen

    assert _chosen(["-v", "explain", "m.onnx", "--help"]) == "explain"
    assert _chosen(["--help", "explain"]) is None and _chosen(["explian"]) is None
    assert _chosen([]) is None and _chosen(["-q"]) is None
    code = (
        "import sys; from cfp_onnx.cli.main import build_parser\n"
        "p = build_parser('explain')\n"
        "print(sorted(m for m in ('cfp_onnx.batch', 'cfp_onnx.embed', 'cfp_onnx.inspection')"
        " if m in sys.modules))\n"
        "print(sorted(p._subparsers._group_actions[0].choices))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == ["[]", "['explain']"]
    full = subprocess.run(
        [sys.executable, "-m", "cfp_onnx.cli.main", "--help"], capture_output=True, text=True
    )
    assert all(name in full.stdout for name in SUBCOMMANDS)


def test_the_switch_interval_is_short_while_decoding_and_restored(monkeypatch) -> None:
    """The decoder thread gets the GIL back quickly while the Explainer is built beside it;
    the interpreter's interval is restored after, on success and on error."""
    from cfp_onnx import commands

    seen = []

    def decode():  # type: ignore[no-untyped-def]
        seen.append(sys.getswitchinterval())
        return "clip"

    before = sys.getswitchinterval()
    assert commands._while_decoding(lambda _: "explainer", decode) == ("explainer", "clip")  # type: ignore[arg-type,return-value]
    assert seen == [pytest.approx(commands.DECODE_SWITCH_S)] and sys.getswitchinterval() == before

    def broken(_):  # type: ignore[no-untyped-def]
        raise ValueError("bad model")

    with pytest.raises(ValueError, match="bad model"):
        commands._while_decoding(broken, decode)  # type: ignore[arg-type]
    assert sys.getswitchinterval() == before
