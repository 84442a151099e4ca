"""Token windows for calibration: ``build_calibration(cfg, tokenizer) -> CalibSet``.

Each domain's text is tokenised once with the model's own tokenizer, then cut into ``seq_len``-token
windows drawn at random (seeded per domain), with equal numbers of windows per domain so that no single
domain dominates the router statistics. Windows do not overlap while the text is long enough: the token
stream is split into consecutive windows after a random offset and a random subset is kept. The set is
a pure function of (config, text, tokenizer), and ``config_hash`` covers all three through the tokens
themselves, so a changed file, split or tokenizer changes the hash (and misses the statistics cache).
"""
from __future__ import annotations

import json
import logging
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import xxhash
from torch import Tensor

from .config import CalibConfig, CalibError
from .sources import source_texts

log = logging.getLogger("mxq.calib")


@dataclass
class CalibSet:
    input_ids: Tensor          # [N, T] long
    attention_mask: Tensor     # [N, T] long, 1 = token, 0 = padding (right)
    domains: list[str]         # [N] domain of each sequence
    config_hash: str           # hex digest of config + domains + tokens
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def domain_names(self) -> list[str]:
        """Distinct domains in order of first appearance (the order of the per-domain statistics)."""
        return list(dict.fromkeys(self.domains))

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def domain_index(self) -> Tensor:
        """[N] long: index of each sequence's domain in ``domain_names``."""
        names = {d: i for i, d in enumerate(self.domain_names)}
        return torch.tensor([names[d] for d in self.domains], dtype=torch.long)

    def batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """Yield (input_ids [b, T], attention_mask [b, T], domain index [b]) in order."""
        dom = self.domain_index()
        for s in range(0, self.input_ids.shape[0], batch_size):
            yield self.input_ids[s:s + batch_size], self.attention_mask[s:s + batch_size], dom[s:s + batch_size]


def tokenize(tokenizer: Any, text: str) -> Tensor:
    """[n] long: the whole text, no special tokens (windows start mid-text, as in pretraining data)."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is not None:  # the Rust tokenizer directly: no max-length warnings for long texts
        ids = backend.encode(text, add_special_tokens=False).ids
    else:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def domain_windows(ids: Tensor, share: int, seq_len: int, seed: int, domain: str) -> list[Tensor]:
    """``share`` windows of ``seq_len`` tokens from ``ids`` [n]; fewer tokens than seq_len: one short window."""
    n = ids.numel()
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(domain.encode()))
    if n < seq_len:
        log.warning("calibration domain %r has only %d tokens (< seq_len %d): one padded sequence instead of %d",
                    domain, n, seq_len, share)
        return [ids]
    offset = int(torch.randint(0, min(seq_len, n - seq_len + 1), (1,), generator=g))
    chunks = (n - offset) // seq_len
    if chunks >= share:
        pick = torch.randperm(chunks, generator=g)[:share]
        starts = offset + pick * seq_len
    else:
        log.warning("calibration domain %r: %d tokens give %d disjoint windows of %d, %d asked; windows overlap",
                    domain, n, chunks, seq_len, share)
        starts = torch.randint(0, n - seq_len + 1, (share,), generator=g)
    return [ids[s:s + seq_len] for s in starts.tolist()]


def pad_id(tokenizer: Any) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, name, None)
        if v is not None:
            return int(v)
    return 0


def calib_hash(config: dict[str, Any], domains: list[str], ids: Tensor, mask: Tensor) -> str:
    h = xxhash.xxh3_128()
    h.update(json.dumps(config, sort_keys=True).encode())
    h.update(json.dumps(domains).encode())
    h.update(ids.contiguous().numpy().tobytes())
    h.update(mask.contiguous().numpy().tobytes())
    return h.hexdigest()


def build_calibration(cfg: Any, tokenizer: Any) -> CalibSet:
    """Build the calibration set described by ``cfg`` (CalibConfig, dict or DictConfig)."""
    c = CalibConfig.from_cfg(cfg)
    texts = source_texts(c)
    if c.num_sequences < len(texts):
        raise CalibError(f"calib.num_sequences={c.num_sequences} is less than the {len(texts)} domains "
                         f"({', '.join(texts)}); every domain needs at least one sequence")
    base, extra = divmod(c.num_sequences, len(texts))
    rows: list[Tensor] = []
    domains: list[str] = []
    for i, (dom, text) in enumerate(texts.items()):
        wins = domain_windows(tokenize(tokenizer, text), base + (i < extra), c.seq_len, c.seed, dom)
        rows += wins
        domains += [dom] * len(wins)
    ids = torch.full((len(rows), c.seq_len), pad_id(tokenizer), dtype=torch.long)          # [N, T]
    mask = torch.zeros((len(rows), c.seq_len), dtype=torch.long)                           # [N, T]
    for r, w in enumerate(rows):
        ids[r, :w.numel()] = w
        mask[r, :w.numel()] = 1
    config = c.to_dict()
    return CalibSet(ids, mask, domains, calib_hash(config, domains, ids, mask), config)
