"""The one module that talks to onnxruntime: build a session, run a clip."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

# onnxruntime writes a telemetry device id under $HOME when it is imported, and where HOME
# is not writable says so on stderr, before any logger setting can apply: opt out first.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
import onnxruntime as ort

from cfp_onnx.errors import ModelError, OptionError
from cfp_onnx.loading import ExternalTensor

log = logging.getLogger(__name__)

QUIET = 4
"""onnxruntime log severity: FATAL only. Its errors reach the user once, as our ModelError,
not also as an ``[E:onnxruntime ...]`` line of its own (SPEC §7: one stderr line)."""
ort.set_default_logger_severity(QUIET)
_RUN = ort.RunOptions()
_RUN.log_severity_level = QUIET

PROVIDERS = {
    "cpu": ("CPUExecutionProvider",),
    "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
}


def providers_for(device: str, available: Sequence[str]) -> list[str]:
    """Execution providers for `device`, refusing a device this onnxruntime cannot drive.

    Raises:
        OptionError: unknown device, or CUDA asked of a CPU-only onnxruntime.
    """
    if device not in PROVIDERS:
        raise OptionError(f"unknown device {device!r}; choose one of {', '.join(PROVIDERS)}")
    wanted = PROVIDERS[device]
    if wanted[0] not in available:
        raise OptionError(
            f"--device {device} needs onnxruntime's {wanted[0]}, but this onnxruntime offers "
            f"{', '.join(available)}; install the gpu extra (onnxruntime-gpu) in place of onnxruntime"
        )
    return list(wanted)


def _provider_options(device: str) -> list[dict[str, str]]:
    # TF32 would make CUDA results drift from the CPU's; the pyramid must not depend on the device.
    return [{"use_tf32": "0"}, {}] if device == "cuda" else [{}]


class Session:
    """An onnxruntime session over an (instrumented) model whose weights stay in their files.

    The instrumented graph is small (its large initializers are external references). It is
    written to a private folder created next to the model, holding hard links to the weight
    files, so onnxruntime maps the weights from disk exactly as for the original model: no
    second copy in memory. Where that folder cannot be made (read-only folder, another
    file system), the weights are handed over from memory-mapped files instead (onnxruntime
    copies them: more memory, same results).
    """

    def __init__(
        self,
        proto: onnx.ModelProto,
        external: Mapping[str, ExternalTensor] | None = None,
        *,
        base: Path | None = None,
        device: str = "cpu",
        threads: int | None = None,
    ) -> None:
        self._providers = providers_for(device, ort.get_available_providers())
        self._device = device
        self._threads = threads
        external = dict(external or {})
        if external and base is not None:
            try:
                self._session = self._linked(proto, external, base)
            except OSError as exc:
                log.info("weights handed over from memory (%s)", exc)
                self._session = self._in_memory(proto, external)
        else:
            self._session = self._create(proto.SerializeToString(), self._options())
        self.input_name = self._session.get_inputs()[0].name
        self.output_names = tuple(o.name for o in self._session.get_outputs())

    def _options(self) -> ort.SessionOptions:
        opts = ort.SessionOptions()
        opts.log_severity_level = QUIET
        # Idle onnxruntime threads sleep instead of spinning: the back-step that follows a run
        # needs the same cores.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # No memory pattern: with it every run after the first plans one block for all
        # activations while the arena still holds the first run's, +24 MB resident on a
        # ResNet-50-3D at no measured speed gain (benchmarks/README.md, Throughput).
        opts.enable_mem_pattern = False
        if self._threads:
            opts.intra_op_num_threads = self._threads
        return opts

    def _create(self, model: bytes | str, opts: ort.SessionOptions) -> ort.InferenceSession:
        try:
            return ort.InferenceSession(
                model,
                sess_options=opts,
                providers=self._providers,
                provider_options=_provider_options(self._device),
            )
        except OSError:
            raise
        except Exception as exc:  # onnxruntime's Fail, InvalidGraph, NotImplemented, ...
            raise ModelError(f"onnxruntime cannot load the model: {_first_line(exc)}") from None

    def _linked(
        self, proto: onnx.ModelProto, external: Mapping[str, ExternalTensor], base: Path
    ) -> ort.InferenceSession:
        tmp = Path(tempfile.mkdtemp(prefix=".cfp-", dir=base.resolve()))
        try:
            for location, file in {(e.location, e.file) for e in external.values()}:
                link = tmp / location
                link.parent.mkdir(parents=True, exist_ok=True)
                os.link(file, link)
            model = tmp / "cfp-instrumented.onnx"
            while model.exists():  # a weight file of that very name
                model = model.with_name("_" + model.name)
            model.write_bytes(proto.SerializeToString())
            return self._create(str(model), self._options())
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _in_memory(
        self, proto: onnx.ModelProto, external: Mapping[str, ExternalTensor]
    ) -> ort.InferenceSession:
        opts = self._options()
        values = [
            ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(e.map()))
            for e in external.values()
        ]
        opts.add_external_initializers(list(external), values)
        return self._create(proto.SerializeToString(), opts)

    def run(self, clip: np.ndarray, outputs: Sequence[str] | None = None) -> dict[str, Any]:
        """Outputs by name: NumPy arrays; on CUDA the instrumented taps stay on the GPU.

        With ``device="cuda"`` the run goes through IO binding: every ``cfp_pooled::`` /
        ``cfp_full::`` tap is left in GPU memory and returned as a CuPy array (the back-step
        and the tubes run there), the model's own outputs (the logits) come to the host.
        """
        names = list(outputs or self.output_names)
        try:
            if self._device == "cuda":
                return bound_run(self._session, self.input_name, clip, names, _to_device)
            values = self._session.run(names, {self.input_name: clip}, _RUN)
        except Exception as exc:
            raise ModelError(
                f"onnxruntime failed to run the model on this clip: {_first_line(exc)}"
            ) from None
        return dict(zip(names, values))

    def feed(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str]) -> dict[str, Any]:
        """Outputs by name (NumPy, on the host) of a run with several named inputs."""
        names = list(outputs)
        try:
            values = self._session.run(names, dict(feeds), _RUN)
        except Exception as exc:
            raise ModelError(f"onnxruntime failed to run the model: {_first_line(exc)}") from None
        return dict(zip(names, values))


DEVICE_TAPS = ("cfp_pooled::", "cfp_full::")
"""Output name prefixes (cfp_onnx.surgery's taps) that stay on the GPU under IO binding."""


def stays_on_device(name: str) -> bool:
    return name.startswith(DEVICE_TAPS)


def bound_run(
    session: Any,
    input_name: str,
    clip: np.ndarray,
    names: Sequence[str],
    to_device: Callable[[Any], Any],
) -> dict[str, Any]:
    """One run with onnxruntime's IO binding (documented ``io_binding`` API).

    The clip is bound from host memory, taps are bound to ``cuda`` (onnxruntime
    allocates them there) and handed to `to_device` (OrtValue -> CuPy via DLPack);
    other outputs are bound to ``cpu`` and returned as NumPy arrays.
    """
    io = session.io_binding()
    io.bind_cpu_input(input_name, np.ascontiguousarray(clip))
    for name in names:
        io.bind_output(name, "cuda" if stays_on_device(name) else "cpu")
    session.run_with_iobinding(io)
    values = io.get_outputs()
    return {
        name: to_device(v) if stays_on_device(name) else v.numpy() for name, v in zip(names, values)
    }


def _to_device(value: Any) -> Any:
    from cfp_onnx.gpu import from_ortvalue

    return from_ortvalue(value)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def cpu_count() -> int:
    return os.cpu_count() or 1
