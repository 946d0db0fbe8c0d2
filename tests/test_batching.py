"""batching.mode grouped and packed: which examples share a micro-batch, and that a packed micro-batch
computes exactly what the padded one does (per example and per token)."""
import json
import random

import pytest
import torch

from mtl_scale import batching
from mtl_scale.config import ConfigError, load_config
from mtl_scale.data.formatting import IGNORE, collate, completion_tokens, model_inputs, real_tokens, token_loss_sum
from mtl_scale.sampling import ShardReader
from token_examples import token_examples


@pytest.fixture(scope="module")
def tiny_models(tiny_model_dir):
    from transformers import AutoModelForCausalLM
    # fp32, as a run trains it (the checkpoint is stored in bf16, whose round-off would hide the comparison)
    return {impl: AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=impl, dtype=torch.float32)
            for impl in ("sdpa", "eager")}


def _segments(examples, row_tokens):
    """(row, start, example index) of each example in collate_packed's layout."""
    out = []
    for r, row in enumerate(batching.rows_for([len(ids) for ids, _ in examples], row_tokens)):
        at = 0
        for k in row:
            out.append((r, at, k))
            at += len(examples[k][0])
    return out


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_rows_give_each_example_the_logits_it_has_alone(tiny_models, impl):
    model = tiny_models[impl].train()  # train mode, as in a step: Llama would make a cache from config.use_cache
    examples = token_examples([7, 12, 5, 9, 16, 3])
    batch = batching.collate_packed(examples, pad_id=0, row_tokens=20)
    assert batch["input_ids"].shape[0] == 3 and "attention_mask" not in batch
    with torch.no_grad():
        packed = model(**model_inputs(batch)).logits
        alone = [model(input_ids=torch.tensor([ids])).logits[0] for ids, _ in examples]
    segments = _segments(examples, 20)
    assert sorted(k for *_, k in segments) == list(range(len(examples)))
    for r, at, k in segments:
        n = len(examples[k][0])
        assert batch["input_ids"][r, at:at + n].tolist() == examples[k][0]
        torch.testing.assert_close(packed[r, at:at + n], alone[k], atol=1e-5, rtol=1e-5)


def test_packed_loss_per_example_and_per_token_equals_padded(tiny_models):
    model = tiny_models["sdpa"].train()
    examples = token_examples([7, 12, 5, 9, 16, 3, 11], seed=1)
    padded = collate(examples, pad_id=0)
    packed = batching.collate_packed(examples, pad_id=0, row_tokens=30)
    with torch.no_grad():
        lp = model(**model_inputs(padded)).logits
        lk = model(**model_inputs(packed)).logits
    s_pad, n_pad = token_loss_sum(lp, padded["labels"])
    s_pack, n_pack = token_loss_sum(lk, packed["labels"])
    assert int(n_pad) == int(n_pack) == completion_tokens(padded) == completion_tokens(packed)
    torch.testing.assert_close(s_pack, s_pad, atol=1e-4, rtol=1e-6)
    assert real_tokens(padded) == real_tokens(packed) == sum(len(ids) for ids, _ in examples)
    # per example: each packed segment's summed NLL equals that example's row in the padded batch
    per_pad = [token_loss_sum(lp[i:i + 1], padded["labels"][i:i + 1])[0] for i in range(len(examples))]
    for r, at, k in _segments(examples, 30):
        n = len(examples[k][0])
        got, _ = token_loss_sum(lk[r:r + 1, at:at + n], packed["labels"][r:r + 1, at:at + n])
        torch.testing.assert_close(got, per_pad[k], atol=1e-5, rtol=1e-6)


