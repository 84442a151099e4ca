"""A compression plan: for every (layer, expert) either "prune" or "keep in format F", plus the formats of
the attention projections and the lm_head.

Why a separate, versioned object: deciding (planners, which read router statistics and measure errors)
is kept apart from doing (``apply_`` and the exporters), so a plan can be saved as ``plan.json``, read,
edited by hand, validated and re-applied without recomputing anything. ``Plan.bytes`` gives the exact
byte count of the resulting weights from each format's ``nbytes``, before any weight is touched.

JSON (``version`` 1)::

    {"version": 1, "planner": "prune", "num_layers": L, "num_experts": E, "num_kept": K,
     "attention": "bf16", "lm_head": "bf16",
     "experts": [["mxfp4", "prune", ...], ...],      # [L][E], source expert order
     "recipe": {...}, "notes": ["..."], "info": {...},
     "merge": {...}}                                  # only for merge plans (mxq.plan.merge)
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import write_atomic
from ..formats import FormatError, get_format, list_formats

PLAN_VERSION = 1
PRUNE = "prune"
# Formats a plan may give the attention projections and the lm_head (weights of nn.Linear, [out, in]).
DENSE_FORMATS = ("bf16", "fp8", "fp8_block")
BF16_BYTES = 2


class PlanError(ValueError):
    """A plan or recipe that cannot be carried out; the message names the offending option or entry."""


def removed_count(fraction: float, num_experts: int) -> int:
    """Experts removed per layer, pruned or merged away: floor(fraction * E), the same in every layer (a
    checkpoint has one ``num_local_experts``)."""
    return int(fraction * num_experts + 1e-9)


def kept_experts(option: str, fraction: float, config) -> int:
    """Experts a layer keeps after removing ``fraction`` of them; a ``PlanError`` naming ``option`` when
    fewer than top-k would remain (the router could not pick k distinct experts)."""
    E, k = config.num_local_experts, config.num_experts_per_tok
    kept = E - removed_count(fraction, E)
    if kept < k:
        raise PlanError(f"{option}={fraction!r}: keeps {kept} of {E} experts per layer, fewer than "
                        f"num_experts_per_tok={k} (top-k must not exceed the experts kept)")
    return kept


def expert_shapes(config) -> dict[str, tuple[int, int]]:
    """Logical [out, in] shapes of one expert's two matrices ([2I, H] and [H, I])."""
    H, I = config.hidden_size, config.intermediate_size
    return {"gate_up": (2 * I, H), "down": (H, I)}


def attention_shapes(config) -> dict[str, tuple[int, int]]:
    """[out, in] of the four attention projections of one layer (q, k, v, o)."""
    H = config.hidden_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    return {"q_proj": (q, H), "k_proj": (kv, H), "v_proj": (kv, H), "o_proj": (H, q)}


def format_nbytes(fmt: str, shape: tuple[int, int], what: str) -> int:
    """``get_format(fmt).nbytes(shape)``, turning "unknown" or "does not fit" into a PlanError naming ``what``."""
    if fmt not in list_formats():
        raise PlanError(f"{what}: {fmt!r} is not a registered format; known formats: {', '.join(list_formats())}")
    try:
        return get_format(fmt).nbytes(tuple(shape))
    except FormatError as e:
        raise PlanError(f"{what}: format {fmt!r} cannot hold a {list(shape)} weight ({e})") from None


