"""The multi-task quality suite: every training variant on a suite built to show imbalance and conflict,
over several seeds, scored by per-task exact match on held-out examples.

    python -m bench.quality                                  # all variants, seeds 0 1 2
    python -m bench.quality --variants soft soft-merged --seeds 0
    python -m bench.quality --table-only                     # rebuild the tables from finished runs
    python -m bench.quality --variants hard-sum-temp adaptive-progress adaptive-gap hard-dwa-temp   # adaptive
    python -m bench.quality --config bench/configs/transfer.yaml --variants single --seeds 0 --out runs/transfer
    python -m bench.quality --variants soft-shareda-merged --coupling 0 0.01 0.1 1   # the coupling sweep

Each (variant, seed) is a real run of the product, ``deepspeed --num_gpus 2 launch/train.py --config
bench/configs/quality.yaml seed=S <the variant's overrides>``, under runs/quality/<variant>/seed<S>/;
its exact match is the trainer's end-of-run evaluation (every held-out example of every task, with
the adapter that task is served with). A merged variant (``<run variant>-merged``: ``soft-merged``,
``soft-shareda-merged``, ``hybrid-pcgrad-merged``) merges each seed's adapters of that variant with
mtl_scale.merge and reports the merge ``launch/merge.py`` picks: every method and scale, chosen on half of
each task's held-out examples, scored on the other half. The coupling sweep (``--coupling``) trains soft
shared-A runs at each ``soft.coupling`` strength, merges each, and tables own-adapter against merged score
per strength (``coupling.md``, ``coupling.png``: the Pareto plot). The gap-rule variants (``adaptive-gap``,
``soft-gap``, ``hybrid-pcgrad-gap``) steer toward the seed's single-task runs' final held-out losses
(``sampling.reference``), so they train or reuse the ``single`` runs first. The adaptive variants steer on
train losses only (``eval.every_steps: 0``): steering on held-out loss would let the scored examples shape
the training. Finished runs are reused, so an interrupted suite continues where it stopped.

Writes <out>/results.json (every run, the aggregates, gradient-cosine telemetry) and <out>/results.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import time
from pathlib import Path

from mtl_scale.process_group import LaunchTimeout, deepspeed_command, run_group

ROOT = Path(__file__).resolve().parent.parent
BASE_CONFIG = ROOT / "bench" / "configs" / "quality.yaml"

# variant -> overrides of the base config. The shared adapter's runs log task-gradient cosines
# (surgery.telemetry) so that every hard run can be analysed, not only the PCGrad ones.
VARIANTS = {
    "hard-sum-prop": ["sharing=hard", "surgery.method=sum", "surgery.telemetry=true",
                      "sampling.strategy=proportional"],
    "hard-sum-temp": ["sharing=hard", "surgery.method=sum", "surgery.telemetry=true",
                      "sampling.strategy=temperature"],
    "hard-pcgrad-temp": ["sharing=hard", "surgery.method=pcgrad", "sampling.strategy=temperature"],
    "soft": ["sharing=soft", "sampling.strategy=temperature"],
    "soft-shareda": ["sharing=soft", "sampling.strategy=temperature", "lora.shared_a=true"],
    "hybrid-pcgrad": ["sharing=hybrid", "surgery.method=pcgrad", "sampling.strategy=temperature"],
    # Adaptive balancing (docs/TRAINING.md), each against hard-sum-temp: the same run but for the one knob.
    "adaptive-progress": ["sharing=hard", "surgery.method=sum", "surgery.telemetry=true",
                          "sampling.strategy=adaptive", "sampling.adaptive.rule=progress"],
    "adaptive-gap": ["sharing=hard", "surgery.method=sum", "surgery.telemetry=true",
                     "sampling.strategy=adaptive", "sampling.adaptive.rule=gap"],  # + sampling.reference
    "hard-dwa-temp": ["sharing=hard", "surgery.method=sum", "surgery.telemetry=true",
                      "sampling.strategy=temperature", "loss.task_weighting=dwa"],
    # the gap rule on the sharings that give tasks their own capacity (soft, hybrid-pcgrad)
    "soft-gap": ["sharing=soft", "sampling.strategy=adaptive", "sampling.adaptive.rule=gap"],
    "hybrid-pcgrad-gap": ["sharing=hybrid", "surgery.method=pcgrad", "sampling.strategy=adaptive",
                          "sampling.adaptive.rule=gap"],
    # hybrid-pcgrad-gap without PCGrad, which the cosines say has nothing to remove here
    "hybrid-gap": ["sharing=hybrid", "surgery.method=sum", "sampling.strategy=adaptive", "sampling.adaptive.rule=gap"],
}
# "single": one run per task, alone, with one micro-batch per step (tasks_per_step=1) for the same
# number of steps, so the K single-task runs together cost what one multi-task run costs and each
# task sees as many examples as uniform sampling would give it. "<variant>-merged": that variant's runs,
# merged with launch/merge.py's choice.
MERGED = {f"{v}-merged": v for v in ("soft", "soft-shareda", "hybrid-pcgrad")}
ALL_VARIANTS = ["single", *VARIANTS, *MERGED]


@dataclasses.dataclass(frozen=True)
class Launch:
    """How the suite's runs are launched: the suite's base config, ranks per run, seconds per run, and whether
    to only read finished runs (--table-only)."""
    config: Path = BASE_CONFIG
    nprocs: int = 2
    timeout: float = 1800
    table_only: bool = False


def train(out: Path, overrides: list[str], launch: Launch) -> float:
    """One training run (reused if it finished before); returns its wall time in seconds."""
    wall = out / "wall_s.txt"
    if (out / "train_summary.json").is_file() and wall.is_file():
        return float(wall.read_text())
    shutil.rmtree(out, ignore_errors=True)  # a run that died half-way leaves nothing to mix in
    out.mkdir(parents=True)
    cmd = deepspeed_command(launch.nprocs, "launch/train.py", ["--config", str(launch.config), *overrides,
                                                             f"output_dir={out}"])
    print(f"  $ {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    with open(out / "train.log", "w") as log:
        try:
            code = run_group(cmd, launch.timeout, cwd=ROOT, log=log).returncode
        except LaunchTimeout:
            code = f"timeout after {launch.timeout:.0f}s"
    seconds = round(time.perf_counter() - t0, 1)  # as stored, so a --table-only rebuild gives the same numbers
    if code != 0 or not (out / "train_summary.json").is_file():
        tail = (out / "train.log").read_text()[-6000:]
        raise RuntimeError(f"run {out} failed ({code}):\n{tail}")
    wall.write_text(f"{seconds}\n")
    return seconds


def final_scores(out: Path) -> dict[str, float]:
    """Each task's held-out score at the end of a run, in the task's metric (exact match on the built-ins)."""
    final = json.loads((out / "train_summary.json").read_text())["final"]
    prefix = "eval/score/"
    return {k[len(prefix):]: v for k, v in final.items() if k.startswith(prefix)}


def merge_scores(run: Path, out: Path) -> tuple[dict[str, float], str, float]:
    """Merge a run's adapters (every method and scale), keep the best on validation; per-task score on the
    report examples, method, seconds."""
    report_path = out / "merge_report.json"
    if not report_path.is_file():
        from mtl_scale.merge import merge_run
        t0 = time.perf_counter()
        merge_run(run, ["auto"], full_model=None, out_dir=out)
        (out / "wall_s.txt").write_text(f"{time.perf_counter() - t0:.1f}\n")
    report = json.loads(report_path.read_text())
    best = report["best"]["method"]
    em = {t: r["score"] for t, r in report["merged"][best].items()}
    return em, best, float((out / "wall_s.txt").read_text())


def telemetry(out: Path) -> dict:
    """Per-run gradient-conflict summary from metrics.jsonl: mean cosine and share of steps with a
    negative cosine per task pair (over the steps holding both tasks), conflict fraction, projections."""
    pairs: dict[str, list[float]] = {}
    conflict, projections = [], []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        for k, v in m.items():
            if k.startswith("grad_cos/"):
                pairs.setdefault(k[len("grad_cos/"):], []).append(v)
        if "surgery/conflict_fraction" in m:
            conflict.append(m["surgery/conflict_fraction"])
        if "surgery/projections" in m:
            projections.append(m["surgery/projections"])
    if not pairs:
        return {}
    return {"pairs": {p: {"mean_cos": statistics.fmean(v), "negative_share": sum(c < 0 for c in v) / len(v),
                          "steps": len(v)} for p, v in pairs.items()},
            "conflict_fraction": statistics.fmean(conflict) if conflict else None,
            "projections_per_step": statistics.fmean(projections) if projections else None}


def summarize(per_seed: dict[int, dict[str, float]], tasks: list[str]) -> dict:
    """Across seeds: per-task mean and std of exact match, and of each seed's task mean and worst task.
    std is the sample standard deviation (0 for one seed)."""
    def stats(xs):
        return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0}
    seeds = sorted(per_seed)
    out = {"seeds": seeds, "tasks": {t: stats([per_seed[s][t] for s in seeds]) for t in tasks}}
    out["mean"] = stats([statistics.fmean(per_seed[s][t] for t in tasks) for s in seeds])
    out["worst"] = stats([min(per_seed[s][t] for t in tasks) for s in seeds])
    return out


def markdown(results: dict) -> str:
    tasks, sizes = results["tasks"], results["task_sizes"]
    head = "| variant | " + " | ".join(t if sizes[t] is None else f"{t} ({sizes[t]})" for t in tasks) + \
           " | mean | worst task | wall time / seed |"
    lines = [head, "|---|" + "---:|" * (len(tasks) + 3)]

    def cell(s):
        return f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}"
    for name, v in results["variants"].items():
        s = v["summary"]
        note = f" ({', '.join(sorted(set(v['merge_method'].values())))})" if "merge_method" in v else ""
        lines.append(f"| {name}{note} | " + " | ".join(cell(s["tasks"][t]) for t in tasks) +
                     f" | {cell(s['mean'])} | {cell(s['worst'])} | {statistics.fmean(v['wall_s'].values()):.0f} s |")
    lines += ["", "Exact match (%) on 100 held-out examples per task, mean ± sample std over seeds "
              f"{', '.join(map(str, results['seeds']))}; *worst task* is each seed's lowest task, averaged."]
    if any(name in MERGED for name in results["variants"]):
        lines += ["Merged variants (their chosen methods in brackets) are scored on the report half of those "
                  "examples; the other half chose each merge's method and scale."]
    cos = {n: v["telemetry"] for n, v in results["variants"].items() if v.get("telemetry")}
    if cos:
        pairs = sorted({p for t in cos.values() for p in t["pairs"]})
        lines += ["", "Task-gradient cosines on the shared adapter (mean over the steps holding both tasks, "
                  "all seeds; in brackets the share of those steps with a negative cosine):", "",
                  "| variant | " + " | ".join(p.replace("|", " / ") for p in pairs) +  # "|" would split the cell
                  " | conflicting pairs / step | projections / step |",
                  "|---|" + "---:|" * (len(pairs) + 2)]
        for name, t in cos.items():
            row = [f"{t['pairs'][p]['mean_cos']:+.3f} ({100 * t['pairs'][p]['negative_share']:.0f}%)"
                   if p in t["pairs"] else "-" for p in pairs]
            extra = [f"{100 * t['conflict_fraction']:.0f}%" if t["conflict_fraction"] is not None else "-",
                     f"{t['projections_per_step']:.2f}" if t["projections_per_step"] is not None else "-"]
            lines.append(f"| {name} | " + " | ".join(row + extra) + " |")
    return "\n".join(lines) + "\n"


def pooled_telemetry(runs: list[dict]) -> dict:
    """Telemetry of several seeds pooled, each pair's statistics weighted by its step count."""
    runs = [r for r in runs if r]
    if not runs:
        return {}
    pairs = {}
    for p in sorted({p for r in runs for p in r["pairs"]}):
        rs = [r["pairs"][p] for r in runs if p in r["pairs"]]
        n = sum(r["steps"] for r in rs)
        pairs[p] = {"mean_cos": sum(r["mean_cos"] * r["steps"] for r in rs) / n,
                    "negative_share": sum(r["negative_share"] * r["steps"] for r in rs) / n, "steps": n}

    def mean_of(key):
        xs = [r[key] for r in runs if r[key] is not None]
        return statistics.fmean(xs) if xs else None
    return {"pairs": pairs, "conflict_fraction": mean_of("conflict_fraction"),
            "projections_per_step": mean_of("projections_per_step")}


