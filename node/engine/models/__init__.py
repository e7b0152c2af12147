"""Architectures we implement ourselves, by Hugging Face `model_type` and GGUF architecture."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from node.engine.models import gpt2, llama
from node.engine.models.stage import Stage
from node.errors import RinginferError


@dataclass(frozen=True)
class Family:
    name: str
    config_cls: type
    stage_cls: type[Stage]


LLAMA = Family("llama", llama.LlamaConfig, llama.LlamaStage)
GPT2 = Family("gpt2", gpt2.GPT2Config, gpt2.GPT2Stage)
_BY_HF_TYPE = {t: f for f, mod in ((LLAMA, llama), (GPT2, gpt2)) for t in mod.HF_MODEL_TYPES}
SUPPORTED = sorted(_BY_HF_TYPE)


def family_for_hf(config: dict[str, Any]) -> Family:
    model_type = config.get("model_type")
    if model_type not in _BY_HF_TYPE:
        raise RinginferError(
            f"unsupported architecture '{model_type}' (supported: {', '.join(SUPPORTED)})"
        )
    return _BY_HF_TYPE[model_type]
