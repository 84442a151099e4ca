"""The fast path: Triton kernels for every step of a GPT-OSS decode, captured in one CUDA graph.

Decode step (batch B, one token per row; no host synchronisation anywhere), 9 launches per layer (10 on
full-attention layers, whose split-K attention needs the merge):
  embed(seq[:, pos]) -> RMSNorm -> per layer: q/k/v GEMV (one launch) -> RoPE + KV-cache write -> split-K
  sink attention + merge -> o_proj GEMV -> residual add + RMSNorm -> router logits + top-k softmax (one
  launch) -> gate_up GEMV + SwiGLU (all k experts) -> down GEMV (all k experts, routing-weighted) -> [sum of the k
  expert outputs + residual + next RMSNorm] -> ... -> lm_head (cuBLAS) -> argmax -> seq[:, pos + 1] = next,
  pos += 1.
Every position is read from the device scalar ``pos``, so one captured graph replays at any position.
Every Triton kernel of the step launches with programmatic dependent launch on sm_90+ (``pdl``): the next grid
is resident and waiting while the current one drains, which hides most of the per-launch gap of ~240 launches.
Prefill: the same kernels over T tokens (attention without the key split), the MoE as grouped GEMMs over
(token, expert) pairs sorted by expert, lm_head on the last token only; or the reference model
(``prefill="reference"``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from . import RUNTIME_PATH
from ._common import INTERPRET, next_pow2, require_triton, y_f16_ok
from .attn_kernels import advance, argmax_advance, embed_at, rmsnorm, rope_cache, sink_attention
from .fmt_kernels import FmtExperts, fmt_down_gemv, fmt_gate_up_gemv, fmt_moe_grouped
from .linear_kernels import linear_gemv
from .moe_kernels import GROUP_BM, MOE_BM, ExpertWeights, down_gemv, gate_up_gemv, moe_grouped, router_topk
from .sampling import DeviceSampler, SamplingParams


class UnsupportedModel(ValueError):
    """The model cannot run on the fast path (experts not packed, a format without a kernel, dtype, device)."""


# Decode batches up to this many tokens run the dense projections as the batch-1 GEMV (``linear_gemv``), larger
# ones through cuBLAS; from MOE_GROUPED_MIN_TOKENS tokens on the experts run as grouped GEMMs instead of the
# per-pair GEMVs, which re-read an expert's weights for every (token, slot) pair routed to it.
# Both are set from a byte count, not yet from a GPU timing (``bench/batch_profile.py`` times both paths): at
# B = 8, k = 4, E = 32 the GEMVs read ~32 experts' weights a layer against the ~20 distinct experts a grouped
# pass reads once.
DENSE_GEMV_MAX_TOKENS = 4
MOE_GROUPED_MIN_TOKENS = 8
# Decode graphs are captured per batch bucket: a batch of b rows runs in the smallest bucket >= b (its extra
# rows decode a dummy token that is dropped), so that serving many batch sizes captures few graphs.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)
# Prompt tokens per chunk of rows in the fast prefill (bounds the activations at large batches).
PREFILL_CHUNK_TOKENS = 16384
# Decode steps between two checks of "every row has emitted EOS" (each check is one host sync).
EOS_CHECK_STEPS = 16


def batch_bucket(b: int) -> int:
    """The smallest of ``BATCH_BUCKETS`` >= b; past the last, b rounded up to a multiple of 64."""
    if b < 1:
        raise ValueError(f"batch size must be >= 1, got {b}")
    for v in BATCH_BUCKETS:
        if v >= b:
            return v
    return -(-b // 64) * 64


_STACKED_NAMES = {"mxfp4": ("blocks", "scales"), "bf16": ("weight",)}


def _uniform_stacked(experts, kind: str) -> ExpertWeights | None:
    """``ExpertWeights`` when every expert of ``kind`` is a view of one stacked MXFP4 or bf16 buffer (a loaded
    checkpoint), for ``moe_kernels``' kernels; else None."""
    fmt = experts.packed(kind, 0).format
    names = _STACKED_NAMES.get(fmt)
    if names is None:
        return None
    bufs = {n: getattr(experts, f"{kind}_{n}", None) for n in names}
    for e in range(experts.num_experts):
        p = experts.packed(kind, e)
        for n in names:
            b = bufs[n]
            if p.format != fmt or b is None or b.dim() < 2 or b.shape[0] != experts.num_experts or \
                    p.tensors[n].data_ptr() != b[e].data_ptr():
                return None
    out_f, in_f = (2 * experts.intermediate, experts.hidden) if kind == "gate_up" else \
        (experts.hidden, experts.intermediate)
    return ExpertWeights(fmt, {n: b.contiguous() for n, b in bufs.items()}, out_f, in_f)


