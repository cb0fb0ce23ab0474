"""Keep libraries a training process never calls out of its memory (`train.lean_imports`).

Two imports set a CPU worker's memory floor without doing any of its work (measured with transformers 5.19,
torch 2.13, DeepSpeed 0.19; benchmarks/BENCHMARKS.md, session 14):

- Triton. Importing a Llama imports torch._dynamo (transformers' continuous-batching cache decorates a method
  with `torch.compiler.disable` at import), and torch._dynamo imports Triton whenever it is installed (here
  vLLM's xgrammar brings it). Triton compiles GPU kernels; on a CPU worker its 71 MiB (most of it libtriton's
  mapped code) are dead weight. `keep_out_triton` makes `import triton` fail the way it does where Triton is
  not installed, which torch handles (`torch.utils._triton.has_triton_package` is then False; torch.compile
  on CPU generates C++, not Triton).
- DeepSpeed's Muon optimizer. `deepspeed.initialize` and ZeRO's gradient reduction import Muon's modules on every
  run, to ask whether the optimizer is a `MuonWithAuxAdam` and to have `muon_update` at hand for parameters
  marked for Muon. `deepspeed.runtime.zero.muon.original_muon` torch.compile-decorates its kernels at import,
  which imports torch._inductor and networkx: 43 MiB. When the DeepSpeed config's optimizer is not Muon, no
  optimizer is a MuonWithAuxAdam and no parameter is marked; `answer_muon_without_importing_it` puts a module in
  original_muon's place whose `MuonWithAuxAdam` is a base class that refuses to be constructed (so the real
  muon_optimizer module still imports, and nothing is an instance of it), whose `muon_update` and
  `adam_update` call the real ones, and which hands out the real module's attribute for any other name
  (PEP 562 `__getattr__`): code that does use Muon still gets it, at the import cost it would have paid.

Both must run before the import they prevent (a worker calls `keep_lean` before loading the model).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
import types
from typing import Any

MUON_MODULE = "deepspeed.runtime.zero.muon.original_muon"
MUON_PACKAGE, _, MUON_NAME = MUON_MODULE.rpartition(".")


def keep_out_triton() -> bool:
    """Make `import triton` raise ModuleNotFoundError in this process. False when Triton is already imported
    (nothing to save then)."""
    if sys.modules.get("triton") is not None:
        return False
    sys.modules["triton"] = None  # type: ignore[assignment]  (the import system's "not importable" mark)
    return True


class _NotMuon:
    """Stands for DeepSpeed's Muon optimizer base in a process whose optimizer is not Muon: never constructed,
    so nothing is an instance of it or of the real muon_optimizer's subclass of it."""

    def __init__(self, *_args: Any, **_kwargs: Any) -> None:
        raise RuntimeError(f"train.lean_imports replaced {MUON_MODULE} in this process because the DeepSpeed "
                           "optimizer is not Muon; set train.lean_imports=false to use Muon")


def _forward(name: str) -> Any:
    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(_real_muon_module(), name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    return call


@functools.cache
def _real_muon_module() -> types.ModuleType:
    """The real Muon module, loaded under a private name (the stand-in keeps the public one)."""
    path = f"{list(importlib.import_module(MUON_PACKAGE).__path__)[0]}/{MUON_NAME}.py"
    spec = importlib.util.spec_from_file_location(f"{MUON_MODULE}._real", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def answer_muon_without_importing_it(ds_config: dict[str, Any]) -> bool:
    """Put the stand-in for DeepSpeed's Muon module in place when `ds_config`'s optimizer is not Muon. False
    when it is Muon, or the module is already imported."""
    optimizer = str(ds_config.get("optimizer", {}).get("type", "")).lower()
    if optimizer == "muon" or MUON_MODULE in sys.modules:
        return False
    stand_in = types.ModuleType(MUON_MODULE, "ropo_ray.train.lean's stand-in: the optimizer is not Muon")
    stand_in.MuonWithAuxAdam = _NotMuon  # type: ignore[attr-defined]
    stand_in.muon_update = _forward("muon_update")  # type: ignore[attr-defined]
    stand_in.adam_update = _forward("adam_update")  # type: ignore[attr-defined]

    def __getattr__(name: str) -> Any:  # any other name: the real module's
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(_real_muon_module(), name)

    stand_in.__getattr__ = __getattr__  # type: ignore[attr-defined]
    sys.modules[MUON_MODULE] = stand_in
    setattr(importlib.import_module(MUON_PACKAGE), MUON_NAME, stand_in)  # as the import system does for a loaded module
    return True


def keep_lean(ds_config: dict[str, Any], use_gpu: bool) -> list[str]:
    """What a training process keeps out, given its DeepSpeed config and device: Triton on CPU workers (GPU
    workers keep it for torch.compile), DeepSpeed's Muon module unless Muon is the optimizer. Returns the
    names of what was kept out."""
    kept_out = []
    if not use_gpu and keep_out_triton():
        kept_out.append("triton")
    if answer_muon_without_importing_it(ds_config):
        kept_out.append(MUON_MODULE)
    return kept_out
