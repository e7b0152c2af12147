"""`ringinfer` command line: every failure the user can fix is one line on stderr, exit 2."""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import stat
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from node import __version__
from node.cluster.client import DEFAULT_API, DEFAULT_PORT, Client, parse_address
from node.cluster.cluster_file import BINARY, parse_amount, read_cluster
from node.cluster.secret import (
    ENV,
    FILE_NAME,
    ClusterKeys,
    find_keys,
    new_secret,
    own_pair,
    read_keys,
    readable_by_others,
    secret_path,
    write_private,
)
from node.data_dir import CACHE_SIZE
from node.engine.batching import PREFILL_CHUNK
from node.engine.reasoning import (
    FORMATS,
    PLAIN,
    REASONING,
    ReplySplitter,
    reply_format,
    split_reply,
)
from node.errors import RinginferError
from protocol.wire import Kind

if TYPE_CHECKING:  # the CLI imports torch only once a command needs it
    from node.cluster.cluster_model import Found
    from node.engine.weights import Progress

EXIT_USAGE = 2
QUANTIZE = ["auto", "none", "int8", "int4"]  # --quantize (node/engine/models/quantized.py)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise RinginferError(message)


def _split_points(text: str) -> list[int]:
    try:
        return [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        message = f"expected layer indices like 10,20, got '{text}'"
        raise argparse.ArgumentTypeError(message) from None


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected 0 or a positive integer, got '{text}'")
    return int(text)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'")
    return value


def _size(text: str) -> int:
    """Bytes from 512M, 2G, 1.5T or a plain number."""
    try:
        return int(parse_amount(text, BINARY, "size"))
    except RinginferError:
        raise argparse.ArgumentTypeError(f"expected a size like 512M or 4G, got '{text}'") from None


def _layers(text: str) -> tuple[int, int]:
    start, _, end = text.partition(":")
    if not (start.isdigit() and end.isdigit() and int(start) < int(end)):
        raise argparse.ArgumentTypeError(f"expected START:END with START < END, got '{text}'")
    return int(start), int(end)


def _sampling_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=_positive, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=0, help="0 = no limit")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--chat", action="store_true", help="apply the model's chat template")
    parser.add_argument(
        "--ignore-eos", action="store_true", help="generate all --max-tokens (benchmarks)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object at the end")


