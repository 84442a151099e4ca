"""A static KV cache for incremental decoding, with per-row key validity for padded batches."""
from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    """Keys/values for every layer, preallocated to ``max_len`` positions.

    ``key_valid`` [B, max_len] marks real (non-padding) keys; ``next_pos`` [B] is the RoPE position the
    next real token of each row gets, so left-padded rows keep positions 0, 1, 2, ... for real tokens.
    """

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (batch, num_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.key_valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.length = 0
        self.max_len = max_len

    def reserve(self, t: int) -> None:
        if self.length + t > self.max_len:
            raise ValueError(f"KV cache full: {self.length} + {t} tokens exceed max_len {self.max_len}")

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v [B, kv, T, d] at the current length; return the filled prefix [B, kv, S, d]."""
        t = k.shape[2]
        s = self.length + t
        self.k[layer][:, :, self.length:s] = k
        self.v[layer][:, :, self.length:s] = v
        return self.k[layer][:, :, :s], self.v[layer][:, :, :s]

    def advance(self, valid: Tensor) -> None:
        """Commit a step of T tokens with validity ``valid`` [B, T] (called once per forward)."""
        t = valid.shape[1]
        self.key_valid[:, self.length:self.length + t] = valid
        self.next_pos += valid.long().sum(dim=1)
        self.length += t

    @property
    def nbytes(self) -> int:
        return sum(x.numel() * x.element_size() for x in self.k + self.v)
