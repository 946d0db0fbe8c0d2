"""The correctness oracle: adapters trained under ZeRO-3 on 2 ranks equal the same algorithm run on
full, unsharded gradients in one process on the same examples (to float tolerance).

The reference computes each step's objective (token-, task- or manually weighted, see
mtl_scale/loss_weighting.py) straight from its definition on all ranks' examples, backpropagates it
once, then clips over all trainable parameters and steps AdamW and the LR schedule.

Tolerance: Adam divides each element by its running gradient magnitude, so elements whose gradient
is near zero magnify fp32 summation-order differences (ranks reduce in another order than one
process sums). Observed: max |diff| 1.6e-5 on parameters of size ~1e-2; without the stale-gradient
fix in engine.py the soft-sharing diff is ~1e-2, so the bound separates right from wrong clearly.
"""
import json

import pytest
import torch
from safetensors.torch import load_file

from dist import launch

pytestmark = pytest.mark.dist

ARGS = ["max_steps=5", "micro_batch_size=3", "sampling.tasks_per_step=3", "lora.r=4", "lr=5e-3", "max_grad_norm=0.5",
        "warmup_steps=1", "weight_decay=0.01", "sampling.strategy=uniform"] + \
       [f"tasks.{i}.{k}" for i in range(4) for k in ("num_examples=24", "eval_size=4")]


def reference_adapters(cfg, model_dir, drawn_per_rank):
    from peft.utils import get_peft_model_state_dict

    from mtl_scale import adapters
    from mtl_scale.data.formatting import collate, token_loss_sum
    from mtl_scale.data.prepare import prepare_tasks
    from mtl_scale.ds_config import gradient_accumulation_steps
    from mtl_scale.model import load_model, load_tokenizer
    from mtl_scale.trainer import lr_lambda

    tok = load_tokenizer(str(model_dir))
    tasks = prepare_tasks(cfg, tok)
    names = adapters.adapter_names(cfg.sharing, list(tasks))
    model = adapters.attach_adapters(load_model(cfg.model, str(model_dir)), cfg.lora, names, cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    gas, world = gradient_accumulation_steps(cfg), len(drawn_per_rank)
    for p in params:  # DeepSpeed's flat fp32 partition steps every adapter every step, used or not
        p.grad = torch.zeros_like(p)
    for step in range(cfg.max_steps):
        sums, counts = {}, {}  # per task: summed NLL (a graph) and completion tokens, over both ranks
        for k in range(step * gas, (step + 1) * gas):
            task = drawn_per_rank[0][k]["task"]
            adapters.activate(model, adapters.adapter_for_task(cfg.sharing, task))
            for drawn in drawn_per_rank:
                assert drawn[k]["task"] == task
                data = tasks[task].train
                batch = collate([(data.input_ids[i], data.labels[i]) for i in drawn[k]["idx"]], tok.pad_token_id)
                s, n = token_loss_sum(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                      batch["labels"])
                sums[task] = sums.get(task, 0.0) + s
                counts[task] = counts.get(task, 0) + int(n)
        # The step objective, written directly from its definition (not from the scales)
        if cfg.loss.task_weighting == "token":
            loss = sum(sums.values()) / sum(counts.values())
        elif cfg.loss.task_weighting == "task":
            loss = sum(sums[t] / counts[t] for t in sums) / len(sums)
        else:
            z = sum(cfg.loss.weights[t] for t in sums)
            loss = sum(cfg.loss.weights[t] * sums[t] / counts[t] for t in sums) / z
        loss.backward()
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=False)
    return {n: get_peft_model_state_dict(model, adapter_name=n) for n in names}


@pytest.mark.parametrize("sharing, weighting, zero", [("soft", "token", 3), ("hard", "token", 3), ("soft", "task", 3),
                                                     ("soft", "token", 2)])
def test_zero3_two_ranks_equals_single_process_reference(sharing, weighting, zero, tmp_path, tiny_model_dir):
    from mtl_scale.config import load_config

    args = [f"sharing={sharing}", f"loss.task_weighting={weighting}", f"output_dir={tmp_path}",
            f"deepspeed_config=ds_configs/zero{zero}.json", *ARGS]
    launch("tests/scripts/train_probe.py", ["configs/demo.yaml", *args])
    cfg = load_config("configs/demo.yaml", args)
    drawn = [json.loads((tmp_path / f"rank{r}_schedule.json").read_text())["drawn"] for r in range(2)]
    if sharing == "soft":
        # the case ZeRO-3 gets wrong by itself: an adapter absent from a step's first micro-batch
        firsts = [drawn[0][s * 3]["task"] for s in range(5)]
        assert any(d["task"] not in (firsts[s],) for s in range(5) for d in drawn[0][s * 3:(s + 1) * 3])
    expected = reference_adapters(cfg, tiny_model_dir, drawn)
    for name, ref in expected.items():
        got = load_file(tmp_path / "adapters" / name / "adapter_model.safetensors")
        assert got.keys() == ref.keys()
        for key in ref:
            torch.testing.assert_close(got[key], ref[key], atol=5e-5, rtol=1e-3, msg=f"{name} {key}")
        moved = sum((ref[k] != 0).any() for k in ref if "lora_B" in k)
        assert moved > 0, f"adapter {name} never trained: the comparison would be vacuous"
