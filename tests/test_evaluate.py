import torch

from mtl_scale.data.formatting import encode
from mtl_scale.evaluate import exact_match, results_table


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
