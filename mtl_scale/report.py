"""The end-of-run report: ``<output_dir>/report.md`` with PNG plots, built from metrics.jsonl.

    python -m mtl_scale.report runs/demo      # (re)build the report of a finished run

Plots: per-task train loss (smoothed) with held-out eval loss; each task's held-out metric over steps; the
realised sampling mix over time against the target probabilities; with adaptive sampling, the target
probabilities' trajectories beside the held-out loss, and a line naming the task the controller favoured
and when. Table: final per-task metrics.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def read_metrics(output_dir: str | Path) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _tasks(records: list[dict]) -> list[str]:
    """Task names in config order (the order the trainer writes sampling_prob/<task> keys)."""
    seen = [k.split("/", 1)[1] for k in (records[0] if records else {}) if k.startswith("sampling_prob/")]
    for r in records:
        for k in r:
            if k.startswith(("loss/", "mix/")) and k.split("/", 1)[1] not in seen:
                seen.append(k.split("/", 1)[1])
    return seen


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def _metrics(out: Path, tasks: list[str]) -> dict[str, str]:
    """Each task's metric name, from the run's config.yaml (exact_match for a run written before metrics)."""
    import yaml

    path = out / "config.yaml"
    cfg = yaml.safe_load(path.read_text()) if path.is_file() else {}
    named = {t.get("name"): t.get("metric", "exact_match") for t in (cfg or {}).get("tasks", [])}
    return {t: named.get(t, "exact_match") for t in tasks}


def _ema(values: list[float], alpha: float = 0.1) -> list[float]:
    out, acc = [], None
    for v in values:
        acc = v if acc is None else alpha * v + (1 - alpha) * acc
        out.append(acc)
    return out


def write_report(output_dir: str | Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(output_dir)
    records = read_metrics(out)
    tasks = _tasks(records)
    colors = {t: plt.cm.tab10(i % 10) for i, t in enumerate(tasks)}
    plots = out / "plots"
    plots.mkdir(exist_ok=True)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for t in tasks:
        steps, vals = _series(records, f"loss/{t}")
        if steps:
            ax.plot(steps, _ema(vals), color=colors[t], label=f"{t} train (EMA)")
        steps, vals = _series(records, f"eval/loss/{t}")
        if steps:
            ax.plot(steps, vals, "o--", color=colors[t], label=f"{t} eval")
    ax.set(xlabel="optimizer step", ylabel="completion-token loss", title="Per-task loss", yscale="log")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(plots / "loss.png", dpi=110)
    plt.close(fig)

    metric = _metrics(out, tasks)
    fig, ax = plt.subplots(figsize=(8, 4))
    for t in tasks:
        steps, vals = _series(records, f"eval/score/{t}")
        if steps:
            ax.plot(steps, [100 * v for v in vals], "o-", color=colors[t], label=f"{t} ({metric[t]})")
    ax.set(xlabel="optimizer step", ylabel="score (%)", title="Held-out score, in each task's metric",
           ylim=(-2, 102))
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(plots / "score.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4))
    steps = [r["step"] for r in records]
    mixes = [[r.get(f"mix/{t}", 0.0) for r in records] for t in tasks]
    if steps and tasks:
        ax.stackplot(steps, mixes, labels=[f"{t} (realised)" for t in tasks], colors=[colors[t] for t in tasks],
                     alpha=0.75)
        cumulative = 0.0
        for t in tasks:  # target probabilities as boundaries of the stack
            cumulative += records[-1].get(f"sampling_prob/{t}", 0.0)
            ax.axhline(cumulative, color="k", ls="--", lw=0.8)
    ax.set(xlabel="optimizer step", ylabel="share of micro-batches so far", ylim=(0, 1),
           title="Sampling mix (dashed: target cumulative probabilities)")
    if tasks:
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(plots / "sampling_mix.png", dpi=110)
    plt.close(fig)

    cosine_section = _cosine_heatmap(records, tasks, plots, plt)
    balancing_section = _balancing(records, tasks, colors, plots, plt)

    last = records[-1] if records else {}
    lines = ["# Run report", "", f"Run directory: `{out}` — {last.get('step', 0)} optimizer steps.", "",
             "## Final per-task metrics", "",
             "| task | target p | realised share | samples seen | train loss (last 10 steps) | eval loss | metric | "
             "eval score |",
             "|---|---:|---:|---:|---:|---:|---|---:|"]
    for t in tasks:
        recent = [r[f"loss/{t}"] for r in records[-10:] if isinstance(r.get(f"loss/{t}"), (int, float))]
        train = f"{sum(recent) / len(recent):.3f}" if recent else "-"
        ev_steps, ev_loss = _series(records, f"eval/loss/{t}")
        _, ev_score = _series(records, f"eval/score/{t}")
        lines.append(f"| {t} | {last.get(f'sampling_prob/{t}', 0):.3f} | {last.get(f'mix/{t}', 0):.3f} | "
                     f"{int(last.get(f'samples/{t}', 0))} | {train} | {f'{ev_loss[-1]:.3f}' if ev_loss else '-'} | "
                     f"{metric[t]} | {f'{100 * ev_score[-1]:.1f}%' if ev_score else '-'} |")
    lines += ["", "## Loss", "", "![per-task loss](plots/loss.png)", "",
              "## Held-out score", "", "![held-out score](plots/score.png)", "",
              "## Sampling mix", "", "![sampling mix](plots/sampling_mix.png)", "", *balancing_section,
              *cosine_section]
    path = out / "report.md"
    tmp = path.with_name("report.md.tmp")
    tmp.write_text("\n".join(lines))
    tmp.rename(path)
    return path


def favoured(records: list[dict], tasks: list[str]) -> str | None:
    """One line: the task whose target probability rose most above its first value, its peak and when; None
    when the targets never moved (a fixed sampling strategy)."""
    best = None
    for t in tasks:
        steps, p = _series(records, f"sampling_prob/{t}")
        if not p:
            continue
        peak = max(range(len(p)), key=lambda i: p[i])
        gain = p[peak] - p[0]
        if gain > 0 and (best is None or gain > best[0]):
            best = (gain, t, steps[0], p[0], steps[peak], p[peak], p[-1])
    if best is None:
        return None
    _, t, s0, p0, sp, pp, last = best
    return (f"The controller favoured **{t}** most: its target probability rose from {p0:.3f} at step {s0} to a "
            f"peak of {pp:.3f} at step {sp} ({last:.3f} at the end).")


def _balancing(records: list[dict], tasks: list[str], colors: dict, plots: Path, plt) -> list[str]:
    """Adaptive sampling: target probability per task over steps, beside the held-out loss (train-loss EMA
    where the run has no evaluation during training)."""
    line = favoured(records, tasks)
    if line is None:
        return []
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for t in tasks:
        steps, vals = _series(records, f"sampling_prob/{t}")
        left.plot(steps, vals, color=colors[t], label=t, drawstyle="steps-post")  # constant between updates
        steps, vals = _series(records, f"eval/loss/{t}")
        if len(steps) > 1:
            right.plot(steps, vals, "o-", color=colors[t], label=f"{t} eval")
        else:
            steps, vals = _series(records, f"loss/{t}")
            right.plot(steps, _ema(vals), color=colors[t], label=f"{t} train (EMA)")
    left.set(xlabel="optimizer step", ylabel="target probability", title="Adaptive sampling: target probabilities")
    right.set(xlabel="optimizer step", ylabel="completion-token loss", title="Per-task loss", yscale="log")
    for ax in (left, right):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(plots / "balancing.png", dpi=110)
    plt.close(fig)
    return ["## Adaptive balancing", "", line, "", "![target probabilities and loss](plots/balancing.png)", ""]


def _cosine_heatmap(records: list[dict], tasks: list[str], plots: Path, plt) -> list[str]:
    """Run-average cosine between task gradients (steps where both tasks were present), as a heatmap."""
    import numpy as np

    pairs: dict[tuple[str, str], list[float]] = {}
    for r in records:
        for k, v in r.items():
            if k.startswith("grad_cos/"):
                if isinstance(v, (int, float)):  # non-finite values are written as strings
                    a, b = k[len("grad_cos/"):].split("|")
                    pairs.setdefault((a, b), []).append(v)
    if not pairs:
        return []
    idx = {t: i for i, t in enumerate(tasks)}
    mat = np.full((len(tasks), len(tasks)), np.nan)
    np.fill_diagonal(mat, 1.0)
    for (a, b), vals in pairs.items():
        mat[idx[a], idx[b]] = mat[idx[b], idx[a]] = float(np.mean(vals))
    fig, ax = plt.subplots(figsize=(1.2 * len(tasks) + 2.5, 1.0 * len(tasks) + 2))
    im = ax.imshow(mat, cmap="RdBu", vmin=-1, vmax=1)
    ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right")
    ax.set_yticks(range(len(tasks)), tasks)
    for i in range(len(tasks)):
        for j in range(len(tasks)):
            if not np.isnan(mat[i, j]):
                ax.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="mean cosine")
    ax.set_title("Task-gradient cosine (shared adapter), run average")
    fig.tight_layout()
    fig.savefig(plots / "grad_cosine.png", dpi=110)
    plt.close(fig)
    conflict = [r["surgery/conflict_fraction"] for r in records
                if isinstance(r.get("surgery/conflict_fraction"), (int, float))]
    projections = sum(r.get("surgery/projections", 0) for r in records)
    return ["## Where tasks fight: gradient conflicts", "",
            f"Mean fraction of conflicting task pairs per step (cosine < 0): "
            f"{(sum(conflict) / len(conflict)) if conflict else 0:.2f}; PCGrad projections applied: {int(projections)}.",
            "", "![gradient cosine](plots/grad_cosine.png)", ""]


if __name__ == "__main__":
    print(write_report(sys.argv[1]))
