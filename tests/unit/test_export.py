"""Exports: the streamed safetensors writer against the safetensors library's own reader, and the RoPO merge
written tensor by tensor from the model folder against the merge of a whole in-memory model."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ropo_ray.adapters.inject import ropo_layers
from ropo_ray.adapters.registry import attach_adapter
from ropo_ray.config import load_config
from ropo_ray.data.tokenizer import train_tokenizer
from ropo_ray.runs import export_run, export_streamed
from ropo_ray.train.model_io import load_model, write_safetensors
from tests.conftest import make_tiny_llama


def test_written_file_reads_back_with_the_safetensors_library(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"a.weight": torch.randn(3, 5, generator=g), "b": torch.randn(7, generator=g).to(torch.bfloat16),
               "c.half": torch.randn(2, 3, 4, generator=g).to(torch.float16), "d.one": torch.tensor([2.5])}
    layout = [(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    size = write_safetensors(tmp_path / "x.safetensors", layout, iter(tensors.values()), {"format": "pt"})
    assert size == 3 * 5 * 4 + 7 * 2 + 24 * 2 + 4  # bytes of tensor data, counted by hand
    back = load_file(str(tmp_path / "x.safetensors"))
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t)
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    header_length = int.from_bytes((tmp_path / "x.safetensors").read_bytes()[:8], "little")
    assert header_length % 8 == 0


def test_a_tensor_unlike_its_header_entry_is_named(tmp_path):
    layout = [("w", torch.float32, (2, 2)), ("v", torch.float32, (3,))]
    with pytest.raises(ValueError, match=r"tensor v is torch.bfloat16 \(3,\), its header says torch.float32"):
        write_safetensors(tmp_path / "x.safetensors", layout, iter([torch.zeros(2, 2), torch.zeros(3).bfloat16()]))
    with pytest.raises(ValueError):  # one tensor fewer than the header announces
        write_safetensors(tmp_path / "y.safetensors", layout, iter([torch.zeros(2, 2)]))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny Llama saved whole and in shards, with a tokenizer."""
    root = tmp_path_factory.mktemp("export")
    tokenizer = train_tokenizer(["What is 2 + 2? It is 4.", "Hello there."] * 10, 300)
    model = make_tiny_llama(vocab=len(tokenizer))
    for name, shard in (("whole", "1GB"), ("sharded", "40KB")):
        model.save_pretrained(str(root / name), max_shard_size=shard)
        tokenizer.save_pretrained(str(root / name))
    assert (root / "sharded" / "model.safetensors.index.json").is_file()
    return root, tokenizer


def _trained(folder: Path, cfg):
    """The model as a worker holds it after training: RoPO attached, rotations and magnitudes moved away
    from the identity (so the merge changes every adapted weight)."""
    model = attach_adapter(load_model(folder, cfg.model), cfg.adapter)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in ropo_layers(model).values():
            for p in layer.rotation:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            layer.magnitude.mul_(1 + 0.2 * torch.randn(layer.magnitude.shape, generator=g))
    return model


@pytest.mark.parametrize("layout", ["whole", "sharded"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_streamed_merge_equals_the_whole_model_merge(folders, tmp_path, layout, dtype):
    root, tokenizer = folders
    folder = root / layout
    cfg = load_config(None, [f"model.dtype={dtype}"])
    model = _trained(folder, cfg)
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert export_streamed(folder, list(ropo_layers(model)), trainable, tokenizer, cfg, tmp_path / "streamed",
                           {"step": 3}) == tmp_path / "streamed"
    export_run(copy.deepcopy(model), tokenizer, cfg, tmp_path / "whole", {"step": 3})
    streamed_files = sorted(p.name for p in (tmp_path / "streamed" / "merged").glob("*.safetensors"))
    assert streamed_files == sorted(p.name for p in folder.glob("*.safetensors"))  # the source's shards
    streamed = {k: v for f in streamed_files for k, v in load_file(str(tmp_path / "streamed" / "merged" / f)).items()}
    whole = {k: v for f in (tmp_path / "whole" / "merged").glob("*.safetensors") for k, v in load_file(str(f)).items()}
    assert set(streamed) == set(whole)
    for name, tensor in whole.items():
        assert streamed[name].dtype == tensor.dtype == getattr(torch, dtype)
        assert torch.equal(streamed[name], tensor), name
    base = load_model(folder, cfg.model).state_dict()
    changed = [n for n in whole if not torch.equal(whole[n], base[n])]
    assert sorted(changed) == sorted(f"{layer}.weight" for layer in ropo_layers(model))
    config = json.loads((tmp_path / "streamed" / "merged" / "config.json").read_text())
    assert config["dtype"] == dtype
    if layout == "sharded":
        index = json.loads((tmp_path / "streamed" / "merged" / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(whole)
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in whole.values())
    # the merged folder loads as a plain model that computes what the adapted model computes
    merged = load_model(tmp_path / "streamed" / "merged", cfg.model)
    ids = torch.randint(0, len(tokenizer), (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, got = model(input_ids=ids).logits.float(), merged(input_ids=ids).logits.float()
    assert torch.allclose(got, want, atol=1e-4 if dtype == "float32" else 0.1)
    assert set(load_file(str(tmp_path / "streamed" / "adapter.safetensors"))) == set(trainable)


def test_a_folder_without_the_adapted_weights_is_left_to_the_whole_model_export(folders, tmp_path):
    root, tokenizer = folders
    cfg = load_config(None, [])
    model = _trained(root / "whole", cfg)
    trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    layers = [f"renamed.{name}" for name in ropo_layers(model)]
    assert export_streamed(root / "whole", layers, trainable, tokenizer, cfg, tmp_path / "out", {}) is None
    assert not (tmp_path / "out").exists()


def test_trained_parameters_unlike_the_adapter_settings_are_named(folders, tmp_path):
    root, tokenizer = folders
    cfg = load_config(None, [])
    model = _trained(root / "whole", cfg)
    trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    other = load_config(None, ["adapter.block_sizes=[2,4]"])  # two factors, where the model was trained with three
    want = (r"trained parameters of model.layers.0.self_attn.\w+ are \['magnitude', 'rotation.0', 'rotation.1', "
            r"'rotation.2'\]; a RoPO layer with adapter.block_sizes=\[2, 4\]")
    with pytest.raises(ValueError, match=want):
        export_streamed(root / "whole", list(ropo_layers(model)), trainable, tokenizer, other, tmp_path / "o", {})
