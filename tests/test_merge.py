"""Deployment outputs: merged adapters, retention report, full merged checkpoint."""
import json
import subprocess
import sys

import pytest
import torch
import yaml

from mtl_scale.config import RunConfig, TaskConfig, to_dict
from mtl_scale import merge
from mtl_scale.errors import UserError
from mtl_scale.merge import DELTA_METHODS, FACTOR_METHODS, add_merged_adapter, load_base, merge_run, \
    save_adapter_dir, save_full_model, serving_warnings, split_for_selection, verdict

TASKS = ["copy", "reverse"]


def _peft_with_adapters(model_dir, ranks, shared_a=False):
    """A PeftModel holding one adapter per name, every B random (a real update). ``shared_a``: every
    adapter gets the first one's A, as lora.shared_a trains them."""
    import peft

    from mtl_scale.adapters import share_a

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
    if shared_a:
        share_a(model, list(ranks))
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
    """auto: every ΔW method; the factor-wise ones are skipped, with the reason, for adapters of different A."""
    report = merge_run(fake_run, ["auto"], full_model=None, out_dir=tmp_path, scales=[1.0, 0.5])
    assert sorted(report["merged"]) == sorted(DELTA_METHODS)
    assert sorted(report["errors"]) == sorted(FACTOR_METHODS)
    assert all("lora.shared_a=true" in e for e in report["errors"].values())
    for method in DELTA_METHODS:
        assert (tmp_path / "adapters" / method / "adapter_model.safetensors").is_file()
        for t in TASKS:
            m = report["merged"][method][t]
            assert 0 <= m["score"] <= 1 and m["loss"] > 0
            own = report["own"][t]["score"]
            assert report["retention"][method][t] == (m["score"] / own if own else None)
            assert report["retention_se"][method][t] == merge.retention_se(m, report["own"][t])
    assert report["best"]["method"] in DELTA_METHODS
    best = report["retention"][report["best"]["method"]]
    worst = min((t for t in best if best[t] is not None), key=best.get, default=None)
    assert report["best"]["worst_retention_se"] == (report["retention_se"][report["best"]["method"]][worst]
                                                    if worst else None)
    assert "highest mean score retention on the validation examples" in report["best"]["why"]
    text = (tmp_path / "merge_report.md").read_text()
    assert "| copy |" in text and "retention" in text and "Serving checks" in text
    assert json.loads((tmp_path / "merge_report.json").read_text())["best"] == report["best"]


def test_eval_subset_and_only_this_runs_adapters(fake_run, tiny_model_dir, tmp_path):
    import shutil
    stale = fake_run / "adapters" / "shared"  # left by an earlier hard-sharing run in the same output_dir
    shutil.copytree(fake_run / "adapters" / "copy", stale)
    try:
        report = merge_run(fake_run, ["cat"], full_model=None, eval_examples=2, out_dir=tmp_path, scales=[1.0])
    finally:
        shutil.rmtree(stale)
    assert "shared" not in report["serving"] and report["own"]["copy"]["adapter"] == "copy"
    assert report["own"]["copy"]["n"] == 2 and report["merged"]["cat"]["reverse"]["n"] == 2


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
    add_merged_adapter(model, ["copy", "reverse"], "svd", [1.0, 1.0], "svd")  # default rank 16 holds the sum
    model.add_weighted_adapter(["copy", "reverse"], [1.0, 1.0], "lin", combination_type="linear")  # PEFT, unguarded
    for name in ("cat", "svd"):
        model.set_adapter(name)
        torch.testing.assert_close(_logits(model, tiny_tokenizer), both, atol=1e-4, rtol=1e-4)
    model.set_adapter("lin")  # combines A and B separately: cross terms B_copy·A_reverse appear
    assert (_logits(model, tiny_tokenizer) - both).abs().max() > 1e-4
    with pytest.raises(UserError, match=r"merge method linear combines A and B separately; adapters copy, reverse "
                                        r"have different A.*lora.shared_a=true"):
        add_merged_adapter(model, ["copy", "reverse"], "linear", [1.0, 1.0], "refused")


