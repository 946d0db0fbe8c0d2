"""Per-task metrics on hand values, the prompt/completion token boundary on locally built Llama-3-style
and SentencePiece-style tokenizers, `choice` on a model whose answer is known, and GSM8K's final-answer
extraction on planted generations."""
import json
from types import SimpleNamespace

import pytest
import torch

from mtl_scale.config import ConfigError, EvalConfig, TaskConfig, load_config
from mtl_scale.data.formatting import drop_overlap, encode
from mtl_scale.errors import UserError
from mtl_scale.evaluate import choose, evaluate_model, score_task
from mtl_scale.metrics import (GSM8K_PATTERN, contains, exact_match, extract_answer, extract_match,
                               normalise_answer, resolve, truncate_at_stop)


def half_credit(prediction: str, reference: str) -> float:
    """A user metric, imported by dotted path below."""
    return 0.5 if prediction.strip() else 0.0


def test_exact_match_and_contains():
    assert exact_match(" Paris\n", "Paris") == 1.0 and exact_match("Paris.", "Paris") == 0.0
    assert contains("The capital is Paris.", " Paris ") == 1.0 and contains("Lyon", "Paris") == 0.0


@pytest.mark.parametrize("text, expected", [("1,234", "1234"), ("-3.", "-3"), ("18.00", "18"), ("$18", "18"),
                                            ("0.50", "0.5"), ("-0", "0"), ("forty", "forty"), (" 7 ", "7")])
def test_normalise_answer(text, expected):
    assert normalise_answer(text) == expected


def test_gsm8k_extraction_on_hand_cases():
    ref = "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18 a day.\n#### 18"
    assert extract_answer(ref, GSM8K_PATTERN) == "18"
    assert extract_match("so she makes 18 dollars.\n#### 18", ref) == 1.0
    assert extract_match("#### 18.00", ref) == 1.0                               # numeric normalisation
    assert extract_match("#### 18.\n\nQuestion: how many? #### 7", ref) == 1.0  # trailing text: the first answer
    assert extract_match("#### 7\n#### 18", ref) == 0.0
    assert extract_match("She makes 18 dollars.", ref) == 0.0                   # no final answer: no credit
    assert extract_match("#### 1,234,567", "#### 1234567") == 1.0                # commas
    assert extract_match("####-5", "... #### -5") == 1.0 and extract_match("#### 5", "#### -5") == 0.0
    assert extract_match("The answer: 42", "42", pattern=r"answer: (\S+)") == 1.0  # a plain reference, own regex


def test_truncate_at_stop():
    assert truncate_at_stop("42\n\nQuestion: next", ["\n\n", "Question:"]) == "42"
    assert truncate_at_stop("no stop here", ["###"]) == "no stop here"
    assert truncate_at_stop("abc", []) == "abc"


def test_resolve_builtins_user_functions_and_errors():
    assert resolve("exact_match").stops_at_reference and not resolve("extract").stops_at_reference
    assert not resolve("choice").generates
    assert resolve("extract", r"=(\d+)").score("x=4", "=4") == 1.0
    assert resolve("test_metrics.half_credit").score("x", "y") == 0.5
    assert resolve("test_metrics:half_credit").score("", "y") == 0.0
    with pytest.raises(UserError, match=r"task 't': metric 'f1' is neither a built-in \(exact_match, extract"):
        resolve("f1", task="t")
    with pytest.raises(UserError, match=r"cannot import 'nope' from 'test_metrics'"):
        resolve("test_metrics.nope", task="t")
    with pytest.raises(UserError, match="answer_pattern .* is not a valid regex"):
        resolve("extract", "(unclosed", task="t")


def test_rouge_l_hand_value():
    pytest.importorskip("rouge_score")
    # LCS("the cat sat", "the cat") = 2 words: precision 1, recall 2/3, F1 0.8
    assert resolve("rouge_l").score("the cat", "the cat sat") == pytest.approx(0.8)


