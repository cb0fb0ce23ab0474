"""Paths from configs are used as given, never handed to a shell: a static check of the package and
real files whose names hold shell metacharacters."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ropo_ray.config import ConfigError, load_config, save_config
from ropo_ray.config.schema import DataConfig
from ropo_ray.data.sources import InputError, resolve_inputs
from ropo_ray.storage import Store

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "ropo_ray"
SHELL_CALLS = {("os", "system"), ("os", "popen"), ("subprocess", "getoutput"), ("subprocess", "getstatusoutput")}


def shell_uses(source: str) -> list[str]:
    """Calls in `source` that run a shell: os.system / os.popen / subprocess.getoutput(...), or any call
    with shell=<anything but a literal False>."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and (
                func.value.id, func.attr) in SHELL_CALLS:
            found.append(f"line {node.lineno}: {func.value.id}.{func.attr}")
        for kw in node.keywords:
            if kw.arg == "shell" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                found.append(f"line {node.lineno}: shell={ast.unparse(kw.value)}")
    return found


def test_the_check_finds_each_shell_use_in_a_mutated_source():
    source = (PACKAGE / "adapters" / "native.py").read_text()
    assert shell_uses(source) == []
    mutated = source.replace("capture_output=True, text=True)", "capture_output=True, text=True, shell=True)")
    assert mutated != source and len(shell_uses(mutated)) == 1
    assert shell_uses("import os\nos.system('ls')\nos.popen('ls')\n") == ["line 2: os.system", "line 3: os.popen"]
    assert shell_uses("import subprocess as s\ns.run('ls', shell=flag)\n") == ["line 2: shell=flag"]
    assert shell_uses("import subprocess\nsubprocess.run(['ls'], shell=False)\n") == []


def test_no_module_runs_a_shell():
    modules = sorted(PACKAGE.rglob("*.py"))
    assert len(modules) > 30
    uses = {str(m.relative_to(ROOT)): shell_uses(m.read_text()) for m in modules}
    assert {m: u for m, u in uses.items() if u} == {}


# ---- paths with shell metacharacters, as real files ----------------------------------------------------

NASTY = ["a; touch pwned; .jsonl", "b$(touch pwned).jsonl", "c`touch pwned`.jsonl", "d with  spaces.jsonl",
         "e'\"|&>x<.jsonl"]
ROW = {"prompt": "Q", "chosen": "A", "rejected": "B"}


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Work in tmp_path, so a `touch pwned` that a shell ran would create tmp_path/pwned."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_input_files_with_metacharacters_are_read_as_named(in_tmp):
    for name in NASTY:
        (in_tmp / name).write_text(json.dumps(ROW) + "\n")
    files = resolve_inputs(tuple(str(in_tmp / n) for n in NASTY) + (f"file://{in_tmp}/*.jsonl",), DataConfig())
    assert [f.uri for f in files] == [str(in_tmp / n) for n in NASTY]  # each once, named as given
    missing = str(in_tmp / "gone; touch pwned $(touch pwned).jsonl")
    with pytest.raises(InputError) as err:
        resolve_inputs((missing,), DataConfig())
    assert str(err.value) == f"data.train_files: {missing} does not exist"
    assert not (in_tmp / "pwned").exists()


def test_store_paths_with_metacharacters_are_used_as_given(in_tmp):
    run = Store(in_tmp / "run $(touch pwned); `touch pwned`")
    run.child("data; touch pwned", "manifest.json").write_json({"n": 1})
    assert json.loads((in_tmp / "run $(touch pwned); `touch pwned`" / "data; touch pwned" / "manifest.json")
                      .read_text()) == {"n": 1}
    scratch = run.child("out | touch pwned").scratch()
    scratch.child("m.json").write_text("{}")
    run.child("out | touch pwned").publish_from(scratch, "m.json")
    assert [p.name for p in run.child("out | touch pwned").files()] == ["m.json"]
    cfg_path = in_tmp / "cfg $(touch pwned).yaml"
    save_config(load_config(None, ["loss.beta=0.3"]), cfg_path)
    assert load_config(cfg_path).loss.beta == 0.3
    with pytest.raises(ConfigError, match=f"--config: {in_tmp}/missing; touch pwned.yaml is not a file"):
        load_config(in_tmp / "missing; touch pwned.yaml")
    assert not (in_tmp / "pwned").exists()


KERNEL_BUILD = """
import sys
from ropo_ray.adapters import native
ok, why = native.available()
print(ok, why)
"""


def test_kernel_build_takes_paths_and_compiler_as_given(in_tmp):
    """The native kernel is compiled with an argument list: a cache folder full of metacharacters is
    just a folder, and a CC holding a command line is one (missing) program name, reported as given."""
    cache = in_tmp / "k; touch pwned $(touch pwned) `touch pwned`"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ROPO_RAY_KERNEL_CACHE": str(cache)}
    env.pop("CC", None)
    built = subprocess.run([sys.executable, "-c", KERNEL_BUILD], env=env, cwd=in_tmp, capture_output=True,
                           text=True, timeout=300)
    assert built.stdout.startswith("True"), built.stdout + built.stderr
    assert [p.suffix for p in cache.iterdir()] == [".so"]
    env["CC"] = "cc; touch pwned"
    refused = subprocess.run([sys.executable, "-c", KERNEL_BUILD], env=env, cwd=in_tmp, capture_output=True,
                             text=True, timeout=300)
    assert refused.stdout.startswith("False no C compiler 'cc; touch pwned' on PATH"), refused.stdout
    assert not (in_tmp / "pwned").exists()
