"""bench/quality.py: the aggregation against hand-computed values, and one real (tiny) suite run whose
table must hold exactly what its runs and merge report measured."""
import json
import math
import sys
from pathlib import Path

import pytest

from bench import quality

ROOT = Path(__file__).resolve().parent.parent


def test_summary_is_mean_and_sample_std_over_seeds():
    s = quality.summarize({0: {"a": 0.5, "b": 1.0}, 1: {"a": 0.7, "b": 0.9}}, ["a", "b"])
    assert s["seeds"] == [0, 1]
    assert s["tasks"]["a"]["mean"] == pytest.approx(0.6)
    assert s["tasks"]["a"]["std"] == pytest.approx(math.sqrt(0.02))  # ((0.1² + 0.1²) / (2 - 1)) ** 0.5
    assert s["mean"]["mean"] == pytest.approx((0.75 + 0.8) / 2)     # each seed's task mean, averaged
    assert s["worst"]["mean"] == pytest.approx(0.6)                  # worst tasks: a (0.5) and a (0.7)
    assert quality.summarize({3: {"a": 0.4}}, ["a"])["tasks"]["a"] == {"mean": 0.4, "std": 0.0}


def test_telemetry_reads_cosines_conflicts_and_projections(tmp_path):
    lines = [{"step": 1, "grad_cos/a|b": -0.5, "grad_cos/a|c": 0.2, "surgery/conflict_fraction": 0.5,
              "surgery/projections": 2.0},
             {"step": 2, "grad_cos/a|b": 0.1, "surgery/conflict_fraction": 0.0, "surgery/projections": 0.0},
             {"step": 3, "loss": 1.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    t = quality.telemetry(tmp_path)
    assert t["pairs"]["a|b"] == {"mean_cos": pytest.approx(-0.2), "negative_share": 0.5, "steps": 2}
    assert t["pairs"]["a|c"] == {"mean_cos": pytest.approx(0.2), "negative_share": 0.0, "steps": 1}
    assert t["conflict_fraction"] == pytest.approx(0.25) and t["projections_per_step"] == pytest.approx(1.0)
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    assert quality.telemetry(tmp_path) == {}


def test_pooled_telemetry_weights_seeds_by_their_steps():
    one = {"pairs": {"a|b": {"mean_cos": -0.4, "negative_share": 1.0, "steps": 1}},
           "conflict_fraction": 1.0, "projections_per_step": None}
    three = {"pairs": {"a|b": {"mean_cos": 0.4, "negative_share": 0.0, "steps": 3}},
             "conflict_fraction": 0.0, "projections_per_step": None}
    pooled = quality.pooled_telemetry([one, three, {}])
    assert pooled["pairs"]["a|b"] == {"mean_cos": pytest.approx(0.2), "negative_share": 0.25, "steps": 4}
    assert pooled["conflict_fraction"] == 0.5 and pooled["projections_per_step"] is None


def test_markdown_table_rows_and_pair_headers():
    results = {"tasks": ["a", "b"], "task_sizes": {"a": 10, "b": 1}, "seeds": [0, 1], "variants": {
        "soft": {"summary": quality.summarize({0: {"a": 0.5, "b": 1.0}, 1: {"a": 0.7, "b": 0.9}}, ["a", "b"]),
                 "wall_s": {0: 10.0, 1: 20.0},
                 "telemetry": {"pairs": {"a|b": {"mean_cos": -0.25, "negative_share": 0.5, "steps": 4}},
                               "conflict_fraction": 0.5, "projections_per_step": 1.5}}}}
    text = quality.markdown(results)
    assert "| variant | a (10) | b (1) | mean | worst task | wall time / seed |" in text
    assert "| soft | 60.0 ± 14.1 | 95.0 ± 7.1 | 77.5 ± 3.5 | 60.0 ± 14.1 | 15 s |" in text
    assert "| variant | a / b | conflicting pairs / step | projections / step |" in text  # no stray "|"
    assert "| soft | -0.250 (50%) | 50% | 1.50 |" in text


@pytest.mark.dist
def test_a_tiny_suite_reports_what_its_runs_measured(tmp_path, tiny_model_dir):
    import subprocess
    tasks = ("tasks=[{name: copy, source: 'builtin:copy', num_examples: 40, eval_size: 4}, "
             "{name: reverse, source: 'builtin:reverse', num_examples: 40, eval_size: 4}]")
    cmd = [sys.executable, "-m", "bench.quality", "--variants", "single", "soft", "soft-merged", "--seeds", "0",
           "--out", str(tmp_path), "--timeout", "300", "--set", tasks, "max_steps=2", "micro_batch_size=4",
           "sampling.tasks_per_step=2", "eval.max_examples=4"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-5000:] + res.stderr[-5000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results["variants"]) == ["single", "soft", "soft-merged"]
    assert results["tasks"] == ["copy", "reverse"]
    for task in ("copy", "reverse"):  # the single-task row is made of each task's own run
        summary = json.loads((tmp_path / f"single-{task}" / "seed0" / "train_summary.json").read_text())
        assert summary["adapters"] == ["shared"] and summary["data"].keys() == {task}
        assert results["variants"]["single"]["exact_match"]["0"][task] == summary["final"][f"eval/score/{task}"]
    soft = json.loads((tmp_path / "soft" / "seed0" / "train_summary.json").read_text())
    assert soft["adapters"] == ["copy", "reverse"]
    report = json.loads((tmp_path / "soft-merged" / "seed0" / "merge_report.json").read_text())
    best = report["best"]["method"]
    assert results["variants"]["soft-merged"]["merge_method"] == {"0": best}
    assert results["variants"]["soft-merged"]["exact_match"]["0"] == {
        t: report["merged"][best][t]["score"] for t in ("copy", "reverse")}
    assert "| soft-merged (" + best + ") |" in (tmp_path / "results.md").read_text()
    # finished runs are reused: rebuilding the table runs nothing and gives the same results
    before = (tmp_path / "results.json").read_text()
    res = subprocess.run([*cmd, "--table-only"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "$ " not in res.stdout, res.stdout[-3000:]
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(before)


@pytest.mark.dist
def test_adaptive_variants_run_and_gap_reads_the_single_runs(tmp_path, tiny_model_dir):
    """adaptive-gap trains the seed's single-task runs first and steers toward their final held-out losses."""
    import subprocess
    tasks = ("tasks=[{name: copy, source: 'builtin:copy', num_examples: 40, eval_size: 4}, "
             "{name: reverse, source: 'builtin:reverse', num_examples: 40, eval_size: 4}]")
    cmd = [sys.executable, "-m", "bench.quality", "--variants", "adaptive-gap", "hard-dwa-temp", "--seeds", "0",
           "--out", str(tmp_path), "--timeout", "300", "--set", tasks, "max_steps=3", "micro_batch_size=4",
           "sampling.tasks_per_step=2", "eval.max_examples=4", "eval.max_new_tokens=2",
           "sampling.adaptive.every_steps=1"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-5000:] + res.stderr[-5000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results["variants"]) == ["adaptive-gap", "hard-dwa-temp"]
    import yaml
    gap_cfg = yaml.safe_load((tmp_path / "adaptive-gap" / "seed0" / "config.yaml").read_text())
    assert gap_cfg["sampling"]["strategy"] == "adaptive" and gap_cfg["sampling"]["adaptive"]["rule"] == "gap"
    assert gap_cfg["sampling"]["reference"] == [str((tmp_path / f"single-{t}" / "seed0").resolve())
                                                for t in ("copy", "reverse")]
    records = [json.loads(line) for line in (tmp_path / "adaptive-gap" / "seed0" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["sampling_prob/copy"] != records[-1]["sampling_prob/copy"]  # the controller moved p
    dwa = [json.loads(line) for line in (tmp_path / "hard-dwa-temp" / "seed0" / "metrics.jsonl").read_text().splitlines()]
    assert all("loss_weight/copy" in r for r in dwa)


def test_coupling_sweep_tables_own_against_merged_score(tmp_path):
    """--coupling: per strength, own-adapter and merged score from each seed's merge report (mean over seeds
    and tasks), the chosen merges, and the Pareto plot; finished runs are only read (--table-only)."""
    for strength, own, merged in (("0", 0.8, 0.2), ("0.1", 0.6, 0.5)):
        for seed in (0, 1):
            run = tmp_path / f"soft-shareda-c{strength}" / f"seed{seed}"
            run.mkdir(parents=True)
            (run / "wall_s.txt").write_text("1.0\n")
            merge = run.parent / f"merged-seed{seed}"
            merge.mkdir()
            (merge / "wall_s.txt").write_text("2.0\n")
            report = {"own": {"a": {"score": own}, "b": {"score": own + 0.1 * seed}},
                      "merged": {"linear": {"a": {"score": merged}, "b": {"score": merged}}},
                      "best": {"method": "linear", "scale": 0.5 + 0.5 * seed, "worst_retention": merged / own}}
            (merge / "merge_report.json").write_text(json.dumps(report))
    rows = quality.coupling_sweep(tmp_path, [0.0, 0.1], [0, 1], [], quality.Launch(table_only=True))
    assert rows["0"]["own"] == pytest.approx((0.8 + 0.85) / 2) and rows["0"]["merged"] == pytest.approx(0.2)
    assert rows["0.1"]["worst_retention"] == pytest.approx(0.5 / 0.6)
    text = (tmp_path / "coupling.md").read_text()
    assert "| 0.1 | 62.5% | 50.0% | 0.83 | linear x0.5, linear x1 |" in text
    assert (tmp_path / "coupling.png").stat().st_size > 0


def test_extended_eval_draws_fresh_examples_disjoint_from_the_committed_files():
    """bench/extended_eval.py scores on the task generator's rows after the committed 1,200: the committed
    file is exactly the generator's first 1,200 rows, so the later ones were never trained on or held out."""
    from bench import extended_eval
    committed = (ROOT / "bench/transfer/sort_numbers.jsonl").read_text(encoding="utf-8").splitlines()
    rows = extended_eval.fresh_rows("sort_numbers", 5)
    assert len(rows) == 6 and rows == extended_eval.fresh_rows("sort_numbers", 5)
    assert not {json.loads(line)["prompt"] for line in committed} & {r["prompt"] for r in rows}
    assert [json.loads(line) for line in committed] == extended_eval.generator().build("sort_numbers")