def test_config_validates_metric_keys(tmp_path):
    def load(task: str):
        (tmp_path / "c.yaml").write_text(f"tasks:\n  - {task}\n")
        return load_config(tmp_path / "c.yaml")

    cfg = load("{name: g, source: x.jsonl, metric: extract, max_new_tokens: 256, stop: [\"\\n\\n\"]}")
    assert cfg.tasks[0].metric == "extract" and cfg.tasks[0].stop == ["\n\n"] and cfg.tasks[0].max_new_tokens == 256
    with pytest.raises(ConfigError, match=r"tasks.0.choices: metric=choice \(task 'c'\) needs at least two options"):
        load("{name: c, source: x.jsonl, metric: choice}")
    with pytest.raises(ConfigError, match=r"tasks.0.answer_pattern is read only by metric=extract"):
        load("{name: a, source: x.jsonl, answer_pattern: '(\\d+)'}")
    with pytest.raises(ConfigError, match=r"c.yaml: tasks.0.metric: task 'b': metric 'bleu' is neither"):
        load("{name: b, source: x.jsonl, metric: bleu}")


def test_gsm8k_config_scores_the_final_answer(gsm8k_path):
    cfg = load_config("configs/gsm8k.yaml")
    task = next(t for t in cfg.tasks if t.name == "gsm8k")
    assert task.metric == "extract"
    metric = resolve(task.metric, task.answer_pattern)
    answers = [json.loads(line)["answer"] for line in gsm8k_path.read_text().splitlines()]
    assert all(extract_answer(a, task.answer_pattern or GSM8K_PATTERN) is not None for a in answers)
    assert all(metric.score(a.split("\n")[-1], a) == 1.0 for a in answers)  # the "#### n" line alone scores


# --- the token boundary ---------------------------------------------------------------------------------

CORPUS = ["Q: What is 2+2? A: 4", "What is 2+2=4", "Answer: 42", "the answer is 4 and 42", "Question: hi there",
          "hi there, said the answer", "A: yes", "A: no"] * 20


def _byte_level_bpe():
    """A Llama-3/Qwen-style tokenizer: byte-level BPE whose merges glue a space to the next word."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def _sentencepiece_style():
    """A Llama-2-style tokenizer: Metaspace ("▁" for spaces, one prepended to the text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<pad>", "<s>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")


@pytest.mark.parametrize("make, prompt, completion, apart_differs", [
    (_byte_level_bpe, "Q: What is 2+2? A: ", "4", True),   # a prompt ending in a space: a lone space token apart
    (_byte_level_bpe, "Answer:", " 42", False),            # a clean boundary: the same either way
    (_sentencepiece_style, "What is 2+2=", "4", True),      # apart, the completion gains a "▁"
    (_sentencepiece_style, "Question: hi", " there", False),
])
def test_prompt_and_completion_are_tokenised_as_one_text(make, prompt, completion, apart_differs):
    tok = make()
    data = encode([{"prompt": prompt, "completion": completion}], "prompt_completion", tok, max_seq_len=64)
    whole = tok(prompt + completion, add_special_tokens=False)["input_ids"]
    ids, p = data.input_ids[0], data.prompt_lens[0]
    assert ids == [tok.bos_token_id] + whole + [tok.eos_token_id]  # exactly the joined text's tokens
    assert data.labels[0] == [-100] * p + ids[p:]
    assert tok.decode(ids[1:-1]) == prompt + completion
    # the answer is labelled; a token straddling the boundary carries prompt characters (data.overlaps)
    assert len(ids[p:-1]) >= 1 and drop_overlap(tok.decode(ids[p:-1]), data.overlaps[0]).strip() == completion.strip()
    assert data.references[0].strip() == completion.strip()
    apart = tok(prompt, add_special_tokens=False)["input_ids"] + tok(completion, add_special_tokens=False)["input_ids"]
    assert (apart != whole) == apart_differs


# --- choice and planted generations ------------------------------------------------------------------------

class PrefersToken(torch.nn.Module):
    """Logits that put all the mass on one token at every position: the likeliest option is known."""

    def __init__(self, vocab_size: int, token: int):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))
        self.vocab_size, self.token = vocab_size, token

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        logits = torch.zeros(*input_ids.shape, self.vocab_size)
        logits[..., self.token] = 10.0
        return SimpleNamespace(logits=logits)


