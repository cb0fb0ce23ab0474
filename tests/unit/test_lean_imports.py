"""train.lean_imports (ropo_ray/train/lean.py): each check runs in a fresh interpreter, since what it changes is
the process's import state."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

MUON = "deepspeed.runtime.zero.muon.original_muon"


def run(script: str, timeout: float = 300) -> dict:
    """Run `script` in a fresh interpreter; it prints one JSON object last."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


TESTS = str(Path(__file__).resolve().parents[1])  # conftest.make_tiny_llama, imported by the scripts

LLAMA = f"""
    import json, sys, torch
    sys.path.insert(0, {TESTS!r})
    from conftest import make_tiny_llama
    model = make_tiny_llama()
    ids = torch.arange(12).reshape(2, 6)
    with torch.no_grad():
        logits = model(ids).logits
    maps = open("/proc/self/maps").read()
    from torch.utils._triton import has_triton_package
    out = {{"kept_out": kept_out, "triton_mapped": "libtriton" in maps, "has_triton": has_triton_package(),
           "dynamo": "torch._dynamo" in sys.modules, "logits": logits[0, :3, :4].tolist()}}
    print(json.dumps(out))
"""


def test_a_cpu_process_runs_a_llama_without_triton_and_gets_the_same_logits():
    lean = run("from ropo_ray.train.lean import keep_lean\n"
               "kept_out = keep_lean({'optimizer': {'type': 'AdamW'}}, use_gpu=False)\n" + textwrap.dedent(LLAMA))
    full = run("kept_out = []\n" + textwrap.dedent(LLAMA))
    assert lean["kept_out"] == ["triton", MUON]
    assert lean["dynamo"] and not lean["triton_mapped"] and not lean["has_triton"]
    assert lean["logits"] == full["logits"]  # the same model, same seed: nothing about the computation changed
    if importlib.util.find_spec("triton") is not None:  # installed here (vLLM's xgrammar): the saving is real
        assert full["triton_mapped"] and full["has_triton"]


def test_gpu_workers_keep_triton_and_a_muon_config_keeps_muon():
    out = run("""
        import json, sys
        from ropo_ray.train.lean import keep_lean
        gpu = keep_lean({"optimizer": {"type": "AdamW"}}, use_gpu=True)
        print(json.dumps({"gpu": gpu, "triton_marked": "triton" in sys.modules}))
    """)
    assert out == {"gpu": [MUON], "triton_marked": False}
    out = run("""
        import json
        from ropo_ray.train.lean import keep_lean
        print(json.dumps({"muon": keep_lean({"optimizer": {"type": "Muon"}}, use_gpu=False)}))
    """)
    assert out == {"muon": ["triton"]}


def test_the_muon_stand_in_answers_isinstance_and_hands_out_the_real_module_for_anything_else():
    out = run(f"""
        import json, sys, torch
        from ropo_ray.train.lean import answer_muon_without_importing_it
        assert answer_muon_without_importing_it({{}})
        assert not answer_muon_without_importing_it({{}})  # already in place
        from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam  # the real module, on the stand-in
        from {MUON} import muon_update  # as ZeRO's gradient reduction does on every step
        light = "torch._inductor.compile_fx" not in sys.modules
        try:
            MuonWithAuxAdam([{{"params": [torch.zeros(2, requires_grad=True)], "use_muon": False}}])
            refused = ""
        except RuntimeError as err:
            refused = str(err)
        import {MUON} as stand_in
        grad, m, v = torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor([1.0])
        update = stand_in.adam_update(grad, m, v, 1, (0.5, 0.75), 0.0)  # the real function, loaded now
        print(json.dumps({{"light": light, "refused": refused, "update": update.item(), "m": m.item(),
                          "v": v.item(), "ns_methods": sorted(stand_in.NS_METHODS),
                          "heavy_after": "torch._inductor.compile_fx" in sys.modules}}))
    """)
    assert out["light"]
    assert "train.lean_imports=false" in out["refused"]
    # Adam by hand, step 1, betas (0.5, 0.75): m = 1 + 0.5 (2 - 1) = 1.5, v = 1 + 0.25 (4 - 1) = 1.75;
    # bias-corrected 1.5 / 0.5 = 3 and 1.75 / 0.25 = 7, update 3 / sqrt(7).
    assert (out["m"], out["v"]) == (1.5, 1.75)
    assert out["update"] == pytest.approx(3 / 7 ** 0.5, rel=1e-6)
    assert out["ns_methods"] == ["gram", "standard"] and out["heavy_after"]


@pytest.mark.integration
def test_deepspeed_trains_a_ropo_model_the_same_with_lean_imports():
    """A ZeRO-2 bf16 engine (the bf16 optimizer asks isinstance(optimizer, MuonWithAuxAdam)) takes three steps
    on an adapted tiny Llama with and without lean imports: the same losses, and neither Triton nor Muon's
    compiler stack is loaded in the lean process."""
    script = """
        import json, os, socket, sys
        lean = {lean}
        from ropo_ray.config.schema import AdapterConfig, TrainConfig
        from ropo_ray.train.ds_config import deepspeed_config
        from ropo_ray.train.lean import keep_lean
        tc = TrainConfig(micro_batch_size=2, precision="bf16", zero_stage=2)
        ds_cfg = deepspeed_config(tc, 1)
        kept_out = keep_lean(ds_cfg, use_gpu=False) if lean else []
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        import deepspeed, torch
        deepspeed.init_distributed(dist_backend="gloo")
        sys.path.insert(0, {tests!r})
        from conftest import make_tiny_llama
        from ropo_ray.adapters.registry import attach_adapter
        model = attach_adapter(make_tiny_llama().to(torch.bfloat16), AdapterConfig()).train()
        engine, *_ = deepspeed.initialize(model=model, config=ds_cfg,
                                          model_parameters=[p for p in model.parameters() if p.requires_grad])
        torch.manual_seed(1)
        ids = torch.randint(0, 64, (2, 10))
        losses = []
        for _ in range(3):
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        print(json.dumps({{"kept_out": kept_out, "losses": losses, "optimizer": type(engine.optimizer).__name__,
                          "triton": "libtriton" in open("/proc/self/maps").read(),
                          "inductor_compile_fx": "torch._inductor.compile_fx" in sys.modules}}))
    """
    lean = run(script.format(lean=True, tests=TESTS))
    full = run(script.format(lean=False, tests=TESTS))
    assert lean["kept_out"] == ["triton", MUON]
    assert lean["optimizer"] == full["optimizer"]
    assert lean["losses"] == full["losses"] and lean["losses"][2] != lean["losses"][0]  # it trains, identically
    assert not lean["triton"] and not lean["inductor_compile_fx"]
    if importlib.util.find_spec("triton") is not None:
        assert full["triton"] and full["inductor_compile_fx"]
