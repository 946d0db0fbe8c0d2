"""Bad input under 2 real ranks: a clear one-line error, no traceback soup, and every rank exits."""
import json

import pytest

from dist import launch

pytestmark = pytest.mark.dist


def _config(tmp_path, task_yaml, extra=""):
    p = tmp_path / "run.yaml"
    p.write_text(f"tasks:\n  - {task_yaml}\nmax_steps: 2\nmicro_batch_size: 2\noutput_dir: {tmp_path / 'out'}\n{extra}")
    return p


def _bad_jsonl(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n" + json.dumps({"prompt": "c", "completion": "d"})
                 + "\n{\"prompt\": \"oops\",\n")
    return _config(tmp_path, f"{{name: broken, source: '{f}'}}"), f"task 'broken': {f}:3: malformed JSON"


def _missing_column(tmp_path):
    f = tmp_path / "qa.jsonl"
    f.write_text("".join(json.dumps({"question": f"q{i}", "answer": "a"}) + "\n" for i in range(20)))
    return (_config(tmp_path, f"{{name: qa, source: '{f}', eval_size: 2}}"),
            "has no column 'prompt'; columns present: question, answer")


def _empty_task(tmp_path):
    f = tmp_path / "empty.jsonl"
    f.write_text("")
    return _config(tmp_path, f"{{name: nothing, source: '{f}'}}"), f"task 'nothing': data file {f} has no examples"


def _missing_model(tmp_path):
    return (_config(tmp_path, "{name: copy, source: 'builtin:copy'}", "model: {path: /no/such/model}\n"),
            "model.path='/no/such/model' does not exist")


def _unknown_format(tmp_path):
    return (_config(tmp_path, "{name: copy, source: 'builtin:copy', format: xml}"),
            "format (task 'copy')='xml' is not allowed; choose one of: prompt_completion, alpaca, chat")


def _not_causal_lm(tmp_path):
    import shutil

    from transformers import ViTConfig

    from mtl_scale.model import ensure_tiny_model
    d = tmp_path / "vit"
    shutil.copytree(ensure_tiny_model(), d)
    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(d)
    return (_config(tmp_path, "{name: copy, source: 'builtin:copy'}", f"model: {{path: '{d}'}}\n"),
            "is a ViTConfig, not a causal language model")


def _output_dir_is_a_file(tmp_path):
    (tmp_path / "out").write_text("not a directory\n")
    return (_config(tmp_path, "{name: copy, source: 'builtin:copy', num_examples: 20, eval_size: 2}"),
            f"output_dir={str(tmp_path / 'out')!r} is a file, not a directory; give a directory for adapters, "
            "checkpoints and metrics (it is created if missing)")


def _source_is_a_directory(tmp_path):
    return (_config(tmp_path, f"{{name: folder, source: '{tmp_path}'}}"),
            f"task 'folder': source {tmp_path} is a directory; give a data file")


@pytest.mark.parametrize("make", [_bad_jsonl, _missing_column, _empty_task, _missing_model, _unknown_format,
                                  _not_causal_lm, _output_dir_is_a_file, _source_is_a_directory],
                         ids=lambda f: f.__name__.strip("_"))
def test_bad_input_fails_cleanly_on_every_rank(make, tmp_path, tiny_model_dir):
    config, message = make(tmp_path)
    res = launch("launch/train.py", ["--config", str(config)], timeout=180, check=False)
    assert res.returncode != 0
    assert "mtl_scale: error: " in res.stdout and message in res.stdout, res.stdout[-3000:]
    assert "Traceback" not in res.stdout, res.stdout[-3000:]
    assert not (tmp_path / "out" / "adapters").exists()
    assert "connection closed by peer" not in res.stdout.lower(), res.stdout[-3000:]
