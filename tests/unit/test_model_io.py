"""Model and tokenizer folders: refused with a message naming the folder before anything is loaded;
pickle weights only when explicitly allowed, and even then never executed; no remote code unless asked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ropo_ray.config.schema import ConfigError, ModelConfig
from ropo_ray.data.tokenizer import train_tokenizer
from ropo_ray.train.model_io import check_model_folder, load_model, load_tokenizer
from tests.conftest import make_tiny_llama

ROOT = Path(__file__).resolve().parents[2]
SAFE = ModelConfig()
ALLOW_PICKLE = ModelConfig(allow_pickle_weights=True)


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A real tiny Llama saved as safetensors, with its tokenizer (and chat template)."""
    folder = tmp_path_factory.mktemp("tiny")
    tokenizer = train_tokenizer(["What is 2 + 2? It is 4.", "Hello there."] * 10, 300)
    make_tiny_llama(vocab=len(tokenizer)).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def _copy_without_weights(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if not f.name.endswith(".safetensors"):
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_a_folder_without_config_json_is_named(tmp_path):
    with pytest.raises(ConfigError, match=f"model.path: {tmp_path} is not a model folder"):
        check_model_folder(tmp_path, SAFE)


def test_a_folder_without_any_weights_is_named(model_folder, tmp_path):
    folder = _copy_without_weights(model_folder, tmp_path / "empty")
    with pytest.raises(ConfigError, match=f"model.path: {folder} holds no \\*.safetensors weights"):
        load_model(folder, SAFE)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "last.ckpt"])
def test_pickle_only_folders_are_refused_unless_allowed(model_folder, tmp_path, name):
    folder = _copy_without_weights(model_folder, tmp_path / "pickled")
    torch.save({"w": torch.zeros(1)}, folder / name)
    with pytest.raises(ConfigError, match=f"{folder} has only pickle-based weights \\({name}\\).*"
                                          "model.allow_pickle_weights=true"):
        check_model_folder(folder, SAFE)
    assert check_model_folder(folder, ALLOW_PICKLE) == folder  # the explicit allow


def test_allowed_pickle_weights_load_as_tensors(model_folder, tmp_path):
    """With the allow, a genuine pytorch_model.bin loads (the same weights as the safetensors)."""
    folder = _copy_without_weights(model_folder, tmp_path / "bin")
    reference = load_model(model_folder, SAFE)
    torch.save(reference.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(ConfigError):
        load_model(folder, SAFE)
    loaded = load_model(folder, ALLOW_PICKLE)
    for (name, a), b in zip(reference.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


class _RunsCode:
    """Unpickling this calls os.system: what a malicious pytorch_model.bin does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_allowed_pickle_weights_never_execute_code(model_folder, tmp_path):
    """Even with model.allow_pickle_weights, loading is weights_only: a pickle that would run a command
    is refused and the command never runs (shown with the marker file it would create)."""
    folder = _copy_without_weights(model_folder, tmp_path / "evil")
    marker = tmp_path / "pwned"
    torch.save({"model.embed_tokens.weight": _RunsCode(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(Exception, match="(?i)weights.only|unpickl|Unsupported global"):
        load_model(folder, ALLOW_PICKLE)
    assert not marker.exists()


def _tokenizer_without_template(model_folder: Path, folder: Path) -> Path:
    """The tiny model's tokenizer saved to `folder` with its chat template removed."""
    tokenizer = load_tokenizer(model_folder, SAFE)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(str(folder))
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    return folder


def test_a_tokenizer_without_chat_template_is_named(model_folder, tmp_path):
    folder = _tokenizer_without_template(model_folder, tmp_path / "tok")
    with pytest.raises(ConfigError, match=f"model.tokenizer_path: the tokenizer at {folder} has no chat template"):
        load_tokenizer(folder, SAFE)


def test_prepare_refuses_a_tokenizer_without_chat_template_before_any_work(model_folder, tmp_path):
    """prepare() checks the tokenizer in the driver, before Ray Data or any output folder."""
    from ropo_ray.config import load_config
    from ropo_ray.data.prepare import prepare

    folder = _tokenizer_without_template(model_folder, tmp_path / "tok")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "Q", "chosen": "A", "rejected": "B"}) + "\n")
    out = tmp_path / "run" / "data"
    with pytest.raises(ConfigError, match=f"the tokenizer at {folder} has no chat template"):
        prepare(load_config(), str(folder), out, files=(str(pairs),))
    assert not out.parent.exists()


