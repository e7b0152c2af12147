"""`ringinfer` command line: every failure the user can fix is one line on stderr, exit 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NoReturn

from node import __version__
from node.errors import RinginferError

if TYPE_CHECKING:  # the CLI imports torch only once a command needs it
    from node.weights import Progress

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise RinginferError(message)


def _split_points(text: str) -> list[int]:
    try:
        return [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        message = f"expected layer indices like 10,20, got '{text}'"
        raise argparse.ArgumentTypeError(message) from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ringinfer", description="Run one LLM across machines on a LAN.")
    parser.add_argument("--version", action="version", version=f"ringinfer {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    gen = commands.add_parser("generate", help="generate a continuation of PROMPT")
    gen.add_argument("prompt")
    gen.add_argument("--local", action="store_true", help="run in this process, no daemon")
    gen.add_argument("--model", help="HF directory, .gguf file or hub id (default: SmolLM2)")
    gen.add_argument("--split", type=_split_points, default=[], help="stage cuts, e.g. 10,20")
    gen.add_argument("--max-tokens", type=_positive, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-k", type=int, default=0, help="0 = no limit")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--chat", action="store_true", help="apply the model's chat template")
    gen.add_argument("--json", action="store_true", help="print one JSON object at the end")
    gen.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    gen.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    gen.add_argument("--threads", type=_positive, help="CPU threads for torch")
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


def cmd_generate(args: argparse.Namespace) -> int:
    if not args.local:
        raise RinginferError(
            "generating through a daemon is not available in this version; pass --local"
        )
    import torch

    from node.engine import LocalPipeline, Timings, fit_request, generate, pick_device, pick_dtype
    from node.sampling import SamplingParams
    from node.tokenizer import TextStream
    from node.weights import open_checkpoint

    params = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    STATUS.live(f"opening {args.model or 'the default model'} ...")
    ckpt = open_checkpoint(args.model)
    tokenizer = ckpt.tokenizer()
    prompt = tokenizer.encode_chat(args.prompt) if args.chat else tokenizer.encode(args.prompt)
    capacity, max_tokens = fit_request(len(prompt), args.max_tokens, ckpt.config.max_seq_len)
    pipeline = LocalPipeline(ckpt, args.split, device, dtype, STATUS.loading(ckpt.name))

    timings = Timings()
    stream = TextStream(tokenizer)
    tokens: list[int] = []
    pieces: list[str] = []
    step = pipeline.session(capacity, params)
    for token in generate(step, prompt, max_tokens, params, tokenizer.stop_ids, timings):
        tokens.append(token)
        if token in tokenizer.stop_ids:
            break
        piece = stream.push(token)
        pieces.append(piece)
        if not args.json:
            sys.stdout.write(piece)
            sys.stdout.flush()
    text = "".join(pieces)
    if args.json:
        result = {
            "text": text,
            "tokens": tokens,
            "prompt_tokens": len(prompt),
            "model": ckpt.name,
            "finish_reason": "stop" if tokens and tokens[-1] in tokenizer.stop_ids else "length",
            "ttft_s": round(timings.ttft_s, 6),
            "tpot_s": round(timings.tpot_s, 6),
            "decode_tokens_per_s": round(timings.decode_tokens_per_s, 3),
        }
        print(json.dumps(result))
    else:
        sys.stdout.write("\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        parser.print_help()
        return EXIT_USAGE
    try:
        args = parser.parse_args(argv)
        return {"generate": cmd_generate}[args.command](args)
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
