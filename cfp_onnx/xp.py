"""The one place that chooses the array module: NumPy on CPU, CuPy on GPU.

Relevance and tube code is written against ``xp`` so that the GPU backend is the
same code over a different array module, not a fork.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from cfp_onnx.errors import OptionError

DEVICES = ("cpu", "cuda")


def array_module(device: str = "cpu") -> ModuleType:
    """Return ``numpy`` for ``cpu`` and ``cupy`` for ``cuda``.

    Raises:
        OptionError: unknown device, or ``cuda`` without a working CuPy + GPU.
    """
    if device == "cpu":
        return np
    if device != "cuda":
        raise OptionError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    try:
        import cupy

        cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # ImportError, CUDARuntimeError, ...
        raise OptionError(
            f"--device cuda needs CuPy and a CUDA GPU ({type(exc).__name__}: {exc}); "
            "install the gpu extra (pip install 'cfp_onnx[gpu]') on a GPU machine, or use --device cpu"
        ) from None
    return cupy  # type: ignore[no-any-return]


def to_numpy(a: Any) -> np.ndarray:
    """Bring an array from any backend to host memory."""
    get = getattr(a, "get", None)
    return np.asarray(get() if callable(get) else a)
