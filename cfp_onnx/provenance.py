"""Channel provenance: which kernels each channel of each tensor carries (SPEC §2).

A tensor's provenance is a :class:`ChannelMap`: an integer index array, broadcastable
to the tensor (size 1 on every axis along which provenance does not change), whose
values point into a table of kernel sets. A channels-first map is ``idx`` of shape
``(1, C, 1, 1, 1)``; a channels-last one ``(1, 1, 1, 1, C)``; a channel shuffle's
intermediate varies along two axes. Layout ops are applied to ``idx`` itself, so
every element is followed to the channel it came from, whatever the layout.

Each op family has one small rule; an op without a rule produces an
:class:`Unresolved` marker that only becomes an error if the pyramid needs it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cfp_onnx.errors import UnsupportedOpError
from cfp_onnx.graph import Graph, Head, Layer, Node, attention_message
from cfp_onnx.ops import (
    CONV,
    DENSE,
    ELEMENTWISE,
    GLOBAL_POOL,
    LAYOUT,
    REDUCE,
    RESIZE,
    SELECT,
    UNARY,
    WINDOW_POOL,
)

EMPTY: frozenset[int] = frozenset()
MAX_MATERIALIZE = 1 << 27  # elements; layout ops on bigger tensors are refused


@dataclass(frozen=True)
class ChannelMap:
    idx: np.ndarray  # int64, same rank as the tensor, broadcastable to it
    rows: tuple[frozenset[int], ...]  # kernel ids per index value


@dataclass(frozen=True)
class Unresolved:
    """Why a tensor's provenance is unknown (an op without a rule, and which)."""

    op_type: str
    node: str
    reason: str
    attention: bool = False  # a MatMul of two activations: the model is a transformer


Prov = ChannelMap | Unresolved | None  # None: a constant
Rule = Callable[[Node, list[Prov], Graph], list[Prov]]
RULES: dict[str, Rule] = {}


def channel_rule(*ops: str) -> Callable[[Rule], Rule]:
    def register(fn: Rule) -> Rule:
        for op in ops:
            RULES[op] = fn
        return fn

    return register


# --------------------------------------------------------------------------- map algebra


def leaf(rank: int) -> ChannelMap:
    """A tensor that carries no kernel (the graph input, or a constant as a feature)."""
    return ChannelMap(np.zeros((1,) * rank, dtype=np.int64), (EMPTY,))


def compress(idx: np.ndarray, rows: Sequence[frozenset[int]]) -> ChannelMap:
    """Shrink axes along which nothing changes to size 1; keep only used, distinct rows."""
    for ax in range(idx.ndim):
        if idx.shape[ax] > 1 and np.all(idx == idx.take([0], axis=ax)):
            idx = idx.take([0], axis=ax)
    used, inv = np.unique(idx, return_inverse=True)
    canon: dict[frozenset[int], int] = {}
    remap = np.empty(len(used), dtype=np.int64)
    for k, u in enumerate(used.tolist()):
        remap[k] = canon.setdefault(rows[u], len(canon))
    new_idx = remap[inv.reshape(idx.shape)]
    if len(canon) < len(used):
        return compress(new_idx, tuple(canon))
    return ChannelMap(np.ascontiguousarray(new_idx), tuple(canon))


def align(m: ChannelMap, rank: int) -> ChannelMap:
    """Prepend unit axes, as ONNX broadcasting does."""
    if m.idx.ndim >= rank:
        return m
    return ChannelMap(m.idx.reshape((1,) * (rank - m.idx.ndim) + m.idx.shape), m.rows)


