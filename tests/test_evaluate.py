from types import SimpleNamespace

import pytest
import torch

from chat_templates import STYLES, chat_tokenizer, conversation
from mtl_scale.config import EvalConfig, TaskConfig
from mtl_scale.data.formatting import encode
from mtl_scale.evaluate import (chunked_head, evaluate_during_training, exact_match, head_calls, loss_sums,
                                 results_table)


class EchoModel(torch.nn.Module):
    """generate() appends a fixed answer token sequence per call order: the first half of the batch
    gets the reference, the rest a wrong answer."""

    def __init__(self, tok, answers):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))
        self.tok, self.answers = tok, answers

    def generate(self, input_ids, attention_mask, max_new_tokens, **kw):
        rows = []
        for i in range(input_ids.shape[0]):
            ans = self.tok(self.answers.pop(0), add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
            rows.append(torch.cat([input_ids[i], torch.tensor(ans[:max_new_tokens])]))
        width = max(len(r) for r in rows)
        return torch.stack([torch.nn.functional.pad(r, (0, width - len(r)), value=self.tok.pad_token_id) for r in rows])


def test_exact_match_compares_stripped_greedy_continuations(tiny_tokenizer):
    rows = [{"prompt": f"repeat [{w}] ->", "completion": f" {w}"} for w in ["abc", "de", "fgh", "ij"]]
    data = encode(rows, "prompt_completion", tiny_tokenizer, 64)
    model = EchoModel(tiny_tokenizer, [" abc", "de ", " xyz", " ijk"])
    em, outputs = exact_match(model, tiny_tokenizer, data, batch_size=3, max_new_tokens=10)
    assert em == 0.5
    assert [o.strip() for o in outputs] == ["abc", "de", "xyz", "ijk"]


def test_results_table():
    results = {"tasks": ["a", "b"], "base": {"a": {"loss": 2.0, "score": 0.0}, "b": {"loss": 3.0, "score": 0.1}},
               "adapters": {"a": {"a": {"loss": 0.5, "score": 0.9, "metric": "exact_match"}},
                            "b": {"b": {"loss": 1.0, "score": 0.25, "metric": "extract"}}}}
    table = results_table(results)
    assert "| a | a | exact_match | 2.000 | 0.500 | 0.0% | 90.0% |" in table
    assert "| b | b | extract | 3.000 | 1.000 | 10.0% | 25.0% |" in table


class OracleModel(torch.nn.Module):
    """A model that learned its training labels: generate() continues each prompt with the example's
    labelled completion up to and including the first eos (where greedy generation stops)."""

    def __init__(self, data, vocab_size):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))
        self.vocab_size = vocab_size
        self.completion_of = {tuple(ids[:p]): ids[p:] for ids, p in zip(data.input_ids, data.prompt_lens)}

    def forward(self, input_ids, attention_mask, use_cache=None):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab_size))

    def generate(self, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id, **kw):
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            c = self.completion_of[tuple(ids[mask.bool()].tolist())]
            c = c[:c.index(eos_token_id) + 1] if eos_token_id in c else c
            rows.append(torch.cat([ids, torch.tensor(c[:max_new_tokens], dtype=torch.long)]))
        width = max(len(r) for r in rows)
        return torch.stack([torch.nn.functional.pad(r, (0, width - len(r)), value=pad_token_id) for r in rows])


@pytest.mark.parametrize("style", sorted(STYLES))
def test_chat_oracle_generations_score_full_exact_match(tiny_model_dir, style):
    tok, _ = chat_tokenizer(tiny_model_dir, style)
    rows = [conversation(q, a) for q, a in [("Capital of France?", "Paris"), ("2+2?", "four"), ("Sky?", " blue ")]]
    data = encode(rows, "chat", tok, max_seq_len=256)
    model = OracleModel(data, len(tok))
    em, outputs = exact_match(model, tok, data, batch_size=2, max_new_tokens=32)
    assert [o.strip() for o in outputs] == ["Paris", "four", "blue"] and em == 1.0
    task = SimpleNamespace(held_out=data, config=TaskConfig(name="chat", format="chat"))
    metrics = evaluate_during_training(model, tok, {"chat": task}, EvalConfig(batch_size=2, max_new_tokens=32),
                                       activate=lambda name: None, rank=0, world=1)
    assert metrics["eval/exact_match/chat"] == 1.0 and metrics["eval/score/chat"] == 1.0
def _ragged_rows(n=11):
    """Prompts and completions of different lengths: batches are padded unevenly."""
    return [{"prompt": f"repeat [{'abcdefghij'[:1 + i % 7]}] ->", "completion": " " + "xyz" * (1 + i)}
            for i in range(n)]


