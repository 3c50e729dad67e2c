"""Read an ONNX file's structure without its weights, straight from the protobuf wire format.

A ResNet-3D's weights are hundreds of MB; parsing them into Python protobuf objects
doubles or triples the memory of the run that explains it. Instead we scan the file
(memory-mapped, payloads never touched), copy every field except the large initializers'
payloads, and point those initializers at their bytes in the original file as ONNX
external data. onnxruntime then reads the weights from the file itself.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import onnx

MODEL_GRAPH, GRAPH_INITIALIZER = 7, 5
TENSOR_NAME, TENSOR_DATA_LOCATION, TENSOR_EXTERNAL = 8, 14, 13
PAYLOADS = (9, 4, 10)  # raw_data, packed float_data, packed double_data: fixed-width bytes
MIN_BYTES = 1024  # smaller tensors stay inline: shapes and slice bounds are read directly


@dataclass(frozen=True)
class Span:
    offset: int
    length: int


def _varint(buf: memoryview | mmap.mmap, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def _fields(buf: mmap.mmap, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(field number, wire type, key offset, payload start, payload end) of a message."""
    i = start
    while i < end:
        key_at = i
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, j = _varint(buf, i)
        elif wire == 1:
            j = i + 8
        elif wire == 5:
            j = i + 4
        elif wire == 2:
            n, i = _varint(buf, i)
            j = i + n
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if j > end:
            raise ValueError("truncated protobuf message")
        yield number, wire, key_at, i, j
        i = j


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        out.append(b | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _encode_varint(number << 3 | 2) + _encode_varint(len(payload)) + payload


def strip_weights(path: Path) -> tuple[onnx.ModelProto, dict[str, Span]]:
    """The model with large inline initializers turned into external references to `path`.

    Returns the small proto and, per stripped initializer, where its bytes lie in the file.

    Raises:
        ValueError: the file is not a well-formed protobuf.
    """
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        spans: dict[str, Span] = {}
        model = bytearray()
        for number, _, key_at, start, end in _fields(buf, 0, len(buf)):
            if number == MODEL_GRAPH:
                model += _field(MODEL_GRAPH, _strip_graph(buf, start, end, path.name, spans))
            else:
                model += buf[key_at:end]
    proto = onnx.ModelProto()
    proto.ParseFromString(bytes(model))
    return proto, spans


def _strip_graph(
    buf: mmap.mmap, start: int, end: int, location: str, spans: dict[str, Span]
) -> bytes:
    graph = bytearray()
    for number, wire, key_at, s, e in _fields(buf, start, end):
        if number == GRAPH_INITIALIZER and wire == 2:
            graph += _field(GRAPH_INITIALIZER, _strip_tensor(buf, s, e, location, spans))
        else:
            graph += buf[key_at:e]
    return bytes(graph)


def _strip_tensor(
    buf: mmap.mmap, start: int, end: int, location: str, spans: dict[str, Span]
) -> bytes:
    name, payload = None, None
    for number, wire, _, s, e in _fields(buf, start, end):
        if number == TENSOR_NAME:
            name = bytes(buf[s:e]).decode("utf-8", "replace")
        elif number in PAYLOADS and wire == 2 and e - s >= MIN_BYTES:
            payload = (number, s, e)
    if name is None or payload is None:
        return bytes(buf[start:end])
    out = bytearray()
    for number, _, key_at, _, e in _fields(buf, start, end):
        if number != payload[0]:
            out += buf[key_at:e]
    for key, value in (
        ("location", location),
        ("offset", str(payload[1])),
        ("length", str(payload[2] - payload[1])),
    ):
        entry = _field(1, key.encode()) + _field(2, value.encode())
        out += _field(TENSOR_EXTERNAL, entry)
    out += _encode_varint(TENSOR_DATA_LOCATION << 3 | 0) + _encode_varint(onnx.TensorProto.EXTERNAL)
    spans[name] = Span(payload[1], payload[2] - payload[1])
    return bytes(out)
