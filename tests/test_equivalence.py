"""The correctness oracle: adapters trained under ZeRO-3 on 2 ranks equal the same algorithm run on
full, unsharded gradients in one process on the same examples (to float tolerance).

The reference computes each step's objective (token-, task-, manually or DWA-weighted, see
mtl_scale/loss_weighting.py) straight from its definition on all ranks' examples, backpropagates it
once, then clips over all trainable parameters and steps AdamW and the LR schedule. DWA's weights come
from the reference's own per-task losses (balancing.dwa_weights of their moving averages), not from the run.

Adam's eps is raised to 1e-3 here (the shipped configs use 1e-8): Adam divides each element by its
running gradient magnitude, so with a tiny eps an element whose gradient is ~1e-8 moves by ±lr on
the sign of fp32 round-off (ranks reduce in another order than one process sums), which would hide
real differences behind noise or fail on none. With eps=1e-3 the update depends smoothly on the
gradient and the comparison tests what it should: the gradients the distributed engine computes.
Without the stale-gradient fix in engine.py the soft-sharing case is off by far more than the bound.
"""
import json

import pytest
import torch
from safetensors.torch import load_file

from dist import ROOT, launch

pytestmark = pytest.mark.dist

EPS = 1e-3
ARGS = ["max_steps=5", "micro_batch_size=3", "sampling.tasks_per_step=3", "lora.r=4", "lr=5e-3", "max_grad_norm=0.5",
        "warmup_steps=1", "weight_decay=0.01", "sampling.strategy=uniform"] + \
       [f"tasks.{i}.{k}" for i in range(4) for k in ("num_examples=24", "eval_size=4")]


