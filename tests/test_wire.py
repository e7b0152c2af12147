"""The wire codec: round trips, and every kind of bad frame refused with its code."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from node.cluster.log_budget import LogBudget
from protocol.wire import (
    FRAME_SLACK,
    MAX_ERROR_TEXT,
    MAX_HEADER_BYTES,
    VERSION,
    Kind,
    Piece,
    ProtocolError,
    decode,
    encode,
    error,
    forwards,
    frame_bound,
    message,
    pieces,
)


def part(**fields: object) -> dict:
    return {"req": "r1", "step": 0, "start": 0, "count": 3, "end": 3, "requester": "n1", **fields}


def header(**fields: object) -> bytes:
    base = {"v": VERSION, "type": "forward", "epoch": 2, "step": 0, "pos": [0, 3]}
    base["body"] = {"parts": [part()]}
    base["tensors"] = [{"dtype": "float16", "shape": [3, 4]}]
    return json.dumps({**base, **fields}).encode()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64])
def test_tensors_round_trip_bit_exact(dtype):  # noqa: ANN001
    t = (torch.randn(1, 3, 5) * 100).to(dtype)
    msg = message(
        Kind.FORWARD, (t,), req="r", epoch=4, step=7, start=9, count=3, body={"parts": []}
    )
    got = decode(encode(msg))
    assert (got.kind, got.req, got.epoch, got.step, got.start, got.count) == (
        Kind.FORWARD,
        "r",
        4,
        7,
        9,
        3,
    )
    assert got.tensor().dtype == dtype and torch.equal(got.tensor(), t)


@pytest.mark.parametrize(
    "frames, code",
    [
        ([], "malformed"),
        ([b"\xff\xfe garbage"], "malformed"),
        ([b"[1, 2]"], "malformed"),
        ([header(v=99), bytes(24)], "version"),
        ([header(type="launch_missiles"), bytes(24)], "unknown-type"),
        ([header(), bytes(23)], "bad-tensor"),  # truncated
        ([header()], "bad-tensor"),  # tensor frame missing
        ([header(tensors=[{"dtype": "float8", "shape": [1, 3, 4]}]), bytes(24)], "bad-tensor"),
        ([header(tensors=[{"dtype": "float16", "shape": [1, -3, 4]}]), bytes(24)], "malformed"),
        ([header(tensors=[{"dtype": "float16", "shape": [1 << 20, 1 << 20]}]), b""], "too-large"),
        ([header(body={}), bytes(24)], "bad-body"),
        ([header(epoch="2"), bytes(24)], "malformed"),
        ([header(pos=[0]), bytes(24)], "malformed"),
        ([b" " * 70000], "too-large"),
        ([header(), *[b""] * 9], "malformed"),
    ],
)
def test_bad_frames_are_refused_with_a_code(frames, code):  # noqa: ANN001
    with pytest.raises(ProtocolError) as e:
        decode(frames)
    assert e.value.code == code


def test_a_forward_packs_its_pieces_rows_in_order():
    parts = [part(), part(req="r2", step=4, start=7, count=1, end=8, sampling={})]
    msg = decode(encode(message(Kind.FORWARD, (torch.zeros(4, 2),), body={"parts": parts})))
    got = pieces(msg)
    assert got[1] == Piece("r2", 4, 7, 1, 8, {"requester": "n1", "sampling": {}})
    assert [p.final for p in got] == [True, True] and got[0].requester == "n1"
    assert not Piece("r", 0, 0, 2, 5, {"requester": "n"}).final  # a prompt's first chunk


def test_forwards_split_where_a_header_would_pass_the_limit():
    """Scored windows carry their targets: many in one pass take several FORWARDs, each
    header within the limit, the rows going with their parts in order."""
    parts = [part(req=f"w{i}", count=i + 1, end=i + 1, score=list(range(2000)))
             for i in range(12)]  # fmt: skip
    rows = torch.arange(sum(p["count"] for p in parts), dtype=torch.float32)[:, None]
    sent = forwards(3, parts, rows)
    assert len(sent) > 1
    got, order = [], []
    for msg, which in sent:
        frames = encode(msg)
        assert len(frames[0]) <= MAX_HEADER_BYTES
        back = decode(frames)
        got.append(back.tensor())
        order += [p.req for p in pieces(back)]
        assert [p.req for p in pieces(back)] == [p["req"] for p in parts[which]]
    assert order == [p["req"] for p in parts] and torch.equal(torch.cat(got), rows)
    assert len(forwards(3, parts[:2], rows[:3])) == 1  # what fits goes as one


@pytest.mark.parametrize(
    "parts, rows, code",
    [
        ([], 0, "malformed"),
        ([part()], 2, "bad-tensor"),  # rows do not add up
        ([part(), part()], 6, "malformed"),  # one request twice
        ([part(count=0, end=0)], 0, "malformed"),
        ([part(end=2)], 3, "malformed"),  # ends before its positions do
        ([part(req="x" * 65)], 3, "malformed"),
        ([part(requester=None)], 3, "bad-body"),
        (["r1"], 3, "malformed"),
        ([part(step=-1)], 3, "malformed"),
    ],
)
def test_bad_pieces_are_refused_with_a_code(parts, rows, code):  # noqa: ANN001
    msg = decode(encode(message(Kind.FORWARD, (torch.zeros(rows, 2),), body={"parts": parts})))
    with pytest.raises(ProtocolError) as e:
        pieces(msg)
    assert e.value.code == code


def test_version_error_names_both_versions():
    with pytest.raises(ProtocolError, match=f"99.*speaks {VERSION}"):
        decode([header(v=99)])


# ---------------------------------------------------------------- any frames at all

JSON_LEAVES = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
JSON = st.recursive(
    JSON_LEAVES,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
FIELDS = ("v", "type", "req", "epoch", "step", "pos", "tensors", "body")


@st.composite
def headers(draw: st.DrawFn) -> dict:
    """A real message's header with some fields replaced by any JSON, or dropped."""
    kind = draw(st.sampled_from(list(Kind)))
    base = json.loads(header(type=kind.value))
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=3)):
        if draw(st.booleans()):
            base.pop(name, None)
        else:
            base[name] = draw(JSON)
    return base


