"""ringinfer's wire format: one JSON header frame, then one raw frame per tensor. No pickle.

The header says what the message is (type, protocol version, request id, plan epoch, step,
positions) and what each tensor frame holds (dtype, shape); `decode` checks all of it against
the frames before anything else looks at them. The codec is pure: sockets live elsewhere.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the codec needs torch only to turn frames into tensors
    import torch

# 2: cluster names, capabilities, RTTs, PING/PONG. 3: SCORE, quantization. 4: QUEUED.
# 5: a FORWARD carries the positions of several requests (its `parts`), packed.
# 6: MANIFEST, FETCH and CHUNK: peers fetch a model's tensors from each other.
VERSION = 6
MAX_HEADER_BYTES = 64 * 1024
MAX_TENSORS = 4
MAX_DIMS = 4
DEFAULT_MAX_TENSOR_BYTES = 256 * 1024 * 1024
FRAME_SLACK = 64 * 1024  # over a frame's content: CURVE's box and ZeroMQ's framing
MAX_INT = (1 << 63) - 1  # any integer in a header: what int64 (torch, numpy) holds
MAX_POSITION = (1 << 31) - 1  # a position or a count of them: no context is longer
MAX_ERROR_TEXT = 200  # an error reply's message: one short line, never a trace
ITEM_SIZES = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "uint8": 1}
ACTIVATION_DTYPES = ("float32", "float16", "bfloat16")


class Kind(str, Enum):
    """Message types. Peers: membership, plans and the ring; clients: generate and status."""

    HELLO = "hello"  # peer -> peer, every heartbeat: who I am, what I know
    BYE = "bye"  # peer -> peers: leaving cleanly
    PING = "ping"  # peer -> peer: a timestamp to echo, for the link's round-trip time
    PONG = "pong"  # the echo, on the same connection
    PLAN = "plan"  # coordinator -> members: a plan and the phase it is in
    PLAN_ACK = "plan_ack"  # member -> coordinator: phase reached
    FORWARD = "forward"  # into a stage: token ids or hidden states of one or more requests
    RESULT = "result"  # last stage -> requester: sampling candidates
    END = "end"  # requester -> stages: free the request's caches
    ERROR = "error"  # anyone -> anyone: what went wrong, for which request
    GENERATE = "generate"  # client -> daemon
    ACCEPTED = "accepted"  # daemon -> client: request id and plan
    QUEUED = "queued"  # daemon -> client: waiting for cache room, at this place in the queue
    TOKEN = "token"  # daemon -> client: one token and its text
    DONE = "done"  # daemon -> client: the result object
    STATUS = "status"  # client -> daemon
    STATUS_REPLY = "status_reply"  # daemon -> client
    SCORE = "score"  # client -> daemon: a text's perplexity (then ACCEPTED, SCOREDs, DONE)
    SCORED = "scored"  # daemon -> client: one more window scored
    MANIFEST = "manifest"  # anyone -> daemon: its model's manifest and GGUF header, please
    MANIFEST_REPLY = "manifest_reply"  # the manifest (JSON) and header, as two byte frames
    FETCH = "fetch"  # peer -> peer's transfer socket: bytes of one tensor
    CHUNK = "chunk"  # the bytes, as one frame


# Body fields each type must carry, with their JSON types. Extra fields are allowed, so a
# newer peer may add some without a version bump; missing or mistyped ones are refused.
_INT = (int,)
_STR = (str,)
_DICT = (dict,)
_LIST = (list,)
_NUM = (int, float)
BODY_FIELDS: dict[Kind, dict[str, tuple[type, ...]]] = {
    Kind.HELLO: {
        "id": _STR,
        "name": _STR,
        "port": _INT,
        "model": _STR,
        "fingerprint": _STR,
        "memory": _INT,
        "state": _STR,
        "members": _LIST,
        "cluster": _STR,
        "caps": _DICT,
        "rtt": _DICT,
    },
    Kind.BYE: {"id": _STR},
    Kind.PING: {"id": _STR, "t": _NUM},
    Kind.PONG: {"id": _STR, "t": _NUM},
    Kind.PLAN: {"plan": _DICT, "phase": _STR},
    Kind.PLAN_ACK: {"id": _STR, "phase": _STR},
    Kind.FORWARD: {"parts": _LIST},
    Kind.RESULT: {},
    Kind.END: {},
    Kind.ERROR: {"code": _STR, "message": _STR},
    Kind.GENERATE: {"prompt": _STR, "max_tokens": _INT, "sampling": _DICT},
    Kind.ACCEPTED: {"plan": _LIST, "prompt_tokens": _INT},
    Kind.QUEUED: {"position": _INT, "queued": _INT},
    Kind.TOKEN: {"token": _INT, "text": _STR},
    Kind.DONE: {"result": _DICT},
    Kind.STATUS: {},
    Kind.STATUS_REPLY: {"status": _DICT},
    Kind.SCORE: {"text": _STR, "context": _INT},
    Kind.SCORED: {"window": _INT, "windows": _INT, "perplexity": _NUM},
    Kind.MANIFEST: {},
    Kind.MANIFEST_REPLY: {"fingerprint": _STR},
    Kind.FETCH: {"fingerprint": _STR, "tensor": _STR, "start": _INT, "size": _INT},
    Kind.CHUNK: {"tensor": _STR, "start": _INT},
}


MAX_PARTS = 1024  # requests in one FORWARD


class ProtocolError(Exception):
    """A message that must not be used; `code` is machine-readable, the text is for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class TensorSpec:
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return ITEM_SIZES[self.dtype] * math.prod(self.shape)

    @property
    def bound(self) -> int:
        """Its bytes were every zero size a one: a shape like [0, 2**62] holds nothing, yet
        torch overflows on it; bounding this bounds every size and their product."""
        return ITEM_SIZES[self.dtype] * math.prod(max(d, 1) for d in self.shape)


