"""Training step: ropo-ray (RoPO + cached reference log-probs + DeepSpeed) vs TRL's DPOTrainer with peft LoRA.

    python benchmarks/bench_train.py [--repeats 3] [--steps 8] [--warmup 2] [--out benchmarks/results/train.json]

One ~49M-parameter Llama-shaped model (random init, the built-in task's tokenizer), the same preference
pairs (the built-in task's pairs, each prompt filled with earlier exchanges so the longer sequence of a
pair is `--seq-len` tokens) and the same batch (`--batch` pairs per step) on every side:

- trl:       TRL's DPOTrainer + LoRA from TRL's own defaults (`get_peft_config(ModelConfig(use_peft=True))`),
             DPOConfig defaults except batch size, max_steps and bf16=False (fp32), so gradient checkpointing
             is on and the reference forward runs every step (no precompute), as TRL does by default;
- trl_nogc:  the same with gradient_checkpointing=False (TRL's fastest setting here, for context);
- ropo_fp32: the RoPO adapter (AdapterConfig defaults) through `deepspeed.initialize` (world size 1, gloo,
             TrainConfig defaults: ZeRO-2, AdamW) running `preference_step` + engine.backward + engine.step,
             exactly what a Ray Train worker runs per micro-batch, on rows carrying cached reference log-probs;
- ropo_bf16: the same with train.precision=bf16;
- ropo_worker: the product itself, `ropo-ray train` (--worker-precision, activation checkpointing) in a Ray Train
             worker on a local Ray cluster: the worker's own peak RSS (export included) and pairs/s from its
             metrics;
- base:      the model with every weight frozen and the embedding output requiring grad, forward + DPO loss +
             backward (no optimizer): the reference for the RoPO layer's overhead and for MFU.

The RoPO sides run on `--ropo-allocator` (the default train.allocator: what a Ray Train worker runs on),
TRL and the base on glibc's malloc; an extra pass measures every side's peak RSS on the other allocator.
Each side runs in its own process (`--side`), so its peak RSS is its own; the sides run one after the other
in each repeat (order rotated per repeat), so ratios compare like with like on a noisy machine. Step times
are the wall-clock between the ends of consecutive steps after `--warmup` steps (data collation included).
The reference log-probs are computed once up front (their time is reported, not part of any step): that is
what the cache stage does. MFU counts the FLOPs the step must do (`ropo_ray.train.flops`) against matmul
ceilings measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import benchlib
from benchlib import load_json, machine_busy_seconds, versions, wait_for_quiet

from ropo_ray.config.inputs import ModelConfig
from ropo_ray.config.training import TrainConfig
from ropo_ray.train.allocator import worker_env

SIDES = ("trl", "trl_nogc", "ropo_fp32", "ropo_bf16", "ropo_bf16_gc", "ropo_worker", "base")
EXTRA_SIDES = ("ropo_fp32_gc", "ropo_fp32_profile", "ropo_bf16_profile",  # for bench_step.py and one-off checks
               "ropo_overhead_fp32", "ropo_overhead_bf16")


# ----------------------------------------------------------------------------------------------- helpers


def peak_rss_mib() -> dict[str, float]:
    """Peak RSS of this process, MiB: VmHWM (this address space since exec) and ru_maxrss; and VmRSS, the
    resident memory now.

    ru_maxrss of a process started by a bigger parent can report the parent's peak (Linux carries the
    high-water mark across fork + exec); VmHWM cannot, so VmHWM is the figure used.
    """
    status = {}
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith(("VmHWM:", "VmRSS:")):
                status[line.split(":")[0].lower()] = int(line.split()[1]) / 1024
    return {**status, "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Window:
    """Marks the timed window; reports how many cores this process and every other process used during it."""

    def __init__(self) -> None:
        self.marks: list[tuple[float, float, float]] = []

    def mark(self) -> None:
        self.marks.append((time.perf_counter(), machine_busy_seconds(), own_cpu_seconds()))

    def contention(self) -> dict[str, float]:
        (w0, b0, o0), (w1, b1, o1) = self.marks[0], self.marks[-1]
        return {"own_cores": (o1 - o0) / (w1 - w0), "other_cores": max(0.0, (b1 - b0) - (o1 - o0)) / (w1 - w0)}


def step_record(step_ends: list[float], warmup: int, batch: int, sizes: list[tuple[int, int]]) -> dict:
    """Timed window = end of the last warm-up step to the end of the last step."""
    timed = step_ends[warmup:]
    window = timed[-1] - step_ends[warmup - 1] if warmup > 0 else timed[-1] - timed[0]
    steps = len(timed) if warmup > 0 else len(timed) - 1
    sized = sizes[warmup:warmup + steps] if warmup > 0 else sizes[1:]
    return {
        "steps": steps, "seconds": window, "step_seconds": window / steps,
        "pairs_per_s": steps * batch / window,
        "tokens": sum(t for t, _ in sized), "sum_length_sq": sum(s for _, s in sized),
        "tokens_per_s": sum(t for t, _ in sized) / window,
        "step_ends": step_ends,
    }


# ----------------------------------------------------------------------------------------------- data


def fill_prompt(tokenizer, question: str, context: str, room: int) -> list[dict]:
    """A one-turn prompt: as much of `context` (cut from its start) as fits `room` prompt tokens, then the question."""
    from ropo_ray.data.tokenize import encode_prompt

    def messages(start: int) -> list[dict]:
        text = f"Earlier: {context[start:].lstrip()}\nNow: {question}" if start < len(context) else question
        return [{"role": "user", "content": text}]

    lo, hi = 0, len(context)  # smallest start whose prompt fits (length falls as the start moves right)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(encode_prompt(tokenizer, messages(mid))) <= room:
            hi = mid
        else:
            lo = mid + 1
    return messages(lo)


def build_pairs(tokenizer, task_pairs: list[dict], count: int, seq_len: int) -> tuple[list[dict], list[dict]]:
    """`count` tokenised rows and the same pairs as text for TRL (prompt rendered with the chat template)."""
    from ropo_ray.data.tokenize import encode_completion, encode_prompt

    rows, texts = [], []
    for i in range(count):
        pair = task_pairs[i]
        chosen, rejected = encode_completion(tokenizer, pair["chosen"]), encode_completion(tokenizer, pair["rejected"])
        others = [task_pairs[count + (7 * i + k) % (len(task_pairs) - count)] for k in range(8)]
        context = " ".join(f"{p['prompt']} {p['chosen']}" for p in others)
        msgs = fill_prompt(tokenizer, pair["prompt"], context, seq_len - max(len(chosen), len(rejected)))
        rows.append({"prompt_ids": encode_prompt(tokenizer, msgs), "chosen_ids": chosen, "rejected_ids": rejected})
        texts.append({"prompt": tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
                      "chosen": pair["chosen"], "rejected": pair["rejected"], "messages": msgs})
    return rows, texts


def side_prepare(args: argparse.Namespace) -> dict:
    """Build and save the model, the pairs and their reference log-probs (the cache's job, done once)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from ropo_ray.config import load_config
    from ropo_ray.refcache.compute import reference_logps
    from ropo_ray.runs import resolve_model

    torch.set_num_threads(args.threads)
    demo_dir = resolve_model(load_config(None, []), log=lambda s: None)
    tokenizer = AutoTokenizer.from_pretrained(str(demo_dir))
    task_pairs = [json.loads(x) for x in (demo_dir / "task" / "pairs.jsonl").read_text().splitlines() if x.strip()]
    count = args.batch * (args.warmup + args.steps)
    rows, texts = build_pairs(tokenizer, task_pairs, count, args.seq_len)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64,
                         intermediate_size=args.intermediate, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    model_dir = args.work / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    t0 = time.perf_counter()
    refs = reference_logps(model, rows, tokenizer.pad_token_id, batch_size=32)
    ref_seconds = time.perf_counter() - t0
    for row, ref in zip(rows, refs):
        row.update(ref_chosen_logps=ref["ref_chosen_logps"], ref_rejected_logps=ref["ref_rejected_logps"])
    (args.work / "rows.json").write_text(json.dumps(rows))
    (args.work / "texts.json").write_text(json.dumps([{k: v for k, v in t.items() if k != "messages"} for t in texts]))
    with (args.work / "pairs.jsonl").open("w") as f:  # for ropo_worker: the messages schema, templated by the product
        for t in texts:
            f.write(json.dumps({k: t["messages"] + [{"role": "assistant", "content": t[k]}]
                                for k in ("chosen", "rejected")}) + "\n")
    longest = [len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in rows]
    real = [2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows]
    return {
        "parameters": sum(p.numel() for p in model.parameters()), "vocab_size": len(tokenizer),
        "config": {k: getattr(config, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                   "num_key_value_heads", "intermediate_size", "vocab_size")},
        "pairs": count, "longest_sequence_per_pair": {"min": min(longest), "max": max(longest)},
        "real_tokens_per_pair_mean": statistics.mean(real),
        "reference_logps_seconds": ref_seconds, "reference_logps_pairs_per_s": count / ref_seconds,
    }


# ----------------------------------------------------------------------------------------------- sides


def side_trl(args: argparse.Namespace, checkpointing: bool = True) -> dict:
    """TRL's DPOTrainer with LoRA at TRL's defaults, fp32; step ends recorded by a callback."""
    import datasets
    import torch
    import trl
    from transformers import AutoTokenizer, LlamaForCausalLM, TrainerCallback

    from ropo_ray.train.flops import batch_sizes

    torch.set_num_threads(args.threads)
    after_imports = peak_rss_mib()
    model_dir = args.work / "model"
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    dataset = datasets.Dataset.from_list(load_json(args.work / "texts.json"))
    step_ends: list[float] = []
    sizes: list[tuple[int, int]] = []
    window = Window()

    class StepEnds(TrainerCallback):
        def on_step_end(self, *_args, **_kwargs):
            step_ends.append(time.perf_counter())
            if len(step_ends) in (args.warmup, args.warmup + args.steps):
                window.mark()

    config = trl.DPOConfig(output_dir=str(args.work / "trl-out"), per_device_train_batch_size=args.batch,
                           max_steps=args.warmup + args.steps, bf16=False, gradient_checkpointing=checkpointing,
                           report_to="none", save_strategy="no", disable_tqdm=True)
    trainer = trl.DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=trl.get_peft_config(trl.ModelConfig(use_peft=True)), callbacks=[StepEnds()])
    collate = trainer.data_collator

    def counting_collator(examples):  # batches are collated in the order the steps consume them
        batch = collate(examples)
        sizes.append(batch_sizes(batch["attention_mask"]))
        return batch

    trainer.data_collator = counting_collator
    rows = load_json(args.work / "rows.json")
    prepared = trainer.train_dataset
    same_ids = all(prepared[i]["prompt_ids"] == r["prompt_ids"] and prepared[i]["chosen_ids"] == r["chosen_ids"]
                   and prepared[i]["rejected_ids"] == r["rejected_ids"] for i, r in enumerate(rows))
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    trainer.train()
    return {**step_record(step_ends, args.warmup, args.batch, sizes), "contention": window.contention(),
            "same_token_ids_as_ropo_ray": same_ids,
            "trainable_parameters": trainable, "gradient_checkpointing": config.gradient_checkpointing,
            "precompute_ref_log_probs": config.precompute_ref_log_probs, "learning_rate": config.learning_rate,
            "peft": peft_summary(trainer.model.peft_config["default"]), "rss_after_imports_mib": after_imports}


