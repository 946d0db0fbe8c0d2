"""Build the embedded base model: a byte-level tiny Llama pretrained on generated text.

    python -m mtl_scale.base_model                  # rebuild into mtl_scale/assets/tiny-llama-v<version>/
    python -m mtl_scale.base_model --out /tmp/base  # somewhere else

The result is committed (mtl_scale/assets/) with its sha256 in RECIPE_SHA256, so every machine
loads the same weights and nothing is built at run time; this script is how they were made. It is
deterministic for a given torch/faker version and thread count (2): a fixed seed, a fixed corpus,
and the batch of step i drawn from a generator seeded by i. Training state is saved every
``save_every`` steps of the constant-lr phase into a work directory (``--work``), so an interrupted
build resumes where it stopped (and a recipe with fewer constant-lr steps reuses the same trajectory).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import shutil
import string
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent / "assets"
SPECIALS = ["<pad>", "<s>", "</s>"]

# Bump the version when anything below changes: it names the model (tiny-llama-v<version>).
RECIPE = {
    "version": 4,
    "tokenizer": "byte-level: 3 specials (<pad> <s> </s>) + the 256 UTF-8 bytes, no merges",
    "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 512,
    "corpus_documents": 150_000, "corpus": "mtl_scale.base_corpus: 70% generic skills (~50 kinds, 10 layouts), "
                                           "15% faker prose/records in 12 locales, 15% the demo's raw skills",
    "copy_documents": 60_000, "copy_corpus": "mtl_scale.base_corpus.copy_documents: random strings written twice",
    "copy_steps": 2000, "copy_fraction": 0.3,
    "seq": 160, "batch": 32, "lr": 1e-3, "warmup_steps": 50, "stable_steps": 4500, "decay_steps": 300,
    "weight_decay": 0.0, "seed": 1234, "threads": 2, "save_every": 100,
}
# sha256 of the committed model.safetensors (bf16), checked by the loader and by tests/test_model.py.
RECIPE_SHA256 = "518c3446697a07ff081406eb9ef20c77e6bc9f0f5ae296f865665237d7ee9a94"


def model_name(recipe: dict = RECIPE) -> str:
    return f"tiny-llama-v{recipe['version']}"


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map of every byte to a printable character (what the ByteLevel pre-tokenizer emits)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def build_tokenizer(max_len: int):
    """Every UTF-8 byte a token (ids 3..258, in byte order), plus <pad>=0, <s>=1, </s>=2; a fast
    tokenizer that ``AutoTokenizer.from_pretrained`` loads. Any text round-trips."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = _bytes_to_unicode()
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    vocab.update({byte_chars[b]: len(SPECIALS) + b for b in range(256)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   model_max_length=max_len)


def corpus_ids(r: dict, kind: str = "broad") -> torch.Tensor:
    """A pretraining corpus as one token stream, ``<s>document</s>`` per document: ``broad`` (skills, prose,
    the demo's raw skills) or ``copy`` (random strings written twice)."""
    from mtl_scale.base_corpus import copy_documents, corpus_documents
    docs = (corpus_documents(r["corpus_documents"], seed=r["seed"]) if kind == "broad"
            else copy_documents(r["copy_documents"], seed=r["seed"]))
    ids = []
    for doc in docs:  # bytes + 3 is the tokenizer's id of each byte (checked in tests/test_model.py)
        ids += [1, *(b + len(SPECIALS) for b in doc.encode("utf-8")), 2]
    return torch.tensor(ids, dtype=torch.int16)


def lr_at(step: int, r: dict) -> float:
    """Warmup, constant, then linear decay to 0 (warmup-stable-decay: the constant phase does not
    depend on the total length, so a build can be stopped and decayed from any saved state)."""
    if step < r["warmup_steps"]:
        return r["lr"] * (step + 1) / r["warmup_steps"]
    if step < r["stable_steps"]:
        return r["lr"]
    return r["lr"] * (r["stable_steps"] + r["decay_steps"] - step) / r["decay_steps"]


def copy_probe(model, n: int = 48, seed: int = 99) -> dict[str, float]:
    """Exact match of greedy answers to held-out ``copy`` and ``upper`` examples in two pretraining layouts
    (inputs from a seed the corpus never uses). Copying is what every transfer task builds on, so a build
    is checked with this before any LoRA run."""
    from mtl_scale.base_corpus import SKILLS, Source
    src, out = Source(seed), {}
    for skill, layout in (("copy", "{f}: {x} => "), ("upper", '{f}("{x}") = "')):
        pairs = [SKILLS[skill][0](src) for _ in range(n)]
        prompts = [[1, *(b + len(SPECIALS) for b in layout.format(f=skill, x=x).encode())] for x, _ in pairs]
        width = max(map(len, prompts))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])  # left-padded
        mask = (ids != 0).long()
        answers = [y.encode() for _, y in pairs]
        steps = max(map(len, answers)) + 1
        with torch.no_grad():
            for _ in range(steps):
                pos = (mask.cumsum(1) - 1).clamp(min=0)
                nxt = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1].argmax(-1)
                ids, mask = torch.cat([ids, nxt[:, None]], 1), torch.cat([mask, torch.ones_like(nxt)[:, None]], 1)
        got = [bytes(t - len(SPECIALS) for t in row[width:].tolist() if t >= len(SPECIALS)) for row in ids]
        out[skill] = sum(g.startswith(a) and g[len(a):len(a) + 1] in (b"", b'"', b"\n") for g, a in
                         zip(got, answers)) / n
    # nats per byte of the second writing of 16 random 20-letter strings (the first costs ~4.1): how far the
    # induction circuit has formed, before greedy copies come out whole
    rng = random.Random(seed)
    xs = ["".join(rng.choice(string.ascii_letters) for _ in range(20)) for _ in range(16)]
    ids = torch.tensor([[1, *(b + len(SPECIALS) for b in f"{x} => {x}".encode())] for x in xs])
    with torch.no_grad():
        nats = -torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), -1).gather(2, ids[:, 1:, None])[..., 0]
    out["second_copy_nats"] = round(nats[:, -19:].mean().item(), 3)
    return out