@dataclass
class Plan:
    experts: list[list[str]]                 # [L][E]: a registered format name, or "prune"
    attention: str = "bf16"
    lm_head: str = "bf16"
    planner: str = ""
    recipe: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    merge: dict[str, Any] | None = None      # groups whose anchor takes the merge of its members (merge.py)

    # ------------------------------------------------------------------ construction
    @classmethod
    def uniform(cls, num_layers: int, num_experts: int, fmt: str, **kw: Any) -> "Plan":
        """Every expert of every layer in ``fmt`` (nothing pruned)."""
        return cls([[fmt] * num_experts for _ in range(num_layers)], **kw)

    # ------------------------------------------------------------------ queries
    @property
    def num_layers(self) -> int:
        return len(self.experts)

    @property
    def num_experts(self) -> int:
        return len(self.experts[0]) if self.experts else 0

    def kept(self, layer: int) -> list[int]:
        """Source indices of the experts layer ``layer`` keeps, in order (new index j -> kept(layer)[j])."""
        return [e for e, f in enumerate(self.experts[layer]) if f != PRUNE]

    def kept_formats(self, layer: int) -> list[str]:
        return [f for f in self.experts[layer] if f != PRUNE]

    @property
    def num_kept(self) -> int:
        counts = {len(self.kept(i)) for i in range(self.num_layers)}
        if len(counts) != 1:
            raise PlanError(f"plan keeps different numbers of experts per layer {sorted(counts)}; a checkpoint "
                            "needs one global num_local_experts")
        return counts.pop()

    def pruned(self) -> list[tuple[int, int]]:
        return [(i, e) for i in range(self.num_layers) for e, f in enumerate(self.experts[i]) if f == PRUNE]

    def formats_used(self) -> dict[str, int]:
        """Kept experts per format."""
        out: dict[str, int] = {}
        for row in self.experts:
            for f in row:
                if f != PRUNE:
                    out[f] = out.get(f, 0) + 1
        return dict(sorted(out.items()))

    def applied(self) -> "Plan":
        """The identity plan of the model after ``apply_``: kept experts only (renumbered), same formats
        (a merge is done by then, so the applied plan has none)."""
        return Plan([self.kept_formats(i) for i in range(self.num_layers)], self.attention, self.lm_head,
                    self.planner, dict(self.recipe), list(self.notes), dict(self.info))

    # ------------------------------------------------------------------ validation
    def check(self, config=None) -> None:
        """Structure, formats and (with a config) fit to the model; raises PlanError naming the entry."""
        if not self.experts or not all(isinstance(r, list) for r in self.experts):
            raise PlanError("plan.experts must be a non-empty list of per-layer lists")
        widths = {len(r) for r in self.experts}
        if len(widths) != 1:
            raise PlanError(f"plan.experts rows have different lengths {sorted(widths)}")
        for i, row in enumerate(self.experts):
            for e, f in enumerate(row):
                if f != PRUNE and f not in list_formats():
                    raise PlanError(f"plan.experts[{i}][{e}] = {f!r} is neither 'prune' nor a registered format; "
                                    f"known formats: {', '.join(list_formats())}")
        for what in ("attention", "lm_head"):
            f = getattr(self, what)
            if f not in DENSE_FORMATS:
                raise PlanError(f"plan.{what} = {f!r}: allowed formats are {', '.join(DENSE_FORMATS)}")
        k = self.num_kept
        if self.merge is not None:
            check_merge(self.merge, self.experts)
        if config is None:
            return
        if self.num_layers != config.num_hidden_layers or self.num_experts != config.num_local_experts:
            raise PlanError(f"plan is for {self.num_layers} layers x {self.num_experts} experts, the model has "
                            f"{config.num_hidden_layers} x {config.num_local_experts}")
        if k < config.num_experts_per_tok:
            raise PlanError(f"plan keeps {k} experts per layer, fewer than num_experts_per_tok="
                            f"{config.num_experts_per_tok} (top-k must not exceed the experts kept)")
        for f in self.formats_used():
            for kind, shape in expert_shapes(config).items():
                format_nbytes(f, shape, f"plan expert format ({kind})")
        for proj, shape in attention_shapes(config).items():
            format_nbytes(self.attention, shape, f"plan.attention ({proj})")
        format_nbytes(self.lm_head, (config.vocab_size, config.hidden_size), "plan.lm_head")

    # ------------------------------------------------------------------ bytes
    def bytes(self, config) -> dict[str, int]:
        """Exact bytes of the resulting weights per component (every tensor a checkpoint of it stores).

        Non-quantized tensors count as bf16 (the published files store every float tensor as
        BF16); quantized ones as their format's ``nbytes``. ``expert_bits`` is the average bits
        per expert weight (packed gate_up + down of the kept experts, biases excluded).
        """
        self.check(config)
        H, I, V, L = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers
        k = self.num_kept
        shapes = expert_shapes(config)
        per_fmt = {f: sum(get_format(f).nbytes(s) for s in shapes.values()) for f in self.formats_used()}
        experts = sum(per_fmt[f] * n for f, n in self.formats_used().items())
        att_fmt = get_format(self.attention)
        ash = attention_shapes(config)
        att = L * (sum(att_fmt.nbytes(s) for s in ash.values())
                   + BF16_BYTES * (sum(s[0] for s in ash.values()) + config.num_attention_heads))  # biases, sinks
        out = {
            "experts": experts,
            "expert_biases": BF16_BYTES * L * k * (2 * I + H),
            "router": BF16_BYTES * L * k * (H + 1),
            "attention": att,
            "norms": BF16_BYTES * (2 * L + 1) * H,
            "embed_tokens": BF16_BYTES * V * H,
            "lm_head": get_format(self.lm_head).nbytes((V, H)),
        }
        out["total"] = sum(out.values())
        n_weights = L * k * sum(a * b for a, b in shapes.values())
        out["expert_bits"] = round(8.0 * experts / n_weights, 6)  # type: ignore[assignment]
        return out

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        return {"version": PLAN_VERSION, "planner": self.planner, "num_layers": self.num_layers,
                "num_experts": self.num_experts, "num_kept": self.num_kept, "attention": self.attention,
                "lm_head": self.lm_head, "experts": [list(r) for r in self.experts], "recipe": self.recipe,
                "notes": list(self.notes), "info": self.info, **({"merge": self.merge} if self.merge else {})}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, default=_jsonable) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "plan") -> "Plan":
        if not isinstance(d, dict):
            raise PlanError(f"{where}: expected a JSON object")
        v = d.get("version")
        if v != PLAN_VERSION:
            raise PlanError(f"{where}: plan version {v!r} is not supported (this mxq reads version {PLAN_VERSION})")
        if "experts" not in d:
            raise PlanError(f"{where}: missing 'experts'")
        plan = cls([list(r) for r in d["experts"]], d.get("attention", "bf16"), d.get("lm_head", "bf16"),
                   d.get("planner", ""), dict(d.get("recipe") or {}), list(d.get("notes") or []),
                   dict(d.get("info") or {}), d.get("merge"))
        plan.check()
        for key in ("num_layers", "num_experts", "num_kept"):
            if key in d and d[key] != getattr(plan, key):
                raise PlanError(f"{where}: {key}={d[key]} contradicts the experts table ({getattr(plan, key)})")
        return plan

    @classmethod
    def from_json(cls, text: str, where: str = "plan") -> "Plan":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanError(f"{where}: not valid JSON ({e})") from None
        return cls.from_dict(d, where)

    def save(self, path: str | Path) -> Path:
        """Write atomically (temporary file, rename), so a crash never leaves half a plan.json."""
        from ..atomic import write_atomic

        path = Path(path)
        write_atomic(path, self.to_json())
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        return cls.from_json(Path(path).read_text(), str(path))

    def summary(self) -> dict[str, Any]:
        """Compact description for metrics.json."""
        return {"planner": self.planner, "num_layers": self.num_layers, "num_experts": self.num_experts,
                "num_kept": self.num_kept, "pruned": len(self.pruned()), "formats": self.formats_used(),
                "attention": self.attention, "lm_head": self.lm_head, "bytes": self.info.get("bytes"),
                "notes": len(self.notes),
                **({"merged_groups": sum(len(g["members"]) > 1 for layer in self.merge["groups"] for g in layer)}
                   if self.merge else {})}


