"""bench/throughput.py and the arithmetic it shares with its worker (bench/common.py): against
hand-computed values, the synthetic fixed-length data, and one end-to-end run of the driver (both
stacks on 2 real ZeRO-3 CPU ranks)."""
import json
import re
import statistics
import sys

import pytest

from bench import common, throughput as tp
from dist import ROOT, _run


def test_flops_per_token_by_hand():
    # 4·1000 (frozen: forward + activation gradients) + 6·10 (LoRA) + 12·2 layers·8 hidden·4 seq
    assert common.flops_per_token(n_frozen=1000, n_trainable=10, n_layers=2, hidden=8, seq=4) == 4000 + 60 + 768
    # a 7B-class base, LoRA negligible, 32 layers, hidden 4096, 2048 tokens: 2.8e10 + 3.221225472e9
    assert common.flops_per_token(7e9, 0, 32, 4096, 2048) == pytest.approx(3.1221225472e10, rel=1e-12)


def test_peak_tflops_by_device_name():
    assert common.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert common.peak_tflops("NVIDIA H100 PCIe") == 756.0  # the specific name wins over "H100"
    assert common.peak_tflops("NVIDIA H200") == 989.0
    assert common.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert common.peak_tflops("NVIDIA GeForce RTX 4090") is None
    assert common.peak_tflops("NVIDIA GeForce RTX 4090", override=165.0) == 165.0
    assert common.peak_tflops("NVIDIA H100 80GB HBM3", override=500.0) == 500.0


def test_mfu_by_hand():
    # 1000 tokens/s · 1e9 FLOPs/token = 1e12 FLOP/s on 2 devices of 1 TFLOP/s peak: 50%
    assert common.mfu(1000.0, 1e9, peak=1.0, n_devices=2) == pytest.approx(0.5)
    # 8B-class model at 4000 tokens/s on one H100: 4000 · 4.8e10 / 989e12
    assert common.mfu(4000.0, 4.8e10, 989.0, 1) == pytest.approx(0.19413549, rel=1e-6)


def test_abba_order_balances_positions():
    assert tp.abba_order(["a", "b"], 2) == ["a", "b", "b", "a", "a", "b", "b", "a"]
    order = tp.abba_order(["hard", "hf", "soft"], 1)
    assert order == ["hard", "hf", "soft", "soft", "hf", "hard"]
    mean_pos = {v: statistics.mean(i for i, x in enumerate(order) if x == v) for v in set(order)}
    assert set(mean_pos.values()) == {2.5}  # linear drift adds the same to every variant


def test_window_skips_warmup_steps():
    # step ends at t = 1, 3, 6, 10 s with 10, 30, 60, 100 tokens and 1, 3, 6, 10 sequences so far
    marks = [(1.0, 10, 1), (3.0, 30, 3), (6.0, 60, 6), (10.0, 100, 10)]
    w = common.window(marks, warmup=1)
    assert w == {"step_times": [2.0, 3.0, 4.0], "elapsed": 9.0, "tokens": 90, "sequences": 9}
    assert common.window(marks, warmup=3) == {"step_times": [4.0], "elapsed": 4.0, "tokens": 40, "sequences": 4}
    with pytest.raises(ValueError, match="warmup"):
        common.window(marks, warmup=0)  # no step end to start the clock from
    with pytest.raises(ValueError, match="warmup"):
        common.window(marks, warmup=4)


