"""JSON arrays of objects written from columns of arrays, with no Python call per row.

A ResNet-50-3D pyramid has millions of links; formatting each through Python costs
seconds. Rows are assembled in fixed-width records, one slot per column, each slot as
wide as the column's longest text and NUL-padded; a record block is then compacted by
dropping the NUL bytes, which JSON text never holds (orjson escapes a NUL in a string as
``\\u0000``). The literals between columns (``, "target": ``) are folded into the texts
of the neighbouring text-table column, and the row's closing literal and separator
open the next record, so a record has few NUL runs to skip (each costs the compaction
~15 % more on a 16 Ki-row block). Slots are copied into a record as whole ``numpy.void``
items, never byte by byte.

Numbers are formatted by orjson (shortest round-trip text, exactly the value:
``json.loads`` gives the same float back); columns of small non-negative integers (node
ids, channels) and of names are looked up in a table of their texts. Blocks are
formatted on two threads: NumPy releases the GIL in the gathers and the compaction.
"""

from __future__ import annotations

import os
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, BinaryIO, Protocol

import numpy as np
import orjson

CHUNK = 1 << 14
"""Rows assembled at once: a block's records stay in cache (measured: 16 Ki rows
write 2.7x faster than 64 Ki)."""

FLOAT_WIDTH = 24
"""The longest orjson float64 text: ``-2.2250738585072014e-308``."""

TABLE_LIMIT = 1 << 22
"""Integer columns whose values are all in ``0 .. TABLE_LIMIT-1`` use a text table."""


class Column(Protocol):
    """One column: each row's JSON text, NUL-padded."""

    def __len__(self) -> int: ...

    def block(self, lo: int, hi: int) -> np.ndarray:
        """Rows ``lo..hi``: ``hi - lo`` items of one ``numpy.void`` width, each a row's
        text NUL-padded."""
        ...


@dataclass(frozen=True)
class Table:
    """Row ``i`` is ``texts[index[i]]``: a few distinct texts, many rows."""

    texts: np.ndarray  # [distinct, width] uint8, NUL-padded, no NUL inside a text
    index: np.ndarray  # int64, per row

    def __len__(self) -> int:
        return len(self.index)

    def block(self, lo: int, hi: int) -> np.ndarray:
        # np.take of whole rows: ~1.7x faster than fancy indexing of their void items
        return _items(np.take(self.texts, self.index[lo:hi], axis=0))

    def framed(self, prefix: bytes, suffix: bytes) -> Table:
        """The same rows with `prefix` before and `suffix` after every text."""
        if not prefix and not suffix:
            return self
        d, w = self.texts.shape
        p = len(prefix)
        out = np.zeros((d, p + w + len(suffix)), np.uint8)
        out[:, :p] = np.frombuffer(prefix, np.uint8)
        out[:, p : p + w] = self.texts
        if suffix:
            end = p + np.count_nonzero(self.texts, axis=1)
            out[np.arange(d)[:, None], end[:, None] + np.arange(len(suffix))] = np.frombuffer(
                suffix, np.uint8
            )
        return Table(out, self.index)


@dataclass(frozen=True)
class Numbers:
    """Numbers formatted a block at a time by orjson."""

    values: np.ndarray  # float64 or int64
    width: int  # the longest text a value can have

    def __len__(self) -> int:
        return len(self.values)

    def block(self, lo: int, hi: int) -> np.ndarray:
        raw = orjson.dumps(self.values[lo:hi], option=orjson.OPT_SERIALIZE_NUMPY)
        return split_padded(raw[1:-1], hi - lo, self.width)


def _items(rows: np.ndarray) -> np.ndarray:
    """A C-contiguous ``[n, w]`` uint8 array as ``n`` items of ``numpy.void`` width `w`."""
    return rows.view(f"V{rows.shape[1]}").reshape(len(rows))


def _bytes(items: np.ndarray) -> np.ndarray:
    """The inverse of `_items`: a ``[n, w]`` uint8 view."""
    return items.view(np.uint8).reshape(len(items), items.dtype.itemsize)


