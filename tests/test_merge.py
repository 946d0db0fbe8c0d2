"""Deployment outputs: merged adapters, retention report, full merged checkpoint."""
import json
import subprocess
import sys

import pytest
import torch
import yaml

from mtl_scale.config import RunConfig, TaskConfig, to_dict
from mtl_scale.errors import UserError
from mtl_scale.merge import METHODS, add_merged_adapter, load_base, merge_run, save_adapter_dir, save_full_model, \
    serving_warnings

TASKS = ["copy", "reverse"]


def _peft_with_adapters(model_dir, ranks):
    import peft

    base = load_base(str(model_dir), "fp32")
    model = None
    gen = torch.Generator().manual_seed(0)
    for name, r in ranks.items():
        cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj", "down_proj"],
                              task_type="CAUSAL_LM")
        model = peft.get_peft_model(base, cfg, adapter_name=name) if model is None else model
        if name not in model.peft_config:
            model.add_adapter(name, cfg)
        for n, p in model.named_parameters():  # B starts at 0: give every adapter a real update
            if f"lora_B.{name}." in n:
                p.data = 0.05 * torch.randn(p.shape, generator=gen)
    return model.eval()


@pytest.fixture(scope="module")
def fake_run(tiny_model_dir, tmp_path_factory):
    """A run directory as the trainer leaves it: config.yaml and adapters/<task>/ (PEFT layout)."""
    run = tmp_path_factory.mktemp("run")
    cfg = RunConfig(tasks=[TaskConfig(name=t, source=f"builtin:{t}", num_examples=20, eval_size=6) for t in TASKS],
                    output_dir=str(run))
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    model = _peft_with_adapters(tiny_model_dir, {t: 8 for t in TASKS})
    for t in TASKS:
        save_adapter_dir(model, t, run / "adapters" / t, str(tiny_model_dir))
    return run


def _logits(model, tok):
    ids = tok(["sort [cab] ->", "add [1+2] ->"], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**ids).logits


def test_every_method_runs_and_report_has_retention(fake_run, tmp_path):
    report = merge_run(fake_run, ["auto"], full_model=None, out_dir=tmp_path)
    assert sorted(report["merged"]) == sorted(METHODS) and not report["errors"]
    for method in METHODS:
        assert (tmp_path / "adapters" / method / "adapter_model.safetensors").is_file()
        for t in TASKS:
            m = report["merged"][method][t]
            assert 0 <= m["exact_match"] <= 1 and m["loss"] > 0
            own = report["own"][t]["exact_match"]
            assert report["retention"][method][t] == (m["exact_match"] / own if own else None)
    assert report["best"]["method"] in METHODS and "highest mean score retention" in report["best"]["why"]
    text = (tmp_path / "merge_report.md").read_text()
    assert "| copy |" in text and "retention" in text and "Serving checks" in text
    assert json.loads((tmp_path / "merge_report.json").read_text())["best"] == report["best"]


def test_eval_subset_and_only_this_runs_adapters(fake_run, tiny_model_dir, tmp_path):
    import shutil
    stale = fake_run / "adapters" / "shared"  # left by an earlier hard-sharing run in the same output_dir
    shutil.copytree(fake_run / "adapters" / "copy", stale)
    try:
        report = merge_run(fake_run, ["linear"], full_model=None, eval_examples=3, out_dir=tmp_path)
    finally:
        shutil.rmtree(stale)
    assert "shared" not in report["serving"] and report["own"]["copy"]["adapter"] == "copy"
    assert report["own"]["copy"]["n"] == 3 and report["merged"]["linear"]["reverse"]["n"] == 3


def test_identity_merge_reproduces_the_adapter(tiny_model_dir, tiny_tokenizer):
    model = _peft_with_adapters(tiny_model_dir, {"copy": 8, "reverse": 8})
    model.set_adapter("copy")
    expected = _logits(model, tiny_tokenizer)
    add_merged_adapter(model, ["copy"], "linear", [1.0], "identity")
    model.set_adapter("identity")
    torch.testing.assert_close(_logits(model, tiny_tokenizer), expected, atol=1e-5, rtol=1e-5)


def test_cat_is_the_exact_sum_of_updates_and_linear_is_not(tiny_model_dir, tiny_tokenizer):
    model = _peft_with_adapters(tiny_model_dir, {"copy": 8, "reverse": 8})
    model.base_model.set_adapter(["copy", "reverse"])  # both applied: base + ΔW_copy + ΔW_reverse
    both = _logits(model, tiny_tokenizer)
    add_merged_adapter(model, ["copy", "reverse"], "cat", [1.0, 1.0], "cat")
    add_merged_adapter(model, ["copy", "reverse"], "linear", [1.0, 1.0], "lin")
    model.set_adapter("cat")
    torch.testing.assert_close(_logits(model, tiny_tokenizer), both, atol=1e-5, rtol=1e-5)
    model.set_adapter("lin")  # combines A and B separately: cross terms B_copy·A_reverse appear
    assert (_logits(model, tiny_tokenizer) - both).abs().max() > 1e-4


def test_unequal_ranks_guard(tiny_model_dir):
    model = _peft_with_adapters(tiny_model_dir, {"copy": 8, "reverse": 4})
    with pytest.raises(UserError, match=r"merge method linear needs adapters of equal rank, got \{'copy': 8, 'reverse': 4\}"):
        add_merged_adapter(model, ["copy", "reverse"], "linear", [0.5, 0.5], "m")
    add_merged_adapter(model, ["copy", "reverse"], "cat", [0.5, 0.5], "c")
    assert model.peft_config["c"].r == 12