def test_variant_medians_and_ratios_by_hand():
    results = [
        {"variant": "ours-hard", "step_time_s": 0.30, "tokens_per_s": 1000.0, "tokens": 300, "steps": 3},
        {"variant": "hf", "step_time_s": 0.40, "tokens_per_s": 800.0, "tokens": 330, "steps": 3},
        {"variant": "hf", "step_time_s": 0.50, "tokens_per_s": 600.0, "tokens": 330, "steps": 3},
        {"variant": "ours-hard", "step_time_s": 0.34, "tokens_per_s": 900.0, "tokens": 300, "steps": 3},
        {"variant": "ours-soft", "step_time_s": 0.336, "tokens_per_s": 890.0, "tokens": 300, "steps": 3},
        {"variant": "ours-adaptive", "step_time_s": 0.342, "tokens_per_s": 880.0, "tokens": 300, "steps": 3,
         "controller_s": 3.42e-5},
    ]
    med = tp.variant_medians(results)
    assert med["ours-hard"]["launches"] == 2 and med["ours-soft"]["launches"] == 1
    assert med["ours-hard"]["step_time_s"] == pytest.approx(0.32)      # (0.30 + 0.34) / 2
    assert med["hf"]["tokens_per_s"] == pytest.approx(700.0)
    assert med["hf"]["tokens_per_step"] == pytest.approx(110.0)
    r = tp.ratios(med, {4: {"ratio": 1.03}})
    assert r["ours-hard/hf tokens_per_s"] == pytest.approx(950.0 / 700.0)
    assert r["ours-hard/hf step_time"] == pytest.approx(0.32 / 0.45)
    assert r["ours-soft/ours-hard step_time"] == pytest.approx(0.336 / 0.32)  # 1.05
    assert r["pcgrad/sum K=4 step_time"] == 1.03
    assert r["ours-adaptive/ours-soft step_time"] == pytest.approx(0.342 / 0.336)  # the controller's overhead
    assert r["ours-adaptive controller/step_time"] == pytest.approx(1e-4)              # ... and its own share
    packed = tp.variant_medians(results + [
        {"variant": "hf-grouped", "step_time_s": 0.2, "tokens_per_s": 1200.0, "tokens": 240, "steps": 3},
        {"variant": "ours-packed", "step_time_s": 0.3, "tokens_per_s": 1500.0, "tokens": 450, "steps": 3},
        {"variant": "ours-packed-varlen", "step_time_s": 0.3, "tokens_per_s": 1800.0, "tokens": 540, "steps": 3}])
    r = tp.ratios(packed, {})
    assert r["ours-packed/best-hf-trl(hf-grouped) tokens_per_s"] == pytest.approx(1500 / 1200)
    assert r["ours-packed-varlen/best-hf-trl(hf-grouped) tokens_per_s"] == pytest.approx(1800 / 1200)
    assert r["ours-packed-varlen/ours-padded tokens_per_s"] == pytest.approx(1800 / 950)  # ours-hard: padded


def test_parse_result_finds_the_line_among_launcher_noise():
    out = "[INFO] launcher\n[rank 1] warn\nTHROUGHPUT_RESULT {\"tokens\": 5, \"stack\": \"hf\"}\n[INFO] exits\n"
    assert tp.parse_result(out) == {"tokens": 5, "stack": "hf"}
    with pytest.raises(RuntimeError, match="THROUGHPUT_RESULT"):
        tp.parse_result("[INFO] a worker that died early\n")


def test_synthetic_tasks_are_exactly_max_seq_len_tokens(tmp_path, tiny_tokenizer):
    from mtl_scale.config import load_config
    from mtl_scale.data.prepare import prepare_tasks

    overrides = common.write_synthetic_tasks(tiny_tokenizer, tmp_path, n_tasks=2, n_examples=20, seq_len=48)
    cfg = load_config(ROOT / "configs/demo.yaml", ["max_seq_len=48", *overrides])
    tasks = prepare_tasks(cfg, tiny_tokenizer)
    assert list(tasks) == ["synthetic0", "synthetic1"]
    for data in tasks.values():
        assert len(data.train) == 20 and data.train.dropped == 0
        assert {len(ids) for ids in data.train.input_ids} == {48}
        # a prompt of about half the sequence, the rest is completion (the loss is taken there)
        assert all(12 <= n <= 36 for n in data.train.prompt_lens)


