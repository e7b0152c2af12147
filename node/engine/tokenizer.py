"""Tokenizers from a model's own files: HF tokenizer.json, GGUF metadata, or GPT-2's tiktoken."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

from node.data_dir import cache_dir
from node.errors import RinginferError
from node.json_file import read_json

# A batch of one gains nothing from the tokenizers' thread pool, and a process that used it
# warns in every child it forks.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Pre-tokenizer regexes by GGUF `tokenizer.ggml.pre`, as llama.cpp applies them in order.
_GPT2_PAT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_PAT = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|"
    r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# o200k (gpt-oss, GPT-4o), llama.cpp's pre-tokenizer "gpt-4o": tiktoken's own pattern.
_O200K_PAT = "|".join([
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
])  # fmt: skip
# No tokenizer needs more bytes a token than this, on average over a prompt: a longer text
# cannot fit the context and is refused before it is tokenized (which costs ~1 s a MiB).
MAX_BYTES_PER_TOKEN = 64


def too_many_bytes(texts: Iterable[str], context: int) -> str | None:
    """Why `texts` cannot fit `context` tokens, judged by their bytes before tokenizing; None
    when they may."""
    size, most = sum(len(t.encode()) for t in texts), context * MAX_BYTES_PER_TOKEN
    if size <= most:
        return None
    return (f"the prompt is {size} bytes: longer than the model's context of {context} tokens "
            f"can hold ({most} bytes at most)")  # fmt: skip


# Kimi K2's (llama.cpp's "kimi-k2", the pattern of its tokenization_kimi.py): a run of Han
# characters alone, then o200k's words with Han taken out of their letter classes.
_NOT_HAN = "&&[^\\p{Han}]"
_KIMI_K2_PAT = "|".join([
    r"[\p{Han}]+",
    rf"[^\r\n\p{{L}}\p{{N}}]?[\p{{Lu}}\p{{Lt}}\p{{Lm}}\p{{Lo}}\p{{M}}{_NOT_HAN}]*"
    rf"[\p{{Ll}}\p{{Lm}}\p{{Lo}}\p{{M}}{_NOT_HAN}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    rf"[^\r\n\p{{L}}\p{{N}}]?[\p{{Lu}}\p{{Lt}}\p{{Lm}}\p{{Lo}}\p{{M}}{_NOT_HAN}]+"
    rf"[\p{{Ll}}\p{{Lm}}\p{{Lo}}\p{{M}}{_NOT_HAN}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
])
# DeepSeek V3's (llama.cpp's "deepseek-v3"): digits by threes, CJK runs, then words.
_DEEPSEEK3_PATS = [
    r"\p{N}{1,3}",
    "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+|"""
    r""" ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
]
_GGUF_PRE = {
    "default": [_GPT2_PAT],
    "gpt-2": [_GPT2_PAT],
    "smollm": [r"\p{N}", _GPT2_PAT],
    "llama-bpe": [_LLAMA3_PAT],
    "llama3": [_LLAMA3_PAT],
    "qwen2": [_LLAMA3_PAT.replace(r"\p{N}{1,3}", r"\p{N}")],
    # Qwen3.5's: Qwen2's with combining marks (\p{M}) kept inside words.
    "qwen35": [
        r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|"
        r"\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    ],
    "gpt-4o": [_O200K_PAT],
    "deepseek-v3": _DEEPSEEK3_PATS,
    "kimi-k2": [_KIMI_K2_PAT],
}
# Vocabularies made by tiktoken take a pre-token that is itself a token whole, before merging.
_WHOLE_FIRST = ([_LLAMA3_PAT], [_O200K_PAT], [_KIMI_K2_PAT])
# End-of-turn tokens that stop generation wherever a vocabulary has them (GGUF files often
# name only one end token, and not always the one the chat template ends turns with), as
# llama.cpp's end-of-generation list. Not "</s>": Gemma's vocabulary has it as an ordinary
# HTML tag, and models that end with it name it as their eos token.
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|endoftext|>",
                "<|end|>", "<end_of_turn>")  # fmt: skip
# gpt-oss's harmony format: <|end|> closes one message of a reply (its thought, before the
# answer), <|return|> the reply and <|call|> a tool call (llama.cpp stops on these too).
_HARMONY = ("<|channel|>", "<|message|>", "<|return|>")
_HARMONY_END = ("<|return|>", "<|call|>")
_GGUF_CONTROL, _GGUF_USER_DEFINED = 3, 4

# Variables a request may set in the chat template (chat_template_kwargs): bounded, plain.
MAX_TEMPLATE_VARS, MAX_TEMPLATE_TEXT = 16, 4096
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")
# What the renderer sets itself (ours, as transformers does, then Jinja's globals): not the
# request's to change.
_RENDERER_SETS = {"messages", "add_generation_prompt", "bos_token", "eos_token", "tools",
                  "documents", "raise_exception", "strftime_now",
                  "range", "dict", "lipsum", "cycler", "joiner", "namespace"}  # fmt: skip


class BadTemplateVariables(RinginferError):
    """A request's chat template variables are not ones we render with."""


