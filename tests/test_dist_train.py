"""Real DeepSpeed ZeRO-3 on 2 CPU ranks: both sharing modes train, and the adapters they save are
real — stock PEFT, in this (separate) process, reproduces the trained model's logits."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dist import launch

pytestmark = pytest.mark.dist

COMMON = ["max_steps=6", "micro_batch_size=4", "sampling.tasks_per_step=3", "lora.r=8",
          "tasks.0.num_examples=40", "tasks.1.num_examples=40", "tasks.2.num_examples=40", "tasks.3.num_examples=40",
          "tasks.0.eval_size=10", "tasks.1.eval_size=10", "tasks.2.eval_size=10", "tasks.3.eval_size=10", "lr=1e-2",
          "eval.every_steps=3", "eval.max_examples=5", "sampling.strategy=temperature", "sampling.temperature=2",
          "eval.loss_chunk_tokens=7"]


EXTRA = {"soft": [], "hard": ["surgery.telemetry=true"], "hybrid": ["surgery.method=pcgrad", "hybrid.task_r=4"]}


@pytest.fixture(scope="module", params=["soft", "hard", "hybrid"])
def trained(request, tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp(f"run_{request.param}")
    res = launch("tests/scripts/train_probe.py",
                 ["configs/demo.yaml", f"sharing={request.param}", f"output_dir={out}", *COMMON, *EXTRA[request.param]])
    return request.param, out, res.stdout


def test_adapters_saved_in_peft_layout_with_full_tensors(trained, tiny_model_dir):
    sharing, out, _ = trained
    tasks = ["copy", "reverse", "sort", "add"]
    expected = {"soft": tasks, "hard": ["shared"], "hybrid": ["shared", *tasks]}[sharing]
    assert sorted(p.name for p in (out / "adapters").iterdir()) == sorted(expected)
    hidden = json.loads((tiny_model_dir / "config.json").read_text())["hidden_size"]
    for name in expected:
        cfg = json.loads((out / "adapters" / name / "adapter_config.json").read_text())
        r = 4 if sharing == "hybrid" and name != "shared" else 8
        assert cfg["r"] == r and cfg["peft_type"] == "LORA"
        state = load_file(out / "adapters" / name / "adapter_model.safetensors")
        # 2 layers x 7 target modules x (A, B)
        assert len(state) == 28
        q_a = state["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
        q_b = state["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
        assert q_a.shape == (r, hidden) and q_b.shape == (hidden, r)
        # B starts at zero; a trained adapter's B is not (so this is not an init or a hollow save)
        assert all(v.numel() > 0 for v in state.values())
        assert q_b.abs().sum() > 0


def test_stock_peft_reproduces_trained_logits(trained, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    sharing, out, _ = trained
    probe = torch.load(out / "probe_logits.pt", weights_only=True)
    assert probe["logits"], "the driver recorded no logits"
    for combo, logits in probe["logits"].items():
        names = combo.split("+")
        # fp32, as the run trained it (configs/demo.yaml); the checkpoint itself is stored in bf16
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        model = PeftModel.from_pretrained(base, out / "adapters" / names[0], adapter_name=names[0]).eval()
        for name in names[1:]:  # hybrid: shared + task adapter applied together
            model.load_adapter(out / "adapters" / name, adapter_name=name)
        model.base_model.set_adapter(names)
        with torch.no_grad():
            ours = model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
        mask = probe["attention_mask"].bool()
        torch.testing.assert_close(ours[mask], logits[mask], atol=1e-4, rtol=1e-4)
        # and the adapter matters: the base alone gives other logits
        with torch.no_grad(), model.disable_adapter():
            plain = model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
        assert (plain[mask] - logits[mask]).abs().max() > 1e-3


def test_chunked_eval_loss_on_the_partitioned_model(trained):
    """In-training evaluation under ZeRO-3 with the held-out loss in chunks of 7 completion positions:
    the ranks' shards need different numbers of head calls (each gathers the partitioned lm_head), the
    run does not hang, and the loss equals the full-logits one."""
    _, out, _ = trained
    r0, r1 = [json.loads((out / f"rank{r}_eval.json").read_text()) for r in (0, 1)]
    assert r0["head_calls"] != r1["head_calls"]  # so the per-batch maximum over ranks was needed
    assert r0["chunked"] == r1["chunked"]  # all-reduced
    losses = {k: v for k, v in r0["full"].items() if k.startswith("eval/loss/")}
    assert len(losses) == 4
    for k, v in losses.items():
        assert r0["chunked"][k] == pytest.approx(v, rel=1e-5)


def test_schedule_identical_on_ranks_and_shards_disjoint(trained):
    _, out, _ = trained
    r0 = json.loads((out / "rank0_schedule.json").read_text())
    r1 = json.loads((out / "rank1_schedule.json").read_text())
    assert r0["plans"] == r1["plans"]
    assert [d["task"] for d in r0["drawn"]] == [d["task"] for d in r1["drawn"]]
    for task in {d["task"] for d in r0["drawn"]}:
        seen0 = {i for d in r0["drawn"] if d["task"] == task for i in d["idx"]}
        seen1 = {i for d in r1["drawn"] if d["task"] == task for i in d["idx"]}
        assert not seen0 & seen1, f"ranks read overlapping examples of {task}"


def test_metrics_and_tensorboard_written(trained):
    _, out, stdout = trained
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 7))
    for r in lines:
        assert r["tokens_per_s"] > 0 and r["step_time_s"] > 0 and r["lr"] > 0
        task_losses = {k: v for k, v in r.items() if k.startswith("loss/")}
        assert task_losses and all(0 < v < 20 for v in task_losses.values())
        # the losses are over exactly the tasks the step's plan scheduled
        assert {k[5:] for k in task_losses} == {k[len("micro_batches/"):] for k in r if k.startswith("micro_batches/")}
        assert sum(v for k, v in r.items() if k.startswith("micro_batches/")) == 3
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert "ZeRO stage 3" in stdout
    # per-task telemetry: samples seen, the realised mix and the target probability (uniform here: equal sizes)
    last = lines[-1]
    assert sum(last[f"samples/{t}"] for t in ("copy", "reverse", "sort", "add")) == 6 * 3 * 4 * 2
    assert sum(last[f"mix/{t}"] for t in ("copy", "reverse", "sort", "add")) == pytest.approx(1.0)
    assert last["sampling_prob/copy"] == pytest.approx(0.25)
    # held-out evaluation during training, every 3 steps, on every task
    for r in lines:
        has_eval = any(k.startswith("eval/") for k in r)
        assert has_eval == (r["step"] % 3 == 0)
        if has_eval:
            for t in ("copy", "reverse", "sort", "add"):
                assert 0 < r[f"eval/loss/{t}"] < 20 and 0 <= r[f"eval/exact_match/{t}"] <= 1
                assert r[f"eval/score/{t}"] == r[f"eval/exact_match/{t}"]  # the built-ins' metric is exact_match


def test_surgery_telemetry(trained):
    sharing, out, _ = trained
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    if sharing == "soft":  # nothing shared, nothing measured
        assert not any(k.startswith("grad_cos/") for r in lines for k in r)
        return
    for r in lines:
        in_step = sorted(k[len("micro_batches/"):] for k in r if k.startswith("micro_batches/"))
        assert sorted(k[len("grad_norm/"):] for k in r if k.startswith("grad_norm/")) == in_step
        assert all(r[f"grad_norm/{t}"] > 0 for t in in_step)
        cos = [v for k, v in r.items() if k.startswith("grad_cos/")]
        assert len(cos) == len(in_step) * (len(in_step) - 1) // 2 and all(-1 <= c <= 1 for c in cos)
        if cos:
            assert r["surgery/conflict_fraction"] == sum(c < 0 for c in cos) / len(cos)
        weights = [r[f"surgery_weight/{t}"] for t in in_step]
        if sharing == "hard":  # sum: telemetry only
            assert weights == [1.0] * len(in_step) and r["surgery/projections"] == 0
        else:
            assert (r["surgery/projections"] > 0) == any(c < 0 for c in cos)
    report = (out / "report.md").read_text()
    assert "gradient conflicts" in report and (out / "plots" / "grad_cosine.png").is_file()


def test_report_written_with_plots(trained):
    _, out, _ = trained
    report = (out / "report.md").read_text()
    for t in ("copy", "reverse", "sort", "add"):
        assert f"| {t} | 0.250 |" in report
    for png in ("loss", "score", "sampling_mix"):
        assert (out / "plots" / f"{png}.png").stat().st_size > 5000


def test_tiny_task_on_two_ranks_does_not_hang(tmp_path, tiny_model_dir):
    """A 3-example task: rank shards of 2 and 1 examples, micro-batches of 4 — both ranks cycle their
    shard and run exactly as many micro-batches as the other. And a launch on a fresh machine builds no op."""
    f = tmp_path / "tiny.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"repeat [{w}] ->", "completion": f" {w}"}) + "\n"
                         for w in ("abc", "de", "fgh")))
    cfg = tmp_path / "run.yaml"
    # metric=choice on 5 held-out examples (shards of 3 and 2) and stop strings: the sharded evaluation's
    # collectives (head calls, synced generation) must match on both ranks
    cls = tmp_path / "cls.jsonl"
    cls.write_text("".join(json.dumps({"prompt": f"is [{w}] sorted? ->", "completion": " yes" if list(w) == sorted(w)
                                       else " no"}) + "\n" for w in ("ab", "ba", "abc", "cba", "bd", "db", "ace", "eca")))
    cfg.write_text(f"tasks:\n  - {{name: tiny, source: '{f}', eval_size: 0}}\n"
                   f"  - {{name: copy, source: 'builtin:copy', num_examples: 50, eval_size: 4, metric: contains, "
                   f"stop: [']']}}\n"
                   f"  - {{name: cls, source: '{cls}', eval_size: 5, metric: choice, choices: [' yes', ' no']}}\n"
                   f"max_steps: 5\nmicro_batch_size: 4\nsampling: {{strategy: uniform, tasks_per_step: 3}}\n"
                   f"eval: {{loss_chunk_tokens: 2}}\noutput_dir: {tmp_path / 'out'}\n")
    # A fresh extensions dir, as on a new machine: CPU ranks must compile nothing (DeepSpeed's shared-memory op
    # took minutes on CI, and a launch killed mid-build left a lock that hung every later launch).
    res = launch("launch/train.py", ["--config", str(cfg)], timeout=240,
                 env={"TORCH_EXTENSIONS_DIR": str(tmp_path / "torch_extensions")})
    assert "shm_comm" not in res.stdout and not (tmp_path / "torch_extensions").exists()
    lines = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 5 and lines[-1]["samples/tiny"] > 3  # the tiny task was drawn and cycled
    assert lines[-1]["eval/score/cls"] in {k / 5 for k in range(6)}  # 5 examples scored, over both ranks
    assert 0 <= lines[-1]["eval/score/copy"] <= 1 and lines[-1]["eval/loss/cls"] > 0
    assert (tmp_path / "out" / "adapters" / "tiny" / "adapter_model.safetensors").is_file()


def test_evaluate_cli_reports_base_and_adapters(trained, tmp_path):
    import subprocess
    import sys

    sharing, out, _ = trained
    res = subprocess.run([sys.executable, "launch/evaluate.py", "--config", "configs/demo.yaml", f"sharing={sharing}",
                          f"output_dir={out}", *COMMON], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parent.parent)
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads((out / "eval.json").read_text())
    tasks = ["copy", "reverse", "sort", "add"]
    assert sorted(results["base"]) == sorted(tasks)
    expected = {"hard": ["shared"], "soft": tasks, "hybrid": [f"shared+{t}" for t in tasks]}[sharing]
    assert sorted(results["adapters"]) == sorted(expected)
    for name, per_task in results["adapters"].items():
        assert sorted(per_task) == (sorted(tasks) if sharing == "hard" else [name.split("+")[-1]])
        for m in per_task.values():
            assert m["n"] == 10 and 0 <= m["exact_match"] <= 1 and 0 < m["loss"] < 20
    # trained adapters beat the base's held-out loss on average, even after 6 steps
    adapted = {t: m["loss"] for per_task in results["adapters"].values() for t, m in per_task.items()}
    assert sum(adapted.values()) < sum(results["base"][t]["loss"] for t in adapted)
    for task in tasks:
        assert f"| {task} |" in res.stdout