@pytest.mark.dist
def test_driver_end_to_end_both_stacks_on_zero3(tmp_path):
    out = tmp_path / "summary.json"
    res = _run([sys.executable, "-m", "bench.throughput", "--once", "--warmup", "1", "--steps", "2",
                "--json", str(out), "--profile", str(tmp_path / "prof"), "--kernel-profile", str(tmp_path / "kern")],
               timeout=240, env=None)
    assert res.returncode == 0, res.stdout[-20000:]
    printed = {name: float(value) for name, value in re.findall(r"^RATIO (.+?) = ([\d.]+)", res.stdout, re.MULTILINE)}
    assert set(printed) == {"ours-hard/hf tokens_per_s", "ours-hard/hf step_time", "ours-soft/ours-hard step_time"}
    assert all(v > 0 for v in printed.values())

    by_variant = {r["variant"]: r for r in json.loads(out.read_text())["results"]}
    ours, hf, soft = by_variant["ours-hard"], by_variant["hf"], by_variant["ours-soft"]
    for r in (ours, hf, soft):
        # ZeRO-3 really shards the base: every parameter is DeepSpeed-managed, each rank holds half
        assert r["zero_stage"] == 3 and r["all_params_zero3"] and r["base_local_fraction"] == pytest.approx(0.5, abs=0.01)
        assert r["only_lora_trainable"] and r["world"] == 2 and r["steps"] == 2 and r["tokens"] > 0
    assert hf["built_under_zero_init"]  # from_pretrained ran while TrainingArguments' HfDeepSpeedConfig was alive
    # a fair comparison: the same model, the same LoRA, the same threads per rank
    assert ours["trainable_params"] == hf["trainable_params"] == soft["trainable_params"] // 4
    assert ours["frozen_params"] == hf["frozen_params"] and ours["threads"] == hf["threads"]
    assert ours["flops_per_token"] == pytest.approx(hf["flops_per_token"], rel=0.2)  # differs by mean length only
    # the same DeepSpeed dict: "auto" persistence threshold = the largest LoRA matrix (down_proj's lora_A, r x 384)
    assert ours["persistence_threshold"] == hf["persistence_threshold"] == soft["persistence_threshold"] == 16 * 384

    # --profile: rank 0's timed steps of every launch, and bench.profile_diff on two of them
    profiles = sorted(p.name for p in (tmp_path / "prof").iterdir())
    assert profiles == ["hf-hard-0.prof", "ours-hard-0.prof", "ours-soft-0.prof"]
    prof = tmp_path / "prof"
    diff = _run([sys.executable, "-m", "bench.profile_diff", str(prof / "hf-hard-0.prof"),
                 str(prof / "ours-hard-0.prof"), "--steps", "1", "--top", "400"], timeout=60, env=None)
    assert diff.returncode == 0, diff.stdout
    # mtl_scale's step runs only in the second profile: its calls go from 0 to one per timed step (2)
    assert re.search(r"\s0 ->\s+2\s+/\S*mtl_scale/engine.py:\d+ optimizer_step$", diff.stdout, re.MULTILINE), diff.stdout
    # --kernel-profile: torch.profiler's trace and operator table of the same launches
    kern = tmp_path / "kern"
    assert sorted(p.name for p in kern.iterdir()) == sorted(f"{v}-0.{x}" for v in ("hf-hard", "ours-hard", "ours-soft")
                                                            for x in ("json", "txt"))
    trace = json.loads((kern / "ours-hard-0.json").read_text())
    ops = {e["name"] for e in trace["traceEvents"] if e.get("cat") == "cpu_op"}
    assert {"aten::mm", "aten::scaled_dot_product_attention"} <= ops, sorted(ops)
    table = (kern / "ours-hard-0.txt").read_text()
    assert "Self CPU" in table and "aten::" in table


def test_realistic_tasks_have_gsm8k_and_long_tailed_lengths(tmp_path, tiny_tokenizer, gsm8k_path):
    from mtl_scale.config import load_config
    from mtl_scale.data.prepare import prepare_tasks

    overrides = common.write_realistic_tasks(tiny_tokenizer, tmp_path, n_examples=300, max_seq_len=512, gsm8k=gsm8k_path)
    cfg = load_config(ROOT / "configs/demo.yaml", ["max_seq_len=512", *overrides])
    tasks = prepare_tasks(cfg, tiny_tokenizer)
    assert list(tasks) == ["gsm8k", "instruct0", "instruct1"]
    gsm = sorted(len(ids) for ids in tasks["gsm8k"].train.input_ids)
    assert gsm[0] > 100 and gsm[-1] == 512  # GSM8K's own lengths, the longest truncated
    for name in ("instruct0", "instruct1"):
        lengths = sorted(len(ids) for ids in tasks[name].train.input_ids)
        median, p95 = lengths[len(lengths) // 2], lengths[95 * len(lengths) // 100]
        assert 40 < median < 120 and p95 > 3 * median  # most short, a long tail
    assert tp.budget_overrides(cfg) == [f"batching.max_tokens={cfg.micro_batch_size * 512}"]
