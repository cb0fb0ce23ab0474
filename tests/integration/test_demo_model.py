"""The demo model build: a small TaskConfig trained into tmp_path, loaded back with plain transformers
in a separate interpreter that cannot import ropo_ray, then reused without retraining."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from ropo_ray.config.schema import TaskConfig
from ropo_ray.train.demo_model import _reusable, build_demo_model, task_fingerprint

SMALL = TaskConfig(num_entities=8, max_operand=10, num_sft_examples=800, fact_repeats=4, num_pairs=50,
                   num_heldout_prompts=16, num_layers=2, intermediate_size=128, sft_epochs=3, sft_batch_size=16)

# Runs in a fresh interpreter in which importing ropo_ray fails: only the folder's files count.
# It scores the folder's own task/sft.jsonl with transformers' own causal-LM loss (labels = -100 on
# the prompt), i.e. the completion NLL per token computed without any project code.
LOADER = textwrap.dedent("""
    import json, sys
    sys.modules["ropo_ray"] = None  # any import of the project now fails: only the folder's files count
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = sys.argv[1]
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    rows = [json.loads(line) for line in open(folder + "/task/sft.jsonl")][:256]
    losses, tokens = 0.0, 0
    for row in rows:
        prompt = tok.apply_chat_template(row["messages"][:1], tokenize=False, add_generation_prompt=True)
        p = tok.encode(prompt, add_special_tokens=False)
        c = tok.encode(row["messages"][1]["content"], add_special_tokens=False) + [tok.eos_token_id]
        ids = torch.tensor([p + c])
        labels = torch.tensor([[-100] * len(p) + c])
        with torch.no_grad():
            losses += float(model(input_ids=ids, labels=labels).loss) * len(c)
        tokens += len(c)
    out = model.generate(input_ids=torch.tensor([p]), max_new_tokens=24, do_sample=False)
    print(json.dumps({"loss": losses / tokens, "vocab": len(tok), "template": tok.chat_template,
                      "ids": [tok.pad_token_id, tok.bos_token_id, tok.eos_token_id],
                      "arch": model.config.architectures, "head_dim": model.config.head_dim,
                      "generated": tok.decode(out[0, len(p):])}))
""")


@pytest.mark.integration
def test_build_load_and_reuse(tmp_path):
    out_dir = tmp_path / "demo"
    logs: list[str] = []
    first = build_demo_model(SMALL, out_dir, log=logs.append)
    assert first["reused"] is False
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # no temporary folder left behind
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "demo_model.json"):
        assert (out_dir / name).is_file(), name
    assert not list(out_dir.glob("*.bin")) and not list(out_dir.glob("*.pt"))
    assert sum(line.startswith("sft epoch") for line in logs) == SMALL.sft_epochs

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", LOADER, str(out_dir)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert loaded["arch"] == ["LlamaForCausalLM"] and loaded["head_dim"] >= 32
    assert loaded["ids"] == [0, 1, 2] and "<|assistant|>" in loaded["template"]
    assert loaded["generated"].endswith("<|end|>")  # the model learned to stop
    # An untrained LM predicts about uniformly: ln(vocab) nats per token. SFT must have cut that down.
    uniform = math.log(loaded["vocab"])
    assert 0.8 * uniform < first["sample_loss_before_sft"] < 1.2 * uniform
    assert loaded["loss"] < 0.5 * uniform
    # The build scored the same 256 rows with the project's own sequence construction and mask:
    # equal to transformers' loss from the folder alone means both built the same ids and labels.
    assert loaded["loss"] == pytest.approx(first["sample_loss_after_sft"], rel=1e-4)
    assert first["sft_epoch_losses"][-1] < first["sft_epoch_losses"][0]

    mtime = (out_dir / "model.safetensors").stat().st_mtime_ns
    second = build_demo_model(SMALL, out_dir, log=logs.append)
    assert second["reused"] is True and second["fingerprint"] == first["fingerprint"]
    assert (out_dir / "model.safetensors").stat().st_mtime_ns == mtime
    assert {k: v for k, v in second.items() if k != "reused"} == {k: v for k, v in first.items() if k != "reused"}

    # A manifest of another config, or one whose weights are gone, is a miss, never a silent hit.
    stale = tmp_path / "stale"
    shutil.copytree(out_dir, stale)
    manifest = json.loads((stale / "demo_model.json").read_text())
    (stale / "demo_model.json").write_text(json.dumps({**manifest, "fingerprint": "0" * 64}))
    assert _reusable(stale, first["fingerprint"]) is None
    (stale / "demo_model.json").write_text(json.dumps(manifest))
    assert _reusable(stale, first["fingerprint"]) is not None
    (stale / "model.safetensors").unlink()
    assert _reusable(stale, first["fingerprint"]) is None


def test_fingerprint_changes_with_every_field():
    base = task_fingerprint(SMALL)
    assert task_fingerprint(dataclasses.replace(SMALL)) == base
    for f in dataclasses.fields(TaskConfig):
        value = getattr(SMALL, f.name)
        changed = value + 1 if isinstance(value, int) else value / 2
        kwargs = {f.name: changed}
        if f.name in ("num_heads", "num_kv_heads", "hidden_size"):
            kwargs = {"hidden_size": 256} if f.name == "hidden_size" else {"num_heads": 2, "num_kv_heads": 1}
        assert task_fingerprint(dataclasses.replace(SMALL, **kwargs)) != base, f.name
