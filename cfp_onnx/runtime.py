"""The one module that talks to onnxruntime: build a session, run a clip."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from cfp_onnx.errors import ModelError, OptionError

log = logging.getLogger(__name__)

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
    """An onnxruntime session over an (instrumented) model whose big weights may live on disk."""

    def __init__(
        self,
        proto: onnx.ModelProto,
        external: Mapping[str, np.ndarray] | None = None,
        *,
        device: str = "cpu",
        threads: int | None = None,
    ) -> None:
        providers = providers_for(device, ort.get_available_providers())
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        external = external or {}
        if external:
            # The weights stay memory-mapped; onnxruntime copies them in, no 2 GB protobuf.
            self._values = [
                ort.OrtValue.ortvalue_from_numpy(np.asarray(v)) for v in external.values()
            ]
            opts.add_external_initializers(list(external), self._values)
        try:
            self._session = ort.InferenceSession(
                proto.SerializeToString(),
                sess_options=opts,
                providers=providers,
                provider_options=_provider_options(device),
            )
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"onnxruntime cannot load the model: {first}") from None
        self.input_name = self._session.get_inputs()[0].name
        self.output_names = tuple(o.name for o in self._session.get_outputs())

    def run(self, clip: np.ndarray, outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        names = list(outputs or self.output_names)
        try:
            values = self._session.run(names, {self.input_name: clip})
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"onnxruntime failed to run the model on this clip: {first}") from None
        return dict(zip(names, values))


def cpu_count() -> int:
    return os.cpu_count() or 1
