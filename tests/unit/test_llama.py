"""ropo_ray.train.llama against transformers' own LlamaForCausalLM: the same checkpoint gives the same logits
and the same gradients (the RoPO adapter's included), in fp32 and bf16, eager and SDPA attention, with padding
masks, shared-prompt 4D masks and position ids, grouped-query attention, biases and tied embeddings; configs it
does not cover are named, and `model.implementation` chooses between the two."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from ropo_ray.adapters.registry import attach_adapter
from ropo_ray.config.schema import AdapterConfig, ConfigError, ModelConfig
from ropo_ray.train import llama
from ropo_ray.train.model_io import load_model


def _save_llama(folder, seed=0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    kwargs = dict(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=32, max_position_embeddings=64, tie_word_embeddings=False,
                  pad_token_id=0, rope_theta=500.0)
    kwargs.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**kwargs)).float()
    with torch.no_grad():  # norms away from 1 and biases away from 0, so a dropped one shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return _save_llama(tmp_path_factory.mktemp("llama"))


def _pair(folder, bf16=False, attention="auto"):
    cfg_native = ModelConfig(implementation="native", attn_implementation=attention)
    cfg_hf = ModelConfig(implementation="transformers", attn_implementation=attention)
    native = load_model(folder, cfg_native, bf16=bf16, allow_native=True)
    reference = load_model(folder, cfg_hf, bf16=bf16, allow_native=True)
    assert isinstance(native, llama.LlamaForCausalLM) and not isinstance(reference, llama.LlamaForCausalLM)
    return native, reference


def _inputs(seed=1, batch=3, length=11, vocab=96):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, 8:] = 0  # right padding
    mask[2, :3] = 0  # left padding
    return ids, mask


@pytest.mark.parametrize("bf16,attention", [(False, "eager"), (False, "sdpa"), (True, "eager"), (True, "sdpa")])
def test_logits_match_transformers(folder, bf16, attention):
    native, reference = _pair(folder, bf16, attention)
    ids, mask = _inputs()
    with torch.no_grad():
        got = native(input_ids=ids, attention_mask=mask, use_cache=False).logits
        want = reference(input_ids=ids, attention_mask=mask, use_cache=False).logits
    assert got.dtype == want.dtype == (torch.bfloat16 if bf16 else torch.float32)
    valid = mask.bool()  # padded query positions are never read
    if attention == "eager":  # the same operations in the same order: the same numbers
        assert torch.equal(got[valid], want[valid])
    else:  # transformers hands SDPA a boolean mask (or none), this module an additive one
        tol = 2e-2 if bf16 else 1e-5
        torch.testing.assert_close(got[valid].float(), want[valid].float(), rtol=tol, atol=tol)
    with torch.no_grad():  # no mask at all: plain causality
        torch.testing.assert_close(native(input_ids=ids).logits.float(), reference(input_ids=ids).logits.float(),
                                   rtol=2e-2 if bf16 else 1e-5, atol=2e-2 if bf16 else 1e-5)


def test_shared_prompt_mask_and_positions(folder):
    """A 4D additive mask and explicit position ids (the shared-prompt layout) are applied as given."""
    native, reference = _pair(folder, attention="eager")
    ids = _inputs(length=9)[0][:2]
    allowed = torch.ones(9, 9, dtype=torch.bool).tril().repeat(2, 1, 1)
    allowed[:, 6:, 3:6] = False  # the second completion does not see the first
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 3, 4, 5]] * 2)
    additive = torch.zeros(2, 1, 9, 9).masked_fill_(~allowed[:, None], torch.finfo(torch.float32).min)
    with torch.no_grad():
        got = native(input_ids=ids, attention_mask=additive, position_ids=positions).logits
        want = reference(input_ids=ids, attention_mask=additive, position_ids=positions).logits
        boolean = native(input_ids=ids, attention_mask=allowed[:, None], position_ids=positions).logits
    assert torch.equal(got, want)
    assert torch.equal(boolean, got)
    # the shared-prompt row's second completion equals that completion run after the prompt on its own
    alone = torch.cat([ids[:, :3], ids[:, 6:]], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(got[:, 6:], reference(input_ids=alone).logits[:, 3:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bf16", [False, True])
def test_gradients_match_with_ropo_and_checkpointing(folder, bf16):
    """The RoPO adapter's gradients through either model, with activation checkpointing on the native one."""
    native, reference = _pair(folder, bf16, attention="eager")
    adapter = AdapterConfig(block_sizes=(2, 4))
    models = []
    for model in (native, reference):
        torch.manual_seed(3)
        model = attach_adapter(model, adapter)
        with torch.no_grad():  # away from the identity, so the rotations matter
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.1)
        models.append(model.train())
    models[0].gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids, mask = _inputs(seed=4)
    grads = []
    for model in models:
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        loss = (torch.log_softmax(logits, -1)[..., 5] * mask).sum()
        loss.backward()
        grads.append({n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    assert any(".mlp." in n for n in grads[0]) or any(".self_attn." in n for n in grads[0])
    for name in grads[0]:
        scale = grads[1][name].abs().max().item() + 1e-6
        tol = 2e-2 * scale if bf16 else 1e-4 * scale
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=0, atol=tol, msg=name)


def test_biases_tied_embeddings_and_heads(tmp_path):
    folder = _save_llama(tmp_path / "m", seed=5, attention_bias=True, mlp_bias=True, tie_word_embeddings=True,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, hidden_size=96)
    native, reference = _pair(folder, attention="eager")
    assert native.lm_head.weight is native.model.embed_tokens.weight
    assert native.model.layers[0].self_attn.q_proj.bias is not None
    ids, mask = _inputs(seed=6)
    with torch.no_grad():
        got = native(input_ids=ids, attention_mask=mask).logits
        want = reference(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(got[mask.bool()], want[mask.bool()])


def test_rotary_tables_by_hand():
    """cos / sin of position p, pair i: p * theta^(-2i/d) (d = 4, theta = 100: frequencies 1 and 0.1)."""
    spec = llama.LlamaSpec(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=2, head_dim=4, rms_norm_eps=1e-6,
                           rope_theta=100.0)
    assert torch.allclose(llama.inverse_frequencies(spec), torch.tensor([1.0, 0.1]))


def test_padding_mask_by_hand():
    x = torch.zeros(1, 3, 4)
    mask = llama.additive_mask(torch.tensor([[0, 1, 1]]), x, "eager")
    low = torch.finfo(torch.float32).min
    expected = torch.tensor([[low, low, low], [low, 0.0, low], [low, 0.0, 0.0]])
    assert torch.equal(mask[0, 0], expected)
    assert llama.additive_mask(None, x, "sdpa") is None
    with pytest.raises(ValueError, match="attention_mask of shape"):
        llama.additive_mask(torch.ones(2, 3), x, "eager")


@pytest.mark.parametrize("change,reason", [
    ({"model_type": "mistral"}, "model_type"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4}}, "RoPE type 'llama3'"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "RoPE type 'linear'"),
    ({"auto_map": {"AutoModelForCausalLM": "x.Y"}}, "auto_map"),
    ({"num_key_value_heads": 3}, "not a multiple"),
])
def test_uncovered_configs_are_named(folder, tmp_path, change, reason):
    config = {**json.loads((folder / "config.json").read_text()), **change}
    spec, why = llama.native_spec(config)
    assert spec is None and reason in why
    other = tmp_path / "other"
    other.mkdir()
    for f in folder.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    (other / "config.json").write_text(json.dumps(config))
    if change.get("model_type") == "mistral" or "rope" in next(iter(change)) or "hidden_act" in change:
        with pytest.raises(ConfigError, match=reason.split("'")[0]):
            load_model(other, ModelConfig(implementation="native"), allow_native=True)