def test_the_pipeline_refuses_a_bad_model_or_tokenizer_folder_before_ray(model_folder, tmp_path):
    """runs.resolve_model (the pipeline's first stage, before connect_ray) checks a configured folder."""
    import ray

    from ropo_ray.config import load_config
    from ropo_ray.runs import resolve_model

    ray_before = ray.is_initialized()  # other tests of the session may have started Ray already
    weightless = _copy_without_weights(model_folder, tmp_path / "weightless")
    with pytest.raises(ConfigError, match=f"model.path: {weightless} holds no"):
        resolve_model(load_config(None, [f"model.path={weightless}"]))
    no_template = _tokenizer_without_template(model_folder, tmp_path / "tok")
    with pytest.raises(ConfigError, match=f"the tokenizer at {no_template} has no chat template"):
        resolve_model(load_config(None, [f"model.path={model_folder}", f"model.tokenizer_path={no_template}"]))
    assert resolve_model(load_config(None, [f"model.path={model_folder}"])) == model_folder
    assert ray.is_initialized() == ray_before  # resolve_model never starts Ray


# ---- remote code ---------------------------------------------------------------------------------------

REMOTE_CODE = """
from pathlib import Path
Path({marker!r}).touch()
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
class EvilConfig(LlamaConfig):
    model_type = "llama"
class EvilModel(LlamaForCausalLM):
    config_class = EvilConfig
class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""


def _remote_code_folder(model_folder: Path, folder: Path, marker: Path) -> Path:
    """The tiny model whose config.json and tokenizer_config.json point (auto_map) at a code file
    that creates `marker` when imported."""
    folder.mkdir()
    for f in model_folder.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "evil.py").write_text(REMOTE_CODE.format(marker=str(marker)))
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    tok_config["auto_map"] = {"AutoTokenizer": [None, "evil.EvilTokenizer"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config))
    return folder


LOAD_BOTH = """
import sys
from ropo_ray.config.schema import ModelConfig
from ropo_ray.train.model_io import load_model, load_tokenizer
cfg = ModelConfig(trust_remote_code=sys.argv[2] == "true")
load_tokenizer(sys.argv[1], cfg)
load_model(sys.argv[1], cfg)
"""


@pytest.mark.parametrize("trust", ["false", "true"])
def test_remote_code_runs_only_when_trusted(model_folder, tmp_path, trust):
    """load_model and load_tokenizer of a folder whose auto_map names code that would create a marker:
    with the default (false) both load the built-in Llama classes and the code never runs; with
    model.trust_remote_code=true it does run (so the folder is a real test of the setting).
    In a subprocess with its own HF_MODULES_CACHE, so no remote module lands in the user's cache."""
    assert ModelConfig().trust_remote_code is False
    marker = tmp_path / "remote-code-ran"
    folder = _remote_code_folder(model_folder, tmp_path / "remote", marker)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", LOAD_BOTH, str(folder), trust], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert marker.exists() == (trust == "true")


@pytest.mark.parametrize(("setting", "bf16", "gpu", "expected"), [
    ("auto", True, False, "eager"),  # bf16 on the CPU: the eager kernel (BENCHMARKS.md, training step)
    ("auto", False, False, "sdpa"),  # otherwise transformers' default
    ("auto", True, True, "sdpa"),
    ("sdpa", True, False, "sdpa"),  # an explicit setting is used as given
    ("eager", False, False, "eager"),
])
def test_attention_kernel_follows_the_setting_and_compute(model_folder, setting, bf16, gpu, expected):
    model = load_model(model_folder, ModelConfig(attn_implementation=setting), bf16=bf16, gpu=gpu)
    assert model.config._attn_implementation == expected


