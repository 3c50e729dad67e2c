"""Preprocessing metadata stored in an ONNX model's ``metadata_props``.

Exporters write it, ``cfp explain`` reads it back, so a model file says how its
clips must be laid out and normalised. Every value is JSON under a key prefixed
``cfp.``; foreign keys are left alone. Pure ``onnx``: no framework imports here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import onnx

from cfp_onnx.errors import ModelError
from cfp_onnx.options import LAYOUTS

PREFIX = "cfp."

KNOWN_KEYS = ("layout", "mean", "std", "frames", "size", "class_names", "exporter", "source")


def write_metadata(
    model: onnx.ModelProto,
    *,
    layout: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    frames: int | None = None,
    size: Sequence[int] | None = None,
    class_names: Sequence[str] | None = None,
    **extra: Any,
) -> onnx.ModelProto:
    """Store the given values (``None`` = leave unchanged) and return ``model``.

    Mutates ``model`` in place: it is the exporter's own fresh proto. Values are
    validated here so that a bad file is refused at export time, not at explain time.

    Raises:
        ModelError: a value has the wrong type or shape.
    """
    values: dict[str, Any] = {
        "layout": _check_layout(layout) if layout is not None else None,
        "mean": _floats("mean", mean) if mean is not None else None,
        "std": _positive(_floats("std", std)) if std is not None else None,
        "frames": _positive_int("frames", frames) if frames is not None else None,
        "size": _size(size) if size is not None else None,
        "class_names": (
            [str(c) for c in _items("class_names", class_names, "strings")]
            if class_names is not None
            else None
        ),
        **extra,
    }
    props = {p.key: p.value for p in model.metadata_props}
    for key, value in values.items():
        if value is not None:
            props[PREFIX + key] = json.dumps(value)
    onnx.helper.set_model_props(model, props)
    return model


def read_metadata(model: onnx.ModelProto) -> dict[str, Any]:
    """Return the ``cfp.`` values as a dict keyed without the prefix (empty if none).

    Known keys are checked as ``write_metadata`` checks them: a file written by hand or by
    another tool gets the same guarantees as ours.

    Raises:
        ModelError: a ``cfp.`` value is not valid JSON, or a known key has a bad value
            (the key is named).
    """
    out: dict[str, Any] = {}
    for prop in model.metadata_props:
        if not prop.key.startswith(PREFIX):
            continue
        key = prop.key[len(PREFIX) :]
        try:
            value = json.loads(prop.value)
        except json.JSONDecodeError as exc:
            raise ModelError(
                f"model metadata {prop.key!r} is not valid JSON ({exc.msg}): {prop.value[:60]!r}"
            ) from None
        check = _CHECKS.get(key)
        try:
            out[key] = check(value) if check is not None and value is not None else value
        except ModelError as exc:
            raise ModelError(
                f"model metadata {prop.key!r}: {exc}; fix it with cfp_onnx.metadata.write_metadata"
            ) from None
    return out


def _check_layout(layout: str) -> str:
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ModelError(f"layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    return layout


def _items(name: str, values: Any, kind: str) -> list[Any]:
    """`values` as a list; a string or a non-iterable is not a list of anything."""
    if not isinstance(values, (str, bytes, dict)):
        try:
            return list(values)
        except TypeError:
            pass
    raise ModelError(f"{name} must be a list of {kind}, got {values!r}"[:200])


def _floats(name: str, values: Sequence[float]) -> list[float]:
    items = _items(name, values, "numbers")
    if any(isinstance(v, (bool, str, bytes)) for v in items):
        raise ModelError(f"{name} must be a list of numbers, got {items!r}"[:200])
    try:
        out = [float(v) for v in items]
    except (TypeError, ValueError):
        raise ModelError(f"{name} must be a list of numbers, got {items!r}"[:200]) from None
    if not all(math.isfinite(v) for v in out):
        raise ModelError(f"{name} must be finite numbers, got {out}")
    if len(out) not in (1, 3):
        raise ModelError(f"{name} must have 1 or 3 values (per colour channel), got {len(out)}")
    return out


def _positive(values: list[float]) -> list[float]:
    if any(v <= 0 for v in values):
        raise ModelError(f"std must be positive, got {values}")
    return values


def _positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ModelError(f"{name} must be a positive integer, got {value!r}")
    if not math.isfinite(value) or int(value) != value or value <= 0:
        raise ModelError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _size(size: Sequence[int]) -> list[int]:
    out = [_positive_int("size", s) for s in _items("size", size, "two integers")]
    if len(out) != 2:
        raise ModelError(f"size must be (height, width), got {list(size)}")
    return out


def _names(names: Sequence[str]) -> list[str]:
    items = _items("class_names", names, "strings")
    if not all(isinstance(n, str) for n in items):
        bad = next(n for n in items if not isinstance(n, str))
        raise ModelError(f"class_names must be a list of strings, got an item {bad!r}"[:200])
    return items


_CHECKS: dict[str, Any] = {
    "layout": _check_layout,
    "mean": lambda v: _floats("mean", v),
    "std": lambda v: _positive(_floats("std", v)),
    "frames": lambda v: _positive_int("frames", v),
    "size": _size,
    "class_names": _names,
}