def _jsonable(x: Any) -> Any:
    """numpy / torch scalars and arrays in ``info`` -> plain JSON values."""
    if hasattr(x, "tolist"):
        return x.tolist()
    if hasattr(x, "item"):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


ROUTER_MODES = ("lse", "mean", "anchor")     # how a merged group's router row is formed (mxq.plan.merge)


def check_merge(spec: Any, experts: list[list[str]]) -> None:
    """A plan's ``merge`` against its experts table: every expert in exactly one group per layer, the
    anchors (``members[0]``) exactly the kept experts, weights finite, non-negative and one per member."""
    if not isinstance(spec, dict):
        raise PlanError("plan.merge must be an object with keys align, router, groups")
    if spec.get("router") not in ROUTER_MODES:
        raise PlanError(f"plan.merge.router = {spec.get('router')!r}: choose from {', '.join(ROUTER_MODES)}")
    if not isinstance(spec.get("align"), bool):
        raise PlanError(f"plan.merge.align = {spec.get('align')!r}: must be true or false")
    groups = spec.get("groups")
    if not isinstance(groups, list) or len(groups) != len(experts):
        raise PlanError(f"plan.merge.groups must hold one list of groups per layer ({len(experts)})")
    for i, (layer, row) in enumerate(zip(groups, experts)):
        seen: list[int] = []
        for j, g in enumerate(layer):
            where = f"plan.merge.groups[{i}][{j}]"
            m = g.get("members") if isinstance(g, dict) else None
            if not isinstance(m, list) or not m or not all(isinstance(e, int) and 0 <= e < len(row) for e in m):
                raise PlanError(f"{where}.members must be a non-empty list of expert indices < {len(row)}")
            for key in ("weights", "router_weights"):
                w = g.get(key)
                if (not isinstance(w, list) or len(w) != len(m)
                        or not all(isinstance(x, (int, float)) and math.isfinite(x) and x >= 0 for x in w)):
                    raise PlanError(f"{where}.{key} must be {len(m)} finite non-negative numbers")
            if row[m[0]] == PRUNE or any(row[e] != PRUNE for e in m[1:]):
                raise PlanError(f"{where}: the anchor (members[0]={m[0]}) must be kept and the other members "
                                f"{m[1:]} pruned in plan.experts[{i}]")
            seen += m
        if sorted(seen) != list(range(len(row))):
            raise PlanError(f"plan.merge.groups[{i}]: every expert of the layer must be in exactly one group "
                            f"(got {sorted(seen)})")
