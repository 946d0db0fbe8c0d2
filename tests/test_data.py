import json
import logging

import pytest

from mtl_scale.config import RunConfig, TaskConfig
from mtl_scale.data import builtin
from mtl_scale.data.formatting import IGNORE, collate, encode, render
from mtl_scale.data.prepare import data_summary, prepare_tasks
from mtl_scale.data.tasks import load_rows, split_rows
from mtl_scale.errors import UserError
from chat_templates import STYLES, chat_tokenizer, conversation


def test_builtin_generators_are_deterministic_and_correct():
    for name in builtin.GENERATORS:
        a, b = builtin.generate(name, 200, seed=0), builtin.generate(name, 200, seed=0)
        assert a == b and len(a) == 200
        assert len({r["prompt"] for r in a}) == 200
        assert builtin.generate(name, 200, seed=1) != a
    for r in builtin.generate("reverse", 50, 0):
        word = r["prompt"][len("backwards ["):-len("] ->")]
        assert r["completion"] == " " + word[::-1]
    for r in builtin.generate("sort", 50, 0):
        assert r["completion"] == " " + "".join(sorted(r["prompt"][6:-4]))
    for r in builtin.generate("add", 50, 0):
        a, b = r["prompt"][len("add ["):-len("] ->")].split("+")
        assert int(r["completion"]) == int(a) + int(b)


def test_completion_only_labels(tiny_tokenizer):
    rows = [{"prompt": "repeat [abc] ->", "completion": " abc"}]
    enc = encode(rows, "prompt_completion", tiny_tokenizer, max_seq_len=64)
    ids, labels, p = enc.input_ids[0], enc.labels[0], enc.prompt_lens[0]
    assert ids[0] == tiny_tokenizer.bos_token_id and ids[-1] == tiny_tokenizer.eos_token_id
    assert labels[:p] == [IGNORE] * p
    assert labels[p:] == ids[p:]
    assert tiny_tokenizer.decode(ids[p:], skip_special_tokens=True) == " abc"
    assert tiny_tokenizer.decode(ids[1:p]) == "repeat [abc] ->"


def test_collate_masks_padding(tiny_tokenizer):
    enc = encode([{"prompt": "a", "completion": "b"}, {"prompt": "long prompt", "completion": "xyz"}],
                 "prompt_completion", tiny_tokenizer, 64)
    batch = collate(list(zip(enc.input_ids, enc.labels)), tiny_tokenizer.pad_token_id)
    n0 = len(enc.input_ids[0])
    assert batch["attention_mask"][0].tolist() == [1] * n0 + [0] * (batch["input_ids"].shape[1] - n0)
    assert (batch["labels"][0, n0:] == IGNORE).all()


def test_truncate_and_drop_are_counted(tiny_tokenizer):
    rows = [{"prompt": "p" * 10, "completion": "c" * 20}, {"prompt": "p" * 40, "completion": "c"},
            {"prompt": "p", "completion": "c"}]
    enc = encode(rows, "prompt_completion", tiny_tokenizer, max_seq_len=20, truncation="truncate")
    assert (len(enc), enc.truncated, enc.dropped) == (2, 1, 1)  # the 40-char prompt leaves no completion
    assert len(enc.input_ids[0]) == 20
    enc = encode(rows, "prompt_completion", tiny_tokenizer, max_seq_len=20, truncation="drop")
    assert (len(enc), enc.truncated, enc.dropped) == (1, 0, 2)


def test_alpaca_format():
    p, c = render({"instruction": "Add.", "input": "2 3", "output": "5"}, "alpaca", None)
    assert "### Instruction:\nAdd." in p and "### Input:\n2 3" in p and p.endswith("### Response:\n") and c == "5"
    p, _ = render({"instruction": "Say hi.", "input": "", "output": "hi"}, "alpaca", None)
    assert "### Input" not in p


def test_chat_format_with_and_without_template(tiny_tokenizer):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}]
    p, c = render({"messages": msgs}, "chat", tiny_tokenizer)  # the tiny tokenizer has no template
    assert p == "<|system|>\nBe brief.\n<|user|>\n2+2?\n<|assistant|>\n" and c == "4"

    class Templated:
        chat_template = "x"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt=False):
            text = "".join(f"[{m['role']}]{m['content']}[end]" for m in messages)
            return text + ("[assistant]" if add_generation_prompt else "")
    # a template whose assistant turn starts with the generation prompt
    tpl = Templated()
    tpl.apply_chat_template = lambda messages, tokenize, add_generation_prompt=False: "".join(
        (f"[assistant]{m['content']}[end]" if m["role"] == "assistant" else f"[{m['role']}]{m['content']}[end]")
        for m in messages) + ("[assistant]" if add_generation_prompt else "")
    p, c = render({"messages": msgs}, "chat", tpl)
    assert p == "[system]Be brief.[end][user]2+2?[end][assistant]" and c == "4[end]"


