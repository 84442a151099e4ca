"""Choosing one format per expert under a byte budget: an exact MILP and a greedy heuristic.

Problem (Mixture Compressor, Huang et al., ICLR 2025, arXiv 2410.06270, "pre-loading mixed-precision
quantization" as an integer program): experts j = 1..J, menu formats f = 1..F, cost[j, f] bytes,
weight[j, f] = importance_j * error_j(f). Binary x[j, f]:

    minimise   sum_jf weight[j, f] x[j, f]
    subject to sum_f x[j, f] = 1                       for every expert j
               sum_{j in g, f} cost[j, f] x[j, f] <= budget[g]   for every budget group g

``solve_milp`` solves it exactly with ``scipy.optimize.milp`` (HiGHS branch and bound, relative gap 0).
``solve_greedy`` is the usual knapsack heuristic (start every expert at its cheapest format, then take
the upgrade with the best error reduction per extra byte that still fits); it is kept for comparison
and is not optimal: it can spend the budget on many small upgrades where one large one is better.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .plan import PlanError


@dataclass
class Allocation:
    choice: np.ndarray          # [J] int: chosen format index per expert
    objective: float            # sum of weight[j, choice[j]]
    group_bytes: np.ndarray     # [G] bytes used per budget group
    solver: str
    status: str


def _check(cost: np.ndarray, weight: np.ndarray, groups: np.ndarray, budgets: np.ndarray) -> None:
    if cost.shape != weight.shape or cost.ndim != 2 or groups.shape != (cost.shape[0],):
        raise PlanError(f"allocation: cost {cost.shape}, weight {weight.shape}, groups {groups.shape} disagree")
    if groups.min(initial=0) < 0 or groups.max(initial=0) >= len(budgets):
        raise PlanError("allocation: group ids must index budgets")
    floor = np.zeros(len(budgets))
    np.add.at(floor, groups, cost.min(axis=1))
    bad = np.nonzero(floor > budgets)[0]
    if bad.size:
        g = int(bad[0])
        raise PlanError(f"allocation: budget group {g} needs at least {floor[g]:.0f} bytes (cheapest format for "
                        f"every expert) but has {budgets[g]:.0f}")


def _result(choice: np.ndarray, cost: np.ndarray, weight: np.ndarray, groups: np.ndarray, budgets: np.ndarray,
            solver: str, status: str) -> Allocation:
    j = np.arange(len(choice))
    used = np.zeros(len(budgets))
    np.add.at(used, groups, cost[j, choice])
    if np.any(used > budgets):
        raise PlanError(f"allocation ({solver}): result exceeds its budget ({used} > {budgets}); solver tolerance")
    return Allocation(choice, float(weight[j, choice].sum()), used, solver, status)


def solve_milp(cost: np.ndarray, weight: np.ndarray, groups: np.ndarray, budgets: np.ndarray,
               time_limit: float = 300.0) -> Allocation:
    """Exact optimum of the program above (one binary per (expert, format))."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_matrix

    cost, weight = np.asarray(cost, np.float64), np.asarray(weight, np.float64)
    groups, budgets = np.asarray(groups, np.int64), np.floor(np.asarray(budgets, np.float64))
    _check(cost, weight, groups, budgets)
    J, F = cost.shape
    cols = np.arange(J * F)
    rows = np.repeat(np.arange(J), F)
    one_each = csr_matrix((np.ones(J * F), (rows, cols)), shape=(J, J * F))
    in_budget = csr_matrix((cost.ravel(), (groups[rows], cols)), shape=(len(budgets), J * F))
    res = milp(weight.ravel(), integrality=np.ones(J * F), bounds=Bounds(0, 1),
               constraints=[LinearConstraint(one_each, 1, 1), LinearConstraint(in_budget, -np.inf, budgets)],
               options={"mip_rel_gap": 0.0, "time_limit": time_limit})
    if res.x is None or res.status not in (0,):
        raise PlanError(f"mixed precision: the MILP solver did not find an optimum ({res.message}); try "
                        "recipe.mixed.solver=greedy")
    choice = res.x.reshape(J, F).argmax(axis=1)
    return _result(choice, cost, weight, groups, budgets, "milp", str(res.message))


def solve_greedy(cost: np.ndarray, weight: np.ndarray, groups: np.ndarray, budgets: np.ndarray) -> Allocation:
    """Cheapest format everywhere, then repeatedly the best (error reduction / extra bytes) upgrade that fits."""
    cost, weight = np.asarray(cost, np.float64), np.asarray(weight, np.float64)
    groups, budgets = np.asarray(groups, np.int64), np.floor(np.asarray(budgets, np.float64))
    _check(cost, weight, groups, budgets)
    J, _ = cost.shape
    j = np.arange(J)
    # cheapest format, ties broken by the smaller weight
    choice = np.array([min(range(cost.shape[1]), key=lambda f, r=r: (cost[r, f], weight[r, f])) for r in range(J)])
    left = budgets.copy()
    np.subtract.at(left, groups, cost[j, choice])
    while True:
        d_cost = cost - cost[j, choice][:, None]                              # [J, F] extra bytes
        gain = weight[j, choice][:, None] - weight                            # [J, F] error reduction
        fits = (d_cost <= left[groups][:, None]) & (gain > 0)
        if not fits.any():
            break
        ratio = np.where(fits, gain / np.maximum(d_cost, 1e-300), -np.inf)
        ratio = np.where(fits & (d_cost <= 0), np.inf, ratio)                 # free improvements first
        r, f = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
        left[groups[r]] -= d_cost[r, f]
        choice[r] = f
    return _result(choice, cost, weight, groups, budgets, "greedy", "done")


SOLVERS: dict[str, Callable[..., Allocation]] = {"milp": solve_milp, "greedy": solve_greedy}
