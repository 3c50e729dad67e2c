"""pyramid.json, formatted a column at a time, is the document json.dumps(to_dict()) gives."""

from __future__ import annotations

import io
import itertools
import json

import numpy as np
import pytest

from cfp_onnx import jsonrows
from cfp_onnx.api import Explainer
from tests import nets


def pairs(text: str) -> object:
    """The document with every object as its list of (key, value) pairs: order counts."""
    return json.loads(text, object_pairs_hook=list)


@pytest.mark.parametrize(("name", "theta", "chunk"), [("residual", 0.3, 7), ("x3d", 0.6, 65536)])
def test_written_json_equals_json_dumps(exported, name, theta, chunk):
    _, path = exported(name)
    clip = np.random.default_rng(2).standard_normal(nets.CLIP).astype(np.float32)
    p = Explainer(path, clip_shape=clip.shape).explain(clip, theta=theta, depth=4)
    out = io.BytesIO()
    size = p.write_json(out, chunk=chunk)
    text = out.getvalue().decode()
    assert size == len(out.getvalue())
    assert pairs(text) == pairs(json.dumps(p.to_dict(), allow_nan=False))
    assert p.to_json() == text
    doc = json.loads(text)
    assert len(doc["links"]) == p.n_links > chunk or name == "x3d"
    assert [n["relevance"] for n in doc["nodes"]] == p.node_relevance.tolist()  # exact floats


def test_rows_hold_exact_numbers_and_escaped_names():
    values = np.array([0.0, 1.0, 1e-5, 5e-324, 1 / 3, 0.1, 1e300, -2.5])
    names = ['a"b', "</script>", "ü\\n"]
    index = np.array([0, 1, 2, 1, 0, 2, 1, 0])
    out = io.BytesIO()
    cols = [jsonrows.numbers(np.arange(8) * 1000), jsonrows.strings(names, index)]
    cols.append(jsonrows.numbers(values))
    jsonrows.write_rows(out, [b'{"i": ', b', "n": ', b', "v": ', b"}"], [cols], chunk=3)
    rows = json.loads(b"[" + out.getvalue() + b"]")
    assert [r["i"] for r in rows] == list(range(0, 8000, 1000))
    assert [r["n"] for r in rows] == [names[i] for i in index]
    assert [r["v"] for r in rows] == values.tolist()  # the same floats, bit for bit


def test_looked_up_values_and_framed_tables_read_back_exactly():
    """Values formatted once and looked up per row (a step's repeated scores), ints
    through their text table, and a table framed by the literals around it."""
    values = np.array([1 / 3, 5e-324, -2.2250738585072014e-308, 0.1, 7.0])
    pick = np.array([4, 0, 0, 2, 1, 3, 3, 3, 0])
    out = io.BytesIO()
    cols = [jsonrows.looked_up(values, pick), jsonrows.looked_up(np.arange(5) * 7, pick)]
    jsonrows.write_rows(out, [b"[", b", ", b"]"], [cols], chunk=4)
    assert json.loads(b"[" + out.getvalue() + b"]") == [
        [values[i], int(i) * 7] for i in pick
    ]  # the same floats, bit for bit
    table = jsonrows.strings(["a", "bcd"], np.array([1, 0]))
    assert isinstance(table, jsonrows.Table)
    framed = table.framed(b"<", b">, ")
    got = [bytes(r).rstrip(b"\0") for r in framed.texts[framed.index]]
    assert got == [b'<"bcd">, ', b'<"a">, ']
    with pytest.raises(ValueError, match="finite"):
        jsonrows.looked_up(np.array([np.inf]), np.zeros(3, np.int64))


def test_empty_columns_and_non_finite_values():
    out = io.BytesIO()
    assert jsonrows.write_rows(out, [b"{", b"}"], [[jsonrows.numbers(np.zeros(0))]]) == 0
    with pytest.raises(ValueError, match="finite"):
        jsonrows.numbers(np.array([1.0, np.nan]))


