"""Mixed-precision allocation (Mixture Compressor's integer program): the MILP meets its budget, is never
worse than the greedy heuristic, and is strictly better on a case built to defeat greedy."""
from __future__ import annotations

import numpy as np
import pytest

from mxq.plan import PlanError
from mxq.plan.allocate import solve_greedy, solve_milp


def brute_force(cost, weight, groups, budgets):
    import itertools

    best = np.inf
    for choice in itertools.product(range(cost.shape[1]), repeat=cost.shape[0]):
        c = np.array(choice)
        used = np.zeros(len(budgets))
        np.add.at(used, groups, cost[np.arange(len(c)), c])
        if np.all(used <= budgets):
            best = min(best, weight[np.arange(len(c)), c].sum())
    return best


def test_milp_beats_greedy_where_greedy_spends_the_budget_on_small_upgrades():
    # formats: low (cost 0), mid (1), high (4); budget 4 extra. Greedy upgrades both experts to mid (best
    # ratio first) and then cannot afford high; the optimum puts one expert at high.
    cost = np.array([[0.0, 1.0, 4.0], [0.0, 1.0, 4.0]])
    weight = np.array([[1.0, 0.5, 0.0], [1.0, 0.6, 0.0]])
    g, b = np.zeros(2, np.int64), np.array([4.0])
    m, gr = solve_milp(cost, weight, g, b), solve_greedy(cost, weight, g, b)
    assert gr.objective == pytest.approx(1.1) and m.objective == pytest.approx(1.0)
    assert m.objective < gr.objective and m.group_bytes[0] <= 4.0


@pytest.mark.parametrize("seed", range(12))
def test_milp_is_optimal_within_budget_and_never_worse_than_greedy(seed):
    rng = np.random.default_rng(seed)
    J, F, G = 7, 4, 2
    per_format = np.sort(rng.integers(10, 100, F)).astype(float)
    cost = np.tile(per_format, (J, 1)) + rng.integers(0, 3, (J, F))          # near-uniform costs
    err = np.sort(rng.random((J, F)), axis=1)[:, ::-1]                          # pricier formats err less
    weight = rng.random(J)[:, None] * err
    groups = rng.integers(0, G, J)
    floor = np.zeros(G)
    np.add.at(floor, groups, cost.min(axis=1))
    budgets = floor + rng.integers(0, 150, G)
    m, gr = solve_milp(cost, weight, groups, budgets), solve_greedy(cost, weight, groups, budgets)
    assert np.all(m.group_bytes <= budgets) and np.all(gr.group_bytes <= budgets)
    assert m.objective <= gr.objective + 1e-12
    assert m.objective == pytest.approx(brute_force(cost, weight, groups, budgets))


def test_infeasible_budget_is_rejected_by_both():
    cost = np.array([[4.0, 8.0]])
    for solve in (solve_milp, solve_greedy):
        with pytest.raises(PlanError, match="needs at least 4 bytes"):
            solve(cost, np.ones_like(cost), np.zeros(1, np.int64), np.array([3.0]))