def test_eager_and_sdpa_attention_compute_the_same_logits(model_folder):
    """The kernel choice changes speed, not the function: same logits on a padded batch."""
    ids = torch.tensor([[5, 6, 7, 8, 9], [0, 0, 5, 6, 7]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    eager, sdpa = (load_model(model_folder, ModelConfig(attn_implementation=k)) for k in ("eager", "sdpa"))
    with torch.no_grad():
        a, b = (m(input_ids=ids, attention_mask=mask).logits for m in (eager, sdpa))
    torch.testing.assert_close(a[mask.bool()], b[mask.bool()], rtol=1e-5, atol=1e-5)


def _transformers_load(folder: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).eval()


@pytest.mark.parametrize(("tied", "shard"), [(False, None), (True, None), (False, "60KB")])
@pytest.mark.parametrize("bf16", [False, True])
def test_streamed_weights_equal_transformers_loader(tmp_path, tied, shard, bf16):
    """load_model reads safetensors tensor by tensor (stream_safetensors): every parameter and buffer is the
    one transformers' own loader gives, bit for bit, in fp32 and straight into bf16; tied embeddings stay one
    tensor; a checkpoint sharded over several files (with its index) loads whole."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ropo_ray.train.model_io import stream_safetensors

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied)
    folder = tmp_path / "model"
    LlamaForCausalLM(config).save_pretrained(str(folder), **({"max_shard_size": shard} if shard else {}))
    files = len(list(folder.glob("*.safetensors")))
    assert files == 1 if shard is None else files > 1
    dtype = torch.bfloat16 if bf16 else torch.float32
    streamed = stream_safetensors(folder, SAFE, dtype, None)
    assert streamed is not None
    reference = _transformers_load(folder, dtype)
    ours, theirs = streamed.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert ours[name].dtype == dtype and torch.equal(ours[name], tensor), name
    assert dict(streamed.named_buffers()).keys() == dict(reference.named_buffers()).keys()
    for name, buf in reference.named_buffers():
        assert torch.equal(dict(streamed.named_buffers())[name], buf), name
    same = streamed.lm_head.weight.data_ptr() == streamed.model.embed_tokens.weight.data_ptr()
    assert same == tied
    ids = torch.tensor([[3, 9, 27, 81, 5]])
    with torch.no_grad():
        assert torch.equal(streamed(ids).logits, reference(ids).logits)
    loaded = load_model(folder, SAFE, bf16=bf16).state_dict()  # the path load_model takes
    assert all(loaded[k].dtype == dtype and torch.equal(loaded[k], v) for k, v in theirs.items())


def test_a_checkpoint_that_is_not_the_models_parameters_is_left_to_transformers(model_folder, tmp_path):
    """An extra tensor, a renamed one or another shape: stream_safetensors declines (None), so transformers'
    loader, with its renaming and conversions, decides what the folder means."""
    from safetensors.torch import load_file, save_file

    from ropo_ray.train.model_io import stream_safetensors

    weights = load_file(str(model_folder / "model.safetensors"))
    name = next(k for k in weights if k.endswith("q_proj.weight"))
    variants = {
        "extra": {**weights, "model.unknown.weight": torch.zeros(2)},
        "renamed": {**{k: v for k, v in weights.items() if k != name}, name.replace("q_proj", "query"): weights[name]},
        "reshaped": {**weights, name: weights[name][:-1].contiguous()},
    }
    for label, tensors in variants.items():
        folder = _copy_without_weights(model_folder, tmp_path / label)
        save_file(tensors, str(folder / "model.safetensors"))
        assert stream_safetensors(folder, SAFE, torch.float32, None) is None, label


def test_a_truncated_safetensors_file_is_named(model_folder, tmp_path):
    folder = _copy_without_weights(model_folder, tmp_path / "cut")
    data = (model_folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=f"{folder / 'model.safetensors'}: tensor .* is cut short"):
        load_model(folder, SAFE)


def test_bf16_on_a_cpu_without_native_bf16_is_warned(monkeypatch):
    """The warning follows what oneDNN reports for this CPU; fp32 and GPU runs are never warned."""
    from ropo_ray.train import model_io

    for native in (True, False):
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda native=native: native)
        warning = model_io.cpu_bf16_warning(True, False)
        assert (warning is None) == native
        assert native or "train.precision=fp32" in warning
        assert model_io.cpu_bf16_warning(False, False) is None and model_io.cpu_bf16_warning(True, True) is None
