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

from ._common import INTERPRET, require_triton, y_f16_ok
from .attn_kernels import advance, argmax_advance, embed_at, rmsnorm, rope_cache, sink_attention
from .linear_kernels import linear_gemv
from .fmt_kernels import FmtExperts, fmt_down_gemv, fmt_gate_up_gemv, fmt_moe_grouped
from .moe_kernels import ExpertWeights, down_gemv, gate_up_gemv, moe_grouped, router_topk
from .sampling import DeviceSampler, SamplingParams

from . import RUNTIME_PATH


class UnsupportedModel(ValueError):
    """The model cannot run on the fast path (experts not packed, a format without a kernel, dtype, device)."""


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
    device position ``pos`` (cache index of the token processed next), RoPE tables and the decode graph."""

    def __init__(self, rt: "Runtime", batch: int, max_len: int):
        m = rt.model
        dev = m.device
        self.batch, self.max_len = batch, max_len
        self.cache = m.new_cache(batch, max_len)
        self.seq = torch.zeros(batch, max_len + 1, dtype=torch.int32, device=dev)
        self.pos = torch.zeros(1, dtype=torch.int32, device=dev)
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
        self._state: DecodeState | None = None

    # ------------------------------------------------------------------------------------------- forward
    def _layers(self, x: Tensor, t: int, st: DecodeState, decode: bool) -> Tensor:
        """Every layer over x [N, H] (N = B*T); returns the final-normed hidden states [N, H]."""
        n = x.shape[0]
        h = rmsnorm(x, self.layers[0].ln1, self.eps)
        for i, L in enumerate(self.layers):
            if decode:
                q, k, v = linear_gemv(h, [(L.wq, L.bq), (L.wk, L.bk), (L.wv, L.bv)])
            else:
                q, k, v = F.linear(h, L.wq, L.bq), F.linear(h, L.wk, L.bk), F.linear(h, L.wv, L.bv)
            kc, vc = st.cache.k[i], st.cache.v[i]
            qr = rope_cache(q, k, v, st.cos, st.sin, kc, vc, st.pos, t)
            o = sink_attention(qr, kc, vc, L.sinks, st.pos, t, L.window, self.scale, split=decode)
            if decode:
                a = linear_gemv(o.view(n, -1), [(L.wo, L.bo)])[0]
                x, h2, hs = rmsnorm(x, L.ln2, self.eps, delta=a, hs="h2perm" if L.gu.fp4 else "fp32")
            else:
                a = F.linear(o.view(n, -1), L.wo, L.bo)
                x, h2 = rmsnorm(x, L.ln2, self.eps, delta=a)
            idx, wt = router_topk(h2, L.wr, L.br, self.top_k)
            if decode and isinstance(L.gu, FmtExperts):      # any format, one launch per format in the layer
                y = fmt_gate_up_gemv(hs, idx, L.gu, L.gu_bias, self.alpha, self.limit)
                z = fmt_down_gemv(y, idx, wt, L.dn, L.dn_bias)
            elif decode:
                y = gate_up_gemv(hs, idx, L.gu, L.gu_bias, self.alpha, self.limit, yperm=L.dn.fp4)
                z = down_gemv(y, idx, wt, L.dn, L.dn_bias)
            else:
                grouped = fmt_moe_grouped if isinstance(L.gu, FmtExperts) else moe_grouped
                z = grouped(h2, idx, wt, L.gu, L.gu_bias, L.dn, L.dn_bias, self.alpha, self.limit)
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

    def state_for(self, batch: int, need: int) -> DecodeState:
        """A cached state with room for ``need`` positions (capacity rounded up to 256; graph reused)."""
        st = self._state
        if st is None or st.batch != batch or st.max_len < need:
            self._state = None
            st = None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self._state = st = self.new_state(batch, -(-need // 256) * 256)
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
    def prefill(self, st: DecodeState, input_ids: Tensor, mode: str = "fast") -> Tensor:
        """Run the prompt [B, T] from position 0; returns the last position's logits [B, V]."""
        b, t = input_ids.shape
        if b != st.batch or t >= st.max_len:
            raise ValueError(f"prompt {tuple(input_ids.shape)} does not fit the state ({st.batch}, {st.max_len})")
        st.seq[:, :t] = input_ids.to(torch.int32)
        st.pos.zero_()
        if mode == "reference":
            c = st.cache
            c.length = 0
            c.key_valid.zero_()
            c.next_pos.zero_()
            logits = self.model(input_ids, cache=c, logits="last").logits[:, -1]
        elif mode == "fast":
            x = F.embedding(input_ids.reshape(-1), self.model.embed_tokens.weight)
            h = self._layers(x, t, st, decode=False)
            logits = F.linear(h.view(b, t, -1)[:, -1], self.model.lm_head.weight)
            st.cache.length = t
        else:
            raise ValueError(f"prefill mode {mode!r} is not 'fast' or 'reference'")
        st.pos.fill_(t)
        st.host_pos = t
        return logits

    @torch.no_grad()
    def step(self, st: DecodeState, tokens: Tensor | None = None) -> Tensor:
        """One decode step at ``st.host_pos``. ``tokens`` [B] forces the input token (teacher forcing);
        otherwise the token the previous step chose is used. Returns logits [B, V] (a static buffer when a
        graph is used: clone it to keep it). The step also writes its chosen token (argmax, or a sample after
        ``use_sampling``) into seq[:, pos + 1]."""
        if st.host_pos >= st.max_len:
            raise ValueError(f"KV cache full at {st.host_pos} positions")
        if tokens is not None:
            st.seq[:, st.host_pos] = tokens.to(torch.int32)
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
                 top_p: float = 1.0, top_k: int = 0) -> Tensor:
        """Greedy, or (``do_sample``) temperature / top-k / top-p sampling with the default CUDA generator
        (seed it with ``torch.manual_seed``); temperature 0 is greedy. Rows without padding."""
        b, t = input_ids.shape
        if max_new_tokens <= 0:
            return input_ids
        st = self.state_for(b, t + max_new_tokens)
        self.use_sampling(st, SamplingParams(temperature, top_p, top_k) if do_sample else None)
        cuda = input_ids.is_cuda
        if cuda:
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            ev[0].record()
        t0 = time.perf_counter()
        logits = self.prefill(st, input_ids, prefill)
        st.seq[:, t] = self.choose(st, logits).to(torch.int32)
        if cuda:
            ev[1].record()
        t1 = time.perf_counter()
        for _ in range(max_new_tokens - 1):
            self.step(st)
        if cuda:
            ev[2].record()
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        if timings is not None:
            if cuda:
                timings.update(prefill_ms=ev[0].elapsed_time(ev[1]), decode_ms=ev[1].elapsed_time(ev[2]))
            else:
                timings.update(prefill_ms=(t1 - t0) * 1e3, decode_ms=(t2 - t1) * 1e3)
            timings["decode_steps"] = max_new_tokens - 1
        new = st.seq[:, t:t + max_new_tokens].long()
        if eos_token_id is not None:
            new = _apply_eos(new, eos_token_id)
        return torch.cat([input_ids, new], dim=1)


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
