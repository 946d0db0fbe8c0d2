"""launch/evaluate.py --harness: EleutherAI lm-evaluation-harness on the base, a run's adapters and a merged
model, with the shipped offline task gsm8k_local, folded into eval.json."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mtl_scale.errors import UserError
from mtl_scale.harness import adapter_sets, fold, harness_table, hub_offline, local_tasks, write_local_tasks

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is the optional 'harness' extra")

ROOT = Path(__file__).resolve().parent.parent


def test_fold_keeps_numeric_metric_filter_entries():
    out = {"results": {"gsm8k_local": {"name": "gsm8k_local", "alias": "gsm8k_local", "sample_len": 4,
                                       "exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.25,
                                       "exact_match,flexible-extract": 0.5,
                                       "exact_match_stderr,flexible-extract": "N/A"}}}
    assert fold(out) == {"gsm8k_local": {"exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.25,
                                         "exact_match,flexible-extract": 0.5}}


def test_harness_table_rows_per_metric_columns_per_model():
    scores = {"base": {"t": {"acc,none": 0.1, "acc_stderr,none": 0.01}},
              "shared+a": {"t": {"acc,none": 0.25}, "u": {"f1,none": 1.0}}}
    assert harness_table(scores).splitlines() == [
        "| task | metric | base | shared+a |", "|---|---|---:|---:|",
        "| t | acc,none | 0.100 | 0.250 |", "| u | f1,none | - | 1.000 |"]


def test_local_task_copy_points_at_the_data_by_absolute_path(tmp_path):
    shipped = local_tasks()["gsm8k_local"]
    written = write_local_tasks(tmp_path / "tasks", "some/dir/test.jsonl") / shipped.name
    spec, orig = yaml.safe_load(written.read_text()), yaml.safe_load(shipped.read_text())
    assert spec["dataset_kwargs"]["data_files"] == {"test": str(Path("some/dir/test.jsonl").resolve())}
    spec.pop("dataset_kwargs"), orig.pop("dataset_kwargs")
    assert spec == orig  # prompt, filters, metric as shipped
    assert orig["doc_to_text"] == "Question: {{question}}\nAnswer:"
    assert orig["filter_list"][0]["filter"][0]["regex_pattern"] == r"#### (\-?[0-9\.\,]+)"


def test_local_gsm8k_scores_the_final_number(tmp_path, gsm8k_path):
    """lm_eval's own filters and metric on hand-written responses to the first test question (answer 18)."""
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(write_local_tasks(tmp_path, gsm8k_path)), include_defaults=False)
    task = tm.load(["gsm8k_local"])["tasks"]["gsm8k_local"]
    doc = task.test_docs()[0]
    assert doc["answer"].endswith("#### 18")
    responses = [["She makes $18.\n#### 18"], ["The answer is 18."], ["#### 17"]]
    expected = {"strict-match": [1.0, 0.0, 0.0], "flexible-extract": [1.0, 1.0, 0.0]}
    for ensemble in task._filters:
        filtered = responses
        for make_filter in ensemble.filters:
            filtered = list(make_filter().apply(filtered, [doc] * len(filtered)))
        scores = [task.process_results(doc, [r])["exact_match"] for r in filtered]
        assert scores == expected[ensemble.name], ensemble.name


def test_adapter_sets_follow_the_sharing_mode(tmp_path):
    for name in ["shared", "a", "b"]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text("{}")
    assert adapter_sets("hard", ["a", "b"], tmp_path) == {"shared": [tmp_path / "shared"]}
    assert adapter_sets("soft", ["a", "b"], tmp_path) == {"a": [tmp_path / "a"], "b": [tmp_path / "b"]}
    assert adapter_sets("hybrid", ["a", "b"], tmp_path) == {"shared+a": [tmp_path / "shared", tmp_path / "a"],
                                                            "shared+b": [tmp_path / "shared", tmp_path / "b"]}
    with pytest.raises(UserError, match="no trained adapter 'c'"):
        adapter_sets("soft", ["a", "c"], tmp_path)