@dataclass
class Message:
    kind: Kind
    req: str = ""
    epoch: int = 0
    step: int = 0
    start: int = 0  # first position the tensors cover
    count: int = 0  # positions they cover
    body: dict[str, Any] = field(default_factory=dict)
    specs: list[TensorSpec] = field(default_factory=list)
    frames: list[bytes] = field(default_factory=list)

    def tensor(self, i: int = 0) -> torch.Tensor:
        import torch

        spec = self.specs[i]
        dtype = getattr(torch, spec.dtype)
        if not spec.nbytes:
            return torch.empty(spec.shape, dtype=dtype)
        data = bytearray(self.frames[i])  # writable and owned, as torch.frombuffer wants
        return torch.frombuffer(data, dtype=dtype).reshape(spec.shape)


def message(kind: Kind, tensors: tuple[torch.Tensor, ...] = (), **fields: Any) -> Message:
    """A message carrying `tensors` as raw frames (contiguous, little-endian as in memory).
    torch is imported only for tensors: `ringinfer status` and other clients' messages need
    none, and importing it costs them over a second."""
    msg = Message(kind, **fields)
    if tensors:
        import torch
    for t in tensors:
        t = t.detach().cpu().contiguous()
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype not in ITEM_SIZES:
            raise ValueError(f"dtype {dtype} does not go on the wire")
        msg.specs.append(TensorSpec(dtype, tuple(t.shape)))
        msg.frames.append(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return msg


def encode(msg: Message) -> list[bytes]:
    header = {
        "v": VERSION,
        "type": msg.kind.value,
        "req": msg.req,
        "epoch": msg.epoch,
        "step": msg.step,
        "pos": [msg.start, msg.count],
        "tensors": [{"dtype": s.dtype, "shape": list(s.shape)} for s in msg.specs],
        "body": msg.body,
    }
    return [json.dumps(header, separators=(",", ":")).encode(), *msg.frames]


def frame_bound(max_tensor_bytes: int = 0) -> int:
    """The largest frame a socket takes (ZMQ_MAXMSGSIZE, which ZeroMQ checks per frame) when
    the largest tensor it may legitimately receive has `max_tensor_bytes`: a header, or that
    tensor, with room for the encryption's overhead. ZeroMQ drops the connection above it
    before buffering the frame; below it `decode` answers errors."""
    return max(MAX_HEADER_BYTES, max_tensor_bytes) + FRAME_SLACK


def _int(value: Any, what: str, low: int = 0, high: int = MAX_INT) -> int:
    if type(value) is not int or not low <= value <= high:
        raise ProtocolError(
            "malformed", f"{what} must be an integer in [{low}, {high}], got {_short(value)}"
        )
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _finite(text: str) -> float:
    """JSON floats: finite only (json reads 1e400 as inf, which breaks every use)."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("a number out of range")
    return value


def _bounded(text: str) -> int:
    """JSON integers: within int64, whatever field they land in."""
    value = int(text)
    if not -MAX_INT - 1 <= value <= MAX_INT:
        raise ValueError("an integer out of range")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def read_json(data: bytes | str) -> Any:
    """JSON as peers must send it: finite floats, int64 integers, no NaN or Infinity;
    ValueError (or RecursionError for deep nesting) otherwise."""
    return json.loads(data, parse_float=_finite, parse_int=_bounded,
                      parse_constant=_no_constant)  # fmt: skip


def decode(frames: list[bytes], max_tensor_bytes: int = DEFAULT_MAX_TENSOR_BYTES) -> Message:
    """A validated message from ZeroMQ frames, or ProtocolError saying what is wrong."""
    if not frames or len(frames) > 1 + MAX_TENSORS:
        raise ProtocolError(
            "malformed", f"expected 1 to {1 + MAX_TENSORS} frames, got {len(frames)}"
        )
    if len(frames[0]) > MAX_HEADER_BYTES:
        raise ProtocolError(
            "too-large", f"header of {len(frames[0])} bytes (limit {MAX_HEADER_BYTES})"
        )
    try:
        header = read_json(frames[0])
    except (ValueError, RecursionError):  # not JSON, not UTF-8, a number out of range, nesting
        raise ProtocolError("malformed", "the header frame is not JSON we read") from None
    if not isinstance(header, dict):
        raise ProtocolError("malformed", "the header is not a JSON object")
    version = header.get("v")
    if version != VERSION:
        raise ProtocolError(
            "version", f"protocol version {version!r} received; this node speaks {VERSION}"
        )
    try:
        kind = Kind(header.get("type"))
    except ValueError:
        raise ProtocolError(
            "unknown-type", f"unknown message type {header.get('type')!r}"
        ) from None
    req = header.get("req", "")
    if not isinstance(req, str) or len(req) > 64:
        raise ProtocolError("malformed", "request id must be a string of at most 64 characters")
    pos = header.get("pos", [0, 0])
    if not isinstance(pos, list) or len(pos) != 2:
        raise ProtocolError("malformed", "pos must be [start, count]")
    body = header.get("body", {})
    if not isinstance(body, dict):
        raise ProtocolError("malformed", "body must be a JSON object")
    for name, types in BODY_FIELDS[kind].items():
        if type(body.get(name)) not in types:
            raise ProtocolError(
                "bad-body", f"{kind.value} needs '{name}' of type {types[0].__name__}"
            )
        if types is _INT and body[name] < 0:  # counts, sizes, offsets, ports, token ids
            raise ProtocolError("bad-body", f"{kind.value}'s '{name}' must be >= 0")
    specs = _specs(header.get("tensors", []), frames[1:], max_tensor_bytes)
    return Message(
        kind,
        req=req,
        epoch=_int(header.get("epoch", 0), "epoch"),
        step=_int(header.get("step", 0), "step"),
        start=_int(pos[0], "pos start", high=MAX_POSITION),
        count=_int(pos[1], "pos count", high=MAX_POSITION),
        body=body,
        specs=specs,
        frames=list(frames[1:]),
    )


def _specs(raw: Any, frames: list[bytes], max_bytes: int) -> list[TensorSpec]:
    if not isinstance(raw, list) or len(raw) != len(frames):
        raise ProtocolError(
            "bad-tensor", f"header describes {_len(raw)} tensors, {len(frames)} sent"
        )
    specs = []
    for i, (item, frame) in enumerate(zip(raw, frames, strict=True)):
        if not isinstance(item, dict) or item.get("dtype") not in ITEM_SIZES:
            raise ProtocolError(
                "bad-tensor", f"tensor {i}: dtype must be one of {list(ITEM_SIZES)}"
            )
        shape = item.get("shape")
        if not isinstance(shape, list) or not 1 <= len(shape) <= MAX_DIMS:
            raise ProtocolError("bad-tensor", f"tensor {i}: shape must list 1 to {MAX_DIMS} sizes")
        spec = TensorSpec(item["dtype"], tuple(_int(d, f"tensor {i} size") for d in shape))
        if spec.bound > max_bytes:  # before any allocation, whatever a zero size hides
            raise ProtocolError(
                "too-large", f"tensor {i}: shape {_short(list(spec.shape))} over {max_bytes} bytes"
            )
        if len(frame) != spec.nbytes:
            raise ProtocolError(
                "bad-tensor",
                f"tensor {i}: {spec.dtype}{list(spec.shape)} needs {spec.nbytes} bytes, "
                f"frame has {len(frame)}",
            )
        specs.append(spec)
    return specs


def _len(value: Any) -> int | str:
    return len(value) if isinstance(value, list) else "no"


@dataclass(frozen=True)
class Piece:
    """One request's positions in a FORWARD, whose tensor packs the rows of all its pieces in
    order (token ids [N] into the first stage, hidden states [N, dim] after it)."""

    req: str
    step: int
    start: int
    count: int
    end: int  # where the step's positions end: a long prompt may go on in chunks
    body: dict[str, Any]  # "requester", and on a request's first positions how to open it

    @property
    def requester(self) -> str:
        return self.body["requester"]

    @property
    def final(self) -> bool:
        """These positions end the step: the last stage answers them."""
        return self.start + self.count == self.end

    def to_json(self) -> dict[str, Any]:
        return {"req": self.req, "step": self.step, "start": self.start, "count": self.count,
                "end": self.end, **self.body}  # fmt: skip


def forwards(
    epoch: int, parts: list[dict[str, Any]], rows: torch.Tensor
) -> list[tuple[Message, slice]]:
    """FORWARDs carrying `parts` (as Piece.to_json gives them), whose rows `rows` packs in
    order: as few as keep every header within MAX_HEADER_BYTES (a scored window's targets
    travel in its part). Each with the slice of `parts` it carries."""
    groups: list[list[int]] = [[]]
    size = 0
    for i, part in enumerate(parts):
        n = len(json.dumps(part, separators=(",", ":"))) + 1
        if groups[-1] and size + n > MAX_HEADER_BYTES - 1024:  # room for the other fields
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += n
    out, at = [], 0
    for group in groups:
        count = sum(parts[i]["count"] for i in group)
        body = {"parts": [parts[i] for i in group]}
        out.append((message(Kind.FORWARD, (rows[at : at + count],), epoch=epoch, body=body),
                    slice(group[0], group[-1] + 1)))  # fmt: skip
        at += count
    return out


def pieces(msg: Message) -> list[Piece]:
    """A FORWARD's pieces, checked: well formed, and their rows add up to its one tensor's."""
    raw = msg.body["parts"]
    if not 0 < len(raw) <= MAX_PARTS:
        raise ProtocolError("malformed", f"a forward carries 1 to {MAX_PARTS} parts")
    out, seen = [], set()
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise ProtocolError("malformed", f"part {i} is not an object")
        req = item.get("req")
        if not isinstance(req, str) or not 0 < len(req) <= 64 or req in seen:
            raise ProtocolError("malformed", f"part {i}: a distinct request id of 1-64 characters")
        if not isinstance(item.get("requester"), str):
            raise ProtocolError("bad-body", f"part {i} needs 'requester' of type str")
        seen.add(req)
        start = _int(item.get("start"), f"part {i} start", high=MAX_POSITION)
        count = _int(item.get("count"), f"part {i} count", low=1, high=MAX_POSITION)
        body = {k: v for k, v in item.items() if k not in ("req", "step", "start", "count", "end")}
        end = _int(item.get("end"), f"part {i} end", start + count, MAX_POSITION)
        out.append(Piece(req, _int(item.get("step"), f"part {i} step"), start, count, end, body))
    rows = sum(p.count for p in out)
    if len(msg.specs) != 1 or not msg.specs[0].shape or msg.specs[0].shape[0] != rows:
        raise ProtocolError("bad-tensor", f"a forward's parts cover {rows} rows of one tensor")
    return out


def error(code: str, text: str, req: str = "", epoch: int = 0) -> Message:
    """An ERROR: its code and one short line (an exception's text may carry a C++ trace or
    a peer's whole payload; none of it goes back on the wire)."""
    line = text.strip().split("\n", 1)[0]
    if len(line) > MAX_ERROR_TEXT:
        line = line[: MAX_ERROR_TEXT - 3] + "..."
    return Message(Kind.ERROR, req=req, epoch=epoch, body={"code": code, "message": line})