def _check_packed(experts) -> None:
    from ..model.experts import PackedExperts

    if not isinstance(experts, PackedExperts):
        raise UnsupportedModel(f"fast path needs PackedExperts, got {type(experts).__name__}")


def _fmt_experts(experts, kind: str) -> FmtExperts:
    try:
        return FmtExperts(experts, kind)
    except ValueError as exc:
        raise UnsupportedModel(str(exc)) from None


def stacked_experts(experts, kind: str) -> ExpertWeights | FmtExperts:
    """The kernels' weights for one kind of a layer's experts, or ``UnsupportedModel``.

    ``ExpertWeights`` (``moe_kernels``' MXFP4/bf16 kernels) when every expert is a view of one stacked MXFP4 or
    bf16 buffer (a loaded checkpoint); otherwise ``FmtExperts`` (``fmt_kernels``: every format, mixed formats
    within the layer), which stacks the experts once per format and re-points the model's per-expert tensors
    at views of the stacks (``FmtExperts``' docstring).
    """
    _check_packed(experts)
    return _uniform_stacked(experts, kind) or _fmt_experts(experts, kind)


def layer_experts(experts) -> tuple[ExpertWeights, ExpertWeights] | tuple[FmtExperts, FmtExperts]:
    """(gate_up, down) weights of one layer: both ``ExpertWeights`` when both kinds are uniformly stacked
    MXFP4/bf16, else both ``FmtExperts`` (the decode GEMVs and prefill GEMMs of one family pass x and y
    between them in the same layout). A stacked MXFP4 down projection also needs a SwiGLU limit that bounds
    its f16 input (``y_f16_ok``: gpt-oss's 7 does); other limits take ``FmtExperts``' fp32 path."""
    _check_packed(experts)
    gu, dn = _uniform_stacked(experts, "gate_up"), _uniform_stacked(experts, "down")
    if gu is not None and dn is not None and not (dn.fp4 and not y_f16_ok(float(experts.limit))):
        return gu, dn                  # (an MXFP4 down GEMV takes its input in f16: see _common.y_f16_ok)
    return _fmt_experts(experts, "gate_up"), _fmt_experts(experts, "down")


def _format_summary(layers) -> str:
    """"mxfp4", "nvfp4", ... when every expert of every layer is in one format, else "mixed(f1,f2,...)"."""
    names: set[str] = set()
    for L in layers:
        for w in (L.gu, L.dn):
            names |= set(getattr(w, "counts", {w.fmt: 1}))
    return names.pop() if len(names) == 1 else "mixed(" + ",".join(sorted(names)) + ")"


@dataclass
class _Layer:
    ln1: Tensor
    ln2: Tensor
    wq: Tensor
    bq: Tensor
    wk: Tensor
    bk: Tensor
    wv: Tensor
    bv: Tensor
    wo: Tensor
    bo: Tensor
    sinks: Tensor
    window: int
    wr: Tensor
    br: Tensor
    gu: ExpertWeights | FmtExperts
    gu_bias: Tensor
    dn: ExpertWeights | FmtExperts
    dn_bias: Tensor


class DecodeState:
    """Static buffers of one (batch, capacity): the KV cache, the token buffer ``seq`` [B, L+1] int32, the
    device position ``pos`` (cache index of the token processed next, shared by every row), the left padding
    ``off`` [B] int32 of each row (row b's tokens start at cache index off[b]; RoPE positions count from
    there), RoPE tables and the decode graph."""

    def __init__(self, rt: "Runtime", batch: int, max_len: int):
        m = rt.model
        dev = m.device
        self.batch, self.max_len = batch, max_len
        self.cache = m.new_cache(batch, max_len)
        self.seq = torch.zeros(batch, max_len + 1, dtype=torch.int32, device=dev)
        self.pos = torch.zeros(1, dtype=torch.int32, device=dev)
        self.off = torch.zeros(batch, dtype=torch.int32, device=dev)
        self.host_pos = 0
        cos, sin = m.rope(torch.arange(max_len, device=dev)[None], m.dtype)     # the reference's own tables
        self.cos, self.sin = cos[0].contiguous(), sin[0].contiguous()            # [L, d/2]
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: Tensor | None = None
        # how the decode step picks its token: "greedy" (argmax), "sample" or "sample-filtered" (top-k/top-p);
        # one captured graph per mode, the current one in graph/logits/sampler, the others kept in ``modes``
        self.mode = "greedy"
        self.sampler: DeviceSampler | None = None
        self.modes: dict[str, tuple] = {}

    @property
    def nbytes(self) -> int:
        return self.cache.nbytes + self.seq.numel() * 4


