"""JSON arrays of objects written from columns of arrays, with no Python call per row.

A ResNet-50-3D pyramid has millions of links; formatting each through Python costs
seconds. Here every number of a column is formatted at once by orjson (shortest
round-trip text, exactly the value: ``json.loads`` gives the same float back), and the
rows are assembled by one gather over byte buffers: each output byte is copied from a
literal (``{"source": ``), a number's text or a name's JSON string.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import orjson

CHUNK = 1 << 14
"""Rows assembled at once: the gather's index arrays stay in cache (measured: 16 Ki rows
write 2.7x faster than 64 Ki)."""


@dataclass(frozen=True)
class Tokens:
    """JSON texts of one column: row ``i`` is ``buf[start[i] : start[i] + length[i]]``."""

    buf: np.ndarray  # uint8
    start: np.ndarray  # int64, per row
    length: np.ndarray  # int64, per row


def numbers(values: np.ndarray) -> Tokens:
    """The JSON text of each number (ints as ints, floats as shortest round-trip floats).

    Raises:
        ValueError: a NaN or infinite value (JSON has none).
    """
    arr = np.ascontiguousarray(values)
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise ValueError("JSON numbers must be finite")
    if arr.dtype.kind == "f":
        arr = arr.astype(np.float64, copy=False)
    elif arr.dtype.kind in "iub":
        arr = arr.astype(np.int64, copy=False)
    buf = np.frombuffer(orjson.dumps(arr, option=orjson.OPT_SERIALIZE_NUMPY), np.uint8)[1:-1]
    if len(arr) == 0:
        return Tokens(buf, np.zeros(0, np.int64), np.zeros(0, np.int64))
    commas = np.flatnonzero(buf == ord(","))
    start = np.concatenate([[0], commas + 1])
    end = np.concatenate([commas, [len(buf)]])
    return Tokens(buf, start, end - start)


def strings(table: Sequence[str], index: np.ndarray) -> Tokens:
    """Row ``i`` is the JSON string of ``table[index[i]]`` (a few distinct names, many rows)."""
    texts = [orjson.dumps(s) for s in table]
    lengths = np.array([len(t) for t in texts], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    buf = np.frombuffer(b"".join(texts), np.uint8)
    idx = np.asarray(index, dtype=np.int64)
    return Tokens(buf, starts[idx], lengths[idx])


def write_rows(
    fp: BinaryIO, literals: Sequence[bytes], columns: Sequence[Tokens], chunk: int = CHUNK
) -> int:
    """Write ``lit0 col0 lit1 col1 ... litK`` per row, rows separated by ``", "``.

    ``len(literals) == len(columns) + 1``. Returns the bytes written.
    """
    if len(literals) != len(columns) + 1:
        raise ValueError("need one literal more than columns")
    rows = len(columns[0].start) if columns else 0
    lits = [b", " + literals[0], *literals[1:]]
    pool = np.frombuffer(b"".join(lits), np.uint8)
    lit_start = np.concatenate([[0], np.cumsum([len(x) for x in lits])[:-1]]).astype(np.int64)
    lit_len = np.array([len(x) for x in lits], dtype=np.int64)
    base = [len(pool)]  # each column's buffer sits after the literals, one after another
    for c in columns[:-1]:
        base.append(base[-1] + len(c.buf))
    source = np.concatenate([pool, *(c.buf for c in columns)])
    written = 0
    for lo in range(0, rows, chunk):
        hi = min(rows, lo + chunk)
        out = _assemble(source, lit_start, lit_len, columns, base, lo, hi)
        if lo == 0:
            out = out[2:]  # the first row has no separator
        fp.write(out.tobytes())
        written += len(out)
    return written


def _assemble(
    source: np.ndarray,
    lit_start: np.ndarray,
    lit_len: np.ndarray,
    columns: Sequence[Tokens],
    base: Sequence[int],
    lo: int,
    hi: int,
) -> np.ndarray:
    """Rows ``lo..hi`` as bytes: segments (literal, token, literal, ...) gathered in order."""
    n, k = hi - lo, len(columns)
    seg_src = np.empty((n, 2 * k + 1), dtype=np.int64)
    seg_len = np.empty((n, 2 * k + 1), dtype=np.int64)
    seg_src[:, 0::2] = lit_start
    seg_len[:, 0::2] = lit_len
    for j, (c, b) in enumerate(zip(columns, base)):
        seg_src[:, 2 * j + 1] = c.start[lo:hi] + b
        seg_len[:, 2 * j + 1] = c.length[lo:hi]
    src, length = seg_src.ravel(), seg_len.ravel()
    out_start = np.cumsum(length) - length
    small = np.int32 if len(source) + out_start[-1] < 2**31 else np.int64  # half the bytes
    shift = (src - out_start).astype(small)
    index = np.repeat(shift, length) + np.arange(int(length.sum()), dtype=small)
    return source[index]
