"""Where does run B spend time that run A does not? Two cProfile files (python -m bench.throughput --profile),
the functions whose own time (tottime) or time with callees (cumtime) grew most from A to B, per B step.

    python -m bench.profile_diff runs/prof/ours-hard-0.prof runs/prof/ours-soft-0.prof --steps 35 [--top 30]
"""
import argparse
import pstats


def table(path: str) -> dict:
    stats = pstats.Stats(path).stats
    return {(f.split("site-packages/")[-1], line, fn): (calls, tottime, cumtime)
            for (f, line, fn), (_, calls, tottime, cumtime, _) in stats.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--steps", type=int, default=1, help="optimizer steps profiled (times are shown per step)")
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()
    a, b = table(args.a), table(args.b)
    rows = []
    for key in set(a) | set(b):
        (ca, ta, cua), (cb, tb, cub) = a.get(key, (0, 0.0, 0.0)), b.get(key, (0, 0.0, 0.0))
        rows.append((key, ca, cb, ta, tb, cua, cub))
    ms = 1000 / args.steps
    for title, i in (("own time (tottime)", 3), ("with callees (cumtime)", 5)):
        print(f"== {title}, ms per step: A -> B (+B-A), calls A -> B")
        for key, ca, cb, *t in sorted(rows, key=lambda r: r[i] - r[i + 1])[:args.top]:
            x, y = t[i - 3] * ms, t[i - 2] * ms
            print(f"{x:9.2f} -> {y:9.2f} ({y - x:+8.2f})  {ca:>8} -> {cb:>8}  {key[0][-60:]}:{key[1]} {key[2]}")


if __name__ == "__main__":
    main()