def _task(source, **kw):
    return TaskConfig(name="t", source=str(source), **kw)


def test_malformed_jsonl_names_file_and_line(tmp_path):
    f = tmp_path / "data.jsonl"
    f.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": \n')
    with pytest.raises(UserError, match=rf"task 't': {f}:2: malformed JSON"):
        load_rows(_task(f))
    f.write_text('{"prompt": "a", "completion": "b"}\n[1, 2]\n')
    with pytest.raises(UserError, match=rf"{f}:2: each line must be a JSON object"):
        load_rows(_task(f))


def test_malformed_json_names_file_and_line(tmp_path):
    f = tmp_path / "data.json"
    f.write_text('[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": "a" "completion": "c"}\n]\n')
    with pytest.raises(UserError, match=rf"task 't': {f}:3: malformed JSON \(Expecting ',' delimiter"):
        load_rows(_task(f))


def test_missing_column_lists_present_ones(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(UserError, match=r"has no column 'prompt'; columns present: question, answer"):
        load_rows(_task(f))
    with pytest.raises(UserError, match=r"no column 'body' \(mapped from field 'prompt'\); columns present: question, answer"):
        load_rows(_task(f, columns={"prompt": "body", "completion": "answer"}))


def test_wrong_type_and_empty_and_missing_file(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"prompt": "q", "completion": 3}) + "\n")
    with pytest.raises(UserError, match=r"row 0: field 'completion' must be a string, got int"):
        load_rows(_task(f))
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    with pytest.raises(UserError, match=r"task 't'"):
        load_rows(_task(empty))
    with pytest.raises(UserError, match=r"data file .*nope.jsonl does not exist"):
        load_rows(_task(tmp_path / "nope.jsonl"))
    with pytest.raises(UserError, match=r"unknown built-in generator 'mul'; available: builtin:copy"):
        load_rows(_task("builtin:mul"))


def test_parquet_csv_and_alpaca_json(tmp_path):
    import datasets
    rows = [{"instruction": f"i{k}", "input": "", "output": f"o{k}"} for k in range(5)]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "a.parquet"))
    datasets.Dataset.from_list(rows).to_csv(str(tmp_path / "a.csv"))
    (tmp_path / "a.json").write_text(json.dumps(rows))
    for ext in ("parquet", "csv", "json"):
        got = load_rows(_task(tmp_path / f"a.{ext}", format="alpaca"))
        assert [r["output"] for r in got] == [f"o{k}" for k in range(5)]


def test_split_is_deterministic_and_disjoint():
    rows = [{"prompt": str(i), "completion": "x"} for i in range(50)]
    t = _task("x", eval_size=10, num_examples=30)
    train, held, duplicates = split_rows(rows, t, seed=0)
    assert (len(train), len(held), duplicates) == (30, 10, 0)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    assert split_rows(rows, t, seed=0) == (train, held, 0)
    with pytest.raises(UserError, match="has 50 examples and eval_size=60 leaves none"):
        split_rows(rows, _task("x", eval_size=60), seed=0)


def test_gsm8k_real_data_with_column_mapping(gsm8k_path, tiny_tokenizer):
    cfg = RunConfig(tasks=[TaskConfig(name="gsm8k", source=str(gsm8k_path), columns={"prompt": "question",
                                                                                      "completion": "answer"},
                                      eval_size=20)], max_seq_len=256)
    tasks = prepare_tasks(cfg, tiny_tokenizer)
    data = tasks["gsm8k"]
    assert len(data.train) + data.train.dropped == 1319 - 20
    assert data.train.truncated > 0  # real GSM8K examples run past 256 characters
    assert max(len(ids) for ids in data.train.input_ids) == 256
    answers = {json.loads(line)["answer"] for line in gsm8k_path.read_text().splitlines()}
    assert set(data.train.references + data.held_out.references) <= answers


def test_encode_no_rows(tiny_tokenizer):
    enc = encode([], "prompt_completion", tiny_tokenizer, 16)
    assert len(enc) == 0 and enc.references == []


@pytest.mark.parametrize("style", sorted(STYLES))
def test_chat_template_reference_is_the_assistant_content(tiny_model_dir, style):
    tok, end_of_turn = chat_tokenizer(tiny_model_dir, style)
    rows = [conversation("Capital of France?", "Paris"), conversation("2+2?", "four")]
    enc = encode(rows, "chat", tok, max_seq_len=256)
    assert [r.strip() for r in enc.references] == ["Paris", "four"]  # exact match compares stripped text
    for ids, labels, p in zip(enc.input_ids, enc.labels, enc.prompt_lens):
        completion = labels[p:]
        assert completion == ids[p:] and end_of_turn in completion  # the model learns to end its turn
        assert completion[-1] == tok.eos_token_id