def split_padded(text: bytes, rows: int, width: int) -> np.ndarray:
    """``b"a,bc,d"`` (`rows` comma-separated tokens, none wider than `width`) as `rows`
    ``numpy.void`` items as wide as the longest token, each NUL-padded."""
    n = len(text)
    buf = np.zeros(n + width + 1, np.uint8)
    buf[:n] = np.frombuffer(text, np.uint8)
    commas = np.flatnonzero(buf[:n] == ord(","))
    start = np.empty(rows, np.intp)
    start[0], start[1:] = 0, commas + 1
    length = np.empty(rows, np.intp)
    length[:-1], length[-1] = commas - start[:-1], n - start[-1]
    w = max(int(length.max()), 1)
    windows = np.ndarray((n + 1,), f"V{w}", buf, strides=(1,))  # item i: bytes i..i+w
    tokens = windows[start]  # a copy: each token and what follows it
    np.bitwise_and(_bytes(tokens), _bytes(_keep(w)[length]), out=_bytes(tokens))
    return tokens


@lru_cache(maxsize=32)
def _keep(width: int) -> np.ndarray:
    """Item ``L``: ``L`` bytes 0xFF, then NULs (a token of length ``L`` keeps its bytes)."""
    return _items(
        np.where(np.arange(width) < np.arange(width + 1)[:, None], 255, 0).astype(np.uint8)
    )


def _texts(texts: Sequence[bytes]) -> np.ndarray:
    width = max((len(t) for t in texts), default=1) or 1
    return np.array(texts, dtype=f"S{width}").view(np.uint8).reshape(len(texts), width)


def numbers(values: np.ndarray) -> Column:
    """The JSON text of each number (ints as ints, floats as shortest round-trip floats).

    Raises:
        ValueError: a NaN or infinite value (JSON has none).
    """
    arr = np.ascontiguousarray(values)
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)):
            raise ValueError("JSON numbers must be finite")
        return Numbers(arr.astype(np.float64, copy=False), FLOAT_WIDTH)
    arr = arr.astype(np.int64, copy=False)
    if len(arr) == 0 or (arr.min() >= 0 and arr.max() < TABLE_LIMIT):
        return Table(counting(int(arr.max()) + 1 if len(arr) else 1), arr)
    return Numbers(arr, 20)  # -9223372036854775808


def looked_up(values: np.ndarray, index: np.ndarray) -> Table:
    """Row ``i`` is the JSON text of ``values[index[i]]``: each distinct value formatted
    once, however many rows repeat it (a step's links repeat its kept pairs' scores).

    Raises:
        ValueError: a NaN or infinite value.
    """
    col = numbers(values)
    if isinstance(col, Table):
        return Table(col.texts, np.asarray(col.index)[index])
    texts = col.block(0, len(col)) if len(col) else np.zeros(1, "V1")
    return Table(_bytes(texts), np.asarray(index, dtype=np.int64))


def counting(n: int) -> np.ndarray:
    """The texts of ``0 .. n-1``, a `Table`'s ``texts`` for indexes below `n`."""
    raw = orjson.dumps(np.arange(max(n, 1)), option=orjson.OPT_SERIALIZE_NUMPY)[1:-1]
    return _texts(raw.split(b","))


def strings(table: Sequence[str], index: np.ndarray) -> Column:
    """Row ``i`` is the JSON string of ``table[index[i]]``."""
    return Table(_texts([orjson.dumps(s) for s in table]), np.asarray(index, dtype=np.int64))


Slot = Column | bytes
"""A record slot: a column's rows, or a literal every record holds."""