def test_choice_picks_the_likeliest_option(tiny_tokenizer):
    tok = tiny_tokenizer
    rows = [{"prompt": f"repeat [{w}] ->", "completion": c} for w, c in [("ab", "b"), ("cd", "a")]]
    task = TaskConfig(name="cls", metric="choice", choices=["a", "b"])
    data = encode(rows, "prompt_completion", tok, 64)
    model = PrefersToken(len(tok), tok("b", add_special_tokens=False)["input_ids"][-1])
    assert choose(model, tok, data, task, batch_size=1) == ["b", "b"]
    r = score_task(model, tok, data, task, EvalConfig(batch_size=2, loss_chunk_tokens=0))
    assert r.predictions == ["b", "b"] and r.scores == [1.0, 0.0]


def test_choice_is_the_same_with_a_chunked_head(tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    tok = tiny_tokenizer
    rows = [{"prompt": f"repeat [{w}] ->", "completion": " " + w} for w in ["abc", "dd", "bca", "ea", "f"]]
    task = TaskConfig(name="cls", metric="choice", choices=[" abc", " dd", " bca", " ea", " f"])
    data = encode(rows, "prompt_completion", tok, 64)
    full = choose(model, tok, data, task, batch_size=2)
    assert choose(model, tok, data, task, batch_size=2, chunk_tokens=2) == full
    assert set(full) <= set(task.choices)


class Planted(torch.nn.Module):
    """generate() appends planted texts in call order (the decoded generations are these)."""

    def __init__(self, tok, texts):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))
        self.tok, self.texts = tok, list(texts)

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, len(self.tok)))

    def generate(self, input_ids, attention_mask, max_new_tokens, **kw):
        rows = [torch.cat([ids, torch.tensor(self.tok(self.texts.pop(0), add_special_tokens=False)["input_ids"],
                                             dtype=torch.long)]) for ids in input_ids]
        width = max(len(r) for r in rows)
        return torch.stack([torch.nn.functional.pad(r, (0, width - len(r)), value=self.tok.pad_token_id) for r in rows])


def test_gsm8k_planted_generations_score_their_final_answer(gsm8k_path):
    tok = _byte_level_bpe()  # any text round-trips
    rows = [json.loads(line) for line in gsm8k_path.read_text().splitlines()[:4]]
    rows = [{"prompt": r["question"], "completion": " " + r["answer"]} for r in rows]
    data = encode(rows, "prompt_completion", tok, 2048)
    finals = [r["completion"].rsplit("#### ", 1)[1] for r in rows]
    planted = [f"reasoning...\n#### {finals[0]}\n\nQuestion: more #### 1",  # right, with trailing text
               f"#### {int(finals[1]) + 1}",                                    # wrong number
               f"the answer is {finals[2]}",                                     # no final-answer marker
               f"#### {int(finals[3]):,}.00"]                                    # right, formatted
    task = SimpleNamespace(held_out=data, config=TaskConfig(name="gsm8k", metric="extract", stop=["\n\nQuestion:"]))
    results = evaluate_model(Planted(tok, planted), tok, {"gsm8k": task}, EvalConfig(batch_size=4, loss_chunk_tokens=0))
    assert results["gsm8k"]["metric"] == "extract"
    assert results["gsm8k"]["score"] == 0.5 and results["gsm8k"]["exact_match"] == 0.0


def test_a_straddling_token_is_scored_as_the_completion():
    """SentencePiece glues "2+2=4" into one token: generation starts before it, and what it generates is
    scored without the prompt characters it repeats."""
    tok = _sentencepiece_style()
    data = encode([{"prompt": "What is 2+2=", "completion": "4"}], "prompt_completion", tok, max_seq_len=64)
    assert [o.strip() for o in data.overlaps] == ["2+2="] and data.references == ["4"]
    task = SimpleNamespace(held_out=data, config=TaskConfig(name="t"))
    results = evaluate_model(Planted(tok, ["2+2=4"]), tok, {"t": task}, EvalConfig(batch_size=1, loss_chunk_tokens=0))
    assert results["t"]["exact_match"] == 1.0