def test_bos_exactly_once(tiny_model_dir, tiny_tokenizer):
    row = conversation("2+2?", "4")
    bos = tiny_tokenizer.bos_token_id
    ids = encode([row], "chat", tiny_tokenizer, 256).input_ids[0]  # no template: a plain rendering without bos
    assert ids[0] == bos and ids.count(bos) == 1
    ids = encode([{"prompt": "<s>repeat [a] ->", "completion": " a"}], "prompt_completion", tiny_tokenizer,
                 64).input_ids[0]  # the text brings its own bos
    assert ids[0] == bos and ids.count(bos) == 1
    llama3, _ = chat_tokenizer(tiny_model_dir, "llama3")  # the template writes bos
    ids = encode([row], "chat", llama3, 256).input_ids[0]
    assert ids[0] == llama3.bos_token_id and ids.count(llama3.bos_token_id) == 1
    chatml, _ = chat_tokenizer(tiny_model_dir, "chatml")  # a template without bos is rendered as it is
    ids = encode([row], "chat", chatml, 256).input_ids[0]
    assert ids[0] == chatml.convert_tokens_to_ids("<|im_start|>") and bos not in ids


def test_duplicates_are_removed_before_the_split_and_counted():
    rows = [{"prompt": str(i % 40), "completion": "x"} for i in range(50)]  # rows 40..49 repeat rows 0..9
    rows.append({"prompt": "0", "completion": "y"})  # same prompt, other completion: kept
    train, held, duplicates = split_rows(rows, _task("x", eval_size=10), seed=0)
    assert duplicates == 10
    pairs = lambda split: [(r["prompt"], r["completion"]) for r in split]  # noqa: E731
    assert len(set(pairs(train))) == len(train) == 31 and len(set(pairs(held))) == 10
    assert not set(pairs(train)) & set(pairs(held))
    with pytest.raises(UserError, match=r"task 't' has 41 distinct examples \(10 exact duplicates removed\) and "
                                        r"eval_size=41 leaves none"):
        split_rows(rows, _task("x", eval_size=41), seed=0)


def test_held_out_drops_and_duplicates_reach_the_data_summary(tmp_path, tiny_tokenizer, caplog):
    rows = [{"prompt": f"q{i}" + ("?" * 40 if i % 2 else ""), "completion": " a"} for i in range(40)]
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows + rows[:5]))
    task = TaskConfig(name="qa", source=str(f), eval_size=16)
    cfg = RunConfig(tasks=[task], max_seq_len=24)  # the odd rows' prompts alone fill it
    _, held_rows, _ = split_rows(load_rows(task), task, cfg.seed)
    held_long = sum(len(r["prompt"]) > 24 for r in held_rows)
    assert 0 < held_long < 16
    with caplog.at_level(logging.WARNING, logger="mtl_scale.data.prepare"):
        summary = data_summary(prepare_tasks(cfg, tiny_tokenizer))
    assert summary == {"qa": {"train": 24 - (20 - held_long), "held_out": 16 - held_long, "truncated": 0,
                              "dropped": 20 - held_long, "held_out_truncated": 0, "held_out_dropped": held_long,
                              "duplicates_removed": 5}}
    assert "task qa: 5 exact duplicate rows removed" in caplog.text
    assert f"task qa: held-out: 0 examples truncated, {held_long} dropped" in caplog.text


def test_empty_file_and_directory_sources_say_so(tmp_path):
    for name, text in (("blank.jsonl", ""), ("lines.jsonl", "\n  \n"), ("e.csv", "")):
        (tmp_path / name).write_text(text)
    with pytest.raises(UserError, match=r"task 't': data file .*blank.jsonl has no examples \(no JSON object on any line\)"):
        load_rows(_task(tmp_path / "blank.jsonl"))
    with pytest.raises(UserError, match=r"lines.jsonl has no examples"):
        load_rows(_task(tmp_path / "lines.jsonl"))
    with pytest.raises(UserError, match=r"e.csv is empty: it has no examples"):
        load_rows(_task(tmp_path / "e.csv"))
    (tmp_path / "folder.jsonl").mkdir()
    for folder in (tmp_path, tmp_path / "folder.jsonl"):
        with pytest.raises(UserError, match=rf"task 't': source {folder} is a directory; give a data file \(.jsonl"):
            load_rows(_task(folder))