def _random_lm(tok, model_type="llama", vocab=None, **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type, vocab_size=vocab or len(tok), hidden_size=32, intermediate_size=64,
                               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                               pad_token_id=tok.pad_token_id, tie_word_embeddings=False, **extra)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def _lora(model):
    import peft

    cfg = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "lm_head"], task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, cfg)
    gen = torch.Generator().manual_seed(0)
    for n, p in model.named_parameters():  # B starts at 0: give the adapter a real effect
        if "lora_B" in n:
            p.data = 0.1 * torch.randn(p.shape, generator=gen)
    return model.eval()


@pytest.mark.parametrize("wrap", ["plain", "peft"])
def test_chunked_eval_loss_equals_full_logits_loss(wrap, tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    model = _lora(model) if wrap == "peft" else model
    data = encode(_ragged_rows(), "prompt_completion", tiny_tokenizer, 64)
    pad = tiny_tokenizer.pad_token_id
    full_total, full_count = loss_sums(model, data, pad, 4)
    assert chunked_head(model)[0] is not None
    head = (model.get_base_model() if wrap == "peft" else model).get_output_embeddings()
    rows = []
    hook = head.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    try:
        for chunk in (5, 7, 10_000):
            rows.clear()
            total, count = loss_sums(model, data, pad, 4, chunk_tokens=chunk)
            assert count == full_count and total == pytest.approx(full_total, rel=1e-5)
            # the head saw completion positions only, at most `chunk` at a time, in as many calls as planned
            assert max(rows) <= chunk and sum(rows) == full_count
            assert len(rows) == sum(head_calls(data, 4, chunk))
        calls = [c + 2 for c in head_calls(data, 4, 5)]  # what another ZeRO-3 rank may need: extra empty chunks
        rows.clear()
        total, count = loss_sums(model, data, pad, 4, chunk_tokens=5, min_head_calls=calls)
        assert len(rows) == sum(calls) and total == pytest.approx(full_total, rel=1e-5) and count == full_count
    finally:
        hook.remove()


@pytest.mark.parametrize("model_type,quirk", [("gemma2", {"final_logit_softcapping": 1.5}),
                                              ("cohere", {"logit_scale": 0.25}),
                                              ("granite", {"logits_scaling": 3.0})])
def test_chunked_eval_applies_the_config_logit_quirks(model_type, quirk, tiny_tokenizer):
    model = _random_lm(tiny_tokenizer, model_type, **quirk)
    data = encode(_ragged_rows(), "prompt_completion", tiny_tokenizer, 64)
    pad = tiny_tokenizer.pad_token_id
    expected = loss_sums(model, data, pad, 4)
    split, reason = chunked_head(model)
    assert split is not None, reason  # chunked, not the fallback
    total, count = loss_sums(model, data, pad, 4, chunk_tokens=6)
    assert count == expected[1] and total == pytest.approx(expected[0], rel=1e-5)


def test_unknown_logit_change_falls_back_to_full_logits(tiny_tokenizer, caplog):
    from transformers import LlamaForCausalLM

    class Scaled(LlamaForCausalLM):  # a forward that changes the logits without saying so in its config
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 3
            return out

    model = Scaled(_random_lm(tiny_tokenizer).config).eval()
    data = encode(_ragged_rows(), "prompt_completion", tiny_tokenizer, 64)
    pad = tiny_tokenizer.pad_token_id
    with caplog.at_level("WARNING"):
        total, count = loss_sums(model, data, pad, 4, chunk_tokens=5)
    assert chunked_head(model)[0] is None
    assert "Scaled's forward changes the logits beyond its output head" in caplog.text
    assert (total, count) == pytest.approx(loss_sums(model, data, pad, 4))


def test_chunked_eval_peak_memory_is_far_below_full_logits(tiny_tokenizer):
    """Peak bytes of live tensors created by the eval loss (bench/common.py's counter) at a
    scaled-down size: 8 x 160 tokens, 32k vocab (full fp32 logits: 8 x 159 x 32000 x 4 B = 163 MB)."""
    from bench.common import LiveTensorBytes

    model = _random_lm(tiny_tokenizer, vocab=32000)
    rows = [{"prompt": "x", "completion": "abcdefghijklmnopqrstuvwxyz" * 7} for _ in range(8)]
    data = encode(rows, "prompt_completion", tiny_tokenizer, 160)
    assert all(len(ids) == 160 for ids in data.input_ids)
    pad = tiny_tokenizer.pad_token_id
    chunked_head(model)  # the one-off probe is not what is measured
    peaks = {}
    for chunk in (0, 128):
        with LiveTensorBytes() as mem:
            peaks[chunk] = loss_sums(model, data, pad, 8, chunk_tokens=chunk), mem.peak
    assert peaks[128][0] == pytest.approx(peaks[0][0], rel=1e-5)
    full_logits = 8 * 159 * 32000 * 4
    assert peaks[0][1] >= 2 * full_logits  # logits + their log-softmax
    assert peaks[128][1] < 4 * 128 * 32000 * 4 < peaks[0][1] / 5  # a few chunks' worth, not the batch's
