"""Typed config: YAML + dotted overrides, errors naming the key, every shipped YAML loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from ropo_ray.config import Config, ConfigError, load_config, save_config

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_build():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.adapter.type == "ropo" and cfg.loss.type == "dpo"


def test_yaml_then_dotted_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.5\n  epochs: 3\nloss:\n  beta: 0.2\n")
    cfg = load_config(path, ["train.lr=1e-4", "adapter.block_sizes=[2,4]", "adapter.target_modules=q_proj,v_proj"])
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)  # PyYAML reads "1e-4" as a string
    assert cfg.train.epochs == 3 and cfg.loss.beta == 0.2
    assert cfg.adapter.block_sizes == (2, 4)
    assert cfg.adapter.target_modules == ("q_proj", "v_proj")


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("train.lrr=1", "did you mean 'train.lr'"),
        ("trian.lr=1", "did you mean 'train'"),
        ("loss.beta=-1", "loss.beta: must be > 0"),
        ("adapter.block_sizes=[2,0]", "adapter.block_sizes: block size 0"),
        ("loss.type=dpoo", "did you mean 'dpo'"),
        ("train.epochs=1.5", "train.epochs: expected an integer"),
        ("train.lr=fast", "train.lr: expected float"),
        ("model.trust_remote_code=maybe", "model.trust_remote_code: expected true or false"),
        ("task.num_heads=8", "head_dim"),
        ("train.lr", "must look like section.key=value"),
        ("train.jemalloc_conf=dirty_decay_ms=-1", "train.jemalloc_conf: expected name:value options"),
        ("train.worker_niceness=-5", "train.worker_niceness: must be in 0-19"),
        ("train.worker_niceness=20", "train.worker_niceness: must be in 0-19"),
        ("model.attn_implementation=flash_attention_2", "train.shared_prompt: needs attention that applies a 4D"),
        ("train.pad_to_multiple=0", "train.pad_to_multiple: must be >= 1"),
    ],
)
def test_bad_input_names_the_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace("[", r"\[")):
        load_config(None, [override])


def test_shared_prompt_is_off_for_attention_without_4d_masks():
    cfg = load_config(None, ["model.attn_implementation=flash_attention_2", "train.shared_prompt=false"])
    assert not cfg.train.shared_prompt
    assert load_config().train.shared_prompt
    assert load_config(None, ["model.attn_implementation=sdpa"]).train.shared_prompt


def test_config_is_frozen():
    cfg = load_config()
    with pytest.raises(AttributeError):
        cfg.train.lr = 1.0  # type: ignore[misc]


def test_save_load_round_trip(tmp_path):
    cfg = load_config(None, ["loss.beta=0.3", "adapter.block_sizes=[4,8]", "tune.block_size_choices=[[2],[2,4]]"])
    save_config(cfg, tmp_path / "out.yaml")
    assert load_config(tmp_path / "out.yaml") == cfg


def test_every_shipped_yaml_loads():
    configs = sorted((ROOT / "pipelines" / "configs").rglob("*.yaml"))
    assert configs, "no YAML configs shipped under pipelines/configs"
    for path in configs:
        assert isinstance(load_config(path), Config), path


@pytest.mark.parametrize(
    ("yaml_text", "fragment"),
    [
        ("loss:\n  beta: -0.5\n", "loss.beta: must be > 0, got -0.5"),
        ("loss:\n  beta: 0\n", "loss.beta: must be > 0, got 0"),
        ("adapter:\n  block_sizes: [0]\n", "adapter.block_sizes: block size 0 must be an int >= 2"),
        ("adapter:\n  block_sizes: [4, 1]\n", "adapter.block_sizes: block size 1 must be an int >= 2"),
        ("data:\n  max_row_bytes: 0\n", "data.max_row_bytes: must be > 0"),
    ],
)
def test_out_of_range_values_in_a_yaml_file_name_the_key(tmp_path, yaml_text, fragment):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[")):
        load_config(path)


PYTHON_TAGS = [
    "train:\n  lr: !!python/object/apply:os.system [\"touch {marker}\"]\n",
    "!!python/object/apply:subprocess.check_call [[\"touch\", \"{marker}\"]]\n",
    "loss: !!python/object/new:os.system [\"touch {marker}\"]\n",
]


@pytest.mark.parametrize("text", PYTHON_TAGS)
def test_yaml_with_a_python_object_tag_is_refused_and_runs_nothing(tmp_path, text):
    """Only the safe loader reads configs: a Python tag is a ConfigError naming the file and the tag,
    and the command it carries never runs (the marker file it would create does not appear)."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    path.write_text(text.format(marker=marker))
    with pytest.raises(ConfigError, match=f"{path}: not a plain YAML config .*tag:yaml.org,2002:python/object"):
        load_config(path)
    assert not marker.exists()


def test_an_override_with_a_python_tag_is_a_plain_string(tmp_path):
    marker = tmp_path / "pwned"
    with pytest.raises(ConfigError, match="train.lr: expected float"):
        load_config(None, [f'train.lr=!!python/object/apply:os.system ["touch {marker}"]'])
    tagged = f"!!python/object/apply:os.system [touch {marker}]"
    assert load_config(None, [f"pipeline.run_dir={tagged}"]).pipeline.run_dir == tagged
    assert not marker.exists()