def test_hub_offline_sets_and_restores_the_flags_already_read():
    import datasets.config
    import huggingface_hub.constants
    before = (huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE,
              os.environ.get("HF_HUB_OFFLINE"), os.environ.get("HF_DATASETS_OFFLINE"))
    with hub_offline():
        assert huggingface_hub.constants.HF_HUB_OFFLINE and datasets.config.HF_HUB_OFFLINE
        assert os.environ["HF_HUB_OFFLINE"] == os.environ["HF_DATASETS_OFFLINE"] == "1"
    assert (huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE,
            os.environ.get("HF_HUB_OFFLINE"), os.environ.get("HF_DATASETS_OFFLINE")) == before


def make_adapter(base_dir, out, seed):
    """A LoRA adapter for the tiny model, built directly with PEFT; lora_B is perturbed so that it changes
    the model (a fresh LoRA's B is zero)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    model.save_pretrained(out)
    return model


def evaluate_cli(args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, str(ROOT / "launch" / "evaluate.py"), *args], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout


def write_config(tmp_path, sharing, tasks):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({
        "sharing": sharing, "output_dir": str(tmp_path / "run"), "eval": {"batch_size": 4, "max_new_tokens": 8},
        "tasks": [{"name": t, "source": f"builtin:{t}", "num_examples": 20, "eval_size": 4} for t in tasks]}))
    return cfg


def assert_scores(scores):
    # gsm8k_local: lm_eval's "metric,filter" keys, with the stock task's two filters
    assert {"exact_match,strict-match", "exact_match,flexible-extract"} <= set(scores["gsm8k_local"])
    assert all(0.0 <= v <= 1.0 for v in scores["gsm8k_local"].values())


def test_harness_on_base_adapter_and_merged_model(tmp_path, tiny_model_dir, gsm8k_path):
    """sharing=soft: the held-out evaluation, then lm_eval on the base, the adapter (lm_eval's peft=) and a
    merged full model, all in one eval.json; run from an unrelated directory."""
    from transformers import AutoTokenizer

    cfg = write_config(tmp_path, "soft", ["copy"])
    model = make_adapter(tiny_model_dir, tmp_path / "run" / "adapters" / "copy", seed=0)
    merged = tmp_path / "full_model"
    model.merge_and_unload().save_pretrained(merged)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(merged)

    stdout = evaluate_cli(["--config", str(cfg), "--harness", "gsm8k_local", "--harness-limit", "4",
                           "--harness-merged", str(merged), "--harness-gsm8k", str(gsm8k_path)], cwd=tmp_path)
    results = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert set(results["base"]) == {"copy"} and set(results["adapters"]) == {"copy"}  # held-out, as before
    assert set(results["harness"]) == {"base", "copy", "merged"} and results["harness_limit"] == 4
    for scores in results["harness"].values():
        assert_scores(scores)
    assert "| gsm8k_local | exact_match,strict-match |" in stdout


def test_harness_only_hybrid_folds_into_existing_eval_json(tmp_path, tiny_model_dir, gsm8k_path):
    """sharing=hybrid: each task's shared + own adapter applied together; --harness-only keeps what an
    earlier run wrote to eval.json."""
    cfg = write_config(tmp_path, "hybrid", ["copy", "add"])
    for seed, name in enumerate(["shared", "copy", "add"]):
        make_adapter(tiny_model_dir, tmp_path / "run" / "adapters" / name, seed)
    out = tmp_path / "eval.json"
    out.write_text(json.dumps({"tasks": ["copy", "add"], "base": {}, "adapters": {}}))

    evaluate_cli(["--config", str(cfg), "--json", str(out), "--no-base", "--harness-only", "--harness",
                  "gsm8k_local", "--harness-limit", "2", "--harness-gsm8k", str(gsm8k_path)], cwd=tmp_path)
    results = json.loads(out.read_text())
    assert results["tasks"] == ["copy", "add"]
    assert set(results["harness"]) == {"shared+copy", "shared+add"}
    for scores in results["harness"].values():
        assert_scores(scores)