def test_segments_follow_one_another_and_every_number_kind_is_exact():
    """Rows from several segments (empty ones too), chunked across their edges, with the
    widest floats, negative and huge ints (formatted, not looked up) and table ints."""
    rng = np.random.default_rng(5)
    floats = np.concatenate([rng.standard_normal(40) * 10.0 ** rng.integers(-300, 300, 40),
                             [-2.2250738585072014e-308, 5e-324, -1.7976931348623157e308]])  # fmt: skip
    ints = np.concatenate([rng.integers(-(2**62), 2**62, 40), [np.iinfo(np.int64).min, 0, 7]])
    small = np.arange(len(floats))
    cut = [0, 10, 10, 31, len(floats)]
    segments = [
        [jsonrows.numbers(small[a:b]), jsonrows.numbers(ints[a:b]), jsonrows.numbers(floats[a:b])]
        for a, b in itertools.pairwise(cut)
    ]
    out = io.BytesIO()
    n = jsonrows.write_rows(out, [b'{"k": ', b', "i": ', b', "f": ', b"}"], segments, 4)
    assert n == len(out.getvalue())
    rows = json.loads(b"[" + out.getvalue() + b"]")
    assert [r["k"] for r in rows] == small.tolist()
    assert [r["i"] for r in rows] == ints.tolist()
    assert [r["f"] for r in rows] == floats.tolist()


