import math
from collections import Counter

import pytest

from mtl_scale.config import SamplingConfig
from mtl_scale.sampling import TaskSampler, rank_shard, step_plan, task_probabilities

SIZES = {"big": 900, "mid": 90, "small": 10}


def test_probability_formulas():
    p = task_probabilities(SIZES, SamplingConfig(strategy="proportional"))
    assert p == pytest.approx({"big": 0.9, "mid": 0.09, "small": 0.01})
    p = task_probabilities(SIZES, SamplingConfig(strategy="temperature", temperature=2.0))
    z = 30 + math.sqrt(90) + math.sqrt(10)
    assert p == pytest.approx({"big": 30 / z, "mid": math.sqrt(90) / z, "small": math.sqrt(10) / z})
    assert task_probabilities(SIZES, SamplingConfig(strategy="temperature", temperature=1.0)) == \
        pytest.approx(task_probabilities(SIZES, SamplingConfig(strategy="proportional")))
    assert task_probabilities(SIZES, SamplingConfig(strategy="uniform")) == pytest.approx({t: 1 / 3 for t in SIZES})
    p = task_probabilities(SIZES, SamplingConfig(strategy="manual", weights={"big": 1, "mid": 1, "small": 2}))
    assert p == pytest.approx({"big": 0.25, "mid": 0.25, "small": 0.5})


def test_plan_groups_tasks_and_has_fixed_length():
    cfg = SamplingConfig(tasks_per_step=5, micro_batches_per_task=2)
    probs = task_probabilities(SIZES, SamplingConfig(strategy="uniform"))
    for step in range(50):
        plan = step_plan(step, probs, cfg, seed=0)
        assert sum(n for _, n in plan) == 10
        assert len({t for t, _ in plan}) == len(plan)  # each task once: its micro-batches are contiguous


def test_schedule_identical_across_ranks_and_depends_on_seed():
    cfg = SamplingConfig(strategy="uniform", tasks_per_step=3)
    samplers = [TaskSampler(SIZES, cfg, seed=7, rank=r, world=4) for r in range(4)]
    for step in range(100):
        plans = [s.plan(step) for s in samplers]
        assert all(p == plans[0] for p in plans)
    other = TaskSampler(SIZES, cfg, seed=8, rank=0, world=4)
    assert [other.plan(s) for s in range(100)] != [samplers[0].plan(s) for s in range(100)]


def test_empirical_frequencies_match_target():
    cfg = SamplingConfig(strategy="temperature", temperature=2.0, tasks_per_step=4)
    probs = task_probabilities(SIZES, cfg)
    counts, n = Counter(), 0
    for step in range(5000):
        for task, k in step_plan(step, probs, cfg, seed=3):
            counts[task] += k
            n += k
    for task, p in probs.items():
        # 5 standard deviations of a binomial proportion
        assert abs(counts[task] / n - p) < 5 * math.sqrt(p * (1 - p) / n), (task, counts[task] / n, p)


def test_shards_disjoint_and_cover():
    for n, world in [(10, 2), (11, 2), (7, 4), (100, 8)]:
        shards = [rank_shard(n, r, world) for r in range(world)]
        assert sorted(i for s in shards for i in s) == list(range(n))
    # smaller than the world: every rank still gets an example
    assert [rank_shard(1, r, 2) for r in range(2)] == [[0], [0]]


def test_reader_wraps_into_reshuffled_epochs():
    s = TaskSampler({"t": 3}, SamplingConfig(), seed=0, rank=0, world=2)  # shard of 2 examples
    draws = s.take("t", 2 * 20)
    epochs = [tuple(draws[i:i + 2]) for i in range(0, len(draws), 2)]
    assert all(sorted(e) == [0, 2] for e in epochs)
    assert len(set(epochs)) == 2  # both orders occur: each epoch is reshuffled


def test_resumed_sampler_reproduces_uninterrupted_draws():
    cfg = SamplingConfig(strategy="temperature", temperature=3.0, tasks_per_step=3)
    full = TaskSampler(SIZES, cfg, seed=1, rank=1, world=2)
    first = TaskSampler(SIZES, cfg, seed=1, rank=1, world=2)

    def run(sampler, steps):
        return [(t, sampler.take(t, 4)) for s in steps for t, k in sampler.plan(s) for _ in range(k)]
    expected = run(full, range(40))
    got = run(first, range(25))
    state = first.state_dict()
    resumed = TaskSampler(SIZES, cfg, seed=1, rank=1, world=2)
    resumed.load_state_dict(state)
    got += run(resumed, range(25, 40))
    assert got == expected