def peft_summary(cfg) -> dict:
    return {"r": cfg.r, "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout,
            "target_modules": sorted(cfg.target_modules) if cfg.target_modules else None}


def init_single_process_group() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")


PROFILE_GROUPS = {  # self CPU time of profiled ops, grouped by what they do (first match wins)
    "rotation kernels (band chain and the fused layer's scale pass, forward + backward)": ("_BandChain",
                                                                                          "_RotatedLinear"),
    "attention (scaled dot product, forward + backward)": ("aten::_scaled_dot_product", "aten::_softmax"),
    "matmuls (frozen weights, LM head, small Cayley blocks)": ("aten::mm", "aten::addmm", "aten::bmm",
                                                             "aten::matmul", "aten::linear"),
    "dtype conversions and copies": ("aten::copy_", "aten::_to_copy"),
    # the native coefficients (coefficients.py, forward and backward; since session 20); the composed Cayley
    # elimination's row updates (its divisions and subtractions stay in "other", its backward's bmm in "matmuls");
    # linalg and indexing ops are what the adapter="torch" path and older versions use
    "rotation parameters (Cayley eliminations, band coefficients)": ("_PackedCoefficients", "aten::addcmul",
                                                                     "aten::linalg_", "aten::lu", "aten::index",
                                                                     "aten::_index_put", "aten::triu"),
    "optimizer (DeepSpeed AdamW, ZeRO-2 buffers)": ("Optimizer", "aten::_foreach", "aten::addcdiv", "aten::lerp",
                                                    "aten::sqrt", "aten::_fused_adam"),
}