def test_global_scale_scales_the_summed_update(tiny_model_dir, tiny_tokenizer):
    """cat with weights s: base + s·(ΔW_copy + ΔW_reverse), checked against the same sum built by hand."""
    model = _peft_with_adapters(tiny_model_dir, {"copy": 8, "reverse": 8})
    add_merged_adapter(model, ["copy", "reverse"], "cat", [0.5, 0.5], "scaled")
    model.set_adapter("scaled")
    got = _logits(model, tiny_tokenizer)
    for n, p in model.named_parameters():  # halve both B: the applied pair is then exactly 0.5·(ΔW_1 + ΔW_2)
        if ".lora_B.copy." in n or ".lora_B.reverse." in n:
            p.data *= 0.5
    model.base_model.set_adapter(["copy", "reverse"])
    torch.testing.assert_close(got, _logits(model, tiny_tokenizer), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", FACTOR_METHODS)
def test_factor_methods_on_shared_a_merge_b_only(method, tiny_model_dir, tiny_tokenizer):
    """With one A, linear is exactly Σ w·ΔW (no cross terms, no √w); ties/dare keep A and act on B."""
    model = _peft_with_adapters(tiny_model_dir, {"copy": 8, "reverse": 8}, shared_a=True)
    model.base_model.set_adapter(["copy", "reverse"])
    both = _logits(model, tiny_tokenizer)
    add_merged_adapter(model, ["copy", "reverse"], method, [1.0, 1.0], "m", density=0.5)
    model.set_adapter("m")
    got = _logits(model, tiny_tokenizer)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(layer.lora_A["m"].weight, layer.lora_A["copy"].weight * layer.scaling["copy"])
    if method == "linear":
        torch.testing.assert_close(got, both, atol=1e-5, rtol=1e-5)
    else:  # pruning B changes the update, but the merge exists and differs from the base
        with model.disable_adapter():
            assert (_logits(model, tiny_tokenizer) - got).abs().max() > 1e-4


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
    report = merge_run(fake_run, ["linear", "cat"], eval_examples=2, out_dir=tmp_path, scales=[1.0])
    assert "lora.shared_a" in report["errors"]["linear"]
    assert loads == [str(tiny_model_dir)]
    monkeypatch.undo()
    best = report["best"]["method"]
    assert report["full_model"]["from_adapter"] == str(tmp_path / "adapters" / best)
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "full_model").eval()
    ref = PeftModel.from_pretrained(load_base(str(tiny_model_dir), "fp32"), str(tmp_path / "adapters" / best)).eval()
    # fp32 rounding of W + BA against W·x + B(A·x) on logits up to ~15: measured 0.8-1.4e-5 at most, varying
    # with the thread count (1e-5 failed one full-suite run); the merge itself moves the logits by ~5
    torch.testing.assert_close(_logits(full, tiny_tokenizer), _logits(ref, tiny_tokenizer), atol=1e-4, rtol=1e-4)
    with ref.disable_adapter():  # and the merge is in it: the base alone differs
        assert (_logits(ref, tiny_tokenizer) - _logits(full, tiny_tokenizer)).abs().max() > 1e-1


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


@pytest.fixture(scope="module")
def fake_hybrid_run(tiny_model_dir, tmp_path_factory):
    """A hybrid run as the trainer leaves it: adapters/shared (r 8) and adapters/<task> (task_r 4)."""
    run = tmp_path_factory.mktemp("hybrid_run")
    cfg = RunConfig(tasks=[TaskConfig(name=t, source=f"builtin:{t}", num_examples=20, eval_size=4) for t in TASKS],
                    sharing="hybrid", output_dir=str(run))
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    model = _peft_with_adapters(tiny_model_dir, {"shared": 8, **{t: 4 for t in TASKS}})
    for name in ("shared", *TASKS):
        save_adapter_dir(model, name, run / "adapters" / name, str(tiny_model_dir))
    return run


