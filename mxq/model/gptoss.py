"""GptOssForCausalLM: mxq's own exact GPT-OSS forward pass.

Written from openai/gpt-oss ``gpt_oss/torch/model.py`` (``Transformer``) and transformers
``models/gpt_oss/modeling_gpt_oss.py``; architecture as in the gpt-oss model card (arXiv 2508.10925).

Pre-norm residual blocks of sink attention and MoE; no embedding scaling, no soft-capping, untied
lm_head. Weights are loaded by ``mxq.io.reader``; experts stay packed (``PackedExperts``) unless the
model is built ``trainable`` (``DenseExperts``) for training the embedded reference model.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import GptOssConfig
from .attention import AttentionMasks, RMSNorm, SinkAttention
from .cache import KVCache
from .experts import DenseExperts, PackedExperts
from .moe import MoE
from .rope import Rope


@dataclass
class CausalLMOutput:
    logits: Tensor | None                       # [B, T, V]; None when called with logits=False
    cache: KVCache | None = None
    router_logits: tuple[Tensor, ...] | None = None   # per layer [N, E] fp32 (output_router_logits=True)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: GptOssConfig, layer: int, trainable: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = SinkAttention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        cls = DenseExperts if trainable else PackedExperts
        experts = cls(cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size, cfg.swiglu_alpha,
                      cfg.swiglu_limit)
        self.mlp = MoE(layer, cfg.hidden_size, cfg.num_local_experts, cfg.num_experts_per_tok, experts)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, valid: Tensor, masks: AttentionMasks,
                cache: KVCache | None) -> tuple[Tensor, Tensor]:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, masks, cache)
        moe_out, logits = self.mlp(self.post_attention_layernorm(x), valid)
        return x + moe_out, logits


class GptOssForCausalLM(nn.Module):
    def __init__(self, cfg: GptOssConfig, trainable: bool = False):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, trainable) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rope = Rope(cfg)
        self.source: str | None = None          # where the weights came from (set by the reader)
        self.source_format: str | None = None   # "mxfp4" or "bf16" experts as stored

    @classmethod
    def from_config(cls, cfg: GptOssConfig, trainable: bool = True, seed: int = 0,
                    dtype: torch.dtype = torch.float32) -> "GptOssForCausalLM":
        """A randomly initialised model (std 0.02 like HF ``initializer_range``), e.g. for training."""
        model = cls(cfg, trainable=trainable)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("layernorm.weight") or name == "norm.weight":
                    p.fill_(1.0)
                elif name.endswith("bias") or name.endswith("sinks"):
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        return model.to(dtype)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        c = self.config
        return KVCache(c.num_hidden_layers, batch, c.num_key_value_heads, c.head_dim, max_len, self.dtype, self.device)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, cache: KVCache | None = None,
                position_ids: Tensor | None = None, output_router_logits: bool = False,
                logits: bool | str = True) -> CausalLMOutput:
        """``logits=False`` stops after the last layer (no final norm, no ``lm_head``): router statistics
        need only the MoE layers, and the logits of a gpt-oss calibration batch (32,768 tokens x 201,088
        vocabulary) would be 13 GB of bf16 computed for nothing. ``logits="last"`` computes them for the last
        position only ([B, 1, V]): a generation prefill needs nothing else (2,048 prompt tokens would
        otherwise cost 0.8 GB of bf16 logits and a 2,048-row lm_head matmul)."""
        if logits not in (True, False, "last"):
            raise ValueError(f"logits must be True, False or 'last', got {logits!r}")
        b, t = input_ids.shape
        dev = input_ids.device
        valid = torch.ones(b, t, dtype=torch.bool, device=dev) if attention_mask is None else attention_mask.bool()
        past = 0 if cache is None else cache.length
        if position_ids is None:
            start = torch.zeros(b, dtype=torch.long, device=dev) if cache is None else cache.next_pos
            position_ids = (start[:, None] + valid.long().cumsum(dim=1) - 1).clamp(min=0)   # [B, T]
        if cache is not None:
            cache.reserve(t)
            k_valid = torch.cat((cache.key_valid[:, :past], valid), dim=1)                   # [B, S]
        else:
            k_valid = valid
        q_index = torch.arange(past, past + t, device=dev)                                    # [T]
        masks = AttentionMasks(q_index, k_valid, dense=True if attention_mask is None and cache is None else None)
        x = self.embed_tokens(input_ids)                                                     # [B, T, H]
        cos, sin = self.rope(position_ids, x.dtype)
        all_logits = []
        for layer in self.layers:
            x, rl = layer(x, cos, sin, valid, masks, cache)
            if output_router_logits:
                all_logits.append(rl)
        if cache is not None:
            cache.advance(valid)
        if logits == "last":
            x = x[:, -1:]                                                                    # [B, 1, H]
        out = self.lm_head(self.norm(x)) if logits else None                                 # [B, T or 1, V]
        return CausalLMOutput(out, cache, tuple(all_logits) if output_router_logits else None)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int, attention_mask: Tensor | None = None,
                 do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                 eos_token_id: int | list[int] | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Greedy or nucleus sampling with the KV cache; returns [B, T + new] (left padding supported)."""
        from .generate import generate

        return generate(self, input_ids, max_new_tokens, attention_mask, do_sample, temperature, top_p,
                        eos_token_id, generator)