def run_suite(out_root: Path, variants: list[str], seeds: list[int], extra: list[str], launch: Launch) -> dict:
    from mtl_scale.config import load_config
    cfg = load_config(launch.config, extra)
    tasks = [t.name for t in cfg.tasks]
    # a single-task run gets its task as the suite resolved it, and the other overrides
    not_tasks = [item for item in extra if not item.split("=", 1)[0].split(".")[0] == "tasks"]
    results = {"tasks": tasks, "task_sizes": {t.name: t.num_examples for t in cfg.tasks}, "seeds": seeds,
               "config": str(launch.config), "extra_overrides": extra, "nprocs": launch.nprocs, "variants": {}}
    for variant in variants:
        per_seed, walls, tele, methods = {}, {}, [], {}
        for seed in seeds:
            if variant == "single":
                em, walls[seed] = {}, 0.0
                for run in single_runs(out_root, cfg, seed, not_tasks, launch):
                    walls[seed] += float((run / "wall_s.txt").read_text())
                    em.update(final_scores(run))
            elif variant in MERGED:
                source = out_root / MERGED[variant] / f"seed{seed}"
                _train_or_read(source, [f"seed={seed}", *extra, *VARIANTS[MERGED[variant]]], launch)
                em, methods[seed], walls[seed] = merge_scores(source, out_root / variant / f"seed{seed}")
            else:
                run = out_root / variant / f"seed{seed}"
                overrides = [f"seed={seed}", *extra, *VARIANTS[variant]]
                if "sampling.adaptive.rule=gap" in VARIANTS[variant]:
                    refs = single_runs(out_root, cfg, seed, not_tasks, launch)
                    overrides.append(f"sampling.reference=[{', '.join(str(r.resolve()) for r in refs)}]")
                walls[seed] = _train_or_read(run, overrides, launch)
                em = final_scores(run)
                tele.append(telemetry(run))
            per_seed[seed] = em
            print(f"{variant} seed {seed}: " + ", ".join(f"{t} {100 * em[t]:.0f}%" for t in tasks) +
                  f" ({walls[seed]:.0f} s)", flush=True)
        entry = {"exact_match": per_seed, "wall_s": walls, "summary": summarize(per_seed, tasks),
                 "telemetry": pooled_telemetry(tele)}
        if methods:
            entry["merge_method"] = methods
        results["variants"][variant] = entry
    out_root.mkdir(parents=True, exist_ok=True)
    for name, text in (("results.json", json.dumps(results, indent=2)), ("results.md", markdown(results))):
        tmp = out_root / (name + ".tmp")
        tmp.write_text(text)
        tmp.rename(out_root / name)
    return results