def _hybrid_reference(tiny_model_dir, run, tok):
    """What training computed for each task: base + shared + task adapter, both applied."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_base(str(tiny_model_dir), "fp32"), str(run / "adapters" / "shared"),
                                      adapter_name="shared")
    for t in TASKS:
        model.load_adapter(str(run / "adapters" / t), adapter_name=t)
    out = {}
    for t in TASKS:
        model.base_model.set_adapter(["shared", t])
        out[t] = _logits(model.eval(), tok)
    return out


def test_hybrid_run_merges_and_both_exports_match_shared_plus_task(fake_hybrid_run, tiny_model_dir, tiny_tokenizer,
                                                                   tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    report = merge_run(fake_hybrid_run, ["cat", "svd"], eval_examples=2, out_dir=tmp_path, scales=[1.0, 0.5])
    assert sorted(report["merged"]) == ["cat", "svd"] and not report["errors"]
    assert report["own"]["copy"]["adapter"] == "shared+copy"
    expected = _hybrid_reference(tiny_model_dir, fake_hybrid_run, tiny_tokenizer)
    # (a) the shared adapter folded into a full checkpoint that stock transformers loads, task adapters on top
    assert report["full_model"]["from_adapter"] == str(fake_hybrid_run / "adapters" / "shared")
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "full_model")
    for t in TASKS:
        cfg = json.loads((tmp_path / "hybrid" / "on_full" / t / "adapter_config.json").read_text())
        assert cfg["base_model_name_or_path"] == str(tmp_path / "full_model")
        assert cfg["r"] == 8 and serving_warnings(tmp_path / "hybrid" / "on_full" / t) == []  # 4 padded for vLLM
    on_full = PeftModel.from_pretrained(full, str(tmp_path / "hybrid" / "on_full" / "copy"), adapter_name="copy")
    on_full.load_adapter(str(tmp_path / "hybrid" / "on_full" / "reverse"), adapter_name="reverse")
    for t in TASKS:
        on_full.set_adapter(t)
        torch.testing.assert_close(_logits(on_full.eval(), tiny_tokenizer), expected[t], atol=1e-4, rtol=1e-4)
    # (b) cat(shared, task) on the untouched base: one adapter per request, rank 8 + 4 padded to vLLM's 16
    for t in TASKS:
        d = tmp_path / "hybrid" / "cat" / t
        assert json.loads((d / "adapter_config.json").read_text())["r"] == 16 and serving_warnings(d) == []
        cat = PeftModel.from_pretrained(load_base(str(tiny_model_dir), "fp32"), str(d)).eval()
        torch.testing.assert_close(_logits(cat, tiny_tokenizer), expected[t], atol=1e-4, rtol=1e-4)
    # the merged adapter holds the shared adapter whole plus the scaled task merge; the verdict names all options
    v = report["verdict"]
    assert set(v["options"]) == {"merged", "single", "bundle"} and v["ship"] in v["options"]
    known = [r for r in report["shared_only_retention"].values() if r is not None]
    assert v["options"]["single"]["worst_retention"] == (min(known) if known else None)
    assert "--enable-lora --max-loras 2 --max-lora-rank 8" in v["options"]["bundle"]["serve"]
    # the serving checks are of the exports a server loads (the run's own task adapters are r=4, refused)
    assert report["serving"] == {f"{k}/{t}": [] for k in ("on_full", "cat") for t in TASKS}
    assert str(tmp_path / "full_model") in v["options"]["bundle"]["serve"]
    text = (tmp_path / "merge_report.md").read_text()
    assert "## Verdict" in text and "Hybrid exports" in text


def test_selection_split_is_disjoint_from_the_report_examples(fake_run, tiny_tokenizer):
    from mtl_scale.config import load_config
    from mtl_scale.data.prepare import prepare_tasks

    tasks = prepare_tasks(load_config(fake_run / "config.yaml"), tiny_tokenizer)
    val, rep = split_for_selection(tasks, val_examples=None, eval_examples=None)
    for t in TASKS:
        assert len(val[t].held_out) == 3 and len(rep[t].held_out) == 3  # eval_size 6: half each
        seen = {tuple(x) for x in val[t].held_out.input_ids}
        assert not seen & {tuple(x) for x in rep[t].held_out.input_ids}
        assert seen | {tuple(x) for x in rep[t].held_out.input_ids} == {tuple(x) for x in tasks[t].held_out.input_ids}
        whole = tasks[t].held_out
        for part, rows in ((val[t].held_out, slice(3, 6)), (rep[t].held_out, slice(0, 3))):
            # every per-example field is cut alike: metric=choice reads prompt_texts, generation the overlaps
            for name in ("input_ids", "labels", "prompt_lens", "references", "prompt_texts", "overlaps"):
                assert getattr(part, name) == getattr(whole, name)[rows], name
    val, rep = split_for_selection(tasks, val_examples=2, eval_examples=1)
    assert len(val["copy"].held_out) == 2 and len(rep["copy"].held_out) == 1
    with pytest.raises(UserError, match=r"task 'copy' has 6 held-out examples; choosing a merge on 6 of them"):
        split_for_selection(tasks, val_examples=6)


def test_the_scale_is_chosen_on_validation(fake_run, tmp_path, monkeypatch):
    """Every scale is scored on the validation examples only, and the one kept is the best there."""
    import mtl_scale.merge as merge

    seen = []
    real = merge.evaluate_model

    def recording(model, tok, tasks, cfg, only=None):
        seen.append({t: tuple(map(tuple, d.held_out.input_ids)) for t, d in tasks.items()})
        return real(model, tok, tasks, cfg, only=only)

    monkeypatch.setattr(merge, "evaluate_model", recording)
    report = merge_run(fake_run, ["cat"], full_model=None, out_dir=tmp_path, scales=[1.0, 0.25])
    tried = report["validation"]["cat"]["tried"]
    assert sorted(tried) == ["0.25", "1"]
    best = max(tried.values(), key=merge._rank_key)
    assert report["validation"]["cat"]["scale"] == best["scale"] == report["best"]["scale"]
    assert report["split"] == {"validation": {"copy": 3, "reverse": 3}, "report": {"copy": 3, "reverse": 3}}
    # two kinds of example sets were evaluated, and they never overlap
    kinds = {frozenset(s["copy"]) for s in seen if "copy" in s}
    assert len(kinds) == 2 and not set.intersection(*map(set, kinds))


def _adapter_dir(root, name, r):
    d = root / name
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text(json.dumps({"r": r, "target_modules": ["q_proj"]}))
    return d


@pytest.mark.parametrize("merged,single,ship", [(0.95, 0.5, "merged"), (0.8, 0.92, "single"), (0.8, 0.5, "bundle")])
def test_verdict_ships_the_first_option_reaching_090(merged, single, ship, tmp_path):
    for t in TASKS:
        _adapter_dir(tmp_path / "adapters", t, 4)
    cfg = RunConfig(tasks=[TaskConfig(name=t, source=f"builtin:{t}") for t in TASKS], sharing="hybrid")
    report = {"best": {"method": "cat", "scale": 1.0, "worst_retention": merged},
              "shared_only_retention": {"copy": single, "reverse": 1.0},
              "hybrid_exports": {"on_full": {t: str(tmp_path / "adapters" / t) for t in TASKS}}}
    v = verdict(report, cfg, ["shared", *TASKS], tmp_path / "adapters", tmp_path / "out", "base")
    assert v["ship"] == ship
    assert [v["options"][k]["worst_retention"] for k in ("merged", "single", "bundle")] == [merged, single, 1.0]
    assert v["options"]["bundle"]["serve"].startswith(
        f"vllm serve {tmp_path / 'out' / 'full_model'} --enable-lora --max-loras 2 --max-lora-rank 8 --lora-modules copy=")


@pytest.mark.dist
def test_shared_a_soft_run_with_coupling_trains_b_only_and_merges_exactly(tmp_path, tiny_model_dir, tiny_tokenizer):
    """Real ZeRO-3 on 2 CPU ranks, sharing=soft with lora.shared_a and soft.coupling: the saved task adapters
    hold the one seeded A untouched and trained B, stock PEFT loads them, and the factor-wise linear merge
    (allowed: one A) is exactly the sum of both updates."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from dist import launch
    from mtl_scale import adapters
    from mtl_scale.config import LoraConfig, ModelConfig
    from mtl_scale.model import load_model

    cfg = tmp_path / "run.yaml"
    cfg.write_text("tasks:\n" + "".join(f"  - {{name: {t}, source: 'builtin:{t}', num_examples: 24, eval_size: 4}}\n"
                                        for t in TASKS) +
                   f"sharing: soft\nlora: {{r: 8, shared_a: true}}\nsoft: {{coupling: 0.1}}\nmax_steps: 3\n"
                   f"micro_batch_size: 4\nlr: 1.0e-2\nsampling: {{strategy: uniform, tasks_per_step: 2}}\n"
                   f"eval: {{max_examples: 2}}\noutput_dir: {tmp_path / 'out'}\n")
    launch("launch/train.py", ["--config", str(cfg)], timeout=900)
    out = tmp_path / "out"
    states = {t: load_file(out / "adapters" / t / "adapter_model.safetensors") for t in TASKS}
    init = adapters.attach_adapters(load_model(ModelConfig(), str(tiny_model_dir)),
                                    LoraConfig(r=8, shared_a=True), list(TASKS), seed=0)
    init_a = {k: v for k, v in adapters.gathered_adapter_state(init, "copy").items() if ".lora_A." in k}
    for key, a in init_a.items():
        assert torch.equal(states["copy"][key], a) and torch.equal(states["reverse"][key], a), key
    b_keys = [k for k in states["copy"] if ".lora_B." in k]
    assert all(states[t][k].abs().sum() > 0 for t in TASKS for k in b_keys)  # B trained (it starts at 0)

    model = PeftModel.from_pretrained(load_base(str(tiny_model_dir), "fp32"), str(out / "adapters" / "copy"),
                                      adapter_name="copy")
    model.load_adapter(str(out / "adapters" / "reverse"), adapter_name="reverse")
    model.base_model.set_adapter(["copy", "reverse"])
    both = _logits(model.eval(), tiny_tokenizer)
    add_merged_adapter(model, list(TASKS), "linear", [1.0, 1.0], "merged")
    model.set_adapter("merged")
    torch.testing.assert_close(_logits(model, tiny_tokenizer), both, atol=1e-5, rtol=1e-5)