class Tokenizer:
    """Text <-> token ids, the ids that end a reply, and the model's chat template."""

    def __init__(
        self,
        encode: Callable[[str, bool], list[int]],
        decode: Callable[[list[int]], str],
        vocab: dict[str, int],
        stop_ids: Iterable[int],
        chat_template: str | None,
        bos: str | None = None,
        eos: str | None = None,
        backend: Any = None,
    ) -> None:
        self._encode, self._decode = encode, decode
        self.backend = backend  # the `tokenizers` object, where there is one (not GPT-2's)
        self.stop_ids = frozenset(stop_ids) | {vocab[t] for t in _END_OF_TURN if t in vocab}
        self.harmony = all(t in vocab for t in _HARMONY)
        if self.harmony:
            ends = {vocab[t] for t in _HARMONY_END if t in vocab}
            self.stop_ids = (self.stop_ids | ends) - {vocab.get("<|end|>")}
        self.chat_template, self.bos, self.eos = chat_template, bos, eos

    @property
    def bos_id(self) -> int | None:
        """The token this tokenizer starts texts with, if it adds one."""
        ids = self.encode("", True)
        return ids[0] if ids else None

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        return self._encode(text, add_special)

    def decode(self, ids: list[int]) -> str:
        return self._decode(ids)

    def encode_prompt(
        self, text: str, chat: bool, variables: Mapping[str, Any] | None = None
    ) -> list[int]:
        """A user's prompt: wrapped in the chat template when `chat`, else encoded as is."""
        if not chat:
            return self.encode(text)
        return self.encode_chat([{"role": "user", "content": text}], variables)

    def encode_chat(
        self, messages: list[dict[str, Any]], variables: Mapping[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:  # fmt: skip
        """A conversation (role and content per turn) through the model's chat template,
        ready for the assistant's next reply. `variables` (a request's chat_template_kwargs,
        e.g. Qwen3's enable_thinking) are checked with `template_variables`. `tools`:
        OpenAI's tool objects, as transformers hands them to templates."""
        extra, template = template_variables(variables), self._template
        try:
            text = template.render(
                **extra,
                messages=messages,
                tools=tools,
                add_generation_prompt=True,
                bos_token=self.bos or "",
                eos_token=self.eos or "",
            )
        except Exception as e:  # a template fails in many ways (raise_exception, a type's)
            raise RinginferError(f"the model's chat template failed: {_one_line(e)}") from None
        # Templates write their own BOS, as transformers' apply_chat_template assumes.
        return self.encode(text, add_special=False)

    @cached_property
    def _template(self) -> Any:
        """The chat template compiled once, in the environment transformers renders it in
        (a sandbox, its globals and filters), so its text is the one the model was taught."""
        if not self.chat_template:
            raise RinginferError("this model has no chat template; drop --chat")
        from jinja2 import TemplateError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
        )
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        env.filters["tojson"] = lambda v, **kw: json.dumps(v, ensure_ascii=False, **kw)
        try:
            return env.from_string(self.chat_template)
        except TemplateError as e:
            raise RinginferError(f"the model's chat template failed: {_one_line(e)}") from None

    @classmethod
    def from_hf_dir(cls, path: Path, config: dict[str, Any]) -> Tokenizer:
        if config.get("model_type") == "gpt2":
            return cls.gpt2()
        from tokenizers import Tokenizer as HFTokenizer

        file = path / "tokenizer.json"
        if not file.exists() and (path / "tiktoken.model").exists():  # Kimi K2's own code
            raise RinginferError(f"{path} has a tiktoken tokenizer (tiktoken.model) that runs "
                                 "as its own Python code; use the model's GGUF file")  # fmt: skip
        if not file.exists():
            raise RinginferError(f"no tokenizer.json in {path}")
        try:
            tok = HFTokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception for a bad file
            raise RinginferError(f"cannot read {file}: {e}") from None
        tcfg = read_json(path / "tokenizer_config.json", missing_ok=True)
        gen = read_json(path / "generation_config.json", missing_ok=True)
        template = tcfg.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t["name"] == "default"), None)
        if (path / "chat_template.jinja").exists():
            template = (path / "chat_template.jinja").read_text()
        stop = set()
        for source in (config.get("eos_token_id"), gen.get("eos_token_id")):
            stop |= set(source if isinstance(source, list) else [source] if source else [])
        eos = _token_text(tcfg.get("eos_token"))
        if eos is not None and tok.token_to_id(eos) is not None:
            stop.add(tok.token_to_id(eos))
        return cls(
            lambda text, special: _ids(tok, text, special),
            lambda ids: tok.decode(ids, skip_special_tokens=False),
            tok.get_vocab(),
            stop,
            template,
            _token_text(tcfg.get("bos_token")),
            eos,
            tok,
        )

    @classmethod
    def from_gguf(cls, meta: dict[str, Any], path: Path) -> Tokenizer:
        tokens: list[str] = meta["tokenizer.ggml.tokens"]
        vocab = {t: i for i, t in enumerate(tokens)}
        kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
        if kind == "gpt2" and pre in _GGUF_PRE:
            tok = _bpe_from_gguf(meta, vocab, _GGUF_PRE[pre])
        else:  # SentencePiece vocabularies and rarer pre-tokenizers: transformers' converter
            tok = _convert_with_transformers(path, meta)
        bos_id = meta.get("tokenizer.ggml.bos_token_id")
        eos_id = meta.get("tokenizer.ggml.eos_token_id")
        add_bos = meta.get("tokenizer.ggml.add_bos_token", kind == "llama") and bos_id is not None
        stop = {i for i in (eos_id, meta.get("tokenizer.ggml.eot_token_id")) if i is not None}

        def encode(text: str, special: bool) -> list[int]:
            ids = _ids(tok, text, False)
            return [bos_id, *ids] if special and add_bos else ids

        return cls(
            encode,
            lambda ids: tok.decode(ids, skip_special_tokens=False),
            vocab,
            stop,
            meta.get("tokenizer.chat_template"),
            tokens[bos_id] if bos_id is not None else None,
            tokens[eos_id] if eos_id is not None else None,
            tok,
        )

    @classmethod
    def gpt2(cls) -> Tokenizer:
        """GPT-2's BPE through tiktoken, with ranks from the local `openai-whisper` package."""
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe
        from tiktoken_ext.openai_public import r50k_pat_str

        ranks_file = _gpt2_ranks_file()
        if ranks_file is None:
            enc = tiktoken.get_encoding("gpt2")  # downloads once when online, then cached
        else:
            enc = tiktoken.Encoding(
                name="gpt2",
                pat_str=r50k_pat_str,
                mergeable_ranks=load_tiktoken_bpe(str(ranks_file)),
                special_tokens={"<|endoftext|>": 50256},
            )
        return cls(
            lambda text, special: enc.encode(text, allowed_special="all"),
            lambda ids: enc.decode(ids),
            {"<|endoftext|>": 50256},
            {50256},
            None,
            "<|endoftext|>",
            "<|endoftext|>",
        )


