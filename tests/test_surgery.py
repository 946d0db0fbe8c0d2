import pytest
import torch

from mtl_scale.surgery import (cosine_matrix, mgda_weights, pcgrad_projections, pcgrad_weights, random_orders,
                               task_weights)


def pcgrad_direct(grads: torch.Tensor, orders) -> torch.Tensor:
    """PCGrad on explicit vectors, as in Yu et al. 2020 (projections onto the original g_j), summed."""
    out = []
    for i in range(len(grads)):
        g = grads[i].clone()
        for j in orders[i]:
            if j == i:
                continue
            dot = g @ grads[j]
            if dot < 0:
                g = g - dot / (grads[j] @ grads[j]) * grads[j]
        out.append(g)
    return torch.stack(out).sum(0)


@pytest.mark.parametrize("seed", range(20))
def test_pcgrad_weights_equal_explicit_pcgrad(seed):
    gen = torch.Generator().manual_seed(seed)
    k = 2 + seed % 5
    grads = torch.randn(k, 64, generator=gen, dtype=torch.float64)
    grads[1] = -0.8 * grads[0] + 0.3 * torch.randn(64, generator=gen, dtype=torch.float64)  # planted conflict
    orders = random_orders(k, gen)
    w = pcgrad_weights(grads @ grads.T, orders)
    torch.testing.assert_close(w @ grads, pcgrad_direct(grads, orders), atol=1e-6, rtol=1e-6)
    assert pcgrad_projections(grads @ grads.T, orders) >= 2  # the planted pair projects both ways


def test_pcgrad_hand_computed_two_tasks():
    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    # g1' = g1 + 0.5 g2 = (0.5, 0.5); g2' = g2 + g1 = (0, 1); sum (0.5, 1.5) = 2 g1 + 1.5 g2
    w = pcgrad_weights(g @ g.T, [[1], [0]])
    torch.testing.assert_close(w, torch.tensor([2.0, 1.5], dtype=torch.float64))
    torch.testing.assert_close(w @ g, torch.tensor([0.5, 1.5], dtype=torch.float64))


def test_pcgrad_without_conflict_is_sum_and_order_matters_with_three():
    g = torch.tensor([[1.0, 0.2], [0.3, 1.0]])
    torch.testing.assert_close(pcgrad_weights(g @ g.T, [[1], [0]]), torch.ones(2))
    assert pcgrad_projections(g @ g.T, [[1], [0]]) == 0
    g3 = torch.tensor([[1.0, 0.0, 0.0], [-0.9, 1.0, 0.0], [-0.5, -0.7, 1.0]], dtype=torch.float64)
    a = pcgrad_weights(g3 @ g3.T, [[1, 2], [0, 2], [0, 1]])
    b = pcgrad_weights(g3 @ g3.T, [[2, 1], [2, 0], [1, 0]])
    assert not torch.allclose(a, b)
    for orders in ([[1, 2], [0, 2], [0, 1]], [[2, 1], [2, 0], [1, 0]]):
        torch.testing.assert_close(pcgrad_weights(g3 @ g3.T, orders) @ g3, pcgrad_direct(g3, orders))


def test_self_and_zero_gradients_are_skipped():
    g = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    torch.testing.assert_close(pcgrad_weights(g @ g.T, [[0, 1], [1, 0]]), torch.ones(2))


def test_sum_and_mean():
    gram = torch.eye(4)
    torch.testing.assert_close(task_weights("sum", gram, []), torch.ones(4))
    torch.testing.assert_close(task_weights("mean", gram, []), torch.full((4,), 0.25))
    with pytest.raises(ValueError, match="unknown surgery method 'cagrad'; choose one of sum, mean, pcgrad, mgda"):
        task_weights("cagrad", gram, [])


def test_mgda_two_task_closed_form_and_optimality():
    g = torch.tensor([[2.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    gram = g @ g.T
    gamma = ((g[1] - g[0]) @ g[1]) / ((g[0] - g[1]) @ (g[0] - g[1]))  # weight on g1 of the min-norm point
    w = mgda_weights(gram)
    torch.testing.assert_close(w / 2, torch.stack([gamma, 1 - gamma]), atol=1e-6, rtol=1e-6)
    gen = torch.Generator().manual_seed(0)
    grads = torch.randn(5, 30, generator=gen, dtype=torch.float64)
    w = mgda_weights(grads @ grads.T) / 5
    assert w.min() >= 0 and w.sum() == pytest.approx(1.0)
    # KKT of min wᵀGw on the simplex: every vertex's directional derivative is at least the optimum's
    gw = (grads @ grads.T) @ w
    assert (gw >= w @ gw - 1e-6).all()


def test_cosine_matrix():
    g = torch.tensor([[1.0, 0.0], [-2.0, 0.0], [0.0, 0.0]])
    c = cosine_matrix(g @ g.T)
    torch.testing.assert_close(c, torch.tensor([[1.0, -1.0, 0.0], [-1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]))


def test_random_orders_are_permutations_of_the_others():
    orders = random_orders(5, torch.Generator().manual_seed(1))
    for i, o in enumerate(orders):
        assert sorted(o) == [j for j in range(5) if j != i]
