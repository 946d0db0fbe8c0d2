import random

import pytest

from mtl_scale.loss_weighting import loss_scales


def _step(seed, world=2, gas=5):
    """Random micro-batches: per micro-step a task (rank-identical), per rank (S, T)."""
    rng = random.Random(seed)
    tasks = [rng.choice("abc") for _ in range(gas)]
    return [(t, [(rng.uniform(1, 50), rng.randint(1, 40)) for _ in range(world)]) for t in tasks], world, gas


def _engine_objective(micro, world, gas, scales):
    # What DeepSpeed optimises: loss passed to backward / gas, averaged over ranks.
    return sum(S * scales[t] for t, ranks in micro for S, _ in ranks) / gas / world


def _tokens(micro):
    out = {}
    for t, ranks in micro:
        out[t] = out.get(t, 0) + sum(T for _, T in ranks)
    return out


@pytest.mark.parametrize("seed", range(5))
def test_token_weighting_is_the_global_token_mean(seed):
    micro, world, gas = _step(seed)
    expected = sum(S for _, r in micro for S, _ in r) / sum(T for _, r in micro for _, T in r)
    got = _engine_objective(micro, world, gas, loss_scales("token", _tokens(micro), world, gas))
    assert got == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_task_weighting_is_the_mean_of_task_token_means(seed):
    micro, world, gas = _step(seed)
    per_task = {}
    for t, r in micro:
        s, n = per_task.get(t, (0.0, 0))
        per_task[t] = (s + sum(S for S, _ in r), n + sum(T for _, T in r))
    expected = sum(s / n for s, n in per_task.values()) / len(per_task)
    got = _engine_objective(micro, world, gas, loss_scales("task", _tokens(micro), world, gas))
    assert got == pytest.approx(expected, rel=1e-12)


def test_manual_weighting_normalises_over_tasks_in_the_step():
    micro = [("a", [(10.0, 5), (6.0, 5)]), ("b", [(3.0, 1), (1.0, 3)])]
    weights = {"a": 1.0, "b": 3.0, "c": 100.0}  # c is not in this step: it must not dilute a and b
    got = _engine_objective(micro, 2, 2, loss_scales("manual", _tokens(micro), 2, 2, weights))
    assert got == pytest.approx(0.25 * (16 / 10) + 0.75 * (4 / 4))
    assert loss_scales("manual", {"a": 3}, 2, 2, {"a": 0.0}) == {"a": 0.0}


def test_hand_computed_token_scale():
    # 2 ranks, 4 micro-steps, 100 completion tokens in the step: scale = 2 * 4 / 100
    assert loss_scales("token", {"a": 60, "b": 40}, world=2, gas=4) == {"a": 0.08, "b": 0.08}
    assert loss_scales("task", {"a": 60, "b": 40}, world=2, gas=4) == pytest.approx({"a": 8 / 120, "b": 8 / 80})


def test_dwa_weighting_is_the_weighted_mean_of_task_token_means():
    # DWA's weights are chosen before the step (balancing.dwa_weights); the objective is manual's with them
    micro = [("a", [(10.0, 5), (6.0, 5)]), ("b", [(3.0, 1), (1.0, 3)])]
    weights = {"a": 0.5, "b": 1.5, "c": 2.0}  # sum K = 3; c is not in this step
    got = _engine_objective(micro, 2, 2, loss_scales("dwa", _tokens(micro), 2, 2, weights))
    assert got == pytest.approx(0.25 * (16 / 10) + 0.75 * (4 / 4), rel=1e-12)