def test_implementation_setting(folder, tmp_path):
    auto = load_model(folder, ModelConfig(), allow_native=True)
    assert isinstance(auto, llama.LlamaForCausalLM) and auto.config._attn_implementation == "sdpa"
    assert isinstance(load_model(folder, ModelConfig(), bf16=True, allow_native=True).config, llama.LlamaSpec)
    assert load_model(folder, ModelConfig(), bf16=True, allow_native=True).config._attn_implementation == "eager"
    assert not isinstance(load_model(folder, ModelConfig(implementation="transformers"), allow_native=True),
                          llama.LlamaForCausalLM)
    assert not isinstance(load_model(folder, ModelConfig()), llama.LlamaForCausalLM)  # callers that save it
    # a checkpoint whose tensors are not the model's: auto falls back, native says why
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    tensors["extra.weight"] = torch.zeros(2)
    save_file(tensors, str(renamed / "model.safetensors"))
    (renamed / "config.json").write_bytes((folder / "config.json").read_bytes())
    with pytest.raises(ConfigError, match="names or shapes"):
        load_model(renamed, ModelConfig(implementation="native"), allow_native=True)
    with pytest.raises(ConfigError, match="attention 'flex_attention'"):
        load_model(folder, ModelConfig(implementation="native", attn_implementation="flex_attention"),
                   allow_native=True)