def _engine_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        help="HF directory, .gguf file, packaged model (gemma-3-270m) or hub id (default: SmolLM2)",
    )
    parser.add_argument("--device", help="auto (default), cpu, cuda, cuda:N or mps")
    parser.add_argument("--dtype", help="auto (default), float32, bfloat16 or float16")
    parser.add_argument("--threads", type=_positive, help="CPU threads for torch")
    parser.add_argument(
        "--quantize", choices=QUANTIZE,
        help="weights in memory: auto (default; a GGUF's 4-bit stays int4, 5-8-bit int8, "
             "floats as --dtype), none (all float), int8, int4",
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ringinfer", description="Run one LLM across machines on a LAN.")
    parser.add_argument("--version", action="version", version=f"ringinfer {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    node_help = f"daemon to talk to (default 127.0.0.1:{DEFAULT_PORT})"
    secret_help = (f"the cluster secret (default: ${ENV}, else {FILE_NAME} in "
                   "~/.ringinfer)")  # fmt: skip

    gen = commands.add_parser("generate", help="generate a continuation of PROMPT")
    gen.add_argument("prompt")
    gen.add_argument("--node", default=f"127.0.0.1:{DEFAULT_PORT}", help=node_help)
    gen.add_argument("--secret-file", type=Path, help=secret_help)
    gen.add_argument("--local", action="store_true", help="run in this process, no daemon")
    gen.add_argument("--split", type=_split_points, help="with --local: stage cuts, e.g. 10,20")
    gen.add_argument("--prefill-chunk", type=_count, metavar="N",
                     help="with --local: a prompt longer than N goes in chunks of N, as a "
                          "daemon's stage takes it (default 256)")  # fmt: skip
    _sampling_flags(gen)
    gen.add_argument("--no-think", action="store_true",
                     help="with --chat: ask the template for a reply without thinking "
                          "(Qwen3's enable_thinking=false)")  # fmt: skip
    gen.add_argument("--show-thinking", action="store_true",
                     help="with --chat: print the model's thought too, on stderr (stdout "
                          "has only the answer)")  # fmt: skip
    _engine_flags(gen)
    gen.add_argument("--wait", type=float, default=600, help="seconds to wait for a live plan")
    gen.add_argument("--timeout", type=float, default=300, help="seconds to wait for a token")

    ppl = commands.add_parser("perplexity", help="perplexity of a text file (llama.cpp's method)")
    ppl.add_argument("file", type=Path)
    ppl.add_argument("--node", default=f"127.0.0.1:{DEFAULT_PORT}", help=node_help)
    ppl.add_argument("--secret-file", type=Path, help=secret_help)
    ppl.add_argument("--local", action="store_true", help="run in this process, no daemon")
    ppl.add_argument("--context", type=_positive, default=512, help="tokens per window")
    ppl.add_argument("--json", action="store_true", help="print one JSON object at the end")
    _engine_flags(ppl)
    ppl.add_argument("--wait", type=float, default=600, help="seconds to wait for a live plan")
    ppl.add_argument("--timeout", type=float, default=300, help="seconds to wait for a window")

    daemon = commands.add_parser("daemon", help="serve a slice of the model to the cluster")
    daemon.add_argument("--host", help="address to listen on (default: every address with a "
                        "cluster secret, else 127.0.0.1)")
    daemon.add_argument("--secret-file", type=Path, help=f"the cluster secret (default: ${ENV}, "
                        f"else {FILE_NAME} in the data dir)")
    daemon.add_argument("--insecure", action="store_true",
                        help="listen beyond loopback without a cluster secret (anyone may join)")
    daemon.add_argument("--port", type=_positive, default=DEFAULT_PORT)
    daemon.add_argument("--name", default=socket.gethostname(), help="shown in status")
    daemon.add_argument("--peer", action="append", default=[], help="HOST:PORT of a member")
    _engine_flags(daemon)
    daemon.add_argument("--data-dir", type=Path, help="node id and state (default ~/.ringinfer)")
    daemon.add_argument("--layers", type=_layers, help="pin this node's layers, START:END")
    daemon.add_argument(
        "--wire-dtype", default="auto", help="activations between stages: auto, float32, "
        "float16, bfloat16 (auto: float16, or bfloat16 when computing in bfloat16)",
    )  # fmt: skip
    daemon.add_argument("--max-memory", type=_size, help="memory to offer for weights, e.g. 4G")
    daemon.add_argument("--request-timeout", type=float, default=120.0, help="seconds")
    daemon.add_argument("--step-timeout", type=float, default=30.0,
                        help="seconds after which an unanswered decode step is presumed lost "
                             "on a link and the request replayed")  # fmt: skip
    daemon.add_argument("--max-queue", type=_count, default=32, metavar="N",
                        help="requests that wait for the stages' cache room (beyond: busy)")
    daemon.add_argument("--prefill-chunk", type=_count, default=PREFILL_CHUNK, metavar="N",
                        help="prompt positions this node's stage computes per pass: a long "
                             "prompt goes in chunks of N, next to the running decodes")  # fmt: skip
    daemon.add_argument("--cluster", default="default", help="join only nodes of this cluster")
    daemon.add_argument("--no-mdns", action="store_true", help="no mDNS: find peers by --peer")
    daemon.add_argument("--mdns-interface", action="append", metavar="NAME|ADDRESS",
                        help="advertise on this interface only (repeatable; default: LAN "
                             "interfaces, not loopback, docker or VM bridges)")  # fmt: skip
    daemon.add_argument("--objective", choices=["latency", "throughput"], default="latency",
                        help="plan for one request's speed, or for many concurrent requests "
                             "(used when this node coordinates)")  # fmt: skip
    daemon.add_argument(
        "--remeasure",
        action="store_true",
        help="measure compute again instead of using the data dir's cache",
    )
    daemon.add_argument(
        "--leave-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM, seconds to wait for a plan without this node",
    )
    daemon.add_argument("--plan-deadline", type=float, default=30.0, metavar="S",
                        help="the longest a new plan waits for running requests: longer ones "
                             "are replayed into it")  # fmt: skip
    daemon.add_argument("--transfer-port", type=_positive, default=0, metavar="PORT",
                        help="where peers fetch this node's tensors (default: any free port; "
                             "members learn it from each other)")  # fmt: skip
    daemon.add_argument("--transfer-rate", type=_size, default=32 << 20, metavar="BYTES",
                        help="bytes/s this node serves to fetching peers while its stage has "
                             "requests running (default 32M)")  # fmt: skip
    daemon.add_argument("--cache-size", type=_size, default=CACHE_SIZE, metavar="SIZE",
                        help="the shard cache's limit: tensors fetched from peers, least "
                             "recently used dropped first (default 32G)")  # fmt: skip
    daemon.add_argument("--api", default=DEFAULT_API, metavar="HOST:PORT|off",
                        help=f"OpenAI-compatible API and web page (default {DEFAULT_API})")
    daemon.add_argument("--api-key-file", type=Path, metavar="FILE",
                        help="a secret the API asks for as 'Authorization: Bearer'")
    daemon.add_argument("--api-insecure", action="store_true",
                        help="serve the API beyond loopback without a key")  # fmt: skip
    daemon.add_argument("--api-host", action="append", default=[], metavar="NAME",
                        help="a name clients reach the API by, besides loopback, IP "
                             "addresses and --api's host (any other Host is refused); "
                             "repeatable")  # fmt: skip
    daemon.add_argument("--api-tls-cert", type=Path, metavar="FILE",
                        help="serve the API over HTTPS with this certificate (PEM)")  # fmt: skip
    daemon.add_argument("--api-tls-key", type=Path, metavar="FILE",
                        help="the private key of --api-tls-cert (PEM)")  # fmt: skip

    cache = commands.add_parser("cache", help="list or clear the shard cache (fetched tensors)")
    cache.add_argument("--data-dir", type=Path, help="the daemon's data dir (default ~/.ringinfer)")
    cache.add_argument("--clear", nargs="?", const="all", metavar="FINGERPRINT",
                       help="remove one model's cached tensors, or all of them")
    cache.add_argument("--json", action="store_true", help="print JSON")

    plan = commands.add_parser("plan", help="plan a described cluster (no daemons needed)")
    plan.add_argument("--model", help="path, Hugging Face id (cached) or a well-known name")
    plan.add_argument("--cluster-file", type=Path, required=True, help="nodes.json")
    plan.add_argument("--objective", choices=["latency", "throughput"], default="latency")
    plan.add_argument("--dtype", default="bfloat16", help="compute dtype (default bfloat16)")
    plan.add_argument(
        "--quantize", choices=QUANTIZE, default="auto",
        help="weights held as: auto (a checkpoint's own formats, else --dtype), none, int8, int4",
    )  # fmt: skip
    plan.add_argument(
        "--context",
        type=_positive,
        default=4096,
        help="KV cache positions every layer must have room for",
    )
    plan.add_argument("--json", action="store_true")

    doctor = commands.add_parser("doctor", help="check this machine and network for problems")
    doctor.add_argument("--node", default=f"127.0.0.1:{DEFAULT_PORT}", help=node_help)
    doctor.add_argument("--secret-file", type=Path, help=secret_help)
    doctor.add_argument("--cluster", help="the cluster to expect (default: the daemon's)")
    doctor.add_argument("--listen", type=float, default=4.0, help="seconds to browse mDNS")
    doctor.add_argument("--mdns-interface", action="append", metavar="NAME|ADDRESS")
    doctor.add_argument("--json", action="store_true")

    status = commands.add_parser("status", help="the cluster as one daemon sees it")
    status.add_argument("--node", default=f"127.0.0.1:{DEFAULT_PORT}", help=node_help)
    status.add_argument("--secret-file", type=Path, help=secret_help)
    status.add_argument("--json", action="store_true")
    status.add_argument("--wait", type=float, default=0, help="seconds to wait for a live plan")

    secret = commands.add_parser("secret", help="make a new cluster secret (or a client key)")
    secret.add_argument("file", type=Path, nargs="?",
                        help="write it here, readable by you alone (default: print it)")
    secret.add_argument("--out", type=Path, help="the same as FILE")
    secret.add_argument("--client", action="store_true",
                        help="a client-only key of the cluster of --secret-file: it generates, "
                             "scores and reads status, and is never a member")
    secret.add_argument("--secret-file", type=Path, help=secret_help)
    return parser


class Status:
    """Progress on stderr: live lines on a terminal, only outcomes otherwise (logs, pipes)."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()

    def live(self, text: str) -> None:
        if self.tty:
            print(f"\r\x1b[K{text}", end="", file=sys.stderr, flush=True)

    def line(self, text: str) -> None:
        print(f"\r\x1b[K{text}" if self.tty else text, file=sys.stderr, flush=True)

    def loading(self, model: str) -> Callable[[int, int], Progress]:
        """A per-stage callback factory for `LocalPipeline`: tensors loaded so far."""

        def for_stage(start: int, end: int) -> Progress:
            began = time.perf_counter()
            label = f"{model} layers {start}-{end}"

            def update(done: int, total: int) -> None:
                self.live(f"loading {label}: {done}/{total} tensors")
                if done == total:
                    took = time.perf_counter() - began
                    self.line(f"loaded {label} ({total} tensors) in {took:.1f}s")

            return update

        return for_stage


STATUS = Status()


def _engine(args: argparse.Namespace) -> tuple[Any, Any]:
    """(device, dtype) from the engine flags, with torch threads set."""
    import torch

    from node.engine.local import pick_device, pick_dtype

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device or "auto")
    return device, pick_dtype(args.dtype or "auto", device)


def _print_result(args: argparse.Namespace, result: dict) -> None:
    if args.json:
        print(json.dumps(result))
    else:
        sys.stdout.write("\n")


class _Reply:
    """What `generate` shows of a reply: with --chat its answer on stdout as it comes and,
    with --show-thinking, its thought on stderr; or with --json one object at the end."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.format, self.thought_shown = args, PLAIN, False
        self.splitter = ReplySplitter(PLAIN)

    def accepted(self, fmt: str) -> None:
        """The reply's format, once the prompt is rendered (plain unless --chat)."""
        self.format = fmt if self.args.chat and fmt in FORMATS else PLAIN
        self.splitter = ReplySplitter(self.format)

    def text(self, piece: str) -> None:
        if not self.args.json:
            self._show(self.splitter.push(piece))

    def done(self, result: dict) -> None:
        if not self.args.json:
            self._show(self.splitter.flush())
        if self.args.chat:
            thought, answer = split_reply(self.format, result["text"])
            result.update(content=answer, reasoning_content=thought or None)
        _print_result(self.args, result)

    def _show(self, parts: list[tuple[str, str]]) -> None:
        for kind, text in parts:
            if kind == REASONING:
                if self.args.show_thinking:
                    sys.stderr.write(text)
                    self.thought_shown = True
                continue
            if self.thought_shown:  # the thought's last line ends before the answer starts
                sys.stderr.write("\n")
                self.thought_shown = False
            sys.stdout.write(text)
            sys.stdout.flush()


def cmd_generate(args: argparse.Namespace) -> int:
    for flag in ("no_think", "show_thinking"):  # both are about a chat's reply
        if getattr(args, flag) and not args.chat:
            raise RinginferError(f"--{flag.replace('_', '-')} needs --chat")
    return generate_local(args) if args.local else generate_remote(args)


def _template_variables(args: argparse.Namespace) -> dict[str, Any] | None:
    return {"enable_thinking": False} if args.no_think else None


def generate_local(args: argparse.Namespace) -> int:
    from node.engine.local import LocalPipeline, Timings, fit_request, generate, generation_result
    from node.engine.sampling import SamplingParams
    from node.engine.tokenizer import TextStream
    from node.engine.weights import open_checkpoint

    params = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    device, dtype = _engine(args)
    STATUS.live(f"opening {args.model or 'the default model'} ...")
    ckpt = open_checkpoint(args.model)
    tokenizer = ckpt.tokenizer()
    prompt = tokenizer.encode_prompt(args.prompt, args.chat, _template_variables(args))
    capacity, max_tokens = fit_request(len(prompt), args.max_tokens, ckpt.config.max_seq_len)
    splits = args.split or []
    quantize = args.quantize or "auto"
    pipeline = LocalPipeline(ckpt, splits, device, dtype, STATUS.loading(ckpt.name), quantize)

    timings = Timings()
    stream, reply = TextStream(tokenizer), _Reply(args)
    reply.accepted(reply_format(tokenizer, prompt))
    tokens: list[int] = []
    pieces: list[str] = []
    step = pipeline.session(capacity, params, args.prefill_chunk or PREFILL_CHUNK)
    stop_ids = frozenset() if args.ignore_eos else tokenizer.stop_ids
    for token in generate(step, prompt, max_tokens, params, stop_ids, timings):
        tokens.append(token)
        if token in stop_ids:
            break
        piece = stream.push(token)
        pieces.append(piece)
        reply.text(piece)
    finish_reason = "stop" if tokens and tokens[-1] in stop_ids else "length"
    result = generation_result(
        "".join(pieces), tokens, len(prompt), ckpt.name, finish_reason, timings
    )
    result["quantization"] = pipeline.quantization
    reply.done(result)
    return 0


LOCAL_ONLY = ("model", "split", "device", "dtype", "threads", "quantize", "prefill_chunk")


def generate_remote(args: argparse.Namespace) -> int:
    """Through a daemon: it tokenizes, drives the ring and streams tokens back."""
    _refuse_local_flags(args, LOCAL_ONLY)
    from node.engine.sampling import SamplingParams

    params = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)  # errors here
    with _client(args) as client:
        _wait_for_plan(client, args.wait)
        replies = client.generate(
            args.timeout, prompt=args.prompt, max_tokens=args.max_tokens, sampling=params.to_json(),
            chat=args.chat, ignore_eos=args.ignore_eos,
            chat_template_kwargs=_template_variables(args),
        )  # fmt: skip
        place, reply = 0, _Reply(args)
        for msg in replies:
            if msg.kind == Kind.ACCEPTED:
                reply.accepted(msg.body.get("reply_format", PLAIN))
            elif msg.kind == Kind.QUEUED and msg.body["position"] != place:
                place = msg.body["position"]
                print(f"queued: {place} of {msg.body['queued']} waiting for the ring's cache "
                      "room", file=sys.stderr)  # fmt: skip
            elif msg.kind == Kind.TOKEN:
                reply.text(msg.body["text"])
            elif msg.kind == Kind.DONE:
                reply.done(msg.body["result"])
    return 0


def cmd_perplexity(args: argparse.Namespace) -> int:
    try:
        text = args.file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RinginferError(f"cannot read {args.file}: {e}") from None
    if args.local:
        result = _perplexity_local(args, text)
    else:
        _refuse_local_flags(args, LOCAL_ONLY)
        with _client(args) as client:
            _wait_for_plan(client, args.wait)
            replies = client.request(Kind.SCORE, args.timeout, "the next window",
                                     text=text, context=args.context)  # fmt: skip
            for msg in replies:
                if msg.kind == Kind.SCORED:
                    b = msg.body
                    STATUS.live(f"perplexity: window {b['window']}/{b['windows']}, "
                                f"running {b['perplexity']:.4f}")  # fmt: skip
                elif msg.kind == Kind.DONE:
                    result = msg.body["result"]
    STATUS.live("")
    if args.json:
        print(json.dumps(result))
    else:
        print(f"perplexity {result['perplexity']:.4f} over {result['tokens']} tokens "
              f"({result['windows']} windows of {result['context']}, {result['model']}, "
              f"{result['quantization']}, {result['seconds']:.1f}s)")  # fmt: skip
    return 0


def _perplexity_local(args: argparse.Namespace, text: str) -> dict:
    import torch

    from node.engine.local import LocalPipeline
    from node.engine.perplexity import result, run_local, windows
    from node.engine.weights import open_checkpoint

    device, dtype = _engine(args)
    ckpt = open_checkpoint(args.model)
    tokenizer = ckpt.tokenizer()
    context = min(args.context, ckpt.config.max_seq_len)
    wins = windows(tokenizer.encode(text), context, tokenizer.bos_id)
    pipeline = LocalPipeline(ckpt, (), device, dtype, STATUS.loading(ckpt.name),
                             args.quantize or "auto")  # fmt: skip

    def forward(ids: list[int]) -> torch.Tensor:
        positions = torch.arange(len(ids))
        return pipeline.forward(torch.tensor([ids]), positions, pipeline.new_caches(len(ids)))[0]

    began = time.perf_counter()
    for i, tally in enumerate(run_local(forward, wins), 1):
        STATUS.live(f"perplexity: window {i}/{len(wins)}, running {tally.perplexity:.4f}")
    took = time.perf_counter() - began
    return result(tally, took, ckpt.name, pipeline.quantization, context)


def _refuse_local_flags(args: argparse.Namespace, flags: Sequence[str]) -> None:
    given = [f"--{f.replace('_', '-')}" for f in flags if getattr(args, f, None) is not None]
    if given:
        raise RinginferError(
            f"{', '.join(given)} apply to --local; daemons run the model and devices they were "
            "started with (see `ringinfer daemon --help`)"
        )


def _client(args: argparse.Namespace) -> Client:
    """A client of --node, with the cluster secret's keys where there is one."""
    return Client(parse_address(args.node), _client_keys(args))


def _client_keys(args: argparse.Namespace) -> ClusterKeys | None:
    """A client's cluster keys: --secret-file, $RINGINFER_SECRET_FILE or ~/.ringinfer's."""
    from node import data_dir

    return find_keys(args.secret_file, data_dir.DEFAULT)


def cmd_secret(args: argparse.Namespace) -> int:
    """A new cluster secret, or with --client the client key of an existing one: printed
    (onto a file, made 0600 when stdout is one: `> cluster.key`) or written 0600."""
    out = args.out or args.file
    if args.client:
        keys = _client_keys(args)
        if keys is None or not keys.holds_secret:
            raise RinginferError("--client needs the cluster secret: pass --secret-file")
        text, what = keys.client_file(), "client key"
    else:
        text, what = new_secret() + "\n", "cluster secret"
    if out is None:
        if stat.S_ISREG(os.fstat(sys.stdout.fileno()).st_mode):
            os.fchmod(sys.stdout.fileno(), 0o600)  # a shell's `> file` made it 0644
        sys.stdout.write(text)
        return 0
    write_private(out, text)
    STATUS.line(f"wrote a new {what} to {out}: " + (
        "give it to the machines that only run clients (--secret-file)" if args.client else
        "copy it to every machine of the cluster and start each daemon with --secret-file"
    ))  # fmt: skip
    return 0


def _daemon_keys(flag: Path | None, data_path: Path) -> ClusterKeys | None:
    """A daemon's keys: the cluster secret's, with its own pair from its data dir. A client
    key is refused; a key file others may read is a warning."""
    path = secret_path(flag, data_path)
    if path is None:
        return None
    keys = read_keys(path)
    if not keys.holds_secret:
        raise RinginferError(f"{path} is a client key: a daemon needs the cluster secret itself")
    own = own_pair(data_path)
    for f in (path, data_path / "node.key"):
        if readable_by_others(f):
            logging.warning("%s is readable by other users: chmod 600 %s", f, f)
    return keys.member(*own)


def _wait_for_plan(client: Client, wait_s: float) -> dict:
    """The daemon's status once its plan is live, showing who is loading meanwhile.

    A daemon that never answers is given up on after 20 s (one that is starting answers once
    its model is open); one that answers is waited on for `wait_s`.
    """
    began = time.monotonic()
    deadline, answered = began + wait_s, False
    while True:
        give_up = deadline if answered else min(deadline, began + 20)
        try:
            status = client.status(timeout_s=min(5.0, max(0.5, give_up - time.monotonic())))
        except RinginferError:
            if time.monotonic() >= give_up:
                raise RinginferError(
                    f"no answer from the daemon at {client.address} for "
                    f"{time.monotonic() - began:.0f}s (is `ringinfer daemon` running there?)"
                ) from None
            STATUS.live(f"waiting for the daemon at {client.address} to answer")
            continue
        answered = True
        if status["live"]:
            STATUS.live("")
            return status
        states = ", ".join(f"{n['name']} {n['state']}" for n in status["nodes"])
        if time.monotonic() >= deadline:
            why = status["plan_error"] or f"nodes: {states}"
            raise RinginferError(f"the cluster has no live plan after {wait_s:.0f}s ({why})")
        STATUS.live(f"waiting for the cluster's plan: {states}")
        time.sleep(0.3)


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        status = _wait_for_plan(client, args.wait) if args.wait else client.status()
    if args.json:
        print(json.dumps(status))
        return 0
    plan = f"plan epoch {status['epoch']}" if status["live"] else "no live plan"
    predicted = status.get("predicted")
    if predicted:
        plan += (f" ({status['objective']}: predicted {predicted['tpot_ms']:.1f} ms/token, "
                 f"{predicted['pipelined_tokens_per_s']:.1f} tokens/s pipelined)")  # fmt: skip
    about = f" ({status['model_summary']})" if status.get("model_summary") else ""
    print(f"model {status['model']}{about} · cluster {status['cluster']} · {plan} · "
          f"{status['stats']['requests_in_flight']} request(s) in flight here")  # fmt: skip
    rows = [("NAME", "ADDRESS", "DEVICE", "MEMORY", "COMPUTE", "LAYERS", "WEIGHTS", "STATE",
             "RTT", "REQS", "BATCH", "WAITING", "TOK/S")]  # fmt: skip
    for n in status["nodes"]:
        layers = f"{n['layers'][0]}-{n['layers'][1]}" if n["layers"] else "-"
        here = " *" if n["id"] == status["node"] else ""
        memory = f"{n['memory'] / 2**30:.1f}/{n['memory_total'] / 2**30:.1f}G"
        compute = f"{n['flops'] / 1e9:.0f} GFLOP/s {n['bandwidth'] / 1e9:.0f} GB/s"
        rtt = f"{n['rtt_ms']:.2f} ms" if n["rtt_ms"] is not None else "-"
        weights = n.get("quantization") or "-"
        rows.append((n["name"] + here, n["address"], n["device"], memory, compute, layers,
                     weights, n["state"], rtt, str(n["requests"]), f"{n['batch']:.1f}",
                     f"{n['waiting']:.0f}+{n['queued']:.0f}q", f"{n['tokens_per_s']:.1f}"))
    _print_table(rows)
    for p in status["problems"]:
        print(f"! {p['problem']}: {p['fix']}")
    return 0


def _print_table(rows: list[tuple[str, ...]]) -> None:
    """Rows of cells in left-aligned columns, the first row the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def cmd_plan(args: argparse.Namespace) -> int:
    """The planner on a described cluster: what a cluster would run, before buying it."""
    import torch

    from node.cluster.planner import make_plan, predict, stage_bytes
    from node.engine.shapes import find_shape

    dtype = getattr(torch, args.dtype, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise RinginferError(f"unknown dtype '{args.dtype}' (float32, bfloat16, float16)")
    cluster = read_cluster(args.cluster_file)
    name, shape, source, fmt = find_shape(args.model, dtype, args.quantize)
    held = args.dtype if fmt == "none" else fmt
    try:
        plan = make_plan(
            name, 0, shape, cluster.nodes, args.objective, cluster.links, args.context
        )
    except RinginferError as e:
        hint = "" if fmt == "int4" else "; --quantize int4 holds weights in about 0.6 bytes each"
        raise RinginferError(f"{e} (weights as {held}{hint})") from None
    by_id = {n.id: n for n in cluster.nodes}
    p = predict(plan.stages, shape, by_id, cluster.links)
    stages = []
    for s, stage_s in zip(plan.stages, p.stage_s, strict=True):
        used = stage_bytes(s, shape) + shape.cache_bytes(s.end - s.start, args.context)
        stages.append({"node": s.node, "name": cluster.names[s.node], "start": s.start,
                       "end": s.end, "memory_used": used, "memory": by_id[s.node].memory,
                       "stage_ms": round(stage_s * 1e3, 3)})  # fmt: skip
    left_out = [cluster.names[n.id] for n in cluster.nodes if not plan.stage_of(n.id)]
    result = {
        "model": name, "source": source, "dtype": args.dtype, "objective": args.objective,
        "weights": held, "weight_bytes_per_param": round(shape.dtype_bytes, 4),
        "context": args.context, "n_layers": shape.n_layers, "layer_bytes": shape.layer_bytes,
        "layer_read_bytes": shape.read(0, shape.n_layers) // shape.n_layers,
        "weight_bytes": shape.held(0, shape.n_layers) + shape.embed_bytes + shape.head_bytes,
        "architecture": shape.architecture, "params": shape.params,
        "active_params": shape.active_params, "experts": shape.experts,
        "experts_used": shape.experts_used, "stages": stages, "left_out": left_out,
        "predicted": p.to_json(),
    }  # fmt: skip
    if args.json:
        print(json.dumps(result))
        return 0
    gib = 2**30
    print(f"{name} ({source}), weights {held}: {shape.n_layers} layers of "
          f"{shape.layer_bytes / gib:.2f} GiB, embedding {shape.embed_bytes / gib:.2f} GiB, "
          f"head {shape.head_bytes / gib:.2f} GiB, KV budget {args.context} positions")  # fmt: skip
    reads = ""
    if shape.experts:
        reads = (f": {result['weight_bytes'] / gib:.1f} GiB held, a token reads "
                 f"{result['layer_read_bytes'] / gib:.2f} GiB of each layer")  # fmt: skip
    print(f"{shape.summary()}{reads}")
    pred = result["predicted"]
    print(f"objective {args.objective}: predicted {pred['tpot_ms']:.1f} ms/token "
          f"({pred['tokens_per_s']:.2f} tokens/s for one request, "
          f"{pred['pipelined_tokens_per_s']:.2f} with requests pipelined)")  # fmt: skip
    rows = [("NODE", "LAYERS", "COUNT", "MEMORY USED", "STAGE MS")]
    for st in stages:
        rows.append((st["name"], f"{st['start']}-{st['end']}", str(st["end"] - st["start"]),
                     f"{st['memory_used'] / gib:.1f} of {st['memory'] / gib:.1f} GiB",
                     f"{st['stage_ms']:.1f}"))  # fmt: skip
    _print_table(rows)
    if left_out:
        print(f"left out: {', '.join(left_out)} (including them would not make tokens faster)")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from node.cluster.doctor import diagnose, render

    checks = diagnose(parse_address(args.node), args.cluster, args.listen, args.mdns_interface,
                      _client_keys(args))  # fmt: skip
    if args.json:
        print(json.dumps([c.to_json() for c in checks]))
    else:
        print(render(checks))
    return 1 if any(c.level == "fail" for c in checks) else 0


def cmd_cache(args: argparse.Namespace) -> int:
    from node import data_dir
    from node.engine.shard_cache import ShardCache

    cache = ShardCache((args.data_dir or data_dir.DEFAULT) / "cache")
    if args.clear:
        freed = cache.clear(None if args.clear == "all" else args.clear)
        print(f"removed {freed / 2**20:.1f} MiB from {cache.root}")
        return 0
    models = cache.models()
    if args.json:
        print(json.dumps(models))
        return 0
    if not models:
        print(f"the shard cache {cache.root} is empty")
        return 0
    rows = [("FINGERPRINT", "MODEL", "GROUPS", "SIZE", "LAST USED")]
    for m in models:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(m["used"]))
        rows.append((m["fingerprint"], m["name"], f"{m['groups']} of {m['of']}",
                     f"{m['bytes'] / 2**20:.1f} MiB", used))  # fmt: skip
    _print_table(rows)
    return 0


def cmd_daemon(args: argparse.Namespace, found: Found | None = None) -> int:
    """`found`: the model a member serves, which this node (serving the embedded default for
    want of another) gives way to: it starts again on that one."""
    # OpenMP threads spin between the many small parallel regions of one step (sleeping
    # there costs ~30% per token), but not for long after it: on a machine that runs
    # several stages, an idle stage must not burn the cores the next one needs: 10^4 spins
    # bridge a step's gaps; 10^5 kept a 3-stage ring on 2 cores at 15 ms a token, not 11.5.
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")
    import asyncio

    from discovery.capabilities import load_or_measure
    from discovery.interfaces import is_loopback, lan_interfaces, primary_address
    from node import data_dir
    from node.cluster import cluster_model
    from node.cluster.api import bind as bind_api
    from node.cluster.daemon import Daemon, DaemonConfig
    from node.cluster.transport import listen
    from node.engine.local import available_memory
    from node.engine.models.quantized import check_device
    from node.engine.shard_cache import ShardCache
    from node.engine.weights import layer_format
    from protocol.wire import ACTIVATION_DTYPES

    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s {args.name} %(levelname)s %(message)s",
        stream=sys.stderr,
    )  # fmt: skip
    data_path = args.data_dir or data_dir.DEFAULT
    node_id, lock = data_dir.claim(data_path)
    keys = _daemon_keys(args.secret_file, data_path)
    host = args.host or ("0.0.0.0" if keys else "127.0.0.1")
    if keys is None and not is_loopback(host):
        if not args.insecure:
            raise RinginferError(
                f"--host {host} is reachable from the network and this daemon has no cluster "
                "secret: `ringinfer secret cluster.key` once, copy it to every machine, pass "
                "--secret-file cluster.key (or --insecure to let anyone join and read traffic)"
            )
        logging.warning("--insecure: no cluster secret, anyone who reaches %s:%d can join "
                        "the cluster, send it frames and read its activations", host, args.port)
    args.host = host
    api = bind_api(args.api, args.api_key_file, args.api_insecure, args.api_host,
                   args.api_tls_cert, args.api_tls_key)  # fmt: skip
    listener = listen(host, args.port, keys, args.transfer_port)  # taken ports fail now
    device, dtype = _engine(args)
    wire = args.wire_dtype
    if wire == "auto":
        wire = "bfloat16" if str(dtype) == "torch.bfloat16" else "float16"
    if wire not in ACTIVATION_DTYPES:
        raise RinginferError(
            f"unknown wire dtype '{wire}' (use auto, {', '.join(ACTIVATION_DTYPES)})"
        )
    peers = [_resolve(parse_address(p)) for p in args.peer]
    mdns = None if args.no_mdns or is_loopback(host) else lan_interfaces(args.mdns_interface)
    if args.model is None and found is None:
        STATUS.live("asking the cluster which model it serves ...")
        # Not our own address, which a shared --peer list may name: nobody answers there yet.
        own = {f"{h}:{args.port}" for h in (host, "127.0.0.1", primary_address())}
        others = [p for p in peers if p not in own]
        found = asyncio.run(cluster_model.find(others, mdns, args.cluster, keys, node_id))
    what = args.model or (found.manifest.name if found else "the default model")
    STATUS.live(f"opening {what} ...")
    began = time.perf_counter()
    cache = ShardCache(data_path / "cache", args.cache_size)
    ckpt, files, fallback = cluster_model.open_model(
        args.model, data_path, cache, found, keys, STATUS.live
    )
    tokenizer = ckpt.tokenizer()
    STATUS.live("")
    logging.info("opened %s in %.1fs", ckpt.path, time.perf_counter() - began)
    if is_loopback(host) and not args.no_mdns:
        logging.info("listening on loopback %s only: no mDNS (a cluster of this machine)", host)
    if mdns == []:
        logging.warning("no LAN interface for mDNS (only loopback or virtual ones): "
                        "find peers with --peer, or name one with --mdns-interface")  # fmt: skip
        mdns = None
    STATUS.live("measuring compute ...")
    quantize = args.quantize or "auto"
    if quantize != "auto":  # refused now, not when the first plan asks this node to load
        check_device(quantize, device)
    fmt = layer_format(ckpt, quantize, device)
    model = (ckpt.name, ckpt.family, ckpt.config, fmt)
    caps, fresh = load_or_measure(data_path, device, dtype, args.remeasure, model)
    STATUS.live("")
    logging.info(
        "%s %s: %.0f GFLOP/s matmul, %.1f GB/s weight streaming, %.0f us kernel overhead "
        "per layer, %.2f ms per %s layer in %s (%s)", caps.device, caps.device_name,
        caps.flops / 1e9, caps.bandwidth / 1e9, caps.layer_overhead_s * 1e6,
        caps.layer_s * 1e3, ckpt.name, fmt, "measured" if fresh else f"cached in {data_path}",
    )  # fmt: skip
    config = DaemonConfig(
        host=args.host, port=args.port, name=args.name, peers=peers, device=device, dtype=dtype,
        wire_dtype=wire, memory=args.max_memory or available_memory(device), caps=caps,
        cluster=args.cluster, objective=args.objective, mdns=mdns, pin=args.layers,
        request_timeout_s=args.request_timeout, leave_timeout_s=args.leave_timeout,
        max_queue=args.max_queue, step_timeout_s=args.step_timeout, threads=args.threads,
        prefill_chunk=args.prefill_chunk, quantize=quantize, layer_format=fmt, keys=keys,
        transfer_rate=args.transfer_rate, fallback=fallback, plan_deadline_s=args.plan_deadline,
    )  # fmt: skip
    if args.layers and args.layers[1] > ckpt.n_layers:
        raise RinginferError(
            f"--layers {args.layers[0]}:{args.layers[1]} is outside 0:{ckpt.n_layers}"
        )

    async def serve() -> Found | None:
        return await Daemon(config, node_id, ckpt, tokenizer, listener, files, api).run()

    switch = asyncio.run(serve())
    lock.close()
    return 0 if switch is None else cmd_daemon(args, switch)


def _resolve(address: str) -> str:
    """HOST:PORT with HOST as an IP address, so one peer is never two links."""
    host, _, port = address.rpartition(":")
    try:
        return f"{socket.gethostbyname(host)}:{port}"
    except OSError:
        raise RinginferError(f"cannot resolve peer host '{host}'") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        parser.print_help()
        return EXIT_USAGE
    try:
        args = parser.parse_args(argv)
        commands = {
            "generate": cmd_generate, "daemon": cmd_daemon, "status": cmd_status,
            "plan": cmd_plan, "doctor": cmd_doctor, "perplexity": cmd_perplexity,
            "secret": cmd_secret, "cache": cmd_cache,
        }  # fmt: skip
        return commands[args.command](args)
    except RinginferError as e:
        STATUS.line(f"ringinfer: error: {e}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:
        if os.environ.get("RINGINFER_DEBUG"):
            raise
        STATUS.line(
            f"ringinfer: internal error: {type(e).__name__}: {e} "
            "(set RINGINFER_DEBUG=1 for a traceback)"
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
