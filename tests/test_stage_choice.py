"""deepspeed_config: auto — the planner picks ZeRO-2 (base replicated) when it fits, else ZeRO-3, else ZeRO-3 +
nf4, and ZeRO-3 whenever surgery needs its gradient partitions; the run logs the choice and why."""
import subprocess
import sys

import pytest

from mtl_scale.config import load_config
from mtl_scale.errors import UserError
from mtl_scale.plan.cli import build_parser, inputs_from_config
from mtl_scale.plan.estimate import GiB, estimate
from mtl_scale.plan.shape import load_model_config, model_shape
from mtl_scale.stage_choice import SHIPPED, choose_stage

from dist import ROOT, launch

CONFIG = "configs/llama3_8b_8gpu.yaml"


def shape(name):
    return model_shape(*load_model_config(f"configs/models/{name}.json"))


def peak(cfg, shp, stage, quant, gpu_memory=80):
    cfg = load_config(CONFIG, [f"deepspeed_config={SHIPPED[stage]}", f"model.quantization={quant}"])
    args = build_parser().parse_args(["--gpu-memory", str(gpu_memory)])
    return estimate(shp, inputs_from_config(cfg, shp, args)).peak / GiB


@pytest.mark.parametrize("model, memory, expected", [
    ("llama-3.1-8b", 80, (2, "none")),    # a bf16 8B base fits whole on every GPU
    ("llama-3.1-8b", 24, (3, "none")),
    ("llama-3.1-70b", 80, (3, "none")),   # 140 GB of bf16 base does not
    ("llama-3.1-70b", 40, (3, "nf4")),
])
def test_auto_takes_the_first_option_that_fits(model, memory, expected):
    cfg = load_config(CONFIG)
    shp = shape(model)
    choice = choose_stage(cfg, shp, nodes=1, gpus_per_node=8, gpu_memory_gib=memory)
    assert (choice.zero_stage, choice.quantization) == expected
    assert choice.deepspeed_config == SHIPPED[expected[0]]
    # the options before it do not fit, the chosen one does, by the planner's own estimate
    options = [(2, "none"), (3, "none"), (3, "nf4")]
    for stage, quant in options[:options.index(expected)]:
        assert peak(cfg, shp, stage, quant, memory) > memory
    assert peak(cfg, shp, *expected, memory) <= memory
    assert choice.reason.startswith(f"ZeRO-{expected[0]}") and f"of {memory} GiB" in choice.reason
    applied = choice.apply(cfg)
    assert applied.deepspeed_config == SHIPPED[expected[0]] and applied.model.quantization == expected[1]


def test_surgery_and_coupling_keep_zero3_and_say_why():
    shp = shape("llama-3.1-8b")
    for overrides, named in ((["sharing=hard", "surgery.method=pcgrad"], "surgery.method=pcgrad"),
                             (["sharing=hybrid", "surgery.telemetry=true"], "surgery.telemetry"),
                             (["soft.coupling=0.1"], "soft.coupling")):
        choice = choose_stage(load_config(CONFIG, overrides), shp, 1, 8, 80)
        assert choice.zero_stage == 3, overrides
        assert f"{named} works on ZeRO-3's gradient partitions, so ZeRO-2 was not tried" in choice.reason


def test_nothing_fits_names_every_option():
    with pytest.raises(UserError, match=r"deepspeed_config=auto: no ZeRO stage fits 24 GiB per GPU at world size 8 "
                                        r"\(ZeRO-2 [\d.]+ GiB, ZeRO-3 [\d.]+ GiB, ZeRO-3 \+ nf4 [\d.]+ GiB\)"):
        choose_stage(load_config(CONFIG), shape("llama-3.1-70b"), 1, 8, 24)


def test_plan_cli_shows_the_auto_choice():
    res = subprocess.run([sys.executable, "launch/plan.py", "--config", CONFIG, "--model",
                          "configs/models/llama-3.1-70b.json", "deepspeed_config=auto", "--json"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "deepspeed_config auto: ds_configs/zero3.json (ZeRO-3: ZeRO-3 needs" in res.stderr
    assert '"zero_stage": 3' in res.stdout


@pytest.mark.dist
def test_run_with_auto_logs_its_choice_and_trains_at_it(tmp_path):
    # 2 CPU ranks, the tiny model: ZeRO-2 fits easily; with PCGrad ZeRO-3 is kept
    base = ["--config", "configs/demo.yaml", "max_steps=1", "eval.max_examples=2", "micro_batch_size=2", "deepspeed_config=auto",
            "sampling.tasks_per_step=2"] + [f"tasks.{i}.{k}" for i in range(4) for k in ("num_examples=12", "eval_size=2")]
    res = launch("launch/train.py", [*base, "sharing=soft", f"output_dir={tmp_path / 'a'}"])
    assert "deepspeed_config auto: ds_configs/zero2.json (ZeRO-2, the frozen base replicated" in res.stdout
    assert "ZeRO stage 2" in res.stdout
    res = launch("launch/train.py", [*base, "sharing=hard", "surgery.method=pcgrad", f"output_dir={tmp_path / 'b'}"])
    assert "deepspeed_config auto: ds_configs/zero3.json (ZeRO-3: " in res.stdout
    assert "surgery.method=pcgrad works on ZeRO-3's gradient partitions" in res.stdout and "ZeRO stage 3" in res.stdout


def test_planner_sizes_grouped_and_packed_micro_batches_by_their_token_budget():
    shp = shape("llama-3.1-8b")

    def inputs(*overrides):
        return inputs_from_config(load_config(CONFIG, list(overrides)), shp)

    padded = inputs()
    assert (padded.micro_batch_size, padded.seq_len) == (4, 2048)  # micro_batch_size x max_seq_len
    packed = inputs("batching.mode=packed", "batching.max_tokens=65536")  # flash_attention_2: one row
    assert (packed.micro_batch_size, packed.seq_len) == (1, 65536)
    sdpa = inputs("batching.mode=packed", "batching.max_tokens=65536", "model.attn_implementation=sdpa")
    assert (sdpa.micro_batch_size, sdpa.seq_len) == (32, 2048)  # rows of max_seq_len
    grouped = inputs("batching.mode=grouped", "batching.max_tokens=5000")
    assert (grouped.micro_batch_size, grouped.seq_len) == (3, 2048)  # whole rows covering the budget
    assert estimate(shp, packed).peak > estimate(shp, padded).peak
    # auto sees the budget: on 40 GiB ZeRO-2 fits the padded run (8192 tokens), not a packed one of twice that
    assert choose_stage(load_config(CONFIG), shp, 1, 8, 40).zero_stage == 2
    big = load_config(CONFIG, ["batching.mode=packed", "batching.max_tokens=16384"])
    assert choose_stage(big, shp, 1, 8, 40).zero_stage == 3
