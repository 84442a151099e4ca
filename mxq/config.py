"""GptOssConfig: the subset of ``config.json`` that defines the math, read from either checkpoint layout.

HF layout keys are those of the published ``config.json`` (transformers ``models/gpt_oss/configuration_gpt_oss.py``);
the original OpenAI ``original/config.json`` keys are those of openai/gpt-oss ``gpt_oss/torch/model.py::ModelConfig``
and are mapped the way transformers' converter (``convert_gpt_oss_weights_to_hf.py::write_model``) maps them.
Unknown keys are kept in ``extra`` so that a config written back by mxq loses nothing.
"""
from __future__ import annotations


from dataclasses import asdict, dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A config.json that is missing a field, contradicts itself or contradicts the tensors."""


_YARN_DEFAULT = {
    "rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
    "original_max_position_embeddings": 4096, "truncate": False,
}


@dataclass
class GptOssConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_local_experts: int
    num_experts_per_tok: int
    sliding_window: int = 128
    layer_types: list[str] = field(default_factory=list)
    rope_theta: float = 150000.0
    rope_scaling: dict[str, Any] = field(default_factory=lambda: dict(_YARN_DEFAULT))
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    rms_norm_eps: float = 1e-5
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    max_position_embeddings: int = 131072
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.layer_types:
            self.layer_types = [
                "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(self.num_hidden_layers)
            ]
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self, source: str = "config.json") -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(f"{source}: {msg}")

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "num_local_experts",
                     "num_experts_per_tok"):
            v = getattr(self, name)
            need(isinstance(v, int) and v > 0, f"{name} must be a positive integer, got {v!r}")
        need(self.num_attention_heads % self.num_key_value_heads == 0,
             f"num_attention_heads {self.num_attention_heads} is not a multiple of num_key_value_heads "
             f"{self.num_key_value_heads}")
        need(self.num_experts_per_tok <= self.num_local_experts,
             f"num_experts_per_tok {self.num_experts_per_tok} exceeds num_local_experts {self.num_local_experts}")
        need(len(self.layer_types) == self.num_hidden_layers,
             f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        bad = [t for t in self.layer_types if t not in ("sliding_attention", "full_attention")]
        need(not bad, f"unknown layer_types {bad}")
        need(self.head_dim % 2 == 0, f"head_dim {self.head_dim} must be even (half-split RoPE)")
        rs = self.rope_scaling or {}
        need(rs.get("rope_type", rs.get("type")) in ("yarn", None, "default"),
             f"rope_scaling.rope_type {rs.get('rope_type')!r} is not supported (GPT-OSS uses yarn)")

    # ------------------------------------------------------------------ derived
    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == "sliding_attention"

    @property
    def yarn(self) -> dict[str, Any]:
        rs = dict(_YARN_DEFAULT)
        rs.update(self.rope_scaling or {})
        return rs

    # ------------------------------------------------------------------ (de)serialisation
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> "GptOssConfig":
        d = dict(d)
        if "rope_parameters" in d and "rope_scaling" not in d:  # transformers 5.x-saved configs
            rp = dict(d.pop("rope_parameters"))
            d.setdefault("rope_theta", rp.pop("rope_theta", 150000.0))
            d["rope_scaling"] = rp
        if "num_local_experts" not in d and "num_experts" in d:
            d["num_local_experts"] = d.pop("num_experts")
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        kwargs = {k: d.pop(k) for k in list(d) if k in known}
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads", "num_key_value_heads", "num_local_experts",
                               "num_experts_per_tok") if k not in kwargs]
        if missing:
            raise ConfigError(f"{source}: missing required field(s) {missing}")
        kwargs.setdefault("head_dim", kwargs["hidden_size"] // kwargs["num_attention_heads"])
        try:
            cfg = cls(**kwargs, extra=d)
        except ConfigError as e:
            raise ConfigError(str(e).replace("config.json", source, 1)) from None
        return cfg

    @classmethod
    def from_original_dict(cls, d: dict[str, Any], source: str = "original/config.json") -> "GptOssConfig":
        """Map OpenAI's original config to the HF field names (as transformers' converter ``write_model``)."""
        try:
            hf = {
                "vocab_size": d["vocab_size"], "hidden_size": d["hidden_size"],
                "intermediate_size": d["intermediate_size"], "num_hidden_layers": d["num_hidden_layers"],
                "num_attention_heads": d["num_attention_heads"], "num_key_value_heads": d["num_key_value_heads"],
                "head_dim": d["head_dim"], "num_local_experts": d["num_experts"],
                "num_experts_per_tok": d["experts_per_token"], "sliding_window": d.get("sliding_window", 128),
                "swiglu_limit": d.get("swiglu_limit", 7.0), "rope_theta": d.get("rope_theta", 150000.0),
                "rope_scaling": {
                    "rope_type": "yarn", "factor": float(d.get("rope_scaling_factor", 32.0)),
                    "beta_fast": float(d.get("rope_ntk_beta", 32.0)), "beta_slow": float(d.get("rope_ntk_alpha", 1.0)),
                    "original_max_position_embeddings": d.get("initial_context_length", 4096), "truncate": False,
                },
            }
        except KeyError as e:
            raise ConfigError(f"{source}: missing required field {e.args[0]!r}") from None
        return cls.from_hf_dict(hf, source)

    def to_hf_dict(self) -> dict[str, Any]:
        """``config.json`` in the published key set (``GptOssConfig``), plus anything unknown that was read."""
        d = asdict(self)
        extra = d.pop("extra")
        d.pop("swiglu_alpha")  # not in the published file; 1.702 is the HF default
        out: dict[str, Any] = {
            "architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
            "experts_per_token": self.num_experts_per_tok, "hidden_act": "silu",
            "initial_context_length": self.yarn["original_max_position_embeddings"], "initializer_range": 0.02,
            "model_type": "gpt_oss", "output_router_logits": False, "router_aux_loss_coef": 0.9,
            "tie_word_embeddings": False, "use_cache": True,
        }
        out.update(extra)
        out.update({k: v for k, v in d.items() if v is not None})
        out["rope_scaling"] = dict(self.yarn)
        out.pop("quantization_config", None)  # the writer decides
        return dict(sorted(out.items()))

    def to_original_dict(self) -> dict[str, Any]:
        y = self.yarn
        return {
            "num_hidden_layers": self.num_hidden_layers, "num_experts": self.num_local_experts,
            "experts_per_token": self.num_experts_per_tok, "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "swiglu_limit": self.swiglu_limit, "head_dim": self.head_dim,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "sliding_window": self.sliding_window, "initial_context_length": y["original_max_position_embeddings"],
            "rope_theta": self.rope_theta, "rope_scaling_factor": y["factor"],
            "rope_ntk_alpha": y["beta_slow"], "rope_ntk_beta": y["beta_fast"],
        }

    # ------------------------------------------------------------------ counts (model card, arXiv 2508.10925)
    def param_counts(self) -> dict[str, int]:
        H, I, E, L, V = (self.hidden_size, self.intermediate_size, self.num_local_experts,
                         self.num_hidden_layers, self.vocab_size)
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        attn = q * H + q + 2 * (kv * H + kv) + H * q + H + self.num_attention_heads
        expert = 2 * I * H + 2 * I + I * H + H
        per_layer = attn + 2 * H + E * H + E + E * expert
        total = L * per_layer + 2 * V * H + H
        active = L * (attn + 2 * H + E * H + E + self.num_experts_per_tok * expert) + V * H + H
        return {"total": total, "active_excl_embedding": active, "active_incl_embedding": active + V * H,
                "expert_weights": L * E * 3 * I * H}