def write_rows(
    fp: BinaryIO,
    literals: Sequence[bytes],
    segments: Iterable[Sequence[Column]],
    chunk: int = CHUNK,
    *,
    parallel: bool = True,
) -> int:
    """Write ``lit0 col0 lit1 col1 ... litK`` per row, rows separated by ``", "``.

    `segments` are column sets whose rows follow one another (one set, or, for a
    pyramid's links, one per back-step, each made while the one before is formatted).
    ``len(literals) == len(columns) + 1``. Returns the bytes written.

    `parallel`: segments drawn and blocks formatted on threads of their own (faster when
    the cores are otherwise idle). Without it, everything runs on the caller's thread:
    when other work keeps the cores busy, the threads' hand-offs only cost CPU (measured
    on a ResNet-50-3D ``cfp explain`` with its report: ~0.1 s of 1.6 s).
    """
    parallel = parallel and (os.cpu_count() or 1) >= 2
    if any(b"\0" in lit for lit in literals):
        raise ValueError("literals cannot hold NUL bytes")
    lead = literals[-1] + b", "  # a record opens with the row before's end: `}, {"a": `
    framed: dict[int, tuple[np.ndarray, Table]] = {}  # per column: its texts, framed

    def slots(columns: Sequence[Column]) -> list[Slot]:
        """The record's slots: each literal folded into a neighbouring text table (a
        table the segments share is framed once), else a slot of its own."""
        if len(literals) != len(columns) + 1:
            raise ValueError("need one literal more than columns")
        out: list[Slot] = []
        before = lead + literals[0]
        for j, c in enumerate(columns):
            after = literals[j + 1] if j + 1 < len(columns) else b""
            if isinstance(c, Table):
                if j not in framed or framed[j][0] is not c.texts:
                    framed[j] = (c.texts, c.framed(before, after))
                out.append(Table(framed[j][1].texts, c.index))
                before = b""
            else:
                out += [before, c] if before else [c]
                before = after
        return [*out, before] if before else out

    def block(record: Sequence[Slot], lo: int, hi: int, first: bool) -> memoryview:
        parts = [s if isinstance(s, bytes) else s.block(lo, hi) for s in record]
        widths = [len(p) if isinstance(p, bytes) else p.dtype.itemsize for p in parts]
        offsets = np.cumsum([0, *widths]).tolist()
        names = [f"f{j}" for j in range(len(parts))]
        rec = np.empty(
            hi - lo,
            np.dtype({"names": names, "formats": [f"V{w}" for w in widths],
                      "offsets": offsets[:-1], "itemsize": offsets[-1]}),
        )  # fmt: skip
        for name, part in zip(names, parts):
            rec[name] = np.void(part) if isinstance(part, bytes) else part
        flat = rec.view(np.uint8)
        text = flat[flat != 0]  # written as it is: a file takes any buffer, no bytes copy
        return memoryview(text[len(lead) :] if first else text)  # the first row follows no other

    def tasks() -> Iterator[tuple[Sequence[Slot], int, int, bool]]:
        first = True
        for columns in _ahead(segments) if parallel else segments:
            rows = len(columns[0]) if columns else 0
            record = slots(columns) if rows else []
            for lo in range(0, rows, chunk):
                yield record, lo, min(rows, lo + chunk), first
                first = False

    n, blocks = 0, 0
    for text in _ordered(block, tasks()) if parallel else (block(*t) for t in tasks()):
        n, blocks = n + fp.write(text), blocks + 1
    return n + fp.write(literals[-1]) if blocks else 0  # the last row's end


def _ahead(items: Iterable[Any], depth: int = 2) -> Iterator[Any]:
    """`items`, drawn on a thread up to `depth` ahead of the caller (a pyramid's next
    back-step is expanded while this one is formatted and written). An error raised
    while drawing is raised to the caller; a caller that stops early stops the thread."""
    q: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(kind: str, value: Any) -> bool:
        while not stop.is_set():
            try:
                q.put((kind, value), timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def draw() -> None:
        try:
            for item in items:
                if not put("item", item):
                    return
            put("end", None)
        except BaseException as e:  # handed to the caller, raised there
            put("error", e)

    t = threading.Thread(target=draw, name="cfp-json-draw", daemon=True)
    t.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "error":
                raise value
            if kind == "end":
                return
            yield value
    finally:
        stop.set()
        t.join()


def _ordered(fn: Callable[..., Any], tasks: Iterator[tuple[Any, ...]]) -> Iterator[Any]:
    """``fn(*task)`` for each task on two threads, in order, at most four tasks ahead.

    Tasks are drawn (and so segments made) on the caller's thread while earlier ones
    are formatted."""
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="cfp-json") as pool:
        pending: deque[Future[Any]] = deque()
        try:
            for t in tasks:
                if len(pending) >= 4:
                    yield pending.popleft().result()
                pending.append(pool.submit(fn, *t))
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()
