"""Architectures we implement ourselves, by Hugging Face `model_type` and GGUF architecture."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from node.engine.models import deepseek, gemma3, gpt2, gpt_oss, llama, qwen3_next
from node.engine.models.stage import Stage
from node.errors import RinginferError


@dataclass(frozen=True)
class Family:
    """One implementation: its config reader, its stage, and the names it answers to."""

    name: str
    config_cls: type
    stage_cls: type[Stage]
    hf_types: tuple[str, ...]
    gguf_archs: tuple[str, ...]


LLAMA = Family("llama", llama.LlamaConfig, llama.LlamaStage, llama.HF_MODEL_TYPES,
               llama.GGUF_ARCHITECTURES)  # fmt: skip
GPT2 = Family("gpt2", gpt2.GPT2Config, gpt2.GPT2Stage, gpt2.HF_MODEL_TYPES, ())
GEMMA3 = Family("gemma3", gemma3.Gemma3Config, gemma3.Gemma3Stage, gemma3.HF_MODEL_TYPES,
                gemma3.GGUF_ARCHITECTURES)  # fmt: skip
GPT_OSS = Family("gpt_oss", gpt_oss.GptOssConfig, gpt_oss.GptOssStage, gpt_oss.HF_MODEL_TYPES,
                 gpt_oss.GGUF_ARCHITECTURES)  # fmt: skip
DEEPSEEK = Family("deepseek", deepseek.DeepseekConfig, deepseek.DeepseekStage,
                  deepseek.HF_MODEL_TYPES, deepseek.GGUF_ARCHITECTURES)  # fmt: skip
QWEN3_NEXT = Family("qwen3_next", qwen3_next.Qwen3NextConfig, qwen3_next.Qwen3NextStage,
                    qwen3_next.HF_MODEL_TYPES, qwen3_next.GGUF_ARCHITECTURES)  # fmt: skip
FAMILIES = (LLAMA, GPT2, GEMMA3, GPT_OSS, DEEPSEEK, QWEN3_NEXT)
_BY_HF_TYPE = {t: f for f in FAMILIES for t in f.hf_types}
_BY_GGUF_ARCH = {a: f for f in FAMILIES for a in f.gguf_archs}
SUPPORTED = sorted(_BY_HF_TYPE)
SUPPORTED_GGUF = sorted(_BY_GGUF_ARCH)


def family_for_hf(config: dict[str, Any]) -> Family:
    model_type = config.get("model_type")
    if model_type not in _BY_HF_TYPE:
        raise RinginferError(
            f"unsupported architecture '{model_type}' (supported: {', '.join(SUPPORTED)})"
        )
    return _BY_HF_TYPE[model_type]


def family_for_gguf(arch: Any) -> Family:
    if arch not in _BY_GGUF_ARCH:
        raise RinginferError(
            f"unsupported GGUF architecture '{arch}' (supported: {', '.join(SUPPORTED_GGUF)})"
        )
    return _BY_GGUF_ARCH[arch]


def family_named(name: str) -> Family:
    """A family by its own name (as a measuring child process is told it)."""
    return next(f for f in FAMILIES if f.name == name)