def decodes_or_refuses(frames: list[bytes]) -> None:
    try:
        msg = decode(frames)
    except ProtocolError:
        return
    assert isinstance(msg.kind, Kind) and len(msg.frames) == len(msg.specs)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=6))
def test_any_bytes_give_a_message_or_a_protocol_error(frames):  # noqa: ANN001
    decodes_or_refuses(frames)


@settings(max_examples=400, deadline=None)
@given(headers(), st.lists(st.binary(max_size=32), max_size=5))
def test_any_json_header_gives_a_message_or_a_protocol_error(head, tensors):  # noqa: ANN001
    decodes_or_refuses([json.dumps(head).encode(), *tensors])


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 200))
def test_mutated_real_frames_give_a_message_or_a_protocol_error(noise, at):  # noqa: ANN001
    frames = encode(message(Kind.FORWARD, (torch.zeros(3, 4),), body={"parts": [part()]}))
    head = frames[0][:at] + noise + frames[0][at:]
    decodes_or_refuses([head, frames[1]])


@pytest.mark.parametrize(
    "head",
    [b"[" * 40000, b'{"v":%d,"type":"status","epoch":%s}' % (VERSION, b"9" * 5000), b"\xff\xfe",
     b'{"v":%d,"type":"status","pos":[1e999,1]}' % VERSION],  # fmt: skip
)
def test_deep_nesting_and_huge_numbers_are_refused_as_malformed(head):  # noqa: ANN001
    with pytest.raises(ProtocolError) as e:
        decode([head])
    assert e.value.code == "malformed"


def test_a_log_budget_holds_back_a_flood_and_reports_it_once():
    budget = LogBudget(burst=3, window_s=10)
    taken = [budget.take(t * 0.1) for t in range(50)]  # 50 refusals in 5 s
    assert [ok for ok, _ in taken].count(True) == 3 and all(h == 0 for _, h in taken)
    assert budget.take(10.0) == (True, 47)  # the next window says what was held back
    assert budget.take(10.1) == (True, 0)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"v":%d,"type":"ping","body":{"id":"a","t":1e400}}' % VERSION,
        b'{"v":%d,"type":"ping","body":{"id":"a","t":Infinity}}' % VERSION,
        b'{"v":%d,"type":"ping","body":{"id":"a","t":-Infinity}}' % VERSION,
        b'{"v":%d,"type":"ping","body":{"id":"a","t":NaN}}' % VERSION,
        b'{"v":%d,"type":"ping","body":{"id":"a","t":1,"x":[%d]}}' % (VERSION, 2**64),
        b'{"v":%d,"type":"ping","epoch":1e999,"body":{"id":"a","t":1}}' % VERSION,
    ],
)
def test_numbers_out_of_range_anywhere_are_refused(raw):  # noqa: ANN001
    with pytest.raises(ProtocolError) as e:
        decode([raw])
    assert e.value.code == "malformed"


@pytest.mark.parametrize(
    "shape", [[0, 2**62], [2**40, 0], [0, 0, 0, 2**63 - 1], [2**31, 2**31, 2**31, 2**31]]
)
def test_shapes_that_hide_huge_sizes_behind_a_zero_are_refused(shape):  # noqa: ANN001
    head = json.dumps({"v": VERSION, "type": "end", "tensors": [
        {"dtype": "float32", "shape": shape}]}).encode()  # fmt: skip
    with pytest.raises(ProtocolError) as e:
        decode([head, b""])
    assert e.value.code == "too-large"


def test_positions_past_any_context_are_refused():
    with pytest.raises(ProtocolError):
        decode([header(pos=[2**40, 3])])
    msg = decode([header(body={"parts": [part(start=2**40, end=2**40 + 3)]}), bytes(24)])
    with pytest.raises(ProtocolError):
        pieces(msg)


def test_error_replies_are_one_short_line():
    trace = "RuntimeError: shape '[0, -1]' is invalid\nException raised from at::native::x\n" * 9
    body = decode(encode(error("internal", trace))).body
    assert body["code"] == "internal"
    assert "\n" not in body["message"] and len(body["message"]) <= MAX_ERROR_TEXT
    assert body["message"].startswith("RuntimeError: shape")


def test_frame_bound_is_the_largest_legitimate_frame_plus_slack():
    assert frame_bound() == MAX_HEADER_BYTES + FRAME_SLACK
    assert frame_bound(19 << 20) == (19 << 20) + FRAME_SLACK
