import json

import matplotlib.image as mpimg

from mtl_scale.report import write_report


def test_report_from_metrics(tmp_path):
    recs = []
    for step in range(1, 21):
        r = {"step": step, "loss": 1.0, "loss/copy": 3.0 / step, "sampling_prob/copy": 0.7,
             "sampling_prob/add": 0.3, "mix/copy": 0.7, "mix/add": 0.3, "samples/copy": 14 * step,
             "samples/add": 6 * step}
        if step % 2 == 0:
            r["loss/add"] = 2.0 if step != 20 else "nan"  # a skipped step: non-finite, written as a string
        if step % 10 == 0:
            r.update({"eval/loss/copy": 0.5, "eval/score/copy": step / 20, "eval/loss/add": 1.5,
                      "eval/score/add": 0.25})
        recs.append(r)
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    # each task's metric comes from the run's config
    (tmp_path / "config.yaml").write_text("tasks:\n  - {name: copy, metric: exact_match}\n  - {name: add, metric: extract}\n")
    report = write_report(tmp_path).read_text()
    assert "| copy | 0.700 | 0.700 | 280 | 0.201 | 0.500 | exact_match | 100.0% |" in report  # mean of 3/11..3/20
    assert "| add | 0.300 | 0.300 | 120 | 2.000 | 1.500 | extract | 25.0% |" in report
    assert report.index("| copy |") < report.index("| add |")  # config order
    for png in ("loss", "score", "sampling_mix"):
        assert f"plots/{png}.png" in report
        img = mpimg.imread(tmp_path / "plots" / f"{png}.png")
        assert img.shape[0] > 200 and img.shape[1] > 400
        assert img.std() > 0.01  # something was drawn
    assert not (tmp_path / "report.md.tmp").exists()
    assert "gradient conflicts" not in report and not (tmp_path / "plots" / "grad_cosine.png").exists()


def test_report_cosine_heatmap(tmp_path):
    recs = [{"step": 1, "loss/a": 1.0, "loss/b": 1.0, "grad_cos/a|b": -0.5, "surgery/conflict_fraction": 1.0,
             "surgery/projections": 2},
            {"step": 2, "loss/a": 1.0, "loss/b": 1.0, "grad_cos/a|b": 0.1, "surgery/conflict_fraction": 0.0,
             "surgery/projections": 0}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    report = write_report(tmp_path).read_text()
    assert "Mean fraction of conflicting task pairs per step (cosine < 0): 0.50; PCGrad projections applied: 2." in report
    img = mpimg.imread(tmp_path / "plots" / "grad_cosine.png")
    assert img.std() > 0.01


def test_report_adaptive_probability_trajectories(tmp_path):
    recs = []
    for step in range(1, 31):
        p_add = 0.25 + 0.01 * min(step, 20) - 0.005 * max(step - 20, 0)  # peaks at 0.45 at step 20
        r = {"step": step, "loss/copy": 1.0, "loss/add": 3.0 / step,
             "sampling_prob/copy": 1 - p_add, "sampling_prob/add": p_add}
        if step % 10 == 0:
            r.update({"eval/loss/copy": 1.0, "eval/loss/add": 4.0 / step})
        recs.append(r)
    recs[0]["sampling_prob/copy"], recs[0]["sampling_prob/add"] = 0.75, 0.25
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    report = write_report(tmp_path).read_text()
    assert ("The controller favoured **add** most: its target probability rose from 0.250 at step 1 to a peak of "
            "0.450 at step 20 (0.400 at the end).") in report
    img = mpimg.imread(tmp_path / "plots" / "balancing.png")
    assert img.shape[1] > 800 and img.std() > 0.01


def test_report_without_adaptive_sampling_has_no_balancing_section(tmp_path):
    recs = [{"step": s, "loss/a": 1.0, "sampling_prob/a": 0.5, "sampling_prob/b": 0.5} for s in range(1, 5)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    assert "Adaptive balancing" not in write_report(tmp_path).read_text()
    assert not (tmp_path / "plots" / "balancing.png").exists()