@pytest.mark.parametrize("run_links", [1 << 16, 7, 1])
def test_links_written_in_runs_equal_the_sorted_list(exported, monkeypatch, run_links):
    """The writer's runs (a step at a time, cut into pieces of whole parents of about
    `run_links` links), joined, are the globally sorted link list; a pyramid whose links
    were already expanded writes the same bytes."""
    from cfp_onnx import pyramid

    monkeypatch.setattr(pyramid, "RUN_LINKS", run_links)
    _, path = exported("residual")
    clip = np.random.default_rng(3).standard_normal(nets.CLIP).astype(np.float32)
    ex = Explainer(path, clip_shape=clip.shape)
    fresh = ex.explain(clip, theta=0.3, depth=4)
    assert fresh._steps_in_order() and "_links" not in fresh.__dict__
    counted_total = fresh.n_links  # from the factored steps
    runs = list(fresh._link_runs())
    assert len(runs) > 1 and "_links" not in fresh.__dict__
    pieces = sum(len(b.pieces(run_links)) for b in fresh.blocks)
    assert len(runs) == pieces and (pieces > len(fresh.blocks)) == (run_links < 1 << 16)
    parents = [set(s.tolist()) for s, _, _, _ in runs]
    assert all(not (a & b) for a, b in itertools.combinations(parents, 2))  # whole parents
    joined = [np.concatenate(c) for c in zip(*[(s, t, r[pick]) for s, t, r, pick in runs])]
    for got, want in zip(joined, (fresh.link_source, fresh.link_target, fresh.link_relevance)):
        assert np.array_equal(got, want)
    counted = [links for _, _, _, links in fresh.summary()]  # from the factored steps
    some = np.random.default_rng(0).permutation(len(fresh.node_layer))[: len(fresh.node_layer) // 3]
    got = fresh.links_among(some)
    both = np.isin(fresh.link_source, some) & np.isin(fresh.link_target, some)
    assert 0 < both.sum() < fresh.n_links == counted_total
    for g, flat in zip(got, (fresh.link_source, fresh.link_target, fresh.link_relevance)):
        assert np.array_equal(g, flat[both])
    assert np.array_equal(np.flatnonzero(fresh.parents), np.unique(fresh.link_source))
    assert (
        counted
        == np.bincount(
            fresh.node_depth[fresh.link_source], minlength=fresh.max_depth_reached + 1
        ).tolist()
    )
    streamed = io.BytesIO()
    ex.explain(clip, theta=0.3, depth=4).write_json(streamed, chunk=5)
    again = io.BytesIO()
    fresh.write_json(again, chunk=5)  # from the flat list, expanded above
    assert streamed.getvalue() == again.getvalue()


def test_segments_drawn_ahead_keep_their_order_and_raise_their_errors():
    """Segments are made on a thread while earlier ones are written: same rows, same
    order, an error made while drawing reaches the caller, and the thread is gone after."""
    import threading

    def segments(fail_at: int | None):
        for i in range(6):
            if i == fail_at:
                raise RuntimeError("segment broke")
            yield [jsonrows.numbers(np.arange(i * 10, i * 10 + i))]

    out = io.BytesIO()
    jsonrows.write_rows(out, [b"", b""], segments(None), chunk=2)
    assert json.loads(b"[" + out.getvalue() + b"]") == [
        v for i in range(6) for v in range(i * 10, i * 10 + i)
    ]
    with pytest.raises(RuntimeError, match="segment broke"):
        jsonrows.write_rows(io.BytesIO(), [b"", b""], segments(3), chunk=2)
    assert not [t for t in threading.enumerate() if t.name.startswith("cfp-json")]


@pytest.mark.parametrize("name", ["residual", "resnext", "mfnet", "shuffle", "inception"])
@pytest.mark.parametrize("top_n", [None, 3])
def test_links_counted_while_scoring_equal_the_expanded_list(exported, name, top_n):
    """A step's link count, taken while it was scored (kept pairs x carriers), is the
    number of links it expands to: grouped, depth-wise, shuffled and top-n steps included."""
    _, path = exported(name)
    clip = np.random.default_rng(4).standard_normal(nets.CLIP).astype(np.float32)
    ex = Explainer(path, clip_shape=clip.shape)
    run = ex.run(clip, depth=4)
    assert all(b.links is None for b in ex.pyramid(run, theta=0.5, depth=4, top_n=top_n).blocks)
    p = ex.pyramid(run, theta=0.5, depth=4, top_n=top_n, count_links=True)
    counted = [b.links for b in p.blocks]
    assert any(c is not None for c in counted)
    assert [c for c in counted if c is not None] == [
        len(b.expand()[0]) for b in p.blocks if b.links is not None
    ]
    by_depth = [links for _, _, _, links in p.summary()]
    assert p.n_links == len(p.link_source) > 0
    want = np.bincount(p.node_depth[p.link_source], minlength=p.max_depth_reached + 1)
    assert by_depth == want.tolist()


def test_pairs_scored_side_by_side_equal_those_scored_on_first_use(exported):
    """score_pairs() scores every step's kept pairs on the pool: the same pairs, element
    by element, and the same pyramid.json, as each step scored lazily on its own."""
    _, path = exported("residual")
    clip = np.random.default_rng(4).standard_normal(nets.CLIP).astype(np.float32)
    ex = Explainer(path, clip_shape=clip.shape)
    lazy, ahead = (ex.explain(clip, theta=0.3, depth=4) for _ in range(2))
    ahead.score_pairs()
    assert len(ahead.blocks) > 1 and all("_kept" in b.__dict__ for b in ahead.blocks)
    assert not any("_kept" in b.__dict__ for b in lazy.blocks)
    for a, b in zip(ahead.blocks, lazy.blocks):
        for x, y in zip(a._kept, (b.row, b.channel, b.score)):
            assert np.array_equal(x, y)
    assert ahead.to_json() == lazy.to_json()


@pytest.mark.parametrize(
    ("name", "kw"),
    [("residual", {"theta": 0.3}), ("x3d", {"theta": 0.0, "top_n": 3}), ("mfnet", {"theta": 0.5})],
)
def test_links_from_ordered_runs_equal_every_link_sorted_by_source_and_target(exported, name, kw):
    """The flat links are the steps' runs put side by side (no global sort); they equal
    every step's links expanded and sorted by (source, target) in one argsort."""
    _, path = exported(name)
    clip = np.random.default_rng(4).standard_normal(nets.CLIP).astype(np.float32)
    p = Explainer(path, clip_shape=clip.shape).explain(clip, depth=4, **kw)
    assert p._steps_in_order() and len(p.blocks) > 2
    parts = [b.expand() for b in p.blocks]
    s = p.node_of[np.concatenate([x[0] for x in parts])]
    t = p.node_of[np.concatenate([x[1] for x in parts])]
    r = np.concatenate([x[2] for x in parts])
    order = np.lexsort((t, s))
    assert len(order) > 50
    for got, want in zip((p.link_source, p.link_target, p.link_relevance), (s, t, r), strict=True):
        assert got.dtype == want.dtype and np.array_equal(got, want[order])