def pretrain(r: dict, work: Path) -> tuple[object, object, dict]:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer(r["max_position_embeddings"])
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=r["hidden_size"], intermediate_size=r["intermediate_size"],
        num_hidden_layers=r["num_hidden_layers"], num_attention_heads=r["num_attention_heads"],
        num_key_value_heads=r["num_key_value_heads"], max_position_embeddings=r["max_position_embeddings"],
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False)
    torch.set_num_threads(r["threads"])  # the same thread count everywhere keeps the float sums identical
    torch.manual_seed(r["seed"])
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=r["lr"], weight_decay=r["weight_decay"])
    total = r["stable_steps"] + r["decay_steps"]

    work.mkdir(parents=True, exist_ok=True)
    data = {}
    for kind in ("broad", "copy"):
        path = work / f"corpus-{kind}.pt"
        if path.is_file():
            data[kind] = torch.load(path)
        else:
            t0 = time.time()
            data[kind] = corpus_ids(r, kind)
            torch.save(data[kind], path)
            log.info("%s corpus: %d tokens (%.0fs)", kind, len(data[kind]), time.time() - t0)
    start, losses = 0, []
    saved = sorted(work.glob("state-*.pt"), key=lambda p: int(p.stem.split("-")[1]))
    saved = [p for p in saved if int(p.stem.split("-")[1]) <= r["stable_steps"]]
    if saved:
        state = torch.load(saved[-1])
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start, losses = state["step"], state["losses"]
        log.info("resumed from %s", saved[-1])

    model.train()
    seq, t0 = r["seq"], time.time()
    for step in range(start, total):
        gen = torch.Generator().manual_seed(r["seed"] * 1_000_003 + step)
        n_copy = r["batch"] if step < r["copy_steps"] else round(r["batch"] * r["copy_fraction"])
        rows = []
        for kind, n in (("copy", n_copy), ("broad", r["batch"] - n_copy)):
            starts = torch.randint(0, len(data[kind]) - seq - 1, (n,), generator=gen).tolist()
            rows += [data[kind][s:s + seq] for s in starts]
        batch = torch.stack(rows).long()  # (batch, seq)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, r)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 4))
        done = step + 1
        if done % 10 == 0 or done == total:
            log.info("step %d/%d loss %.3f (mean of last 50 %.3f) lr %.2e %.2fs/step", done, total, losses[-1],
                     sum(losses[-50:]) / len(losses[-50:]), lr_at(step, r), (time.time() - t0) / (done - start))
        if done % r["save_every"] == 0 and done <= r["stable_steps"]:
            model.eval()
            log.info("step %d copy probe %s", done, copy_probe(model))
            model.train()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": done, "losses": losses},
                       work / f"state-{done}.pt")
            for old in work.glob("state-*.pt"):  # keep every 500th, to decay from any of them later
                if int(old.stem.split("-")[1]) < done and int(old.stem.split("-")[1]) % 500:
                    old.unlink()
    model.eval()
    stats = {"final_loss_mean_last_100": round(sum(losses[-100:]) / len(losses[-100:]), 4),
             "loss_first_step": losses[0], "steps": total, "tokens_seen": total * r["batch"] * r["seq"]}
    return model, tok, stats


def build(out: Path, work: Path, r: dict = RECIPE) -> str:
    """Pretrain and write ``out`` (config.json, model.safetensors in bf16, tokenizer, recipe json);
    returns the sha256 of model.safetensors."""
    import faker
    import transformers

    t0 = time.time()
    model, tok, stats = pretrain(r, work)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(torch.bfloat16).save_pretrained(tmp)
    tok.save_pretrained(tmp)
    digest = sha256(tmp / "model.safetensors")
    meta = {"name": model_name(r), "recipe": r, "model_safetensors_sha256": digest, **stats,
            "build_seconds": round(time.time() - t0), "torch": torch.__version__,
            "transformers": transformers.__version__, "faker": faker.VERSION}
    (tmp / "mtl_scale_recipe.json").write_text(json.dumps(meta, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    log.info("built %s in %s: %s", model_name(r), out, json.dumps(meta))
    return digest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ASSETS / model_name())
    parser.add_argument("--work", type=Path, help="corpus and resumable training state "
                        "(default: $MTL_SCALE_CACHE/<name>.work, $MTL_SCALE_CACHE defaulting to ~/.cache/mtl_scale)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from mtl_scale.model import cache_dir
    print(build(args.out, args.work or cache_dir() / f"{model_name()}.work"))


if __name__ == "__main__":
    main()
