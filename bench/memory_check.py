"""The memory planner's estimate against the peak memory of real training steps (mtl_scale.trainer.setup
+ mtl_scale.trainer.train_step), per rank.

    deepspeed --num_gpus 2 --module bench.memory_check --hidden 512 --layers 4 --vocab 32000 --batch-sizes 2,4
    deepspeed --num_gpus 2 --module bench.memory_check --hidden 512 --layers 4 --vocab 32000 sharing=soft --tasks 4
    deepspeed --num_gpus 1 --module bench.memory_check --hidden 2048 --layers 16 --intermediate 8192 --heads 32 \\
        --kv-heads 8 --vocab 128256 --seq-len 2048 --batch-sizes 1,4 model.dtype=bf16     # a ~1B Llama on a GPU

A random-init Llama of the given size is built once (bench.common.build_model, cached under
$MTL_SCALE_CACHE) with the tiny default's byte-level tokenizer (vocab_size may exceed it: the
extra rows are just unused) and saved with save_pretrained. Every example is exactly --seq-len tokens
(long completions truncated), so micro-batches have no padding and s is really s.

What is measured, per rank, against a baseline taken just before the model is loaded:
- CPU: resident memory from /proc/self/status (VmRSS; VmHWM for the peak, reset through
  /proc/self/clear_refs before the measured steps). tracemalloc would not see torch's tensors (C
  allocations), RSS does. glibc is told to mmap every allocation >= 64 KiB (mallopt) and trimmed
  before each reading, so freed tensors leave RSS at once. Also the peak of live tensor bytes
  created during the steps, counted by a TorchDispatchMode (what the formula models, without the
  allocator).
- CUDA: torch.cuda.memory_allocated / max_memory_allocated (after reset_peak_memory_stats), and what
  the process holds outside PyTorch's allocator (context, NCCL): mem_get_info's used - memory_reserved.
"model states" is memory after the first optimizer step (parameters, gradient buffers, Adam states);
"step peak" is the peak of the measured steps above it.
"""
import argparse
import contextlib
import dataclasses
import json
import sys

import torch

from bench.common import (ON_GPU, LiveTensorBytes, build_model, fixed_length_data, libc, memory_now,
                          peak_since_reset, reset_peak, rss_parts)
from mtl_scale.plan import cli as plan_cli, estimate as planner, shape as model_shape
from mtl_scale.cli import run_entry
from mtl_scale.config import load_config
from mtl_scale.model import load_model as load_base
import mtl_scale.trainer as trainer

MiB = 2 ** 20
STATE_PARTS = ("frozen base parameters", "quantisation state", "LoRA parameters", "LoRA gradients", "optimizer states",
               "gradient reduce bucket")