def test_full_checkpoint_loads_in_stock_transformers_with_same_logits(fake_run, tiny_model_dir, tiny_tokenizer,
                                                                       tmp_path):
    from peft import PeftModel

    out = save_full_model(str(tiny_model_dir), fake_run / "adapters" / "copy", tmp_path / "full",
                          max_shard_size="300KB")
    assert (out / "model.safetensors.index.json").is_file()  # sharded
    assert len(list(out.glob("model-*.safetensors"))) > 1 and (out / "tokenizer.json").is_file()
    model = PeftModel.from_pretrained(load_base(str(tiny_model_dir), "fp32"), str(fake_run / "adapters" / "copy"))
    expected = _logits(model.eval(), tiny_tokenizer)
    torch.save(expected, tmp_path / "expected.pt")
    script = f"""
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained({str(out)!r})
model = AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()
ids = tok(["sort [cab] ->", "add [1+2] ->"], return_tensors="pt", padding=True)
with torch.no_grad():
    got = model(**ids).logits
torch.testing.assert_close(got, torch.load({str(tmp_path / 'expected.pt')!r}), atol=1e-4, rtol=1e-4)
assert not any(m.split('.')[0] in ('mtl_scale', 'peft') for m in sys.modules), 'needed mtl_scale or peft'
print('OK')
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]


def test_quantized_base_is_refused(tiny_model_dir, tmp_path):
    import shutil
    q = tmp_path / "q"
    shutil.copytree(tiny_model_dir, q)
    cfg = json.loads((q / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (q / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"quantized \(bitsandbytes\); merging into quantized weights would round"):
        load_base(str(q), "fp32")


def test_serving_warnings(tmp_path):
    def adapter(**cfg):
        d = tmp_path / str(len(list(tmp_path.iterdir())))
        d.mkdir()
        (d / "adapter_config.json").write_text(json.dumps({"r": 8, "target_modules": ["q_proj"], **cfg}))
        return d
    assert serving_warnings(adapter()) == []
    assert "vLLM accepts LoRA ranks" in serving_warnings(adapter(r=12))[0]
    assert "--max-lora-rank 32" in serving_warnings(adapter(r=32))[0]
    assert any("DoRA" in w for w in serving_warnings(adapter(use_dora=True)))
    assert any("modules_to_save" in w for w in serving_warnings(adapter(modules_to_save=["lm_head"])))
    assert any("pattern" in w for w in serving_warnings(adapter(target_modules=".*proj")))


def test_merge_run_loads_the_base_once_and_folds_the_best_merge_into_it(fake_run, tiny_model_dir, tiny_tokenizer,
                                                                        tmp_path, monkeypatch):
    """The full checkpoint comes from the base already loaded for the evaluations (no second base in
    memory), and it computes what base + the best merged adapter computes."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    loads = []
    real = AutoModelForCausalLM.from_pretrained.__func__

    def counting(cls, *args, **kwargs):
        loads.append(args[0] if args else kwargs.get("pretrained_model_name_or_path"))
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(counting))
    report = merge_run(fake_run, ["linear", "cat"], eval_examples=2, out_dir=tmp_path)
    assert loads == [str(tiny_model_dir)]
    monkeypatch.undo()
    best = report["best"]["method"]
    assert report["full_model"]["from_adapter"] == str(tmp_path / "adapters" / best)
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "full_model").eval()
    ref = PeftModel.from_pretrained(load_base(str(tiny_model_dir), "fp32"), str(tmp_path / "adapters" / best)).eval()
    torch.testing.assert_close(_logits(full, tiny_tokenizer), _logits(ref, tiny_tokenizer), atol=1e-5, rtol=1e-5)
    with ref.disable_adapter():  # and the merge is in it: the base alone differs
        assert (_logits(ref, tiny_tokenizer) - _logits(full, tiny_tokenizer)).abs().max() > 1e-4


def test_device_map_defaults_to_auto_only_with_cuda(monkeypatch):
    from mtl_scale.model import resolve_device_map

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device_map() == "auto" and resolve_device_map("auto") == "auto"
    assert resolve_device_map("none") is None and resolve_device_map(None) is None
    assert resolve_device_map("cuda:1") == "cuda:1"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device_map("auto") is None


@pytest.mark.parametrize("script", ["launch/merge.py", "launch/evaluate.py"])
def test_launchers_default_to_device_map_auto(script, monkeypatch, tmp_path):
    """Both tools hand device_map="auto" to from_pretrained on a CUDA box unless told --no-device-map."""
    import runpy
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    root = Path(__file__).resolve().parent.parent
    help_text = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, cwd=root,
                               timeout=120).stdout
    assert "--no-device-map" in help_text and "default auto" in " ".join(help_text.split())

    class Loaded(Exception):
        pass

    def capture(cls, *args, **kwargs):
        raise Loaded(kwargs.get("device_map"))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(capture))
    cfg = RunConfig(tasks=[TaskConfig(name="copy", source="builtin:copy", num_examples=20, eval_size=2)],
                    output_dir=str(tmp_path))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    (tmp_path / "adapters" / "copy").mkdir(parents=True)
    (tmp_path / "adapters" / "copy" / "adapter_config.json").write_text("{}")
    args = [str(tmp_path)] if script.endswith("merge.py") else ["--config", str(tmp_path / "config.yaml")]
    for extra, expected in (([], "auto"), (["--no-device-map"], None)):
        monkeypatch.setattr(sys, "argv", [script, *args, *extra])
        with pytest.raises(Loaded) as e:
            runpy.run_path(str(root / script), run_name="__main__")
        assert e.value.args[0] == expected
