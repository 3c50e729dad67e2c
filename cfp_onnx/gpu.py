"""GPU-only helpers: onnxruntime outputs as CuPy arrays, and the fused tube blend kernel.

Imported only when ``device == "cuda"`` (CuPy is imported at first use, so importing
this module on a CPU machine is harmless). Each GPU routine has a NumPy twin here that
does the same arithmetic in the same order; the CPU tests hold the twin to the CPU
backend (``tubes.overlay``), the GPU tests hold the kernel to the twin.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import cv2
import numpy as np

Array = Any  # cupy.ndarray

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


def _cupy() -> Any:
    import cupy

    return cupy


def from_ortvalue(value: Any) -> Array:
    """An onnxruntime OrtValue that lives on the GPU, as a CuPy array, without a copy.

    Uses DLPack where this onnxruntime build has it (``OrtValue.to_dlpack``); otherwise
    wraps the device pointer (``data_ptr``), keeping the OrtValue alive as the owner.
    """
    cp = _cupy()
    to_dlpack = getattr(value, "to_dlpack", None)
    if callable(to_dlpack):
        return cp.from_dlpack(to_dlpack())
    dtype = np.dtype(_ORT_TYPES[value.data_type()])
    shape = tuple(int(s) for s in value.shape())
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    mem = cp.cuda.UnownedMemory(value.data_ptr(), nbytes, value)
    return cp.ndarray(shape, dtype=dtype, memptr=cp.cuda.MemoryPointer(mem, 0))


# --------------------------------------------------------------------------- tube blending


@lru_cache(maxsize=1)
def jet_lut() -> np.ndarray:
    """OpenCV's JET colour map as an RGB ``[256, 3]`` uint8 table (what ``overlay`` uses)."""
    grey = np.arange(256, dtype=np.uint8)[:, None]
    bgr = cv2.applyColorMap(grey, cv2.COLORMAP_JET)[:, 0]
    return np.ascontiguousarray(bgr[:, ::-1])


_BLEND_SOURCE = """
    float v = rintf(tube * 255.0f);
    v = fminf(fmaxf(v, 0.0f), 255.0f);
    int g = (int)v;
    float b = rintf(0.5f * (float)frame + 0.5f * (float)lut[g * 3 + channel]);
    out = (unsigned char)fminf(fmaxf(b, 0.0f), 255.0f);
"""


@lru_cache(maxsize=1)
def _blend_kernel() -> Any:
    """Normalised tube -> JET colour -> 50/50 blend with the frame, one pass per output byte."""
    cp = _cupy()
    return cp.ElementwiseKernel(
        "float32 tube, uint8 frame, int32 channel, raw uint8 lut",
        "uint8 out",
        _BLEND_SOURCE,
        "cfp_blend_jet",
    )


def blend(frames: Array, tubes: Array) -> Array:
    """Blended pictures ``[K, T, H, W, 3]`` uint8 of normalised tubes ``[K, T, H, W]`` on
    RGB frames ``[T, H, W, 3]``, on the GPU: equal to ``tubes.overlay`` per kernel."""
    cp = _cupy()
    lut = cp.asarray(jet_lut().reshape(-1))
    channel = cp.arange(3, dtype=cp.int32)
    out = cp.empty((*tubes.shape, 3), dtype=cp.uint8)
    _blend_kernel()(tubes[..., None], cp.asarray(frames)[None], channel, lut, out)
    return out


def blend_reference(frames: np.ndarray, tubes: np.ndarray) -> np.ndarray:
    """The kernel's arithmetic in NumPy, float32 as on the GPU (tested against overlay)."""
    grey = np.clip(np.rint(tubes.astype(np.float32) * np.float32(255)), 0, 255).astype(np.int64)
    heat = jet_lut()[grey].astype(np.float32)  # [K, T, H, W, 3]
    mixed = np.float32(0.5) * frames[None].astype(np.float32) + np.float32(0.5) * heat
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
