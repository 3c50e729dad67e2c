"""Shared by both exporters: run the exported graph in onnxruntime and compare.

An export is only useful if the ONNX graph computes what the framework computes,
so every export is checked on a seeded random clip before the file appears.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from cfp_onnx.errors import ModelError, OutputError
from cfp_onnx.outputs import permissions

RELATIVE_TOLERANCE = 1e-4
"""Largest allowed |onnx - framework|, as a fraction of max(1, largest |output|)."""

VIDEO_RANK = 5


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """How closely the exported ONNX model reproduces the framework model.

    ``max_abs_diff`` is over the whole logits tensor on one seeded random clip;
    ``tolerance`` is ``1e-4 * max(1, max_abs_output)``; ``batch_checked`` says
    the graph also ran with batch 2 and gave the same row twice.
    """

    path: str
    exporter: str
    input_name: str
    input_shape: tuple[int, ...]
    output_name: str
    output_shape: tuple[int, ...]
    max_abs_diff: float
    max_abs_output: float
    tolerance: float
    opset: int
    layout: str
    seed: int
    batch_checked: bool

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def summary(self) -> str:
        """One line for the CLI."""
        verdict = "OK" if self.passed else "FAILED"
        return (
            f"{verdict}: {self.path} ({self.exporter}, opset {self.opset}) "
            f"{self.input_name}{list(self.input_shape)} {self.layout} -> "
            f"{self.output_name}{list(self.output_shape)}; max |onnx - {self.exporter}| = "
            f"{self.max_abs_diff:.3g} (tolerance {self.tolerance:.3g})"
        )


def check_video_shape(shape: Sequence[int | None], what: str) -> tuple[int, ...]:
    """Refuse anything but a fully known 5-D (batch + 4) video input shape."""
    dims = tuple(shape)
    if len(dims) != VIDEO_RANK:
        raise ModelError(
            f"{what} has shape {list(dims)} ({len(dims)}-D); a video model takes a 5-D clip "
            "batch, (N, C, T, H, W) or (N, T, H, W, C)"
        )
    known = [int(d) for d in dims if d is not None]
    if len(known) != len(dims) or min(known) <= 0:
        raise ModelError(f"{what} has unknown or empty dims {list(dims)}; give --input-shape")
    return tuple(known)


def seeded_clip(shape: Sequence[int], seed: int) -> np.ndarray:
    """A reproducible float32 standard-normal clip."""
    return np.random.default_rng(seed).standard_normal(tuple(shape)).astype(np.float32)


def run_onnx(path: str | os.PathLike[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run the model on CPU with few threads (exports are checked on shared machines)."""
    from cfp_onnx.runtime import ort  # telemetry and logs quiet, as in the analyzer

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.log_severity_level = 4  # its errors come back as our one-line ModelError
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return [np.asarray(o) for o in session.run(None, feeds)]


def compare(
    onnx_path: Path,
    clip: np.ndarray,
    expected: np.ndarray,
    *,
    display_path: str,
    exporter: str,
    seed: int,
    layout: str,
) -> VerifyResult:
    """Run ``onnx_path`` on ``clip`` (and on a batch of two) and measure the gap.

    Raises:
        ModelError: the graph does not run, returns the wrong shape, or differs by
            more than the tolerance.
    """
    model = onnx.load(str(onnx_path), load_external_data=False)
    input_name = model.graph.input[0].name
    output_name = model.graph.output[0].name
    try:
        got = run_onnx(onnx_path, {input_name: clip})[0]
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise ModelError(
            f"exported graph does not run in onnxruntime: {_first_line(exc)}"
        ) from None
    _check_same_shape(got, expected, exporter)
    _check_batch_axis(onnx_path, input_name, clip, got)
    diff = float(np.max(np.abs(got.astype(np.float64) - expected))) if got.size else 0.0
    peak = float(np.max(np.abs(expected))) if expected.size else 0.0
    result = VerifyResult(
        path=display_path,
        exporter=exporter,
        input_name=input_name,
        input_shape=tuple(clip.shape),
        output_name=output_name,
        output_shape=tuple(got.shape),
        max_abs_diff=diff,
        max_abs_output=peak,
        tolerance=RELATIVE_TOLERANCE * max(1.0, peak),
        opset=_opset(model),
        layout=layout,
        seed=seed,
        batch_checked=True,
    )
    if not result.passed or not np.isfinite(diff):
        raise ModelError(
            f"exported graph differs from {exporter}: max |onnx - {exporter}| = {diff:.3g} > "
            f"tolerance {result.tolerance:.3g} (1e-4 x max(1, max |output| = {peak:.3g}))"
        )
    return result


def _check_batch_axis(path: Path, input_name: str, clip: np.ndarray, got: np.ndarray) -> None:
    """The same clip twice in a batch must give the same row twice."""
    baked = "the batch axis is baked in (use x.flatten(1), not x.view(1, -1))"
    try:
        twice = run_onnx(path, {input_name: np.concatenate([clip, clip])})[0]
    except Exception as exc:
        raise ModelError(
            f"exported graph fails with batch 2 ({_first_line(exc)}): {baked}"
        ) from None
    if twice.shape[0] != 2 * clip.shape[0] or not _close(twice, np.concatenate([got, got])):
        raise ModelError(f"exported graph gives other results with batch 2: {baked}")


def _check_same_shape(got: np.ndarray, expected: np.ndarray, exporter: str) -> None:
    if got.shape != expected.shape:
        raise ModelError(
            f"exported graph returns shape {list(got.shape)}; {exporter} returns {list(expected.shape)}"
        )


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    peak = float(np.max(np.abs(b))) if b.size else 0.0
    return bool(np.max(np.abs(a - b), initial=0.0) <= RELATIVE_TOLERANCE * max(1.0, peak))


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], *, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it into place only on success.

    The output appears whole or not at all; an existing file is replaced only
    with ``overwrite``.

    Raises:
        OutputError: ``path`` exists without ``overwrite``, or its folder is missing.
    """
    target = Path(path)
    if target.exists() and not overwrite:
        raise OutputError(f"{target} exists; pass --overwrite to replace it")
    if not target.parent.is_dir():
        raise OutputError(f"cannot write {target}: folder {target.parent} does not exist")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        permissions(tmp, folder=False)  # as a plain create would: the umask, not 0o600
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Save, checking the graph first (a malformed export is the exporter's fault)."""
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ModelError(f"exported graph is not valid ONNX: {_first_line(exc)}") from None
    onnx.save_model(model, str(path))
