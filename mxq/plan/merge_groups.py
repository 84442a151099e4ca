"""Which experts of a layer merge together: the groupings of the merge planner (a registry).

Every grouping gets one layer's ``LayerData`` and returns ``n`` groups of the candidate experts, each with
its anchor first (the member that stays, holding the merge). Groupings (``recipe.merge.grouping``):

* ``hc_smoe``: hierarchical clustering, average linkage, of the experts' mean outputs over all
  calibration tokens, Euclidean distance, cut into ``n`` clusters (Chen et al., HC-SMoE, arXiv 2410.08589,
  ``scipy.cluster.hierarchy``). The anchor is the most frequently routed member.
* ``router_logits``: the same clustering of the experts' router-logit columns over the calibration
  tokens (HC-SMoE's router-logit baseline).
* ``weights``: the same clustering of the experts' flattened weights (HC-SMoE's weight baseline; blind
  to the neuron permutation symmetry, as in the paper).
* ``dominant``: MC-SMoE's grouping (Li et al., arXiv 2310.01334): the ``n`` most frequently
  routed experts are the anchors ("dominant experts") and every other expert joins the anchor whose
  router-logit column is most similar (cosine).
* ``saliency``: REAM-style (router-weighted expert activation merging): the ``n`` experts of highest
  REAP saliency (Lasby et al., arXiv 2510.13999: mean of g_e(x) ||f_e(x)|| over routed tokens) are the
  anchors, every other expert joins the anchor nearest in mean output.
Ties are broken by expert index, so a grouping is a deterministic function of its inputs.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.cluster.hierarchy import cut_tree, linkage
from scipy.spatial.distance import squareform

from .plan import PlanError


@dataclass
class LayerData:
    """One layer's inputs of a grouping; ``[E]`` / ``[E, E]`` arrays over all experts of the layer."""

    layer: int
    freq: np.ndarray                                   # [E] routed tokens (anchor choice, dominant)
    saliency: np.ndarray                               # [E] REAP score, 0 where uncalibrated
    output_dist: Callable[[], np.ndarray] | None       # -> [E, E] distances of mean outputs
    logit_dist: Callable[[], np.ndarray] | None        # -> [E, E] distances of router-logit columns
    logit_cos: Callable[[], np.ndarray] | None         # -> [E, E] cosines of router-logit columns
    weight_dist: Callable[[], np.ndarray]              # -> [E, E] distances of flattened weights


Grouping = Callable[[LayerData, list[int], int], list[list[int]]]
GROUPINGS: dict[str, Grouping] = {}
NEEDS_OUTPUTS: set[str] = set()          # groupings that read mxq.stats.expert_outputs


def register_grouping(name: str, needs_outputs: bool) -> Callable[[Grouping], Grouping]:
    def deco(fn: Grouping) -> Grouping:
        GROUPINGS[name] = fn
        if needs_outputs:
            NEEDS_OUTPUTS.add(name)
        return fn

    return deco


def _need(f: Callable[[], np.ndarray] | None, what: str, layer: int) -> np.ndarray:
    if f is None:
        raise PlanError(f"layer {layer}: this grouping needs the experts' {what} on calibration tokens "
                        "(mxq.stats.expert_outputs; python -m mxq.run collects them when recipe.stats=true)")
    return f()


def by_frequency(members: list[int], freq: np.ndarray) -> list[int]:
    """Members with the most frequently routed one first (ties: lower index first)."""
    return sorted(members, key=lambda e: (-freq[e], e))


def average_linkage_groups(dist: np.ndarray, cand: list[int], n: int, freq: np.ndarray) -> list[list[int]]:
    """Average-linkage hierarchical clustering of ``cand`` under ``dist`` [E, E], cut into exactly ``n``."""
    if n >= len(cand):
        return [[e] for e in cand]
    if n == 1:
        return [by_frequency(cand, freq)]
    d = dist[np.ix_(cand, cand)].astype(np.float64)
    d = (d + d.T) / 2
    np.fill_diagonal(d, 0.0)
    z = linkage(squareform(d, checks=False), method="average")
    labels = cut_tree(z, n_clusters=n).ravel()
    groups = [by_frequency([cand[j] for j in np.flatnonzero(labels == c)], freq) for c in range(n)]
    return sorted(groups, key=lambda g: g[0])


def anchored_groups(score: np.ndarray, sim: np.ndarray, cand: list[int], n: int) -> list[list[int]]:
    """The ``n`` highest-``score`` candidates are anchors; every other joins its most similar anchor."""
    order = sorted(cand, key=lambda e: (-score[e], e))
    anchors = sorted(order[:n])
    groups = {a: [a] for a in anchors}
    for e in sorted(order[n:]):
        best = max(anchors, key=lambda a: (sim[e, a], -a))
        groups[best].append(e)
    return [groups[a] for a in anchors]


@register_grouping("hc_smoe", needs_outputs=True)
def group_hc_smoe(d: LayerData, cand: list[int], n: int) -> list[list[int]]:
    return average_linkage_groups(_need(d.output_dist, "mean outputs", d.layer), cand, n, d.freq)


@register_grouping("router_logits", needs_outputs=True)
def group_router_logits(d: LayerData, cand: list[int], n: int) -> list[list[int]]:
    return average_linkage_groups(_need(d.logit_dist, "router logits", d.layer), cand, n, d.freq)


@register_grouping("weights", needs_outputs=False)
def group_weights(d: LayerData, cand: list[int], n: int) -> list[list[int]]:
    return average_linkage_groups(d.weight_dist(), cand, n, d.freq)


@register_grouping("dominant", needs_outputs=True)
def group_dominant(d: LayerData, cand: list[int], n: int) -> list[list[int]]:
    return anchored_groups(d.freq, _need(d.logit_cos, "router logits", d.layer), cand, n)


@register_grouping("saliency", needs_outputs=True)
def group_saliency(d: LayerData, cand: list[int], n: int) -> list[list[int]]:
    return anchored_groups(d.saliency, -_need(d.output_dist, "mean outputs", d.layer), cand, n)