STEP_PARTS = ("ZeRO-3 gathered working set", "task gradient shards", "activations", "logits", "backward working memory")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, help="default: 8/3 x hidden rounded up to 64")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, help="default: hidden / 64")
    ap.add_argument("--kv-heads", type=int, help="default: heads / 4")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-sizes", default="", help="comma-separated micro-batch sizes, measured in this order "
                                                       "(default: the config's micro_batch_size)")
    ap.add_argument("--tasks", type=int, default=1, help="tasks (soft: one adapter each)")
    ap.add_argument("--steps", type=int, default=2, help="measured optimizer steps per micro-batch size")
    ap.add_argument("--no-track-tensors", action="store_true", help="CPU: skip the live-tensor count (faster)")
    ap.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="run config key=value overrides (sharing=soft, "
                                                 "model.gradient_checkpointing=true, model.dtype=bf16 ...)")
    args = ap.parse_intermixed_args()
    args.heads = args.heads or max(1, args.hidden // 64)
    args.kv_heads = args.kv_heads or max(1, args.heads // 4)
    args.intermediate = args.intermediate or -(-8 * args.hidden // 3 // 64) * 64
    if not ON_GPU and libc():
        libc().mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: big blocks are mmapped and returned when freed

    model_dir, data = build_model(args), fixed_length_data(args.seq_len)
    tasks = ", ".join(f"{{name: t{i}, source: '{data}', num_examples: 56, eval_size: 0}}" for i in range(args.tasks))
    sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    cfg = load_config(None, [f"model.path={model_dir}", f"tasks=[{tasks}]", "sharing=hard", "sampling.strategy=uniform",
                             "sampling.tasks_per_step=1", "sampling.micro_batches_per_task=1",
                             f"max_seq_len={args.seq_len}", "max_steps=1000", "output_dir=runs/memory_check", "lr=1e-4",
                             *([f"micro_batch_size={sizes[0]}"] if sizes else []), *args.overrides])
    sizes = sizes or [cfg.micro_batch_size]

    # shapes on the meta device, before setup: while its HfDeepSpeedConfig lives, transformers builds every
    # model under zero.Init
    shape = model_shape.model_shape(*model_shape.load_model_config(str(model_dir)))
    baseline = {}
    track = not ON_GPU and not args.no_track_tensors
    states_mode = LiveTensorBytes()  # CPU: tensor bytes of the model states, from the load to the first step's end

    def load_model(model_cfg, path):  # the baseline: everything but the model (torch, data, process group)
        baseline["bytes"] = memory_now()
        baseline["rss_parts"] = rss_parts()
        if track:
            states_mode.__enter__()
        return load_base(model_cfg, path)

    run = trainer.setup(cfg, model_loader=load_model)
    activate = trainer.activator(run)
    run.engine.train()  # as train_loop does: gradient checkpointing (and dropout) act only in training mode
    dist = torch.distributed
    step = 0
    rows = []

    def one_step(b: int, mode=None):
        nonlocal step
        with mode if mode is not None else contextlib.nullcontext():
            # the step's batches drawn at size b (DeepSpeed does not check batch shapes), then the training step
            groups = trainer.next_step_groups(run, step, micro_batch_size=b)
            trainer.train_step(run, step, activate, groups)
        assert all(mb["input_ids"].shape == (b, args.seq_len) for _, mbs in groups for mb in mbs)
        step += 1

    for b in sizes:
        one_step(b)  # first step: Adam states exist from here on
        dist.barrier()
        states_tensors = None
        if track and b == sizes[0]:
            states_mode.__exit__(None, None, None)
            states_tensors = states_mode.live
        states = memory_now() - baseline["bytes"]
        parts = rss_parts()
        states_parts = {k: v - baseline["rss_parts"][k] for k, v in parts.items()} if parts else None
        reset_peak()
        for _ in range(args.steps):
            one_step(b)
        peak = peak_since_reset() - baseline["bytes"]
        tensors = None
        if track:
            mode = LiveTensorBytes()
            one_step(b, mode)
            tensors = mode.peak
        outside = None
        if ON_GPU:
            free, total = torch.cuda.mem_get_info()
            outside = total - free - torch.cuda.memory_reserved()
        measured = {"rank": run.rank, "model_states": states, "peak": peak, "step_peak": peak - states,
                    "states_tensors": states_tensors, "states_rss_parts": states_parts, "step_tensors": tensors,
                    "outside_allocator": outside}
        per_rank = [None] * run.world
        dist.all_gather_object(per_rank, measured)

        inp = plan_cli.inputs_from_config(run.cfg, shape, plan_cli.build_parser().parse_args(
            ["--gpus-per-node", str(run.world), "--micro-batch-size", str(b)]))
        inp = dataclasses.replace(inp, padded=False, device="cuda" if ON_GPU else "cpu")
        est = planner.estimate(shape, inp)
        unsorted = {c.name for c in est.components} - set(STATE_PARTS + STEP_PARTS + ("CUDA context + NCCL",))
        assert not unsorted, f"bench/memory_check.py: sort {unsorted} into STATE_PARTS or STEP_PARTS"
        est_states, est_step = est.group(*STATE_PARTS), est.group(*STEP_PARTS)
        rows.append({"setting": setting_name(run.cfg, b, args), "estimate": {"model_states": est_states,
                     "step_peak": est_step, "peak": est_states + est_step,
                     "components": {c.name: c.bytes for c in est.components}}, "measured": per_rank})
        if run.rank == 0:
            print_row(rows[-1])
    if run.rank == 0:
        print("MEMCHECK " + json.dumps(rows))
        sys.stdout.flush()


def setting_name(cfg, b: int, args) -> str:
    gc = "on" if cfg.model.gradient_checkpointing else "off"
    return (f"{cfg.sharing} x{len(cfg.tasks)}, b={b}, s={args.seq_len}, gc={gc}, "
            f"{cfg.model.dtype}, {cfg.model.attn_implementation}, h={args.hidden} L={args.layers} V={args.vocab}")


def print_row(row: dict) -> None:
    def err(est: int, got: int) -> str:
        return f"{100 * (est - got) / got:+.0f}%" if got > 0 else "n/a"

    print(f"\n== {row['setting']}  ({'CUDA allocated' if ON_GPU else 'CPU RSS'} above the pre-load baseline)")
    e = row["estimate"]
    print(f"{'':22}{'estimate':>12}" + "".join(f"{'rank ' + str(m['rank']):>12}{'error':>8}" for m in row["measured"]))
    for key, label in (("model_states", "model states"), ("step_peak", "step peak above them"), ("peak", "total peak")):
        print(f"{label:22}{e[key] / MiB:>10.1f}Mi" +
              "".join(f"{m[key] / MiB:>10.1f}Mi{err(e[key], m[key]):>8}" for m in row["measured"]))
    for key, label, est in (("states_tensors", "  states: tensors only", "model_states"),
                            ("step_tensors", "  step: tensors only", "step_peak")):
        if row["measured"][0][key] is not None:
            print(f"{label:22}{e[est] / MiB:>10.1f}Mi" + "".join(
                f"{m[key] / MiB:>10.1f}Mi{err(e[est], m[key]):>8}" for m in row["measured"]))
    if row["measured"][0]["states_rss_parts"]:
        print("model states' RSS by kind: " + "; ".join(
            f"rank {m['rank']}: " + ", ".join(f"{k} {v / MiB:+.1f}Mi" for k, v in m["states_rss_parts"].items())
            for m in row["measured"]))
    if row["measured"][0]["outside_allocator"] is not None:
        print("outside PyTorch's allocator (context, NCCL): " +
              ", ".join(f"{m['outside_allocator'] / MiB:.0f} MiB" for m in row["measured"]))
    print("estimate by component: " + ", ".join(f"{k} {v / MiB:.1f}Mi" for k, v in e["components"].items()))


if __name__ == "__main__":
    run_entry(main)
