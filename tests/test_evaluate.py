from types import SimpleNamespace

import pytest
import torch

from chat_templates import STYLES, chat_tokenizer, conversation
from mtl_scale.config import EvalConfig
from mtl_scale.data.formatting import encode
from mtl_scale.evaluate import evaluate_during_training, exact_match, results_table


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
    results = {"tasks": ["a", "b"], "base": {"a": {"loss": 2.0, "exact_match": 0.0}, "b": {"loss": 3.0, "exact_match": 0.1}},
               "adapters": {"a": {"a": {"loss": 0.5, "exact_match": 0.9}}, "b": {"b": {"loss": 1.0, "exact_match": 0.25}}}}
    table = results_table(results)
    assert "| a | a | 2.000 | 0.500 | 0.0% | 90.0% |" in table
    assert "| b | b | 3.000 | 1.000 | 10.0% | 25.0% |" in table


class OracleModel(torch.nn.Module):
    """A model that learned its training labels: generate() continues each prompt with the example's
    labelled completion up to and including the first eos (where greedy generation stops)."""

    def __init__(self, data, vocab_size):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))
        self.vocab_size = vocab_size
        self.completion_of = {tuple(ids[:p]): ids[p:] for ids, p in zip(data.input_ids, data.prompt_lens)}

    def forward(self, input_ids, attention_mask):
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
    task = SimpleNamespace(held_out=data)
    metrics = evaluate_during_training(model, tok, {"chat": task}, EvalConfig(batch_size=2, max_new_tokens=32),
                                       activate=lambda name: None, rank=0, world=1)
    assert metrics["eval/exact_match/chat"] == 1.0
