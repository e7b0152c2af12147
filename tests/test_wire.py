"""The wire codec: round trips, and every kind of bad frame refused with its code."""

from __future__ import annotations

import json

import pytest
import torch

from protocol.wire import VERSION, Kind, ProtocolError, decode, encode, message


def header(**fields: object) -> bytes:
    base = {"v": VERSION, "type": "forward", "req": "r1", "epoch": 2, "step": 0, "pos": [0, 3]}
    base["body"] = {"requester": "n1"}
    base["tensors"] = [{"dtype": "float16", "shape": [1, 3, 4]}]
    return json.dumps({**base, **fields}).encode()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64])
def test_tensors_round_trip_bit_exact(dtype):  # noqa: ANN001
    t = (torch.randn(1, 3, 5) * 100).to(dtype)
    msg = message(
        Kind.FORWARD, (t,), req="r", epoch=4, step=7, start=9, count=3, body={"requester": "n"}
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


def test_version_error_names_both_versions():
    with pytest.raises(ProtocolError, match=f"99.*speaks {VERSION}"):
        decode([header(v=99)])
