"""A Llama-architecture causal LM in plain torch, for the training workers (`model.implementation`).

Why: a worker that builds its model through transformers imports transformers' model code, and with it
torch._dynamo, sympy, DTensor, accelerate and boto3 (transformers' mask and cache code and its DeepSpeed
integration import them at import time), about 110 MiB of resident memory that no training step uses. torch's
optimizers still bring torch._dynamo and sympy in, so the product's worker peaks 52 MiB lower with this module
(BENCHMARKS.md, session 21). This module computes what `transformers.LlamaForCausalLM` computes, with the
same operations in the same order and dtypes (Touvron et al. 2023, arXiv 2302.13971: pre-norm RMSNorm,
SwiGLU MLP, rotary position embeddings of Su et al., arXiv 2104.09864, eq. 34; grouped-query attention of
Ainslie et al., arXiv 2305.13245), so a step gives the same logits and gradients either way (the unit tests
compare them with transformers' own model). Its modules carry transformers' names (`model.layers.3.self_attn.
q_proj`, ...): checkpoints, the reference cache and the exported folder are the same whichever code ran.

Covered: `model_type` "llama" with SiLU, default RoPE, optional attention / MLP biases, tied embeddings,
grouped-query attention, eager or SDPA attention; the forward a training step makes (input ids, a 2D padding
mask or a 4D additive mask, position ids; no KV cache). `native_spec` names what is not covered, and
`model.implementation=auto` then loads the model through transformers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ropo_ray.train.logprobs import additive_mask_of


@dataclass
class LlamaSpec:
    """The fields of a Llama config.json this module uses (names as transformers spells them)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    attention_dropout: float = 0.0
    _attn_implementation: str = "sdpa"