class Runtime:
    """Fast GPT-OSS inference for one loaded model (bf16 activations, stacked MXFP4 or bf16 experts)."""

    path = RUNTIME_PATH

    def __init__(self, model, use_graph: bool | None = None):
        require_triton()
        cfg = model.config
        if model.dtype != torch.bfloat16:
            raise UnsupportedModel(f"fast path runs bf16 activations; model dtype is {model.dtype}")
        if not (model.device.type == "cuda" or INTERPRET):
            raise UnsupportedModel("fast path needs the model on a CUDA device")
        if any(getattr(lyr.mlp, "skip_beta", None) is not None for lyr in model.layers):
            raise UnsupportedModel("dynamic expert skipping (mxq.model.skipping) runs on the reference path only")
        self.model, self.cfg = model, cfg
        self.use_graph = (model.device.type == "cuda") if use_graph is None else use_graph
        self.eps = cfg.rms_norm_eps
        self.top_k = cfg.num_experts_per_tok
        self.scale = cfg.head_dim ** -0.5
        self.layers: list[_Layer] = []
        for lyr in model.layers:
            at, mlp = lyr.self_attn, lyr.mlp
            ex = mlp.experts
            gu, dn = layer_experts(ex)
            self.layers.append(_Layer(
                lyr.input_layernorm.weight, lyr.post_attention_layernorm.weight,
                at.q_proj.weight, at.q_proj.bias, at.k_proj.weight, at.k_proj.bias, at.v_proj.weight,
                at.v_proj.bias, at.o_proj.weight, at.o_proj.bias, at.sinks, int(at.window or 0),
                mlp.router.weight, mlp.router.bias,
                gu, ex.gate_up_bias, dn, ex.down_bias))
        self.alpha, self.limit = float(model.layers[0].mlp.experts.alpha), float(model.layers[0].mlp.experts.limit)
        self.expert_format = _format_summary(self.layers)
        self._state: DecodeState | None = None             # the state used last
        self._states: dict[int, DecodeState] = {}            # by batch bucket
        self.dense_gemv_max_tokens = DENSE_GEMV_MAX_TOKENS
        self.moe_grouped_min_tokens = MOE_GROUPED_MIN_TOKENS

    # ------------------------------------------------------------------------------------------- forward
    def _decode_moe_tile(self, L: _Layer, n: int) -> int:
        """Pairs per tile of the grouped MoE in a decode step of n tokens: the mean pairs per expert rounded up
        to a power of two, at least 16 for ``fmt_kernels`` (the pairs are the dot's N operand) and 32 for
        ``moe_kernels`` (the pairs are the M operand of ``tl.dot_scaled``; the smallest tile its tests cover),
        at most the prefill tile."""
        fmt = isinstance(L.gu, FmtExperts)
        e = L.gu.num_experts if fmt else L.gu.w.shape[0]
        lo, cap = (16, GROUP_BM) if fmt else (32, MOE_BM[L.gu.fmt])
        return min(cap, max(lo, next_pow2(-(-n * self.top_k // e))))

    def _layers(self, x: Tensor, t: int, st: DecodeState, decode: bool, rows: slice = slice(None)) -> Tensor:
        """Every layer over x [N, H] (N = B*T, the state's rows ``rows``); returns the final-normed hidden
        states [N, H].

        Decode of a few tokens runs the batch-1 GEMVs (dense projections and experts stream their weights once
        per token); from ``dense_gemv_max_tokens`` / ``moe_grouped_min_tokens`` tokens on, cuBLAS for the
        dense projections and the grouped expert GEMMs (pairs sorted by expert, each expert's weights read once
        per tile of pairs), which read the weights once for the whole batch."""
        n = x.shape[0]
        off = st.off[rows]
        dense_gemv = decode and n <= self.dense_gemv_max_tokens
        moe_gemv = decode and n < self.moe_grouped_min_tokens
        h = rmsnorm(x, self.layers[0].ln1, self.eps)
        for i, L in enumerate(self.layers):
            if dense_gemv:
                q, k, v = linear_gemv(h, [(L.wq, L.bq), (L.wk, L.bk), (L.wv, L.bv)])
            else:
                q, k, v = F.linear(h, L.wq, L.bq), F.linear(h, L.wk, L.bk), F.linear(h, L.wv, L.bv)
            kc, vc = st.cache.k[i][rows], st.cache.v[i][rows]
            qr = rope_cache(q, k, v, st.cos, st.sin, kc, vc, st.pos, t, off)
            o = sink_attention(qr, kc, vc, L.sinks, st.pos, t, L.window, self.scale, split=decode, off=off)
            a = linear_gemv(o.view(n, -1), [(L.wo, L.bo)])[0] if dense_gemv else F.linear(o.view(n, -1), L.wo, L.bo)
            if moe_gemv:
                x, h2, hs = rmsnorm(x, L.ln2, self.eps, delta=a, hs="h2perm" if L.gu.fp4 else "fp32")
            else:
                x, h2 = rmsnorm(x, L.ln2, self.eps, delta=a)
            idx, wt = router_topk(h2, L.wr, L.br, self.top_k)
            if moe_gemv and isinstance(L.gu, FmtExperts):      # any format, one launch per format in the layer
                y = fmt_gate_up_gemv(hs, idx, L.gu, L.gu_bias, self.alpha, self.limit)
                z = fmt_down_gemv(y, idx, wt, L.dn, L.dn_bias)
            elif moe_gemv:
                y = gate_up_gemv(hs, idx, L.gu, L.gu_bias, self.alpha, self.limit, yperm=L.dn.fp4)
                z = down_gemv(y, idx, wt, L.dn, L.dn_bias)
            else:
                grouped = fmt_moe_grouped if isinstance(L.gu, FmtExperts) else moe_grouped
                z = grouped(h2, idx, wt, L.gu, L.gu_bias, L.dn, L.dn_bias, self.alpha, self.limit,
                            bm=self._decode_moe_tile(L, n) if decode else None)
            nxt = self.layers[i + 1].ln1 if i + 1 < len(self.layers) else self.model.norm.weight
            x, h = rmsnorm(x, nxt, self.eps, moe=z)
        return h

    def _decode_body(self, st: DecodeState) -> Tensor:
        x = embed_at(st.seq, st.pos, self.model.embed_tokens.weight)
        logits = F.linear(self._layers(x, 1, st, decode=True), self.model.lm_head.weight)   # [B, V]
        if st.sampler is None:
            argmax_advance(logits, st.seq, st.pos)                  # greedy: argmax fused with the advance
        else:
            advance(st.sampler(logits), st.seq, st.pos)
        return logits

    @staticmethod
    def choose(st: DecodeState, logits: Tensor) -> Tensor:
        """The next token [B] from logits [B, V]: argmax, or the state's device sampler (no host sync)."""
        return torch.argmax(logits, dim=-1) if st.sampler is None else st.sampler(logits)

    def use_sampling(self, st: DecodeState, params: SamplingParams | None) -> None:
        """Make ``st`` decode greedily (None) or sample with ``params``: the parameters are written into the
        mode's device tensors; a mode used for the first time on this state is captured now (call this
        before ``prefill``: the capture's warm-up steps write the KV cache at positions 0 and 1)."""
        mode = "greedy" if params is None else ("sample-filtered" if params.filtered else "sample")
        if mode != st.mode:
            st.modes[st.mode] = (st.sampler, st.graph, st.logits)
            if mode in st.modes:
                st.sampler, st.graph, st.logits = st.modes.pop(mode)
            else:
                st.sampler = None if params is None else DeviceSampler(st.seq.device, params.filtered)
                st.graph = st.logits = None
                if self.use_graph:
                    st.pos.zero_()
                    st.host_pos = 0
                    self._capture(st)
            st.mode = mode
        if params is not None:
            st.sampler.set(params)

    # ------------------------------------------------------------------------------------------- state
    def new_state(self, batch: int, max_len: int) -> DecodeState:
        st = DecodeState(self, batch, max_len)
        if self.use_graph:
            self._capture(st)
        return st

    def state_bytes(self, batch: int, max_len: int) -> int:
        """Device bytes of a ``DecodeState``'s KV cache (bf16 keys and values of every layer)."""
        c = self.cfg
        per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * self.model.dtype.itemsize
        return per_token * batch * max_len

    def state_for(self, batch: int, need: int) -> DecodeState:
        """The state of ``batch``'s bucket (``batch_bucket``) with room for ``need`` positions (capacity rounded
        up to 256). States and their graphs are kept per bucket while they fit in free device memory beside the
        new one; otherwise the others are dropped first."""
        bucket = batch_bucket(batch)
        cap = -(-need // 256) * 256
        st = self._states.get(bucket)
        if st is None or st.max_len < cap:
            self._states.pop(bucket, None)
            self._state = st = None
            if torch.cuda.is_available() and self.model.device.type == "cuda":
                torch.cuda.empty_cache()
                free = torch.cuda.mem_get_info(self.model.device)[0]
                if self._states and self.state_bytes(bucket, cap) * 1.1 + (2 << 30) > free:
                    self._states.clear()
                    torch.cuda.empty_cache()
            st = self._states[bucket] = self.new_state(bucket, cap)
        self._state = st
        return st

    def _capture(self, st: DecodeState) -> None:
        """Warm up (compiles and autotunes the kernels) and capture one decode step at pos 0, before any
        prefill: the warm-up's KV writes land in positions that a prefill overwrites."""
        saved_pos, saved_seq = st.pos.clone(), st.seq.clone()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                self._decode_body(st)
        torch.cuda.current_stream().wait_stream(s)
        st.pos.copy_(saved_pos)
        st.seq.copy_(saved_seq)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            st.logits = self._decode_body(st)
        st.graph = g
        torch.cuda.synchronize()

    # ------------------------------------------------------------------------------------------- API
    @torch.no_grad()
    def prefill(self, st: DecodeState, input_ids: Tensor, mode: str = "fast", attention_mask: Tensor | None = None,
                chunk_events: list | None = None) -> Tensor:
        """Run the prompts [b, T] (b <= the state's batch; left-padded where ``attention_mask`` [b, T] has
        zeros) from cache position 0; returns the last position's logits [b, V].

        Rows past b (the rest of the batch bucket) get no prompt: their keys start at T, so a decode step reads
        only what it wrote itself for them. The fast prefill runs the rows in chunks of about
        ``PREFILL_CHUNK_TOKENS`` tokens (activations stay bounded at B = 256 x 4,096); ``chunk_events``, a list,
        receives (rows done, CUDA event) after each chunk (per-row time to first token)."""
        b, t = input_ids.shape
        if b > st.batch or t >= st.max_len:
            raise ValueError(f"prompt {tuple(input_ids.shape)} does not fit the state ({st.batch}, {st.max_len})")
        off = left_padding(input_ids, attention_mask)                        # [b] int64
        st.seq[:b, :t] = input_ids.to(torch.int32)
        st.seq[b:] = 0
        st.off[:b] = off.to(torch.int32)
        st.off[b:] = t
        st.pos.zero_()
        if mode == "reference":
            c = st.cache
            c.length = 0
            c.key_valid.zero_()
            c.next_pos.zero_()
            ids = st.seq[:, :t].long()
            mask = (torch.arange(t, device=ids.device)[None] >= st.off[:, None]).long()
            mask[b:, -1] = 1                              # the reference needs a real token per row
            logits = self.model(ids, attention_mask=mask, cache=c, logits="last").logits[:b, -1]
        elif mode == "fast":
            chunk = max(1, PREFILL_CHUNK_TOKENS // t)
            parts = []
            for r0 in range(0, b, chunk):
                r1 = min(b, r0 + chunk)
                x = F.embedding(input_ids[r0:r1].reshape(-1), self.model.embed_tokens.weight)
                h = self._layers(x, t, st, decode=False, rows=slice(r0, r1))
                parts.append(F.linear(h.view(r1 - r0, t, -1)[:, -1], self.model.lm_head.weight))
                if chunk_events is not None and input_ids.is_cuda:
                    ev = torch.cuda.Event(enable_timing=True)
                    ev.record()
                    chunk_events.append((r1, ev))
            logits = parts[0] if len(parts) == 1 else torch.cat(parts)
            st.cache.length = t
        else:
            raise ValueError(f"prefill mode {mode!r} is not 'fast' or 'reference'")
        st.pos.fill_(t)
        st.host_pos = t
        return logits

    @torch.no_grad()
    def step(self, st: DecodeState, tokens: Tensor | None = None) -> Tensor:
        """One decode step at ``st.host_pos``. ``tokens`` [b] forces the input token of the first b rows
        (teacher forcing); otherwise the token the previous step chose is used. Returns logits [B, V] (a static
        buffer when a graph is used: clone it to keep it). The step also writes its chosen token (argmax, or a
        sample after ``use_sampling``) into seq[:, pos + 1]."""
        if st.host_pos >= st.max_len:
            raise ValueError(f"KV cache full at {st.host_pos} positions")
        if tokens is not None:
            st.seq[:tokens.shape[0], st.host_pos] = tokens.to(torch.int32)
        if st.graph is not None:
            st.graph.replay()
            logits = st.logits
        else:
            logits = self._decode_body(st)
        st.host_pos += 1
        return logits

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int, eos_token_id=None, prefill: str = "fast",
                 timings: dict | None = None, do_sample: bool = False, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, attention_mask: Tensor | None = None) -> Tensor:
        """Greedy, or (``do_sample``) temperature / top-k / top-p sampling with the default CUDA generator
        (seed it with ``torch.manual_seed``); temperature 0 is greedy. ``attention_mask`` [B, T]: left padding
        (1 = token, 0 = pad), as transformers' ``generate``; returns [B, T + new] with the padding kept.

        Each row stops at its first EOS (later tokens are eos[0], as the reference ``generate``); decoding
        ends when every row has stopped (checked every ``EOS_CHECK_STEPS`` steps: one host sync each) or after
        ``max_new_tokens``."""
        b, t = input_ids.shape
        if max_new_tokens <= 0:
            return input_ids
        st = self.state_for(b, t + max_new_tokens)
        self.use_sampling(st, SamplingParams(temperature, top_p, top_k) if do_sample else None)
        cuda = input_ids.is_cuda
        chunks: list = []
        if cuda:
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            ev[0].record()
        t0 = time.perf_counter()
        logits = self.prefill(st, input_ids, prefill, attention_mask=attention_mask, chunk_events=chunks)
        st.seq[:b, t] = self.choose(st, logits).to(torch.int32)
        if cuda:
            ev[1].record()
        t1 = time.perf_counter()
        eos = None if eos_token_id is None else torch.tensor(
            [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=input_ids.device)
        steps = 0
        while steps < max_new_tokens - 1:
            self.step(st)
            steps += 1
            if eos is not None and steps % EOS_CHECK_STEPS == 0 and \
                    bool(torch.isin(st.seq[:b, t:t + steps + 1], eos).any(1).all()):
                break
        if cuda:
            ev[2].record()
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        if timings is not None:
            if cuda:
                timings.update(prefill_ms=ev[0].elapsed_time(ev[1]), decode_ms=ev[1].elapsed_time(ev[2]))
                rows_ms, done = [], 0
                for r1, e in chunks:                       # per-row end of its prefill chunk
                    rows_ms += [ev[0].elapsed_time(e)] * (r1 - done)
                    done = r1
                timings["ttft_rows_ms"] = rows_ms or [timings["prefill_ms"]] * b
            else:
                timings.update(prefill_ms=(t1 - t0) * 1e3, decode_ms=(t2 - t1) * 1e3)
            timings["decode_steps"] = steps
            timings["batch_bucket"] = st.batch
        new = st.seq[:b, t:t + steps + 1].long()
        if eos is not None:
            new = _apply_eos(new, eos_token_id)
        return torch.cat([input_ids, new], dim=1)


def left_padding(input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
    """Pads at the start of each row [B] (int64) of a left-padded ``attention_mask`` [B, T] (1 = token,
    0 = pad); zeros without a mask. A mask of another shape, with values other than 0/1, with a pad after a
    token (right or inner padding) or with an empty row is refused."""
    b, t = input_ids.shape
    if attention_mask is None:
        return torch.zeros(b, dtype=torch.long, device=input_ids.device)
    m = attention_mask.to(input_ids.device)
    if tuple(m.shape) != (b, t):
        raise ValueError(f"attention_mask has shape {tuple(m.shape)}, input_ids {(b, t)}")
    mi = m.long()
    if bool(((mi != 0) & (mi != 1)).any()):
        raise ValueError("attention_mask must hold only 0 (pad) and 1 (token)")
    if t > 1 and bool((mi[:, 1:] < mi[:, :-1]).any()):
        raise ValueError("attention_mask: the fast path takes left padding only (a pad follows a token in some "
                         "row); pad prompts on the left, as transformers' generate does for decoder-only models")
    if bool((mi[:, -1] == 0).any()):
        raise ValueError("attention_mask: some row has no token")
    return t - mi.sum(1)


def _apply_eos(new: Tensor, eos_token_id) -> Tensor:
    """Like the reference ``generate``: after a row's first EOS every token is eos[0]; stop when all rows are done."""
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=new.device)
    hit = torch.isin(new, eos)
    done_before = (hit.long().cumsum(1) - hit.long()) > 0                       # an EOS earlier in the row
    new = torch.where(done_before, eos[0], new)
    row_end = torch.where(hit.any(1), hit.float().argmax(1), torch.full_like(hit[:, 0], new.shape[1] - 1,
                                                                             dtype=torch.long))
    return new[:, :int(row_end.max()) + 1]


def decode_bytes_per_token(model, context: int) -> dict:
    """Bytes a batch-1 decode step must read at ``context`` keys: the k used experts per layer (packed bytes in
    each expert's own format, scales included, and bias rows; the mean over the layer's experts), attention and
    router weights, norms, the lm_head, one embedding row and the KV cache."""
    cfg = model.config
    k = cfg.num_experts_per_tok
    nb = lambda t: t.numel() * t.element_size()                               # noqa: E731
    experts = attn = router = kv = 0
    for i, lyr in enumerate(model.layers):
        ex = lyr.mlp.experts
        e = ex.num_experts
        # mean packed bytes of one expert (its own format's tensors, scales included) + its bias rows; a stacked
        # buffer whose experts were partly replaced by a plan is not counted for the replaced ones
        packed = sum(ex.packed(kind, j).nbytes for kind in ex.KINDS for j in range(e))
        experts += k * (packed + nb(ex.gate_up_bias) + nb(ex.down_bias)) // e
        at = lyr.self_attn
        attn += sum(nb(p) for p in at.parameters()) + nb(lyr.input_layernorm.weight) + \
            nb(lyr.post_attention_layernorm.weight)
        router += sum(nb(p) for p in lyr.mlp.router.parameters())
        keys = min(context, cfg.sliding_window) if cfg.is_sliding(i) else context
        kv += 2 * keys * cfg.num_key_value_heads * cfg.head_dim * model.dtype.itemsize
    head = nb(model.lm_head.weight) + nb(model.norm.weight) + cfg.hidden_size * model.dtype.itemsize
    total = experts + attn + router + kv + head
    return {"experts": experts, "attention": attn, "router": router, "kv_cache": kv, "lm_head_norm_embed": head,
            "total": total}


def decode_bytes_per_step(model, context: int, batch: int) -> dict:
    """Bytes a decode step of ``batch`` rows at ``context`` keys each must read: the dense weights (attention,
    router, norms, lm_head) once, each expert that at least one of the batch's tokens is routed to once (the
    expected number of distinct experts per layer under uniform routing, E (1 - (1 - k/E)^B), times the mean
    bytes of the layer's experts in their own formats, bias rows included), B embedding rows and every row's
    KV cache (sliding-window layers read at most their window). ``batch=1`` equals ``decode_bytes_per_token``
    up to the expert count (k at batch 1)."""
    cfg = model.config
    k = cfg.num_experts_per_tok
    one = decode_bytes_per_token(model, context)
    nb = lambda t: t.numel() * t.element_size()                               # noqa: E731
    experts = 0.0
    for lyr in model.layers:
        ex = lyr.mlp.experts
        e = ex.num_experts
        per = (sum(ex.packed(kind, j).nbytes for kind in ex.KINDS for j in range(e)) + nb(ex.gate_up_bias)
               + nb(ex.down_bias)) / e
        experts += per * e * (1.0 - (1.0 - min(k, e) / e) ** batch)
    embed = (batch - 1) * cfg.hidden_size * model.dtype.itemsize
    out = {"experts": int(experts), "attention": one["attention"], "router": one["router"],
           "kv_cache": batch * one["kv_cache"], "lm_head_norm_embed": one["lm_head_norm_embed"] + embed}
    out["total"] = sum(out.values())
    return out