class TextStream:
    """Turns a growing list of token ids into text pieces, holding back split UTF-8 bytes.

    Each step decodes only a short window: the tokens since the last piece plus the ones
    before it, as context for tokenizers whose text depends on neighbours (leading spaces
    in SentencePiece), so a long generation costs linear, not quadratic, time.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer, self.ids = tokenizer, []
        self.prefix_offset = self.read_offset = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset : self.read_offset])
        text = decode(self.ids[self.prefix_offset :])
        if text.endswith("\ufffd") or len(text) <= len(prefix):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text[len(prefix) :]


def _bpe_from_gguf(meta: dict[str, Any], vocab: dict[str, int], patterns: list[str]) -> Any:
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    tok = HFTokenizer(models.BPE(vocab, merges, ignore_merges=patterns in _WHOLE_FIRST))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in patterns]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type", [])
    special = [tokens[i] for i, t in enumerate(types) if t in (_GGUF_CONTROL, _GGUF_USER_DEFINED)]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    return tok


def _convert_with_transformers(path: Path, meta: dict[str, Any]) -> Any:
    """transformers' tokenizer for a GGUF, kept in the cache as tokenizer.json under a hash of
    the file's tokenizer metadata: converting a large SentencePiece vocabulary rebuilds its
    merges (Gemma 3's 262k tokens: ~10 s at every start)."""
    import transformers
    from tokenizers import Tokenizer as HFTokenizer

    fields = sorted((k, v) for k, v in meta.items() if k.startswith("tokenizer.ggml."))
    key = json.dumps([transformers.__version__, fields], ensure_ascii=False).encode()
    cached = cache_dir() / "tokenizers" / f"{hashlib.sha256(key).hexdigest()[:32]}.json"
    if cached.exists():
        try:
            return HFTokenizer.from_file(str(cached))
        except Exception:  # a damaged cache entry: convert again below and replace it
            pass
    try:
        tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:  # converter errors are of many kinds; all mean "unsupported"
        raise RinginferError(f"cannot build a tokenizer from {path}: {e}") from None
    partial = cached.with_name(f"{cached.name}.{os.getpid()}.partial")
    try:  # a cache that cannot be written costs time only
        cached.parent.mkdir(parents=True, exist_ok=True)
        tok.backend_tokenizer.save(str(partial))
        os.replace(partial, cached)
    except OSError:
        partial.unlink(missing_ok=True)
    return tok.backend_tokenizer


def _gpt2_ranks_file() -> Path | None:
    try:
        files = importlib.metadata.files("openai-whisper") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    return next((Path(str(f.locate())) for f in files if str(f).endswith("gpt2.tiktoken")), None)


def _ids(tok: Any, text: str, special: bool) -> list[int]:
    """`tok.encode(text).ids` through encode_batch, which lets go of the GIL while it works
    (encode holds it, ~1 s a MiB): the API tokenizes in a worker thread, and so the event
    loop runs on meanwhile."""
    return tok.encode_batch([text], add_special_tokens=special)[0].ids


def template_variables(value: Any) -> dict[str, Any]:
    """A request's chat template variables, checked as hostile input (an API body may
    come from any web page): at most MAX_TEMPLATE_VARS names, each to a JSON scalar."""
    if value is None:
        return {}
    where = "chat_template_kwargs"
    if not isinstance(value, Mapping):
        why = "must be an object of names to strings, numbers, booleans or null"
        raise BadTemplateVariables(f"{where} {why}")
    if len(value) > MAX_TEMPLATE_VARS:
        why = f"at most {MAX_TEMPLATE_VARS} names, got {len(value)}"
        raise BadTemplateVariables(f"{where}: {why}")
    for name, v in value.items():
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            why = "is not a name (a letter, then letters, digits or _, up to 64)"
            raise BadTemplateVariables(f"{where}: {str(name)[:80]!r} {why}")
        why = _variable_problem(name, v)
        if why:
            raise BadTemplateVariables(f"{where}.{name}: {why}")
    return dict(value)


def _variable_problem(name: str, value: Any) -> str | None:
    if name in _RENDERER_SETS:
        return "not the request's to set"
    if isinstance(value, str):
        return f"at most {MAX_TEMPLATE_TEXT} characters" if len(value) > MAX_TEMPLATE_TEXT else None
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return "a number out of range" if abs(value) > 2**53 else None
    if isinstance(value, float):
        return None if math.isfinite(value) else "a number out of range"
    return "must be a string, number, boolean or null"


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _token_text(token: Any) -> str | None:
    """tokenizer_config writes special tokens as strings or as AddedToken dicts."""
    return token.get("content") if isinstance(token, dict) else token
