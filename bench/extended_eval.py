"""Score the trained adapters of transfer-mix runs on fresh held-out examples: more of them than the
config holds out, so that a retention ratio between two variants is not mostly sampling noise.

    python -m bench.extended_eval runs/transfer-mix/soft runs/transfer-hard96/hard-sum-temp --rows 500 \
        --out runs/transfer-extended.json

Why: the transfer tasks hold out 100 examples each, and a task near 20% exact match (sort_numbers) then
has a standard error of 4 points per seed, so one seed's retention on it moves by about +-0.2. The task
generator (bench/transfer/make_tasks.py) draws from a fixed seed and never repeats a prompt, so its rows
after the first 1,200 (the committed files: training + held out) are new examples of the same
distributions, disjoint from anything a run trained or was scored on. Each run directory holds seed*/
subdirectories (bench.quality's layout) with config.yaml and adapters/; every seed's adapters are scored
(a soft run's task adapter on its task, a hard run's one adapter on every task) with the run's own
evaluation settings. Prints per-task exact match, mean +- std over the seeds, per variant.
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import statistics
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


@functools.cache
def generator():
    """bench/transfer/make_tasks.py, the transfer suite's task generator (a script, not a package module)."""
    spec = importlib.util.spec_from_file_location("make_tasks", HERE / "transfer" / "make_tasks.py")
    make_tasks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_tasks)
    return make_tasks


def fresh_rows(task: str, rows: int) -> list[dict]:
    """The generator's rows after the committed 1,200: never trained on, never held out."""
    make_tasks = generator()
    committed = make_tasks.ROWS
    out = make_tasks.build(task, committed + rows + 1)[committed:]
    with open(HERE / "transfer" / f"{task}.jsonl", encoding="utf-8") as f:
        seen = {json.loads(line)["prompt"] for line in f}
    if any(r["prompt"] in seen for r in out):
        raise SystemExit(f"{task}: fresh rows overlap the committed file; was make_tasks.py changed?")
    return out


def score(run_dir: Path, data: dict[str, Path], rows: int) -> dict[str, float]:
    """A run's adapters on the fresh rows: the run's config with each task's source and held-out size
    swapped, every other setting of the task and of the evaluation kept."""
    from dataclasses import replace

    from mtl_scale.config import load_config
    from mtl_scale.evaluate import evaluate_run

    cfg = load_config(run_dir / "config.yaml", [])
    missing = [t.name for t in cfg.tasks if t.name not in data]
    if missing:
        raise SystemExit(f"{run_dir}: no fresh rows for task(s) {missing}; the generator has {sorted(data)}")
    cfg = replace(cfg, tasks=[replace(t, source=str(data[t.name]), eval_size=rows) for t in cfg.tasks],
                  eval=replace(cfg.eval, max_examples=rows))
    results = evaluate_run(cfg, str(run_dir / "adapters"), include_base=False, device_map="none")
    return {t: r["score"] for per_task in results["adapters"].values() for t, r in per_task.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="variant directories holding seed*/ runs")
    parser.add_argument("--rows", type=int, default=500, help="fresh held-out examples per task")
    parser.add_argument("--out", type=Path, help="also write every seed's scores here (JSON)")
    args = parser.parse_args()
    from mtl_scale.config import load_config
    first = sorted(args.runs[0].glob("seed*"))
    if not first:
        raise SystemExit(f"{args.runs[0]}: no seed*/ run directories (bench.quality's layout)")
    names = [t.name for t in load_config(first[0] / "config.yaml", []).tasks]
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = {}
        for t in names:
            data[t] = Path(tmp) / f"{t}.jsonl"
            # one more row than held out: the loader keeps at least one for training (never used here)
            data[t].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in fresh_rows(t, args.rows)))
        for run in args.runs:
            out[str(run)] = {s.name: score(s, data, args.rows) for s in sorted(run.glob("seed*"))}
    print(f"exact match on {args.rows} fresh held-out examples per task (mean +- std over seeds)")
    print("| variant | " + " | ".join(names) + " | mean |")
    print("|---|" + "---:|" * (len(names) + 1))
    for run, seeds in out.items():
        cells = []
        for t in names + ["mean"]:
            vals = [100 * (statistics.mean(s.values()) if t == "mean" else s[t]) for s in seeds.values()]
            cells.append(f"{statistics.mean(vals):.1f} ± {statistics.stdev(vals) if len(vals) > 1 else 0:.1f}")
        print(f"| {run} | " + " | ".join(cells) + " |")
    if args.out:
        args.out.write_text(json.dumps({"rows": args.rows, "scores": out}, indent=1))


if __name__ == "__main__":
    main()
