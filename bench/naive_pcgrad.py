"""What PCGrad costs done the usual way (Yu et al.'s reference implementation): one forward over a
mixed batch, then K backward passes (retain_graph) to get each task's *full* gradient, PCGrad on the
explicit vectors, optimizer step — against plain summation (one backward) on the same batch. Single
process, the same tiny model and LoRA. Measured in one run (ABBA blocks).

    python -m bench.naive_pcgrad [--steps 30] [--tasks 4]

(Under ZeRO-3 this route is not even available: several backward passes over one forward break
DeepSpeed's gradient hooks — DeepSpeed issue #7352 — and each rank would need full gradients.)
"""
import argparse
import statistics
import time

import torch

from mtl_scale import adapters
from mtl_scale.config import load_config
from mtl_scale.data.formatting import collate, token_loss_sum
from mtl_scale.data.prepare import prepare_tasks
from mtl_scale.model import load_model, load_tokenizer, resolve_model_path
from mtl_scale.surgery import pcgrad_weights, random_orders


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--micro-batch-size", type=int, default=16)
    args = parser.parse_args()
    gens = ["copy", "reverse", "sort", "add"]
    tasks = ", ".join(f"{{name: t{i}, source: 'builtin:{gens[i % 4]}', num_examples: 400, eval_size: 0}}"
                      for i in range(args.tasks))
    cfg = load_config("configs/demo.yaml", [f"tasks=[{tasks}]", "sharing=hard"])
    path = resolve_model_path(cfg.model.path)
    tok = load_tokenizer(path)
    data = prepare_tasks(cfg, tok)
    model = adapters.attach_adapters(load_model(cfg.model, path), cfg.lora, ["shared"], cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    gen = torch.Generator().manual_seed(0)
    names = list(data)
    times = {"sum": [], "naive_pcgrad": []}
    for step in range(2 * args.steps + 4):
        # one mixed batch: micro_batch_size examples of every task
        rows, owner = [], []
        for k, t in enumerate(names):
            idx = torch.randint(0, len(data[t].train), (args.micro_batch_size,), generator=gen).tolist()
            rows += [(data[t].train.input_ids[i], data[t].train.labels[i]) for i in idx]
            owner += [k] * len(idx)
        batch = collate(rows, tok.pad_token_id)
        owner = torch.tensor(owner)
        method = "sum" if step % 4 in (0, 3) else "naive_pcgrad"
        t0 = time.perf_counter()
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        losses = []
        for k in range(len(names)):
            s, n = token_loss_sum(logits[owner == k], batch["labels"][owner == k])
            losses.append(s / n)
        if method == "sum":
            torch.stack(losses).sum().backward()
        else:
            grads = []
            for k, loss in enumerate(losses):
                g = torch.autograd.grad(loss, params, retain_graph=k < len(losses) - 1)
                grads.append(torch.cat([x.flatten() for x in g]))
            g = torch.stack(grads)
            w = pcgrad_weights(g @ g.T, random_orders(len(names), gen))
            combined = w @ g
            offset = 0
            for p in params:
                p.grad = combined[offset:offset + p.numel()].view_as(p).clone()
                offset += p.numel()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= 4:
            times[method].append(time.perf_counter() - t0)
    med = {m: statistics.median(v) for m, v in times.items()}
    print(f"single process, K={len(names)}, {args.micro_batch_size} examples per task per step, threads={torch.get_num_threads()}")
    for m, v in med.items():
        print(f"median step time {m}: {1000 * v:.1f} ms")
    print(f"RATIO naive_pcgrad/sum = {med['naive_pcgrad'] / med['sum']:.3f}")


if __name__ == "__main__":
    main()