def test_merge_interference_ratio_on_hand_values(tmp_path):
    """bench.merge_interference: the other tasks' update on a task's inputs, relative to its own."""
    from safetensors.torch import save_file
    from bench.merge_interference import adapter_deltas, interference_ratio
    own, other = torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [0.0, 2.0]])
    assert interference_ratio(torch.eye(2), own, [other]) == pytest.approx(2.0)  # inputs on both directions
    assert interference_ratio(torch.tensor([[3.0, 0.0]]), own, [other]) == 0.0  # inputs only where own acts
    assert interference_ratio(torch.eye(2), own, [other, other]) == pytest.approx(4.0)  # the others add
    a, b = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0], [4.0]])
    save_file({"base_model.model.model.layers.0.mlp.down_proj.lora_A.weight": a,
               "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight": b}, tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 1, "lora_alpha": 2}))
    deltas = adapter_deltas(tmp_path)
    assert list(deltas) == ["model.layers.0.mlp.down_proj"]
    torch.testing.assert_close(deltas["model.layers.0.mlp.down_proj"], torch.tensor([[6.0, 12.0], [8.0, 16.0]]))


def test_retention_standard_error_on_hand_values():
    """Delta method, Bernoulli-bounded variances with p = (hits + 1) / (n + 2): merged 0.5 and own 0.8 on 100
    examples each give var = 0.25 / 100 / 0.64 + 0.25 * (81/102 * 21/102) / 100 / 0.4096."""
    se = merge.retention_se({"score": 0.5, "n": 100}, {"score": 0.8, "n": 100})
    assert se == pytest.approx((0.0025 / 0.64 + 0.25 * (81 / 102 * 21 / 102) / 100 / 0.4096) ** 0.5)
    assert merge.retention_se({"score": 0.0, "n": 50}, {"score": 0.0, "n": 50}) is None  # no retention either
    # a score of 0 or 1 on few examples is not certain: 0 of 50 against 1 of 50 is far from a sure 0.00
    assert merge.retention_se({"score": 0.0, "n": 50}, {"score": 0.02, "n": 50}) == pytest.approx(
        (1 / 52 * 51 / 52 / 50) ** 0.5 / 0.02)
    assert merge.retention_se({"score": 1.0, "n": 50}, {"score": 1.0, "n": 50}) == pytest.approx(
        (2 * 51 / 52 * 1 / 52 / 50) ** 0.5)
    assert merge.near_target({"a": 0.95, "b": 0.92, "c": 0.5, "d": None}, {"a": 0.01, "b": 0.1, "c": 0.1},
                             0.9) == ["b"]