def profile_groups(prof) -> dict[str, float]:
    """Seconds of self CPU time per PROFILE_GROUPS group (the rest: elementwise, norms, rotary, fills)."""
    groups = {name: 0.0 for name in PROFILE_GROUPS} | {"other ops (elementwise, norms, rotary, fills)": 0.0}
    for event in prof.key_averages():
        name = next((g for g, prefixes in PROFILE_GROUPS.items() if event.key.startswith(prefixes)),
                    "other ops (elementwise, norms, rotary, fills)")
        groups[name] += event.self_cpu_time_total / 1e6
    return groups


def side_ropo(args: argparse.Namespace, precision: str, profile: bool = False, checkpointing: bool = False) -> dict:
    """The Ray Train worker's step (ropo_ray.train.worker._train_epoch) in one process, world size 1.
    With `profile`, the timed steps run under torch.profiler and the result holds its grouped self time;
    `checkpointing` is train.activation_checkpointing (set up as the worker does)."""
    import deepspeed
    import ray.train  # noqa: F401  (a Ray Train worker has Ray loaded: count its memory)
    import torch

    from ropo_ray.adapters.registry import attach_adapter
    from ropo_ray.config.schema import AdapterConfig, LossConfig, ModelConfig, TrainConfig
    from ropo_ray.train.ds_config import deepspeed_config
    from ropo_ray.train.flops import batch_sizes, step_flop_model
    from ropo_ray.train.lean import keep_lean
    from ropo_ray.train.model_io import load_model
    from ropo_ray.train.schedule import warmup_cosine_scheduler
    from ropo_ray.train.step import make_batch, preference_step

    torch.set_num_threads(args.threads)
    after_imports = peak_rss_mib()
    init_single_process_group()
    total = args.warmup + args.steps
    tc = TrainConfig(micro_batch_size=args.batch, precision=precision, max_steps=total,
                     activation_checkpointing=checkpointing, lean_imports=not args.no_lean_imports,
                     shared_prompt=not args.concatenated, pad_to_multiple=args.pad_to_multiple)
    ds_cfg = deepspeed_config(tc, 1)
    kept_out = keep_lean(ds_cfg, tc.use_gpu) if tc.lean_imports else []  # as the worker does
    torch.manual_seed(tc.seed)
    model = attach_adapter(load_model(args.work / "model", ModelConfig(implementation=args.model_implementation),
                                      bf16=precision == "bf16", allow_native=True), AdapterConfig())
    if tc.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    memory = {"after_imports": after_imports, "after_loading": peak_rss_mib()}  # where the peak comes from
    flop_model = step_flop_model(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    engine, *_ = deepspeed.initialize(model=model, config=ds_cfg,
                                      lr_scheduler=lambda opt: warmup_cosine_scheduler(opt, total, tc.warmup_ratio),
                                      model_parameters=[p for p in model.parameters() if p.requires_grad])
    memory["after_deepspeed_initialize"] = peak_rss_mib()
    rows, pad_id, loss_cfg = load_json(args.work / "rows.json"), 0, LossConfig()
    step_ends, sizes, phases = [], [], {"data": 0.0, "forward": 0.0, "backward": 0.0, "optimizer": 0.0}
    window = Window()
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if profile else None
    for i in range(total):
        if profiler is not None and i == args.warmup:
            profiler.__enter__()
        td = time.perf_counter()
        batch = make_batch(rows[i * args.batch:(i + 1) * args.batch], pad_id, tc.shared_prompt, tc.pad_to_multiple)
        t0 = time.perf_counter()
        loss, _ = preference_step(engine, batch, loss_cfg)
        t1 = time.perf_counter()
        engine.backward(loss)
        t2 = time.perf_counter()
        engine.step()
        step_ends.append(time.perf_counter())
        if i + 1 in (args.warmup, total):
            window.mark()
        if i == 0:
            memory["after_first_step"] = peak_rss_mib()
        if i >= args.warmup:
            for key, seconds in zip(phases, (t0 - td, t1 - t0, t2 - t1, step_ends[-1] - t2)):
                phases[key] += seconds
        sizes.append(batch_sizes(batch["attention_mask"]))
    grouped = {}
    if profiler is not None:
        profiler.__exit__(None, None, None)
        grouped = {"profile_self_seconds": profile_groups(profiler)}
    return {**step_record(step_ends, args.warmup, args.batch, sizes), "contention": window.contention(), **grouped,
            "trainable_parameters": trainable,
            "flop_model": {"per_token": flop_model.per_token, "per_length_sq": flop_model.per_length_sq},
            "phase_seconds": phases, "zero_stage": tc.zero_stage, "precision": precision,
            "shared_prompt": tc.shared_prompt, "pad_to_multiple": tc.pad_to_multiple,
            "activation_checkpointing": tc.activation_checkpointing,
            "module_dtype": str(next(engine.module.parameters()).dtype),
            "attention": engine.module.config._attn_implementation, "rss_after_imports_mib": after_imports,
            "memory_mib_by_stage": memory, "kept_out": kept_out}


def side_ropo_worker(args: argparse.Namespace) -> dict:
    """The product itself: `ropo-ray train` on a local Ray cluster, one Ray Train worker (DeepSpeed,
    --worker-precision (bf16 by default; fp32 on a CPU without native bf16, where bf16 steps take minutes),
    activation checkpointing, `--threads` CPUs) on the same model and pairs (the messages schema, so the
    product's own templating and tokenising give the rows the other sides get; data.eval_fraction at its
    default, so the held-out evaluations run as they do for a user). The worker's figures come from its
    metrics: `peak_rss_mib` of the final record (the largest worker's VmHWM, the export of the merged model
    included), and pairs/s over the steps after `--warmup`, from the cumulative per-step pairs/s and training
    seconds (data, Ray Data's iterator and epoch turns included; evaluations and checkpoints are not training
    time). The side's own process is the Ray driver; its memory is not the worker's. The worker starts on the
    allocator (and jemalloc options) this process was started on (train.allocator, train.jemalloc_conf), so
    --ropo-allocator, --jemalloc-conf, the jemalloc-defaults variant and the other-allocator pass reach it."""
    from ropo_ray.train.allocator import loaded_allocator

    run_dir = args.work / "worker-run"
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    total = args.warmup + args.steps
    overrides = [f"model.path={args.work / 'model'}", f"data.train_files=[{args.work / 'pairs.jsonl'}]",
                 f"train.precision={args.worker_precision}", "train.activation_checkpointing=true",
                 f"train.micro_batch_size={args.batch}",
                 f"train.max_steps={total}", "train.epochs=1000", f"train.cpus_per_worker={args.threads}",
                 "train.log_every=1", f"train.eval_every={10 * total}", f"train.checkpoint_every={10 * total}",
                 f"train.worker_niceness={args.worker_niceness}", f"train.shared_prompt={not args.concatenated}",
                 f"train.pad_to_multiple={args.pad_to_multiple}", f"train.allocator={loaded_allocator()}",
                 f"model.implementation={args.model_implementation}",
                 f"train.jemalloc_conf={os.environ.get('MALLOC_CONF', '')}",
                 f"cache.root={args.work / 'refcache'}", f"pipeline.run_dir={run_dir}",
                 f"pipeline.artifacts_dir={args.work / 'artifacts'}"]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ropo_ray.cli", "train", *overrides], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ropo-ray train failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    final = load_json(run_dir / "model" / "run.json")["metrics"]
    steps = {r["step"]: r for r in map(json.loads, (run_dir / "model" / "metrics.jsonl").read_text().splitlines())
             if r.get("pairs_per_s")}
    seconds = {n: steps[n]["train_seconds"] for n in steps}  # cumulative, as are pairs/s and tokens/s
    pairs = {n: steps[n]["pairs_per_s"] * seconds[n] for n in steps}
    tokens = {n: steps[n]["tokens_per_s"] * seconds[n] for n in steps}
    span = seconds[total] - seconds[args.warmup]
    return {"steps": args.steps, "seconds": span, "step_seconds": span / args.steps,
            "pairs_per_s": (pairs[total] - pairs[args.warmup]) / span,
            "tokens_per_s": (tokens[total] - tokens[args.warmup]) / span,
            "peak_rss_mib": {"vmhwm": final["peak_rss_mib"]},
            "peak_rss_mib_training_only": max(r["peak_rss_mib"] for r in steps.values()),
            "memory_mib_by_stage": {k.split("/")[1]: v for k, v in final.items() if k.startswith("memory/")},
            "command_seconds": time.perf_counter() - t0, "overrides": overrides,
            "final_metrics": {k: final[k] for k in ("loss", "eval/loss", "pairs_per_s", "mfu") if k in final}}


def side_base(args: argparse.Namespace) -> dict:
    """Frozen model, embedding output requiring grad: forward + DPO loss + backward through every layer."""
    import torch

    from ropo_ray.config.schema import LossConfig, ModelConfig
    from ropo_ray.train.flops import batch_sizes, step_flop_model
    from ropo_ray.train.model_io import load_model
    from ropo_ray.train.step import make_batch, preference_step

    torch.set_num_threads(args.threads)
    after_imports = peak_rss_mib()
    model = load_model(args.work / "model", ModelConfig())
    model.requires_grad_(False)
    model.enable_input_require_grads()
    model.train()
    flop_model = step_flop_model(model)
    rows, loss_cfg = load_json(args.work / "rows.json"), LossConfig()
    step_ends, sizes, phases = [], [], {"forward": 0.0, "backward": 0.0}
    window = Window()
    for i in range(args.warmup + args.steps):
        batch = make_batch(rows[i * args.batch:(i + 1) * args.batch], 0, not args.concatenated, args.pad_to_multiple)
        t0 = time.perf_counter()
        loss, _ = preference_step(model, batch, loss_cfg)
        t1 = time.perf_counter()
        loss.backward()
        step_ends.append(time.perf_counter())
        if i + 1 in (args.warmup, args.warmup + args.steps):
            window.mark()
        if i >= args.warmup:
            phases["forward"] += t1 - t0
            phases["backward"] += step_ends[-1] - t1
        sizes.append(batch_sizes(batch["attention_mask"]))
    return {**step_record(step_ends, args.warmup, args.batch, sizes), "contention": window.contention(),
            "flop_model": {"per_token": flop_model.per_token, "per_length_sq": flop_model.per_length_sq},
            "phase_seconds": phases, "rss_after_imports_mib": after_imports}


def side_overhead(args: argparse.Namespace, precision: str) -> dict:
    """The RoPO layers' overhead over the frozen model, measured in one process: the same adapted model (random
    rotations and magnitudes, so nothing is an identity) steps with its RoPO layers on and off
    (`RoPOLinear.disabled`: the frozen base alone) in alternation, forward + DPO loss + backward, the embedding
    output requiring grad in both so the backward passes every layer either way. Alternating in one process
    cancels what drifts between processes and over time (heap state, the machine's load); the paired ratio is
    each round's RoPO step over its frozen step."""
    import torch

    from ropo_ray.adapters.inject import ropo_layers
    from ropo_ray.adapters.registry import attach_adapter
    from ropo_ray.config.schema import AdapterConfig, LossConfig, ModelConfig
    from ropo_ray.train.model_io import load_model
    from ropo_ray.train.step import make_batch, preference_step

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = attach_adapter(load_model(args.work / "model", ModelConfig(), bf16=precision == "bf16"), AdapterConfig())
    layers = list(ropo_layers(model).values())
    with torch.no_grad():
        for layer in layers:
            for p in layer.rotation:
                p.normal_(0, 0.05)
            layer.magnitude.mul_(1 + 0.1 * torch.randn_like(layer.magnitude))
    model.enable_input_require_grads()
    model.train()
    rows, loss_cfg = load_json(args.work / "rows.json"), LossConfig()
    batches = [make_batch(rows[i * args.batch:(i + 1) * args.batch], 0, not args.concatenated, args.pad_to_multiple)
               for i in range(args.warmup + args.steps)]
    times: dict[str, list[float]] = {"ropo": [], "frozen": []}
    window = Window()
    for i in range(args.warmup + args.rounds):
        if i == args.warmup:
            window.mark()
        for mode in ("ropo", "frozen") if i % 2 == 0 else ("frozen", "ropo"):
            for layer in layers:
                layer.disabled = mode == "frozen"
            t0 = time.perf_counter()
            loss, _ = preference_step(model, batches[i % len(batches)], loss_cfg)
            loss.backward()
            elapsed = time.perf_counter() - t0
            model.zero_grad(set_to_none=True)
            if i >= args.warmup:
                times[mode].append(elapsed)
    window.mark()
    paired = [r / f - 1 for r, f in zip(times["ropo"], times["frozen"])]
    return {"precision": precision, "rounds": args.rounds, "adapted_layers": len(layers),
            "step_seconds": times, "median_step_seconds": {k: statistics.median(v) for k, v in times.items()},
            "paired_overhead": paired, "median_paired_overhead": statistics.median(paired),
            "overhead_of_medians": statistics.median(times["ropo"]) / statistics.median(times["frozen"]) - 1,
            "contention": window.contention()}


def run_side(args: argparse.Namespace) -> None:
    runners = {"prepare": side_prepare, "trl": side_trl, "trl_nogc": lambda a: side_trl(a, checkpointing=False),
               "ropo_fp32": lambda a: side_ropo(a, "fp32"), "ropo_bf16": lambda a: side_ropo(a, "bf16"),
               "ropo_fp32_gc": lambda a: side_ropo(a, "fp32", checkpointing=True),
               "ropo_bf16_gc": lambda a: side_ropo(a, "bf16", checkpointing=True),
               "ropo_fp32_profile": lambda a: side_ropo(a, "fp32", profile=True),
               "ropo_bf16_profile": lambda a: side_ropo(a, "bf16", profile=True),
               "ropo_overhead_fp32": lambda a: side_overhead(a, "fp32"),
               "ropo_overhead_bf16": lambda a: side_overhead(a, "bf16"),
               "ropo_worker": side_ropo_worker, "base": side_base}
    result = runners[args.side](args)
    result.setdefault("peak_rss_mib", peak_rss_mib())  # ropo_worker's is its Ray Train worker's
    args.result.write_text(json.dumps(result))


# ----------------------------------------------------------------------------------------------- driver


VARIANTS = {
    "jemalloc-defaults": "on jemalloc with jemalloc's own options (MALLOC_CONF unset) instead of --jemalloc-conf",
    "all-imports": "with train.lean_imports=false: Triton and DeepSpeed's Muon module imported (RoPO sides)",
    "ray-niceness": "ropo_worker with train.worker_niceness=15, the niceness Ray gives worker processes",
    "concatenated": "with train.shared_prompt=false: chosen and rejected stacked, each prompt run twice (RoPO sides)",
    "pad8": "with train.pad_to_multiple=8 (RoPO sides)",
    "pad16": "with train.pad_to_multiple=16 (RoPO sides)",
    "transformers": "with model.implementation=transformers: transformers' LlamaForCausalLM instead of "
                    "ropo_ray.train.llama's (RoPO sides)",
}
"""Side-name suffixes: `side+variant` runs the side with a setting changed, so that both are measured side by side
in one run (e.g. --sides ropo_bf16,ropo_bf16+jemalloc-defaults)."""


def run_once(args: argparse.Namespace, side: str, tag: str, allocator: str | None = None) -> dict:
    """One side in its own process, on `allocator` (default: the side's own, `side_allocator`)."""
    side, *variants = side.split("+")
    if unknown := set(variants) - set(VARIANTS):
        raise ValueError(f"side {side}: unknown variants {sorted(unknown)} (known: {sorted(VARIANTS)})")
    allocator = allocator or side_allocator(side, args.ropo_allocator)
    conf = "" if "jemalloc-defaults" in variants else args.jemalloc_conf
    result = args.work / f"result-{tag}.json"
    cmd = [sys.executable, __file__, "--side", side, "--work", str(args.work), "--result", str(result)]
    if "all-imports" in variants or args.no_lean_imports:
        cmd.append("--no-lean-imports")
    cmd += ["--worker-niceness", "15" if "ray-niceness" in variants else str(args.worker_niceness),
            "--worker-precision", args.worker_precision]
    if "concatenated" in variants or args.concatenated:
        cmd.append("--concatenated")
    cmd += ["--model-implementation", "transformers" if "transformers" in variants else args.model_implementation]
    pads = [int(v[3:]) for v in variants if v.startswith("pad")]
    cmd += ["--pad-to-multiple", str(pads[0] if pads else args.pad_to_multiple)]
    for key in ("batch", "steps", "warmup", "seq_len", "hidden", "layers", "intermediate", "threads", "rounds"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    load_before = float(Path("/proc/loadavg").read_text().split()[0])
    t0 = time.perf_counter()
    inherited = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF")}
    env = worker_env(allocator, conf=conf)
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**inherited, **env})
    if proc.returncode != 0:
        raise RuntimeError(f"side {side} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    out = load_json(result)
    out["process_seconds"] = time.perf_counter() - t0
    out["allocator"] = allocator
    out["jemalloc_conf"] = env.get("MALLOC_CONF", "") if allocator == "jemalloc" else None
    out["loadavg_1min"] = {"before": load_before, "after": float(Path("/proc/loadavg").read_text().split()[0])}
    other = out.get("contention", {}).get("other_cores", 0.0)
    print(f"  {tag}: {out.get('pairs_per_s', 0):.3f} pairs/s, {out.get('tokens_per_s', 0):.1f} tokens/s, "
          f"peak RSS {out['peak_rss_mib']['vmhwm']:.0f} MiB ({out['process_seconds']:.0f} s; other processes "
          f"{other:.2f} cores in the timed window)", flush=True)
    return out


def spawn(args: argparse.Namespace, side: str, tag: str) -> dict:
    """Run a side on a quiet machine; a run during which other processes took > --max-other-cores is redone
    (up to --retries times; the discarded runs are kept in the result)."""
    discarded: list[dict] = []
    while True:
        waited = wait_for_quiet(args)
        out = run_once(args, side, tag)
        out["waited_for_quiet_seconds"] = waited
        other = out.get("contention", {}).get("other_cores", 0.0)
        if other <= args.max_other_cores or len(discarded) >= args.retries:
            out["discarded_runs"] = discarded
            return out
        discarded.append({k: v for k, v in out.items() if k != "step_ends"})


def side_allocator(side: str, ropo_allocator: str) -> str:
    """The allocator a side starts on: RoPO sides on `ropo_allocator` (as a Ray Train worker with that
    train.allocator starts, ropo_ray.train.allocator), TRL and the frozen base on glibc's malloc (TRL's own)."""
    return ropo_allocator if side.startswith("ropo") else "system"


def rss_with_the_other_allocator(args: argparse.Namespace, sides: list[str]) -> dict[str, dict[str, float]]:
    """Peak RSS of each side on the allocator it did not run on in the timed repeats (RoPO sides on the other
    train.allocator; TRL and the base with jemalloc preloaded), so the allocator's share of every side's peak
    is measured, not assumed. For memory: 2 timed steps, one run, no quiet-machine gate, so its pairs/s are
    indicative only."""
    short = argparse.Namespace(**{**vars(args), "steps": 2})
    out = {}
    for side in sides:
        other = "system" if side_allocator(side, args.ropo_allocator) == "jemalloc" else "jemalloc"
        run = run_once(short, side, f"{side}-other-allocator", other)
        out[side] = {"allocator": other, "peak_rss_mib": run["peak_rss_mib"]["vmhwm"],
                     "pairs_per_s": run["pairs_per_s"], "other_cores": run["contention"]["other_cores"]}
    return out


def measure_ceilings(args: argparse.Namespace) -> dict[str, float]:
    """Best matmul FLOP/s over square sizes 1024, 1536, 2048, fp32 and bf16, with --threads threads, on a
    quiet machine (redone like a side when other processes took more than --max-other-cores)."""
    import torch

    from ropo_ray.train.flops import measure_peak_flops

    torch.set_num_threads(args.threads)
    for attempt in range(args.retries + 1):
        wait_for_quiet(args)
        window = Window()
        window.mark()
        out = {name: max(measure_peak_flops(dtype, size, 1.0) for size in (1024, 1536, 2048))
               for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
        window.mark()
        out.update(window.contention(), attempt=attempt)
        if out["other_cores"] <= args.max_other_cores:
            break
    return out


def mfu(run: dict, ceiling: float) -> float:
    fm = run["flop_model"]
    return (fm["per_token"] * run["tokens"] + fm["per_length_sq"] * run["sum_length_sq"]) / run["seconds"] / ceiling


def summarise(runs: dict[str, list[dict]], ceilings: list[dict[str, float]]) -> dict:
    med = lambda values: statistics.median(values)  # noqa: E731
    sides = list(runs)
    pairs = {s: med([r["pairs_per_s"] for r in runs[s]]) for s in sides}
    summary = {
        "median_pairs_per_s": pairs,
        "median_tokens_per_s": {s: med([r["tokens_per_s"] for r in runs[s]]) for s in sides},
        "median_step_seconds": {s: med([r["step_seconds"] for r in runs[s]]) for s in sides},
        "median_peak_rss_mib": {s: med([r["peak_rss_mib"]["vmhwm"] for r in runs[s]]) for s in sides},
        "median_rss_after_imports_mib": {s: med([r["rss_after_imports_mib"]["vmhwm"] for r in runs[s]])
                                         for s in sides if "rss_after_imports_mib" in runs[s][0]},
        "median_ceiling_flops": {k: med([c[k] for c in ceilings]) for k in ("fp32", "bf16")},
    }
    summary["speedup_vs_trl"] = {s: pairs[s] / pairs["trl"] for s in sides if s != "trl"}
    summary["peak_rss_ratio_vs_trl"] = {s: summary["median_peak_rss_mib"][s] / summary["median_peak_rss_mib"]["trl"]
                                        for s in sides if s != "trl"}
    summary["mfu_vs_fp32_ceiling"] = {s: med([mfu(r, c["fp32"]) for r, c in zip(runs[s], ceilings)])
                                      for s in sides if "flop_model" in runs[s][0]}
    if "ropo_bf16" in runs:
        summary["mfu_bf16_vs_bf16_ceiling"] = med([mfu(r, c["bf16"]) for r, c in zip(runs["ropo_bf16"], ceilings)])
    if "base" not in runs or "ropo_fp32" not in runs:  # a run of some sides only (--sides)
        return summary
    base, ropo = runs["base"], runs["ropo_fp32"]
    summary["ropo_fp32_overhead_vs_base"] = {
        "whole_step": med([r["step_seconds"] / b["step_seconds"] - 1 for r, b in zip(ropo, base)]),
        "forward_backward_only": med([(r["phase_seconds"]["forward"] + r["phase_seconds"]["backward"])
                                      / (b["phase_seconds"]["forward"] + b["phase_seconds"]["backward"]) - 1
                                      for r, b in zip(ropo, base)]),
        "optimizer_share_of_step": med([r["phase_seconds"]["optimizer"] / r["seconds"] for r in ropo]),
    }
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps per side and repeat")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them (>= 1)")
    parser.add_argument("--batch", type=int, default=8, help="pairs per step")
    parser.add_argument("--seq-len", type=int, default=81, help="longer sequence of each pair, tokens")
    parser.add_argument("--hidden", type=int, default=640)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--intermediate", type=int, default=1664)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=20, help="RoPO / frozen step pairs of the overhead sides")
    parser.add_argument("--sides", default=",".join(SIDES))
    parser.add_argument("--worker-precision", choices=("bf16", "fp32"), default="bf16",
                        help="train.precision of ropo_worker (fp32 on CPUs without native bf16)")
    benchlib.add_quiet_arguments(parser, max_other_cores=0.2)
    parser.add_argument("--ropo-allocator", choices=("system", "jemalloc"), default=TrainConfig().allocator,
                        help="train.allocator of the RoPO sides (default: the config's default)")
    parser.add_argument("--jemalloc-conf", default=TrainConfig().jemalloc_conf,
                        help="MALLOC_CONF of the sides on jemalloc (default: train.jemalloc_conf's default)")
    parser.add_argument("--no-lean-imports", action="store_true",
                        help="RoPO sides with train.lean_imports=false (Triton and DeepSpeed's Muon imported)")
    parser.add_argument("--model-implementation", choices=("auto", "native", "transformers"),
                        default=ModelConfig().implementation,
                        help="model.implementation of the RoPO sides (default: the config's default)")
    parser.add_argument("--concatenated", action="store_true",
                        help="RoPO sides with train.shared_prompt=false (each prompt run twice, as TRL does)")
    parser.add_argument("--pad-to-multiple", type=int, default=TrainConfig().pad_to_multiple,
                        help="train.pad_to_multiple of the RoPO sides (default: the config's default)")
    parser.add_argument("--worker-niceness", type=int, default=TrainConfig().worker_niceness,
                        help="train.worker_niceness of the ropo_worker side (default: the config's default)")
    parser.add_argument("--allocator-pass", type=int, default=1,
                        help="1: also measure every side's peak RSS on the other allocator")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/train.json"))
    parser.add_argument("--side", choices=("prepare", *EXTRA_SIDES, *SIDES), help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.warmup < 1:
        parser.error("--warmup must be >= 1 (the first step pays one-off costs)")
    return args


def drive(args: argparse.Namespace) -> dict:
    uptime = {"start": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()}
    t_start = time.perf_counter()
    setup = spawn(args, "prepare", "prepare")
    sides = args.sides.split(",")
    runs, ceilings = benchlib.rotated_repeats(args.repeats, sides, lambda: measure_ceilings(args),
                                              lambda side, r: spawn(args, side, f"{side}-{r}"))
    rss_other = rss_with_the_other_allocator(args, sides) if args.allocator_pass else {}
    uptime["end"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    all_runs = [setup, *(run for side in runs.values() for run in side)]
    return {
        "command": "python " + " ".join(sys.argv),
        "machine": benchlib.machine(threads=args.threads, uptime=uptime,
                                    versions=versions("torch", "transformers", "peft", "trl", "deepspeed", "ray")),
        "setup": setup, "batch_pairs": args.batch, "timed_steps": args.steps, "warmup_steps": args.warmup,
        "repeats": args.repeats, "ceilings_flops": ceilings, **summarise(runs, ceilings),
        "ropo_allocator": args.ropo_allocator, "jemalloc_conf": args.jemalloc_conf,
        "peak_rss_mib_other_allocator": rss_other,
        "runs": runs, "total_seconds": time.perf_counter() - t_start,
        "seconds_waiting_for_quiet_machine": sum(r.get("waited_for_quiet_seconds", 0.0) for r in all_runs),
        "seconds_in_side_processes": sum(r["process_seconds"] for r in all_runs),
        "discarded_runs_total": sum(len(r.get("discarded_runs", [])) for r in all_runs),
        "note": "step times = wall-clock between ends of consecutive steps after warm-up (collation included); "
                "reference log-probs computed once in setup (reference_logps_seconds), not in any step; "
                "peak RSS = VmHWM of each side's own process; a side whose timed window saw other processes "
                "take more than max_other_cores was redone (discarded_runs)",
        "max_other_cores": args.max_other_cores,
    }


def main() -> None:
    benchlib.main(parse_args(), run_side, drive, "bench-train-", ("runs",))


if __name__ == "__main__":
    main()