def reference_adapters(cfg, model_dir, drawn_per_rank, dwa_log=None):
    """``dwa_log``: a list that receives each step's DWA weights (loss.task_weighting=dwa)."""
    from peft.utils import get_peft_model_state_dict

    from mtl_scale.balancing import dwa_weights, ema

    from mtl_scale import adapters
    from mtl_scale.data.formatting import collate, token_loss_sum
    from mtl_scale.data.prepare import prepare_tasks
    from mtl_scale.ds_config import gradient_accumulation_steps
    from mtl_scale.model import load_model, load_tokenizer
    from mtl_scale.surgery import random_orders, task_weights
    from mtl_scale.trainer import lr_lambda

    tok = load_tokenizer(str(model_dir))
    tasks = prepare_tasks(cfg, tok)
    names = adapters.adapter_names(cfg.sharing, list(tasks))
    model = adapters.attach_adapters(load_model(cfg.model, str(model_dir)), cfg.lora, names, cfg.seed,
                                     task_r=cfg.hybrid.task_r if cfg.sharing == "hybrid" else None)
    params = [p for p in model.parameters() if p.requires_grad]
    shared = list(adapters.lora_parameters(model, adapters.SHARED).values())
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), eps=EPS, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    gas = gradient_accumulation_steps(cfg)
    for p in params:  # DeepSpeed's flat fp32 partition steps every adapter every step (one Adam step count)
        p.grad = torch.zeros_like(p)
    loss_ema, loss_ema_prev = {}, {}  # per task, after the previous step and the one before (DWA)
    for step in range(cfg.max_steps):
        # Forward every micro-batch of the step (both ranks' examples), grouped by task in schedule order.
        sums, counts = {}, {}  # per task: summed NLL (a graph) and completion tokens
        for k in range(step * gas, (step + 1) * gas):
            task = drawn_per_rank[0][k]["task"]
            adapters.activate(model, adapters.adapters_for_task(cfg.sharing, task))
            for drawn in drawn_per_rank:
                assert drawn[k]["task"] == task
                data = tasks[task].train
                batch = collate([(data.input_ids[i], data.labels[i]) for i in drawn[k]["idx"]], tok.pad_token_id)
                s, n = token_loss_sum(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                      batch["labels"])
                sums[task] = sums.get(task, 0.0) + s
                counts[task] = counts.get(task, 0) + int(n)
        # The step objective L = Σ_t coef_t S_t, written from its definition (not from the scales).
        if cfg.loss.task_weighting == "token":
            coef = {t: 1 / sum(counts.values()) for t in sums}
        elif cfg.loss.task_weighting == "task":
            coef = {t: 1 / (len(sums) * counts[t]) for t in sums}
        else:
            w = cfg.loss.weights
            if cfg.loss.task_weighting == "dwa":
                w = dwa_weights(list(tasks), loss_ema, loss_ema_prev, cfg.loss.dwa.temperature)
                dwa_log.append(w)
            z = sum(w[t] for t in sums)
            coef = {t: w[t] / (z * counts[t]) for t in sums}
        loss_ema_prev = dict(loss_ema)
        for t in sums:
            loss_ema[t] = ema(loss_ema.get(t), float(sums[t].detach()) / counts[t], cfg.loss.dwa.ema_decay)
        # Per-task gradients of the shared adapter on full, unsharded tensors: one backward per task.
        task_grads = []
        for t in sums:
            before = torch.cat([p.grad.flatten() for p in shared]) if shared else None
            (coef[t] * sums[t]).backward()
            if shared:
                task_grads.append(torch.cat([p.grad.flatten() for p in shared]) - before)
        if cfg.surgery.method != "sum":
            g = torch.stack(task_grads).double()
            orders = random_orders(len(task_grads), torch.Generator().manual_seed(cfg.seed * 1_000_003 + step))
            combined = (task_weights(cfg.surgery.method, g @ g.T, orders) @ g).float()
            offset = 0
            for p in shared:
                p.grad.copy_(combined[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
        if cfg.soft.coupling:
            for key, p in adapters.lora_parameters(model, names[0]).items():
                group = [dict(model.named_parameters())[key.replace(f".{names[0]}.", f".{n}.")] for n in names]
                mean = torch.stack([q.detach() for q in group]).mean(0)
                for q in group:
                    q.grad += 2 * cfg.soft.coupling * (q.detach() - mean)
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        # Adapters no task of the step used stay as they are, Adam moments included (the step count is
        # shared, as in DeepSpeed's flat partitions); with coupling every adapter takes part.
        used = {n for t in sums for n in adapters.adapters_for_task(cfg.sharing, t)}
        absent = [] if cfg.soft.coupling else \
            [p for n in names if n not in used for p in adapters.lora_parameters(model, n).values()]
        kept = [(p, p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items() if k != "step"})
                for p in absent]
        opt.step()
        for p, value, state in kept:
            p.data.copy_(value)
            for k, v in state.items():
                opt.state[p][k].copy_(v)
        sched.step()
        opt.zero_grad(set_to_none=False)
    return {n: get_peft_model_state_dict(model, adapter_name=n) for n in names}


CASES = {  # id: overrides
    "soft-token-zero3": ["sharing=soft"],
    "hard-token-zero3": ["sharing=hard"],
    "soft-task-zero3": ["sharing=soft", "loss.task_weighting=task"],
    "soft-token-zero2": ["sharing=soft", "zero=2"],
    "hard-pcgrad": ["sharing=hard", "surgery.method=pcgrad"],
    "hybrid-pcgrad": ["sharing=hybrid", "surgery.method=pcgrad"],
    "hybrid-mgda-task": ["sharing=hybrid", "surgery.method=mgda", "loss.task_weighting=task"],
    "soft-coupling": ["sharing=soft", "soft.coupling=0.5"],
    # Optimizer offloaded to the host: ZeRO-3 copies only the last micro-batch's gradients there by itself.
    # `add` is never drawn: its adapter must leave the run bit for bit as it was initialised.
    "soft-offload-absent": ["sharing=soft", "offload=cpu", "weight_decay=0.1",
                            "sampling.weights={copy: 1, reverse: 1, sort: 1, add: 0}", "sampling.strategy=manual"],
    "hybrid-pcgrad-offload": ["sharing=hybrid", "surgery.method=pcgrad", "offload=cpu"],
    # Dynamic loss weights and a distribution that moves every step (a large eta makes it move visibly).
    "hybrid-dwa-adaptive": ["sharing=hybrid", "loss.task_weighting=dwa", "loss.dwa.temperature=0.05",
                            "sampling.strategy=adaptive", "sampling.adaptive.every_steps=1",
                            "sampling.adaptive.eta=50"],
    # batching.mode: the reference forwards the same examples unpacked and right-padded, one micro-batch each.
    # packed: 2 rows of <= 64 tokens per micro-batch; grouped: as many as fit 80 padded tokens. Either way
    # the micro-batches hold varying numbers of examples.
    "soft-packed": ["sharing=soft", "batching.mode=packed", "batching.max_tokens=128", "batching.row_tokens=64"],
    # ... and attention per example (model.attn_implementation=sdpa_varlen), against the padded reference
    "hybrid-pcgrad-packed": ["sharing=hybrid", "surgery.method=pcgrad", "batching.mode=packed",
                             "batching.max_tokens=128", "batching.row_tokens=64", "model.attn_implementation=sdpa_varlen"],
    "soft-task-grouped": ["sharing=soft", "loss.task_weighting=task", "batching.mode=grouped",
                          "batching.max_tokens=80"],
}


@pytest.mark.parametrize("case", list(CASES))
def test_zero3_two_ranks_equals_single_process_reference(case, tmp_path, tiny_model_dir):
    from mtl_scale.config import load_config

    stage = 2 if "zero=2" in CASES[case] else 3
    ds = json.loads((ROOT / "ds_configs" / f"zero{stage}.json").read_text())
    ds["optimizer"]["params"]["eps"] = EPS
    if "offload=cpu" in CASES[case]:
        ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    args = ARGS + [a for a in CASES[case] if a not in ("zero=2", "offload=cpu")] + \
        [f"output_dir={tmp_path}", f"deepspeed_config={tmp_path / 'ds.json'}"]
    cfg = load_config("configs/demo.yaml", args)
    launch("tests/scripts/train_probe.py", ["configs/demo.yaml", *args])
    drawn = [json.loads((tmp_path / f"rank{r}_schedule.json").read_text())["drawn"] for r in range(2)]
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    if cfg.surgery.method == "pcgrad":  # otherwise PCGrad would equal sum and prove nothing
        assert sum(m["surgery/projections"] for m in metrics) > 0
    if cfg.model.attn_implementation == "sdpa_varlen":  # the engine's example bounds reached attention, every
        for r in range(2):                               # layer of every packed training forward, and are right
            varlen = json.loads((tmp_path / f"rank{r}_varlen.json").read_text())
            assert varlen["packed"] > 0 and varlen["given"] == varlen["equal"] == varlen["packed"], varlen
    if cfg.batching.mode != "padded":  # the token budget, not micro_batch_size, decided the counts
        assert len({len(d["idx"]) for d in drawn[0] + drawn[1]}) > 1
        assert max(len(d["idx"]) for d in drawn[0]) > cfg.micro_batch_size
    if cfg.sharing == "soft":
        # the case ZeRO-3 gets wrong by itself: an adapter absent from a step's first micro-batch
        firsts = [drawn[0][s * 3]["task"] for s in range(5)]
        assert any(d["task"] not in (firsts[s],) for s in range(5) for d in drawn[0][s * 3:(s + 1) * 3])
    dwa_log = []
    if case == "soft-token-zero3":
        # The public step alone (what benchmarks and probes call) trains exactly what train_loop trained.
        step_args = [a.replace(f"output_dir={tmp_path}", f"output_dir={tmp_path / 'step_api'}") for a in args]
        launch("tests/scripts/step_probe.py", ["configs/demo.yaml", *step_args])
        for name in [t.name for t in cfg.tasks]:
            loop = load_file(tmp_path / "adapters" / name / "adapter_model.safetensors")
            step_api = load_file(tmp_path / "step_api" / "adapters" / name / "adapter_model.safetensors")
            assert loop.keys() == step_api.keys() and all(torch.equal(loop[k], step_api[k]) for k in loop), name
    expected = reference_adapters(cfg, tiny_model_dir, drawn, dwa_log)
    if cfg.loss.task_weighting == "dwa":  # the run weighted its losses as the reference did
        for m, w in zip(metrics, dwa_log, strict=True):
            assert {t: m[f"loss_weight/{t}"] for t in w} == pytest.approx(w, rel=1e-5)
        assert max(abs(v - 1) for w in dwa_log for v in w.values()) > 0.05  # weights far from uniform
    if cfg.sampling.strategy == "adaptive":
        check_adaptive_draws(cfg, metrics, drawn)
    for name, ref in expected.items():
        got = load_file(tmp_path / "adapters" / name / "adapter_model.safetensors")
        assert got.keys() == ref.keys()
        for key in ref:
            torch.testing.assert_close(got[key], ref[key], atol=1e-6, rtol=1e-4, msg=f"{name} {key}")
        never_drawn = name in cfg_tasks(cfg) and all(d["task"] != name for d in drawn[0])
        moved = sum((ref[k] != 0).any() for k in ref if "lora_B" in k)
        assert (moved == 0) if never_drawn else (moved > 0), f"adapter {name}: moved {moved} lora_B matrices"
    for name in [n for n, w in cfg.sampling.weights.items() if w == 0 and cfg.sampling.strategy == "manual"]:
        assert all(d["task"] != name for d in drawn[0])
        init = initial_adapter(cfg, tiny_model_dir, name)
        got = load_file(tmp_path / "adapters" / name / "adapter_model.safetensors")
        assert got.keys() == init.keys()
        for key in init:  # bit for bit: weight decay and Adam's momentum never touched it
            assert torch.equal(got[key], init[key]), f"never-drawn adapter {name} changed: {key}"


def cfg_tasks(cfg):
    return [t.name for t in cfg.tasks]


def check_adaptive_draws(cfg, metrics, drawn):
    """The probabilities moved, and each step's draws (identical on both ranks, checked by the reference) are
    step_plan(seed, step, the probabilities logged for that step): nothing else enters them."""
    from mtl_scale.sampling import step_plan

    tasks = [t.name for t in cfg.tasks]
    probs = [{t: m[f"sampling_prob/{t}"] for t in tasks} for m in metrics]
    assert max(abs(p[t] - probs[0][t]) for p in probs for t in tasks) > 0.05, probs
    gas = cfg.sampling.tasks_per_step * cfg.sampling.micro_batches_per_task
    for step, p in enumerate(probs):
        planned = [t for t, n in step_plan(step, p, cfg.sampling, cfg.seed) for _ in range(n)]
        assert [d["task"] for d in drawn[0][step * gas:(step + 1) * gas]] == planned


def initial_adapter(cfg, model_dir, name):
    """Adapter ``name`` as the run initialised it (same seed), before any step."""
    from peft.utils import get_peft_model_state_dict

    from mtl_scale import adapters
    from mtl_scale.model import load_model

    names = adapters.adapter_names(cfg.sharing, [t.name for t in cfg.tasks])
    model = adapters.attach_adapters(load_model(cfg.model, str(model_dir)), cfg.lora, names, cfg.seed,
                                     task_r=cfg.hybrid.task_r if cfg.sharing == "hybrid" else None)
    return get_peft_model_state_dict(model, adapter_name=name)