def test_verdict_states_the_noise_and_flags_a_call_within_it(tmp_path):
    """The worst task's retention carries its standard error into the verdict, and every task within two
    standard errors of the bar is named (above it or below)."""
    for t in TASKS:
        _adapter_dir(tmp_path / "adapters", t, 4)
    cfg = RunConfig(tasks=[TaskConfig(name=t, source=f"builtin:{t}") for t in TASKS], sharing="hybrid")
    report = {"best": {"method": "cat", "scale": 1.0, "worst_retention": 0.85, "worst_retention_se": 0.04},
              "retention": {"cat": {"copy": 0.85, "reverse": 0.97}},
              "retention_se": {"cat": {"copy": 0.04, "reverse": 0.05}},
              "shared_only_retention": {"copy": 0.3, "reverse": 1.0},
              "shared_only_retention_se": {"copy": 0.01, "reverse": 0.2},
              "hybrid_exports": {"on_full": {t: str(tmp_path / "adapters" / t) for t in TASKS}}}
    v = verdict(report, cfg, ["shared", *TASKS], tmp_path / "adapters", tmp_path / "out", "base")
    assert v["ship"] == "bundle" and v["options"]["single"]["worst_retention_se"] == 0.01  # copy's, the worst
    lines = merge.verdict_lines(v)
    merged = lines.index(next(line for line in lines if line.startswith("- merged:")))
    assert "worst-task retention 0.85 ± 0.04 (one standard error)" in lines[merged]
    assert lines[merged + 1].startswith("  - within two standard errors of the 0.90 bar on copy, reverse:")
    single = lines.index(next(line for line in lines if line.startswith("- single:")))
    assert "0.30 ± 0.01" in lines[single]  # copy: far below; reverse (1.0 ± 0.2) could fall below the bar
    assert lines[single + 1].startswith("  - within two standard errors of the 0.90 bar on reverse:")
    assert "worst-task retention 1.00;" in next(line for line in lines if line.startswith("- bundle:"))