def union(maps: Sequence[ChannelMap]) -> ChannelMap:
    """Element-wise union of broadcast operands: each output element carries all its sources."""
    rank = max(m.idx.ndim for m in maps)
    acc = align(maps[0], rank)
    for m in maps[1:]:
        m = align(m, rank)
        a, b = np.broadcast_arrays(acc.idx, m.idx)
        pair = a * len(m.rows) + b
        uniq, inv = np.unique(pair, return_inverse=True)
        rows = tuple(acc.rows[p // len(m.rows)] | m.rows[p % len(m.rows)] for p in uniq.tolist())
        acc = compress(inv.reshape(a.shape).astype(np.int64), rows)
    return acc


def reduce_union(m: ChannelMap, axes: Sequence[int], keepdims: bool) -> ChannelMap:
    """Union over reduced axes: an output element depends on everything it reduces."""
    idx = m.idx
    axes = sorted({a % idx.ndim for a in axes})
    varying = [a for a in axes if idx.shape[a] > 1]
    rows = m.rows
    if varying:
        keep = [a for a in range(idx.ndim) if a not in varying]
        moved = np.transpose(idx, keep + varying)
        lead = moved.reshape(-1, int(np.prod([idx.shape[a] for a in varying])))
        table: dict[frozenset[int], int] = {}
        out = np.empty(lead.shape[0], dtype=np.int64)
        for i, r in enumerate(lead):
            s = frozenset().union(*(rows[k] for k in np.unique(r).tolist()))
            out[i] = table.setdefault(s, len(table))
        shape = list(idx.shape)
        for a in varying:
            shape[a] = 1
        idx = out.reshape([shape[a] for a in keep])
        inv_perm = np.argsort(keep + varying)
        idx = np.transpose(idx.reshape(idx.shape + (1,) * len(varying)), inv_perm)
        rows = tuple(table)
    if not keepdims:
        idx = idx.reshape([s for a, s in enumerate(idx.shape) if a not in axes])
    return compress(idx, rows)


def materialize(m: ChannelMap, shape: tuple[int, ...]) -> np.ndarray:
    if int(np.prod(shape)) > MAX_MATERIALIZE:
        raise _Refuse(f"tensor of shape {shape} is too large to trace element by element")
    return np.ascontiguousarray(np.broadcast_to(align(m, len(shape)).idx, shape))


class _Refuse(Exception):
    """A rule cannot follow this particular use of its op."""


# --------------------------------------------------------------------------- rules


def _features(ins: list[Prov]) -> list[ChannelMap]:
    return [m for m in ins if isinstance(m, ChannelMap)]


def _const_input(node: Node, g: Graph, pos: int) -> np.ndarray | None:
    if len(node.inputs) > pos and node.inputs[pos] and g.is_const(node.inputs[pos]):
        return g.const(node.inputs[pos])
    return None


def _ints(node: Node, g: Graph, attr: str, pos: int) -> list[int] | None:
    """An int list given as attribute (old opsets) or constant input (new ones)."""
    if attr in node.attrs:
        return [int(v) for v in node.attrs[attr]]
    val = _const_input(node, g, pos)
    if val is None:
        if len(node.inputs) > pos and node.inputs[pos]:
            raise _Refuse(f"input {pos} ({attr}) is not a constant")
        return None
    return [int(v) for v in np.asarray(val).reshape(-1)]


@channel_rule(*UNARY)
def _unary(node: Node, ins: list[Prov], g: Graph) -> list[Prov]:
    feats = _features(ins)
    out = feats[0] if len(feats) == 1 else union(feats)
    return [out] * len(node.outputs)


def _channel_axis(m: ChannelMap, rank: int) -> int:
    varying = [a for a in range(m.idx.ndim) if m.idx.shape[a] > 1]
    return varying[0] if len(varying) == 1 else min(1, rank - 1)


@channel_rule(*ELEMENTWISE)
def _elementwise(node: Node, ins: list[Prov], g: Graph) -> list[Prov]:
    pairs = [(m, name) for m, name in zip(ins, node.inputs) if isinstance(m, ChannelMap)]
    if len(pairs) == 1:
        return [pairs[0][0]]
    if node.op_type == "Mul" and len(pairs) == 2:
        gated = _gate(pairs, g.shape(node.outputs[0]), g)
        if gated is not None:
            return [gated]
    return [union([m for m, _ in pairs])]


def _gate(pairs: list[tuple[ChannelMap, str]], out: tuple[int, ...], g: Graph) -> ChannelMap | None:
    """SPEC §2: one operand of size 1 on the channel axis or on every other non-batch axis."""
    shapes = [(1,) * (len(out) - len(g.shape(n))) + g.shape(n) for _, n in pairs]
    full = [s == out for s in shapes]
    if full.count(True) != 1:
        return None
    main, gate = (0, 1) if full[0] else (1, 0)
    ch = _channel_axis(align(pairs[main][0], len(out)), len(out))
    gs = shapes[gate]
    per_channel = all(gs[a] == 1 for a in range(1, len(out)) if a != ch)
    per_position = gs[ch] == 1
    return pairs[main][0] if per_channel or per_position else None


def _dense(node: Node, ins: list[Prov], g: Graph) -> list[Prov]:
    """A MatMul of a feature tensor by a constant ``W[K, M]`` inside the network (a Linear
    on a channels-last tensor: ConvNeXt's pointwise layers). Output column ``m`` depends on
    the input columns ``k`` with ``W[k, m] != 0``: it carries the union of their kernels,
    position by position, as any op combining features does (SPEC §2)."""
    w = _const_input(node, g, 1)
    m = ins[0]
    if not isinstance(m, ChannelMap) or w is None or w.ndim != 2 or ins[1] is not None:
        raise _Refuse("only a feature tensor times a constant matrix is followed")
    idx = align(m, len(g.shape(node.inputs[0]))).idx
    k, cols = w.shape
    outer = idx.shape[:-1]
    lead = np.broadcast_to(idx, (*outer, k)).reshape(-1, k)  # a row of channels per position
    distinct, where = np.unique(lead, axis=0, return_inverse=True)
    patterns, column = np.unique((np.asarray(w) != 0).T, axis=0, return_inverse=True)
    table: dict[frozenset[int], int] = {}
    out = np.empty((len(distinct), len(patterns)), dtype=np.int64)
    for p, row in enumerate(distinct):
        for q, pattern in enumerate(patterns):
            carried = frozenset().union(*(m.rows[r] for r in np.unique(row[pattern]).tolist()))
            out[p, q] = table.setdefault(carried, len(table))
    new = out[np.reshape(where, -1)][:, np.reshape(column, -1)]
    return [compress(new.reshape(*outer, cols), tuple(table))]


@channel_rule(*WINDOW_POOL)
def _window_pool(node: Node, ins: list[Prov], g: Graph) -> list[Prov]:
    m = _features(ins)[0]
    if any(s > 1 for s in m.idx.shape[2:]):
        raise _Refuse("pooling window runs across changing provenance")
    return [m] + [None] * (len(node.outputs) - 1)


@channel_rule(*GLOBAL_POOL)
def _global_pool(node: Node, ins: list[Prov], g: Graph) -> list[Prov]:
    m = _features(ins)[0]
    return [reduce_union(m, range(2, m.idx.ndim), keepdims=True)]


@channel_rule(*REDUCE)
def _reduce(node: Node, ins: list[Prov], g: Graph) -> list[Prov]:
    m = _features(ins)[0]
    axes = _ints(node, g, "axes", 1)
    if not axes:
        if node.attrs.get("noop_with_empty_axes", 0):
            return [m]
        axes = list(range(m.idx.ndim))
    return [reduce_union(m, axes, keepdims=bool(node.attrs.get("keepdims", 1)))]


@channel_rule(*RESIZE)
def _resize(node: Node, ins: list[Prov], g: Graph) -> list[Prov]:
    m = _features(ins)[0]
    src, dst = g.shape(node.inputs[0]), g.shape(node.outputs[0])
    if any(a != b and m.idx.shape[ax] > 1 for ax, (a, b) in enumerate(zip(src, dst))):
        raise _Refuse("resize scales an axis along which provenance changes")
    return [m]


@channel_rule("Concat")
def _concat(node: Node, ins: list[Prov], g: Graph) -> list[Prov]:
    out = g.shape(node.outputs[0])
    axis = int(node.attrs["axis"]) % len(out)
    maps = [align(m, len(out)) if isinstance(m, ChannelMap) else leaf(len(out)) for m in ins]
    target = [out[a] if any(m.idx.shape[a] > 1 for m in maps) else 1 for a in range(len(out))]
    parts: list[np.ndarray] = []
    rows: list[frozenset[int]] = []
    offset = 0
    for m, name in zip(maps, node.inputs):
        shape = list(target)
        shape[axis] = g.shape(name)[axis]
        parts.append(np.broadcast_to(m.idx, shape) + offset)
        rows.extend(m.rows)
        offset += len(m.rows)
    return [compress(np.concatenate(parts, axis=axis), rows)]


@channel_rule("Split")
def _split(node: Node, ins: list[Prov], g: Graph) -> list[Prov]:
    m = _features(ins)[:1][0]
    axis = int(node.attrs.get("axis", 0)) % m.idx.ndim
    if m.idx.shape[axis] == 1:
        return [m] * len(node.outputs)
    sizes = np.cumsum([0] + [g.shape(o)[axis] for o in node.outputs])
    return [
        compress(np.take(m.idx, np.arange(a, b), axis=axis), m.rows)
        for a, b in itertools.pairwise(sizes)
    ]


@channel_rule("Slice")
def _slice(node: Node, ins: list[Prov], g: Graph) -> list[Prov]:
    m = ins[0]
    assert isinstance(m, ChannelMap)
    starts, ends = _ints(node, g, "starts", 1), _ints(node, g, "ends", 2)
    if starts is None or ends is None:
        raise _Refuse("slice bounds are not constants")
    axes = _ints(node, g, "axes", 3) or list(range(len(starts)))
    steps = _ints(node, g, "steps", 4) or [1] * len(starts)
    idx = m.idx
    for s, e, a, st in zip(starts, ends, axes, steps):
        a %= idx.ndim
        if idx.shape[a] > 1:
            sl = [slice(None)] * idx.ndim
            sl[a] = slice(s, e, st)
            idx = idx[tuple(sl)]
    return [compress(idx, m.rows)]


@channel_rule("Gather")
def _gather(node: Node, ins: list[Prov], g: Graph) -> list[Prov]:
    m = ins[0]
    if not isinstance(m, ChannelMap):
        raise _Refuse("gather from a constant with feature indices")
    indices = _const_input(node, g, 1)
    if indices is None:
        raise _Refuse("gather indices are not constants")
    axis = int(node.attrs.get("axis", 0)) % m.idx.ndim
    take = indices if m.idx.shape[axis] > 1 else np.zeros_like(indices)
    return [compress(np.take(m.idx, take.astype(np.int64), axis=axis), m.rows)]


@channel_rule("Pad")
def _pad(node: Node, ins: list[Prov], g: Graph) -> list[Prov]:
    m = ins[0]
    assert isinstance(m, ChannelMap)
    pads = _ints(node, g, "pads", 1)
    if pads is None:
        raise _Refuse("pad amounts are not constants")
    rank = m.idx.ndim
    axes = _ints(node, g, "axes", 3) or list(range(rank))
    before, after = pads[: len(axes)], pads[len(axes) :]
    widths = [(0, 0)] * rank
    for a, b, e in zip(axes, before, after):
        if m.idx.shape[a % rank] > 1:
            if b < 0 or e < 0:
                raise _Refuse("negative pad on an axis along which provenance changes")
            widths[a % rank] = (b, e)
    if not any(b or e for b, e in widths):
        return [m]
    mode = node.attrs.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode == "constant":
        idx = np.pad(m.idx, widths, mode="constant", constant_values=len(m.rows))
        return [compress(idx, (*m.rows, EMPTY))]
    np_mode: Any = {"reflect": "reflect", "edge": "edge"}.get(mode, "wrap")
    return [
        compress(
            np.pad(m.idx, widths, mode=np_mode),
            m.rows,
        )
    ]


@channel_rule("Transpose")
def _transpose(node: Node, ins: list[Prov], g: Graph) -> list[Prov]:
    m = _features(ins)[0]
    perm = node.attrs.get("perm")
    perm = list(perm) if perm is not None else list(range(m.idx.ndim))[::-1]
    return [ChannelMap(np.ascontiguousarray(np.transpose(m.idx, perm)), m.rows)]


@channel_rule("Squeeze")
def _squeeze(node: Node, ins: list[Prov], g: Graph) -> list[Prov]:
    m = _features(ins)[0]
    axes = _ints(node, g, "axes", 1)
    if axes is None:
        axes = [a for a, s in enumerate(g.shape(node.inputs[0])) if s == 1]
    squeezed = tuple(sorted({a % m.idx.ndim for a in axes}))
    return [ChannelMap(np.squeeze(m.idx, axis=squeezed), m.rows)]


@channel_rule("Unsqueeze")
def _unsqueeze(node: Node, ins: list[Prov], g: Graph) -> list[Prov]:
    m = _features(ins)[0]
    out_rank = len(g.shape(node.outputs[0]))
    axes = sorted(a % out_rank for a in (_ints(node, g, "axes", 1) or []))
    return [ChannelMap(np.expand_dims(m.idx, axis=tuple(axes)), m.rows)]


@channel_rule("Expand")
def _expand(node: Node, ins: list[Prov], g: Graph) -> list[Prov]:
    return [align(_features(ins)[0], len(g.shape(node.outputs[0])))]


@channel_rule("Reshape", "Flatten", "Tile", "DepthToSpace", "SpaceToDepth")
def _move(node: Node, ins: list[Prov], g: Graph) -> list[Prov]:
    """Apply the op itself to a tensor of channel indices."""
    m = ins[0]
    if not isinstance(m, ChannelMap):
        raise _Refuse("reshaping a constant with feature inputs")
    src, dst = g.shape(node.inputs[0]), g.shape(node.outputs[0])
    full = materialize(m, src)
    if node.op_type == "Tile":
        reps = _ints(node, g, "repeats", 1)
        assert reps is not None
        moved = np.tile(full, reps)
    elif node.op_type in ("DepthToSpace", "SpaceToDepth"):
        moved = _depth_space(node, full)
    else:
        moved = full.reshape(dst)
    return [compress(moved.reshape(dst), m.rows)]


def _depth_space(node: Node, x: np.ndarray) -> np.ndarray:
    b = int(node.attrs["blocksize"])
    n, c, h, w = x.shape
    if node.op_type == "SpaceToDepth":
        t = x.reshape(n, c, h // b, b, w // b, b).transpose(0, 3, 5, 1, 2, 4)
        return t.reshape(n, c * b * b, h // b, w // b)
    mode = node.attrs.get("mode", b"DCR")
    if (mode.decode() if isinstance(mode, bytes) else mode) == "CRD":
        t = x.reshape(n, c // (b * b), b, b, h, w).transpose(0, 1, 4, 2, 5, 3)
    else:
        t = x.reshape(n, b, b, c // (b * b), h, w).transpose(0, 3, 4, 1, 5, 2)
    return t.reshape(n, c // (b * b), h * b, w * b)


# --------------------------------------------------------------------------- engine


@dataclass(frozen=True)
class Csr:
    """Kernel ids per channel: ``kernels[indptr[c]:indptr[c+1]]`` feed channel ``c``."""

    indptr: np.ndarray
    kernels: np.ndarray

    def layers_reached(self, offsets: np.ndarray) -> np.ndarray:
        return np.unique(np.searchsorted(offsets, self.kernels, side="right") - 1)


@dataclass(frozen=True)
class KernelSpace:
    """Kernel ids: layer ``i`` owns ids ``offsets[i] .. offsets[i+1]-1``, one per output
    channel. The one place id <-> (layer, channel) is worked out."""

    layers: tuple[str, ...]  # layer names, topological order
    offsets: np.ndarray  # [layers + 1] int64

    @property
    def size(self) -> int:
        return int(self.offsets[-1])

    def split(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(layer index, channel) of each kernel id."""
        layer = np.searchsorted(self.offsets, ids, side="right") - 1
        return layer, np.asarray(ids) - self.offsets[layer]

    def ids(self, layer: np.ndarray, channel: np.ndarray) -> np.ndarray:
        """Kernel ids of (layer index, channel) pairs."""
        return self.offsets[np.asarray(layer, dtype=np.int64)] + np.asarray(channel, np.int64)

    def ids_of(self, names: list[str], channel: np.ndarray) -> np.ndarray:
        """Kernel ids of (layer name, channel) pairs, as ``pyramid.json`` names them."""
        index = {name: i for i, name in enumerate(self.layers)}
        layer = np.array([index[n] for n in names], dtype=np.int64)
        return self.ids(layer, channel) if len(names) else np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class Provenance:
    """Provenance of every tensor, and the kernel id space of the layers."""

    maps: dict[str, Prov]
    space: KernelSpace

    @property
    def offsets(self) -> np.ndarray:
        """Layer i owns kernel ids offsets[i] .. offsets[i+1]-1 (see KernelSpace)."""
        return self.space.offsets

    def rows_along(self, tensor: str, axis: int, size: int, *, what: str) -> Csr:
        """CSR of kernel sets per position along `axis`; the map must vary along no other axis.

        Raises:
            UnsupportedOpError: the tensor depends on an op with no rule (named).
        """
        m = self.maps.get(tensor)
        if isinstance(m, Unresolved) and m.attention:
            raise UnsupportedOpError(m.reason)  # no op list: no rule would make it fit
        if isinstance(m, Unresolved):
            raise UnsupportedOpError(
                f"op {m.op_type} (node {m.node!r}) lies on the path to {what} and {m.reason}; "
                f"supported ops: {', '.join(sorted(RULES))}"
            )
        if m is None:
            return Csr(np.zeros(size + 1, dtype=np.int64), np.zeros(0, dtype=np.int64))
        idx = m.idx
        axis %= idx.ndim
        if any(s > 1 for a, s in enumerate(idx.shape) if a != axis):
            raise UnsupportedOpError(
                f"{what} mixes channels across non-channel positions (provenance map of shape "
                f"{idx.shape}); cfp cannot attribute it to whole channels"
            )
        line = np.broadcast_to(idx.reshape(-1), (size,)) if idx.size == 1 else idx.reshape(-1)
        rows = [np.fromiter(sorted(m.rows[k]), dtype=np.int64) for k in line.tolist()]
        indptr = np.zeros(size + 1, dtype=np.int64)
        indptr[1:] = np.cumsum([len(r) for r in rows])
        kernels = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
        return Csr(indptr, kernels)


def trace(graph: Graph, layers: Sequence[Layer], head: Head) -> Provenance:
    """Run every rule in topological order over the graph."""
    sizes = [layer.c_out for layer in layers]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    by_node = {layer.node: i for i, layer in enumerate(layers)}
    maps: dict[str, Prov] = {graph.input_name: leaf(len(graph.shape(graph.input_name)))}
    for name in graph.constants:
        maps[name] = None
    for node in graph.nodes:
        for out, val in zip(node.outputs, _apply(node, maps, graph, by_node, offsets, head)):
            maps[out] = val
    return Provenance(maps, KernelSpace(tuple(layer.node for layer in layers), offsets))


def _apply(
    node: Node,
    maps: dict[str, Prov],
    g: Graph,
    by_node: dict[str, int],
    offsets: np.ndarray,
    head: Head,
) -> list[Prov]:
    ins: list[Prov] = [maps.get(i) if i else None for i in node.inputs]
    if (
        node.op_type == "MatMul"
        and node.name not in head.nodes
        and all(m is not None for m in ins[:2])
    ):  # two activations, whatever else is unresolved above them
        return [Unresolved(node.op_type, node.name, attention_message(node), attention=True)]
    unresolved = [m for m in ins if isinstance(m, Unresolved)]
    # attention says the most (the model is a transformer): it wins where paths meet
    bad = next((m for m in unresolved if m.attention), unresolved[0] if unresolved else None)
    if bad is not None:
        return [bad] * len(node.outputs)
    if node.op_type in CONV and node.name in by_node:
        i = by_node[node.name]
        c = int(offsets[i + 1] - offsets[i])
        rank = len(g.constants.shape_of(node.inputs[1]))
        idx = np.arange(c, dtype=np.int64).reshape((1, c) + (1,) * (rank - 2))
        own = ChannelMap(idx, tuple(frozenset({int(offsets[i]) + j}) for j in range(c)))
        z = ins[3] if len(ins) > 3 else None
        if isinstance(z, ChannelMap):  # FusedConv's Z: act(conv(X) + Z), the Add it absorbed
            return [union([own, z])]
        return [own]
    if not _features(ins):
        return [None] * len(node.outputs)  # computed from constants only
    if node.op_type == "MatMul" and node.name not in head.nodes:
        try:
            return _dense(node, ins, g)
        except _Refuse as exc:
            return [Unresolved(node.op_type, node.name, f"cannot be followed: {exc}")]
    if node.name in head.nodes or node.op_type in DENSE | CONV:
        return [Unresolved(node.op_type, node.name, "mixes all channels (a dense layer)")] * len(
            node.outputs
        )
    rule = RULES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
    if rule is None:
        why = "has no channel-provenance rule"
        if node.domain not in ("", "ai.onnx"):
            why = f"is a custom-domain op ({node.domain}) with no channel-provenance rule"
        return [Unresolved(node.op_type, node.name, why)] * len(node.outputs)
    try:
        return rule(node, ins, g)
    except _Refuse as exc:
        return [Unresolved(node.op_type, node.name, f"cannot be followed: {exc}")] * len(
            node.outputs
        )
    except Exception as exc:  # a rule meeting a shape it was not written for
        return [
            Unresolved(node.op_type, node.name, f"cannot be followed ({type(exc).__name__}: {exc})")
        ] * len(node.outputs)


SUPPORTED = frozenset(RULES) | CONV | frozenset(SELECT) | frozenset(LAYOUT)