def coupling_sweep(out_root: Path, strengths: list[float], seeds: list[int], extra: list[str],
                   launch: Launch) -> dict:
    """Soft shared-A runs at each coupling strength, each merged: own-adapter vs merged score, both on the
    merge report's examples, per strength (mean over seeds and tasks; worst = lowest retention)."""
    rows = {}
    for strength in strengths:
        per_seed = []
        for seed in seeds:
            run = out_root / f"soft-shareda-c{strength:g}" / f"seed{seed}"
            _train_or_read(run, [f"seed={seed}", *extra, *VARIANTS["soft-shareda"], f"soft.coupling={strength}"],
                           launch)
            merge_scores(run, run.parent / f"merged-seed{seed}")
            report = json.loads((run.parent / f"merged-seed{seed}" / "merge_report.json").read_text())
            best = report["best"]["method"]
            per_seed.append({"own": statistics.fmean(r["score"] for r in report["own"].values()),
                             "merged": statistics.fmean(r["score"] for r in report["merged"][best].values()),
                             "worst_retention": report["best"]["worst_retention"], "method": best,
                             "scale": report["best"]["scale"]})
        row = rows[f"{strength:g}"] = {"seeds": per_seed, **{k: statistics.fmean(s[k] or 0.0 for s in per_seed)
                                                              for k in ("own", "merged", "worst_retention")}}
        print(f"coupling {strength:g}: own {100 * row['own']:.1f}%, merged {100 * row['merged']:.1f}%", flush=True)
    lines = ["| soft.coupling | own-adapter score | merged score | worst-task retention | merges (method x scale) |",
             "|---:|---:|---:|---:|---|"]
    for k, r in rows.items():
        merges = ", ".join(f"{s['method']} x{s['scale']:g}" for s in r["seeds"])
        lines.append(f"| {k} | {100 * r['own']:.1f}% | {100 * r['merged']:.1f}% | {r['worst_retention']:.2f} "
                     f"| {merges} |")
    out_root.mkdir(parents=True, exist_ok=True)
    (out_root / "coupling.json").write_text(json.dumps(rows, indent=2))
    (out_root / "coupling.md").write_text("\n".join(lines) + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot([100 * r["own"] for r in rows.values()], [100 * r["merged"] for r in rows.values()], "o-")
    for i, (k, r) in enumerate(rows.items()):  # alternate above / below: neighbouring strengths sit close
        ax.annotate(f"λ={k}", (100 * r["own"], 100 * r["merged"]), textcoords="offset points",
                    xytext=(4, 5 if i % 2 else -12), fontsize=8)
    top = 100 * max(r["own"] for r in rows.values())
    ax.plot([0, top], [0, top], ":", color="grey", label="merged = own")
    ax.plot([0, top], [0, 0.9 * top], "--", color="grey", label="merged = 0.9 own (the verdict's bar, on the mean)")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_xlabel("own-adapter score (%)")
    ax.set_ylabel("merged score (%)")
    ax.set_title("soft, shared A: coupling strength")
    fig.tight_layout()
    fig.savefig(out_root / "coupling.png", dpi=120)
    plt.close(fig)
    return rows


def single_runs(out_root: Path, cfg, seed: int, not_tasks: list[str], launch: Launch) -> list[Path]:
    """The seed's single-task runs (trained unless finished): one per task, alone, as the suite resolved it."""
    runs = []
    for task in cfg.tasks:
        one = json.dumps(dataclasses.asdict(task))
        run = out_root / f"single-{task.name}" / f"seed{seed}"
        _train_or_read(run, [f"seed={seed}", *not_tasks, f"tasks=[{one}]", "sharing=hard", "sampling.tasks_per_step=1"],
                       launch)
        runs.append(run)
    return runs


def _train_or_read(run: Path, overrides: list[str], launch: Launch) -> float:
    if launch.table_only:
        if not (run / "wall_s.txt").is_file():
            raise SystemExit(f"--table-only: {run} has not finished; run the suite without --table-only")
        return float((run / "wall_s.txt").read_text())
    return train(run, overrides, launch)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=BASE_CONFIG, help="the suite's base config "
                        "(default bench/configs/quality.yaml; bench/configs/transfer.yaml: the transfer suite)")
    parser.add_argument("--variants", nargs="+", default=ALL_VARIANTS, choices=ALL_VARIANTS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", default="runs/quality")
    parser.add_argument("--nprocs", type=int, default=2, help="ranks per run (deepspeed --num_gpus)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per training run")
    parser.add_argument("--table-only", action="store_true", help="only rebuild results from finished runs")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides for every run, e.g. max_steps=100 (tasks.<i>.<key> reach single runs too)")
    parser.add_argument("--coupling", nargs="+", type=float,
                        help="run the coupling sweep at these soft.coupling strengths (soft, lora.shared_a), "
                             "after the variants; e.g. 0 0.01 0.1 1")
    args = parser.parse_args()
    if any(item.startswith("seed=") or item.startswith("output_dir=") for item in args.set):
        raise SystemExit("--set: seed and output_dir are set by the suite (use --seeds and --out)")
    t0 = time.perf_counter()
    launch = Launch(args.config, args.nprocs, args.timeout, args.table_only)
    results = run_suite(Path(args.out), args.variants, args.seeds, args.set, launch)
    print()
    print(markdown(results))
    print(f"written: {args.out}/results.md, {args.out}/results.json ({time.perf_counter() - t0:.0f} s)")
    if args.coupling:
        coupling_sweep(Path(args.out), args.coupling, args.seeds, args.set, launch)
        print((Path(args.out) / "coupling.md").read_text())
        print(f"written: {args.out}/coupling.md, coupling.json, coupling.png")


if __name__ == "__main__":
    main()
