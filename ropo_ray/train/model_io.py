"""Load and save HF model folders safely: safetensors only, no remote code unless asked for."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ropo_ray.config.schema import ConfigError, ModelConfig

PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def check_model_folder(path: str | Path, cfg: ModelConfig) -> Path:
    """Refuse, before any loading, a folder without safetensors or with only pickle weights."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"model.path: {folder} is not a model folder (no config.json)")
    if not any(folder.glob("*.safetensors")):
        pickled = [p.name for pattern in PICKLE_WEIGHTS for p in folder.glob(pattern)]
        if not pickled:
            raise ConfigError(f"model.path: {folder} holds no *.safetensors weights")
        if not cfg.allow_pickle_weights:
            raise ConfigError(f"model.path: {folder} has only pickle-based weights ({', '.join(pickled)}); "
                              "convert them to safetensors or set model.allow_pickle_weights=true")
    return folder


def load_tokenizer(path: str | Path, cfg: ModelConfig) -> Any:
    """The tokenizer; it must carry a chat template (the pairs are templated with it)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=cfg.trust_remote_code)
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"model.tokenizer_path: the tokenizer at {path} has no chat template")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def attention_implementation(cfg: ModelConfig, bf16: bool, gpu: bool) -> str | None:
    """The attention kernel to load the model with; None leaves transformers' default (SDPA).

    `model.attn_implementation=auto` picks "eager" when the model computes in bf16 on the CPU: on the
    Zen 4 machines PyTorch's CPU flash-attention backward in bf16 took 3.7x its fp32 time, and the RoPO
    bf16 training step ran at 6.3 pairs/s with it against 7.5 with eager attention (BENCHMARKS.md,
    training step). In fp32, and on GPUs, SDPA is kept.
    """
    if cfg.attn_implementation != "auto":
        return cfg.attn_implementation
    return "eager" if bf16 and not gpu else None


def cpu_bf16_warning(bf16: bool, gpu: bool) -> str | None:
    """A warning when bf16 compute is asked for on a CPU without native bf16 matmuls (no AVX512-BF16 or
    AMX, e.g. AVX2-only Zen 3), else None. There oneDNN and MKL fall back to a slow path: 1,296 x 640 by
    640 x 640 ran at 1.5 GFLOP/s in bf16 against 53 in fp32 on such a machine (BENCHMARKS.md)."""
    if not bf16 or gpu or torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return None
    return (f"train.precision=bf16 on a CPU without native bf16 matmuls (torch's CPU capability: "
            f"{torch.backends.cpu.get_cpu_capability()}, no AVX512-BF16 / AMX): bf16 matmuls run tens of times "
            "slower than fp32 here; train.precision=fp32 is the fast setting on this machine")


def load_model(path: str | Path, cfg: ModelConfig, *, bf16: bool = False, gpu: bool = False,
               allow_native: bool = False) -> nn.Module:
    """A causal LM from a checked folder, in eval mode.

    `bf16`: the caller computes in bf16 (train.precision=bf16): the weights load straight in bf16, which is
    what DeepSpeed's bf16 mode casts them to anyway, instead of in `model.dtype` and then cast (the fp32 copy
    set the worker's peak memory); with `gpu` it picks the attention kernel (`attention_implementation`).
    `allow_native`: the caller only runs the model's forward (a training step), so `model.implementation`
    may give it `ropo_ray.train.llama`'s model instead of transformers' (`native_model`).
    Safetensors folders whose tensors match the model's own parameters are read tensor by tensor
    (`stream_safetensors`); anything else goes through transformers' loader.
    """
    folder = check_model_folder(path, cfg)
    attention = attention_implementation(cfg, bf16 or cfg.dtype == "bfloat16", gpu)
    dtype = torch.bfloat16 if bf16 else DTYPES[cfg.dtype]
    if allow_native and cfg.implementation != "transformers":
        model, why = native_model(folder, dtype, attention)
        if model is not None:
            return model.eval()
        if cfg.implementation == "native":
            raise ConfigError(f"model.implementation=native: {folder}: {why}; set model.implementation=auto "
                              "to load it through transformers")
    from transformers import AutoModelForCausalLM

    model = stream_safetensors(folder, cfg, dtype, attention)
    if model is None:
        # use_safetensors=True makes transformers refuse pickle files; when they are allowed, weights_only
        # keeps torch.load to tensors (a pickle that would run code is refused, never executed).
        model = AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=dtype, trust_remote_code=cfg.trust_remote_code,
            use_safetensors=not cfg.allow_pickle_weights or None, weights_only=True,
            **({"attn_implementation": attention} if attention else {}),
        )
    return model.eval()


SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def safetensors_header(file: Path) -> dict[str, dict]:
    """Name -> {dtype, shape, data_offsets} of a safetensors file (the format's JSON header), metadata dropped;
    offsets made absolute."""
    with file.open("rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    for entry in header.values():
        start, end = entry["data_offsets"]
        entry["data_offsets"] = (8 + size + start, 8 + size + end)
    return header


def tensor_buffer(headers: dict[Path, dict[str, dict]]) -> torch.Tensor:
    """One byte buffer as large as the largest tensor of the files (`safetensors_header` of each), for
    `read_tensor`."""
    return torch.empty(max(end - start for header in headers.values() for entry in header.values()
                           for start, end in [entry["data_offsets"]]), dtype=torch.uint8)


def read_tensor(f: Any, file: Path, name: str, entry: dict, buffer: torch.Tensor) -> torch.Tensor:
    """The tensor `entry` (from `safetensors_header`) of the open file `f`, read with one plain read into
    `buffer`: a view of it, valid until the next read into the same buffer."""
    start, end = entry["data_offsets"]
    chunk = buffer[:end - start]
    f.seek(start)
    if f.readinto(memoryview(chunk.numpy())) != end - start:
        raise ValueError(f"{file}: tensor {name} is cut short (the file is truncated)")
    return chunk.view(SAFETENSORS_DTYPES[entry["dtype"]]).view(entry["shape"])


def write_safetensors(path: Path, layout: list[tuple[str, torch.dtype, tuple[int, ...]]],
                      tensors: Iterable[torch.Tensor], metadata: dict[str, str] | None = None) -> int:
    """Write a safetensors file one tensor at a time; returns the bytes of tensor data written.

    `layout` names each tensor with its dtype and shape, in the order `tensors` yields them; the header
    (the format's little-endian u64 length, then JSON padded with spaces to a multiple of 8 bytes) is
    written from it first, then each tensor's bytes as it comes, so memory holds one tensor at a time
    where `safetensors.torch.save_file` takes them all at once. A tensor that does not match its layout
    entry, or a count that differs, is an error (the file is then incomplete; callers write to a
    temporary folder).
    """
    codes = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, dtype, shape in layout:
        size = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        header[name] = {"dtype": codes[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with path.open("wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for (name, dtype, shape), tensor in zip(layout, tensors, strict=True):
            if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                raise ValueError(f"{path}: tensor {name} is {tensor.dtype} {tuple(tensor.shape)}, its header says "
                                 f"{dtype} {tuple(shape)}")
            f.write(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
    return offset


def fill_from_safetensors(model: nn.Module, headers: dict[Path, dict[str, dict]]) -> bool:
    """Copy the files' tensors (`safetensors_header` of each) into `model`'s parameters and persistent buffers
    of the same names, one tensor at a time through one reused buffer. False, with nothing copied, when the
    names or shapes differ (a tensor the model lacks, one of another shape, or a model tensor no file holds;
    tied weights may be stored once)."""
    stored = {name: entry for header in headers.values() for name, entry in header.items()}
    targets = model.state_dict(keep_vars=True)
    loaded = {targets[name].data_ptr() for name in stored if name in targets}
    if (set(stored) - set(targets) or any(tuple(targets[k].shape) != tuple(e["shape"]) for k, e in stored.items())
            or any(t.data_ptr() not in loaded for k, t in targets.items() if k not in stored)):
        return False
    buffer = tensor_buffer(headers)
    with torch.no_grad():
        for file, header in headers.items():
            with file.open("rb", buffering=0) as f:
                for name, entry in header.items():
                    targets[name].data.copy_(read_tensor(f, file, name, entry, buffer))
    return True


def native_model(folder: Path, dtype: torch.dtype, attention: str | None) -> tuple[nn.Module | None, str]:
    """(`ropo_ray.train.llama`'s model of the folder, "") or (None, why not): a config it does not cover, an
    attention kernel it does not have, or safetensors whose tensors are not exactly its parameters."""
    from ropo_ray.train import llama

    spec, why = llama.read_spec(folder)
    if spec is None:
        return None, why
    if attention not in (None, "sdpa", "eager"):
        return None, f"attention {attention!r} (it has eager and SDPA)"
    headers = {file: safetensors_header(file) for file in sorted(folder.glob("*.safetensors"))}
    if not headers or any(e["dtype"] not in SAFETENSORS_DTYPES for h in headers.values() for e in h.values()):
        return None, "its weights are not all floating-point safetensors"
    spec._attn_implementation = attention or "sdpa"
    model = llama.build(spec, dtype)
    if not fill_from_safetensors(model, headers):
        return None, "its safetensors' names or shapes are not a Llama's parameters"
    return model, ""


def stream_safetensors(folder: Path, cfg: ModelConfig, dtype: torch.dtype, attention: str | None) -> nn.Module | None:
    """The model built empty in `dtype`, its tensors read from the folder's safetensors one at a time.

    transformers' loader maps the files and converts from them, so its peak holds the checkpoint's pages
    beside the model (an fp32 checkpoint loaded into bf16 peaks at about 1.5x the fp32 size). Reading each
    tensor with a plain read into one reused buffer holds the model plus its largest tensor. Returns None,
    to leave the folder to transformers, when its tensors are not exactly the model's parameters and
    persistent buffers (names, shapes and supported dtypes; tied weights may be stored once), e.g. a
    checkpoint that transformers renames or converts while loading.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    from transformers.initialization import no_init_weights

    headers = {file: safetensors_header(file) for file in sorted(folder.glob("*.safetensors"))}
    stored = {name: (file, entry) for file, header in headers.items() for name, entry in header.items()}
    if not stored or any(entry["dtype"] not in SAFETENSORS_DTYPES for _, entry in stored.values()):
        return None
    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=cfg.trust_remote_code)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=cfg.trust_remote_code,
                                                 **({"attn_implementation": attention} if attention else {}))
    model.tie_weights()  # no_init_weights skips init_weights, which is where transformers ties them
    if not fill_from_safetensors(model, headers):
        return None
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(folder))
    model.config._name_or_path = str(folder)
    return model


def save_model_folder(model: nn.Module, tokenizer: Any, out_dir: str | Path) -> Path:
    """save_pretrained (safetensors) of a plain model plus its tokenizer: a folder vLLM loads as is."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return out