def test_loss_taken_in_the_model_equals_the_logits_path(tiny_model_dir):
    """model.liger_kernels: the engine passes the labels and num_items_in_batch=1 and reads the model's own
    loss (Liger's fused linear cross-entropy on a GPU; transformers' causal-LM loss here, the function the
    fused one replaces): the same summed NLL, and the same LoRA gradients, as the logits path, through
    PEFT, padded and packed; and so with the hidden states at the labelled positions only (logits_to_keep
    and shift_labels, which Liger's patched forward takes as transformers' does), projected there only."""
    import peft
    from transformers import AutoModelForCausalLM
    from mtl_scale.data.formatting import loss_positions, summed_loss
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "down_proj"],
                                                      init_lora_weights=False)).train()
    examples = [(ids, [IGNORE] * (len(ids) // 2) + lab[len(ids) // 2:])  # prompts: the first half unlabelled
                for ids, lab in token_examples([7, 12, 5, 9, 16, 3, 11], seed=2)]
    for batch in (collate(examples, pad_id=0), batching.collate_packed(examples, pad_id=0, row_tokens=30)):
        at = loss_positions(batch["labels"])
        assert 0 < len(at) < batch["input_ids"].shape[1] - 1
        losses, grads, projected = [], [], []
        hook = base.lm_head.register_forward_hook(lambda _m, args, _out: projected.append(args[0].shape[1]))
        for b, in_model in ((batch, False), (batch, True), ({**batch, "loss_positions": at}, True)):
            model.zero_grad()
            loss = summed_loss(model, b, in_model)
            loss.backward()
            losses.append(loss.detach())
            grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
        hook.remove()
        assert projected == [batch["input_ids"].shape[1]] * 2 + [len(at)]
        ref = token_loss_sum(model(**model_inputs(batch)).logits, batch["labels"])[0]
        torch.testing.assert_close(losses[0], ref.detach())
        assert losses[0] > completion_tokens(batch)  # a sum (random tokens: nats each), not a mean
        unlabelled = {**batch, "labels": torch.full_like(batch["labels"], IGNORE)}
        unlabelled["loss_positions"] = loss_positions(unlabelled["labels"])
        hook = base.lm_head.register_forward_hook(lambda _m, args, _out: projected.append(args[0].shape[1]))
        assert float(summed_loss(model, unlabelled, True)) == 0  # no labels: the model sees no empty positions
        hook.remove()  # (Liger's fused kernel divides by their count)
        assert projected[-1] == batch["input_ids"].shape[1]
        for loss, g in zip(losses[1:], grads[1:]):
            torch.testing.assert_close(loss, losses[0], atol=1e-4, rtol=1e-6)
            for a, b in zip(grads[0], g):
                torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


def test_example_count_padded_and_packed():
    from mtl_scale.data.formatting import example_count
    examples = token_examples([7, 12, 5, 9, 16, 3])
    assert example_count(collate(examples, pad_id=0)) == 6
    packed = batching.collate_packed(examples, pad_id=0, row_tokens=20)  # rows 19, 14, 19: padding restarts at 0
    assert (packed["token_mask"] == 0).any() and example_count(packed) == 6


def test_packed_boundary_token_predicts_nothing():
    # Fully labelled examples: without masking each example's first label, the previous example's last
    # token would be trained to predict it, across the boundary.
    examples = [([11, 12, 13], [11, 12, 13]), ([21, 22], [21, 22]), ([31, 32, 33, 34], [31, 32, 33, 34])]
    batch = batching.collate_packed(examples, pad_id=0)
    assert batch["input_ids"].tolist() == [[11, 12, 13, 21, 22, 31, 32, 33, 34]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    assert batch["labels"].tolist() == [[IGNORE, 12, 13, IGNORE, 22, IGNORE, 32, 33, 34]]
    assert completion_tokens(batch) == completion_tokens(collate(examples, pad_id=0)) == 6


def test_packed_rows_fit_and_padding_is_its_own_sequence():
    lengths = [50, 30, 20, 40, 30, 10, 10, 5]  # 195 tokens, rows of <= 100 in this order: 100 + 95
    batch = batching.collate_packed(token_examples(lengths), pad_id=0, row_tokens=100)
    rows = batch["token_mask"].sum(1).tolist()
    assert sorted(rows) == [95, 100] and batch["input_ids"].shape == (2, 100)
    r = rows.index(min(rows))
    width = batch["input_ids"].shape[1]
    assert batch["position_ids"][r, rows[r]:].tolist() == list(range(width - rows[r]))  # a restart of its own
    assert (batch["labels"][r, rows[r]:] == IGNORE).all()


def test_packed_micro_batch_keeps_the_rows_it_was_packed_into():
    """The memory budget: a micro-batch of max_tokens // row_tokens rows is laid out in no more rows. Rows
    [5, 3, 2] and [4, 3, 3] (capacity 10) fill 2 rows; best-fit-decreasing packing them afresh needs 3."""
    assert len(batching.best_fit_decreasing(range(6), [5, 3, 2, 4, 3, 3], 10)) == 3
    batch = batching.collate_packed(token_examples([5, 3, 2, 4, 3, 3], prompt=1), pad_id=0, row_tokens=10)
    assert batch["input_ids"].shape == (2, 10) and batch["token_mask"].sum(1).tolist() == [10, 10]
    rng = random.Random(0)
    for seed in range(20):
        lengths = [rng.randint(1, 64) for _ in range(300)]
        for mb in batching.packed_batches(list(range(300)), lengths, 256, 64, random.Random(seed)):
            assert len(batching.rows_for([lengths[i] for i in mb], 64)) <= 256 // 64
    with pytest.raises(ValueError, match="an example of 11 tokens does not fit a row of 10 tokens"):
        batching.rows_for([3, 11], 10)


def test_packed_micro_batches_are_even_so_no_rank_waits_on_a_stub():
    """Plain best-fit-decreasing fills every bin but the last; packed_batches keeps its number of rows and
    spreads the tokens evenly over them, and deals the rows into micro-batches whose row counts differ by at
    most one (ZeRO-3's collectives make every rank wait for the slowest micro-batch)."""
    rng = random.Random(0)
    lengths = [rng.randint(150, 190) for _ in range(200)]  # 34,000 tokens: 8.3 bins of 4,096
    plain = sorted(sum(lengths[i] for i in b) for b in batching.best_fit_decreasing(range(200), lengths, 4096))
    assert plain[0] < 0.5 * plain[-1], plain  # the stub
    mbs = batching.packed_batches(list(range(200)), lengths, 4096, 4096, random.Random(0))
    loads = [sum(lengths[i] for i in mb) for mb in mbs]
    assert len(mbs) == len(plain) and sorted(i for mb in mbs for i in mb) == list(range(200))
    assert max(loads) <= 4096 and min(loads) >= 0.95 * max(loads), loads
    small = [rng.randint(5, 40) for _ in range(150)]  # rows of 64, 4 per micro-batch
    mbs = batching.packed_batches(list(range(150)), small, 256, 64, random.Random(0))
    rows = [len(batching.rows_for([small[i] for i in mb], 64)) for mb in mbs]
    assert max(rows) <= 4 and max(rows) - min(rows) <= 1, rows
    assert sorted(i for mb in mbs for i in mb) == list(range(150))


def test_attention_length_on_hand_values():
    """Where attention costs as much as the linear maps: P / (heads * head_dim), P the layer's q, k, v, o and
    gated-MLP weights."""
    from transformers import LlamaConfig
    tiny = LlamaConfig(hidden_size=128, intermediate_size=384, num_attention_heads=4, num_key_value_heads=4,
                       head_dim=32)  # the built-in base: (4 * 128 * 128 + 3 * 128 * 384) / 128
    assert batching.attention_length(tiny) == 1664
    llama2_7b = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32)
    assert batching.attention_length(llama2_7b) == (4 * 4096 * 4096 + 3 * 4096 * 11008) / 4096 == 49408
    llama3_8b = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8)
    assert batching.attention_length(llama3_8b) == (4096 * 128 * (64 + 16) + 3 * 4096 * 14336) / 4096 == 53248
    assert batching.attention_length(object()) == 0  # no fields: balance tokens
    assert batching.example_cost(100, 400) == 125 and batching.example_cost(100, 0) == 100


def test_packed_bins_balance_compute_when_attention_is_per_example():
    """Equal tokens are not equal time when one row holds the long examples. Tokens alone pack [300, 300]
    and [150] * 4 (600 tokens each; costs 1200 and 900 at attention_length 300); by compute each bin gets
    one 300 and two 150s (1050 each)."""
    lengths = [300, 300, 150, 150, 150, 150]
    by_tokens = batching.balanced_bins(range(6), lengths, 600)
    assert sorted(sorted(lengths[i] for i in b) for b in by_tokens) == [[150] * 4, [300, 300]]
    by_cost = batching.balanced_bins(range(6), lengths, 600, attention_length=300)
    assert [sorted(lengths[i] for i in b) for b in by_cost] == [[150, 150, 300]] * 2
    # tightly filled rows: costliest first into the cheapest bin strands the last 3 ([6, 3] and [5, 4] in
    # rows of 11); best-fit-decreasing under a bisected compute cap then beats the token packing's dearest bin
    lengths = [3, 5, 6, 4, 3]
    assert sorted(sorted(lengths[i] for i in b) for b in batching.balanced_bins(range(5), lengths, 11)) == \
        [[3, 3, 4], [5, 6]]                                     # costs 13.4 and 17.1 at attention_length 10
    assert sorted(sorted(lengths[i] for i in b) for b in batching.balanced_bins(range(5), lengths, 11, 10)) == \
        [[3, 3, 5], [4, 6]]                                     # 15.3 and 15.2
    # ... and where no cap helps (cost ~ tokens), the token packing stands
    assert batching.balanced_bins(range(5), [5, 5, 4, 3, 3], 10, attention_length=1e9) == \
        batching.balanced_bins(range(5), [5, 5, 4, 3, 3], 10) == [[0, 1], [2, 3, 4]]
    # long-tailed lengths (the benchmark's instruction mix): the bins' compute spread shrinks, same bins
    rng = random.Random(0)
    lengths = [max(8, min(512, round(rng.lognormvariate(4.16, 1.0)))) for _ in range(512)]
    spread = {}
    for attn in (0, 1664):
        bins = batching.balanced_bins(range(512), lengths, 4096, attention_length=attn)
        assert sorted(i for b in bins for i in b) == list(range(512))
        assert all(sum(lengths[i] for i in b) <= 4096 for b in bins)
        costs = [sum(batching.example_cost(lengths[i], 1664) for i in b) for b in bins]
        spread[attn] = (len(bins), max(costs) / min(costs))
    assert spread[1664][1] < 1.02 < 1.1 < spread[0][1], spread


def test_batcher_balances_compute_only_for_attention_per_example(tiny_model_dir):
    """sdpa's dense mask costs every row its full width squared whatever it holds: tokens stay the load."""
    from transformers import AutoConfig
    hf_config = AutoConfig.from_pretrained(tiny_model_dir)
    assert batching.attention_length(hf_config) == 1664  # the built-in base, as the docs quote it
    lengths = [300, 300, 150, 150, 150, 150]
    base = ["tasks=[{name: a, source: 'builtin:copy'}]", "max_seq_len=300", "batching.mode=packed",
            "batching.max_tokens=600", "batching.row_tokens=600"]  # one row per micro-batch, either way
    for attn, want in (("sdpa", [[150] * 4, [300, 300]]), ("sdpa_varlen", [[150, 150, 300]] * 2)):
        cfg = load_config(None, base + [f"model.attn_implementation={attn}"])
        mbs = batching.batcher(cfg, lengths, hf_config)(list(range(6)), random.Random(0))
        assert sorted(sorted(lengths[i] for i in mb) for mb in mbs) == want, attn
        said = "compute (attention_length 1664)" if attn == "sdpa_varlen" else "tokens"
        kernel = " (one sdpa call per example)" if attn == "sdpa_varlen" else ""  # on CPU: the loop
        assert f"rows of <= 600 balanced by {said}, {attn} attention{kernel} with position ids" \
            in batching.describe(cfg, hf_config)


def test_best_fit_decreasing_respects_capacity_and_keeps_every_example():
    rng = random.Random(0)
    lengths = [rng.randint(20, 300) for _ in range(1000)]
    bins = batching.best_fit_decreasing(list(range(1000)), lengths, 1024)
    assert sorted(i for b in bins for i in b) == list(range(1000))
    assert all(sum(lengths[i] for i in b) <= 1024 for b in bins)
    assert sum(lengths) / (1024 * len(bins)) > 0.97  # tightly filled
    assert batching.best_fit_decreasing([0, 1, 2], [6, 5, 4], 10) == [[0, 2], [1]]  # 4 goes to the fuller bin
    with pytest.raises(ValueError, match="does not fit"):
        batching.best_fit_decreasing([0], [11], 10)


def test_grouped_batches_have_similar_lengths_and_random_order():
    rng = random.Random(0)
    lengths = [rng.randint(10, 400) for _ in range(2000)]
    order = list(range(2000))
    rng.shuffle(order)
    a = batching.grouped_batches(order, lengths, 16, 0, random.Random(1))
    b = batching.grouped_batches(order, lengths, 16, 0, random.Random(2))
    assert sorted(i for x in a for i in x) == list(range(2000)) and all(len(x) <= 16 for x in a)
    assert a != b and sorted(map(tuple, a)) == sorted(map(tuple, b))  # same groups, shuffled order
    firsts = [lengths[x[0]] for x in a[:20]]
    assert firsts != sorted(firsts)  # not globally sorted: long and short micro-batches interleave
    pad = lambda batches: 1 - sum(lengths[i] for x in batches for i in x) / sum(
        len(x) * max(lengths[i] for i in x) for x in batches)
    plain = [order[i:i + 16] for i in range(0, 2000, 16)]
    assert pad(a) < 0.1 < 0.3 < pad(plain)
    budget = batching.grouped_batches(order, lengths, 16, 2048, random.Random(1))
    assert all(len(x) * max(lengths[i] for i in x) <= 2048 for x in budget if len(x) > 1)
    assert sorted(i for x in budget for i in x) == list(range(2000))


def test_take_batch_cycles_epochs_and_resumes_exactly():
    lengths = [random.Random(i).randint(5, 60) for i in range(37)]
    batcher = lambda order, rng: batching.packed_batches(order, lengths, 128, 64, rng)
    reader = ShardReader("t", list(range(37)), seed=3, rank=0)
    first_epoch = []
    while reader.epoch == 0:
        first_epoch.append(reader.take_batch(batcher))
    first_epoch.pop()  # the draw that crossed into epoch 1
    assert sorted(i for b in first_epoch for i in b) == list(range(37))
    for _ in range(5):
        reader.take_batch(batcher)
    resumed = ShardReader("t", list(range(37)), seed=3, rank=0)
    resumed.load_state_dict(reader.state_dict())
    assert [resumed.take_batch(batcher) for _ in range(20)] == [reader.take_batch(batcher) for _ in range(20)]


def test_gsm8k_lengths_pad_fraction(gsm8k_path, tiny_tokenizer):
    """On GSM8K's real lengths (the tiny model's tokenizer is byte-level: 160-1600 tokens) random
    micro-batches of 16 are mostly padding; packed (8192-token micro-batches in rows of 2048) is at most 5%."""
    from mtl_scale.data.formatting import encode
    rows = [json.loads(line) for line in gsm8k_path.read_text().splitlines()]
    rows = [{"prompt": r["question"], "completion": r["answer"]} for r in rows]
    enc = encode(rows, "prompt_completion", tiny_tokenizer, max_seq_len=1024)
    examples = list(zip(enc.input_ids, enc.labels))
    lengths = [len(ids) for ids in enc.input_ids]
    order = list(range(len(examples)))
    random.Random(0).shuffle(order)
    padded = [collate([examples[i] for i in order[k:k + 16]], 0) for k in range(0, len(order) - 15, 16)]
    packed = [batching.collate_packed([examples[i] for i in b], 0, row_tokens=2048)
              for b in batching.packed_batches(order, lengths, 8192, 2048, random.Random(0))]
    assert batching.pad_fraction(padded) > 0.3
    assert batching.pad_fraction(packed) <= 0.05
    assert sum(real_tokens(b) for b in packed) == sum(lengths)


def test_batching_config_errors():
    base = ["tasks=[{name: a, source: 'builtin:copy'}]", "max_seq_len=256"]
    with pytest.raises(ConfigError, match="batching.mode='pack' is not allowed; choose one of: padded, grouped, packed"):
        load_config(None, base + ["batching.mode=pack"])
    with pytest.raises(ConfigError, match=r"batching.mode=packed needs batching.max_tokens >= max_seq_len \(256\)"):
        load_config(None, base + ["batching.mode=packed"])
    with pytest.raises(ConfigError, match="batching.max_tokens=512 has no effect with batching.mode=padded"):
        load_config(None, base + ["batching.max_tokens=512"])
    with pytest.raises(ConfigError, match="batching.row_tokens applies to batching.mode=packed only"):
        load_config(None, base + ["batching.mode=grouped", "batching.row_tokens=64"])
    with pytest.raises(ConfigError, match=r"batching.row_tokens=128 must lie between max_seq_len \(256"):
        load_config(None, base + ["batching.mode=packed", "batching.max_tokens=1024", "batching.row_tokens=128"])
    cfg = load_config(None, base + ["batching.mode=packed", "batching.max_tokens=1024"])
    assert batching.row_tokens(cfg) == 256
    cfg = load_config(None, base + ["batching.mode=packed", "batching.max_tokens=1024", "batching.row_tokens=512"])
    assert batching.row_tokens(cfg) == 512
    cfg = load_config(None, base + ["batching.mode=packed", "batching.max_tokens=1024",
                                    "model.attn_implementation=flash_attention_2"])
    assert batching.row_tokens(cfg) == 1024
    cfg = load_config(None, base + ["batching.mode=packed", "batching.max_tokens=1024",
                                    "model.attn_implementation=sdpa_varlen"])  # attention per example too
    assert batching.row_tokens(cfg) == 1024



def test_logits_only_at_labelled_positions_give_the_same_loss_and_gradients(tiny_model_dir):
    """The engine's loss_positions: the model projects to the vocabulary only where a row's next token is a
    label, and the summed NLL and every LoRA gradient equal the full-logits path's, padded and packed."""
    import peft
    from transformers import AutoModelForCausalLM
    from mtl_scale.data.formatting import loss_positions, summed_loss
    labels = torch.tensor([[IGNORE, IGNORE, 5, 6, IGNORE, IGNORE], [IGNORE, 3, IGNORE, IGNORE, IGNORE, IGNORE]])
    assert loss_positions(labels).tolist() == [0, 1, 2]  # row 1 predicts labels[1] from 0; row 0, 2 and 3 from 1, 2

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "down_proj"],
                                                      init_lora_weights=False)).train()
    examples = [(ids, [IGNORE] * (len(ids) // 2) + lab[len(ids) // 2:])  # prompts: the first half unlabelled
                for ids, lab in token_examples([17, 12, 25, 9, 16, 30], seed=3)]
    for batch in (collate(examples, pad_id=0), batching.collate_packed(examples, pad_id=0, row_tokens=60)):
        at = loss_positions(batch["labels"])
        assert 0 < len(at) < batch["input_ids"].shape[1] - 1
        out, projected = [], []
        hook = base.lm_head.register_forward_hook(lambda _m, args, _out: projected.append(args[0].shape[1]))
        for b in (batch, {**batch, "loss_positions": at}):
            model.zero_grad()
            loss = summed_loss(model, b)
            loss.backward()
            out.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
        hook.remove()
        assert projected == [batch["input_ids"].shape[1], len(at)]
        (ref, ref_grads), (loss, grads) = out
        torch.testing.assert_close(loss, ref, atol=1e-4, rtol=1e-6)
        assert ref > completion_tokens(batch)
        for a, b in zip(ref_grads, grads):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


def test_only_models_that_take_logits_to_keep_get_loss_positions(tiny_model_dir):
    """transformers' causal LMs, bare or under PEFT, take an index tensor as logits_to_keep; a (remote-code)
    model whose forward has none, or takes only an int, is given the full logits instead."""
    import peft
    from transformers import AutoModelForCausalLM
    from mtl_scale.data.formatting import passes_keywords, takes_logits_to_keep
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert takes_logits_to_keep(base)
    assert takes_logits_to_keep(peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj"])))

    class OldStyle(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None, position_ids=None, labels=None):
            raise AssertionError("not called")

    class SlicesWithAnInt(torch.nn.Module):  # hidden_states[:, -logits_to_keep:], as older remote code does
        def forward(self, input_ids, logits_to_keep: int = 0):
            raise AssertionError("not called")
    assert not takes_logits_to_keep(OldStyle()) and not takes_logits_to_keep(SlicesWithAnInt())
    # the engine's varlen_kwargs go only to a model that passes keyword arguments on to its attention
    assert passes_keywords(base)
    assert passes_keywords(peft.get_peft_model(base, peft.LoraConfig(target_modules=["v_proj"])))
    assert not passes_keywords(OldStyle())
    from mtl_scale.errors import UserError
    base_cfg = ["tasks=[{name: a, source: 'builtin:copy'}]", "max_seq_len=300", "batching.mode=packed",
                "batching.max_tokens=1200", "model.attn_implementation=flash_attention_2"]
    with pytest.raises(UserError, match=r"batching.row_tokens=300 puts several packed rows in a micro-batch of "
                                        r"batching.max_tokens=1200, and OldStyle's forward takes no \*\*kwargs"):
        batching.check_flash_rows(load_config(None, base_cfg + ["batching.row_tokens=300"]), OldStyle())
    batching.check_flash_rows(load_config(None, base_cfg), OldStyle())  # one row: transformers finds them
    batching.check_flash_rows(load_config(None, base_cfg + ["batching.row_tokens=300"]), base)  # given them