def native_spec(config: dict[str, Any]) -> tuple[LlamaSpec | None, str]:
    """(spec, "") when this module computes the model of `config` (a parsed config.json), else (None, why not)."""
    if config.get("model_type") != "llama":
        return None, f"model_type is {config.get('model_type')!r}, not 'llama'"
    if config.get("auto_map"):
        return None, "the folder brings its own model code (auto_map)"
    if config.get("hidden_act", "silu") != "silu":
        return None, f"hidden_act is {config.get('hidden_act')!r}, not 'silu'"
    rope, scaling = config.get("rope_parameters") or {}, config.get("rope_scaling") or {}
    rope_type = scaling.get("rope_type", scaling.get("type")) or rope.get("rope_type", "default")
    if rope_type != "default":
        return None, f"RoPE type {rope_type!r} (only the default RoPE is covered)"
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    if config.get("pretraining_tp", 1) != 1:
        return None, f"pretraining_tp is {config.get('pretraining_tp')}"
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    if heads % kv_heads:
        return None, f"{heads} attention heads are not a multiple of {kv_heads} key-value heads"
    pad = config.get("pad_token_id")
    spec = LlamaSpec(
        vocab_size=int(config["vocab_size"]), hidden_size=int(config["hidden_size"]),
        intermediate_size=int(config["intermediate_size"]), num_hidden_layers=int(config["num_hidden_layers"]),
        num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=int(config.get("head_dim") or int(config["hidden_size"]) // heads),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)), rope_theta=float(theta),
        attention_bias=bool(config.get("attention_bias", False)), mlp_bias=bool(config.get("mlp_bias", False)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        pad_token_id=None if pad is None else int(pad), attention_dropout=float(config.get("attention_dropout", 0.0)))
    return spec, ""


def read_spec(folder: Path) -> tuple[LlamaSpec | None, str]:
    """`native_spec` of a model folder's config.json."""
    return native_spec(json.loads((Path(folder) / "config.json").read_text(encoding="utf-8")))


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 and cast back before the weight (as transformers' LlamaRMSNorm)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def expand_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, kv_heads, T, D] -> [B, kv_heads * groups, T, D], each key-value head serving `groups` query heads."""
    if groups == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, groups, t, d).reshape(b, h * groups, t, d)


class Attention(nn.Module):
    def __init__(self, spec: LlamaSpec) -> None:
        super().__init__()
        self.spec, self.head_dim = spec, spec.head_dim
        self.groups = spec.num_attention_heads // spec.num_key_value_heads
        self.scaling = spec.head_dim ** -0.5
        width, kv_width = spec.num_attention_heads * spec.head_dim, spec.num_key_value_heads * spec.head_dim
        self.q_proj = nn.Linear(spec.hidden_size, width, bias=spec.attention_bias)
        self.k_proj = nn.Linear(spec.hidden_size, kv_width, bias=spec.attention_bias)
        self.v_proj = nn.Linear(spec.hidden_size, kv_width, bias=spec.attention_bias)
        self.o_proj = nn.Linear(width, spec.hidden_size, bias=spec.attention_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None
                ) -> torch.Tensor:
        shape = (*x.shape[:-1], -1, self.head_dim)
        q = self.q_proj(x).view(shape).transpose(1, 2)
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = expand_kv(k, self.groups), expand_kv(v, self.groups)
        dropout = self.spec.attention_dropout if self.training else 0.0
        if self.spec._attn_implementation == "eager":
            scores = torch.matmul(q, k.transpose(2, 3)) * self.scaling
            if mask is not None:
                scores = scores + mask
            probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            out = torch.matmul(F.dropout(probs, p=dropout, training=self.training), v)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=self.scaling,
                                                 is_causal=mask is None and q.shape[2] > 1)
        out = out.transpose(1, 2).contiguous()
        return self.o_proj(out.reshape(*x.shape[:-1], -1).contiguous())


class MLP(nn.Module):
    def __init__(self, spec: LlamaSpec) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=spec.mlp_bias)
        self.up_proj = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=spec.mlp_bias)
        self.down_proj = nn.Linear(spec.intermediate_size, spec.hidden_size, bias=spec.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, spec: LlamaSpec) -> None:
        super().__init__()
        self.self_attn = Attention(spec)
        self.mlp = MLP(spec)
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None
                ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """transformers' `LlamaModel`: embeddings, decoder layers, final norm (the `model.` prefix of the names)."""

    def __init__(self, spec: LlamaSpec) -> None:
        super().__init__()
        self.spec = spec
        # given its (uninitialised) weight, nn.Embedding skips its random init, which on the meta device
        # would import torch._dynamo through torch._refs
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size, spec.pad_token_id,
                                         _weight=torch.empty(spec.vocab_size, spec.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(spec) for _ in range(spec.num_hidden_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.register_buffer("inv_freq", inverse_frequencies(spec), persistent=False)
        self.gradient_checkpointing = False

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                position_ids: torch.Tensor | None) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        if position_ids is None:
            position_ids = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
        with torch.no_grad():  # the rotary tables, as transformers' LlamaRotaryEmbedding.forward
            freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
            angles = torch.cat((freqs, freqs), dim=-1)
            cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        mask = additive_mask(attention_mask, x, self.spec._attn_implementation)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = recomputed(layer, x, cos, sin, mask)
            else:
                x = layer(x, cos, sin, mask)
        return self.norm(x)


class _Recomputed(Exception):
    """Raised inside a recomputation once it has saved every tensor the backward needs (an operation saves
    its inputs before it runs: the layer's last matmul, whose frozen weight is the last tensor saved, need not
    run again)."""


class _Recomputation:
    """The tensors one call of `recomputed` saved for the backward, recomputed on first use."""

    def __init__(self, fn: Any, args: tuple, rng_state: torch.Tensor, autocast: tuple[bool, torch.dtype]) -> None:
        self.fn, self.args, self.rng_state, self.autocast = fn, args, rng_state, autocast
        self.count, self.saved = 0, None

    def pack(self, _tensor: torch.Tensor) -> int:
        self.count += 1
        return self.count - 1

    def unpack(self, index: int) -> torch.Tensor:
        if self.saved is None or self.saved.get(index) is None:
            self.saved = self._recompute()
        return self.saved.pop(index)

    def _recompute(self) -> dict[int, torch.Tensor]:
        saved: dict[int, torch.Tensor] = {}

        def keep(t: torch.Tensor) -> int:
            saved[len(saved)] = t.detach() if t.requires_grad else t
            if len(saved) == self.count:  # the last one the backward needs: skip the rest of the forward
                raise _Recomputed
            return len(saved) - 1

        args = tuple(a.detach().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
                     for a in self.args)
        enabled, dtype = self.autocast
        with (torch.random.fork_rng(devices=[]), torch.enable_grad(),
              torch.autocast("cpu", enabled=enabled, dtype=dtype),
              torch.autograd.graph.saved_tensors_hooks(keep, lambda i: saved[i])):
            torch.set_rng_state(self.rng_state)
            try:
                self.fn(*args)
            except _Recomputed:
                pass
        if len(saved) != self.count:
            raise RuntimeError(f"activation checkpointing: the recomputed forward saved {len(saved)} tensors, "
                               f"the forward {self.count}")
        return saved


def recomputed(fn: Any, *args: Any) -> Any:
    """fn(*args), keeping none of the tensors its backward needs: they are recomputed, by running fn again
    on the same inputs (and CPU random state), when the backward first asks for one (activation
    checkpointing, Chen et al. 2016, arXiv 1604.06174; the saved-tensor-hook form of torch.utils.checkpoint's
    non-reentrant variant). torch.utils.checkpoint itself imports torch._dynamo on its first call (its
    `_disable_dynamo` wrapper and its recomputation hooks), which this module keeps out of the process.
    CPU only: a GPU model keeps transformers' model and its checkpointing (`model.implementation`)."""
    frame = _Recomputation(fn, args, torch.get_rng_state(),
                           (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
    with torch.autograd.graph.saved_tensors_hooks(frame.pack, frame.unpack):
        return fn(*args)


def inverse_frequencies(spec: LlamaSpec) -> torch.Tensor:
    """theta^(-2i/d), i < d/2: the default RoPE's frequencies, in fp32 (RoFormer, arXiv 2104.09864, eq. 15)."""
    exponents = torch.arange(0, spec.head_dim, 2, dtype=torch.float, device="cpu") / spec.head_dim
    return 1.0 / (spec.rope_theta ** exponents)  # on the CPU even while `build` constructs on the meta device


def additive_mask(attention_mask: torch.Tensor | None, x: torch.Tensor, attention: str) -> torch.Tensor | None:
    """The [B or 1, 1, T, T] mask added to the attention scores: 0 where a query may see a key, the dtype's
    minimum elsewhere (what transformers' eager mask holds). A 4D mask is used as given (bool: True = may see);
    a [B, T] padding mask (1 = token) is combined with causality; None is plain causality (left to SDPA's
    causal kernel when attention is SDPA, as transformers does)."""
    if attention_mask is not None and attention_mask.dim() == 4:
        return additive_mask_of(attention_mask, x.dtype) if attention_mask.dtype == torch.bool \
            else attention_mask.to(x.dtype)
    if attention_mask is None and attention != "eager":
        return None
    t = x.shape[1]
    allowed = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()[None, None]
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape != x.shape[:2]:
            raise ValueError(f"attention_mask of shape {tuple(attention_mask.shape)}: expected [batch, length] "
                             f"{tuple(x.shape[:2])} or a 4D mask")
        allowed = allowed & attention_mask.bool()[:, None, None, :]
    return additive_mask_of(allowed, x.dtype)


@dataclass
class CausalLMOutput:
    logits: torch.Tensor


class LlamaForCausalLM(nn.Module):
    """The causal LM a training step calls: `model(input_ids=, attention_mask=, position_ids=).logits`, plus
    the transformers methods the trainer uses (`get_input_embeddings`, `gradient_checkpointing_enable`,
    `enable_input_require_grads`, `config`)."""

    def __init__(self, spec: LlamaSpec) -> None:
        super().__init__()
        self.config = spec
        self.model = Backbone(spec)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, use_cache: bool | None = None) -> CausalLMOutput:
        if use_cache:
            raise ValueError("ropo_ray.train.llama keeps no KV cache: call it with use_cache=False")
        return CausalLMOutput(logits=self.lm_head(self.model(input_ids, attention_mask, position_ids)))

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict[str, Any] | None = None) -> None:
        """Recompute each decoder layer in the backward (`recomputed`: the non-reentrant form, whatever
        `gradient_checkpointing_kwargs` says; only {"use_reentrant": False} is accepted)."""
        extra = {k: v for k, v in (gradient_checkpointing_kwargs or {}).items() if (k, v) != ("use_reentrant", False)}
        if extra:
            raise ValueError(f"ropo_ray.train.llama recomputes layers without reentrant checkpointing; it takes no "
                             f"gradient_checkpointing_kwargs {extra}")
        self.model.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.model.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.model.gradient_checkpointing

    def enable_input_require_grads(self) -> None:
        """Make the embeddings' output require grad (a frozen model's backward then reaches every layer)."""
        self.model.embed_tokens.register_forward_hook(lambda _module, _inputs, out: out.requires_grad_(True))


def build(spec: LlamaSpec, dtype: torch.dtype) -> LlamaForCausalLM:
    """The model with uninitialised weights in `dtype` (to be filled from a checkpoint) and the RoPE
    frequencies computed in fp32."""
    with torch.device("meta"):  # no memory, no random init
        model = LlamaForCausalLM(spec)
    for module in model.modules():  # torch.empty, not Module.to_empty: on meta tensors that imports torch._dynamo
        for name, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[name] = nn.Parameter(torch.empty(p.shape, dtype=dtype), p.requires_grad)
    model.tie_weights()
    model.model.inv_freq = inverse_frequencies(spec)
    return model