def test_loading_imports_no_transformers(folder):
    """The point of the module: a process that loads and steps the native model never imports transformers."""
    code = f"""
import sys, torch
from ropo_ray.config.schema import ModelConfig, AdapterConfig
from ropo_ray.adapters.registry import attach_adapter
from ropo_ray.train.model_io import load_model
model = attach_adapter(load_model({str(folder)!r}, ModelConfig(), bf16=True, allow_native=True), AdapterConfig())
model.train()
model.gradient_checkpointing_enable()
model(input_ids=torch.tensor([[1, 2, 3]])).logits.float().sum().backward()
print(sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'sympy', 'peft', 'accelerate')))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_recomputation_gives_the_same_gradients_and_runs_each_layer_twice(folder):
    """Activation checkpointing: the same gradients as keeping every activation (fp32, bit for bit), each
    decoder layer entered once in the forward and once more in the backward (where the recomputation stops
    once it has what the backward needs), and no tensor of a layer kept."""
    grads, calls = [], []
    for checkpointed in (False, True):
        torch.manual_seed(3)
        model = attach_adapter(load_model(folder, ModelConfig(), allow_native=True), AdapterConfig(block_sizes=(2, 4)))
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.1)
        model.train()
        if checkpointed:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        count, saved = [0], []

        def counted(*_, count=count):
            count[0] += 1

        def pack(t, saved=saved):
            saved.append(t)
            return t

        model.model.layers[1].register_forward_pre_hook(counted)
        ids, mask = _inputs(seed=7)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits = model(input_ids=ids, attention_mask=mask).logits
        (torch.log_softmax(logits, -1)[..., 3] * mask).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        calls.append(count[0])
        if checkpointed:  # inside the layers the hooks of `recomputed` see the tensors, not this one
            assert not any(t.shape[-1] == 160 for t in saved)  # no MLP activation survived the forward
    assert calls == [1, 2]
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])
    with pytest.raises(ValueError, match="use_reentrant"):
        load_model(folder, ModelConfig(), allow_native=True).gradient_checkpointing_enable({"use_reentrant": True})


def test_recomputation_replays_the_dropout(tmp_path):
    """With attention dropout, the recomputed layer draws the forward's masks again (the CPU random state is
    restored): checkpointed gradients equal those of keeping every activation, from the same seed."""
    folder = _save_llama(tmp_path / "m", seed=8, attention_dropout=0.3)
    grads = []
    for checkpointed in (False, True):
        model = attach_adapter(load_model(folder, ModelConfig(), allow_native=True), AdapterConfig(block_sizes=(2,)))
        model.train()
        if checkpointed:
            model.gradient_checkpointing_enable()
        ids, mask = _inputs(seed=9)
        torch.manual_seed(10)
        logits = model(input_ids=ids, attention_mask=mask).logits
        (torch.log_softmax(logits, -1)[..., 2] * mask).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])


def test_native_asked_for_where_it_cannot_run_is_refused():
    from ropo_ray.config.schema import Config
    from ropo_ray.config.training import TrainConfig

    Config(model=ModelConfig(implementation="native"))  # the default adapter (ropo), CPU, no probe
    for train, adapter in ((TrainConfig(probe_prompts=2), AdapterConfig()),
                           (TrainConfig(use_gpu=True), AdapterConfig()), (TrainConfig(), AdapterConfig(type="lora"))):
        with pytest.raises(ConfigError, match="model.implementation"):
            Config(model=ModelConfig(implementation="native"), train=train, adapter=adapter)
    Config(train=TrainConfig(probe_prompts=2))  # auto: the probe's runs load transformers' model instead
